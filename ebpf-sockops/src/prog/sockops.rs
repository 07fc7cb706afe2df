//! sock_ops: learn who owns each socket where the task context is right (connect, listen),
//! then at establishment decide eligibility and enter the socket into `QL_SOCKS`.
use aya_ebpf::{
    bindings::{
        BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_HDR_OPT_LEN_CB,
        BPF_SOCK_OPS_NEEDS_ECN, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_RTO_CB_FLAG,
        BPF_SOCK_OPS_RTT_CB, BPF_SOCK_OPS_RTT_CB_FLAG, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_SOCK_OPS_TCP_LISTEN_CB,
        BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG, BPF_TCP_CLOSE,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_map_delete_elem},
    macros::sock_ops,
    programs::SockOpsContext,
};
use quicklane_common::{
    bypass::{
        ListenerKey, Origin, ServiceKey, SockMeta, IDLE_PROBE_EVERY, IDLE_STREAK, META_F_ACTIVE,
        META_F_LEAVING, META_F_LEFT, META_F_LOCKED_ALONE, META_F_LOCKED_TCP, META_F_PACED,
        META_F_SENT,
    },
    counters::sockops as c,
    sock::SockKey,
    SOCKOPS_F_BYPASS,
};

use super::{
    key::key_from_ctx,
    maps::{
        config_flags, count, psock_layout, rules_state, QL_LISTENERS, QL_META, QL_ORIGINS,
        QL_SERVICES, QL_SOCKS,
    },
    pacing, psock,
    rules::{current_origin, eligible},
};

const E2BIG: i32 = 7;

#[sock_ops]
pub fn ql_sockops(ctx: SockOpsContext) -> u32 {
    count(c::CALLS, 1);
    let bypass = config_flags() & SOCKOPS_F_BYPASS != 0;
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB if bypass => on_connect(&ctx),
        BPF_SOCK_OPS_TCP_LISTEN_CB if bypass => on_listen(&ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            count(c::ACTIVE_ESTABLISHED, 1);
            established(&ctx, true, bypass);
        }
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            count(c::PASSIVE_ESTABLISHED, 1);
            established(&ctx, false, bypass);
        }
        BPF_SOCK_OPS_STATE_CB => {
            if ctx.arg(1) == BPF_TCP_CLOSE {
                pacing::forget(&ctx);
            }
            if bypass {
                on_state(&ctx);
            }
        }
        BPF_SOCK_OPS_RTT_CB => on_rtt(&ctx),
        BPF_SOCK_OPS_HDR_OPT_LEN_CB => on_transmit(&ctx),
        BPF_SOCK_OPS_NEEDS_ECN if pacing::enabled() => {
            if let Some(key) = key_from_ctx!(ctx.ops) {
                if pacing::shaped(&key) {
                    ctx.set_reply(1);
                }
            }
        }
        _ => {}
    }
    // Whatever happened above, the socket itself proceeds normally.
    1
}

/// Pacing first (it holds the connection whenever it takes TCP), then the bypass. Each from
/// sock_ops' own frame: the bypass's frame and the pacing's deep one do not fit the 512-byte
/// stack on top of each other.
#[inline(always)]
fn established(ctx: &SockOpsContext, active: bool, bypass: bool) {
    let paced =
        pacing::enabled() && key_from_ctx!(ctx.ops).is_some_and(|key| pacing::start(ctx, &key));
    if bypass {
        on_established(ctx, active, paced);
    }
}

fn on_connect(ctx: &SockOpsContext) {
    // A connection to an idle service is decided here, where it costs least: it gets no
    // origin, which establishment reads as "skip" (see `skipped_at_connect`).
    if key_from_ctx!(ctx.ops)
        .is_some_and(|key| service_streak(&service_of(&key, true)) >= IDLE_STREAK)
    {
        return;
    }
    // SAFETY: helper on the live sock_ops context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    let _ = QL_ORIGINS.insert(&cookie, &current_origin(), 0);
}

