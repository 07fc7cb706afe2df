//! Counter slots of the per-CPU statistics arrays, one array per BPF object.
//!
//! BPF programs add to slot `i` of their own CPU's copy; userspace sums the copies. The name
//! tables are what `quicklane status` prints, so a slot and its name are defined together.

/// Declares a counter set: constants for the BPF side and a name table for userspace.
macro_rules! counter_set {
    ($table:ident, $len:ident { $($name:ident = $idx:literal : $label:literal,)* }) => {
        $(pub const $name: u32 = $idx;)*
        /// Number of slots; the size of the per-CPU array.
        pub const $len: u32 = [$($idx),*].len() as u32;
        /// Slot names in slot order, as printed by `quicklane status`.
        pub const $table: &[&str] = &[$($label),*];
        const _: () = {
            let mut i = 0;
            let idx = [$($idx),*];
            while i < idx.len() {
                assert!(idx[i] as usize == i, "counter slots must be dense and in order");
                i += 1;
            }
        };
    };
}

pub mod sockops {
    counter_set!(NAMES, LEN {
        CALLS = 0: "sock_ops_calls",
        ACTIVE_ESTABLISHED = 1: "active_established",
        PASSIVE_ESTABLISHED = 2: "passive_established",
        SOCK_INSERTED = 3: "sockhash_inserted",
        SOCK_INSERT_FAILED = 4: "sockhash_insert_failed",
        SOCK_SKIPPED_FAMILY = 5: "skipped_family",
        MSG_CALLS = 6: "sk_msg_calls",
        MSG_REDIRECTED = 7: "msg_redirected",
        MSG_REDIRECTED_BYTES = 8: "bytes_redirected",
        MSG_PEER_MISS = 9: "msg_peer_miss",
        SOCKHASH_FULL = 10: "sockhash_full",
        CONN_INELIGIBLE = 11: "conn_ineligible",
        CONN_NO_ORIGIN = 12: "conn_origin_unknown",
        CONN_LOCKED_TCP = 13: "conn_locked_tcp",
        MSG_NORMAL_PATH = 14: "msg_normal_path",
        MSG_UNTRACKED = 15: "msg_untracked",
        REEVALUATED = 16: "rules_reevaluated",
        CONN_DEMOTED_SMALL = 17: "conn_demoted_small_msgs",
        SOCK_LEFT_MAP = 18: "sockhash_left",
        CONN_PEER_NOT_LOCAL = 19: "conn_peer_not_local",
        CONN_PACED = 20: "conn_paced",
        PACING_UPDATES = 21: "pacing_updates",
        PACING_RELEASED = 22: "pacing_released",
        MSG_QOS_CHARGED = 23: "msg_qos_charged",
        CONN_DEMOTED_QOS = 24: "conn_demoted_over_rate",
        CONN_IDLE_SERVICE = 25: "conn_skipped_idle_service",
        CONN_DEMOTED_LARGE = 26: "conn_demoted_large_msgs",
        CONN_DEMOTED_LOOPBACK = 27: "conn_demoted_loopback_stream",
        CONN_ADOPTED = 28: "conn_adopted",
        IDLE_SERVICE_WOKE = 29: "idle_service_woke",
        READER_LEFT_MAP = 30: "sockhash_reader_left",
    });
}

pub mod tc {
    counter_set!(NAMES, LEN {
        EGRESS_PACKETS = 0: "egress_packets",
        EGRESS_BYTES = 1: "egress_bytes",
        INGRESS_PACKETS = 2: "ingress_packets",
        INGRESS_BYTES = 3: "ingress_bytes",
        QOS_SHAPED = 4: "qos_shaped_packets",
        QOS_MARKED = 5: "qos_ce_marked",
        QOS_DROPPED = 6: "qos_dropped",
        QOS_NOT_ECT = 7: "qos_late_not_ect",
        QOS_UNKNOWN_POD = 8: "qos_unmanaged_packets",
    });
}

pub mod xdp {
    counter_set!(NAMES, LEN {
        PACKETS = 0: "packets",
        BYTES = 1: "bytes",
        NON_IP = 2: "non_ip_packets",
    });
}
