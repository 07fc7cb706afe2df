//! Developer and CI entry points: `cargo xtask setup | demo | test`.
mod demo;
mod setup;
mod test;

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
