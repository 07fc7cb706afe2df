//! Writing the QoS policy into the pinned maps the tc shaper and sock_ops pacing read.
//!
//! The allocator runs here, once per policy change, and produces every pod's rate under each
//! combination of active classes; the datapath picks the entry per packet. Entries are
//! written before the lookups that lead to them (pod rows, then interface and address keys),
//! so a packet never finds a slot whose row is missing.
use std::{collections::BTreeMap, net::IpAddr};

use aya::maps::{Array, Map, MapData};
use quicklane_common::{
    qos::{
        AddrKey, ClassActivity, QosConfig as BpfQosConfig, QosPod, ACTIVE_THRESHOLD_PER_MILLE,
        CLASS_OFFLINE, MASKS, MAX_PODS, POD_F_EGRESS, POD_F_INGRESS, QOS_F_ENABLED, QOS_F_FQ,
    },
    sock::{AF_INET, AF_INET6},
};
use quicklane_qos::{rate_table, Direction, PodDemand, PodPolicy};
use serde::{Deserialize, Serialize};

use super::{
    rules::{map_err, sync_hash, typed},
    DatapathError,
};
use crate::{
    config::{Config, QosConfig, QosMode, QosPolicy},
    features::Support,
    paths::PinDir,
};

pub const PODS_MAP: &str = "QL_QOS_PODS";
pub const IFINDEX_MAP: &str = "QL_QOS_IFINDEX";
pub const ADDRS_MAP: &str = "QL_QOS_ADDRS";
pub const ACTIVE_MAP: &str = "QL_QOS_ACTIVE";

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
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct QosPodSummary {
    pub name: String,
    pub slot: u32,
    pub interface: String,
    /// "0", "1", "2" (online priorities, high to low) or "offline"; "unshaped" without policy.
    pub class: String,
    /// Rate while only the pod's own class is active, bits per second.
    pub egress_bps: Option<u64>,
    pub ingress_bps: Option<u64>,
}

