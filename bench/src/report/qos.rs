//! The qos scenario's `report.md` and charts: per figure group a table with one row per arm
//! (quicklane, htb, tbf), the checks against the QoS targets, and the preemption timelines.

use std::fmt::Write as _;
use std::time::Duration;

use super::markdown::{commands, host, notes, num, spread, title};
use super::svg::{Chart, Point, Rule, Scale, Series, XScale, MEDIANS_NOTE};
use crate::progress::clock;
use crate::results::{Mode, Results, Timeline};
use crate::scenario::qos::{
    timeline::{window_series, Flow},
    STREAMS,
};

const ARMS: [Mode; 4] = [Mode::Quicklane, Mode::Htb, Mode::Tbf, Mode::QuicklaneBypass];
/// Step between the points of a timeline chart, ms.
const TIMELINE_STEP_MS: u64 = 5;

fn color(arm: Mode) -> &'static str {
    match arm {
        Mode::Quicklane | Mode::Accelerated => "#d62728",
        Mode::Htb | Mode::Baseline => "#1f77b4",
        Mode::Tbf => "#2ca02c",
        Mode::QuicklaneBypass => "#9467bd",
    }
}

/// `200M` -> 200e6: the Kubernetes quantities the scenario names its limits with.
fn bps(quantity: &str) -> Option<f64> {
    let (digits, scale) = match quantity.char_indices().last()? {
        (i, 'k') => (&quantity[..i], 1e3),
        (i, 'M') => (&quantity[..i], 1e6),
        (i, 'G') => (&quantity[..i], 1e9),
        _ => (quantity, 1.0),
    };
    digits.parse::<f64>().ok().map(|v| v * scale)
}

fn param<'a>(r: &'a Results, key: &str) -> &'a str {
    r.settings.params.get(key).map_or("?", String::as_str)
}

/// The rate-accuracy limits, as named in the metrics.
fn limits(r: &Results) -> Vec<String> {
    param(r, "limits")
        .split(',')
        .filter(|l| bps(l).is_some())
        .map(str::to_owned)
        .collect()
}

fn cell(r: &Results, metric: &str, arm: Mode) -> String {
    r.figure(metric, None, arm)
        .map_or_else(|| "–".to_owned(), spread)
}

/// A figure divided by `by`, with its spread.
fn cell_over(r: &Results, metric: &str, arm: Mode, by: Option<f64>) -> String {
    match (r.figure(metric, None, arm), by) {
        (Some(f), Some(by)) => format!(
            "{} ({}–{})",
            num(f.median / by),
            num(f.min / by),
            num(f.max / by)
        ),
        _ => "–".to_owned(),
    }
}

pub fn render(r: &Results, charts: &[&str]) -> String {
    let mut md = String::new();
    title(&mut md, r);
    let _ = writeln!(
        md,
        "{} repetitions. In each, every arm ran every block (one per rate limit, one for \
         priority and preemption) back to back, the arm order rotating between repetitions. \
         Arms: **quicklane**, the agent with the block's `[qos]` config and the bypass off \
         (QoS enforced as: {}); **htb** and **tbf**, no agent, qdiscs set over netlink on the \
         sink's host veth (exact configuration below). Figures are medians with (min–max) over \
         the repetitions. Wall time {}.\n",
        r.settings.reps,
        param(r, "quicklane.enforcement"),
        clock(Duration::from_secs_f64(r.wall_seconds))
    );
    let met = r.ratios.iter().filter(|x| x.met).count();
    let _ = writeln!(md, "**Targets: {met} of {} met.**\n", r.ratios.len());
    checks(&mut md, r);
    rate_accuracy(&mut md, r);
    priority(&mut md, r);
    preemption(&mut md, r);
    if !charts.is_empty() {
        let _ = writeln!(md, "## Charts\n");
        for chart in charts {
            let _ = writeln!(md, "![{}]({chart})\n", chart.trim_end_matches(".svg"));
        }
    }
    arms(&mut md, r);
    agent_counters(&mut md, r);
    notes(&mut md, r);
    host(&mut md, r);
    commands(&mut md, r);
    md
}

