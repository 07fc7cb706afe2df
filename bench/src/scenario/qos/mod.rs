//! The qos scenario: quicklane's bandwidth QoS against htb and tbf configured for the same
//! rates, on one simulated node with three pods: `hi` (pod0, also the rate-limited sender),
//! `lo` (pod1) and `sink` (pod2, where every flow goes).
//!
//! Figure groups:
//!
//! - `rate-accuracy`: `hi` limited to L sends TCP (cubic, iperf3; one stream, then
//!   `STREAMS` at once) and UDP at 2L to `sink`: received rate / L and TCP retransmits /
//!   segments. Arms: quicklane, htb, tbf.
//! - `cpu`: CPU-seconds per Gbit of those TCP runs (the node's cgroup, `cpu.rs`).
//! - `priority`: capacity C; `hi` priority 0, `lo` priority 2 with guarantee G. `hi`'s
//!   sockperf ping-pong round trips to `sink`, idle and while `lo` saturates (iperf3), and
//!   `lo`'s rate meanwhile. Arms: quicklane, htb (tbf has no priorities: n/a), and
//!   quicklane+bypass: the agent as a node runs it, where `hi`'s same-node ping-pong is
//!   redirected while `lo`'s stream is shaped (these two steps only).
//! - `preemption`: `lo` streams alone, then `hi` starts a bulk stream; from the load
//!   generator's 1 ms receive timelines, the time until `hi` has 95 % of its share C - G and
//!   until `lo` is within 10 % of G. Arms: quicklane, htb.
//!
//! Each repetition runs every block (one per limit, and one for priority and preemption)
//! once per arm, back to back, the arm order rotating between repetitions. The quicklane arm
//! is the agent started with that block's `[qos]` config (bypass off) and stopped after it;
//! the htb and tbf arms run without the agent, with the qdiscs of `arms` installed over
//! netlink and removed after the block. See `arms` for where each arm shapes and why.

pub mod arms;
mod collect;
mod steps;
pub mod timeline;

use std::collections::BTreeMap;

use simnode::Node;

use super::{Context, Overrides, Profile};
use crate::error::Error;
use crate::host::Host;
use crate::progress::Progress;
use crate::qdisc;
use crate::results::{AgentBlock, Mode, Results, Settings, Timeline};
use crate::testbed::{self, Agent, Recorder};
use crate::tools::sockperf;
use collect::{checks, Collected};

/// The link the priority blocks share, and `lo`'s guarantee on it.
const CAPACITY_BPS: u64 = 500_000_000;
const GUARANTEE_BPS: u64 = 50_000_000;
/// Capacity for the rate-accuracy blocks: far above any limit, so the limit alone binds.
const RATE_CAPACITY_BPS: u64 = 10_000_000_000;
const MBIT: f64 = 1e6;
/// The agent's start, status read and stop per quicklane block, for the time estimate.
const AGENT_SECS: f64 = 1.2;
/// `lo`'s head start before `hi`'s sockperf, and its run beyond it.
const LO_LEAD_SECS: f64 = 0.3;
const LO_TAIL_SECS: f64 = 0.7;
/// `hi` has sent nothing for at least this long when its preemption stream starts: the case
/// preemption is about (a high-priority pod waking up), and longer than the agent's own
/// notion of an idle pod (its within-class idle timeout, 2 s today), so the time measured
/// includes noticing that `hi` is back.
const HI_IDLE_SECS: f64 = 3.0;
/// Between the end of `hi`'s last step and the preemption step's start (the saturated step's
/// tail, the stream server's start): counted towards `HI_IDLE_SECS` in the estimate.
const HI_GAP_SECS: f64 = LO_TAIL_SECS + 0.3;

/// Streams of `hi` in the rate-accuracy step that has several (`iperf3 -P`).
pub(crate) const STREAMS: u32 = 4;

/// The arms, in the order of repetition 0.
const ARMS: [Mode; 4] = [Mode::Quicklane, Mode::Htb, Mode::Tbf, Mode::QuicklaneBypass];

