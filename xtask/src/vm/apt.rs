//! apt with a private configuration that adds bookworm-backports (QEMU 10, Linux 6.12) without
//! touching /etc/apt: its own sources list, package lists and download cache under the VM
//! cache directory, and the system's dpkg database, so what it installs is installed normally.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};

use crate::run_cmd;

/// Everything the VM runner keeps across runs (the repository is cloned fresh for CI, the
/// machine is not).
pub const CACHE_ROOT: &str = "/var/cache/quicklane-vm";

const SOURCES: &str = "\
deb http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
deb http://deb.debian.org/debian bookworm-backports main
";

#[derive(Debug)]
pub struct PrivateApt {
    dir: PathBuf,
    updated: bool,
}

impl PrivateApt {
    pub fn new() -> Result<Self> {
        let dir = Path::new(CACHE_ROOT).join("apt");
        for sub in ["lists/partial", "cache/archives/partial"] {
            std::fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        std::fs::write(dir.join("sources.list"), SOURCES)?;
        Ok(Self {
            dir,
            updated: false,
        })
    }

    fn options(&self, cmd: &mut Command) {
        let d = self.dir.display();
        cmd.arg(format!("-oDir::Etc::SourceList={d}/sources.list"))
            // An empty parts directory: only the list above counts.
            .arg(format!("-oDir::Etc::SourceParts={d}/no-parts"))
            .arg(format!("-oDir::State::Lists={d}/lists"))
            .arg(format!("-oDir::Cache={d}/cache"))
            // Downloads land in root-owned directories; the _apt sandbox user cannot write there.
            .arg("-oAPT::Sandbox::User=root")
            .arg("-q");
    }

    fn apt_get(&self) -> Command {
        let mut cmd = Command::new("apt-get");
        cmd.env("DEBIAN_FRONTEND", "noninteractive");
        self.options(&mut cmd);
        cmd
    }

    /// Refreshes the private package lists once per process.
    pub fn update(&mut self) -> Result<()> {
        if !self.updated {
            run_cmd(self.apt_get().arg("update"))?;
            self.updated = true;
        }
        Ok(())
    }

    /// Installs `packages` preferring bookworm-backports for them and whatever they newly pull
    /// in; packages already installed are left as they are.
    pub fn install_from_backports(&mut self, packages: &[&str]) -> Result<()> {
        self.update()?;
        run_cmd(
            self.apt_get()
                .args(["install", "-y", "--no-install-recommends"])
                .args(["-t", "bookworm-backports"])
                .args(packages),
        )
    }

    /// `apt-cache show PACKAGE`: every version's stanza the private lists know.
    pub fn show(&mut self, package: &str) -> Result<String> {
        self.update()?;
        let mut cmd = Command::new("apt-cache");
        self.options(&mut cmd);
        let out = cmd
            .args(["show", package])
            .output()
            .context("running apt-cache")?;
        anyhow::ensure!(
            out.status.success(),
            "apt-cache show {package}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Downloads `package=version` into `dir` without installing it.
    pub fn download(&mut self, package: &str, version: &str, dir: &Path) -> Result<()> {
        self.update()?;
        run_cmd(
            self.apt_get()
                .current_dir(dir)
                .arg("download")
                .arg(format!("{package}={version}")),
        )
    }
}
