//! The agent against the real kernel, on a simulated node: load, attach, count real traffic,
//! re-adopt pins across a restart, refuse bad input, and leave nothing behind.
mod support;

use std::{process::Command, time::Duration};

use simnode::Node;
use support::{
    assert_unloaded, client, counter, links, server, status, write_config, Agent, QUICKLANE,
};

fn privileged(test: &str) -> bool {
    simnode::privileged_or_skip(test)
}

fn tc_and_xdp(node: &Node) -> String {
    let ifs: Vec<String> = node
        .pods()
        .iter()
        .map(|p| format!("{:?}", p.host_ifname()))
        .collect();
    let ifs = ifs.join(", ");
    format!("[tc]\nenabled = true\ninterfaces = [{ifs}]\n[xdp]\nenabled = true\ninterfaces = [{ifs}]\nmode = \"skb\"\n")
}

#[test]
fn every_bpf_program_passes_the_verifier() {
    if !privileged("verify") {
        return;
    }
    let out = Command::new(QUICKLANE)
        .args(["verify", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let verified: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = verified
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["program"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "ql_sockops",
            "ql_sk_msg",
            "ql_adopt",
            "ql_tc_egress",
            "ql_tc_ingress",
            "ql_xdp"
        ]
    );
    for v in verified.as_array().unwrap() {
        assert!(v["instructions"].as_u64().unwrap() > 0, "{v}");
    }
}

#[test]
fn attached_programs_count_real_pod_traffic_and_stop_leaves_nothing() {
    if !privileged("agent traffic test") {
        return;
    }
    let node = Node::new(2).unwrap();
    let config = write_config(&node, &tc_and_xdp(&node));
    let agent = Agent::start(&node, &config, false);

    let before = status(&node);
    assert_eq!(before["agent"]["running"], true);
    assert_eq!(before["agent"]["pid"], agent.pid());
    let attached: Vec<String> = links(&before).into_iter().map(|l| l.0).collect();
    assert_eq!(attached.len(), 2 + 2 * 2 + 2, "{attached:?}");
    assert!(attached.iter().any(|p| p.starts_with("sockops-cg")));
    assert!(attached.iter().any(|p| p == "sk_msg"));
    assert!(attached.iter().any(|p| p.starts_with("tc-egress-qlh1-")));
    assert!(attached.iter().any(|p| p.starts_with("xdp-qlh0-")));

    let (a, b) = (node.pod(0), node.pod(1));
    let _srv = server(b, "stream", 5001, 20, &[]);
    let target = format!("{}:5001", b.ipv4());
    let report = client(
        a,
        &target,
        "stream",
        1,
        &["--conns", "2", "--random-sizes", "1:65536"],
    );
    assert_eq!(report["checksum_ok"], true, "{report:#}");
    let sent = report["bytes"].as_u64().unwrap();
    assert!(sent > 0);

    let after = status(&node);
    assert!(counter(&after, "sockops", "active_established") >= 2);
    assert!(counter(&after, "sockops", "passive_established") >= 2);
    assert!(counter(&after, "sockops", "sockhash_inserted") >= 4);
    assert!(counter(&after, "sockops", "msg_redirected") > 0);
    assert!(counter(&after, "sockops", "bytes_redirected") > 0);
    // Handshakes and the server's checksum replies cross the veths even when data is bypassed.
    for (object, name) in [
        ("tc", "egress_packets"),
        ("tc", "ingress_packets"),
        ("tc", "ingress_bytes"),
        ("xdp", "packets"),
        ("xdp", "bytes"),
    ] {
        assert!(
            counter(&after, object, name) > counter(&before, object, name),
            "{object}.{name}"
        );
    }

    let program_ids: Vec<u64> = links(&after).into_iter().map(|l| l.2).collect();
    let (exit, log) = agent.stop();
    assert!(exit.success(), "agent exit {exit}: {log}");
    assert!(log.contains("detached all programs"), "{log}");
    assert!(
        !node.pin_dir().exists(),
        "pins left at {}",
        node.pin_dir().display()
    );
    assert_unloaded(&program_ids);
    node.teardown().unwrap();
}

#[test]
fn restart_with_kept_datapath_readopts_pins_without_breaking_connections() {
    if !privileged("agent restart test") {
        return;
    }
    let node = Node::new(2).unwrap();
    let config = write_config(&node, "");
    let first = Agent::start(&node, &config, true);
    let original = links(&status(&node));

    let (a, b) = (node.pod(0), node.pod(1));
    let _srv = server(b, "stream", 5002, 30, &[]);
    let target = format!("[{}]:5002", b.ipv6());
    // A transfer that spans the whole restart.
    let transfer = std::thread::scope(|s| {
        let handle = s.spawn(|| client(a, &target, "stream", 4, &["--msg-size", "4096"]));
        std::thread::sleep(Duration::from_secs(1));
        let (exit, log) = first.stop();
        assert!(exit.success(), "{log}");
        assert!(log.contains("leaving the datapath attached"), "{log}");

        let between = status(&node);
        assert_eq!(between["agent"]["running"], false);
        assert_eq!(links(&between), original, "links survive the agent");
        let redirected = counter(&between, "sockops", "msg_redirected");
        std::thread::sleep(Duration::from_millis(500));
        assert!(
            counter(&status(&node), "sockops", "msg_redirected") > redirected,
            "bypass keeps working while no agent runs"
        );

        let second = Agent::start(&node, &config, false);
        let readopted = status(&node);
        assert_eq!(links(&readopted), original, "same links, not re-attached");
        for a in readopted["attachments"].as_array().unwrap() {
            assert_eq!(a["adopted"], true, "{a}");
        }
        let report = handle.join().unwrap();
        (second, report)
    });
    let (second, report) = transfer;
    assert_eq!(report["checksum_ok"], true, "{report:#}");

    let (exit, log) = second.stop();
    assert!(exit.success(), "{log}");
    assert!(!node.pin_dir().exists());
    assert_unloaded(&original.iter().map(|l| l.2).collect::<Vec<_>>());
    node.teardown().unwrap();
}

#[test]
fn a_second_agent_on_the_node_is_refused() {
    if !privileged("second agent test") {
        return;
    }
    let node = Node::new(1).unwrap();
    let config = write_config(&node, "");
    let agent = Agent::start(&node, &config, false);
    let out = node
        .command(QUICKLANE)
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "another quicklane agent (pid {}) is already running",
            agent.pid()
        )),
        "{err}"
    );
    let (exit, log) = agent.stop();
    assert!(
        exit.success(),
        "the refused agent must not disturb the first: {log}"
    );
    node.teardown().unwrap();
}

