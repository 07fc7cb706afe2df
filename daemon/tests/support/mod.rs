//! Shared pieces of the agent's privileged integration tests: a simulated node with the agent
//! running in its "host" namespace, and the load generator in its pods.
#![allow(dead_code, reason = "each test binary uses a different subset")]

pub mod apiserver;
pub mod iperf;
use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use simnode::{Node, Pod, Proc};

pub const QUICKLANE: &str = env!("CARGO_BIN_EXE_quicklane");
pub const WAIT: Duration = Duration::from_secs(20);

/// A config for `node`: pins and run dir private to the node, bypass on the node's cgroup,
/// plus `extra`, which continues the `[bypass]` table (keys first, then other tables).
pub fn write_config(node: &Node, extra: &str) -> PathBuf {
    std::fs::create_dir_all(node.run_dir()).unwrap();
    let path = node.run_dir().join("quicklane.toml");
    let text = format!(
        "[agent]\npin_dir = {:?}\nrun_dir = {:?}\n[bypass]\ncgroup = {:?}\n{extra}",
        node.pin_dir().display().to_string(),
        node.run_dir().display().to_string(),
        node.cgroup_dir().display().to_string(),
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// A running `quicklane run`, in the node's namespace.
pub struct Agent {
    proc: Proc,
    state: PathBuf,
}

impl Agent {
    pub fn start(node: &Node, config: &Path, keep_datapath: bool) -> Self {
        Self::start_with_env(node, config, keep_datapath, &[])
    }

    pub fn start_with_env(
        node: &Node,
        config: &Path,
        keep_datapath: bool,
        env: &[(&str, &str)],
    ) -> Self {
        let mut cmd = node.command(QUICKLANE);
        cmd.envs(env.iter().copied());
        cmd.args(["run", "--config"]).arg(config);
        if keep_datapath {
            cmd.arg("--keep-datapath");
        }
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        let mut proc = node.spawn(&mut cmd).expect("spawn quicklane run");
        let state = node.run_dir().join("state.json");
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(pid) = read_json(&state).and_then(|s| s["pid"].as_u64()) {
                if pid == u64::from(proc.id()) {
                    break;
                }
            }
            if let Ok(Some(status)) = proc.child_mut().try_wait() {
                panic!(
                    "agent exited during start ({status}): {}",
                    stderr_of(&mut proc)
                );
            }
            if Instant::now() >= deadline {
                let _ = proc.child_mut().kill();
                panic!("agent not ready after {WAIT:?}: {}", stderr_of(&mut proc));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { proc, state }
    }

    pub fn pid(&self) -> u32 {
        self.proc.id()
    }

    /// SIGHUP, without waiting for anything (see `reload` for a reload that must apply).
    pub fn hangup(&self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.proc.id().cast_signed()),
            nix::sys::signal::Signal::SIGHUP,
        )
        .unwrap();
    }

    /// SIGTERM, then the exit status and everything the agent logged.
    pub fn stop(mut self) -> (ExitStatus, String) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.proc.id().cast_signed()),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let status = self
            .proc
            .wait_timeout(WAIT)
            .expect("agent stops after SIGTERM");
        let log = stderr_of(&mut self.proc);
        assert!(!self.state.exists(), "state file left after stop");
        (status, log)
    }
}

fn stderr_of(proc: &mut Proc) -> String {
    let mut s = String::new();
    if let Some(mut err) = proc.child_mut().stderr.take() {
        let _ = std::io::Read::read_to_string(&mut err, &mut s);
    }
    s
}

