//! The same-node bypass against real traffic on a simulated node: data integrity, address
//! families and server bind styles, eligibility rules (also changed live), map capacity and
//! hygiene, and per-pod accounting. Every test checks bytes end to end and the map counters.
mod support;

use std::time::Duration;

use serde_json::Value;
use simnode::Node;
use support::{
    client, counter, eventually, map_len, reload, server, status, wait_listening, write_config,
    Agent,
};

fn privileged(test: &str) -> bool {
    simnode::privileged_or_skip(test)
}

fn redirected_bytes(node: &Node) -> u64 {
    counter(&status(node), "sockops", "bytes_redirected")
}

fn assert_stream_ok(report: &Value) -> u64 {
    assert_eq!(report["checksum_ok"], true, "{report:#}");
    report["bytes"].as_u64().unwrap()
}

fn assert_rr_ok(report: &Value) {
    assert_eq!(report["mismatches"], 0, "{report:#}");
    assert!(report["transactions"].as_u64().unwrap() > 0, "{report:#}");
}

/// A node with the agent running on it, bypass for the whole node plus `extra` config.
fn node_with_agent(pods: usize, extra: &str) -> (Node, Agent) {
    let node = Node::new(pods).unwrap();
    let config = write_config(&node, extra);
    let agent = Agent::start(&node, &config, false);
    (node, agent)
}

/// Config that keeps unanswered streams of every size on the redirect.
const STREAMS_STAY: &str =
    "small_msg_bytes = 0\nlarge_msg_bytes = 0\nloopback_streams_tcp = false\n";

fn finish(node: Node, agent: Agent) {
    let (exit, log) = agent.stop();
    assert!(exit.success(), "agent: {log}");
    node.teardown().unwrap();
}

#[test]
fn random_sizes_over_many_connections_arrive_byte_exact_both_ways() {
    if !privileged("bypass integrity") {
        return;
    }
    // Streams stay on the redirect here, so every byte of every size crosses it.
    let (node, agent) = node_with_agent(2, STREAMS_STAY);
    let (a, b) = (node.pod(0), node.pod(1));
    let _stream = server(b, "stream", 6001, 30, &[]);
    let before = redirected_bytes(&node);
    let target = format!("{}:6001", b.ipv4());
    let report = client(
        a,
        &target,
        "stream",
        2,
        &["--conns", "8", "--random-sizes", "1:1048576"],
    );
    let sent = assert_stream_ok(&report);
    assert!(
        redirected_bytes(&node) - before >= sent,
        "every stream byte must have been bypassed"
    );
    // Echo: responses are compared byte for byte with the request, so both directions count.
    for size in ["1", "1000", "65536", "1048576"] {
        let port = 6100 + size.len() as u16;
        let _echo = server(b, "rr", port, 30, &["--msg-size", size]);
        let report = client(
            a,
            &format!("{}:{port}", b.ipv4()),
            "rr",
            1,
            &["--msg-size", size, "--conns", "4"],
        );
        assert_rr_ok(&report);
    }
    let s = status(&node);
    assert_eq!(
        counter(&s, "sockops", "conn_locked_tcp"),
        0,
        "no connection fell back: {s:#}"
    );
    finish(node, agent);
}

#[test]
fn every_address_family_and_bind_style_is_bypassed() {
    if !privileged("bypass families") {
        return;
    }
    let (node, agent) = node_with_agent(2, "");
    let (a, b) = (node.pod(0), node.pod(1));
    let cases = [
        // (listen, connect): v4 to [::] is the v4-mapped case of servers such as iperf3.
        ("[::]:6201".to_owned(), format!("{}:6201", b.ipv4())),
        ("[::]:6202".to_owned(), format!("[{}]:6202", b.ipv6())),
        ("0.0.0.0:6203".to_owned(), format!("{}:6203", b.ipv4())),
        (format!("{}:6204", b.ipv4()), format!("{}:6204", b.ipv4())),
        (
            format!("[{}]:6205", b.ipv6()),
            format!("[{}]:6205", b.ipv6()),
        ),
    ];
    for (listen, target) in cases {
        let mut cmd = b.command(support::QUICKLANE);
        cmd.args([
            "loadgen",
            "server",
            "--mode",
            "stream",
            "--duration",
            "20",
            "--listen",
            &listen,
        ])
        .stdout(std::process::Stdio::piped());
        let mut srv = b.spawn(&mut cmd).unwrap();
        wait_listening(&mut srv);
        let before = redirected_bytes(&node);
        let sent = assert_stream_ok(&client(a, &target, "stream", 1, &["--msg-size", "4096"]));
        assert!(
            redirected_bytes(&node) - before >= sent,
            "{listen} <- {target} not bypassed"
        );
    }
    finish(node, agent);
}

