//! Which shaped pods are sending, per direction, judged from the shaper's byte counters.
//!
//! Classes react in the kernel (a class competes while it sends more than a trickle); this is
//! the slower, within-class half: a pod that stopped sending stops holding a share of its
//! class, so the others in it may use that share. A pod counts as idle only after it sent
//! less than a trickle (the same 1 % of capacity that makes a class compete; neighbour
//! discovery and the like stay below it) for `IDLE_AFTER`, and as active again as soon as it
//! sends more, so a pod with steady traffic never flips back and forth.
use std::time::{Duration, Instant};

use quicklane_qos::Direction;

pub const IDLE_AFTER: Duration = Duration::from_secs(2);

/// Per pod (policy order): active in egress, active in ingress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Activity(Vec<[bool; 2]>);

impl Activity {
    /// Every pod active: the assumption before anything was observed, which never starves
    /// a pod of its share.
    pub fn all(pods: usize) -> Self {
        Self(vec![[true; 2]; pods])
    }

    pub fn is_active(&self, pod: usize, dir: Direction) -> bool {
        self.0.get(pod).is_none_or(|a| a[index(dir)])
    }
}

fn index(dir: Direction) -> usize {
    match dir {
        Direction::Egress => 0,
        Direction::Ingress => 1,
    }
}

/// Remembers each pod's byte counters and when it last sent more than a trickle.
#[derive(Debug)]
pub struct Tracker {
    /// Per pod and direction: (counter at the last look, last time it sent enough).
    last: Vec<[(u64, Instant); 2]>,
    looked: Instant,
}

impl Tracker {
    pub fn new(pods: usize, now: Instant) -> Self {
        Self {
            last: vec![[(0, now); 2]; pods],
            looked: now,
        }
    }

    /// `bytes[pod] = [egress, ingress]` counters as read now; a pod sends "enough" when its
    /// counter grew by `trickle` bytes per second since the last look.
    pub fn observe(&mut self, bytes: &[[u64; 2]], now: Instant, trickle: u64) -> Activity {
        let elapsed = now.duration_since(self.looked).as_secs_f64();
        self.looked = now;
        let enough = (trickle as f64 * elapsed) as u64;
        Activity(
            self.last
                .iter_mut()
                .zip(bytes)
                .map(|(last, seen)| {
                    std::array::from_fn(|d| {
                        if seen[d].saturating_sub(last[d].0) > enough {
                            last[d].1 = now;
                        }
                        last[d].0 = seen[d];
                        now.duration_since(last[d].1) < IDLE_AFTER
                    })
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_goes_idle_only_after_its_counters_stood_still() {
        let t0 = Instant::now();
        let mut tracker = Tracker::new(2, t0);
        let s = |secs: u64| t0 + Duration::from_secs(secs);
        // 100 bytes per second is a trickle.
        let a = tracker.observe(&[[1000, 0], [50, 0]], s(1), 100);
        assert!(a.is_active(0, Direction::Egress));
        // Pod 1 only trickled since t0, but less than IDLE_AFTER has passed.
        assert!(a.is_active(1, Direction::Egress));
        let a = tracker.observe(&[[2000, 0], [90, 0]], s(2), 100);
        assert!(a.is_active(0, Direction::Egress));
        assert!(!a.is_active(1, Direction::Egress));
        assert!(!a.is_active(0, Direction::Ingress));
        // Pod 0 stops: still active for IDLE_AFTER, then idle; pod 1 starts: active at once.
        let a = tracker.observe(&[[2000, 0], [5000, 0]], s(3), 100);
        assert!(a.is_active(0, Direction::Egress));
        assert!(a.is_active(1, Direction::Egress));
        let a = tracker.observe(&[[2050, 0], [9000, 0]], s(4), 100);
        assert!(!a.is_active(0, Direction::Egress));
        assert!(a.is_active(1, Direction::Egress));
    }

    #[test]
    fn unknown_pods_count_as_active() {
        assert!(Activity::all(0).is_active(3, Direction::Ingress));
    }
}
