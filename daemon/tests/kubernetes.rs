//! The Kubernetes pod source against the real kernel: the agent watches a (fake, see
//! support/apiserver.rs) API server for this node's pods, finds each pod's interface by the
//! node's route to it, and shapes it by its annotations, following adds, edits and deletes
//! live. Rates are measured with iperf3 between the simulated node's pods.
mod support;

use std::{net::TcpListener, time::Duration};

use serde_json::Value;
use simnode::{Node, Pod};
use support::{
    apiserver::{pod, ApiServer},
    iperf::{assert_within, iperf, iperf_server, one_at_a_time, udp4_wire, MBIT},
    status, write_config, Agent,
};

const NODE: &str = "node-a";

fn privileged(test: &str) -> bool {
    simnode::privileged_or_skip(test)
}

/// A fake API server reachable from the agent, which runs in the node's namespace.
fn api_server(node: &Node) -> ApiServer {
    let listener = node
        .in_netns(|| TcpListener::bind("127.0.0.1:0"))
        .unwrap()
        .unwrap();
    ApiServer::serve(listener)
}

fn config(node: &Node, url: &str) -> std::path::PathBuf {
    write_config(
        node,
        &format!(
            "[qos]\nenabled = true\nmode = \"policer\"\ncapacity = \"1G\"\n\
             [kubernetes]\nenabled = true\nnode_name = \"{NODE}\"\napi_server = \"{url}\"\n"
        ),
    )
}

/// The API object for a simulated pod, on `node`.
fn api_pod(p: &Pod, namespace: &str, name: &str, node: &str, ann: &[(&str, &str)]) -> Value {
    let v4 = p.ipv4().to_string();
    let v6 = p.ipv6().to_string();
    pod(namespace, name, node, &[&v4, &v6], ann)
}

/// The pod named `name` in the agent's QoS policy, once it is there.
fn shaped(node: &Node, name: &str) -> Option<Value> {
    status(node)["qos"]["policy"]["pods"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == name)
        .cloned()
}

fn refused(node: &Node, name: &str) -> Option<String> {
    status(node)["qos"]["policy"]["refused"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p["reason"].as_str().map(str::to_owned))
}

