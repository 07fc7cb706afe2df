//! qperf: `tcp_lat` (one-way latency, half the round trip, as qperf defines it) and `tcp_bw`
//! (one-way bandwidth), at a given message size.
//!
//! qperf prints one block per test; with `-vu` each block also echoes the message size and
//! time it used, which the harness checks against what it asked for:
//!
//! ```text
//! tcp_lat:
//!     latency   =  9.5 us
//!     msg_size  =    1 KiB (1,024)
//!     time      =    1 sec
//! ```
//!
//! Values carry their own units, scaled by powers of 1000 (bandwidth `bytes/sec` .. `TB/sec`,
//! or `bits/sec` .. `Tb/sec` with `-ub`; time `ns` .. `sec`); sizes that are a multiple of
//! 1024 are shown in KiB with the exact byte count in parentheses. The parser normalises
//! latency to microseconds and bandwidth to MB/s (1e6 bytes per second).

use std::net::IpAddr;

use super::{number, ParseError};

const TOOL: &str = "qperf";

/// The qperf tests the harness runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Test {
    TcpLat,
    TcpBw,
}

impl Test {
    pub fn name(self) -> &'static str {
        match self {
            Self::TcpLat => "tcp_lat",
            Self::TcpBw => "tcp_bw",
        }
    }
}

/// Client arguments for one test at one message size against the qperf server on `host`.
///
/// qperf only takes whole seconds (`-t 0.5` makes it hang), so the duration is whole seconds
/// too; `-vu` makes it echo the size and time it used.
pub fn client_args(host: IpAddr, secs: u32, msg_size: u64, test: Test) -> Vec<String> {
    vec![
        host.to_string(),
        "-t".into(),
        secs.max(1).to_string(),
        "-m".into(),
        msg_size.to_string(),
        "-vu".into(),
        test.name().into(),
    ]
}

/// One test's block.
#[derive(Debug, Clone, PartialEq)]
pub struct Block {
    pub test: String,
    /// `latency`, in microseconds (tcp_lat).
    pub latency_us: Option<f64>,
    /// `bw`, in MB/s of 1e6 bytes (tcp_bw).
    pub bandwidth_mb_s: Option<f64>,
    /// `msg_size` in bytes, when printed (`-vu`).
    pub msg_size: Option<u64>,
    /// `time` in seconds, when printed (`-vu`).
    pub time_s: Option<f64>,
}

/// Parses everything qperf printed: one [`Block`] per test, in order.
///
/// Fails on an error line (qperf prints e.g. `127.0.0.1: failed to connect` on stdout), on a
/// value with an unknown unit, and on a block with neither a latency nor a bandwidth.
pub fn parse(output: &str) -> Result<Vec<Block>, ParseError> {
    let mut blocks: Vec<Block> = Vec::new();
    for line in output.lines() {
        if line.trim().is_empty() {
            continue;
        }
        if !line.starts_with(char::is_whitespace) {
            let Some(test) = line.strip_suffix(':') else {
                return Err(ParseError::new(
                    TOOL,
                    format!("qperf reported {:?}", line.trim()),
                    output,
                ));
            };
            blocks.push(Block {
                test: test.to_owned(),
                latency_us: None,
                bandwidth_mb_s: None,
                msg_size: None,
                time_s: None,
            });
            continue;
        }
        let Some(block) = blocks.last_mut() else {
            return Err(ParseError::new(
                TOOL,
                format!("value line {:?} before any test name", line.trim()),
                output,
            ));
        };
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| ParseError::new(TOOL, format!("no `=` in {:?}", line.trim()), output))?;
        let bad = |what: &str| {
            ParseError::new(
                TOOL,
                format!("cannot read {what} from {:?}", line.trim()),
                output,
            )
        };
        match key.trim() {
            "latency" => block.latency_us = Some(time_us(value).ok_or_else(|| bad("a latency"))?),
            "bw" => {
                block.bandwidth_mb_s = Some(bandwidth(value).ok_or_else(|| bad("a bandwidth"))?);
            }
            "msg_size" => block.msg_size = Some(size(value).ok_or_else(|| bad("a size"))?),
            "time" => block.time_s = Some(time_us(value).ok_or_else(|| bad("a time"))? / 1e6),
            // Verbose extras (msg_rate, send_cost, cpus_used, ...) are not needed.
            _ => {}
        }
    }
    if blocks.is_empty() {
        return Err(ParseError::new(TOOL, "no test results", output));
    }
    if let Some(empty) = blocks
        .iter()
        .find(|b| b.latency_us.is_none() && b.bandwidth_mb_s.is_none())
    {
        return Err(ParseError::new(
            TOOL,
            format!("test {:?} has neither a latency nor a bw line", empty.test),
            output,
        ));
    }
    Ok(blocks)
}

