//! `quicklane status`: what is attached and the live counters, read from the pins (so it works
//! from any process, and also while no agent runs but a kept datapath does).
use std::{collections::BTreeMap, fmt::Write as _};

use aya::{
    maps::{Array, Map, MapData, PerCpuArray, PerCpuHashMap},
    programs::{links::FdLink, links::PinnedLink, loaded_programs},
};
use serde::Serialize;

use quicklane_common::{
    bypass::{FlowKey, Traffic},
    qos::{
        activity_slot, aggregate, fell_silent, ClassActivity, Classes, QosStats, CLASSES,
        DIR_EGRESS, DIR_INGRESS,
    },
    senders::Senders,
};

use crate::{
    datapath::{
        adopt::AdoptionSummary,
        legacy, open_pinned_map, pinned_names,
        qos::{QosSummary, SENDERS_MAP},
        rules::RulesSummary,
        Object,
    },
    paths::{PinDir, RunDir},
    state::AgentState,
};

#[derive(Debug, Serialize)]
pub struct Status {
    pub agent: AgentStatus,
    pub pin_dir: String,
    pub attachments: Vec<LinkStatus>,
    /// Per object, counter name to value summed over CPUs.
    pub counters: BTreeMap<String, BTreeMap<String, u64>>,
    /// Bypass rules in force, as the running agent applied them.
    pub rules: Option<RulesSummary>,
    /// What the bypass moved per pod (cgroup), by direction.
    pub bypass_pods: Vec<PodBypass>,
    /// QoS policy in force and what the shaper did per pod and direction.
    pub qos: Option<QosStatus>,
    /// The Kubernetes pod source, as the running agent last saw it.
    pub kubernetes: Option<crate::kubernetes::SourceStatus>,
    /// What this kernel offers the agent, probed now.
    pub features: crate::features::Features,
}

#[derive(Debug, Serialize, Default, Clone, PartialEq, Eq)]
pub struct PodBypass {
    pub cgroup_id: u64,
    /// None when the cgroup no longer exists.
    pub cgroup: Option<String>,
    pub tx_bytes: u64,
    pub tx_msgs: u64,
    pub rx_bytes: u64,
    pub rx_msgs: u64,
}

#[derive(Debug, Serialize)]
pub struct QosStatus {
    pub policy: QosSummary,
    /// Per pod, in policy order: (egress, ingress) counters summed over CPUs.
    pub pods: Vec<QosPodCounters>,
    /// The priority classes as the datapath sees them now, egress then ingress.
    pub classes: Vec<ClassNow>,
    /// Sockets established before their pod was shaped, adopted into pacing.
    pub adoption: Option<AdoptionSummary>,
}

/// One class in one direction: whether it competes for capacity now and what it sends (the
/// figure lower classes are lent capacity against).
#[derive(Debug, Serialize, Clone, Copy, PartialEq, Eq)]
pub struct ClassNow {
    pub direction: &'static str,
    /// 0..=2 online priorities, 3 offline.
    pub class: u32,
    pub competing: bool,
    /// What it sends (0 once it sent nothing for three windows).
    pub used_bps: u64,
}

#[derive(Debug, Serialize)]
pub struct QosPodCounters {
    pub name: String,
    pub egress: QosCounters,
    pub ingress: QosCounters,
}

/// `QosStats` summed over CPUs.
#[derive(Debug, Serialize, Default, Clone, Copy, PartialEq, Eq)]
pub struct QosCounters {
    pub packets: u64,
    pub bytes: u64,
    pub marked: u64,
    pub dropped: u64,
    /// Bytes the bypass moved, charged to the same budget.
    pub bypassed: u64,
    /// TCP sockets the pod's rate is split among now (`QL_QOS_SENDERS`; 0: none contends).
    pub sockets: u64,
    /// Of those, the light ones (less than the even share in their last window), and what
    /// they used (bits/s): the others share what they leave.
    pub light_sockets: u64,
    pub light_bps: u64,
}