/// What a run measures and for how long.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub profile: Profile,
    pub reps: usize,
    /// Rate-accuracy limits, bits per second.
    pub limits_bps: Vec<u64>,
    pub capacity_bps: u64,
    pub guarantee_bps: u64,
    pub iperf3_secs: u32,
    pub sockperf_secs: u32,
    /// `lo` alone, then `hi` and `lo` together, each this long in the preemption step.
    pub phase_secs: f64,
}

impl Plan {
    pub fn new(profile: Profile, overrides: &Overrides) -> Result<Self, Error> {
        if overrides.sizes.is_some() {
            return Err(Error::Usage(
                "--sizes sets qperf message sizes, which the qos scenario does not use".into(),
            ));
        }
        let mut plan = match profile {
            // About 100 s of measuring on a 2-CPU machine.
            Profile::Quick => Self {
                profile,
                reps: 3,
                limits_bps: vec![200_000_000],
                capacity_bps: CAPACITY_BPS,
                guarantee_bps: GUARANTEE_BPS,
                iperf3_secs: 2,
                sockperf_secs: 1,
                phase_secs: 0.5,
            },
            Profile::Full => Self {
                profile,
                reps: 5,
                limits_bps: vec![50_000_000, 200_000_000, 1_000_000_000],
                capacity_bps: CAPACITY_BPS,
                guarantee_bps: GUARANTEE_BPS,
                iperf3_secs: 3,
                sockperf_secs: 2,
                phase_secs: 1.0,
            },
        };
        if let Some(reps) = overrides.reps {
            plan.reps = reps;
        }
        if let Some(secs) = overrides.seconds {
            let whole = secs.ceil().max(1.0) as u32;
            plan.iperf3_secs = whole;
            plan.sockperf_secs = whole;
            plan.phase_secs = secs;
        }
        Ok(plan)
    }

    fn blocks(&self) -> Vec<Block> {
        let mut blocks: Vec<Block> = self.limits_bps.iter().map(|&l| Block::Rate(l)).collect();
        blocks.push(Block::Priority);
        blocks
    }

    /// Repetition `rep`'s arm order: rotated by one per repetition, so each arm runs first,
    /// middle and last equally often and a drift of the machine favours none.
    pub fn order(rep: usize) -> Vec<Mode> {
        let mut order = ARMS.to_vec();
        order.rotate_left(rep % ARMS.len());
        order
    }

    /// The arms that run `block`: tbf has no priorities, and the bypass arm measures hi's
    /// latency only, in the full profile (the quick one must stay under two minutes).
    fn arms(&self, block: Block) -> Vec<Mode> {
        match block {
            Block::Rate(_) => vec![Mode::Quicklane, Mode::Htb, Mode::Tbf],
            Block::Priority if self.profile == Profile::Full => {
                vec![Mode::Quicklane, Mode::Htb, Mode::QuicklaneBypass]
            }
            Block::Priority => vec![Mode::Quicklane, Mode::Htb],
        }
    }

    /// `block`'s steps on `arm`. Several streams only in the full profile: the quick one
    /// must stay under two minutes.
    fn steps(&self, block: Block, arm: Mode) -> Vec<Step> {
        match (block, arm) {
            (Block::Rate(limit), _) if self.profile == Profile::Full => {
                vec![Step::Tcp(limit), Step::Streams(limit), Step::Udp(limit)]
            }
            (Block::Rate(limit), _) => vec![Step::Tcp(limit), Step::Udp(limit)],
            // The bypass changes hi's latency; preemption is the shaper's alone.
            (Block::Priority, Mode::QuicklaneBypass) => vec![Step::Idle, Step::Saturated],
            (Block::Priority, _) => vec![Step::Idle, Step::Saturated, Step::Preemption],
        }
    }

