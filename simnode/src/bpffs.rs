//! The BPF filesystem at /sys/fs/bpf, where an agent under test pins its maps and programs.

use std::fs::File;
use std::path::Path;

use nix::fcntl::{Flock, FlockArg};
use nix::mount::MsFlags;

use crate::{mountinfo, Error};

pub(crate) const BPFFS: &str = "/sys/fs/bpf";

/// Mounts bpffs at /sys/fs/bpf unless it already is.
///
/// Several test processes may get here at once, and two mounts stacked on one another would
/// hide whatever was pinned in the lower one. An flock on the directory serialises them:
/// whoever opened it before the mount locks the same sysfs inode as the mounter, and whoever
/// opened it after sees the mount in mountinfo.
pub(crate) fn ensure_mounted() -> Result<(), Error> {
    let dir = File::open(BPFFS).map_err(|e| Error::io(format!("opening {BPFFS}"), e))?;
    let _lock = Flock::lock(dir, FlockArg::LockExclusive)
        .map_err(|(_, e)| Error::io(format!("locking {BPFFS}"), e))?;
    if mountinfo::mount_points("bpf")?
        .iter()
        .any(|p| p == Path::new(BPFFS))
    {
        return Ok(());
    }
    tracing::info!("mounting bpffs at {BPFFS}");
    nix::mount::mount(
        Some("bpf"),
        BPFFS,
        Some("bpf"),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| Error::io(format!("mounting bpffs at {BPFFS}"), e))
}