fn checks(md: &mut String, r: &Results) {
    let _ = writeln!(
        md,
        "## Checks (quicklane)\n\n| check | what is judged | value | per-rep range | target | met |\n\
         |---|---|---|---|---|---|"
    );
    for c in &r.ratios {
        let unit = c.unit.as_deref().map_or("x", |u| u);
        let sep = if unit == "x" { "" } else { " " };
        let _ = writeln!(
            md,
            "| `{}` | {} | **{}{sep}{unit}** | {}–{} | {} {}{sep}{unit} | {} |",
            c.metric,
            c.compares.as_deref().unwrap_or("accelerated / baseline"),
            num(c.value),
            num(c.min),
            num(c.max),
            c.better.symbol(),
            num(c.target),
            if c.met { "yes" } else { "**no**" }
        );
    }
    let mut sources: Vec<&str> = r.ratios.iter().map(|x| x.target_source.as_str()).collect();
    sources.sort_unstable();
    sources.dedup();
    let _ = writeln!(md, "\nTargets: {}.\n", sources.join("; "));
}

fn rate_accuracy(md: &mut String, r: &Results) {
    let _ = writeln!(
        md,
        "## Rate accuracy\n\n`hi` limited to L sends to `sink`: iperf3 TCP (cubic), one stream and \
         then {STREAMS} at once, then UDP offered at 2L. Rates are iperf3's received payload (goodput). htb and tbf charge every frame \
         with its headers, so their goodput at an exact limit is below L by the header share; \
         quicklane charges the length of the packet its tc program sees, in which a GSO packet \
         carries its headers once. CPU is the node's cgroup per Gbit received (TCP); qdisc work \
         done from timers or ksoftirqd is not charged to it.\n\n\
         | limit | arm | TCP Mbit/s | TCP / L | retransmits, % of segments | {STREAMS} x TCP / L | \
         {STREAMS} x TCP retransmits, % | UDP Mbit/s | UDP / L | UDP offered Mbit/s | CPU-s/Gbit |\n\
         |---|---|---|---|---|---|---|---|---|---|---|"
    );
    for l in limits(r) {
        let by = bps(&l).map(|b| b / 1e6);
        for arm in ARMS {
            let m = |what: &str| format!("rate-accuracy.{what}.{l}");
            if r.figure(&m("tcp_rate"), None, arm).is_none() {
                continue;
            }
            let _ = writeln!(
                md,
                "| {l} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                arm.name(),
                cell(r, &m("tcp_rate"), arm),
                cell_over(r, &m("tcp_rate"), arm, by),
                cell(r, &m("tcp_retrans"), arm),
                cell_over(r, &m(&format!("tcp{STREAMS}_rate")), arm, by),
                cell(r, &m(&format!("tcp{STREAMS}_retrans")), arm),
                cell(r, &m("udp_rate"), arm),
                cell_over(r, &m("udp_rate"), arm, by),
                cell(r, &m("udp_offered"), arm),
                cell(r, &format!("cpu.tcp_per_gbit.{l}"), arm),
            );
        }
    }
    md.push('\n');
}

