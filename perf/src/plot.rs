//! SVG plots of a run (plotters, SVG backend, no system fonts needed).
//!
//! ```text
//!  per table (Bench), into OUT/plots/:
//!    NN-<title>-latency.svg     latency percentile curves: x = percentile on a "nines" scale
//!                               (p0, p90, p99, p99.9, p99.99 evenly spaced), y = µs (log);
//!                               one line per latency kind of each group's median run
//!                               (engine groups, fio, other tools; not diag rows)
//!    NN-<title>-throughput.svg  MiB/s per 100 ms against seconds since the timed start, one
//!                               line per group's median run
//!    NN-<title>-<chart>.svg     each of Bench::charts: lines over a numeric x axis (e2e:
//!                               achieved against offered churn, lag against offered churn)
//!  Bench::plots gets the relative paths; report.md links them under each table.
//! ```
//!
//! The legend sits in the top left, in headroom added above the lines so that it covers none.
//! The "median run" of a group is the run whose throughput is the median of the group (the
//! lower middle one for an even count), i.e. the run the ratio is closest to. Latency kinds
//! with fewer than [`MIN_SAMPLES`] samples (a handful of flushes) are left out of the curves.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, anyhow};
use plotters::prelude::*;

use crate::histogram::{CURVE_MAX_NINES, nines, percentile_of_nines};
use crate::report::{Bench, Chart, Row, Side};

/// Latency distributions with fewer samples are not plotted.
pub const MIN_SAMPLES: u64 = 10;
const SIZE: (u32, u32) = (960, 560);

fn plot_error(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("drawing a plot: {e}")
}

/// One line of a plot.
struct Line {
    label: String,
    points: Vec<(f64, f64)>,
}

/// The median run (by throughput) of every non-diagnostic group, in first-seen order.
fn median_runs(bench: &Bench) -> Vec<&Row> {
    let mut groups: BTreeMap<usize, Vec<&Row>> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for row in bench.rows.iter().filter(|r| r.side != Side::Diag) {
        let index = match order.iter().position(|g| *g == row.group) {
            Some(i) => i,
            None => {
                order.push(row.group.clone());
                order.len() - 1
            }
        };
        groups.entry(index).or_default().push(row);
    }
    groups
        .into_values()
        .map(|mut rows| {
            rows.sort_by(|a, b| a.throughput_mib_s.total_cmp(&b.throughput_mib_s));
            rows[(rows.len() - 1) / 2]
        })
        .collect()
}

fn latency_lines(bench: &Bench) -> Vec<Line> {
    let mut lines = Vec::new();
    for row in median_runs(bench) {
        for lat in &row.latencies {
            if lat.curve.len() < 2 || lat.percentiles.count < MIN_SAMPLES {
                continue;
            }
            lines.push(Line {
                label: format!("{}: {}", row.label, lat.kind),
                points: lat
                    .curve
                    .iter()
                    .map(|&(p, us)| (nines(p), us.max(0.1)))
                    .collect(),
            });
        }
    }
    lines
}

fn throughput_lines(bench: &Bench) -> Vec<Line> {
    median_runs(bench)
        .into_iter()
        .filter_map(|row| {
            let intervals = row.intervals.as_ref()?;
            (!intervals.samples.is_empty()).then(|| Line {
                label: row.label.clone(),
                points: intervals.samples.clone(),
            })
        })
        .collect()
}

/// `p99.9` style label of a nines value.
fn percentile_label(n: f64) -> String {
    let p = percentile_of_nines(n);
    let text = format!("{p:.2}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    format!("p{text}")
}

fn color(i: usize) -> RGBColor {
    const COLORS: [RGBColor; 10] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
        RGBColor(188, 189, 34),
        RGBColor(23, 190, 207),
    ];
    COLORS[i % COLORS.len()]
}

/// Share of the plot's height the legend box takes (top), so the y range leaves it free.
fn legend_share(lines: usize) -> f64 {
    let plot_px = f64::from(SIZE.1) - 120.0;
    ((lines as f64 * 19.0 + 24.0) / plot_px).min(0.6)
}