    fn step_secs(&self, step: Step) -> f64 {
        // Measured here: iperf3 takes its -t plus ~0.15 s; sockperf its -t plus its fixed
        // start-up; the preemption step its two phases plus process starts.
        let sockperf = f64::from(self.sockperf_secs) + sockperf::OVERHEAD_SECS;
        match step {
            Step::Tcp(_) | Step::Streams(_) | Step::Udp(_) => f64::from(self.iperf3_secs) + 0.15,
            Step::Idle => sockperf,
            Step::Saturated => sockperf + LO_LEAD_SECS + LO_TAIL_SECS,
            Step::Preemption => self.lo_alone_secs(None) + self.phase_secs + 0.4,
        }
    }

    /// How long `lo` streams alone before `hi` starts: the phase, or longer while `hi` has
    /// not yet been idle for `HI_IDLE_SECS` (`hi_idle`: for how long it has been so far;
    /// `None` plans with the usual gap after the saturated step).
    fn lo_alone_secs(&self, hi_idle: Option<f64>) -> f64 {
        let idle = hi_idle.unwrap_or(HI_GAP_SECS);
        self.phase_secs.max(HI_IDLE_SECS - idle)
    }

    fn block_secs(&self, block: Block, arm: Mode) -> f64 {
        let steps: f64 = self
            .steps(block, arm)
            .iter()
            .map(|&s| self.step_secs(s))
            .sum();
        steps + if agent_arm(arm) { AGENT_SECS } else { 0.05 }
    }

    /// Planned seconds for the whole run.
    pub fn estimate(&self) -> f64 {
        let rep: f64 = self
            .blocks()
            .into_iter()
            .flat_map(|b| self.arms(b).into_iter().map(move |a| (b, a)))
            .map(|(b, a)| self.block_secs(b, a))
            .sum();
        self.reps as f64 * rep
    }

    fn step_count(&self) -> usize {
        self.reps
            * self
                .blocks()
                .into_iter()
                .flat_map(|b| {
                    self.arms(b)
                        .into_iter()
                        .map(move |a| self.steps(b, a).len())
                })
                .sum::<usize>()
    }

    fn settings(&self, command: &str, params: BTreeMap<String, String>) -> Settings {
        Settings {
            reps: self.reps,
            msg_sizes: Vec::new(),
            seconds: [
                ("iperf3", f64::from(self.iperf3_secs)),
                ("sockperf", f64::from(self.sockperf_secs)),
                ("preemption_phase", self.phase_secs),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
            order: (0..self.reps).map(Self::order).collect(),
            command: command.to_owned(),
            params,
        }
    }
}

/// One configuration of the arms, measured by a few steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    /// `hi` limited to this many bits per second.
    Rate(u64),
    /// Capacity, priorities and `lo`'s guarantee: the priority and preemption steps.
    Priority,
}

