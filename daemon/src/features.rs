//! What this kernel offers the agent, found by trying each thing (loading a program, creating a
//! link, a qdisc, a device) rather than by reading a version number: distributions backport
//! features and build them as modules, so a version says little about what works.
//!
//! Probes leave nothing behind: programs and links are closed when their probe ends, devices
//! and qdiscs are made in a network namespace that only the probing thread uses and that
//! disappears with it, and the cgroup link is tried on a temporary child cgroup.
mod bpf;
mod links;
pub(crate) mod netlink;

use std::fmt::Write as _;

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{is_helper_supported, is_map_supported, is_program_supported, BpfHelper},
};
use serde::{Deserialize, Serialize};

/// A kernel capability the agent depends on, or will choose a mode by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Feature {
    ProgSockOps,
    ProgSkMsg,
    ProgSchedCls,
    ProgXdp,
    MapSockhash,
    MapXskmap,
    LinkCgroupSockOps,
    LinkSkMsg,
    LinkTcx,
    LinkXdp,
    AfXdp,
    SchFq,
    Netkit,
    KernelBtf,
}

impl Feature {
    pub const ALL: [Self; 14] = [
        Self::ProgSockOps,
        Self::ProgSkMsg,
        Self::ProgSchedCls,
        Self::ProgXdp,
        Self::MapSockhash,
        Self::MapXskmap,
        Self::LinkCgroupSockOps,
        Self::LinkSkMsg,
        Self::LinkTcx,
        Self::LinkXdp,
        Self::AfXdp,
        Self::SchFq,
        Self::Netkit,
        Self::KernelBtf,
    ];

    /// What it is, in the words an operator reads in `quicklane features`.
    pub fn describe(self) -> &'static str {
        match self {
            Self::ProgSockOps => "program type sock_ops",
            Self::ProgSkMsg => "program type sk_msg",
            Self::ProgSchedCls => "program type sched_cls (tc)",
            Self::ProgXdp => "program type xdp",
            Self::MapSockhash => "map type sockhash",
            Self::MapXskmap => "map type xskmap",
            Self::LinkCgroupSockOps => "bpf_link: sock_ops on a cgroup",
            Self::LinkSkMsg => "bpf_link: sk_msg on a sockhash",
            Self::LinkTcx => "bpf_link: tc on a device (TCX)",
            Self::LinkXdp => "bpf_link: xdp on a device",
            Self::AfXdp => "AF_XDP sockets",
            Self::SchFq => "sch_fq qdisc",
            Self::Netkit => "netkit devices",
            Self::KernelBtf => "kernel BTF with tcp_sock.nonagle and the psock layout",
        }
    }

    /// Which part of the agent needs it.
    pub fn needed_for(self) -> &'static str {
        match self {
            Self::ProgSockOps | Self::ProgSkMsg | Self::MapSockhash => "bypass",
            Self::LinkCgroupSockOps | Self::LinkSkMsg => "bypass (pinned attachments)",
            Self::ProgSchedCls => "qos",
            Self::LinkTcx => "qos (pinned attachments)",
            Self::ProgXdp | Self::MapXskmap | Self::AfXdp => "vm fast path",
            Self::LinkXdp => "vm fast path (pinned attachments)",
            Self::SchFq => "qos: EDT pacing (timestamps need fq to be honoured)",
            Self::Netkit => "netkit pod interfaces",
            Self::KernelBtf => {
                "bypass: the TCP_NODELAY stream bound, readers leaving after their writer; \
                 qos: adopting IPv6 connections"
            }
        }
    }
}

/// The outcome of one probe. `ProbeFailed` is kept apart from `Missing`: a probe that could
/// not decide (no privileges, an unexpected errno) must not read as "the kernel lacks it".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "support", rename_all = "snake_case")]
pub enum Support {
    Available,
    Missing { reason: String },
    ProbeFailed { error: String },
}

impl Support {
    pub fn is_available(&self) -> bool {
        matches!(self, Self::Available)
    }

    fn from_probe<E: std::fmt::Display>(result: Result<bool, E>, missing: &str) -> Self {
        match result {
            Ok(true) => Self::Available,
            Ok(false) => Self::Missing {
                reason: missing.to_owned(),
            },
            Err(e) => Self::ProbeFailed {
                error: e.to_string(),
            },
        }
    }

    fn label(&self) -> &'static str {
        match self {
            Self::Available => "yes",
            Self::Missing { .. } => "no",
            Self::ProbeFailed { .. } => "??",
        }
    }

    fn detail(&self) -> Option<&str> {
        match self {
            Self::Available => None,
            Self::Missing { reason } => Some(reason),
            Self::ProbeFailed { error } => Some(error),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    pub feature: Feature,
    #[serde(flatten)]
    pub support: Support,
}

/// A helper call one of quicklane's programs makes, probed for that program's type: helper
/// availability differs per program type and kernel (6.1 has no bpf_get_current_cgroup_id in
/// sock_ops, for one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelperProbe {
    pub program_type: String,
    pub helper: String,
    #[serde(flatten)]
    pub support: Support,
}