fn priority(md: &mut String, r: &Results) {
    let _ = writeln!(
        md,
        "## Priority\n\nCapacity {}; `hi` priority 0, `lo` priority 2 with a {} guarantee. `hi` \
         runs sockperf ping-pong (64 B, round trips) to `sink`, with `lo` idle and while `lo` \
         saturates `sink` with iperf3. tbf: n/a (one bucket, no priorities). quicklane+bypass: \
         the agent as a node runs it, the bypass on: `hi`'s ping-pong to a pod on the same node \
         is redirected (and charged to `hi`'s budget), `lo`'s stream shaped.\n\n\
         | arm | hi RTT p50, lo idle (us) | hi RTT p99, lo idle | hi RTT p50, lo saturating | \
         hi RTT p99, lo saturating | lo Mbit/s meanwhile |\n|---|---|---|---|---|---|",
        param(r, "capacity"),
        param(r, "guarantee")
    );
    for arm in [Mode::Quicklane, Mode::Htb, Mode::QuicklaneBypass] {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} |",
            arm.name(),
            cell(r, "priority.hi_rtt_p50.idle", arm),
            cell(r, "priority.hi_rtt_p99.idle", arm),
            cell(r, "priority.hi_rtt_p50.saturated", arm),
            cell(r, "priority.hi_rtt_p99.saturated", arm),
            cell(r, "priority.lo_rate.saturated", arm),
        );
    }
    md.push('\n');
}

fn preemption(md: &mut String, r: &Results) {
    let _ = writeln!(
        md,
        "## Preemption\n\n`lo` streams alone, then `hi` starts a bulk stream (load generator, 1 ms \
         receive timelines at `sink`). Times from `hi`'s first byte to the start of the first \
         10 ms window in which `hi` received 95 % of its share (capacity − guarantee), and in \
         which `lo` was within 10 % of its guarantee; `hi` had been idle for the time shown \
         when it started. Rates: `lo` alone, and both over the second half of `hi`'s stream. \
         tbf: n/a.\n\n\
         | arm | hi idle before (s) | hi to its share (ms) | lo to its guarantee (ms) | lo \
         alone Mbit/s | hi contended Mbit/s | lo contended Mbit/s |\n|---|---|---|---|---|---|---|"
    );
    for arm in [Mode::Quicklane, Mode::Htb] {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} |",
            arm.name(),
            cell(r, "preemption.hi_idle", arm),
            cell(r, "preemption.hi_time", arm),
            cell(r, "preemption.lo_time", arm),
            cell(r, "preemption.lo_rate.alone", arm),
            cell(r, "preemption.hi_rate.contended", arm),
            cell(r, "preemption.lo_rate.contended", arm),
        );
    }
    md.push('\n');
}

fn arms(md: &mut String, r: &Results) {
    let _ = writeln!(
        md,
        "## Arms\n\n| arm and block | configuration |\n|---|---|"
    );
    for (key, value) in &r.settings.params {
        if ARMS
            .iter()
            .any(|a| key.starts_with(&format!("{}.", a.name())))
        {
            let _ = writeln!(md, "| `{key}` | `{}` |", value.replace('|', "\\|"));
        }
    }
    let _ = writeln!(
        md,
        "\nhtb and tbf: buckets of {} ms at the rate (at least two frames), queues of {} ms \
         at the rate beyond the bucket (tc's `latency`), as the agent's default drop horizon. \
         quicklane runs with its defaults; its config files are in `raw/`.\n",
        param(r, "baseline_burst_ms"),
        param(r, "baseline_queue_ms")
    );
}

fn agent_counters(md: &mut String, r: &Results) {
    if r.agent.is_empty() {
        return;
    }
    let _ = writeln!(
        md,
        "## What the agent did\n\nCounters at the end of each quicklane block (the agent \
         starts fresh for each).\n\n| rep | block | paced connections | shaped packets | \
         CE-marked | dropped | not ECN-capable when late | messages redirected |\n\
         |---|---|---|---|---|---|---|---|"
    );
    for b in &r.agent {
        let c = |name: &str| b.counters.get(name).copied().unwrap_or(0);
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            b.rep + 1,
            b.block.as_deref().unwrap_or("–"),
            c("sockops.conn_paced"),
            c("tc.qos_shaped_packets"),
            c("tc.qos_ce_marked"),
            c("tc.qos_dropped"),
            c("tc.qos_late_not_ect"),
            c("sockops.msg_redirected"),
        );
    }
    md.push('\n');
}

