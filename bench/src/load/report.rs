//! The JSON lines the load generator prints, and their parsers for the benchmark harness.
//!
//! Rates use decimal units (1 MB = 1e6 bytes, 1 Gbit = 1e9 bits) like iperf and qperf, so the
//! numbers compare directly.

use serde::{Deserialize, Serialize};

use super::timeline::ReceiveTimeline;
use super::{Check, Endpoint, Error, Mode, SizeRange};

/// A final report line, tagged by `"kind"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Report {
    Stream(StreamReport),
    Rr(RrReport),
    Connect(ConnectReport),
    Server(ServerReport),
}

/// Progress lines printed before the report, tagged by `"event"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum Event {
    /// The server is bound; clients may connect from now on.
    Listening { addr: Endpoint },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamReport {
    pub peer: Endpoint,
    pub conns: u32,
    pub msg_size: SizeRange,
    pub nodelay: bool,
    pub seed: u64,
    /// What `checksum_ok` vouches for: every byte, or the byte count only.
    #[serde(default)]
    pub check: Check,
    /// The slowest connection's time from connect to the server's checksum reply.
    pub elapsed_s: f64,
    pub bytes: u64,
    pub msgs: u64,
    /// Megabytes (1e6 bytes) per second.
    pub throughput_mbps: f64,
    pub gbit_per_s: f64,
    /// All connections' digests matched the server's (checksums, or lengths: see `check`).
    pub checksum_ok: bool,
    /// Blocking reads that failed with EAGAIN before their timeout and were retried (see
    /// `client::read_exact_retrying`); nonzero means a path broke blocking-read semantics.
    pub spurious_eagain: u64,
    pub connections: Vec<StreamConnReport>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamConnReport {
    /// Client-side address, to pair this with the server's entry for the same connection.
    pub local: Endpoint,
    pub bytes: u64,
    pub msgs: u64,
    pub elapsed_s: f64,
    pub throughput_mbps: f64,
    pub gbit_per_s: f64,
    pub checksum: u64,
    pub server_checksum: u64,
    pub server_bytes: u64,
    pub checksum_ok: bool,
    pub spurious_eagain: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RrReport {
    pub peer: Endpoint,
    pub conns: u32,
    pub msg_size: usize,
    pub nodelay: bool,
    /// The slowest connection's time from connect to its last response.
    pub elapsed_s: f64,
    pub transactions: u64,
    pub tps: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub mean_us: f64,
    pub min_us: f64,
    pub max_us: f64,
    /// Responses that were not byte-for-byte the request.
    pub mismatches: u64,
    /// As in [`StreamReport::spurious_eagain`].
    pub spurious_eagain: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectReport {
    pub peer: Endpoint,
    pub threads: u32,
    pub elapsed_s: f64,
    pub connects: u64,
    pub connects_per_s: f64,
    /// Failed attempts after the server was first reached (e.g. a full accept queue).
    pub errors: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    pub p50_us: f64,
    pub p99_us: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerReport {
    pub listen: Endpoint,
    pub mode: Mode,
    pub elapsed_s: f64,
    pub conns: u64,
    pub bytes: u64,
    /// One entry per stream or rr connection; connect mode keeps only the count.
    pub connections: Vec<ServerConnReport>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerConnReport {
    pub peer: Endpoint,
    pub bytes: u64,
    /// Stream mode: checksum of everything received, as sent back to the client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<u64>,
    /// Rr mode: requests echoed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transactions: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Stream mode with `--timeline-buckets`: bytes received per millisecond.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeline: Option<ReceiveTimeline>,
}

/// Parses a final report line.
pub fn parse_report(line: &str) -> Result<Report, Error> {
    parse(line)
}

/// Parses the server's `listening` line into the address it is bound to.
pub fn parse_listening(line: &str) -> Result<Endpoint, Error> {
    parse(line).map(|Event::Listening { addr }| addr)
}

fn parse<T: for<'de> Deserialize<'de>>(line: &str) -> Result<T, Error> {
    serde_json::from_str(line.trim()).map_err(|source| Error::Parse {
        line: line.chars().take(200).collect(),
        source,
    })
}

/// `count / secs`, or 0 for a run too short to measure, so reports never carry NaN (which
/// JSON cannot represent).
pub(crate) fn per_second(count: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        count as f64 / secs
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Values with short exact binary forms, so equality after a JSON round trip is exact.
    fn reports() -> Vec<Report> {
        let peer: Endpoint = "[::1]:5001".parse().unwrap();
        vec![
            Report::Stream(StreamReport {
                peer: peer.clone(),
                conns: 1,
                msg_size: SizeRange { min: 1, max: 1024 },
                nodelay: true,
                seed: u64::MAX,
                check: Check::Length,
                elapsed_s: 0.5,
                bytes: 1000,
                msgs: 3,
                throughput_mbps: 0.062_5,
                gbit_per_s: 0.031_25,
                checksum_ok: false,
                spurious_eagain: 2,
                connections: vec![StreamConnReport {
                    local: "[::1]:40000".parse().unwrap(),
                    bytes: 1000,
                    msgs: 3,
                    elapsed_s: 0.5,
                    throughput_mbps: 0.062_5,
                    gbit_per_s: 0.031_25,
                    checksum: u64::MAX - 1,
                    server_checksum: 12,
                    server_bytes: 999,
                    checksum_ok: false,
                    spurious_eagain: 2,
                }],
            }),
            Report::Rr(RrReport {
                peer: "unix:/run/rr.sock".parse().unwrap(),
                conns: 2,
                msg_size: 1,
                nodelay: false,
                elapsed_s: 1.0,
                transactions: 10,
                tps: 10.0,
                p50_us: 12.5,
                p90_us: 20.0,
                p99_us: 30.25,
                p999_us: 40.0,
                mean_us: 15.75,
                min_us: 1.0,
                max_us: 50.0,
                mismatches: 0,
                spurious_eagain: 0,
            }),
            Report::Connect(ConnectReport {
                peer,
                threads: 4,
                elapsed_s: 0.25,
                connects: 100,
                connects_per_s: 400.0,
                errors: 1,
                first_error: Some("Connection refused".into()),
                p50_us: 8.0,
                p99_us: 64.0,
            }),
            Report::Server(ServerReport {
                listen: "0.0.0.0:5001".parse().unwrap(),
                mode: Mode::Rr,
                elapsed_s: 2.0,
                conns: 1,
                bytes: 64,
                connections: vec![ServerConnReport {
                    peer: "127.0.0.1:3333".parse().unwrap(),
                    bytes: 64,
                    checksum: None,
                    transactions: Some(64),
                    error: Some("timed out".into()),
                    timeline: Some(ReceiveTimeline {
                        bucket_ms: 1,
                        first_ms: 12,
                        bytes: vec![1448, 0, 2896],
                        truncated: false,
                    }),
                }],
            }),
        ]
    }

    #[test]
    fn reports_round_trip_through_parse_report() {
        for report in reports() {
            let line = serde_json::to_string(&report).unwrap();
            assert!(!line.contains('\n'));
            assert_eq!(parse_report(&line).unwrap(), report, "{line}");
        }
    }

    #[test]
    fn wire_shape_is_tagged_and_readable() {
        let line = serde_json::to_string(&reports()[0]).unwrap();
        assert!(
            line.starts_with(r#"{"kind":"stream","peer":"[::1]:5001""#),
            "{line}"
        );
        assert!(
            line.contains(r#""msg_size":{"min":1,"max":1024}"#),
            "{line}"
        );
        let server = serde_json::to_string(&reports()[3]).unwrap();
        assert!(server.contains(r#""mode":"rr""#), "{server}");
        assert!(!server.contains("checksum"), "{server}");
    }

    #[test]
    fn listening_line_parses() {
        let line = serde_json::to_string(&Event::Listening {
            addr: "127.0.0.1:5001".parse().unwrap(),
        })
        .unwrap();
        assert_eq!(line, r#"{"event":"listening","addr":"127.0.0.1:5001"}"#);
        assert_eq!(
            parse_listening(&format!("{line}\n")).unwrap(),
            "127.0.0.1:5001".parse::<Endpoint>().unwrap()
        );
    }

    #[test]
    fn garbage_is_a_parse_error_quoting_the_line() {
        let err = parse_report(r#"{"kind":"bogus"}"#).unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
        assert!(parse_report("not json").is_err());
        assert!(parse_listening(r#"{"kind":"server"}"#).is_err());
    }

    #[test]
    fn rates_of_unmeasurably_short_runs_are_zero_not_nan() {
        assert!(per_second(5, 0.0).abs() < f64::EPSILON);
        assert!((per_second(5, 0.5) - 10.0).abs() < f64::EPSILON);
    }
}
