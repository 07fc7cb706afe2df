//! Making sure the pin directory lives on a bpffs, as Cilium's agent does at start-up.
use std::path::{Path, PathBuf};

use nix::{
    mount::{mount, MsFlags},
    sys::statfs::{statfs, BPF_FS_MAGIC},
};

pub const DEFAULT_MOUNT: &str = "/sys/fs/bpf";

#[derive(Debug, thiserror::Error)]
pub enum BpffsError {
    #[error("{path} is not on a bpffs and is not under {DEFAULT_MOUNT}; mount a bpffs there (`mount -t bpf bpf DIR`) or set agent.pin_dir under {DEFAULT_MOUNT}")]
    NotBpffs { path: PathBuf },
    #[error("mounting bpffs on {DEFAULT_MOUNT} failed: {source}; the agent needs CAP_SYS_ADMIN or an already mounted bpffs")]
    Mount { source: nix::Error },
    #[error("creating {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn is_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC)
}

/// Mounts bpffs on /sys/fs/bpf when the pin directory needs it and it is missing, then
/// creates the pin directory.
pub fn ensure_pin_dir(pin_dir: &Path) -> Result<(), BpffsError> {
    let default = Path::new(DEFAULT_MOUNT);
    if pin_dir.starts_with(default) {
        if !is_bpffs(default) {
            mount(
                Some("bpf"),
                default,
                Some("bpf"),
                MsFlags::empty(),
                None::<&str>,
            )
            .map_err(|source| BpffsError::Mount { source })?;
            tracing::info!("mounted bpffs on {DEFAULT_MOUNT}");
        }
    } else if !pin_dir.ancestors().any(is_bpffs) {
        return Err(BpffsError::NotBpffs {
            path: pin_dir.to_owned(),
        });
    }
    std::fs::create_dir_all(pin_dir).map_err(|source| BpffsError::Create {
        path: pin_dir.to_owned(),
        source,
    })
}
