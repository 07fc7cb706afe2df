//! Quick interleaved A/B of the bypass on a simulated node: connect rate, 64 B request/response
//! latency and stream throughput (64 KiB writes, or `--stream-size N`; the server reads
//! 256 KiB at a time, or `--read-size N`; `--nagle` leaves Nagle's algorithm on), pod to pod,
//! without the agent ("base") and with one or more agent binaries (variants of the datapath),
//! in an order rotated every repetition. `--pin` keeps the client and the servers on two
//! CPUs, as the bench's connect step does. `--loopback` runs the client in the servers' pod,
//! over 127.0.0.1.
//!
//! ```sh
//! cargo build --release -p quicklane --examples --ignore-rust-version
//! target/release/examples/bypass_ab --reps 7 --secs 2 --tests connect \
//!     --arm agent=target/release/quicklane [--arm other=/tmp/quicklane-variant]
//! ```
//!
//! Prints one line per sample and a summary (median, min, max, ratio of medians to base).
//! `--bpf-stats` also turns on the kernel's BPF run-time statistics for the run and prints
//! what the agent's sock_ops and sk_msg programs cost per connection / transaction / MB (calls
//! and ns): the hooks' own share of a figure too close to the noise to see in the ratio. The
//! statistics add two clock reads to every program run, so ratios taken with it are a little
//! lower than without.
//! Needs root; everything it creates goes with the node.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use quicklane_bench::load::{parse_report, Report};
use simnode::{Node, Proc};

const CONNECT_PORT: u16 = 5002;
const RR_PORT: u16 = 5001;
const STREAM_PORT: u16 = 5003;

#[derive(Clone)]
struct Args {
    reps: usize,
    secs: f64,
    tests: Vec<String>,
    /// (name, agent binary); name "base" has none.
    arms: Vec<(String, Option<PathBuf>)>,
    loadgen: PathBuf,
    conns: u32,
    stream_size: u64,
    /// The stream server's read() size; the load generator's default when absent.
    read_size: Option<u64>,
    /// Streams leave Nagle's algorithm on, as qperf does (the load generator sets
    /// TCP_NODELAY by default, as Envoy and gRPC do).
    nagle: bool,
    /// Client and servers on the bench's two CPUs (`loadgen --cpu`), as its connect step:
    /// the scheduler's placement of the two ends is one source of run-to-run spread.
    pin: Option<[usize; 2]>,
    bpf_stats: bool,
    /// The client runs in the servers' pod and connects to 127.0.0.1 (a sidecar's hop).
    loopback: bool,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        reps: 5,
        secs: 2.0,
        tests: vec!["connect".into()],
        arms: vec![("base".into(), None)],
        loadgen: std::env::current_exe()?
            .parent()
            .and_then(Path::parent)
            .context("exe dir")?
            .join("quicklane"),
        conns: 1,
        stream_size: 65536,
        read_size: None,
        nagle: false,
        pin: None,
        bpf_stats: false,
        loopback: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--reps" => args.reps = val()?.parse()?,
            "--secs" => args.secs = val()?.parse()?,
            "--conns" => args.conns = val()?.parse()?,
            "--stream-size" => args.stream_size = val()?.parse()?,
            "--read-size" => args.read_size = Some(val()?.parse()?),
            "--nagle" => args.nagle = true,
            "--bpf-stats" => args.bpf_stats = true,
            "--loopback" => args.loopback = true,
            "--pin" => {
                args.pin = Some(quicklane_bench::two_cpus().context("--pin needs two CPUs")?);
            }
            "--tests" => args.tests = val()?.split(',').map(str::to_owned).collect(),
            "--loadgen" => args.loadgen = val()?.into(),
            "--no-base" => {
                args.arms.retain(|(n, _)| n != "base");
            }
            "--arm" => {
                let v = val()?;
                let (name, exe) = v.split_once('=').context("--arm NAME=EXE")?;
                args.arms
                    .push((name.to_owned(), Some(std::fs::canonicalize(exe)?)));
            }
            _ => bail!("unknown argument {a}"),
        }
    }
    Ok(args)
}