pub fn charts(r: &Results) -> Vec<(String, Chart)> {
    let mut charts = Vec::new();
    if let Some(c) = rate_chart(r) {
        charts.push(("rate.svg".to_owned(), c));
    }
    if let Some(c) = latency_chart(r) {
        charts.push(("latency.svg".to_owned(), c));
    }
    if let Some(c) = preemption_chart(r) {
        charts.push(("preemption.svg".to_owned(), c));
    }
    charts
}

fn rate_chart(r: &Results) -> Option<Chart> {
    let mut categories = Vec::new();
    let mut series: Vec<Series> = ARMS
        .iter()
        .map(|&arm| Series {
            label: arm.name().to_owned(),
            color: color(arm),
            dashed: false,
            points: Vec::new(),
        })
        .collect();
    for l in limits(r) {
        let by = bps(&l)? / 1e6;
        for proto in ["tcp", "udp"] {
            let x = categories.len() as f64;
            categories.push(format!("{} {l}", proto.to_uppercase()));
            for (s, &arm) in series.iter_mut().zip(&ARMS) {
                if let Some(f) = r.figure(&format!("rate-accuracy.{proto}_rate.{l}"), None, arm) {
                    s.points.push(Point {
                        x,
                        y: f.median / by,
                        lo: f.min / by,
                        hi: f.max / by,
                    });
                }
            }
        }
    }
    series.retain(|s| !s.points.is_empty());
    (!series.is_empty()).then(|| Chart {
        title: "rate accuracy: received / limit (medians; whiskers: min..max)".to_owned(),
        x_label: "protocol and limit".to_owned(),
        x_scale: XScale::Categories(categories),
        y_label: "received / limit".to_owned(),
        y_scale: Scale::Fitted,
        series,
        rules: vec![
            Rule {
                y: 0.95,
                label: "target: limit -5 %".to_owned(),
            },
            Rule {
                y: 1.05,
                label: "target: limit +5 %".to_owned(),
            },
        ],
        note: MEDIANS_NOTE.to_owned(),
    })
}

fn latency_chart(r: &Results) -> Option<Chart> {
    let categories = [
        ("priority.hi_rtt_p50.idle", "p50, lo idle"),
        ("priority.hi_rtt_p99.idle", "p99, lo idle"),
        ("priority.hi_rtt_p50.saturated", "p50, lo saturating"),
        ("priority.hi_rtt_p99.saturated", "p99, lo saturating"),
    ];
    let series: Vec<Series> = [Mode::Quicklane, Mode::Htb, Mode::QuicklaneBypass]
        .into_iter()
        .map(|arm| Series {
            label: arm.name().to_owned(),
            color: color(arm),
            dashed: false,
            points: categories
                .iter()
                .enumerate()
                .filter_map(|(i, (metric, _))| {
                    let f = r.figure(metric, None, arm)?;
                    Some(Point {
                        x: i as f64,
                        y: f.median,
                        lo: f.min,
                        hi: f.max,
                    })
                })
                .collect(),
        })
        .filter(|s| !s.points.is_empty())
        .collect();
    (!series.is_empty()).then(|| Chart {
        title: "hi's sockperf round trip (64 B) to the sink".to_owned(),
        x_label: "percentile and lo's traffic".to_owned(),
        x_scale: XScale::Categories(categories.iter().map(|(_, c)| (*c).to_owned()).collect()),
        y_label: "round trip (us), lower is better".to_owned(),
        y_scale: Scale::Linear,
        series,
        rules: Vec::new(),
        note: MEDIANS_NOTE.to_owned(),
    })
}

/// The repetition whose hi preemption time is the arm's median: its timelines are typical.
fn typical_rep(r: &Results, arm: Mode) -> Option<usize> {
    let f = r.figure("preemption.hi_time", None, arm)?;
    f.samples
        .iter()
        .enumerate()
        .min_by(|a, b| (a.1 - f.median).abs().total_cmp(&(b.1 - f.median).abs()))
        .map(|(i, _)| i)
}

