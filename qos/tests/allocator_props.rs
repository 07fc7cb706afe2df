//! The allocator's invariants over random nodes and pods, for every activity mask.

use proptest::prelude::*;
use quicklane_qos::allocator::MASK_COUNT;
use quicklane_qos::{
    allocate, rate_table, Direction, DirectionPolicy, NodePolicy, PodDemand, PodPolicy, Priority,
    Rate,
};

const DIRECTIONS: [Direction; 2] = [Direction::Egress, Direction::Ingress];

fn capacity() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(1_000u64),
        Just(1_000_000_000),
        Just(10_000_000_000_000),
        1_000u64..=10_000_000_000_000,
    ]
}

fn node() -> impl Strategy<Value = NodePolicy> {
    (capacity(), 1u8..=100, 1u8..=100, 1u8..=100).prop_map(|(capacity, watermark, a, b)| {
        NodePolicy {
            capacity: Rate::from_bits_per_sec(capacity),
            online_watermark_percent: watermark,
            offline_low_percent: a.min(b),
            offline_high_percent: a.max(b),
        }
    })
}

/// Rates on the scale of the capacity, so pods contend; the jitter exercises rounding.
fn rate_near(capacity: u64, max_percent: u64) -> impl Strategy<Value = Rate> {
    (0..=max_percent, 0..1_000u64).prop_map(move |(percent, jitter)| {
        Rate::from_bits_per_sec(capacity / 100 * percent + jitter)
    })
}

fn direction(capacity: u64) -> impl Strategy<Value = DirectionPolicy> {
    (
        proptest::option::weighted(0.6, rate_near(capacity, 150)),
        proptest::option::weighted(0.5, rate_near(capacity, 70)),
    )
        .prop_map(|(limit, guarantee)| DirectionPolicy {
            limit,
            // Valid policies only: the guarantee never exceeds the limit.
            guarantee: match (limit, guarantee) {
                (Some(l), Some(g)) => Some(l.min(g)),
                (_, g) => g,
            },
        })
}

fn pod(capacity: u64) -> impl Strategy<Value = PodDemand> {
    (
        prop::sample::select(Priority::ALL.to_vec()),
        prop::bool::weighted(0.3),
        prop::bool::weighted(0.8),
        direction(capacity),
        direction(capacity),
    )
        .prop_map(|(priority, offline, active, egress, ingress)| PodDemand {
            policy: PodPolicy {
                priority,
                offline,
                egress,
                ingress,
            },
            active,
        })
}

fn scenario() -> impl Strategy<Value = (NodePolicy, Vec<PodDemand>)> {
    node().prop_flat_map(|node| {
        let pods = prop::collection::vec(pod(node.capacity.bits_per_sec()), 1..=8);
        (Just(node), pods)
    })
}

fn cap(node: &NodePolicy) -> u64 {
    node.capacity.bits_per_sec()
}

fn limit(node: &NodePolicy, pod: &PodDemand, dir: Direction) -> u64 {
    pod.policy
        .direction(dir)
        .limit
        .map_or(cap(node), Rate::bits_per_sec)
        .min(cap(node))
}

fn guarantee(node: &NodePolicy, pod: &PodDemand, dir: Direction) -> u64 {
    pod.policy
        .direction(dir)
        .guarantee
        .map_or(0, Rate::bits_per_sec)
        .min(limit(node, pod, dir))
}

fn competes(pod: &PodDemand, mask: u8) -> bool {
    pod.active && mask & pod.policy.class_bit() != 0
}

/// The budgets as the module docs state them, written out independently.
fn budgets(node: &NodePolicy, pods: &[PodDemand], dir: Direction, mask: u8) -> (u64, u64) {
    let c = cap(node);
    let pct = |p: u8| (u128::from(c) * u128::from(p) / 100) as u64;
    let competing: Vec<&PodDemand> = pods.iter().filter(|p| competes(p, mask)).collect();
    let online: Vec<&&PodDemand> = competing.iter().filter(|p| !p.policy.offline).collect();
    if online.len() == competing.len() {
        return (c, 0);
    }
    if online.is_empty() {
        return (
            c - pct(node.offline_high_percent),
            pct(node.offline_high_percent),
        );
    }
    let demand: u64 = online
        .iter()
        .map(|p| limit(node, p, dir))
        .sum::<u64>()
        .min(c);
    let offline = if demand >= pct(node.online_watermark_percent) {
        pct(node.offline_low_percent)
    } else {
        pct(node.offline_low_percent).max(pct(node.offline_high_percent).min(c - demand))
    };
    (c - offline, offline)
}

