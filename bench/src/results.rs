//! The results file (`results.json`): what was measured, how, on what, and what it means.
//!
//! Shape, for other tools: top level `{"scenario", "profile", "host", "results", "ratios",
//! ...}`; each result `{"metric", "msg_size", "mode", "unit", "median", "min", "max", "q1",
//! "q3", "samples"}`; each ratio `{"metric", "msg_size", "value", "better", "target", "met",
//! ...}`. `msg_size` is null for figures without one (connect rate, iperf3 throughput).
//! The qos scenario's ratios also carry `compares` and `unit` (what is judged, since not every
//! check is accelerated / baseline), and its results `timelines`; bypass results have neither.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::host::Host;
use crate::stats::Summary;

/// Which path (arm of the comparison) a figure was measured on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The agent not running: plain kernel sockets.
    Baseline,
    /// The agent running with the scenario's datapath attached.
    Accelerated,
    /// qos: the agent running with its QoS config; no qdisc of ours.
    Quicklane,
    /// qos: no quicklane QoS; an htb tree configured for the same rates.
    Htb,
    /// qos: no quicklane QoS; a tbf qdisc configured for the same rate.
    Tbf,
    /// qos: the agent with its QoS config and the bypass on, as a node runs it: same-node
    /// traffic of a pod within its rate is redirected, the rest shaped.
    #[serde(rename = "quicklane+bypass")]
    QuicklaneBypass,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Self::Baseline => "baseline",
            Self::Accelerated => "accelerated",
            Self::Quicklane => "quicklane",
            Self::Htb => "htb",
            Self::Tbf => "tbf",
            Self::QuicklaneBypass => "quicklane+bypass",
        }
    }
}

/// Which direction of a ratio is an improvement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Better {
    Lower,
    Higher,
    /// Closer to 1.0 is better, and the target is the allowed deviation from 1.0 either way:
    /// a rate held to its configured limit is neither better above nor below it.
    Near,
}

impl Better {
    /// Whether `value` satisfies `target` in this direction.
    pub fn meets(self, value: f64, target: f64) -> bool {
        match self {
            Self::Lower => value <= target,
            Self::Higher => value >= target,
            Self::Near => (value - 1.0).abs() <= target,
        }
    }

    /// `value` is worse than `reference` by more than `margin`.
    pub fn worse_beyond(self, value: f64, reference: f64, margin: f64) -> bool {
        match self {
            Self::Lower => value > reference + margin,
            Self::Higher => value < reference - margin,
            Self::Near => (value - 1.0).abs() > (reference - 1.0).abs() + margin,
        }
    }

    pub fn symbol(self) -> &'static str {
        match self {
            Self::Lower => "<=",
            Self::Higher => ">=",
            Self::Near => "1 ±",
        }
    }
}

/// One figure on one path: every repetition's sample and their spread.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Figure {
    pub metric: String,
    pub msg_size: Option<u64>,
    pub mode: Mode,
    pub unit: String,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub q1: f64,
    pub q3: f64,
    /// In repetition order.
    pub samples: Vec<f64>,
}

/// accelerated / baseline for one metric, against the target the issue set for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ratio {
    pub metric: String,
    pub msg_size: Option<u64>,
    /// Median accelerated over median baseline.
    pub value: f64,
    pub better: Better,
    pub target: f64,
    pub met: bool,
    /// Where the target comes from.
    pub target_source: String,
    /// Per-repetition ratios (each repetition's accelerated over the same repetition's
    /// baseline, measured back to back), and their spread: the ratio's own noise.
    pub samples: Vec<f64>,
    pub min: f64,
    pub max: f64,
    /// What `value` is when it is not accelerated / baseline of `metric`, e.g. "quicklane /
    /// htb" or "quicklane, absolute"; absent in the bypass scenario.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compares: Option<String>,
    /// The unit of `value` when it is not a plain ratio (e.g. "ms").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// The metric whose baseline `value` divides by when it is not `metric`'s own (a
    /// reference: the TCP figure an AF_UNIX one is set against).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub against: Option<String>,
}

