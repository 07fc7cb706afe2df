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
        // Absent on some platforms; not needed for the figures.
        retransmits: end["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
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
    fn a_run_without_data_is_an_error() {
        let json = r#"{"end":{"sum_sent":{"bytes":0,"seconds":0},"sum_received":{"bytes":0,"seconds":0,"bits_per_second":0}}}"#;
        let err = parse(json).unwrap_err();
        assert!(err.to_string().contains("moved no data"), "{err}");
    }
}
