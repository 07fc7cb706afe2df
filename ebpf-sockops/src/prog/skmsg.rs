//! sk_msg: hand each message of an eligible connection to the peer socket's receive queue.
use aya_ebpf::{
    bindings::{bpf_sock, sk_action::SK_PASS, BPF_F_INGRESS, BPF_NOEXIST},
    helpers::{bpf_probe_read_kernel, bpf_skc_to_tcp_sock},
    macros::sk_msg,
    programs::SkMsgContext,
};
use quicklane_common::{
    bypass::{
        FlowKey, SockMeta, StreamKind, Traffic, META_F_ELIGIBLE, META_F_LEAVING,
        META_F_LOCKED_ALONE, META_F_LOCKED_TCP, META_F_SENT,
    },
    counters::sockops as c,
    sock::SockKey,
};

use super::{
    charge,
    key::key_from_ctx,
    maps::{
        count, rules_state, stream_policy, tcp_nonagle_bit, QL_FLOW_TRAFFIC, QL_META, QL_SOCKS,
    },
    psock,
    rules::eligible,
};

#[sk_msg]
pub fn ql_sk_msg(ctx: SkMsgContext) -> u32 {
    count(c::MSG_CALLS, 1);
    let Some(key) = key_from_ctx!(ctx.msg) else {
        return SK_PASS;
    };
    let Some(meta) = QL_META.get_ptr_mut(&key) else {
        count(c::MSG_UNTRACKED, 1);
        return SK_PASS;
    };
    // SAFETY: a live element of a BPF_F_NO_PREALLOC hash, so it is never recycled under us;
    // only this socket's sender writes it (the socket lock serialises sendmsg).
    let meta = unsafe { &mut *meta };
    if meta.flags & META_F_LOCKED_TCP != 0 {
        count(c::MSG_NORMAL_PATH, 1);
        return SK_PASS;
    }
    if !eligible_now(&key, meta) {
        // Not (or no longer) eligible, or no local peer (yet): this message goes by TCP, so
        // the direction must stay there (redirected bytes could overtake it).
        return lock_tcp(&ctx, meta, c::MSG_NORMAL_PATH);
    }
    let size = u64::from(ctx.size());
    let mut peer = key.peer();
    let Some(peer_meta) = QL_META.get_ptr_mut(&peer) else {
        // The peer closed: from here on this socket's bytes go by TCP, and never back.
        return lock_tcp(&ctx, meta, c::MSG_PEER_MISS);
    };
    // SAFETY: live element of a BPF_F_NO_PREALLOC hash; the fields we touch are either
    // atomic or hints where a lost update only delays a decision by one message.
    let peer_meta = unsafe { &mut *peer_meta };
    if let Some(reason) = stream_for_tcp(&ctx, &key, peer_meta, meta) {
        // Switching this direction to TCP is safe at any time: the bytes already redirected
        // sit in the peer's redirect queue, which its reads drain before the TCP queue.
        count(reason, 1);
        return lock_tcp(&ctx, meta, c::MSG_NORMAL_PATH);
    }
    if !charge::admit(meta, size) {
        // Over the pod's rate: TCP from here on, paced and shaped to it.
        count(c::CONN_DEMOTED_QOS, 1);
        return lock_tcp(&ctx, meta, c::MSG_NORMAL_PATH);
    }
    // Increment first, then look: a peer that is leaving either sees our increment and stays,
    // or we see its flag and do not redirect (see SockMeta::rx_redirects).
    // SAFETY: points into a live, 8-byte aligned map value.
    unsafe { atomic_add(&raw mut peer_meta.rx_redirects, 1) };
    // The fetch_add above is a full barrier, so this read cannot move before it.
    // SAFETY: aligned read of a live map value.
    let peer_flags = unsafe { core::ptr::read_volatile(&raw const peer_meta.flags) };
    if peer_flags & META_F_LEAVING != 0 {
        return lock_tcp(&ctx, meta, c::MSG_NORMAL_PATH);
    }
    if QL_SOCKS.redirect_msg(&ctx, &mut peer, u64::from(BPF_F_INGRESS)) != i64::from(SK_PASS) {
        return lock_tcp(&ctx, meta, c::MSG_PEER_MISS);
    }
    count(c::MSG_REDIRECTED, 1);
    count(c::MSG_REDIRECTED_BYTES, size);
    if meta.qos_egress | meta.qos_ingress != 0 {
        count(c::MSG_QOS_CHARGED, 1);
    }
    account(meta, size);
    SK_PASS
}

/// BPF's atomic add (`lock xadd`): the bpfel target has no compare-and-swap, so core's
/// `fetch_add` is not available, while the instruction itself is (a full barrier on x86).
///
/// # Safety
/// `dst` must be valid and 8-byte aligned.
#[inline(always)]
unsafe fn atomic_add(dst: *mut u64, val: u64) {
    // SAFETY: guaranteed by the caller.
    unsafe { core::arch::asm!("lock *(u64 *)({0} + 0) += {1}", in(reg) dst, in(reg) val) };
}

