//! `quicklane bench`: a real `quick` bypass run and a one-repetition `full` qos run on simulated nodes with tiny
//! durations, whose results directories must be complete and well-formed (every arm and
//! figure present; no performance asserted), and the regression check on their output.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard, PoisonError};

use serde_json::Value;

const QUICKLANE: &str = env!("CARGO_BIN_EXE_quicklane");

/// Held by each benchmark run: two at once would disturb each other's measurements, and the
/// bypass test's regression check relies on its own noise being that of a quiet machine.
static MEASURING: Mutex<()> = Mutex::new(());

fn measuring() -> MutexGuard<'static, ()> {
    // A panicking test only poisons the lock; the next run is still valid.
    MEASURING.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A results directory removed when the test ends, also on failure.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("qlbench-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn bench(args: &[&str]) -> Output {
    Command::new(QUICKLANE)
        .arg("bench")
        .args(args)
        .output()
        .expect("run quicklane bench")
}

fn text(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn positive(v: &Value, what: &str) -> f64 {
    let x = v
        .as_f64()
        .unwrap_or_else(|| panic!("{what} is not a number: {v}"));
    assert!(
        x.is_finite() && x > 0.0,
        "{what} = {x} is not finite and positive"
    );
    x
}

fn check_results(json: &Value, dir: &Path) {
    assert_eq!(json["scenario"], "bypass");
    assert_eq!(json["profile"], "quick");
    let host = &json["host"];
    for key in ["kernel", "cpu_model", "os"] {
        assert!(
            host[key].as_str().is_some_and(|s| !s.is_empty()),
            "host.{key}: {host}"
        );
    }
    positive(&host["cpus"], "host.cpus");
    positive(&host["memory_bytes"], "host.memory_bytes");

    let results = json["results"].as_array().expect("results array");
    assert!(!results.is_empty());
    for r in results {
        let metric = r["metric"].as_str().expect("metric");
        assert!(
            matches!(r["mode"].as_str(), Some("baseline" | "accelerated")),
            "{r}"
        );
        assert!(r["unit"].as_str().is_some_and(|u| !u.is_empty()), "{r}");
        if !r["msg_size"].is_null() {
            positive(&r["msg_size"], &format!("{metric} msg_size"));
        }
        let (median, min, max) = (
            positive(&r["median"], metric),
            positive(&r["min"], metric),
            positive(&r["max"], metric),
        );
        assert!(min <= median && median <= max, "{r}");
        let samples = r["samples"].as_array().expect("samples");
        assert_eq!(samples.len(), 2, "two repetitions: {r}");
        for s in samples {
            positive(s, metric);
        }
    }
    let has = |metric: &str, size: Option<u64>, mode: &str| {
        results
            .iter()
            .any(|r| r["metric"] == metric && r["msg_size"].as_u64() == size && r["mode"] == mode)
    };
    for (metric, sizes) in [
        (
            "qperf.tcp_lat.pod-to-pod",
            &[Some(64), Some(4096), Some(65536)][..],
        ),
        (
            "qperf.tcp_bw.pod-to-pod",
            &[Some(64), Some(4096), Some(65536)],
        ),
        ("qperf.tcp_bw_cpu.pod-to-pod", &[Some(64), Some(65536)]),
        ("qperf.tcp_lat.loopback", &[Some(64), Some(65536)]),
        ("sockperf.rtt_p99.pod-to-pod", &[Some(64)]),
        ("loadgen.rr_p999.pod-to-pod", &[Some(64)]),
        ("loadgen.rr_p99.loopback", &[Some(64)]),
        ("loadgen.connect_rate.pod-to-pod", &[None]),
        ("iperf3.throughput.non-eligible", &[None]),
        ("iperf3.cpu_per_gbit.non-eligible", &[None]),
    ] {
        for &size in sizes {
            for mode in ["baseline", "accelerated"] {
                assert!(has(metric, size, mode), "no {mode} {metric} at {size:?}");
            }
        }
    }
    let unix_figures = check_references(json, &has);

    let ratios = json["ratios"].as_array().expect("ratios array");
    assert_eq!(
        ratios.len() * 2,
        results.len() - unix_figures,
        "one ratio per pair of figures"
    );
    for r in ratios {
        let metric = r["metric"].as_str().expect("metric");
        positive(&r["value"], metric);
        positive(&r["target"], metric);
        assert!(
            matches!(r["better"].as_str(), Some("lower" | "higher")),
            "{r}"
        );
        assert!(r["met"].is_boolean(), "{r}");
        for s in r["samples"].as_array().expect("ratio samples") {
            positive(s, metric);
        }
    }

    let commands = json["commands"].as_array().expect("commands");
    assert!(!commands.is_empty());
    for c in commands {
        assert!(c["argv"].as_array().is_some_and(|a| !a.is_empty()), "{c}");
        let raw = dir.join(c["raw"].as_str().expect("raw path"));
        assert!(raw.is_file(), "{} missing", raw.display());
    }
    let blocks = json["agent"].as_array().expect("agent blocks");
    assert_eq!(blocks.len(), 2, "one per accelerated block");
    for b in blocks {
        assert!(
            b["counters"]["sockops.msg_redirected"].as_u64() > Some(0),
            "the accelerated block redirected nothing: {b}"
        );
    }
}

/// The AF_UNIX reference: measured without the agent only, one reference ratio per figure and
/// TCP path (pod to pod, loopback). Returns how many AF_UNIX figures there are.
fn check_references(json: &Value, has: &dyn Fn(&str, Option<u64>, &str) -> bool) -> usize {
    let unix = ["loadgen.rr_p50.unix", "loadgen.rr_p99.unix"];
    for metric in unix {
        assert!(has(metric, Some(64), "baseline"), "no {metric}");
        assert!(
            !has(metric, Some(64), "accelerated"),
            "{metric} with the agent"
        );
    }
    let unix_figures = json["results"]
        .as_array()
        .expect("results array")
        .iter()
        .filter(|r| unix.iter().any(|m| r["metric"] == *m))
        .count();
    assert_eq!(unix_figures, unix.len());
    let references = json["references"].as_array().expect("references array");
    assert_eq!(
        references.len(),
        unix_figures * 2,
        "one reference per AF_UNIX figure and TCP path"
    );
    for r in references {
        let metric = r["metric"].as_str().expect("metric");
        assert!(unix.contains(&metric), "{r}");
        let against = r["against"].as_str().expect("against");
        assert_eq!(
            against.rsplit_once('.').map(|(m, _)| m),
            metric.rsplit_once('.').map(|(m, _)| m),
            "{r}"
        );
        assert!(
            against.ends_with(".pod-to-pod") || against.ends_with(".loopback"),
            "{r}"
        );
        assert!(
            references
                .iter()
                .filter(|o| o["metric"] == metric && o["against"] == against)
                .count()
                == 1,
            "{r}"
        );
        assert_eq!(
            r["compares"],
            "AF_UNIX / TCP baseline, both without the agent"
        );
        positive(&r["value"], metric);
        positive(&r["target"], metric);
        assert!(r["met"].is_boolean(), "{r}");
        assert_eq!(r["samples"].as_array().map(Vec::len), Some(2), "{r}");
    }
    unix_figures
}

fn check_svg(path: &Path) {
    let text = std::fs::read_to_string(path).unwrap();
    let doc = roxmltree::Document::parse(&text)
        .unwrap_or_else(|e| panic!("{} is not well-formed XML: {e}", path.display()));
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "svg");
    assert_eq!(
        root.tag_name().namespace(),
        Some("http://www.w3.org/2000/svg")
    );
    assert!(
        root.descendants().any(|n| n.has_tag_name("circle")),
        "{} has no data points",
        path.display()
    );
    assert!(
        !text.contains("NaN") && !text.contains("inf"),
        "{}",
        path.display()
    );
}

