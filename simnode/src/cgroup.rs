//! cgroup v2 directories for the node and its pods, and moving children into them.

use std::fs::{self, OpenOptions};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::{mountinfo, Error};

/// How long teardown waits for killed processes to leave a cgroup.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// The cgroup2 mount point: /sys/fs/cgroup on a unified host, /sys/fs/cgroup/unified on a
/// hybrid one.
pub fn cgroup2_mount() -> Result<PathBuf, Error> {
    mountinfo::mount_points("cgroup2")?
        .into_iter()
        .next()
        .ok_or(Error::NoCgroup2)
}

pub(crate) fn create(dir: &Path) -> Result<(), Error> {
    // create_dir, not create_dir_all: an existing directory means a name collision or a leak
    // from an earlier run, and silently sharing it would mix up two nodes' processes.
    fs::create_dir(dir).map_err(|e| Error::io(format!("creating cgroup {}", dir.display()), e))
}

/// Kills every process in `dir` and its descendants, then waits until none is left, because
/// a cgroup with live members cannot be removed.
pub(crate) fn kill_all(dir: &Path) -> Result<(), Error> {
    let kill = dir.join("cgroup.kill");
    fs::write(&kill, "1").map_err(|e| {
        Error::io(
            format!(
                "writing 1 to {} (cgroup.kill needs Linux 5.14+)",
                kill.display()
            ),
            e,
        )
    })?;
    let events = dir.join("cgroup.events");
    let start = Instant::now();
    loop {
        // "populated" covers the whole subtree, unlike cgroup.procs of a single directory.
        let text = fs::read_to_string(&events)
            .map_err(|e| Error::io(format!("reading {}", events.display()), e))?;
        if text.lines().any(|l| l == "populated 0") {
            return Ok(());
        }
        if start.elapsed() > KILL_TIMEOUT {
            return Err(Error::Timeout {
                what: format!("processes in {} to exit after cgroup.kill", dir.display()),
                after: KILL_TIMEOUT,
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Removes `dir` and any cgroups a test created below it (children first: cgroupfs only
/// removes empty directories, and a pod's processes may have made sub-cgroups).
pub(crate) fn remove(dir: &Path) -> Result<(), Error> {
    let children =
        fs::read_dir(dir).map_err(|e| Error::io(format!("listing cgroup {}", dir.display()), e))?;
    for entry in children.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove(&entry.path())?;
        }
    }
    fs::remove_dir(dir).map_err(|e| Error::io(format!("removing cgroup {}", dir.display()), e))
}

/// Makes the child of `cmd` join cgroup `dir` before it execs, so that everything it does,
/// including sockets it opens, is attributed to that cgroup from the first instruction.
pub(crate) fn join_on_exec(cmd: &mut Command, dir: &Path) {
    let procs_path = dir.join("cgroup.procs");
    // Opened before fork: opening files after fork is not async-signal-safe.
    let procs = OpenOptions::new().write(true).open(&procs_path).map_err(|e| {
        tracing::warn!(path = %procs_path.display(), error = %e, "cannot open cgroup.procs; spawn will fail");
        e.raw_os_error().unwrap_or(libc::EINVAL)
    });
    // SAFETY: the hook only issues write(2) on an already open fd and builds an io::Error from
    // an errno, neither of which allocates or takes locks, so it is safe between fork and exec.
    unsafe {
        cmd.pre_exec(move || match &procs {
            // "0" means the writing process itself.
            Ok(file) => nix::unistd::write(file, b"0")
                .map(drop)
                .map_err(std::io::Error::from),
            Err(errno) => Err(std::io::Error::from_raw_os_error(*errno)),
        });
    }
}
