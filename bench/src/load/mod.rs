//! quicklane's own load generator, over TCP or, for reference, AF_UNIX.
//!
//! It runs as `quicklane loadgen ...` inside simulated pods, so a benchmark needs nothing but
//! the quicklane binary, and reports one JSON line that the benchmark harness reads back with
//! [`parse_report`]. Blocking sockets and one thread per connection keep the generator itself
//! simple and predictable next to the path being measured.

pub mod checksum;
pub mod cli;
pub mod client;
pub mod conn;
pub mod prng;
pub mod report;
pub mod server;
pub mod timeline;

use std::io;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use conn::Endpoint;
pub use report::{parse_listening, parse_report, Report};

/// Largest message either side will buffer, so a typo in a size flag cannot exhaust a pod's
/// memory.
pub const MAX_MSG_SIZE: usize = 64 << 20;

/// Which traffic pattern a server answers or a client drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Bulk one-way transfer, verified by a checksum at the end.
    Stream,
    /// Request/response ping-pong of fixed-size messages, for latency.
    Rr,
    /// Connect and close, for connection-setup rate.
    Connect,
}

/// What a stream's end-of-stream reply vouches for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Check {
    /// Every byte, by checksum: what the correctness tests need.
    #[default]
    Checksum,
    /// The byte count only: a throughput measurement whose hashing on both ends would
    /// otherwise cost as much CPU as the path being measured.
    Length,
}

/// Inclusive message-size range; a fixed size is `min == max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SizeRange {
    pub min: usize,
    pub max: usize,
}

impl SizeRange {
    #[must_use]
    pub fn fixed(size: usize) -> Self {
        Self {
            min: size,
            max: size,
        }
    }
}

impl FromStr for SizeRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (min, max) = s
            .split_once(':')
            .ok_or_else(|| format!("expected MIN:MAX, got {s:?}"))?;
        let range = Self {
            min: parse_msg_size(min)?,
            max: parse_msg_size(max)?,
        };
        if range.min > range.max {
            return Err(format!(
                "MIN {} is larger than MAX {}",
                range.min, range.max
            ));
        }
        Ok(range)
    }
}

/// A message size in bytes, `1..=MAX_MSG_SIZE`.
pub(crate) fn parse_msg_size(s: &str) -> Result<usize, String> {
    let size: usize = s
        .trim()
        .parse()
        .map_err(|e| format!("bad size {s:?}: {e}"))?;
    if (1..=MAX_MSG_SIZE).contains(&size) {
        Ok(size)
    } else {
        Err(format!("size {size} is outside 1..={MAX_MSG_SIZE}"))
    }
}

/// Everything that can stop a load-generator run, naming the peer it was talking to.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bind {addr} failed: {source}")]
    Bind {
        addr: Endpoint,
        #[source]
        source: io::Error,
    },

    #[error("accept on {addr} failed: {source}")]
    Accept {
        addr: Endpoint,
        #[source]
        source: io::Error,
    },

    #[error("connect to {peer} failed after {:.1} s: {source}", .waited.as_secs_f64())]
    Connect {
        peer: Endpoint,
        waited: Duration,
        #[source]
        source: io::Error,
    },

    #[error("{op} {peer} failed: {source}")]
    Io {
        op: &'static str,
        peer: Endpoint,
        #[source]
        source: io::Error,
    },

    #[error("invalid arguments: {0}")]
    Usage(&'static str),

    #[error("{mismatched} of {conns} streams to {peer} came back with a different {}", match .check {
        Check::Checksum => "checksum",
        Check::Length => "length",
    })]
    ChecksumMismatch {
        peer: Endpoint,
        check: Check,
        mismatched: usize,
        conns: usize,
    },

    #[error("{mismatches} of {transactions} responses from {peer} differed from their requests")]
    ResponseMismatch {
        peer: Endpoint,
        mismatches: u64,
        transactions: u64,
    },

    #[error("malformed loadgen output line {line:?}: {source}")]
    Parse {
        line: String,
        #[source]
        source: serde_json::Error,
    },

    #[error("writing loadgen output failed: {0}")]
    Output(#[source] io::Error),

    #[error("keeping the load generator on CPU {cpu} failed: {source}")]
    Pin {
        cpu: usize,
        #[source]
        source: nix::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::{SizeRange, MAX_MSG_SIZE};

    #[test]
    fn size_ranges_parse_and_validate() {
        assert_eq!(
            "1:1048576".parse::<SizeRange>(),
            Ok(SizeRange {
                min: 1,
                max: 1 << 20
            })
        );
        assert_eq!("7:7".parse::<SizeRange>(), Ok(SizeRange::fixed(7)));
        for bad in [
            "",
            "5",
            "0:5",
            "6:5",
            "a:b",
            "1:",
            &format!("1:{}", MAX_MSG_SIZE + 1),
        ] {
            assert!(bad.parse::<SizeRange>().is_err(), "{bad:?} accepted");
        }
    }
}