fn wait_listening(node: &Node, pod: usize, port: u16) -> Result<()> {
    let started = Instant::now();
    loop {
        let out = node
            .pod(pod)
            .command("ss")
            .args(["-Htln", &format!("sport = :{port}")])
            .output()?;
        if !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(10) {
            bail!("nothing listens on {port}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Agent {
    proc: Proc,
}

impl Agent {
    fn start(node: &Node, exe: &Path, config: &Path) -> Result<Self> {
        let state = node.run_dir().join("state.json");
        let _ = std::fs::remove_file(&state);
        let mut cmd = node.command(exe);
        cmd.args(["run", "--config"])
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(node.run_dir().join("agent.log"))?);
        let proc = node.spawn(&mut cmd)?;
        let started = Instant::now();
        loop {
            let pid = std::fs::read(&state)
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|v| v["pid"].as_u64());
            if pid == Some(u64::from(proc.id())) {
                return Ok(Self { proc });
            }
            if started.elapsed() > Duration::from_secs(20) {
                bail!(
                    "agent not ready; see {}",
                    node.run_dir().join("agent.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn counters(node: &Node, exe: &Path) -> Result<serde_json::Value> {
        let out = Command::new(exe)
            .args(["status", "--json", "--pin-dir"])
            .arg(node.pin_dir())
            .arg("--run-dir")
            .arg(node.run_dir())
            .output()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        Ok(v["counters"]["sockops"].clone())
    }

    fn stop(mut self) -> Result<()> {
        let pid = nix::unistd::Pid::from_raw(self.proc.id().cast_signed());
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        let status = self.proc.wait_timeout(Duration::from_secs(20))?;
        if !status.success() {
            bail!("agent exited with {status}");
        }
        Ok(())
    }
}

/// `--cpu` for one end (0: the client, 1: the servers) with `--pin`.
fn pinned(args: &Args, end: usize) -> Vec<String> {
    args.pin
        .map(|cpus| vec!["--cpu".into(), cpus[end].to_string()])
        .unwrap_or_default()
}

fn cgroup_usage_us(node: &Node) -> Result<u64> {
    let text = std::fs::read_to_string(node.cgroup_dir().join("cpu.stat"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .context("usage_usec")?
        .trim()
        .parse()
        .map_err(Into::into)
}

/// What one test measured: its figure, and the units of work it did (connect: connections;
/// rr: transactions; stream: MB), which the CPU time and BPF time are divided by.
struct Measured {
    figure: f64,
    units: f64,
}

/// The test's figure, and the CPU time the node's cgroup (both pods) used per unit of work.
fn run_test(node: &Node, args: &Args, test: &str) -> Result<(Measured, f64)> {
    let (client_pod, peer) = if args.loopback {
        (1, std::net::Ipv4Addr::LOCALHOST)
    } else {
        (0, node.pod(1).ipv4())
    };
    let (port, extra): (u16, Vec<String>) = match test {
        "connect" => (CONNECT_PORT, vec!["--conns".into(), args.conns.to_string()]),
        "rr" => (RR_PORT, vec!["--msg-size".into(), "64".into()]),
        // Counted, not hashed: hashing would cost as much CPU as the path measured.
        "stream" => (
            STREAM_PORT,
            [
                "--msg-size".into(),
                args.stream_size.to_string(),
                "--check".into(),
                "length".into(),
            ]
            .into_iter()
            .chain(args.nagle.then(|| "--no-nodelay".into()))
            .collect(),
        ),
        _ => bail!("unknown test {test}"),
    };
    let mode = if test == "stream" { "stream" } else { test };
    let cpu_before = cgroup_usage_us(node)?;
    let out = node
        .pod(client_pod)
        .command(&args.loadgen)
        .args(["loadgen", "client", "--mode", mode, "--connect"])
        .arg(format!("{peer}:{port}"))
        .args(["--duration", &args.secs.to_string()])
        .args(&extra)
        .args(pinned(args, 0))
        .stderr(Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!("loadgen {test} failed: {}", out.status);
    }
    let cpu = (cgroup_usage_us(node)? - cpu_before) as f64;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    let measured = match parse_report(line)? {
        Report::Connect(r) => {
            if r.errors > 0 {
                eprintln!("  connect errors: {} ({:?})", r.errors, r.first_error);
            }
            Measured {
                figure: r.connects_per_s,
                units: r.connects as f64,
            }
        }
        Report::Rr(r) => Measured {
            figure: r.p50_us,
            units: r.transactions as f64,
        },
        Report::Stream(r) => {
            if !r.checksum_ok {
                bail!("stream length mismatch");
            }
            Measured {
                figure: r.gbit_per_s,
                units: r.bytes as f64 / 1e6,
            }
        }
        Report::Server(_) => bail!("unexpected report"),
    };
    let cpu = cpu / measured.units;
    Ok((measured, cpu))
}

/// The agent's programs whose cost `--bpf-stats` reports.
const STATS_PROGRAMS: [&str; 2] = ["ql_sockops", "ql_sk_msg"];

/// Run time and runs so far of every loaded program named like `STATS_PROGRAMS[i]`, by
/// program id (an agent's restart loads new ones).
fn bpf_runs() -> Result<BTreeMap<u32, (usize, Duration, u64)>> {
    let mut runs = BTreeMap::new();
    for info in aya::programs::loaded_programs() {
        let info = info?;
        let name = info.name_as_str().unwrap_or_default();
        if let Some(i) = STATS_PROGRAMS.iter().position(|p| *p == name) {
            runs.insert(info.id(), (i, info.run_time(), info.run_count()));
        }
    }
    Ok(runs)
}

/// Per program of `STATS_PROGRAMS`: (runs, ns) between two `bpf_runs` snapshots.
fn bpf_delta(
    before: &BTreeMap<u32, (usize, Duration, u64)>,
    after: &BTreeMap<u32, (usize, Duration, u64)>,
) -> [(f64, f64); 2] {
    let mut out = [(0.0, 0.0); 2];
    for (id, &(i, time, count)) in after {
        let (t0, c0) = before
            .get(id)
            .map_or((Duration::ZERO, 0), |&(_, t, c)| (t, c));
        out[i].0 += count.saturating_sub(c0) as f64;
        out[i].1 += time.saturating_sub(t0).as_nanos() as f64;
    }
    out
}

fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let med = if n % 2 == 1 {
        s[n / 2]
    } else {
        f64::midpoint(s[n / 2 - 1], s[n / 2])
    };
    (med, s[0], s[n - 1])
}

#[allow(clippy::too_many_lines)] // a measurement script, read top to bottom
fn main() -> Result<()> {
    let args = parse_args()?;
    simnode::require_root()?;
    // Held for the whole run: the kernel counts while any such descriptor is open.
    let _stats = args
        .bpf_stats
        .then(|| aya::sys::enable_stats(aya::sys::Stats::RunTime))
        .transpose()
        .context("enabling BPF run-time statistics")?;
    let node = Node::new(2)?;
    let config = quicklane_bench::write_agent_config(&node)?;
    let lifetime = "100000";
    let server = |port: u16, mode: &[&str]| -> Result<Proc> {
        let mut cmd = node.pod(1).command(&args.loadgen);
        cmd.args(["loadgen", "server", "--listen", &format!("[::]:{port}")])
            .args(mode)
            .args(["--duration", lifetime])
            .args(pinned(&args, 1))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let p = node.pod(1).spawn(&mut cmd)?;
        wait_listening(&node, 1, port)?;
        Ok(p)
    };
    let read_size = args.read_size.map(|n| n.to_string());
    let mut stream = vec!["--mode", "stream", "--check", "length"];
    if let Some(n) = &read_size {
        stream.extend(["--read-size", n.as_str()]);
    }
    let _servers = [
        server(CONNECT_PORT, &["--mode", "connect"])?,
        server(RR_PORT, &["--mode", "rr", "--msg-size", "64"])?,
        server(STREAM_PORT, &stream)?,
    ];
    // Warm-up: neighbours, caches.
    run_test(
        &node,
        &Args {
            secs: 0.3,
            ..args.clone()
        },
        "rr",
    )?;

    let mut samples: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
    let n = args.arms.len();
    for rep in 0..args.reps {
        for k in 0..n {
            // Rotate, and reverse on odd repetitions, so no arm always follows another.
            let i = if rep % 2 == 0 {
                (rep + k) % n
            } else {
                (rep + n - k) % n
            };
            let (name, exe) = &args.arms[i];
            let agent = match exe {
                Some(exe) => Some(Agent::start(&node, exe, &config)?),
                None => None,
            };
            for test in &args.tests {
                let runs_before = if args.bpf_stats && agent.is_some() {
                    Some(bpf_runs()?)
                } else {
                    None
                };
                let (measured, cpu) = run_test(&node, &args, test)?;
                let v = measured.figure;
                println!("rep {rep} {name:<12} {test:<8} {v:.2}  cpu {cpu:.3}");
                if let Some(before) = runs_before {
                    let costs = bpf_delta(&before, &bpf_runs()?);
                    let mut total_us = 0.0;
                    for (prog, (runs, ns)) in STATS_PROGRAMS.iter().zip(costs) {
                        let per_run = if runs > 0.0 { ns / runs } else { 0.0 };
                        println!(
                            "  bpf: {prog:<10} {:>8.2} runs x {per_run:>6.0} ns = {:>8.3} us per unit",
                            runs / measured.units,
                            ns / measured.units / 1e3
                        );
                        total_us += ns / measured.units / 1e3;
                    }
                    samples
                        .entry((format!("{test}-bpf"), name.clone()))
                        .or_default()
                        .push(total_us);
                }
                samples
                    .entry((test.clone(), name.clone()))
                    .or_default()
                    .push(v);
                samples
                    .entry((format!("{test}-cpu"), name.clone()))
                    .or_default()
                    .push(cpu);
            }
            if let Some(agent) = agent {
                if let Ok(c) = Agent::counters(&node, &args.loadgen) {
                    let pick = |k: &str| c[k].as_u64().unwrap_or(0);
                    println!(
                        "  counters: sock_ops_calls={} sockhash_inserted={} msg_redirected={} \
                         conn_no_origin={} sockhash_left={} sockhash_reader_left={}",
                        pick("sock_ops_calls"),
                        pick("sockhash_inserted"),
                        pick("msg_redirected"),
                        pick("conn_no_origin"),
                        pick("sockhash_left"),
                        pick("sockhash_reader_left")
                    );
                }
                agent.stop()?;
            }
        }
    }
    println!(
        "\nsummary ({} reps x {} s; connect: conn/s, rr: p50 us, stream: Gbit/s; -cpu: pods' CPU us \
         per connection / transaction / MB; -bpf: the agent's sock_ops + sk_msg run time, us per \
         the same unit; ratio = median of per-repetition arm/base)",
        args.reps, args.secs
    );
    let metrics: Vec<String> = args
        .tests
        .iter()
        .flat_map(|t| [t.clone(), format!("{t}-cpu"), format!("{t}-bpf")])
        .collect();
    for test in &metrics {
        let base = samples.get(&(test.clone(), "base".into())).cloned();
        for (name, _) in &args.arms {
            // -bpf: agent arms only, and only with --bpf-stats.
            let Some(v) = samples.get(&(test.clone(), name.clone())) else {
                continue;
            };
            let (med, min, max) = stats(v);
            let ratio = base.as_ref().map_or(String::new(), |b| {
                let per_rep: Vec<f64> = v.iter().zip(b).map(|(x, y)| x / y).collect();
                let (rm, rmin, rmax) = stats(&per_rep);
                format!("  ratio {rm:.3}x ({rmin:.3}-{rmax:.3})")
            });
            println!(
                "{test:<12} {name:<12} median {med:>10.3}  min {min:>10.3}  max {max:>10.3}{ratio}"
            );
        }
    }
    node.teardown()?;
    Ok(())
}
