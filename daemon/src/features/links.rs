//! Whether each attachment the agent pins can be a bpf_link here: attach a trivial program of
//! the right type the way the agent would, then close the link at once.
use std::{
    fs::File,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use super::{bpf, classify, Support};

/// Older kernels answer an unknown attach type or a link type they cannot create with EINVAL.
const MISSING_LINK: &[i32] = &[libc::EINVAL, libc::EOPNOTSUPP];

/// sock_ops as a cgroup link, on a temporary child cgroup so no real socket ever runs it.
pub fn cgroup_sock_ops() -> Support {
    let Some(root) = crate::cgroup::cgroup2_mount() else {
        return Support::ProbeFailed {
            error: "no cgroup v2 hierarchy is mounted".to_owned(),
        };
    };
    let cgroup = match ScratchCgroup::create(&root) {
        Ok(c) => c,
        Err(e) => return failed("creating a scratch cgroup", &e),
    };
    let dir = match File::open(&cgroup.0) {
        Ok(d) => d,
        Err(e) => return failed("opening the scratch cgroup", &e),
    };
    let prog = match bpf::trivial_program(bpf::PROG_TYPE_SOCK_OPS, 0, 1) {
        Ok(p) => p,
        Err(e) => return failed("loading a sock_ops program", &e),
    };
    attach_result(
        bpf::link_to_fd(prog.as_fd(), dir.as_fd(), bpf::ATTACH_CGROUP_SOCK_OPS),
        "no cgroup bpf_link for sock_ops",
    )
}

/// sk_msg as a sockmap link (kernel >= 6.10 upstream), on a one-entry sockhash.
pub fn sk_msg() -> Support {
    let map = match bpf::sockhash() {
        Ok(m) => m,
        Err(e) => return failed("creating a sockhash", &e),
    };
    let prog = match bpf::trivial_program(bpf::PROG_TYPE_SK_MSG, 0, 1) {
        Ok(p) => p,
        Err(e) => return failed("loading an sk_msg program", &e),
    };
    attach_result(
        bpf::link_to_fd(prog.as_fd(), map.as_fd(), bpf::ATTACH_SK_MSG_VERDICT),
        "no sockmap bpf_link for sk_msg",
    )
}

/// tc as a TCX link on `ifindex` of the calling thread's namespace.
pub fn tcx(ifindex: u32) -> Support {
    // TC_ACT_UNSPEC (-1): like the agent's programs, never change a verdict.
    let prog = match bpf::trivial_program(bpf::PROG_TYPE_SCHED_CLS, 0, -1) {
        Ok(p) => p,
        Err(e) => return failed("loading a sched_cls program", &e),
    };
    attach_result(
        bpf::link_to_ifindex(prog.as_fd(), ifindex, bpf::ATTACH_TCX_INGRESS, 0),
        "no TCX",
    )
}

/// XDP as a link in generic (skb) mode, which every device has.
pub fn xdp(ifindex: u32) -> Support {
    const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
    // XDP_PASS
    let prog = match bpf::trivial_program(bpf::PROG_TYPE_XDP, bpf::ATTACH_XDP, 2) {
        Ok(p) => p,
        Err(e) => return failed("loading an xdp program", &e),
    };
    attach_result(
        bpf::link_to_ifindex(prog.as_fd(), ifindex, bpf::ATTACH_XDP, XDP_FLAGS_SKB_MODE),
        "no XDP bpf_link",
    )
}

fn attach_result<T>(result: std::io::Result<T>, missing: &str) -> Support {
    match result {
        // Dropping the link's fd detaches it.
        Ok(_) => Support::Available,
        Err(e) => classify(&e, MISSING_LINK, missing),
    }
}

fn failed(step: &str, e: &std::io::Error) -> Support {
    Support::ProbeFailed {
        error: format!("{step}: {e}"),
    }
}

/// A child cgroup that exists for one probe and is removed when dropped.
struct ScratchCgroup(PathBuf);

impl ScratchCgroup {
    fn create(root: &Path) -> std::io::Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "quicklane-probe-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let path = root.join(name);
        std::fs::create_dir(&path)?;
        Ok(Self(path))
    }
}

impl Drop for ScratchCgroup {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir(&self.0) {
            tracing::warn!(cgroup = %self.0.display(), "removing the probe's scratch cgroup: {e}");
        }
    }
}