#[test]
fn quick_bypass_run_writes_a_complete_report() {
    if !simnode::privileged_or_skip("the quick bypass benchmark") {
        return;
    }
    let _measuring = measuring();
    let dir = TempDir::new("quick");
    let out = dir.0.to_str().unwrap();
    let run = bench(&[
        "--scenario",
        "bypass",
        "--profile",
        "quick",
        "--out",
        out,
        "--reps",
        "2",
        "--seconds",
        "0.2",
    ]);
    assert!(run.status.success(), "bench failed: {}", text(&run));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("rep 2/2 accelerated"),
        "no progress lines: {stderr}"
    );
    assert!(stderr.contains("left"), "no time estimate: {stderr}");

    let results = dir.0.join("results.json");
    let json: Value = serde_json::from_slice(&std::fs::read(&results).unwrap()).unwrap();
    check_results(&json, &dir.0);
    for svg in ["latency.svg", "throughput.svg", "ratios.svg"] {
        check_svg(&dir.0.join(svg));
    }
    let report = std::fs::read_to_string(dir.0.join("report.md")).unwrap();
    assert!(
        report.contains("## Ratios: accelerated / baseline"),
        "{report}"
    );
    assert!(report.contains("![latency](latency.svg)"), "{report}");
    assert!(
        report.contains("## Reference: AF_UNIX / TCP, without the agent"),
        "{report}"
    );
    for path in ["pod-to-pod", "loopback"] {
        assert!(
            report.contains(&format!("| loadgen.rr_p50 | 64 B | {path} |")),
            "no {path} reference row: {report}"
        );
    }

    // A run compared with itself has not regressed.
    let same = bench(&[
        "--compare",
        results.to_str().unwrap(),
        "--results",
        results.to_str().unwrap(),
    ]);
    assert!(same.status.success(), "{}", text(&same));
    assert!(text(&same).contains("0 regressed"), "{}", text(&same));

    // A stored run whose latency ratio was far better: the current one regressed.
    let mut better = json.clone();
    let ratio = better["ratios"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|r| r["metric"] == "qperf.tcp_lat.pod-to-pod" && r["msg_size"] == 64)
        .expect("latency ratio at 64 B");
    ratio["value"] = Value::from(ratio["value"].as_f64().unwrap() / 10.0);
    ratio["min"] = ratio["value"].clone();
    ratio["max"] = ratio["value"].clone();
    let stored = dir.0.join("stored.json");
    std::fs::write(&stored, serde_json::to_vec(&better).unwrap()).unwrap();
    let worse = bench(&[
        "--compare",
        stored.to_str().unwrap(),
        "--results",
        results.to_str().unwrap(),
    ]);
    assert!(!worse.status.success(), "{}", text(&worse));
    let said = text(&worse);
    assert!(
        said.contains("REGRESSED qperf.tcp_lat.pod-to-pod @ 64 B"),
        "{said}"
    );
    assert!(
        said.contains("1 ratio(s) regressed beyond their measured noise"),
        "{said}"
    );
}

