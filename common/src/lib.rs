//! Types shared by quicklane's BPF programs and its userspace.
//!
//! Every map key and value is `#[repr(C)]`, `Copy`, and free of implicit padding, so the
//! byte layout the verifier sees is the one userspace reads. The layout assertions at the
//! bottom of each module fail the build (on both sides) if a field is added carelessly.
#![no_std]
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

pub mod adopt;
pub mod bypass;
pub mod counters;
pub mod edt;
pub mod qos;
pub mod senders;
pub mod sock;

/// Bumped whenever a shared layout or a load-time global changes meaning, so a daemon never
/// adopts pins written by an incompatible datapath.
pub const ABI_VERSION: u32 = 10;

/// Load-time settings of the sock_ops/sk_msg object (`QL_SOCKOPS_CONFIG` global).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockopsConfig {
    pub abi_version: u32,
    /// `SOCKOPS_F_*` bits.
    pub flags: u32,
    /// A window of unanswered messages averaging below this size, from a writer with
    /// Nagle's algorithm on, is a small-message stream, which moves to TCP (0: never). See
    /// `bypass::StreamPolicy`.
    pub small_msg_bytes: u32,
    /// Messages per window: the sending direction is judged after this many messages with
    /// no message from the peer in between.
    pub stream_streak: u32,
    /// How far ahead of now a shaped pod's timeline may run with bypassed bytes before its
    /// connection leaves the bypass for the paced, shaped TCP path (ns).
    pub qos_burst_ns: u32,
    /// A window averaging at least this size is a large-message stream, which moves to TCP
    /// too (0: never).
    pub large_msg_bytes: u32,
    /// How far a shaped pod's timeline may lag now and still be caught up (ns): the tc
    /// object's `QosConfig::credit_ns`, which sk_msg's charges and the pacing need too.
    pub qos_credit_ns: u32,
    /// `large_msg_bytes` for a writer with Nagle's algorithm off (0: the same bound).
    pub large_msg_bytes_nodelay: u32,
    /// Bit offset of `struct tcp_sock`'s `nonagle` field in this kernel (from its BTF); its
    /// lowest bit is `TCP_NAGLE_OFF`. 0: unknown, every writer is judged as Nagle's.
    pub tcp_nonagle_bit: u32,
    /// Where a socket's psock is in this kernel (from its BTF); see `PsockLayout`.
    pub psock: PsockLayout,
}

/// Byte offsets that let the bypass see a socket's psock, which the kernel gives BPF no
/// helper for: a reader whose writer has left the redirect may leave the sockhash once its
/// redirect queue is empty and nothing can refill it (see `bypass::META_F_LOCKED_ALONE`).
/// All 0: unknown, readers stay in the sockhash (as the writer's messages require otherwise).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PsockLayout {
    /// `struct sock`'s `sk_user_data`: the psock pointer, flag bits in its lowest three.
    pub sk_user_data: u32,
    /// `struct sk_psock`'s `refcnt`: one per map link plus one per send, receive or
    /// redirect in progress on the socket.
    pub refcnt: u32,
    /// `struct sk_psock`'s `ingress_msg` list head: the redirect queue reads drain first.
    pub ingress_msg: u32,
}

impl PsockLayout {
    #[must_use]
    pub const fn known(&self) -> bool {
        self.sk_user_data != 0 && self.refcnt != 0 && self.ingress_msg != 0
    }
}

/// Record established sockets in the sockhash and redirect messages between same-node peers.
pub const SOCKOPS_F_BYPASS: u32 = 1;
/// sock_ops may call the current-cgroup helpers (not offered to sock_ops before ~6.8; the
/// loader probes). Without it every socket's pod is "unknown" and the verifier, which sees
/// this read-only flag as a constant, never sees the calls.
pub const SOCKOPS_F_CGROUP_ORIGIN: u32 = 2;
/// Pace TCP sockets of shaped pods (`SO_MAX_PACING_RATE`) from the QoS rate tables.
pub const SOCKOPS_F_PACING: u32 = 4;
/// Over loopback, every full window of unanswered messages from a writer with Nagle's
/// algorithm on moves to TCP, whatever its sizes.
pub const SOCKOPS_F_LOOPBACK_STREAMS_TCP: u32 = 8;

#[cfg(feature = "user")]
// SAFETY: repr(C), Copy, no padding (asserted below).
unsafe impl aya::Pod for SockopsConfig {}

const _: () = assert!(core::mem::size_of::<SockopsConfig>() == 48);
