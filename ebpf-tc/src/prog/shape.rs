//! Earliest Departure Time per pod and direction. Each packet claims `len / rate` of its
//! aggregate's timeline with one atomic add; how far in the future its slot lies decides
//! whether it passes, is CE-marked, or is dropped (its time handed back). With sch_fq on the
//! device the departure time is written into the packet and fq holds it; without fq the same
//! arithmetic is an ECN-first policer.
use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::{bpf_ktime_get_ns, bpf_skb_ecn_set_ce, bpf_skb_set_tstamp},
    programs::TcContext,
};
use quicklane_common::{
    counters::tc as c,
    edt,
    qos::{activity_slot, aggregate, verdict, Classes, QosStats, Verdict, QOS_F_ENABLED, QOS_F_FQ},
};

/// `BPF_SKB_TSTAMP_DELIVERY_MONO` (renamed `BPF_SKB_CLOCK_MONOTONIC` in 6.11, same value).
const TSTAMP_MONO: u32 = 1;

use super::maps::{
    config, count, QL_QOS_ACTIVE, QL_QOS_EDT, QL_QOS_IFINDEX, QL_QOS_PODS, QL_QOS_STATS,
};

/// `None` when the packet is not ours to shape.
#[inline(always)]
pub fn shape(ctx: &TcContext, dir: u32) -> Option<i32> {
    let cfg = config();
    if cfg.flags & QOS_F_ENABLED == 0 {
        return None;
    }
    // SAFETY: the context's skb pointer is valid for the program's run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: the value is copied out at once.
    let Some(&slot) = (unsafe { QL_QOS_IFINDEX.get(&ifindex) }) else {
        count(c::QOS_UNKNOWN_POD, 1);
        return None;
    };
    let pod = QL_QOS_PODS.get(slot)?;
    if !pod.shaped(dir) || pure_tcp_ack(ctx) {
        return None;
    }
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let len = u64::from(ctx.len());
    let agg = aggregate(slot, dir);
    let timeline = QL_QOS_EDT.get_ptr_mut(agg)?;
    let classes = Classes::read(dir, |i| QL_QOS_ACTIVE.get(i));
    let activity = QL_QOS_ACTIVE.get_ptr_mut(activity_slot(dir, pod.class));
    // SAFETY: array value pointers, 8-byte aligned.
    let (departure, delta) = unsafe {
        edt::charge(
            pod,
            dir,
            len,
            now,
            cfg.active_window_ns,
            classes,
            activity,
            timeline,
            cfg.credit_ns,
        )
    };
    let late = departure.saturating_sub(now);
    let stats = QL_QOS_STATS.get_ptr_mut(agg);
    count(c::QOS_SHAPED, 1);
    match verdict(late, &cfg) {
        Verdict::Drop => {
            // SAFETY: as above; hands the dropped packet's time back to the aggregate.
            unsafe { edt::hand_back(timeline, delta) };
            count(c::QOS_DROPPED, 1);
            bump(stats, |s| s.dropped += 1);
            return Some(TC_ACT_SHOT as i32);
        }
        Verdict::Mark => {
            // SAFETY: helper on the live skb; returns 0 for packets that are not ECT.
            if unsafe { bpf_skb_ecn_set_ce(ctx.skb.skb) } == 1 {
                count(c::QOS_MARKED, 1);
                bump(stats, |s| s.marked += 1);
            } else {
                count(c::QOS_NOT_ECT, 1);
            }
        }
        Verdict::Pass => {}
    }
    if cfg.flags & QOS_F_FQ != 0 {
        // A later departure already on the packet (TCP's own pacing, or the sender pod's
        // egress limit on a packet now entering the receiver) wins: both limits hold.
        // Only a monotonic delivery time counts: at ingress the field may hold a receive
        // timestamp from another clock.
        // SAFETY: the context's skb pointer is valid for the program's run.
        let existing = unsafe {
            if u32::from((*ctx.skb.skb).tstamp_type) == TSTAMP_MONO {
                (*ctx.skb.skb).tstamp
            } else {
                0
            }
        };
        // A departure in the past (an aggregate catching up within its credit) needs no
        // stamp: fq sends it at once either way.
        if departure > now && departure > existing {
            // SAFETY: helper on the live skb. A failure leaves the packet unscheduled, which
            // fq sends at once: the policer arithmetic above still bounds the rate.
            let _ = unsafe { bpf_skb_set_tstamp(ctx.skb.skb, departure, TSTAMP_MONO) };
        }
    }
    bump(stats, |s| {
        s.packets += 1;
        s.bytes += len;
    });
    Some(TC_ACT_UNSPEC)
}

/// A TCP segment without payload. These pass unshaped and uncounted: they are the ACK
/// clock of flows going the other way, and delaying or dropping them would throttle those
/// flows by a limit that is not theirs.
#[inline(always)]
fn pure_tcp_ack(ctx: &TcContext) -> bool {
    const ETH_HLEN: usize = 14;
    const IPPROTO_TCP: u8 = 6;
    let Ok(ethertype) = ctx.load::<u16>(12) else {
        return false;
    };
    let (ip_payload, tcp_at) = match u16::from_be(ethertype) {
        0x0800 => {
            let (Ok(vihl), Ok(total), Ok(proto)) = (
                ctx.load::<u8>(ETH_HLEN),
                ctx.load::<u16>(ETH_HLEN + 2),
                ctx.load::<u8>(ETH_HLEN + 9),
            ) else {
                return false;
            };
            let ihl = usize::from(vihl & 0x0f) * 4;
            if proto != IPPROTO_TCP || ihl < 20 {
                return false;
            }
            (
                usize::from(u16::from_be(total)).saturating_sub(ihl),
                ETH_HLEN + ihl,
            )
        }
        0x86dd => {
            let (Ok(payload), Ok(next)) =
                (ctx.load::<u16>(ETH_HLEN + 4), ctx.load::<u8>(ETH_HLEN + 6))
            else {
                return false;
            };
            // Extension headers before TCP are rare on pod traffic: such packets are shaped.
            if next != IPPROTO_TCP {
                return false;
            }
            (usize::from(u16::from_be(payload)), ETH_HLEN + 40)
        }
        _ => return false,
    };
    let Ok(offset) = ctx.load::<u8>(tcp_at + 12) else {
        return false;
    };
    ip_payload <= usize::from(offset >> 4) * 4
}

#[inline(always)]
fn bump(stats: Option<*mut QosStats>, f: impl FnOnce(&mut QosStats)) {
    if let Some(p) = stats {
        // SAFETY: per-CPU value, only this CPU writes it while this program runs.
        f(unsafe { &mut *p });
    }
}
