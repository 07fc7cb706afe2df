//! `cargo xtask vm-test`: the kernel-matrix suite (`daemon/tests/kernel_matrix.rs`) built on
//! the host and run inside a QEMU guest of each Debian kernel, with the host's root shared
//! read-only, so the same binaries meet another kernel.
//!
//! Exit status: 0 when the suite passed on every kernel, 1 when a test failed, and
//! [`INFRA_EXIT`] when a guest crashed or hung before reporting twice in a row (or a kernel
//! could not be fetched): an infrastructure failure, which says nothing about quicklane.
pub mod apt;
mod initramfs;
mod kernel;
mod matrix;
mod qemu;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{display, workspace_root};
use kernel::{Kernel, Series};
use qemu::{Boot, Outcome};

/// Distinct from a test failure (1) and from clap's usage error (2).
pub const INFRA_EXIT: i32 = 3;

/// The in-VM suite: one test target, one boot per kernel.
const SUITE: &str = "kernel_matrix";

/// Per boot. Boot and suite take 40-60 s per kernel under TCG on two cores; five times that
/// leaves room for a loaded machine while bounding a hung guest: two kernels, two tries each,
/// 20 minutes at worst.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

const ATTEMPTS: u32 = 2;

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum KernelArg {
    #[value(name = "6.1")]
    V6_1,
    #[value(name = "6.12")]
    V6_12,
    All,
}

impl KernelArg {
    fn series(self) -> Vec<Series> {
        match self {
            Self::V6_1 => vec![Series::V6_1],
            Self::V6_12 => vec![Series::V6_12],
            Self::All => Series::ALL.to_vec(),
        }
    }
}

enum KernelResult {
    Passed,
    TestsFailed(i32),
    Infrastructure(String),
}

pub fn run(kernels: KernelArg, filter: Option<&str>) -> Result<()> {
    let started = Instant::now();
    let suite = build_suite()?;
    let out_root = target_dir().join("vm-test");
    let mut apt = None;
    let mut results = Vec::new();
    let mut runs = Vec::new();
    for series in kernels.series() {
        let t = Instant::now();
        // Anything that keeps a guest from reporting (no kernel, no initramfs) is infrastructure.
        let outcome = kernel::ensure(series, &mut apt).and_then(|kernel| {
            let dir = out_root.join(series.name());
            let result = run_on(&kernel, &suite, filter, &dir)?;
            Ok((kernel, dir, result))
        });
        let result = match outcome {
            Ok((kernel, dir, result)) => {
                eprintln!(
                    "vm: {} ({}) finished in {:.0}s",
                    series.name(),
                    kernel.release,
                    t.elapsed().as_secs_f64()
                );
                // A guest that never reported has nothing to say about its kernel.
                if !matches!(result, KernelResult::Infrastructure(_)) {
                    runs.push((kernel, matrix::read(&dir.join("out/report.jsonl"))?));
                }
                result
            }
            Err(e) => KernelResult::Infrastructure(format!("{e:#}")),
        };
        results.push((series, result));
    }
    let complete = matches!(kernels, KernelArg::All)
        && filter.is_none()
        && results
            .iter()
            .all(|(_, r)| matches!(r, KernelResult::Passed));
    write_matrix(&runs, &out_root, complete)?;
    eprintln!("vm: total {:.0}s", started.elapsed().as_secs_f64());
    verdict(&results)
}

/// Always to the target directory; to docs/ only from a full, passing run, which is what the
/// README's copy must come from.
fn write_matrix(
    runs: &[(Kernel, Vec<matrix::Record>)],
    out_root: &Path,
    complete: bool,
) -> Result<()> {
    for (kernel, records) in runs {
        // In a passing run these are the suite's known gaps; the test output hides them.
        for r in records.iter().filter(|r| r.failed()) {
            eprintln!("vm: {}: fails: {}", kernel.series.name(), r.summary());
        }
    }
    if runs.is_empty() {
        return Ok(());
    }
    let table = matrix::render(runs);
    let path = out_root.join("kernel-matrix.md");
    std::fs::write(&path, &table)?;
    eprintln!("vm: matrix written to {}", path.display());
    if complete {
        let doc = workspace_root().join("docs/kernel-matrix.md");
        std::fs::create_dir_all(doc.parent().expect("has a parent"))?;
        std::fs::write(&doc, document(&table))?;
        eprintln!("vm: and to {}", doc.display());
    }
    Ok(())
}

