//! Pods from the Kubernetes API: this node's pods that carry QoS annotations, turned into
//! the same pod entries `[[qos.pods]]` declares (name, host interface, addresses,
//! annotations), with the same parser and the same errors.
mod events;
mod resolve;
mod watch;

use std::{collections::BTreeMap, time::Duration};

use events::PodEvents;
use kube::runtime::events::EventType;
use quicklane_qos::{pod_policy_from_annotations, PodPolicy};
use serde::{Deserialize, Serialize};
use tokio::runtime::Runtime;

pub use watch::{KubePod, Snapshot};

use crate::{
    config::{KubernetesConfig, QosPodConfig},
    datapath::qos::{RefusedPod, SourcePod},
};

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("kubernetes: no node name: set kubernetes.node_name, or NODE_NAME in the environment (a DaemonSet passes spec.nodeName through the downward API)")]
    NoNodeName,
    #[error("kubernetes: NODE_NAME = {0:?} is not a node name")]
    BadNodeName(String),
    #[error("kubernetes: API server configuration: {0}")]
    Config(String),
    #[error("kubernetes: API client: {0}")]
    Client(kube::Error),
    #[error("kubernetes: netlink (for pod interfaces): {0}")]
    Netlink(std::io::Error),
}

/// How the pod source is doing, for `quicklane status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SourceStatus {
    pub node: String,
    /// The first complete list of the node's pods has arrived.
    pub synced: bool,
    /// Pods on the node asking for QoS.
    pub pods: usize,
    pub error: Option<String>,
}

/// The watch on this node's pods and what was last made of it.
#[derive(Debug)]
pub struct PodSource {
    node: String,
    snapshot: tokio::sync::watch::Receiver<Snapshot>,
    netlink: rtnetlink::Handle,
    /// Each pod's last accepted annotations: a bad edit keeps the policy they gave.
    last_good: BTreeMap<String, BTreeMap<String, String>>,
    events: PodEvents,
}

/// Why a pod is not shaped; `tell`: whether its owner can do something about it, so it gets
/// an event (a pod waiting for its IP or its neighbour entry is retried every second instead).
struct Refusal {
    reason: String,
    tell: bool,
}

impl Refusal {
    fn told(reason: String) -> Self {
        Self { reason, tell: true }
    }
}

type Judged = Result<(QosPodConfig, PodPolicy, Option<String>), Refusal>;

impl PodSource {
    /// Connects (without waiting for the API server) and starts watching on `rt`.
    pub fn start(config: &KubernetesConfig, rt: &Runtime) -> Result<Self, KubeError> {
        let node = if let Some(n) = &config.node_name {
            n.clone()
        } else {
            let n = std::env::var("NODE_NAME").map_err(|_| KubeError::NoNodeName)?;
            if !crate::config::valid_node_name(&n) {
                return Err(KubeError::BadNodeName(n));
            }
            n
        };
        let client = rt.block_on(client(config))?;
        // The netlink socket registers with the runtime's reactor as it is made.
        let _in_runtime = rt.enter();
        let (conn, netlink, _) = rtnetlink::new_connection().map_err(KubeError::Netlink)?;
        rt.spawn(conn);
        let (tx, snapshot) = tokio::sync::watch::channel(Snapshot::default());
        let events = PodEvents::new(client.clone(), &node);
        rt.spawn(watch::run(client, node.clone(), tx));
        tracing::info!(node, "kubernetes: watching this node's pods");
        Ok(Self {
            node,
            snapshot,
            netlink,
            last_good: BTreeMap::new(),
            events,
        })
    }

    /// Waits up to `timeout` for the first complete list; false if it did not come (the
    /// agent then starts without those pods and shapes them once the list arrives).
    pub fn wait_synced(&mut self, rt: &Runtime, timeout: Duration) -> bool {
        rt.block_on(async {
            tokio::time::timeout(timeout, self.snapshot.wait_for(|s| s.synced))
                .await
                .is_ok_and(|r| r.is_ok())
        })
    }

    /// Resolves when the watch has news.
    pub async fn changed(&mut self) {
        if self.snapshot.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    pub fn status(&self) -> SourceStatus {
        let s = self.snapshot.borrow();
        SourceStatus {
            node: self.node.clone(),
            synced: s.synced,
            pods: s.pods.len(),
            error: s.error.clone(),
        }
    }

    /// The pods to shape now, and the ones refused with why. `taken` are the config file's
    /// pods: an API pod claiming their interface or address is refused. Each pod is told
    /// what became of it by an event when that changes.
    pub fn pods(
        &mut self,
        rt: &Runtime,
        taken: &[QosPodConfig],
    ) -> (Vec<SourcePod>, Vec<RefusedPod>) {
        let snapshot = self.snapshot.borrow_and_update().clone();
        self.last_good
            .retain(|name, _| snapshot.pods.contains_key(name));
        self.events.retain(|name| snapshot.pods.contains_key(name));
        let mut accepted: Vec<SourcePod> = Vec::new();
        let mut refused = Vec::new();
        for pod in snapshot.pods.values() {
            let claimed = taken.iter().chain(accepted.iter().map(|(c, _)| c));
            let outcome = self.judge(rt, pod, claimed);
            self.tell(rt, pod, &outcome);
            let reason = match outcome {
                Ok((config, policy, note)) => {
                    accepted.push((config, policy));
                    note
                }
                Err(refusal) => Some(refusal.reason),
            };
            if let Some(reason) = reason {
                refused.push(RefusedPod {
                    name: pod.name.clone(),
                    reason,
                });
            }
        }
        (accepted, refused)
    }

    /// Where `pod` is shaped and by which policy (with a note if a bad edit was refused), or
    /// why it is not; `claimed` are the pods placed before it.
    fn judge<'a>(
        &mut self,
        rt: &Runtime,
        pod: &KubePod,
        claimed: impl Iterator<Item = &'a QosPodConfig>,
    ) -> Judged {
        let config = rt.block_on(self.place(pod))?;
        if let Some(reason) = collision(&config, claimed) {
            return Err(Refusal::told(reason));
        }
        let (policy, note) = self.policy(&config).map_err(Refusal::told)?;
        Ok((config, policy, note))
    }

