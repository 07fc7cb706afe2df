//! `cargo xtask demo`: a simulated node with two pods, the same traffic before and with the
//! agent, live counters while it flows, then a clean detach and teardown; then the QoS part:
//! one repetition of the qos benchmark (quicklane against htb and tbf on a node of its own),
//! summarised.
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use serde_json::Value;
use simnode::{Node, Pod, Proc};

use crate::release;

/// A stream size the bypass carries better than TCP pod to pod: smaller and larger unanswered
/// streams move to TCP by design (README, "Streams, small and large").
const STREAM_MSG: &str = "16384";

fn interrupted() -> Result<()> {
    if release::interrupted() {
        bail!("interrupted: tearing the simulated node down");
    }
    Ok(())
}

pub fn run(seconds: u32) -> Result<()> {
    let quicklane = release::build_quicklane()?;
    // Ctrl-C must reach the teardown below (Drop of the node), not kill us mid-way.
    release::catch_sigint()?;

    let node = Node::new(2).context("building the simulated node")?;
    let outcome = demo(&node, &quicklane, seconds);
    let id = node.id().to_owned();
    node.teardown().context("tearing down the simulated node")?;
    let leaks = simnode::leaks_matching(&id);
    ensure!(
        leaks.is_empty(),
        "the demo left resources behind: {leaks:?}"
    );
    println!("\nsimulated node {id} torn down; nothing left behind");
    outcome?;
    qos(&quicklane)
}

