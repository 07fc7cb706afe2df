//! `cargo xtask bench ...`: setup (by the caller), a release build of `quicklane`, then
//! `quicklane bench` with the same flags.
use std::process::Command;

use anyhow::{bail, Context as _, Result};

use crate::{display, release};

pub fn run(args: &[String]) -> Result<()> {
    let quicklane = release::build_quicklane()?;
    // Ctrl-C reaches quicklane too (same process group), which tears its node down and exits
    // non-zero; xtask must outlive it to report that instead of dying first.
    release::catch_sigint()?;
    let mut cmd = Command::new(&quicklane);
    cmd.arg("bench").args(args);
    eprintln!("+ {}", display(&cmd));
    let status = cmd
        .status()
        .with_context(|| format!("running {}", quicklane.display()))?;
    if release::interrupted() {
        bail!("interrupted ({status})");
    }
    if !status.success() {
        bail!("`{}` failed: {status}", display(&cmd));
    }
    Ok(())
}
