//! The simulated node: a namespace standing in for the host's root namespace, its pods, and
//! the cgroup, bpffs and run directories an agent under test uses.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::pod::NO_DAD_SYSCTLS;
use crate::{bpffs, cgroup, cmd, netns, Error, Pod, Proc};

/// Pod `i` gets `10.77.{i}.0/24`, so `i` must fit in one octet.
pub const MAX_PODS: usize = 256;

/// Names of everything a node creates start with this, which is what the leak check looks for.
pub(crate) const PREFIX: &str = "qlsim-";

/// Where an agent under test keeps its runtime files; the node removes it on teardown.
pub(crate) const RUN_ROOT: &str = "/run";

const NODE_SYSCTLS: &[(&str, &str)] = &[
    ("net/ipv4/ip_forward", "1"),
    ("net/ipv6/conf/all/forwarding", "1"),
];

/// A simulated Kubernetes node, torn down on drop (including while unwinding from a panic).
///
/// Its network namespace plays the host's root namespace, so nothing touches the real host's
/// links or routes. Teardown kills every process in the node's cgroups (processes started with
/// [`Node::command`] stay in the caller's cgroup and are not among them: use [`Node::spawn`] so
/// a [`Proc`] guard kills them), removes the cgroups, deletes the namespaces, and removes the
/// pin and run directories if something created them.
#[derive(Debug)]
pub struct Node {
    id: String,
    netns_name: String,
    netns_path: PathBuf,
    cgroup_dir: PathBuf,
    pin_dir: PathBuf,
    run_dir: PathBuf,
    pods: Vec<Pod>,
    created: Vec<Created>,
}

/// A namespace or cgroup a node made. Teardown removes exactly these, newest first (pod
/// cgroups before the node's), and never something it found already there.
#[derive(Debug)]
pub(crate) enum Created {
    Netns(String),
    Cgroup(PathBuf),
}

/// Unique among live processes and among the nodes of this one; the separator keeps, say,
/// pid "1a" with node 11 apart from pid "1a1" with node 1.
fn next_id() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut pid = std::process::id();
    let mut digits = Vec::new();
    loop {
        digits.push(char::from_digit(pid % 36, 36).expect("remainder is below the radix"));
        pid /= 36;
        if pid == 0 {
            break;
        }
    }
    let pid: String = digits.iter().rev().collect();
    format!("{pid}-{n}")
}

impl Node {
    /// Builds a node with `pods` pods. On failure everything created so far is removed and the
    /// error names the step that failed.
    pub fn new(pods: usize) -> Result<Node, Error> {
        crate::require_root()?;
        if pods > MAX_PODS {
            return Err(Error::TooManyPods {
                requested: pods,
                max: MAX_PODS,
            });
        }
        let cgroup_root = cgroup::cgroup2_mount()?;
        bpffs::ensure_mounted()?;
        Self::create(next_id(), pods, &cgroup_root)
    }

    fn create(id: String, pods: usize, cgroup_root: &Path) -> Result<Node, Error> {
        let base = format!("{PREFIX}{id}");
        let netns_name = format!("{base}-node");
        let mut node = Node {
            netns_path: netns::path_of(&netns_name),
            netns_name,
            cgroup_dir: cgroup_root.join(&base),
            pin_dir: Path::new(bpffs::BPFFS).join(&base),
            run_dir: Path::new(RUN_ROOT).join(&base),
            pods: Vec::with_capacity(pods),
            created: Vec::new(),
            id,
        };
        // On error `node` is dropped here, which removes whatever was created.
        node.build(pods)?;
        tracing::info!(id = %node.id, pods, "simulated node ready");
        Ok(node)
    }

    fn build(&mut self, pods: usize) -> Result<(), Error> {
        netns::create(&self.netns_name)?;
        self.created.push(Created::Netns(self.netns_name.clone()));
        // Before any veth exists, so that every device inherits the "default" settings.
        netns::set_sysctls(&self.netns_path, &[NODE_SYSCTLS, NO_DAD_SYSCTLS].concat())?;
        cmd::ip(&["-n", &self.netns_name, "link", "set", "lo", "up"])?;
        cgroup::create(&self.cgroup_dir)?;
        self.created.push(Created::Cgroup(self.cgroup_dir.clone()));
        for index in 0..pods {
            let index = u8::try_from(index).expect("pod count checked against MAX_PODS");
            let pod = Pod::new(&self.id, index, &self.cgroup_dir);
            pod.build(&self.netns_name, &mut self.created)?;
            self.pods.push(pod);
        }
        Ok(())
    }

    /// Short and unique among concurrently running nodes, also across processes.
    #[must_use]
    pub fn id(&self) -> &str {
        &self.id
    }

