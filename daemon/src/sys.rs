//! The two bpf(2) calls aya 0.14 does not expose: a bpf_link for an sk_msg program on a
//! sockhash (aya uses the legacy prog_attach, which cannot be pinned), and pinning that link.
use std::{
    ffi::CString,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::Path,
};

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_SK_MSG_VERDICT: u32 = 7;

/// The prefix of `union bpf_attr` used by `BPF_LINK_CREATE`; the kernel zero-extends the rest.
/// `target` is an fd (cgroup, map) or an ifindex, by attach type.
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target: u32,
    attach_type: u32,
    flags: u32,
    _rest: [u64; 4],
}

/// The prefix of `union bpf_attr` used by `BPF_OBJ_PIN`.
#[repr(C)]
#[derive(Default)]
struct ObjPinAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

pub(crate) fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, correctly sized prefix of `union bpf_attr` for `cmd`.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            std::mem::size_of::<T>(),
        )
    };
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// For the commands that return a new fd (`BPF_PROG_LOAD`, `BPF_MAP_CREATE`, ...).
pub(crate) fn bpf_fd<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<OwnedFd> {
    let fd = bpf(cmd, attr)?;
    // SAFETY: these commands return a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_LINK_CREATE`; the link detaches when the returned fd (and every pin of it) is gone.
pub(crate) fn link_create(
    prog: BorrowedFd<'_>,
    target: u32,
    attach_type: u32,
    flags: u32,
) -> std::io::Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target,
        attach_type,
        flags,
        ..LinkCreateAttr::default()
    };
    bpf_fd(BPF_LINK_CREATE, &mut attr)
}

/// Attaches an sk_msg program to a sockhash as a bpf_link (kernel >= 6.10).
pub fn sk_msg_link_create(prog: BorrowedFd<'_>, map: BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    link_create(prog, map.as_raw_fd() as u32, BPF_SK_MSG_VERDICT, 0)
}

pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> std::io::Result<()> {
    let c_path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let mut attr = ObjPinAttr {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        ..ObjPinAttr::default()
    };
    bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
}

const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_DETACH: libc::c_long = 9;

/// The prefix of `union bpf_attr` used by `BPF_PROG_ATTACH` / `BPF_PROG_DETACH`.
#[repr(C)]
#[derive(Default)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    _rest: [u64; 2],
}

/// Legacy attachment of an sk_msg program to a sockhash, for kernels without sockmap links:
/// it lives in the map (which is pinned), not in any fd of ours.
pub fn sk_msg_prog_attach(prog: BorrowedFd<'_>, map: BorrowedFd<'_>) -> std::io::Result<()> {
    let mut attr = ProgAttachAttr {
        target_fd: map.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_SK_MSG_VERDICT,
        ..ProgAttachAttr::default()
    };
    bpf(BPF_PROG_ATTACH, &mut attr).map(|_| ())
}

pub fn sk_msg_prog_detach(prog: BorrowedFd<'_>, map: BorrowedFd<'_>) -> std::io::Result<()> {
    let mut attr = ProgAttachAttr {
        target_fd: map.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_SK_MSG_VERDICT,
        ..ProgAttachAttr::default()
    };
    bpf(BPF_PROG_DETACH, &mut attr).map(|_| ())
}
