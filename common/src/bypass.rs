//! Per-socket state, eligibility rules and per-pod accounting of the same-node bypass.

/// `SockMeta::flags`: the socket was the connecting side (its service port is `remote_port`).
pub const META_F_ACTIVE: u32 = 1;
/// A message of this socket took the normal path because the peer was not (yet) in the
/// sockhash. Redirecting later messages could overtake those bytes at the receiver, so the
/// socket stays on the normal path for good.
pub const META_F_LOCKED_TCP: u32 = 2;
/// This direction became a small-message stream; the socket leaves the sockhash at its next
/// RTT callback if nothing was ever redirected into it. Peers stop redirecting to it.
pub const META_F_LEAVING: u32 = 8;
/// Removed from the sockhash: plain TCP from here on, with TCP's own batching.
pub const META_F_LEFT: u32 = 16;
/// This socket and its peer are both eligible under the rules of `SockMeta::generation`.
pub const META_F_ELIGIBLE: u32 = 4;
/// The socket is paced (a QoS-shaped end): its RTT samples refresh the pacing rate.
pub const META_F_PACED: u32 = 32;
/// This socket sent at least one message (sk_msg saw it).
pub const META_F_SENT: u32 = 64;
/// This socket moved to TCP while no other send, receive or redirect was in progress on it
/// (its psock held only its map link and the locking send), so no redirect of its can still
/// be on its way to the peer: once the peer's redirect queue is empty it stays empty, and the
/// peer may leave the sockhash too (`sockhash_reader_left`).
pub const META_F_LOCKED_ALONE: u32 = 128;

/// A service (the server's address and port) whose last `IDLE_STREAK` tracked connections
/// closed without a single message either way is idle: connections that never carry data
/// gain nothing from the bypass and would pay for a psock each (the kernel allocates it at
/// establishment and frees it through RCU and a workqueue at close, about a quarter of the
/// cost of a short connection). New connections to an idle service take the normal path;
/// one in `IDLE_PROBE_EVERY` of them (by socket cookie) asks for its close, and if it
/// carried data the service is woken: its next connections are tracked again.
pub const IDLE_STREAK: u32 = 8;
pub const IDLE_PROBE_EVERY: u32 = 4;

/// When an unanswered stream moves from the redirect to TCP. A redirect costs one queued
/// message, one reader wakeup and the reader's socket lock per message: TCP beats it on
/// streams of tiny messages from a writer with Nagle's algorithm on (Nagle holds them back
/// until an ACK and sends dozens as one segment and one wakeup), on streams of large ones
/// (the writer waits for the reader's lock while the reader copies, where TCP queues to the
/// socket backlog and pipelines), and over loopback at every size for a writer with Nagle's
/// algorithm on. A TCP_NODELAY writer's writes leave one segment each, so the redirect
/// carries them better at every size below the large bound, over loopback too.
/// Request/response stays: each answer starts a new window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamPolicy {
    /// A window averaging below this many bytes per message, from a writer with Nagle's
    /// algorithm on, is a small-message stream (0: never).
    pub small_bytes: u32,
    /// A window averaging at least this many bytes per message is a large-message stream
    /// (0: never).
    pub large_bytes: u32,
    /// The same bound for a writer with Nagle's algorithm off (TCP_NODELAY), whose TCP
    /// sends each write at once and so keeps up with the redirect from smaller sizes on
    /// (0: `large_bytes` applies to it too; no effect while `large_bytes` is 0).
    pub large_bytes_nodelay: u32,
    /// Messages per window.
    pub streak: u32,
    /// Every loopback stream from a writer with Nagle's algorithm on moves to TCP.
    pub loopback: bool,
}

/// Why a stream moved to TCP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamKind {
    Small,
    Large,
    Loopback,
}