/// This socket's bytes take TCP from now on; they never come back to the redirect, so nothing
/// can overtake them. It also asks to leave the sockhash (sock_ops does it at the next RTT
/// sample if that is safe), so its writes stop paying for sk_msg and get TCP's batching, and
/// says whether its peer, the reader, may leave too (`META_F_LOCKED_ALONE`).
#[inline(always)]
fn lock_tcp(ctx: &SkMsgContext, meta: &mut SockMeta, reason: u32) -> u32 {
    // SAFETY: `sk` of the live sk_msg context.
    let sk = unsafe { (*ctx.msg).__bindgen_anon_3.sk };
    meta.flags |= META_F_LOCKED_TCP | META_F_LEAVING | alone(sk);
    count(reason, 1);
    count(c::CONN_LOCKED_TCP, 1);
    SK_PASS
}

/// `META_F_LOCKED_ALONE` if this send is the only one using the socket. Out of line: the
/// six places that lock share one copy.
#[inline(never)]
fn alone(sk: *mut bpf_sock) -> u32 {
    if psock::sole_sender(sk) {
        META_F_LOCKED_ALONE
    } else {
        0
    }
}

/// Whether this connection may use the redirect. On the first message, and after every rules
/// change, both ends are (re)evaluated: the peer's metadata is readable only once it is
/// established, which is also exactly when redirecting to it becomes safe.
#[inline(always)]
fn eligible_now(key: &SockKey, meta: &mut SockMeta) -> bool {
    let state = rules_state();
    if meta.generation != state.generation || meta.generation == 0 {
        count(c::REEVALUATED, 1);
        // Generation 0 means this is the socket's first message.
        meta.flags |= META_F_SENT;
        let peer_key = key.peer();
        let Some(peer) = QL_META.get_ptr_mut(&peer_key) else {
            return false;
        };
        // SAFETY: as for our own metadata; only read here.
        let peer = unsafe { &*peer };
        let ok = eligible(key, meta, &state) && eligible(&peer_key, peer, &state);
        meta.peer_cgroup = peer.cgroup_id;
        (meta.qos_egress, meta.qos_ingress) = super::pacing::shaped_slots(key);
        meta.generation = state.generation;
        if ok {
            meta.flags |= META_F_ELIGIBLE;
        } else {
            meta.flags &= !META_F_ELIGIBLE;
        }
    }
    meta.flags & META_F_ELIGIBLE != 0
}

/// Whether this direction has become a stream that TCP carries better than the redirect
/// (see `StreamPolicy`), and which kind (its counter). The peer's message answers ours, so
/// it starts our next window; a full window the redirect carries better starts one too.
#[inline(always)]
fn stream_for_tcp(
    ctx: &SkMsgContext,
    key: &SockKey,
    peer: &mut SockMeta,
    meta: &mut SockMeta,
) -> Option<u32> {
    let size = ctx.size();
    // Only when set: on a one-way stream this would otherwise store into the peer's value
    // from the sender's CPU on every message. The two counters move together, so a zero
    // count means zero bytes.
    if peer.unanswered != 0 {
        peer.unanswered = 0;
        peer.unanswered_bytes = 0;
    }
    meta.unanswered = meta.unanswered.saturating_add(1);
    meta.unanswered_bytes = meta.unanswered_bytes.saturating_add(size);
    let policy = stream_policy();
    if meta.unanswered < policy.streak {
        return None;
    }
    // Read once per window, not per message: every rule but the large bound of a writer
    // with Nagle's algorithm on depends on it.
    let nodelay = nagle_off(ctx);
    let kind = policy.judge(
        meta.unanswered,
        meta.unanswered_bytes,
        key.is_loopback(),
        nodelay,
    );
    meta.unanswered = 0;
    meta.unanswered_bytes = 0;
    Some(match kind? {
        StreamKind::Small => c::CONN_DEMOTED_SMALL,
        StreamKind::Large => c::CONN_DEMOTED_LARGE,
        StreamKind::Loopback => c::CONN_DEMOTED_LOOPBACK,
    })
}

/// Whether the writer turned Nagle's algorithm off (TCP_NODELAY). sk_msg has no getsockopt,
/// so the bit is read from the socket itself, where the kernel's BTF puts it; false where
/// that is unknown.
#[inline(always)]
fn nagle_off(ctx: &SkMsgContext) -> bool {
    let bit = tcp_nonagle_bit();
    if bit == 0 {
        return false;
    }
    // SAFETY: `sk` of the live sk_msg context; the helper checks it is a TCP socket.
    let tp = unsafe { bpf_skc_to_tcp_sock((*ctx.msg).__bindgen_anon_3.sk.cast()) };
    if tp.is_null() {
        return false;
    }
    // SAFETY: a byte inside the tcp_sock (the offset comes from this kernel's BTF), read
    // through the fault-safe helper.
    let byte = unsafe { bpf_probe_read_kernel(tp.cast::<u8>().add((bit / 8) as usize)) };
    byte.is_ok_and(|b| (b >> (bit % 8)) & 1 != 0)
}

#[inline(always)]
fn account(meta: &SockMeta, bytes: u64) {
    let flow = FlowKey {
        src_cgroup: meta.cgroup_id,
        dst_cgroup: meta.peer_cgroup,
    };
    if let Some(t) = QL_FLOW_TRAFFIC.get_ptr_mut(&flow) {
        // SAFETY: this CPU's slot of a per-CPU element.
        unsafe {
            (*t).bytes += bytes;
            (*t).msgs += 1;
        }
    } else {
        let first = Traffic { bytes, msgs: 1 };
        let _ = QL_FLOW_TRAFFIC.insert(&flow, &first, u64::from(BPF_NOEXIST));
    }
}
