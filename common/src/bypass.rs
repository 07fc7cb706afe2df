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

/// A service (the server's address and port) whose last `IDLE_STREAK` tracked connections
/// closed without a single message either way is idle: connections that never carry data
/// gain nothing from the bypass and would pay for a psock each (the kernel allocates it at
/// establishment and frees it through RCU and a workqueue at close, about a quarter of the
/// cost of a short connection). New connections to an idle service take the normal path,
/// except one in `IDLE_PROBE_EVERY`, which is still tracked so a service that starts carrying
/// data is seen within a few connections and accelerated again.
pub const IDLE_STREAK: u32 = 8;
pub const IDLE_PROBE_EVERY: u32 = 16;

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
    /// Messages sent since the peer last sent one; the peer's sk_msg resets it.
    pub unanswered: u32,
    /// QoS slot + 1 of the local pod when its egress is shaped (0: not shaped); set with
    /// `generation`. Redirected bytes are charged to that pod's timeline.
    pub qos_egress: u32,
    /// QoS slot + 1 of the peer pod when its ingress is shaped (0: not shaped).
    pub qos_ingress: u32,
    pub pad: u32,
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