/// Polls for up to 10 s: the watch, the agent's tick and the state file each take a moment.
fn within_10s<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not true after 10 s: {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The node's pods as the API server lists them at start: `web` (pod 0) limited to 100M;
/// a pod of another node on pod 1's address; `batch/bad` (pod 2) with a bad annotation
/// (returned, to be fixed later); a hostNetwork pod; a pod without QoS annotations.
fn publish_pods(api: &ApiServer, node: &Node) -> Value {
    let (web, sink, other) = (node.pod(0), node.pod(1), node.pod(2));
    api.put_pod(api_pod(
        web,
        "shop",
        "web",
        NODE,
        &[("kubernetes.io/egress-bandwidth", "100M")],
    ));
    // Another node's pod, on an address that is a pod here too: never ours.
    api.put_pod(api_pod(
        sink,
        "shop",
        "elsewhere",
        "node-b",
        &[("kubernetes.io/egress-bandwidth", "10M")],
    ));
    let bad = api_pod(
        other,
        "batch",
        "bad",
        NODE,
        &[("kubernetes.io/egress-bandwidth", "10Mbps")],
    );
    api.put_pod(bad.clone());
    let mut host = pod(
        "kube-system",
        "proxy",
        NODE,
        &["10.99.0.1"],
        &[("quicklane.io/priority", "0")],
    );
    host["spec"]["hostNetwork"] = Value::Bool(true);
    api.put_pod(host);
    // A pod without QoS annotations: not quicklane's business, not listed anywhere.
    api.put_pod(pod("shop", "plain", NODE, &["10.77.9.2"], &[]));

    bad
}

/// The notes of the events posted about pod `ns/name` with `reason`, once there is one.
fn events(api: &ApiServer, pod: &str, kind: &str, reason: &str) -> Vec<String> {
    let (namespace, name) = pod.split_once('/').unwrap();
    let about = |e: &Value| {
        e["regarding"]["namespace"] == namespace
            && e["regarding"]["name"] == name
            && e["regarding"]["kind"] == "Pod"
            && e["type"] == kind
            && e["reason"] == reason
    };
    within_10s(&format!("a {kind} {reason} event on {pod}"), || {
        let notes: Vec<String> = api
            .events()
            .iter()
            .filter(|e| about(e))
            .inspect(|e| {
                assert_eq!(e["reportingController"], "quicklane", "{e}");
                assert_eq!(e["reportingInstance"], NODE, "{e}");
            })
            .map(|e| e["note"].as_str().unwrap_or_default().to_owned())
            .collect();
        (!notes.is_empty()).then_some(notes)
    })
}

/// Each pod of `publish_pods` was told what became of it, in `kubectl describe pod`.
fn assert_owners_told_at_start(api: &ApiServer, web: &Pod) {
    let applied = events(api, "shop/web", "Normal", "QosApplied");
    assert!(
        applied[0].contains(&format!("shaped on {}", web.host_ifname()))
            && applied[0].contains("kubernetes.io/egress-bandwidth=100M"),
        "{applied:?}"
    );
    let notes = events(api, "batch/bad", "Warning", "QosRefused");
    assert!(notes[0].contains("10Mbps"), "{notes:?}");
    let notes = events(api, "kube-system/proxy", "Warning", "QosRefused");
    assert!(notes[0].contains("hostNetwork"), "{notes:?}");
}

/// A bad edit of shop/web (at 200M) is refused whole: the previous policy stays, and status
/// and an event say why; a refusal re-evaluated every second since the start was told once.
fn a_bad_edit_keeps_the_policy(api: &ApiServer, node: &Node) {
    api.put_pod(api_pod(
        node.pod(0),
        "shop",
        "web",
        NODE,
        &[("kubernetes.io/egress-bandwidth", "lots")],
    ));
    let why = within_10s("the bad edit is reported", || refused(node, "shop/web"));
    assert!(
        why.contains("previous policy stays") && why.contains("lots"),
        "{why}"
    );
    assert_eq!(
        shaped(node, "shop/web").unwrap()["egress_bps"],
        200_000_000u64
    );
    let notes = events(api, "shop/web", "Warning", "QosChangeRefused");
    assert!(notes[0].contains("lots"), "{notes:?}");
    // Re-evaluated every second since the start, told once.
    assert_eq!(events(api, "batch/bad", "Warning", "QosRefused").len(), 1);
}

/// Three seconds of TCP from `from` to `to`'s iperf3 server on 5201, as received.
fn measure(from: &Pod, to: &Pod) -> support::iperf::Measured {
    let m = iperf(from, to, 5201, 3, &[]);
    eprintln!(
        "{} -> {}: {:.1} Mbit/s, {} retransmits",
        from.name(),
        to.name(),
        m.bits_per_sec / MBIT,
        m.retransmits
    );
    m
}

#[test]
fn api_pods_are_shaped_by_their_annotations_and_followed_live() {
    if !privileged("kubernetes pod source test") {
        return;
    }
    let _serial = one_at_a_time();
    let node = Node::new(3).unwrap();
    let (web, sink) = (node.pod(0), node.pod(1));
    let api = api_server(&node);
    let mut bad = publish_pods(&api, &node);
    let agent = Agent::start(&node, &config(&node, &api.url()), false);
    assert!(
        api.requests()
            .iter()
            .any(|r| r.contains("fieldSelector=spec.nodeName%3Dnode-a")),
        "the agent lists only its node's pods: {:?}",
        api.requests()
    );
    let s = status(&node);
    assert_eq!(s["kubernetes"]["node"], NODE, "{s:#}");
    assert_eq!(s["kubernetes"]["synced"], true, "{s:#}");
    let p = shaped(&node, "shop/web").expect("shop/web is shaped from the start");
    assert_eq!(p["source"], "kubernetes");
    assert_eq!(p["interface"], web.host_ifname());
    assert_eq!(p["egress_bps"], 100_000_000u64);
    assert!(shaped(&node, "shop/elsewhere").is_none());
    assert!(shaped(&node, "shop/plain").is_none() && refused(&node, "shop/plain").is_none());
    let why = refused(&node, "batch/bad").expect("a bad annotation is refused");
    assert!(
        why.contains("10Mbps") && why.contains("kubernetes.io/egress-bandwidth"),
        "{why}"
    );
    let why = refused(&node, "kube-system/proxy").expect("hostNetwork is refused");
    assert!(why.contains("hostNetwork"), "{why}");
    assert_eq!(support::tc_pins(&node, web.host_ifname()), 2);
    assert_owners_told_at_start(&api, web);

    let _server = iperf_server(sink, 5201);
    let m = measure(web, sink);
    assert_within("shop/web at 100M", m.bits_per_sec, 100.0 * MBIT, 0.05);

    // An annotation edit applies live.
    api.put_pod(api_pod(
        web,
        "shop",
        "web",
        NODE,
        &[("kubernetes.io/egress-bandwidth", "200M")],
    ));
    within_10s("shop/web at 200M", || {
        shaped(&node, "shop/web").filter(|p| p["egress_bps"] == 200_000_000u64)
    });
    let m = measure(web, sink);
    assert_within("shop/web at 200M", m.bits_per_sec, 200.0 * MBIT, 0.05);

    a_bad_edit_keeps_the_policy(&api, &node);

    // The bad pod is fixed: it is shaped now, in a slot of its own.
    bad["metadata"]["annotations"]["kubernetes.io/egress-bandwidth"] = Value::from("50M");
    api.put_pod(bad);
    let fixed = within_10s("batch/bad shaped once fixed", || shaped(&node, "batch/bad"));
    assert_eq!(fixed["egress_bps"], 50_000_000u64);
    assert_ne!(fixed["slot"], shaped(&node, "shop/web").unwrap()["slot"]);
    assert!(refused(&node, "batch/bad").is_none());
    let applied = events(&api, "batch/bad", "Normal", "QosApplied");
    assert!(applied[0].contains("egress-bandwidth=50M"), "{applied:?}");

    // Deleting the pod lifts its limit and takes the shaper off its interface.
    api.delete_pod("shop", "web");
    within_10s("shop/web gone", || {
        shaped(&node, "shop/web").is_none().then_some(())
    });
    assert_eq!(support::tc_pins(&node, web.host_ifname()), 0);
    let m = measure(web, sink);
    assert!(
        m.bits_per_sec > 400.0 * MBIT,
        "unshaped again: {:.0} Mbit/s",
        m.bits_per_sec / MBIT
    );

    // Recreated with a lower limit: the freed slot starts clean (no departure time left
    // over from the old pod), and the limit holds at once.
    api.put_pod(api_pod(
        web,
        "shop",
        "web",
        NODE,
        &[("kubernetes.io/egress-bandwidth", "30M")],
    ));
    within_10s("shop/web back at 30M", || {
        shaped(&node, "shop/web").filter(|p| p["egress_bps"] == 30_000_000u64)
    });
    let m = measure(web, sink);
    assert_within(
        "shop/web recreated at 30M",
        m.bits_per_sec,
        30.0 * MBIT,
        0.05,
    );
    // Each time the API made a pod shaped (at start, batch/bad fixed, shop/web recreated),
    // the agent looked for that pod's open connections to pace (see `adopt`).
    let s = status(&node);
    let adoption = &s["qos"]["adoption"];
    assert!(adoption["passes"].as_u64() >= Some(3), "{s:#}");
    assert!(adoption["error"].is_null(), "{s:#}");
    assert_eq!(adoption["refused"].as_u64(), Some(0), "{s:#}");
    let (code, log) = agent.stop();
    assert!(code.success(), "{log}");
}

#[test]
fn an_unreachable_api_server_delays_the_pods_not_the_agent() {
    if !privileged("kubernetes pod source test") {
        return;
    }
    let _serial = one_at_a_time();
    let node = Node::new(2).unwrap();
    // A port nobody listens on yet: connection refused until the server appears.
    let port = node
        .in_netns(|| TcpListener::bind("127.0.0.1:0").map(|l| l.local_addr().unwrap().port()))
        .unwrap()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let agent = Agent::start(&node, &config(&node, &url), false);
    let s = status(&node);
    assert_eq!(s["kubernetes"]["synced"], false, "{s:#}");
    assert!(
        s["kubernetes"]["error"].as_str().is_some(),
        "the failure to reach the API server shows in status: {s:#}"
    );
    // The rest of the agent runs: the bypass is attached.
    assert!(support::links(&s).iter().any(|(pin, _, _)| pin == "sk_msg"));

    let listener = node
        .in_netns(|| TcpListener::bind(("127.0.0.1", port)))
        .unwrap()
        .unwrap();
    let api = ApiServer::serve(listener);
    api.put_pod(api_pod(
        node.pod(0),
        "shop",
        "late",
        NODE,
        &[("kubernetes.io/egress-bandwidth", "100M")],
    ));
    // The watcher backs off between retries; allow it a few rounds.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while shaped(&node, "shop/late").is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the pod was not shaped 60 s after the API server came up: {:#}",
            status(&node)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(status(&node)["kubernetes"]["synced"], true);
    let (code, log) = agent.stop();
    assert!(code.success(), "{log}");
}

/// A pod network namespace behind a bridge in the node's namespace, as flannel or the bridge
/// plugin build it: `qlbr0` (10.88.0.1/24) with the pod's host-side veth `qlbv0` as a port.
/// Removed on drop.
struct BridgedPod {
    netns: String,
}

impl BridgedPod {
    fn new(node: &Node) -> Self {
        let netns = format!("qlbr-{}", node.id());
        let ip = |ns: Option<&str>, args: &[&str]| {
            let mut cmd = match ns {
                Some(ns) => {
                    let mut c = std::process::Command::new("ip");
                    c.args(["-n", ns]);
                    c
                }
                None => node.command("ip"),
            };
            let out = cmd.args(args).output().unwrap();
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        ip(None, &["netns", "add", &netns]);
        let this = Self { netns };
        let ns = Some(this.netns.as_str());
        ip(None, &["link", "add", "qlbr0", "type", "bridge"]);
        ip(None, &["addr", "add", "10.88.0.1/24", "dev", "qlbr0"]);
        ip(None, &["link", "set", "qlbr0", "up"]);
        ip(
            None,
            &[
                "link", "add", "qlbv0", "type", "veth", "peer", "name", "qlbp0",
            ],
        );
        ip(None, &["link", "set", "qlbp0", "netns", &this.netns]);
        ip(None, &["link", "set", "qlbv0", "master", "qlbr0", "up"]);
        ip(ns, &["addr", "add", "10.88.0.2/24", "dev", "qlbp0"]);
        ip(ns, &["link", "set", "qlbp0", "up"]);
        ip(ns, &["link", "set", "lo", "up"]);
        this
    }

    fn command(&self, program: &str) -> std::process::Command {
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", &self.netns, program]);
        cmd
    }
}

impl Drop for BridgedPod {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
}

#[test]
fn a_pod_behind_a_bridge_is_shaped_on_its_bridge_port() {
    if !privileged("kubernetes pod source test") {
        return;
    }
    let _serial = one_at_a_time();
    let node = Node::new(1).unwrap();
    let pod_ns = BridgedPod::new(&node);
    let api = api_server(&node);
    api.put_pod(pod(
        "flannel",
        "bridged",
        NODE,
        &["10.88.0.2"],
        &[("kubernetes.io/egress-bandwidth", "50M")],
    ));
    let agent = Agent::start(&node, &config(&node, &api.url()), false);
    // Until the pod has talked to the node there is no neighbour entry to find its port by.
    let why = within_10s("the bridged pod waits for its neighbour entry", || {
        refused(&node, "flannel/bridged")
    });
    assert!(why.contains("neighbour"), "{why}");
    let pinged = pod_ns
        .command("ping")
        .args(["-c", "1", "-W", "2", "10.88.0.1"])
        .status()
        .unwrap();
    assert!(pinged.success());
    let p = within_10s("the bridged pod is shaped", || {
        shaped(&node, "flannel/bridged")
    });
    assert_eq!(p["interface"], "qlbv0", "{p:#}");
    assert_eq!(support::tc_pins(&node, "qlbv0"), 2);

    // UDP at twice the limit from the pod to the node: held at the bridge port.
    let mut server = node.command("iperf3");
    server
        .args(["-s", "-1", "-B", "10.88.0.1", "-p", "5301"])
        .stdout(std::process::Stdio::null());
    let _server = node.spawn(&mut server).unwrap();
    within_10s("iperf3 listens in the node", || {
        let ss = node
            .command("ss")
            .args(["-ltnH", "sport = :5301"])
            .output()
            .ok()?;
        (!ss.stdout.is_empty()).then_some(())
    });
    let out = pod_ns
        .command("iperf3")
        .args([
            "-c",
            "10.88.0.1",
            "-p",
            "5301",
            "-u",
            "-b",
            "100M",
            "-l",
            "1400",
            "-t",
            "3",
            "-J",
        ])
        .output()
        .unwrap();
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    let received = json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("iperf3: {json}"));
    eprintln!(
        "bridged pod, UDP at 100M into a 50M limit: {:.1} Mbit/s",
        received / MBIT
    );
    assert_within(
        "the bridged pod's egress on the wire",
        udp4_wire(received, 1400),
        50.0 * MBIT,
        0.05,
    );
    let (code, log) = agent.stop();
    assert!(code.success(), "{log}");
}
