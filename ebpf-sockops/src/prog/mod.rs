mod adopt;
mod charge;
mod key;
mod maps;
mod pacing;
mod psock;
mod rules;
mod skmsg;
mod sockops;

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
