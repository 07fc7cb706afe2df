//! `quicklane bench ...`: run a scenario and write its results directory, or compare a run
//! with a stored baseline.

use std::path::{Path, PathBuf};

use clap::Args;

use crate::compare;
use crate::error::Error;
use crate::interrupt;
use crate::report;
use crate::results::Results;
use crate::scenario::{self, Context, Overrides, Profile, Scenario};

/// Benchmark baseline against accelerated paths on a simulated node.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    quicklane bench --scenario bypass --profile quick --out /tmp/qlbench\n  \
    quicklane bench --scenario qos --profile quick --out /tmp/qlbench-qos\n  \
    quicklane bench --compare stored/results.json            # rerun its scenario and profile, then compare\n  \
    quicklane bench --compare stored/results.json --results new/results.json   # compare two files")]
pub struct BenchArgs {
    /// Scenario to run (taken from the --compare file when omitted).
    #[arg(long, value_enum)]
    pub scenario: Option<Scenario>,

    /// quick: under 2 minutes, for CI and the demo; full: every size, more repetitions.
    /// Default: quick, or the --compare file's profile.
    #[arg(long, value_enum)]
    pub profile: Option<Profile>,

    /// Results directory (created): results.json, report.md, *.svg, raw/. Default:
    /// bench-results/SCENARIO-PROFILE-UNIXTIME.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,

    /// Repetitions (each runs baseline and accelerated once).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub reps: Option<u16>,

    /// Seconds per tool run instead of the profile's; qperf, sockperf and iperf3 only take
    /// whole seconds and round up (qos: also each phase of the preemption step).
    #[arg(long, value_name = "SECS", value_parser = parse_seconds)]
    pub seconds: Option<f64>,

    /// qperf message sizes instead of the profile's, e.g. `64,4K,64K` (bypass only).
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = parse_size)]
    pub sizes: Option<Vec<u64>>,

    /// A stored results.json: exit non-zero if a ratio is worse than there beyond the
    /// measured noise of both runs.
    #[arg(long, value_name = "FILE")]
    pub compare: Option<PathBuf>,

    /// With --compare: compare this results.json instead of running.
    #[arg(long, value_name = "FILE", requires = "compare")]
    pub results: Option<PathBuf>,
}

pub fn run(args: BenchArgs) -> Result<(), Error> {
    let BenchArgs {
        scenario,
        profile,
        out,
        reps,
        seconds,
        sizes,
        compare,
        results,
    } = args;
    let stored = compare.as_deref().map(Results::load).transpose()?;
    if let Some(path) = &results {
        let current = Results::load(path)?;
        let stored = stored.expect("clap requires --compare with --results");
        return check(&current, &stored);
    }
    let scenario = match (scenario, &stored) {
        (Some(s), _) => s,
        (None, Some(stored)) => parse_enum::<Scenario>(&stored.scenario)?,
        (None, None) => {
            return Err(Error::Usage(
                "--scenario is required (bypass or qos), unless --compare names a stored run"
                    .into(),
            ))
        }
    };
    let profile = match (profile, &stored) {
        (Some(p), _) => p,
        (None, Some(stored)) => parse_enum::<Profile>(&stored.profile)?,
        (None, None) => Profile::Quick,
    };
    let out = out.unwrap_or_else(|| {
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        PathBuf::from(format!(
            "bench-results/{}-{}-{unix}",
            scenario.name(),
            profile.name()
        ))
    });
    let exe = std::env::current_exe()
        .map_err(|e| Error::io("finding the quicklane binary (current_exe)", e))?;
    let ctx = Context {
        exe,
        out_dir: out.clone(),
        // `quicklane` rather than the binary's full path, which says nothing about the run.
        command_line: std::iter::once("quicklane".to_owned())
            .chain(std::env::args().skip(1))
            .collect::<Vec<_>>()
            .join(" "),
    };
    let overrides = Overrides {
        reps: reps.map(usize::from),
        seconds,
        sizes,
    };
    interrupt::install()?;
    eprintln!(
        "quicklane bench: scenario {}, profile {}, results in {}",
        scenario.name(),
        profile.name(),
        out.display()
    );
    let results = scenario::run(scenario, profile, &overrides, &ctx)?;
    let written = report::write(&out, &results)?;
    print!("{}", summary(&results, &out, &written));
    match &stored {
        Some(stored) => check(&results, stored),
        None => Ok(()),
    }
}

fn check(current: &Results, stored: &Results) -> Result<(), Error> {
    let cmp = compare::compare(current, stored);
    println!("{}", cmp.render());
    if cmp.regressions.is_empty() {
        Ok(())
    } else {
        Err(Error::Regression {
            count: cmp.regressions.len(),
            details: cmp
                .regressions
                .iter()
                .map(|r| format!("  {}", r.describe()))
                .collect::<Vec<_>>()
                .join("\n"),
        })
    }
}

