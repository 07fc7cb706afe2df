//! The kernel matrix: what quicklane detects and does on the kernel it runs on.
//!
//! `cargo xtask test` runs it natively (the host's kernel); `cargo xtask vm-test` runs it inside
//! QEMU guests of Debian's 6.1 and 6.12 kernels and sets two variables there:
//! `QUICKLANE_EXPECT_KERNEL` names the series whose facts are pinned below (so detection is
//! checked against what that kernel really offers, not only against itself), and
//! `QUICKLANE_VM_REPORT` is where each observation is recorded for the README's matrix.
//!
//! A check that fails on a pinned kernel passes only if it is listed in `KNOWN_GAPS` with the
//! symptom it shows; a listed gap that stops failing fails the suite, so the list cannot rot.
mod support;

use std::{
    io::Write as _,
    os::fd::AsRawFd as _,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use quicklane::{
    config::Config,
    datapath::{self, Object},
    features::{Feature, Features, Support},
    paths::PinDir,
};
use serde_json::Value;
use simnode::{Node, Pod, Proc};
use support::{client, counter, server, status, write_config, QUICKLANE};

/// Starting the agent loads and verifies BPF objects: seconds natively, up to 15x that under
/// QEMU's TCG.
const AGENT_TIMEOUT: Duration = Duration::from_secs(180);

const FEATURES: &str = "1. Kernel features (`quicklane features`)";
const HELPERS: &str = "2. Helpers quicklane's programs call (`quicklane features`)";
const PROGRAMS: &str = "3. BPF programs pass the verifier (`quicklane verify`)";
const AGENT: &str = "4. Agent attaches on a simulated node (`quicklane run`)";
const QOS: &str = "5. QoS";
const NETKIT: &str = "6. netkit pod interfaces";

/// What a Debian kernel series lacks, established on the real kernels and pinned.
struct Pinned {
    series: &'static str,
    missing: &'static [Feature],
    /// `(program type, helper)`.
    missing_helpers: &'static [(&'static str, &'static str)],
}

const PINNED: &[Pinned] = &[
    Pinned {
        series: "6.1",
        // sockmap links arrived in 6.10, TCX in 6.6, netkit in 6.7.
        missing: &[Feature::LinkSkMsg, Feature::LinkTcx, Feature::Netkit],
        missing_helpers: &[
            ("sock_ops", "get_current_cgroup_id"),
            ("sock_ops", "get_current_ancestor_cgroup_id"),
        ],
    },
    Pinned {
        series: "6.12",
        missing: &[],
        missing_helpers: &[],
    },
];

/// A check known to fail on a kernel series, recognised by a text its failure contains. One
/// check may have several entries: the first symptom met is the one the matrix explains.
struct KnownGap {
    series: &'static str,
    check: &'static str,
    symptom: &'static str,
    why: &'static str,
}

const KNOWN_GAPS: &[KnownGap] = &[KnownGap {
    series: "6.1",
    check: "qos adoption",
    symptom: "TCP_BPF_SOCK_OPS_CB_FLAGS",
    why:
        "bpf_setsockopt(TCP_BPF_SOCK_OPS_CB_FLAGS) arrived in 6.12: connections that predate \
          their pod's policy are paced from their next connection, held by the tc shaper until then",
}];

fn privileged(test: &str) -> bool {
    simnode::privileged_or_skip(test)
}

fn pinned() -> Option<&'static Pinned> {
    let series = std::env::var("QUICKLANE_EXPECT_KERNEL").ok()?;
    Some(
        PINNED
            .iter()
            .find(|p| p.series == series)
            .unwrap_or_else(|| panic!("QUICKLANE_EXPECT_KERNEL={series}: no facts pinned for it")),
    )
}

fn known_gaps(check: &str) -> impl Iterator<Item = &'static KnownGap> + use<'_> {
    let series = pinned().map(|p| p.series);
    KNOWN_GAPS
        .iter()
        .filter(move |g| Some(g.series) == series && g.check == check)
}

