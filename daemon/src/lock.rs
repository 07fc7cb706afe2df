//! One agent per node: an exclusive `flock` on the run directory's lock file, held for the
//! agent's lifetime and released by the kernel however the process ends.
use std::{
    fs::File,
    io::{Read as _, Seek as _, Write as _},
    path::{Path, PathBuf},
};

use nix::fcntl::{Flock, FlockArg};

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another quicklane agent{} is already running on this node (lock {path} is held); stop it first or give this one its own agent.run_dir and agent.pin_dir", holder.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    Held { path: PathBuf, holder: Option<u32> },
    #[error("lock file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug)]
pub struct AgentLock {
    _lock: Flock<File>,
}

impl AgentLock {
    pub fn acquire(path: &Path) -> Result<Self, LockError> {
        let io = |source| LockError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let mut file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        let mut lock = match Flock::lock(
            file.try_clone().map_err(io)?,
            FlockArg::LockExclusiveNonblock,
        ) {
            Ok(lock) => lock,
            Err((_, nix::Error::EWOULDBLOCK)) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                return Err(LockError::Held {
                    path: path.to_owned(),
                    holder: pid.trim().parse().ok(),
                });
            }
            Err((_, e)) => return Err(io(e.into())),
        };
        lock.set_len(0).map_err(io)?;
        lock.rewind().map_err(io)?;
        writeln!(lock, "{}", std::process::id()).map_err(io)?;
        Ok(Self { _lock: lock })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_refused_with_the_first_pid() {
        let dir = std::env::temp_dir().join(format!("ql-lock-test-{}", std::process::id()));
        let path = dir.join("agent.lock");
        let first = AgentLock::acquire(&path).unwrap();
        // flock locks belong to the open file description, so a second open in the same
        // process conflicts just as another process would.
        let err = AgentLock::acquire(&path).unwrap_err().to_string();
        assert!(err.contains("already running"), "{err}");
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        drop(first);
        AgentLock::acquire(&path).expect("lock is free again after the holder drops it");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