#[test]
fn loopback_inside_one_pod_is_bypassed() {
    if !privileged("bypass loopback") {
        return;
    }
    let (node, agent) = node_with_agent(1, "");
    let a = node.pod(0);
    let _echo = server(a, "rr", 6301, 20, &["--msg-size", "65536"]);
    let _sink = server(a, "stream", 6302, 20, &[]);
    for host in ["127.0.0.1", "[::1]"] {
        // Request/response stays on the redirect, both directions of every transaction.
        let before = status(&node);
        let rr = client(
            a,
            &format!("{host}:6301"),
            "rr",
            1,
            &["--msg-size", "65536"],
        );
        assert_rr_ok(&rr);
        let after = status(&node);
        let delta =
            |name: &str| counter(&after, "sockops", name) - counter(&before, "sockops", name);
        assert!(
            delta("msg_redirected") >= 2 * rr["transactions"].as_u64().unwrap(),
            "{host}: {after:#}"
        );
        assert_eq!(delta("conn_locked_tcp"), 0, "{host}: {after:#}");

        // A stream over loopback from a writer with Nagle's algorithm on moves to TCP after
        // its streak, byte-exact, and its writer leaves the sockhash.
        let before = status(&node);
        let sent = assert_stream_ok(&client(
            a,
            &format!("{host}:6302"),
            "stream",
            1,
            &["--msg-size", "16384", "--no-nodelay"],
        ));
        let after = status(&node);
        let delta =
            |name: &str| counter(&after, "sockops", name) - counter(&before, "sockops", name);
        assert_eq!(
            delta("conn_demoted_loopback_stream"),
            1,
            "{host}: {after:#}"
        );
        let redirected = delta("bytes_redirected");
        assert!(
            redirected > 0 && redirected <= 32 * 16384 + 64,
            "{host}: only the streak went by redirect ({redirected} of {sent} bytes)"
        );
        eventually("the loopback writer left the sockhash", || {
            counter(&status(&node), "sockops", "sockhash_left")
                > counter(&before, "sockops", "sockhash_left")
        });

        // A TCP_NODELAY writer's TCP over `lo` sends one segment per write, which the
        // redirect beats below the large bound: its stream stays, every message redirected.
        let before = status(&node);
        let report = client(
            a,
            &format!("{host}:6302"),
            "stream",
            1,
            &["--msg-size", "1024"],
        );
        assert_stream_ok(&report);
        let after = status(&node);
        let delta =
            |name: &str| counter(&after, "sockops", name) - counter(&before, "sockops", name);
        assert_eq!(delta("conn_locked_tcp"), 0, "{host}: {after:#}");
        assert!(
            delta("msg_redirected") >= report["msgs"].as_u64().unwrap(),
            "{host}: every message of the TCP_NODELAY stream was redirected: {report:#}"
        );
    }
    finish(node, agent);
}

