//! Bandwidth QoS: the pod rate tables userspace writes and the EDT state the tc and sock_ops
//! programs share (the maps are pinned by name, so both objects open the same ones).
//!
//! Userspace's allocator runs off the packet path. For every pod it precomputes the pod's rate
//! under each combination of active classes (online priorities 0..=2 and the offline class);
//! the datapath tracks which classes sent recently and picks the row entry, so a
//! high-priority arrival slows lower classes at their next packet.
#![allow(
    clippy::inline_always,
    reason = "BPF code cannot call out-of-line functions from every program type"
)]

/// Online priorities 0 (high), 1, 2 and the offline class.
pub const CLASSES: usize = 4;
pub const CLASS_OFFLINE: u32 = 3;
/// Every subset of the classes.
pub const MASKS: usize = 1 << CLASSES;
/// Pod slots: index into `QL_QOS_PODS`, `QL_QOS_EDT` and `QL_QOS_STATS`.
pub const MAX_PODS: u32 = 1024;

/// Direction as seen from the pod: egress is what it sends.
pub const DIR_EGRESS: u32 = 0;
pub const DIR_INGRESS: u32 = 1;

/// The pod has a rate table for its egress / ingress direction.
pub const POD_F_EGRESS: u32 = 1;
pub const POD_F_INGRESS: u32 = 2;

/// One pod's policy as the datapath needs it: its class and, per direction, its rate in
/// bytes per second under each activity mask.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QosPod {
    pub class: u32,
    /// `POD_F_*` bits.
    pub flags: u32,
    pub egress: [u64; MASKS],
    pub ingress: [u64; MASKS],
}

impl QosPod {
    pub const EMPTY: Self = Self {
        class: 0,
        flags: 0,
        egress: [0; MASKS],
        ingress: [0; MASKS],
    };

    #[inline(always)]
    pub fn rate(&self, dir: u32, mask: u32) -> u64 {
        let m = verifier_bounded_mask(mask);
        let table = if dir == DIR_EGRESS {
            &self.egress
        } else {
            &self.ingress
        };
        // `get`, not indexing: a bounds-check panic cannot be expressed in BPF.
        table.get(m).copied().unwrap_or(0)
    }

    #[inline(always)]
    pub fn shaped(&self, dir: u32) -> bool {
        let bit = if dir == DIR_EGRESS {
            POD_F_EGRESS
        } else {
            POD_F_INGRESS
        };
        self.flags & bit != 0
    }
}

impl Default for QosPod {
    fn default() -> Self {
        Self::EMPTY
    }
}

/// `mask & (MASKS - 1)` in a form the verifier sees: LLVM drops an AND it can prove
/// redundant, and the verifier, which cannot prove it, then refuses the indexed access.
#[inline(always)]
pub fn verifier_bounded_mask(mask: u32) -> usize {
    #[cfg(target_arch = "bpf")]
    {
        let mut v = u64::from(mask);
        // SAFETY: pure register arithmetic.
        unsafe { core::arch::asm!("{0} &= 15", inout(reg) v) };
        v as usize
    }
    #[cfg(not(target_arch = "bpf"))]
    {
        (mask as usize) & (MASKS - 1)
    }
}

const _: () = assert!(
    MASKS == 16,
    "verifier_bounded_mask hard-codes the mask width"
);

/// Key of `QL_QOS_ADDRS`: a pod address, so sock_ops can find the pod of either end of a
/// socket on every kernel (the current-cgroup helpers are missing from sock_ops before ~6.8).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AddrKey {
    /// AF_INET or AF_INET6.
    pub family: u32,
    /// IPv4 in `addr[0]` (network byte order as the kernel gives it), IPv6 in all four.
    pub addr: [u32; 4],
}

/// Per-CPU per (pod slot, direction) counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QosStats {
    pub packets: u64,
    pub bytes: u64,
    /// Packets CE-marked because they were more than `ce_threshold_ns` late.
    pub marked: u64,
    /// Packets dropped beyond the drop horizon.
    pub dropped: u64,
    /// Bytes the bypass moved for the pod (charged to the same timeline, never shaped).
    pub bypassed: u64,
}

