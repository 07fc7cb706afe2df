//! The EDT timeline and class-activity arithmetic both datapaths run on the shared maps: the
//! tc shaper per packet, sk_msg per bypassed message. One implementation, so a pod's bytes
//! are charged the same way whichever path they take.
#![allow(
    clippy::inline_always,
    reason = "BPF code cannot call out-of-line functions from every program type"
)]

use crate::qos::{
    competes_until, effective_rate, transmit_ns, window_average, ClassActivity, Classes, QosPod,
    CLASSES,
};

/// Claims `delta` ns of the timeline and returns the departure time. A timeline that lags
/// `now` by more than `credit` ns restarts `credit` behind it: an aggregate that fell behind
/// its rate (a sender descheduled for a few ms, a timer that fired late) may catch up by that
/// much, no more, so its rate holds over any interval to within `credit`. Racing restarts can
/// lose a few packets' time, which errs towards sending.
///
/// # Safety
/// `timeline` must be valid and 8-byte aligned.
#[inline(always)]
pub unsafe fn claim(timeline: *mut u64, now: u64, delta: u64, credit: u64) -> u64 {
    // SAFETY: guaranteed by the caller.
    let prev = unsafe { atomic_fetch_add(timeline, delta) };
    let floor = now.saturating_sub(credit);
    if prev < floor {
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile(timeline, floor + delta) };
        floor
    } else {
        prev
    }
}

/// Where the timeline stands: the departure its next claim would get, before any restart.
///
/// # Safety
/// `timeline` must be valid and 8-byte aligned.
#[inline(always)]
pub unsafe fn load(timeline: *const u64) -> u64 {
    // SAFETY: guaranteed by the caller.
    unsafe { core::ptr::read_volatile(timeline) }
}

/// Charges `len` bytes of `pod` in direction `dir`: notes them in the class's activity
/// (`classes` as read, `activity` its entry), and claims their time at the pod's current rate
/// on `timeline`. Returns (departure time, claimed ns).
///
/// # Safety
/// `timeline` and `activity`, if given, must be valid and 8-byte aligned.
#[inline(always)]
#[allow(
    clippy::too_many_arguments,
    reason = "the BPF maps are each object's own"
)]
pub unsafe fn charge(
    pod: &QosPod,
    dir: u32,
    len: u64,
    now: u64,
    window: u64,
    classes: Classes,
    activity: Option<*mut ClassActivity>,
    timeline: *mut u64,
    credit: u64,
) -> (u64, u64) {
    // SAFETY: guaranteed by the caller.
    let classes = unsafe { note_activity(classes, activity, pod.class, len, now, window) };
    let delta = transmit_ns(len, effective_rate(pod, dir, classes.mask(now), &classes));
    // SAFETY: guaranteed by the caller.
    (unsafe { claim(timeline, now, delta, credit) }, delta)
}

/// Gives `delta` ns back to the timeline (a claim that did not send).
///
/// # Safety
/// `timeline` must be valid and 8-byte aligned.
#[inline(always)]
pub unsafe fn hand_back(timeline: *mut u64, delta: u64) {
    // SAFETY: guaranteed by the caller.
    unsafe { atomic_add(timeline, delta.wrapping_neg()) };
}

