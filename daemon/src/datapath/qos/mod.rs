//! Writing the QoS policy into the pinned maps the tc shaper and sock_ops pacing read.
//!
//! The allocator runs here, once per policy change, and produces every pod's rate under each
//! combination of active classes; the datapath picks the entry per packet. Entries are
//! written before the lookups that lead to them (pod rows, then interface and address keys),
//! so a packet never finds a slot whose row is missing.
use std::{collections::BTreeMap, net::IpAddr};

use aya::maps::{Array, Map, MapData, PerCpuArray};
use quicklane_common::{
    qos::{
        aggregate, AddrKey, ClassActivity, QosPod, QosStats, ACTIVE_THRESHOLD_PER_MILLE,
        CLASS_OFFLINE, DIR_EGRESS, DIR_INGRESS, MASKS, POD_F_EGRESS, POD_F_INGRESS,
    },
    senders::Senders,
    sock::{AF_INET, AF_INET6},
};
use quicklane_qos::{rate_table, Direction, NodePolicy, PodDemand, PodPolicy};
use serde::{Deserialize, Serialize};

mod activity;
mod state;

pub use activity::Activity;
pub use state::{bpf_config, enforcement, QosState, SourcePod};

use super::{
    rules::{map_err, sync_hash, typed},
    DatapathError,
};
use crate::{config::QosPodConfig, paths::PinDir};

pub const PODS_MAP: &str = "QL_QOS_PODS";
pub const IFINDEX_MAP: &str = "QL_QOS_IFINDEX";
pub const ADDRS_MAP: &str = "QL_QOS_ADDRS";
pub const ACTIVE_MAP: &str = "QL_QOS_ACTIVE";
pub const STATS_MAP: &str = "QL_QOS_STATS";
pub const EDT_MAP: &str = "QL_QOS_EDT";
/// sock_ops' count of the sockets sharing each aggregate's rate.
pub const SENDERS_MAP: &str = "QL_QOS_SENDERS";

/// How packets are held to their departure times.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Enforcement {
    /// fq on the pod interfaces holds each packet until its departure time.
    Fq,
    /// No qdisc honours departure times: CE-mark late packets, drop beyond the horizon.
    Policer,
}

impl std::fmt::Display for Enforcement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Fq => "fq (EDT timestamps honoured by sch_fq)",
            Self::Policer => "policer (ECN-first, no sch_fq)",
        })
    }
}

/// What `apply` wrote, for logs and `quicklane status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct QosSummary {
    pub enforcement: Enforcement,
    pub generation: u64,
    pub capacity_bps: u64,
    pub pods: Vec<QosPodSummary>,
    /// Pods that asked for QoS and were not given it (or not the change they asked for).
    #[serde(default)]
    pub refused: Vec<RefusedPod>,
}

/// A pod whose QoS request was refused, and why.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RefusedPod {
    pub name: String,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct QosPodSummary {
    pub name: String,
    pub slot: u32,
    pub source: PodSource,
    pub interface: String,
    /// "0", "1", "2" (online priorities, high to low) or "offline"; "unshaped" without policy.
    pub class: String,
    /// Rate while only the pod's own class is active, bits per second.
    pub egress_bps: Option<u64>,
    pub ingress_bps: Option<u64>,
}

/// Where a shaped pod was declared.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PodSource {
    /// `[[qos.pods]]` in the agent's config file.
    Config,
    /// A pod on this node, watched through the Kubernetes API.
    Kubernetes,
}

/// A pod as the datapath knows it: its slot in the maps, where it lives, its policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlottedPod {
    pub slot: u32,
    pub source: PodSource,
    pub config: QosPodConfig,
    pub policy: PodPolicy,
}

