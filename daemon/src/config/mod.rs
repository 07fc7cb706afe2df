//! The agent's TOML configuration: parsing, defaults and validation.
//!
//! Every rejection names the key, the value given and what is allowed, because an operator
//! reading a crash-looping DaemonSet's log has nothing else to go on.
use std::{
    collections::BTreeSet,
    fmt,
    path::{Path, PathBuf},
};

use serde::Deserialize;

mod qos;
pub use qos::{QosConfig, QosMode, QosPodConfig, QosPolicy};

/// Largest sockhash we allow: the kernel caps map sizes far higher, but beyond this the
/// preallocated buckets alone cost more memory than a node agent should take by surprise.
pub const MAX_SOCKETS_LIMIT: u32 = 16 * 1024 * 1024;
pub const DEFAULT_MAX_SOCKETS: u32 = 262_144;
pub const DEFAULT_SMALL_MSG_BYTES: u32 = 192;
pub const DEFAULT_LARGE_MSG_BYTES: u32 = 32 * 1024;
pub const DEFAULT_LARGE_MSG_BYTES_NODELAY: u32 = 8 * 1024;
pub const DEFAULT_STREAM_STREAK: u32 = 32;
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/quicklane";
pub const DEFAULT_RUN_DIR: &str = "/run/quicklane";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: `{key}`: {message} (line {line})")]
    Syntax {
        path: PathBuf,
        key: String,
        message: String,
        line: usize,
    },
    #[error("config {path}: `{key}` = {value} is not allowed: {allowed}")]
    Value {
        path: PathBuf,
        key: String,
        value: String,
        allowed: String,
    },
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub agent: AgentConfig,
    pub bypass: BypassConfig,
    pub tc: TcConfig,
    pub xdp: XdpConfig,
    pub qos: QosConfig,
    pub kubernetes: KubernetesConfig,
}

/// `[kubernetes]`: where shaped pods come from on a Kubernetes node.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesConfig {
    /// Watch this node's pods and shape those with QoS annotations (needs `qos.enabled`).
    pub enabled: bool,
    /// The node whose pods to watch; default: the `NODE_NAME` environment variable, which
    /// the DaemonSet sets from `spec.nodeName`.
    pub node_name: Option<String>,
    /// API server URL; default: the pod's service account (in cluster), else kubeconfig.
    pub api_server: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// bpffs directory that holds quicklane's pinned maps and links.
    pub pin_dir: PathBuf,
    /// Directory for the single-instance lock and the state file `quicklane status` reads.
    pub run_dir: PathBuf,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            pin_dir: DEFAULT_PIN_DIR.into(),
            run_dir: DEFAULT_RUN_DIR.into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct BypassConfig {
    pub enabled: bool,
    /// cgroup v2 directory whose sockets are considered; default: the cgroup v2 root.
    pub cgroup: Option<PathBuf>,
    pub max_sockets: u32,
    /// Pods (cgroup v2 directories, and everything below them) to accelerate; empty: all.
    pub include_cgroups: Vec<PathBuf>,
    /// Pods never accelerated; wins over every include.
    pub exclude_cgroups: Vec<PathBuf>,
    /// Addresses to accelerate: a connection qualifies when both its ends are included
    /// (empty: all) and neither is excluded.
    pub include_cidrs: Vec<Cidr>,
    pub exclude_cidrs: Vec<Cidr>,
    /// Service ports (the server's port of a connection) to accelerate; empty: all.
    pub include_ports: Vec<u16>,
    pub exclude_ports: Vec<u16>,
    /// A window of unanswered messages averaging below this many bytes, from a writer with
    /// Nagle's algorithm on, is a small-message stream, which moves to TCP (0: never).
    pub small_msg_bytes: u32,
    /// ... averaging at least this many bytes, a large-message stream (0: never).
    pub large_msg_bytes: u32,
    /// `large_msg_bytes` for a writer with Nagle's algorithm off (TCP_NODELAY): TCP sends
    /// its writes at once and keeps up with the redirect from smaller sizes on (0: the same
    /// bound).
    pub large_msg_bytes_nodelay: u32,
    /// Every unanswered window over loopback from a writer with Nagle's algorithm on moves to
    /// TCP (its TCP over `lo` batches writes into 64 KiB segments and beats the redirect at
    /// every size; a TCP_NODELAY writer's does not, and gets the other bounds instead).
    pub loopback_streams_tcp: bool,
    /// Messages per window (README, "Streams, small and large").
    pub stream_streak: u32,
}

