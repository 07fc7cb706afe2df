//! Every map of the bypass. All are pinned by name, so a restarted agent re-adopts them with
//! their contents; sizes marked "default" are overridden by the loader from the config.
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, SockHash},
};
use quicklane_common::{
    bypass::{
        FlowKey, ListenerKey, Origin, RulesState, ServiceKey, SockMeta, StreamPolicy, Traffic,
    },
    counters::sockops as c,
    qos::{AddrKey, ClassActivity, QosPod, QosStats, CLASSES, MAX_PODS},
    senders::{PacedSock, Senders},
    sock::SockKey,
    PsockLayout, SockopsConfig, SOCKOPS_F_LOOPBACK_STREAMS_TCP,
};

/// Default capacity; `bypass.max_sockets` overrides it for `QL_SOCKS` and `QL_META`.
const SOCKS_DEFAULT_MAX: u32 = 262_144;

#[map(name = "QL_SOCKS")]
pub static QL_SOCKS: SockHash<SockKey> = SockHash::pinned(SOCKS_DEFAULT_MAX, 0);

/// Entries come and go with connections: no preallocation of max_sockets elements.
#[map(name = "QL_META")]
pub static QL_META: HashMap<SockKey, SockMeta> =
    HashMap::pinned(SOCKS_DEFAULT_MAX, BPF_F_NO_PREALLOC);

/// Socket cookie -> origin, between connect() and establishment. LRU: a connect that never
/// establishes must not leak an entry forever.
#[map(name = "QL_ORIGINS")]
pub static QL_ORIGINS: LruHashMap<u64, Origin> = LruHashMap::pinned(65_536, 0);

#[map(name = "QL_LISTENERS")]
pub static QL_LISTENERS: LruHashMap<ListenerKey, Origin> = LruHashMap::pinned(16_384, 0);

/// Service -> how many of its tracked connections in a row closed idle (see `IDLE_STREAK`).
/// LRU: services come and go; losing one only means it is learned again.
#[map(name = "QL_SERVICES")]
pub static QL_SERVICES: LruHashMap<ServiceKey, u32> = LruHashMap::pinned(16_384, 0);

#[map(name = "QL_CGROUP_RULES")]
pub static QL_CGROUP_RULES: HashMap<u64, u32> = HashMap::pinned(16_384, 0);

#[map(name = "QL_PORT_RULES")]
pub static QL_PORT_RULES: HashMap<u32, u32> = HashMap::pinned(4_096, 0);

#[map(name = "QL_CIDR4_RULES")]
pub static QL_CIDR4_RULES: LpmTrie<[u8; 4], u32> = LpmTrie::pinned(4_096, 0);

#[map(name = "QL_CIDR6_RULES")]
pub static QL_CIDR6_RULES: LpmTrie<[u8; 16], u32> = LpmTrie::pinned(4_096, 0);

#[map(name = "QL_RULES_STATE")]
pub static QL_RULES_STATE: Array<RulesState> = Array::pinned(1, 0);

/// What the bypass moved, per (sender pod, receiver pod). Per-CPU: no shared read-modify-write.
#[map(name = "QL_FLOW_TRAFFIC")]
pub static QL_FLOW_TRAFFIC: PerCpuHashMap<FlowKey, Traffic> = PerCpuHashMap::pinned(16_384, 0);

/// Pod address -> QoS pod slot (sock_ops knows a socket's pod by its addresses on every
/// kernel). The other `QL_QOS_*` maps are the tc object's, shared by pin name: sk_msg charges
/// bypassed bytes to the same timelines, classes and counters as the tc shaper.
#[map(name = "QL_QOS_ADDRS")]
pub static QL_QOS_ADDRS: HashMap<AddrKey, u32> = HashMap::pinned(MAX_PODS * 4, 0);

#[map(name = "QL_QOS_PODS")]
pub static QL_QOS_PODS: Array<QosPod> = Array::pinned(MAX_PODS, 0);

#[map(name = "QL_QOS_ACTIVE")]
pub static QL_QOS_ACTIVE: Array<ClassActivity> = Array::pinned(2 * CLASSES as u32, 0);

#[map(name = "QL_QOS_EDT")]
pub static QL_QOS_EDT: Array<u64> = Array::pinned(MAX_PODS * 2, 0);

#[map(name = "QL_QOS_STATS")]
pub static QL_QOS_STATS: PerCpuArray<QosStats> = PerCpuArray::pinned(MAX_PODS * 2, 0);

