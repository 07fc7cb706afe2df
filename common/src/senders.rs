//! How many TCP sockets share a shaped aggregate's rate. Each paced socket of a pod gets the
//! pod's rate divided by the number of its sockets that contend for it, so that several
//! streams of one pod together send at the rate rather than each at the whole of it.
//!
//! Why the split is needed and the shaper alone does not do it: without a queue (no sch_fq)
//! the shaper is a policer, so the path's RTT stays at tens of microseconds; even at TCP's
//! minimum window of two segments a stream then sends far above its share, ECN marks cannot
//! slow it further, and the excess ends at the drop horizon (measured: four streams at a
//! 100M limit, 65 drops and ~950 retransmits in 4 s).
//!
//! A socket contends when, while its aggregate is at its rate, it has had an eighth of its
//! share acknowledged within one window. Sockets that send a few small messages (a response,
//! a health check) stay below that and do not shrink the others' share; while the aggregate
//! lags its rate no socket counts itself, so a stale count fades within two windows and
//! the sockets that remain get the whole rate back.
#![allow(
    clippy::inline_always,
    reason = "BPF code cannot call out-of-line functions from every program type"
)]

use crate::edt::atomic_fetch_add;

/// The counting window. A greedy socket has several RTT samples in it (about one per 64 KiB
/// acknowledged, ~50/s at 25 Mbit/s), so it is counted in every window it sends in.
pub const WINDOW_NS: u64 = 100_000_000;

/// Per shaped aggregate (sock_ops' `QL_QOS_SENDERS`, indexed like the timelines).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Senders {
    pub window_start: u64,
    /// Contending sockets counted in the current window and in the one before.
    pub current: u64,
    pub previous: u64,
}

/// One paced socket's view of one aggregate it sends into.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mark {
    /// The aggregate window this socket's `base` belongs to.
    pub window_start: u64,
    /// The socket's `bytes_acked` at its first sample in that window.
    pub base: u64,
    /// 1 once the socket has counted itself in that window.
    pub counted: u64,
}

/// A paced socket's state (sock_ops' `QL_PACED`, by socket cookie): one mark for its local
/// pod's egress, one for its peer pod's ingress.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacedSock {
    pub marks: [Mark; 2],
}

/// Where an aggregate's timeline stands against its rate when a socket samples it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Load {
    /// Well behind now: the pod sends less than its rate, nobody contends.
    Lagging,
    /// About at its rate.
    AtRate,
    /// Ahead of it, braking (`qos::paced_rate`): its sockets send more than the rate, as
    /// several streams do in the first round trips before they have counted themselves.
    /// Then a socket counts once it moved an eighth of what `AtRate` asks: without that, four
    /// streams starting at once ran into the drop horizon before the count reached them.
    Over,
}

/// Notes a sample of a socket (`acked` bytes acknowledged so far) that sends into an
/// aggregate whose pod rate is `rate` and whose timeline is at `load`, and returns how many
/// sockets the rate is split among (at least 1).
///
/// Window restarts are plain stores: racing restarts can lose a count for one window, which
/// the previous window's count covers.
///
/// # Safety
/// `senders` and `mark` must be valid and 8-byte aligned.
#[inline(always)]
pub unsafe fn note(
    senders: *mut Senders,
    mark: *mut Mark,
    acked: u64,
    rate: u64,
    load: Load,
    now: u64,
) -> u64 {
    // SAFETY: guaranteed by the caller.
    unsafe {
        let s = &mut *senders;
        let mut start = core::ptr::read_volatile(&raw const s.window_start);
        let since = now.saturating_sub(start);
        if since >= WINDOW_NS {
            let kept = if since < 2 * WINDOW_NS {
                core::ptr::read_volatile(&raw const s.current)
            } else {
                0
            };
            core::ptr::write_volatile(&raw mut s.previous, kept);
            core::ptr::write_volatile(&raw mut s.current, 0);
            core::ptr::write_volatile(&raw mut s.window_start, now);
            start = now;
        }
        let mut current = core::ptr::read_volatile(&raw const s.current);
        let ways = split(current, core::ptr::read_volatile(&raw const s.previous));
        let m = &mut *mark;
        if m.window_start != start {
            *m = Mark {
                window_start: start,
                base: acked,
                counted: 0,
            };
        } else if m.counted == 0
            && load != Load::Lagging
            && acked.saturating_sub(m.base) >= contending_bytes(rate, ways, load)
        {
            m.counted = 1;
            current = atomic_fetch_add(&raw mut s.current, 1) + 1;
        }
        split(current, core::ptr::read_volatile(&raw const s.previous))
    }
}

impl Senders {
    /// How many sockets share the rate at `now` as the next sample would find it (0 if none
    /// contends): for `quicklane status`, which reads the entry between samples.
    pub fn sharing(&self, now: u64) -> u64 {
        match now.saturating_sub(self.window_start) {
            since if since >= 2 * WINDOW_NS => 0,
            since if since >= WINDOW_NS => self.current,
            _ => self.current.max(self.previous),
        }
    }
}

#[inline(always)]
fn split(current: u64, previous: u64) -> u64 {
    let n = if current > previous {
        current
    } else {
        previous
    };
    if n == 0 {
        1
    } else {
        n
    }
}