/// Load-time settings of the tc object (`QL_QOS_CONFIG`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QosConfig {
    pub abi_version: u32,
    /// `QOS_F_*` bits.
    pub flags: u32,
    /// Packets later than this are dropped (and their time handed back).
    pub horizon_ns: u64,
    /// Packets later than this are CE-marked when ECN-capable.
    pub ce_threshold_ns: u64,
    /// A class counts as active for this long after its last packet.
    pub active_window_ns: u64,
    /// How far an aggregate's timeline may lag now and still be caught up (see
    /// `edt::claim`).
    pub credit_ns: u64,
}

/// Shape at all (the tc programs only count without it).
pub const QOS_F_ENABLED: u32 = 1;
/// sch_fq is installed on the shaped devices: write the departure time into the packet.
pub const QOS_F_FQ: u32 = 2;

/// Index of a (slot, direction) pair in the per-aggregate arrays.
#[inline(always)]
pub fn aggregate(slot: u32, dir: u32) -> u32 {
    slot * 2 + (dir & 1)
}

/// One class's recent traffic in one direction (`QL_QOS_ACTIVE`). A class competes for
/// capacity only while it sends more than `threshold` bytes per window: a trickle (health
/// checks, the ACKs of an upload) must not push lower classes down to their guarantees. What
/// a competing class actually uses is known too, and what it leaves flows down (see
/// `effective_rate`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClassActivity {
    pub window_start: u64,
    /// Bytes since `window_start`, added atomically.
    pub bytes: u64,
    /// Bytes per window the class sent recently: a moving average over the windows that
    /// ended (see `window_average`).
    pub avg_bytes: u64,
    /// The class competes until this time.
    pub active_until: u64,
    /// Written by userspace: bytes per window that make the class compete.
    pub threshold: u64,
    /// Written by userspace: the node's capacity, bytes per second.
    pub capacity: u64,
    /// Written by userspace: the window, ns.
    pub window_ns: u64,
}

/// The classes of one direction as the datapath sees them at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Classes {
    pub until: [u64; CLASSES],
    /// Bytes per window each class sends now (the larger of its average and the current
    /// window, so a class that speeds up counts at once and one that slows down gradually).
    pub used: [u64; CLASSES],
    pub capacity: u64,
    pub window_ns: u64,
}

impl Classes {
    /// Reads one direction's classes; `get` looks an index of `QL_QOS_ACTIVE` up (the map is
    /// declared in each BPF object, so the lookup is passed in).
    #[inline(always)]
    pub fn read<'a>(dir: u32, get: impl Fn(u32) -> Option<&'a ClassActivity>) -> Self {
        let mut classes = Self::default();
        let mut i = 0;
        while i < CLASSES {
            if let Some(a) = get(activity_slot(dir, i as u32)) {
                classes.add(i, a);
            }
            i += 1;
        }
        classes
    }

    #[inline(always)]
    pub fn add(&mut self, class: usize, a: &ClassActivity) {
        if class < CLASSES {
            self.until[class] = a.active_until;
            self.used[class] = if a.bytes > a.avg_bytes {
                a.bytes
            } else {
                a.avg_bytes
            };
            self.capacity = a.capacity;
            self.window_ns = a.window_ns;
        }
    }

    #[inline(always)]
    pub fn mask(&self, now: u64) -> u32 {
        active_mask(&self.until, now)
    }

    /// Bytes per second the classes in `mask` send together.
    #[inline(always)]
    pub fn used_rate(&self, mask: u32) -> u64 {
        if self.window_ns == 0 {
            return 0;
        }
        let mut bytes = 0;
        let mut i = 0;
        while i < CLASSES {
            if mask & (1 << i) != 0 {
                bytes += self.used[i];
            }
            i += 1;
        }
        bytes * 1_000_000 / (self.window_ns / 1000).max(1)
    }
}

/// A pod's rate under `mask`, given what the higher classes in it really use. The table entry
/// assumes every competing higher class takes its whole allocation (the floor: guarantees
/// hold); if they use less, the pod gets its rate for the case without them, scaled to what
/// they leave, with a quarter of their use kept spare for their bursts.
#[inline(always)]
pub fn effective_rate(pod: &QosPod, dir: u32, mask: u32, classes: &Classes) -> u64 {
    let own = pod.class & (CLASSES as u32 - 1);
    let base = pod.rate(dir, mask);
    let higher = mask & ((1 << own) - 1);
    let capacity = classes.capacity;
    if higher == 0 || capacity == 0 {
        return base;
    }
    let used = classes.used_rate(higher);
    let used = used + used / 4;
    if used >= capacity {
        return base;
    }
    let left_per_mille = (capacity - used) * 1000 / capacity;
    let scaled = pod.rate(dir, mask & !higher) / 1000 * left_per_mille;
    if scaled > base {
        scaled
    } else {
        base
    }
}