fn non_negative(v: &Value, what: &str) -> f64 {
    let x = v
        .as_f64()
        .unwrap_or_else(|| panic!("{what} is not a number: {v}"));
    assert!(
        x.is_finite() && x >= 0.0,
        "{what} = {x} is not finite and >= 0"
    );
    x
}

const QL: &str = "quicklane";
const HTB: &str = "htb";
const TBF: &str = "tbf";
const QLB: &str = "quicklane+bypass";

/// Every figure of every arm, well-formed; tbf only where it has something to shape, the
/// bypass arm only on hi's latency.
fn check_qos_figures(results: &[Value]) {
    for r in results {
        let metric = r["metric"].as_str().expect("metric");
        assert!(
            matches!(r["mode"].as_str(), Some(QL | HTB | TBF | QLB)),
            "{r}"
        );
        assert!(r["msg_size"].is_null(), "{r}");
        assert!(r["unit"].as_str().is_some_and(|u| !u.is_empty()), "{r}");
        let (median, min, max) = (
            non_negative(&r["median"], metric),
            non_negative(&r["min"], metric),
            non_negative(&r["max"], metric),
        );
        assert!(min <= median && median <= max, "{r}");
        assert_eq!(r["samples"].as_array().map(Vec::len), Some(1), "{r}");
    }
    let arms_of = |metric: &str| -> Vec<&str> {
        results
            .iter()
            .filter(|r| r["metric"] == metric)
            .filter_map(|r| r["mode"].as_str())
            .collect()
    };
    for limit in LIMITS {
        for metric in [
            "rate-accuracy.tcp_rate",
            "rate-accuracy.tcp_retrans",
            "rate-accuracy.tcp4_rate",
            "rate-accuracy.tcp4_retrans",
            "rate-accuracy.udp_rate",
            "rate-accuracy.udp_offered",
            "cpu.tcp_per_gbit",
        ] {
            let metric = format!("{metric}.{limit}");
            assert_eq!(arms_of(&metric), [QL, HTB, TBF], "{metric}");
        }
    }
    // tbf has no priorities: it sits out the priority and preemption groups.
    for metric in [
        "priority.hi_rtt_p50.idle",
        "priority.hi_rtt_p99.idle",
        "priority.hi_rtt_p50.saturated",
        "priority.hi_rtt_p99.saturated",
        "priority.lo_rate.saturated",
    ] {
        assert_eq!(arms_of(metric), [QL, HTB, QLB], "{metric}");
    }
    for metric in [
        "preemption.hi_idle",
        "preemption.hi_time",
        "preemption.lo_time",
        "preemption.hi_rate.contended",
        "preemption.lo_rate.contended",
        "preemption.lo_rate.alone",
    ] {
        assert_eq!(arms_of(metric), [QL, HTB], "{metric}");
    }
}

