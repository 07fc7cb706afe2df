//! Named network namespaces: creating and deleting them with `ip netns`, and entering them
//! from a thread or from a child before exec.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::sched::CloneFlags;

use crate::{cmd, Error};

/// Where `ip netns add` bind-mounts named namespaces.
pub(crate) const NETNS_DIR: &str = "/var/run/netns";

pub(crate) fn path_of(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

pub(crate) fn create(name: &str) -> Result<(), Error> {
    cmd::ip(&["netns", "add", name])
}

pub(crate) fn delete(name: &str) -> Result<(), Error> {
    cmd::ip(&["netns", "del", name])
}

fn open(path: &Path) -> Result<File, Error> {
    File::open(path).map_err(|e| Error::io(format!("opening netns {}", path.display()), e))
}

/// Runs `f` on a new thread that has joined the network namespace at `path`.
///
/// Network namespaces are per thread, so a dedicated thread keeps the caller's own namespace
/// untouched, and the thread's end discards the switch. Only the network namespace changes:
/// the thread stays in the calling process's cgroup. A panic in `f` is resumed on the caller.
pub(crate) fn run_in<T, F>(path: &Path, f: F) -> Result<T, Error>
where
    T: Send,
    F: FnOnce() -> T + Send,
{
    let ns = open(path)?;
    std::thread::scope(|s| {
        let worker = s.spawn(move || {
            nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET)
                .map_err(|e| Error::io(format!("setns into {}", path.display()), e))?;
            drop(ns);
            Ok(f())
        });
        worker
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Writes sysctls (paths relative to /proc/sys) as seen from inside the namespace: the
/// /proc/sys/net tree resolves against the writing thread's network namespace.
pub(crate) fn set_sysctls(path: &Path, sysctls: &[(&str, &str)]) -> Result<(), Error> {
    run_in(path, || {
        sysctls.iter().try_for_each(|(key, value)| {
            let file = Path::new("/proc/sys").join(key);
            std::fs::write(&file, value).map_err(|e| {
                Error::io(
                    format!(
                        "writing {value} to {} in netns {}",
                        file.display(),
                        path.display()
                    ),
                    e,
                )
            })
        })
    })?
}

/// Makes the child of `cmd` enter the network namespace at `path` before it execs.
///
/// `ip netns exec` is deliberately not used: it remounts /sys, which hides the cgroup
/// filesystem from the child.
pub(crate) fn enter_on_exec(cmd: &mut Command, path: &Path) {
    // Opened before fork: opening files after fork is not async-signal-safe.
    let ns = File::open(path).map_err(|e| {
        tracing::warn!(path = %path.display(), error = %e, "cannot open netns; spawn will fail");
        e.raw_os_error().unwrap_or(libc::EINVAL)
    });
    // SAFETY: the hook only issues setns(2) on an already open fd and builds an io::Error from
    // an errno, neither of which allocates or takes locks, so it is safe between fork and exec.
    unsafe {
        cmd.pre_exec(move || match &ns {
            Ok(file) => {
                nix::sched::setns(file, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
            }
            Err(errno) => Err(std::io::Error::from_raw_os_error(*errno)),
        });
    }
}
