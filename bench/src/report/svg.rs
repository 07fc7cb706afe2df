//! Line charts written as SVG by hand: message size on a log-2 x axis (or a linear or
//! categorical one), values with their min..max whiskers, dashed reference lines for targets,
//! a legend on the right.

use std::fmt::Write as _;

const WIDTH: f64 = 820.0;
const HEIGHT: f64 = 460.0;
const LEFT: f64 = 76.0;
const RIGHT: f64 = 250.0;
const TOP: f64 = 44.0;
const BOTTOM: f64 = 56.0;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub x: f64,
    /// The median.
    pub y: f64,
    /// The spread drawn as a whisker (min and max).
    pub lo: f64,
    pub hi: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub label: String,
    pub color: &'static str,
    pub dashed: bool,
    pub points: Vec<Point>,
}

/// A horizontal reference line, e.g. a target ratio.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub y: f64,
    pub label: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    Linear,
    /// Linear over the data's range only (not from zero): for values that all sit near a
    /// target, such as ratios to a limit.
    Fitted,
    /// Message sizes: log 2, ticks at the measured sizes.
    Bytes,
    /// Log 10, ticks at powers of ten.
    Log10,
}

/// What the x axis shows.
#[derive(Debug, Clone, PartialEq)]
pub enum XScale {
    /// Message sizes: log 2, ticks at the measured sizes.
    Bytes,
    /// Linear, "nice" ticks (e.g. time).
    Linear,
    /// Named categories; a point's x is its category's index.
    Categories(Vec<String>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub x_scale: XScale,
    pub y_label: String,
    pub y_scale: Scale,
    pub series: Vec<Series>,
    pub rules: Vec<Rule>,
    /// How to read the marks, under the legend.
    pub note: String,
}

/// The usual [`Chart::note`]: points summarise repetitions.
pub const MEDIANS_NOTE: &str = "dots: median; whiskers: min..max";

/// Maps data to pixels on one axis.
#[derive(Debug, Clone, Copy)]
struct Axis {
    scale: Scale,
    lo: f64,
    hi: f64,
    px_lo: f64,
    px_hi: f64,
}

impl Axis {
    fn fit(scale: Scale, values: &[f64], px_lo: f64, px_hi: f64) -> Self {
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let (lo, hi) = match scale {
            Scale::Linear => {
                let hi = if max > 0.0 { max * 1.08 } else { 1.0 };
                (0.0_f64.min(min), hi)
            }
            Scale::Fitted => {
                let pad = ((max - min) * 0.15).max(max.abs() * 0.01).max(1e-9);
                (min - pad, max + pad)
            }
            Scale::Bytes => {
                let (lo, hi) = (min.max(1.0).log2(), max.max(1.0).log2());
                // Half a step of padding either side keeps end points off the frame.
                if hi - lo < 1e-9 {
                    (lo - 1.0, hi + 1.0)
                } else {
                    (lo - 0.4, hi + 0.4)
                }
            }
            Scale::Log10 => {
                let lo = min.max(1e-9).log10().floor();
                let hi = max.max(1e-9).log10().ceil();
                (lo, if hi > lo { hi } else { lo + 1.0 })
            }
        };
        Self {
            scale,
            lo,
            hi,
            px_lo,
            px_hi,
        }
    }

    fn px(&self, v: f64) -> f64 {
        let t = match self.scale {
            Scale::Linear | Scale::Fitted => v,
            Scale::Bytes => v.max(1e-9).log2(),
            Scale::Log10 => v.max(1e-9).log10(),
        };
        self.px_lo + (t - self.lo) / (self.hi - self.lo) * (self.px_hi - self.px_lo)
    }

    fn contains(&self, v: f64) -> bool {
        let p = self.px(v);
        let (a, b) = (self.px_lo.min(self.px_hi), self.px_lo.max(self.px_hi));
        p >= a - 0.5 && p <= b + 0.5
    }

