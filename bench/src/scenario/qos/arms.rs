//! How each arm is configured for the same rates: the agent's `[qos]` config, and the htb and
//! tbf qdiscs an operator would set up with tc instead. Pure: the scenario applies them.
//!
//! Where the baselines sit: on the receiving pod's host veth, egress (towards the pod). Pod
//! egress cannot be shaped with a qdisc at the sender's host veth (its packets arrive there,
//! they do not leave), and the Kubernetes bandwidth plugin's ifb redirect would shape the same
//! packets at the same point (after they crossed out of the pod's namespace) at the cost of
//! an extra device. In the priority scenarios every flow goes to the sink, so the sink's host
//! veth is the shared bottleneck and one htb tree with one lock serves all of them. quicklane
//! instead shapes each pod at its own host veth against a virtual capacity: no shared qdisc.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use simnode::{Node, Pod};

use crate::qdisc::{Htb, HtbClass, Shaper, SourceFilter, Tbf};

/// Queueing horizon of the baselines, tc's `latency 50ms` for tbf and the htb leaves (bytes
/// of queue at the rate beyond the burst): the agent's default `horizon_ms`, beyond which it
/// drops. The agent itself runs with its defaults, as an operator would.
pub const HORIZON_MS: u64 = 50;
/// Bucket depth in time at the rate: room for a 10 ms scheduling hiccup of the sender (a
/// smaller bucket under-delivers on a busy 2-CPU machine) without a visible overshoot over
/// seconds (10 ms / 2 s = 0.5 %).
pub const BURST_MS: u64 = 10;
/// Never less than two full-size Ethernet frames, so one frame always fits.
pub const MIN_BURST_BYTES: u64 = 2 * 1514;
/// htb classes of the priority tree: hi, lo, and their parent.
pub const HTB_PARENT: u16 = 1;
pub const HTB_HI: u16 = 0x10;
pub const HTB_LO: u16 = 0x20;
/// htb's lowest priority: lo is served only when hi has nothing within its rate.
pub const HTB_LO_PRIO: u32 = 7;

