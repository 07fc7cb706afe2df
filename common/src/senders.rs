//! How several TCP sockets share a shaped aggregate's rate. Each paced socket of a pod gets
//! a share of the pod's rate: the even split among the sockets that contend for it, or more
//! when some of them use less than they are given. Then the rest is divided among the
//! others (max-min fairness): three streams at 20 Mbit/s beside a bulk one in a 100M pod
//! leave the bulk stream 40, not a quarter.
//!
//! Why the split is needed and the shaper alone does not do it: without a queue (no sch_fq)
//! the shaper is a policer, so the path's RTT stays at tens of microseconds; even at TCP's
//! minimum window of two segments a stream then sends far above its share, ECN marks cannot
//! slow it further, and the excess ends at the drop horizon (measured: four streams at a
//! 100M limit, 65 drops and ~950 retransmits in 4 s).
//!
//! A socket contends when it has had an eighth of its even share acknowledged within one
//! window. Sockets that send a few small messages (a response, a health check) stay below
//! that and do not shrink the others' share; a socket that stops sending stops counting, so
//! its count fades within two windows.
//!
//! A contending socket that moved less than fifteen sixteenths of the even share in its
//! window is light: at its first sample of the next window it reports what it used. The
//! others then share what the light ones leave. That only hands out what the light sockets
//! measurably did not use, so the shares still add up to the rate. Streams held below the
//! even share by something else (ECN marks) report light as well; when every contending
//! socket is light the split is even again. (Before the reports, no socket counted itself
//! while the aggregate lagged its rate, so that slower sockets let the count fade; that also
//! made the count of a pod under its rate flicker.)
#![allow(
    clippy::inline_always,
    reason = "BPF code cannot call out-of-line functions from every program type"
)]

use crate::edt::atomic_fetch_add;

/// The counting window. A greedy socket has several RTT samples in it (about one per 64 KiB
/// acknowledged, ~50/s at 25 Mbit/s), so it is counted in every window it sends in.
pub const WINDOW_NS: u64 = 100_000_000;

/// Light sockets' reports: how many, and what they used in all (bytes per second).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Light {
    pub count: u64,
    pub rate: u64,
}

/// Per shaped aggregate (sock_ops' `QL_QOS_SENDERS`, indexed like the timelines).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Senders {
    pub window_start: u64,
    /// Contending sockets counted in the current window and in the one before.
    pub current: u64,
    pub previous: u64,
    /// Light sockets' reports (each about the socket's own last window) that arrived in the
    /// current window and in the one before.
    pub light: Light,
    pub light_before: Light,
}

/// One paced socket's view of one aggregate it sends into.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mark {
    /// The aggregate window this socket's `base` belongs to.
    pub window_start: u64,
    /// The socket's `bytes_acked` at its first sample in that window, and when that was.
    pub base: u64,
    pub since: u64,
    /// The same for the window before, if the socket sampled in it (else `base`, `since`).
    pub base_before: u64,
    pub since_before: u64,
    /// The lowest even share of the rate (bytes per second, before the brake or the
    /// catch-up) in that window.
    pub lowest_even: u64,
    /// `COUNTED` once the socket has counted itself in that window; `LIGHT` if it reported
    /// light at the window's start (about the one before).
    pub flags: u64,
}

pub const COUNTED: u64 = 1;
pub const LIGHT: u64 = 2;

/// A paced socket's state (sock_ops' `QL_PACED`, by socket cookie): one mark for its local
/// pod's egress, one for its peer pod's ingress.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacedSock {
    pub marks: [Mark; 2],
}

