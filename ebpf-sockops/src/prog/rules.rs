//! Eligibility: cgroup, peer CIDR and service port rules. Include lists narrow, exclude lists
//! always win, the most specific rule decides (deepest cgroup, longest prefix).
use aya_ebpf::{helpers::bpf_get_current_ancestor_cgroup_id, maps::lpm_trie::Key};
use quicklane_common::{
    bypass::{
        Origin, RulesState, SockMeta, MAX_CGROUP_LEVEL, META_F_ACTIVE, RULES_F_CGROUP_INCLUDES,
        RULES_F_CGROUP_RULES, RULES_F_CIDR_INCLUDES, RULES_F_PORT_INCLUDES, RULE_EXCLUDE,
        RULE_INCLUDE,
    },
    sock::{SockKey, AF_INET},
    SOCKOPS_F_CGROUP_ORIGIN,
};

use super::maps::{
    config_flags, rules_state, QL_CGROUP_RULES, QL_CIDR4_RULES, QL_CIDR6_RULES, QL_PORT_RULES,
};

/// The current task's cgroup and the nearest ancestor (or itself) that carries a rule. Only
/// meaningful where the current task owns the socket: connect() and listen().
#[inline(always)]
pub fn current_origin() -> Origin {
    if config_flags() & SOCKOPS_F_CGROUP_ORIGIN == 0 {
        return Origin::default();
    }
    let cgroup_id = unsafe { aya_ebpf::helpers::bpf_get_current_cgroup_id() };
    if rules_state().flags & RULES_F_CGROUP_RULES == 0 {
        return Origin {
            cgroup_id,
            rule_cgroup: 0,
        };
    }
    let mut rule_cgroup = 0;
    let mut level = MAX_CGROUP_LEVEL;
    while level >= 0 {
        // SAFETY: plain helper call; 0 means "no ancestor at that level".
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        // SAFETY: read-only lookup of a u32 verdict.
        if id != 0 && unsafe { QL_CGROUP_RULES.get(&id) }.is_some() {
            rule_cgroup = id;
            break;
        }
        level -= 1;
    }
    Origin {
        cgroup_id,
        rule_cgroup,
    }
}

#[inline(always)]
fn cgroup_eligible(meta: &SockMeta, state: &RulesState) -> bool {
    // The socket's own cgroup first: userspace expands each rule to every cgroup below it.
    // SAFETY (both): read-only lookups of a u32 verdict.
    let verdict = unsafe { QL_CGROUP_RULES.get(&meta.cgroup_id) }
        .or_else(|| unsafe { QL_CGROUP_RULES.get(&meta.rule_cgroup) })
        .copied();
    decide(verdict, state.flags & RULES_F_CGROUP_INCLUDES != 0)
}

/// Both ends' addresses are checked, so the two sockets of one connection reach the same
/// verdict and an excluded address is untouched from either side.
#[inline(always)]
fn cidr_eligible(key: &SockKey, state: &RulesState) -> bool {
    let have_includes = state.flags & RULES_F_CIDR_INCLUDES != 0;
    decide(cidr_verdict(key.family, &key.remote_ip), have_includes)
        && decide(cidr_verdict(key.family, &key.local_ip), have_includes)
}

#[inline(always)]
fn cidr_verdict(family: u32, ip: &[u32; 4]) -> Option<u32> {
    if family == AF_INET {
        QL_CIDR4_RULES
            .get(&Key::new(32, ip[0].to_ne_bytes()))
            .copied()
    } else {
        let mut addr = [0u8; 16];
        let mut i = 0;
        while i < 4 {
            let b = ip[i].to_ne_bytes();
            addr[i * 4] = b[0];
            addr[i * 4 + 1] = b[1];
            addr[i * 4 + 2] = b[2];
            addr[i * 4 + 3] = b[3];
            i += 1;
        }
        QL_CIDR6_RULES.get(&Key::new(128, addr)).copied()
    }
}

#[inline(always)]
fn port_eligible(key: &SockKey, meta: &SockMeta, state: &RulesState) -> bool {
    let service_port = if meta.flags & META_F_ACTIVE != 0 {
        key.remote_port
    } else {
        key.local_port
    };
    // SAFETY: read-only lookup of a u32 verdict.
    let verdict = unsafe { QL_PORT_RULES.get(&service_port) }.copied();
    decide(verdict, state.flags & RULES_F_PORT_INCLUDES != 0)
}

#[inline(always)]
fn decide(verdict: Option<u32>, have_includes: bool) -> bool {
    match verdict {
        Some(RULE_EXCLUDE) => false,
        Some(RULE_INCLUDE) => true,
        _ => !have_includes,
    }
}

/// Connections with a QoS-shaped end are eligible too: sk_msg charges their bytes to the
/// pod's budget and moves them to TCP once they exceed it (see `charge`).
#[inline(always)]
pub fn eligible(key: &SockKey, meta: &SockMeta, state: &RulesState) -> bool {
    cgroup_eligible(meta, state) && cidr_eligible(key, state) && port_eligible(key, meta, state)
}
