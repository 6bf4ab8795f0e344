//! Results: the JSON envelope (`results.json`), the Markdown tables (`report.md`) and the
//! ratio lines printed to stdout.
//!
//! ```text
//!  Results { machine, mode, duration, benchmarks: [Bench] }
//!  Bench   { name, params, rows: [Row], ratios: [Ratio], notes, plots }
//!  Row     { engine, fio or other tool's figure: throughput, ops/s, latencies (one or more
//!            kinds, each with a percentile curve), CPU, throughput per 100 ms }
//!  Ratio   { median engine run of a group / median run of the reference group (fio, qemu-img,
//!            cp), or two counts (resync bytes); goal (at least / at most), met }
//! ```
//!
//! Every figure is stored unrounded in JSON; the Markdown rounds for reading. Schema 2 (this
//! one) generalised schema 1's ratio (`fio_mib_s` became `reference_value` with
//! `reference_group` and `unit`; goals say whether they are a floor or a ceiling) and added
//! curves, intervals and plots.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;
use serde_json::Value;

use crate::cpu::CpuTimes;
use crate::fio::FioResult;
use crate::histogram::{Curve, LatencyHistogram, Percentiles};
use crate::machine::MachineInfo;
use crate::series::Intervals;

mod markdown;
#[cfg(test)]
mod tests;

pub use markdown::markdown;

/// Version of the `results.json` layout.
pub const SCHEMA_VERSION: u32 = 2;

const MIB: f64 = 1024.0 * 1024.0;
const GIB: f64 = 1024.0 * MIB;

/// Who produced a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    /// The engine.
    Engine,
    /// fio.
    Fio,
    /// Another outside tool doing the same job (qemu-img, cp): the reference of a ratio.
    Tool,
    /// A diagnostic: one stage of the engine's path measured alone (not in any ratio).
    Diag,
}

/// One latency distribution of a row, with what it measures.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// What one sample is, e.g. "apply batch (32 frames)" or "fio clat per write".
    pub kind: String,
    /// The percentiles, µs.
    pub percentiles: Percentiles,
    /// `(percentile, µs)` points for the latency plot (empty when not kept).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub curve: Curve,
}

/// One measured run of a configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Label in the table: the group, plus ` #n` for repeated runs.
    pub label: String,
    /// The configuration this is a run of (rows of one group are repeats of each other).
    pub group: String,
    /// Engine or fio.
    pub side: Side,
    /// Data bytes written (payload, not frame headers).
    pub bytes: u64,
    /// Operations (frames, or fio I/Os).
    pub ops: u64,
    /// Wall time of the measured section, seconds.
    pub elapsed_s: f64,
    /// `bytes / elapsed`, MiB/s.
    pub throughput_mib_s: f64,
    /// `ops / elapsed`.
    pub ops_per_s: f64,
    /// Latency distributions.
    pub latencies: Vec<Latency>,
    /// CPU time of the measured section.
    pub cpu: CpuTimes,
    /// CPU seconds per GiB written.
    pub cpu_s_per_gib: f64,
    /// Anything else worth keeping (grains preserved, flushes, fio process CPU, …).
    pub extra: BTreeMap<String, Value>,
    /// Throughput per 100 ms, when the run recorded it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub intervals: Option<Intervals>,
}

impl Row {
    /// An engine row.
    pub fn engine(label: impl Into<String>, bytes: u64, ops: u64, elapsed_s: f64) -> Self {
        let secs = elapsed_s.max(1e-9);
        let label = label.into();
        Self {
            group: label.clone(),
            label,
            side: Side::Engine,
            bytes,
            ops,
            elapsed_s,
            throughput_mib_s: bytes as f64 / MIB / secs,
            ops_per_s: ops as f64 / secs,
            latencies: Vec::new(),
            cpu: CpuTimes::default(),
            cpu_s_per_gib: 0.0,
            extra: BTreeMap::new(),
            intervals: None,
        }
    }

    /// A row of an outside tool other than fio (qemu-img, cp).
    pub fn tool(
        label: impl Into<String>,
        bytes: u64,
        ops: u64,
        elapsed_s: f64,
        cpu: CpuTimes,
    ) -> Self {
        let mut row = Self::engine(label, bytes, ops, elapsed_s).with_cpu(cpu);
        row.side = Side::Tool;
        row
    }

    /// Sets the throughput per interval.
    pub fn with_intervals(mut self, intervals: Option<Intervals>) -> Self {
        self.intervals = intervals;
        self
    }

    /// Sets the CPU time and the per-GiB figure.
    pub fn with_cpu(mut self, cpu: CpuTimes) -> Self {
        self.cpu = cpu;
        self.cpu_s_per_gib = if self.bytes > 0 {
            cpu.total_s() / (self.bytes as f64 / GIB)
        } else {
            0.0
        };
        self
    }

    /// Adds a latency distribution without a curve (tests build rows from percentiles).
    #[cfg(test)]
    pub fn with_latency(mut self, kind: impl Into<String>, percentiles: Percentiles) -> Self {
        self.latencies.push(Latency {
            kind: kind.into(),
            percentiles,
            curve: Vec::new(),
        });
        self
    }