impl BypassConfig {
    /// Takes the eligibility rules (the part SIGHUP changes live) from `other`.
    pub fn rules_from(&mut self, other: &Self) {
        self.include_cgroups.clone_from(&other.include_cgroups);
        self.exclude_cgroups.clone_from(&other.exclude_cgroups);
        self.include_cidrs.clone_from(&other.include_cidrs);
        self.exclude_cidrs.clone_from(&other.exclude_cidrs);
        self.include_ports.clone_from(&other.include_ports);
        self.exclude_ports.clone_from(&other.exclude_ports);
    }
}

/// An IPv4 or IPv6 prefix, `addr/len`, with no host bits set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    pub addr: std::net::IpAddr,
    pub prefix_len: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, len) = s.split_once('/').unwrap_or((s, ""));
        let addr: std::net::IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not a CIDR like \"10.0.0.0/8\" or \"fd00::/8\""))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix_len: u8 = if len.is_empty() {
            max
        } else {
            len.parse()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("{s:?}: prefix length must be 0 to {max}"))?
        };
        let host_bits_set = match addr {
            std::net::IpAddr::V4(a) => {
                u32::from(a).checked_shl(u32::from(prefix_len)).unwrap_or(0) != 0
            }
            std::net::IpAddr::V6(a) => {
                u128::from(a)
                    .checked_shl(u32::from(prefix_len))
                    .unwrap_or(0)
                    != 0
            }
        };
        if host_bits_set {
            return Err(format!("{s:?} has host bits set beyond /{prefix_len}"));
        }
        Ok(Self { addr, prefix_len })
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl Default for BypassConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            cgroup: None,
            max_sockets: DEFAULT_MAX_SOCKETS,
            include_cgroups: Vec::new(),
            exclude_cgroups: Vec::new(),
            include_cidrs: Vec::new(),
            exclude_cidrs: Vec::new(),
            include_ports: Vec::new(),
            exclude_ports: Vec::new(),
            small_msg_bytes: DEFAULT_SMALL_MSG_BYTES,
            large_msg_bytes: DEFAULT_LARGE_MSG_BYTES,
            large_msg_bytes_nodelay: DEFAULT_LARGE_MSG_BYTES_NODELAY,
            loopback_streams_tcp: true,
            stream_streak: DEFAULT_STREAM_STREAK,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct TcConfig {
    pub enabled: bool,
    /// Interfaces (in the agent's network namespace) that get the egress and ingress programs.
    pub interfaces: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct XdpConfig {
    pub enabled: bool,
    pub interfaces: Vec<String>,
    pub mode: XdpMode,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// Let the kernel pick: native when the driver has it, generic otherwise.
    #[default]
    Auto,
    /// Generic (skb) XDP: works on every device, slower.
    Skb,
    /// Driver XDP: fails on devices without native support.
    Native,
}

impl fmt::Display for XdpMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Skb => "skb",
            Self::Native => "native",
        })
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|e| {
            let offset = e.span().map_or(0, |s| s.start);
            ConfigError::Syntax {
                path: path.to_owned(),
                key: key_at(text, offset),
                message: e.message().to_owned(),
                line: text[..offset.min(text.len())].lines().count().max(1),
            }
        })?;
        config.validate(path)?;
        Ok(config)
    }

    /// This configuration without what SIGHUP applies live (the bypass include/exclude rules),
    /// to tell whether a reload asks for anything that needs a restart.
    #[must_use]
    pub fn without_live_rules(&self) -> Self {
        let mut c = self.clone();
        c.bypass.rules_from(&BypassConfig::default());
        c.qos.clear_live();
        c
    }

    /// Interfaces that get the tc programs: those of `[tc]` and, with QoS on, every shaped
    /// pod's interface (in that order, each once).
    pub fn tc_interfaces(&self) -> Vec<String> {
        let mut out: Vec<String> = if self.tc.enabled {
            self.tc.interfaces.clone()
        } else {
            Vec::new()
        };
        if self.qos.enabled {
            for pod in &self.qos.pods {
                if !out.contains(&pod.interface) {
                    out.push(pod.interface.clone());
                }
            }
        }
        out
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key: &str, value: String, allowed: &str| ConfigError::Value {
            path: path.to_owned(),
            key: key.to_owned(),
            value,
            allowed: allowed.to_owned(),
        };
        for (key, dir) in [
            ("agent.pin_dir", &self.agent.pin_dir),
            ("agent.run_dir", &self.agent.run_dir),
        ] {
            if !dir.is_absolute() {
                return Err(bad(key, quoted(dir), "an absolute path"));
            }
        }
        if let Some(cg) = &self.bypass.cgroup {
            if !cg.is_absolute() {
                return Err(bad(
                    "bypass.cgroup",
                    quoted(cg),
                    "an absolute path to a cgroup v2 directory",
                ));
            }
        }
        for (key, dirs) in [
            ("bypass.include_cgroups", &self.bypass.include_cgroups),
            ("bypass.exclude_cgroups", &self.bypass.exclude_cgroups),
        ] {
            if let Some(d) = dirs.iter().find(|d| !d.is_absolute()) {
                return Err(bad(
                    key,
                    quoted(d),
                    "absolute paths of cgroup v2 directories",
                ));
            }
        }
        for (key, ports) in [
            ("bypass.include_ports", &self.bypass.include_ports),
            ("bypass.exclude_ports", &self.bypass.exclude_ports),
        ] {
            if ports.contains(&0) {
                return Err(bad(key, "0".into(), "ports from 1 to 65535"));
            }
        }
        self.validate_streams(path)?;
        if !(1..=MAX_SOCKETS_LIMIT).contains(&self.bypass.max_sockets) {
            return Err(bad(
                "bypass.max_sockets",
                self.bypass.max_sockets.to_string(),
                &format!("an integer from 1 to {MAX_SOCKETS_LIMIT}"),
            ));
        }
        for (section, enabled, names) in [
            ("tc", self.tc.enabled, &self.tc.interfaces),
            ("xdp", self.xdp.enabled, &self.xdp.interfaces),
        ] {
            let key = format!("{section}.interfaces");
            if enabled && names.is_empty() {
                return Err(bad(
                    &key,
                    "[]".into(),
                    &format!("at least one interface name while {section}.enabled = true"),
                ));
            }
            let mut seen = BTreeSet::new();
            for name in names {
                if !valid_ifname(name) {
                    return Err(bad(
                        &key,
                        format!("{name:?}"),
                        "interface names of 1 to 15 bytes without '/', ':' or whitespace",
                    ));
                }
                if !seen.insert(name) {
                    return Err(bad(&key, format!("{name:?}"), "each interface listed once"));
                }
            }
        }
        if self.kubernetes.enabled {
            self.validate_kubernetes(path)?;
        }
        if self.qos.enabled {
            self.qos.policy().map_err(|e| ConfigError::Value {
                path: path.to_owned(),
                key: e.key,
                value: e.value,
                allowed: e.allowed,
            })?;
        }
        Ok(())
    }
}