fn listener_key(ctx: &SockOpsContext) -> ListenerKey {
    ListenerKey {
        // SAFETY: helper on the live sock_ops context.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.ops.cast()) },
        port: ctx.local_port(),
        pad: 0,
    }
}

fn on_listen(ctx: &SockOpsContext) {
    let _ = QL_LISTENERS.insert(&listener_key(ctx), &current_origin(), 0);
}

/// `Err(())`: the connection was skipped at connect() (idle service).
fn origin(ctx: &SockOpsContext, key: &SockKey, active: bool) -> Result<Option<Origin>, ()> {
    if active {
        // SAFETY: helper on the live sock_ops context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
        // SAFETY: the value is copied out before the entry is removed.
        let Some(found) = unsafe { QL_ORIGINS.get(&cookie) }.copied() else {
            return if skipped_at_connect(key) {
                Err(())
            } else {
                Ok(None)
            };
        };
        let _ = QL_ORIGINS.remove(&cookie);
        Ok(Some(found))
    } else {
        // SAFETY: read-only copy of a small value.
        Ok(unsafe { QL_LISTENERS.get(&listener_key(ctx)) }.copied())
    }
}

/// A client socket without an origin whose service is known was skipped at connect(): its
/// service was idle then, and a connection that carried data has woken it since. (Also true
/// of the odd connection whose origin the LRU evicted, or that started before the agent:
/// skipping is always safe, it is the normal path.)
#[inline(always)]
fn skipped_at_connect(key: &SockKey) -> bool {
    // SAFETY: existence check only.
    unsafe { QL_SERVICES.get(&service_of(key, true)) }.is_some()
}

#[inline(never)]
fn on_established(ctx: &SockOpsContext, active: bool, paced: bool) {
    let Some(mut key) = key_from_ctx!(ctx.ops) else {
        count(c::SOCK_SKIPPED_FAMILY, 1);
        return;
    };
    // An idle service first: the check is a small, hot table, and for the connect-and-close
    // clients it exists for it is the only one (no origin lookup, no peer lookup in the
    // sockhash-sized QL_META, whose buckets miss the cache on every new connection).
    if service_streak(&service_of(&key, active)) >= IDLE_STREAK {
        if active {
            count(c::CONN_IDLE_SERVICE, 1);
            observe_idle_client(ctx);
        } else {
            count(c::CONN_PEER_NOT_LOCAL, 1);
        }
        return;
    }
    // The active side is established (and tracked, if local and eligible) before the passive
    // side sees the final ACK; a server whose client is not tracked has nobody to bypass to.
    // Checked first: it is the cheapest way out for the server end of every connection the
    // client end skipped (ineligible, not local).
    // SAFETY: existence check only.
    if !active && unsafe { QL_META.get(&key.peer()) }.is_none() {
        count(c::CONN_PEER_NOT_LOCAL, 1);
        return;
    }
    // No origin: the listener was opened (or the connect started) before the agent attached,
    // the usual case for servers already running when the agent starts or restarts. The
    // socket is still accelerated, as pod "unknown" (cgroup 0): cgroup include rules cannot
    // admit it, cgroup exclude rules cannot catch it.
    let Ok(origin) = origin(ctx, &key, active) else {
        count(c::CONN_IDLE_SERVICE, 1);
        return;
    };
    let origin = origin.unwrap_or_else(|| {
        count(c::CONN_NO_ORIGIN, 1);
        Origin::default()
    });
    let meta = SockMeta {
        cgroup_id: origin.cgroup_id,
        rule_cgroup: origin.rule_cgroup,
        peer_cgroup: 0,
        generation: 0,
        flags: if active { META_F_ACTIVE } else { 0 } | if paced { META_F_PACED } else { 0 },
        unanswered: 0,
        qos_egress: 0,
        qos_ingress: 0,
        unanswered_bytes: 0,
        rx_redirects: 0,
    };
    if !eligible(&key, &meta, &rules_state()) {
        count(c::CONN_INELIGIBLE, 1);
        return;
    }
    // Metadata first: sk_msg may run as soon as the socket is in the sockhash.
    if let Err(e) = QL_META.insert(&key, &meta, u64::from(BPF_NOEXIST)) {
        count(
            if e == -E2BIG {
                c::SOCKHASH_FULL
            } else {
                c::SOCK_INSERT_FAILED
            },
            1,
        );
        return;
    }
    // SAFETY: `ctx.ops` is the live bpf_sock_ops of this callback.
    match QL_SOCKS.update(&mut key, unsafe { &mut *ctx.ops }, u64::from(BPF_NOEXIST)) {
        Ok(()) => {
            count(c::SOCK_INSERTED, 1);
            // Closing must remove the metadata (the sockhash entry goes by itself); RTT
            // samples only happen once data takes TCP, which is when leaving is decided, and
            // so do transmits, where a reader decides (a redirected connection sends no
            // segment until one of its directions moves to TCP).
            let flags = BPF_SOCK_OPS_STATE_CB_FLAG
                | BPF_SOCK_OPS_RTT_CB_FLAG
                | if psock_layout().known() {
                    BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG
                } else {
                    0
                };
            let _ = ctx.set_cb_flags((ctx.cb_flags() | flags) as i32);
        }
        Err(e) => {
            let _ = QL_META.remove(&key);
            count(
                if e == -E2BIG {
                    c::SOCKHASH_FULL
                } else {
                    c::SOCK_INSERT_FAILED
                },
                1,
            );
        }
    }
}