/// Runs the allocator for `pods` with the ones `activity` says are sending, writes the
/// result, and clears the rows of `freed` slots once nothing can look them up.
#[allow(clippy::too_many_arguments, reason = "one write of the whole policy")]
pub fn apply(
    pins: &PinDir,
    node: &NodePolicy,
    pods: &[SlottedPod],
    freed: &[u32],
    enforcement: Enforcement,
    generation: u64,
    window_ms: u32,
    activity: &Activity,
) -> Result<QosSummary, DatapathError> {
    let shaped: Vec<&SlottedPod> = pods.iter().filter(|p| p.config.managed()).collect();
    let egress = table(node, &shaped, activity, Direction::Egress);
    let ingress = table(node, &shaped, activity, Direction::Ingress);

    let mut rows = BTreeMap::new();
    for pod in pods {
        rows.insert(pod.slot, QosPod::EMPTY);
    }
    for (row, pod) in shaped.iter().enumerate() {
        let mut entry = QosPod {
            class: class_of(&pod.policy),
            flags: POD_F_EGRESS | POD_F_INGRESS,
            ..QosPod::EMPTY
        };
        for mask in 0..MASKS {
            entry.egress[mask] = egress[row][mask].bytes_per_sec();
            entry.ingress[mask] = ingress[row][mask].bytes_per_sec();
        }
        rows.insert(pod.slot, entry);
    }

    let mut pods_map: Array<MapData, QosPod> = typed(pins, PODS_MAP, Map::Array)?;
    for (&slot, row) in &rows {
        pods_map
            .set(slot, *row, 0)
            .map_err(|e| map_err(PODS_MAP, &e))?;
    }

    let mut ifindexes = BTreeMap::new();
    let mut addrs = BTreeMap::new();
    for pod in pods {
        let ifindex =
            nix::net::if_::if_nametoindex(pod.config.interface.as_str()).map_err(|source| {
                DatapathError::NoInterface {
                    key: "qos.pods.interface",
                    ifname: pod.config.interface.clone(),
                    source,
                }
            })?;
        ifindexes.insert(ifindex, pod.slot);
        for addr in &pod.config.addresses {
            addrs.insert(addr_key(*addr), pod.slot);
        }
    }
    write_thresholds(pins, node.capacity.bytes_per_sec(), window_ms)?;
    sync_hash(pins, IFINDEX_MAP, &ifindexes)?;
    sync_hash(pins, ADDRS_MAP, &addrs)?;
    for &slot in freed {
        pods_map
            .set(slot, QosPod::EMPTY, 0)
            .map_err(|e| map_err(PODS_MAP, &e))?;
    }

    let pods = pods
        .iter()
        .map(|pod| {
            let row = &rows[&pod.slot];
            let alone = 1usize << (row.class as usize);
            let unshaped = !pod.config.managed();
            QosPodSummary {
                name: pod.config.name.clone(),
                slot: pod.slot,
                source: pod.source,
                interface: pod.config.interface.clone(),
                class: if unshaped {
                    "unshaped".to_owned()
                } else if row.class == CLASS_OFFLINE {
                    "offline".to_owned()
                } else {
                    row.class.to_string()
                },
                egress_bps: (!unshaped).then(|| row.egress[alone] * 8),
                ingress_bps: (!unshaped).then(|| row.ingress[alone] * 8),
            }
        })
        .collect();
    Ok(QosSummary {
        enforcement,
        generation,
        capacity_bps: node.capacity.bits_per_sec(),
        pods,
        refused: Vec::new(),
    })
}

/// The allocator's rows for the `shaped` pods in one direction.
fn table(
    node: &NodePolicy,
    shaped: &[&SlottedPod],
    activity: &Activity,
    dir: Direction,
) -> Vec<[quicklane_qos::Rate; quicklane_qos::allocator::MASK_COUNT]> {
    // The kernel uses a row with a class's bit set only while that class sends. If
    // userspace saw none of its pods send yet (they all woke within the last tick), all of
    // them count, or the other rows would ignore the class until the next tick.
    let mut class_seen = [false; CLASS_OFFLINE as usize + 1];
    for pod in shaped {
        if activity.is_active(pod.slot, dir) {
            class_seen[class_of(&pod.policy) as usize] = true;
        }
    }
    let demands: Vec<PodDemand> = shaped
        .iter()
        .map(|pod| PodDemand {
            policy: pod.policy,
            active: activity.is_active(pod.slot, dir)
                || !class_seen[class_of(&pod.policy) as usize],
        })
        .collect();
    rate_table(node, &demands, dir)
}