/// Per shaped aggregate (indexed like `QL_QOS_EDT`): how many sockets share its rate.
#[map(name = "QL_QOS_SENDERS")]
pub static QL_QOS_SENDERS: Array<Senders> = Array::pinned(MAX_PODS * 2, 0);

/// Socket cookie -> a paced socket's marks in the windows of `QL_QOS_SENDERS`. Removed when
/// the socket closes; LRU so that a socket missed there (closed while the agent was down)
/// cannot leak its entry.
///
/// Default capacity; `qos.max_paced_sockets` overrides it.
#[map(name = "QL_PACED")]
pub static QL_PACED: LruHashMap<u64, PacedSock> = LruHashMap::pinned(65_536, 0);

#[map(name = "QL_SOCKOPS_STATS")]
static QL_SOCKOPS_STATS: PerCpuArray<u64> = PerCpuArray::pinned(c::LEN, 0);

#[no_mangle]
static QL_SOCKOPS_CONFIG: SockopsConfig = SockopsConfig {
    abi_version: 0,
    flags: 0,
    small_msg_bytes: 0,
    stream_streak: 0,
    qos_burst_ns: 0,
    large_msg_bytes: 0,
    qos_credit_ns: 0,
    large_msg_bytes_nodelay: 0,
    tcp_nonagle_bit: 0,
    psock: PsockLayout {
        sk_user_data: 0,
        refcnt: 0,
        ingress_msg: 0,
    },
};

#[inline(always)]
pub fn count(slot: u32, by: u64) {
    if let Some(p) = QL_SOCKOPS_STATS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, only this CPU writes it while this program runs.
        unsafe { *p += by };
    }
}

#[inline(always)]
pub fn config_flags() -> u32 {
    // SAFETY: read-only global patched by the loader; volatile so LLVM cannot fold the
    // compile-time default into the program.
    unsafe { core::ptr::read_volatile(core::ptr::addr_of!(QL_SOCKOPS_CONFIG.flags)) }
}

#[inline(always)]
pub fn stream_policy() -> StreamPolicy {
    // SAFETY: as for `config_flags`.
    unsafe {
        StreamPolicy {
            small_bytes: core::ptr::read_volatile(core::ptr::addr_of!(
                QL_SOCKOPS_CONFIG.small_msg_bytes
            )),
            large_bytes: core::ptr::read_volatile(core::ptr::addr_of!(
                QL_SOCKOPS_CONFIG.large_msg_bytes
            )),
            large_bytes_nodelay: core::ptr::read_volatile(core::ptr::addr_of!(
                QL_SOCKOPS_CONFIG.large_msg_bytes_nodelay
            )),
            streak: core::ptr::read_volatile(core::ptr::addr_of!(QL_SOCKOPS_CONFIG.stream_streak)),
            loopback: config_flags() & SOCKOPS_F_LOOPBACK_STREAMS_TCP != 0,
        }
    }
}

/// See `SockopsConfig::tcp_nonagle_bit`.
#[inline(always)]
pub fn tcp_nonagle_bit() -> u32 {
    // SAFETY: as for `config_flags`.
    unsafe { core::ptr::read_volatile(core::ptr::addr_of!(QL_SOCKOPS_CONFIG.tcp_nonagle_bit)) }
}

/// See `PsockLayout`.
#[inline(always)]
pub fn psock_layout() -> PsockLayout {
    let at = core::ptr::addr_of!(QL_SOCKOPS_CONFIG.psock);
    // SAFETY: as for `config_flags`.
    unsafe {
        PsockLayout {
            sk_user_data: core::ptr::read_volatile(core::ptr::addr_of!((*at).sk_user_data)),
            refcnt: core::ptr::read_volatile(core::ptr::addr_of!((*at).refcnt)),
            ingress_msg: core::ptr::read_volatile(core::ptr::addr_of!((*at).ingress_msg)),
        }
    }
}

/// See `SockopsConfig::qos_burst_ns`.
#[inline(always)]
pub fn qos_burst_ns() -> u64 {
    // SAFETY: as for `config_flags`.
    u64::from(unsafe {
        core::ptr::read_volatile(core::ptr::addr_of!(QL_SOCKOPS_CONFIG.qos_burst_ns))
    })
}

/// See `SockopsConfig::qos_credit_ns`.
#[inline(always)]
pub fn qos_credit_ns() -> u64 {
    // SAFETY: as for `config_flags`.
    u64::from(unsafe {
        core::ptr::read_volatile(core::ptr::addr_of!(QL_SOCKOPS_CONFIG.qos_credit_ns))
    })
}

#[inline(always)]
pub fn rules_state() -> RulesState {
    QL_RULES_STATE.get(0).copied().unwrap_or_default()
}
