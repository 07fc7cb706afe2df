//! Attaching one program to its target, preferring a pinnable bpf_link and falling back to
//! the legacy attachment where the kernel has no link of that kind (see `legacy`).
use std::{fs::File, os::fd::AsFd as _, path::Path};

use aya::{
    maps::Map,
    programs::{
        links::{FdLink, LinkOrder, PinnedLink},
        tc::{self, NlOptions, TcAttachOptions},
        xdp::XdpMode as AyaXdpMode,
        CgroupAttachMode, SchedClassifier, SkMsg, SockOps, TcAttachType, Xdp,
    },
    Ebpf,
};

use super::{
    legacy, pin_err,
    plan::{Attachment, Target},
    DatapathError, Held,
};
use crate::{config::XdpMode, paths::PinDir, sys};

/// One program may serve several attachments (tc on many interfaces); load it only once.
macro_rules! load_once {
    ($prog:expr, $att:expr) => {
        if $prog.fd().is_err() {
            let program = $att.program;
            $prog
                .load()
                .map_err(|source| DatapathError::ProgramLoad { program, source })?;
        }
    };
}

pub(super) fn attach(
    ebpf: &mut Ebpf,
    att: &Attachment,
    pins: &PinDir,
) -> Result<Held, DatapathError> {
    let link = match &att.target {
        Target::Cgroup(path) => attach_cgroup(ebpf, att, path)?,
        Target::Sockhash => return attach_sockhash(ebpf, att, pins),
        Target::TcEgress { ifname, .. } => {
            match attach_tc(ebpf, att, ifname, TcAttachType::Egress)? {
                Some(link) => link,
                None => return pin_legacy::<SchedClassifier>(ebpf, att, pins),
            }
        }
        Target::TcIngress { ifname, .. } => {
            match attach_tc(ebpf, att, ifname, TcAttachType::Ingress)? {
                Some(link) => link,
                None => return pin_legacy::<SchedClassifier>(ebpf, att, pins),
            }
        }
        Target::Xdp { ifname, mode, .. } => attach_xdp(ebpf, att, ifname, *mode)?,
    };
    let pin = pins.link(&att.pin_name);
    link.pin(&pin).map(Held::Link).map_err(|e| pin_err(&pin, e))
}

fn fail(att: &Attachment, message: String) -> DatapathError {
    DatapathError::Attach {
        program: att.program,
        target: att.target.describe(),
        message,
    }
}

fn attach_cgroup(ebpf: &mut Ebpf, att: &Attachment, path: &Path) -> Result<FdLink, DatapathError> {
    let cgroup = File::open(path).map_err(|source| DatapathError::Cgroup {
        path: path.to_owned(),
        source,
    })?;
    let prog: &mut SockOps = program_mut(ebpf, att)?;
    load_once!(prog, att);
    // A cgroup bpf_link always coexists with other programs; the kernel refuses
    // BPF_F_ALLOW_MULTI on link_create, so Single is the right mode here.
    let id = prog
        .attach(&cgroup, CgroupAttachMode::Single)
        .map_err(|e| fail(att, chain(&e)))?;
    fd_link(prog.take_link(id)).map_err(|e| fail(att, e))
}

fn attach_sockhash(
    ebpf: &mut Ebpf,
    att: &Attachment,
    pins: &PinDir,
) -> Result<Held, DatapathError> {
    let map_fd = {
        let map = ebpf.map("QL_SOCKS").ok_or(DatapathError::MissingProgram {
            object: att.object.name(),
            program: "QL_SOCKS",
        })?;
        let Map::SockHash(data) = map else {
            return Err(fail(att, "QL_SOCKS is not a sockhash".to_owned()));
        };
        data.fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| fail(att, chain(&e)))?
    };
    let prog: &mut SkMsg = program_mut(ebpf, att)?;
    load_once!(prog, att);
    let prog_fd = prog.fd().map_err(|e| fail(att, chain(&e)))?;
    let linked = if legacy::forced() {
        None
    } else {
        match sys::sk_msg_link_create(prog_fd.as_fd(), map_fd.as_fd()) {
            Ok(link) => Some(link),
            // No sockmap links before 6.10: fall back to prog_attach, reported as such.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => None,
            Err(e) => return Err(fail(att, e.to_string())),
        }
    };
    if let Some(link) = linked {
        let pin = pins.link(&att.pin_name);
        sys::obj_pin(link.as_fd(), &pin).map_err(|e| pin_err(&pin, e))?;
        return PinnedLink::from_pin(&pin)
            .map(Held::Link)
            .map_err(|e| pin_err(&pin, e));
    }
    sys::sk_msg_prog_attach(prog_fd.as_fd(), map_fd.as_fd())
        .map_err(|e| fail(att, e.to_string()))?;
    pin_legacy::<SkMsg>(ebpf, att, pins)
}

