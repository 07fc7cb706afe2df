//! QoS while the agent runs: picking fq or the policer, installing and removing fq, giving
//! pods their slots as they come and go, and re-running the allocator when the policy
//! changes (SIGHUP, the pod source) or pods start or stop sending.
use std::{
    collections::{BTreeMap, BTreeSet},
    time::Instant,
};

use quicklane_common::qos::{
    QosConfig as BpfQosConfig, ACTIVE_THRESHOLD_PER_MILLE, MAX_PODS, QOS_F_ENABLED, QOS_F_FQ,
};
use quicklane_qos::{NodePolicy, PodPolicy};

use super::{
    activity::Tracker, apply, read_bytes, reset_slot, Activity, Enforcement, PodSource, QosSummary,
    RefusedPod, SlottedPod,
};
use crate::datapath::fq;
use crate::{
    config::{Config, QosConfig, QosMode, QosPodConfig},
    datapath::DatapathError,
    features::Support,
    paths::PinDir,
};

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
        credit_ns: u64::from(qos.credit_us) * 1000,
    }
}

/// A pod the source (the Kubernetes API) asks to shape, already validated.
pub type SourcePod = (QosPodConfig, PodPolicy);

/// QoS while the agent runs: the qdiscs it installed, the pods in their slots and the last
/// policy it wrote.
#[derive(Debug)]
pub struct QosState {
    summary: QosSummary,
    node: NodePolicy,
    window_ms: u32,
    config_pods: Vec<SourcePod>,
    /// Refused by the source before they got here (bad annotations and the like).
    source_refused: Vec<RefusedPod>,
    pods: Vec<SlottedPod>,
    /// The interface each slot's pod had: a pod recreated under the same name (a new veth)
    /// starts clean.
    slot_ifindex: BTreeMap<u32, u32>,
    tracker: Tracker,
    activity: Activity,
    /// Interfaces carrying our fq, removed when their pod goes and at shutdown.
    fq: BTreeMap<String, u32>,
}

impl QosState {
    pub fn start(
        pins: &PinDir,
        config: &Config,
        enforcement: Enforcement,
        source: (Vec<SourcePod>, Vec<RefusedPod>),
    ) -> Result<Self, DatapathError> {
        let policy = policy_of(config)?;
        let mut this = Self {
            summary: QosSummary {
                enforcement,
                generation: 0,
                capacity_bps: 0,
                pods: Vec::new(),
                refused: Vec::new(),
            },
            node: policy.node,
            window_ms: config.qos.active_window_ms,
            config_pods: policy.pods,
            source_refused: Vec::new(),
            pods: Vec::new(),
            slot_ifindex: BTreeMap::new(),
            tracker: Tracker::new(Instant::now()),
            activity: Activity::default(),
            fq: BTreeMap::new(),
        };
        let started = this
            .place(pins, source.0)
            .map(|refused| this.source_refused = [source.1, refused].concat())
            .and_then(|()| this.rewrite(pins, &[]));
        match started {
            Ok(()) => {
                log(&this.summary);
                Ok(this)
            }
            Err(e) => {
                let _ = this.shutdown();
                Err(e)
            }
        }
    }

    /// SIGHUP: the node split, the config file's pods and their annotations.
    pub fn reload(&mut self, pins: &PinDir, config: &Config) -> Result<(), DatapathError> {
        let policy = policy_of(config)?;
        let previous = std::mem::replace(&mut self.config_pods, policy.pods);
        // The API's pods as placed now, kept through the reload.
        let source: Vec<SourcePod> = self
            .pods
            .iter()
            .filter(|p| p.source == PodSource::Kubernetes)
            .map(|p| (p.config.clone(), p.policy))
            .collect();
        let refused = match self.place(pins, source) {
            Ok(refused) => refused,
            Err(e) => {
                self.config_pods = previous;
                return Err(e);
            }
        };
        self.node = policy.node;
        self.window_ms = config.qos.active_window_ms;
        self.source_refused
            .retain(|r| !refused.iter().any(|n| n.name == r.name));
        self.source_refused.extend(refused);
        self.commit(pins)?;
        log(&self.summary);
        Ok(())
    }