/// The class's average bytes per window once a window ended `since` ns after it began,
/// holding `bytes`. A window closes at the first packet after it ran out, so it spans
/// `since`, not `window`: its bytes are scaled to one window before they enter the average.
/// One window alone is a coarse measure to lend capacity against: a sender whose GSO or GRO
/// packets carry 64 KiB puts two, three or four of them into 10 ms at 150 Mbit/s. The average
/// moves a quarter of the way per window; after three silent windows it starts again from
/// nothing.
#[inline(always)]
pub fn window_average(avg: u64, bytes: u64, since: u64, window: u64) -> u64 {
    if fell_silent(since, window) {
        return 0;
    }
    let window = if window == 0 { 1 } else { window };
    // since / window in 1/256ths: 256..1024 here, and no overflow for any byte count a
    // window of at most 10 s can hold.
    let span = since * 256 / window;
    let span = if span < 256 { 256 } else { span };
    let ended = bytes * 256 / span;
    avg - avg / 4 + ended / 4
}

/// Whether a class whose current window began `since` ns ago has sent nothing for three
/// whole windows: its average then starts again from nothing.
#[inline(always)]
pub fn fell_silent(since: u64, window: u64) -> bool {
    let window = if window == 0 { 1 } else { window };
    since >= 4 * window
}

/// Until when a class that just sent a `len`-byte packet competes, `avg` being its average
/// bytes per window: a window past the moment its next packet is due at that average (at most
/// three windows out). A fixed window is not enough: a 30 Mbit/s class whose TCP packets
/// leave GRO as 64 KiB aggregates sends one every 17 ms, so with a 10 ms window it looked idle
/// 40 % of the time, and a class above it took the idle-class rate for that long (220 Mbit/s
/// and 250 by turns: 1.06x of its share on average, the node past its capacity).
#[inline(always)]
pub fn competes_until(now: u64, len: u64, avg: u64, window: u64) -> u64 {
    let due = (len * window).checked_div(avg).unwrap_or(0);
    let due = if due > 3 * window { 3 * window } else { due };
    now + window + due
}

/// Share of the link, per mille, a class must use to compete.
pub const ACTIVE_THRESHOLD_PER_MILLE: u64 = 10;

/// Index of a class's activity in `QL_QOS_ACTIVE`.
#[inline(always)]
pub fn activity_slot(dir: u32, class: u32) -> u32 {
    (dir & 1) * CLASSES as u32 + (class & (CLASSES as u32 - 1))
}

/// Which classes compete at `now`, given each one's `active_until`.
#[inline(always)]
pub fn active_mask(active_until: &[u64; CLASSES], now: u64) -> u32 {
    let mut mask = 0;
    let mut i = 0;
    while i < CLASSES {
        if active_until[i] > now {
            mask |= 1 << i;
        }
        i += 1;
    }
    mask
}

/// The floor the datapath applies so a zero entry throttles hard instead of dividing by zero.
pub const MIN_RATE_BYTES: u64 = 1_000;

/// Nanoseconds `len` bytes occupy at `rate` bytes per second.
#[inline(always)]
pub fn transmit_ns(len: u64, rate: u64) -> u64 {
    let rate = if rate < MIN_RATE_BYTES {
        MIN_RATE_BYTES
    } else {
        rate
    };
    len * 1_000_000_000 / rate
}

/// The largest packet the shaper charges at once: a GSO or GRO packet (veth's default
/// `gso_max_size`).
pub const MAX_PACKET_BYTES: u64 = 65_536;