fn draw_latency(path: &Path, title: &str, lines: &[Line]) -> Result<()> {
    let (lo, hi) = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.1))
        .fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (lo, hi) = ((lo * 0.8).max(0.1), (hi * 1.25).max(lo * 2.0));
    // Headroom above the curves for the legend (log scale: in decades).
    let share = legend_share(lines.len());
    let hi = 10f64.powf(hi.log10() + (hi.log10() - lo.log10()) * share / (1.0 - share));
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{title}: latency by percentile"),
            ("sans-serif", 20),
        )
        .margin(20)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..CURVE_MAX_NINES, (lo..hi).log_scale())
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_labels(CURVE_MAX_NINES as usize + 1)
        .x_label_formatter(&|n| percentile_label(*n))
        .x_desc("percentile (nines scale)")
        .y_desc("latency, µs (log)")
        .draw()
        .map_err(plot_error)?;
    for (i, line) in lines.iter().enumerate() {
        let c = color(i);
        chart
            .draw_series(LineSeries::new(
                line.points.iter().copied(),
                c.stroke_width(2),
            ))
            .map_err(plot_error)?
            .label(line.label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(plot_error)?;
    root.present().map_err(plot_error)?;
    Ok(())
}

fn draw_throughput(path: &Path, title: &str, lines: &[Line]) -> Result<()> {
    let (t_max, y_max) = lines
        .iter()
        .flat_map(|l| l.points.iter())
        .fold((0.0f64, 0.0f64), |(t, y), p| (t.max(p.0), y.max(p.1)));
    let y_max = y_max.max(1.0) * 1.05 / (1.0 - legend_share(lines.len()));
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{title}: throughput over time"), ("sans-serif", 20))
        .margin(20)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..t_max.max(0.1) * 1.02, 0f64..y_max)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("seconds since the timed start")
        .y_desc("MiB/s per 100 ms")
        .draw()
        .map_err(plot_error)?;
    for (i, line) in lines.iter().enumerate() {
        let c = color(i);
        chart
            .draw_series(LineSeries::new(
                line.points.iter().copied(),
                c.stroke_width(2),
            ))
            .map_err(plot_error)?
            .label(line.label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        // A short run has few intervals (a single one draws no line): mark them.
        if line.points.len() < 20 {
            chart
                .draw_series(line.points.iter().map(|&p| Circle::new(p, 3, c.filled())))
                .map_err(plot_error)?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(plot_error)?;
    root.present().map_err(plot_error)?;
    Ok(())
}

/// Colour and stroke width of chart line `index`: reference lines thin and grey, the others
/// in the palette, in order.
fn chart_styles(chart: &Chart) -> Vec<(RGBColor, u32)> {
    let mut next = 0;
    chart
        .lines
        .iter()
        .map(|line| {
            if line.reference {
                (RGBColor(150, 150, 150), 1)
            } else {
                next += 1;
                (color(next - 1), 2)
            }
        })
        .collect()
}

/// Draws the lines of `chart` (points marked, except on reference lines) and the legend.
fn draw_chart_lines<'a, DB, CT>(
    ctx: &mut ChartContext<'a, DB, CT>,
    chart: &Chart,
    keep: impl Fn(&(f64, f64)) -> bool,
) -> Result<()>
where
    DB: DrawingBackend + 'a,
    CT: CoordTranslate<From = (f64, f64)>,
{
    for (line, (c, width)) in chart.lines.iter().zip(chart_styles(chart)) {
        let points: Vec<(f64, f64)> = line.points.iter().copied().filter(&keep).collect();
        ctx.draw_series(LineSeries::new(
            points.iter().copied(),
            c.stroke_width(width),
        ))
        .map_err(plot_error)?
        .label(line.label.clone())
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(width)));
        if !line.reference {
            ctx.draw_series(points.iter().map(|&p| Circle::new(p, 3, c.filled())))
                .map_err(plot_error)?;
        }
    }
    ctx.configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(plot_error)?;
    Ok(())
}

/// A [`Chart`]: lines over a numeric x axis (linear), y linear from 0 or logarithmic (points
/// at or below 0 left out); every measured point marked; reference lines thin and grey.
fn draw_chart(path: &Path, title: &str, chart: &Chart) -> Result<()> {
    let positive = |p: &(f64, f64)| !chart.log_y || p.1 > 0.0;
    let points = || {
        chart
            .lines
            .iter()
            .flat_map(|l| l.points.iter())
            .filter(|p| positive(p))
    };
    let (x_lo, x_hi) = points().fold((f64::MAX, f64::MIN), |(lo, hi), p| {
        (lo.min(p.0), hi.max(p.0))
    });
    let (y_lo, y_hi) = points().fold((f64::MAX, f64::MIN), |(lo, hi), p| {
        (lo.min(p.1), hi.max(p.1))
    });
    if x_lo > x_hi || y_lo > y_hi {
        return Ok(());
    }
    let pad = ((x_hi - x_lo) * 0.03).max(0.5);
    let x_range = (x_lo - pad).max(0.0)..x_hi + pad;
    let share = legend_share(chart.lines.len());
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(format!("{title}: {}", chart.name), ("sans-serif", 20))
        .margin(20)
        .x_label_area_size(40)
        .y_label_area_size(70);
    if chart.log_y {
        let lo = (y_lo * 0.8).max(1e-3);
        let hi = (y_hi * 1.25).max(lo * 2.0);
        let hi = 10f64.powf(hi.log10() + (hi.log10() - lo.log10()) * share / (1.0 - share));
        let mut ctx = builder
            .build_cartesian_2d(x_range, (lo..hi).log_scale())
            .map_err(plot_error)?;
        ctx.configure_mesh()
            .x_desc(chart.x_desc.as_str())
            .y_desc(chart.y_desc.as_str())
            .draw()
            .map_err(plot_error)?;
        draw_chart_lines(&mut ctx, chart, positive)?;
    } else {
        let hi = y_hi.max(1.0) * 1.05 / (1.0 - share);
        let mut ctx = builder
            .build_cartesian_2d(x_range, 0f64..hi)
            .map_err(plot_error)?;
        ctx.configure_mesh()
            .x_desc(chart.x_desc.as_str())
            .y_desc(chart.y_desc.as_str())
            .draw()
            .map_err(plot_error)?;
        draw_chart_lines(&mut ctx, chart, positive)?;
    }
    root.present().map_err(plot_error)?;
    Ok(())
}

