//! What the configuration asks to be attached, each under a pin name that encodes its target,
//! so a changed target (another cgroup, a recreated interface) never re-adopts a stale link.
use std::{os::unix::fs::MetadataExt as _, path::PathBuf};

use nix::net::if_::if_nametoindex;

use super::{objects::Object, DatapathError};
use crate::config::{Config, XdpMode};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// sock_ops on a cgroup v2 directory.
    Cgroup(PathBuf),
    /// sk_msg on quicklane's sockhash.
    Sockhash,
    TcEgress {
        ifname: String,
        ifindex: u32,
    },
    TcIngress {
        ifname: String,
        ifindex: u32,
    },
    Xdp {
        ifname: String,
        ifindex: u32,
        mode: XdpMode,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub pin_name: String,
    pub object: Object,
    pub program: &'static str,
    pub target: Target,
}

impl Target {
    pub fn describe(&self) -> String {
        match self {
            Self::Cgroup(p) => format!("cgroup {}", p.display()),
            Self::Sockhash => "sockhash QL_SOCKS".to_owned(),
            Self::TcEgress { ifname, .. } => format!("{ifname} egress"),
            Self::TcIngress { ifname, .. } => format!("{ifname} ingress"),
            Self::Xdp { ifname, mode, .. } => format!("{ifname} xdp ({mode})"),
        }
    }
}

/// Everything `config` asks for, plus the tc programs on `pod_interfaces` (pods from the
/// pod source).
pub fn plan(
    config: &Config,
    pod_interfaces: &[String],
    default_cgroup: impl FnOnce() -> Result<PathBuf, DatapathError>,
) -> Result<Vec<Attachment>, DatapathError> {
    let mut out = Vec::new();
    // sock_ops serves the bypass and QoS pacing; sk_msg only the bypass.
    if config.bypass.enabled || config.qos.enabled {
        let cgroup = match &config.bypass.cgroup {
            Some(p) => p.clone(),
            None => default_cgroup()?,
        };
        let ino = std::fs::metadata(&cgroup)
            .map_err(|source| DatapathError::Cgroup {
                path: cgroup.clone(),
                source,
            })?
            .ino();
        out.push(Attachment {
            pin_name: format!("sockops-cg{ino}"),
            object: Object::Sockops,
            program: "ql_sockops",
            target: Target::Cgroup(cgroup),
        });
    }
    if config.bypass.enabled {
        out.push(Attachment {
            pin_name: "sk_msg".to_owned(),
            object: Object::Sockops,
            program: "ql_sk_msg",
            target: Target::Sockhash,
        });
    }
    let mut ifnames = config.tc_interfaces();
    if config.qos.enabled {
        for ifname in pod_interfaces {
            if !ifnames.contains(ifname) {
                ifnames.push(ifname.clone());
            }
        }
    }
    for ifname in &ifnames {
        let key = if config.tc.interfaces.contains(ifname) {
            "tc.interfaces"
        } else {
            "qos.pods.interface"
        };
        out.extend(tc_attachments(ifname, key)?);
    }
    if config.xdp.enabled {
        for ifname in &config.xdp.interfaces {
            let ifindex = ifindex(ifname, "xdp.interfaces")?;
            out.push(Attachment {
                pin_name: format!("xdp-{ifname}-{ifindex}"),
                object: Object::Xdp,
                program: "ql_xdp",
                target: Target::Xdp {
                    ifname: ifname.clone(),
                    ifindex,
                    mode: config.xdp.mode,
                },
            });
        }
    }
    Ok(out)
}

/// The tc programs on both directions of `ifname`.
pub fn tc_attachments(ifname: &str, key: &'static str) -> Result<[Attachment; 2], DatapathError> {
    let ifindex = ifindex(ifname, key)?;
    let ifname = ifname.to_owned();
    Ok([
        Attachment {
            pin_name: format!("{TC_PIN_PREFIX}egress-{ifname}-{ifindex}"),
            object: Object::Tc,
            program: "ql_tc_egress",
            target: Target::TcEgress {
                ifname: ifname.clone(),
                ifindex,
            },
        },
        Attachment {
            pin_name: format!("{TC_PIN_PREFIX}ingress-{ifname}-{ifindex}"),
            object: Object::Tc,
            program: "ql_tc_ingress",
            target: Target::TcIngress { ifname, ifindex },
        },
    ])
}

const TC_PIN_PREFIX: &str = "tc-";

pub fn is_tc_pin(pin: &str) -> bool {
    pin.starts_with(TC_PIN_PREFIX)
}

fn ifindex(ifname: &str, key: &'static str) -> Result<u32, DatapathError> {
    if_nametoindex(ifname).map_err(|source| DatapathError::NoInterface {
        key,
        ifname: ifname.to_owned(),
        source,
    })
}
