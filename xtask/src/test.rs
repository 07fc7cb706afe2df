//! `cargo xtask test`: what CI runs. Formatting and lints first (cheap), then every test of
//! the workspace as root, then a leak check over everything the run could have left behind.
use std::process::Command;

use anyhow::{bail, Result};

use crate::{run_cmd, workspace_root};

pub fn run(filter: Option<&str>) -> Result<()> {
    let root = workspace_root();
    let cargo = || {
        let mut c = Command::new(env!("CARGO"));
        c.current_dir(&root);
        c
    };
    run_cmd(cargo().args(["fmt", "--all", "--check"]))?;
    // --ignore-rust-version: the BPF crates' aya-ebpf declares a newer rust-version than the
    // stable toolchain here; their host build is an empty main, built for the lints only.
    run_cmd(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--ignore-rust-version",
        "--",
        "-D",
        "warnings",
    ]))?;
    let mut test = cargo();
    test.args(["test", "--no-fail-fast"]);
    if let Some(f) = filter {
        test.arg(f);
    }
    let tests = run_cmd(&mut test);
    let leaks = simnode::leaks();
    for leak in &leaks {
        eprintln!("leak: {leak}");
    }
    tests?;
    if !leaks.is_empty() {
        bail!(
            "the test run left {} resource(s) behind (listed above)",
            leaks.len()
        );
    }
    eprintln!("leak check: nothing left behind");
    Ok(())
}
