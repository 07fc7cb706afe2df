//! `cargo xtask setup`: everything a fresh Debian 12 machine needs, checked before installed,
//! so a second run only looks (seconds).
use std::process::Command;

use anyhow::{ensure, Context as _, Result};

use crate::run_cmd;

/// Debian packages: the BPF toolchain (TOOLCHAIN.md), the traffic tools the tests and
/// benchmarks drive, and iproute2/ping for the simulated node.
const APT_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "libpolly-22-dev",
    "clang-22",
    "lld-22",
    "libzstd-dev",
    "zlib1g-dev",
    "iproute2",
    "iputils-ping",
    "iperf3",
    "qperf",
    "sockperf",
    "bpftool",
    // The VM runner (`cargo xtask vm-test`): the guest's initramfs shell, depmod and modprobe
    // for the unpacked kernels, and the kernel images' decompressors.
    "busybox-static",
    "kmod",
    "xz-utils",
    "zstd",
];
/// QEMU comes from bookworm-backports: bookworm's 7.2 would replace the image's qemu-utils 10.
const BACKPORTS_PACKAGES: &[&str] = &["qemu-system-x86"];
const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn run() -> Result<()> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "setup needs root (apt-get, bpffs mount); run as root"
    );
    apt()?;
    backports()?;
    bpf_linker()?;
    bpffs()?;
    eprintln!("setup: ok");
    Ok(())
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout.ends_with(b"install ok installed"))
}

fn apt() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing {}", missing.join(" "));
    run_cmd(Command::new("apt-get").args(["update", "-q"]))?;
    run_cmd(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing),
    )
}

/// Through the VM runner's private apt configuration, so /etc/apt stays as it is.
fn backports() -> Result<()> {
    let missing: Vec<&str> = BACKPORTS_PACKAGES
        .iter()
        .copied()
        .filter(|p| !installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!(
        "setup: installing {} from bookworm-backports",
        missing.join(" ")
    );
    crate::vm::apt::PrivateApt::new()?.install_from_backports(&missing)
}

fn bpf_linker() -> Result<()> {
    let current = Command::new("bpf-linker").arg("--version").output();
    if current.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)) {
        return Ok(());
    }
    eprintln!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (a few minutes)");
    // /usr/bin/llvm-config is LLVM 14; without LLVM_PREFIX the link fails with -lLLVM missing.
    run_cmd(
        Command::new("cargo")
            .env("LLVM_PREFIX", "/usr/lib/llvm-22")
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args(["--no-default-features", "--features", "llvm-22"]),
    )
    .context("installing bpf-linker")
}

fn bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some("bpf"))
    {
        return Ok(());
    }
    run_cmd(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}