fn timeline<'a>(r: &'a Results, name: &str, arm: Mode, rep: usize) -> Option<&'a Timeline> {
    r.timelines
        .iter()
        .find(|t| t.name == name && t.mode == arm && t.rep == rep)
}

/// Window rates of `t` from `from` to `to` ms around hi's first byte, as chart points.
fn timeline_points(t: &Timeline, from: i64, to: i64) -> Vec<Point> {
    // Shift the axis so every time is a bucket index (hi's first byte at `base`).
    let base: i64 = 1 << 20;
    let first = base + t.start_ms as i64;
    let Ok(first_ms) = u64::try_from(first) else {
        return Vec::new();
    };
    let flow = Flow {
        first_ms,
        bytes: &t.bytes,
    };
    let at = |ms: i64| u64::try_from(base + ms).unwrap_or(0);
    window_series(&flow, at(from), at(to), TIMELINE_STEP_MS)
        .into_iter()
        .map(|(ms, bps)| {
            let y = bps / 1e6;
            Point {
                x: ms as f64 - base as f64,
                y,
                lo: y,
                hi: y,
            }
        })
        .collect()
}

fn preemption_chart(r: &Results) -> Option<Chart> {
    let phase_ms = r.settings.seconds.get("preemption_phase").copied()? * 1000.0;
    // Some of lo alone, and hi's first 300 ms: where the preemption happens.
    let (from, to) = (
        -(phase_ms / 2.0).min(100.0) as i64,
        phase_ms.min(300.0) as i64,
    );
    let mut series = Vec::new();
    for arm in [Mode::Quicklane, Mode::Htb] {
        let Some(rep) = typical_rep(r, arm) else {
            continue;
        };
        for (flow, dashed) in [("hi", false), ("lo", true)] {
            if let Some(t) = timeline(r, &format!("preemption.{flow}"), arm, rep) {
                series.push(Series {
                    label: format!("{} {flow} (rep {})", arm.name(), rep + 1),
                    color: color(arm),
                    dashed,
                    points: timeline_points(t, from, to),
                });
            }
        }
    }
    series.retain(|s| !s.points.is_empty());
    let (c, g) = (bps(param(r, "capacity"))?, bps(param(r, "guarantee"))?);
    (!series.is_empty()).then(|| Chart {
        title: "preemption: received Mbit/s over 10 ms windows around hi's start".to_owned(),
        x_label: "ms from hi's first byte (window start)".to_owned(),
        x_scale: XScale::Linear,
        y_label: "Mbit/s at the sink".to_owned(),
        y_scale: Scale::Linear,
        series,
        rules: vec![
            Rule {
                y: (c - g) / 1e6,
                label: "hi's share (capacity - guarantee)".to_owned(),
            },
            Rule {
                y: g / 1e6,
                label: "lo's guarantee".to_owned(),
            },
        ],
        note: "one repetition per arm: its median preemption".to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_parse_back() {
        assert_eq!(bps("200M"), Some(200e6));
        assert_eq!(bps("1G"), Some(1e9));
        assert_eq!(bps("1500k"), Some(1.5e6));
        assert_eq!(bps("?"), None);
    }

    #[test]
    fn timeline_points_are_relative_to_his_first_byte() {
        // lo's series starting 50 ms before hi, 125 bytes per ms: 1 Mbit/s.
        let t = Timeline {
            name: "preemption.lo".into(),
            mode: Mode::Quicklane,
            rep: 0,
            bucket_ms: 1.0,
            start_ms: -50.0,
            bytes: vec![125; 100],
        };
        let points = timeline_points(&t, -40, 20);
        assert_eq!(points.first().map(|p| p.x), Some(-40.0));
        assert!(
            points.iter().all(|p| (p.y - 1.0).abs() < 1e-9),
            "{points:?}"
        );
        assert_eq!(points.len(), 11, "every 5 ms while a 10 ms window fits");
    }
}