impl Block {
    fn name(self) -> String {
        match self {
            Self::Rate(limit) => format!("rate-accuracy-{}", arms::quantity(limit)),
            Self::Priority => "priority".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Tcp(u64),
    /// `STREAMS` TCP streams at once into the limit.
    Streams(u64),
    Udp(u64),
    /// `hi`'s ping-pong with `lo` idle.
    Idle,
    /// `hi`'s ping-pong while `lo` saturates.
    Saturated,
    Preemption,
}

impl Step {
    fn label(self) -> String {
        match self {
            Self::Tcp(l) => format!("iperf3 tcp cubic, limit {}", arms::quantity(l)),
            Self::Streams(l) => format!(
                "iperf3 tcp cubic, {STREAMS} streams, limit {}",
                arms::quantity(l)
            ),
            Self::Udp(l) => format!(
                "iperf3 udp at {} into limit {}",
                arms::quantity(2 * l),
                arms::quantity(l)
            ),
            Self::Idle => "sockperf hi ping-pong, lo idle".into(),
            Self::Saturated => "sockperf hi ping-pong, lo saturating".into(),
            Self::Preemption => "loadgen lo alone, then hi preempts".into(),
        }
    }
}

/// What the run collected besides the figures.
#[derive(Debug, Default)]
struct Extras {
    agent: Vec<AgentBlock>,
    notes: Vec<String>,
    timelines: Vec<Timeline>,
    params: BTreeMap<String, String>,
}

/// The fixed parts of a run: the node, the recorder and what has been collected.
struct Bench<'a> {
    ctx: &'a Context,
    plan: &'a Plan,
    node: &'a Node,
    rec: Recorder,
    collected: Collected,
    extras: Extras,
    /// When `hi` last sent anything, for its idle time before the preemption stream.
    hi_sent: Option<std::time::Instant>,
}

pub fn run(plan: &Plan, ctx: &Context) -> Result<Results, Error> {
    if plan.reps == 0 {
        return Err(Error::Usage("--reps must be at least 1".into()));
    }
    testbed::require_tools(&["iperf3", "sockperf"])?;
    let host = Host::collect(&[("iperf3", "--version"), ("sockperf", "--version")]);
    let node = Node::new(3)?;
    let mut bench = Bench {
        ctx,
        plan,
        node: &node,
        rec: Recorder::new(&ctx.out_dir)?,
        collected: Collected::default(),
        extras: Extras::default(),
        hi_sent: None,
    };
    let progress = Progress::new(plan.estimate(), plan.step_count());
    let outcome = bench.measure(progress);
    let Bench {
        rec,
        collected,
        mut extras,
        ..
    } = bench;
    // Everything measure() started is gone with its guards; now the node itself.
    let teardown = node.teardown();
    let wall = outcome?;
    teardown?;

    if host.loadavg[0] > host.cpus as f64 / 2.0 {
        extras.notes.push(format!(
            "the machine was busy when the run started (load average {:.2} on {} CPUs): \
             expect more noise than usual",
            host.loadavg[0], host.cpus
        ));
    }
    let ratios = checks(plan, &collected);
    let figures = collected.figures();
    Ok(Results {
        scenario: "qos".into(),
        profile: plan.profile.name().into(),
        settings: plan.settings(&ctx.command_line, extras.params),
        host,
        wall_seconds: wall,
        results: figures,
        ratios,
        references: Vec::new(),
        agent: extras.agent,
        notes: extras.notes,
        commands: rec.commands,
        timelines: extras.timelines,
    })
}

/// Whether `arm` is the agent (rather than a qdisc).
fn agent_arm(arm: Mode) -> bool {
    matches!(arm, Mode::Quicklane | Mode::QuicklaneBypass)
}

/// An arm set up for one block; undone by [`Bench::finish`], or by its guards on an error.
enum Armed<'a> {
    Agent(Agent),
    Qdisc(qdisc::Installed<'a>),
}

impl<'a> Bench<'a> {
    fn measure(&mut self, mut progress: Progress) -> Result<f64, Error> {
        self.describe_arms();
        let _servers = self.start_servers()?;
        // Resolves the neighbours on every veth and warms the path; not a sample.
        self.warm_up()?;
        for rep in 0..self.plan.reps {
            let order = Plan::order(rep);
            for block in self.plan.blocks() {
                let arms = self.plan.arms(block);
                for &arm in order.iter().filter(|a| arms.contains(a)) {
                    let armed = self.arm(block, arm, rep)?;
                    for step in self.plan.steps(block, arm) {
                        progress.begin(rep, self.plan.reps, arm, &step.label());
                        self.step(step, arm, rep)?;
                        progress.end(self.plan.step_secs(step));
                    }
                    self.finish(armed, block, arm, rep)?;
                }
            }
        }
        Ok(progress.elapsed().as_secs_f64())
    }

    /// Each arm's exact configuration per block, for the report.
    fn describe_arms(&mut self) {
        let sink = self.node.pod(2).host_ifname().to_owned();
        let mut described = Vec::new();
        for block in self.plan.blocks() {
            for arm in self.plan.arms(block) {
                let text = match self.shaper(block, arm) {
                    Some(shaper) => shaper.describe(&sink),
                    None => format!(
                        "agent with [qos] (bypass {}), see raw/*{}-{}.toml",
                        if arm == Mode::QuicklaneBypass {
                            "on"
                        } else {
                            "off"
                        },
                        arm.name(),
                        block.name()
                    ),
                };
                described.push((format!("{}.{}", arm.name(), block.name()), text));
            }
        }
        let p = &mut self.extras.params;
        p.extend(described);
        p.insert("capacity".into(), arms::quantity(self.plan.capacity_bps));
        p.insert("guarantee".into(), arms::quantity(self.plan.guarantee_bps));
        p.insert(
            "limits".into(),
            self.plan
                .limits_bps
                .iter()
                .map(|&l| arms::quantity(l))
                .collect::<Vec<_>>()
                .join(","),
        );
        p.insert("baseline_queue_ms".into(), arms::HORIZON_MS.to_string());
        p.insert("baseline_burst_ms".into(), arms::BURST_MS.to_string());
    }

