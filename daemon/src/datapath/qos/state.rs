//! QoS while the agent runs: picking fq or the policer, installing and removing fq, and
//! re-running the allocator when the policy changes (SIGHUP) or pods start or stop sending.
use quicklane_common::qos::{
    QosConfig as BpfQosConfig, ACTIVE_THRESHOLD_PER_MILLE, QOS_F_ENABLED, QOS_F_FQ,
};

use std::time::Instant;

use super::{activity::Tracker, apply, read_bytes, Activity, Enforcement, QosSummary};
use crate::datapath::fq;
use crate::{
    config::{Config, QosConfig, QosMode, QosPolicy},
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
    }
}

/// QoS while the agent runs: the qdiscs it installed and the last policy it wrote.
#[derive(Debug)]
pub struct QosState {
    summary: QosSummary,
    policy: QosPolicy,
    window_ms: u32,
    tracker: Tracker,
    activity: Activity,
    /// Interfaces carrying our fq, removed at shutdown.
    fq: Vec<(String, u32)>,
}

impl QosState {
    pub fn start(
        pins: &PinDir,
        config: &Config,
        enforcement: Enforcement,
    ) -> Result<Self, DatapathError> {
        let policy = policy_of(config)?;
        let activity = Activity::all(policy.pods.len());
        let mut this = Self {
            summary: QosSummary {
                enforcement,
                generation: 0,
                capacity_bps: 0,
                pods: Vec::new(),
            },
            tracker: Tracker::new(policy.pods.len(), Instant::now()),
            activity: activity.clone(),
            window_ms: config.qos.active_window_ms,
            policy: policy.clone(),
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
                    .and_then(|ifindex| fq::install(&pod.interface, ifindex).map(|i| (ifindex, i)));
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
        match apply(
            pins,
            &policy,
            enforcement,
            1,
            config.qos.active_window_ms,
            &activity,
        ) {
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
        // Pods are the same (a different set needs a restart), so activity carries over.
        self.policy = policy_of(config)?;
        self.window_ms = config.qos.active_window_ms;
        self.rewrite(pins)?;
        log(&self.summary);
        Ok(())
    }

    /// Periodic: re-runs the allocator when a pod started or stopped sending.
    pub fn tick(&mut self, pins: &PinDir) -> Result<(), DatapathError> {
        let bytes = read_bytes(pins, self.policy.pods.len())?;
        let trickle = self.policy.node.capacity.bytes_per_sec() * ACTIVE_THRESHOLD_PER_MILLE / 1000;
        let activity = self.tracker.observe(&bytes, Instant::now(), trickle);
        if activity == self.activity {
            return Ok(());
        }
        self.activity = activity;
        self.rewrite(pins)?;
        tracing::debug!(
            generation = self.summary.generation,
            "qos: pods started or stopped sending; rates recomputed"
        );
        Ok(())
    }

    fn rewrite(&mut self, pins: &PinDir) -> Result<(), DatapathError> {
        self.summary = apply(
            pins,
            &self.policy,
            self.summary.enforcement,
            self.summary.generation + 1,
            self.window_ms,
            &self.activity,
        )?;
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

fn policy_of(config: &Config) -> Result<QosPolicy, DatapathError> {
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
        "qos policy applied"
    );
}