/// The server's end of a connection, seen from either socket.
#[inline(always)]
fn service_of(key: &SockKey, active: bool) -> ServiceKey {
    if active {
        ServiceKey {
            family: key.family,
            port: key.remote_port,
            ip: key.remote_ip,
        }
    } else {
        ServiceKey {
            family: key.family,
            port: key.local_port,
            ip: key.local_ip,
        }
    }
}

/// The service's streak of idle connections (see `IDLE_STREAK`); 0 if it is not known.
/// Connections to a service whose streak is full skip the bypass: the client decides at
/// connect() and again at establishment, the server at its establishment, all from the
/// same table, so both ends agree (a rare change between the two only costs the
/// connection its acceleration: an untracked server sends its tracked client to TCP).
#[inline(always)]
fn service_streak(service: &ServiceKey) -> u32 {
    // SAFETY: the u32 is copied out at once.
    unsafe { QL_SERVICES.get(service) }.copied().unwrap_or(0)
}

/// One skipped client in `IDLE_PROBE_EVERY` (by socket cookie) asks for its close, where
/// `on_state` sees whether it carried data and, if so, wakes its service. A state callback
/// at close, instead of the sockhash entry and psock a tracked probe costs.
#[inline(always)]
fn observe_idle_client(ctx: &SockOpsContext) {
    // SAFETY: helper on the live sock_ops context.
    if unsafe { bpf_get_socket_cookie(ctx.ops.cast()) } % u64::from(IDLE_PROBE_EVERY) == 0 {
        let _ = ctx.set_cb_flags((ctx.cb_flags() | PROBE_CB_FLAGS) as i32);
    }
}

/// What a probe of an idle service asks for: its close, and `BPF_SOCK_OPS_RTO_CB_FLAG` as
/// its mark, so its close needs no lookup in the sockhash-sized `QL_META` (a cache miss) to
/// know it is untracked. Tracked sockets never set that flag, and its callback (a
/// retransmission timeout, rare) falls through `ql_sockops` untouched.
const PROBE_CB_FLAGS: u32 = BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RTO_CB_FLAG;

