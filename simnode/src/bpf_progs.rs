//! Listing loaded BPF programs through the bpf(2) syscall, without a BPF library, so the leak
//! check works the same whatever loader the agent used.

use std::mem::size_of;
use std::os::fd::{FromRawFd, OwnedFd};

use crate::Error;

const BPF_PROG_GET_NEXT_ID: libc::c_long = 11;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_OBJ_NAME_LEN: usize = 16;

/// `union bpf_attr` as used by the `*_GET_NEXT_ID` and `*_GET_FD_BY_ID` commands.
#[repr(C)]
#[derive(Default)]
struct IdAttr {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

/// `union bpf_attr` as used by `BPF_OBJ_GET_INFO_BY_FD`.
#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The prefix of the kernel's `struct bpf_prog_info` up to `name`. Passing this shorter
/// `info_len` is part of the ABI: the kernel fills in only what fits.
#[repr(C)]
#[derive(Default)]
struct ProgInfo {
    prog_type: u32,
    id: u32,
    tag: [u8; 8],
    jited_prog_len: u32,
    xlated_prog_len: u32,
    jited_prog_insns: u64,
    xlated_prog_insns: u64,
    load_time: u64,
    created_by_uid: u32,
    nr_map_ids: u32,
    map_ids: u64,
    name: [u8; BPF_OBJ_NAME_LEN],
}

const _: () = assert!(std::mem::offset_of!(ProgInfo, name) == 64);
const _: () = assert!(size_of::<ProgInfo>() == 80);

/// A loaded BPF program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Prog {
    pub id: u32,
    pub name: String,
}

fn bpf<A>(cmd: libc::c_long, attr: &mut A) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, exclusively borrowed repr(C) prefix of `union bpf_attr`, and
    // the size passed is its exact size, so the kernel reads and writes only within it.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            size_of::<A>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Every BPF program currently loaded in the kernel.
pub(crate) fn loaded() -> Result<Vec<Prog>, Error> {
    let mut progs = Vec::new();
    let mut id = 0;
    loop {
        let mut attr = IdAttr {
            id,
            ..IdAttr::default()
        };
        match bpf(BPF_PROG_GET_NEXT_ID, &mut attr) {
            Ok(_) => id = attr.next_id,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(progs),
            Err(e) => {
                return Err(Error::io(
                    "listing BPF programs (BPF_PROG_GET_NEXT_ID needs CAP_SYS_ADMIN)",
                    e,
                ))
            }
        }
        if let Some(prog) = info(id)? {
            progs.push(prog);
        }
    }
}

/// `None` when the program was unloaded between listing and opening it.
fn info(id: u32) -> Result<Option<Prog>, Error> {
    let mut attr = IdAttr {
        id,
        ..IdAttr::default()
    };
    let fd = match bpf(BPF_PROG_GET_FD_BY_ID, &mut attr) {
        Ok(fd) => {
            // SAFETY: on success the syscall returned a new file descriptor that nothing else
            // owns.
            unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) }
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
        Err(e) => return Err(Error::io(format!("opening BPF program {id}"), e)),
    };
    let mut prog_info = ProgInfo::default();
    let mut attr = InfoAttr {
        bpf_fd: std::os::fd::AsRawFd::as_raw_fd(&fd) as u32,
        info_len: size_of::<ProgInfo>() as u32,
        info: std::ptr::from_mut(&mut prog_info) as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)
        .map_err(|e| Error::io(format!("reading info of BPF program {id}"), e))?;
    let len = prog_info
        .name
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(BPF_OBJ_NAME_LEN);
    Ok(Some(Prog {
        id: prog_info.id,
        name: String::from_utf8_lossy(&prog_info.name[..len]).into_owned(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_PROG_TYPE_SOCKET_FILTER: u32 = 1;

    /// `union bpf_attr` for `BPF_PROG_LOAD`, up to `prog_name`.
    #[repr(C)]
    #[derive(Default)]
    struct LoadAttr {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; BPF_OBJ_NAME_LEN],
    }

    /// Loads `r0 = 0; exit` as a socket filter, named so it cannot be mistaken for quicklane's.
    fn load_probe(name: &str) -> OwnedFd {
        let insns: [u64; 2] = [0xb7, 0x95];
        let license = c"GPL";
        let mut attr = LoadAttr {
            prog_type: BPF_PROG_TYPE_SOCKET_FILTER,
            insn_cnt: 2,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            ..LoadAttr::default()
        };
        attr.prog_name[..name.len()].copy_from_slice(name.as_bytes());
        let fd = bpf(BPF_PROG_LOAD, &mut attr).expect("loading a trivial socket filter");
        // SAFETY: BPF_PROG_LOAD returned a new fd that nothing else owns.
        unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) }
    }

    #[test]
    fn lists_a_loaded_program_by_name() {
        if !nix::unistd::geteuid().is_root() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "listing BPF programs needs root, and CI must run as root"
            );
            eprintln!("skipping: listing BPF programs needs root");
            return;
        }
        let _probe = load_probe("simnode_probe");
        let progs = loaded().unwrap();
        assert!(
            progs.iter().any(|p| p.name == "simnode_probe" && p.id != 0),
            "{progs:?}"
        );
        let mut ids: Vec<u32> = progs.iter().map(|p| p.id).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), progs.len(), "each id listed once: {progs:?}");
    }
}
