//! Client against server, in-process over 127.0.0.1 and [::1].

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use clap::Parser;
use nix::sched::{sched_getaffinity, CpuSet};
use nix::unistd::Pid;
use quicklane_bench::load::checksum::{Checksum, Digest};
use quicklane_bench::load::cli::{run_with_output, LoadgenArgs};
use quicklane_bench::load::client::{self, ClientOptions};
use quicklane_bench::load::report::{ServerConnReport, ServerReport, StreamReport};
use quicklane_bench::load::server::{Server, ServerOptions, Service, STREAM_READ_SIZE};
use quicklane_bench::load::{
    parse_listening, parse_report, Check, Endpoint, Error, Mode, Report, SizeRange,
};

const V4: &str = "127.0.0.1:0";
const V6: &str = "[::1]:0";

fn start_server(
    listen: &str,
    service: Service,
    duration: Duration,
    max_conns: Option<u64>,
) -> (Endpoint, JoinHandle<Result<ServerReport, Error>>) {
    start_server_with(listen, service, duration, max_conns, None)
}

fn start_server_with(
    listen: &str,
    service: Service,
    duration: Duration,
    max_conns: Option<u64>,
    timeline_buckets: Option<usize>,
) -> (Endpoint, JoinHandle<Result<ServerReport, Error>>) {
    let server = Server::bind(ServerOptions {
        listen: listen.parse().unwrap(),
        service,
        duration,
        max_conns,
        nodelay: true,
        timeline_buckets,
        read_size: STREAM_READ_SIZE,
    })
    .unwrap();
    (
        server.local_addr().clone(),
        thread::spawn(move || server.run()),
    )
}

fn client_opts(peer: &Endpoint, conns: u32, duration_ms: u64) -> ClientOptions {
    ClientOptions {
        peer: peer.clone(),
        conns,
        duration: Duration::from_millis(duration_ms),
        nodelay: true,
        seed: 42,
        connect_retry: Duration::from_secs(5),
        reader_thread: false,
    }
}

fn server_conn<'a>(server: &'a ServerReport, peer: &Endpoint) -> &'a ServerConnReport {
    server
        .connections
        .iter()
        .find(|c| c.peer == *peer)
        .unwrap_or_else(|| panic!("server never saw {peer}: {server:?}"))
}

fn stream_with_random_sizes_matches_on_both_ends(listen: &str) {
    let conns = 3;
    // --max-conns makes the server exit on its own long before its 20 s duration.
    let (addr, server) = start_server(
        listen,
        Service::Stream(Check::Checksum),
        Duration::from_secs(20),
        Some(conns.into()),
    );
    let report = client::stream(
        &client_opts(&addr, conns, 400),
        SizeRange {
            min: 1,
            max: 1 << 20,
        },
        Check::Checksum,
    )
    .unwrap();
    let server = server.join().unwrap().unwrap();

    assert!(report.checksum_ok, "{report:?}");
    assert_eq!(report.connections.len(), 3);
    assert_eq!(
        report.bytes,
        report.connections.iter().map(|c| c.bytes).sum::<u64>()
    );
    assert!(report.msgs >= 3 && report.bytes > 0);
    assert!(report.throughput_mbps > 0.0 && report.gbit_per_s > 0.0);
    for conn in &report.connections {
        assert!(conn.checksum_ok);
        assert_eq!(
            (conn.server_checksum, conn.server_bytes),
            (conn.checksum, conn.bytes)
        );
        let seen = server_conn(&server, &conn.local);
        assert_eq!(seen.error, None);
        assert_eq!(
            (seen.checksum, seen.bytes),
            (Some(conn.checksum), conn.bytes)
        );
    }
    let checksums: Vec<u64> = report.connections.iter().map(|c| c.checksum).collect();
    assert!(checksums[0] != checksums[1] && checksums[1] != checksums[2]);
    assert_eq!(
        (server.conns, server.mode, server.bytes),
        (3, Mode::Stream, report.bytes)
    );
    assert!(server.elapsed_s < 10.0, "server outlived its connections");
}

