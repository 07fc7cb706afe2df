//! Bandwidth QoS against the real kernel on a simulated node, measured with iperf3: limits
//! held for TCP (cubic, bbr) and UDP, priorities and guarantees under contention, live policy
//! changes. The bypass stays on throughout, so a shaped pod cannot escape its limit through it.
mod support;

use std::time::Duration;

use serde_json::Value;
use simnode::{Node, Pod, Proc};
use support::{
    counter, eventually,
    iperf::{
        assert_within, iperf, iperf_server, iperf_spawn, iperf_spawn_to, measured, one_at_a_time,
        udp_arrived_wire, udp_rcvbuf_errors, Measured, MBIT,
    },
    map_len, qos_report, status, write_config, Agent,
};

fn privileged(test: &str) -> bool {
    simnode::privileged_or_skip(test)
}

/// `[[qos.pods]]` for `pod` with its annotations.
fn pod_entry(pod: &Pod, annotations: &[(&str, &str)]) -> String {
    let ann: Vec<String> = annotations
        .iter()
        .map(|(k, v)| format!("{k:?} = {v:?}"))
        .collect();
    format!(
        "[[qos.pods]]\nname = {:?}\ninterface = {:?}\naddresses = [\"{}\", \"{}\"]\nannotations = {{ {} }}\n",
        pod.name(),
        pod.host_ifname(),
        pod.ipv4(),
        pod.ipv6(),
        ann.join(", ")
    )
}

/// Bypass on (default), QoS on with `node_keys` and `pods` (`pod_entry` output).
fn qos_config(node: &Node, node_keys: &str, pods: &str) -> std::path::PathBuf {
    write_config(
        node,
        &format!("[qos]\nenabled = true\nmode = \"policer\"\n{node_keys}\n{pods}"),
    )
}

/// A node whose pod 0 has egress limit `limit` (e.g. "200M") towards pod 1, the agent
/// running on it.
fn limited_pair(limit: &str) -> (Node, Agent) {
    let node = Node::new(2).unwrap();
    let config = qos_config(
        &node,
        "capacity = \"10G\"",
        &format!(
            "{}{}",
            pod_entry(node.pod(0), &[("kubernetes.io/egress-bandwidth", limit)]),
            pod_entry(node.pod(1), &[])
        ),
    );
    let agent = Agent::start(&node, &config, false);
    (node, agent)
}

/// TCP at `limit` within 5 %, retransmits under 1 % of the segments (of at most 1448 B).
fn assert_tcp_at_limit(what: &str, m: &Measured, limit: f64) {
    assert_within(what, m.bits_per_sec, limit, 0.05);
    let segments = m.bytes / 1448;
    assert!(
        m.retransmits * 100 < segments.max(1),
        "{what}: {} retransmits of ~{segments} segments",
        m.retransmits
    );
}

#[test]
fn a_pods_egress_limit_holds_for_tcp_cubic_bbr_and_udp() {
    if !privileged("qos egress limit test") {
        return;
    }
    let _serial = one_at_a_time();
    let (node, agent) = limited_pair("200M");
    let (a, b) = (node.pod(0), node.pod(1));
    let limit = 200.0 * MBIT;
    for (i, cc) in ["cubic", "bbr"].into_iter().enumerate() {
        let port = 5201 + i as u16;
        let _srv = iperf_server(b, port);
        let m = iperf(a, b, port, 4, &["-C", cc]);
        eprintln!("tcp {cc}: {m:?}");
        assert_tcp_at_limit(&format!("TCP {cc}"), &m, limit);
    }
    let _srv = iperf_server(b, 5203);
    let before = udp_rcvbuf_errors(b);
    let m = iperf(a, b, 5203, 4, &["-u", "-b", "400M", "-l", "1400"]);
    let overflowed = udp_rcvbuf_errors(b) - before;
    eprintln!("udp: {m:?}, {overflowed} datagrams overflowed the receiver's buffer");
    assert_within(
        "UDP on the wire",
        udp_arrived_wire(&m, overflowed, 1400),
        limit,
        0.05,
    );

    let s = status(&node);
    assert!(counter(&s, "sockops", "conn_paced") >= 2, "{s:#}");
    assert!(
        counter(&s, "tc", "qos_dropped") > 0,
        "UDP over the limit must be dropped"
    );
    let pods = s["qos"]["pods"].as_array().unwrap();
    assert!(pods[0]["egress"]["bytes"].as_u64().unwrap() > 0, "{s:#}");
    let (exit, log) = agent.stop();
    assert!(exit.success(), "{log}");
    node.teardown().unwrap();
}