#[test]
fn large_message_streams_move_to_tcp_mid_stream_byte_exact() {
    if !privileged("bypass large messages") {
        return;
    }
    let (node, agent) = node_with_agent(2, "");
    let (a, b) = (node.pod(0), node.pod(1));
    let _sink = server(b, "stream", 6351, 30, &[]);
    let _echo = server(b, "rr", 6352, 30, &["--msg-size", "65536"]);
    let target = format!("{}:6351", b.ipv4());

    // Random sizes from 1 B to 1 MiB: each stream switches path mid-way, in both directions
    // of whatever the kernel splits, and still arrives byte-exact.
    let before = status(&node);
    let report = client(
        a,
        &target,
        "stream",
        2,
        &["--conns", "8", "--random-sizes", "1:1048576"],
    );
    let sent = assert_stream_ok(&report);
    let after = status(&node);
    let delta = |name: &str| counter(&after, "sockops", name) - counter(&before, "sockops", name);
    assert_eq!(
        delta("conn_demoted_large_msgs") + delta("conn_demoted_small_msgs"),
        8,
        "{after:#}"
    );
    assert!(delta("conn_demoted_large_msgs") >= 1, "{after:#}");
    let redirected = delta("bytes_redirected");
    assert!(
        redirected > 0 && redirected < sent,
        "the first messages went by redirect, the rest by TCP ({redirected} of {sent} bytes)"
    );
    // Each server end read its redirect queue empty and left the sockhash mid-stream, with
    // the stream's TCP bytes still to come: all of them arrived (checked above).
    assert_eq!(delta("sockhash_reader_left"), 8, "{after:#}");

    // Between the bounds a stream with Nagle's algorithm on stays on the redirect...
    let before = redirected_bytes(&node);
    let sent = assert_stream_ok(&client(
        a,
        &target,
        "stream",
        1,
        &["--msg-size", "16384", "--no-nodelay"],
    ));
    assert!(
        redirected_bytes(&node) - before >= sent,
        "a 16 KiB stream with Nagle's algorithm left the redirect"
    );
    // ... while one with TCP_NODELAY, whose TCP keeps up from 8 KiB on
    // (large_msg_bytes_nodelay), moves to TCP after its first window, byte-exact.
    let before = status(&node);
    let sent = assert_stream_ok(&client(a, &target, "stream", 1, &["--msg-size", "16384"]));
    let after = status(&node);
    let delta = |name: &str| counter(&after, "sockops", name) - counter(&before, "sockops", name);
    assert_eq!(delta("conn_demoted_large_msgs"), 1, "{after:#}");
    let redirected = delta("bytes_redirected");
    assert!(
        redirected > 0 && redirected <= 32 * 16384 && redirected < sent,
        "only the first window went by redirect ({redirected} of {sent} bytes)"
    );

    // Large request/response is answered every time: it stays.
    let before = status(&node);
    let rr = client(
        a,
        &format!("{}:6352", b.ipv4()),
        "rr",
        1,
        &["--msg-size", "65536"],
    );
    assert_rr_ok(&rr);
    let after = status(&node);
    assert_eq!(
        counter(&after, "sockops", "conn_locked_tcp"),
        counter(&before, "sockops", "conn_locked_tcp"),
        "{after:#}"
    );
    finish(node, agent);
}

#[test]
fn resets_and_killed_processes_leave_the_maps_empty() {
    if !privileged("bypass resets") {
        return;
    }
    let (node, agent) = node_with_agent(2, "");
    let (a, b) = (node.pod(0), node.pod(1));
    let _srv = server(b, "stream", 6401, 30, &[]);
    // Connect mode closes with SO_LINGER 0: every connection ends in a RST.
    let _conn_srv = server(b, "connect", 6402, 30, &[]);
    let report = client(
        a,
        &format!("{}:6402", b.ipv4()),
        "connect",
        1,
        &["--conns", "2"],
    );
    assert!(report["connects"].as_u64().unwrap() > 100, "{report}");
    // A client killed in the middle of a transfer.
    let mut cmd = a.command(support::QUICKLANE);
    cmd.args([
        "loadgen",
        "client",
        "--mode",
        "stream",
        "--msg-size",
        "16384", // between the stream bounds, with Nagle's algorithm: it stays on the redirect
        "--no-nodelay",
        "--duration",
        "10",
    ])
    .arg("--connect")
    .arg(format!("{}:6401", b.ipv4()))
    .stdout(std::process::Stdio::null());
    let victim = a.spawn(&mut cmd).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(map_len(&node, "QL_SOCKS") >= 2, "the transfer is bypassed");
    drop(victim); // SIGKILL
    eventually("QL_SOCKS empty", || map_len(&node, "QL_SOCKS") == 0);
    eventually("QL_META empty", || map_len(&node, "QL_META") == 0);
    // And the node still works.
    assert_stream_ok(&client(
        a,
        &format!("{}:6401", b.ipv4()),
        "stream",
        1,
        &["--msg-size", "512"],
    ));
    finish(node, agent);
}

