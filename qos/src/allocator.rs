//! Per-pod rates for every combination of active classes.
//!
//! # Classes and activity masks
//!
//! Pods fall into four classes: the online priorities 0 (high), 1 (medium) and 2 (low), and
//! the offline class, 3 ([`PodPolicy::class`]). An *activity mask* has bit `k` set when class
//! `k` has traffic. The kernel tracks which classes are active and looks up each pod's rate
//! for the current mask in a table computed here for all 16 masks ([`rate_table`]), so a
//! high-priority pod that starts sending slows lower classes down at their next packet,
//! without waiting for userspace.
//!
//! Within an active class, only pods userspace has seen sending recently
//! ([`PodDemand::active`]) compete: an idle pod takes no share (work conservation). In its
//! own row, though, a pod always competes and its class is always active (`row[mask] ==
//! row[mask | own_bit]`): the row is read when that pod sends, so it must hold what the pod
//! gets once it sends. Until userspace recomputes the table, the other pods' rates do not
//! account for an idle pod that woke up, so the node can be overcommitted by that pod's share
//! for one refresh interval.
//!
//! # One allocation ([`allocate`])
//!
//! Among the competing pods (active, class bit in the mask), with unset limits read as the
//! node capacity and every limit capped at it:
//!
//! 1. **Online and offline budgets** (Volcano's `networkQosConfig`). The online demand is the
//!    sum of the competing online pods' limits, capped at the capacity. With no offline pod
//!    competing, the online budget is the whole capacity. Otherwise the offline budget is
//!    `offline_low_percent` of the capacity when the online demand reaches
//!    `online_watermark_percent` of it, and else what online pods leave, kept between the low
//!    and the `offline_high_percent` bound: `max(low, min(high, capacity - demand))`. With no
//!    online pod competing, offline pods get the high bound, not the whole node: that is
//!    Volcano's behaviour and what users configure. The online budget is the rest; what one
//!    budget leaves unused is not lent to the other.
//! 2. **Guarantees first.** Each pod gets its guarantee (capped at its limit). When a
//!    budget's guarantees do not fit, they are all scaled down in proportion and nothing
//!    more is handed out in that budget: no class gains from a shortage.
//! 3. **Surplus by priority.** What the budget has left goes to priority 0 until every
//!    competing priority-0 pod is at its limit, then to priority 1, then 2; offline pods form
//!    one class in their own budget. Within a class the surplus is water-filled in proportion
//!    to weights, a pod's weight being its guarantee or, without one, [`DEFAULT_WEIGHT`];
//!    a pod that reaches its limit drops out and its share goes to the others.
//!
//! Rates are whole bits per second, always rounded down, so the allocations never add up to
//! more than a budget. Rounding leaves at most one bit per second per pod unallocated; that
//! remainder is not passed on to a lower class (it would let a lower class gain while a
//! higher one is below its limit). The result depends on the pods, not on their order.
//!
//! The node policy is assumed valid ([`NodePolicy::validate`]); out-of-range percentages are
//! clamped to 100 so that the allocations still fit the capacity. An offline pod's priority
//! is ignored.

use serde::{Deserialize, Serialize};

use crate::policy::{Direction, NodePolicy, PodPolicy, OFFLINE_CLASS};
use crate::rate::Rate;

/// Three online priorities and the offline class.
pub const CLASS_COUNT: usize = 4;
/// Every activity mask over [`CLASS_COUNT`] classes.
pub const MASK_COUNT: usize = 1 << CLASS_COUNT;
/// A pod without a guarantee shares surplus as if it had been guaranteed this much.
pub const DEFAULT_WEIGHT: Rate = Rate::from_bits_per_sec(1_000_000);

/// A pod as the allocator sees it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub struct PodDemand {
    pub policy: PodPolicy,
    /// Userspace has seen the pod send recently.
    pub active: bool,
}

/// Each pod's rate for every activity mask: one row per pod, in input order, indexed by mask.
/// In its own row a pod competes even when idle, and its class counts as active.
pub fn rate_table(
    node: &NodePolicy,
    pods: &[PodDemand],
    dir: Direction,
) -> Vec<[Rate; MASK_COUNT]> {
    // The allocations among the active pods serve every active pod's row.
    let shared: Vec<Vec<Rate>> = masks()
        .map(|mask| allocate(node, pods, dir, mask))
        .collect();
    pods.iter()
        .enumerate()
        .map(|(i, pod)| {
            let own = pod.policy.class_bit();
            let mut row = [Rate::ZERO; MASK_COUNT];
            for mask in masks().filter(|mask| mask & own != 0) {
                let rate = if pod.active {
                    shared[usize::from(mask)][i]
                } else {
                    allocate_among(node, pods, dir, |j, other| {
                        (other.active || j == i) && in_mask(other, mask)
                    })[i]
                };
                row[usize::from(mask)] = rate;
                row[usize::from(mask & !own)] = rate;
            }
            row
        })
        .collect()
}

