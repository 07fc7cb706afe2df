//! Which shaped pods are sending, per direction, judged from the shaper's byte counters.
//!
//! Classes react in the kernel (a class competes while it sends more than a trickle); this is
//! the slower, within-class half: a pod that stopped sending stops holding a share of its
//! class, so the others in it may use that share. A pod counts as idle only after it sent
//! less than a trickle (the same 1 % of capacity that makes a class compete; neighbour
//! discovery and the like stay below it) for `IDLE_AFTER`, and as active again as soon as it
//! sends more, so a pod with steady traffic never flips back and forth.
use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use quicklane_qos::Direction;

pub const IDLE_AFTER: Duration = Duration::from_secs(2);

/// Per pod slot: active in egress, active in ingress. A slot not observed yet counts as
/// active: the assumption that never starves a pod of its share.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Activity(BTreeMap<u32, [bool; 2]>);

impl Activity {
    pub fn is_active(&self, slot: u32, dir: Direction) -> bool {
        self.0.get(&slot).is_none_or(|a| a[index(dir)])
    }
}

fn index(dir: Direction) -> usize {
    match dir {
        Direction::Egress => 0,
        Direction::Ingress => 1,
    }
}

/// Remembers each slot's byte counters and when it last sent more than a trickle.
#[derive(Debug)]
pub struct Tracker {
    /// Per slot and direction: (counter at the last look, last time it sent enough).
    last: BTreeMap<u32, [(u64, Instant); 2]>,
    looked: Instant,
}

impl Tracker {
    pub fn new(now: Instant) -> Self {
        Self {
            last: BTreeMap::new(),
            looked: now,
        }
    }

    /// `bytes[slot] = [egress, ingress]` counters as read now; a pod sends "enough" when
    /// its counter grew by `trickle` bytes per second since the last look. A slot seen for
    /// the first time (a new pod) counts as sending.
    pub fn observe(
        &mut self,
        bytes: &BTreeMap<u32, [u64; 2]>,
        now: Instant,
        trickle: u64,
    ) -> Activity {
        let elapsed = now.duration_since(self.looked).as_secs_f64();
        // A new slot counts as having sent at the last look: active for IDLE_AFTER from it.
        let new_since = std::mem::replace(&mut self.looked, now);
        let enough = (trickle as f64 * elapsed) as u64;
        self.last.retain(|slot, _| bytes.contains_key(slot));
        Activity(
            bytes
                .iter()
                .map(|(&slot, seen)| {
                    let last = self.last.entry(slot).or_insert([(0, new_since); 2]);
                    let active = std::array::from_fn(|d| {
                        if seen[d].saturating_sub(last[d].0) > enough {
                            last[d].1 = now;
                        }
                        last[d].0 = seen[d];
                        now.duration_since(last[d].1) < IDLE_AFTER
                    });
                    (slot, active)
                })
                .collect(),
        )
    }

    /// Forgets a slot handed to another pod (its counters start from zero again).
    pub fn forget(&mut self, slot: u32) {
        self.last.remove(&slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_goes_idle_only_after_its_counters_stood_still() {
        let t0 = Instant::now();
        let mut tracker = Tracker::new(t0);
        let s = |secs: u64| t0 + Duration::from_secs(secs);
        let seen = |a: [u64; 2], b: [u64; 2]| BTreeMap::from([(0, a), (1, b)]);
        // 100 bytes per second is a trickle.
        let a = tracker.observe(&seen([1000, 0], [50, 0]), s(1), 100);
        assert!(a.is_active(0, Direction::Egress));
        // Pod 1 only trickled since t0, but less than IDLE_AFTER has passed.
        assert!(a.is_active(1, Direction::Egress));
        let a = tracker.observe(&seen([2000, 0], [90, 0]), s(2), 100);
        assert!(a.is_active(0, Direction::Egress));
        assert!(!a.is_active(1, Direction::Egress));
        assert!(!a.is_active(0, Direction::Ingress));
        // Pod 0 stops: still active for IDLE_AFTER, then idle; pod 1 starts: active at once.
        let a = tracker.observe(&seen([2000, 0], [5000, 0]), s(3), 100);
        assert!(a.is_active(0, Direction::Egress));
        assert!(a.is_active(1, Direction::Egress));
        let a = tracker.observe(&seen([2050, 0], [9000, 0]), s(4), 100);
        assert!(!a.is_active(0, Direction::Egress));
        assert!(a.is_active(1, Direction::Egress));
    }

    #[test]
    fn unknown_pods_count_as_active() {
        assert!(Activity::default().is_active(3, Direction::Ingress));
    }

    #[test]
    fn a_forgotten_slot_starts_over_as_a_new_pod() {
        let t0 = Instant::now();
        let mut tracker = Tracker::new(t0);
        let s = |secs: u64| t0 + Duration::from_secs(secs);
        let idle = BTreeMap::from([(7, [5000, 0])]);
        tracker.observe(&idle, s(1), 100);
        tracker.observe(&idle, s(2), 100);
        assert!(!tracker
            .observe(&idle, s(4), 100)
            .is_active(7, Direction::Egress));
        // The slot goes to a new pod whose counters restart from zero.
        tracker.forget(7);
        let fresh = BTreeMap::from([(7, [0, 0])]);
        assert!(tracker
            .observe(&fresh, s(5), 100)
            .is_active(7, Direction::Egress));
    }
}