/// The helpers quicklane's BPF programs call (ebpf-*/src), by program type. Universal helpers
/// (map lookup and update) are left out. The verifier remains the last word: `quicklane
/// verify` loads the real programs.
const HELPERS: &[(ProgramType, &str, BpfHelper, &str)] = &[
    (
        ProgramType::SockOps,
        "sock_ops",
        BpfHelper::BPF_FUNC_sock_hash_update,
        "sock_hash_update",
    ),
    (
        ProgramType::SockOps,
        "sock_ops",
        BpfHelper::BPF_FUNC_get_socket_cookie,
        "get_socket_cookie",
    ),
    (
        ProgramType::SockOps,
        "sock_ops",
        BpfHelper::BPF_FUNC_get_netns_cookie,
        "get_netns_cookie",
    ),
    (
        ProgramType::SockOps,
        "sock_ops",
        BpfHelper::BPF_FUNC_get_current_cgroup_id,
        "get_current_cgroup_id",
    ),
    (
        ProgramType::SockOps,
        "sock_ops",
        BpfHelper::BPF_FUNC_get_current_ancestor_cgroup_id,
        "get_current_ancestor_cgroup_id",
    ),
    (
        ProgramType::SkMsg,
        "sk_msg",
        BpfHelper::BPF_FUNC_msg_redirect_hash,
        "msg_redirect_hash",
    ),
    (
        ProgramType::SkMsg,
        "sk_msg",
        BpfHelper::BPF_FUNC_get_current_cgroup_id,
        "get_current_cgroup_id",
    ),
    (
        ProgramType::SkMsg,
        "sk_msg",
        BpfHelper::BPF_FUNC_get_current_ancestor_cgroup_id,
        "get_current_ancestor_cgroup_id",
    ),
];

/// Everything the probes found on this kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Features {
    /// `uname -r`, for the reader; no decision is made on it.
    pub kernel: String,
    pub features: Vec<Probe>,
    pub helpers: Vec<HelperProbe>,
}

impl Features {
    /// Runs every probe. Never fails as a whole: each probe records its own failure.
    pub fn probe() -> Self {
        let mut features: Vec<Probe> = Vec::with_capacity(Feature::ALL.len());
        let mut record = |feature, support| features.push(Probe { feature, support });
        for (feature, ty) in [
            (Feature::ProgSockOps, ProgramType::SockOps),
            (Feature::ProgSkMsg, ProgramType::SkMsg),
            (Feature::ProgSchedCls, ProgramType::SchedClassifier),
            (Feature::ProgXdp, ProgramType::Xdp),
        ] {
            record(
                feature,
                Support::from_probe(
                    is_program_supported(ty),
                    "the kernel refuses this program type",
                ),
            );
        }
        for (feature, ty) in [
            (Feature::MapSockhash, MapType::SockHash),
            (Feature::MapXskmap, MapType::XskMap),
        ] {
            record(
                feature,
                Support::from_probe(is_map_supported(ty), "the kernel refuses this map type"),
            );
        }
        record(Feature::LinkCgroupSockOps, links::cgroup_sock_ops());
        record(Feature::LinkSkMsg, links::sk_msg());
        let in_netns = netlink::probe_in_throwaway_netns();
        record(Feature::LinkTcx, in_netns.tcx);
        record(Feature::LinkXdp, in_netns.xdp);
        record(Feature::AfXdp, af_xdp());
        record(Feature::SchFq, in_netns.fq);
        record(Feature::Netkit, in_netns.netkit);
        record(Feature::KernelBtf, kernel_btf());
        features.sort_by_key(|p| p.feature);

        let helpers = HELPERS
            .iter()
            .map(|&(ty, ty_name, helper, name)| HelperProbe {
                program_type: ty_name.to_owned(),
                helper: name.to_owned(),
                support: Support::from_probe(
                    is_helper_supported(ty, helper),
                    "the verifier does not offer it to this program type",
                ),
            })
            .collect();
        Self {
            kernel: kernel_release(),
            features,
            helpers,
        }
    }

    pub fn support(&self, feature: Feature) -> Option<&Support> {
        self.features
            .iter()
            .find(|p| p.feature == feature)
            .map(|p| &p.support)
    }

    pub fn available(&self, feature: Feature) -> bool {
        self.support(feature).is_some_and(Support::is_available)
    }