impl Config {
    fn validate_streams(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key: &str, value: String, allowed: &str| ConfigError::Value {
            path: path.to_owned(),
            key: key.to_owned(),
            value,
            allowed: allowed.to_owned(),
        };
        if self.bypass.stream_streak == 0 {
            return Err(bad(
                "bypass.stream_streak",
                "0".into(),
                "an integer of at least 1 (set small_msg_bytes and large_msg_bytes to 0 and \
                 loopback_streams_tcp to false to keep streams on the bypass)",
            ));
        }
        let (small, large) = (self.bypass.small_msg_bytes, self.bypass.large_msg_bytes);
        if large != 0 && large <= small {
            return Err(bad(
                "bypass.large_msg_bytes",
                large.to_string(),
                &format!("0 (off) or more than bypass.small_msg_bytes ({small})"),
            ));
        }
        let nodelay = self.bypass.large_msg_bytes_nodelay;
        // small_msg_bytes does not apply to TCP_NODELAY writers, so it bounds nothing here.
        if nodelay != 0 && large != 0 && nodelay > large {
            return Err(bad(
                "bypass.large_msg_bytes_nodelay",
                nodelay.to_string(),
                &format!("0 (as large_msg_bytes) or at most bypass.large_msg_bytes ({large})"),
            ));
        }
        Ok(())
    }

    fn validate_kubernetes(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key: &str, value: String, allowed: &str| ConfigError::Value {
            path: path.to_owned(),
            key: key.to_owned(),
            value,
            allowed: allowed.to_owned(),
        };
        let k = &self.kubernetes;
        if !self.qos.enabled {
            return Err(bad(
                "kubernetes.enabled",
                "true".into(),
                "only together with qos.enabled = true: the pods' QoS annotations are what is read",
            ));
        }
        if let Some(url) = &k.api_server {
            let ok = url.parse::<http::Uri>().is_ok_and(|u| {
                matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some()
            });
            if !ok {
                return Err(bad(
                    "kubernetes.api_server",
                    format!("{url:?}"),
                    "an http(s) URL like \"https://10.96.0.1:443\"",
                ));
            }
        }
        if let Some(node) = &k.node_name {
            if !valid_node_name(node) {
                return Err(bad(
                    "kubernetes.node_name",
                    format!("{node:?}"),
                    "a Kubernetes node name: 1 to 253 lowercase letters, digits, '-' and '.'",
                ));
            }
        }
        Ok(())
    }
}