    /// The qdisc a baseline arm installs for `block`; `None` for quicklane.
    fn shaper(&self, block: Block, arm: Mode) -> Option<qdisc::Shaper> {
        let (hi, lo) = (self.node.pod(0), self.node.pod(1));
        match (block, arm) {
            (Block::Rate(limit), Mode::Htb) => Some(arms::htb_limit(limit)),
            (Block::Rate(limit), Mode::Tbf) => Some(arms::tbf(limit)),
            (Block::Priority, Mode::Htb) => Some(arms::htb_priority(
                self.plan.capacity_bps,
                self.plan.guarantee_bps,
                hi.ipv4(),
                lo.ipv4(),
            )),
            _ => None,
        }
    }

    fn agent_config(&self, block: Block, arm: Mode) -> String {
        let (hi, lo, sink) = (self.node.pod(0), self.node.pod(1), self.node.pod(2));
        let q = arms::quantity;
        let (capacity, pods) = match block {
            Block::Rate(limit) => (
                RATE_CAPACITY_BPS,
                vec![
                    (hi, vec![("kubernetes.io/egress-bandwidth", q(limit))]),
                    (lo, vec![]),
                    (sink, vec![]),
                ],
            ),
            Block::Priority => (
                self.plan.capacity_bps,
                vec![
                    (hi, vec![("quicklane.io/priority", "0".to_owned())]),
                    (
                        lo,
                        vec![
                            ("quicklane.io/priority", "2".to_owned()),
                            ("quicklane.io/egress-guarantee", q(self.plan.guarantee_bps)),
                        ],
                    ),
                    (sink, vec![]),
                ],
            ),
        };
        arms::agent_config(self.node, capacity, &pods, arm == Mode::QuicklaneBypass)
    }

    fn arm(&mut self, block: Block, arm: Mode, rep: usize) -> Result<Armed<'a>, Error> {
        if let Some(shaper) = self.shaper(block, arm) {
            let ifname = self.node.pod(2).host_ifname().to_owned();
            return Ok(Armed::Qdisc(qdisc::install(self.node, &ifname, &shaper)?));
        }
        let text = self.agent_config(block, arm);
        let name = format!("{}-{}", arm.name(), block.name());
        if rep == 0 {
            self.rec.save(&name, "toml", &text)?;
        }
        std::fs::create_dir_all(self.node.run_dir())
            .map_err(|e| Error::io(format!("creating {}", self.node.run_dir().display()), e))?;
        let path = self.node.run_dir().join(format!("{name}.toml"));
        std::fs::write(&path, &text)
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
        Ok(Armed::Agent(Agent::start(
            self.node,
            &self.ctx.exe,
            &path,
            &mut self.rec,
        )?))
    }