/// Each slot's bytes so far (shaped and bypassed), `[egress, ingress]`, summed over CPUs.
fn read_bytes(
    pins: &PinDir,
    slots: impl Iterator<Item = u32>,
) -> Result<BTreeMap<u32, [u64; 2]>, DatapathError> {
    let stats: PerCpuArray<MapData, QosStats> = typed(pins, STATS_MAP, Map::PerCpuArray)?;
    slots
        .map(|slot| {
            let mut out = [0; 2];
            for (i, dir) in [DIR_EGRESS, DIR_INGRESS].into_iter().enumerate() {
                out[i] = stats
                    .get(&aggregate(slot, dir), 0)
                    .map_err(|e| map_err(STATS_MAP, &e))?
                    .iter()
                    .map(|s| s.bytes + s.bypassed)
                    .sum();
            }
            Ok((slot, out))
        })
        .collect()
}

/// A slot handed to a new pod starts clean: no departure time queued by the pod before it
/// (which would hold the newcomer's first packets), no count of its sockets splitting the
/// newcomer's rate, and counters from zero.
fn reset_slot(pins: &PinDir, slot: u32) -> Result<(), DatapathError> {
    let mut edt: Array<MapData, u64> = typed(pins, EDT_MAP, Map::Array)?;
    let mut senders: Array<MapData, Senders> = typed(pins, SENDERS_MAP, Map::Array)?;
    let mut stats: PerCpuArray<MapData, QosStats> = typed(pins, STATS_MAP, Map::PerCpuArray)?;
    let stats_err = |e: std::io::Error| super::pin_err(std::path::Path::new(STATS_MAP), e);
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| stats_err(e))?;
    for dir in [DIR_EGRESS, DIR_INGRESS] {
        let index = aggregate(slot, dir);
        edt.set(index, 0, 0).map_err(|e| map_err(EDT_MAP, &e))?;
        senders
            .set(index, Senders::default(), 0)
            .map_err(|e| map_err(SENDERS_MAP, &e))?;
        let zero = aya::maps::PerCpuValues::try_from(vec![QosStats::default(); cpus])
            .map_err(stats_err)?;
        stats
            .set(index, zero, 0)
            .map_err(|e| map_err(STATS_MAP, &e))?;
    }
    Ok(())
}

/// What the datapath needs to judge class activity: the threshold (bytes per window above
/// which a class competes), the capacity and the window. They share each entry with the
/// counters the datapath updates per packet, so writing the entry back can lose a packet's
/// update: entries that already hold these values are left alone, which is every entry on
/// every apply but the first after a change of capacity or window.
fn write_thresholds(
    pins: &PinDir,
    capacity_bytes: u64,
    window_ms: u32,
) -> Result<(), DatapathError> {
    let threshold =
        capacity_bytes * u64::from(window_ms) / 1000 * ACTIVE_THRESHOLD_PER_MILLE / 1000;
    let mut map: Array<MapData, ClassActivity> = typed(pins, ACTIVE_MAP, Map::Array)?;
    for index in 0..map.len() {
        let mut entry = map.get(&index, 0).map_err(|e| map_err(ACTIVE_MAP, &e))?;
        let wanted = (
            threshold.max(1),
            capacity_bytes,
            u64::from(window_ms) * 1_000_000,
        );
        if (entry.threshold, entry.capacity, entry.window_ns) == wanted {
            continue;
        }
        (entry.threshold, entry.capacity, entry.window_ns) = wanted;
        map.set(index, entry, 0)
            .map_err(|e| map_err(ACTIVE_MAP, &e))?;
    }
    Ok(())
}

fn class_of(pod: &PodPolicy) -> u32 {
    if pod.offline {
        CLASS_OFFLINE
    } else {
        pod.priority as u32
    }
}

/// The key sock_ops builds from a socket's address (v4-mapped v6 is already IPv4 there).
fn addr_key(addr: IpAddr) -> AddrKey {
    match addr {
        IpAddr::V4(a) => AddrKey {
            family: AF_INET,
            addr: [u32::from_ne_bytes(a.octets()), 0, 0, 0],
        },
        IpAddr::V6(a) => {
            let o = a.octets();
            let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            AddrKey {
                family: AF_INET6,
                addr: [word(0), word(4), word(8), word(12)],
            }
        }
    }
}
