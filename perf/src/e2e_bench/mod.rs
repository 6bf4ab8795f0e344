//! `e2e`: the whole replication path under rising churn. disk-sim agents stream zstd-1 frames
//! of half-compressible data to one real `appliance serve` process over its data port, and
//! every frame's lag from the agent's `write()` to the appliance's durable acknowledgement is
//! measured. Also benchmark 7: the appliance's peak memory with every usable slot in use.
//!
//! ```text
//!  appliance serve (defaults: 32 slots = 31 usable, queue depth 32, 2 GiB staging per item,
//!  64 points kept), data dir in the scratch dir
//!     │
//!     for D in {1, 8, 31} (--tiny: {1, 2}):
//!        clear the appliance's peak RSS (/proc/PID/clear_refs = 5)
//!        POST /v1/items × D (one 256 MiB disk, 4 KiB blocks, each)  ─►  D agents connect
//!        for each churn step C (total MB/s, rising):
//!           D writer threads, each: writes of 64 KiB – 1 MiB (disk-sim workload, uniform
//!           offsets, 50 % of writes compressible), write k not before
//!           start + (bytes before k + half of k) / (C / D); a crash-consistent bookmark every
//!           100 ms; for `step` seconds, then a last bookmark
//!              submit instant of every frame ─► ring (per agent, bounded) ◄─ ack observer:
//!              lag = ack instant − submit instant of every seq the ack covers ─► histogram
//!           sampler thread: GET /v1/items every 500 ms (rpo_lag_ms, cache_used_bytes)
//!           then: flush every agent (drain), wait until every item applied what it staged
//!           row: offered, achieved (data bytes acknowledged inside the window / window),
//!                lag percentiles, p99 < 1 s, API rpo_lag_ms, CPU of the appliance and agents
//!        read VmHWM / VmRSS / VmPin of the appliance; close the agents; DELETE the items
//!     │
//!     ▼
//!  one table per D (headline: the highest step with lag p99 < 1 s and achieved ≥ 95 % of
//!  offered), a summary table with the memory figures, charts, a comparison with the
//!  published figures of ../shared/reference/anchors.md
//! ```
//!
//! MB here is 10⁶ bytes, as in the published figures the summary compares with. The agents run
//! in this process, on the same cores as the appliance: their CPU (compression, data
//! generation) is in the table, and every figure is for both sharing the machine.
//! Achieved churn counts only acknowledgements that arrive inside the step's window, so an
//! appliance that falls behind shows a lower figure even if the drain afterwards catches up.
//! A step whose achieved churn is under 80 % of offered, or whose lag p99 is over 5 s, ends the
//! ladder for that D (the higher steps would only queue more; not in `--tiny`).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use appliance_api::model::{DiskSpec, EnableRequest, ItemView};
use disk_sim::site::{Api, Appliance, parse_item_id};
use disk_sim::workload::{Op, Pattern, Workload, WorkloadSpec};
use engine::delta::{Consistency, DiskGeometry, EncoderOptions};
use source_agent::sender::{Agent, AgentConfig};

use crate::cpu::{self, CpuTimes};
use crate::histogram::LatencyHistogram;
use crate::machine::Scratch;
use crate::report::{Bench, Chart, ChartLine, Goal, Row};
use crate::series::IntervalBytes;

mod api;
mod disk;
mod disk_count;
pub(crate) mod process;
mod step;
#[cfg(test)]
mod tests;
mod tracker;

use api::*;
use disk::*;
use disk_count::*;
use process::*;
use step::*;
use tracker::*;

