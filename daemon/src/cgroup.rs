//! Locating the cgroup v2 hierarchy (hybrid layouts mount it at /sys/fs/cgroup/unified).
use std::path::PathBuf;

/// Mount point of the first cgroup2 filesystem in this mount namespace.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        // "id parent major:minor root mountpoint options [optional...] - fstype source opts"
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mountpoint = left.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(mountpoint))
    })
}
