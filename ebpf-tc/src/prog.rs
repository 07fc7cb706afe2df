//! tc programs on pod interfaces: per-direction traffic accounting, the base the EDT shaper
//! builds on. Fallback verdict: `TC_ACT_UNSPEC`, i.e. "next program / default action", so an
//! accounting program can never drop or reroute a packet.
use aya_ebpf::{
    bindings::TC_ACT_UNSPEC,
    macros::{classifier, map},
    maps::PerCpuArray,
    programs::TcContext,
};
use quicklane_common::counters::tc as c;

#[map(name = "QL_TC_STATS")]
static QL_TC_STATS: PerCpuArray<u64> = PerCpuArray::pinned(c::LEN, 0);

#[inline(always)]
fn count(slot: u32, by: u64) {
    if let Some(p) = QL_TC_STATS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, only this CPU writes it while this program runs.
        unsafe { *p += by };
    }
}

#[classifier]
pub fn ql_tc_egress(ctx: TcContext) -> i32 {
    count(c::EGRESS_PACKETS, 1);
    count(c::EGRESS_BYTES, u64::from(ctx.len()));
    TC_ACT_UNSPEC
}

#[classifier]
pub fn ql_tc_ingress(ctx: TcContext) -> i32 {
    count(c::INGRESS_PACKETS, 1);
    count(c::INGRESS_BYTES, u64::from(ctx.len()));
    TC_ACT_UNSPEC
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