impl QosCounters {
    /// "4 sockets (3 light at 60Mbit)": how the pod's rate is shared among its sockets.
    fn sharing(&self) -> String {
        if self.light_sockets == 0 {
            format!("{} sockets", self.sockets)
        } else {
            format!(
                "{} sockets ({} light at {})",
                self.sockets,
                self.light_sockets,
                quicklane_qos::Rate::from_bits_per_sec(self.light_bps)
            )
        }
    }
}

#[derive(Debug, Serialize)]
pub struct AgentStatus {
    pub running: bool,
    pub pid: Option<u32>,
    pub config: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct LinkStatus {
    pub pin: String,
    pub program: String,
    pub program_id: u32,
    /// None for a legacy attachment (prog_attach, netlink filter), which has no link.
    pub link_id: Option<u32>,
    pub legacy: bool,
    pub target: Option<String>,
    pub adopted: Option<bool>,
}

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("pinned link {pin}: {message}")]
    Link { pin: String, message: String },
    #[error("counters {map}: {message}")]
    Counters { map: String, message: String },
}

pub fn collect(pins: &PinDir, run: &RunDir) -> Result<Status, StatusError> {
    let state = AgentState::read(&run.state()).filter(AgentState::is_live);
    let programs: BTreeMap<u32, String> = loaded_programs()
        .flatten()
        .map(|p| (p.id(), p.name_as_str().unwrap_or("?").to_owned()))
        .collect();
    let mut attachments = Vec::new();
    for file in pinned_names(&pins.links()) {
        let err = |message: String| StatusError::Link {
            pin: file.clone(),
            message,
        };
        let legacy_base = legacy::base_name(&file);
        let read = if let Some(base) = legacy_base {
            legacy::Legacy::program_info(&pins.link(&file))
                .map(|info| (base.to_owned(), info.id(), None))
                .map_err(|e| e.to_string())
        } else {
            PinnedLink::from_pin(pins.link(&file))
                .map_err(|e| e.to_string())
                .and_then(|link| FdLink::from(link).info().map_err(|e| e.to_string()))
                .map(|info| (file.clone(), info.program_id(), Some(info.id())))
        };
        let (pin, program_id, link_id) = match read {
            Ok(found) => found,
            // The agent detached it (a pod went away) between the listing and the read.
            Err(_) if !pins.link(&file).exists() => continue,
            Err(e) => return Err(err(e)),
        };
        let known = state
            .as_ref()
            .and_then(|s| s.attachments.iter().find(|a| a.pin == pin));
        attachments.push(LinkStatus {
            program: programs
                .get(&program_id)
                .cloned()
                .unwrap_or_else(|| "?".to_owned()),
            program_id,
            link_id,
            legacy: legacy_base.is_some(),
            target: known.map(|a| a.target.clone()),
            adopted: known.map(|a| a.adopted),
            pin,
        });
    }
    let mut counters = BTreeMap::new();
    for object in Object::ALL {
        let (map_name, names) = object.stats();
        if !pins.map(map_name).exists() {
            continue;
        }
        counters.insert(
            object.name().to_owned(),
            read_counters(pins, map_name, names)?,
        );
    }
    let bypass_pods = if pins.map("QL_FLOW_TRAFFIC").exists() {
        pod_bypass(pins)?
    } else {
        Vec::new()
    };
    let qos = match state.as_ref().and_then(|s| s.qos.clone()) {
        Some(policy) => Some(qos_status(
            pins,
            policy,
            state.as_ref().and_then(|s| s.adoption.clone()),
        )?),
        None => None,
    };
    Ok(Status {
        qos,
        kubernetes: state.as_ref().and_then(|s| s.kubernetes.clone()),
        rules: state.as_ref().and_then(|s| s.rules.clone()),
        bypass_pods,
        agent: AgentStatus {
            running: state.is_some(),
            pid: state.as_ref().map(|s| s.pid),
            config: state.as_ref().map(|s| s.config.display().to_string()),
        },
        pin_dir: pins.root().display().to_string(),
        attachments,
        counters,
        features: crate::features::Features::probe(),
    })
}

