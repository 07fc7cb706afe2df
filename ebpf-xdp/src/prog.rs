//! XDP entry on leased/pod interfaces: accounting now, AF_XDP redirect for the VM fast path
//! later. Fallback verdict: `XDP_PASS`, so the kernel stack always gets what we do not claim.
use aya_ebpf::{
    bindings::xdp_action::XDP_PASS,
    macros::{map, xdp},
    maps::PerCpuArray,
    programs::XdpContext,
};
use quicklane_common::counters::xdp as c;

#[map(name = "QL_XDP_STATS")]
static QL_XDP_STATS: PerCpuArray<u64> = PerCpuArray::pinned(c::LEN, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

#[inline(always)]
fn count(slot: u32, by: u64) {
    if let Some(p) = QL_XDP_STATS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, only this CPU writes it while this program runs.
        unsafe { *p += by };
    }
}

/// The one bounds-checked way to look into the packet.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    if start + offset + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *const T)
}

#[xdp]
pub fn ql_xdp(ctx: XdpContext) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u64;
    count(c::PACKETS, 1);
    count(c::BYTES, len);
    // SAFETY: ptr_at checked that the two bytes lie inside the packet.
    let proto =
        ptr_at::<u16>(&ctx, ETH_HLEN - 2).map(|p| u16::from_be(unsafe { p.read_unaligned() }));
    if !matches!(proto, Some(ETH_P_IP | ETH_P_IPV6)) {
        count(c::NON_IP, 1);
    }
    XDP_PASS
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
