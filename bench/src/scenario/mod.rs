//! Named benchmark scenarios. Each is a small module that builds its topology on a simulated
//! node, measures its arms (baseline and accelerated; for qos quicklane, htb and tbf)
//! interleaved, and returns [`Results`].

pub mod bypass;
pub mod qos;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::results::{Mode, Results};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// Same-node TCP bypass: qperf, sockperf, iperf3 and the load generator, pod to pod,
    /// over loopback, and to a non-eligible peer.
    Bypass,
    /// Bandwidth QoS: rate accuracy, priority under saturation and preemption, quicklane
    /// against htb and tbf configured for the same rates.
    Qos,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Self::Bypass => "bypass",
            Self::Qos => "qos",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// Under 2 minutes in total: CI and the demo.
    Quick,
    /// Every message size and path, more repetitions.
    Full,
}

impl Profile {
    pub fn name(self) -> &'static str {
        match self {
            Self::Quick => "quick",
            Self::Full => "full",
        }
    }
}

/// What the command line may change in a profile.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub reps: Option<usize>,
    /// Seconds per tool run; tools that only take whole seconds (qperf, sockperf, iperf3)
    /// round up, with at least 1.
    pub seconds: Option<f64>,
    pub sizes: Option<Vec<u64>>,
}

/// Where a run writes and what it runs.
#[derive(Debug, Clone)]
pub struct Context {
    /// The `quicklane` binary: the agent and the load generator.
    pub exe: PathBuf,
    pub out_dir: PathBuf,
    /// The harness's own command line, for the report.
    pub command_line: String,
}

pub fn run(
    scenario: Scenario,
    profile: Profile,
    overrides: &Overrides,
    ctx: &Context,
) -> Result<Results, Error> {
    match scenario {
        Scenario::Bypass => bypass::run(&bypass::Plan::new(profile, overrides), ctx),
        Scenario::Qos => qos::run(&qos::Plan::new(profile, overrides)?, ctx),
    }
}

/// Baseline first in even repetitions, accelerated first in odd ones, so a drift of the
/// machine during a repetition does not always favour the same mode. (The qos scenario has
/// three arms and rotates them: `qos::Plan::order`.)
pub fn mode_order(rep: usize) -> [Mode; 2] {
    if rep.is_multiple_of(2) {
        [Mode::Baseline, Mode::Accelerated]
    } else {
        [Mode::Accelerated, Mode::Baseline]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_alternate() {
        assert_eq!(mode_order(0), [Mode::Baseline, Mode::Accelerated]);
        assert_eq!(mode_order(1), [Mode::Accelerated, Mode::Baseline]);
        assert_eq!(mode_order(2), mode_order(0));
    }

    #[test]
    fn qos_refuses_flags_it_does_not_use_before_building_anything() {
        let ctx = Context {
            exe: PathBuf::from("/nonexistent"),
            out_dir: PathBuf::from("/nonexistent"),
            command_line: String::new(),
        };
        let overrides = Overrides {
            sizes: Some(vec![64]),
            ..Overrides::default()
        };
        let err = run(Scenario::Qos, Profile::Quick, &overrides, &ctx).unwrap_err();
        assert!(matches!(err, Error::Usage(_)), "{err}");
        let overrides = Overrides {
            reps: Some(0),
            ..Overrides::default()
        };
        let err = run(Scenario::Qos, Profile::Quick, &overrides, &ctx).unwrap_err();
        assert!(err.to_string().contains("--reps"), "{err}");
    }
}
