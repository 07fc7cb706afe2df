//! sk_msg: hand each message of an eligible connection to the peer socket's receive queue.
use aya_ebpf::{
    bindings::{sk_action::SK_PASS, BPF_F_INGRESS, BPF_NOEXIST},
    macros::sk_msg,
    programs::SkMsgContext,
};
use quicklane_common::{
    bypass::{FlowKey, SockMeta, Traffic, META_F_ELIGIBLE, META_F_LOCKED_TCP},
    counters::sockops as c,
    sock::SockKey,
};

use super::{
    key::key_from_ctx,
    maps::{count, rules_state, QL_FLOW_TRAFFIC, QL_META, QL_SOCKS},
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
    if !redirect_allowed(&key, meta) {
        count(c::MSG_NORMAL_PATH, 1);
        return SK_PASS;
    }
    let size = u64::from(ctx.size());
    let mut peer = key.peer();
    if QL_SOCKS.redirect_msg(&ctx, &mut peer, u64::from(BPF_F_INGRESS)) != i64::from(SK_PASS) {
        // The peer left (closed) between our check and now: from here on this socket's
        // bytes go by TCP, and never back, so nothing can overtake them.
        meta.flags |= META_F_LOCKED_TCP;
        count(c::MSG_PEER_MISS, 1);
        count(c::CONN_LOCKED_TCP, 1);
        return SK_PASS;
    }
    count(c::MSG_REDIRECTED, 1);
    count(c::MSG_REDIRECTED_BYTES, size);
    account(meta, size);
    SK_PASS
}

/// Whether this message may be redirected. On the first message, and after every rules
/// change, both ends are (re)evaluated: the peer's metadata is readable only once it is
/// established, which is also exactly when redirecting to it becomes safe.
#[inline(always)]
fn redirect_allowed(key: &SockKey, meta: &mut SockMeta) -> bool {
    if meta.flags & META_F_LOCKED_TCP != 0 {
        return false;
    }
    let state = rules_state();
    if meta.generation != state.generation || meta.generation == 0 {
        count(c::REEVALUATED, 1);
        let peer_key = key.peer();
        let Some(peer) = QL_META.get_ptr_mut(&peer_key) else {
            // Not (yet) a local eligible peer: anything we send now goes by TCP, so this
            // connection must stay there (redirected bytes would overtake it).
            meta.flags |= META_F_LOCKED_TCP;
            count(c::CONN_LOCKED_TCP, 1);
            return false;
        };
        // SAFETY: as for our own metadata; only read here.
        let peer = unsafe { &*peer };
        let ok = eligible(key, meta, &state) && eligible(&peer_key, peer, &state);
        meta.peer_cgroup = peer.cgroup_id;
        meta.generation = state.generation;
        if ok {
            meta.flags |= META_F_ELIGIBLE;
        } else {
            meta.flags &= !META_F_ELIGIBLE;
        }
    }
    meta.flags & META_F_ELIGIBLE != 0
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