fn qos_status(
    pins: &PinDir,
    policy: QosSummary,
    adoption: Option<AdoptionSummary>,
) -> Result<QosStatus, StatusError> {
    let map_name = crate::datapath::qos::STATS_MAP;
    let err = |e: &dyn std::fmt::Display| counters_error(map_name, e);
    let stats: PerCpuArray<MapData, QosStats> = open_typed(pins, map_name, Map::PerCpuArray)?;
    let senders: Array<MapData, Senders> = open_typed(pins, SENDERS_MAP, Map::Array)?;
    let now = datapath_now().map_err(|e| err(&e))?;
    let sum = |slot: u32, dir: u32| -> Result<QosCounters, StatusError> {
        let index = aggregate(slot, dir);
        let per_cpu = stats.get(&index, 0).map_err(|e| err(&e))?;
        let (sockets, light) = senders
            .get(&index, 0)
            .map_err(|e| counters_error(SENDERS_MAP, &e))?
            .sharing(now);
        let summed = per_cpu
            .iter()
            .fold(QosCounters::default(), |a, s| QosCounters {
                packets: a.packets + s.packets,
                bytes: a.bytes + s.bytes,
                marked: a.marked + s.marked,
                dropped: a.dropped + s.dropped,
                bypassed: a.bypassed + s.bypassed,
                ..QosCounters::default()
            });
        Ok(QosCounters {
            sockets,
            light_sockets: light.count,
            light_bps: light.rate * 8,
            ..summed
        })
    };
    let pods = policy
        .pods
        .iter()
        .map(|p| {
            Ok(QosPodCounters {
                name: p.name.clone(),
                egress: sum(p.slot, DIR_EGRESS)?,
                ingress: sum(p.slot, DIR_INGRESS)?,
            })
        })
        .collect::<Result<_, StatusError>>()?;
    let classes = class_status(pins)?;
    Ok(QosStatus {
        policy,
        pods,
        classes,
        adoption,
    })
}

/// The datapath's clock (bpf_ktime_get_ns), in ns.
fn datapath_now() -> nix::Result<u64> {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)?;
    Ok(u64::try_from(std::time::Duration::from(now).as_nanos()).unwrap_or(u64::MAX))
}

fn class_status(pins: &PinDir) -> Result<Vec<ClassNow>, StatusError> {
    let map_name = crate::datapath::qos::ACTIVE_MAP;
    let err = |e: &dyn std::fmt::Display| counters_error(map_name, e);
    let active: Array<MapData, ClassActivity> = open_typed(pins, map_name, Map::Array)?;
    let now = datapath_now().map_err(|e| err(&e))?;
    let rows: Vec<Option<ClassActivity>> = (0..2 * CLASSES as u32)
        .map(|i| active.get(&i, 0).ok())
        .collect();
    let mut out = Vec::new();
    for (dir, direction) in [(DIR_EGRESS, "egress"), (DIR_INGRESS, "ingress")] {
        let classes = Classes::read(dir, |i| rows.get(i as usize).and_then(Option::as_ref));
        for class in 0..CLASSES {
            // The datapath updates a class's average only when it sends: after three silent
            // windows it would start again from nothing, so that is what is shown.
            let slot = activity_slot(dir, class as u32) as usize;
            let sent_lately = rows
                .get(slot)
                .copied()
                .flatten()
                .is_some_and(|a| !fell_silent(now.saturating_sub(a.window_start), a.window_ns));
            out.push(ClassNow {
                direction,
                class: class as u32,
                competing: classes.until[class] > now,
                used_bps: if sent_lately {
                    classes.used_rate(1 << class) * 8
                } else {
                    0
                },
            });
        }
    }
    Ok(out)
}