/// Bytes a socket must have acknowledged within a window to contend: an eighth of what its
/// share (`rate` bytes/s split `ways` ways) moves in a window, an eighth of that while the
/// aggregate is `Over` its rate.
#[inline(always)]
fn contending_bytes(rate: u64, ways: u64, load: Load) -> u64 {
    let share = rate.checked_div(ways).unwrap_or(rate);
    let bytes = share / 8 * (WINDOW_NS / 1_000_000) / 1_000;
    if load == Load::Over {
        bytes / 8
    } else {
        bytes
    }
}

#[cfg(feature = "user")]
mod pod_impls {
    // SAFETY (all): repr(C), Copy, no padding (asserted below).
    unsafe impl aya::Pod for super::Senders {}
    unsafe impl aya::Pod for super::PacedSock {}
}

const _: () = assert!(core::mem::size_of::<Senders>() == 24);
const _: () = assert!(core::mem::size_of::<PacedSock>() == 48);

#[cfg(test)]
mod tests {
    use super::*;

    const RATE: u64 = 12_500_000; // 100 Mbit/s
    const MS: u64 = 1_000_000;

    /// Samples every socket of `socks` every `every` ms from `from` until `until` (ms), each
    /// having sent `rates[i]` bytes/s; returns the least and the most split seen in the last
    /// round of samples.
    fn run(
        s: &mut Senders,
        socks: &mut [Mark],
        rates: &[u64],
        load: Load,
        from: u64,
        until: u64,
        every: u64,
    ) -> (u64, u64) {
        let mut seen = (0, 0);
        let mut t = from;
        while t <= until {
            seen = (u64::MAX, 0);
            for (m, rate) in socks.iter_mut().zip(rates) {
                let acked = rate * t / 1000;
                // SAFETY: locals.
                let split = unsafe { note(s, m, acked, RATE, load, t * MS) };
                seen = (seen.0.min(split), seen.1.max(split));
            }
            t += every;
        }
        seen
    }

    #[test]
    fn greedy_streams_of_one_pod_split_its_rate_and_trickles_do_not_count() {
        let mut s = Senders::default();
        let mut socks = [Mark::default(); 6];
        // Four streams at a quarter of the rate each, two sockets sending 10 KB/s.
        let rates = [RATE / 4, RATE / 4, RATE / 4, RATE / 4, 10_000, 10_000];
        assert_eq!(
            run(&mut s, &mut socks, &rates, Load::AtRate, 0, 500, 20),
            (4, 4)
        );
        assert_eq!(s.previous, 4);
    }

    #[test]
    fn a_lone_stream_among_idle_sockets_keeps_the_whole_rate() {
        let mut s = Senders::default();
        let mut socks = [Mark::default(); 3];
        assert_eq!(
            run(&mut s, &mut socks, &[RATE, 0, 0], Load::AtRate, 0, 500, 20),
            (1, 1)
        );
    }

    #[test]
    fn a_count_fades_within_two_windows_once_the_aggregate_lags() {
        let mut s = Senders::default();
        let mut socks = [Mark::default(); 4];
        let rates = [RATE / 4; 4];
        assert_eq!(
            run(&mut s, &mut socks, &rates, Load::AtRate, 0, 300, 20),
            (4, 4)
        );
        assert_eq!(
            run(&mut s, &mut socks, &rates, Load::Lagging, 300, 520, 20),
            (1, 1)
        );
        // An aggregate nobody sampled for two windows starts from nothing.
        let mut s = Senders {
            window_start: 0,
            current: 3,
            previous: 3,
        };
        let mut m = Mark::default();
        // SAFETY: locals.
        assert_eq!(
            unsafe { note(&raw mut s, &raw mut m, 0, RATE, Load::AtRate, 250 * MS) },
            1
        );
    }

    #[test]
    fn streams_over_the_rate_count_themselves_within_a_few_samples() {
        // Four streams at half the rate each (the brake's floor), sampled every 5 ms: over
        // the rate they count after 20 KB, at their second sample; at it they would need
        // 156 KB, 25 ms.
        let mut s = Senders::default();
        let mut socks = [Mark::default(); 4];
        assert_eq!(
            run(&mut s, &mut socks, &[RATE / 2; 4], Load::Over, 0, 15, 5),
            (4, 4)
        );
        let mut s = Senders::default();
        let mut socks = [Mark::default(); 4];
        assert_eq!(
            run(&mut s, &mut socks, &[RATE / 2; 4], Load::AtRate, 0, 15, 5),
            (1, 1)
        );
        // A trickle does not count even then.
        let mut s = Senders::default();
        let mut m = [Mark::default()];
        assert_eq!(
            run(&mut s, &mut m, &[10_000], Load::Over, 0, 100, 5),
            (1, 1)
        );
        assert_eq!(s.current, 0);
    }

    #[test]
    fn status_sees_the_count_the_next_sample_would() {
        let s = Senders {
            window_start: 1000 * MS,
            current: 2,
            previous: 4,
        };
        assert_eq!(s.sharing(1050 * MS), 4);
        assert_eq!(s.sharing(1150 * MS), 2);
        assert_eq!(s.sharing(1200 * MS), 0);
    }

    #[test]
    fn a_stream_joining_is_counted_within_a_window() {
        let mut s = Senders::default();
        let mut socks = [Mark::default(); 2];
        assert_eq!(
            run(&mut s, &mut socks[..1], &[RATE], Load::AtRate, 0, 300, 20),
            (1, 1)
        );
        assert_eq!(
            run(
                &mut s,
                &mut socks,
                &[RATE / 2; 2],
                Load::AtRate,
                300,
                520,
                20
            ),
            (2, 2)
        );
    }
}