/// Test failures win over infrastructure failures: they are known to be real.
fn verdict(results: &[(Series, KernelResult)]) -> Result<()> {
    let mut failed = false;
    let mut infra = false;
    for (series, result) in results {
        match result {
            KernelResult::Passed => eprintln!("vm: {}: passed", series.name()),
            KernelResult::TestsFailed(code) => {
                failed = true;
                eprintln!("vm: {}: TEST FAILURE (exit code {code})", series.name());
            }
            KernelResult::Infrastructure(why) => {
                infra = true;
                eprintln!("vm: {}: INFRASTRUCTURE FAILURE: {why}", series.name());
            }
        }
    }
    if failed {
        bail!("the kernel-matrix suite failed in a guest (see above)");
    }
    if infra {
        eprintln!("vm: infrastructure failure: no test result from a guest; this is not a quicklane test failure");
        std::process::exit(INFRA_EXIT);
    }
    Ok(())
}

/// Boots `kernel` with the suite, once more if the guest gives no exit code.
fn run_on(kernel: &Kernel, suite: &Path, filter: Option<&str>, dir: &Path) -> Result<KernelResult> {
    let out = dir.join("out");
    let mut why = String::new();
    for attempt in 1..=ATTEMPTS {
        // A fresh results directory per boot: a crashed attempt's partial report must not mix in.
        if out.exists() {
            std::fs::remove_dir_all(&out)?;
        }
        std::fs::create_dir_all(&out)?;
        let nonce = nonce();
        let initrd = dir.join("initrd.cpio");
        std::fs::write(
            &initrd,
            initramfs::build(kernel, &job(kernel, suite, filter, &nonce))?,
        )?;
        let boot = Boot {
            vmlinux: &kernel.vmlinux(),
            initrd: &initrd,
            out_dir: &out,
            nonce: &nonce,
            timeout: BOOT_TIMEOUT,
            label: kernel.series.name(),
            log: &dir.join(format!("console-{attempt}.log")),
        };
        match boot.run()? {
            Outcome::Exited(0) => return Ok(KernelResult::Passed),
            Outcome::Exited(code) => return Ok(KernelResult::TestsFailed(code)),
            Outcome::NoExitCode(reason) => {
                eprintln!(
                    "vm: {} attempt {attempt}/{ATTEMPTS}: {reason}",
                    kernel.series.name()
                );
                why = reason;
            }
        }
    }
    Ok(KernelResult::Infrastructure(why))
}

/// The shell fragment stage 2 sources: where the modules are, and the suite's command line.
fn job(kernel: &Kernel, suite: &Path, filter: Option<&str>, nonce: &str) -> String {
    let mut command = vec![
        "env".to_owned(),
        format!("QUICKLANE_EXPECT_KERNEL={}", kernel.series.name()),
        "QUICKLANE_VM_REPORT=/run/ql-out/report.jsonl".to_owned(),
        "RUST_BACKTRACE=1".to_owned(),
    ];
    // Under CI=true a privileged test that cannot run fails rather than skips, in the guest too.
    if let Ok(ci) = std::env::var("CI") {
        command.push(format!("CI={ci}"));
    }
    command.push(suite.display().to_string());
    // One test at a time: two vCPUs under TCG, and the console stays readable.
    command.extend(["--test-threads=1", "--color=never"].map(str::to_owned));
    command.extend(filter.map(str::to_owned));
    let command: Vec<String> = command.iter().map(|a| quote(a)).collect();
    format!(
        "QL_NONCE={}\nQL_MODULES={}\nql_job() {{\n\tcd {} || return 126\n\t{}\n}}\n",
        quote(nonce),
        quote(&kernel.modules().display().to_string()),
        // Where cargo would run the daemon's tests from.
        quote(&workspace_root().join("daemon").display().to_string()),
        command.join(" ")
    )
}

/// Single-quoted for sh.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Tells this run's exit line apart from any text a test prints.
fn nonce() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{nanos:x}{:x}", std::process::id())
}

/// Builds the suite's test binary (and the `quicklane` binary it drives) on the host.
fn build_suite() -> Result<PathBuf> {
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(workspace_root())
        .args([
            "test",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ])
        .args(["-p", "quicklane", "--test", SUITE]);
    eprintln!("+ {}", display(&cmd));
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the {SUITE} suite failed: {}", out.status);
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact" && v["target"]["name"] == SUITE)
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
        .with_context(|| format!("cargo built no {SUITE} test executable"))
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), PathBuf::from)
}

fn document(table: &str) -> String {
    format!(
        "# Kernel support matrix\n\n\
         Generated by `cargo xtask vm-test --kernel all` (`daemon/tests/kernel_matrix.rs` in a \
         QEMU guest of each kernel); do not edit by hand.\n\n{table}"
    )
}