/// Folds the per-(sender, receiver) flow counters into per-pod tx and rx.
fn pod_bypass(pins: &PinDir) -> Result<Vec<PodBypass>, StatusError> {
    let map_name = "QL_FLOW_TRAFFIC";
    let err = |e: &dyn std::fmt::Display| counters_error(map_name, e);
    let flows: PerCpuHashMap<MapData, FlowKey, Traffic> =
        open_typed(pins, map_name, Map::PerCpuHashMap)?;
    let mut pods: BTreeMap<u64, PodBypass> = BTreeMap::new();
    for entry in &flows {
        let (flow, per_cpu) = entry.map_err(|e| err(&e))?;
        let bytes: u64 = per_cpu.iter().map(|t| t.bytes).sum();
        let msgs: u64 = per_cpu.iter().map(|t| t.msgs).sum();
        let tx = pods.entry(flow.src_cgroup).or_default();
        tx.tx_bytes += bytes;
        tx.tx_msgs += msgs;
        let rx = pods.entry(flow.dst_cgroup).or_default();
        rx.rx_bytes += bytes;
        rx.rx_msgs += msgs;
    }
    let paths = crate::cgroup::paths_of(&pods.keys().copied().collect());
    Ok(pods
        .into_iter()
        .map(|(id, mut p)| {
            p.cgroup_id = id;
            p.cgroup = paths.get(&id).map(|p| p.display().to_string());
            p
        })
        .collect())
}

fn counters_error(map: &str, e: &dyn std::fmt::Display) -> StatusError {
    StatusError::Counters {
        map: map.to_owned(),
        message: e.to_string(),
    }
}

/// Opens the pinned map `name` as the typed map `T`; `variant` is its `Map` kind.
fn open_typed<T>(pins: &PinDir, name: &str, variant: fn(MapData) -> Map) -> Result<T, StatusError>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    let data = open_pinned_map(pins, name).map_err(|e| counters_error(name, &e))?;
    T::try_from(variant(data)).map_err(|e| counters_error(name, &e))
}

/// Sums each slot of a pinned per-CPU counter array over all CPUs.
pub fn read_counters(
    pins: &PinDir,
    map: &str,
    names: &[&str],
) -> Result<BTreeMap<String, u64>, StatusError> {
    let err = |e: &dyn std::fmt::Display| counters_error(map, e);
    let array: PerCpuArray<MapData, u64> = open_typed(pins, map, Map::PerCpuArray)?;
    let mut out = BTreeMap::new();
    for (slot, name) in names.iter().enumerate() {
        let values = array.get(&(slot as u32), 0).map_err(|e| err(&e))?;
        out.insert((*name).to_owned(), values.iter().sum());
    }
    Ok(out)
}

impl Status {
    pub fn render_text(&self) -> String {
        let mut s = String::new();
        match (self.agent.running, self.agent.pid) {
            (true, Some(pid)) => {
                let _ = writeln!(
                    s,
                    "agent: running (pid {pid}), config {}",
                    self.agent.config.as_deref().unwrap_or("?")
                );
            }
            _ if self.attachments.is_empty() => {
                let _ = writeln!(s, "agent: not running; nothing attached");
            }
            _ => {
                let _ = writeln!(
                    s,
                    "agent: not running; datapath left attached (kept for a restart)"
                );
            }
        }
        let _ = writeln!(s, "pins: {}", self.pin_dir);
        let _ = writeln!(s, "attached ({}):", self.attachments.len());
        for a in &self.attachments {
            let _ = writeln!(
                s,
                "  {:<28} {:<14} link {:<6} prog {:<5} {}{}",
                a.pin,
                a.program,
                a.link_id
                    .map_or_else(|| "legacy".to_owned(), |id| id.to_string()),
                a.program_id,
                a.target.as_deref().unwrap_or(""),
                if a.adopted == Some(true) {
                    "  (adopted)"
                } else {
                    ""
                }
            );
        }
        for object in Object::ALL {
            let Some(counters) = self.counters.get(object.name()) else {
                continue;
            };
            let _ = writeln!(s, "counters {}:", object.name());
            // Slot order groups related counters (calls, then outcomes) as the BPF side counts them.
            for name in object.stats().1 {
                let value = counters.get(*name).copied().unwrap_or_default();
                let _ = writeln!(s, "  {name:<24} {value}");
            }
        }
        if let Some(r) = &self.rules {
            let _ = writeln!(
                s,
                "bypass rules: generation {}, {} cgroups, {} cidrs, {} ports",
                r.generation, r.cgroups, r.cidrs, r.ports
            );
        }
        if !self.bypass_pods.is_empty() {
            let _ = writeln!(s, "bypassed per pod:");
            for p in &self.bypass_pods {
                let _ = writeln!(
                    s,
                    "  {:<48} tx {} B / {} msgs  rx {} B / {} msgs",
                    p.cgroup.as_deref().unwrap_or("(gone)"),
                    p.tx_bytes,
                    p.tx_msgs,
                    p.rx_bytes,
                    p.rx_msgs
                );
            }
        }
        if let Some(k) = &self.kubernetes {
            let _ = writeln!(
                s,
                "kubernetes: node {}, {}, {} pods with QoS annotations{}",
                k.node,
                if k.synced {
                    "listed"
                } else {
                    "waiting for the first list"
                },
                k.pods,
                k.error
                    .as_ref()
                    .map(|e| format!(", last error: {e}"))
                    .unwrap_or_default()
            );
        }
        if let Some(q) = &self.qos {
            q.render_text(&mut s);
        }
        s.push_str(&self.features.render_summary());
        s
    }
}