    /// Tells the pod's owner what became of it (see `PodEvents`: only what changed).
    fn tell(&mut self, rt: &Runtime, pod: &KubePod, outcome: &Judged) {
        let (kind, reason, note) = match outcome {
            Ok((_, _, Some(note))) => (EventType::Warning, "QosChangeRefused", note.clone()),
            Ok((config, _, None)) => (EventType::Normal, "QosApplied", applied(config)),
            Err(refusal) if refusal.tell => {
                (EventType::Warning, "QosRefused", refusal.reason.clone())
            }
            Err(_) => return,
        };
        self.events.tell(rt, pod, kind, reason, &note);
    }

    /// The pod as a config entry, on the interface the node routes its first address to.
    async fn place(&self, pod: &KubePod) -> Result<QosPodConfig, Refusal> {
        if pod.host_network {
            return Err(Refusal::told(
                "hostNetwork pod: it shares the node's interfaces, so it cannot be shaped alone"
                    .into(),
            ));
        }
        let waiting = |reason: String| Refusal {
            reason,
            tell: false,
        };
        let first = pod
            .ips
            .first()
            .ok_or_else(|| waiting("no pod IP yet".into()))?;
        let (interface, _) = resolve::pod_interface(&self.netlink, *first)
            .await
            .map_err(waiting)?;
        Ok(QosPodConfig {
            name: pod.name.clone(),
            interface,
            addresses: pod.ips.clone(),
            annotations: pod.annotations.clone(),
        })
    }

    /// The pod's policy from its annotations; a bad edit keeps the last good ones (and says
    /// so), a pod that never had good ones is refused.
    fn policy(&mut self, config: &QosPodConfig) -> Result<(PodPolicy, Option<String>), String> {
        match pod_policy_from_annotations(&config.annotations) {
            Ok(policy) => {
                self.last_good
                    .insert(config.name.clone(), config.annotations.clone());
                Ok((policy, None))
            }
            Err(e) => match self.last_good.get(&config.name) {
                Some(good) => {
                    let policy = pod_policy_from_annotations(good)
                        .expect("annotations accepted before parse again");
                    Ok((
                        policy,
                        Some(format!(
                            "annotation change refused, the previous policy stays: {e}"
                        )),
                    ))
                }
                None => Err(format!("annotations refused: {e}")),
            },
        }
    }
}

/// The news for a pod that is shaped: where, and by which annotations.
fn applied(config: &QosPodConfig) -> String {
    let annotations: Vec<String> = config
        .annotations
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    format!("shaped on {}: {}", config.interface, annotations.join(", "))
}

/// Why `pod` cannot be shaped next to `others`, if it cannot.
fn collision<'a>(
    pod: &QosPodConfig,
    others: impl Iterator<Item = &'a QosPodConfig>,
) -> Option<String> {
    for other in others {
        if other.interface == pod.interface {
            return Some(format!(
                "its interface {} is already {}'s",
                pod.interface, other.name
            ));
        }
        if let Some(addr) = pod.addresses.iter().find(|a| other.addresses.contains(a)) {
            return Some(format!("its address {addr} is already {}'s", other.name));
        }
    }
    None
}

async fn client(config: &KubernetesConfig) -> Result<kube::Client, KubeError> {
    let kube_config = match &config.api_server {
        Some(url) => kube::Config::new(
            url.parse()
                .map_err(|e| KubeError::Config(format!("{url:?}: {e}")))?,
        ),
        None => kube::Config::infer()
            .await
            .map_err(|e| KubeError::Config(e.to_string()))?,
    };
    kube::Client::try_from(kube_config).map_err(KubeError::Client)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, interface: &str, addr: &str) -> QosPodConfig {
        QosPodConfig {
            name: name.into(),
            interface: interface.into(),
            addresses: vec![addr.parse().unwrap()],
            annotations: BTreeMap::new(),
        }
    }

    #[test]
    fn a_pod_may_not_take_another_pods_interface_or_address() {
        let web = pod("web", "qlh1", "10.77.1.2");
        let same_if = pod("ns/a", "qlh1", "10.77.9.2");
        assert!(collision(&same_if, [&web].into_iter())
            .unwrap()
            .contains("interface qlh1 is already web's"));
        let same_addr = pod("ns/b", "qlh9", "10.77.1.2");
        assert!(collision(&same_addr, [&web].into_iter())
            .unwrap()
            .contains("address 10.77.1.2"));
        assert!(collision(&pod("ns/c", "qlh3", "10.77.3.2"), [&web].into_iter()).is_none());
    }
}
