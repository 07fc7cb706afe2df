//! Builds the BPF crates with Debian's BPF-capable toolchain and leaves the objects in `OUT_DIR`
//! for `include_bytes_aligned!`, so the `quicklane` binary is self-contained.
//!
//! The inner build runs `/usr/bin/cargo` (rustc-web + prebuilt `core` for bpfel), not the
//! rustup toolchain running this script; see shared/TOOLCHAIN.md for why each flag is here.
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

const BPF_CRATES: &[(&str, &str)] = &[
    ("quicklane-ebpf-sockops", "ql-sockops"),
    ("quicklane-ebpf-tc", "ql-tc"),
    ("quicklane-ebpf-xdp", "ql-xdp"),
];
const DEBIAN_CARGO: &str = "/usr/bin/cargo";
const DEBIAN_RUSTC: &str = "/usr/bin/rustc";

fn main() -> Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest_dir
        .parent()
        .context("daemon/ has a parent")?
        .to_path_buf();
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);

    for dir in ["common", "ebpf-sockops", "ebpf-tc", "ebpf-xdp"] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    println!(
        "cargo:rerun-if-changed={}",
        root.join("Cargo.lock").display()
    );
    println!("cargo:rerun-if-env-changed=QUICKLANE_BPF_LINKER");

    for tool in [DEBIAN_CARGO, DEBIAN_RUSTC] {
        if !Path::new(tool).exists() {
            bail!("{tool} is missing: the BPF programs need Debian's rustc-web toolchain; run `cargo xtask setup` first");
        }
    }
    let linker = env::var("QUICKLANE_BPF_LINKER").unwrap_or_else(|_| "bpf-linker".to_owned());

    // One fixed target dir outside OUT_DIR: debug, release, test and clippy share one BPF
    // build, and it never contends for the outer build's target lock.
    let bpf_target = root.join("target").join("bpf");
    let mut cmd = Command::new(DEBIAN_CARGO);
    scrub_env(&mut cmd);
    cmd.current_dir(&root)
        .env("RUSTC", DEBIAN_RUSTC)
        .env("RUSTC_BOOTSTRAP", "1")
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "-Cdebuginfo=2\x1f-Clink-arg=--btf\x1f-Dwarnings",
        )
        .args(["build", "--release", "--locked", "--bins"])
        .args(["--target", "bpfel-unknown-none", "--ignore-rust-version"])
        .arg("--target-dir")
        .arg(&bpf_target)
        .args([
            "--config",
            &format!("target.bpfel-unknown-none.linker=\"{linker}\""),
        ])
        .args(["--config", "profile.release.panic=\"abort\""]);
    for (krate, _) in BPF_CRATES {
        cmd.args(["-p", krate]);
    }
    let status = cmd
        .status()
        .with_context(|| format!("spawning {DEBIAN_CARGO} for the BPF crates"))?;
    if !status.success() {
        bail!("building the BPF programs failed ({status}); if bpf-linker is missing run `cargo xtask setup`");
    }

    let built = bpf_target.join("bpfel-unknown-none").join("release");
    for (_, bin) in BPF_CRATES {
        let from = built.join(bin);
        let to = out_dir.join(format!("{bin}.o"));
        std::fs::copy(&from, &to)
            .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    }
    Ok(())
}

/// Removes what the outer (rustup) build exports and the inner build must not inherit;
/// each of these broke the inner build in a measured way (TOOLCHAIN.md).
fn scrub_env(cmd: &mut Command) {
    const KEEP: &[&str] = &["CARGO_HOME", "CARGO_MAKEFLAGS"];
    const DROP: &[&str] = &[
        "RUSTDOC",
        "RUSTFLAGS",
        "RUSTUP_TOOLCHAIN",
        "CLIPPY_ARGS",
        "TARGET",
        "HOST",
        "OUT_DIR",
        "OPT_LEVEL",
        "DEBUG",
        "PROFILE",
        "NUM_JOBS",
    ];
    for (key, _) in env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let cargo_var = key.starts_with("CARGO_") && !KEEP.contains(&key);
        if cargo_var || key == "CARGO" || key.starts_with("RUSTC") || DROP.contains(&key) {
            cmd.env_remove(key);
        }
    }
}