    #[must_use]
    pub fn netns_name(&self) -> &str {
        &self.netns_name
    }

    /// The namespace's bind mount under /var/run/netns, to open and `setns` into.
    #[must_use]
    pub fn netns_path(&self) -> &Path {
        &self.netns_path
    }

    /// The node's cgroup; each pod's cgroup is a child of it.
    #[must_use]
    pub fn cgroup_dir(&self) -> &Path {
        &self.cgroup_dir
    }

    /// Where an agent under test should pin its BPF objects. Not created by the node.
    #[must_use]
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Where an agent under test should keep runtime files. Not created by the node.
    #[must_use]
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    #[must_use]
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// Pod `index`; panics if there is no such pod, like slice indexing.
    #[must_use]
    pub fn pod(&self, index: usize) -> &Pod {
        &self.pods[index]
    }

    /// A command whose child runs in the node's network namespace. It stays in the caller's
    /// cgroup, so teardown does not kill it: prefer [`spawn`](Self::spawn) for long-running
    /// children.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        netns::enter_on_exec(&mut cmd, &self.netns_path);
        cmd
    }

    /// Spawns `cmd` in the node's network namespace (whether or not it came from
    /// [`command`](Self::command); entering twice is harmless) and returns a guard that kills
    /// it on drop.
    pub fn spawn(&self, cmd: &mut Command) -> Result<Proc, Error> {
        netns::enter_on_exec(cmd, &self.netns_path);
        Proc::spawn(cmd, &self.netns_name)
    }

    /// Runs `f` on a thread inside the node's network namespace. The thread stays in the
    /// test process's cgroup.
    pub fn in_netns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, Error> {
        netns::run_in(&self.netns_path, f)
    }

    /// Tears the node down like dropping it does, but reports what could not be removed.
    pub fn teardown(mut self) -> Result<(), Error> {
        let failures = self.release();
        if failures.is_empty() {
            Ok(())
        } else {
            Err(Error::Teardown {
                id: self.id.clone(),
                failures: failures.iter().map(ToString::to_string).collect(),
            })
        }
    }

    /// Removes what the node created, carrying on past failures so one stuck resource does
    /// not leak all the others. A second call finds nothing left to do.
    fn release(&mut self) -> Vec<Error> {
        let mut failures = Vec::new();
        let mut check = |result: Result<(), Error>| {
            if let Err(e) = result {
                failures.push(e);
            }
        };
        let made_cgroup =
            |c: &Created| matches!(c, Created::Cgroup(dir) if *dir == self.cgroup_dir);
        if self.created.iter().any(made_cgroup) {
            // Killing the node's cgroup kills its pods' too; a cgroup with members cannot be
            // removed.
            check(cgroup::kill_all(&self.cgroup_dir));
        }
        for created in self.created.drain(..).rev() {
            check(match created {
                Created::Cgroup(dir) => cgroup::remove(&dir),
                Created::Netns(name) => netns::delete(&name),
            });
        }
        for dir in [&self.pin_dir, &self.run_dir] {
            if dir.exists() {
                check(
                    std::fs::remove_dir_all(dir)
                        .map_err(|e| Error::io(format!("removing {}", dir.display()), e)),
                );
            }
        }
        tracing::debug!(id = %self.id, failures = failures.len(), "simulated node torn down");
        failures
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for failure in self.release() {
            tracing::warn!(id = %self.id, error = %failure, "simulated node teardown step failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_build_removes_only_what_it_created() {
        if !nix::unistd::geteuid().is_root() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "building nodes needs root, and CI must run as root"
            );
            eprintln!("skipping: building nodes needs root");
            return;
        }
        let id = next_id();
        let squatter = format!("{PREFIX}{id}-p1");
        netns::create(&squatter).unwrap();

        let err = Node::create(id.clone(), 3, &cgroup::cgroup2_mount().unwrap()).unwrap_err();
        let left = crate::leaks_matching(&id);
        netns::delete(&squatter).unwrap();

        match &err {
            Error::Command { cmd, stderr, .. } => {
                assert_eq!(cmd, &format!("ip netns add {squatter}"));
                assert!(stderr.contains("File exists"), "{stderr}");
            }
            other => panic!("unexpected error: {other}"),
        }
        assert!(err.to_string().contains(&squatter), "{err}");
        assert_eq!(left, vec![crate::Leak::Netns { name: squatter }]);
    }

    #[test]
    fn ids_are_unique_and_unambiguous() {
        let a = next_id();
        let b = next_id();
        assert_ne!(a, b);
        let (pid, _) = a.split_once('-').unwrap();
        assert_eq!(u32::from_str_radix(pid, 36).unwrap(), std::process::id());
    }
}