pub fn apply(
    pins: &PinDir,
    policy: &QosPolicy,
    enforcement: Enforcement,
    generation: u64,
    window_ms: u32,
) -> Result<QosSummary, DatapathError> {
    let shaped: Vec<usize> = (0..policy.pods.len())
        .filter(|&i| !policy.pods[i].1.is_unlimited())
        .collect();
    let demands: Vec<PodDemand> = shaped
        .iter()
        .map(|&i| PodDemand {
            policy: policy.pods[i].1,
            active: true,
        })
        .collect();
    let egress = rate_table(&policy.node, &demands, Direction::Egress);
    let ingress = rate_table(&policy.node, &demands, Direction::Ingress);

    let mut rows = vec![QosPod::EMPTY; policy.pods.len()];
    for (row, &i) in shaped.iter().enumerate() {
        let pod = &policy.pods[i].1;
        let mut entry = QosPod {
            class: class_of(pod),
            flags: POD_F_EGRESS | POD_F_INGRESS,
            generation,
            ..QosPod::EMPTY
        };
        for mask in 0..MASKS {
            entry.egress[mask] = egress[row][mask].bytes_per_sec();
            entry.ingress[mask] = ingress[row][mask].bytes_per_sec();
        }
        rows[i] = entry;
    }

    let mut pods_map: Array<MapData, QosPod> = typed(pins, PODS_MAP, Map::Array)?;
    let previous_len = pods_map.len();
    for (slot, row) in rows.iter().enumerate() {
        pods_map
            .set(slot as u32, *row, 0)
            .map_err(|e| map_err(PODS_MAP, &e))?;
    }

    let mut ifindexes = BTreeMap::new();
    let mut addrs = BTreeMap::new();
    for (slot, (pod, _)) in policy.pods.iter().enumerate() {
        let ifindex = nix::net::if_::if_nametoindex(pod.interface.as_str()).map_err(|source| {
            DatapathError::NoInterface {
                key: "qos.pods.interface",
                ifname: pod.interface.clone(),
                source,
            }
        })?;
        ifindexes.insert(ifindex, slot as u32);
        for addr in &pod.addresses {
            addrs.insert(addr_key(*addr), slot as u32);
        }
    }
    write_thresholds(pins, policy.node.capacity.bytes_per_sec(), window_ms)?;
    sync_hash(pins, IFINDEX_MAP, &ifindexes)?;
    sync_hash(pins, ADDRS_MAP, &addrs)?;
    // Rows of slots no pod uses any more: cleared after nothing can look them up.
    for slot in policy.pods.len() as u32..previous_len.min(MAX_PODS) {
        let stale = pods_map.get(&slot, 0).map_err(|e| map_err(PODS_MAP, &e))?;
        if stale != QosPod::EMPTY {
            pods_map
                .set(slot, QosPod::EMPTY, 0)
                .map_err(|e| map_err(PODS_MAP, &e))?;
        }
    }

    let pods = policy
        .pods
        .iter()
        .enumerate()
        .map(|(slot, (pod, p))| {
            let row = &rows[slot];
            let alone = 1usize << (row.class as usize);
            let unshaped = p.is_unlimited();
            QosPodSummary {
                name: pod.name.clone(),
                slot: slot as u32,
                interface: pod.interface.clone(),
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
        capacity_bps: policy.node.capacity.bits_per_sec(),
        pods,
    })
}

/// Bytes per activity window above which a class competes for capacity.
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
        entry.threshold = threshold.max(1);
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

/// Picks fq or the policer for `mode`; asking for fq on a kernel without it is an error.
pub fn enforcement(mode: QosMode) -> Result<Enforcement, DatapathError> {
    if mode == QosMode::Policer {
        return Ok(Enforcement::Policer);
    }
    let fq = crate::features::netlink::probe_in_throwaway_netns().fq;
    match (mode, fq) {
        (_, Support::Available) => Ok(Enforcement::Fq),
        (QosMode::Auto, _) => Ok(Enforcement::Policer),
        (_, other) => Err(DatapathError::Qos(format!(
            "qos.mode = \"fq\" but sch_fq is not usable here ({other:?}); use \"auto\" or \"policer\""
        ))),
    }
}

/// The tc object's load-time settings.
pub fn bpf_config(qos: &QosConfig, enforcement: Option<Enforcement>) -> BpfQosConfig {
    let ms = 1_000_000;
    BpfQosConfig {
        abi_version: quicklane_common::ABI_VERSION,
        flags: match enforcement {
            None => 0,
            Some(Enforcement::Policer) => QOS_F_ENABLED,
            Some(Enforcement::Fq) => QOS_F_ENABLED | QOS_F_FQ,
        },
        horizon_ns: u64::from(qos.horizon_ms) * ms,
        ce_threshold_ns: u64::from(qos.ce_threshold_us) * 1000,
        active_window_ns: u64::from(qos.active_window_ms) * ms,
    }
}

/// QoS while the agent runs: the qdiscs it installed and the last policy it wrote.
#[derive(Debug)]
pub struct QosState {
    summary: QosSummary,
    /// Interfaces carrying our fq, removed at shutdown.
    fq: Vec<(String, u32)>,
}

impl QosState {
    pub fn start(
        pins: &PinDir,
        config: &Config,
        enforcement: Enforcement,
    ) -> Result<Self, DatapathError> {
        let policy = config
            .qos
            .policy()
            .map_err(|e| DatapathError::Qos(format!("`{}` = {}: {}", e.key, e.value, e.allowed)))?;
        let mut this = Self {
            summary: QosSummary {
                enforcement,
                generation: 0,
                capacity_bps: 0,
                pods: Vec::new(),
            },
            fq: Vec::new(),
        };
        if enforcement == Enforcement::Fq {
            for (pod, _) in &policy.pods {
                let installed = nix::net::if_::if_nametoindex(pod.interface.as_str())
                    .map_err(|source| DatapathError::NoInterface {
                        key: "qos.pods.interface",
                        ifname: pod.interface.clone(),
                        source,
                    })
                    .and_then(|ifindex| {
                        super::fq::install(&pod.interface, ifindex).map(|i| (ifindex, i))
                    });
                match installed {
                    Ok((ifindex, how)) => {
                        tracing::info!(interface = %pod.interface, ?how, "fq installed");
                        this.fq.push((pod.interface.clone(), ifindex));
                    }
                    Err(e) => {
                        let _ = this.shutdown();
                        return Err(e);
                    }
                }
            }
        }
        match apply(pins, &policy, enforcement, 1, config.qos.active_window_ms) {
            Ok(summary) => {
                log(&summary);
                this.summary = summary;
                Ok(this)
            }
            Err(e) => {
                let _ = this.shutdown();
                Err(e)
            }
        }
    }

    pub fn reload(&mut self, pins: &PinDir, config: &Config) -> Result<(), DatapathError> {
        let policy = config
            .qos
            .policy()
            .map_err(|e| DatapathError::Qos(format!("`{}` = {}: {}", e.key, e.value, e.allowed)))?;
        let summary = apply(
            pins,
            &policy,
            self.summary.enforcement,
            self.summary.generation + 1,
            config.qos.active_window_ms,
        )?;
        log(&summary);
        self.summary = summary;
        Ok(())
    }

    pub fn summary(&self) -> &QosSummary {
        &self.summary
    }

    /// Removes the qdiscs we installed; the rate maps go with the pins.
    pub fn shutdown(self) -> Result<(), DatapathError> {
        let mut first = Ok(());
        for (ifname, ifindex) in &self.fq {
            if let Err(e) = super::fq::remove(ifname, *ifindex) {
                tracing::warn!("removing fq: {e}");
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }
}

fn log(summary: &QosSummary) {
    tracing::info!(
        enforcement = %summary.enforcement,
        generation = summary.generation,
        pods = summary.pods.len(),
        "qos policy applied"
    );
}
