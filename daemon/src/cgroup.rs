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

/// Finds the cgroup v2 directories of the given ids (a cgroup's id is its directory's inode),
/// so status can name pods instead of printing numbers. Bounded by depth; unknown ids (a pod
/// that is gone) are simply absent.
pub fn paths_of(ids: &std::collections::BTreeSet<u64>) -> std::collections::BTreeMap<u64, PathBuf> {
    use std::os::unix::fs::MetadataExt as _;
    const MAX_DEPTH: usize = 8;
    let mut found = std::collections::BTreeMap::new();
    let Some(root) = cgroup2_mount() else {
        return found;
    };
    let mut stack = vec![(root, 0)];
    while let Some((dir, depth)) = stack.pop() {
        if found.len() == ids.len() {
            break;
        }
        let Ok(meta) = std::fs::metadata(&dir) else {
            continue;
        };
        if ids.contains(&meta.ino()) {
            found.insert(meta.ino(), dir.clone());
        }
        if depth < MAX_DEPTH {
            let children = std::fs::read_dir(&dir).into_iter().flatten().flatten();
            for entry in children.filter(|e| e.file_type().is_ok_and(|t| t.is_dir())) {
                stack.push((entry.path(), depth + 1));
            }
        }
    }
    found
}