/// Every pod's rate when the classes in `mask` are active (bits above [`CLASS_COUNT`] are
/// ignored). Pods that do not compete, being idle or outside the mask, get zero.
pub fn allocate(node: &NodePolicy, pods: &[PodDemand], dir: Direction, mask: u8) -> Vec<Rate> {
    allocate_among(node, pods, dir, |_, pod| pod.active && in_mask(pod, mask))
}

fn masks() -> impl Iterator<Item = u8> {
    (0..MASK_COUNT).map(|mask| mask as u8)
}

fn in_mask(pod: &PodDemand, mask: u8) -> bool {
    mask & pod.policy.class_bit() != 0
}

/// A competing pod's settings, with the node capacity standing in for "unlimited".
struct Claim {
    pod: usize,
    class: usize,
    limit: u64,
    guarantee: u64,
    weight: u64,
}

impl Claim {
    fn new(pod: usize, policy: &PodPolicy, dir: Direction, capacity: u64) -> Claim {
        let settings = policy.direction(dir);
        let limit = settings
            .limit
            .map_or(capacity, Rate::bits_per_sec)
            .min(capacity);
        let guarantee = settings.guarantee.map_or(0, Rate::bits_per_sec).min(limit);
        let weight = if guarantee > 0 {
            guarantee
        } else {
            DEFAULT_WEIGHT.bits_per_sec()
        };
        Claim {
            pod,
            class: policy.class(),
            limit,
            guarantee,
            weight,
        }
    }
}

fn allocate_among(
    node: &NodePolicy,
    pods: &[PodDemand],
    dir: Direction,
    competes: impl Fn(usize, &PodDemand) -> bool,
) -> Vec<Rate> {
    let capacity = node.capacity.bits_per_sec();
    let (online, offline): (Vec<Claim>, Vec<Claim>) = pods
        .iter()
        .enumerate()
        .filter(|&(i, pod)| competes(i, pod))
        .map(|(i, pod)| Claim::new(i, &pod.policy, dir, capacity))
        .partition(|claim| claim.class != OFFLINE_CLASS);
    let (online_budget, offline_budget) = budgets(node, &online, !offline.is_empty());
    let mut rates = vec![Rate::ZERO; pods.len()];
    for (budget, claims) in [(online_budget, &online), (offline_budget, &offline)] {
        for (claim, rate) in claims.iter().zip(share(budget, claims)) {
            rates[claim.pod] = Rate::from_bits_per_sec(rate);
        }
    }
    rates
}

/// `(online, offline)` budgets; see the module docs.
fn budgets(node: &NodePolicy, online: &[Claim], offline_competes: bool) -> (u64, u64) {
    let capacity = node.capacity.bits_per_sec();
    if !offline_competes {
        return (capacity, 0);
    }
    let percent = |p: u8| (u128::from(capacity) * u128::from(p.min(100)) / 100) as u64;
    let high = percent(node.offline_high_percent);
    let offline = if online.is_empty() {
        high
    } else {
        let demand = online
            .iter()
            .fold(0u64, |sum, c| sum.saturating_add(c.limit))
            .min(capacity);
        let low = percent(node.offline_low_percent);
        if demand >= percent(node.online_watermark_percent) {
            low
        } else {
            low.max(high.min(capacity - demand))
        }
    };
    (capacity - offline, offline)
}

/// One budget's allocations, aligned with `claims`.
fn share(budget: u64, claims: &[Claim]) -> Vec<u64> {
    let guaranteed: u128 = claims.iter().map(|c| u128::from(c.guarantee)).sum();
    if guaranteed > u128::from(budget) {
        return claims
            .iter()
            .map(|c| (u128::from(c.guarantee) * u128::from(budget) / guaranteed) as u64)
            .collect();
    }
    let mut alloc: Vec<u64> = claims.iter().map(|c| c.guarantee).collect();
    let mut surplus = budget - guaranteed as u64;
    for class in 0..CLASS_COUNT {
        let members: Vec<usize> = (0..claims.len())
            .filter(|&k| claims[k].class == class)
            .collect();
        if members.is_empty() {
            continue;
        }
        let (given, all_at_limit) = water_fill(surplus, claims, &members, &mut alloc);
        surplus -= given;
        if !all_at_limit {
            break;
        }
    }
    alloc
}