#[test]
fn stream_with_random_sizes_matches_on_both_ends_v4() {
    stream_with_random_sizes_matches_on_both_ends(V4);
}

#[test]
fn stream_with_random_sizes_matches_on_both_ends_v6() {
    stream_with_random_sizes_matches_on_both_ends(V6);
}

/// Reads one connection to EOF and answers with a digest that is off by one bit.
fn lying_stream_server() -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind(V4).unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut sum = Checksum::new();
        let mut buf = vec![0; 64 << 10];
        loop {
            match conn.read(&mut buf).unwrap() {
                0 => break,
                n => sum.update(&buf[..n]),
            }
        }
        let honest = sum.digest();
        let lie = Digest {
            checksum: honest.checksum ^ 1,
            ..honest
        };
        conn.write_all(&lie.to_wire()).unwrap();
    });
    (addr, handle)
}

#[test]
fn checksum_mismatch_fails_the_run_after_printing_the_report() {
    let (addr, server) = lying_stream_server();
    let args = LoadgenArgs::try_parse_from([
        "loadgen",
        "client",
        "--connect",
        &addr.to_string(),
        "--mode",
        "stream",
        "--msg-size",
        "1000",
        "--duration",
        "0.3",
    ])
    .unwrap();
    let mut out = Vec::new();
    let err = run_with_output(args, &mut out).unwrap_err();
    server.join().unwrap();

    assert!(
        matches!(err, Error::ChecksumMismatch { mismatched: 1, conns: 1, ref peer, .. } if *peer == addr.into()),
        "{err}"
    );
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
    let Report::Stream(report) = parse_report(std::str::from_utf8(&out).unwrap()).unwrap() else {
        panic!("not a stream report");
    };
    assert!(!report.checksum_ok);
    let conn = &report.connections[0];
    assert!(!conn.checksum_ok);
    assert_eq!(conn.server_checksum, conn.checksum ^ 1);
    assert_eq!(conn.server_bytes, conn.bytes);
    assert_eq!(conn.bytes, conn.msgs * 1000);
}

fn rr_latencies_are_sane(listen: &str, msg_size: usize) {
    let (addr, server) = start_server(
        listen,
        Service::Rr { msg_size },
        Duration::from_secs(20),
        Some(2),
    );
    let report = client::rr(&client_opts(&addr, 2, 300), msg_size).unwrap();
    let server = server.join().unwrap().unwrap();

    assert_eq!(report.mismatches, 0);
    assert!(report.transactions > 0 && report.tps > 0.0, "{report:?}");
    assert!(report.min_us > 0.0, "{report:?}");
    let ordered = [
        report.min_us,
        report.p50_us,
        report.p90_us,
        report.p99_us,
        report.p999_us,
        report.max_us,
    ];
    assert!(ordered.windows(2).all(|w| w[0] <= w[1]), "{report:?}");
    assert!(report.min_us <= report.mean_us && report.mean_us <= report.max_us);
    let echoed: u64 = server
        .connections
        .iter()
        .map(|c| c.transactions.unwrap())
        .sum();
    assert_eq!(echoed, report.transactions);
    assert!(
        server.connections.iter().all(|c| c.error.is_none()),
        "{server:?}"
    );
}

#[test]
fn rr_latencies_are_sane_v4() {
    rr_latencies_are_sane(V4, 1);
}

#[test]
fn rr_with_multi_segment_messages_v6() {
    // Larger than the loopback MTU, so requests arrive in several reads.
    rr_latencies_are_sane(V6, (64 << 10) + 1);
}

fn connect_rate(listen: &str, hello: bool) {
    let (addr, server) = start_server(
        listen,
        Service::Connect { hello },
        Duration::from_secs(1),
        None,
    );
    let report = client::connect(&client_opts(&addr, 2, 300), 200_000, hello).unwrap();
    let server = server.join().unwrap().unwrap();

    assert!(
        report.connects > 0 && report.connects_per_s > 0.0,
        "{report:?}"
    );
    assert!(
        report.p50_us > 0.0 && report.p50_us <= report.p99_us,
        "{report:?}"
    );
    assert_eq!(report.threads, 2);
    assert_eq!(report.errors, 0, "{report:?}");
    assert!(
        server.conns > 0 && server.connections.is_empty(),
        "{server:?}"
    );
}