/// A DNS subdomain name, as Kubernetes requires of node names.
pub fn valid_node_name(name: &str) -> bool {
    (1..=253).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !name.starts_with(['-', '.'])
        && !name.ends_with(['-', '.'])
}

fn quoted(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

/// Same rules as the kernel's `dev_valid_name`.
fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
}

/// Reconstructs the dotted key at `offset` from the nearest `[table]` header above it and the
/// key on its own line, so a type error reads `bypass.max_sockets` rather than a bare line.
fn key_at(text: &str, offset: usize) -> String {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("");
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim())
        .filter(|k| !k.is_empty());
    let table = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('[') && l.ends_with(']'))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim());
    match (table, key) {
        (Some(t), Some(k)) => format!("{t}.{k}"),
        (None, Some(k)) => k.to_owned(),
        (Some(t), None) => t.to_owned(),
        (None, None) => line.trim().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    fn err(text: &str) -> String {
        parse(text).expect_err("config must be refused").to_string()
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c, Config::default());
        assert!(c.bypass.enabled);
        assert_eq!(c.bypass.max_sockets, 262_144);
        assert_eq!(c.agent.pin_dir, Path::new(DEFAULT_PIN_DIR));
    }

    #[test]
    fn the_shipped_example_parses() {
        let text = include_str!("../../../deploy/quicklane.example.toml");
        let c = parse(text).unwrap();
        assert!(c.bypass.enabled);
    }

    #[test]
    fn full_config_parses() {
        let c = parse(
            r#"
            [agent]
            pin_dir = "/sys/fs/bpf/ql-x"
            run_dir = "/run/ql-x"
            [bypass]
            enabled = false
            cgroup = "/sys/fs/cgroup/kubepods"
            max_sockets = 1000
            include_cgroups = ["/sys/fs/cgroup/kubepods/pod1"]
            exclude_cgroups = ["/sys/fs/cgroup/kubepods/pod1/sidecar"]
            include_cidrs = ["10.0.0.0/8", "fd00::/8", "192.168.1.7"]
            exclude_cidrs = ["10.9.0.0/16"]
            include_ports = [8080]
            exclude_ports = [22]
            [tc]
            enabled = true
            interfaces = ["veth1", "veth2"]
            [xdp]
            enabled = true
            interfaces = ["eth0"]
            mode = "skb"
            "#,
        )
        .unwrap();
        assert_eq!(c.tc.interfaces, ["veth1", "veth2"]);
        assert_eq!(c.xdp.mode, XdpMode::Skb);
        assert_eq!(c.bypass.max_sockets, 1000);
        assert_eq!(c.bypass.include_cidrs[2].to_string(), "192.168.1.7/32");
        assert_eq!(c.bypass.exclude_cidrs[0].prefix_len, 16);
        assert_eq!(c.bypass.include_ports, [8080]);
    }

    #[test]
    fn bad_cidrs_and_ports_are_refused() {
        let e = err("[bypass]\ninclude_cidrs = [\"10.0.0.1/8\"]\n");
        assert!(e.contains("`bypass.include_cidrs`"), "{e}");
        assert!(e.contains("host bits set beyond /8"), "{e}");
        let e = err("[bypass]\nexclude_cidrs = [\"fd00::/129\"]\n");
        assert!(e.contains("prefix length must be 0 to 128"), "{e}");
        let e = err("[bypass]\ninclude_cidrs = [\"nonsense\"]\n");
        assert!(e.contains("is not a CIDR"), "{e}");
        let e = err("[bypass]\ninclude_ports = [70000]\n");
        assert!(
            e.contains("`bypass.include_ports`") && e.contains("70000"),
            "{e}"
        );
        let e = err("[bypass]\nexclude_ports = [0]\n");
        assert!(e.contains("ports from 1 to 65535"), "{e}");
        let e = err("[bypass]\nexclude_cgroups = [\"pod1\"]\n");
        assert!(e.contains("`bypass.exclude_cgroups`"), "{e}");
    }

    #[test]
    fn stream_bounds_must_leave_a_middle() {
        let e = err("[bypass]\nsmall_msg_bytes = 8192\nlarge_msg_bytes = 4096\n");
        assert!(e.contains("`bypass.large_msg_bytes`"), "{e}");
        assert!(e.contains("more than bypass.small_msg_bytes (8192)"), "{e}");
        let e = err("[bypass]\nstream_streak = 0\n");
        assert!(e.contains("`bypass.stream_streak`"), "{e}");
        for bad in [32769, 65536] {
            let e = err(&format!("[bypass]\nlarge_msg_bytes_nodelay = {bad}\n"));
            assert!(e.contains("`bypass.large_msg_bytes_nodelay`"), "{e}");
            assert!(e.contains("at most bypass.large_msg_bytes (32768)"), "{e}");
        }
        // Below small_msg_bytes too: that bound is for writers with Nagle's algorithm on.
        for good in [16384, 128] {
            let ok = parse(&format!("[bypass]\nlarge_msg_bytes_nodelay = {good}\n")).unwrap();
            assert_eq!(ok.bypass.large_msg_bytes_nodelay, good);
        }
        assert_eq!(
            parse("").unwrap().bypass.large_msg_bytes_nodelay,
            DEFAULT_LARGE_MSG_BYTES_NODELAY
        );
        let off = parse("[bypass]\nsmall_msg_bytes = 0\nlarge_msg_bytes = 0\n").unwrap();
        assert_eq!(
            (off.bypass.small_msg_bytes, off.bypass.large_msg_bytes),
            (0, 0)
        );
    }

    #[test]
    fn wrong_type_names_key_value_and_expectation() {
        let e = err("[bypass]\nmax_sockets = \"lots\"\n");
        assert!(e.contains("`bypass.max_sockets`"), "{e}");
        assert!(e.contains("\"lots\""), "{e}");
        assert!(e.contains("u32"), "{e}");
        assert!(e.contains("line 2"), "{e}");
    }

    #[test]
    fn unknown_key_lists_allowed_keys() {
        let e = err("[bypass]\nenable = true\n");
        assert!(e.contains("unknown field `enable`"), "{e}");
        assert!(e.contains("`enabled`"), "{e}");
    }

    #[test]
    fn unknown_section_is_refused() {
        let e = err("[qos2]\nx = 1\n");
        assert!(e.contains("unknown field `qos2`"), "{e}");
        assert!(e.contains("`bypass`"), "{e}");
    }

    #[test]
    fn bad_enum_value_lists_variants() {
        let e = err("[xdp]\nmode = \"fast\"\n");
        assert!(e.contains("`xdp.mode`"), "{e}");
        assert!(e.contains("fast"), "{e}");
        assert!(
            e.contains("`skb`") && e.contains("`native`") && e.contains("`auto`"),
            "{e}"
        );
    }

    #[test]
    fn out_of_range_value_names_range() {
        let e = err("[bypass]\nmax_sockets = 0\n");
        assert_eq!(
            e,
            "config test.toml: `bypass.max_sockets` = 0 is not allowed: an integer from 1 to 16777216"
        );
    }

    #[test]
    fn enabled_tc_needs_interfaces() {
        let e = err("[tc]\nenabled = true\n");
        assert!(e.contains("`tc.interfaces` = []"), "{e}");
    }

    #[test]
    fn bad_interface_names_are_refused() {
        for name in [
            "",
            "a/b",
            "this-name-is-too-long",
            "has space",
            "..",
            "eth0:1",
        ] {
            let e = err(&format!("[xdp]\nenabled = true\ninterfaces = [{name:?}]\n"));
            assert!(e.contains("`xdp.interfaces`"), "{name}: {e}");
            assert!(e.contains("1 to 15 bytes"), "{name}: {e}");
        }
        let e = err("[tc]\nenabled = true\ninterfaces = [\"a\", \"a\"]\n");
        assert!(e.contains("each interface listed once"), "{e}");
    }

    #[test]
    fn relative_paths_are_refused() {
        let e = err("[agent]\npin_dir = \"bpf/ql\"\n");
        assert!(e.contains("`agent.pin_dir` = \"bpf/ql\""), "{e}");
        let e = err("[bypass]\ncgroup = \"kubepods\"\n");
        assert!(e.contains("`bypass.cgroup`"), "{e}");
    }

    #[test]
    fn syntax_error_is_located() {
        let e = err("[bypass]\nenabled = \n");
        assert!(e.contains("line 2"), "{e}");
    }
}