impl QosStatus {
    fn render_text(&self, s: &mut String) {
        let _ = writeln!(
            s,
            "qos: {}, capacity {}, policy generation {}",
            self.policy.enforcement,
            quicklane_qos::Rate::from_bits_per_sec(self.policy.capacity_bps),
            self.policy.generation
        );
        let rate = |r: Option<u64>| {
            r.map_or_else(
                || "-".to_owned(),
                |b| quicklane_qos::Rate::from_bits_per_sec(b).to_string(),
            )
        };
        for (p, c) in self.policy.pods.iter().zip(&self.pods) {
            let _ = writeln!(
                s,
                "  {:<16} {:<10} {:<10} class {:<8} egress {:>14} ({} B shaped, {} B bypassed, {} marked, {} dropped, {})  ingress {:>14} ({} B shaped, {} B bypassed, {} marked, {} dropped, {})",
                p.name,
                format!("{:?}", p.source).to_lowercase(),
                p.interface,
                p.class,
                rate(p.egress_bps),
                c.egress.bytes,
                c.egress.bypassed,
                c.egress.marked,
                c.egress.dropped,
                c.egress.sharing(),
                rate(p.ingress_bps),
                c.ingress.bytes,
                c.ingress.bypassed,
                c.ingress.marked,
                c.ingress.dropped,
                c.ingress.sharing(),
            );
        }
        for r in &self.policy.refused {
            let _ = writeln!(s, "  refused {}: {}", r.name, r.reason);
        }
        for direction in ["egress", "ingress"] {
            let classes: Vec<String> = self
                .classes
                .iter()
                .filter(|c| c.direction == direction)
                .map(|c| {
                    format!(
                        "{} {} {}",
                        c.class,
                        if c.competing { "competing" } else { "idle" },
                        quicklane_qos::Rate::from_bits_per_sec(c.used_bps)
                    )
                })
                .collect();
            let _ = writeln!(s, "  classes {direction}: {}", classes.join(", "));
        }
        if let Some(a) = &self.adoption {
            let _ = writeln!(
                s,
                "  existing sockets adopted into pacing: {} ({} paced already, {} refused{}) in {} passes, the last over {} network namespaces{}",
                a.adopted,
                a.already,
                a.refused,
                a.refusal.as_ref().map(|r| format!(": {r}")).unwrap_or_default(),
                a.passes,
                a.namespaces,
                a.error.as_ref().map(|e| format!("; last pass failed: {e}")).unwrap_or_default(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::QosCounters;

    #[test]
    fn sharing_names_the_light_sockets_when_there_are_any() {
        let mut c = QosCounters {
            sockets: 4,
            ..QosCounters::default()
        };
        assert_eq!(c.sharing(), "4 sockets");
        c.light_sockets = 3;
        c.light_bps = 60_000_000;
        let text = c.sharing();
        assert!(text.starts_with("4 sockets (3 light at 60"), "{text}");
    }
}