#[test]
fn connect_rate_v4() {
    connect_rate(V4, false);
}

#[test]
fn connect_rate_v6() {
    connect_rate(V6, false);
}

#[test]
fn a_pinned_client_runs_on_its_cpu_alone() {
    let cpus = || -> Vec<usize> {
        let set = sched_getaffinity(Pid::from_raw(0)).unwrap();
        (0..CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap())
            .collect()
    };
    let cpu = cpus()[0];
    let (addr, server) = start_server(
        V4,
        Service::Connect { hello: false },
        Duration::from_secs(1),
        None,
    );
    let args = LoadgenArgs::try_parse_from([
        "loadgen",
        "client",
        "--connect",
        &addr.to_string(),
        "--mode",
        "connect",
        "--duration",
        "0.2",
        "--conns",
        "2",
        "--cpu",
        &cpu.to_string(),
    ])
    .unwrap();
    let mut out = Vec::new();
    // The test's own thread runs the client and is pinned with it; it ends with the test.
    run_with_output(args, &mut out).unwrap();
    server.join().unwrap().unwrap();
    let Report::Connect(report) = parse_report(std::str::from_utf8(&out).unwrap()).unwrap() else {
        panic!("not a connect report");
    };
    assert!(report.connects > 0 && report.errors == 0, "{report:?}");
    assert_eq!(cpus(), [cpu]);
}

#[test]
fn connect_rate_with_hellos_v4() {
    connect_rate(V4, true);
}

#[test]
fn a_hello_nobody_answers_is_an_error() {
    let (addr, server) = start_server(
        V4,
        Service::Connect { hello: false },
        Duration::from_secs(1),
        None,
    );
    let err = client::connect(&client_opts(&addr, 1, 300), 10, true).unwrap_err();
    assert!(err.to_string().contains("exchanging a hello with"), "{err}");
    server.join().unwrap().unwrap();
}

#[test]
fn connect_mode_stops_at_max_connects() {
    let (addr, server) = start_server(
        V4,
        Service::Connect { hello: false },
        Duration::from_secs(1),
        None,
    );
    let started = Instant::now();
    let report = client::connect(&client_opts(&addr, 3, 20_000), 50, false).unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(report.connects + report.errors, 50, "{report:?}");
    server.join().unwrap().unwrap();
}

#[test]
fn server_duration_ends_a_server_nobody_connects_to() {
    let args = LoadgenArgs::try_parse_from([
        "loadgen",
        "server",
        "--listen",
        V4,
        "--mode",
        "rr",
        "--msg-size",
        "64",
        "--duration",
        "0.3",
    ])
    .unwrap();
    let started = Instant::now();
    let mut out = Vec::new();
    run_with_output(args, &mut out).unwrap();
    assert!(started.elapsed() < Duration::from_secs(3));

    let out = String::from_utf8(out).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    let addr = parse_listening(lines[0]).unwrap();
    let Report::Server(report) = parse_report(lines[1]).unwrap() else {
        panic!("not a server report: {out}");
    };
    assert_eq!(
        (report.listen, report.mode, report.conns),
        (addr, Mode::Rr, 0)
    );
    assert!(report.elapsed_s >= 0.3);
}

/// Hands each flushed line to a channel, the way a harness reads a child's stdout pipe.
struct LineSender {
    tx: mpsc::Sender<String>,
    pending: Vec<u8>,
}

impl Write for LineSender {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.pending.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        while let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            // The receiver may have stopped listening; losing lines then is fine.
            let _ = self.tx.send(String::from_utf8(line).unwrap());
        }
        Ok(())
    }
}