fn read_json(path: &Path) -> Option<Value> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// `quicklane status --json` for the node's pins.
pub fn status(node: &Node) -> Value {
    let out = Command::new(QUICKLANE)
        .args(["status", "--json", "--pin-dir"])
        .arg(node.pin_dir())
        .arg("--run-dir")
        .arg(node.run_dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

pub fn counter(status: &Value, object: &str, name: &str) -> u64 {
    status["counters"][object][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {object}.{name} in {status:#}"))
}

/// Link ids and program ids from a status, by pin name.
pub fn links(status: &Value) -> Vec<(String, u64, u64)> {
    status["attachments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["pin"].as_str().unwrap().to_owned(),
                // Legacy attachments have no link: 0.
                a["link_id"].as_u64().unwrap_or(0),
                a["program_id"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Pinned tc attachments (either direction) on `ifname`, from a status.
pub fn tc_pins(node: &Node, ifname: &str) -> usize {
    links(&status(node))
        .iter()
        .filter(|(pin, _, _)| {
            pin.starts_with(&format!("tc-egress-{ifname}-"))
                || pin.starts_with(&format!("tc-ingress-{ifname}-"))
        })
        .count()
}

/// A load generator server in `pod`, ready (listening) when this returns.
pub fn server(pod: &Pod, mode: &str, port: u16, secs: u32, extra: &[&str]) -> Proc {
    let mut cmd = pod.command(QUICKLANE);
    cmd.args([
        "loadgen",
        "server",
        "--mode",
        mode,
        "--duration",
        &secs.to_string(),
    ])
    .arg("--listen")
    .arg(format!("[::]:{port}"))
    .args(extra)
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    let mut proc = pod.spawn(&mut cmd).expect("spawn loadgen server");
    wait_listening(&mut proc);
    proc
}

/// Blocks until something in `pod` listens on TCP `port` (any address, IPv6 socket), without
/// connecting: a probe connection would count as a (failed) test for iperf3.
pub fn wait_tcp_listening(pod: &Pod, port: u16, timeout: Duration) {
    let listening = format!(":{port:04X} 00000000000000000000000000000000:0000 0A");
    let deadline = Instant::now() + timeout;
    while !pod
        .in_netns(|| {
            std::fs::read_to_string("/proc/thread-self/net/tcp6")
                .is_ok_and(|t| t.contains(&listening))
        })
        .unwrap()
    {
        assert!(
            Instant::now() < deadline,
            "nothing listening on port {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Blocks until a load generator server (spawned with piped stdout) says it is listening.
pub fn wait_listening(proc: &mut Proc) {
    let stdout = proc
        .child_mut()
        .stdout
        .take()
        .expect("server stdout is piped");
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    assert!(line.contains("listening"), "server did not start: {line:?}");
}

/// Runs a load generator client in `pod` to completion and returns its JSON report.
pub fn client(pod: &Pod, target: &str, mode: &str, secs: u32, extra: &[&str]) -> Value {
    let mut cmd = pod.command(QUICKLANE);
    cmd.args([
        "loadgen",
        "client",
        "--mode",
        mode,
        "--duration",
        &secs.to_string(),
    ])
    .args(["--connect", target])
    .args(extra);
    let out = cmd.output().expect("run loadgen client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "client failed ({}): {stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or("")).expect("client report is JSON")
}

/// Whether a BPF program with this id is still loaded in the kernel.
fn program_loaded(id: u64) -> bool {
    aya::programs::loaded_programs()
        .flatten()
        .any(|p| u64::from(p.id()) == id)
}

/// Asserts the programs are unloaded, allowing for the kernel freeing them after an RCU
/// grace period rather than at the moment their last link closes.
pub fn assert_unloaded(ids: &[u64]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while ids.iter().any(|&id| program_loaded(id)) {
        assert!(
            Instant::now() < deadline,
            "programs {ids:?} still loaded after stop"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Entries in a pinned hash-like map of the node's agent (QL_META, QL_SOCKS, ...).
pub fn map_len(node: &Node, name: &str) -> usize {
    use aya::maps::{HashMap, Map, MapData, SockHash};
    use quicklane_common::{bypass::SockMeta, senders::PacedSock, sock::SockKey};
    let data = MapData::from_pin(node.pin_dir().join("maps").join(name)).unwrap();
    match name {
        "QL_SOCKS" => SockHash::<MapData, SockKey>::try_from(Map::SockHash(data))
            .unwrap()
            .keys()
            .count(),
        "QL_META" => HashMap::<MapData, SockKey, SockMeta>::try_from(Map::HashMap(data))
            .unwrap()
            .keys()
            .count(),
        "QL_PACED" => HashMap::<MapData, u64, PacedSock>::try_from(Map::LruHashMap(data))
            .unwrap()
            .keys()
            .count(),
        other => panic!("map_len does not know {other}"),
    }
}

/// The capacity a pinned map was created with.
pub fn map_capacity(node: &Node, name: &str) -> u32 {
    aya::maps::MapData::from_pin(node.pin_dir().join("maps").join(name))
        .unwrap()
        .info()
        .unwrap()
        .max_entries()
}

/// Polls `cond` for up to 5 s: the kernel removes closed sockets and frees programs
/// asynchronously.
pub fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "not true after 5 s: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Rewrites the agent's config with `extra` (see `write_config`), sends SIGHUP and waits
/// until the agent reports the new rules generation.
pub fn reload(node: &Node, agent: &Agent, extra: &str) {
    reload_watching(node, agent, extra, "/rules/generation");
}

/// As `reload`, waiting for the generation at JSON `pointer` in the agent's state to move.
pub fn reload_watching(node: &Node, agent: &Agent, extra: &str, pointer: &str) {
    let generation = || {
        read_json(&agent.state)
            .and_then(|s| s.pointer(pointer).and_then(Value::as_u64))
            .unwrap_or(0)
    };
    let before = generation();
    write_config(node, extra);
    agent.hangup();
    eventually("the agent applied the reloaded configuration", || {
        generation() > before
    });
}

/// One line per QoS pod (bytes shaped / bypassed, CE marks, drops, each direction) and the
/// counters that explain a rate: printed by the rate tests, so a failure shows why.
pub fn qos_report(node: &Node) -> String {
    use std::fmt::Write as _;
    let s = status(node);
    let mut out = String::new();
    for p in s["qos"]["pods"].as_array().into_iter().flatten() {
        let dir = |d: &str| {
            let c = &p[d];
            format!(
                "{d} {} B shaped {} B bypassed {} marked {} dropped",
                c["bytes"], c["bypassed"], c["marked"], c["dropped"]
            )
        };
        let _ = writeln!(out, "{}: {}; {}", p["name"], dir("egress"), dir("ingress"));
    }
    for pod in node.pods() {
        let tcp = iperf::tcp_loss_counters(pod);
        if !tcp.is_empty() {
            let _ = writeln!(out, "{} tcp: {tcp}", pod.name());
        }
    }
    for c in s["qos"]["classes"].as_array().into_iter().flatten() {
        let _ = write!(
            out,
            "{} class {} {} {} bit/s; ",
            c["direction"],
            c["class"],
            if c["competing"] == true {
                "competing"
            } else {
                "idle"
            },
            c["used_bps"]
        );
    }
    out.push('\n');
    for (object, names) in [
        (
            "tc",
            &["qos_ce_marked", "qos_dropped", "qos_late_not_ect"][..],
        ),
        (
            "sockops",
            &[
                "conn_paced",
                "pacing_updates",
                "conn_demoted_over_rate",
                "conn_locked_tcp",
            ][..],
        ),
    ] {
        for n in names {
            let _ = write!(out, "{object}.{n} {} ", s["counters"][object][n]);
        }
    }
    out
}
