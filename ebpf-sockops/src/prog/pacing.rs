//! TCP pacing for shaped pods: a socket whose local pod has an egress rate, or whose peer is a
//! pod on this node with an ingress rate, gets `SO_MAX_PACING_RATE` from the QoS rate table,
//! re-read at every RTT sample so a change of allocation (a new policy, a higher class
//! becoming active) reaches the socket within one round trip, without userspace in the loop.
//! TCP then sends at the rate itself, so the tc shaper behind it has nothing to mark or drop
//! (a socket whose aggregate fell behind paces faster until it caught up, one that ran
//! ahead of it slower: `paced_rate`);
//! and such connections ask for ECN, so what the shaper does mark slows them without a loss.
//! A pod's rate is split among its sockets that contend for it (`senders`).
use aya_ebpf::{
    bindings::{BPF_SOCK_OPS_RTT_CB_FLAG, BPF_SOCK_OPS_STATE_CB_FLAG},
    helpers::{bpf_get_socket_cookie, bpf_setsockopt},
    programs::SockOpsContext,
};
use quicklane_common::{
    counters::sockops as c,
    edt,
    qos::{
        aggregate, effective_rate, paced_rate, AddrKey, Classes, QosPod, CLASSES, DIR_EGRESS,
        DIR_INGRESS,
    },
    senders::{self, PacedSock},
    sock::SockKey,
    SOCKOPS_F_PACING,
};

use super::maps::{
    config_flags, count, qos_burst_ns, qos_credit_ns, QL_PACED, QL_QOS_ACTIVE, QL_QOS_ADDRS,
    QL_QOS_EDT, QL_QOS_PODS, QL_QOS_SENDERS,
};

const SOL_SOCKET: i32 = 1;
const SO_MAX_PACING_RATE: i32 = 47;
/// TCP paces payload; the shaper counts each (GSO) packet with its Ethernet, IP and TCP
/// headers (14 + 20 + 32 bytes with timestamps). TCP sizes GSO packets to about 1 ms of its
/// pacing rate, at least two segments, so that is the packet size the overhead is taken on.
const HEADER_BYTES: u64 = 66;
const MIN_GSO_BYTES: u64 = 2 * 1448;
/// Margin on top, so TCP never queues against the shaper and never meets its drop horizon.
const MARGIN_PER_MILLE: u64 = 995;

/// Whether the agent runs QoS policies. Checked before a connection's key is read: every
/// connection passes through sock_ops several times, and on a node without policies none of
/// them needs the key for pacing.
#[inline(always)]
pub fn enabled() -> bool {
    config_flags() & SOCKOPS_F_PACING != 0
}

/// Starts pacing a newly established socket if either end is shaped; true if it is paced.
pub fn start(ctx: &SockOpsContext, key: &SockKey) -> bool {
    if !enabled() || !apply(ctx, key) {
        return false;
    }
    count(c::CONN_PACED, 1);
    let flags = BPF_SOCK_OPS_RTT_CB_FLAG | BPF_SOCK_OPS_STATE_CB_FLAG;
    let _ = ctx.set_cb_flags((ctx.cb_flags() | flags) as i32);
    true
}

/// Whether either end of the connection is shaped. Such connections ask for ECN, so the
/// shaper's CE marks slow them before anything is dropped.
pub fn shaped(key: &SockKey) -> bool {
    shaped_slots(key) != (0, 0)
}

/// (QoS slot + 1 of the local pod if its egress is shaped, of the peer pod if its ingress
/// is), 0 where not.
#[inline(always)]
pub fn shaped_slots(key: &SockKey) -> (u32, u32) {
    if !enabled() {
        return (0, 0);
    }
    let shaped_slot = |addr: [u32; 4], dir: u32| {
        let slot = slot_at(key.family, addr)?;
        QL_QOS_PODS
            .get(slot)
            .filter(|p| p.shaped(dir))
            .map(|_| slot + 1)
    };
    (
        shaped_slot(key.local_ip, DIR_EGRESS).unwrap_or(0),
        shaped_slot(key.remote_ip, DIR_INGRESS).unwrap_or(0),
    )
}

/// Re-applies the rate at an RTT sample of a paced socket; false (and the pacing cap
/// lifted) once its pods lost their policy, so the caller can stop the RTT callbacks.
pub fn refresh(ctx: &SockOpsContext, key: &SockKey) -> bool {
    if enabled() && apply(ctx, key) {
        count(c::PACING_UPDATES, 1);
        return true;
    }
    set_max_pacing_rate(ctx, u32::MAX);
    count(c::PACING_RELEASED, 1);
    false
}

/// Forgets a closing socket's marks. Without QoS no socket has any: a node that runs only
/// the bypass pays no hash delete per closing connection.
pub fn forget(ctx: &SockOpsContext) {
    if !enabled() {
        return;
    }
    // SAFETY: helper on the live sock_ops context.
    let _ = QL_PACED.remove(&unsafe { bpf_get_socket_cookie(ctx.ops.cast()) });
}

/// The socket's marks, created at its first sample in a shaped direction (so sockets with
/// no shaped end never take an entry); `None` if the map refused it.
#[inline(always)]
fn paced_sock(cookie: u64) -> Option<*mut PacedSock> {
    if let Some(p) = QL_PACED.get_ptr_mut(&cookie) {
        return Some(p);
    }
    let _ = QL_PACED.insert(&cookie, &PacedSock::default(), 0);
    QL_PACED.get_ptr_mut(&cookie)
}