/// Spreads `surplus` over `members` in proportion to their weights, none beyond its limit.
/// Returns what was handed out and whether every member reached its limit.
///
/// Members are visited by headroom per unit of weight, smallest first: each that would reach
/// its limit at the current fill level is filled and leaves; the rest share what remains.
/// Exact integer comparisons make ties harmless, so the result does not depend on order.
fn water_fill(surplus: u64, claims: &[Claim], members: &[usize], alloc: &mut [u64]) -> (u64, bool) {
    let weights = normalized_weights(members.iter().map(|&k| claims[k].weight));
    let headroom: Vec<u128> = members
        .iter()
        .map(|&k| u128::from(claims[k].limit - alloc[k]))
        .collect();
    let mut order: Vec<usize> = (0..members.len()).collect();
    order.sort_by(|&a, &b| (headroom[a] * weights[b]).cmp(&(headroom[b] * weights[a])));

    let mut left = u128::from(surplus);
    let mut weight_left: u128 = weights.iter().sum();
    let mut filled = 0;
    for &m in &order {
        if headroom[m] * weight_left > left * weights[m] {
            break;
        }
        alloc[members[m]] += headroom[m] as u64;
        left -= headroom[m];
        weight_left -= weights[m];
        filled += 1;
    }
    if filled == order.len() {
        return (surplus - left as u64, true);
    }
    // Everyone left stays below its limit: their headroom exceeds their share of `left`.
    let mut given = u128::from(surplus) - left;
    for &m in &order[filled..] {
        let extra = left * weights[m] / weight_left;
        alloc[members[m]] += extra as u64;
        given += extra;
    }
    (given as u64, false)
}