#[test]
fn hundred_thousand_short_connections_leave_the_maps_empty() {
    if !privileged("bypass hygiene") {
        return;
    }
    let (node, agent) = node_with_agent(2, "");
    let (a, b) = (node.pod(0), node.pod(1));
    // Each connection says hello (one byte each way, both redirected), so none is idle and
    // every one of them goes through the sockhash at both ends.
    let _srv = server(b, "connect", 6501, 150, &["--hello"]);
    let before = status(&node);
    let report = client(
        a,
        &format!("{}:6501", b.ipv4()),
        "connect",
        120,
        &["--conns", "2", "--max-connects", "100000", "--hello"],
    );
    assert_eq!(report["errors"], 0, "{report}");
    let connects = report["connects"].as_u64().unwrap();
    assert!(connects >= 99_000, "{report}");
    let s = status(&node);
    let delta = |name: &str| counter(&s, "sockops", name) - counter(&before, "sockops", name);
    assert_eq!(delta("conn_skipped_idle_service"), 0, "{s:#}");
    assert!(delta("sockhash_inserted") >= 2 * connects, "{s:#}");
    assert!(delta("msg_redirected") >= 2 * connects, "{s:#}");
    eventually("QL_SOCKS empty", || map_len(&node, "QL_SOCKS") == 0);
    eventually("QL_META empty", || map_len(&node, "QL_META") == 0);
    finish(node, agent);
}

#[test]
fn a_full_map_sends_new_connections_down_the_normal_path() {
    if !privileged("bypass map full") {
        return;
    }
    // 4 sockets = 2 connections fit.
    let (node, agent) = node_with_agent(2, "max_sockets = 4\n");
    let (a, b) = (node.pod(0), node.pod(1));
    let _srv = server(b, "stream", 6601, 30, &[]);
    let report = client(
        a,
        &format!("{}:6601", b.ipv4()),
        "stream",
        1,
        &["--conns", "6", "--msg-size", "8192"],
    );
    assert_stream_ok(&report);
    let s = status(&node);
    assert!(counter(&s, "sockops", "sockhash_full") > 0, "{s:#}");
    assert!(
        counter(&s, "sockops", "msg_redirected") > 0,
        "the first connections are still bypassed"
    );
    finish(node, agent);
}

#[test]
fn excluded_ports_cidrs_and_pods_stay_on_the_normal_path() {
    if !privileged("bypass eligibility") {
        return;
    }
    let node = Node::new(3).unwrap();
    let (a, b, c) = (node.pod(0), node.pod(1), node.pod(2));
    let extra = format!(
        "exclude_ports = [6702]\nexclude_cidrs = [\"{}/32\"]\nexclude_cgroups = [{:?}]\n",
        c.ipv4(),
        b.cgroup_dir().join("excluded").display().to_string(),
    );
    std::fs::create_dir_all(b.cgroup_dir().join("excluded")).unwrap();
    let agent = Agent::start(&node, &write_config(&node, &extra), false);
    let _allowed = server(b, "stream", 6701, 30, &[]);
    let _port_excluded = server(b, "stream", 6702, 30, &[]);
    let _cidr_excluded = server(c, "stream", 6703, 30, &[]);

    let before = status(&node);
    let sent = assert_stream_ok(&client(
        a,
        &format!("{}:6701", b.ipv4()),
        "stream",
        1,
        &["--msg-size", "4096"],
    ));
    assert!(redirected_bytes(&node) - counter(&before, "sockops", "bytes_redirected") >= sent);

    for target in [format!("{}:6702", b.ipv4()), format!("{}:6703", c.ipv4())] {
        let before = status(&node);
        assert_stream_ok(&client(a, &target, "stream", 1, &["--msg-size", "4096"]));
        let after = status(&node);
        assert_eq!(
            counter(&after, "sockops", "bytes_redirected"),
            counter(&before, "sockops", "bytes_redirected"),
            "{target} must not be bypassed"
        );
        assert!(
            counter(&after, "sockops", "conn_ineligible")
                > counter(&before, "sockops", "conn_ineligible"),
            "{target} was judged ineligible at establishment"
        );
        assert_eq!(
            counter(&after, "sockops", "sk_msg_calls"),
            counter(&before, "sockops", "sk_msg_calls"),
            "ineligible sockets never enter the sockhash, so sk_msg never runs for them"
        );
    }
    // A listener in the excluded sub-cgroup of pod b: its accepted sockets are ineligible.
    node_excluded_server(&node);
    finish(node, agent);
}

