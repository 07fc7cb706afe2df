//! Bytes received per millisecond on one connection, for rates at a resolution the
//! per-connection totals cannot give (how fast a flow takes its share when another starts).
//!
//! Bytes count in the bucket of the moment `read` returned them, on the server's clock, so
//! every connection of one server shares the same time axis. That is the receiving
//! application's view: a reader that was not scheduled for 3 ms books 3 ms of arrivals in one
//! bucket, which is why consumers look at windows of several buckets.

use std::time::Instant;

use serde::{Deserialize, Serialize};

/// Most buckets a connection may record: 100 s at 1 ms, about 1 MB of JSON.
pub const MAX_BUCKETS: usize = 100_000;

/// Width of a bucket.
pub const BUCKET_MS: u64 = 1;

/// The recorded series of one connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiveTimeline {
    pub bucket_ms: u64,
    /// The first bucket's start, in ms since the server started (the bucket of the first
    /// byte).
    pub first_ms: u64,
    /// Bytes per bucket from `first_ms` on; empty if nothing arrived.
    pub bytes: Vec<u64>,
    /// Bytes arrived after the last bucket the cap allowed; they are in the totals only.
    pub truncated: bool,
}

/// Builds a [`ReceiveTimeline`] while a connection is read.
#[derive(Debug)]
pub struct Recorder {
    origin: Instant,
    cap: usize,
    series: ReceiveTimeline,
}

impl Recorder {
    /// Buckets count from `origin` (the server's start); at most `cap` (clamped to
    /// [`MAX_BUCKETS`]) after the first byte.
    pub fn new(origin: Instant, cap: usize) -> Self {
        Self {
            origin,
            cap: cap.min(MAX_BUCKETS),
            series: ReceiveTimeline {
                bucket_ms: BUCKET_MS,
                first_ms: 0,
                bytes: Vec::new(),
                truncated: false,
            },
        }
    }

    /// Books `n` bytes that `read` returned just now.
    pub fn record(&mut self, n: usize) {
        let ms = Instant::now()
            .saturating_duration_since(self.origin)
            .as_millis();
        self.record_at(u64::try_from(ms).unwrap_or(u64::MAX), n as u64);
    }

    /// Books `n` bytes at `ms` since the origin.
    pub fn record_at(&mut self, ms: u64, n: u64) {
        let s = &mut self.series;
        if s.bytes.is_empty() {
            s.first_ms = ms;
        }
        // Reads return in time order, so `ms` never precedes the first bucket.
        let index = usize::try_from(ms.saturating_sub(s.first_ms)).unwrap_or(usize::MAX);
        if index >= self.cap {
            s.truncated = true;
            return;
        }
        if index >= s.bytes.len() {
            s.bytes.resize(index + 1, 0);
        }
        s.bytes[index] += n;
    }

    pub fn finish(self) -> ReceiveTimeline {
        self.series
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_start_at_the_first_byte_and_fill_gaps_with_zeros() {
        let mut r = Recorder::new(Instant::now(), 10);
        r.record_at(5, 100);
        r.record_at(5, 20);
        r.record_at(8, 7);
        let t = r.finish();
        assert_eq!(t.first_ms, 5);
        assert_eq!(t.bytes, vec![120, 0, 0, 7]);
        assert!(!t.truncated);
    }

    #[test]
    fn the_cap_bounds_the_series_and_says_so() {
        let mut r = Recorder::new(Instant::now(), 3);
        r.record_at(0, 1);
        r.record_at(2, 1);
        r.record_at(3, 1);
        r.record_at(1000, 1);
        let t = r.finish();
        assert_eq!(t.bytes, vec![1, 0, 1]);
        assert!(t.truncated);
    }

    #[test]
    fn the_cap_never_exceeds_the_maximum() {
        let mut r = Recorder::new(Instant::now(), usize::MAX);
        r.record_at(0, 1);
        r.record_at(MAX_BUCKETS as u64, 1);
        let t = r.finish();
        assert_eq!(t.bytes.len(), 1);
        assert!(t.truncated);
    }

    #[test]
    fn live_reads_land_in_early_buckets() {
        let mut r = Recorder::new(Instant::now(), 1000);
        r.record(10);
        let t = r.finish();
        assert!(t.first_ms < 1000, "{t:?}");
        assert_eq!(t.bytes.iter().sum::<u64>(), 10);
    }
}