    /// A few lines for `quicklane status`: the count, and only what is not available.
    pub fn render_summary(&self) -> String {
        let all = self
            .features
            .iter()
            .map(|p| (p.feature.describe().to_owned(), &p.support))
            .chain(self.helpers.iter().map(|h| {
                (
                    format!("helper {} in {}", h.helper, h.program_type),
                    &h.support,
                )
            }));
        let mut s = String::new();
        let mut lacking = String::new();
        let (mut total, mut available) = (0, 0);
        for (name, support) in all {
            total += 1;
            match support.detail() {
                None => available += 1,
                Some(detail) => {
                    let _ = writeln!(lacking, "  {:<3} {name}: {detail}", support.label());
                }
            }
        }
        let _ = writeln!(
            s,
            "features (kernel {}): {available} of {total} available; `quicklane features` lists them",
            self.kernel
        );
        s.push_str(&lacking);
        s
    }

    pub fn render_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "kernel {}", self.kernel);
        for p in &self.features {
            let _ = write!(
                s,
                "  {:<3} {:<34} {}",
                p.support.label(),
                p.feature.describe(),
                p.feature.needed_for()
            );
            if let Some(detail) = p.support.detail() {
                let _ = write!(s, "\n      {detail}");
            }
            s.push('\n');
        }
        for h in &self.helpers {
            let name = format!("helper {} in {}", h.helper, h.program_type);
            let _ = write!(s, "  {:<3} {name}", h.support.label());
            if let Some(detail) = h.support.detail() {
                let _ = write!(s, "\n      {detail}");
            }
            s.push('\n');
        }
        s
    }
}

fn af_xdp() -> Support {
    match quicklane_xsk::XskSocket::open() {
        Ok(_) => Support::Available,
        Err(e @ quicklane_xsk::XskError::Unsupported(_)) => Support::Missing {
            reason: e.to_string(),
        },
        Err(e) => Support::ProbeFailed {
            error: e.to_string(),
        },
    }
}

/// The kernel's BTF, and in it the member sk_msg reads a writer's TCP_NODELAY from.
fn kernel_btf() -> Support {
    use crate::datapath::btf;
    match std::fs::read(btf::VMLINUX) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Support::Missing {
            reason: format!("no {}: the kernel was built without BTF", btf::VMLINUX),
        },
        Err(e) => Support::ProbeFailed {
            error: format!("reading {}: {e}", btf::VMLINUX),
        },
        Ok(bytes) => match btf::nonagle_bit(&bytes).and(btf::psock_layout_of(&bytes)) {
            Ok(_) => Support::Available,
            Err(e) => Support::Missing {
                reason: format!("{}: {e}", btf::VMLINUX),
            },
        },
    }
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").map_or_else(
        |e| format!("unknown ({e})"),
        |release| release.trim().to_owned(),
    )
}

/// How a failed attach or create reads: the errnos the kernel gives for "no such thing here"
/// are `Missing`, anything else is a probe that could not decide.
fn classify(error: &std::io::Error, missing_errnos: &[i32], missing: &str) -> Support {
    match error.raw_os_error() {
        Some(errno) if missing_errnos.contains(&errno) => Support::Missing {
            reason: format!("{missing}: {error}"),
        },
        _ => Support::ProbeFailed {
            error: error.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_named_errnos_mean_missing() {
        let enoent = std::io::Error::from_raw_os_error(libc::ENOENT);
        let eperm = std::io::Error::from_raw_os_error(libc::EPERM);
        assert!(matches!(
            classify(&enoent, &[libc::ENOENT], "no sch_fq"),
            Support::Missing { reason } if reason.starts_with("no sch_fq: ")
        ));
        assert!(matches!(
            classify(&eperm, &[libc::ENOENT], "no sch_fq"),
            Support::ProbeFailed { .. }
        ));
    }

    #[test]
    fn json_names_each_feature_and_its_support() {
        let features = Features {
            kernel: "6.1.0-56-amd64".to_owned(),
            features: vec![
                Probe {
                    feature: Feature::SchFq,
                    support: Support::Available,
                },
                Probe {
                    feature: Feature::LinkTcx,
                    support: Support::Missing {
                        reason: "no TCX".to_owned(),
                    },
                },
            ],
            helpers: Vec::new(),
        };
        let json = serde_json::to_value(&features).unwrap();
        assert_eq!(json["features"][0]["feature"], "sch_fq");
        assert_eq!(json["features"][0]["support"], "available");
        assert_eq!(json["features"][1]["support"], "missing");
        assert_eq!(json["features"][1]["reason"], "no TCX");
        let back: Features = serde_json::from_value(json).unwrap();
        assert_eq!(back, features);
        assert!(back.available(Feature::SchFq));
        assert!(!back.available(Feature::LinkTcx));
        assert!(!back.available(Feature::Netkit));
    }
}