/// 10⁶ bytes: the unit of churn in this benchmark (and in the published figures).
pub const MB: f64 = 1e6;
/// Smallest write issued (the workload's smaller writes are skipped).
pub const MIN_WRITE_BYTES: u32 = 64 << 10;
/// A crash-consistent bookmark this often, per agent.
pub const BOOKMARK_EVERY: Duration = Duration::from_millis(100);
/// The API's items are read this often during a step.
pub const API_SAMPLE_EVERY: Duration = Duration::from_millis(500);
/// The lag goal: p99 under this.
pub const LAG_GOAL: Duration = Duration::from_secs(1);
/// A step is sustained when achieved churn is at least this share of offered.
pub const ACHIEVED_SHARE_GOAL: f64 = 0.95;
/// Benchmark 7's goal: peak RSS of the appliance under this, MiB.
pub const MEMORY_GOAL_MIB: f64 = 512.0;
/// Frames whose submit instant a tracker remembers (an agent's 64 MiB backlog holds at most
/// about 1,100 frames of at least 64 KiB plus its bookmarks).
const RING_FRAMES: usize = 16_384;
/// Longest wait for the acknowledgements of a step (drain) and for the apply to catch up.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);
/// A step this far below offered (achieved share), or with a lag p99 this long, ends the ladder.
const GIVE_UP_SHARE: f64 = 0.8;
const GIVE_UP_P99: Duration = Duration::from_secs(5);

/// Sizes of the e2e benchmark.
#[derive(Debug, Clone)]
pub struct E2ePlan {
    /// Disks (= protected items = agents) per run, ascending; the last is every usable slot
    /// in `--quick` and full runs.
    pub disk_counts: Vec<usize>,
    /// Churn steps, total MB/s across all disks, rising.
    pub steps_mb_s: Vec<u64>,
    /// Length of one step.
    pub step: Duration,
    /// Size of each replica disk, MiB.
    pub disk_mib: u64,
    /// End a disk count's ladder after a step far from sustained (not in `--tiny`, whose
    /// steps are too short for their figures to mean anything).
    pub stop_when_saturated: bool,
}

impl E2ePlan {
    /// The plan of a mode.
    pub fn new(quick: bool, tiny: bool) -> Self {
        if tiny {
            Self {
                disk_counts: vec![1, 2],
                steps_mb_s: vec![4, 8],
                step: Duration::from_secs(1),
                disk_mib: 64,
                stop_when_saturated: false,
            }
        } else if quick {
            Self {
                disk_counts: vec![1, 8, 31],
                steps_mb_s: vec![8, 96, 384],
                step: Duration::from_secs(3),
                disk_mib: 256,
                stop_when_saturated: true,
            }
        } else {
            Self {
                disk_counts: vec![1, 8, 31],
                steps_mb_s: vec![8, 16, 32, 64, 128, 256, 384, 512, 768, 1024],
                step: Duration::from_secs(15),
                disk_mib: 256,
                stop_when_saturated: true,
            }
        }
    }

    /// Churn of the whole ladder, bytes.
    fn ladder_bytes(&self) -> u64 {
        let sum: u64 = self.steps_mb_s.iter().sum();
        (sum as f64 * MB * self.step.as_secs_f64()) as u64
    }

    /// Scratch space needed: the replica disks (sparse: at most what is written), staging
    /// holding the top step's whole data (at most the default 2 GiB per item), and 1 GiB for
    /// the appliance's metadata. The preserve store (at most 64 intervals of 100 ms: 6.4 s of
    /// churn) is not counted apart: the staging term assumes the apply makes no progress
    /// during the top step, which it does. The last full run (1 GB/s top step) fit in what
    /// this asks for.
    pub fn scratch_bytes(&self) -> u64 {
        let disks = self.disk_counts.iter().max().copied().unwrap_or(1) as u64;
        let replicas = (disks * (self.disk_mib << 20)).min(self.ladder_bytes());
        let top = self.steps_mb_s.iter().max().copied().unwrap_or(0) as f64;
        let top_step_bytes = (top * MB * self.step.as_secs_f64()) as u64;
        let staging = top_step_bytes.min(disks * (2 << 30));
        replicas + staging + (1 << 30)
    }
}

