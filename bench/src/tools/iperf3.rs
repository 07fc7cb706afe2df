//! iperf3 with `--json`: one-way TCP throughput.
//!
//! iperf3 exits 0 even when it could not connect, with an `"error"` member in its JSON, so the
//! parser checks for that before it looks for numbers.

use std::net::IpAddr;

use serde_json::Value;

use super::ParseError;

const TOOL: &str = "iperf3";

/// Client arguments for a `secs`-second upload to the iperf3 server at `host:port`.
///
/// iperf3 only takes whole seconds (`-t 0.5` is read as 0: run forever).
pub fn client_args(host: IpAddr, port: u16, secs: u32) -> Vec<String> {
    vec![
        "-c".into(),
        host.to_string(),
        "-p".into(),
        port.to_string(),
        "-t".into(),
        secs.max(1).to_string(),
        "--json".into(),
    ]
}

/// A TCP upload with congestion control `cc` (e.g. `cubic`).
pub fn tcp_args(host: IpAddr, port: u16, secs: u32, cc: &str) -> Vec<String> {
    let mut args = client_args(host, port, secs);
    args.extend(["-C".into(), cc.into()]);
    args
}

/// A UDP upload offered at `bits_per_sec` in `len`-byte datagrams.
pub fn udp_args(host: IpAddr, port: u16, secs: u32, bits_per_sec: u64, len: u32) -> Vec<String> {
    let mut args = client_args(host, port, secs);
    args.extend([
        "-u".into(),
        "-b".into(),
        bits_per_sec.to_string(),
        "-l".into(),
        len.to_string(),
    ]);
    args
}

/// A TCP upload that also reports the receiver's rate every `interval_secs`: the server
/// must run with `-J` (and `-i` at the same interval) for its intervals to come back as JSON.
pub fn tcp_args_with_receiver_intervals(
    host: IpAddr,
    port: u16,
    secs: u32,
    cc: &str,
    interval_secs: f64,
) -> Vec<String> {
    let mut args = tcp_args(host, port, secs, cc);
    args.extend([
        "-i".into(),
        format!("{interval_secs}"),
        "--get-server-output".into(),
    ]);
    args
}

/// One receiver interval, in seconds from the test's start.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interval {
    pub start: f64,
    pub end: f64,
    pub bits_per_second: f64,
}

/// The receiver's intervals from a `--get-server-output` run against a `-J` server.
pub fn receiver_intervals(output: &str) -> Result<Vec<Interval>, ParseError> {
    let json: Value = serde_json::from_str(output)
        .map_err(|e| ParseError::new(TOOL, format!("not JSON ({e})"), output))?;
    let intervals = json["server_output_json"]["intervals"]
        .as_array()
        .ok_or_else(|| {
            ParseError::new(
                TOOL,
                "no server_output_json.intervals (server not in -J mode?)",
                output,
            )
        })?;
    intervals
        .iter()
        .map(|i| {
            let sum = &i["sum"];
            match (
                sum["start"].as_f64(),
                sum["end"].as_f64(),
                sum["bits_per_second"].as_f64(),
            ) {
                (Some(start), Some(end), Some(bits_per_second)) => Ok(Interval {
                    start,
                    end,
                    bits_per_second,
                }),
                _ => Err(ParseError::new(
                    TOOL,
                    format!("a receiver interval without start/end/bits_per_second: {sum}"),
                    output,
                )),
            }
        })
        .collect()
}

/// The totals of one run.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    pub sent_bytes: u64,
    /// What the server received; the figure the harness reports.
    pub received_bytes: u64,
    /// The receiver's measured interval.
    pub seconds: f64,
    /// Received bits per second / 1e9.
    pub gbit_per_s: f64,
    pub retransmits: u64,
    /// What the sender put on the wire, bits per second / 1e9 (for UDP: the offered load
    /// it managed).
    pub sent_gbit_per_s: f64,
}

pub fn parse(output: &str) -> Result<Run, ParseError> {
    let json: Value = serde_json::from_str(output)
        .map_err(|e| ParseError::new(TOOL, format!("not JSON ({e})"), output))?;
    if let Some(error) = json.get("error") {
        return Err(ParseError::new(
            TOOL,
            format!("iperf3 reported {error}"),
            output,
        ));
    }
    let end = &json["end"];
    let field = |section: &str, name: &str| {
        end[section][name].as_f64().ok_or_else(|| {
            ParseError::new(TOOL, format!("no number at end.{section}.{name}"), output)
        })
    };
    let seconds = field("sum_received", "seconds")?;
    let bits_per_second = field("sum_received", "bits_per_second")?;
    if seconds <= 0.0 || bits_per_second <= 0.0 {
        return Err(ParseError::new(
            TOOL,
            format!("the run moved no data ({bits_per_second} bit/s over {seconds} s)"),
            output,
        ));
    }
    Ok(Run {
        sent_bytes: field("sum_sent", "bytes")? as u64,
        received_bytes: field("sum_received", "bytes")? as u64,
        seconds,
        gbit_per_s: bits_per_second / 1e9,
        // Absent on some platforms and for UDP.
        retransmits: end["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
        sent_gbit_per_s: end["sum_sent"]["bits_per_second"].as_f64().unwrap_or(0.0) / 1e9,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_seconds_only() {
        let args = client_args("10.77.0.1".parse().unwrap(), 5201, 0);
        assert_eq!(args, ["-c", "10.77.0.1", "-p", "5201", "-t", "1", "--json"]);
    }

    #[test]
    fn tcp_and_udp_extras() {
        let host = "10.77.2.2".parse().unwrap();
        assert_eq!(
            tcp_args(host, 5201, 2, "cubic").join(" "),
            "-c 10.77.2.2 -p 5201 -t 2 --json -C cubic"
        );
        assert_eq!(
            udp_args(host, 5201, 2, 400_000_000, 1400).join(" "),
            "-c 10.77.2.2 -p 5201 -t 2 --json -u -b 400000000 -l 1400"
        );
    }

    #[test]
    fn receiver_intervals_come_from_the_servers_json() {
        let json = r#"{"server_output_json":{"intervals":[
            {"sum":{"start":0,"end":0.1,"bits_per_second":4e8}},
            {"sum":{"start":0.1,"end":0.2,"bits_per_second":5e7}}]}}"#;
        let iv = receiver_intervals(json).unwrap();
        assert_eq!(iv.len(), 2);
        assert_eq!(
            iv[1],
            Interval {
                start: 0.1,
                end: 0.2,
                bits_per_second: 5e7
            }
        );
        let err = receiver_intervals(r#"{"server_output_text":"..."}"#).unwrap_err();
        assert!(err.to_string().contains("-J"), "{err}");
    }

    #[test]
    fn a_run_without_data_is_an_error() {
        let json = r#"{"end":{"sum_sent":{"bytes":0,"seconds":0},"sum_received":{"bytes":0,"seconds":0,"bits_per_second":0}}}"#;
        let err = parse(json).unwrap_err();
        assert!(err.to_string().contains("moved no data"), "{err}");
    }
}