/// A received-bytes series at a fixed bucket width, e.g. a flow's arrivals per millisecond
/// around a preemption.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Timeline {
    /// What the series is, e.g. `qos.preemption.hi`.
    pub name: String,
    pub mode: Mode,
    pub rep: usize,
    pub bucket_ms: f64,
    /// Time of the first bucket's start relative to the scenario's reference event (e.g. the
    /// high-priority flow's first byte), in ms; negative when the series starts before it.
    pub start_ms: f64,
    pub bytes: Vec<u64>,
}

/// One tool invocation, exactly as run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandRecord {
    /// Repetition (from 0); null for the warm-up run, whose numbers are not used.
    pub rep: Option<usize>,
    pub mode: Mode,
    /// Where it ran: `pod0`, `pod1`, or `node` (the node's host namespace).
    pub place: String,
    pub argv: Vec<String>,
    /// Its stdout, relative to the results directory.
    pub raw: String,
}

impl CommandRecord {
    pub fn command_line(&self) -> String {
        self.argv.join(" ")
    }
}

/// The agent's counters at the end of one accelerated block: evidence that the accelerated
/// path was taken (or, for non-eligible flows, missed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentBlock {
    pub rep: usize,
    /// Which part of the scenario the block measured, where a repetition has several (qos).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block: Option<String>,
    pub counters: BTreeMap<String, u64>,
}

/// How the run was configured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub reps: usize,
    pub msg_sizes: Vec<u64>,
    /// Seconds per tool run, by tool.
    pub seconds: BTreeMap<String, f64>,
    /// The mode (arm) order of each repetition.
    pub order: Vec<Vec<Mode>>,
    /// The harness's own command line.
    pub command: String,
    /// Scenario parameters beyond the above, e.g. the rates each arm was configured for.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub params: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Results {
    pub scenario: String,
    pub profile: String,
    pub host: Host,
    pub settings: Settings,
    pub wall_seconds: f64,
    pub results: Vec<Figure>,
    pub ratios: Vec<Ratio>,
    /// Bounds, not targets: what a path the agent does not touch reaches against the same
    /// baseline (bypass: AF_UNIX / TCP), judged against the target of the metric it bounds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub references: Vec<Ratio>,
    #[serde(default)]
    pub agent: Vec<AgentBlock>,
    /// Things a reader of the numbers should know (e.g. an accelerated block that redirected
    /// nothing).
    #[serde(default)]
    pub notes: Vec<String>,
    #[serde(default)]
    pub commands: Vec<CommandRecord>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub timelines: Vec<Timeline>,
}

impl Results {
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        serde_json::from_str(&text).map_err(|e| Error::BadResults {
            path: path.to_owned(),
            problem: e.to_string(),
        })
    }

    pub fn figure(&self, metric: &str, msg_size: Option<u64>, mode: Mode) -> Option<&Figure> {
        self.results
            .iter()
            .find(|f| f.metric == metric && f.msg_size == msg_size && f.mode == mode)
    }
}

impl Figure {
    pub fn new(
        metric: &str,
        msg_size: Option<u64>,
        mode: Mode,
        unit: &str,
        samples: Vec<f64>,
    ) -> Option<Self> {
        let s = Summary::of(&samples)?;
        Some(Self {
            metric: metric.to_owned(),
            msg_size,
            mode,
            unit: unit.to_owned(),
            median: s.median,
            min: s.min,
            max: s.max,
            q1: s.q1,
            q3: s.q3,
            samples,
        })
    }
}

/// How a metric is judged.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Target {
    pub better: Better,
    pub value: f64,
    pub source: &'static str,
}

impl Ratio {
    /// The ratio of `accelerated` to `baseline` (same metric and size, samples paired by
    /// repetition); `None` if a baseline sample is zero.
    pub fn between(baseline: &Figure, accelerated: &Figure, target: Target) -> Option<Self> {
        if baseline.median <= 0.0 || baseline.samples.contains(&0.0) {
            return None;
        }
        let value = accelerated.median / baseline.median;
        let samples: Vec<f64> = baseline
            .samples
            .iter()
            .zip(&accelerated.samples)
            .map(|(b, a)| a / b)
            .collect();
        let spread = Summary::of(&samples)?;
        Some(Self {
            metric: baseline.metric.clone(),
            msg_size: baseline.msg_size,
            value,
            better: target.better,
            target: target.value,
            met: target.better.meets(value, target.value),
            target_source: target.source.to_owned(),
            samples,
            min: spread.min,
            max: spread.max,
            compares: None,
            unit: None,
            against: None,
        })
    }