/// Several streams of one pod split its rate between them (`senders`): paced each at the
/// whole rate, four streams sent four times too fast, and on a path without a queue neither
/// ECN nor the pacing brake could slow them enough (2-7 % retransmits).
#[test]
fn parallel_streams_of_one_pod_share_its_limit_without_loss() {
    if !privileged("qos parallel streams test") {
        return;
    }
    let _serial = one_at_a_time();
    let (node, agent) = limited_pair("100M");
    let (a, b) = (node.pod(0), node.pod(1));
    for (i, cc) in ["bbr", "cubic"].into_iter().enumerate() {
        let port = 5701 + i as u16;
        let _srv = iperf_server(b, port);
        let run = iperf_spawn(a, b, port, 4, &["-C", cc, "-P", "4"]);
        std::thread::sleep(Duration::from_secs(2));
        // The four streams count themselves; iperf3's control connection, a trickle, does not.
        let s = status(&node);
        let sockets = &s["qos"]["pods"][0]["egress"]["sockets"];
        let m = measured(&run.wait_with_output().unwrap());
        eprintln!("4 x tcp {cc}: {m:?}");
        eprintln!("{}", qos_report(&node));
        assert_eq!(sockets.as_u64(), Some(4), "4 x TCP {cc}: {s:#}");
        assert_tcp_at_limit(&format!("4 x TCP {cc}"), &m, 100.0 * MBIT);
    }
    eventually("QL_PACED empty", || map_len(&node, "QL_PACED") == 0);
    let (exit, log) = agent.stop();
    assert!(exit.success(), "{log}");
    node.teardown().unwrap();
}

/// Sockets that send a little do not count: a bulk stream beside ten light ones (100 kbit/s
/// each, far below an eighth of a share) keeps the pod's rate less what they use.
#[test]
fn a_bulk_stream_beside_light_connections_keeps_the_pods_rate() {
    if !privileged("qos bulk beside light test") {
        return;
    }
    let _serial = one_at_a_time();
    let (node, agent) = limited_pair("100M");
    let (a, b) = (node.pod(0), node.pod(1));
    let (_s1, _s2) = (iperf_server(b, 5901), iperf_server(b, 5902));
    let light = iperf_spawn(a, b, 5901, 5, &["-P", "10", "-b", "100K", "-l", "1K"]);
    std::thread::sleep(Duration::from_millis(500));
    let bulk = iperf_spawn(a, b, 5902, 4, &[]);
    std::thread::sleep(Duration::from_secs(2));
    let s = status(&node);
    let bulk = measured(&bulk.wait_with_output().unwrap());
    let light = measured(&light.wait_with_output().unwrap());
    eprintln!("bulk: {bulk:?}\nlight: {light:?}\n{}", qos_report(&node));
    assert_eq!(
        s["qos"]["pods"][0]["egress"]["sockets"].as_u64(),
        Some(1),
        "{s:#}"
    );
    assert_within("the light streams", light.bits_per_sec, 1.0 * MBIT, 0.1);
    assert_tcp_at_limit("the bulk stream", &bulk, 99.0 * MBIT);
    let (exit, log) = agent.stop();
    assert!(exit.success(), "{log}");
    node.teardown().unwrap();
}