#[test]
fn cli_server_and_client_talk_through_json_lines() {
    let (tx, rx) = mpsc::channel();
    let server = thread::spawn(move || {
        let args = LoadgenArgs::try_parse_from([
            "loadgen",
            "server",
            "--listen",
            V6,
            "--max-conns",
            "2",
            "--duration",
            "20",
        ])
        .unwrap();
        run_with_output(
            args,
            &mut LineSender {
                tx,
                pending: Vec::new(),
            },
        )
    });
    let timeout = Duration::from_secs(10);
    let addr = parse_listening(&rx.recv_timeout(timeout).unwrap()).unwrap();

    let args = LoadgenArgs::try_parse_from([
        "loadgen",
        "client",
        "--connect",
        &addr.to_string(),
        "--mode",
        "stream",
        "--random-sizes",
        "1000:5000",
        "--conns",
        "2",
        "--duration",
        "0.3",
        "--no-nodelay",
    ])
    .unwrap();
    let mut out = Vec::new();
    run_with_output(args, &mut out).unwrap();
    server.join().unwrap().unwrap();
    let server_line = rx.recv_timeout(timeout).unwrap();

    let Report::Stream(client) = parse_report(std::str::from_utf8(&out).unwrap()).unwrap() else {
        panic!("not a stream report");
    };
    let Report::Server(server) = parse_report(&server_line).unwrap() else {
        panic!("not a server report: {server_line}");
    };
    assert!(client.checksum_ok && !client.nodelay);
    assert_eq!(
        client.msg_size,
        SizeRange {
            min: 1000,
            max: 5000
        }
    );
    assert_eq!(client.bytes, server.bytes);
    for conn in &client.connections {
        assert_eq!(
            server_conn(&server, &conn.local).checksum,
            Some(conn.checksum)
        );
    }
}

/// A port that is free now and, lying below Linux's ephemeral range, is not handed out to the
/// thousands of client sockets the other tests open meanwhile. The search starts at a
/// pid-dependent port so concurrent test runs pick different ones.
fn free_port_below_ephemeral_range() -> SocketAddr {
    let start = 20_000 + (std::process::id() % 10_000) as u16;
    (start..32_000)
        .chain(20_000..start)
        .map(|port| SocketAddr::from(([127, 0, 0, 1], port)))
        .find(|addr| TcpListener::bind(addr).is_ok())
        .expect("a free port below 32000")
}

#[test]
fn client_waits_for_a_late_server() {
    let addr = free_port_below_ephemeral_range();
    let server = thread::spawn(move || {
        thread::sleep(Duration::from_millis(300));
        Server::bind(ServerOptions {
            listen: addr.into(),
            service: Service::Rr { msg_size: 8 },
            duration: Duration::from_secs(10),
            max_conns: Some(1),
            nodelay: true,
            timeline_buckets: None,
            read_size: STREAM_READ_SIZE,
        })
        .unwrap()
        .run()
    });
    let report = client::rr(&client_opts(&addr.into(), 1, 200), 8).unwrap();
    assert!(report.transactions > 0);
    assert_eq!(server.join().unwrap().unwrap().conns, 1);
}

#[test]
fn stream_timelines_account_for_every_byte_on_one_time_axis() {
    let (addr, server) = start_server_with(
        V4,
        Service::Stream(Check::Checksum),
        Duration::from_secs(20),
        Some(2),
        Some(10_000),
    );
    let first = thread::spawn({
        let addr = addr.clone();
        move || {
            client::stream(
                &client_opts(&addr, 1, 300),
                SizeRange::fixed(65536),
                Check::Checksum,
            )
            .unwrap()
        }
    });
    // The second connection starts later, so its series must start later on the shared axis.
    thread::sleep(Duration::from_millis(150));
    let second = client::stream(
        &client_opts(&addr, 1, 100),
        SizeRange::fixed(65536),
        Check::Checksum,
    )
    .unwrap();
    let first = first.join().unwrap();
    let server = server.join().unwrap().unwrap();
    let mut starts = Vec::new();
    for report in [&first, &second] {
        let conn = &report.connections[0];
        let seen = server_conn(&server, &conn.local);
        let t = seen
            .timeline
            .as_ref()
            .expect("a timeline per stream connection");
        assert_eq!(t.bucket_ms, 1);
        assert!(!t.truncated);
        assert_eq!(t.bytes.iter().sum::<u64>(), conn.bytes, "{t:?}");
        // About its duration long (scheduling may stretch it, never shrink it much).
        assert!(
            t.bytes.len() >= 50 && t.bytes.len() < 5_000,
            "{}",
            t.bytes.len()
        );
        starts.push(t.first_ms);
    }
    assert!(
        starts[1] >= starts[0] + 100,
        "the later connection starts later: {starts:?}"
    );
}