/// The pacing rate for a TCP socket of an aggregate at `rate` whose timeline stands at
/// `timeline` at `now`: the pacing follows the shaper's own state, so whatever makes the
/// two disagree is corrected at the next RTT sample.
///
/// Behind now: TCP's own pacing makes up for a late send only up to half a packet's time, so
/// a sender that loses the CPU for a few ms (2 vCPUs shared by senders, receivers and
/// softirqs) stays behind for good; while more than a quarter of the aggregate's catch-up
/// `credit` is unused, its sockets pace a quarter faster. The claim on the timeline bounds
/// what that catches up to the credit, so the rate still holds over any interval.
///
/// Ahead of now by more than one packet's time plus `burst`: the sockets sent faster than
/// the rate their packets were charged at. That happens whenever the rate falls between two
/// RTT samples (a lent rate follows the other classes' use, so it moves every window), and
/// bbr, which ignores the CE marks, would carry on into the drop horizon (measured: 4 drops
/// of 64 KiB, 113 retransmits, in one of four runs of the three-priorities test). One
/// packet's time is no sign of that: the shaper charges a (GRO) packet whole, so right after
/// a 64 KiB one at 30 Mbit/s the timeline stands 17 ms ahead on time. Beyond that the pace
/// falls linearly from the rate to half of it over `3 * burst` (the default `burst` is a
/// quarter of the CE threshold). Half, not less: bbr learns the rate it is held to, so a
/// deeper brake (a sixteenth) left four bbr streams of one pod at 0.54-0.61x of its limit.
/// Several streams of one pod are not the brake's to hold: `senders` splits the rate among
/// them.
#[inline(always)]
pub fn paced_rate(rate: u64, timeline: u64, now: u64, credit: u64, burst: u64) -> u64 {
    if timeline < now {
        return if credit != 0 && now - timeline > credit / 4 {
            rate + rate / 4
        } else {
            rate
        };
    }
    let slack = burst + transmit_ns(MAX_PACKET_BYTES, rate);
    let lead = timeline - now;
    if burst == 0 || lead <= slack {
        return rate;
    }
    let floor = rate / 2;
    let span = 3 * burst;
    let over = lead - slack;
    if over >= span {
        return floor;
    }
    // In 1024ths: `rate * over` could overflow, and BPF has no 128-bit multiply.
    rate - ((rate - floor) >> 10) * (over * 1024 / span)
}

/// What the shaper does with a packet that departs `late_ns` after now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// Pass, CE-marked if ECN-capable.
    Mark,
    Drop,
}

#[inline(always)]
pub fn verdict(late_ns: u64, cfg: &QosConfig) -> Verdict {
    if late_ns > cfg.horizon_ns {
        Verdict::Drop
    } else if late_ns > cfg.ce_threshold_ns {
        Verdict::Mark
    } else {
        Verdict::Pass
    }
}

#[cfg(feature = "user")]
mod pod_impls {
    // SAFETY (all): repr(C), Copy, no padding (asserted below).
    unsafe impl aya::Pod for super::QosPod {}
    unsafe impl aya::Pod for super::AddrKey {}
    unsafe impl aya::Pod for super::QosStats {}
    unsafe impl aya::Pod for super::QosConfig {}
    unsafe impl aya::Pod for super::ClassActivity {}
}

