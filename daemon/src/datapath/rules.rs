//! Writing the bypass eligibility rules into the pinned rule maps.
//!
//! Rule maps are written completely first and the generation is bumped last: sk_msg
//! re-evaluates every tracked socket whose generation is older on its next message, so a
//! change reaches connections that are already accelerated.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    os::unix::fs::MetadataExt as _,
    path::Path,
};

use aya::maps::{
    lpm_trie::{Key, LpmTrie},
    Array, HashMap, Map, MapData,
};
use quicklane_common::bypass::{
    RulesState, RULES_F_CGROUP_INCLUDES, RULES_F_CGROUP_RULES, RULES_F_CIDR_INCLUDES,
    RULES_F_PORT_INCLUDES, RULE_EXCLUDE, RULE_INCLUDE,
};
use serde::Serialize;

use super::{open_pinned_map, DatapathError};
use crate::{config::BypassConfig, paths::PinDir};

/// Bounds the walk below a cgroup rule; a pod's tree is a handful of levels.
const MAX_WALK_DEPTH: usize = 16;
/// Must match `QL_CGROUP_RULES`' size in ebpf-sockops.
const MAX_CGROUP_ENTRIES: usize = 16_384;

/// What `apply` wrote, for logs and `quicklane status`.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct RulesSummary {
    pub generation: u32,
    pub cgroups: usize,
    pub cidrs: usize,
    pub ports: usize,
}

pub fn apply(pins: &PinDir, bypass: &BypassConfig) -> Result<RulesSummary, DatapathError> {
    let cgroups = expand_cgroups(bypass)?;
    let ports: BTreeMap<u32, u32> = verdicts(&bypass.include_ports, &bypass.exclude_ports)
        .into_iter()
        .map(|(p, v)| (u32::from(p), v))
        .collect();
    let cidrs = verdicts(&bypass.include_cidrs, &bypass.exclude_cidrs);

    sync_hash(pins, "QL_CGROUP_RULES", &cgroups)?;
    sync_hash(pins, "QL_PORT_RULES", &ports)?;
    let v4 = cidrs.iter().filter_map(|(c, v)| match c.addr {
        IpAddr::V4(a) => Some((Key::new(u32::from(c.prefix_len), a.octets()), *v)),
        IpAddr::V6(_) => None,
    });
    sync_trie(pins, "QL_CIDR4_RULES", &v4.collect::<Vec<_>>())?;
    let v6 = cidrs.iter().filter_map(|(c, v)| match c.addr {
        IpAddr::V6(a) => Some((Key::new(u32::from(c.prefix_len), a.octets()), *v)),
        IpAddr::V4(_) => None,
    });
    sync_trie(pins, "QL_CIDR6_RULES", &v6.collect::<Vec<_>>())?;

    let mut flags = 0;
    for (has, flag) in [
        (!bypass.include_cgroups.is_empty(), RULES_F_CGROUP_INCLUDES),
        (!bypass.include_cidrs.is_empty(), RULES_F_CIDR_INCLUDES),
        (!bypass.include_ports.is_empty(), RULES_F_PORT_INCLUDES),
        (!cgroups.is_empty(), RULES_F_CGROUP_RULES),
    ] {
        if has {
            flags |= flag;
        }
    }
    let mut state: Array<MapData, RulesState> = typed(pins, "QL_RULES_STATE", Map::Array)?;
    let previous = state
        .get(&0, 0)
        .map_err(|e| map_err("QL_RULES_STATE", &e))?;
    // Never 0: sk_msg treats generation 0 as "not evaluated yet".
    let generation = previous.generation.wrapping_add(1).max(1);
    state
        .set(0, RulesState { generation, flags }, 0)
        .map_err(|e| map_err("QL_RULES_STATE", &e))?;
    Ok(RulesSummary {
        generation,
        cgroups: cgroups.len(),
        cidrs: cidrs.len(),
        ports: ports.len(),
    })
}

/// Exclude wins over include for the same item.
fn verdicts<T: Ord + Copy>(include: &[T], exclude: &[T]) -> BTreeMap<T, u32> {
    let mut out: BTreeMap<T, u32> = include.iter().map(|i| (*i, RULE_INCLUDE)).collect();
    out.extend(exclude.iter().map(|e| (*e, RULE_EXCLUDE)));
    out
}

/// Every cgroup at or below a rule directory gets that rule's verdict (cgroup id = inode);
/// excludes are written after includes, so an excluded subtree inside an included pod stays
/// excluded. The BPF side also walks a new socket's ancestors, which covers cgroups created
/// after this expansion.
fn expand_cgroups(bypass: &BypassConfig) -> Result<BTreeMap<u64, u32>, DatapathError> {
    let mut out = BTreeMap::new();
    for (key, dirs, verdict) in [
        (
            "bypass.include_cgroups",
            &bypass.include_cgroups,
            RULE_INCLUDE,
        ),
        (
            "bypass.exclude_cgroups",
            &bypass.exclude_cgroups,
            RULE_EXCLUDE,
        ),
    ] {
        for dir in dirs {
            walk(dir, 0, &mut |ino| {
                out.insert(ino, verdict);
            })
            .map_err(|source| DatapathError::Rule {
                key,
                value: dir.display().to_string(),
                message: format!("{source}; it must be an existing cgroup v2 directory"),
            })?;
        }
    }
    if out.len() > MAX_CGROUP_ENTRIES {
        return Err(DatapathError::Rule {
            key: "bypass.include_cgroups",
            value: format!("{} cgroups", out.len()),
            message: format!("at most {MAX_CGROUP_ENTRIES} cgroups can carry rules"),
        });
    }
    Ok(out)
}