/// Notes a sample of a socket (`acked` bytes acknowledged so far) that sends into an
/// aggregate whose pod rate is `rate` and whose sockets are paced at `paced` (the rate, or
/// faster or slower while its timeline catches up or runs ahead: `qos::paced_rate`), and
/// returns the pace for this socket: its share of `paced`.
///
/// While the aggregate runs ahead (`paced` below `rate`, braking), a socket counts once it
/// moved an eighth of what it needs otherwise: several streams that start together send more
/// than the rate before they have counted themselves, and without that four of them ran into
/// the drop horizon first.
///
/// Window restarts are plain stores: racing restarts can lose a count or a report for one
/// window, which the previous window's covers.
///
/// # Safety
/// `senders` and `mark` must be valid and 8-byte aligned.
#[inline(always)]
pub unsafe fn note(
    senders: *mut Senders,
    mark: *mut Mark,
    acked: u64,
    rate: u64,
    paced: u64,
    now: u64,
) -> u64 {
    // SAFETY: guaranteed by the caller.
    unsafe {
        let s = &mut *senders;
        let start = rotate(s, now);
        let mut current = core::ptr::read_volatile(&raw const s.current);
        let previous = core::ptr::read_volatile(&raw const s.previous);
        let m = &mut *mark;
        if m.window_start != start {
            // The socket's last window was the one just before this.
            let consecutive = now.saturating_sub(m.since) < 2 * WINDOW_NS;
            let light = if consecutive && report(s, m, acked, now) {
                LIGHT
            } else {
                0
            };
            let (base_before, since_before) = if consecutive {
                (m.base, m.since)
            } else {
                (acked, now)
            };
            *m = Mark {
                window_start: start,
                base: acked,
                since: now,
                base_before,
                since_before,
                lowest_even: u64::MAX,
                flags: light,
            };
        } else if m.flags & COUNTED == 0
            && acked.saturating_sub(m.base)
                >= contending_bytes(rate, split(current, previous), paced < rate)
        {
            m.flags |= COUNTED;
            current = atomic_fetch_add(&raw mut s.current, 1) + 1;
        }
        let light = heavier(
            read_light(&raw const s.light),
            read_light(&raw const s.light_before),
        );
        let ways = split(current, previous);
        // The even share, unbraked: see `report`.
        let even = rate / ways;
        if even < m.lowest_even {
            m.lowest_even = even;
        }
        // A light socket may grow to the even share, and from there, no longer light, to
        // the larger one: paced at that at once, three light streams' bursts together ran
        // the pod's timeline past the CE threshold, and the marks held the bulk stream below
        // what they left it.
        let share = if m.flags & LIGHT != 0 {
            even
        } else {
            share(rate, ways, light)
        };
        scale(paced, share, rate)
    }
}

/// Starts a new window if the current one is over; returns the current window's start.
///
/// # Safety
/// As for `note`.
#[inline(always)]
unsafe fn rotate(s: &mut Senders, now: u64) -> u64 {
    // SAFETY: guaranteed by the caller.
    unsafe {
        let start = core::ptr::read_volatile(&raw const s.window_start);
        let since = now.saturating_sub(start);
        if since < WINDOW_NS {
            return start;
        }
        // A window nobody sampled in leaves nothing to carry over.
        let fresh = since < 2 * WINDOW_NS;
        let (kept, light) = if fresh {
            (
                core::ptr::read_volatile(&raw const s.current),
                read_light(&raw const s.light),
            )
        } else {
            (0, Light::default())
        };
        core::ptr::write_volatile(&raw mut s.previous, kept);
        core::ptr::write_volatile(&raw mut s.current, 0);
        core::ptr::write_volatile(&raw mut s.light_before, light);
        core::ptr::write_volatile(&raw mut s.light, Light::default());
        core::ptr::write_volatile(&raw mut s.window_start, now);
        now
    }
}

/// At a socket's first sample of a new window, its last one being the window just before:
/// if it contended there but moved less than fifteen sixteenths of the lowest even
/// share there, it reports what it used (and is light).
///
/// The even share, not the larger one it may have been given: a bulk stream held below its
/// larger share by CE marks (a neighbour's bursts run the pod's timeline ahead) would
/// otherwise count as light, and the split fall back to even. Unbraked, for the same reason.
/// What it used is measured over its last two windows where it sampled in both: an
/// application that writes 128 KiB blocks at 20 Mbit/s moves one, two or three of them in a
/// 100 ms window, 10 to 30 Mbit/s, and in the windows where it looked greedy the bulk stream
/// beside it lost a quarter of its share.
///
/// # Safety
/// As for `note`.
#[inline(always)]
unsafe fn report(s: &mut Senders, m: &Mark, acked: u64, now: u64) -> bool {
    if m.flags & COUNTED == 0 {
        return false;
    }
    let span_ms = now.saturating_sub(m.since_before) / 1_000_000;
    if span_ms == 0 {
        return false;
    }
    // Per millisecond first: bytes * 1000 could overflow for a slow socket's long window.
    let used = acked.saturating_sub(m.base_before) / span_ms * 1000;
    if used >= m.lowest_even / 16 * 15 {
        return false;
    }
    // SAFETY: guaranteed by the caller.
    unsafe {
        atomic_fetch_add(&raw mut s.light.count, 1);
        atomic_fetch_add(&raw mut s.light.rate, used);
    }
    true
}