/// A TCX link, or `None` after a legacy cls_bpf attach (no TCX before 6.6, or forced).
fn attach_tc(
    ebpf: &mut Ebpf,
    att: &Attachment,
    ifname: &str,
    kind: TcAttachType,
) -> Result<Option<FdLink>, DatapathError> {
    let prog: &mut SchedClassifier = program_mut(ebpf, att)?;
    load_once!(prog, att);
    if !legacy::forced() {
        // Explicitly TCX: aya would otherwise fall back to netlink by itself.
        let order = TcAttachOptions::TcxOrder(LinkOrder::default());
        if let Ok(id) = prog.attach_with_options(ifname, kind, order) {
            return fd_link(prog.take_link(id))
                .map(Some)
                .map_err(|e| fail(att, e));
        }
    }
    // A cls_bpf filter under clsact, which may exist already.
    match tc::qdisc_add_clsact(ifname) {
        Ok(()) | Err(tc::TcError::AlreadyAttached) => {}
        Err(e) if already_exists(&e) => {}
        Err(e) => return Err(fail(att, format!("adding clsact: {}", chain(&e)))),
    }
    let options = TcAttachOptions::Netlink(NlOptions::default());
    let id = prog
        .attach_with_options(ifname, kind, options)
        .map_err(|e| fail(att, chain(&e)))?;
    // The filter lives in the kernel; dropping aya's handle would remove it.
    std::mem::forget(prog.take_link(id).map_err(|e| fail(att, chain(&e)))?);
    Ok(None)
}

fn attach_xdp(
    ebpf: &mut Ebpf,
    att: &Attachment,
    ifname: &str,
    mode: XdpMode,
) -> Result<FdLink, DatapathError> {
    let flags = match mode {
        XdpMode::Auto => AyaXdpMode::Default,
        XdpMode::Skb => AyaXdpMode::Skb,
        XdpMode::Native => AyaXdpMode::Driver,
    };
    let prog: &mut Xdp = program_mut(ebpf, att)?;
    load_once!(prog, att);
    let id = prog.attach(ifname, flags).map_err(|e| {
        let hint = if mode == XdpMode::Native {
            "; the driver may have no native XDP: set xdp.mode = \"skb\""
        } else {
            ""
        };
        fail(att, format!("{e}{hint}"))
    })?;
    fd_link(prog.take_link(id)).map_err(|e| fail(att, e))
}

/// Pins the program of a legacy attachment under `<pin>@prog` (see `legacy`).
fn pin_legacy<P>(ebpf: &mut Ebpf, att: &Attachment, pins: &PinDir) -> Result<Held, DatapathError>
where
    P: PinProgram,
    for<'a> &'a mut P: TryFrom<&'a mut aya::programs::Program>,
{
    let path = pins.link(&legacy::pin_name(&att.pin_name));
    program_mut::<P>(ebpf, att)?
        .pin_at(&path)
        .map_err(|e| pin_err(&path, e))?;
    tracing::warn!(pin = %att.pin_name, "no bpf_link of this kind here: attached the legacy way");
    legacy::Legacy::from_pin(&att.pin_name, pins).map(Held::Legacy)
}

/// aya's `pin` per program type, behind one name.
trait PinProgram {
    fn pin_at(&mut self, path: &Path) -> Result<(), aya::pin::PinError>;
}

impl PinProgram for SkMsg {
    fn pin_at(&mut self, path: &Path) -> Result<(), aya::pin::PinError> {
        self.pin(path)
    }
}

impl PinProgram for SchedClassifier {
    fn pin_at(&mut self, path: &Path) -> Result<(), aya::pin::PinError> {
        self.pin(path)
    }
}

/// Whether an io error with `EEXIST` is among the sources (netlink wraps it).
fn already_exists(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(err) = next {
        if err
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::AlreadyExists)
        {
            return true;
        }
        next = err.source();
    }
    false
}

/// An error with its sources: aya's `SyscallError` keeps the errno in its source.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        next = cause.source();
    }
    s
}

/// A freshly attached link as a pinnable fd link; legacy (non-link) attachments are refused.
fn fd_link<L>(taken: Result<L, aya::programs::ProgramError>) -> Result<FdLink, String>
where
    FdLink: TryFrom<L, Error = aya::programs::links::LinkError>,
{
    let link = taken.map_err(|e| chain(&e))?;
    FdLink::try_from(link)
        .map_err(|e| format!("{e}: the kernel gave a legacy attachment, not a bpf_link"))
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, att: &Attachment) -> Result<&'a mut T, DatapathError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program>,
{
    let missing = || DatapathError::MissingProgram {
        object: att.object.name(),
        program: att.program,
    };
    let prog = ebpf.program_mut(att.program).ok_or_else(missing)?;
    prog.try_into().map_err(|_| missing())
}
