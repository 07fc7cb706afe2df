//! Regression mode: a run's ratios against a stored baseline run's, flagged only when worse
//! by more than the two runs' own measured noise.
//!
//! The noise of a ratio is the half-range of its per-repetition ratios (each repetition's
//! accelerated over the same repetition's baseline). A ratio regresses when it is worse than
//! the stored one by more than the sum of both half-ranges: each run may be off by its own
//! spread, so only a difference larger than both together is evidence of a change.

use std::fmt::Write as _;

use crate::results::{size_label, Better, Ratio, Results};

#[derive(Debug, Clone, PartialEq)]
pub struct Regression {
    pub metric: String,
    pub msg_size: Option<u64>,
    pub better: Better,
    pub current: f64,
    pub stored: f64,
    pub noise: f64,
    /// The values' unit when they are not ratios (`x`).
    pub unit: Option<String>,
}

impl Regression {
    /// How much worse, relative to the stored ratio, in percent.
    pub fn worse_by_pct(&self) -> f64 {
        (self.current - self.stored).abs() / self.stored * 100.0
    }

    pub fn describe(&self) -> String {
        let unit = self
            .unit
            .as_deref()
            .map_or_else(|| "x".to_owned(), |u| format!(" {u}"));
        format!(
            "{}{}: {:.3}{unit} now vs {:.3}{unit} stored ({} is better): worse by {:.3} ({}), noise +/-{:.3}",
            self.metric,
            self.msg_size
                .map_or_else(String::new, |s| format!(" @ {}", size_label(s))),
            self.current,
            self.stored,
            match self.better {
                Better::Lower => "lower",
                Better::Higher => "higher",
                Better::Near => "closer to 1",
            },
            (self.current - self.stored).abs(),
            // A stored zero (e.g. no retransmits) has no relative change.
            if self.stored == 0.0 {
                "from 0".to_owned()
            } else {
                format!("{:.1} %", self.worse_by_pct())
            },
            self.noise
        )
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Comparison {
    /// Ratios present in both runs.
    pub compared: usize,
    pub regressions: Vec<Regression>,
    /// Ratios of the current run the stored one lacks (new sizes or metrics).
    pub unmatched: Vec<String>,
}

impl Comparison {
    pub fn render(&self) -> String {
        let mut out = format!(
            "compared {} ratio(s) with the stored baseline: {} regressed",
            self.compared,
            self.regressions.len()
        );
        for r in &self.regressions {
            let _ = write!(out, "\n  REGRESSED {}", r.describe());
        }
        if !self.unmatched.is_empty() {
            let _ = write!(
                out,
                "\n  not in the stored baseline (not compared): {}",
                self.unmatched.join(", ")
            );
        }
        out
    }
}

fn half_range(r: &Ratio) -> f64 {
    (r.max - r.min).abs() / 2.0
}

pub fn compare(current: &Results, stored: &Results) -> Comparison {
    let mut cmp = Comparison::default();
    for now in &current.ratios {
        let Some(then) = stored
            .ratios
            .iter()
            .find(|r| r.metric == now.metric && r.msg_size == now.msg_size)
        else {
            cmp.unmatched.push(match now.msg_size {
                Some(size) => format!("{} @ {}", now.metric, size_label(size)),
                None => now.metric.clone(),
            });
            continue;
        };
        cmp.compared += 1;
        let noise = half_range(now) + half_range(then);
        if now.better.worse_beyond(now.value, then.value, noise) {
            cmp.regressions.push(Regression {
                metric: now.metric.clone(),
                msg_size: now.msg_size,
                better: now.better,
                current: now.value,
                stored: then.value,
                noise,
                unit: now.unit.clone(),
            });
        }
    }
    cmp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ratio(metric: &str, better: Better, samples: &[f64]) -> Ratio {
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        Ratio {
            metric: metric.into(),
            msg_size: Some(64),
            value: sorted[sorted.len() / 2],
            better,
            target: 1.0,
            met: true,
            target_source: "test".into(),
            samples: samples.to_vec(),
            min: sorted[0],
            max: sorted[sorted.len() - 1],
            compares: None,
            unit: None,
            against: None,
        }
    }

    fn results(ratios: Vec<Ratio>) -> Results {
        let mut r: Results =
            serde_json::from_str(include_str!("../tests/fixtures/results_minimal.json")).unwrap();
        r.ratios = ratios;
        r
    }

    #[test]
    fn within_noise_is_not_a_regression() {
        let stored = results(vec![ratio("lat", Better::Lower, &[0.40, 0.42, 0.44])]);
        // Worse by 0.03, noise 0.02 + 0.02.
        let now = results(vec![ratio("lat", Better::Lower, &[0.43, 0.45, 0.47])]);
        let cmp = compare(&now, &stored);
        assert_eq!((cmp.compared, cmp.regressions.len()), (1, 0));
    }

    #[test]
    fn beyond_noise_is_named_with_its_size() {
        let stored = results(vec![ratio("bw", Better::Higher, &[2.0, 2.1, 2.2])]);
        let now = results(vec![
            ratio("bw", Better::Higher, &[1.5, 1.6, 1.7]),
            ratio("new", Better::Higher, &[1.0]),
        ]);
        let cmp = compare(&now, &stored);
        assert_eq!(cmp.regressions.len(), 1);
        let r = &cmp.regressions[0];
        assert!((r.noise - 0.2).abs() < 1e-12);
        assert!((r.worse_by_pct() - 23.809_523_809_523_81).abs() < 1e-9);
        assert_eq!(cmp.unmatched, ["new @ 64 B"]);
        let text = cmp.render();
        assert!(
            text.contains("REGRESSED bw @ 64 B: 1.600x now vs 2.100x stored"),
            "{text}"
        );
        assert!(text.contains("(23.8 %)"), "{text}");
    }

    #[test]
    fn improvements_never_regress() {
        let stored = results(vec![ratio("lat", Better::Lower, &[0.5])]);
        let now = results(vec![ratio("lat", Better::Lower, &[0.3])]);
        assert!(compare(&now, &stored).regressions.is_empty());
    }
}