/// A file-name-safe form of a title: lowercase letters, digits and single dashes.
fn slug(title: &str) -> String {
    let mut out = String::new();
    for ch in title.chars() {
        if ch.is_ascii_alphanumeric() {
            out.push(ch.to_ascii_lowercase());
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_matches('-').to_owned()
}

/// Draws every plot of `benches` into `out_dir/plots/` and records them in `Bench::plots`.
/// Returns the number of files written.
pub fn write_plots(out_dir: &Path, benches: &mut [Bench]) -> Result<usize> {
    let dir = out_dir.join("plots");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut written = 0;
    for (index, bench) in benches.iter_mut().enumerate() {
        let stem = format!("{:02}-{}", index + 1, slug(&bench.title));
        let latency = latency_lines(bench);
        if !latency.is_empty() {
            let name = format!("{stem}-latency.svg");
            draw_latency(&dir.join(&name), &bench.title, &latency)
                .with_context(|| format!("plotting {name}"))?;
            bench.plots.push(format!("plots/{name}"));
            written += 1;
        }
        let throughput = throughput_lines(bench);
        if !throughput.is_empty() {
            let name = format!("{stem}-throughput.svg");
            draw_throughput(&dir.join(&name), &bench.title, &throughput)
                .with_context(|| format!("plotting {name}"))?;
            bench.plots.push(format!("plots/{name}"));
            written += 1;
        }
        let mut charts = Vec::new();
        for chart in &bench.charts {
            if chart.lines.iter().all(|l| l.points.is_empty()) {
                continue;
            }
            let name = format!("{stem}-{}.svg", slug(&chart.name));
            draw_chart(&dir.join(&name), &bench.title, chart)
                .with_context(|| format!("plotting {name}"))?;
            charts.push(format!("plots/{name}"));
        }
        written += charts.len();
        bench.plots.extend(charts);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::histogram::LatencyHistogram;
    use crate::series::Intervals;

    #[test]
    fn labels_and_slugs() {
        assert_eq!(percentile_label(0.0), "p0");
        assert_eq!(percentile_label(1.0), "p90");
        assert_eq!(percentile_label(3.0), "p99.9");
        assert_eq!(percentile_label(4.0), "p99.99");
        assert_eq!(slug("apply-rand-4k, qd 32"), "apply-rand-4k-qd-32");
        assert_eq!(
            slug("staging-append, 1 × 64 KiB per commit"),
            "staging-append-1-64-kib-per-commit"
        );
    }

    #[test]
    fn writes_both_plots_from_the_median_runs() {
        let mut h = LatencyHistogram::new();
        for us in 1..=500u64 {
            h.observe(Duration::from_micros(us));
        }
        let intervals = Intervals {
            interval_s: 0.1,
            samples: vec![(0.1, 100.0), (0.2, 120.0), (0.25, 90.0)],
        };
        let run = |mib: u64, n| {
            Row::engine("engine", mib << 20, 1, 1.0)
                .with_histogram("write", &h)
                .with_intervals(Some(intervals.clone()))
                .run(n)
        };
        let mut bench = Bench::new("x", "x, qd 1");
        bench.rows = vec![run(10, 1), run(30, 2), run(20, 3)];
        assert_eq!(median_runs(&bench)[0].label, "engine #3");
        let mut few = Bench::new("y", "y");
        few.rows = vec![Row::engine("e", 1, 1, 1.0).with_latency("w", h.summary())];
        let dir = tempfile::tempdir().unwrap();
        let mut benches = vec![bench, few];
        assert_eq!(write_plots(dir.path(), &mut benches).unwrap(), 2);
        assert_eq!(
            benches[0].plots,
            vec![
                "plots/01-x-qd-1-latency.svg",
                "plots/01-x-qd-1-throughput.svg"
            ]
        );
        assert!(
            benches[1].plots.is_empty(),
            "no curve, no intervals: no plot"
        );
        let svg = std::fs::read_to_string(dir.path().join(&benches[0].plots[0])).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("engine #3: write"),
            "{svg:.300}"
        );
    }
}