    /// Adds a latency distribution with its curve.
    pub fn with_histogram(mut self, kind: impl Into<String>, h: &LatencyHistogram) -> Self {
        self.latencies.push(Latency {
            kind: kind.into(),
            percentiles: h.summary(),
            curve: h.curve(),
        });
        self
    }

    /// Marks the row as run `n` of its group.
    pub fn run(mut self, n: usize) -> Self {
        self.label = format!("{} #{n}", self.group);
        self
    }

    /// Adds an extra figure.
    pub fn with_extra(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.extra.insert(key.to_owned(), value.into());
        self
    }

    /// A fio row: throughput from fio's own bandwidth, CPU from fio's job accounting.
    pub fn fio(label: impl Into<String>, r: &FioResult) -> Self {
        let label = label.into();
        let mut row = Self {
            group: label.clone(),
            label,
            side: Side::Fio,
            bytes: r.io_bytes,
            ops: r.total_ios,
            elapsed_s: r.runtime_s,
            throughput_mib_s: r.bw_bytes_per_s / MIB,
            ops_per_s: r.iops,
            latencies: Vec::new(),
            cpu: CpuTimes::default(),
            cpu_s_per_gib: 0.0,
            extra: BTreeMap::new(),
            intervals: r.intervals.clone(),
        }
        .with_cpu(r.job_cpu)
        .with_extra("command", r.command.clone())
        .with_extra("process_cpu_s", r.process_cpu.total_s());
        row.latencies.push(Latency {
            kind: format!("fio clat per {}", r.direction),
            percentiles: r.clat,
            curve: r.clat_curve.clone(),
        });
        if let Some(sync) = r.sync {
            row.latencies.push(Latency {
                kind: "fio fdatasync".into(),
                percentiles: sync,
                curve: r.sync_curve.clone(),
            });
        }
        row
    }
}

/// A ratio's goal.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Goal {
    /// Met when the ratio is at least this (throughput).
    AtLeast(f64),
    /// Met when the ratio is at most this (overhead).
    AtMost(f64),
}

impl Goal {
    /// Whether `value` meets the goal.
    pub fn met(self, value: f64) -> bool {
        match self {
            Self::AtLeast(g) => value >= g,
            Self::AtMost(g) => value <= g,
        }
    }

    fn text(self) -> String {
        match self {
            Self::AtLeast(g) => format!("≥ {g:.2}"),
            Self::AtMost(g) => format!("≤ {g:.2}"),
        }
    }
}

/// The engine over a reference (fio, another tool, or a count).
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    /// What is compared, e.g. "throughput, preserve off".
    pub label: String,
    /// The engine rows' group (the numerator).
    pub engine_group: String,
    /// The reference rows' group (the denominator), e.g. "fio", "qemu-img".
    pub reference_group: String,
    /// Unit of the two values: "MiB/s" (median throughputs) or "MiB" (counts).
    pub unit: String,
    /// Median engine throughput of the group, or the engine's count.
    pub engine_value: f64,
    /// Median reference throughput, or the reference count.
    pub reference_value: f64,
    /// Engine runs and reference runs the medians are over.
    pub runs: (usize, usize),
    /// `engine_value / reference_value` (0 when the reference is 0).
    pub value: f64,
    /// The goal, when there is one.
    pub goal: Option<Goal>,
    /// Whether the goal is met.
    pub goal_met: Option<bool>,
}

/// One benchmark configuration with its rows and ratios.
#[derive(Debug, Clone, Serialize)]
pub struct Bench {
    /// Benchmark name, e.g. `apply-rand-4k`.
    pub name: String,
    /// Heading of its table, e.g. `apply-rand-4k, qd 32`.
    pub title: String,
    /// Parameters.
    pub params: BTreeMap<String, Value>,
    /// Rows.
    pub rows: Vec<Row>,
    /// Ratios.
    pub ratios: Vec<Ratio>,
    /// Notes shown under the table.
    pub notes: Vec<String>,
    /// Plots of this table, relative to the report (set by [`crate::plot`]).
    pub plots: Vec<String>,
    /// Paragraphs (Markdown) shown after the notes.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub prose: Vec<String>,
    /// Charts over a numeric x axis, drawn by [`crate::plot`] besides the latency and
    /// throughput plots.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub charts: Vec<Chart>,
}

/// A chart of lines over a numeric x axis (e.g. achieved against offered churn).
#[derive(Debug, Clone, Serialize)]
pub struct Chart {
    /// File-name part and caption, e.g. "achieved vs offered churn".
    pub name: String,
    /// x axis description.
    pub x_desc: String,
    /// y axis description.
    pub y_desc: String,
    /// Whether the y axis is logarithmic.
    pub log_y: bool,
    /// The lines.
    pub lines: Vec<ChartLine>,
}