    /// A judged quantity that is not accelerated / baseline: `samples` are its
    /// per-repetition values (in repetition order), `value` their median.
    pub fn of_samples(
        metric: &str,
        compares: &str,
        unit: Option<&str>,
        samples: Vec<f64>,
        target: Target,
    ) -> Option<Self> {
        let spread = Summary::of(&samples)?;
        Some(Self {
            metric: metric.to_owned(),
            msg_size: None,
            value: spread.median,
            better: target.better,
            target: target.value,
            met: target.better.meets(spread.median, target.value),
            target_source: target.source.to_owned(),
            samples,
            min: spread.min,
            max: spread.max,
            compares: Some(compares.to_owned()),
            unit: unit.map(str::to_owned),
            against: None,
        })
    }
}

/// `1`, `4 KiB`, `64 KiB`: message sizes as people write them.
pub fn size_label(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 20 && b.is_multiple_of(1 << 20) => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b.is_multiple_of(1 << 10) => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figure(mode: Mode, samples: &[f64]) -> Figure {
        Figure::new("m", Some(64), mode, "us", samples.to_vec()).unwrap()
    }

    #[test]
    fn ratio_of_medians_with_paired_spread() {
        let base = figure(Mode::Baseline, &[10.0, 12.0, 11.0]);
        let fast = figure(Mode::Accelerated, &[5.0, 3.0, 5.5]);
        let target = Target {
            better: Better::Lower,
            value: 0.45,
            source: "test",
        };
        let r = Ratio::between(&base, &fast, target).unwrap();
        assert!((r.value - 5.0 / 11.0).abs() < 1e-12);
        assert!(!r.met, "0.4545 is above 0.45");
        assert_eq!(r.samples, vec![0.5, 0.25, 0.5]);
        assert_eq!((r.min, r.max), (0.25, 0.5));
    }

    #[test]
    fn zero_baselines_have_no_ratio() {
        let base = figure(Mode::Baseline, &[0.0, 1.0, 1.0]);
        let fast = figure(Mode::Accelerated, &[1.0, 1.0, 1.0]);
        let target = Target {
            better: Better::Higher,
            value: 1.0,
            source: "test",
        };
        assert!(Ratio::between(&base, &fast, target).is_none());
    }

    #[test]
    fn near_targets_are_two_sided() {
        assert!(Better::Near.meets(0.96, 0.05));
        assert!(Better::Near.meets(1.04, 0.05));
        assert!(!Better::Near.meets(0.94, 0.05));
        assert!(!Better::Near.meets(1.06, 0.05));
        // 1.10 is further from 1 than 0.97 by more than the margin either way round.
        assert!(Better::Near.worse_beyond(1.10, 0.97, 0.02));
        assert!(!Better::Near.worse_beyond(0.97, 1.02, 0.02));
    }

    #[test]
    fn sample_ratios_take_the_median_and_keep_their_spread() {
        let target = Target {
            better: Better::Lower,
            value: 20.0,
            source: "test",
        };
        let r = Ratio::of_samples(
            "p",
            "quicklane, absolute",
            Some("ms"),
            vec![3.0, 30.0, 5.0],
            target,
        )
        .unwrap();
        assert_eq!((r.value, r.min, r.max), (5.0, 3.0, 30.0));
        assert!(r.met);
        assert_eq!(r.unit.as_deref(), Some("ms"));
        assert!(Ratio::of_samples("p", "x", None, vec![], target).is_none());
    }

    #[test]
    fn sizes_read_like_people_write_them() {
        assert_eq!(size_label(1), "1 B");
        assert_eq!(size_label(256), "256 B");
        assert_eq!(size_label(4096), "4 KiB");
        assert_eq!(size_label(65536), "64 KiB");
        assert_eq!(size_label(1000), "1000 B");
    }

    #[test]
    fn wire_shape() {
        let json = serde_json::to_value(figure(Mode::Accelerated, &[1.0, 2.0])).unwrap();
        for key in [
            "metric", "msg_size", "mode", "unit", "median", "min", "max", "samples",
        ] {
            assert!(json.get(key).is_some(), "{key} missing in {json}");
        }
        assert_eq!(json["mode"], "accelerated");
    }
}
