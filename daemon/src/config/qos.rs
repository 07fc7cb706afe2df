//! `[qos]`: the node's link and Volcano-style online/offline split, and the shaped pods with
//! their policies written as the pod annotations Kubernetes would carry, so one parser (and
//! one set of error messages) serves both the config file and the API server.
use std::{collections::BTreeMap, fmt, net::IpAddr};

use quicklane_qos::{parse_bandwidth, pod_policy_from_annotations, NodePolicy, PodPolicy};
use serde::Deserialize;

pub const DEFAULT_HORIZON_MS: u32 = 50;
/// Lateness is charged a packet (a TSO burst of about 1 ms of a paced flow) at a time, and
/// softirq batching on a busy node bunches well-paced traffic: marking at 1 ms of lateness
/// throttled paced TCP to 56-80 % of its limit (fq in the 6.1/6.12 VMs) and 91 % (policer on
/// a loaded host). With fq each flow has its own queue, so this delays only the shaped flow.
pub const DEFAULT_CE_THRESHOLD_US: u32 = 10_000;
pub const DEFAULT_ACTIVE_WINDOW_MS: u32 = 10;
/// A sender that lost the CPU for a few ms on a busy 2-vCPU node left paced TCP at 0.93x of
/// its limit without any catch-up (the kernel's own pacing makes up half a packet's time);
/// 10 ms lets it catch up such stalls while a 1 s rate stays within 1 %.
pub const DEFAULT_CREDIT_US: u32 = 10_000;
/// Paced sockets whose share of their pod's rate is tracked (`QL_PACED`, an LRU map): a
/// socket evicted from it starts its measurement again, so it must hold every socket that
/// sends at once. 120 bytes each with the map's overhead.
pub const DEFAULT_MAX_PACED_SOCKETS: u32 = 65_536;

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct QosConfig {
    pub enabled: bool,
    /// The node link's capacity as a Kubernetes bandwidth quantity ("10G"); required.
    pub capacity: Option<String>,
    pub online_watermark_percent: u8,
    pub offline_low_percent: u8,
    pub offline_high_percent: u8,
    pub mode: QosMode,
    /// Packets due later than this are dropped.
    pub horizon_ms: u32,
    /// Packets due later than this are CE-marked (ECN-capable ones).
    pub ce_threshold_us: u32,
    /// A priority class counts as competing for this long after its last packet.
    pub active_window_ms: u32,
    /// How far behind its rate a pod may fall and still catch up (0: never).
    pub credit_us: u32,
    /// Capacity of `QL_PACED`.
    pub max_paced_sockets: u32,
    pub pods: Vec<QosPodConfig>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct QosPodConfig {
    pub name: String,
    /// Host-side interface of the pod (its veth peer), where its traffic is shaped.
    pub interface: String,
    /// The pod's addresses, by which sock_ops paces its TCP sockets.
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

impl QosPodConfig {
    /// Whether the pod takes part in QoS: any QoS annotation at all, even one that states the
    /// default (`volcano.sh/qos-level: "2"`, `quicklane.io/priority: "1"`). A managed pod is
    /// shaped to its allocation and its TCP is paced (so it leaves the bypass); a pod without
    /// any is left alone, bypass included.
    pub fn managed(&self) -> bool {
        self.annotations
            .keys()
            .any(|k| quicklane_qos::annotations::is_qos_key(k))
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum QosMode {
    /// fq where the kernel has sch_fq, the policer otherwise.
    #[default]
    Auto,
    /// Install fq on the pod interfaces and let it hold packets to their departure times.
    Fq,
    /// ECN-first policing against the departure times, no qdisc change.
    Policer,
}

impl fmt::Display for QosMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Fq => "fq",
            Self::Policer => "policer",
        })
    }
}

impl Default for QosConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            capacity: None,
            online_watermark_percent: 80,
            offline_low_percent: 10,
            offline_high_percent: 40,
            mode: QosMode::Auto,
            horizon_ms: DEFAULT_HORIZON_MS,
            ce_threshold_us: DEFAULT_CE_THRESHOLD_US,
            active_window_ms: DEFAULT_ACTIVE_WINDOW_MS,
            credit_us: DEFAULT_CREDIT_US,
            max_paced_sockets: DEFAULT_MAX_PACED_SOCKETS,
            pods: Vec::new(),
        }
    }
}