    /// Tick values: "nice" steps for linear, powers of ten for log 10.
    fn ticks(&self) -> Vec<f64> {
        match self.scale {
            Scale::Linear | Scale::Fitted => {
                let raw = (self.hi - self.lo) / 5.0;
                let mag = 10f64.powf(raw.log10().floor());
                let step = [1.0, 2.0, 5.0, 10.0]
                    .iter()
                    .map(|m| m * mag)
                    .find(|s| *s >= raw)
                    .unwrap_or(10.0 * mag);
                let first = (self.lo / step).ceil() as i64;
                let last = (self.hi / step).floor() as i64;
                (first..=last).map(|i| i as f64 * step).collect()
            }
            Scale::Log10 => {
                // Over a decade or two, 2 and 5 times each power keep the axis readable.
                let steps: &[f64] = if self.hi - self.lo <= 2.0 {
                    &[1.0, 2.0, 5.0]
                } else {
                    &[1.0]
                };
                (self.lo as i32..=self.hi as i32)
                    .flat_map(|e| steps.iter().map(move |m| m * 10f64.powi(e)))
                    .filter(|v| v.log10() <= self.hi + 1e-9)
                    .collect()
            }
            Scale::Bytes => Vec::new(),
        }
    }
}

/// `0.45`, `12`, `3500`, `2e+06`: short tick labels.
fn number(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 1e6 {
        format!("{v:.0e}")
    } else if a >= 10.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        // Two decimals, or ticks 0.05 apart (1.05) would read as 1.1.
        trim(format!("{v:.2}"))
    } else {
        trim(format!("{v:.3}"))
    }
}

fn trim(s: String) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        s
    }
}

/// `1`, `64`, `4K`, `64K`: message sizes on a tick.
fn size_tick(bytes: f64) -> String {
    let b = bytes.round() as u64;
    if b >= 1 << 20 && b.is_multiple_of(1 << 20) {
        format!("{}M", b >> 20)
    } else if b >= 1 << 10 && b.is_multiple_of(1 << 10) {
        format!("{}K", b >> 10)
    } else {
        b.to_string()
    }
}

/// Escapes text for XML character data and attribute values.
pub fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const PLOT_RIGHT: f64 = WIDTH - RIGHT;
const PLOT_BOTTOM: f64 = HEIGHT - BOTTOM;

pub fn render(chart: &Chart) -> String {
    let points = chart.series.iter().flat_map(|s| &s.points);
    let mut sizes: Vec<f64> = points.clone().map(|p| p.x).collect();
    sizes.sort_by(f64::total_cmp);
    sizes.dedup();
    let mut ys: Vec<f64> = points.flat_map(|p| [p.y, p.lo, p.hi]).collect();
    ys.extend(chart.rules.iter().map(|r| r.y));
    if ys.is_empty() {
        ys.push(1.0);
    }
    let xs = if sizes.is_empty() { vec![1.0] } else { sizes };
    let (x, x_ticks) = x_axis(&chart.x_scale, &xs);
    let y = Axis::fit(chart.y_scale, &ys, PLOT_BOTTOM, TOP);
    let mut s = String::new();
    frame(&mut s, chart, &x, &y, &x_ticks);
    rules(&mut s, chart, &y);
    let categorical = matches!(chart.x_scale, XScale::Categories(_));
    series(&mut s, chart, &x, &y, categorical);
    legend(&mut s, chart);
    s.push_str("</svg>\n");
    s
}

/// The x axis for the points' `xs` (sorted, distinct), and its ticks with their labels.
fn x_axis(scale: &XScale, xs: &[f64]) -> (Axis, Vec<(f64, String)>) {
    match scale {
        XScale::Bytes => (
            Axis::fit(Scale::Bytes, xs, LEFT, PLOT_RIGHT),
            xs.iter().map(|&v| (v, size_tick(v))).collect(),
        ),
        XScale::Linear => {
            let mut axis = Axis::fit(Scale::Linear, xs, LEFT, PLOT_RIGHT);
            // Data, not zero, bounds a linear x axis (a time axis may start below zero).
            let (min, max) = (xs[0], xs[xs.len() - 1]);
            let pad = ((max - min) * 0.03).max(1e-9);
            (axis.lo, axis.hi) = (min - pad, max + pad);
            let ticks = axis.ticks().into_iter().map(|v| (v, number(v))).collect();
            (axis, ticks)
        }
        XScale::Categories(names) => {
            let axis = Axis {
                scale: Scale::Linear,
                lo: -0.5,
                hi: names.len().max(1) as f64 - 0.5,
                px_lo: LEFT,
                px_hi: PLOT_RIGHT,
            };
            let ticks = names
                .iter()
                .enumerate()
                .map(|(i, n)| (i as f64, n.clone()))
                .collect();
            (axis, ticks)
        }
    }
}