/// # Safety
/// `light` must be valid and 8-byte aligned.
#[inline(always)]
unsafe fn read_light(light: *const Light) -> Light {
    // SAFETY: guaranteed by the caller.
    unsafe {
        Light {
            count: core::ptr::read_volatile(&raw const (*light).count),
            rate: core::ptr::read_volatile(&raw const (*light).rate),
        }
    }
}

/// The reports to go by: the window with more of them (the current one fills up within a
/// few milliseconds of its start, as each light socket samples).
#[inline(always)]
fn heavier(current: Light, before: Light) -> Light {
    if current.count >= before.count {
        current
    } else {
        before
    }
}

/// A contending socket's share of `rate` (bytes per second) among `ways` contending
/// sockets, `light` of which use less than they are given: what the light ones leave,
/// divided among the rest, and never less than the even split.
#[inline(always)]
fn share(rate: u64, ways: u64, light: Light) -> u64 {
    let even = rate / ways;
    if light.count >= ways {
        return even;
    }
    let rest = rate.saturating_sub(light.rate) / (ways - light.count);
    if rest > even {
        rest
    } else {
        even
    }
}

/// `paced` times `share / rate`, in 1024ths (BPF has no 128-bit multiply).
#[inline(always)]
fn scale(paced: u64, share: u64, rate: u64) -> u64 {
    if share >= rate {
        return paced;
    }
    match (share * 1024).checked_div(rate) {
        Some(part) => (paced >> 10) * part + (((paced & 1023) * part) >> 10),
        None => paced,
    }
}