/// Sockets that use less than the even share leave the rest to the others: three streams at
/// 20 Mbit/s beside a bulk stream in a 100M pod leave the bulk stream the 40 they do not use
/// (before the light reports: 27.8 Mbit/s, a quarter of the rate plus some catch-up).
#[test]
fn moderate_streams_leave_the_bulk_stream_the_rest_of_the_rate() {
    if !privileged("qos moderate streams test") {
        return;
    }
    let _serial = one_at_a_time();
    let (node, agent) = limited_pair("100M");
    let (a, b) = (node.pod(0), node.pod(1));
    let (_s1, _s2) = (iperf_server(b, 5903), iperf_server(b, 5904));
    let moderate = iperf_spawn(a, b, 5903, 6, &["-P", "3", "-b", "20M"]);
    std::thread::sleep(Duration::from_millis(500));
    let bulk = iperf_spawn(a, b, 5904, 5, &[]);
    std::thread::sleep(Duration::from_secs(2));
    let s = status(&node);
    let bulk = measured(&bulk.wait_with_output().unwrap());
    let moderate = measured(&moderate.wait_with_output().unwrap());
    eprintln!(
        "bulk: {bulk:?}\nmoderate: {moderate:?}\n{}",
        qos_report(&node)
    );
    let egress = &s["qos"]["pods"][0]["egress"];
    assert_eq!(
        (egress["sockets"].as_u64(), egress["light_sockets"].as_u64()),
        (Some(4), Some(3)),
        "four sockets share the rate, three of them light: {s:#}"
    );
    assert_within(
        "the moderate streams",
        moderate.bits_per_sec,
        60.0 * MBIT,
        0.05,
    );
    // From its second second on: cubic's start among the others' CE-marked bursts takes
    // about one (iperf3's intervals are half a second here).
    assert_tcp_at_limit(
        "the bulk stream",
        &Measured {
            bits_per_sec: mean(&bulk.intervals[2..]),
            ..bulk
        },
        40.0 * MBIT,
    );
    let (exit, log) = agent.stop();
    assert!(exit.success(), "{log}");
    node.teardown().unwrap();
}