const _: () = assert!(core::mem::size_of::<QosPod>() == 8 + 2 * 8 * MASKS);
const _: () = assert!(core::mem::size_of::<AddrKey>() == 20);
const _: () = assert!(core::mem::size_of::<QosStats>() == 40);
const _: () = assert!(core::mem::size_of::<QosConfig>() == 40);
const _: () = assert!(core::mem::size_of::<ClassActivity>() == 56);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_counts_classes_still_active() {
        let until = [101, 0, 150, 10];
        assert_eq!(active_mask(&until, 100), 0b0101);
        assert_eq!(active_mask(&until, 200), 0);
    }

    #[test]
    fn what_higher_classes_leave_flows_down() {
        // Class 2 pod: 500 B/us alone, 50 with class 0 competing at full allocation.
        let mut pod = QosPod {
            class: 2,
            ..QosPod::EMPTY
        };
        pod.egress[0b100] = 500_000_000;
        pod.egress[0b101] = 50_000_000;
        let mut classes = Classes {
            capacity: 500_000_000,
            window_ns: 10_000_000,
            ..Classes::default()
        };
        // Class 0 sends 20 MB/s (200 kB per 10 ms): the pod gets 500 scaled by 1 - 25/500.
        classes.used[0] = 200_000;
        assert_eq!(
            effective_rate(&pod, DIR_EGRESS, 0b101, &classes),
            475_000_000
        );
        // Class 0 takes nearly everything: the floor (the guarantee-holding entry).
        classes.used[0] = 4_500_000;
        assert_eq!(
            effective_rate(&pod, DIR_EGRESS, 0b101, &classes),
            50_000_000
        );
        // Nothing above competes: the entry itself.
        assert_eq!(
            effective_rate(&pod, DIR_EGRESS, 0b100, &classes),
            500_000_000
        );
    }

    #[test]
    fn class_use_is_averaged_over_windows_scaled_to_their_length() {
        let w = 10_000_000;
        // A window that ran 12.5 ms counts as 0.8 of its bytes.
        assert_eq!(window_average(0, 1_000, w + w / 4, w), 200);
        // Windows alternating two and four 64 KiB packets settle near three.
        let mut avg = 0;
        for i in 0..64 {
            let packets = if i % 2 == 0 { 2 } else { 4 };
            avg = window_average(avg, packets * 65_536, w, w);
        }
        assert!(
            (3 * 65_536 * 9 / 10..=3 * 65_536 * 11 / 10).contains(&avg),
            "{avg}"
        );
        // Three silent windows: nothing is left.
        assert!(!fell_silent(4 * w - 1, w) && fell_silent(4 * w, w));
        assert_ne!(window_average(avg, 65_536, 4 * w - 1, w), 0);
        assert_eq!(window_average(avg, 65_536, 4 * w, w), 0);
        // A window of 0 (not yet written) does not divide by zero.
        assert_eq!(window_average(0, 4, 0, 0), 1);
    }

    #[test]
    fn a_class_competes_until_a_window_after_its_next_packet_is_due() {
        let w = 10_000_000;
        // 64 KiB every 17 ms (about 37.6 kB per window): next due in 1.7 windows.
        let until = competes_until(0, 65_536, 37_600, w);
        assert!((27 * w / 10..28 * w / 10).contains(&until), "{until}");
        // A steady stream of small packets: about one window.
        assert_eq!(competes_until(5, 1_500, 1_500_000, w), 5 + w + w / 1000);
        // No average yet, or a packet far larger than it: bounded.
        assert_eq!(competes_until(0, 65_536, 0, w), w);
        assert_eq!(competes_until(0, 65_536, 1, w), 4 * w);
    }

    #[test]
    fn transmit_time_and_floor() {
        // 1500 B at 12.5 MB/s (100 Mbit/s) = 120 us.
        assert_eq!(transmit_ns(1500, 12_500_000), 120_000);
        assert_eq!(transmit_ns(1000, 0), 1_000_000_000);
    }

    #[test]
    fn a_lagging_aggregate_paces_faster_until_caught_up() {
        let now = 10_000;
        assert_eq!(paced_rate(1000, now, now, 100, 40), 1000);
        assert_eq!(paced_rate(1000, now - 25, now, 100, 40), 1000);
        assert_eq!(paced_rate(1000, now - 26, now, 100, 40), 1250);
        // Without credit nothing is caught up.
        assert_eq!(paced_rate(1000, 0, now, 0, 40), 1000);
    }

    #[test]
    fn an_aggregate_ahead_of_its_rate_paces_slower_the_further_ahead() {
        // 64 KiB at 2^26 B/s is 976_562 ns: one packet's time.
        let (now, burst, rate) = (1_000_000, 1000, 1 << 26);
        let slack = burst + 976_562;
        let at = |lead: u64| paced_rate(rate, now + lead, now, 100, burst);
        assert_eq!(at(slack), rate);
        // Just past the slack: a little slower (the ramp resolves 1024 steps).
        assert!(at(slack + 30) < rate && at(slack + 30) > rate - rate / 50);
        // Halfway along the ramp: three quarters of the rate.
        assert_eq!(at(slack + 3 * burst / 2), rate / 4 * 3);
        assert!(at(slack + burst) > at(slack + 2 * burst));
        // From 3 x burst past the slack on: half.
        assert!(at(slack + 3 * burst - 1) > rate / 2);
        assert_eq!(at(slack + 3 * burst), rate / 2);
        assert_eq!(at(u64::MAX - now), rate / 2);
        // No burst configured: no brake.
        assert_eq!(paced_rate(rate, now + 10 * slack, now, 100, 0), rate);
        // Large rates and leads do not overflow.
        let big = u64::from(u32::MAX) * 16;
        assert!(paced_rate(big, now + 3 * burst, now, 100, burst) < big);
    }

    #[test]
    fn verdict_thresholds() {
        let cfg = QosConfig {
            horizon_ns: 50,
            ce_threshold_ns: 1,
            ..QosConfig::default()
        };
        assert_eq!(verdict(1, &cfg), Verdict::Pass);
        assert_eq!(verdict(2, &cfg), Verdict::Mark);
        assert_eq!(verdict(51, &cfg), Verdict::Drop);
    }
}