/// The full profile's rate limits.
const LIMITS: [&str; 3] = ["50M", "200M", "1G"];
/// Five checks per limit (rate for one TCP stream, four and UDP; retransmits for one and
/// four) and six on priority and preemption.
const CHECKS: usize = 5 * LIMITS.len() + 6;

/// The checks against the QoS targets, judged on quicklane (and hi's latency also on
/// quicklane+bypass).
fn check_qos_checks(ratios: &[Value]) {
    let mut checked: Vec<&str> = ratios.iter().filter_map(|r| r["metric"].as_str()).collect();
    checked.sort_unstable();
    let mut expected: Vec<String> = [
        "preemption.hi_time",
        "preemption.lo_rate.contended",
        "preemption.lo_time",
        "priority.hi_rtt_p99.saturated",
        "priority.hi_rtt_p99.saturated.with-bypass",
        "priority.hi_rtt_p99.vs-idle",
    ]
    .map(str::to_owned)
    .into_iter()
    .chain(LIMITS.iter().flat_map(|l| {
        [
            "tcp_rate",
            "tcp_retrans",
            "tcp4_rate",
            "tcp4_retrans",
            "udp_rate",
        ]
        .map(|m| format!("rate-accuracy.{m}.{l}"))
    }))
    .collect();
    expected.sort_unstable();
    assert_eq!(checked, expected);
    assert_eq!(checked.len(), CHECKS);
    for r in ratios {
        let metric = r["metric"].as_str().expect("metric");
        non_negative(&r["value"], metric);
        positive(&r["target"], metric);
        assert!(
            matches!(r["better"].as_str(), Some("lower" | "higher" | "near")),
            "{r}"
        );
        assert!(r["met"].is_boolean(), "{r}");
        assert!(r["compares"].as_str().is_some_and(|c| !c.is_empty()), "{r}");
        assert_eq!(r["samples"].as_array().map(Vec::len), Some(1), "{r}");
    }
}