/// Starts a server in `pod1/excluded`, checks a client's bytes were not bypassed.
fn node_excluded_server(node: &Node) {
    let (a, b) = (node.pod(0), node.pod(1));
    let procs = b.cgroup_dir().join("excluded").join("cgroup.procs");
    let mut cmd = b.command("sh");
    cmd.arg("-c")
        .arg(format!(
            "echo $$ > {} && exec {} loadgen server --mode stream --duration 20 --listen [::]:6704",
            procs.display(),
            support::QUICKLANE
        ))
        .stdout(std::process::Stdio::piped());
    let mut srv = b.spawn(&mut cmd).unwrap();
    wait_listening(&mut srv);
    let before = redirected_bytes(node);
    assert_stream_ok(&client(
        a,
        &format!("{}:6704", b.ipv4()),
        "stream",
        1,
        &["--msg-size", "4096"],
    ));
    assert_eq!(
        redirected_bytes(node),
        before,
        "a server in an excluded cgroup must not be bypassed"
    );
}

#[test]
fn a_rule_change_reaches_live_connections_without_breaking_them() {
    if !privileged("bypass live rule change") {
        return;
    }
    let (node, agent) = node_with_agent(2, "");
    let (a, b) = (node.pod(0), node.pod(1));
    let _srv = server(b, "stream", 6801, 30, &[]);
    let _echo = server(b, "rr", 6802, 30, &["--msg-size", "2000"]);
    let target = format!("{}:6801", b.ipv4());
    let echo_target = format!("{}:6802", b.ipv4());
    let (stream, echo) = std::thread::scope(|s| {
        let stream = s.spawn(|| client(a, &target, "stream", 4, &["--random-sizes", "1:200000"]));
        let echo = s.spawn(|| client(a, &echo_target, "rr", 4, &["--msg-size", "2000"]));
        std::thread::sleep(Duration::from_secs(1));
        let before = status(&node);
        assert!(counter(&before, "sockops", "msg_redirected") > 0);
        reload(&node, &agent, "exclude_ports = [6801, 6802]\n");
        std::thread::sleep(Duration::from_millis(300));
        let during = status(&node);
        std::thread::sleep(Duration::from_millis(700));
        let later = status(&node);
        assert_eq!(
            counter(&later, "sockops", "msg_redirected"),
            counter(&during, "sockops", "msg_redirected"),
            "after the change the live connections are no longer redirected"
        );
        assert!(
            counter(&later, "sockops", "msg_normal_path")
                > counter(&during, "sockops", "msg_normal_path"),
            "they carry on over the normal path"
        );
        (stream.join().unwrap(), echo.join().unwrap())
    });
    assert_stream_ok(&stream);
    assert_rr_ok(&echo);
    // And back: a new connection is bypassed again once the rule is gone.
    reload(&node, &agent, "");
    let before = redirected_bytes(&node);
    let sent = assert_stream_ok(&client(a, &target, "stream", 1, &["--msg-size", "4096"]));
    assert!(redirected_bytes(&node) - before >= sent);
    finish(node, agent);
}

#[test]
fn traffic_to_a_peer_off_the_bypass_keeps_working() {
    if !privileged("bypass non-eligible peer") {
        return;
    }
    let (node, agent) = node_with_agent(1, "");
    let a = node.pod(0);
    // A server in the node's host namespace but outside the node's cgroup: the pod's socket is
    // tracked, its peer never is (the cross-node case).
    let mut cmd = node.command(support::QUICKLANE);
    cmd.args([
        "loadgen",
        "server",
        "--mode",
        "stream",
        "--duration",
        "20",
        "--listen",
        "0.0.0.0:6901",
    ])
    .stdout(std::process::Stdio::piped());
    let mut srv = node.spawn(&mut cmd).unwrap();
    wait_listening(&mut srv);
    let before = status(&node);
    assert_stream_ok(&client(
        a,
        &format!("{}:6901", a.gateway_v4()),
        "stream",
        1,
        &["--msg-size", "4096"],
    ));
    let after = status(&node);
    assert_eq!(
        counter(&after, "sockops", "bytes_redirected"),
        counter(&before, "sockops", "bytes_redirected")
    );
    assert!(
        counter(&after, "sockops", "conn_locked_tcp")
            > counter(&before, "sockops", "conn_locked_tcp")
    );
    // The pod's socket left the sockhash (its writes pay nothing after the first message); the
    // server, whose client is tracked but which is outside the node, was never tracked.
    eventually("the client left the sockhash", || {
        counter(&status(&node), "sockops", "sockhash_left")
            > counter(&before, "sockops", "sockhash_left")
    });
    finish(node, agent);
}