/// Records `item` and passes a check that worked, or that failed with a known gap's symptom;
/// panics otherwise, and also when a check with a known gap works (the entry must go).
fn conclude(section: &str, item: &str, check: &str, result: Result<String, String>) {
    match result {
        Ok(note) => {
            record(section, item, Outcome::Works, Some(&note));
            if let Some(gap) = known_gaps(check).next() {
                panic!(
                    "{check} works on {} although KNOWN_GAPS says it fails ({}); remove the entry",
                    gap.series, gap.why
                );
            }
        }
        Err(failure) => {
            let Some(gap) = known_gaps(check).find(|g| failure.contains(g.symptom)) else {
                record(section, item, Outcome::Fails, Some(&failure));
                panic!("{check} failed: {failure}");
            };
            eprintln!("KNOWN GAP on {}: {check}: {}", gap.series, gap.why);
            let note = format!("{failure} (known gap: {})", gap.why);
            record(section, item, Outcome::Fails, Some(&note));
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Outcome {
    Works,
    Missing,
    Fails,
    NotApplicable,
}

/// Appends one observation to the matrix report, when the VM runner asked for one.
fn record(section: &str, item: &str, outcome: Outcome, note: Option<&str>) {
    let Ok(path) = std::env::var("QUICKLANE_VM_REPORT") else {
        return;
    };
    let result = match outcome {
        Outcome::Works => "works",
        Outcome::Missing => "missing",
        Outcome::Fails => "fails",
        Outcome::NotApplicable => "n/a",
    };
    let line = serde_json::json!({
        "section": section,
        "item": item,
        "result": result,
        "note": note,
    });
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("opening {path}: {e}"));
    writeln!(file, "{line}").unwrap();
}

fn features() -> Features {
    let out = Command::new(QUICKLANE)
        .args(["features", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "quicklane features: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("features --json is a Features")
}

fn support_outcome(support: &Support) -> (Outcome, Option<String>) {
    match support {
        Support::Available => (Outcome::Works, None),
        Support::Missing { .. } => (Outcome::Missing, None),
        Support::ProbeFailed { error } => (Outcome::Fails, Some(format!("probe failed: {error}"))),
    }
}

/// Whether `argv` succeeds in a network namespace of its own: iproute2 as an independent
/// witness for the netlink probes.
fn succeeds_in_throwaway_netns(argv: &[&str]) -> bool {
    Command::new("unshare")
        .arg("--net")
        .args(argv)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run unshare")
        .success()
}

#[test]
fn kernel_features_are_detected_as_the_kernel_offers_them() {
    if !privileged("feature detection") {
        return;
    }
    let features = features();
    for p in &features.features {
        let (outcome, note) = support_outcome(&p.support);
        record(FEATURES, p.feature.describe(), outcome, note.as_deref());
    }
    for h in &features.helpers {
        let (outcome, note) = support_outcome(&h.support);
        let item = format!("`bpf_{}` in {}", h.helper, h.program_type);
        record(HELPERS, &item, outcome, note.as_deref());
    }

    let undecided: Vec<String> = features
        .features
        .iter()
        .filter(|p| matches!(p.support, Support::ProbeFailed { .. }))
        .map(|p| format!("{:?}: {:?}", p.feature, p.support))
        .collect();
    assert!(
        undecided.is_empty(),
        "probes that could not decide: {undecided:?}"
    );

    if let Some(pinned) = pinned() {
        assert!(
            features.kernel.starts_with(&format!("{}.", pinned.series)),
            "QUICKLANE_EXPECT_KERNEL={} but the kernel is {}",
            pinned.series,
            features.kernel
        );
        for feature in Feature::ALL {
            assert_eq!(
                features.available(feature),
                !pinned.missing.contains(&feature),
                "{feature:?} on {}: {:?}",
                features.kernel,
                features.support(feature)
            );
        }
        let missing_helpers: Vec<(&str, &str)> = features
            .helpers
            .iter()
            .filter(|h| !h.support.is_available())
            .map(|h| (h.program_type.as_str(), h.helper.as_str()))
            .collect();
        assert_eq!(
            missing_helpers, pinned.missing_helpers,
            "on {}",
            features.kernel
        );
    }

    assert_eq!(
        features.available(Feature::SchFq),
        succeeds_in_throwaway_netns(&["tc", "qdisc", "add", "dev", "lo", "root", "fq"]),
        "sch_fq detection disagrees with `tc qdisc add ... fq`"
    );
    assert_eq!(
        features.available(Feature::Netkit),
        succeeds_in_throwaway_netns(&["ip", "link", "add", "qlnk0", "type", "netkit"]),
        "netkit detection disagrees with `ip link add ... type netkit`"
    );

    // `quicklane status` carries the same section.
    let none = format!("/run/ql-km-none-{}", std::process::id());
    let out = Command::new(QUICKLANE)
        .args(["status", "--json", "--pin-dir", "/sys/fs/bpf/ql-km-none"])
        .args(["--run-dir", &none])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    let in_status: Features = serde_json::from_value(status["features"].clone())
        .unwrap_or_else(|e| panic!("status has no features section ({e}): {status:#}"));
    assert_eq!(in_status, features);
}

#[test]
fn every_bpf_program_passes_the_verifier() {
    if !privileged("verifier check") {
        return;
    }
    // Program by program, so one refusal does not hide the verdict on the others.
    let each = load_each_program();
    let out = Command::new(QUICKLANE)
        .args(["verify", "--json"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.success(),
        each.iter().all(|(_, r)| r.is_ok()),
        "`quicklane verify` disagrees with loading each program: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (program, result) in each {
        let result = result
            .map(|insns| format!("{insns} insns"))
            .map_err(|log| verifier_reason(&log));
        conclude(PROGRAMS, program, &format!("verify {program}"), result);
    }
}

/// Loads every program of every object as the agent would, nothing attached: the verified
/// instruction count, or the error with the verifier's log.
fn load_each_program() -> Vec<(&'static str, Result<u32, String>)> {
    let scratch = PinDir::new(format!("/sys/fs/bpf/ql-km-verify-{}", std::process::id()));
    std::fs::create_dir_all(scratch.maps()).unwrap();
    let config = Config::default();
    let mut out = Vec::new();
    for object in Object::ALL {
        let mut ebpf = datapath::load(
            object,
            &config,
            &datapath::qos::bpf_config(&config.qos, Some(datapath::qos::Enforcement::Fq)),
            &scratch,
        )
        .unwrap();
        for &name in object.programs() {
            let program = ebpf.program_mut(name).unwrap();
            let result = datapath::load_program(program)
                .map_err(|e| e.to_string())
                .map(|()| {
                    program
                        .info()
                        .ok()
                        .and_then(|i| i.verified_instruction_count())
                        .unwrap_or(0)
                });
            out.push((name, result));
        }
    }
    datapath::remove_pins(&scratch).unwrap();
    out
}

/// The verifier's own words from a refusal: the log line naming what it rejected.
fn verifier_reason(log: &str) -> String {
    const TELLING: &[&str] = &[
        "unknown func",
        "invalid func",
        "cannot use helper",
        "not allowed",
        "invalid",
        "unreachable",
    ];
    log.lines()
        .rev()
        .find(|l| TELLING.iter().any(|t| l.contains(t)))
        .unwrap_or_else(|| log.lines().next().unwrap_or("no message"))
        .trim()
        .to_owned()
}

/// A `quicklane run` on a node, or the reason it refused to start.
struct Running {
    proc: Proc,
}

fn try_start(node: &Node, config: &Path) -> Result<Running, String> {
    let mut cmd = node.command(QUICKLANE);
    cmd.args(["run", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut proc = node.spawn(&mut cmd).expect("spawn quicklane run");
    let state = node.run_dir().join("state.json");
    let deadline = std::time::Instant::now() + AGENT_TIMEOUT;
    loop {
        let pid = std::fs::read(&state)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .and_then(|s| s["pid"].as_u64());
        if pid == Some(u64::from(proc.id())) {
            return Ok(Running { proc });
        }
        if let Ok(Some(_)) = proc.child_mut().try_wait() {
            return Err(stderr_of(&mut proc));
        }
        assert!(
            std::time::Instant::now() < deadline,
            "agent neither ready nor refused after {AGENT_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Running {
    fn stop(mut self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.proc.id().cast_signed()),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let status = self
            .proc
            .wait_timeout(AGENT_TIMEOUT)
            .expect("agent stops after SIGTERM");
        assert!(
            status.success(),
            "agent exit {status}: {}",
            stderr_of(&mut self.proc)
        );
    }
}

fn stderr_of(proc: &mut Proc) -> String {
    proc.child_mut()
        .stderr
        .take()
        .map(|e| std::io::read_to_string(e).unwrap_or_default())
        .unwrap_or_default()
}

/// The agent's refusal in one line: its error, or for a program the verifier refused, the
/// program and the verifier's own words instead of its whole log.
fn refusal(log: &str) -> String {
    let line = log
        .lines()
        .find_map(|l| l.strip_prefix("quicklane: "))
        .unwrap_or_else(|| log.lines().last().unwrap_or("no message"));
    match line
        .split_once("program ")
        .and_then(|(_, rest)| rest.split_once(" failed to load"))
    {
        Some((program, _)) => format!("{program} refused: {}", verifier_reason(log)),
        None => line.to_owned(),
    }
}

/// Pings `to` from `pod`; under TCG the first replies can take seconds.
fn ping(pod: &Pod, to: &str) -> bool {
    pod.command("ping")
        .args(["-c", "3", "-i", "0.2", "-W", "5", to])
        .stdout(Stdio::null())
        .status()
        .unwrap()
        .success()
}

/// Starts the agent with `extra` config and, if it starts, runs `exercise` against it before
/// stopping it. `expected` is what feature detection predicts; a refusal on a kernel without
/// pinned facts is accepted when detection predicted it (a kernel the agent does not support).
fn attach_check(
    node: &Node,
    extra: &str,
    (section, item): (&str, &str),
    check: &str,
    expected: bool,
    exercise: impl FnOnce() -> String,
) {
    let config = write_config(node, extra);
    match try_start(node, &config) {
        Ok(agent) => {
            let observed = exercise();
            agent.stop();
            assert!(
                expected,
                "{check}: the agent attached although detection says it cannot"
            );
            conclude(section, item, check, Ok(observed));
        }
        Err(log) if !expected && pinned().is_none() => {
            record(section, item, Outcome::Fails, Some(&refusal(&log)));
        }
        Err(log) => conclude(section, item, check, Err(refusal(&log))),
    }
}

#[test]
fn agent_attaches_bypass_and_redirects() {
    if !privileged("bypass attach") {
        return;
    }
    let f = features();
    let node = Node::new(2).unwrap();
    // sk_msg falls back to prog_attach where there is no sockmap link; the cgroup link for
    // sock_ops has no fallback.
    let expected = f.available(Feature::LinkCgroupSockOps);
    let how = if f.available(Feature::LinkSkMsg) {
        "sk_msg as sockmap link"
    } else {
        "sk_msg by legacy prog_attach"
    };
    attach_check(
        &node,
        "",
        (AGENT, "bypass: sock_ops (cgroup link) + sk_msg"),
        "attach bypass",
        expected,
        || {
            let (a, b) = (node.pod(0), node.pod(1));
            let _srv = server(b, "stream", 5101, 10, &[]);
            // Several connections: under TCG a client's first write can beat the server's
            // establishment callback, and such a connection rightly stays on TCP for good
            // (later redirected bytes would overtake the first ones).
            let report = client(
                a,
                &format!("{}:5101", b.ipv4()),
                "stream",
                1,
                &["--msg-size", "4096", "--conns", "4"],
            );
            assert_eq!(report["checksum_ok"], true, "{report:#}");
            let after = status(&node);
            assert!(counter(&after, "sockops", "sock_ops_calls") > 0);
            let redirected = counter(&after, "sockops", "msg_redirected");
            assert!(redirected > 0, "no message took the bypass: {after:#}");
            // Small-message streams (with Nagle's algorithm on) move to TCP; their readers
            // follow once their redirect queue is final, which it is not while the writer's
            // socket has a second user.
            let mut readers = Vec::new();
            for extra in [&[][..], &["--reader-thread"]] {
                let before = counter(&status(&node), "sockops", "sockhash_reader_left");
                let mut args = vec!["--msg-size", "64", "--conns", "2", "--no-nodelay"];
                args.extend_from_slice(extra);
                let report = client(a, &format!("{}:5101", b.ipv4()), "stream", 1, &args);
                assert_eq!(report["checksum_ok"], true, "{report:#}");
                readers.push(counter(&status(&node), "sockops", "sockhash_reader_left") - before);
            }
            assert_eq!(readers, [2, 0], "readers that left the sockhash");
            format!(
                "{how}; messages take the bypass; readers leave after their writer (2 of 2), \
                 not beside a second user (0 of 2)"
            )
        },
    );
    node.teardown().unwrap();
}

#[test]
fn agent_attaches_tc_to_pod_veths() {
    if !privileged("tc attach") {
        return;
    }
    let f = features();
    let node = Node::new(1).unwrap();
    let pod = node.pod(0);
    let extra = format!(
        "enabled = false\n[tc]\nenabled = true\ninterfaces = [{:?}]\n",
        pod.host_ifname()
    );
    // Without TCX the agent adds clsact and a cls_bpf filter (legacy attachment).
    let how = if f.available(Feature::LinkTcx) {
        "TCX link"
    } else {
        "legacy clsact + cls_bpf filter"
    };
    attach_check(
        &node,
        &extra,
        (AGENT, "tc on pod veths"),
        "attach tc",
        true,
        || {
            assert!(ping(pod, &pod.gateway_v4().to_string()));
            let after = status(&node);
            for name in ["egress_packets", "ingress_packets"] {
                assert!(counter(&after, "tc", name) > 0, "tc.{name}: {after:#}");
            }
            format!("{how}; counts pod traffic")
        },
    );
    node.teardown().unwrap();
}

#[test]
fn agent_attaches_xdp_to_pod_veths() {
    if !privileged("xdp attach") {
        return;
    }
    let f = features();
    let node = Node::new(1).unwrap();
    let pod = node.pod(0);
    let extra = format!(
        "enabled = false\n[xdp]\nenabled = true\nmode = \"skb\"\ninterfaces = [{:?}]\n",
        pod.host_ifname()
    );
    attach_check(
        &node,
        &extra,
        (AGENT, "XDP on pod veths (XDP link, generic mode)"),
        "attach xdp",
        f.available(Feature::LinkXdp),
        || {
            assert!(ping(pod, &pod.gateway_v4().to_string()));
            let after = status(&node);
            assert!(counter(&after, "xdp", "packets") > 0, "{after:#}");
            "counts pod traffic".to_owned()
        },
    );
    node.teardown().unwrap();
}

#[test]
fn qos_fq_root_qdisc_on_a_pod_interface() {
    if !privileged("fq on a pod interface") {
        return;
    }
    let f = features();
    let node = Node::new(1).unwrap();
    let pod = node.pod(0);
    let created = node
        .command("tc")
        .args(["qdisc", "replace", "dev", pod.host_ifname(), "root", "fq"])
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success();
    assert_eq!(
        created,
        f.available(Feature::SchFq),
        "fq on a veth vs detection"
    );
    let item = "sch_fq as the root qdisc of a pod veth";
    if created {
        assert!(
            ping(pod, &pod.gateway_v4().to_string()),
            "traffic through fq"
        );
        let stats = node
            .command("tc")
            .args(["-s", "qdisc", "show", "dev", pod.host_ifname(), "root"])
            .output()
            .unwrap();
        let stats = String::from_utf8_lossy(&stats.stdout);
        assert!(
            stats.contains("qdisc fq") && !stats.contains("Sent 0 bytes"),
            "fq carried no traffic: {stats}"
        );
        record(QOS, item, Outcome::Works, Some("carries pod traffic"));
    } else {
        record(
            QOS,
            item,
            Outcome::Missing,
            Some("no sch_fq in this kernel"),
        );
    }
    node.teardown().unwrap();
}

/// Sends a burst of `count` UDP datagrams from `from` to `to` as fast as it can and returns
/// how long after the first one the last arrived, and how many arrived.
fn burst_spread(from: &Pod, to: &Pod, port: u16, count: usize) -> (Duration, usize) {
    use std::{net::UdpSocket, sync::mpsc, time::Instant};
    let (ready_tx, ready_rx) = mpsc::channel();
    std::thread::scope(|s| {
        let receiver = s.spawn(move || {
            to.in_netns(|| {
                let sock = UdpSocket::bind((to.ipv4(), port)).unwrap();
                sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                ready_tx.send(()).unwrap();
                let mut buf = [0u8; 2048];
                let mut arrivals = Vec::with_capacity(count);
                while arrivals.len() < count && sock.recv(&mut buf).is_ok() {
                    arrivals.push(Instant::now());
                    // After the first, the rest are due within the horizon.
                    sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
                }
                arrivals
            })
            .unwrap()
        });
        ready_rx.recv().unwrap();
        from.in_netns(|| {
            let sock = UdpSocket::bind((from.ipv4(), 0)).unwrap();
            for _ in 0..count {
                sock.send_to(&[0u8; 1000], (to.ipv4(), port)).unwrap();
            }
        })
        .unwrap();
        let arrivals = receiver.join().unwrap();
        let spread = match (arrivals.first(), arrivals.last()) {
            (Some(a), Some(b)) => *b - *a,
            _ => Duration::ZERO,
        };
        (spread, arrivals.len())
    })
}

/// Received bits per second and TCP retransmits of a 2-second iperf3 run from `from` to an
/// iperf3 server in `server`.
fn iperf3_rate(server: &Pod, from: &Pod, port: u16, extra: &[&str]) -> (f64, u64) {
    let mut cmd = server.command("iperf3");
    cmd.args(["-s", "-1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _srv = server.spawn(&mut cmd).unwrap();
    // Under TCG the server can take seconds to start.
    support::wait_tcp_listening(server, port, Duration::from_secs(30));
    let out = from
        .command("iperf3")
        .args(["-c", &server.ipv4().to_string(), "-p", &port.to_string()])
        .args(["-t", "2", "-J"])
        .args(extra)
        .output()
        .unwrap();
    let json: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let end = &json["end"];
    (
        end["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap_or(0.0),
        end["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
    )
}

/// Never above the limit; under TCG, timers late by milliseconds cost TCP and UDP up to a
/// third of the rate on a busy host, so the floor is wide (unshaped, these flows run at
/// hundreds of Mbit/s in the guest).
fn rate_held(udp: (f64, u64), tcp: (f64, u64)) -> Result<String, String> {
    let ok = |bps: f64| (0.6..=1.15).contains(&(bps / 8e6));
    let text = format!(
        "UDP at 16 Mbit/s into an 8M ingress limit: {:.2} Mbit/s; TCP out of an 8M egress limit: {:.2} Mbit/s, {} retransmits",
        udp.0 / 1e6,
        tcp.0 / 1e6,
        tcp.1
    );
    if ok(udp.0) && ok(tcp.0) {
        Ok(text)
    } else {
        Err(text)
    }
}

fn all_qdiscs(node: &Node, ifname: &str) -> String {
    let out = node
        .command("tc")
        .args(["qdisc", "show", "dev", ifname])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn root_qdisc(node: &Node, ifname: &str) -> String {
    let out = node
        .command("tc")
        .args(["qdisc", "show", "dev", ifname, "root"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// 30 datagrams of 1042 wire bytes at 8 Mbit/s take 31 ms, inside the 50 ms horizon.
const BURST: usize = 30;
const BURST_DUE: Duration = Duration::from_micros(30 * 1042);

/// `[[qos.pods]]` for `pod` (its IPv4 address) with `annotations` (TOML key = value pairs).
fn pod_entry(pod: &Pod, annotations: &str) -> String {
    format!(
        "[[qos.pods]]\nname = {:?}\ninterface = {:?}\naddresses = [\"{}\"]\nannotations = {{ {annotations} }}\n",
        pod.name(),
        pod.host_ifname(),
        pod.ipv4()
    )
}

/// Pods a (egress 8M), b (ingress 8M), c (no policy) and a two-queue veth `qlmq0`, which gets
/// mq with one fq per queue.
fn fq_mode_config(node: &Node, fq: bool) -> std::path::PathBuf {
    let made = node
        .command("ip")
        .args(["link", "add", "qlmq0", "numtxqueues", "2", "type", "veth"])
        .args(["peer", "name", "qlmq1", "numtxqueues", "2"])
        .status()
        .unwrap()
        .success();
    assert!(made, "creating a two-queue veth");
    write_config(
        node,
        &format!(
            // No catch-up credit: the bursts below start from idle and are timed against
            // size / rate, while a credit lets an idle pod's first 10 ms leave at once.
            "enabled = false\n[qos]\nenabled = true\ncapacity = \"10G\"\ncredit_us = 0\nmode = \"{}\"\n{}{}{}{}",
            if fq { "fq" } else { "policer" },
            pod_entry(node.pod(0), "\"kubernetes.io/egress-bandwidth\" = \"8M\""),
            pod_entry(node.pod(1), "\"kubernetes.io/ingress-bandwidth\" = \"8M\""),
            pod_entry(node.pod(2), ""),
            "[[qos.pods]]\nname = \"mq\"\ninterface = \"qlmq0\"\n"
        ),
    )
}

/// What one run in fq (or policer) mode observed.
struct FqRun {
    installed: String,
    installed_mq: String,
    removed: String,
    removed_mq: String,
    into_b: (Duration, usize),
    out_of_a: (Duration, usize),
    udp_into_b: (f64, u64),
    tcp_out_of_a: (f64, u64),
    status: Value,
}

fn spread(what: &str, (took, arrived): (Duration, usize)) -> Result<String, String> {
    if arrived != BURST {
        Err(format!("{what}: {arrived} of {BURST} datagrams arrived"))
    } else if took < BURST_DUE * 6 / 10 {
        Err(format!(
            "{what}: the burst arrived within {} ms; at 8 Mbit/s it takes {} ms",
            took.as_millis(),
            BURST_DUE.as_millis()
        ))
    } else {
        Ok(format!(
            "a {BURST}-datagram burst arrives over {} ms (due: {} ms)",
            took.as_millis(),
            BURST_DUE.as_millis()
        ))
    }
}

const EDT_INGRESS: &str = "EDT: a pod's ingress limit, departure times held by fq on its veth";
const EDT_EGRESS: &str =
    "EDT: a pod's egress limit, departure times kept through forwarding to the next fq";
const EDT_RATE: &str =
    "EDT + fq: rate held (8 Mbit/s limits, 2 s iperf3; 60-115 % under emulation)";

/// The QoS shaper's departure times: with sch_fq the agent installs fq on the pod veths and a
/// burst into or out of a rate-limited pod arrives spread out at the limit; without it the
/// policer lets a burst within the horizon through at once. Both directions: pod `b`'s ingress
/// limit (departure time written at its veth's egress, where fq sits) and pod `a`'s egress
/// limit (written at a's veth's ingress, honoured by the fq of the veth it is forwarded to).
#[test]
fn qos_departure_times_are_honoured_by_fq() {
    if !privileged("qos fq mode") {
        return;
    }
    let fq = features().available(Feature::SchFq);
    let node = Node::new(3).unwrap();
    let (a, b, c) = (node.pod(0), node.pod(1), node.pod(2));
    let config = fq_mode_config(&node, fq);
    let agent = match try_start(&node, &config) {
        Ok(agent) => agent,
        Err(log) => {
            conclude(QOS, EDT_INGRESS, "qos fq mode", Err(refusal(&log)));
            return;
        }
    };
    let installed = root_qdisc(&node, b.host_ifname());
    let installed_mq = all_qdiscs(&node, "qlmq0");
    let into_b = burst_spread(c, b, 7001, BURST);
    let out_of_a = burst_spread(a, c, 7002, BURST);
    // Rate held over seconds: UDP at twice b's ingress limit, TCP out of a.
    let udp_into_b = iperf3_rate(b, c, 7003, &["-u", "-b", "16M", "-l", "1000"]);
    let tcp_out_of_a = iperf3_rate(c, a, 7004, &[]);
    let status = status(&node);
    agent.stop();
    let run = FqRun {
        installed,
        installed_mq,
        removed: root_qdisc(&node, b.host_ifname()),
        removed_mq: all_qdiscs(&node, "qlmq0"),
        into_b,
        out_of_a,
        udp_into_b,
        tcp_out_of_a,
        status,
    };
    if fq {
        check_fq_mode(&run);
    } else {
        check_policer_mode(&run);
    }
    node.teardown().unwrap();
}

fn check_fq_mode(run: &FqRun) {
    // veths have a queue per possible CPU: mq with fq leaves on multi-CPU guests.
    assert!(
        run.installed.contains("qdisc fq 716c:") || run.installed.contains("qdisc mq 716c:"),
        "no quicklane fq on the pod veth: {}",
        run.installed
    );
    assert!(
        !run.removed.contains("716c:"),
        "fq left after stop: {}",
        run.removed
    );
    let mq = &run.installed_mq;
    assert!(
        mq.contains("qdisc mq 716c: root")
            && mq.contains("qdisc fq 716d: parent 716c:1")
            && mq.contains("qdisc fq 716e: parent 716c:2"),
        "mq with one fq per queue on a two-queue device: {mq}"
    );
    assert!(
        !run.removed_mq.contains("716"),
        "mq left after stop: {}",
        run.removed_mq
    );
    conclude(
        QOS,
        EDT_INGRESS,
        "qos fq ingress",
        spread("ingress", run.into_b),
    );
    conclude(
        QOS,
        EDT_EGRESS,
        "qos fq egress",
        spread("egress", run.out_of_a),
    );
    conclude(
        QOS,
        EDT_RATE,
        "qos fq rate",
        rate_held(run.udp_into_b, run.tcp_out_of_a),
    );
}

/// Policer: a burst inside the horizon passes at once, CE-marked where ECN-capable (these
/// datagrams are not) and counted late; the rate still holds.
fn check_policer_mode(run: &FqRun) {
    for (what, (took, arrived)) in [("ingress", run.into_b), ("egress", run.out_of_a)] {
        assert_eq!(arrived, BURST, "{what}: a burst within the horizon passes");
        assert!(
            took < BURST_DUE,
            "{what}: the policer spread the burst over {took:?}"
        );
    }
    assert!(
        counter(&run.status, "tc", "qos_late_not_ect") > 0,
        "{:#}",
        run.status
    );
    rate_held(run.udp_into_b, run.tcp_out_of_a).expect("the policer holds the rate");
    for item in [EDT_INGRESS, EDT_EGRESS, EDT_RATE] {
        record(
            QOS,
            item,
            Outcome::Missing,
            Some("no sch_fq: the ECN-first policer enforces the departure times"),
        );
    }
}

const ADOPT: &str =
    "A TCP connection established before its pod's limit is paced once the limit appears (`ql_adopt` iterator)";

/// A connection of pod a that predates a's limit: when the limit appears, the agent's
/// adoption pass turns its sock_ops callbacks on and pacing updates follow.
#[test]
fn qos_adopts_connections_established_before_the_policy() {
    if !privileged("qos adoption") {
        return;
    }
    let node = Node::new(2).unwrap();
    let (a, b) = (node.pod(0), node.pod(1));
    let config = |annotations: &str| {
        write_config(
            &node,
            &format!(
                "enabled = false\n[qos]\nenabled = true\ncapacity = \"10G\"\nmode = \"policer\"\n{}{}",
                pod_entry(a, annotations),
                pod_entry(b, "")
            ),
        )
    };
    let path = config("");
    let agent = match try_start(&node, &path) {
        Ok(agent) => agent,
        Err(log) => {
            conclude(QOS, ADOPT, "qos adoption", Err(refusal(&log)));
            return;
        }
    };
    let mut server = b.command("iperf3");
    server
        .args(["-s", "-1", "-p", "7011"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _srv = b.spawn(&mut server).unwrap();
    support::wait_tcp_listening(b, 7011, Duration::from_secs(30));
    let mut client = a.command("iperf3");
    client
        .args([
            "-c",
            &b.ipv4().to_string(),
            "-p",
            "7011",
            "-t",
            "12",
            "-b",
            "4M",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut client = a.spawn(&mut client).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    config("\"kubernetes.io/egress-bandwidth\" = \"8M\"");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.proc.id().cast_signed()),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    let adoption = |s: &Value, key: &str| s["qos"]["adoption"][key].as_u64().unwrap_or(0);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut s = status(&node);
    while adoption(&s, "passes") < 1 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        s = status(&node);
    }
    // Pacing updates come with the connection's next ACKs.
    std::thread::sleep(Duration::from_secs(2));
    let updates = counter(&status(&node), "sockops", "pacing_updates");
    let _ = client.wait_timeout(Duration::from_secs(60));
    agent.stop();
    let (adopted, refused) = (adoption(&s, "adopted"), adoption(&s, "refused"));
    let text = format!(
        "{adopted} adopted, {refused} refused, {updates} pacing updates{}",
        s["qos"]["adoption"]["refusal"]
            .as_str()
            .map(|r| format!(": {r}"))
            .unwrap_or_default()
    );
    let result = if adopted >= 1 && refused == 0 && updates > 0 {
        Ok(text)
    } else {
        Err(text)
    };
    conclude(QOS, ADOPT, "qos adoption", result);
    node.teardown().unwrap();
}

const API_POD: &str =
    "Pods from the Kubernetes API: the shaper (and fq) follow a pod's add and delete";

/// The pod source's moving parts on this kernel: a pod that appears through the (fake) API
/// server gets the tc programs (TCX or legacy cls_bpf), fq where the kernel has it, and its
/// limit; deleting it takes all three away again, live.
#[test]
fn api_pods_get_the_shaper_when_they_appear_and_lose_it_when_deleted() {
    if !privileged("kubernetes pod source") {
        return;
    }
    let fq = features().available(Feature::SchFq);
    let node = Node::new(2).unwrap();
    let (a, b) = (node.pod(0), node.pod(1));
    let listener = node
        .in_netns(|| std::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap()
        .unwrap();
    let api = support::apiserver::ApiServer::serve(listener);
    let config = write_config(
        &node,
        &format!(
            "enabled = false\n[qos]\nenabled = true\ncapacity = \"10G\"\n\
             [kubernetes]\nenabled = true\nnode_name = \"n1\"\napi_server = \"{}\"\n",
            api.url()
        ),
    );
    let agent = match try_start(&node, &config) {
        Ok(agent) => agent,
        Err(log) => {
            conclude(QOS, API_POD, "kubernetes pod source", Err(refusal(&log)));
            return;
        }
    };
    let ifname = a.host_ifname();
    let before = (root_qdisc(&node, ifname), support::tc_pins(&node, ifname));
    let (v4, v6) = (a.ipv4().to_string(), a.ipv6().to_string());
    api.put_pod(support::apiserver::pod(
        "shop",
        "web",
        "n1",
        &[&v4, &v6],
        &[("kubernetes.io/ingress-bandwidth", "8M")],
    ));
    let shaped = wait_for(|| !status_pods(&node).is_empty());
    let added = (root_qdisc(&node, ifname), support::tc_pins(&node, ifname));
    let udp = iperf3_rate(a, b, 7101, &["-u", "-b", "16M", "-l", "1000"]);
    api.delete_pod("shop", "web");
    let unshaped = wait_for(|| status_pods(&node).is_empty());
    let deleted = (root_qdisc(&node, ifname), support::tc_pins(&node, ifname));
    agent.stop();
    node.teardown().unwrap();
    let ours = |q: &str| q.contains("716c:");
    let problems: Vec<String> = [
        (!shaped).then(|| "the pod was not shaped within 60 s".to_owned()),
        (before.1 != 0 || ours(&before.0)).then(|| format!("shaper before the pod: {before:?}")),
        (added.1 != 2).then(|| format!("{} tc attachments once the pod appeared", added.1)),
        (fq != ours(&added.0)).then(|| format!("fq expected {fq}, root qdisc: {}", added.0)),
        (!(0.6..=1.15).contains(&(udp.0 / 8e6)))
            .then(|| format!("UDP at 16M into an 8M limit: {:.2} Mbit/s", udp.0 / 1e6)),
        (!unshaped).then(|| "the pod was still shaped 60 s after its deletion".to_owned()),
        (deleted.1 != 0 || ours(&deleted.0))
            .then(|| format!("shaper left after the pod was deleted: {deleted:?}")),
    ]
    .into_iter()
    .flatten()
    .collect();
    let result = if problems.is_empty() {
        Ok(format!(
            "added: {} tc attachments{}, UDP at 16M into an 8M limit: {:.2} Mbit/s; deleted: none left",
            added.1,
            if fq { " + fq" } else { "" },
            udp.0 / 1e6
        ))
    } else {
        Err(problems.join("; "))
    };
    conclude(QOS, API_POD, "kubernetes pod source", result);
}

fn status_pods(node: &Node) -> Vec<Value> {
    status(node)["qos"]["policy"]["pods"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Polls `cond` for up to 60 s (emulated guests are slow); whether it came true.
fn wait_for(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

#[test]
fn netkit_pod_interface_with_the_agent_attached() {
    if !privileged("netkit pod interface") {
        return;
    }
    let f = features();
    let pair = "netkit pair as a pod interface (L3 mode)";
    let agent_item = "agent tc programs (TCX) on the netkit primary";
    if !f.available(Feature::Netkit) {
        record(
            NETKIT,
            pair,
            Outcome::Missing,
            Some("no netkit in this kernel"),
        );
        record(NETKIT, agent_item, Outcome::NotApplicable, None);
        return;
    }
    let node = Node::new(1).unwrap();
    let pod = node.pod(0);
    add_netkit_pair(&node, pod, "qlnk0", "nk0");
    for (mut ip, args) in [
        (node.command("ip"), "addr add 10.78.0.1/24 dev qlnk0"),
        (pod.command("ip"), "addr add 10.78.0.2/24 dev nk0"),
        (node.command("ip"), "link set dev qlnk0 up"),
        (pod.command("ip"), "link set dev nk0 up"),
    ] {
        let ok = ip.args(args.split(' ')).status().unwrap().success();
        assert!(ok, "ip {args}");
    }
    assert!(ping(pod, "10.78.0.1"), "no traffic over the netkit pair");
    record(
        NETKIT,
        pair,
        Outcome::Works,
        Some("pod reaches the node through it"),
    );

    attach_check(
        &node,
        "enabled = false\n[tc]\nenabled = true\ninterfaces = [\"qlnk0\"]\n",
        (NETKIT, agent_item),
        "attach tc to netkit",
        f.available(Feature::LinkTcx),
        || {
            assert!(ping(pod, "10.78.0.1"));
            let after = status(&node);
            for name in ["egress_packets", "ingress_packets"] {
                assert!(counter(&after, "tc", name) > 0, "tc.{name}: {after:#}");
            }
            "counts pod traffic".to_owned()
        },
    );
    node.teardown().unwrap();
}

/// A netkit pair with `primary` in the node's namespace and `peer` in the pod's, made through
/// rtnetlink (bookworm's iproute2 cannot name the peer).
fn add_netkit_pair(node: &Node, pod: &Pod, primary: &str, peer: &str) {
    use rtnetlink::{
        packet_route::link::{InfoData, InfoKind, InfoNetkit, NetkitMode},
        LinkMessageBuilder, LinkNetkit, LinkUnspec,
    };
    let pod_ns = std::fs::File::open(pod.netns_path()).unwrap();
    node.in_netns(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (connection, handle, _) = rtnetlink::new_connection().unwrap();
            tokio::spawn(connection);
            let peer_end = LinkMessageBuilder::<LinkUnspec>::new()
                .name(peer.to_owned())
                .setns_by_fd(pod_ns.as_raw_fd())
                .build();
            let pair = LinkMessageBuilder::<LinkNetkit>::new_with_info_kind(InfoKind::Netkit)
                .name(primary.to_owned())
                .set_info_data(InfoData::Netkit(vec![
                    InfoNetkit::Mode(NetkitMode::L3),
                    InfoNetkit::Peer(peer_end),
                ]))
                .build();
            handle
                .link()
                .add(pair)
                .execute()
                .await
                .unwrap_or_else(|e| panic!("creating netkit {primary}/{peer}: {e}"));
        });
    })
    .unwrap();
}