    /// The pod source's current view: these pods are shaped, the others no longer.
    pub fn set_source_pods(
        &mut self,
        pins: &PinDir,
        pods: Vec<SourcePod>,
        refused: Vec<RefusedPod>,
    ) -> Result<(), DatapathError> {
        let late = self.place(pins, pods)?;
        self.source_refused = [refused, late].concat();
        self.commit(pins)?;
        log(&self.summary);
        Ok(())
    }

    /// Every interface a pod is shaped on.
    pub fn interfaces(&self) -> BTreeSet<String> {
        self.pods
            .iter()
            .map(|p| p.config.interface.clone())
            .collect()
    }

    /// The addresses of every pod with a policy: sockets with an end there are paced.
    pub fn shaped_addresses(&self) -> BTreeSet<std::net::IpAddr> {
        self.pods
            .iter()
            .filter(|p| p.config.managed())
            .flat_map(|p| p.config.addresses.iter().copied())
            .collect()
    }

    /// Periodic: re-runs the allocator when a pod started or stopped sending.
    pub fn tick(&mut self, pins: &PinDir) -> Result<(), DatapathError> {
        let bytes = read_bytes(pins, self.pods.iter().map(|p| p.slot))?;
        let trickle = self.node.capacity.bytes_per_sec() * ACTIVE_THRESHOLD_PER_MILLE / 1000;
        let activity = self.tracker.observe(&bytes, Instant::now(), trickle);
        if activity == self.activity {
            return Ok(());
        }
        self.activity = activity;
        self.rewrite(pins, &[])?;
        tracing::debug!(
            generation = self.summary.generation,
            "qos: pods started or stopped sending; rates recomputed"
        );
        Ok(())
    }

    /// Gives the config file's pods and `source` their slots (the ones they had, by name),
    /// installs fq for newcomers and starts their slots clean. Config pods that cannot be
    /// placed fail the whole change; source pods that cannot are returned as refused.
    fn place(
        &mut self,
        pins: &PinDir,
        source: Vec<SourcePod>,
    ) -> Result<Vec<RefusedPod>, DatapathError> {
        let mut refused = Vec::new();
        let mut next = Vec::new();
        let mut taken: BTreeSet<u32> = BTreeSet::new();
        let wanted: Vec<_> = self
            .config_pods
            .iter()
            .cloned()
            .map(|p| (PodSource::Config, p))
            .chain(source.into_iter().map(|p| (PodSource::Kubernetes, p)))
            .collect();
        for (from, (config, policy)) in wanted {
            let placed = self.slot_for(&config, &taken).and_then(|(slot, ifindex)| {
                self.prepare(pins, &config, slot, ifindex)
                    .map(|()| (slot, ifindex))
            });
            match (placed, from) {
                (Ok((slot, ifindex)), _) => {
                    taken.insert(slot);
                    self.slot_ifindex.insert(slot, ifindex);
                    next.push(SlottedPod {
                        slot,
                        source: from,
                        config,
                        policy,
                    });
                }
                (Err(e), PodSource::Config) => return Err(e),
                (Err(e), PodSource::Kubernetes) => refused.push(RefusedPod {
                    name: config.name,
                    reason: e.to_string(),
                }),
            }
        }
        self.pods = next;
        Ok(refused)
    }