impl StreamPolicy {
    /// Judges a window of `msgs` unanswered messages totalling `bytes` (a saturated count
    /// reads as large) from a writer with (`nodelay`) or without Nagle's algorithm off.
    /// `None` before the window is full, and for a stream the redirect carries better (the
    /// caller starts a new window). By the average, not message by message: the kernel may
    /// split one write into messages of any size.
    #[must_use]
    pub const fn judge(
        &self,
        msgs: u32,
        bytes: u32,
        loopback: bool,
        nodelay: bool,
    ) -> Option<StreamKind> {
        if msgs < self.streak {
            return None;
        }
        let (msgs, bytes) = (msgs as u64, bytes as u64);
        let large = if nodelay && self.large_bytes != 0 && self.large_bytes_nodelay != 0 {
            self.large_bytes_nodelay
        } else {
            self.large_bytes
        };
        if !nodelay && bytes < self.small_bytes as u64 * msgs {
            Some(StreamKind::Small)
        } else if self.loopback && loopback && !nodelay {
            Some(StreamKind::Loopback)
        } else if large != 0 && bytes >= large as u64 * msgs {
            Some(StreamKind::Large)
        } else {
            None
        }
    }
}

/// Key of `QL_SERVICES`: the server's end of a connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    pub family: u32,
    pub port: u32,
    pub ip: [u32; 4],
}

/// What the bypass knows about one socket it tracks, keyed by the socket's `SockKey`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockMeta {
    /// cgroup of the task that created the socket (connect) or its listener (accept).
    pub cgroup_id: u64,
    /// The nearest cgroup with a rule when the socket was set up (0: none).
    pub rule_cgroup: u64,
    /// The peer's `cgroup_id`, learned on the first redirect (0: not yet).
    pub peer_cgroup: u64,
    /// Rules generation the `META_F_ELIGIBLE` bit was computed under; 0 until the first message,
    /// which is when the peer's metadata can be read.
    pub generation: u32,
    pub flags: u32,
    /// Messages sent since the peer last sent one, or since the last stream judgement; the
    /// peer's sk_msg resets it.
    pub unanswered: u32,
    /// QoS slot + 1 of the local pod when its egress is shaped (0: not shaped); set with
    /// `generation`. Redirected bytes are charged to that pod's timeline.
    pub qos_egress: u32,
    /// QoS slot + 1 of the peer pod when its ingress is shaped (0: not shaped).
    pub qos_ingress: u32,
    /// Bytes of the `unanswered` messages (saturating).
    pub unanswered_bytes: u32,
    /// Messages the peer redirected into this socket (atomically incremented by the peer
    /// before it checks `META_F_LEAVING`): nonzero means our redirect queue may hold bytes,
    /// and leaving the sockhash would drop them. 64-bit: BPF atomics are 64-bit here.
    pub rx_redirects: u64,
}

/// Who created a socket, recorded where the task context is right (connect, listen) and
/// picked up at establishment, where it is not.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Origin {
    pub cgroup_id: u64,
    pub rule_cgroup: u64,
}

/// A listening socket: accepted sockets find their listener's origin by netns and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    pub netns_cookie: u64,
    pub port: u32,
    pub pad: u32,
}

/// Rule verdicts in `QL_CGROUP_RULES`, `QL_PORT_RULES` and the CIDR tries.
pub const RULE_INCLUDE: u32 = 1;
pub const RULE_EXCLUDE: u32 = 2;

/// `RulesState::flags`: an include list exists, so what matches no rule is excluded.
pub const RULES_F_CGROUP_INCLUDES: u32 = 1;
pub const RULES_F_CIDR_INCLUDES: u32 = 2;
pub const RULES_F_PORT_INCLUDES: u32 = 4;
/// Some cgroup rule exists (include or exclude): only then is the ancestor walk worth its
/// helper calls on every connect() and listen().
pub const RULES_F_CGROUP_RULES: u32 = 8;

/// Slot 0 of `QL_RULES_STATE`. Userspace writes the rule maps first and bumps `generation`
/// last; sk_msg re-evaluates a socket whose `SockMeta::generation` is older.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RulesState {
    pub generation: u32,
    pub flags: u32,
}

/// Sender and receiver pod (cgroup ids) of bypassed messages.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src_cgroup: u64,
    pub dst_cgroup: u64,
}

/// What the bypass moved for one `FlowKey`. Keyed by the pair so each message costs one map
/// update; userspace sums per pod and direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub bytes: u64,
    pub msgs: u64,
}

