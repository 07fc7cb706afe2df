//! Attachments for kernels without the bpf_link kind the agent prefers: sk_msg attached to the
//! sockhash with prog_attach (sockmap links need 6.10), tc as a netlink cls_bpf filter under
//! clsact (TCX needs 6.6). Neither lives in an fd, so neither can be pinned as a link; the
//! program is pinned instead, as `<pin name>@prog`, which is what marks the attachment as ours
//! for re-adoption, status and detach.
use std::{
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::programs::{tc, ProgramInfo, SkMsg, TcAttachType};

use super::{open_pinned_map, pin_err, DatapathError};
use crate::{paths::PinDir, sys};

// bpffs refuses dots in names ("reserved for future use").
const SUFFIX: &str = "@prog";

/// Forces the legacy attachments where the kernel offers links too, so they are tested on
/// every kernel (the integration tests set it); also a way out if a link kind misbehaves.
pub const FORCE_ENV: &str = "QUICKLANE_LEGACY_ATTACH";

pub fn forced() -> bool {
    std::env::var_os(FORCE_ENV).is_some_and(|v| v == "1")
}

pub fn pin_name(base: &str) -> String {
    format!("{base}{SUFFIX}")
}

/// The attachment name a legacy program pin stands for, if `file` is one.
pub fn base_name(file: &str) -> Option<&str> {
    file.strip_suffix(SUFFIX)
}

#[derive(Debug)]
enum Kind {
    SkMsg,
    Tc {
        ifname: String,
        attach_type: TcAttachType,
        program: &'static str,
    },
}

/// One legacy attachment, known by its program pin.
#[derive(Debug)]
pub struct Legacy {
    pin: PathBuf,
    kind: Kind,
}

impl Legacy {
    /// Reconstructs the attachment from its pin name (see `plan`: `sk_msg`,
    /// `tc-egress-<if>-<ifindex>`, `tc-ingress-<if>-<ifindex>`).
    pub fn from_pin(base: &str, pins: &PinDir) -> Result<Self, DatapathError> {
        let pin = pins.link(&pin_name(base));
        let tc = |rest: &str, attach_type, program| {
            let (ifname, _ifindex) = rest.rsplit_once('-')?;
            Some(Kind::Tc {
                ifname: ifname.to_owned(),
                attach_type,
                program,
            })
        };
        let kind = if base == "sk_msg" {
            Some(Kind::SkMsg)
        } else if let Some(rest) = base.strip_prefix("tc-egress-") {
            tc(rest, TcAttachType::Egress, "ql_tc_egress")
        } else if let Some(rest) = base.strip_prefix("tc-ingress-") {
            tc(rest, TcAttachType::Ingress, "ql_tc_ingress")
        } else {
            None
        };
        let kind = kind.ok_or_else(|| pin_err(&pin, "not a pin name quicklane writes"))?;
        Ok(Self { pin, kind })
    }

    pub fn program_info(path: &Path) -> Result<ProgramInfo, DatapathError> {
        ProgramInfo::from_pin(path).map_err(|e| pin_err(path, e))
    }

    /// Detaches and removes the program pin. An interface that is gone took its filter with it.
    pub fn detach(self, pins: &PinDir) -> Result<(), DatapathError> {
        match &self.kind {
            Kind::SkMsg => {
                let prog = SkMsg::from_pin(&self.pin).map_err(|e| pin_err(&self.pin, e))?;
                let map = open_pinned_map(pins, "QL_SOCKS")?;
                let prog_fd = prog.fd().map_err(|e| pin_err(&self.pin, e))?;
                match sys::sk_msg_prog_detach(prog_fd.as_fd(), map.fd().as_fd()) {
                    Err(e) if e.raw_os_error() != Some(libc::ENOENT) => {
                        return Err(pin_err(&self.pin, e));
                    }
                    _ => {}
                }
            }
            Kind::Tc {
                ifname,
                attach_type,
                program,
            } => match tc::qdisc_detach_program(ifname, *attach_type, program) {
                Err(tc::TcError::IoError(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) if nix::net::if_::if_nametoindex(ifname.as_str()).is_err() => {
                    tracing::info!(ifname, "interface gone, its filter with it: {e}");
                }
                Err(e) => return Err(pin_err(&self.pin, e)),
                Ok(()) => {}
            },
        }
        std::fs::remove_file(&self.pin).map_err(|e| pin_err(&self.pin, e))
    }
}
