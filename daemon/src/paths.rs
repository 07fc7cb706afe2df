//! Every filesystem location the agent owns, in one place (bpfman's `directories` idea).
use std::path::{Path, PathBuf};

/// Layout under the configured bpffs pin directory.
#[derive(Debug, Clone)]
pub struct PinDir {
    root: PathBuf,
}

impl PinDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Maps are pinned by name here; aya reuses a pin found at load time.
    pub fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps().join(name)
    }

    pub fn links(&self) -> PathBuf {
        self.root.join("links")
    }

    pub fn link(&self, name: &str) -> PathBuf {
        self.links().join(name)
    }
}

/// Layout under the configured run directory (a tmpfs in production).
#[derive(Debug, Clone)]
pub struct RunDir {
    root: PathBuf,
}

impl RunDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn lock(&self) -> PathBuf {
        self.root.join("agent.lock")
    }

    pub fn state(&self) -> PathBuf {
        self.root.join("state.json")
    }
}
