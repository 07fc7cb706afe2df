//! iperf3 between pods, measured at the receiver, for the QoS tests.
use std::{process::Stdio, time::Duration};

use serde_json::Value;
use simnode::{Pod, Proc};

pub const MBIT: f64 = 1e6;

/// Rate tests run on a 2-CPU machine: one at a time within a test binary, or they measure
/// each other.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    // A failed test poisons the lock; the next one still runs alone.
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// An iperf3 server in `pod`, killed when the guard drops.
///
/// Its sockets start with a 4 MiB receive buffer. With the default 128 KiB, a receiver
/// descheduled for a few ms while it holds the socket lock (2 vCPUs shared by every sender,
/// receiver and softirq of a test) overflows its backlog with a few 64 KiB GRO packets and
/// drops one (`TCPBacklogDrop` in the receiver's netns, `TCPSackRecovery` at the sender):
/// retransmits that say nothing about the shaper, whose tests assert there are none.
pub fn iperf_server(pod: &Pod, port: u16) -> Proc {
    let rmem = pod
        .command("sysctl")
        .args(["-qw", "net.ipv4.tcp_rmem=4096 4194304 16777216"])
        .status()
        .unwrap();
    assert!(rmem.success(), "set tcp_rmem in {}", pod.name());
    let mut cmd = pod.command("iperf3");
    // -J: the client's --get-server-output then carries the server's JSON, whose
    // intervals are what actually arrived.
    cmd.args(["-s", "-J", "-i", "0.5", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let proc = pod.spawn(&mut cmd).expect("spawn iperf3 server");
    super::wait_tcp_listening(pod, port, Duration::from_secs(5));
    proc
}

/// What one iperf3 client run measured at the receiver.
#[derive(Debug)]
pub struct Measured {
    pub bits_per_sec: f64,
    pub retransmits: u64,
    pub bytes: u64,
    /// Receiver rates per half second (the servers report at `-i 0.5`), for preemption and
    /// stability checks.
    pub intervals: Vec<f64>,
    /// The sender's retransmits and bytes sent, per second.
    pub sent: Vec<(u64, u64)>,
}

/// Runs an iperf3 client in `from` against `to`'s server; `extra` adds e.g. `-C bbr` or
/// `-u -b 400M`.
pub fn iperf(from: &Pod, to: &Pod, port: u16, secs: u32, extra: &[&str]) -> Measured {
    measured(
        &iperf_spawn(from, to, port, secs, extra)
            .wait_with_output()
            .unwrap(),
    )
}

pub fn iperf_spawn(
    from: &Pod,
    to: &Pod,
    port: u16,
    secs: u32,
    extra: &[&str],
) -> std::process::Child {
    iperf_spawn_to(from, to.ipv4().into(), port, secs, extra)
}

/// `iperf_spawn` to one of the server pod's addresses.
pub fn iperf_spawn_to(
    from: &Pod,
    to: std::net::IpAddr,
    port: u16,
    secs: u32,
    extra: &[&str],
) -> std::process::Child {
    from.command("iperf3")
        .args(["-c", &to.to_string(), "-p", &port.to_string()])
        .args(["-t", &secs.to_string(), "-J", "--get-server-output"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run iperf3")
}

pub fn measured(out: &std::process::Output) -> Measured {
    let json: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "iperf3 output is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    assert!(json.get("error").is_none(), "iperf3: {}", json["error"]);
    let end = &json["end"];
    // The server's own view: what arrived, interval by interval.
    let server = &json["server_output_json"];
    let intervals: Vec<f64> = server["intervals"]
        .as_array()
        .map(|a| {
            a.iter()
                // The last interval can be a sliver whose rate means nothing.
                .filter(|i| i["sum"]["seconds"].as_f64().unwrap_or(0.0) > 0.4)
                .filter_map(|i| i["sum"]["bits_per_second"].as_f64())
                .collect()
        })
        .unwrap_or_default();
    let sent = json["intervals"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|i| {
                    let sum = &i["sum"];
                    (
                        sum["retransmits"].as_u64().unwrap_or(0),
                        sum["bytes"].as_u64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let received = &end["sum_received"];
    Measured {
        sent,
        bits_per_sec: received["bits_per_second"].as_f64().unwrap(),
        retransmits: end["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
        bytes: received["bytes"].as_u64().unwrap(),
        intervals,
    }
}

/// The rate on the wire of `payload` bits per second sent as `datagram`-byte UDP datagrams
/// over IPv4: a limit counts each packet as the shaper sees it, Ethernet (14), IPv4 (20) and
/// UDP (8) headers included, while iperf3 reports payload (1400-byte datagrams: 0.971x).
pub fn udp4_wire(payload: f64, datagram: u32) -> f64 {
    payload * f64::from(datagram + 42) / f64::from(datagram)
}

/// UDP datagrams the kernel dropped in `pod` for want of room in a receiving socket's buffer
/// (`RcvbufErrors` in /proc/net/snmp, which shows the reader's network namespace).
pub fn udp_rcvbuf_errors(pod: &Pod) -> u64 {
    snmp_counters(pod, "/proc/net/snmp", "Udp:")
        .into_iter()
        .find_map(|(name, value)| (name == "RcvbufErrors").then_some(value))
        .unwrap()
}

/// The pod's TCP loss counters that are not zero (`/proc/net/netstat`): on a sender, whether
/// retransmits came from losses (fast retransmits after SACKs), timeouts or tail-loss probes;
/// on a receiver, the segments its own stack dropped.
pub fn tcp_loss_counters(pod: &Pod) -> String {
    const NAMES: [&str; 14] = [
        "TCPLossProbes",
        "TCPTimeouts",
        "TCPSpuriousRTOs",
        "TCPFastRetrans",
        "TCPSlowStartRetrans",
        "TCPLostRetransmit",
        "TCPSackRecovery",
        "TCPDSACKRecv",
        "TCPBacklogDrop",
        "TCPRcvQDrop",
        "TCPOFODrop",
        "TCPZeroWindowDrop",
        "PruneCalled",
        "RcvPruned",
    ];
    snmp_counters(pod, "/proc/net/netstat", "TcpExt:")
        .into_iter()
        .filter(|(name, value)| *value != 0 && NAMES.contains(&name.as_str()))
        .map(|(name, value)| format!("{name} {value}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// One section of a `/proc/net/snmp`-style file as seen in the pod's netns: a header row of
/// names and a row of values, both starting with `prefix`.
fn snmp_counters(pod: &Pod, file: &str, prefix: &str) -> Vec<(String, u64)> {
    let out = pod.command("cat").arg(file).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut rows = text.lines().filter(|l| l.starts_with(prefix));
    let (names, values) = (rows.next().unwrap(), rows.next().unwrap());
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .skip(1)
        .map(|(n, v)| (n.to_owned(), v.parse().unwrap()))
        .collect()
}

/// What reached the receiver of a UDP run, on the wire: what iperf3 read plus the
/// `overflowed` datagrams its socket had no room for. Those were delivered by the shaper and
/// lost to the test's own CPU contention (a receiver descheduled for 5 ms overflows the
/// default buffer at 200 Mbit/s), so they count towards the rate the shaper let through.
pub fn udp_arrived_wire(m: &Measured, overflowed: u64, datagram: u32) -> f64 {
    let secs = m.bytes as f64 * 8.0 / m.bits_per_sec;
    let payload = (m.bytes + overflowed * u64::from(datagram)) as f64 * 8.0 / secs;
    udp4_wire(payload, datagram)
}

pub fn assert_within(what: &str, measured: f64, target: f64, tolerance: f64) {
    let ratio = measured / target;
    assert!(
        (1.0 - tolerance..=1.0 + tolerance).contains(&ratio),
        "{what}: {:.1} Mbit/s is {:.3}x the target {:.1} Mbit/s (allowed +-{:.0} %)",
        measured / MBIT,
        ratio,
        target / MBIT,
        tolerance * 100.0
    );
}
