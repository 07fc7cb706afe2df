//! Developer and CI entry points: `cargo xtask setup | demo | test | bench | vm-test`.
mod bench;
mod demo;
mod release;
mod setup;
mod test;
mod vm;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(about = "quicklane developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Prepare this machine: apt packages, bpf-linker, bpffs. Idempotent.
    Setup,
    /// Build a simulated node, run the agent on it with traffic, show what it does, clean up.
    Demo {
        /// Seconds of traffic per phase.
        #[arg(long, default_value_t = 3)]
        seconds: u32,
    },
    /// Setup, formatting, lints, unit and privileged integration tests, leak check.
    Test {
        /// Passed to `cargo test` as a test-name filter.
        filter: Option<String>,
    },
    /// Setup, a release build, then `quicklane bench` with these flags, e.g.
    /// `cargo xtask bench --scenario bypass --profile quick --out /tmp/qlbench`.
    Bench {
        /// Flags for `quicklane bench` (see `quicklane bench --help`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The kernel-matrix suite inside QEMU guests of other kernels (Debian 6.1 and 6.12).
    /// Exit code 3 means a guest crashed or hung twice: an infrastructure failure.
    VmTest {
        #[arg(long, value_enum, default_value = "all")]
        kernel: vm::KernelArg,
        /// Test-name filter for the suite, after `--`.
        #[arg(last = true)]
        filter: Option<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Setup => setup::run(),
        Command::Demo { seconds } => {
            setup::run()?;
            demo::run(seconds)
        }
        Command::Test { filter } => {
            setup::run()?;
            test::run(filter.as_deref())
        }
        Command::Bench { args } => {
            setup::run()?;
            bench::run(&args)
        }
        Command::VmTest { kernel, filter } => {
            setup::run()?;
            vm::run(kernel, filter.as_deref())
        }
    }
}

/// The workspace root (xtask lives one level below it).
fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is inside the workspace")
        .to_path_buf()
}

/// Runs a command with inherited output, failing with its command line if it fails.
fn run_cmd(cmd: &mut std::process::Command) -> anyhow::Result<()> {
    eprintln!("+ {}", display(cmd));
    let status = cmd
        .status()
        .map_err(|e| anyhow::anyhow!("{}: {e}", display(cmd)))?;
    anyhow::ensure!(status.success(), "`{}` failed: {status}", display(cmd));
    Ok(())
}

fn display(cmd: &std::process::Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}