fn on_state(ctx: &SockOpsContext) {
    if ctx.arg(1) != BPF_TCP_CLOSE {
        return;
    }
    let Some(key) = key_from_ctx!(ctx.ops) else {
        return;
    };
    let probe = ctx.cb_flags() & PROBE_CB_FLAGS == PROBE_CB_FLAGS;
    let meta = if probe { None } else { QL_META.get_ptr(&key) };
    let Some(meta) = meta else {
        // Untracked: an observed client of an idle service (or a paced socket, for which
        // the same holds: it carried data to whatever service it reached).
        if carried_data(ctx) {
            wake_service(&service_of(&key, true));
        }
        return;
    };
    // SAFETY: live element of a BPF_F_NO_PREALLOC hash; copied out at once.
    let meta = unsafe { *meta };
    if meta.flags & META_F_ACTIVE == 0 {
        learn_service(&key, &meta);
    }
    let _ = QL_META.remove(&key);
}

/// Whether any payload went either way on the closing socket. Segments, not bytes:
/// `bytes_acked` counts the SYN of an active open (and a FIN), so it is never 0 at close.
#[inline(always)]
fn carried_data(ctx: &SockOpsContext) -> bool {
    // SAFETY: context fields, read whole (see `key_from_ctx` for why volatile).
    unsafe {
        core::ptr::read_volatile(core::ptr::addr_of!((*ctx.ops).data_segs_in))
            | core::ptr::read_volatile(core::ptr::addr_of!((*ctx.ops).data_segs_out))
            != 0
    }
}

/// A connection to the service carried data: its streak of idle connections ends, and if the
/// service was idle its next connections are tracked again.
#[inline(always)]
fn wake_service(service: &ServiceKey) {
    if let Some(streak) = QL_SERVICES.get_ptr_mut(service) {
        // SAFETY: a hint shared by the service's connections (see `learn_service`).
        unsafe {
            if *streak >= IDLE_STREAK {
                count(c::IDLE_SERVICE_WOKE, 1);
            }
            if *streak != 0 {
                *streak = 0;
            }
        }
    }
}

/// At the server's close: was this connection idle (no message either way)? Updates the
/// service's streak of idle connections; one connection with data ends it.
#[inline(always)]
fn learn_service(key: &SockKey, meta: &SockMeta) {
    let idle = meta.flags & (META_F_SENT | META_F_LOCKED_TCP) == 0 && meta.rx_redirects == 0;
    let service = service_of(key, false);
    match QL_SERVICES.get_ptr_mut(&service) {
        // SAFETY: a hint shared by the service's connections; a lost update only delays the
        // decision by one connection.
        Some(streak) => unsafe {
            *streak = if idle {
                (*streak).saturating_add(1).min(IDLE_STREAK)
            } else {
                0
            };
        },
        None if idle => {
            let _ = QL_SERVICES.insert(&service, &1, 0);
        }
        None => {}
    }
}

/// A socket demoted to TCP by sk_msg leaves the sockhash here (sk_msg may not delete from a
/// sockhash; sock_ops may), so its writes get plain TCP and its batching back. Only when
/// nothing was ever redirected into it: removal frees the redirect queue with its contents.
fn on_rtt(ctx: &SockOpsContext) {
    let Some(key) = key_from_ctx!(ctx.ops) else {
        return;
    };
    // RTT samples serve pacing (sockets with a shaped end) and leaving the bypass (tracked
    // sockets); an untracked socket that asks is a paced one.
    let Some(meta) = QL_META.get_ptr_mut(&key) else {
        if !pacing::refresh(ctx, &key) {
            stop_rtt_callbacks(ctx);
        }
        return;
    };
    // SAFETY: live element of a BPF_F_NO_PREALLOC hash.
    let meta = unsafe { &mut *meta };
    if meta.flags & META_F_PACED != 0 && !pacing::refresh(ctx, &key) {
        meta.flags &= !META_F_PACED;
    }
    let paced = meta.flags & META_F_PACED != 0;
    if meta.flags & (META_F_LEAVING | META_F_LEFT) != META_F_LEAVING {
        return;
    }
    // SAFETY: aligned read of a live map value; pairs with the peer's atomic increment (see
    // SockMeta::rx_redirects), and LEAVING was set at least one RTT ago.
    let rx = unsafe { core::ptr::read_volatile(&raw const meta.rx_redirects) };
    if rx == 0 {
        leave_sockhash(&key, meta, c::SOCK_LEFT_MAP);
    }
    // Decided either way (a socket with redirected bytes in its queue stays for good): no
    // more callbacks on every ACK, unless pacing still needs them.
    if !paced {
        stop_rtt_callbacks(ctx);
    }
}