    /// Undoes an arm; for the agent, keeps its counters and checks that it shaped.
    fn finish(
        &mut self,
        armed: Armed<'_>,
        block: Block,
        arm: Mode,
        rep: usize,
    ) -> Result<(), Error> {
        match armed {
            Armed::Qdisc(installed) => installed.remove(),
            Armed::Agent(agent) => {
                let status = agent.status(self.node, &self.ctx.exe)?;
                agent.stop()?;
                let counters = testbed::counters_of(&status);
                if counters.get("tc.qos_shaped_packets").copied().unwrap_or(0) == 0 {
                    self.extras.notes.push(format!(
                        "repetition {}, {}: the agent shaped no packet, so its figures are \
                         those of unshaped traffic",
                        rep + 1,
                        block.name()
                    ));
                }
                if let Some(e) = status["qos"]["policy"]["enforcement"].as_str() {
                    self.extras
                        .params
                        .insert("quicklane.enforcement".into(), e.to_owned());
                }
                let name = match arm {
                    Mode::QuicklaneBypass => format!("{} (with the bypass)", block.name()),
                    _ => block.name(),
                };
                self.extras.agent.push(AgentBlock {
                    rep,
                    block: Some(name),
                    counters,
                });
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_fits_in_two_minutes() {
        let plan = Plan::new(Profile::Quick, &Overrides::default()).unwrap();
        assert_eq!(plan.reps, 3);
        assert!(plan.estimate() < 110.0, "{}", plan.estimate());
    }

    #[test]
    fn full_covers_three_limits_in_about_ten_minutes() {
        let plan = Plan::new(Profile::Full, &Overrides::default()).unwrap();
        assert_eq!(plan.limits_bps.len(), 3);
        assert!(plan.reps >= 5);
        assert!(plan.estimate() < 660.0, "{}", plan.estimate());
    }

    #[test]
    fn hi_is_idle_long_enough_before_it_preempts() {
        let plan = Plan::new(Profile::Quick, &Overrides::default()).unwrap();
        // Right after hi pinged, lo streams alone until hi has been idle for 3 s.
        assert!((plan.lo_alone_secs(Some(0.5)) - 2.5).abs() < 1e-9);
        // Idle for long enough already: just the phase.
        assert!((plan.lo_alone_secs(Some(10.0)) - plan.phase_secs).abs() < 1e-9);
        assert!(plan.lo_alone_secs(None) >= plan.phase_secs);
    }

    #[test]
    fn overrides_and_sizes() {
        let plan = Plan::new(
            Profile::Quick,
            &Overrides {
                reps: Some(1),
                seconds: Some(0.2),
                sizes: None,
            },
        )
        .unwrap();
        assert_eq!((plan.reps, plan.iperf3_secs, plan.sockperf_secs), (1, 1, 1));
        assert!((plan.phase_secs - 0.2).abs() < 1e-12);
        let err = Plan::new(
            Profile::Quick,
            &Overrides {
                sizes: Some(vec![64]),
                ..Overrides::default()
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("--sizes"), "{err}");
    }

    #[test]
    fn arms_rotate_and_sit_out_the_blocks_they_add_nothing_to() {
        assert_eq!(Plan::order(0), ARMS);
        assert_eq!(
            Plan::order(1),
            [Mode::Htb, Mode::Tbf, Mode::QuicklaneBypass, Mode::Quicklane]
        );
        assert_eq!(Plan::order(4), Plan::order(0));
        let quick = Plan::new(Profile::Quick, &Overrides::default()).unwrap();
        let full = Plan::new(Profile::Full, &Overrides::default()).unwrap();
        assert_eq!(
            full.arms(Block::Priority),
            [Mode::Quicklane, Mode::Htb, Mode::QuicklaneBypass]
        );
        assert_eq!(quick.arms(Block::Priority), [Mode::Quicklane, Mode::Htb]);
        assert_eq!(
            full.arms(Block::Rate(1)),
            [Mode::Quicklane, Mode::Htb, Mode::Tbf]
        );
        assert_eq!(
            full.steps(Block::Priority, Mode::QuicklaneBypass),
            [Step::Idle, Step::Saturated]
        );
        assert_eq!(
            quick.steps(Block::Rate(1), Mode::Htb),
            [Step::Tcp(1), Step::Udp(1)]
        );
        assert_eq!(
            full.steps(Block::Rate(1), Mode::Htb),
            [Step::Tcp(1), Step::Streams(1), Step::Udp(1)]
        );
        // Per rep: 3 arms x 2 rate steps (full: 3 rate steps for each of 3 limits) + 2 arms x
        // 3 priority steps (+ 2 bypass steps).
        assert_eq!(quick.step_count(), 3 * (6 + 6));
        assert_eq!(full.step_count(), full.reps * (3 * 3 * 3 + 6 + 2));
    }
}