/// A socket path of its own per test, in a directory removed at the end.
struct UnixDir(std::path::PathBuf);

impl UnixDir {
    fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("ql-lg-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn endpoint(&self) -> Endpoint {
        Endpoint::Unix(self.0.join("s.sock"))
    }
}

impl Drop for UnixDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn unix_sockets_carry_streams_and_ping_pong_and_leave_no_file() {
    let dir = UnixDir::new("serve");
    let at = dir.endpoint().to_string();
    let (addr, server) = start_server(
        &at,
        Service::Stream(Check::Checksum),
        Duration::from_secs(20),
        Some(1),
    );
    assert_eq!(addr, dir.endpoint());
    let report = client::stream(
        &client_opts(&addr, 1, 300),
        SizeRange {
            min: 1,
            max: 1 << 20,
        },
        Check::Checksum,
    )
    .unwrap();
    let server = server.join().unwrap().unwrap();
    assert!(report.checksum_ok, "{report:?}");
    assert_eq!((server.bytes, server.conns), (report.bytes, 1));
    assert_eq!(
        server.connections[0].checksum,
        Some(report.connections[0].checksum)
    );
    assert!(
        !dir.0.join("s.sock").exists(),
        "the stream server left its socket file"
    );

    let (addr, server) = start_server(
        &at,
        Service::Rr { msg_size: 64 },
        Duration::from_secs(20),
        Some(1),
    );
    let report = client::rr(&client_opts(&addr, 1, 200), 64).unwrap();
    let server = server.join().unwrap().unwrap();
    assert!(report.transactions > 100, "{report:?}");
    assert_eq!(report.mismatches, 0);
    assert_eq!(
        server.connections[0].transactions,
        Some(report.transactions)
    );
    assert!(report.p50_us > 0.0 && report.p99_us >= report.p50_us);
}

#[test]
fn connect_mode_over_a_unix_socket_is_refused_on_both_ends() {
    let dir = UnixDir::new("connect");
    let at = dir.endpoint().to_string();
    for side in [
        vec!["loadgen", "server", "--listen", &at, "--mode", "connect"],
        vec!["loadgen", "client", "--connect", &at, "--mode", "connect"],
    ] {
        let args = LoadgenArgs::try_parse_from(&side).unwrap();
        let err = run_with_output(args, &mut Vec::new()).unwrap_err();
        assert!(
            matches!(err, Error::Usage(m) if m.contains("ADDR:PORT")),
            "{side:?}"
        );
    }
    assert!(!dir.0.join("s.sock").exists());
}

/// One stream of `size`-byte writes, checked by `check`, to a server that only counts.
fn stream_to_a_counting_server(size: usize, check: Check) -> (StreamReport, ServerReport) {
    let (addr, server) = start_server(
        V4,
        Service::Stream(Check::Length),
        Duration::from_secs(20),
        Some(1),
    );
    let report =
        client::stream(&client_opts(&addr, 1, 150), SizeRange::fixed(size), check).unwrap();
    (report, server.join().unwrap().unwrap())
}