/// Header, grid, x ticks, the plot's frame and the axis labels.
fn frame(s: &mut String, chart: &Chart, x: &Axis, y: &Axis, x_ticks: &[(f64, String)]) {
    let _ = write!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="Helvetica, Arial, sans-serif" font-size="12">
<rect width="100%" height="100%" fill="#ffffff"/>
<text x="{LEFT}" y="24" font-size="16" font-weight="bold">{}</text>
"##,
        escape(&chart.title)
    );
    for tick in y.ticks() {
        let py = y.px(tick);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{py:.1}" x2="{PLOT_RIGHT}" y2="{py:.1}" stroke="#e6e6e6"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            LEFT - 6.0,
            py + 4.0,
            number(tick)
        );
    }
    for (value, label) in x_ticks {
        let px = x.px(*value);
        let _ = writeln!(
            s,
            r##"<line x1="{px:.1}" y1="{TOP}" x2="{px:.1}" y2="{PLOT_BOTTOM}" stroke="#f0f0f0"/><text x="{px:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            PLOT_BOTTOM + 16.0,
            escape(label)
        );
    }
    let _ = writeln!(
        s,
        r##"<rect x="{LEFT}" y="{TOP}" width="{:.1}" height="{:.1}" fill="none" stroke="#333333"/>
<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>
<text transform="translate(18 {:.1}) rotate(-90)" text-anchor="middle">{}</text>"##,
        PLOT_RIGHT - LEFT,
        PLOT_BOTTOM - TOP,
        f64::midpoint(LEFT, PLOT_RIGHT),
        HEIGHT - 14.0,
        escape(&chart.x_label),
        f64::midpoint(TOP, PLOT_BOTTOM),
        escape(&chart.y_label)
    );
}

const RULE_STYLE: &str = r##"stroke="#555555" stroke-dasharray="2 3""##;

/// Reference lines across the plot; they are named in the legend, where no data point can
/// hide the name.
fn rules(s: &mut String, chart: &Chart, y: &Axis) {
    for rule in chart.rules.iter().filter(|r| y.contains(r.y)) {
        let py = y.px(rule.y);
        let _ = writeln!(
            s,
            r#"<line x1="{LEFT}" y1="{py:.1}" x2="{PLOT_RIGHT}" y2="{py:.1}" {RULE_STYLE}/>"#
        );
    }
}

fn dash(series: &Series) -> &'static str {
    if series.dashed {
        r#" stroke-dasharray="7 4""#
    } else {
        ""
    }
}

/// Each series: a line through the medians, a dot per median, a whisker from min to max.
/// On a categorical axis there is no line (categories are not a progression) and the series
/// sit side by side within each category, so none hides another.
fn series(s: &mut String, chart: &Chart, x: &Axis, y: &Axis, categorical: bool) {
    let n = chart.series.len() as f64;
    for (i, series) in chart.series.iter().enumerate() {
        let dodge = if categorical {
            (i as f64 - (n - 1.0) / 2.0) * 0.12
        } else {
            0.0
        };
        if !categorical {
            let path: Vec<String> = series
                .points
                .iter()
                .map(|p| format!("{:.1},{:.1}", x.px(p.x), y.px(p.y)))
                .collect();
            let _ = writeln!(
                s,
                r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="2"{}/>"#,
                path.join(" "),
                series.color,
                dash(series)
            );
        }
        for p in &series.points {
            let (px, py) = (x.px(p.x + dodge), y.px(p.y));
            let (lo, hi) = (y.px(p.lo), y.px(p.hi));
            let (left, right) = (px - 4.0, px + 4.0);
            let _ = writeln!(
                s,
                r#"<line x1="{px:.1}" y1="{lo:.1}" x2="{px:.1}" y2="{hi:.1}" stroke="{c}"/><line x1="{left:.1}" y1="{lo:.1}" x2="{right:.1}" y2="{lo:.1}" stroke="{c}"/><line x1="{left:.1}" y1="{hi:.1}" x2="{right:.1}" y2="{hi:.1}" stroke="{c}"/><circle cx="{px:.1}" cy="{py:.1}" r="3.2" fill="{c}"/>"#,
                c = series.color
            );
        }
    }
}

