//! `cargo xtask bench ...`: setup (by the caller), a release build of `quicklane`, then
//! `quicklane bench` with the same flags.
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context as _, Result};

use crate::{display, run_cmd, workspace_root};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: std::ffi::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

pub fn run(args: &[String]) -> Result<()> {
    let root = workspace_root();
    run_cmd(Command::new(env!("CARGO")).current_dir(&root).args([
        "build",
        "--release",
        "--quiet",
        "-p",
        "quicklane",
    ]))?;
    // Cargo resolves a relative CARGO_TARGET_DIR against its working directory, the root.
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let quicklane = root.join(target).join("release/quicklane");
    // Ctrl-C reaches quicklane too (same process group), which tears its node down and exits
    // non-zero; xtask must outlive it to report that instead of dying first.
    let handler = nix::sys::signal::SigHandler::Handler(on_sigint);
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe { nix::sys::signal::signal(nix::sys::signal::Signal::SIGINT, handler) }?;
    let mut cmd = Command::new(&quicklane);
    cmd.arg("bench").args(args);
    eprintln!("+ {}", display(&cmd));
    let status = cmd
        .status()
        .with_context(|| format!("running {}", quicklane.display()))?;
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted ({status})");
    }
    if !status.success() {
        bail!("`{}` failed: {status}", display(&cmd));
    }
    Ok(())
}
