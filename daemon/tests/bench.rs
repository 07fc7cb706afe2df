//! `quicklane bench`: a real `quick` bypass run on a simulated node with tiny durations, whose
//! results directory must be complete and well-formed; the regression check on its output;
//! and the QoS scenario refusing to run before its datapath exists.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const QUICKLANE: &str = env!("CARGO_BIN_EXE_quicklane");

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

    let ratios = json["ratios"].as_array().expect("ratios array");
    assert_eq!(
        ratios.len() * 2,
        results.len(),
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

#[test]
fn qos_is_not_faked() {
    let dir = TempDir::new("qos");
    let out = bench(&["--scenario", "qos", "--out", dir.0.to_str().unwrap()]);
    assert!(!out.status.success());
    let said = text(&out);
    assert!(
        said.contains("not implemented yet: the QoS datapath (issue 5) is not built"),
        "{said}"
    );
    assert!(!dir.0.join("results.json").exists());
}
