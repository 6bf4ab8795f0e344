//! Results: the JSON envelope (`results.json`), the Markdown tables (`report.md`) and the
//! ratio lines printed to stdout.
//!
//! ```text
//!  Results { machine, mode, duration, benchmarks: [Bench] }
//!  Bench   { name, params, rows: [Row], ratios: [Ratio], notes }
//!  Row     { engine or fio figure: throughput, ops/s, latencies (one or more kinds), CPU }
//!  Ratio   { median engine run of a group / median fio run, goal, met }
//! ```
//!
//! Every figure is stored unrounded in JSON; the Markdown rounds for reading.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;
use serde_json::Value;

use crate::cpu::CpuTimes;
use crate::fio::FioResult;
use crate::histogram::Percentiles;
use crate::machine::MachineInfo;

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
        }
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

    /// Adds a latency distribution.
    pub fn with_latency(mut self, kind: impl Into<String>, percentiles: Percentiles) -> Self {
        self.latencies.push(Latency {
            kind: kind.into(),
            percentiles,
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
        }
        .with_cpu(r.job_cpu)
        .with_latency("fio clat per write", r.clat)
        .with_extra("command", r.command.clone())
        .with_extra("process_cpu_s", r.process_cpu.total_s());
        if let Some(sync) = r.sync {
            row = row.with_latency("fio fdatasync", sync);
        }
        row
    }
}

