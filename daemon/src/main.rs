use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use quicklane::{
    agent,
    config::{Config, DEFAULT_PIN_DIR, DEFAULT_RUN_DIR},
    paths::{PinDir, RunDir},
    status,
};
use tracing_subscriber::EnvFilter;

/// quicklane: node-local network acceleration agent.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent: load, attach and pin the datapath; detach on SIGTERM/SIGINT.
    Run {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// On exit leave programs attached and pins in place, for a restart that re-adopts
        /// them without interrupting traffic.
        #[arg(long)]
        keep_datapath: bool,
    },
    /// Load every BPF program into the kernel (nothing is attached) and report the verifier's
    /// verdict; exits non-zero if any program is refused.
    Verify {
        #[arg(long)]
        json: bool,
    },
    /// Probe what this kernel offers the agent (program types, helpers, bpf_link kinds, sch_fq,
    /// netkit, AF_XDP) by trying each, and report it.
    Features {
        #[arg(long)]
        json: bool,
    },
    /// quicklane's own TCP load generator (used by tests, benchmarks and the demo inside
    /// simulated pods).
    #[command(hide = true)]
    Loadgen(quicklane_bench::load::cli::LoadgenArgs),
    /// Benchmark baseline against accelerated on a simulated node; writes JSON, Markdown and
    /// SVG results, or checks a run against a stored one (--compare).
    Bench(quicklane_bench::cli::BenchArgs),
    /// Show what is attached and the live counters.
    Status {
        /// Read pin_dir and run_dir from this config instead of the defaults.
        #[arg(long, value_name = "FILE", conflicts_with_all = ["pin_dir", "run_dir"])]
        config: Option<PathBuf>,
        #[arg(long, value_name = "DIR")]
        pin_dir: Option<PathBuf>,
        #[arg(long, value_name = "DIR")]
        run_dir: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("quicklane: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run {
            config,
            keep_datapath,
        } => agent::run(&config, keep_datapath)?,
        Command::Loadgen(args) => quicklane_bench::load::cli::run(args)?,
        Command::Bench(args) => quicklane_bench::cli::run(args)?,
        Command::Features { json } => {
            let features = quicklane::features::Features::probe();
            if json {
                println!("{}", serde_json::to_string_pretty(&features)?);
            } else {
                print!("{}", features.render_text());
            }
        }
        Command::Verify { json } => {
            let scratch = PinDir::new(format!(
                "/sys/fs/bpf/quicklane-verify-{}",
                std::process::id()
            ));
            quicklane::bpffs::ensure_pin_dir(scratch.root())?;
            let verified = quicklane::datapath::verify_all(&Config::default(), &scratch)?;
            // The VM fast path needs AF_XDP sockets as much as it needs the XDP program.
            quicklane_xsk::XskSocket::open()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&verified)?);
            } else {
                println!("ok  AF_XDP sockets available");
                for v in &verified {
                    let insns = v
                        .instructions
                        .map_or_else(|| "?".to_owned(), |n| n.to_string());
                    println!(
                        "ok  {:<8} {:<14} {insns} instructions verified",
                        v.object, v.program
                    );
                }
            }
        }
        Command::Status {
            config,
            pin_dir,
            run_dir,
            json,
        } => {
            let (pins, run) = match config {
                Some(path) => {
                    let c = Config::load(&path)?;
                    (PinDir::new(c.agent.pin_dir), RunDir::new(c.agent.run_dir))
                }
                None => (
                    PinDir::new(pin_dir.unwrap_or_else(|| DEFAULT_PIN_DIR.into())),
                    RunDir::new(run_dir.unwrap_or_else(|| DEFAULT_RUN_DIR.into())),
                ),
            };
            let status = status::collect(&pins, &run)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", status.render_text());
            }
        }
    }
    Ok(())
}