fn legend(s: &mut String, chart: &Chart) {
    let lx = PLOT_RIGHT + 14.0;
    for (i, series) in chart.series.iter().enumerate() {
        let ly = TOP + 8.0 + i as f64 * 20.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{}" stroke-width="2"{}/><text x="{:.1}" y="{:.1}">{}</text>"#,
            lx + 26.0,
            series.color,
            dash(series),
            lx + 32.0,
            ly + 4.0,
            escape(&series.label)
        );
    }
    for (i, rule) in chart.rules.iter().enumerate() {
        let ly = TOP + 8.0 + (chart.series.len() + i) as f64 * 20.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" {RULE_STYLE}/><text x="{:.1}" y="{:.1}">{}</text>"#,
            lx + 26.0,
            lx + 32.0,
            ly + 4.0,
            escape(&rule.label)
        );
    }
    let _ = writeln!(
        s,
        r##"<text x="{lx:.1}" y="{PLOT_BOTTOM:.1}" fill="#555555">{}</text>"##,
        escape(&chart.note)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart(scale: Scale, points: Vec<Point>) -> Chart {
        Chart {
            title: "lat <&> \"us\"".into(),
            x_label: "message size".into(),
            x_scale: XScale::Bytes,
            y_label: "us".into(),
            y_scale: scale,
            series: vec![Series {
                label: "baseline".into(),
                color: "#1f77b4",
                dashed: true,
                points,
            }],
            rules: vec![Rule {
                y: 0.45,
                label: "target 0.45x".into(),
            }],
            note: MEDIANS_NOTE.into(),
        }
    }

    fn p(x: f64, y: f64) -> Point {
        Point {
            x,
            y,
            lo: y * 0.9,
            hi: y * 1.1,
        }
    }

    #[test]
    fn text_is_escaped_and_elements_are_closed() {
        let svg = render(&chart(Scale::Linear, vec![p(1.0, 10.0), p(64.0, 12.0)]));
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.contains("lat &lt;&amp;&gt; &quot;us&quot;"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
    }

    #[test]
    fn axes_map_into_the_plot() {
        let x = Axis::fit(Scale::Bytes, &[1.0, 65536.0], 0.0, 100.0);
        assert!(x.px(1.0) > 0.0 && x.px(65536.0) < 100.0);
        assert!((x.px(256.0) - 50.0).abs() < 1e-9, "log-2 midpoint");
        let y = Axis::fit(Scale::Log10, &[3.0, 3500.0], 100.0, 0.0);
        assert_eq!(y.ticks(), vec![1.0, 10.0, 100.0, 1000.0, 10000.0]);
        let y = Axis::fit(Scale::Log10, &[30.0, 50.0], 100.0, 0.0);
        assert_eq!(y.ticks(), vec![10.0, 20.0, 50.0, 100.0]);
        let lin = Axis::fit(Scale::Linear, &[0.2, 2.0], 100.0, 0.0);
        assert_eq!(lin.ticks(), vec![0.0, 0.5, 1.0, 1.5, 2.0]);
        let fitted = Axis::fit(Scale::Fitted, &[0.95, 1.05], 100.0, 0.0);
        assert!(fitted.lo > 0.9 && fitted.hi < 1.1, "{fitted:?}");
        assert!(fitted.px(0.95) < 100.0 && fitted.px(1.05) > 0.0);
    }

    #[test]
    fn a_single_size_still_draws() {
        let svg = render(&chart(Scale::Log10, vec![p(64.0, 5.0)]));
        assert!(svg.contains("<circle"), "{svg}");
        assert!(!svg.contains("NaN"), "{svg}");
    }

    #[test]
    fn linear_and_categorical_x_axes() {
        let mut c = chart(Scale::Linear, vec![p(-50.0, 1.0), p(150.0, 2.0)]);
        c.x_scale = XScale::Linear;
        let svg = render(&c);
        assert!(svg.contains(">-50<") && svg.contains(">100<"), "{svg}");
        let (axis, _) = x_axis(&XScale::Linear, &[-50.0, 150.0]);
        assert!(axis.px(-50.0) > LEFT && axis.px(150.0) < PLOT_RIGHT);
        c.x_scale = XScale::Categories(vec!["idle p99".into(), "busy <p99>".into()]);
        c.series[0].points = vec![p(0.0, 1.0), p(1.0, 2.0)];
        let svg = render(&c);
        assert!(
            svg.contains(">idle p99<") && svg.contains("busy &lt;p99&gt;"),
            "{svg}"
        );
        assert!(
            !svg.contains("<polyline"),
            "no lines between categories: {svg}"
        );
        let (axis, ticks) = x_axis(&XScale::Categories(vec!["a".into()]), &[0.0]);
        assert_eq!(ticks, vec![(0.0, "a".to_owned())]);
        assert!((axis.px(0.0) - f64::midpoint(LEFT, PLOT_RIGHT)).abs() < 1e-9);
    }

    #[test]
    fn labels() {
        assert_eq!(size_tick(65536.0), "64K");
        assert_eq!(size_tick(16.0), "16");
        assert_eq!(number(0.45), "0.45");
        assert_eq!(number(1.5), "1.5");
        assert_eq!(number(1.05), "1.05");
        assert_eq!(number(3500.0), "3500");
    }
}