/// The QoS part: `quicklane bench --scenario qos` for one repetition of 1 s steps (its node
/// is built and torn down by the bench), then the figures that show what QoS does.
fn qos(quicklane: &Path) -> Result<()> {
    println!(
        "\n== QoS: priorities on a virtual capacity, quicklane against htb and tbf (one repetition \
         of `quicklane bench --scenario qos`) =="
    );
    let out = std::env::temp_dir().join(format!("quicklane-demo-qos-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let status = Command::new(quicklane)
        .args(["bench", "--scenario", "qos", "--profile", "quick"])
        .args(["--reps", "1", "--seconds", "1", "--out"])
        .arg(&out)
        .status()
        .context("running quicklane bench")?;
    interrupted()?;
    ensure!(
        status.success(),
        "quicklane bench --scenario qos failed: {status}"
    );
    let results: Value = serde_json::from_slice(
        &std::fs::read(out.join("results.json")).context("reading the qos results")?,
    )?;
    print_qos(&results);
    println!(
        "(single samples on a noisy machine; the full report is {})",
        out.join("report.md").display()
    );
    Ok(())
}

fn print_qos(r: &Value) {
    let figure = |metric: &str, arm: &str| {
        r["results"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|f| f["metric"] == metric && f["mode"] == arm)
            .and_then(|f| f["median"].as_f64())
            .map_or_else(
                || "n/a".to_owned(),
                |v| {
                    if v < 10.0 {
                        format!("{v:.2}")
                    } else {
                        format!("{v:.1}")
                    }
                },
            )
    };
    let param = |key: &str| {
        r["settings"]["params"][key]
            .as_str()
            .unwrap_or("?")
            .to_owned()
    };
    let limit = param("limits");
    println!(
        "\n{:<48} {:>10} {:>10} {:>10}",
        "", "quicklane", "htb", "tbf"
    );
    for (label, metric) in [
        (
            format!("hi limited to {limit}: TCP Mbit/s"),
            format!("rate-accuracy.tcp_rate.{limit}"),
        ),
        (
            "  retransmits, % of segments".to_owned(),
            format!("rate-accuracy.tcp_retrans.{limit}"),
        ),
        (
            "  UDP at twice the limit: Mbit/s".to_owned(),
            format!("rate-accuracy.udp_rate.{limit}"),
        ),
        (
            format!(
                "capacity {}, hi prio 0, lo prio 2 + {}:",
                param("capacity"),
                param("guarantee")
            ),
            String::new(),
        ),
        (
            "  hi RTT p99, lo idle (us)".to_owned(),
            "priority.hi_rtt_p99.idle".to_owned(),
        ),
        (
            "  hi RTT p99, lo saturating (us)".to_owned(),
            "priority.hi_rtt_p99.saturated".to_owned(),
        ),
        (
            "  lo Mbit/s while hi pings".to_owned(),
            "priority.lo_rate.saturated".to_owned(),
        ),
        (
            "  lo Mbit/s alone".to_owned(),
            "preemption.lo_rate.alone".to_owned(),
        ),
        (
            "  both streaming: hi Mbit/s".to_owned(),
            "preemption.hi_rate.contended".to_owned(),
        ),
        (
            "  both streaming: lo Mbit/s (guarantee)".to_owned(),
            "preemption.lo_rate.contended".to_owned(),
        ),
        (
            "  ms until hi has 95 % of its share".to_owned(),
            "preemption.hi_time".to_owned(),
        ),
        (
            "  ms until lo is down to its guarantee".to_owned(),
            "preemption.lo_time".to_owned(),
        ),
    ] {
        if metric.is_empty() {
            println!("{label}");
            continue;
        }
        println!(
            "{label:<48} {:>10} {:>10} {:>10}",
            figure(&metric, "quicklane"),
            figure(&metric, "htb"),
            figure(&metric, "tbf")
        );
    }
}

fn demo(node: &Node, quicklane: &Path, seconds: u32) -> Result<()> {
    let (a, b) = (node.pod(0), node.pod(1));
    println!(
        "simulated node {}: {} {} / {} (veth {}) and {} {} / {} (veth {})",
        node.id(),
        a.name(),
        a.ipv4(),
        a.ipv6(),
        a.host_ifname(),
        b.name(),
        b.ipv4(),
        b.ipv6(),
        b.host_ifname()
    );
    let target = format!("{}:5001", b.ipv4());
    let rr_target = format!("{}:5002", b.ipv4());
    let _stream_srv = server(
        quicklane,
        b,
        "[::]:5001",
        &["--mode", "stream"],
        4 * seconds + 60,
    )?;
    let _rr_srv = server(
        quicklane,
        b,
        "[::]:5002",
        &["--mode", "rr", "--msg-size", "64"],
        4 * seconds + 60,
    )?;

    println!("\n== baseline: no agent, plain TCP through the node's veths ==");
    let base_stream = client(
        quicklane,
        a,
        &target,
        &["--mode", "stream", "--msg-size", STREAM_MSG],
        seconds,
        None,
    )?;
    let base_rr = client(
        quicklane,
        a,
        &rr_target,
        &["--mode", "rr", "--msg-size", "64"],
        seconds,
        None,
    )?;

    println!("\n== starting the agent in the node's host namespace ==");
    let config = write_config(node)?;
    let agent = start_agent(node, quicklane, &config)?;
    println!("{}", status_text(quicklane, node)?);

    println!("== with quicklane: same traffic, live counters every second ==");
    let fast_stream = client(
        quicklane,
        a,
        &target,
        &["--mode", "stream", "--msg-size", STREAM_MSG],
        seconds,
        Some(node),
    )?;
    let fast_rr = client(
        quicklane,
        a,
        &rr_target,
        &["--mode", "rr", "--msg-size", "64"],
        seconds,
        Some(node),
    )?;

    println!("\n{}", status_text(quicklane, node)?);
    print_comparison([&base_stream, &base_rr], [&fast_stream, &fast_rr])?;

    println!("\n== stopping the agent (SIGTERM): programs detach, pins are removed ==");
    stop_agent(agent)?;
    ensure!(
        !node.pin_dir().exists(),
        "pins left at {}",
        node.pin_dir().display()
    );
    println!("pin directory {} removed", node.pin_dir().display());
    Ok(())
}

fn print_comparison(base: [&Value; 2], fast: [&Value; 2]) -> Result<()> {
    let [base_stream, base_rr] = base;
    let [fast_stream, fast_rr] = fast;
    println!("== what it bought (single samples on a noisy machine, not a benchmark) ==");
    let gbit = |r: &Value| r["gbit_per_s"].as_f64().unwrap_or(f64::NAN);
    let p50 = |r: &Value| r["p50_us"].as_f64().unwrap_or(f64::NAN);
    let p99 = |r: &Value| r["p99_us"].as_f64().unwrap_or(f64::NAN);
    println!(
        "{:<32} {:>12} {:>12} {:>8}",
        "metric", "baseline", "quicklane", "ratio"
    );
    for (name, base, fast) in [
        (
            "stream 16 KiB, Gbit/s",
            gbit(base_stream),
            gbit(fast_stream),
        ),
        ("rr 64 B, p50 latency us", p50(base_rr), p50(fast_rr)),
        ("rr 64 B, p99 latency us", p99(base_rr), p99(fast_rr)),
    ] {
        println!("{name:<32} {base:>12.2} {fast:>12.2} {:>7.2}x", fast / base);
    }
    for report in [base_stream, fast_stream] {
        ensure!(
            report["checksum_ok"] == true,
            "stream checksum mismatch: {report}"
        );
    }

    Ok(())
}

fn write_config(node: &Node) -> Result<PathBuf> {
    std::fs::create_dir_all(node.run_dir())?;
    let ifs = node
        .pods()
        .iter()
        .map(|p| format!("{:?}", p.host_ifname()))
        .collect::<Vec<_>>()
        .join(", ");
    let text = format!(
        "[agent]\npin_dir = {pin:?}\nrun_dir = {run:?}\n\n[bypass]\nenabled = true\ncgroup = {cg:?}\n\n\
         [tc]\nenabled = true\ninterfaces = [{ifs}]\n\n[xdp]\nenabled = true\ninterfaces = [{ifs}]\nmode = \"skb\"\n",
        pin = node.pin_dir().display().to_string(),
        run = node.run_dir().display().to_string(),
        cg = node.cgroup_dir().display().to_string(),
    );
    let path = node.run_dir().join("quicklane.toml");
    std::fs::write(&path, &text)?;
    println!("config {}:\n{text}", path.display());
    Ok(path)
}

fn start_agent(node: &Node, quicklane: &Path, config: &Path) -> Result<Proc> {
    let mut cmd = node.command(quicklane);
    cmd.args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "info");
    let mut agent = node.spawn(&mut cmd)?;
    let state = node.run_dir().join("state.json");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !state.exists() {
        interrupted()?;
        if let Some(status) = agent.child_mut().try_wait()? {
            bail!("the agent exited during start: {status}");
        }
        ensure!(
            Instant::now() < deadline,
            "the agent was not ready after 20 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(agent)
}

fn stop_agent(mut agent: Proc) -> Result<()> {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.id().cast_signed()),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let status = agent.wait_timeout(Duration::from_secs(20))?;
    ensure!(status.success(), "the agent exited with {status}");
    Ok(())
}

fn server(quicklane: &Path, pod: &Pod, listen: &str, args: &[&str], secs: u32) -> Result<Proc> {
    let mut cmd = pod.command(quicklane);
    cmd.args([
        "loadgen",
        "server",
        "--listen",
        listen,
        "--duration",
        &secs.to_string(),
    ])
    .args(args)
    .stdout(Stdio::piped());
    let mut proc = pod.spawn(&mut cmd)?;
    let stdout = proc.child_mut().stdout.take().context("server stdout")?;
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)?;
    ensure!(
        line.contains("listening"),
        "load generator server did not start: {line:?}"
    );
    Ok(proc)
}

/// Runs a client to completion; with `live`, prints the agent's counters every second.
fn client(
    quicklane: &Path,
    pod: &Pod,
    target: &str,
    args: &[&str],
    secs: u32,
    live: Option<&Node>,
) -> Result<Value> {
    let mut cmd = pod.command(quicklane);
    cmd.args([
        "loadgen",
        "client",
        "--connect",
        target,
        "--duration",
        &secs.to_string(),
    ])
    .args(args)
    .stdout(Stdio::piped());
    let mut proc = pod.spawn(&mut cmd)?;
    let started = Instant::now();
    let mut next_tick = Duration::from_secs(1);
    while proc.child_mut().try_wait()?.is_none() {
        interrupted()?;
        if let Some(node) = live {
            if started.elapsed() >= next_tick {
                println!(
                    "  t={:>2}s  {}",
                    next_tick.as_secs(),
                    live_line(&status_json(quicklane, node)?)
                );
                next_tick += Duration::from_secs(1);
            }
        }
        ensure!(
            started.elapsed() < Duration::from_secs(u64::from(secs) + 30),
            "client hung"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = proc.wait_timeout(Duration::from_secs(1))?;
    let mut out = String::new();
    std::io::Read::read_to_string(
        &mut proc.child_mut().stdout.take().context("client stdout")?,
        &mut out,
    )?;
    ensure!(
        status.success(),
        "load generator client failed ({status}): {out}"
    );
    let report: Value =
        serde_json::from_str(out.lines().last().unwrap_or("")).context("client report")?;
    println!("  {} {}", args.join(" "), summary(&report));
    Ok(report)
}

fn summary(r: &Value) -> String {
    if r["kind"] == "stream" {
        format!(
            "-> {:.2} Gbit/s, checksum {}",
            r["gbit_per_s"].as_f64().unwrap_or(0.0),
            if r["checksum_ok"] == true {
                "ok"
            } else {
                "MISMATCH"
            }
        )
    } else {
        format!(
            "-> {:.0} transactions/s, p50 {:.1} us, p99 {:.1} us",
            r["tps"].as_f64().unwrap_or(0.0),
            r["p50_us"].as_f64().unwrap_or(0.0),
            r["p99_us"].as_f64().unwrap_or(0.0)
        )
    }
}

fn live_line(s: &Value) -> String {
    let c = |object: &str, name: &str| s["counters"][object][name].as_u64().unwrap_or(0);
    format!(
        "sockhash {} sockets in, {} msgs / {} MB redirected, {} misses | tc egress {} pkts, ingress {} pkts | xdp {} pkts",
        c("sockops", "sockhash_inserted"),
        c("sockops", "msg_redirected"),
        c("sockops", "bytes_redirected") / 1_000_000,
        c("sockops", "msg_peer_miss"),
        c("tc", "egress_packets"),
        c("tc", "ingress_packets"),
        c("xdp", "packets"),
    )
}

fn status_cmd(quicklane: &Path, node: &Node) -> Command {
    let mut cmd = Command::new(quicklane);
    cmd.arg("status")
        .arg("--pin-dir")
        .arg(node.pin_dir())
        .arg("--run-dir")
        .arg(node.run_dir());
    cmd
}

fn status_json(quicklane: &Path, node: &Node) -> Result<Value> {
    let out = status_cmd(quicklane, node).arg("--json").output()?;
    ensure!(
        out.status.success(),
        "status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn status_text(quicklane: &Path, node: &Node) -> Result<String> {
    let out = status_cmd(quicklane, node).output()?;
    ensure!(
        out.status.success(),
        "status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