/// The ratio table in short, for the terminal.
fn summary(results: &Results, out: &Path, written: &[PathBuf]) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let met = results.ratios.iter().filter(|r| r.met).count();
    let _ = writeln!(
        s,
        "\n{} {}: {met} of {} targets met ({:.0} s)",
        results.scenario,
        results.profile,
        results.ratios.len(),
        results.wall_seconds
    );
    // The metric, size and value columns of a ratio's line.
    let columns = |r: &crate::results::Ratio, unit: &str| {
        format!(
            "{:<40} {:>7} {:>8}{unit:<3}",
            r.metric,
            r.msg_size
                .map_or_else(String::new, crate::results::size_label),
            crate::report::markdown::num(r.value),
        )
    };
    let target = |r: &crate::results::Ratio| {
        format!(
            "{} {}",
            r.better.symbol(),
            crate::report::markdown::num(r.target)
        )
    };
    for r in &results.ratios {
        // Ratios read "0.45x"; checks of absolute values carry their unit ("12 ms").
        let unit = r
            .unit
            .as_deref()
            .map_or_else(|| "x".to_owned(), |u| format!(" {u}"));
        let _ = writeln!(
            s,
            "  {:<4} {}  ({}{unit})",
            if r.met { "ok" } else { "MISS" },
            columns(r, &unit),
            target(r),
        );
    }
    if !results.references.is_empty() {
        let _ = writeln!(s, "references (AF_UNIX / TCP baseline; not targets):");
    }
    for r in &results.references {
        let _ = writeln!(
            s,
            "  ref  {}  (against {}: the target {} is {}reachable by AF_UNIX)",
            columns(r, "x"),
            r.against.as_deref().unwrap_or("?"),
            target(r),
            if r.met { "" } else { "not " },
        );
    }
    for note in &results.notes {
        let _ = writeln!(s, "  note: {note}");
    }
    let _ = writeln!(s, "wrote {} files to {}", written.len(), out.display());
    s
}

fn parse_enum<T: clap::ValueEnum>(name: &str) -> Result<T, Error> {
    T::from_str(name, false).map_err(|_| {
        Error::Usage(format!(
            "unknown scenario or profile {name:?} in the --compare file"
        ))
    })
}

fn parse_seconds(s: &str) -> Result<f64, String> {
    let secs: f64 = s
        .trim()
        .parse()
        .map_err(|e| format!("bad number of seconds {s:?}: {e}"))?;
    if secs.is_finite() && secs > 0.0 && secs <= 3600.0 {
        Ok(secs)
    } else {
        Err(format!("{s} is not a number of seconds in (0, 3600]"))
    }
}

/// `64`, `4K` (KiB), `64K`, `1M`.
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, scale) = match s.strip_suffix(['K', 'k']) {
        Some(d) => (d, 1 << 10),
        None => match s.strip_suffix(['M', 'm']) {
            Some(d) => (d, 1 << 20),
            None => (s, 1),
        },
    };
    let n: u64 = digits
        .parse()
        .map_err(|e| format!("bad message size {s:?}: {e}"))?;
    match n.checked_mul(scale) {
        Some(size) if (1..=1 << 24).contains(&size) => Ok(size),
        _ => Err(format!("message size {s} is outside 1 B..16M")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn parse(args: &[&str]) -> Result<BenchArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("bench").chain(args.iter().copied())).map(|c| c.bench)
    }

    #[test]
    fn flags() {
        let a = parse(&[
            "--scenario",
            "bypass",
            "--profile",
            "full",
            "--out",
            "/tmp/x",
            "--reps",
            "7",
            "--seconds",
            "0.2",
            "--sizes",
            "1,4K,64k",
        ])
        .unwrap();
        assert_eq!(a.scenario, Some(Scenario::Bypass));
        assert_eq!(a.profile, Some(Profile::Full));
        assert_eq!(a.reps, Some(7));
        assert_eq!(a.seconds, Some(0.2));
        assert_eq!(a.sizes, Some(vec![1, 4096, 65536]));
    }

    #[test]
    fn bad_flags_are_refused() {
        for bad in [
            &["--scenario", "nope"][..],
            &["--reps", "0"],
            &["--seconds", "0"],
            &["--seconds", "nan"],
            &["--sizes", "0"],
            &["--sizes", "64,x"],
            &["--results", "a.json"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn a_scenario_is_needed_without_a_stored_run() {
        let err = run(parse(&[]).unwrap()).unwrap_err();
        assert!(err.to_string().contains("--scenario is required"), "{err}");
    }
}
