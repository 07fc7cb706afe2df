//! The results directory: `results.json`, `report.md` and the SVG charts.

pub mod markdown;
pub mod qos;
pub mod svg;

use std::path::{Path, PathBuf};

use crate::error::Error;
use crate::results::{Figure, Mode, Results};
use svg::{Chart, Point, Rule, Scale, Series, XScale, MEDIANS_NOTE};

/// Writes everything and returns the paths written.
pub fn write(dir: &Path, results: &Results) -> Result<Vec<PathBuf>, Error> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let mut written = Vec::new();
    let mut put = |name: &str, text: &str| -> Result<(), Error> {
        let path = dir.join(name);
        std::fs::write(&path, text)
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
        written.push(path);
        Ok(())
    };
    let json = serde_json::to_string_pretty(results).expect("results serialize to JSON");
    put("results.json", &json)?;
    // The qos scenario compares three arms per figure group, not two modes per size.
    let qos = results.scenario == "qos";
    let charts = if qos {
        qos::charts(results)
    } else {
        charts(results)
    };
    for (name, chart) in &charts {
        put(name, &svg::render(chart))?;
    }
    let names: Vec<&str> = charts.iter().map(|(n, _)| n.as_str()).collect();
    let md = if qos {
        qos::render(results, &names)
    } else {
        markdown::render(results, &names)
    };
    put("report.md", &md)?;
    Ok(written)
}

/// The path part of a metric name (`qperf.tcp_lat.pod-to-pod` -> `pod-to-pod`).
pub fn path_of(metric: &str) -> &str {
    metric.rsplit('.').next().unwrap_or(metric)
}

/// The measure part (`qperf.tcp_lat.pod-to-pod` -> `qperf.tcp_lat`).
pub fn measure_of(metric: &str) -> &str {
    metric.rsplit_once('.').map_or(metric, |(m, _)| m)
}

const BASELINE: &str = "#1f77b4";
const ACCELERATED: &str = "#d62728";
const RATIO_COLORS: [&str; 4] = ["#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"];

/// Charts over message size for every measure that has more than a single size-less figure:
/// baseline vs accelerated per path, and the ratios against their targets.
fn charts(results: &Results) -> Vec<(String, Chart)> {
    let mut charts = Vec::new();
    for (measure, file, title, y_label, scale) in [
        (
            "qperf.tcp_lat",
            "latency.svg",
            "qperf tcp_lat: one-way latency by message size",
            "latency (us), lower is better",
            Scale::Linear,
        ),
        (
            "qperf.tcp_bw",
            "throughput.svg",
            "qperf tcp_bw: throughput by message size",
            "MB/s (log scale), higher is better",
            Scale::Log10,
        ),
    ] {
        let series = figure_series(results, measure);
        if !series.is_empty() {
            charts.push((
                file.to_owned(),
                Chart {
                    title: title.to_owned(),
                    x_label: "message size (bytes)".to_owned(),
                    x_scale: XScale::Bytes,
                    y_label: y_label.to_owned(),
                    y_scale: scale,
                    series,
                    rules: Vec::new(),
                    note: MEDIANS_NOTE.to_owned(),
                },
            ));
        }
    }
    let ratio = ratio_chart(results);
    if !ratio.series.is_empty() {
        charts.push(("ratios.svg".to_owned(), ratio));
    }
    charts
}

fn point(f: &Figure) -> Option<Point> {
    Some(Point {
        x: f.msg_size? as f64,
        y: f.median,
        lo: f.min,
        hi: f.max,
    })
}

/// Paths in first-seen order, for stable colours and dashes.
fn paths<'a>(metrics: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut paths: Vec<&str> = Vec::new();
    for m in metrics {
        let p = path_of(m);
        if !paths.contains(&p) {
            paths.push(p);
        }
    }
    paths
}

fn figure_series(results: &Results, measure: &str) -> Vec<Series> {
    let figures: Vec<&Figure> = results
        .results
        .iter()
        .filter(|f| measure_of(&f.metric) == measure && f.msg_size.is_some())
        .collect();
    let mut series = Vec::new();
    for (i, path) in paths(figures.iter().map(|f| f.metric.as_str()))
        .into_iter()
        .enumerate()
    {
        for mode in [Mode::Baseline, Mode::Accelerated] {
            let mut points: Vec<Point> = figures
                .iter()
                .filter(|f| f.mode == mode && path_of(&f.metric) == path)
                .filter_map(|f| point(f))
                .collect();
            points.sort_by(|a, b| a.x.total_cmp(&b.x));
            if !points.is_empty() {
                series.push(Series {
                    label: format!("{} {path}", mode.name()),
                    color: if mode == Mode::Baseline {
                        BASELINE
                    } else {
                        ACCELERATED
                    },
                    dashed: i > 0,
                    points,
                });
            }
        }
    }
    series
}

fn ratio_chart(results: &Results) -> Chart {
    let ratios: Vec<_> = results
        .ratios
        .iter()
        .filter(|r| {
            r.msg_size.is_some()
                && matches!(measure_of(&r.metric), "qperf.tcp_lat" | "qperf.tcp_bw")
        })
        .collect();
    let mut series = Vec::new();
    for (color, measure) in ["qperf.tcp_lat", "qperf.tcp_bw"].into_iter().enumerate() {
        let of_measure: Vec<_> = ratios
            .iter()
            .filter(|r| measure_of(&r.metric) == measure)
            .collect();
        for (i, path) in paths(of_measure.iter().map(|r| r.metric.as_str()))
            .into_iter()
            .enumerate()
        {
            let mut points: Vec<Point> = of_measure
                .iter()
                .filter(|r| path_of(&r.metric) == path)
                .filter_map(|r| {
                    Some(Point {
                        x: r.msg_size? as f64,
                        y: r.value,
                        lo: r.min,
                        hi: r.max,
                    })
                })
                .collect();
            points.sort_by(|a, b| a.x.total_cmp(&b.x));
            series.push(Series {
                label: format!("{} {path}", measure.trim_start_matches("qperf.")),
                color: RATIO_COLORS[color % RATIO_COLORS.len()],
                dashed: i > 0,
                points,
            });
        }
    }
    let mut targets: Vec<(f64, String)> = Vec::new();
    for r in &ratios {
        if !targets.iter().any(|(t, _)| (t - r.target).abs() < 1e-9) {
            targets.push((
                r.target,
                format!(
                    "target {}x ({})",
                    r.target,
                    measure_of(&r.metric).trim_start_matches("qperf.")
                ),
            ));
        }
    }
    Chart {
        title: "accelerated / baseline (same run, medians; whiskers: per-repetition min..max)"
            .to_owned(),
        x_label: "message size (bytes)".to_owned(),
        x_scale: XScale::Bytes,
        y_label: "ratio".to_owned(),
        y_scale: Scale::Linear,
        series,
        rules: targets
            .into_iter()
            .map(|(y, label)| Rule { y, label })
            .collect(),
        note: MEDIANS_NOTE.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_parts() {
        assert_eq!(path_of("qperf.tcp_lat.pod-to-pod"), "pod-to-pod");
        assert_eq!(measure_of("qperf.tcp_lat.pod-to-pod"), "qperf.tcp_lat");
    }
}
