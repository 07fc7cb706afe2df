//! The tool parsers against outputs recorded from the real tools on the development machine
//! (qperf 0.4.11, iperf 3.12, sockperf 3.7; see fixtures/), and against broken output.

use quicklane_bench::tools::{iperf3, qperf, sockperf};

fn fixture(name: &str) -> String {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn qperf_plain_output() {
    // `qperf 127.0.0.1 -t 1 -m 64 tcp_lat tcp_bw`: no -vu, so no size or time lines.
    let blocks = qperf::parse(&fixture("qperf_lat_bw_plain.txt")).unwrap();
    assert_eq!(blocks.len(), 2);
    assert_eq!(blocks[0].test, "tcp_lat");
    assert_eq!(blocks[0].latency_us, Some(4.92));
    assert_eq!(blocks[0].msg_size, None);
    assert_eq!(blocks[1].test, "tcp_bw");
    assert_eq!(blocks[1].bandwidth_mb_s, Some(91.5));
}

#[test]
fn qperf_size_sweep_with_units_normalised() {
    // `qperf 127.0.0.1 -t 1 -oo msg_size:1:64K:*4 -vu tcp_lat tcp_bw`
    let blocks = qperf::parse(&fixture("qperf_sweep_vu.txt")).unwrap();
    let sizes = [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536];
    assert_eq!(blocks.len(), 18);
    for (block, size) in blocks[..9].iter().zip(sizes) {
        assert_eq!(block.test, "tcp_lat");
        assert_eq!(block.msg_size, Some(size));
        assert_eq!(block.time_s, Some(1.0));
        let us = block.latency_us.unwrap();
        assert!(us > 0.5 && us < 1000.0, "{us} us at {size} B");
    }
    for (block, size) in blocks[9..].iter().zip(sizes) {
        assert_eq!(block.test, "tcp_bw");
        assert_eq!(block.msg_size, Some(size));
        assert!(block.bandwidth_mb_s.unwrap() > 0.0);
    }
    // Printed as "3.52 GB/sec" and "2.76 MB/sec" in the recording: both end up in MB/s.
    let first = blocks[9].bandwidth_mb_s.unwrap();
    let last = blocks[17].bandwidth_mb_s.unwrap();
    assert!(first < 100.0 && last > 1000.0, "{first} .. {last} MB/s");
}

#[test]
fn qperf_verbose_and_bits() {
    // `-v` adds msg_rate, send_cost, cpus_used lines, which are skipped.
    let blocks = qperf::parse(&fixture("qperf_bw_verbose.txt")).unwrap();
    assert_eq!(blocks.len(), 1);
    assert_eq!(blocks[0].bandwidth_mb_s, Some(2150.0));
    assert_eq!(blocks[0].msg_size, Some(4096));
    // `-ub`: "130 Mb/sec" is 16.25 MB/s.
    let blocks = qperf::parse(&fixture("qperf_bw_bits.txt")).unwrap();
    assert_eq!(blocks[0].bandwidth_mb_s, Some(16.25));
    assert_eq!(blocks[0].msg_size, Some(16));
}

#[test]
fn qperf_errors_are_named() {
    // What qperf prints (on stdout) when no server listens.
    let err = qperf::parse(&fixture("qperf_refused.txt")).unwrap_err();
    assert!(
        err.to_string()
            .contains("qperf reported \"127.0.0.1: failed to connect\""),
        "{err}"
    );
    for (broken, expect) in [
        ("", "no test results"),
        ("tcp_lat:\n", "neither a latency nor a bw"),
        (
            "tcp_lat:\n    latency = 3 parsecs\n",
            "cannot read a latency",
        ),
        ("    latency = 3 us\n", "before any test name"),
        ("tcp_bw:\n    bw 12 MB/sec\n", "no `=`"),
    ] {
        let err = qperf::parse(broken).unwrap_err().to_string();
        assert!(err.contains(expect), "{broken:?}: {err}");
        assert!(err.starts_with("cannot read qperf output"), "{err}");
    }
}

#[test]
fn iperf3_json() {
    // `iperf3 -c 127.0.0.1 -p 5299 -t 1 --json`
    let run = iperf3::parse(&fixture("iperf3_1s.json")).unwrap();
    assert_eq!(run.sent_bytes, 3_274_178_560);
    assert_eq!(run.received_bytes, 3_267_756_032);
    assert!((run.seconds - 1.000_156).abs() < 1e-9);
    assert!((run.gbit_per_s - 26.137_970_732_565_72).abs() < 1e-9);
    assert_eq!(run.retransmits, 1);
}

#[test]
fn iperf3_errors_are_named() {
    // iperf3 exits 0 with this when the server is gone.
    let err = iperf3::parse(&fixture("iperf3_refused.json")).unwrap_err();
    assert!(
        err.to_string()
            .contains("iperf3 reported \"unable to connect to server: Connection refused\""),
        "{err}"
    );
    let err = iperf3::parse("{\"start\": {").unwrap_err();
    assert!(err.to_string().contains("not JSON"), "{err}");
    let err = iperf3::parse("{\"end\": {}}").unwrap_err();
    assert!(
        err.to_string().contains("end.sum_received.seconds"),
        "{err}"
    );
}

#[test]
fn sockperf_round_trip_percentiles() {
    // `sockperf ping-pong --tcp -i 127.0.0.1 -p 11199 -m 64 -t 1 --full-rtt`, colours and all.
    let run = sockperf::parse(&fixture("sockperf_pingpong_fullrtt.txt")).unwrap();
    assert!(run.round_trip);
    assert!(run.observations > 1000, "{}", run.observations);
    let (p50, p99) = (run.percentile(50.0).unwrap(), run.percentile(99.0).unwrap());
    assert!(run.min_us <= p50 && p50 <= p99 && p99 <= run.max_us);
    // 99.999 down to 25; <MIN> and <MAX> are separate lines.
    assert_eq!(run.percentiles.len(), 8);
    assert_eq!(run.percentile(42.0), None);
}

#[test]
fn sockperf_one_way_latency() {
    // Without --full-rtt sockperf reports half the round trip as "avg-latency".
    let run = sockperf::parse(&fixture("sockperf_pingpong_latency.txt")).unwrap();
    assert!(!run.round_trip);
    assert!((run.avg_us - 10.627).abs() < 1e-9);
    assert_eq!(run.observations, 25_805);
    assert_eq!(run.percentile(50.0), Some(10.221));
    assert_eq!(run.percentile(99.0), Some(17.2));
    assert_eq!(run.percentile(99.999), Some(478.292));
    assert_eq!((run.min_us, run.max_us), (4.717, 478.292));
}

#[test]
fn sockperf_errors_are_named() {
    let err = sockperf::parse(&fixture("sockperf_refused.txt")).unwrap_err();
    assert!(err.to_string().contains("Connection refused"), "{err}");
    let full = fixture("sockperf_pingpong_fullrtt.txt");
    let truncated: String = full.lines().take(12).collect::<Vec<_>>().join("\n");
    let err = sockperf::parse(&truncated).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("cannot read sockperf output: no"),
        "{err}"
    );
}