/// Splits `"  9.5 us"` into the number and the unit; ignores a trailing `(...)`.
fn value_and_unit(text: &str) -> Option<(f64, &str)> {
    let text = text.split('(').next()?.trim();
    let (num, unit) = text.split_once(char::is_whitespace)?;
    Some((number(num)?, unit.trim()))
}

fn time_us(text: &str) -> Option<f64> {
    let (value, unit) = value_and_unit(text)?;
    let scale = match unit {
        "ns" => 1e-3,
        "us" => 1.0,
        "ms" => 1e3,
        "sec" => 1e6,
        _ => return None,
    };
    Some(value * scale)
}

fn bandwidth(text: &str) -> Option<f64> {
    let (value, unit) = value_and_unit(text)?;
    let bytes_per_s = match unit {
        "bytes/sec" => 1.0,
        "KB/sec" => 1e3,
        "MB/sec" => 1e6,
        "GB/sec" => 1e9,
        "TB/sec" => 1e12,
        "bits/sec" => 1.0 / 8.0,
        "Kb/sec" => 1e3 / 8.0,
        "Mb/sec" => 1e6 / 8.0,
        "Gb/sec" => 1e9 / 8.0,
        "Tb/sec" => 1e12 / 8.0,
        _ => return None,
    };
    Some(value * bytes_per_s / 1e6)
}

fn size(text: &str) -> Option<u64> {
    // "1 KiB (1,024)": the exact count in parentheses wins over the rounded display.
    if let Some((_, exact)) = text.split_once('(') {
        return number(exact.trim_end().strip_suffix(')')?).map(|v| v as u64);
    }
    let (value, unit) = value_and_unit(text)?;
    let scale = match unit {
        "bytes" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        _ => return None,
    };
    Some((value * scale).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_are_normalised() {
        assert_eq!(time_us(" 850 ns"), Some(0.85));
        assert_eq!(time_us(" 1.5 ms"), Some(1500.0));
        assert_eq!(time_us(" 2 sec"), Some(2e6));
        assert_eq!(bandwidth(" 3.52 GB/sec"), Some(3520.0));
        assert_eq!(bandwidth(" 441 MB/sec"), Some(441.0));
        assert_eq!(bandwidth(" 130 Mb/sec"), Some(16.25));
        assert_eq!(bandwidth(" 2 KB/sec"), Some(0.002));
        assert_eq!(size(" 4 KiB (4,096)"), Some(4096));
        assert_eq!(size(" 256 bytes"), Some(256));
        assert_eq!(size(" 1.5 KB"), Some(1500));
        assert_eq!(time_us(" 3 fortnights"), None);
        assert_eq!(bandwidth(" 3 furlongs/sec"), None);
    }

    #[test]
    fn client_arguments_round_up_to_whole_seconds() {
        let args = client_args("10.77.1.2".parse().unwrap(), 0, 4096, Test::TcpBw);
        assert_eq!(
            args,
            ["10.77.1.2", "-t", "1", "-m", "4096", "-vu", "tcp_bw"]
        );
    }
}
