//! Preemption from receive timelines: pure functions over bytes-per-millisecond series that
//! share one time axis (the load generator's server clock, see `load::timeline`).
//!
//! A rate "at" time t is the rate over the 10 ms window [t, t + 10 ms): one bucket is too
//! short to mean anything at these rates (a reader scheduled late books several ms of
//! arrivals in one bucket), and a window that starts at t also makes an instant preemption
//! read as 0 ms rather than as the window's length.

/// Window over which rates are judged, in ms (and buckets).
pub const WINDOW_MS: u64 = 10;

/// One flow's bytes per 1 ms bucket; bucket `i` covers `[first_ms + i, first_ms + i + 1)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow<'a> {
    pub first_ms: u64,
    pub bytes: &'a [u64],
}

impl Flow<'_> {
    /// One past the last bucket.
    pub fn end_ms(&self) -> u64 {
        self.first_ms + self.bytes.len() as u64
    }

    fn at(&self, ms: u64) -> u64 {
        ms.checked_sub(self.first_ms)
            .and_then(|i| self.bytes.get(usize::try_from(i).ok()?))
            .copied()
            .unwrap_or(0)
    }

    /// Mean rate in bits per second over `[from_ms, to_ms)`; 0 for an empty span.
    pub fn mean_bps(&self, from_ms: u64, to_ms: u64) -> f64 {
        if to_ms <= from_ms {
            return 0.0;
        }
        let bytes: u64 = (from_ms..to_ms).map(|ms| self.at(ms)).sum();
        bytes as f64 * 8.0 * 1000.0 / (to_ms - from_ms) as f64
    }

    /// Rate over the window starting at `ms`.
    pub fn window_bps(&self, ms: u64) -> f64 {
        self.mean_bps(ms, ms + WINDOW_MS)
    }
}

/// How long the high-priority flow took to get its share: from its first byte to the start
/// of the first window (at or after it) in which it received at least `fraction` of
/// `share_bps`. `None` if no window inside its series did.
pub fn hi_preemption_ms(hi: &Flow<'_>, share_bps: f64, fraction: f64) -> Option<u64> {
    let start = hi.first_ms;
    (start..hi.end_ms().saturating_sub(WINDOW_MS - 1))
        .find(|&t| hi.window_bps(t) >= fraction * share_bps)
        .map(|t| t - start)
}

/// How long the low-priority flow took to yield: from `t0` (the high-priority flow's first
/// byte) to the start of the first window in which it received at most `(1 + tolerance)` times
/// `guarantee_bps`. `None` if it never did within `[t0, until_ms)`.
pub fn lo_yield_ms(
    lo: &Flow<'_>,
    t0: u64,
    until_ms: u64,
    guarantee_bps: f64,
    tolerance: f64,
) -> Option<u64> {
    (t0..until_ms.saturating_sub(WINDOW_MS - 1))
        .find(|&t| lo.window_bps(t) <= (1.0 + tolerance) * guarantee_bps)
        .map(|t| t - t0)
}

/// Window rates every `step_ms` from `from_ms` while a whole window fits before `to_ms`, as
/// `(window start, bits per second)`: a series for charts.
pub fn window_series(flow: &Flow<'_>, from_ms: u64, to_ms: u64, step_ms: u64) -> Vec<(u64, f64)> {
    (from_ms..to_ms.saturating_sub(WINDOW_MS - 1))
        .step_by(usize::try_from(step_ms.max(1)).unwrap_or(usize::MAX))
        .map(|t| (t, flow.window_bps(t)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 1 Mbit/s is 125 bytes per ms.
    const MBIT_MS: u64 = 125;

    #[test]
    fn mean_rates_count_missing_buckets_as_silence() {
        let bytes = [MBIT_MS * 100; 20];
        let f = Flow {
            first_ms: 100,
            bytes: &bytes,
        };
        assert!((f.mean_bps(100, 120) - 100e6).abs() < 1e-6);
        // Half the span before the flow started.
        assert!((f.mean_bps(90, 110) - 50e6).abs() < 1e-6);
        assert!(f.mean_bps(120, 120).abs() < f64::EPSILON);
        assert_eq!(f.end_ms(), 120);
    }

    #[test]
    fn an_instant_preemption_is_zero() {
        let bytes = [MBIT_MS * 450; 50];
        let hi = Flow {
            first_ms: 1000,
            bytes: &bytes,
        };
        assert_eq!(hi_preemption_ms(&hi, 450e6, 0.95), Some(0));
    }

    #[test]
    fn a_ramp_is_timed_from_the_first_byte() {
        // 20 ms at 100 Mbit/s, then 450 Mbit/s: the first full window at >= 95 % of 450
        // starts at 20 ms.
        let mut bytes = vec![MBIT_MS * 100; 20];
        bytes.extend([MBIT_MS * 450; 40]);
        let hi = Flow {
            first_ms: 500,
            bytes: &bytes,
        };
        assert_eq!(hi_preemption_ms(&hi, 450e6, 0.95), Some(20));
        // A window straddling the step has 5 ms at each rate: 275 Mbit/s, not enough.
        assert!((hi.window_bps(515) - 275e6).abs() < 1e-6);
    }

    #[test]
    fn a_flow_that_never_gets_its_share_has_no_preemption_time() {
        let bytes = [MBIT_MS * 300; 100];
        let hi = Flow {
            first_ms: 0,
            bytes: &bytes,
        };
        assert_eq!(hi_preemption_ms(&hi, 450e6, 0.95), None);
        // Shorter than one window: nothing to judge.
        let short = Flow {
            first_ms: 0,
            bytes: &bytes[..5],
        };
        assert_eq!(hi_preemption_ms(&short, 1.0, 0.95), None);
    }

    #[test]
    fn lo_yields_once_a_window_is_within_tolerance_of_its_guarantee() {
        // lo at 500 Mbit/s until 1007 ms, 50 Mbit/s after; hi starts at 1000 ms.
        let mut bytes = vec![MBIT_MS * 500; 1007];
        bytes.extend([MBIT_MS * 50; 100]);
        let lo = Flow {
            first_ms: 0,
            bytes: &bytes,
        };
        assert_eq!(lo_yield_ms(&lo, 1000, 1100, 50e6, 0.10), Some(7));
        assert_eq!(lo_yield_ms(&lo, 1000, 1005, 50e6, 0.10), None);
    }

    #[test]
    fn chart_series_step_through_whole_windows() {
        let bytes = [MBIT_MS * 10; 40];
        let f = Flow {
            first_ms: 0,
            bytes: &bytes,
        };
        let s = window_series(&f, 0, 40, 10);
        assert_eq!(s.iter().map(|p| p.0).collect::<Vec<_>>(), [0, 10, 20, 30]);
        assert!(s.iter().all(|p| (p.1 - 10e6).abs() < 1e-6));
    }
}