    /// The slot `pod` keeps (same name) or gets (the lowest free one), and its ifindex.
    fn slot_for(
        &self,
        pod: &QosPodConfig,
        taken: &BTreeSet<u32>,
    ) -> Result<(u32, u32), DatapathError> {
        let ifindex = nix::net::if_::if_nametoindex(pod.interface.as_str()).map_err(|source| {
            DatapathError::NoInterface {
                key: "qos.pods.interface",
                ifname: pod.interface.clone(),
                source,
            }
        })?;
        if let Some(old) = self.pods.iter().find(|p| p.config.name == pod.name) {
            if !taken.contains(&old.slot) {
                return Ok((old.slot, ifindex));
            }
        }
        let in_use = |slot: &u32| {
            taken.contains(slot)
                || self
                    .pods
                    .iter()
                    .any(|p| p.slot == *slot && p.config.name != pod.name)
        };
        (0..MAX_PODS)
            .find(|s| !in_use(s))
            .map(|slot| (slot, ifindex))
            .ok_or_else(|| DatapathError::Qos(format!("all {MAX_PODS} pod slots are in use")))
    }

    /// Readies `slot` for `pod`: fq on a new interface, and a clean slot for a new pod.
    fn prepare(
        &mut self,
        pins: &PinDir,
        pod: &QosPodConfig,
        slot: u32,
        ifindex: u32,
    ) -> Result<(), DatapathError> {
        if self.summary.enforcement == Enforcement::Fq
            && self.fq.get(&pod.interface) != Some(&ifindex)
        {
            let how = fq::install(&pod.interface, ifindex)?;
            tracing::info!(interface = %pod.interface, ?how, "fq installed");
            self.fq.insert(pod.interface.clone(), ifindex);
        }
        let same = self
            .pods
            .iter()
            .any(|p| p.slot == slot && p.config.name == pod.name);
        if !same || self.slot_ifindex.get(&slot) != Some(&ifindex) {
            reset_slot(pins, slot)?;
            self.tracker.forget(slot);
        }
        Ok(())
    }

    /// Writes the placed pods, clears the slots nobody uses any more and takes fq off
    /// interfaces no pod is on.
    fn commit(&mut self, pins: &PinDir) -> Result<(), DatapathError> {
        let used: BTreeSet<u32> = self.pods.iter().map(|p| p.slot).collect();
        let freed: Vec<u32> = self
            .slot_ifindex
            .keys()
            .copied()
            .filter(|s| !used.contains(s))
            .collect();
        self.rewrite(pins, &freed)?;
        for slot in &freed {
            self.slot_ifindex.remove(slot);
        }
        let interfaces = self.interfaces();
        let gone: Vec<(String, u32)> = self
            .fq
            .iter()
            .filter(|(name, _)| !interfaces.contains(*name))
            .map(|(n, i)| (n.clone(), *i))
            .collect();
        for (ifname, ifindex) in gone {
            self.fq.remove(&ifname);
            // A deleted pod took its veth, and the qdisc, with it.
            if nix::net::if_::if_nametoindex(ifname.as_str()).ok() == Some(ifindex) {
                if let Err(e) = fq::remove(&ifname, ifindex) {
                    tracing::warn!("removing fq: {e}");
                }
            }
        }
        Ok(())
    }

    fn rewrite(&mut self, pins: &PinDir, freed: &[u32]) -> Result<(), DatapathError> {
        let mut summary = apply(
            pins,
            &self.node,
            &self.pods,
            freed,
            self.summary.enforcement,
            self.summary.generation + 1,
            self.window_ms,
            &self.activity,
        )?;
        summary.refused.clone_from(&self.source_refused);
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
            if let Err(e) = fq::remove(ifname, *ifindex) {
                tracing::warn!("removing fq: {e}");
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }
}

fn policy_of(config: &Config) -> Result<crate::config::QosPolicy, DatapathError> {
    config
        .qos
        .policy()
        .map_err(|e| DatapathError::Qos(format!("`{}` = {}: {}", e.key, e.value, e.allowed)))
}

fn log(summary: &QosSummary) {
    tracing::info!(
        enforcement = %summary.enforcement,
        generation = summary.generation,
        pods = summary.pods.len(),
        refused = summary.refused.len(),
        "qos policy applied"
    );
}
