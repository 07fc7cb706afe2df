//! tc programs on the host side of pod interfaces: per-direction accounting and the EDT
//! shaper. On a host-side veth, device ingress carries what the pod sends (its egress) and
//! device egress what it receives. Fallback verdict: `TC_ACT_UNSPEC` ("next program / default
//! action"); only the shaper's drop beyond the horizon returns anything else.
mod maps;
mod shape;

use aya_ebpf::{bindings::TC_ACT_UNSPEC, macros::classifier, programs::TcContext};
use quicklane_common::{
    counters::tc as c,
    qos::{DIR_EGRESS, DIR_INGRESS},
};

use maps::count;

#[classifier]
pub fn ql_tc_egress(ctx: TcContext) -> i32 {
    count(c::EGRESS_PACKETS, 1);
    count(c::EGRESS_BYTES, u64::from(ctx.len()));
    shape::shape(&ctx, DIR_INGRESS).unwrap_or(TC_ACT_UNSPEC)
}

#[classifier]
pub fn ql_tc_ingress(ctx: TcContext) -> i32 {
    count(c::INGRESS_PACKETS, 1);
    count(c::INGRESS_BYTES, u64::from(ctx.len()));
    shape::shape(&ctx, DIR_EGRESS).unwrap_or(TC_ACT_UNSPEC)
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
