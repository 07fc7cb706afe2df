//! What an operator installs on Kubernetes: the manifest parses into the API's own types, its
//! config is one the agent accepts, and the pieces fit together (the agent can list its
//! node's pods, knows its node, sees the host's network, cgroups and bpffs).
use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, Namespace, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use quicklane::config::Config;
use serde::Deserialize as _;

const MANIFEST: &str = include_str!("../../deploy/kubernetes/quicklane.yaml");

struct Manifest {
    namespace: Namespace,
    account: ServiceAccount,
    role: ClusterRole,
    binding: ClusterRoleBinding,
    config: ConfigMap,
    daemonset: DaemonSet,
}

/// Each document into the type its `kind` names; an unknown kind or field fails.
fn parse() -> Manifest {
    let mut docs = Vec::new();
    for doc in serde_norway::Deserializer::from_str(MANIFEST) {
        docs.push(serde_norway::Value::deserialize(doc).expect("YAML"));
    }
    let typed = |kind: &str| {
        let doc = docs
            .iter()
            .find(|d| d["kind"] == kind)
            .unwrap_or_else(|| panic!("the manifest has no {kind}"))
            .clone();
        serde_norway::to_string(&doc).unwrap()
    };
    assert_eq!(
        docs.len(),
        6,
        "Namespace, ServiceAccount, ClusterRole, ClusterRoleBinding, ConfigMap, DaemonSet"
    );
    Manifest {
        namespace: serde_norway::from_str(&typed("Namespace")).unwrap(),
        account: serde_norway::from_str(&typed("ServiceAccount")).unwrap(),
        role: serde_norway::from_str(&typed("ClusterRole")).unwrap(),
        binding: serde_norway::from_str(&typed("ClusterRoleBinding")).unwrap(),
        config: serde_norway::from_str(&typed("ConfigMap")).unwrap(),
        daemonset: serde_norway::from_str(&typed("DaemonSet")).unwrap(),
    }
}

#[test]
fn the_manifest_fits_together() {
    let m = parse();
    let ns = m.namespace.metadata.name.clone().unwrap();
    let account = m.account.metadata.name.clone().unwrap();
    assert_eq!(m.account.metadata.namespace.as_deref(), Some(ns.as_str()));

    // RBAC: the agent's account may read pods and post events, and nothing else.
    let rules = m.role.rules.clone().unwrap();
    let granted: Vec<(String, String, Vec<String>)> = rules
        .iter()
        .flat_map(|r| {
            let groups = r.api_groups.clone().unwrap_or_default();
            let resources = r.resources.clone().unwrap_or_default();
            groups.into_iter().flat_map(move |g| {
                let verbs = r.verbs.clone();
                resources
                    .clone()
                    .into_iter()
                    .map(move |res| (g.clone(), res, verbs.clone()))
            })
        })
        .collect();
    let mut expected = vec![
        (
            String::new(),
            "pods".to_owned(),
            vec!["get", "list", "watch"],
        ),
        (
            "events.k8s.io".to_owned(),
            "events".to_owned(),
            vec!["create", "patch"],
        ),
    ];
    assert_eq!(granted.len(), expected.len(), "{granted:?}");
    for (group, resource, verbs) in expected.drain(..) {
        let rule = granted
            .iter()
            .find(|(g, r, _)| *g == group && *r == resource)
            .unwrap_or_else(|| panic!("no rule for {group}/{resource}: {granted:?}"));
        let mut have = rule.2.clone();
        have.sort();
        assert_eq!(have, verbs, "{group}/{resource}");
    }
    assert_eq!(
        m.binding.role_ref.name,
        m.role.metadata.name.clone().unwrap()
    );
    let subject = &m.binding.subjects.as_ref().unwrap()[0];
    assert_eq!(
        (subject.name.as_str(), subject.namespace.as_deref()),
        (account.as_str(), Some(ns.as_str()))
    );

    // The DaemonSet: the account above, the host's network, NODE_NAME from the node.
    let spec = m.daemonset.spec.unwrap().template.spec.unwrap();
    assert_eq!(spec.service_account_name.as_deref(), Some(account.as_str()));
    assert_eq!(spec.host_network, Some(true));
    let container = &spec.containers[0];
    let node_name = container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_NAME")
        .and_then(|e| e.value_from.as_ref()?.field_ref.as_ref())
        .map(|f| f.field_path.clone());
    assert_eq!(node_name.as_deref(), Some("spec.nodeName"));
    assert_eq!(
        container
            .security_context
            .as_ref()
            .and_then(|s| s.privileged),
        Some(true)
    );

    // The config the container reads is one the agent accepts, and its paths are mounted.
    let text = &m.config.data.unwrap()["quicklane.toml"];
    let config = Config::parse(text, std::path::Path::new("configmap")).unwrap();
    assert!(config.kubernetes.enabled && config.qos.enabled && config.bypass.enabled);
    assert!(
        config.kubernetes.node_name.is_none(),
        "the node comes from NODE_NAME"
    );
    let mounts: Vec<&str> = container
        .volume_mounts
        .iter()
        .flatten()
        .map(|v| v.mount_path.as_str())
        .collect();
    let config_path = container.command.as_ref().unwrap().last().unwrap().clone();
    for path in [
        config.agent.pin_dir.parent().unwrap().to_str().unwrap(),
        config.agent.run_dir.to_str().unwrap(),
        config.bypass.cgroup.as_ref().unwrap().to_str().unwrap(),
        std::path::Path::new(&config_path)
            .parent()
            .unwrap()
            .to_str()
            .unwrap(),
    ] {
        assert!(mounts.contains(&path), "{path} is not mounted: {mounts:?}");
    }
}
