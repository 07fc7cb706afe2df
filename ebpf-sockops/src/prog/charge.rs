//! Bypassed bytes of shaped pods are charged to the pod's EDT timelines, class activity and
//! counters exactly as the tc shaper charges packets, so one budget covers both paths. While
//! a pod keeps to its rate its connections stay on the redirect (a shaped pod keeps its
//! acceleration); once a timeline runs more than the burst allowance ahead of now, the
//! connection leaves the bypass for TCP, where pacing and the shaper hold it to the rate.
use aya_ebpf::helpers::bpf_ktime_get_ns;
use quicklane_common::{
    bypass::SockMeta,
    edt,
    qos::{activity_slot, aggregate, Classes, DIR_EGRESS, DIR_INGRESS},
};

use super::maps::{
    qos_burst_ns, qos_credit_ns, QL_QOS_ACTIVE, QL_QOS_EDT, QL_QOS_PODS, QL_QOS_STATS,
};

/// One timeline claim, kept to be handed back if the other end's claim fails.
struct Claim {
    timeline: *mut u64,
    delta: u64,
    aggregate: u32,
}

/// Charges a message of `size` bytes to the shaped ends of the connection; false if either is
/// over its rate (nothing stays charged then, and the message must take TCP).
#[inline(always)]
pub fn admit(meta: &SockMeta, size: u64) -> bool {
    if meta.qos_egress == 0 && meta.qos_ingress == 0 {
        return true;
    }
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let burst = qos_burst_ns();
    let Ok(egress) = claim(meta.qos_egress, DIR_EGRESS, size, now, burst) else {
        return false;
    };
    let Ok(ingress) = claim(meta.qos_ingress, DIR_INGRESS, size, now, burst) else {
        if let Some(c) = egress {
            // SAFETY: an array value pointer, 8-byte aligned.
            unsafe { edt::hand_back(c.timeline, c.delta) };
        }
        return false;
    };
    for c in [egress, ingress].into_iter().flatten() {
        if let Some(s) = QL_QOS_STATS.get_ptr_mut(c.aggregate) {
            // SAFETY: per-CPU value, only this CPU writes it while this program runs.
            unsafe { (*s).bypassed += size };
        }
    }
    true
}

/// Claims the pod's share of the timeline (`slot_plus_one` 0: that end is not shaped).
/// `Err` when the departure lies more than `burst` ns ahead: the claim is handed back.
#[inline(always)]
fn claim(
    slot_plus_one: u32,
    dir: u32,
    size: u64,
    now: u64,
    burst: u64,
) -> Result<Option<Claim>, ()> {
    let Some(slot) = slot_plus_one.checked_sub(1) else {
        return Ok(None);
    };
    // A policy lifted since the connection was judged: nothing to charge.
    let Some(pod) = QL_QOS_PODS.get(slot).filter(|p| p.shaped(dir)) else {
        return Ok(None);
    };
    let aggregate = aggregate(slot, dir);
    let Some(timeline) = QL_QOS_EDT.get_ptr_mut(aggregate) else {
        return Ok(None);
    };
    let classes = Classes::read(dir, |i| QL_QOS_ACTIVE.get(i));
    let activity = QL_QOS_ACTIVE.get_ptr_mut(activity_slot(dir, pod.class));
    // The window as userspace wrote it next to the classes (sk_msg has no tc config).
    let window = classes.window_ns;
    // SAFETY: array value pointers, 8-byte aligned.
    let (departure, delta) = unsafe {
        edt::charge(
            pod,
            dir,
            size,
            now,
            window,
            classes,
            activity,
            timeline,
            qos_credit_ns(),
        )
    };
    if departure.saturating_sub(now) > burst {
        // SAFETY: as above.
        unsafe { edt::hand_back(timeline, delta) };
        return Err(());
    }
    Ok(Some(Claim {
        timeline,
        delta,
        aggregate,
    }))
}