/// A tracked socket is sending a segment (`BPF_SOCK_OPS_HDR_OPT_LEN_CB`; no option is
/// reserved): the one callback a pure reader gets, for the ACKs of the TCP bytes its writer
/// sends once that writer has moved to TCP. If the writer moved alone (no redirect of its can
/// still arrive), this reader leaves the sockhash as soon as its redirect queue is empty,
/// and its reads skip tcp_bpf's recvmsg from then on. Decided either way, the callbacks stop.
fn on_transmit(ctx: &SockOpsContext) {
    if reader_decided(ctx) {
        let _ = ctx.set_cb_flags((ctx.cb_flags() & !BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG) as i32);
    }
}

/// Whether this socket's fate as a reader is settled (see `on_transmit`).
#[inline(always)]
fn reader_decided(ctx: &SockOpsContext) -> bool {
    let Some(key) = key_from_ctx!(ctx.ops) else {
        return true;
    };
    let Some(meta) = QL_META.get_ptr_mut(&key) else {
        return true;
    };
    // SAFETY: live element of a BPF_F_NO_PREALLOC hash.
    let meta = unsafe { &mut *meta };
    if meta.flags & META_F_LEFT != 0 {
        return true;
    }
    let Some(peer) = QL_META.get_ptr(&key.peer()) else {
        // The writer closed; what it redirected may still be queued here.
        return true;
    };
    // SAFETY: aligned read of a live map value the peer's sk_msg writes.
    let peer_flags = unsafe { core::ptr::read_volatile(&raw const (*peer).flags) };
    if peer_flags & META_F_LOCKED_TCP == 0 {
        // The writer still redirects. This socket sends by TCP while it does (a large
        // answer to small requests): nothing to watch for. Otherwise a stray segment.
        return meta.flags & META_F_LOCKED_TCP != 0;
    }
    if peer_flags & META_F_LOCKED_ALONE == 0 {
        return true;
    }
    // SAFETY: the socket of the live sock_ops context.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() || !psock::redirect_queue_empty(sk) {
        return false;
    }
    if leave_sockhash(&key, meta, c::READER_LEFT_MAP) && meta.flags & META_F_PACED == 0 {
        stop_rtt_callbacks(ctx);
    }
    true
}

/// Removes this socket's own key from the sockhash (sock_ops may; sk_msg may not) and marks
/// it as gone (peers stop redirecting to a leaving socket), counting the removal in `counter`.
#[inline(always)]
fn leave_sockhash(key: &SockKey, meta: &mut SockMeta, counter: u32) -> bool {
    // SAFETY: the key of the socket this callback runs for.
    let removed = unsafe {
        bpf_map_delete_elem(
            core::ptr::addr_of!(QL_SOCKS).cast_mut().cast(),
            core::ptr::from_ref(key).cast(),
        )
    } == 0;
    if removed {
        meta.flags |= META_F_LEAVING | META_F_LEFT;
        count(counter, 1);
    }
    removed
}

fn stop_rtt_callbacks(ctx: &SockOpsContext) {
    let _ = ctx.set_cb_flags((ctx.cb_flags() & !BPF_SOCK_OPS_RTT_CB_FLAG) as i32);
}
