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
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use disk_sim::agent::{Agent, AgentConfig};
use disk_sim::site::{Api, Appliance, parse_item_id};
use disk_sim::workload::{Op, Pattern, Workload, WorkloadSpec};
use engine::delta::{Consistency, DiskGeometry, EncoderOptions};
use serde_json::json;

use crate::cpu::{self, CpuTimes};
use crate::histogram::LatencyHistogram;
use crate::machine::Scratch;
use crate::report::{Bench, Chart, ChartLine, Goal, Row};
use crate::series::IntervalBytes;

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
            "the e2e benchmark needs the appliance binary, and there is none beside {} (nor \
             in APPLIANCE_BIN); build it: {build}",
            std::env::current_exe()
                .map_or_else(|_| "this program".into(), |p| p.display().to_string())
        )
    })?;
    if !bin.is_file() {
        bail!(
            "the e2e benchmark needs the appliance binary, and {} is not a file; build it: \
             {build}",
            bin.display()
        );
    }
    Ok(bin)
}

// ─────────────── lag tracking ───────────────

/// A frame waiting for its acknowledgement.
#[derive(Debug, Clone, Copy)]
struct Pending {
    seq: u64,
    submitted: Instant,
    /// Data bytes (0 for a bookmark).
    bytes: u64,
}

/// One agent's frames of the current step: submit instants by seq, and what the acks made of
/// them. Shared between the writer thread and the agent's ack observer.
#[derive(Debug)]
struct Tracker {
    pending: VecDeque<Pending>,
    acked: Option<u64>,
    /// Lag of every acknowledged frame of the step (writes and bookmarks).
    lag: LatencyHistogram,
    /// The step's window: acks inside it count towards achieved churn.
    window: (Instant, Instant),
    acked_bytes_in_window: u64,
    acked_frames: u64,
    series: IntervalBytes,
    /// Submit instants pushed out of a full ring (their lag is lost); 0 in every run so far.
    dropped: u64,
}

impl Tracker {
    fn new(start: Instant, end: Instant) -> Self {
        Self {
            pending: VecDeque::with_capacity(RING_FRAMES),
            acked: None,
            lag: LatencyHistogram::new(),
            window: (start, end),
            acked_bytes_in_window: 0,
            acked_frames: 0,
            series: IntervalBytes::starting_at(start),
            dropped: 0,
        }
    }

    /// Starts a new step (nothing may be outstanding: the previous step was drained).
    fn reset(&mut self, start: Instant, end: Instant) {
        self.pending.clear();
        self.lag = LatencyHistogram::new();
        self.window = (start, end);
        self.acked_bytes_in_window = 0;
        self.acked_frames = 0;
        self.series = IntervalBytes::starting_at(start);
        self.dropped = 0;
    }

    /// Frame `seq` was submitted at `submitted`. Its ack may already have come (the ack
    /// thread can beat the writer to this lock): then its lag ends now.
    fn submitted(&mut self, seq: u64, submitted: Instant, bytes: u64) {
        if self.acked.is_some_and(|acked| seq <= acked) {
            self.record(Instant::now(), submitted, bytes);
            return;
        }
        if self.pending.len() == RING_FRAMES {
            self.pending.pop_front();
            self.dropped += 1;
        }
        self.pending.push_back(Pending {
            seq,
            submitted,
            bytes,
        });
    }

    /// The appliance acknowledged every frame through `seq` at `at`.
    fn acked(&mut self, seq: u64, at: Instant) {
        self.acked = Some(self.acked.map_or(seq, |a| a.max(seq)));
        while let Some(front) = self.pending.front().copied() {
            if front.seq > seq {
                break;
            }
            self.pending.pop_front();
            self.record(at, front.submitted, front.bytes);
        }
    }

    fn record(&mut self, at: Instant, submitted: Instant, bytes: u64) {
        self.lag.observe(at.saturating_duration_since(submitted));
        self.acked_frames += 1;
        let (start, end) = self.window;
        if bytes > 0 && at >= start && at < end {
            self.acked_bytes_in_window += bytes;
            self.series.add(at, bytes);
        }
    }
}