/// A rejected `[qos]` value: the key, the value and what is allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QosValueError {
    pub key: String,
    pub value: String,
    pub allowed: String,
}

/// The validated policy: what the allocator and the datapath work from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QosPolicy {
    pub node: NodePolicy,
    /// In config order; a pod's index is its datapath slot.
    pub pods: Vec<(QosPodConfig, PodPolicy)>,
}

impl QosConfig {
    /// Parses every value; nothing is applied unless all of it is valid.
    pub fn policy(&self) -> Result<QosPolicy, QosValueError> {
        let bad = |key: &str, value: String, allowed: String| QosValueError {
            key: format!("qos.{key}"),
            value,
            allowed,
        };
        let capacity =
            match &self.capacity {
                None => return Err(bad(
                    "capacity",
                    "(unset)".into(),
                    "the node link's bandwidth, e.g. \"10G\", required while qos.enabled = true"
                        .into(),
                )),
                Some(text) => parse_bandwidth(text)
                    .map_err(|e| bad("capacity", format!("{text:?}"), e.to_string()))?,
            };
        let node = NodePolicy {
            capacity,
            online_watermark_percent: self.online_watermark_percent,
            offline_low_percent: self.offline_low_percent,
            offline_high_percent: self.offline_high_percent,
        };
        node.validate().map_err(|e| {
            bad(
                "online_watermark_percent/offline_low_percent/offline_high_percent",
                format!(
                    "{}/{}/{}",
                    node.online_watermark_percent,
                    node.offline_low_percent,
                    node.offline_high_percent
                ),
                e.to_string(),
            )
        })?;
        for (key, value, range) in [
            ("horizon_ms", self.horizon_ms, 1..=10_000),
            ("ce_threshold_us", self.ce_threshold_us, 1..=1_000_000),
            ("active_window_ms", self.active_window_ms, 1..=10_000),
            ("credit_us", self.credit_us, 0..=1_000_000),
            ("max_paced_sockets", self.max_paced_sockets, 1..=16_777_216),
        ] {
            if !range.contains(&value) {
                return Err(bad(
                    key,
                    value.to_string(),
                    format!("an integer from {} to {}", range.start(), range.end()),
                ));
            }
        }
        if u64::from(self.ce_threshold_us) >= u64::from(self.horizon_ms) * 1000 {
            return Err(bad(
                "ce_threshold_us",
                self.ce_threshold_us.to_string(),
                format!(
                    "less than the drop horizon ({} ms): marking must come before dropping",
                    self.horizon_ms
                ),
            ));
        }
        let pods = self.pod_policies()?;
        Ok(QosPolicy { node, pods })
    }