fn walk(dir: &Path, depth: usize, f: &mut impl FnMut(u64)) -> std::io::Result<()> {
    f(std::fs::metadata(dir)?.ino());
    if depth >= MAX_WALK_DEPTH {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            walk(&entry.path(), depth + 1, f)?;
        }
    }
    Ok(())
}

pub(super) fn typed<T>(
    pins: &PinDir,
    name: &'static str,
    variant: fn(MapData) -> Map,
) -> Result<T, DatapathError>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    let data = open_pinned_map(pins, name)?;
    T::try_from(variant(data)).map_err(|e| map_err(name, &e))
}

pub(super) fn map_err(name: &str, e: &aya::maps::MapError) -> DatapathError {
    DatapathError::Pin {
        path: name.into(),
        message: e.to_string(),
    }
}

/// Makes a pinned hash hold exactly `want`.
pub(super) fn sync_hash<K: aya::Pod + Ord>(
    pins: &PinDir,
    name: &'static str,
    want: &BTreeMap<K, u32>,
) -> Result<(), DatapathError> {
    let mut map: HashMap<MapData, K, u32> = typed(pins, name, Map::HashMap)?;
    let stale: Vec<K> = map
        .keys()
        .flatten()
        .filter(|k| !want.contains_key(k))
        .collect();
    for k in stale {
        map.remove(&k).map_err(|e| map_err(name, &e))?;
    }
    for (k, v) in want {
        map.insert(k, v, 0).map_err(|e| map_err(name, &e))?;
    }
    Ok(())
}

fn sync_trie<const N: usize>(
    pins: &PinDir,
    name: &'static str,
    want: &[(Key<[u8; N]>, u32)],
) -> Result<(), DatapathError> {
    let mut trie: LpmTrie<MapData, [u8; N], u32> = typed(pins, name, Map::LpmTrie)?;
    let id = |k: &Key<[u8; N]>| (k.prefix_len(), k.data());
    let wanted: BTreeSet<(u32, [u8; N])> = want.iter().map(|(k, _)| id(k)).collect();
    let stale: Vec<Key<[u8; N]>> = trie
        .keys()
        .flatten()
        .filter(|k| !wanted.contains(&id(k)))
        .collect();
    for k in stale {
        trie.remove(&k).map_err(|e| map_err(name, &e))?;
    }
    for (k, v) in want {
        trie.insert(k, v, 0).map_err(|e| map_err(name, &e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Cidr;

    #[test]
    fn exclude_beats_include_for_the_same_item() {
        let v = verdicts(&[80u16, 443], &[443, 22]);
        assert_eq!(v[&80], RULE_INCLUDE);
        assert_eq!(v[&443], RULE_EXCLUDE);
        assert_eq!(v[&22], RULE_EXCLUDE);
    }

    #[test]
    fn cgroup_expansion_covers_the_subtree_and_excludes_win() {
        let root = std::env::temp_dir().join(format!("ql-rules-{}", std::process::id()));
        let pod = root.join("pod");
        let sidecar = pod.join("sidecar");
        std::fs::create_dir_all(sidecar.join("inner")).unwrap();
        std::fs::create_dir_all(pod.join("app")).unwrap();
        let bypass = BypassConfig {
            include_cgroups: vec![pod.clone()],
            exclude_cgroups: vec![sidecar.clone()],
            ..BypassConfig::default()
        };
        let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
        let got = expand_cgroups(&bypass).unwrap();
        assert_eq!(got.len(), 4);
        assert_eq!(got[&ino(&pod)], RULE_INCLUDE);
        assert_eq!(got[&ino(&pod.join("app"))], RULE_INCLUDE);
        assert_eq!(got[&ino(&sidecar)], RULE_EXCLUDE);
        assert_eq!(got[&ino(&sidecar.join("inner"))], RULE_EXCLUDE);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_missing_cgroup_names_the_key() {
        let bypass = BypassConfig {
            exclude_cgroups: vec!["/nonexistent/ql".into()],
            ..BypassConfig::default()
        };
        let e = expand_cgroups(&bypass).unwrap_err().to_string();
        assert!(e.contains("bypass.exclude_cgroups"), "{e}");
        assert!(e.contains("/nonexistent/ql"), "{e}");
    }

    #[test]
    fn cidr_is_ordered_for_the_verdict_map() {
        let a: Cidr = "10.0.0.0/8".parse().unwrap();
        let b: Cidr = "10.0.0.0/16".parse().unwrap();
        let v = verdicts(&[a], &[b]);
        assert_eq!(v.len(), 2);
    }
}
