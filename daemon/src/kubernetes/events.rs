//! Kubernetes Events on the pods the agent shapes or refuses, so that whoever owns a pod sees
//! in `kubectl describe pod` what became of its QoS annotations; `quicklane status` and the
//! log tell the node's operator the same.
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tokio::runtime::Runtime;

use super::KubePod;

/// The API server refuses longer notes.
const MAX_NOTE: usize = 1024;

/// Posts events in the background, each outcome once per pod: the pod list is re-evaluated
/// every second, the news is only what changed.
pub struct PodEvents {
    recorder: Recorder,
    /// What each pod was last told.
    told: BTreeMap<String, (EventType, String)>,
}

impl PodEvents {
    pub fn new(client: kube::Client, node: &str) -> Self {
        let reporter = Reporter {
            controller: "quicklane".into(),
            instance: Some(node.into()),
        };
        Self {
            recorder: Recorder::new(client, reporter),
            told: BTreeMap::new(),
        }
    }

    /// Tells `pod` (unless it is what it was last told). Never waits for the API server: an
    /// event that cannot be posted is logged, and the agent carries on.
    pub fn tell(&mut self, rt: &Runtime, pod: &KubePod, kind: EventType, reason: &str, note: &str) {
        let news = (kind, note.to_owned());
        if self.told.get(&pod.name) == Some(&news) {
            return;
        }
        self.told.insert(pod.name.clone(), news);
        let event = Event {
            type_: kind,
            reason: reason.into(),
            note: Some(truncated(note)),
            action: "Shape".into(),
            secondary: None,
        };
        let recorder = self.recorder.clone();
        let reference = reference(pod);
        let name = pod.name.clone();
        rt.spawn(async move {
            if let Err(e) = recorder.publish(&event, &reference).await {
                tracing::warn!(pod = name, error = %e, "kubernetes: could not post an event");
            }
        });
    }

    /// Drops what was told to pods that are gone (a pod recreated later is told afresh).
    pub fn retain(&mut self, present: impl Fn(&str) -> bool) {
        self.told.retain(|name, _| present(name));
    }
}

impl std::fmt::Debug for PodEvents {
    // kube's Recorder has no Debug; what was told is the interesting part anyway.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodEvents")
            .field("told", &self.told)
            .finish_non_exhaustive()
    }
}

fn reference(pod: &KubePod) -> ObjectReference {
    let (namespace, name) = pod.name.split_once('/').unwrap_or(("default", &pod.name));
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        namespace: Some(namespace.into()),
        name: Some(name.into()),
        uid: pod.uid.clone(),
        ..ObjectReference::default()
    }
}

fn truncated(note: &str) -> String {
    if note.len() <= MAX_NOTE {
        return note.to_owned();
    }
    let mut end = MAX_NOTE - 3;
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &note[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_reference_names_namespace_name_and_uid() {
        let pod = KubePod {
            name: "shop/web-0".into(),
            uid: Some("u-1".into()),
            ips: Vec::new(),
            host_network: false,
            annotations: BTreeMap::new(),
        };
        let r = reference(&pod);
        assert_eq!(
            (r.kind.as_deref(), r.namespace.as_deref(), r.name.as_deref()),
            (Some("Pod"), Some("shop"), Some("web-0"))
        );
        assert_eq!(r.uid.as_deref(), Some("u-1"));
    }

    #[test]
    fn long_notes_are_cut_on_a_character_boundary() {
        let note = "é".repeat(MAX_NOTE);
        let cut = truncated(&note);
        assert!(
            cut.len() <= MAX_NOTE && cut.ends_with("..."),
            "{}",
            cut.len()
        );
        assert_eq!(truncated("short"), "short");
    }
}