fn bits(rates: &[Rate]) -> Vec<u64> {
    rates.iter().map(|r| r.bits_per_sec()).collect()
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    /// (a) capacity, (b) limits, (c) guarantees, (d) work conservation, (f) priority,
    /// and non-competing pods get nothing.
    #[test]
    fn allocations_respect_the_policy((node, pods) in scenario()) {
        for dir in DIRECTIONS {
            for mask in 0..16u8 {
                let rates = bits(&allocate(&node, &pods, dir, mask));
                prop_assert_eq!(rates.len(), pods.len());
                let total: u128 = rates.iter().map(|&r| u128::from(r)).sum();
                prop_assert!(total <= u128::from(cap(&node)), "sum {} > capacity", total);

                for (pod, &rate) in pods.iter().zip(&rates) {
                    prop_assert!(rate <= limit(&node, pod, dir), "{} above limit", rate);
                    if !competes(pod, mask) {
                        prop_assert_eq!(rate, 0);
                    }
                }

                let (online_budget, offline_budget) = budgets(&node, &pods, dir, mask);
                for (offline, budget) in [(false, online_budget), (true, offline_budget)] {
                    let side: Vec<(&PodDemand, u64)> = pods.iter().zip(rates.iter().copied())
                        .filter(|(p, _)| competes(p, mask) && p.policy.offline == offline)
                        .collect();
                    let used: u64 = side.iter().map(|&(_, r)| r).sum();
                    prop_assert!(used <= budget, "offline={}: {} > budget {}", offline, used, budget);
                    let guaranteed: u64 = side.iter().map(|(p, _)| guarantee(&node, p, dir)).sum();
                    if guaranteed <= budget {
                        for &(p, r) in &side {
                            prop_assert!(r >= guarantee(&node, p, dir), "below guarantee: {}", r);
                        }
                    }
                    let below_limit = side.iter().any(|&(p, r)| r < limit(&node, p, dir));
                    if below_limit {
                        let slack = side.len() as u64;
                        prop_assert!(used + slack >= budget,
                            "offline={}: {} left unused of {} while a pod is below its limit",
                            offline, budget - used, budget);
                    }
                }

                // A pod above its guarantee means every higher-priority pod is at its limit.
                for (x, &rx) in pods.iter().zip(&rates) {
                    if !competes(x, mask) || x.policy.offline || rx <= guarantee(&node, x, dir) {
                        continue;
                    }
                    for (y, &ry) in pods.iter().zip(&rates) {
                        if competes(y, mask) && !y.policy.offline && y.policy.priority < x.policy.priority {
                            prop_assert_eq!(ry, limit(&node, y, dir),
                                "{:?} pod above its guarantee while a {:?} pod is below its limit",
                                x.policy.priority, y.policy.priority);
                        }
                    }
                }
            }
        }
    }

    /// (e) Same input, same output; and the order of the pods does not matter.
    #[test]
    fn order_does_not_matter(
        (node, pods, order) in scenario().prop_flat_map(|(node, pods)| {
            let order = Just((0..pods.len()).collect::<Vec<_>>()).prop_shuffle();
            (Just(node), Just(pods), order)
        })
    ) {
        let permuted: Vec<PodDemand> = order.iter().map(|&i| pods[i]).collect();
        for dir in DIRECTIONS {
            let table = rate_table(&node, &pods, dir);
            prop_assert_eq!(&table, &rate_table(&node, &pods, dir));
            let permuted_table = rate_table(&node, &permuted, dir);
            for (k, &i) in order.iter().enumerate() {
                prop_assert_eq!(permuted_table[k], table[i]);
            }
            for mask in 0..16u8 {
                let rates = allocate(&node, &pods, dir, mask);
                let permuted_rates = allocate(&node, &permuted, dir, mask);
                for (k, &i) in order.iter().enumerate() {
                    prop_assert_eq!(permuted_rates[k], rates[i]);
                }
            }
        }
    }

    /// (g) A row ignores its own class bit, and holds what the pod gets once it competes.
    #[test]
    fn table_rows_are_allocations_with_the_pod_competing((node, pods) in scenario()) {
        for dir in DIRECTIONS {
            let table = rate_table(&node, &pods, dir);
            prop_assert_eq!(table.len(), pods.len());
            for (i, row) in table.iter().enumerate() {
                let own = pods[i].policy.class_bit();
                let mut woken = pods.clone();
                woken[i].active = true;
                for mask in 0..MASK_COUNT as u8 {
                    prop_assert_eq!(row[usize::from(mask)], row[usize::from(mask | own)]);
                    let rates = allocate(&node, &woken, dir, mask | own);
                    prop_assert_eq!(row[usize::from(mask)], rates[i]);
                }
            }
        }
    }

    /// (h) A competing higher-priority newcomer never raises a lower class's allocation.
    #[test]
    fn a_higher_priority_newcomer_never_helps_lower_classes(
        (node, pods, newcomer) in scenario().prop_flat_map(|(node, pods)| {
            let newcomer = pod(node.capacity.bits_per_sec());
            (Just(node), Just(pods), newcomer)
        })
    ) {
        let mut newcomer = newcomer;
        newcomer.active = true;
        newcomer.policy.offline = false;
        let mut crowded = pods.clone();
        crowded.push(newcomer);
        for dir in DIRECTIONS {
            for mask in (0..16u8).filter(|m| m & newcomer.policy.class_bit() != 0) {
                let before = bits(&allocate(&node, &pods, dir, mask));
                let after = bits(&allocate(&node, &crowded, dir, mask));
                for (i, pod) in pods.iter().enumerate() {
                    if pod.policy.class() > newcomer.policy.class() {
                        prop_assert!(after[i] <= before[i],
                            "class {} pod went from {} to {} when a class {} pod arrived",
                            pod.policy.class(), before[i], after[i], newcomer.policy.class());
                    }
                }
            }
        }
    }
}
