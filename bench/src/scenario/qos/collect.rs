//! Samples by metric and arm, and the checks against the QoS targets computed from them.

use super::{arms, Plan, MBIT, STREAMS};
use crate::results::{Better, Figure, Mode, Ratio, Target};

/// One metric on one arm: its unit and `(repetition, value)` samples.
type Series = (String, Mode, &'static str, Vec<(usize, f64)>);

/// Every sample so far, in first-seen order.
#[derive(Debug, Default)]
pub(super) struct Collected {
    series: Vec<Series>,
}

impl Collected {
    pub(super) fn add(
        &mut self,
        metric: &str,
        mode: Mode,
        unit: &'static str,
        rep: usize,
        value: f64,
    ) {
        match self
            .series
            .iter_mut()
            .find(|(m, a, ..)| m == metric && *a == mode)
        {
            Some((.., values)) => values.push((rep, value)),
            None => self
                .series
                .push((metric.to_owned(), mode, unit, vec![(rep, value)])),
        }
    }

    fn get(&self, metric: &str, mode: Mode) -> &[(usize, f64)] {
        self.series
            .iter()
            .find(|(m, a, ..)| m == metric && *a == mode)
            .map_or(&[], |(.., v)| v.as_slice())
    }

    pub(super) fn figures(&self) -> Vec<Figure> {
        self.series
            .iter()
            .filter_map(|(metric, mode, unit, values)| {
                let samples = values.iter().map(|&(_, v)| v).collect();
                Figure::new(metric, None, *mode, unit, samples)
            })
            .collect()
    }

    /// `f(value)` for each of `arm`'s samples of `metric`.
    fn each(&self, metric: &str, arm: Mode, f: impl Fn(f64) -> f64) -> Vec<f64> {
        self.get(metric, arm).iter().map(|&(_, v)| f(v)).collect()
    }

    /// `num` over `den` per repetition where both have a sample and `den` is not zero.
    fn paired(&self, num: (&str, Mode), den: (&str, Mode)) -> Vec<f64> {
        let den = self.get(den.0, den.1);
        self.get(num.0, num.1)
            .iter()
            .filter_map(|&(rep, n)| {
                let &(_, d) = den.iter().find(|(r, _)| *r == rep)?;
                (d != 0.0).then(|| n / d)
            })
            .collect()
    }
}

/// The checks against the QoS targets, judged on the quicklane arm; hi's latency also on the
/// quicklane+bypass arm, the agent as a node runs it.
pub(super) fn checks(plan: &Plan, c: &Collected) -> Vec<Ratio> {
    let q = Mode::Quicklane;
    let target = |better, value, source| Target {
        better,
        value,
        source,
    };
    let mut out = Vec::new();
    for &limit in &plan.limits_bps {
        let l = arms::quantity(limit);
        let per_limit = |v: f64| v * MBIT / limit as f64;
        let rate = target(
            Better::Near,
            0.05,
            "QoS issue: rate within +-5 % of the limit",
        );
        let streams = format!("tcp{STREAMS}");
        for proto in ["tcp", &streams, "udp"] {
            let metric = format!("rate-accuracy.{proto}_rate.{l}");
            out.extend(Ratio::of_samples(
                &metric,
                "quicklane received / limit",
                None,
                c.each(&metric, q, per_limit),
                rate,
            ));
        }
        for tcp in ["tcp", &streams] {
            let metric = format!("rate-accuracy.{tcp}_retrans.{l}");
            out.extend(Ratio::of_samples(
                &metric,
                "quicklane retransmits / segments",
                Some("%"),
                c.each(&metric, q, |v| v),
                target(
                    Better::Lower,
                    1.0,
                    "QoS issue: retransmits < 1 % of segments",
                ),
            ));
        }
    }
    let p99 = "priority.hi_rtt_p99.saturated";
    out.extend(Ratio::of_samples(
        p99,
        "quicklane / htb, same repetition",
        None,
        c.paired((p99, q), (p99, Mode::Htb)),
        target(
            Better::Lower,
            0.5,
            "QoS issue: hi p99 under saturation <= 0.5x htb's",
        ),
    ));
    out.extend(Ratio::of_samples(
        &format!("{p99}.with-bypass"),
        "quicklane+bypass / htb, same repetition",
        None,
        c.paired((p99, Mode::QuicklaneBypass), (p99, Mode::Htb)),
        target(
            Better::Lower,
            0.5,
            "QoS issue: hi p99 under saturation <= 0.5x htb's (hi's same-node ping-pong on the bypass)",
        ),
    ));
    out.extend(Ratio::of_samples(
        "priority.hi_rtt_p99.vs-idle",
        "quicklane saturated / quicklane idle",
        None,
        c.paired((p99, q), ("priority.hi_rtt_p99.idle", q)),
        target(
            Better::Lower,
            1.5,
            "QoS issue: hi p99 under saturation <= 1.5x its idle p99",
        ),
    ));
    let g = plan.guarantee_bps as f64;
    out.extend(Ratio::of_samples(
        "preemption.lo_rate.contended",
        "quicklane lo / its guarantee, while hi streams",
        None,
        c.each("preemption.lo_rate.contended", q, |v| v * MBIT / g),
        target(
            Better::Higher,
            0.95,
            "QoS issue: lo's guarantee held within 5 %",
        ),
    ));
    for (metric, what) in [
        ("preemption.hi_time", "quicklane: hi to 95 % of its share"),
        ("preemption.lo_time", "quicklane: lo to within 10 % of G"),
    ] {
        out.extend(Ratio::of_samples(
            metric,
            what,
            Some("ms"),
            c.each(metric, q, |v| v),
            target(Better::Lower, 20.0, "QoS issue: preemption <= 20 ms"),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::{Overrides, Profile};

    #[test]
    fn checks_judge_quicklane_and_pair_repetitions() {
        let plan = Plan::new(Profile::Quick, &Overrides::default()).unwrap();
        let mut c = Collected::default();
        for (rep, (ql, htb)) in [(30.0, 90.0), (45.0, 60.0)].into_iter().enumerate() {
            c.add(
                "priority.hi_rtt_p99.saturated",
                Mode::Quicklane,
                "us",
                rep,
                ql,
            );
            c.add("priority.hi_rtt_p99.saturated", Mode::Htb, "us", rep, htb);
            c.add(
                "priority.hi_rtt_p99.saturated",
                Mode::QuicklaneBypass,
                "us",
                rep,
                htb / 4.0,
            );
            c.add("priority.hi_rtt_p99.idle", Mode::Quicklane, "us", rep, 25.0);
            c.add(
                "rate-accuracy.tcp_rate.200M",
                Mode::Quicklane,
                "Mbit/s",
                rep,
                198.0,
            );
            c.add(
                "rate-accuracy.tcp_rate.200M",
                Mode::Htb,
                "Mbit/s",
                rep,
                150.0,
            );
        }
        // htb's third repetition has no quicklane partner: not paired.
        c.add("priority.hi_rtt_p99.saturated", Mode::Htb, "us", 2, 10.0);
        let ratios = checks(&plan, &c);
        let get = |m: &str| ratios.iter().find(|r| r.metric == m).unwrap();
        let vs_htb = get("priority.hi_rtt_p99.saturated");
        assert_eq!(vs_htb.samples, vec![30.0 / 90.0, 45.0 / 60.0]);
        assert!(!vs_htb.met, "the median, 0.54, is above 0.5");
        let bypass = get("priority.hi_rtt_p99.saturated.with-bypass");
        assert_eq!(bypass.samples, vec![0.25, 0.25]);
        assert!(bypass.met);
        let vs_idle = get("priority.hi_rtt_p99.vs-idle");
        assert_eq!(vs_idle.samples, vec![1.2, 1.8]);
        let rate = get("rate-accuracy.tcp_rate.200M");
        assert!((rate.value - 0.99).abs() < 1e-12 && rate.met);
        assert_eq!(rate.better, Better::Near);
        // No samples, no check: nothing is invented.
        assert!(ratios.iter().all(|r| r.metric != "preemption.hi_time"));
        assert_eq!(c.figures().len(), 6);
    }
}