/// Keeps the weights' sum within 64 bits so the products above fit in 128; only absurd
/// guarantees (exabits in total) are scaled, and the same way whatever the order.
fn normalized_weights(weights: impl Iterator<Item = u64>) -> Vec<u128> {
    let weights: Vec<u128> = weights.map(u128::from).collect();
    let sum: u128 = weights.iter().sum();
    let shift = (128 - sum.leading_zeros()).saturating_sub(63);
    weights.into_iter().map(|w| (w >> shift).max(1)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{DirectionPolicy, Priority};

    const M: u64 = 1_000_000;
    const G: u64 = 1_000_000_000;

    fn node(capacity: u64) -> NodePolicy {
        NodePolicy::with_capacity(Rate::from_bits_per_sec(capacity))
    }

    fn pod(priority: Priority, limit: Option<u64>, guarantee: Option<u64>) -> PodDemand {
        PodDemand {
            policy: PodPolicy {
                priority,
                offline: false,
                egress: DirectionPolicy {
                    limit: limit.map(Rate::from_bits_per_sec),
                    guarantee: guarantee.map(Rate::from_bits_per_sec),
                },
                ingress: DirectionPolicy::default(),
            },
            active: true,
        }
    }

    fn offline(limit: Option<u64>) -> PodDemand {
        let mut p = pod(Priority::Medium, limit, None);
        p.policy.offline = true;
        p
    }

    fn bits(rates: &[Rate]) -> Vec<u64> {
        rates.iter().map(|r| r.bits_per_sec()).collect()
    }

    fn egress(node: &NodePolicy, pods: &[PodDemand], mask: u8) -> Vec<u64> {
        bits(&allocate(node, pods, Direction::Egress, mask))
    }

    #[test]
    fn high_priority_fills_to_its_limit_first() {
        let pods = [
            pod(Priority::High, Some(600 * M), Some(200 * M)),
            pod(Priority::Low, None, Some(100 * M)),
        ];
        let node = node(G);
        assert_eq!(egress(&node, &pods, 0b0101), [600 * M, 400 * M]);
        assert_eq!(egress(&node, &pods, 0b0100), [0, G]);
        assert_eq!(egress(&node, &pods, 0b0001), [600 * M, 0]);
        assert_eq!(egress(&node, &pods, 0b1010), [0, 0]);

        let table = rate_table(&node, &pods, Direction::Egress);
        assert_eq!(bits(&[table[1][0b0000], table[1][0b0100]]), [G, G]);
        assert_eq!(table[1][0b0101].bits_per_sec(), 400 * M);
        assert_eq!(
            table[1][0b0001].bits_per_sec(),
            400 * M,
            "own class counts as active"
        );
        assert_eq!(table[0][0b0000].bits_per_sec(), 600 * M);
        assert_eq!(table[0][0b1111].bits_per_sec(), 600 * M);
        // Ingress has no settings: high priority takes all, and without a guarantee low
        // priority starves while high priority can use more.
        let ingress = rate_table(&node, &pods, Direction::Ingress);
        assert_eq!(bits(&[ingress[0][0b0101], ingress[1][0b0101]]), [G, 0]);
    }

    #[test]
    fn offline_gets_the_low_share_above_the_watermark() {
        // Volcano's example: online demand 900M of 1G is above the 80% watermark.
        let pods = [pod(Priority::Medium, Some(900 * M), None), offline(None)];
        assert_eq!(egress(&node(G), &pods, 0b1111), [900 * M, 100 * M]);
    }

    #[test]
    fn offline_gets_what_online_leaves_between_low_and_high() {
        let node = node(G);
        // Demand 700M < 800M: offline gets what is left, 300M.
        let pods = [pod(Priority::Medium, Some(700 * M), None), offline(None)];
        assert_eq!(egress(&node, &pods, 0b1111), [700 * M, 300 * M]);
        // Demand 300M: offline would have 700M left but is capped at 40%, and the online
        // budget's unused 300M stays unused.
        let pods = [pod(Priority::Medium, Some(300 * M), None), offline(None)];
        assert_eq!(egress(&node, &pods, 0b1111), [300 * M, 400 * M]);
        // An unlimited online pod demands the whole node.
        let pods = [pod(Priority::Low, None, None), offline(None)];
        assert_eq!(egress(&node, &pods, 0b1111), [900 * M, 100 * M]);
        // Offline alone still gets only the high share.
        assert_eq!(egress(&node, &pods, 0b1000), [0, 400 * M]);
        // An idle online pod does not count.
        let mut idle = pods;
        idle[0].active = false;
        assert_eq!(egress(&node, &idle, 0b1111), [0, 400 * M]);
    }

    #[test]
    fn infeasible_guarantees_scale_down_proportionally() {
        let pods = [
            pod(Priority::Low, None, Some(800 * M)),
            pod(Priority::High, None, Some(400 * M)),
        ];
        assert_eq!(egress(&node(G), &pods, 0b0101), [666_666_666, 333_333_333]);
    }

    #[test]
    fn surplus_follows_weights_and_limits() {
        let node = node(G);
        let pods = [
            pod(Priority::Medium, None, Some(100 * M)),
            pod(Priority::Medium, None, Some(300 * M)),
        ];
        assert_eq!(egress(&node, &pods, 0b0010), [250 * M, 750 * M]);
        let capped = [
            pod(Priority::Medium, Some(200 * M), Some(100 * M)),
            pod(Priority::Medium, None, Some(300 * M)),
        ];
        assert_eq!(egress(&node, &capped, 0b0010), [200 * M, 800 * M]);
        // Without guarantees, DEFAULT_WEIGHT each: an even split.
        let even = [
            pod(Priority::Low, None, None),
            pod(Priority::Low, None, None),
        ];
        assert_eq!(egress(&node, &even, 0b0100), [500 * M, 500 * M]);
    }

    #[test]
    fn idle_pods_get_a_row_as_if_they_sent() {
        let mut pods = [
            pod(Priority::Medium, None, None),
            pod(Priority::Medium, None, None),
        ];
        pods[1].active = false;
        let node = node(G);
        assert_eq!(egress(&node, &pods, 0b0010), [G, 0]);
        let table = rate_table(&node, &pods, Direction::Egress);
        assert_eq!(table[0][0b0010].bits_per_sec(), G);
        assert_eq!(table[1][0b0010].bits_per_sec(), 500 * M);
        assert_eq!(table[1][0b0000].bits_per_sec(), 500 * M);
    }

    #[test]
    fn unlimited_is_capped_at_capacity_and_rounding_stays_within_it() {
        let node = node(1_000);
        let pods = [pod(Priority::High, None, None); 3];
        let rates = egress(&node, &pods, 0b0001);
        assert_eq!(rates, [333, 333, 333]);
        let single = [pod(Priority::High, Some(10 * G), Some(5 * G))];
        assert_eq!(egress(&node, &single, 0b0001), [1_000]);
    }

    #[test]
    fn huge_weights_do_not_overflow() {
        // The guarantees fit, but with the default weight the weights exceed 64 bits.
        let node = NodePolicy::with_capacity(Rate::from_bits_per_sec(u64::MAX));
        let mut pods = [pod(Priority::High, None, Some(u64::MAX / 2)); 3];
        pods[2] = pod(Priority::High, None, None);
        let rates = egress(&node, &pods, 0b0001);
        assert!(rates.iter().map(|&r| u128::from(r)).sum::<u128>() <= u128::from(u64::MAX));
        assert_eq!(rates[0], rates[1]);
        let many = [pod(Priority::High, None, Some(u64::MAX / 16)); 8];
        let rates = egress(&node, &many, 0b0001);
        assert!(rates.iter().all(|&r| r == u64::MAX / 8));
    }
}
