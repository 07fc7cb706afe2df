//! The baseline shapers against the real kernel: what rtnetlink installed is what `tc` shows,
//! and removing it gives the device back its default qdisc.

use std::net::Ipv4Addr;

use quicklane_bench::qdisc::{self, Htb, HtbClass, Shaper, SourceFilter, Tbf};
use simnode::Node;

/// `tc -d OBJECT show dev IF` inside the node.
fn tc(node: &Node, object: &str, ifname: &str) -> String {
    let out = node
        .command("tc")
        .args(["-d", object, "show", "dev", ifname])
        .output()
        .expect("run tc");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn htb_and_tbf_are_configured_as_tc_would_show_them() {
    if !simnode::privileged_or_skip("the baseline qdisc test") {
        return;
    }
    let node = Node::new(1).unwrap();
    let ifname = node.pod(0).host_ifname().to_owned();

    let tbf = Shaper::Tbf(Tbf {
        rate_bps: 200_000_000,
        burst_bytes: 250_000,
        limit_bytes: 1_250_000,
    });
    let installed = qdisc::install(&node, &ifname, &tbf).unwrap();
    let shown = tc(&node, "qdisc", &ifname);
    assert!(
        shown.contains("qdisc tbf 1: root") && shown.contains("rate 200Mbit"),
        "{shown}"
    );
    // tc shows the limit as the latency it allows beyond the burst: (1.25 MB - 250 kB) / 25 MB/s.
    assert!(
        shown.contains("burst 250000b") && shown.contains("lat 40ms"),
        "{shown}"
    );
    installed.remove().unwrap();
    assert!(!tc(&node, "qdisc", &ifname).contains("tbf"));

    let class = |minor, parent, rate, prio| HtbClass {
        minor,
        parent,
        rate_bps: rate,
        ceil_bps: 500_000_000,
        burst_bytes: 625_000,
        cburst_bytes: 625_000,
        prio,
        leaf_limit_bytes: parent.map(|_| 3_125_000),
    };
    let htb = Shaper::Htb(Htb {
        default_class: 0,
        classes: vec![
            class(1, None, 500_000_000, 0),
            class(0x10, Some(1), 450_000_000, 0),
            class(0x20, Some(1), 50_000_000, 7),
        ],
        filters: vec![
            SourceFilter {
                src: Ipv4Addr::new(10, 77, 0, 2),
                class: 0x10,
            },
            SourceFilter {
                src: Ipv4Addr::new(10, 77, 1, 2),
                class: 0x20,
            },
        ],
    });
    let installed = qdisc::install(&node, &ifname, &htb).unwrap();
    let classes = tc(&node, "class", &ifname);
    assert!(
        classes.contains("class htb 1:10 parent 1:1 leaf 110: prio 0")
            && classes.contains("rate 450Mbit ceil 500Mbit"),
        "{classes}"
    );
    assert!(
        classes.contains("class htb 1:20 parent 1:1 leaf 120: prio 7"),
        "{classes}"
    );
    let qdiscs = tc(&node, "qdisc", &ifname);
    assert!(
        qdiscs.contains("qdisc bfifo 110: parent 1:10 limit 3125000b"),
        "{qdiscs}"
    );
    let filters = tc(&node, "filter", &ifname);
    assert!(
        filters.contains("flowid 1:10") && filters.contains("match 0a4d0002/ffffffff at 12"),
        "{filters}"
    );
    assert!(
        filters.contains("match 0a4d0102/ffffffff at 12"),
        "{filters}"
    );
    // A second shaper on the same device is refused rather than silently replacing it.
    assert!(qdisc::install(&node, &ifname, &tbf).is_err());
    installed.remove().unwrap();
    assert!(!tc(&node, "qdisc", &ifname).contains("htb"));
    node.teardown().unwrap();
}
