//! A watch on this node's pods: the API server's list, then its change stream, folded into
//! a snapshot of the pods that ask for QoS.
use std::{collections::BTreeMap, net::IpAddr};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::{watcher, WatchStreamExt as _};
use tokio::sync::watch;

/// A pod that carries QoS annotations, as far as the agent cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubePod {
    /// `namespace/name`.
    pub name: String,
    /// For the events about it: a recreated pod of the same name is another object.
    pub uid: Option<String>,
    pub ips: Vec<IpAddr>,
    pub host_network: bool,
    /// Only the QoS annotations.
    pub annotations: BTreeMap<String, String>,
}

impl KubePod {
    /// None for pods quicklane has nothing to do with: no QoS annotation, or finished.
    pub fn from_pod(pod: &Pod) -> Option<Self> {
        let annotations: BTreeMap<String, String> = pod
            .metadata
            .annotations
            .iter()
            .flatten()
            .filter(|(k, _)| quicklane_qos::annotations::is_qos_key(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let status = pod.status.as_ref();
        let finished = status
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|p| p == "Succeeded" || p == "Failed");
        if annotations.is_empty() || finished {
            return None;
        }
        let ips = status
            .and_then(|s| s.pod_ips.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|ip| ip.ip.parse().ok())
            .collect();
        Some(Self {
            name: name_of(pod),
            uid: pod.metadata.uid.clone(),
            ips,
            host_network: pod
                .spec
                .as_ref()
                .and_then(|s| s.host_network)
                .unwrap_or(false),
            annotations,
        })
    }
}

fn name_of(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or("default"),
        pod.metadata.name.as_deref().unwrap_or("")
    )
}

/// What the watch knows right now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// The first complete list has arrived.
    pub synced: bool,
    pub pods: BTreeMap<String, KubePod>,
    /// The last error talking to the API server, cleared by the next complete list.
    pub error: Option<String>,
}

/// Runs until the receiver is dropped; the watcher retries with backoff on errors.
pub async fn run(client: kube::Client, node: String, tx: watch::Sender<Snapshot>) {
    let api: kube::Api<Pod> = kube::Api::all(client);
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut events = watcher(api, config).default_backoff().boxed();
    let mut listing = BTreeMap::new();
    while let Some(event) = events.next().await {
        if tx.is_closed() {
            return;
        }
        match event {
            Ok(watcher::Event::Init) => listing.clear(),
            Ok(watcher::Event::InitApply(pod)) => {
                if let Some(p) = KubePod::from_pod(&pod) {
                    listing.insert(p.name.clone(), p);
                }
            }
            Ok(watcher::Event::InitDone) => {
                let pods = std::mem::take(&mut listing);
                tracing::info!(pods = pods.len(), node, "kubernetes: pods listed");
                tx.send_if_modified(|s| {
                    let next = Snapshot {
                        synced: true,
                        pods,
                        error: None,
                    };
                    let changed = *s != next;
                    *s = next;
                    changed
                });
            }
            Ok(watcher::Event::Apply(pod)) => {
                let name = name_of(&pod);
                let next = KubePod::from_pod(&pod);
                tx.send_if_modified(|s| match next {
                    Some(p) => s.pods.insert(name, p.clone()).as_ref() != Some(&p),
                    None => s.pods.remove(&name).is_some(),
                });
            }
            Ok(watcher::Event::Delete(pod)) => {
                let name = name_of(&pod);
                tx.send_if_modified(|s| s.pods.remove(&name).is_some());
            }
            Err(e) => {
                tracing::warn!("kubernetes: watching pods: {e}");
                tx.send_modify(|s| s.error = Some(e.to_string()));
            }
        }
    }
}