/// Engine over fio.
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    /// What is compared, e.g. "throughput, preserve off".
    pub label: String,
    /// The engine rows' group.
    pub engine_group: String,
    /// Median engine throughput of the group, MiB/s.
    pub engine_mib_s: f64,
    /// Median fio throughput, MiB/s.
    pub fio_mib_s: f64,
    /// Engine runs and fio runs the medians are over.
    pub runs: (usize, usize),
    /// `engine_mib_s / fio_mib_s`.
    pub value: f64,
    /// The goal, when there is one.
    pub goal: Option<f64>,
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
    /// returns its stdout line.
    pub fn add_ratio(&mut self, label: &str, engine_group: &str, goal: Option<f64>) -> String {
        let mut ours = self.throughputs(|r| r.side == Side::Engine && r.group == engine_group);
        let mut fio = self.throughputs(|r| r.side == Side::Fio);
        let runs = (ours.len(), fio.len());
        let ours = median(&mut ours).unwrap_or(0.0);
        let fio = median(&mut fio).unwrap_or(0.0);
        let value = if fio > 0.0 { ours / fio } else { 0.0 };
        let goal_met = goal.map(|g| value >= g);
        self.ratios.push(Ratio {
            label: label.to_owned(),
            engine_group: engine_group.to_owned(),
            engine_mib_s: ours,
            fio_mib_s: fio,
            runs,
            value,
            goal,
            goal_met,
        });
        let verdict = match (goal, goal_met) {
            (Some(g), Some(true)) => format!("  (goal >= {g:.2}: met)"),
            (Some(g), _) => format!("  (goal >= {g:.2}: MISSED)"),
            _ => String::new(),
        };
        format!(
            "{:<40} {:<26} engine {:>7.1} MiB/s  fio {:>7.1} MiB/s  ratio {:.3}{verdict}",
            self.title, label, ours, fio, value
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

fn fmt_us(us: f64) -> String {
    if us >= 100.0 {
        format!("{us:.0}")
    } else {
        format!("{us:.1}")
    }
}

/// Renders the Markdown report: machine, then one table per benchmark.
pub fn markdown(results: &Results) -> String {
    let m = &results.machine;
    let mut out = String::new();
    let _ = writeln!(out, "# perf run ({})\n", results.mode);
    let _ = writeln!(out, "| | |\n|---|---|");
    let rows = [
        (
            "git revision",
            m.git_revision.clone().unwrap_or_else(|| "-".into()),
        ),
        ("kernel", m.kernel.clone()),
        ("CPU", format!("{} × {}", m.cpu_count, m.cpu_model)),
        (
            "memory",
            m.memory_bytes
                .map_or("-".into(), |b| format!("{:.1} GiB", b as f64 / GIB)),
        ),
        (
            "scratch",
            format!(
                "{} ({} on {})",
                m.scratch_dir, m.scratch_fs_type, m.scratch_fs_source
            ),
        ),
        ("fio", m.fio_version.clone()),
        ("engine I/O backend", m.io_backend.clone()),
        ("duration", format!("{:.1} s", results.duration_s)),
        (
            "load average (start → end)",
            format!("{} → {}", m.loadavg_start, m.loadavg_end),
        ),
    ];
    for (k, v) in rows {
        let _ = writeln!(out, "| {k} | {v} |");
    }
    for bench in &results.benchmarks {
        let _ = writeln!(out, "\n## {}\n", bench.title);
        let params: Vec<String> = bench
            .params
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => format!("{k}={s}"),
                other => format!("{k}={other}"),
            })
            .collect();
        let _ = writeln!(out, "{}\n", params.join(", "));
        let _ = writeln!(
            out,
            "| row | MiB/s | ops/s | latency of | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs \
             | CPU s | CPU s/GiB |"
        );
        let _ = writeln!(
            out,
            "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"
        );
        for row in &bench.rows {
            let mut first = true;
            let lats: Vec<Option<&Latency>> = if row.latencies.is_empty() {
                vec![None]
            } else {
                row.latencies.iter().map(Some).collect()
            };
            for lat in lats {
                let (head, mib, ops, cpu, cpu_gib) = if first {
                    (
                        row.label.clone(),
                        format!("{:.1}", row.throughput_mib_s),
                        format!("{:.0}", row.ops_per_s),
                        format!("{:.2}", row.cpu.total_s()),
                        format!("{:.2}", row.cpu_s_per_gib),
                    )
                } else {
                    Default::default()
                };
                first = false;
                let lat_cols = match lat {
                    Some(l) => {
                        let p = &l.percentiles;
                        format!(
                            "{} | {} | {} | {} | {} | {}",
                            l.kind,
                            fmt_us(p.p50_us),
                            fmt_us(p.p90_us),
                            fmt_us(p.p99_us),
                            fmt_us(p.p99_9_us),
                            fmt_us(p.max_us)
                        )
                    }
                    None => "- | | | | | ".into(),
                };
                let _ = writeln!(
                    out,
                    "| {head} | {mib} | {ops} | {lat_cols} | {cpu} | {cpu_gib} |"
                );
            }
        }
        out.push('\n');
        for ratio in &bench.ratios {
            let goal = match (ratio.goal, ratio.goal_met) {
                (Some(g), Some(true)) => format!(" — goal ≥ {g:.2}: **met**"),
                (Some(g), _) => format!(" — goal ≥ {g:.2}: **missed**"),
                _ => " — no goal".into(),
            };
            let _ = writeln!(
                out,
                "- ratio {}: median `{}` {:.1} MiB/s ({} runs) / median fio {:.1} MiB/s ({} \
                 runs) = **{:.3}**{goal}",
                ratio.label,
                ratio.engine_group,
                ratio.engine_mib_s,
                ratio.runs.0,
                ratio.fio_mib_s,
                ratio.runs.1,
                ratio.value
            );
        }
        for row in &bench.rows {
            let extras: Vec<String> = row
                .extra
                .iter()
                .filter(|(k, _)| k.as_str() != "command")
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            if !extras.is_empty() {
                let _ = writeln!(out, "- {}: {}", row.label, extras.join(", "));
            }
        }
        for note in &bench.notes {
            let _ = writeln!(out, "- {note}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(v: f64) -> Percentiles {
        Percentiles {
            count: 10,
            mean_us: v,
            p50_us: v,
            p90_us: v,
            p99_us: v,
            p99_9_us: v,
            max_us: v,
        }
    }

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&mut []), None);
    }

    #[test]
    fn ratio_is_median_engine_over_median_fio() {
        let mut bench = Bench::new("x", "x");
        let fio = |mib: u64, n| {
            let mut row = Row::engine("fio", mib << 20, mib, 1.0).run(n);
            row.side = Side::Fio;
            row
        };
        bench.rows = vec![
            fio(100, 1),
            Row::engine("ours", 180 << 20, 180, 1.0).run(1),
            fio(200, 2),
            Row::engine("ours", 170 << 20, 170, 1.0).run(2),
            fio(900, 3),
            Row::engine("other", 10 << 20, 10, 1.0),
        ];
        let line = bench.add_ratio("throughput", "ours", Some(0.8));
        assert!(
            (bench.ratios[0].value - 175.0 / 200.0).abs() < 1e-9,
            "{line}"
        );
        assert_eq!(bench.ratios[0].runs, (2, 3));
        assert_eq!(bench.ratios[0].goal_met, Some(true));
        let md = markdown(&Results {
            schema_version: 1,
            mode: "quick".into(),
            started_unix_s: 0,
            duration_s: 1.0,
            machine: MachineInfo {
                git_revision: None,
                kernel: "k".into(),
                cpu_model: "c".into(),
                cpu_count: 2,
                memory_bytes: None,
                scratch_dir: "/s".into(),
                scratch_fs_type: "ext4".into(),
                scratch_fs_source: "/dev/x".into(),
                scratch_free_bytes: 0,
                fio_version: "fio".into(),
                io_backend: "uring".into(),
                loadavg_start: "0 0 0".into(),
                loadavg_end: "0 0 0".into(),
            },
            benchmarks: vec![{
                let mut b = bench.clone();
                b.rows[3] = b.rows[3].clone().with_latency("batch", p(12.0));
                b
            }],
        });
        assert!(
            md.contains("| ours #2 | 170.0 | 170 | batch | 12.0 |"),
            "{md}"
        );
        assert!(md.contains("**0.875**"), "{md}");
    }
}