/// Sockets of two pods sending into a third pod's ingress limit split it between them too:
/// the count is per limited aggregate, whichever pod the sockets belong to.
#[test]
fn streams_from_two_pods_share_a_third_pods_ingress_limit() {
    if !privileged("qos shared ingress test") {
        return;
    }
    let _serial = one_at_a_time();
    let node = Node::new(3).unwrap();
    let (a, b, sink) = (node.pod(0), node.pod(1), node.pod(2));
    let config = qos_config(
        &node,
        "capacity = \"10G\"",
        &format!(
            "{}{}{}",
            pod_entry(a, &[]),
            pod_entry(b, &[]),
            pod_entry(sink, &[("kubernetes.io/ingress-bandwidth", "100M")])
        ),
    );
    let agent = Agent::start(&node, &config, false);
    let (_s1, _s2) = (iperf_server(sink, 5801), iperf_server(sink, 5802));
    let runs = [
        iperf_spawn(a, sink, 5801, 4, &["-P", "2"]),
        iperf_spawn(b, sink, 5802, 4, &["-P", "2"]),
    ];
    std::thread::sleep(Duration::from_secs(2));
    let s = status(&node);
    let sockets = &s["qos"]["pods"][2]["ingress"]["sockets"];
    let m = runs.map(|r| measured(&r.wait_with_output().unwrap()));
    eprintln!("{m:?}\n{}", qos_report(&node));
    assert_eq!(sockets.as_u64(), Some(4), "{s:#}");
    let total = Measured {
        bits_per_sec: m.iter().map(|m| m.bits_per_sec).sum(),
        retransmits: m.iter().map(|m| m.retransmits).sum(),
        bytes: m.iter().map(|m| m.bytes).sum(),
        intervals: Vec::new(),
        sent: Vec::new(),
    };
    assert_tcp_at_limit("2 x 2 TCP into a 100M ingress limit", &total, 100.0 * MBIT);
    let (exit, log) = agent.stop();
    assert!(exit.success(), "{log}");
    node.teardown().unwrap();
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

#[test]
fn priorities_hold_shares_and_guarantees_and_lend_idle_capacity() {
    if !privileged("qos priority test") {
        return;
    }
    let _serial = one_at_a_time();
    let node = Node::new(3).unwrap();
    let (hi, lo, sink) = (node.pod(0), node.pod(1), node.pod(2));
    let config = qos_config(
        &node,
        "capacity = \"300M\"",
        &format!(
            "{}{}{}",
            pod_entry(hi, &[("quicklane.io/priority", "0")]),
            pod_entry(
                lo,
                &[
                    ("quicklane.io/priority", "2"),
                    ("quicklane.io/egress-guarantee", "50M")
                ]
            ),
            pod_entry(sink, &[])
        ),
    );
    let agent = Agent::start(&node, &config, false);
    let (_s1, _s2) = (iperf_server(sink, 5301), iperf_server(sink, 5302));
    // lo runs 7 s in half-second intervals; hi joins from 2 s to 5 s.
    let lo_run = iperf_spawn(lo, sink, 5301, 7, &["-i", "0.5"]);
    std::thread::sleep(Duration::from_secs(2));
    let hi_m = iperf(hi, sink, 5302, 3, &["-i", "0.5"]);
    let lo_m = measured(&lo_run.wait_with_output().unwrap());
    eprintln!("hi: {hi_m:?}\nlo: {lo_m:?}");
    eprintln!("{}", qos_report(&node));
    let lo_iv = &lo_m.intervals;
    assert!(lo_iv.len() >= 13, "{lo_iv:?}");
    // Alone, the low class borrows the whole link.
    assert_within("lo alone", mean(&lo_iv[1..3]), 300.0 * MBIT, 0.07);
    // Together: hi gets everything but lo's guarantee, lo keeps its guarantee.
    assert_within(
        "hi under contention",
        mean(&hi_m.intervals[1..]),
        250.0 * MBIT,
        0.05,
    );
    assert_within("lo's guarantee", mean(&lo_iv[6..9]), 50.0 * MBIT, 0.07);
    // hi's first half second already has (nearly) its share: preemption is immediate.
    assert!(
        hi_m.intervals[0] > 0.9 * 250.0 * MBIT,
        "{:?}",
        hi_m.intervals
    );
    // hi gone: lo takes the link back.
    assert_within("lo after hi left", mean(&lo_iv[12..14]), 300.0 * MBIT, 0.07);
    assert_eq!(hi_m.retransmits + lo_m.retransmits, 0);
    let (exit, log) = agent.stop();
    assert!(exit.success(), "{log}");
    node.teardown().unwrap();
}

/// Rewrites the QoS pods and waits until the agent applied them (SIGHUP).
fn reload_pods(node: &Node, agent: &Agent, node_keys: &str, pods: &str) {
    support::reload_watching(
        node,
        agent,
        &format!("[qos]\nenabled = true\nmode = \"policer\"\n{node_keys}\n{pods}"),
        "/qos/generation",
    );
}

#[test]
fn an_ingress_limit_holds_changes_live_and_lifts_when_removed() {
    if !privileged("qos ingress test") {
        return;
    }
    let _serial = one_at_a_time();
    let node = Node::new(2).unwrap();
    let (a, b) = (node.pod(0), node.pod(1));
    let limited = |rate: &str| {
        format!(
            "{}{}",
            pod_entry(a, &[]),
            pod_entry(b, &[("kubernetes.io/ingress-bandwidth", rate)])
        )
    };
    let keys = "capacity = \"10G\"";
    let config = qos_config(&node, keys, &limited("100M"));
    let agent = Agent::start(&node, &config, false);
    let _srv = iperf_server(b, 5401);
    // The sender is paced for the receiver's ingress limit (both on this node).
    let m = iperf(a, b, 5401, 3, &[]);
    eprintln!("tcp: {m:?}");
    assert_within(
        "TCP into a 100M ingress limit",
        m.bits_per_sec,
        100.0 * MBIT,
        0.05,
    );
    assert_eq!(m.retransmits, 0);
    let before = udp_rcvbuf_errors(b);
    let m = iperf(a, b, 5401, 3, &["-u", "-b", "300M", "-l", "1400"]);
    let overflowed = udp_rcvbuf_errors(b) - before;
    eprintln!("udp: {m:?}, {overflowed} datagrams overflowed the receiver's buffer");
    assert_within(
        "UDP on the wire into a 100M ingress limit",
        udp_arrived_wire(&m, overflowed, 1400),
        100.0 * MBIT,
        0.05,
    );

    // A running connection follows a live change of the annotation.
    let run = iperf_spawn(a, b, 5401, 6, &[]);
    std::thread::sleep(Duration::from_millis(2500));
    reload_pods(&node, &agent, keys, &limited("300M"));
    let m = measured(&run.wait_with_output().unwrap());
    let iv = &m.intervals;
    assert!(iv.len() >= 12, "{iv:?}");
    assert_within("before the change", mean(&iv[1..4]), 100.0 * MBIT, 0.05);
    assert_within("after the change", mean(&iv[7..11]), 300.0 * MBIT, 0.05);

    // A bad value is refused whole: the agent keeps running with the policy it had.
    let generation = |s: &Value| s["qos"]["policy"]["generation"].as_u64().unwrap();
    let before = generation(&status(&node));
    write_config(
        &node,
        &format!(
            "[qos]\nenabled = true\nmode = \"policer\"\n{keys}\n{}",
            limited("lots")
        ),
    );
    agent.hangup();
    std::thread::sleep(Duration::from_millis(500));
    let s = status(&node);
    assert_eq!(generation(&s), before, "a bad reload must not apply: {s:#}");
    assert_eq!(s["agent"]["running"], true);
    assert_eq!(
        s["qos"]["policy"]["pods"][1]["ingress_bps"].as_u64(),
        Some(300_000_000),
        "{s:#}"
    );

    // Removing the limit restores full speed, on the same connection too.
    let run = iperf_spawn(a, b, 5401, 5, &[]);
    std::thread::sleep(Duration::from_secs(2));
    reload_pods(
        &node,
        &agent,
        keys,
        &format!("{}{}", pod_entry(a, &[]), pod_entry(b, &[])),
    );
    let m = measured(&run.wait_with_output().unwrap());
    let after = mean(&m.intervals[6..9]);
    assert!(
        after > 3.0 * 300.0 * MBIT,
        "unlimited again: {:.0} Mbit/s ({:?})",
        after / MBIT,
        m.intervals
    );
    let s = status(&node);
    assert!(counter(&s, "sockops", "pacing_released") > 0, "{s:#}");
    let (exit, log) = agent.stop();
    assert!(exit.success(), "{log}");
    node.teardown().unwrap();
}

#[test]
fn a_bypassed_connection_is_held_to_a_limit_that_appears_live() {
    if !privileged("qos bypass accountability test") {
        return;
    }
    let _serial = one_at_a_time();
    let node = Node::new(2).unwrap();
    let (a, b) = (node.pod(0), node.pod(1));
    let keys = "capacity = \"10G\"";
    let unlimited = format!("{}{}", pod_entry(a, &[]), pod_entry(b, &[]));
    let config = qos_config(&node, keys, &unlimited);
    let agent = Agent::start(&node, &config, false);
    let _srv = iperf_server(b, 5501);
    let run = iperf_spawn(a, b, 5501, 6, &[]);
    std::thread::sleep(Duration::from_secs(2));
    let before = status(&node);
    assert!(
        counter(&before, "sockops", "msg_redirected") > 0,
        "the unlimited connection is bypassed: {before:#}"
    );
    reload_pods(
        &node,
        &agent,
        keys,
        &format!(
            "{}{}",
            pod_entry(a, &[("kubernetes.io/egress-bandwidth", "100M")]),
            pod_entry(b, &[])
        ),
    );
    let m = measured(&run.wait_with_output().unwrap());
    let iv = &m.intervals;
    assert!(mean(&iv[1..3]) > 1000.0 * MBIT, "bypassed before: {iv:?}");
    // The bypass gave the connection up at its next message; tc holds it to the limit.
    let held = mean(&iv[7..11]);
    assert!(
        held < 1.05 * 100.0 * MBIT,
        "{:.0} Mbit/s after the limit: {iv:?}",
        held / MBIT
    );
    let after = status(&node);
    assert!(
        counter(&after, "sockops", "conn_locked_tcp") > 0,
        "{after:#}"
    );
    assert!(counter(&after, "tc", "qos_shaped_packets") > 0, "{after:#}");
    let (exit, log) = agent.stop();
    assert!(exit.success(), "{log}");
    node.teardown().unwrap();
}

/// A TCP stream that was established before its pod had a limit is adopted into pacing
/// when the limit appears (the `ql_adopt` iterator turns its sock_ops callbacks on): from
/// then on it runs at the limit without loss, as if it had connected under the policy.
/// Without adoption the policer alone held it, by drops (it never negotiated ECN).
#[test]
fn a_stream_established_before_its_pods_limit_is_paced_to_it() {
    if !privileged("qos adoption test") {
        return;
    }
    let _serial = one_at_a_time();
    let node = Node::new(2).unwrap();
    let (a, b) = (node.pod(0), node.pod(1));
    let keys = "capacity = \"10G\"";
    // Bypass off (`extra` continues write_config's `[bypass]`): the stream takes TCP from
    // its first byte, so only adoption can pace it.
    let contents = |pods: &str| {
        format!("enabled = false\n[qos]\nenabled = true\nmode = \"policer\"\nmax_paced_sockets = 4096\n{keys}\n{pods}")
    };
    let config = write_config(
        &node,
        &contents(&format!("{}{}", pod_entry(a, &[]), pod_entry(b, &[]))),
    );
    let agent = Agent::start(&node, &config, false);
    let _srv = iperf_server(b, 5601);
    // Over IPv6: the iterator reads those addresses where the kernel's BTF says they are
    // (the kernel matrix adopts an IPv4 connection).
    let run = iperf_spawn_to(a, b.ipv6().into(), 5601, 9, &[]);
    std::thread::sleep(Duration::from_millis(2500));
    let limited = format!(
        "{}{}",
        pod_entry(a, &[("kubernetes.io/egress-bandwidth", "100M")]),
        pod_entry(b, &[])
    );
    support::reload_watching(&node, &agent, &contents(&limited), "/qos/generation");
    let m = measured(&run.wait_with_output().unwrap());
    let s = status(&node);
    eprintln!("{m:?}\n{}", qos_report(&node));
    assert_eq!(support::map_capacity(&node, "QL_PACED"), 4096);
    let adoption = &s["qos"]["adoption"];
    assert_eq!(adoption["refused"].as_u64(), Some(0), "{s:#}");
    assert!(adoption["adopted"].as_u64() >= Some(1), "{s:#}");
    assert!(counter(&s, "sockops", "conn_adopted") >= 1, "{s:#}");
    assert!(counter(&s, "sockops", "pacing_updates") > 0, "{s:#}");
    // The receiver reports half-seconds, the sender seconds; the limit came at 2.5 s.
    let iv = &m.intervals;
    assert!(iv.len() >= 18, "{iv:?}");
    assert!(mean(&iv[..4]) > 1000.0 * MBIT, "unlimited before: {iv:?}");
    assert_within("paced to the limit", mean(&iv[8..18]), 100.0 * MBIT, 0.05);
    let (retransmits, bytes) = m.sent[4..9]
        .iter()
        .fold((0, 0), |(r, b), &(ri, bi)| (r + ri, b + bi));
    assert!(
        retransmits * 100 < (bytes / 1448).max(1),
        "{retransmits} retransmits of ~{} segments once paced: {:?}",
        bytes / 1448,
        m.sent
    );
    let (exit, log) = agent.stop();
    assert!(exit.success(), "{log}");
    node.teardown().unwrap();
}

/// A shaped pod keeps its acceleration while it keeps to its rate: its bypassed bytes are
/// charged to its budget (and shown), and only a connection that runs over the limit leaves
/// the bypass, to be held by pacing and the shaper.
#[test]
fn a_shaped_pod_stays_bypassed_within_its_limit_and_leaves_it_above() {
    if !privileged("qos charged bypass test") {
        return;
    }
    let _serial = one_at_a_time();
    let node = Node::new(2).unwrap();
    let (a, b) = (node.pod(0), node.pod(1));
    let pods = format!(
        "{}{}",
        pod_entry(a, &[("kubernetes.io/egress-bandwidth", "100M")]),
        pod_entry(b, &[])
    );
    let agent = Agent::start(
        &node,
        &qos_config(&node, "capacity = \"10G\"", &pods),
        false,
    );
    let _rr = support::server(b, "rr", 5601, 30, &["--msg-size", "64"]);
    let report = support::client(
        a,
        &format!("{}:5601", b.ipv4()),
        "rr",
        2,
        &["--msg-size", "64"],
    );
    let s = status(&node);
    let qos_a = &s["qos"]["pods"][0]["egress"];
    eprintln!(
        "rr within the limit: {} transactions, {} bytes charged to the pod's budget, msg_redirected {}",
        report["transactions"], qos_a["bypassed"], counter(&s, "sockops", "msg_redirected")
    );
    assert!(counter(&s, "sockops", "msg_redirected") > 1000, "{s:#}");
    assert!(counter(&s, "sockops", "msg_qos_charged") > 1000, "{s:#}");
    assert_eq!(counter(&s, "sockops", "conn_demoted_over_rate"), 0, "{s:#}");
    assert!(qos_a["bypassed"].as_u64().unwrap() > 64 * 1000, "{s:#}");

    let _srv = iperf_server(b, 5602);
    let m = iperf(a, b, 5602, 3, &[]);
    eprintln!(
        "stream over the limit: {:.1} Mbit/s, {} retransmits",
        m.bits_per_sec / MBIT,
        m.retransmits
    );
    assert_within(
        "a stream from a 100M pod",
        m.bits_per_sec,
        100.0 * MBIT,
        0.05,
    );
    let s = status(&node);
    assert!(
        counter(&s, "sockops", "conn_demoted_over_rate") >= 1,
        "{s:#}"
    );
    let (exit, log) = agent.stop();
    assert!(exit.success(), "{log}");
    node.teardown().unwrap();
}

#[test]
fn three_priorities_with_an_idle_pod_whose_share_goes_to_its_class() {
    if !privileged("qos three priorities test") {
        return;
    }
    let _serial = one_at_a_time();
    let node = Node::new(5).unwrap();
    let (hi, mid1, mid2, lo, sink) = (
        node.pod(0),
        node.pod(1),
        node.pod(2),
        node.pod(3),
        node.pod(4),
    );
    let config = qos_config(
        &node,
        "capacity = \"400M\"",
        &[
            pod_entry(
                hi,
                &[
                    ("quicklane.io/priority", "0"),
                    ("kubernetes.io/egress-bandwidth", "150M"),
                ],
            ),
            pod_entry(mid1, &[("quicklane.io/priority", "1")]),
            pod_entry(mid2, &[("quicklane.io/priority", "1")]),
            pod_entry(
                lo,
                &[
                    ("quicklane.io/priority", "2"),
                    ("quicklane.io/egress-guarantee", "30M"),
                ],
            ),
            pod_entry(sink, &[]),
        ]
        .concat(),
    );
    let agent = Agent::start(&node, &config, false);
    let _servers: Vec<Proc> = (0..3).map(|i| iperf_server(sink, 5601 + i)).collect();
    let runs: Vec<_> = [hi, mid1, lo]
        .into_iter()
        .enumerate()
        .map(|(i, pod)| iperf_spawn(pod, sink, 5601 + i as u16, 6, &[]))
        .collect();
    // What the datapath sees while settled: the classes' use behind every lent rate.
    std::thread::sleep(Duration::from_millis(4500));
    eprintln!("settled: {}", qos_report(&node));
    let m: Vec<Measured> = runs
        .into_iter()
        .map(|r| measured(&r.wait_with_output().unwrap()))
        .collect();
    eprintln!("{m:#?}");
    eprintln!("{}", qos_report(&node));
    // From 3 s on, mid2 has been idle long enough to hold no share of class 1.
    let settled = |m: &Measured| mean(&m.intervals[6..11]);
    assert_within("hi at its limit", settled(&m[0]), 150.0 * MBIT, 0.05);
    assert_within(
        "mid1 with the idle mid2's share",
        settled(&m[1]),
        220.0 * MBIT,
        0.05,
    );
    assert_within("lo at its guarantee", settled(&m[2]), 30.0 * MBIT, 0.07);
    assert_eq!(m.iter().map(|m| m.retransmits).sum::<u64>(), 0);
    let (exit, log) = agent.stop();
    assert!(exit.success(), "{log}");
    node.teardown().unwrap();
}

#[test]
fn offline_pods_get_volcanos_low_and_high_shares() {
    if !privileged("qos offline test") {
        return;
    }
    let _serial = one_at_a_time();
    let node = Node::new(3).unwrap();
    let (web, batch, sink) = (node.pod(0), node.pod(1), node.pod(2));
    let config = qos_config(
        &node,
        "capacity = \"500M\"\nonline_watermark_percent = 80\noffline_low_percent = 10\noffline_high_percent = 40",
        &[
            pod_entry(web, &[("volcano.sh/qos-level", "2")]),
            pod_entry(batch, &[("volcano.sh/qos-level", "-1")]),
            pod_entry(sink, &[]),
        ]
        .concat(),
    );
    let agent = Agent::start(&node, &config, false);
    let (_s1, _s2) = (iperf_server(sink, 5701), iperf_server(sink, 5702));
    let batch_run = iperf_spawn(batch, sink, 5701, 7, &[]);
    std::thread::sleep(Duration::from_secs(2));
    let web_m = iperf(web, sink, 5702, 3, &[]);
    let batch_m = measured(&batch_run.wait_with_output().unwrap());
    eprintln!("web: {web_m:?}\nbatch: {batch_m:?}");
    eprintln!("{}", qos_report(&node));
    let iv = &batch_m.intervals;
    assert!(iv.len() >= 13, "{iv:?}");
    // Online idle: offline may use its high share (40 %) and no more.
    assert_within("offline alone", mean(&iv[1..3]), 200.0 * MBIT, 0.05);
    // Online above the watermark: offline drops to its low share (10 %), online gets the rest.
    assert_within(
        "offline under online load",
        mean(&iv[6..9]),
        50.0 * MBIT,
        0.07,
    );
    assert_within("online", mean(&web_m.intervals[1..]), 450.0 * MBIT, 0.05);
    assert_within("offline after", mean(&iv[12..14]), 200.0 * MBIT, 0.05);
    let (exit, log) = agent.stop();
    assert!(exit.success(), "{log}");
    node.teardown().unwrap();
}

#[test]
fn a_light_high_priority_pod_leaves_the_rest_to_lower_classes() {
    if !privileged("qos light high-priority test") {
        return;
    }
    let _serial = one_at_a_time();
    let node = Node::new(3).unwrap();
    let (hi, lo, sink) = (node.pod(0), node.pod(1), node.pod(2));
    let config = qos_config(
        &node,
        "capacity = \"300M\"",
        &[
            pod_entry(hi, &[("quicklane.io/priority", "0")]),
            pod_entry(
                lo,
                &[
                    ("quicklane.io/priority", "2"),
                    ("quicklane.io/egress-guarantee", "50M"),
                ],
            ),
        ]
        .concat(),
    );
    let agent = Agent::start(&node, &config, false);
    let (_s1, _s2) = (iperf_server(sink, 5801), iperf_server(sink, 5802));
    // hi competes (30M is well above the 1 % threshold) but uses a tenth of the link.
    let hi_run = iperf_spawn(hi, sink, 5801, 5, &["-u", "-b", "30M", "-l", "1000"]);
    std::thread::sleep(Duration::from_secs(1));
    let lo_run = iperf_spawn(lo, sink, 5802, 3, &[]);
    std::thread::sleep(Duration::from_secs(2));
    eprintln!("settled: {}", qos_report(&node));
    let lo_m = measured(&lo_run.wait_with_output().unwrap());
    let hi_m = measured(&hi_run.wait_with_output().unwrap());
    eprintln!("hi: {hi_m:?}\nlo: {lo_m:?}");
    eprintln!("{}", qos_report(&node));
    assert_within("hi", hi_m.bits_per_sec, 30.0 * MBIT, 0.05);
    // lo gets what hi leaves, a quarter of hi's use kept spare: 300 * (1 - 37.5/300).
    assert_within("lo", mean(&lo_m.intervals[1..]), 262.5 * MBIT, 0.07);
    let (exit, log) = agent.stop();
    assert!(exit.success(), "{log}");
    node.teardown().unwrap();
}