/// The bucket for `rate_bps`, in bytes.
pub fn burst_bytes(rate_bps: u64) -> u32 {
    let bytes = (rate_bps / 8 * BURST_MS / 1000).max(MIN_BURST_BYTES);
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

/// Queue limit for `rate_bps` with `burst` bytes of bucket, as tc derives it from `latency`.
pub fn limit_bytes(rate_bps: u64, burst: u32) -> u32 {
    let bytes = rate_bps / 8 * HORIZON_MS / 1000 + u64::from(burst);
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

/// tbf for one pod limited to `limit_bps`.
pub fn tbf(limit_bps: u64) -> Shaper {
    let burst = burst_bytes(limit_bps);
    Shaper::Tbf(Tbf {
        rate_bps: limit_bps,
        burst_bytes: burst,
        limit_bytes: limit_bytes(limit_bps, burst),
    })
}

/// htb with one class, rate = ceil = `limit_bps`, that takes all traffic.
pub fn htb_limit(limit_bps: u64) -> Shaper {
    let burst = burst_bytes(limit_bps);
    Shaper::Htb(Htb {
        default_class: 1,
        classes: vec![HtbClass {
            minor: 1,
            parent: None,
            rate_bps: limit_bps,
            ceil_bps: limit_bps,
            burst_bytes: burst,
            cburst_bytes: burst,
            prio: 0,
            leaf_limit_bytes: Some(limit_bytes(limit_bps, burst)),
        }],
        filters: Vec::new(),
    })
}

/// The priority tree: a parent at `capacity`, hi (prio 0, rate capacity - guarantee) and lo
/// (prio 7, rate guarantee), both may borrow up to the capacity; classified by source.
pub fn htb_priority(capacity_bps: u64, guarantee_bps: u64, hi: Ipv4Addr, lo: Ipv4Addr) -> Shaper {
    let cburst = burst_bytes(capacity_bps);
    // Either leaf may drain at the capacity: its queue is the horizon at that rate.
    let leaf = limit_bytes(capacity_bps, cburst);
    let class = |minor, rate_bps, prio| HtbClass {
        minor,
        parent: Some(HTB_PARENT),
        rate_bps,
        ceil_bps: capacity_bps,
        burst_bytes: burst_bytes(rate_bps),
        cburst_bytes: cburst,
        prio,
        leaf_limit_bytes: Some(leaf),
    };
    Shaper::Htb(Htb {
        // Unclassified traffic (ARP) goes through unshaped.
        default_class: 0,
        classes: vec![
            HtbClass {
                minor: HTB_PARENT,
                parent: None,
                rate_bps: capacity_bps,
                ceil_bps: capacity_bps,
                burst_bytes: cburst,
                cburst_bytes: cburst,
                prio: 0,
                leaf_limit_bytes: None,
            },
            class(HTB_HI, capacity_bps - guarantee_bps, 0),
            class(HTB_LO, guarantee_bps, HTB_LO_PRIO),
        ],
        filters: vec![
            SourceFilter {
                src: hi,
                class: HTB_HI,
            },
            SourceFilter {
                src: lo,
                class: HTB_LO,
            },
        ],
    })
}

/// `200M`, `1G`, `1500k`: a bandwidth as a Kubernetes quantity.
pub fn quantity(bps: u64) -> String {
    match bps {
        b if b >= 1_000_000_000 && b % 1_000_000_000 == 0 => format!("{}G", b / 1_000_000_000),
        b if b >= 1_000_000 && b % 1_000_000 == 0 => format!("{}M", b / 1_000_000),
        b if b >= 1000 && b % 1000 == 0 => format!("{}k", b / 1000),
        b => b.to_string(),
    }
}

/// The agent's config for `node`: QoS on at `capacity_bps` with the pods' annotations
/// (`(pod, [(key, value)])`), the bypass off (so only QoS differs from the baselines) unless
/// `bypass`.
pub fn agent_config(
    node: &Node,
    capacity_bps: u64,
    pods: &[(&Pod, Vec<(&str, String)>)],
    bypass: bool,
) -> String {
    let mut text = format!(
        "[agent]\npin_dir = {:?}\nrun_dir = {:?}\n\n[bypass]\nenabled = {bypass}\ncgroup = {:?}\n\n\
         [tc]\nenabled = false\n\n[xdp]\nenabled = false\n\n\
         # mode auto: fq where the kernel has sch_fq, the ECN-first policer otherwise.\n\
         [qos]\nenabled = true\nmode = \"auto\"\ncapacity = {:?}\n",
        node.pin_dir().display().to_string(),
        node.run_dir().display().to_string(),
        node.cgroup_dir().display().to_string(),
        quantity(capacity_bps),
    );
    for (pod, annotations) in pods {
        let ann: Vec<String> = annotations
            .iter()
            .map(|(k, v)| format!("{k:?} = {v:?}"))
            .collect();
        let _ = write!(
            text,
            "\n[[qos.pods]]\nname = {:?}\ninterface = {:?}\naddresses = [\"{}\", \"{}\"]\n\
             annotations = {{ {} }}\n",
            pod.name(),
            pod.host_ifname(),
            pod.ipv4(),
            pod.ipv6(),
            ann.join(", ")
        );
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_are_ten_ms_or_two_frames() {
        assert_eq!(burst_bytes(200_000_000), 2_500_000 / 10);
        assert_eq!(burst_bytes(1_000_000_000), 1_250_000);
        assert_eq!(u64::from(burst_bytes(1_000_000)), MIN_BURST_BYTES);
    }

    #[test]
    fn limits_are_fifty_ms_beyond_the_burst() {
        // 200 Mbit/s: 25 MB/s x 50 ms = 1.25 MB, plus the 250 kB bucket.
        assert_eq!(limit_bytes(200_000_000, 250_000), 1_500_000);
    }

    #[test]
    fn the_priority_tree_gives_hi_all_but_the_guarantee() {
        let Shaper::Htb(h) = htb_priority(
            500_000_000,
            50_000_000,
            Ipv4Addr::new(10, 77, 0, 2),
            Ipv4Addr::new(10, 77, 1, 2),
        ) else {
            panic!("not htb");
        };
        let class = |m| h.classes.iter().find(|c| c.minor == m).unwrap();
        assert_eq!(class(HTB_HI).rate_bps, 450_000_000);
        assert_eq!(class(HTB_LO).rate_bps, 50_000_000);
        assert_eq!((class(HTB_HI).prio, class(HTB_LO).prio), (0, 7));
        assert!(h.classes.iter().all(|c| c.ceil_bps == 500_000_000));
        assert_eq!(h.filters.len(), 2);
        assert_eq!(h.default_class, 0);
    }

    #[test]
    fn single_limit_shapers() {
        let Shaper::Tbf(t) = tbf(200_000_000) else {
            panic!("not tbf");
        };
        assert_eq!((t.burst_bytes, t.limit_bytes), (250_000, 1_500_000));
        let Shaper::Htb(h) = htb_limit(200_000_000) else {
            panic!("not htb");
        };
        assert_eq!(h.default_class, 1);
        assert_eq!(h.classes[0].leaf_limit_bytes, Some(1_500_000));
    }

    #[test]
    fn quantities_read_like_kubernetes_writes_them() {
        assert_eq!(quantity(200_000_000), "200M");
        assert_eq!(quantity(1_000_000_000), "1G");
        assert_eq!(quantity(1_500_000), "1500k");
        assert_eq!(quantity(999), "999");
    }
}