    fn pod_policies(&self) -> Result<Vec<(QosPodConfig, PodPolicy)>, QosValueError> {
        let bad = |key: &str, value: String, allowed: String| QosValueError {
            key: format!("qos.{key}"),
            value,
            allowed,
        };
        let max = quicklane_common::qos::MAX_PODS as usize;
        if self.pods.len() > max {
            return Err(bad(
                "pods",
                format!("{} pods", self.pods.len()),
                format!("at most {max}"),
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        let mut interfaces = BTreeMap::new();
        let mut addresses = BTreeMap::new();
        let mut pods = Vec::with_capacity(self.pods.len());
        for pod in &self.pods {
            let at = |key: &str| format!("pods[{}].{key}", pod.name);
            if pod.name.is_empty() || !names.insert(pod.name.as_str()) {
                return Err(bad(
                    "pods.name",
                    format!("{:?}", pod.name),
                    "a non-empty name, each pod listed once".into(),
                ));
            }
            if !super::valid_ifname(&pod.interface) {
                return Err(bad(
                    &at("interface"),
                    format!("{:?}", pod.interface),
                    "an interface name of 1 to 15 bytes without '/', ':' or whitespace".into(),
                ));
            }
            if let Some(other) = interfaces.insert(pod.interface.as_str(), pod.name.as_str()) {
                return Err(bad(
                    &at("interface"),
                    format!("{:?}", pod.interface),
                    format!("an interface no other pod uses (pod {other:?} has it)"),
                ));
            }
            for addr in &pod.addresses {
                if let Some(other) = addresses.insert(*addr, pod.name.as_str()) {
                    return Err(bad(
                        &at("addresses"),
                        addr.to_string(),
                        format!("an address no other pod has (pod {other:?} has it)"),
                    ));
                }
            }
            let policy = pod_policy_from_annotations(&pod.annotations).map_err(|e| {
                bad(
                    &at("annotations"),
                    format!("{:?}", pod.annotations),
                    e.to_string(),
                )
            })?;
            pods.push((pod.clone(), policy));
        }
        Ok(pods)
    }

    /// What SIGHUP applies live: the node's split and the pods (added, removed, changed).
    pub fn clear_live(&mut self) {
        self.capacity = None;
        self.online_watermark_percent = 0;
        self.offline_low_percent = 0;
        self.offline_high_percent = 0;
        self.pods.clear();
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use std::path::Path;

    fn err(text: &str) -> String {
        Config::parse(text, Path::new("q.toml"))
            .expect_err("must be refused")
            .to_string()
    }

    const NODE: &str = "[qos]\nenabled = true\ncapacity = \"1G\"\n";

    #[test]
    fn a_pod_with_annotations_parses() {
        let text = format!(
            "{NODE}[[qos.pods]]\nname = \"web\"\ninterface = \"qlh1\"\naddresses = [\"10.77.1.2\"]\n\
             annotations = {{ \"kubernetes.io/egress-bandwidth\" = \"100M\", \"quicklane.io/priority\" = \"0\" }}\n"
        );
        let c = Config::parse(&text, Path::new("q.toml")).unwrap();
        let p = c.qos.policy().unwrap();
        assert_eq!(p.pods.len(), 1);
        assert_eq!(
            p.pods[0]
                .1
                .egress
                .limit
                .map(quicklane_qos::Rate::bits_per_sec),
            Some(100_000_000)
        );
    }

    #[test]
    fn bad_values_are_refused_by_key() {
        let e = err("[qos]\nenabled = true\n");
        assert!(e.contains("`qos.capacity` = (unset)"), "{e}");
        let e = err("[qos]\nenabled = true\ncapacity = \"10Mbps\"\n");
        assert!(e.contains("`qos.capacity` = \"10Mbps\""), "{e}");
        let e = err(&format!(
            "{NODE}offline_low_percent = 50\noffline_high_percent = 40\n"
        ));
        assert!(e.contains("50"), "{e}");
        let e = err(&format!("{NODE}ce_threshold_us = 60000\n"));
        assert!(e.contains("marking must come before dropping"), "{e}");
        let e = err(&format!("{NODE}credit_us = 2000000\n"));
        assert!(
            e.contains("`qos.credit_us`") && e.contains("0 to 1000000"),
            "{e}"
        );
        let e = err(&format!("{NODE}max_paced_sockets = 0\n"));
        assert!(
            e.contains("`qos.max_paced_sockets` = 0") && e.contains("1 to 16777216"),
            "{e}"
        );
        let pod = |name: &str, ifname: &str, ann: &str| {
            format!("[[qos.pods]]\nname = \"{name}\"\ninterface = \"{ifname}\"\nannotations = {{ {ann} }}\n")
        };
        let e = err(&format!(
            "{NODE}{}",
            pod(
                "web",
                "qlh1",
                "\"kubernetes.io/egress-bandwidth\" = \"-5M\""
            )
        ));
        assert!(e.contains("`qos.pods[web].annotations`"), "{e}");
        assert!(e.contains("kubernetes.io/egress-bandwidth"), "{e}");
        let e = err(&format!(
            "{NODE}{}{}",
            pod("a", "qlh1", ""),
            pod("b", "qlh1", "")
        ));
        assert!(e.contains("pod \"a\" has it"), "{e}");
    }
}