impl Senders {
    /// How many sockets share the rate at `now` as the next sample would find it (0 if none
    /// contends), and how many of them were light in their last window: for `quicklane
    /// status`, which reads the entry between samples.
    pub fn sharing(&self, now: u64) -> (u64, Light) {
        match now.saturating_sub(self.window_start) {
            since if since >= 2 * WINDOW_NS => (0, Light::default()),
            since if since >= WINDOW_NS => (self.current, self.light),
            _ => (
                self.current.max(self.previous),
                heavier(self.light, self.light_before),
            ),
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
/// even share (`rate` bytes/s split `ways` ways) moves in a window, an eighth of that while
/// the aggregate is `over` its rate.
#[inline(always)]
fn contending_bytes(rate: u64, ways: u64, over: bool) -> u64 {
    let share = rate.checked_div(ways).unwrap_or(rate);
    let bytes = share / 8 * (WINDOW_NS / 1_000_000) / 1_000;
    if over {
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

const _: () = assert!(core::mem::size_of::<Senders>() == 56);
const _: () = assert!(core::mem::size_of::<PacedSock>() == 112);

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;

    const RATE: u64 = 12_500_000; // 100 Mbit/s
    const MS: u64 = 1_000_000;
    const GREEDY: u64 = u64::MAX;

    /// `ms` on the clock the tests run on (BPF's starts long before 0).
    fn at(ms: u64) -> u64 {
        (10_000 + ms) * MS
    }

    /// A socket that wants `demand` bytes/s and gets the smaller of that and its pace;
    /// `bursty` ones want half as much again and half as much in turn, 100 ms each.
    #[derive(Clone, Copy)]
    struct Sock {
        mark: Mark,
        demand: u64,
        bursty: bool,
        acked: u64,
        pace: u64,
    }

    fn socks(demands: &[u64]) -> Vec<Sock> {
        demands
            .iter()
            .map(|&demand| Sock {
                mark: Mark::default(),
                demand,
                bursty: false,
                acked: 0,
                pace: RATE,
            })
            .collect()
    }

    /// Samples every socket every `every` ms from `from` until `until` (ms), each having
    /// sent at the smaller of its demand and its last pace since its last sample.
    fn run(s: &mut Senders, socks: &mut [Sock], paced: u64, from: u64, until: u64, every: u64) {
        let mut t = from;
        while t <= until {
            for sock in socks.iter_mut() {
                let demand = match (sock.bursty, t / 100 % 2) {
                    (false, _) => sock.demand,
                    (true, 0) => sock.demand / 2 * 3,
                    (true, _) => sock.demand / 2,
                };
                sock.acked += demand.min(sock.pace) * every / 1000;
                // SAFETY: locals.
                sock.pace = unsafe { note(s, &raw mut sock.mark, sock.acked, RATE, paced, at(t)) };
            }
            t += every;
        }
    }

    fn paces(socks: &[Sock]) -> Vec<u64> {
        socks.iter().map(|s| s.pace).collect()
    }

    #[track_caller]
    fn assert_near(got: u64, want: u64) {
        assert!(
            got.abs_diff(want) <= want / 50,
            "{got} not within 2 % of {want}"
        );
    }

    #[test]
    fn greedy_streams_of_one_pod_split_its_rate_and_trickles_do_not_count() {
        let mut s = Senders::default();
        let mut socks = socks(&[GREEDY, GREEDY, GREEDY, GREEDY, 10_000, 10_000]);
        run(&mut s, &mut socks, RATE, 0, 1000, 20);
        for pace in paces(&socks) {
            assert_near(pace, RATE / 4);
        }
        assert_eq!(s.sharing(at(1000)).0, 4);
        // Held to their pace, greedy streams are never light.
        assert_eq!(s.light.count + s.light_before.count, 0, "{s:?}");
    }

    #[test]
    fn moderate_streams_leave_a_bulk_stream_the_rest_of_the_rate() {
        // Three streams at a fifth of the rate beside a bulk one: it gets the two fifths
        // they leave, and they keep theirs.
        let mut s = Senders::default();
        let mut socks = socks(&[RATE / 5, RATE / 5, RATE / 5, GREEDY]);
        run(&mut s, &mut socks, RATE, 0, 1000, 5);
        assert_near(socks[3].pace, RATE * 2 / 5);
        let (ways, light) = s.sharing(at(1000));
        assert_eq!((ways, light.count), (4, 3), "{s:?}");
        assert_near(light.rate, RATE * 3 / 5);
        // And it stays there: no window hands out more than the light ones leave.
        for until in [1500, 2000, 2500] {
            run(&mut s, &mut socks, RATE, until - 495, until, 5);
            let given: u64 = socks.iter().map(|k| k.demand.min(k.pace)).sum();
            assert!(given <= RATE + RATE / 50, "{given} at {until} ms");
            assert_near(socks[3].pace, RATE * 2 / 5);
        }
    }

    #[test]
    fn bursty_moderate_streams_are_judged_over_two_windows() {
        // A fifth of the rate on average, in bursts of three tenths and one tenth: in a
        // window of three tenths they look greedy (more than the even quarter), over two
        // windows they do not. (Paced at the even quarter, they move a little less than a
        // fifth, and the bulk stream gets what they leave.)
        let mut s = Senders::default();
        let mut socks = socks(&[RATE / 5, RATE / 5, RATE / 5, GREEDY]);
        for sock in &mut socks[..3] {
            sock.bursty = true;
        }
        run(&mut s, &mut socks, RATE, 0, 1000, 5);
        for until in (1200..=2000).step_by(200) {
            let before: u64 = socks[..3].iter().map(|k| k.acked).sum();
            run(&mut s, &mut socks, RATE, until - 195, until, 5);
            let moderate = (socks[..3].iter().map(|k| k.acked).sum::<u64>() - before) * 5;
            assert!(moderate < RATE * 3 / 5, "{moderate}");
            assert_near(socks[3].pace, RATE - moderate);
        }
    }

    #[test]
    fn when_every_contending_socket_is_light_the_split_is_even() {
        // Four streams held below the even share (as ECN marks hold cubic): the split cannot
        // hand out more than the even share, so nothing runs away.
        let mut s = Senders::default();
        let mut socks = socks(&[RATE / 5; 4]);
        run(&mut s, &mut socks, RATE, 0, 1000, 5);
        assert_eq!(s.sharing(at(1000)).1.count, 4, "{s:?}");
        for pace in paces(&socks) {
            assert_near(pace, RATE / 4);
        }
    }

    #[test]
    fn a_lone_stream_among_idle_sockets_keeps_the_whole_rate() {
        let mut s = Senders::default();
        let mut socks = socks(&[GREEDY, 0, 0]);
        run(&mut s, &mut socks, RATE, 0, 500, 20);
        assert_eq!(paces(&socks), [RATE; 3]);
    }

    #[test]
    fn a_count_fades_within_two_windows_once_the_streams_stop() {
        let mut s = Senders::default();
        let mut socks = socks(&[GREEDY; 4]);
        run(&mut s, &mut socks, RATE, 0, 300, 20);
        for pace in paces(&socks) {
            assert_near(pace, RATE / 4);
        }
        run(&mut s, &mut socks[..1], RATE, 300, 520, 20);
        assert_eq!(socks[0].pace, RATE);
        // An aggregate nobody sampled for two windows starts from nothing.
        let mut s = Senders {
            window_start: at(0),
            current: 3,
            previous: 3,
            light: Light { count: 2, rate: 1 },
            light_before: Light { count: 2, rate: 1 },
        };
        let mut m = Mark::default();
        // SAFETY: locals.
        let pace = unsafe { note(&raw mut s, &raw mut m, 0, RATE, RATE, at(250)) };
        assert_eq!(pace, RATE);
        assert_eq!(s.sharing(at(260)), (0, Light::default()));
    }

    #[test]
    fn light_reports_fade_when_the_light_sockets_stop() {
        let mut s = Senders::default();
        let mut socks = socks(&[RATE / 5, RATE / 5, RATE / 5, GREEDY]);
        run(&mut s, &mut socks, RATE, 0, 1000, 5);
        // The moderate streams end: their count and their reports fade.
        let bulk = &mut socks[3..];
        run(&mut s, bulk, RATE, 1005, 1500, 5);
        assert_eq!(bulk[0].pace, RATE);
        assert_eq!(s.sharing(at(1500)).1, Light::default());
    }

    #[test]
    fn streams_over_the_rate_count_themselves_within_a_few_samples() {
        // Four streams at half the rate each (the brake's floor), sampled every 5 ms: over
        // the rate they count after 20 KB, at their second sample; at it they would need
        // 156 KB, 25 ms.
        let over = |paced| {
            let mut s = Senders::default();
            let mut socks = socks(&[RATE / 2; 4]);
            run(&mut s, &mut socks, paced, 0, 15, 5);
            s.sharing(at(15)).0
        };
        assert_eq!(over(RATE / 2), 4);
        assert_eq!(over(RATE), 0);
        // A trickle does not count even then.
        let mut s = Senders::default();
        let mut trickle = socks(&[10_000]);
        run(&mut s, &mut trickle, RATE / 2, 0, 100, 5);
        assert_eq!(s.current, 0);
    }

    #[test]
    fn status_sees_the_count_the_next_sample_would() {
        let light = Light {
            count: 1,
            rate: 100,
        };
        let s = Senders {
            window_start: at(1000),
            current: 2,
            previous: 4,
            light: Light::default(),
            light_before: light,
        };
        assert_eq!(s.sharing(at(1050)), (4, light));
        assert_eq!(s.sharing(at(1150)), (2, Light::default()));
        assert_eq!(s.sharing(at(1200)), (0, Light::default()));
    }

    #[test]
    fn a_stream_joining_is_counted_within_a_window() {
        let mut s = Senders::default();
        let mut socks = socks(&[GREEDY, GREEDY]);
        run(&mut s, &mut socks[..1], RATE, 0, 300, 20);
        assert_eq!(socks[0].pace, RATE);
        run(&mut s, &mut socks, RATE, 300, 520, 20);
        for pace in paces(&socks) {
            assert_near(pace, RATE / 2);
        }
    }

    #[test]
    fn the_pace_follows_the_brake_and_the_catch_up() {
        let mut s = Senders {
            window_start: at(0),
            current: 4,
            previous: 4,
            ..Senders::default()
        };
        let mut m = Mark::default();
        for paced in [RATE / 2, RATE + RATE / 4] {
            // SAFETY: locals.
            let pace = unsafe { note(&raw mut s, &raw mut m, 0, RATE, paced, at(10)) };
            assert_near(pace, paced / 4);
        }
        // What a light socket is judged against is the even share, unbraked.
        assert_near(m.lowest_even, RATE / 4);
    }
}
