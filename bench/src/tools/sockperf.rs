//! sockperf `ping-pong` over TCP: round-trip (with `--full-rtt`) or one-way (half the round
//! trip) latency percentiles.
//!
//! sockperf discards a 400 ms warm-up and a 50 ms tail from the `-t` window, and sleeps 2 s
//! before it starts, so a `-t 1` run takes about 3.2 s and measures 0.55 s of it. Its
//! statistics look like this (some lines wrapped in ANSI colour codes):
//!
//! ```text
//! sockperf: ====> avg-rtt=6.607 (std-dev=40.573)
//! sockperf: Total 82763 observations; each percentile contains 827.63 observations
//! sockperf: ---> <MAX> observation = 4387.002
//! sockperf: ---> percentile 99.999 = 3819.048
//! ...
//! sockperf: ---> percentile 50.000 =    5.877
//! sockperf: ---> <MIN> observation =    5.595
//! ```

use std::net::IpAddr;

use super::{number, strip_ansi, ParseError};

const TOOL: &str = "sockperf";

/// Fixed time a ping-pong run spends outside its `-t` window (start-up sleep, exit).
pub const OVERHEAD_SECS: f64 = 2.3;
/// Of that, the sleep after start-up before any message is sent.
pub const START_SLEEP_SECS: f64 = 2.0;

/// Server arguments: TCP on every address of the pod, `port`.
pub fn server_args(port: u16) -> Vec<String> {
    vec![
        "server".into(),
        "--tcp".into(),
        "-i".into(),
        "0.0.0.0".into(),
        "-p".into(),
        port.to_string(),
    ]
}

/// Client arguments: `msg_size`-byte TCP ping-pong for `secs` whole seconds, round-trip times.
pub fn ping_pong_args(host: IpAddr, port: u16, msg_size: u64, secs: u32) -> Vec<String> {
    vec![
        "ping-pong".into(),
        "--tcp".into(),
        "-i".into(),
        host.to_string(),
        "-p".into(),
        port.to_string(),
        "-m".into(),
        msg_size.to_string(),
        "-t".into(),
        secs.max(1).to_string(),
        "--full-rtt".into(),
    ]
}

/// The statistics of one ping-pong run, in microseconds.
#[derive(Debug, Clone, PartialEq)]
pub struct PingPong {
    /// True for `--full-rtt` (round trip), false for sockperf's default half round trip.
    pub round_trip: bool,
    pub avg_us: f64,
    pub observations: u64,
    pub min_us: f64,
    pub max_us: f64,
    /// `(percentile, microseconds)` as printed, highest percentile first.
    pub percentiles: Vec<(f64, f64)>,
}

impl PingPong {
    /// The printed value for `percentile` (e.g. 99.0), if sockperf printed that one.
    pub fn percentile(&self, percentile: f64) -> Option<f64> {
        self.percentiles
            .iter()
            .find(|(p, _)| (p - percentile).abs() < 1e-9)
            .map(|&(_, us)| us)
    }
}

pub fn parse(output: &str) -> Result<PingPong, ParseError> {
    let text = strip_ansi(output);
    if let Some(error) = text.lines().find(|l| l.contains("ERROR")) {
        return Err(ParseError::new(
            TOOL,
            format!("sockperf reported {:?}", error.trim()),
            output,
        ));
    }
    let mut avg = None;
    let mut observations = None;
    let mut min = None;
    let mut max = None;
    let mut percentiles = Vec::new();
    for line in text.lines() {
        let line = line.trim().trim_start_matches("sockperf:").trim();
        if let Some(rest) = line.strip_prefix("====> avg-") {
            // "rtt=6.607 (std-dev=40.573)" or "latency=10.627 (std-dev=5.739)"
            let (kind, value) = rest.split_once('=').unwrap_or_default();
            let value = value.split_whitespace().next().and_then(number);
            avg = value.map(|v| (kind == "rtt", v));
        } else if let Some(rest) = line.strip_prefix("Total ") {
            observations = rest.split_whitespace().next().and_then(number);
        } else if let Some(rest) = line.strip_prefix("---> <MAX> observation =") {
            max = number(rest);
        } else if let Some(rest) = line.strip_prefix("---> <MIN> observation =") {
            min = number(rest);
        } else if let Some(rest) = line.strip_prefix("---> percentile") {
            let (p, us) = rest
                .split_once('=')
                .ok_or_else(|| ParseError::new(TOOL, format!("no `=` in {line:?}"), output))?;
            match (number(p), number(us)) {
                (Some(p), Some(us)) => percentiles.push((p, us)),
                _ => {
                    return Err(ParseError::new(
                        TOOL,
                        format!("cannot read a percentile from {line:?}"),
                        output,
                    ))
                }
            }
        }
    }
    let missing = |what: &str| ParseError::new(TOOL, format!("no {what} line"), output);
    let (round_trip, avg_us) = avg.ok_or_else(|| missing("`avg-rtt`/`avg-latency`"))?;
    let observations = observations.ok_or_else(|| missing("`Total N observations`"))? as u64;
    if observations == 0 {
        return Err(ParseError::new(TOOL, "no observations", output));
    }
    if percentiles.is_empty() {
        return Err(missing("`percentile`"));
    }
    Ok(PingPong {
        round_trip,
        avg_us,
        observations,
        min_us: min.ok_or_else(|| missing("`<MIN> observation`"))?,
        max_us: max.ok_or_else(|| missing("`<MAX> observation`"))?,
        percentiles,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_arguments() {
        let args = ping_pong_args("10.77.1.2".parse().unwrap(), 11111, 64, 2);
        assert_eq!(
            args.join(" "),
            "ping-pong --tcp -i 10.77.1.2 -p 11111 -m 64 -t 2 --full-rtt"
        );
    }

    #[test]
    fn a_garbled_percentile_is_an_error() {
        let out = "sockperf: ====> avg-rtt=6.6 (std-dev=1)\nsockperf: Total 10 observations\n\
                   sockperf: ---> percentile 50.000 = fast\n";
        let err = parse(out).unwrap_err();
        assert!(err.to_string().contains("percentile"), "{err}");
    }
}
