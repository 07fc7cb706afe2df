//! `iter/tcp`: run by the agent in each network namespace when a pod becomes shaped, it turns
//! on the pacing callbacks of established sockets with a shaped end, which sock_ops never saw
//! established under a policy (see `quicklane_common::adopt`). Each such socket's outcome is
//! written to the iterator's output, one `AdoptRecord` per socket.
use core::{
    ffi::c_void,
    ptr::{addr_of, read_volatile},
};

use aya_ebpf::{
    bindings::{seq_file, BPF_SOCK_OPS_RTT_CB_FLAG, BPF_SOCK_OPS_STATE_CB_FLAG},
    helpers::{bpf_getsockopt, bpf_probe_read_kernel, bpf_seq_write, bpf_setsockopt},
};
use quicklane_common::{
    adopt::{sock_common as skc, AdoptConfig, AdoptRecord, ADOPTED, ALREADY},
    bypass::META_F_PACED,
    counters::sockops as c,
    sock::{SockKey, AF_INET, AF_INET6},
};

use super::{
    maps::{count, QL_META},
    pacing,
};

const SOL_TCP: i32 = 6;
const TCP_BPF_SOCK_OPS_CB_FLAGS: i32 = 1008;
const PACING_CB_FLAGS: i32 = (BPF_SOCK_OPS_RTT_CB_FLAG | BPF_SOCK_OPS_STATE_CB_FLAG) as i32;

#[no_mangle]
static QL_ADOPT_CONFIG: AdoptConfig = AdoptConfig {
    v6_daddr: 0,
    v6_rcv_saddr: 0,
};

#[no_mangle]
#[link_section = "iter/tcp"]
pub fn ql_adopt(ctx: *mut c_void) -> i32 {
    // struct bpf_iter__tcp { meta; sk_common; uid; }, each argument in a u64 slot.
    let args = ctx as *const u64;
    // SAFETY: the iterator's context; volatile keeps each load at its own constant offset.
    let (meta, sk) = unsafe {
        (
            read_volatile(args) as *const *mut seq_file,
            read_volatile(args.add(1)) as *mut c_void,
        )
    };
    // The last call of a pass has no socket.
    if sk.is_null() {
        return 0;
    }
    let Some(key) = established_key(sk) else {
        return 0;
    };
    if !pacing::shaped(&key) {
        return 0;
    }
    let record = AdoptRecord {
        result: adopt(sk, &key),
    };
    // SAFETY: `meta->seq` of this pass; the record is a live 4-byte value.
    unsafe {
        bpf_seq_write(
            read_volatile(meta),
            addr_of!(record).cast(),
            core::mem::size_of::<AdoptRecord>() as u32,
        )
    };
    0
}

/// The key of an established TCP socket as sock_ops would build it; `None` for other states
/// and for IPv6 where the layout is unknown.
#[inline(always)]
fn established_key(sk: *mut c_void) -> Option<SockKey> {
    // SAFETY: reads the first bytes of a live `sock_common` into a stack buffer.
    let head = unsafe { bpf_probe_read_kernel(sk as *const [u8; skc::HEAD]) }.ok()?;
    if head[skc::STATE] != skc::ESTABLISHED {
        return None;
    }
    let word = |at: usize| u32::from_ne_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]);
    let local_port = u32::from(u16::from_ne_bytes([head[skc::NUM], head[skc::NUM + 1]]));
    let remote_port = u32::from(u16::from_be_bytes([head[skc::DPORT], head[skc::DPORT + 1]]));
    let family = u32::from(u16::from_ne_bytes([
        head[skc::FAMILY],
        head[skc::FAMILY + 1],
    ]));
    if family == AF_INET {
        return Some(SockKey {
            family,
            local_ip: [word(skc::RCV_SADDR), 0, 0, 0],
            remote_ip: [word(skc::DADDR), 0, 0, 0],
            local_port,
            remote_port,
        });
    }
    if family != AF_INET6 {
        return None;
    }
    // SAFETY: read-only global patched by the loader (see `config_flags`).
    let config = unsafe { read_volatile(addr_of!(QL_ADOPT_CONFIG)) };
    if config.v6_daddr == 0 || config.v6_rcv_saddr == 0 {
        return None;
    }
    Some(SockKey::from_v6(
        v6_at(sk, config.v6_rcv_saddr)?,
        v6_at(sk, config.v6_daddr)?,
        local_port,
        remote_port,
    ))
}

#[inline(always)]
fn v6_at(sk: *mut c_void, offset: u32) -> Option<[u32; 4]> {
    // SAFETY: 16 bytes of a live `sock_common` at a field offset from the kernel's BTF.
    unsafe { bpf_probe_read_kernel(sk.cast::<u8>().add(offset as usize) as *const [u32; 4]) }.ok()
}

/// Turns the socket's pacing callbacks on; `ADOPTED`, `ALREADY` or the kernel's error.
#[inline(always)]
fn adopt(sk: *mut c_void, key: &SockKey) -> i32 {
    let mut flags: i32 = 0;
    // SAFETY: the iterator holds the socket's lock; 4-byte option as the kernel requires.
    let got = unsafe {
        bpf_getsockopt(
            sk,
            SOL_TCP,
            TCP_BPF_SOCK_OPS_CB_FLAGS,
            (&raw mut flags).cast(),
            4,
        )
    };
    if got != 0 {
        return got as i32;
    }
    // A bypass-tracked socket is refreshed at its RTT samples only when marked paced.
    let meta = QL_META.get_ptr_mut(key);
    // SAFETY: a live element of a BPF_F_NO_PREALLOC hash, read whole.
    let marked = meta.is_none_or(|m| unsafe { (*m).flags } & META_F_PACED != 0);
    if flags & PACING_CB_FLAGS == PACING_CB_FLAGS && marked {
        return ALREADY;
    }
    let mut wanted = flags | PACING_CB_FLAGS;
    // SAFETY: as above.
    let set = unsafe {
        bpf_setsockopt(
            sk,
            SOL_TCP,
            TCP_BPF_SOCK_OPS_CB_FLAGS,
            (&raw mut wanted).cast(),
            4,
        )
    };
    if set != 0 {
        return set as i32;
    }
    if let Some(m) = meta {
        // SAFETY: as above; sock_ops and sk_msg run under the same socket lock the iterator
        // holds, so this write does not race theirs.
        unsafe { (*m).flags |= META_F_PACED };
    }
    count(c::CONN_ADOPTED, 1);
    ADOPTED
}