/// Adds `len` bytes to the class's current window, marks the class competing once that
/// passes the threshold, and returns what the datapath knows of the direction's classes
/// (`classes`, as read before), with the pod's own class counted as competing.
///
/// # Safety
/// `activity`, if given, must be valid and 8-byte aligned.
#[inline(always)]
pub unsafe fn note_activity(
    mut classes: Classes,
    activity: Option<*mut ClassActivity>,
    class: u32,
    len: u64,
    now: u64,
    window: u64,
) -> Classes {
    let own = (class as usize) & (CLASSES - 1);
    if let Some(p) = activity {
        // SAFETY: guaranteed by the caller. Window restarts are plain stores: a racing
        // restart loses at most a few packets' bytes from a count that only decides whether
        // a class is more than a trickle and roughly how much it uses.
        unsafe {
            let a = &mut *p;
            let since = now.saturating_sub(core::ptr::read_volatile(&raw const a.window_start));
            let mut avg = core::ptr::read_volatile(&raw const a.avg_bytes);
            if since >= window {
                avg = window_average(
                    avg,
                    core::ptr::read_volatile(&raw const a.bytes),
                    since,
                    window,
                );
                core::ptr::write_volatile(&raw mut a.avg_bytes, avg);
                core::ptr::write_volatile(&raw mut a.window_start, now);
                core::ptr::write_volatile(&raw mut a.bytes, 0);
            }
            let total = atomic_fetch_add(&raw mut a.bytes, len) + len;
            if total >= a.threshold {
                let until = competes_until(now, len, avg, window);
                // Refresh at most twice per window, so busy classes do not store on every
                // packet.
                if classes.until[own] + window / 2 < until {
                    core::ptr::write_volatile(&raw mut a.active_until, until);
                }
            }
        }
    }
    // A pod's own row assumes its class competes.
    if classes.until[own] < now + 1 {
        classes.until[own] = now + 1;
    }
    classes
}

/// BPF's atomic fetch-and-add: the bpfel target has no compare-and-swap, so core's atomics
/// are not available, while the instruction itself is.
///
/// # Safety
/// `dst` must be valid and 8-byte aligned.
#[inline(always)]
pub unsafe fn atomic_fetch_add(dst: *mut u64, val: u64) -> u64 {
    #[cfg(target_arch = "bpf")]
    {
        let mut v = val;
        // SAFETY: guaranteed by the caller.
        unsafe {
            core::arch::asm!(
                "{0} = atomic_fetch_add((u64 *)({1} + 0), {0})",
                inout(reg) v,
                in(reg) dst,
            );
        }
        v
    }
    #[cfg(not(target_arch = "bpf"))]
    {
        // SAFETY: guaranteed by the caller; userspace (tests) has real atomics.
        unsafe { core::sync::atomic::AtomicU64::from_ptr(dst) }
            .fetch_add(val, core::sync::atomic::Ordering::SeqCst)
    }
}

/// BPF's atomic add (`lock xadd`, a full barrier on x86).
///
/// # Safety
/// `dst` must be valid and 8-byte aligned.
#[inline(always)]
pub unsafe fn atomic_add(dst: *mut u64, val: u64) {
    #[cfg(target_arch = "bpf")]
    // SAFETY: guaranteed by the caller.
    unsafe {
        core::arch::asm!("lock *(u64 *)({0} + 0) += {1}", in(reg) dst, in(reg) val);
    }
    #[cfg(not(target_arch = "bpf"))]
    // SAFETY: guaranteed by the caller.
    unsafe {
        atomic_fetch_add(dst, val);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_timeline_restarts_its_credit_behind_now_and_a_busy_one_queues() {
        let mut t = 0u64;
        // SAFETY: a local, aligned u64.
        unsafe {
            // Idle since 0: restarts 100 ns (the credit) behind now.
            assert_eq!(claim(&raw mut t, 1000, 10, 100), 900);
            assert_eq!(t, 910);
            assert_eq!(load(&raw const t), 910);
            // Within the credit: the timeline keeps its place, the sender catches up.
            assert_eq!(claim(&raw mut t, 1000, 10, 100), 910);
            assert_eq!(claim(&raw mut t, 1000, 85, 100), 920);
            assert_eq!(t, 1005);
            // Ahead of now: departures queue.
            assert_eq!(claim(&raw mut t, 1001, 10, 100), 1005);
            assert_eq!(t, 1015);
            assert_eq!(load(&raw const t), 1015);
            hand_back(&raw mut t, 10);
            assert_eq!(t, 1005);
            // No credit: restarts at now.
            assert_eq!(claim(&raw mut t, 5000, 10, 0), 5000);
        }
    }
}