#[test]
fn bypassed_bytes_are_accounted_per_pod_and_direction() {
    if !privileged("bypass accounting") {
        return;
    }
    let (node, agent) = node_with_agent(2, "");
    let (a, b) = (node.pod(0), node.pod(1));
    let _srv = server(b, "stream", 7001, 20, &[]);
    let sent = assert_stream_ok(&client(
        a,
        &format!("{}:7001", b.ipv4()),
        "stream",
        1,
        &["--msg-size", "4096"],
    ));
    let s = status(&node);
    let pods = s["bypass_pods"].as_array().unwrap();
    let pod = |dir: &std::path::Path| {
        pods.iter()
            .find(|p| p["cgroup"].as_str() == Some(&dir.display().to_string()))
            .unwrap_or_else(|| panic!("no accounting for {}: {s:#}", dir.display()))
            .clone()
    };
    let (pa, pb) = (pod(a.cgroup_dir()), pod(b.cgroup_dir()));
    assert!(pa["tx_bytes"].as_u64().unwrap() >= sent, "{pa}");
    assert!(pb["rx_bytes"].as_u64().unwrap() >= sent, "{pb}");
    // The checksum reply went the other way.
    assert!(pb["tx_bytes"].as_u64().unwrap() >= 16, "{pb}");
    assert!(pa["rx_msgs"].as_u64().unwrap() >= 1, "{pa}");
    finish(node, agent);
}

#[test]
fn nagle_small_message_streams_move_to_tcp_while_nodelay_ones_and_request_response_stay() {
    if !privileged("bypass small messages") {
        return;
    }
    let (node, agent) = node_with_agent(2, "");
    let (a, b) = (node.pod(0), node.pod(1));
    let _srv = server(b, "stream", 7101, 30, &[]);
    let _echo = server(b, "rr", 7102, 30, &["--msg-size", "64"]);

    // With Nagle's algorithm on, as qperf writes.
    let before = status(&node);
    let report = client(
        a,
        &format!("{}:7101", b.ipv4()),
        "stream",
        1,
        &["--msg-size", "64", "--conns", "2", "--no-nodelay"],
    );
    assert_stream_ok(&report);
    let after = status(&node);
    let delta = |name: &str| counter(&after, "sockops", name) - counter(&before, "sockops", name);
    assert_eq!(delta("conn_demoted_small_msgs"), 2, "{after:#}");
    // Nothing was ever redirected into the writers, so they left the sockhash for plain TCP;
    // the readers followed once they had read their redirect queues empty.
    assert_eq!(delta("sockhash_left"), 2, "{after:#}");
    assert_eq!(delta("sockhash_reader_left"), 2, "{after:#}");
    assert!(
        delta("msg_redirected") < 100,
        "only the first messages went by redirect"
    );
    assert!(
        report["msgs"].as_u64().unwrap() > 1000 * delta("sk_msg_calls"),
        "after leaving, the writers' messages no longer run sk_msg"
    );

    // A TCP_NODELAY writer (the load generator's default) sends each small write as its own
    // segment, which the redirect beats: its stream stays, every message redirected.
    let before = status(&node);
    let report = client(
        a,
        &format!("{}:7101", b.ipv4()),
        "stream",
        1,
        &["--msg-size", "64", "--conns", "2"],
    );
    assert_stream_ok(&report);
    let after = status(&node);
    let delta = |name: &str| counter(&after, "sockops", name) - counter(&before, "sockops", name);
    assert_eq!(delta("conn_demoted_small_msgs"), 0, "{after:#}");
    assert_eq!(delta("conn_locked_tcp"), 0, "{after:#}");
    assert!(
        delta("msg_redirected") >= report["msgs"].as_u64().unwrap(),
        "every message of the TCP_NODELAY stream was redirected: {report:#} {after:#}"
    );

    let before = status(&node);
    let rr = client(
        a,
        &format!("{}:7102", b.ipv4()),
        "rr",
        1,
        &["--msg-size", "64"],
    );
    assert_rr_ok(&rr);
    let after = status(&node);
    let transactions = rr["transactions"].as_u64().unwrap();
    assert_eq!(
        counter(&after, "sockops", "conn_demoted_small_msgs"),
        counter(&before, "sockops", "conn_demoted_small_msgs"),
        "request/response is answered every time, so it is never demoted"
    );
    assert!(
        counter(&after, "sockops", "msg_redirected")
            - counter(&before, "sockops", "msg_redirected")
            >= 2 * transactions,
        "both directions of every transaction were redirected"
    );
    finish(node, agent);
}