#[test]
fn length_checked_streams_count_every_byte_without_hashing() {
    let (report, server) = stream_to_a_counting_server(65536, Check::Length);
    assert!(report.checksum_ok, "{report:?}");
    assert_eq!(report.check, Check::Length);
    assert_eq!(server.bytes, report.bytes);
    let seen = server_conn(&server, &report.connections[0].local);
    assert_eq!((seen.bytes, seen.checksum), (report.bytes, None));
}

#[test]
fn a_length_only_server_cannot_vouch_for_a_checksum() {
    let (report, _) = stream_to_a_counting_server(4096, Check::Checksum);
    assert!(!report.checksum_ok, "{report:?}");
}

#[test]
fn a_small_read_size_still_receives_every_byte() {
    let server = Server::bind(ServerOptions {
        listen: V4.parse().unwrap(),
        service: Service::Stream(Check::Checksum),
        duration: Duration::from_secs(20),
        max_conns: Some(1),
        nodelay: true,
        timeline_buckets: None,
        read_size: 1000,
    })
    .unwrap();
    let addr = server.local_addr().clone();
    let server = thread::spawn(move || server.run());
    let report = client::stream(
        &client_opts(&addr, 1, 200),
        SizeRange::fixed(65536),
        Check::Checksum,
    )
    .unwrap();
    let server = server.join().unwrap().unwrap();
    assert!(report.checksum_ok, "{report:?}");
    assert_eq!(server.bytes, report.bytes);
}

#[test]
fn read_sizes_are_for_stream_servers_only() {
    let args = LoadgenArgs::try_parse_from([
        "loadgen",
        "server",
        "--listen",
        V4,
        "--mode",
        "rr",
        "--msg-size",
        "8",
        "--read-size",
        "64",
    ])
    .unwrap();
    assert_usage_error(args, "--read-size");
    for bad in ["0", "x"] {
        assert!(LoadgenArgs::try_parse_from([
            "loadgen",
            "server",
            "--listen",
            V4,
            "--read-size",
            bad,
        ])
        .is_err());
    }
}

#[test]
fn length_checks_are_for_streams_only() {
    for side in [
        vec![
            "loadgen",
            "server",
            "--listen",
            V4,
            "--mode",
            "rr",
            "--msg-size",
            "8",
            "--check",
            "length",
        ],
        vec![
            "loadgen",
            "client",
            "--connect",
            "127.0.0.1:1",
            "--mode",
            "rr",
            "--msg-size",
            "8",
            "--check",
            "length",
        ],
    ] {
        assert_usage_error(LoadgenArgs::try_parse_from(&side).unwrap(), "--check");
    }
}

/// A reader thread waits in read() beside the writer and takes the server's reply; the
/// stream still matches on both ends.
#[test]
fn a_stream_with_a_reader_thread_gets_its_reply_there() {
    let (addr, server) = start_server(
        V4,
        Service::Stream(Check::Checksum),
        Duration::from_secs(20),
        Some(1),
    );
    // Short and on one connection: the timeline test beside it needs the CPUs.
    let opts = ClientOptions {
        reader_thread: true,
        ..client_opts(&addr, 1, 50)
    };
    let report = client::stream(&opts, SizeRange::fixed(512), Check::Checksum).unwrap();
    let server = server.join().unwrap().unwrap();
    assert!(report.checksum_ok, "{report:?}");
    assert!(report.msgs > 2, "{report:?}");
    assert_eq!((server.conns, server.bytes), (1, report.bytes));
}

#[test]
fn reader_threads_are_for_streams_only() {
    let args = LoadgenArgs::try_parse_from([
        "loadgen",
        "client",
        "--connect",
        "127.0.0.1:1",
        "--mode",
        "rr",
        "--msg-size",
        "8",
        "--reader-thread",
    ])
    .unwrap();
    assert_usage_error(args, "--reader-thread");
}

/// Arguments that parse but are refused when run, naming `flag`, before anything starts.
fn assert_usage_error(args: LoadgenArgs, flag: &str) {
    let err = run_with_output(args, &mut Vec::new()).unwrap_err();
    assert!(
        matches!(&err, Error::Usage(m) if m.contains(flag)),
        "{flag}: {err}"
    );
}
