//! Maps of the tc object. The `QL_QOS_*` tables are pinned by name and declared identically
//! in the sock_ops object, so both datapaths read one set of pod rates and class activity.
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, PerCpuArray},
};
use quicklane_common::{
    counters::tc as c,
    qos::{ClassActivity, QosConfig, QosPod, QosStats, CLASSES, MAX_PODS},
};

#[map(name = "QL_TC_STATS")]
static QL_TC_STATS: PerCpuArray<u64> = PerCpuArray::pinned(c::LEN, 0);

/// Host-side interface index -> pod slot.
#[map(name = "QL_QOS_IFINDEX")]
pub static QL_QOS_IFINDEX: HashMap<u32, u32> = HashMap::pinned(MAX_PODS, 0);

#[map(name = "QL_QOS_PODS")]
pub static QL_QOS_PODS: Array<QosPod> = Array::pinned(MAX_PODS, 0);

/// Next departure time per (pod slot, direction), advanced with atomic adds.
#[map(name = "QL_QOS_EDT")]
pub static QL_QOS_EDT: Array<u64> = Array::pinned(MAX_PODS * 2, 0);

/// Per direction and class: recent bytes and whether the class competes (see ClassActivity).
#[map(name = "QL_QOS_ACTIVE")]
pub static QL_QOS_ACTIVE: Array<ClassActivity> = Array::pinned(2 * CLASSES as u32, 0);

#[map(name = "QL_QOS_STATS")]
pub static QL_QOS_STATS: PerCpuArray<QosStats> = PerCpuArray::pinned(MAX_PODS * 2, 0);

#[no_mangle]
static QL_QOS_CONFIG: QosConfig = QosConfig {
    abi_version: 0,
    flags: 0,
    horizon_ns: 0,
    ce_threshold_ns: 0,
    active_window_ns: 0,
    credit_ns: 0,
};

/// The loader's values; read volatile so the compiler does not fold the zero initialiser.
#[inline(always)]
pub fn config() -> QosConfig {
    // SAFETY: a plain read of a global the loader rewrites before the program is loaded.
    unsafe { core::ptr::read_volatile(&QL_QOS_CONFIG) }
}

#[inline(always)]
pub fn count(slot: u32, by: u64) {
    if let Some(p) = QL_TC_STATS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, only this CPU writes it while this program runs.
        unsafe { *p += by };
    }
}