fn check_qos_results(json: &Value, dir: &Path) {
    assert_eq!(json["scenario"], "qos");
    assert_eq!(json["profile"], "full");
    positive(&json["host"]["cpus"], "host.cpus");
    let order = json["settings"]["order"].as_array().expect("order");
    assert_eq!(order.len(), 1, "one repetition");
    assert_eq!(order[0], serde_json::json!([QL, HTB, TBF, QLB]));
    let params = &json["settings"]["params"];
    for key in [
        "htb.rate-accuracy-200M",
        "tbf.rate-accuracy-1G",
        "htb.priority",
        "quicklane.priority",
        "quicklane+bypass.priority",
        "quicklane.enforcement",
    ] {
        assert!(
            params[key].as_str().is_some_and(|s| !s.is_empty()),
            "settings.params.{key}: {params}"
        );
    }
    check_qos_figures(json["results"].as_array().expect("results array"));
    check_qos_checks(json["ratios"].as_array().expect("ratios array"));

    let timelines = json["timelines"].as_array().expect("timelines");
    for arm in [QL, HTB] {
        for name in ["preemption.hi", "preemption.lo"] {
            let t = timelines
                .iter()
                .find(|t| t["name"] == name && t["mode"] == arm)
                .unwrap_or_else(|| panic!("no {name} timeline for {arm}"));
            assert_eq!(t["bucket_ms"], 1.0);
            assert!(
                t["bytes"].as_array().is_some_and(|b| !b.is_empty()),
                "{name}"
            );
        }
    }
    for c in json["commands"].as_array().expect("commands") {
        let raw = dir.join(c["raw"].as_str().expect("raw path"));
        assert!(raw.is_file(), "{} missing", raw.display());
    }
    let blocks = json["agent"].as_array().expect("agent blocks");
    let names: Vec<&str> = blocks.iter().filter_map(|b| b["block"].as_str()).collect();
    assert_eq!(
        names,
        [
            "rate-accuracy-50M",
            "rate-accuracy-200M",
            "rate-accuracy-1G",
            "priority",
            "priority (with the bypass)"
        ]
    );
    for b in blocks {
        assert!(
            b["counters"]["tc.qos_shaped_packets"].as_u64() > Some(0),
            "the quicklane block shaped nothing: {b}"
        );
    }
}

#[test]
fn full_qos_run_writes_a_complete_report() {
    if !simnode::privileged_or_skip("the qos benchmark") {
        return;
    }
    let _measuring = measuring();
    let dir = TempDir::new("qos");
    let out = dir.0.to_str().unwrap();
    // The full profile, for all three limits and the bypass arm; one short repetition keeps
    // it to about a minute.
    let run = bench(&[
        "--scenario",
        "qos",
        "--profile",
        "full",
        "--out",
        out,
        "--reps",
        "1",
        "--seconds",
        "0.2",
    ]);
    assert!(run.status.success(), "bench failed: {}", text(&run));
    let stderr = String::from_utf8_lossy(&run.stderr);
    for arm in [QL, HTB, TBF, QLB] {
        assert!(
            stderr.contains(&format!("rep 1/1 {arm}")),
            "no {arm} progress: {stderr}"
        );
    }

    let results = dir.0.join("results.json");
    let json: Value = serde_json::from_slice(&std::fs::read(&results).unwrap()).unwrap();
    check_qos_results(&json, &dir.0);
    for svg in ["rate.svg", "latency.svg", "preemption.svg"] {
        check_svg(&dir.0.join(svg));
    }
    let report = std::fs::read_to_string(dir.0.join("report.md")).unwrap();
    for section in [
        "## Checks (quicklane)",
        "## Rate accuracy",
        "## Priority",
        "## Preemption",
        "## Arms",
        "![preemption](preemption.svg)",
        "tbf: n/a",
    ] {
        assert!(report.contains(section), "no {section:?} in {report}");
    }

    let same = bench(&[
        "--compare",
        results.to_str().unwrap(),
        "--results",
        results.to_str().unwrap(),
    ]);
    assert!(same.status.success(), "{}", text(&same));
    assert!(
        text(&same).contains(&format!("compared {CHECKS} ratio(s)")),
        "{}",
        text(&same)
    );
    assert!(text(&same).contains("0 regressed"), "{}", text(&same));

    // A stored run whose latency ratio to htb was far better: the current one regressed.
    let mut better = json.clone();
    let ratio = better["ratios"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|r| r["metric"] == "priority.hi_rtt_p99.saturated")
        .expect("the hi p99 check");
    ratio["value"] = Value::from(ratio["value"].as_f64().unwrap() / 10.0);
    ratio["min"] = ratio["value"].clone();
    ratio["max"] = ratio["value"].clone();
    let stored = dir.0.join("stored.json");
    std::fs::write(&stored, serde_json::to_vec(&better).unwrap()).unwrap();
    let worse = bench(&[
        "--compare",
        stored.to_str().unwrap(),
        "--results",
        results.to_str().unwrap(),
    ]);
    assert!(!worse.status.success(), "{}", text(&worse));
    assert!(
        text(&worse).contains("REGRESSED priority.hi_rtt_p99.saturated"),
        "{}",
        text(&worse)
    );
}
