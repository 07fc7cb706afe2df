//! What `demo` and `bench` share: a release build of `quicklane`, and a Ctrl-C that sets a
//! flag instead of killing xtask, so teardown and reporting still happen.
use std::{
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::Result;

use crate::{run_cmd, workspace_root};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: std::ffi::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Builds `quicklane` in release and returns the binary's path.
pub fn build_quicklane() -> Result<PathBuf> {
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
    Ok(root.join(target).join("release/quicklane"))
}

/// From now on SIGINT only sets the flag read by `interrupted`.
pub fn catch_sigint() -> Result<()> {
    let handler = nix::sys::signal::SigHandler::Handler(on_sigint);
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe { nix::sys::signal::signal(nix::sys::signal::Signal::SIGINT, handler) }?;
    Ok(())
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}
