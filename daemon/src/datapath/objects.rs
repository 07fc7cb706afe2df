//! The BPF objects built by build.rs, embedded so the binary is self-contained.
use aya::include_bytes_aligned;

pub static SOCKOPS: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ql-sockops.o"));
pub static TC: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ql-tc.o"));
pub static XDP: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ql-xdp.o"));

/// Which embedded object a program or map lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Object {
    Sockops,
    Tc,
    Xdp,
}

impl Object {
    pub const ALL: [Self; 3] = [Self::Sockops, Self::Tc, Self::Xdp];

    pub fn bytes(self) -> &'static [u8] {
        match self {
            Self::Sockops => SOCKOPS,
            Self::Tc => TC,
            Self::Xdp => XDP,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Sockops => "sockops",
            Self::Tc => "tc",
            Self::Xdp => "xdp",
        }
    }

    /// The per-CPU statistics map and its slot names.
    pub fn stats(self) -> (&'static str, &'static [&'static str]) {
        use quicklane_common::counters;
        match self {
            Self::Sockops => ("QL_SOCKOPS_STATS", counters::sockops::NAMES),
            Self::Tc => ("QL_TC_STATS", counters::tc::NAMES),
            Self::Xdp => ("QL_XDP_STATS", counters::xdp::NAMES),
        }
    }

    /// Every program in the object, by the name the kernel shows.
    pub fn programs(self) -> &'static [&'static str] {
        match self {
            Self::Sockops => &["ql_sockops", "ql_sk_msg", "ql_adopt"],
            Self::Tc => &["ql_tc_egress", "ql_tc_ingress"],
            Self::Xdp => &["ql_xdp"],
        }
    }
}
