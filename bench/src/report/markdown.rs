//! `report.md`: the ratio table first (what a reader came for), then the charts, the
//! evidence that the accelerated path was taken, the machine, and the exact commands.

use std::fmt::Write as _;
use std::time::Duration;

use super::{measure_of, path_of};
use crate::progress::clock;
use crate::results::{size_label, Figure, Mode, Results};

/// Three or four significant digits, which is all the noise of this kind of run allows.
pub fn num(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

pub(super) fn spread(f: &Figure) -> String {
    format!("{} ({}–{})", num(f.median), num(f.min), num(f.max))
}

pub fn render(r: &Results, charts: &[&str]) -> String {
    let mut md = String::new();
    header(&mut md, r);
    ratio_table(&mut md, r);
    reference_table(&mut md, r);
    if !charts.is_empty() {
        let _ = writeln!(md, "## Charts\n");
        for chart in charts {
            let _ = writeln!(md, "![{}]({chart})\n", chart.trim_end_matches(".svg"));
        }
    }
    agent_counters(&mut md, r);
    notes(&mut md, r);
    host(&mut md, r);
    commands(&mut md, r);
    md
}

pub(super) fn notes(md: &mut String, r: &Results) {
    if !r.notes.is_empty() {
        let _ = writeln!(md, "## Notes\n");
        for note in &r.notes {
            let _ = writeln!(md, "- {note}");
        }
        md.push('\n');
    }
}

/// The title and the line saying what ran where.
pub(super) fn title(md: &mut String, r: &Results) {
    let h = &r.host;
    let _ = writeln!(md, "# quicklane bench: {} ({})\n", r.scenario, r.profile);
    let _ = writeln!(
        md,
        "`{}`, started {} on {}: {}, {} CPUs, {:.1} GiB, kernel {}, {}. Load average at start \
         {:.2}.\n",
        r.settings.command,
        h.started_utc,
        h.hostname,
        h.cpu_model,
        h.cpus,
        h.memory_bytes as f64 / f64::from(1u32 << 30),
        h.kernel,
        h.os,
        h.loadavg[0]
    );
}

fn header(md: &mut String, r: &Results) {
    title(md, r);
    let _ = writeln!(
        md,
        "{} repetitions. In each, every step ran without the agent (baseline) and with it \
         (accelerated), back to back, the order alternating between repetitions. Figures are \
         medians with (min–max) over the repetitions; a ratio is accelerated median / baseline \
         median, and its range is that of the per-repetition ratios. Wall time {}.\n",
        r.settings.reps,
        clock(Duration::from_secs_f64(r.wall_seconds))
    );
    let met = r.ratios.iter().filter(|x| x.met).count();
    let _ = writeln!(md, "**Targets: {met} of {} met.**\n", r.ratios.len());
}

fn ratio_table(md: &mut String, r: &Results) {
    let _ = writeln!(md, "## Ratios: accelerated / baseline\n");
    let _ = writeln!(
        md,
        "| measure | path | size | baseline | accelerated | unit | ratio | per-rep range | target | met |\n\
         |---|---|---|---|---|---|---|---|---|---|"
    );
    for ratio in &r.ratios {
        let fig = |mode| r.figure(&ratio.metric, ratio.msg_size, mode);
        let (Some(base), Some(fast)) = (fig(Mode::Baseline), fig(Mode::Accelerated)) else {
            continue;
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | **{}x** | {}–{} | {} {} | {} |",
            measure_of(&ratio.metric),
            path_of(&ratio.metric),
            ratio.msg_size.map_or_else(|| "–".to_owned(), size_label),
            spread(base),
            spread(fast),
            base.unit,
            num(ratio.value),
            num(ratio.min),
            num(ratio.max),
            ratio.better.symbol(),
            num(ratio.target),
            if ratio.met { "yes" } else { "**no**" }
        );
    }
    let mut sources: Vec<&str> = r.ratios.iter().map(|x| x.target_source.as_str()).collect();
    sources.sort_unstable();
    sources.dedup();
    let _ = writeln!(md, "\nTargets: {}.\n", sources.join("; "));
}

/// The AF_UNIX references beside the bypass's own ratio for the same measure.
fn reference_table(md: &mut String, r: &Results) {
    if r.references.is_empty() {
        return;
    }
    let _ = writeln!(
        md,
        "## Reference: AF_UNIX / TCP, without the agent\n\n\
         The load generator over an AF_UNIX stream socket (pod0 to pod1), the kernel's \
         cheapest same-host stream, against its own TCP baseline on each path (pod to pod, \
         and within pod1 over loopback). A socket-level bypass still makes the same \
         syscalls, copies and reader wakeups and saves only the TCP/IP path, so the AF_UNIX \
         ratio is about the best it can reach on this machine. \"AF_UNIX meets it\" says \
         whether even AF_UNIX meets the issue's target.\n\n\
         | measure | size | TCP path | TCP baseline | TCP accelerated | AF_UNIX | unit | \
         bypass ratio | AF_UNIX ratio | per-rep range | target | AF_UNIX meets it |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for reference in &r.references {
        let Some(tcp) = reference.against.as_deref() else {
            continue;
        };
        let path = path_of(tcp);
        let fig = |metric: &str, mode| r.figure(metric, reference.msg_size, mode);
        let (Some(base), Some(unix)) = (
            fig(tcp, Mode::Baseline),
            fig(&reference.metric, Mode::Baseline),
        ) else {
            continue;
        };
        let bypass = r
            .ratios
            .iter()
            .find(|x| x.metric == tcp && x.msg_size == reference.msg_size)
            .map_or_else(|| "–".to_owned(), |x| format!("{}x", num(x.value)));
        let _ = writeln!(
            md,
            "| {} | {} | {path} | {} | {} | {} | {} | {bypass} | **{}x** | {}–{} | {} {} | {} |",
            measure_of(&reference.metric),
            reference
                .msg_size
                .map_or_else(|| "–".to_owned(), size_label),
            spread(base),
            fig(tcp, Mode::Accelerated).map_or_else(|| "–".to_owned(), spread),
            spread(unix),
            base.unit,
            num(reference.value),
            num(reference.min),
            num(reference.max),
            reference.better.symbol(),
            num(reference.target),
            if reference.met { "yes" } else { "**no**" }
        );
    }
    md.push('\n');
}

fn agent_counters(md: &mut String, r: &Results) {
    if !r.agent.is_empty() {
        let _ = writeln!(
            md,
            "## What the agent did\n\nCounters at the end of each accelerated block (the agent \
             starts fresh for each). Messages on the normal path are those sk_msg saw and \
             passed on (a peer outside the node, small-message batching).\n\n| rep | sockets \
             inserted | messages redirected | MB redirected | messages on the normal path | peer \
             misses |\n|---|---|---|---|---|---|"
        );
        for block in &r.agent {
            let c = |name: &str| block.counters.get(name).copied().unwrap_or(0);
            let _ = writeln!(
                md,
                "| {} | {} | {} | {:.1} | {} | {} |",
                block.rep + 1,
                c("sockops.sockhash_inserted"),
                c("sockops.msg_redirected"),
                c("sockops.bytes_redirected") as f64 / 1e6,
                c("sockops.msg_normal_path"),
                c("sockops.msg_peer_miss")
            );
        }
        md.push('\n');
    }
}

pub(super) fn host(md: &mut String, r: &Results) {
    let h = &r.host;
    let _ = writeln!(md, "## Host\n\n| | |\n|---|---|");
    for (k, v) in [
        ("host", h.hostname.clone()),
        ("kernel", format!("{} {}", h.kernel, h.kernel_build)),
        ("os", h.os.clone()),
        ("cpu", format!("{} x {}", h.cpus, h.cpu_model)),
        (
            "memory",
            format!("{:.1} GiB", h.memory_bytes as f64 / f64::from(1u32 << 30)),
        ),
        ("quicklane", h.quicklane_version.clone()),
    ]
    .into_iter()
    .chain(h.tools.iter().map(|(t, v)| (t.as_str(), v.clone())))
    {
        let _ = writeln!(md, "| {k} | {v} |");
    }
}

pub(super) fn commands(md: &mut String, r: &Results) {
    let _ = writeln!(
        md,
        "\n## Commands\n\nEach distinct command once (where it ran: podN are pods, node is \
         the node's host namespace outside the node's cgroup); all {} runs, with their raw \
         outputs, are in `results.json` (`commands`) and `raw/`.\n\n```",
        r.commands.len()
    );
    let mut seen: Vec<String> = Vec::new();
    for c in &r.commands {
        let line = format!("[{}] {}", c.place, c.command_line());
        if !seen.contains(&line) {
            let _ = writeln!(md, "{line}");
            seen.push(line);
        }
    }
    md.push_str("```\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_keep_three_or_four_digits() {
        assert_eq!(num(1234.4), "1234");
        assert_eq!(num(12.345), "12.3");
        assert_eq!(num(1.2345), "1.23");
        assert_eq!(num(0.45678), "0.457");
    }
}