fn lock(tracker: &Mutex<Tracker>) -> MutexGuard<'_, Tracker> {
    tracker.lock().unwrap_or_else(|e| e.into_inner())
}

// ─────────────── the appliance process ───────────────

/// Memory figures of a process from /proc/PID/status, KiB.
#[derive(Debug, Clone, Copy, Default)]
struct Memory {
    hwm_kib: u64,
    rss_kib: u64,
    pin_kib: u64,
}

fn memory_of(pid: u32) -> Result<Memory> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    Ok(Memory {
        hwm_kib: field("VmHWM:").ok_or_else(|| anyhow!("{path} has no VmHWM"))?,
        rss_kib: field("VmRSS:").unwrap_or(0),
        pin_kib: field("VmPin:").unwrap_or(0),
    })
}

/// Resets the peak RSS (VmHWM) of `pid` to its current RSS; false if the kernel refused.
fn reset_peak_rss(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// User and system CPU time of process `pid` (all its threads) from /proc/PID/stat.
fn cpu_of(pid: u32) -> Result<CpuTimes> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // After the command name in parentheses: state (field 3) … utime (14), stime (15).
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("{path}: unexpected format"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64> {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .map(|v| v as f64)
            .ok_or_else(|| anyhow!("{path}: no field {}", i + 3))
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(CpuTimes {
        user_s: ticks(11)? / hz,
        system_s: ticks(12)? / hz,
    })
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

// ─────────────── one protected disk ───────────────

/// One protected item with one disk, its agent and its workload.
struct Disk {
    item: String,
    agent: Agent,
    tracker: Arc<Mutex<Tracker>>,
    workload: Workload,
    data: Vec<u8>,
    /// A write generated but not yet issued (its data in `data`): offset.
    pending_offset: Option<u64>,
    bookmark_id: u64,
}

/// What one writer did in a step.
#[derive(Debug, Default, Clone, Copy)]
struct Written {
    bytes: u64,
    writes: u64,
    bookmarks: u64,
}

impl Disk {
    fn enable(
        api: &Api,
        data_addr: std::net::SocketAddr,
        name: &str,
        disk_mib: u64,
        seed: u64,
    ) -> Result<Self> {
        let geometry = DiskGeometry {
            size_bytes: disk_mib << 20,
            block_size_bytes: 4096,
        };
        let enabled = api
            .enable(json!({
                "name": name,
                "disks": [{"size_mib": disk_mib, "block_size_bytes": 4096}],
            }))
            .with_context(|| format!("enabling protection of {name}"))?;
        let (item, token) = (enabled.id, enabled.token);
        let now = Instant::now();
        let tracker = Arc::new(Mutex::new(Tracker::new(now, now)));
        let mut config = AgentConfig::new(
            data_addr,
            parse_item_id(&item)?,
            token.as_bytes(),
            name,
            vec![geometry],
        );
        config.encoder = EncoderOptions {
            zstd_level: Some(1),
        };
        // A writer blocked on a full backlog waits for the appliance, however long a step's
        // overload takes to clear.
        config.send_timeout = Duration::from_secs(300);
        let observed = tracker.clone();
        config.ack_observer = Some(Arc::new(move |seq| {
            let at = Instant::now();
            lock(&observed).acked(seq, at);
        }));
        let agent =
            Agent::connect(config).with_context(|| format!("connecting the agent of {name}"))?;
        let spec = WorkloadSpec {
            pattern: Pattern::Uniform,
            zero_range_per_mille: 0,
            compressible_percent: 50,
            ..WorkloadSpec::default()
        }
        .with_timed_bookmarks(0, 0);
        Ok(Self {
            item,
            agent,
            tracker,
            workload: Workload::new(seed, spec, vec![geometry]),
            data: Vec::with_capacity(1 << 20),
            pending_offset: None,
            bookmark_id: 0,
        })
    }

    /// The next write of at least [`MIN_WRITE_BYTES`] (generated once, kept until issued):
    /// its offset and length.
    fn next_write(&mut self) -> (u64, usize) {
        loop {
            if let Some(offset) = self.pending_offset {
                return (offset, self.data.len());
            }
            if let Op::Write {
                offset_bytes,
                length_bytes,
                ..
            } = self.workload.next_op(&mut self.data)
                && length_bytes >= MIN_WRITE_BYTES
            {
                self.pending_offset = Some(offset_bytes);
            }
        }
    }

    /// A crash-consistent bookmark, stamped with the source's clock.
    fn bookmark(&mut self) -> Result<()> {
        self.bookmark_id += 1;
        let at = Instant::now();
        let seq = self
            .agent
            .bookmark(Consistency::Crash, self.bookmark_id, unix_ns(), "")
            .with_context(|| format!("bookmark of item {}", self.item))?;
        lock(&self.tracker).submitted(seq, at, 0);
        Ok(())
    }

    /// Writes at `rate` bytes/s from `start` to `end` (see the module docs), with a
    /// bookmark every [`BOOKMARK_EVERY`].
    fn write_step(&mut self, rate: f64, start: Instant, end: Instant) -> Result<Written> {
        let mut done = Written::default();
        let mut next_bookmark = start + BOOKMARK_EVERY;
        if let Some(wait) = start.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        loop {
            let now = Instant::now();
            if now >= end {
                // A last bookmark, so that the step's writes end in a recovery point (the
                // appliance's applied watermark moves by points).
                self.bookmark()?;
                done.bookmarks += 1;
                return Ok(done);
            }
            if now >= next_bookmark {
                self.bookmark()?;
                done.bookmarks += 1;
                next_bookmark += BOOKMARK_EVERY;
                if next_bookmark <= now {
                    next_bookmark = now + BOOKMARK_EVERY;
                }
                continue;
            }
            let (offset, len) = self.next_write();
            let due = start
                + Duration::from_secs_f64((done.bytes as f64 + len as f64 / 2.0) / rate.max(1.0));
            if due >= end || now < due {
                let wake = if due >= end { end } else { due };
                std::thread::sleep(wake.min(next_bookmark).saturating_duration_since(now));
                continue;
            }
            let at = Instant::now();
            let seq = self
                .agent
                .write(0, offset, &self.data)
                .with_context(|| format!("write of item {}", self.item))?;
            lock(&self.tracker).submitted(seq, at, len as u64);
            self.pending_offset = None;
            done.bytes += len as u64;
            done.writes += 1;
        }
    }

    /// Waits until every frame made is acknowledged and the tracker has seen the ack.
    fn drain(&self, timeout: Duration) -> Result<()> {
        let acked = self
            .agent
            .flush(timeout)
            .with_context(|| format!("draining the agent of item {}", self.item))?;
        let deadline = Instant::now() + Duration::from_secs(5);
        // flush can return before the ack thread has told the observer.
        while lock(&self.tracker).acked.is_none_or(|a| a < acked) {
            if Instant::now() > deadline {
                bail!(
                    "the ack observer of item {} never saw seq {acked}",
                    self.item
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }
}

// ─────────────── API samples ───────────────

/// What the API said during a step.
#[derive(Debug, Default, Clone)]
struct ApiSamples {
    /// `rpo_lag_ms` of every item at every sample that had a point.
    rpo_lag_ms: Vec<f64>,
    /// Largest sum of `cache_used_bytes` over the items at one sample.
    staging_peak_bytes: u64,
    samples: u64,
    errors: u64,
}

fn sample_api(api: &Api, items: &[String], start: Instant, end: Instant) -> ApiSamples {
    let mut out = ApiSamples::default();
    let mut next = start + API_SAMPLE_EVERY;
    while next < end {
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        next += API_SAMPLE_EVERY;
        let Ok(list) = api.get("/v1/items") else {
            out.errors += 1;
            continue;
        };
        out.samples += 1;
        let mut staging = 0;
        for view in list.as_array().into_iter().flatten() {
            if !view["id"]
                .as_str()
                .is_some_and(|id| items.iter().any(|i| i == id))
            {
                continue;
            }
            if let Some(lag) = view["rpo_lag_ms"].as_u64() {
                out.rpo_lag_ms.push(lag as f64);
            }
            staging += view["cache_used_bytes"].as_u64().unwrap_or(0);
        }
        out.staging_peak_bytes = out.staging_peak_bytes.max(staging);
    }
    out
}

/// Waits until every item has applied what it staged; returns how long that took.
fn wait_applied(api: &Api, items: &[String], timeout: Duration) -> Result<Duration> {
    let started = Instant::now();
    loop {
        let list = api.get("/v1/items")?;
        let behind: Vec<&serde_json::Value> = list
            .as_array()
            .into_iter()
            .flatten()
            .filter(|v| {
                v["id"]
                    .as_str()
                    .is_some_and(|id| items.iter().any(|i| i == id))
            })
            .filter(|v| v["applied_seq"].as_u64() < v["staged_seq"].as_u64())
            .collect();
        if behind.is_empty() {
            return Ok(started.elapsed());
        }
        // An item whose apply stopped will never catch up: say why now, not at the timeout.
        if let Some(failed) = behind
            .iter()
            .find(|v| v["health"].as_str().is_some_and(|h| h != "healthy"))
        {
            bail!(
                "item {} stopped applying: {}",
                failed["name"].as_str().unwrap_or("?"),
                failed["health"].as_str().unwrap_or("?")
            );
        }
        if started.elapsed() > timeout {
            bail!(
                "{} items still applying after {timeout:?}; the first: {}",
                behind.len(),
                behind[0]
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ─────────────── a step ───────────────

/// The figures of one churn step.
#[derive(Debug, Clone)]
struct Step {
    offered_mb_s: f64,
    achieved_mb_s: f64,
    submitted_mb_s: f64,
    lag: LatencyHistogram,
    row: Row,
}

impl Step {
    fn share(&self) -> f64 {
        if self.offered_mb_s > 0.0 {
            self.achieved_mb_s / self.offered_mb_s
        } else {
            0.0
        }
    }

    fn p99(&self) -> Duration {
        Duration::from_micros(self.lag.summary().p99_us as u64)
    }

    /// Lag p99 under a second and achieved at least 95 % of offered.
    fn sustained(&self) -> bool {
        self.lag.count() > 0 && self.p99() < LAG_GOAL && self.share() >= ACHIEVED_SHARE_GOAL
    }
}

fn percentile(values: &mut [f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let index = ((p / 100.0) * (values.len() - 1) as f64).round() as usize;
    values.get(index).copied()
}

fn run_step(
    disks: &mut [Disk],
    api: &Api,
    pid: u32,
    offered_mb_s: u64,
    step: Duration,
) -> Result<Step> {
    let count = disks.len();
    let rate = offered_mb_s as f64 * MB / count as f64;
    let start = Instant::now() + Duration::from_millis(20);
    let end = start + step;
    for disk in disks.iter() {
        lock(&disk.tracker).reset(start, end);
    }
    let items: Vec<String> = disks.iter().map(|d| d.item.clone()).collect();
    let appliance_cpu_before = cpu_of(pid)?;
    let agents_cpu_before = cpu::process()?;
    let (written, api_samples) = std::thread::scope(|scope| -> Result<_> {
        let sampler = scope.spawn(|| sample_api(api, &items, start, end));
        let writers: Vec<_> = disks
            .iter_mut()
            .map(|disk| scope.spawn(move || disk.write_step(rate, start, end)))
            .collect();
        let mut total = Written::default();
        for writer in writers {
            let w = writer
                .join()
                .map_err(|_| anyhow!("a writer thread panicked"))??;
            total.bytes += w.bytes;
            total.writes += w.writes;
            total.bookmarks += w.bookmarks;
        }
        let samples = sampler
            .join()
            .map_err(|_| anyhow!("the API sampler panicked"))?;
        Ok((total, samples))
    })?;
    let writers_done = Instant::now();
    for disk in disks.iter() {
        disk.drain(DRAIN_TIMEOUT)?;
    }
    let drained = Instant::now();
    let applied_after = wait_applied(api, &items, DRAIN_TIMEOUT)?;
    let appliance_cpu = cpu_of(pid)?.since(&appliance_cpu_before);
    let agents_cpu = cpu::process()?.since(&agents_cpu_before);

    let mut lag = LatencyHistogram::new();
    let mut series = IntervalBytes::starting_at(start);
    let (mut acked_bytes, mut frames, mut dropped) = (0u64, 0u64, 0u64);
    let mut retransmitted = 0;
    for disk in disks.iter() {
        let t = lock(&disk.tracker);
        if !t.pending.is_empty() {
            bail!(
                "item {}: {} frames still unacknowledged after the drain",
                disk.item,
                t.pending.len()
            );
        }
        lag.merge(&t.lag);
        series.merge(&t.series);
        acked_bytes += t.acked_bytes_in_window;
        frames += t.acked_frames;
        dropped += t.dropped;
        retransmitted += disk.agent.stats().frames_retransmitted;
    }
    let step_s = step.as_secs_f64();
    let achieved_mb_s = acked_bytes as f64 / MB / step_s;
    let submitted_mb_s = written.bytes as f64 / MB / step_s;
    let mut api_lag = api_samples.rpo_lag_ms.clone();
    let label = format!("{}, {offered_mb_s} MB/s", disks_text(count));
    let summary = lag.summary();
    let mut row = Row::engine(&label, acked_bytes, frames, step_s)
        .with_cpu(appliance_cpu)
        .with_histogram("frame lag: agent write() → durable ack", &lag)
        .with_intervals(Some(series.finish(end)))
        .with_extra("offered_mb_s", offered_mb_s as f64)
        .with_extra("achieved_mb_s", achieved_mb_s)
        .with_extra("submitted_mb_s", submitted_mb_s)
        .with_extra(
            "achieved_share",
            if offered_mb_s > 0 {
                achieved_mb_s / offered_mb_s as f64
            } else {
                0.0
            },
        )
        .with_extra(
            "lag_p99_under_1s",
            summary.count > 0 && summary.p99_us < 1e6,
        )
        .with_extra("writes", written.writes)
        .with_extra("bookmarks", written.bookmarks)
        .with_extra("frames_acked", frames)
        .with_extra("frames_retransmitted_total", retransmitted)
        .with_extra("lag_samples_dropped", dropped)
        .with_extra(
            "drain_s",
            drained
                .saturating_duration_since(writers_done)
                .as_secs_f64(),
        )
        .with_extra(
            "writers_overran_s",
            writers_done.saturating_duration_since(end).as_secs_f64(),
        )
        .with_extra("apply_caught_up_s", applied_after.as_secs_f64())
        .with_extra("agents_cpu_s", agents_cpu.total_s())
        .with_extra(
            "staging_peak_mb",
            api_samples.staging_peak_bytes as f64 / MB,
        )
        .with_extra("api_samples", api_samples.samples)
        .with_extra("api_errors", api_samples.errors);
    if let Some(p50) = percentile(&mut api_lag, 50.0) {
        row = row.with_extra("api_rpo_lag_ms_p50", p50);
    }
    if let Some(max) = percentile(&mut api_lag, 100.0) {
        row = row.with_extra("api_rpo_lag_ms_max", max);
    }
    Ok(Step {
        offered_mb_s: offered_mb_s as f64,
        achieved_mb_s,
        submitted_mb_s,
        lag,
        row,
    })
}

// ─────────────── a disk count ───────────────

/// The outcome of one D.
#[derive(Debug, Clone)]
struct DiskCountRun {
    disks: usize,
    steps: Vec<Step>,
    /// The appliance's memory at the end of the run (peak since the run started, when the
    /// peak could be reset).
    memory: Memory,
    peak_reset: bool,
    skipped_steps: Vec<u64>,
}

impl DiskCountRun {
    /// The highest step sustained (lag p99 < 1 s, achieved ≥ 95 % of offered).
    fn headline(&self) -> Option<&Step> {
        self.steps
            .iter()
            .filter(|s| s.sustained())
            .max_by(|a, b| a.offered_mb_s.total_cmp(&b.offered_mb_s))
    }

    /// Steps below the headline that were not sustained (the ladder is not monotonic).
    fn missed_below_headline(&self) -> Vec<&Step> {
        let Some(best) = self.headline() else {
            return Vec::new();
        };
        self.steps
            .iter()
            .filter(|s| s.offered_mb_s < best.offered_mb_s && !s.sustained())
            .collect()
    }
}

fn run_disk_count(
    appliance: &Appliance,
    pid: u32,
    disks_wanted: usize,
    plan: &E2ePlan,
) -> Result<DiskCountRun> {
    let peak_reset = reset_peak_rss(pid);
    progress!(
        "e2e: {}: enabling the items and connecting their agents",
        disks_text(disks_wanted)
    );
    let mut disks = Vec::with_capacity(disks_wanted);
    for i in 0..disks_wanted {
        let name = format!("e2e-{disks_wanted}-{i:02}");
        let seed = 0xe2e0_0000 + (disks_wanted as u64) * 100 + i as u64;
        disks.push(Disk::enable(
            appliance,
            appliance.data_addr,
            &name,
            plan.disk_mib,
            seed,
        )?);
    }
    let mut steps: Vec<Step> = Vec::new();
    let mut skipped_steps = Vec::new();
    for &offered in &plan.steps_mb_s {
        if plan.stop_when_saturated
            && steps
                .last()
                .is_some_and(|s| s.share() < GIVE_UP_SHARE || s.p99() > GIVE_UP_P99)
        {
            skipped_steps.push(offered);
            continue;
        }
        let step = run_step(&mut disks, appliance, pid, offered, plan.step)
            .with_context(|| format!("e2e, {disks_wanted} disks, {offered} MB/s"))?;
        let p = step.lag.summary();
        progress!(
            "e2e: {}, offered {offered} MB/s: achieved {:.1} MB/s (submitted \
             {:.1}), lag p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            disks_text(disks_wanted),
            step.achieved_mb_s,
            step.submitted_mb_s,
            p.p50_us / 1e3,
            p.p99_us / 1e3,
            p.max_us / 1e3
        );
        steps.push(step);
    }
    let memory = memory_of(pid)?;
    progress!(
        "e2e: {}: appliance VmHWM {} MiB, VmRSS {} MiB, VmPin {} MiB; disabling the items",
        disks_text(disks_wanted),
        memory.hwm_kib >> 10,
        memory.rss_kib >> 10,
        memory.pin_kib >> 10
    );
    // Agents closed, then the items disabled, each in its own thread (the API serves them at
    // once; disabling applies what is staged and removes the replica, staging and points).
    let items: Vec<String> = disks.iter().map(|d| d.item.clone()).collect();
    std::thread::scope(|scope| -> Result<()> {
        let closing: Vec<_> = disks
            .into_iter()
            .map(|disk| {
                scope.spawn(move || {
                    disk.agent
                        .close(Duration::from_secs(60))
                        .with_context(|| format!("closing the agent of item {}", disk.item))
                })
            })
            .collect();
        for handle in closing {
            handle
                .join()
                .map_err(|_| anyhow!("closing an agent panicked"))??;
        }
        Ok(())
    })?;
    std::thread::scope(|scope| -> Result<()> {
        let api: &Api = appliance;
        let deleting: Vec<_> = items
            .iter()
            .map(|item| {
                scope.spawn(move || {
                    api.call("DELETE", &format!("/v1/items/{item}"), None)
                        .with_context(|| format!("disabling item {item}"))
                })
            })
            .collect();
        for handle in deleting {
            handle
                .join()
                .map_err(|_| anyhow!("disabling an item panicked"))??;
        }
        Ok(())
    })?;
    Ok(DiskCountRun {
        disks: disks_wanted,
        steps,
        memory,
        peak_reset,
        skipped_steps,
    })
}

// ─────────────── the benchmark ───────────────

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
    let info = appliance.get("/v1/appliance")?;
    let usable = info["slots_usable"].as_u64().unwrap_or(0) as usize;
    let version = info["version"].as_str().unwrap_or("?").to_owned();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracker_lags_cover_acks_before_and_after_the_push() {
        let start = Instant::now();
        let end = start + Duration::from_secs(60);
        let mut t = Tracker::new(start, end);
        t.submitted(5, start, 100);
        t.submitted(6, start, 0);
        t.submitted(7, start, 50);
        t.acked(6, start + Duration::from_millis(10));
        assert_eq!(t.pending.len(), 1);
        assert_eq!(t.acked_frames, 2);
        assert_eq!(t.acked_bytes_in_window, 100);
        // An ack that beats the writer's push: recorded at once.
        t.acked(8, start + Duration::from_millis(20));
        t.submitted(8, start + Duration::from_millis(15), 10);
        assert!(t.pending.is_empty());
        assert_eq!(t.acked_frames, 4);
        assert_eq!(t.acked_bytes_in_window, 160);
        let s = t.lag.summary();
        assert!((9_000.0..=11_000.0).contains(&s.p50_us), "{s:?}");
        // Acks after the window count for lag, not for achieved churn.
        t.reset(start, start);
        t.submitted(9, start, 1000);
        t.acked(9, start + Duration::from_millis(1));
        assert_eq!(t.acked_bytes_in_window, 0);
        assert_eq!(t.lag.count(), 1);
    }

    #[test]
    fn a_full_ring_drops_the_oldest_and_counts_it() {
        let start = Instant::now();
        let mut t = Tracker::new(start, start);
        for seq in 0..RING_FRAMES as u64 + 3 {
            t.submitted(seq, start, 1);
        }
        assert_eq!(t.dropped, 3);
        assert_eq!(t.pending.front().map(|p| p.seq), Some(3));
    }

    fn step(offered: f64, achieved: f64, lag_ms: u64) -> Step {
        let mut lag = LatencyHistogram::new();
        for _ in 0..100 {
            lag.observe(Duration::from_millis(lag_ms));
        }
        Step {
            offered_mb_s: offered,
            achieved_mb_s: achieved,
            submitted_mb_s: achieved,
            lag,
            row: Row::engine("x", 0, 0, 1.0),
        }
    }

    #[test]
    fn headline_is_the_highest_sustained_step_and_names_misses_below() {
        let run = DiskCountRun {
            disks: 8,
            steps: vec![
                step(8.0, 8.0, 10),
                step(96.0, 80.0, 700),
                step(384.0, 383.0, 50),
                step(768.0, 760.0, 1_200),
            ],
            memory: Memory::default(),
            peak_reset: true,
            skipped_steps: Vec::new(),
        };
        assert_eq!(run.headline().map(|s| s.offered_mb_s), Some(384.0));
        let missed: Vec<f64> = run
            .missed_below_headline()
            .iter()
            .map(|s| s.offered_mb_s)
            .collect();
        assert_eq!(missed, vec![96.0]);
        let none = DiskCountRun {
            steps: vec![step(8.0, 7.0, 10)],
            ..run
        };
        assert!(none.headline().is_none());
        assert!(none.missed_below_headline().is_empty());
    }

    #[test]
    fn plans_and_scratch() {
        let quick = E2ePlan::new(true, false);
        assert_eq!(quick.disk_counts, vec![1, 8, 31]);
        // 3 steps × 3 s per disk count, well under the minute the quick run allows.
        assert!(quick.steps_mb_s.len() as f64 * quick.step.as_secs_f64() <= 15.0);
        assert!(quick.scratch_bytes() < 6 << 30);
        let tiny = E2ePlan::new(false, true);
        assert_eq!(tiny.disk_counts, vec![1, 2]);
        assert_eq!(tiny.steps_mb_s.len(), 2);
        let full = E2ePlan::new(false, false);
        assert!(full.steps_mb_s.len() > quick.steps_mb_s.len() && full.step > quick.step);
        assert!(full.scratch_bytes() <= 24 << 30);
    }

    #[test]
    fn proc_readers_work_on_this_process() {
        let pid = std::process::id();
        let m = memory_of(pid).unwrap();
        assert!(m.hwm_kib > 0 && m.rss_kib > 0);
        let cpu = cpu_of(pid).unwrap();
        assert!(cpu.total_s() >= 0.0);
        assert_eq!(percentile(&mut [3.0, 1.0, 2.0], 50.0), Some(2.0));
        assert_eq!(percentile(&mut [3.0, 1.0, 2.0], 100.0), Some(3.0));
        assert_eq!(percentile(&mut [], 50.0), None);
    }
}