/// The `appliance` binary (beside this program, or `$APPLIANCE_BIN`), or an error that says
/// how to build it. Checked before anything runs.
pub fn appliance_binary() -> Result<PathBuf> {
    let release = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .is_none_or(|dir| !dir.ends_with("debug") && !dir.ends_with("deps"));
    let build = if release {
        "cargo build --release -p appliance"
    } else {
        "cargo build -p appliance"
    };
    let bin = disk_sim::site::appliance_bin().map_err(|_| {
        anyhow!(
            "the e2e and export benchmarks need the appliance binary, and there is none beside \
             {} (nor in APPLIANCE_BIN); build it: {build}",
            std::env::current_exe()
                .map_or_else(|_| "this program".into(), |p| p.display().to_string())
        )
    })?;
    if !bin.is_file() {
        bail!(
            "the e2e and export benchmarks need the appliance binary, and {} is not a file; \
             build it: {build}",
            bin.display()
        );
    }
    Ok(bin)
}

/// "1 disk", "8 disks".
fn disks_text(disks: usize) -> String {
    format!("{disks} disk{}", if disks == 1 { "" } else { "s" })
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Runs the e2e benchmark: one table per disk count, then the summary (memory, headline,
/// charts, published figures). Pushes one stdout line per ratio and per headline.
pub fn e2e(
    scratch: &Scratch,
    bin: &Path,
    plan: &E2ePlan,
    lines: &mut Vec<String>,
) -> Result<Vec<Bench>> {
    let data_dir = scratch.join("e2e-appliance");
    progress!(
        "e2e: starting {} serve (default settings) in {}",
        bin.display(),
        data_dir.display()
    );
    let appliance = Appliance::start_with_bin(bin, &data_dir, &[])?;
    let pid = appliance
        .pid()
        .ok_or_else(|| anyhow!("the appliance has no process id"))?;
    let info = appliance.client().appliance()?;
    let usable = info.slots_usable as usize;
    let version = info.version;
    if let Some(&most) = plan.disk_counts.iter().max()
        && most > usable
    {
        bail!("e2e wants {most} disks, the appliance has {usable} usable slots");
    }
    let memory_at_start = memory_of(pid)?;
    let bin_mtime = std::fs::metadata(bin)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());

    let mut runs = Vec::new();
    for &d in &plan.disk_counts {
        runs.push(run_disk_count(&appliance, pid, d, plan)?);
    }
    appliance.stop().context("stopping the appliance")?;

    let mut benches = Vec::new();
    let common = |bench: &mut Bench| {
        bench.param("appliance", bin.display().to_string());
        bench.param("appliance_version", version.clone());
        bench.param("appliance_mtime_unix_s", bin_mtime);
        bench.param(
            "appliance_settings",
            "defaults (slots 32, queue_depth 32, cache_mib 2048, keep_points 64)",
        );
        bench.param("disk_mib", plan.disk_mib);
        bench.param("step_s", plan.step.as_secs_f64());
        bench.param(
            "writes",
            "64 KiB – 1 MiB (powers of two), uniform offsets, 50 % compressible",
        );
        bench.param("zstd_level", 1);
        bench.param("bookmark_every_ms", BOOKMARK_EVERY.as_millis() as u64);
    };
    for run in &runs {
        let disks = run.disks;
        let every = if disks == usable {
            " (every usable slot)"
        } else {
            ""
        };
        let title = format!("e2e, {}{every}", disks_text(disks));
        let mut bench = Bench::new("e2e", &title);
        common(&mut bench);
        bench.param("disks", disks as u64);
        bench.param("steps_mb_s", plan.steps_mb_s.clone());
        bench.rows = run.steps.iter().map(|s| s.row.clone()).collect();
        let headline = match run.headline() {
            Some(step) => {
                let p = step.lag.summary();
                format!(
                    "highest step sustained (lag p99 < 1 s, achieved ≥ 95 % of offered): **{:.0} \
                     MB/s** ({:.1} MB/s per disk), achieved {:.1} MB/s, lag p99 {:.1} ms",
                    step.offered_mb_s,
                    step.offered_mb_s / disks as f64,
                    step.achieved_mb_s,
                    p.p99_us / 1e3
                )
            }
            None => "highest step sustained (lag p99 < 1 s, achieved ≥ 95 % of offered): \
                     **none**"
                .into(),
        };
        let missed_below = run.missed_below_headline();
        let headline = if missed_below.is_empty() {
            headline
        } else {
            format!(
                "{headline}; a lower step missed (noise from other work on the machine, or a \
                 real dip: see the table): {} MB/s",
                missed_below
                    .iter()
                    .map(|s| format!("{:.0}", s.offered_mb_s))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        lines.push(format!("{:<40} {}", title, headline.replace("**", "")));
        bench.notes.push(headline);
        if let Some(top) = run.steps.last() {
            lines.push(bench.add_value_ratio_in(
                &format!("achieved / offered at {:.0} MB/s", top.offered_mb_s),
                ("achieved", top.achieved_mb_s),
                ("offered", top.offered_mb_s),
                "MB/s",
                None,
            ));
        }
        if !run.skipped_steps.is_empty() {
            bench.notes.push(format!(
                "steps {:?} MB/s not run: the step before achieved under {:.0} % of offered or \
                 had a lag p99 over {} s",
                run.skipped_steps,
                GIVE_UP_SHARE * 100.0,
                GIVE_UP_P99.as_secs()
            ));
        }
        bench.notes.push(
            "lag: per frame (writes and bookmarks), from the agent's write() call to the \
             appliance's acknowledgement that covers its seq (durable in staging, not yet \
             applied); achieved: data bytes acknowledged inside the step's window / window; \
             API rpo_lag_ms: age of the newest recovery point (applied), sampled every 500 ms; \
             drain: writers stopped → every frame acknowledged; CPU: appliance process \
             (/proc/PID/stat) and this process (agents, data generation, zstd) from the step's \
             start until the apply caught up"
                .into(),
        );
        benches.push(bench);
    }

    // Summary: headline per D, memory (benchmark 7), charts, published figures.
    let mut summary = Bench::new("e2e", "e2e, summary and appliance memory");
    common(&mut summary);
    let mut table = String::from(
        "| disks | highest step sustained, MB/s | per disk, MB/s | lag p99 there, ms | top step \
         offered → achieved, MB/s | appliance VmHWM, MiB | VmRSS at the end, MiB | VmPin, MiB |\n\
         |---:|---:|---:|---:|---|---:|---:|---:|\n",
    );
    for run in &runs {
        let (best, per_disk, p99) = match run.headline() {
            Some(s) => (
                format!("{:.0}", s.offered_mb_s),
                format!("{:.2}", s.offered_mb_s / run.disks as f64),
                format!("{:.1}", s.lag.summary().p99_us / 1e3),
            ),
            None => ("none".into(), "-".into(), "-".into()),
        };
        let top = run.steps.last().map_or("-".into(), |s| {
            format!("{:.0} → {:.1}", s.offered_mb_s, s.achieved_mb_s)
        });
        table.push_str(&format!(
            "| {} | {best} | {per_disk} | {p99} | {top} | {:.0} | {:.0} | {:.0} |\n",
            run.disks,
            mib(run.memory.hwm_kib),
            mib(run.memory.rss_kib),
            mib(run.memory.pin_kib)
        ));
    }
    summary.prose.push(table);

    let largest = runs
        .iter()
        .max_by_key(|r| r.disks)
        .ok_or_else(|| anyhow!("no e2e run"))?;
    let smallest = runs
        .iter()
        .min_by_key(|r| r.disks)
        .ok_or_else(|| anyhow!("no e2e run"))?;
    let peak_mib = mib(largest.memory.hwm_kib);
    summary.param("appliance_vmhwm_mib_at_start", mib(memory_at_start.hwm_kib));
    for run in &runs {
        summary.param(
            &format!("appliance_vmhwm_mib_{}_disks", run.disks),
            mib(run.memory.hwm_kib),
        );
        summary.param(
            &format!("appliance_vmpin_mib_{}_disks", run.disks),
            mib(run.memory.pin_kib),
        );
    }
    lines.push(summary.add_value_ratio_in(
        &format!("peak RSS, {} disks / goal", largest.disks),
        ("VmHWM", peak_mib),
        ("goal", MEMORY_GOAL_MIB),
        "MiB",
        Some(Goal::AtMost(1.0)),
    ));
    let per_item = if largest.disks > smallest.disks {
        (peak_mib - mib(smallest.memory.hwm_kib)) / (largest.disks - smallest.disks) as f64
    } else {
        0.0
    };
    let pin_per_item = if largest.disks > 0 {
        mib(largest.memory.pin_kib) / largest.disks as f64
    } else {
        0.0
    };
    let met = peak_mib < MEMORY_GOAL_MIB;
    let pinned_mib = mib(largest.memory.pin_kib);
    let pinned_alone = if pin_per_item > 0.0 {
        let items = (MEMORY_GOAL_MIB / pin_per_item).ceil();
        format!(
            "; at {pin_per_item:.0} MiB per item the pinned part alone reaches the goal at \
             {items:.0} protected items"
        )
    } else {
        String::new()
    };
    summary.prose.push(format!(
        "**Memory (benchmark 7).** Peak RSS (VmHWM of /proc/PID/status) of the appliance during \
         the {}-disk run{}: **{peak_mib:.0} MiB**; goal < {MEMORY_GOAL_MIB:.0} MiB at default \
         settings: **{}**. Of it, {pinned_mib:.0} MiB are pinned (VmPin at the end of the run, \
         {pin_per_item:.1} MiB per protected item: each item's apply worker registers \
         its buffer pool with io_uring) and {:.0} MiB are the rest{pinned_alone}. From {} to {} \
         disks the peak grew by {per_item:.1} MiB per item.",
        largest.disks,
        if largest.peak_reset {
            " (the peak was reset through /proc/PID/clear_refs before the run)"
        } else {
            " (the peak could not be reset: it covers the whole process lifetime)"
        },
        if met { "met" } else { "not met" },
        (peak_mib - pinned_mib).max(0.0),
        smallest.disks,
        largest.disks,
    ));

    // Charts across D.
    let mut achieved = Chart {
        name: "achieved vs offered churn".into(),
        x_desc: "offered churn, MB/s (all disks)".into(),
        y_desc: "achieved churn, MB/s (acknowledged in the window)".into(),
        log_y: false,
        lines: Vec::new(),
    };
    let mut lag = Chart {
        name: "lag vs offered churn".into(),
        x_desc: "offered churn, MB/s (all disks)".into(),
        y_desc: "frame lag to the durable ack, ms (log)".into(),
        log_y: true,
        lines: Vec::new(),
    };
    let max_offered = plan.steps_mb_s.iter().max().copied().unwrap_or(1) as f64;
    let min_offered = plan.steps_mb_s.iter().min().copied().unwrap_or(0) as f64;
    achieved.lines.push(ChartLine {
        label: "offered (y = x)".into(),
        points: vec![(min_offered, min_offered), (max_offered, max_offered)],
        reference: true,
    });
    lag.lines.push(ChartLine {
        label: "1 s (goal for p99)".into(),
        points: vec![(min_offered, 1000.0), (max_offered, 1000.0)],
        reference: true,
    });
    for run in &runs {
        achieved.lines.push(ChartLine {
            label: disks_text(run.disks),
            points: run
                .steps
                .iter()
                .map(|s| (s.offered_mb_s, s.achieved_mb_s))
                .collect(),
            reference: false,
        });
        for (name, pick) in [
            (
                "p50",
                (|p: &crate::histogram::Percentiles| p.p50_us) as fn(&_) -> f64,
            ),
            ("p99", |p| p.p99_us),
        ] {
            lag.lines.push(ChartLine {
                label: format!("{}, {name}", disks_text(run.disks)),
                points: run
                    .steps
                    .iter()
                    .filter(|s| s.lag.count() > 0)
                    .map(|s| (s.offered_mb_s, pick(&s.lag.summary()) / 1e3))
                    .collect(),
                reference: false,
            });
        }
    }
    summary.charts = vec![achieved, lag];
    summary.prose.push(anchors_paragraph(&runs, usable));
    benches.push(summary);
    Ok(benches)
}

/// The comparison with the published figures of `../shared/reference/anchors.md`: only
/// comparison; every figure of ours is one measured here.
fn anchors_paragraph(runs: &[DiskCountRun], usable: usize) -> String {
    let ours: Vec<String> = runs
        .iter()
        .map(|run| match run.headline() {
            Some(s) => format!(
                "{}: {:.0} MB/s in all, {:.2} MB/s per disk (lag p99 {:.1} ms)",
                disks_text(run.disks),
                s.offered_mb_s,
                s.offered_mb_s / run.disks as f64,
                s.lag.summary().p99_us / 1e3
            ),
            None => format!("{}: no step sustained", disks_text(run.disks)),
        })
        .collect();
    let top = runs
        .iter()
        .flat_map(|r| r.steps.last())
        .map(|s| s.offered_mb_s)
        .fold(0.0, f64::max);
    let mut side_by_side = Vec::new();
    if let Some(run) = runs.iter().filter(|r| r.disks > 1).max_by_key(|r| r.disks)
        && let Some(s) = run.headline()
    {
        side_by_side.push(format!(
            "with {} disks this appliance sustained {:.2} MB/s per disk, {:.0} MB/s in all, where \
             the Hub tests ran 1–2 MB/s per disk, 28–136 MB/s in all over 28–68 disks",
            run.disks,
            s.offered_mb_s / run.disks as f64,
            s.offered_mb_s
        ));
    }
    if let Some(run) = runs.iter().find(|r| r.disks == 1)
        && let Some(s) = run.headline()
    {
        side_by_side.push(format!(
            "one disk here sustained {:.0} MB/s, next to the A2A limits of 54 MB/s per VM \
             (normal) and 50 MB/s per disk (P30 and larger)",
            s.offered_mb_s
        ));
    }
    let side_by_side = if side_by_side.is_empty() {
        String::new()
    } else {
        format!(" Side by side: {}.", side_by_side.join("; "))
    };
    format!(
        "**Next to the published figures.** Measured here (highest step sustained; a step at \
         the top of the ladder, {top:.0} MB/s, is a floor, not the limit): {}. The published \
         figures, as listed in `../shared/reference/anchors.md` (its sources [8] and [4]): ASR \
         Azure-to-Azure churn limits of 54 MB/s per VM (normal), 100 MB/s per VM (High Churn) \
         and up to 500 MB/s per VM (preview), and per disk from 2 MB/s (standard disks, 8 KB \
         I/O) to 50 MB/s (P30 and larger) [8]; the ASR Azure Stack Hub appliance, a DS4_v2 VM \
         (8 vCPU, 28 GB) with 32 data-disk slots of which 31 usable, tested at 2 MB blocks × \
         2 MB/s per disk = 136 MB/s over 68 disks (storage-bound), 64 KB × 2 MB/s = 120 MB/s \
         over 60 disks, and 8 KB × 1 MB/s = 28 MB/s over 28 disks (CPU/memory-bound) [4].\
         {side_by_side} The conditions differ: here one 2-vCPU machine runs both the agents \
         (data generation, zstd) and the appliance, over loopback (no network), with {usable} \
         usable slots, 64 KiB – 1 MiB writes, and the lag ends at the durable staging \
         acknowledgement (the apply to the replicas follows; see API rpo_lag_ms). These are \
         comparisons of orders of magnitude, not a ranking.",
        ours.join("; ")
    )
}