/// A writer with a second user of its socket (here a thread waiting in read(), as in
/// full-duplex blocking I/O) may have a redirect still on its way when it moves to TCP: the
/// kernel completes redirects after releasing the socket lock. Its reader cannot know when
/// its redirect queue is final, so it stays in the sockhash, and every byte arrives.
#[test]
fn a_reader_stays_while_its_writers_socket_has_another_user() {
    if !privileged("bypass reader stays") {
        return;
    }
    let (node, agent) = node_with_agent(2, "");
    let (a, b) = (node.pod(0), node.pod(1));
    let _srv = server(b, "stream", 7151, 30, &[]);
    let target = format!("{}:7151", b.ipv4());
    for (extra, readers_left) in [(&["--reader-thread"][..], 0), (&[][..], 2)] {
        let before = status(&node);
        let mut args = vec!["--msg-size", "64", "--conns", "2", "--no-nodelay"];
        args.extend_from_slice(extra);
        let report = client(a, &target, "stream", 1, &args);
        assert_stream_ok(&report);
        let after = status(&node);
        let delta =
            |name: &str| counter(&after, "sockops", name) - counter(&before, "sockops", name);
        assert_eq!(delta("conn_demoted_small_msgs"), 2, "{extra:?} {after:#}");
        assert_eq!(delta("sockhash_left"), 2, "{extra:?} {after:#}");
        assert_eq!(
            delta("sockhash_reader_left"),
            readers_left,
            "{extra:?} {after:#}"
        );
    }
    finish(node, agent);
}

#[test]
fn a_service_of_idle_connections_skips_the_bypass_until_one_carries_data() {
    if !privileged("bypass idle services") {
        return;
    }
    let (node, agent) = node_with_agent(2, "");
    let (a, b) = (node.pod(0), node.pod(1));
    let target = format!("{}:6801", b.ipv4());
    let _srv = server(b, "rr", 6801, 60, &["--msg-size", "64"]);
    // Connect and reset, no data: after a streak of such connections the service is idle,
    // and from then on every connection skips it, server end included.
    let report = client(a, &target, "connect", 5, &["--max-connects", "300"]);
    assert!(report["connects"].as_u64().unwrap() >= 300, "{report}");
    let s = status(&node);
    let skipped = counter(&s, "sockops", "conn_skipped_idle_service");
    assert!(
        skipped > 280,
        "all but the first streak skipped the bypass: {s:#}"
    );
    let inserted = counter(&s, "sockops", "sockhash_inserted");
    let connected = counter(&s, "sockops", "active_established");
    assert!(
        inserted > 0 && inserted <= 2 * (connected - skipped),
        "only the first streak was tracked: {s:#}"
    );
    assert_eq!(counter(&s, "sockops", "idle_service_woke"), 0, "{s:#}");
    // Connections with data: they take the normal path, and the first observed one (one in
    // four) to close wakes the service, so the connections after it are bypassed again.
    let mut bypassed = false;
    for _ in 0..10 {
        assert_rr_ok(&client(
            a,
            &target,
            "rr",
            1,
            &["--conns", "8", "--msg-size", "64"],
        ));
        if counter(&status(&node), "sockops", "msg_redirected") > 0 {
            bypassed = true;
            break;
        }
    }
    let s = status(&node);
    assert!(
        bypassed,
        "connections after the wake-up were bypassed: {s:#}"
    );
    // Observed clients closing at once may each see the streak before it is cleared.
    assert!(counter(&s, "sockops", "idle_service_woke") >= 1, "{s:#}");
    let before = status(&node);
    assert_rr_ok(&client(a, &target, "rr", 1, &["--msg-size", "64"]));
    let after = status(&node);
    assert_eq!(
        counter(&after, "sockops", "conn_skipped_idle_service"),
        counter(&before, "sockops", "conn_skipped_idle_service"),
        "{after:#}"
    );
    assert!(
        counter(&after, "sockops", "msg_redirected")
            > counter(&before, "sockops", "msg_redirected"),
        "the service is accelerated again: {after:#}"
    );
    finish(node, agent);
}
