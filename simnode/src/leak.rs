//! Finding what simulated nodes or the agent under test left behind.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::node::PREFIX;
use crate::{bpf_progs, bpffs, cgroup, netns, Error};

/// quicklane's BPF programs are all named with this prefix.
const PROG_PREFIX: &str = "ql_";

/// The agent's default pin directory outside of tests.
const AGENT_PIN_DIR: &str = "/sys/fs/bpf/quicklane";

/// Something left behind after the nodes and agents that made it should have cleaned up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leak {
    /// A network namespace under /var/run/netns.
    Netns { name: String },
    /// A node's cgroup under the cgroup2 mount.
    Cgroup { path: PathBuf },
    /// A node's pin directory under /sys/fs/bpf.
    PinDir { path: PathBuf },
    /// Objects still pinned in the agent's own pin directory.
    Pinned { path: PathBuf, entries: usize },
    /// A node's run directory under /run.
    RunDir { path: PathBuf },
    /// A quicklane BPF program still loaded in the kernel.
    BpfProgram { id: u32, name: String },
    /// A place that could not be checked, which must not pass as clean.
    Unchecked { what: String, error: String },
}

impl fmt::Display for Leak {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Leak::Netns { name } => write!(
                f,
                "network namespace {name} left in {} (remove with `ip netns del {name}`)",
                netns::NETNS_DIR
            ),
            Leak::Cgroup { path } => write!(f, "cgroup {} left behind", path.display()),
            Leak::PinDir { path } => write!(f, "BPF pin directory {} left behind", path.display()),
            Leak::Pinned { path, entries } => {
                write!(
                    f,
                    "{entries} BPF objects still pinned under {}",
                    path.display()
                )
            }
            Leak::RunDir { path } => write!(f, "run directory {} left behind", path.display()),
            Leak::BpfProgram { id, name } => {
                write!(
                    f,
                    "BPF program {name} (id {id}) still loaded; check `bpftool prog show id {id}`"
                )
            }
            Leak::Unchecked { what, error } => write!(f, "could not check {what}: {error}"),
        }
    }
}

/// Everything any simulated node (from any process) or quicklane agent left behind:
/// `qlsim-*` namespaces, cgroups, pin and run directories, a non-empty
/// /sys/fs/bpf/quicklane, and loaded BPF programs named `ql_*`.
///
/// Only meaningful when nothing else is running: while tests run, live nodes show up here.
/// Tests use [`leaks_matching`] for the nodes they made.
#[must_use]
pub fn leaks() -> Vec<Leak> {
    let mut leaks = named_leaks(&|name| name.starts_with(PREFIX));
    match std::fs::read_dir(AGENT_PIN_DIR) {
        Ok(dir) => {
            let entries = dir.count();
            if entries > 0 {
                leaks.push(Leak::Pinned {
                    path: PathBuf::from(AGENT_PIN_DIR),
                    entries,
                });
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => leaks.push(unchecked(AGENT_PIN_DIR, &e)),
    }
    match bpf_progs::loaded() {
        Ok(progs) => leaks.extend(
            progs
                .into_iter()
                .filter(|p| p.name.starts_with(PROG_PREFIX))
                .map(|p| Leak::BpfProgram {
                    id: p.id,
                    name: p.name,
                }),
        ),
        Err(e) => leaks.push(unchecked("loaded BPF programs", &e)),
    }
    leaks
}

/// What is left of the node with this [`Node::id`](crate::Node::id): its namespaces,
/// cgroups, pin and run directories. Safe to call while other nodes are alive.
#[must_use]
pub fn leaks_matching(node_id: &str) -> Vec<Leak> {
    named_leaks(&|name| belongs_to(name, node_id))
}

/// Whether a resource name is the node's own (`qlsim-ID`) or one of its pods'
/// (`qlsim-ID-...`), and not another node's whose id merely starts the same.
fn belongs_to(name: &str, node_id: &str) -> bool {
    name.strip_prefix(PREFIX)
        .and_then(|rest| rest.strip_prefix(node_id))
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('-'))
}

/// Panics listing every [`leaks`] entry, if there is any.
pub fn assert_no_leaks() {
    let leaks = leaks();
    assert!(
        leaks.is_empty(),
        "{} leaked resource(s):\n{}",
        leaks.len(),
        leaks
            .iter()
            .map(|l| format!("  - {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

fn unchecked(what: impl fmt::Display, error: &dyn fmt::Display) -> Leak {
    Leak::Unchecked {
        what: what.to_string(),
        error: error.to_string(),
    }
}

/// Leaks among the node-named resources whose names pass `wanted`.
fn named_leaks(wanted: &dyn Fn(&str) -> bool) -> Vec<Leak> {
    let mut leaks = Vec::new();
    scan(Path::new(netns::NETNS_DIR), wanted, &mut leaks, |path| {
        Leak::Netns {
            name: path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned(),
        }
    });
    match cgroup::cgroup2_mount() {
        Ok(root) => scan(&root, wanted, &mut leaks, |path| Leak::Cgroup { path }),
        // Without cgroup2 no node could have been built, so none can have leaked a cgroup.
        Err(Error::NoCgroup2) => {}
        Err(e) => leaks.push(unchecked("cgroups", &e)),
    }
    scan(Path::new(bpffs::BPFFS), wanted, &mut leaks, |path| {
        Leak::PinDir { path }
    });
    scan(
        Path::new(crate::node::RUN_ROOT),
        wanted,
        &mut leaks,
        |path| Leak::RunDir { path },
    );
    leaks
}

fn scan(
    dir: &Path,
    wanted: &dyn Fn(&str) -> bool,
    leaks: &mut Vec<Leak>,
    leak: impl Fn(PathBuf) -> Leak,
) {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => return leaks.push(unchecked(dir.display(), &e)),
    };
    for entry in entries {
        match entry {
            Ok(entry) if entry.file_name().to_str().is_some_and(wanted) => {
                leaks.push(leak(entry.path()));
            }
            Ok(_) => {}
            Err(e) => leaks.push(unchecked(dir.display(), &e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_belong_to_one_node_only() {
        assert!(belongs_to("qlsim-1a-1", "1a-1"));
        assert!(belongs_to("qlsim-1a-1-node", "1a-1"));
        assert!(belongs_to("qlsim-1a-1-p3", "1a-1"));
        assert!(!belongs_to("qlsim-1a-10", "1a-1"));
        assert!(!belongs_to("qlsim-1a-10-node", "1a-1"));
        assert!(!belongs_to("quicklane", "1a-1"));
    }

    #[test]
    fn leaks_read_as_instructions() {
        let leak = Leak::Netns {
            name: "qlsim-1a-0-node".into(),
        };
        assert_eq!(
            leak.to_string(),
            "network namespace qlsim-1a-0-node left in /var/run/netns \
             (remove with `ip netns del qlsim-1a-0-node`)"
        );
    }
}