#[test]
fn bad_configs_are_refused_with_the_key_value_and_what_is_allowed() {
    if !privileged("bad config test") {
        return;
    }
    let node = Node::new(1).unwrap();
    let cases = [
        (
            "max_sockets = -1\n",
            "`bypass.max_sockets`: invalid value: integer `-1`, expected u32",
        ),
        (
            "[tc]\nenabled = true\n",
            "`tc.interfaces` = [] is not allowed",
        ),
        (
            "[xdp]\nmode = \"turbo\"\n",
            "unknown variant `turbo`, expected one of `auto`, `skb`, `native`",
        ),
        (
            "[tc]\nenabled = true\ninterfaces = [\"nosuch0\"]\n",
            "tc.interfaces: interface \"nosuch0\" does not exist",
        ),
    ];
    for (extra, expected) in cases {
        let config = write_config(&node, extra);
        let out = node
            .command(QUICKLANE)
            .args(["run", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "accepted: {extra}");
        assert!(err.contains(expected), "for {extra:?}: {err}");
        assert!(
            !node.pin_dir().exists(),
            "a refused config left its pin dir"
        );
    }
    let config = write_config(&node, "");
    let text = std::fs::read_to_string(&config).unwrap();
    let cgroup = node.cgroup_dir().display().to_string();
    std::fs::write(
        &config,
        text.replace(&cgroup, "/sys/fs/cgroup/nonexistent-ql"),
    )
    .unwrap();
    let out = node
        .command(QUICKLANE)
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("cgroup /sys/fs/cgroup/nonexistent-ql: No such file or directory")
            && err.contains("set bypass.cgroup to an existing cgroup v2 directory"),
        "{err}"
    );
    assert!(!node.pin_dir().exists(), "a refused start left its pin dir");
    node.teardown().unwrap();
}

#[test]
fn status_without_an_agent_says_nothing_is_attached() {
    if !privileged("status test") {
        return;
    }
    let node = Node::new(1).unwrap();
    let out = Command::new(QUICKLANE)
        .args(["status", "--pin-dir"])
        .arg(node.pin_dir())
        .arg("--run-dir")
        .arg(node.run_dir())
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("agent: not running; nothing attached"));
    node.teardown().unwrap();
}

#[test]
fn legacy_attachments_count_traffic_are_readopted_and_detach_cleanly() {
    if !privileged("legacy attachment test") {
        return;
    }
    // Forces what kernels without sockmap links (< 6.10) or TCX (< 6.6) get.
    let env = [("QUICKLANE_LEGACY_ATTACH", "1")];
    let node = Node::new(2).unwrap();
    let ifs: Vec<String> = node
        .pods()
        .iter()
        .map(|p| format!("{:?}", p.host_ifname()))
        .collect();
    let config = write_config(
        &node,
        &format!("[tc]\nenabled = true\ninterfaces = [{}]\n", ifs.join(", ")),
    );
    let first = support::Agent::start_with_env(&node, &config, true, &env);
    let s = status(&node);
    for a in s["attachments"].as_array().unwrap() {
        let legacy = a["pin"] == "sk_msg" || a["pin"].as_str().unwrap().starts_with("tc-");
        assert_eq!(a["legacy"], legacy, "{a}");
    }
    let (a, b) = (node.pod(0), node.pod(1));
    let _srv = server(b, "stream", 5101, 30, &[]);
    let report = client(
        a,
        &format!("{}:5101", b.ipv4()),
        "stream",
        1,
        &["--msg-size", "65536"],
    );
    assert_eq!(report["checksum_ok"], true, "{report:#}");
    let s = status(&node);
    assert!(counter(&s, "sockops", "msg_redirected") > 0, "{s:#}");
    assert!(counter(&s, "tc", "egress_packets") > 0, "{s:#}");
    let original = links(&s);

    let (exit, log) = first.stop();
    assert!(exit.success(), "{log}");
    let second = support::Agent::start_with_env(&node, &config, false, &env);
    let s = status(&node);
    assert_eq!(links(&s), original, "same programs, re-adopted");
    assert!(s["attachments"]
        .as_array()
        .unwrap()
        .iter()
        .all(|a| a["adopted"] == true));
    let (exit, log) = second.stop();
    assert!(exit.success(), "{log}");
    assert!(!node.pin_dir().exists());
    let filters = node
        .command("tc")
        .args(["filter", "show", "dev", "qlh0", "egress"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&filters.stdout).trim().is_empty(),
        "tc filter left: {}",
        String::from_utf8_lossy(&filters.stdout)
    );
    assert_unloaded(&original.iter().map(|l| l.2).collect::<Vec<_>>());
    node.teardown().unwrap();
}
