//! The few bpf(2) commands the link probes need, on trivial programs: aya decides between a
//! bpf_link and a legacy attachment by kernel version, and a probe must ask the kernel itself.
use std::os::fd::{AsRawFd as _, BorrowedFd, OwnedFd};

use crate::sys;

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_PROG_LOAD: libc::c_long = 5;

pub const PROG_TYPE_SCHED_CLS: u32 = 3;
pub const PROG_TYPE_XDP: u32 = 6;
pub const PROG_TYPE_SOCK_OPS: u32 = 13;
pub const PROG_TYPE_SK_MSG: u32 = 16;

pub const ATTACH_CGROUP_SOCK_OPS: u32 = 3;
pub const ATTACH_SK_MSG_VERDICT: u32 = 7;
pub const ATTACH_XDP: u32 = 37;
pub const ATTACH_TCX_INGRESS: u32 = 46;

const MAP_TYPE_SOCKHASH: u32 = 18;

/// The prefix of `union bpf_attr` for `BPF_PROG_LOAD`; the kernel zero-extends the rest.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// The prefix of `union bpf_attr` for `BPF_MAP_CREATE`.
#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

/// Loads `r0 = verdict; exit`, which every program type accepts.
pub fn trivial_program(
    prog_type: u32,
    expected_attach_type: u32,
    verdict: i32,
) -> std::io::Result<OwnedFd> {
    // mov64 r0, imm (opcode 0xb7), then exit (0x95): code, regs, off (i16), imm (i32).
    let insns: [u64; 2] = [0xb7 | (u64::from(verdict.cast_unsigned()) << 32), 0x95];
    let license = c"GPL";
    let mut attr = ProgLoadAttr {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        expected_attach_type,
        ..ProgLoadAttr::default()
    };
    sys::bpf_fd(BPF_PROG_LOAD, &mut attr)
}

pub fn sockhash() -> std::io::Result<OwnedFd> {
    let mut attr = MapCreateAttr {
        map_type: MAP_TYPE_SOCKHASH,
        key_size: 4,
        value_size: 4,
        max_entries: 1,
        ..MapCreateAttr::default()
    };
    sys::bpf_fd(BPF_MAP_CREATE, &mut attr)
}

/// `BPF_LINK_CREATE` on an fd target (cgroup, map). The link detaches when the fd closes.
pub fn link_to_fd(
    prog: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    attach_type: u32,
) -> std::io::Result<OwnedFd> {
    sys::link_create(prog, target.as_raw_fd() as u32, attach_type, 0)
}

/// `BPF_LINK_CREATE` on a device of the calling thread's network namespace.
pub fn link_to_ifindex(
    prog: BorrowedFd<'_>,
    ifindex: u32,
    attach_type: u32,
    flags: u32,
) -> std::io::Result<OwnedFd> {
    sys::link_create(prog, ifindex, attach_type, flags)
}