/// How deep the cgroup ancestor walk looks for a rule (kubepods/burstable/pod/container is 4).
pub const MAX_CGROUP_LEVEL: i32 = 12;

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all): repr(C), Copy, no padding (asserted below).
    unsafe impl aya::Pod for super::SockMeta {}
    unsafe impl aya::Pod for super::Origin {}
    unsafe impl aya::Pod for super::ListenerKey {}
    unsafe impl aya::Pod for super::RulesState {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::Traffic {}
    unsafe impl aya::Pod for super::ServiceKey {}
}

const _: () = {
    assert!(core::mem::size_of::<SockMeta>() == 56);
    assert!(core::mem::size_of::<Origin>() == 16);
    assert!(core::mem::size_of::<ListenerKey>() == 16);
    assert!(core::mem::size_of::<RulesState>() == 8);
    assert!(core::mem::size_of::<FlowKey>() == 16);
    assert!(core::mem::size_of::<Traffic>() == 16);
    assert!(core::mem::size_of::<ServiceKey>() == 24);
};

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: StreamPolicy = StreamPolicy {
        small_bytes: 192,
        large_bytes: 32768,
        large_bytes_nodelay: 8192,
        streak: 32,
        loopback: true,
    };

    #[test]
    fn streams_are_judged_by_window_average_and_path() {
        use StreamKind::*;
        let judge = |size: u32, loopback| POLICY.judge(32, size * 32, loopback, false);
        assert_eq!(POLICY.judge(31, 31, false, false), None, "window not full");
        assert_eq!(judge(64, false), Some(Small));
        assert_eq!(judge(64, true), Some(Small));
        assert_eq!(judge(191, false), Some(Small));
        assert_eq!(judge(192, false), None);
        assert_eq!(judge(4096, false), None);
        assert_eq!(judge(32767, false), None);
        assert_eq!(judge(32768, false), Some(Large));
        assert_eq!(judge(4096, true), Some(Loopback));
        assert_eq!(judge(1 << 20, true), Some(Loopback));
        // A TCP_NODELAY writer over loopback gets the bounds of any other path.
        let nodelay_lo = |size: u32| POLICY.judge(32, size * 32, true, true);
        assert_eq!(nodelay_lo(64), None);
        assert_eq!(nodelay_lo(4096), None);
        assert_eq!(nodelay_lo(8192), Some(Large));
        // A saturated byte count is a large stream, not an overflow.
        assert_eq!(POLICY.judge(32, u32::MAX, false, false), Some(Large));
        // One write split into pieces of several sizes still averages out large.
        assert_eq!(
            POLICY.judge(32, 20 * 65536 + 12 * 8192, false, false),
            Some(Large)
        );
        let off = StreamPolicy {
            small_bytes: 0,
            large_bytes: 0,
            large_bytes_nodelay: 8192,
            streak: 32,
            loopback: false,
        };
        for size in [1, 4096, 1 << 20] {
            assert_eq!(off.judge(32, size * 32, true, true), None);
        }
    }

    #[test]
    fn a_nodelay_writer_leaves_for_tcp_from_its_own_bound() {
        use StreamKind::*;
        let judge = |size: u32, nodelay| POLICY.judge(32, size * 32, false, nodelay);
        assert_eq!(judge(8191, true), None);
        assert_eq!(judge(8192, true), Some(Large));
        assert_eq!(judge(16384, true), Some(Large));
        assert_eq!(
            judge(16384, false),
            None,
            "Nagle's writer keeps the redirect"
        );
        for size in [1, 64, 191] {
            assert_eq!(
                judge(size, true),
                None,
                "a TCP_NODELAY writer's small writes keep the redirect"
            );
        }
        assert_eq!(judge(64, false), Some(Small));
        let unset = StreamPolicy {
            large_bytes_nodelay: 0,
            ..POLICY
        };
        assert_eq!(unset.judge(32, 16384 * 32, false, true), None);
        assert_eq!(unset.judge(32, 32768 * 32, false, true), Some(Large));
    }
}