/// What this socket has had acknowledged so far.
#[inline(always)]
fn bytes_acked(ctx: &SockOpsContext) -> u64 {
    // SAFETY: the context field, read whole (see `key_from_ctx` for why volatile).
    unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*ctx.ops).bytes_acked)) }
}

/// A sample of the socket being paced, for `direction_rate`.
struct Sample {
    now: u64,
    acked: u64,
    cookie: u64,
}

/// Out of line: one copy for `start` and `refresh`, and a shallow stack below sock_ops'
/// own frame (the class tables need a deep one, see `pod_rate`).
#[inline(never)]
fn apply(ctx: &SockOpsContext, key: &SockKey) -> bool {
    let sample = Sample {
        // SAFETY: plain helper call.
        now: unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() },
        acked: bytes_acked(ctx),
        // SAFETY: helper on the live sock_ops context.
        cookie: unsafe { bpf_get_socket_cookie(ctx.ops.cast()) },
    };
    // `u64::MAX` for "not shaped", not an `Option`: LLVM copies the payload of a `None`
    // uninitialised, and the verifier refuses reading that register.
    let rate = direction_rate(key.family, &key.local_ip, DIR_EGRESS, &sample).min(direction_rate(
        key.family,
        &key.remote_ip,
        DIR_INGRESS,
        &sample,
    ));
    if rate == u64::MAX {
        return false;
    }
    set_max_pacing_rate(ctx, payload_rate(rate).min(u64::from(u32::MAX)) as u32);
    true
}

/// `u32::MAX` is "unlimited", the kernel's default.
fn set_max_pacing_rate(ctx: &SockOpsContext, bytes_per_sec: u32) {
    let mut optval = bytes_per_sec;
    // SAFETY: helper on the live sock_ops context with a 4-byte option, as the kernel
    // requires for SO_MAX_PACING_RATE.
    unsafe {
        bpf_setsockopt(
            ctx.ops.cast(),
            SOL_SOCKET,
            SO_MAX_PACING_RATE,
            (&raw mut optval).cast(),
            4,
        );
    }
}

/// The payload rate whose packets, headers included, fit within `rate` (bytes per second).
#[inline(always)]
fn payload_rate(rate: u64) -> u64 {
    let gso = (rate / 1000).max(MIN_GSO_BYTES);
    rate / (gso + HEADER_BYTES) * gso / 1000 * MARGIN_PER_MILLE
}

#[inline(always)]
fn slot_at(family: u32, addr: [u32; 4]) -> Option<u32> {
    let key = AddrKey { family, addr };
    // SAFETY: the slot is copied out at once.
    unsafe { QL_QOS_ADDRS.get(&key) }.copied()
}

/// The pacing rate the pod at `addr` asks of this socket for direction `dir` (`u64::MAX` if
/// that direction is not shaped).
#[inline(always)]
fn direction_rate(family: u32, addr: &[u32; 4], dir: u32, sample: &Sample) -> u64 {
    let mut agg = 0;
    let rate = pod_rate(family, addr, dir, sample.now, &mut agg);
    if rate == u64::MAX {
        rate
    } else {
        socket_rate(agg, rate, sample)
    }
}

/// The current rate of the pod at `addr` in direction `dir` (`u64::MAX` if not shaped), and
/// its aggregate in `agg`. Out of line, like `socket_rate` and not nested in it: the class
/// tables' frame and the senders' frame would overrun the 512-byte stack together.
#[inline(never)]
fn pod_rate(family: u32, addr: &[u32; 4], dir: u32, now: u64, agg: &mut u32) -> u64 {
    let Some(slot) = slot_at(family, *addr) else {
        return u64::MAX;
    };
    let Some(pod) = QL_QOS_PODS.get(slot).filter(|p| p.shaped(dir)) else {
        return u64::MAX;
    };
    *agg = aggregate(slot, dir);
    rate_now(pod, dir, now)
}

/// This socket's part of its aggregate's `rate`: faster while the aggregate has catching
/// up to do, slower while it is ahead, shared among the pod's contending sockets.
#[inline(never)]
fn socket_rate(agg: u32, rate: u64, sample: &Sample) -> u64 {
    let now = sample.now;
    let timeline = match QL_QOS_EDT.get_ptr(agg) {
        // SAFETY: an array value pointer, 8-byte aligned.
        Some(t) => unsafe { edt::load(t) },
        None => now,
    };
    let credit = qos_credit_ns();
    let paced = paced_rate(rate, timeline, now, credit, qos_burst_ns());
    // Without its marks (the map refused the entry) a socket is paced unsplit.
    let Some(senders) = QL_QOS_SENDERS.get_ptr_mut(agg) else {
        return paced;
    };
    let Some(sock) = paced_sock(sample.cookie) else {
        return paced;
    };
    // SAFETY: a live LRU hash value; only this socket's callbacks touch its marks. The
    // aggregate's low bit is its direction.
    let mark = unsafe { &raw mut (*sock).marks[(agg & 1) as usize] };
    // SAFETY: an array value and a hash value, 8-byte aligned.
    unsafe { senders::note(senders, mark, sample.acked, rate, paced, now) }
}

/// The rate the tc shaper would give this pod's next packet.
#[inline(always)]
pub fn rate_now(pod: &QosPod, dir: u32, now: u64) -> u64 {
    let classes = Classes::read(dir, |i| QL_QOS_ACTIVE.get(i));
    let own = pod.class as usize & (CLASSES - 1);
    effective_rate(pod, dir, classes.mask(now) | (1 << own), &classes)
}