/// One line of a [`Chart`].
#[derive(Debug, Clone, Serialize)]
pub struct ChartLine {
    /// Legend text.
    pub label: String,
    /// `(x, y)` points, x ascending.
    pub points: Vec<(f64, f64)>,
    /// A reference line (thin, grey): a goal or `y = x`, not a measurement.
    pub reference: bool,
}

/// The median (mean of the two middle values for an even count); `None` when empty.
pub fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    })
}

impl Bench {
    /// An empty benchmark.
    pub fn new(name: &str, title: impl Into<String>) -> Self {
        Self {
            name: name.to_owned(),
            title: title.into(),
            params: BTreeMap::new(),
            rows: Vec::new(),
            ratios: Vec::new(),
            notes: Vec::new(),
            plots: Vec::new(),
            prose: Vec::new(),
            charts: Vec::new(),
        }
    }

    /// Adds a parameter.
    pub fn param(&mut self, key: &str, value: impl Into<Value>) {
        self.params.insert(key.to_owned(), value.into());
    }

    fn throughputs(&self, keep: impl Fn(&Row) -> bool) -> Vec<f64> {
        self.rows
            .iter()
            .filter(|r| keep(r))
            .map(|r| r.throughput_mib_s)
            .collect()
    }

    /// Adds the ratio of the median engine run of `engine_group` to the median fio run and
    /// returns its stdout line; `goal` is a floor.
    pub fn add_ratio(&mut self, label: &str, engine_group: &str, goal: Option<f64>) -> String {
        self.add_ratio_vs(label, engine_group, "fio", goal.map(Goal::AtLeast))
    }

    /// Adds the ratio of the median engine run of `engine_group` to the median run of the fio
    /// or tool rows of `reference_group`, and returns its stdout line.
    pub fn add_ratio_vs(
        &mut self,
        label: &str,
        engine_group: &str,
        reference_group: &str,
        goal: Option<Goal>,
    ) -> String {
        let mut ours = self.throughputs(|r| r.side == Side::Engine && r.group == engine_group);
        let mut theirs = self.throughputs(|r| {
            matches!(r.side, Side::Fio | Side::Tool) && r.group == reference_group
        });
        let runs = (ours.len(), theirs.len());
        let ours = median(&mut ours).unwrap_or(0.0);
        let theirs = median(&mut theirs).unwrap_or(0.0);
        self.push_ratio(
            label,
            (engine_group, ours),
            (reference_group, theirs),
            "MiB/s",
            runs,
            goal,
        )
    }

    /// Adds a ratio of two given values (e.g. bytes sent over bytes that differ, in MiB) and
    /// returns its stdout line.
    pub fn add_value_ratio(
        &mut self,
        label: &str,
        engine: (&str, f64),
        reference: (&str, f64),
        goal: Option<Goal>,
    ) -> String {
        self.push_ratio(label, engine, reference, "MiB", (1, 1), goal)
    }

    /// [`Bench::add_value_ratio`] of two values in `unit` (e.g. "MB/s").
    pub fn add_value_ratio_in(
        &mut self,
        label: &str,
        engine: (&str, f64),
        reference: (&str, f64),
        unit: &str,
        goal: Option<Goal>,
    ) -> String {
        self.push_ratio(label, engine, reference, unit, (1, 1), goal)
    }

    fn push_ratio(
        &mut self,
        label: &str,
        (engine_group, ours): (&str, f64),
        (reference_group, theirs): (&str, f64),
        unit: &str,
        runs: (usize, usize),
        goal: Option<Goal>,
    ) -> String {
        let value = if theirs > 0.0 && ours.is_finite() {
            ours / theirs
        } else {
            0.0
        };
        let goal_met = goal.map(|g| g.met(value));
        self.ratios.push(Ratio {
            label: label.to_owned(),
            engine_group: engine_group.to_owned(),
            reference_group: reference_group.to_owned(),
            unit: unit.to_owned(),
            engine_value: ours,
            reference_value: theirs,
            runs,
            value,
            goal,
            goal_met,
        });
        let verdict = match (goal, goal_met) {
            (Some(g), Some(true)) => format!("  (goal {}: met)", g.text()),
            (Some(g), _) => format!("  (goal {}: MISSED)", g.text()),
            _ => String::new(),
        };
        let ours_name = if engine_group.starts_with("engine") {
            "engine"
        } else {
            engine_group
        };
        let decimals = if unit == "MiB/s" { 1 } else { 3 };
        format!(
            "{:<40} {:<26} {ours_name} {:>7.decimals$} {unit}  {reference_group} \
             {:>7.decimals$} {unit}  ratio {:.3}{verdict}",
            self.title, label, ours, theirs, value
        )
    }
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Results {
    /// Format version of this file.
    pub schema_version: u32,
    /// "quick" or "full".
    pub mode: String,
    /// Start, seconds since the Unix epoch.
    pub started_unix_s: u64,
    /// Wall time of the whole run, seconds.
    pub duration_s: f64,
    /// The machine.
    pub machine: MachineInfo,
    /// Benchmarks in run order.
    pub benchmarks: Vec<Bench>,
}
