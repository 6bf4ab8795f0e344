//! Seeded workloads: the writes, trims and bookmarks a simulated VM produces, the workload
//! clock they run on, and the [`Pacer`] that turns that clock into real time.
//!
//! This module owns:
//! - [`Workload`]: a generator of [`Op`]s over the disks of one item, from one seed;
//! - the *workload clock*: a deterministic time line, independent of the machine, on which
//!   every op has a time ([`Workload::op_at`]) and time-based bookmarks fall;
//! - [`Pacer`]: a token bucket that tells a caller how long to wait before each op so that
//!   the churn holds a target rate, following the workload clock's bursts and idle gaps;
//! - [`Clock`], with [`SystemClock`] (real time, real sleep) and [`ManualClock`] (simulated,
//!   for tests: sleeping only advances a counter).
//!
//! Invariants:
//! - the same seed, spec and disks give the same ops, the same data bytes and the same op
//!   times, on any machine and at any speed (the workload clock never reads a real clock);
//! - every write and trim is non-empty, aligned to its disk's logical block size (at least
//!   512 B) and inside its disk; writes are between `max(512, block size)` and
//!   [`MAX_WRITE_BYTES`] long (and never longer than the disk);
//! - bookmark ids increase by one from 1; op times never decrease.
//!
//! # The workload clock
//!
//! The workload models a churn of [`WorkloadSpec::churn_bytes_per_s`] bytes written per
//! second of workload time ([`NOMINAL_CHURN_BYTES_PER_S`] for the clock when that is 0,
//! "unlimited"). A write of `n` bytes issued at time `t` moves the clock to
//! `t + n / rate`; trims and bookmarks take no time (churn counts written bytes). With the
//! [`Pattern::Bursty`] pattern the time line alternates bursts and idle gaps: during a burst
//! of `burst_ms`, writes come at `churn × (burst_ms + idle_ms) / burst_ms`, then nothing for
//! `idle_ms` (time-based bookmarks still fall inside the gap), so the average over a cycle is
//! the churn.
//!
//! # Bookmarks
//!
//! Two independent triggers, usable together or alone (0 disables each one):
//! - by op count: a crash- / app-consistent bookmark is the op whose 1-based index is a
//!   multiple of `crash_bookmark_every_ops` / `app_bookmark_every_ops` (app wins a tie);
//! - by workload time: a crash-consistent bookmark every `crash_bookmark_every_ms` and an
//!   app-consistent one every `app_bookmark_every_ms` of workload time. When both are due at
//!   once one app-consistent bookmark is issued (it is crash-consistent too). A period that the
//!   clock skips over (a long write, an idle gap) gives one bookmark, not one per period.

use std::time::{Duration, Instant};

use engine::delta::{Consistency, DiskGeometry};

use crate::rng::Rng;

/// Largest write a workload issues: 1 MiB (one delta-stream payload).
pub const MAX_WRITE_BYTES: u32 = 1 << 20;
/// Smallest write: 512 B, or the disk's logical block size when that is larger.
pub const MIN_WRITE_BYTES: u32 = 512;
/// Rate of the workload clock when the spec's churn is 0 (unlimited): 64 MiB/s.
pub const NOMINAL_CHURN_BYTES_PER_S: u64 = 64 << 20;
/// Database page size: page writes are 1 or 2 pages, aligned to a page.
pub const DATABASE_PAGE_BYTES: u64 = 8 * 1024;
/// Largest database log write: 8 KiB.
pub const DATABASE_LOG_WRITE_MAX_BYTES: u64 = 8 * 1024;

const NS_PER_S: u128 = 1_000_000_000;
const NS_PER_MS: u64 = 1_000_000;

/// Where writes land.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// Uniformly random offsets.
    Uniform,
    /// Each disk written front to back, wrapping at the end.
    Sequential,
    /// Zipf-distributed over fixed-size regions ([`ZipfSpec`]): the region of popularity
    /// rank `k` is chosen with probability ∝ `1 / k^exponent`; ranks are scattered over the
    /// disk by a seeded permutation; the offset inside the region is uniform.
    HotSpot,
    /// Uniform offsets, bursty timing ([`BurstSpec`]): bursts of writes at a high rate
    /// separated by idle gaps on the workload clock.
    Bursty,
    /// A database ([`DatabaseSpec`]): small sequential log writes (block size to 8 KiB) into
    /// a log area at the start of one disk, interleaved with random 8 KiB / 16 KiB page writes
    /// everywhere else.
    Database,
}

impl Pattern {
    /// Every pattern.
    pub const ALL: [Pattern; 5] = [
        Pattern::Uniform,
        Pattern::Sequential,
        Pattern::HotSpot,
        Pattern::Bursty,
        Pattern::Database,
    ];
}

/// The hot-spot pattern's Zipf distribution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ZipfSpec {
    /// Size of a region, bytes; rounded up to a multiple of the disk's block size.
    pub region_bytes: u64,
    /// Zipf exponent `s` (> 0; larger is more concentrated). Not finite or ≤ 0: the default.
    pub exponent: f64,
}

impl Default for ZipfSpec {
    fn default() -> Self {
        Self {
            region_bytes: 1 << 20,
            exponent: 1.1,
        }
    }
}

/// The bursty pattern's cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BurstSpec {
    /// Length of a burst of writes, ms of workload time (0: no bursts, steady timing).
    pub burst_ms: u64,
    /// Length of the idle gap after each burst, ms of workload time.
    pub idle_ms: u64,
}

impl Default for BurstSpec {
    fn default() -> Self {
        Self {
            burst_ms: 200,
            idle_ms: 800,
        }
    }
}

/// The database pattern's layout and mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatabaseSpec {
    /// Disk holding the log (`None`: the last disk, a data disk when the VM has several).
    /// Out of range: the last disk.
    pub log_disk: Option<u16>,
    /// Size of the log area at the start of the log disk; at most a quarter of the disk,
    /// rounded down to a multiple of [`DATABASE_PAGE_BYTES`] (at least one log write).
    pub log_area_bytes: u64,
    /// Percent of operations that are log writes; the others are page writes or trims.
    pub log_write_percent: u32,
}

impl Default for DatabaseSpec {
    fn default() -> Self {
        Self {
            log_disk: None,
            log_area_bytes: 16 << 20,
            log_write_percent: 60,
        }
    }
}

/// What a workload looks like.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkloadSpec {
    /// Where writes land.
    pub pattern: Pattern,
    /// Largest write, bytes (a power of two is expected; clamped to [`MAX_WRITE_BYTES`]).
    /// Database page and log writes have their own sizes.
    pub write_max_bytes: u32,
    /// Per mille of operations that are zero ranges (trim) instead of writes.
    pub zero_range_per_mille: u32,
    /// Percent of writes whose data compresses well.
    pub compressible_percent: u32,
    /// A crash-consistent bookmark after this many operations (0 = never).
    pub crash_bookmark_every_ops: u64,
    /// An app-consistent bookmark after this many operations (0 = never).
    pub app_bookmark_every_ops: u64,
    /// A crash-consistent bookmark every this many ms of workload time (0 = never).
    pub crash_bookmark_every_ms: u64,
    /// An app-consistent bookmark every this many ms of workload time (0 = never).
    pub app_bookmark_every_ms: u64,
    /// Target churn, bytes written per second of workload time (0 = unlimited; the clock
    /// then runs at [`NOMINAL_CHURN_BYTES_PER_S`]). [`Pacer::for_workload`] paces to it.
    pub churn_bytes_per_s: u64,
    /// [`Pattern::HotSpot`]'s distribution.
    pub zipf: ZipfSpec,
    /// [`Pattern::Bursty`]'s cycle.
    pub burst: BurstSpec,
    /// [`Pattern::Database`]'s layout.
    pub database: DatabaseSpec,
}

impl Default for WorkloadSpec {
    fn default() -> Self {
        Self {
            pattern: Pattern::Uniform,
            write_max_bytes: MAX_WRITE_BYTES,
            zero_range_per_mille: 20,
            compressible_percent: 50,
            crash_bookmark_every_ops: 50,
            app_bookmark_every_ops: 200,
            crash_bookmark_every_ms: 0,
            app_bookmark_every_ms: 0,
            churn_bytes_per_s: 0,
            zipf: ZipfSpec::default(),
            burst: BurstSpec::default(),
            database: DatabaseSpec::default(),
        }
    }
}

impl WorkloadSpec {
    /// This spec with bookmarks by workload time only: crash-consistent every `crash_ms`,
    /// app-consistent every `app_ms` (0 disables either); the op-count triggers are off.
    pub fn with_timed_bookmarks(mut self, crash_ms: u64, app_ms: u64) -> Self {
        self.crash_bookmark_every_ops = 0;
        self.app_bookmark_every_ops = 0;
        self.crash_bookmark_every_ms = crash_ms;
        self.app_bookmark_every_ms = app_ms;
        self
    }

    /// The rate the workload clock runs at: the churn, or the nominal rate when unlimited.
    pub fn clock_bytes_per_s(&self) -> u64 {
        if self.churn_bytes_per_s == 0 {
            NOMINAL_CHURN_BYTES_PER_S
        } else {
            self.churn_bytes_per_s
        }
    }

    /// The bursty cycle, when the pattern is bursty and the cycle has a burst.
    fn bursts(&self) -> Option<BurstSpec> {
        (self.pattern == Pattern::Bursty && self.burst.burst_ms > 0).then_some(self.burst)
    }
}

/// One operation of a workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Data written; the bytes are in the buffer passed to [`Workload::next_op`].
    Write {
        /// Disk index.
        disk_index: u16,
        /// Offset on the disk.
        offset_bytes: u64,
        /// Length of the data.
        length_bytes: u32,
    },
    /// A range trimmed to zeros.
    ZeroRange {
        /// Disk index.
        disk_index: u16,
        /// Offset on the disk.
        offset_bytes: u64,
        /// Length of the range.
        length_bytes: u64,
    },
    /// A recovery point across all disks.
    Bookmark {
        /// Crash- or app-consistent.
        consistency: Consistency,
        /// Id, increasing from 1.
        bookmark_id: u64,
    },
}

impl Op {
    /// Bytes of churn: a write's length; 0 for trims and bookmarks.
    pub fn churn_bytes(&self) -> u64 {
        match self {
            Op::Write { length_bytes, .. } => u64::from(*length_bytes),
            Op::ZeroRange { .. } | Op::Bookmark { .. } => 0,
        }
    }

    /// `(disk_index, offset_bytes, length_bytes)` of a write or trim; `None` for a bookmark.
    pub fn extent(&self) -> Option<(u16, u64, u64)> {
        match *self {
            Op::Write {
                disk_index,
                offset_bytes,
                length_bytes,
            } => Some((disk_index, offset_bytes, u64::from(length_bytes))),
            Op::ZeroRange {
                disk_index,
                offset_bytes,
                length_bytes,
            } => Some((disk_index, offset_bytes, length_bytes)),
            Op::Bookmark { .. } => None,
        }
    }
}

/// A seeded generator of [`Op`]s.
#[derive(Debug)]
pub struct Workload {
    rng: Rng,
    spec: WorkloadSpec,
    disks: Vec<DiskGeometry>,
    cursors_bytes: Vec<u64>,
    /// Per disk, for [`Pattern::HotSpot`] only.
    zipf: Vec<ZipfDisk>,
    /// For [`Pattern::Database`] only.
    database: Option<DatabaseLayout>,
    ops_count: u64,
    next_bookmark_id: u64,
    /// Workload time at which the next op is issued.
    clock_ns: u64,
    /// Workload time of the op last returned.
    op_at_ns: u64,
    /// End of the current burst (bursty pattern).
    burst_end_ns: u64,
    /// Next time-based crash / app bookmark (`u64::MAX`: never).
    crash_due_ns: u64,
    app_due_ns: u64,
}

impl Workload {
    /// A workload over `disks`, from `seed`.
    ///
    /// # Panics
    ///
    /// If `disks` is empty (a VM has at least one disk).
    pub fn new(seed: u64, spec: WorkloadSpec, disks: Vec<DiskGeometry>) -> Self {
        assert!(!disks.is_empty(), "a workload needs at least one disk");
        // Layout randomness comes from its own generator, so that choosing a pattern does
        // not shift the op stream of the others.
        let mut layout_rng = Rng::new(seed ^ 0x6c61_796f_7574_2121);
        let zipf = if spec.pattern == Pattern::HotSpot {
            disks
                .iter()
                .map(|disk| ZipfDisk::new(&mut layout_rng, *disk, spec.zipf))
                .collect()
        } else {
            Vec::new()
        };
        let database =
            (spec.pattern == Pattern::Database).then(|| DatabaseLayout::new(&disks, spec.database));
        let every = |ms: u64| {
            if ms == 0 {
                u64::MAX
            } else {
                ms.saturating_mul(NS_PER_MS)
            }
        };
        Self {
            rng: Rng::new(seed),
            cursors_bytes: vec![0; disks.len()],
            zipf,
            database,
            ops_count: 0,
            next_bookmark_id: 1,
            clock_ns: 0,
            op_at_ns: 0,
            burst_end_ns: spec.burst.burst_ms.saturating_mul(NS_PER_MS),
            crash_due_ns: every(spec.crash_bookmark_every_ms),
            app_due_ns: every(spec.app_bookmark_every_ms),
            spec,
            disks,
        }
    }

    /// The spec.
    pub fn spec(&self) -> &WorkloadSpec {
        &self.spec
    }

    /// The disks.
    pub fn disks(&self) -> &[DiskGeometry] {
        &self.disks
    }

    /// Workload time of the op last returned by [`Workload::next_op`] (zero before the
    /// first): when the op is issued, for [`Pacer::delay_at`] and bookmark timestamps.
    pub fn op_at(&self) -> Duration {
        Duration::from_nanos(self.op_at_ns)
    }

    /// Ops returned so far.
    pub fn ops_count(&self) -> u64 {
        self.ops_count
    }

    /// The database log: `(disk_index, log_area_bytes)`; `None` unless the pattern is
    /// [`Pattern::Database`]. Log writes land in `0..log_area_bytes` of that disk.
    pub fn database_log(&self) -> Option<(u16, u64)> {
        self.database
            .as_ref()
            .map(|db| (db.log_disk as u16, db.log_end_bytes))
    }

    /// The next operation; for a write, `data` is resized to and filled with its bytes.
    pub fn next_op(&mut self, data: &mut Vec<u8>) -> Op {
        self.ops_count += 1;
        for (every, consistency) in [
            (self.spec.app_bookmark_every_ops, Consistency::App),
            (self.spec.crash_bookmark_every_ops, Consistency::Crash),
        ] {
            if every != 0 && self.ops_count.is_multiple_of(every) {
                return self.bookmark(consistency);
            }
        }
        if let Some(burst) = self.spec.bursts()
            && self.clock_ns >= self.burst_end_ns
        {
            // The burst is over: an idle gap, during which time-based bookmarks still come.
            let resume_ns = self
                .burst_end_ns
                .saturating_add(burst.idle_ms.saturating_mul(NS_PER_MS));
            if let Some(due_ns) = self.next_time_bookmark_ns()
                && due_ns < resume_ns
            {
                self.clock_ns = self.clock_ns.max(due_ns);
                return self.time_bookmark();
            }
            self.clock_ns = self.clock_ns.max(resume_ns);
            self.burst_end_ns = resume_ns.saturating_add(burst.burst_ms.saturating_mul(NS_PER_MS));
        }
        if self
            .next_time_bookmark_ns()
            .is_some_and(|due_ns| due_ns <= self.clock_ns)
        {
            return self.time_bookmark();
        }
        self.op_at_ns = self.clock_ns;
        let op = if self.database.is_some() {
            self.database_op(data)
        } else {
            self.placed_op(data)
        };
        self.advance_clock(op.churn_bytes());
        op
    }

    fn bookmark(&mut self, consistency: Consistency) -> Op {
        self.op_at_ns = self.clock_ns;
        let bookmark_id = self.next_bookmark_id;
        self.next_bookmark_id += 1;
        Op::Bookmark {
            consistency,
            bookmark_id,
        }
    }

    fn next_time_bookmark_ns(&self) -> Option<u64> {
        let due = self.crash_due_ns.min(self.app_due_ns);
        (due != u64::MAX).then_some(due)
    }

    /// The time-based bookmark due at the clock: app-consistent if that one is due (and then
    /// a crash-consistent one due at the same time is covered by it).
    fn time_bookmark(&mut self) -> Op {
        let now = self.clock_ns;
        let next_after = |every_ms: u64| {
            let every = every_ms.saturating_mul(NS_PER_MS);
            (now / every).saturating_add(1).saturating_mul(every)
        };
        let consistency = if self.app_due_ns <= now {
            self.app_due_ns = next_after(self.spec.app_bookmark_every_ms);
            if self.crash_due_ns <= now {
                self.crash_due_ns = next_after(self.spec.crash_bookmark_every_ms);
            }
            Consistency::App
        } else {
            self.crash_due_ns = next_after(self.spec.crash_bookmark_every_ms);
            Consistency::Crash
        };
        self.bookmark(consistency)
    }

    /// Moves the clock past a write of `bytes`.
    fn advance_clock(&mut self, bytes: u64) {
        if bytes == 0 {
            return;
        }
        let rate = u128::from(self.spec.clock_bytes_per_s());
        let ns = match self.spec.bursts() {
            // During a burst, writes come at churn × cycle / burst.
            Some(burst) => {
                let cycle = u128::from(burst.burst_ms) + u128::from(burst.idle_ms);
                u128::from(bytes) * NS_PER_S * u128::from(burst.burst_ms) / (rate * cycle)
            }
            None => u128::from(bytes) * NS_PER_S / rate,
        };
        self.clock_ns = self
            .clock_ns
            .saturating_add(u64::try_from(ns).unwrap_or(u64::MAX));
    }

    /// A write or trim placed by the Uniform, Sequential, HotSpot or Bursty pattern.
    fn placed_op(&mut self, data: &mut Vec<u8>) -> Op {
        let disk_index = self.rng.below(self.disks.len() as u64) as usize;
        let disk = self.disks[disk_index];
        let length_bytes = self.pick_length(disk);
        let offset_bytes = self.pick_offset(disk_index, disk, length_bytes);
        self.write_or_trim(data, disk_index as u16, offset_bytes, length_bytes)
    }

    /// A trim with the spec's probability, else a write with fresh data.
    fn write_or_trim(
        &mut self,
        data: &mut Vec<u8>,
        disk_index: u16,
        offset_bytes: u64,
        length_bytes: u64,
    ) -> Op {
        if self.rng.below(1000) < u64::from(self.spec.zero_range_per_mille) {
            return Op::ZeroRange {
                disk_index,
                offset_bytes,
                length_bytes,
            };
        }
        self.fill(data, length_bytes);
        Op::Write {
            disk_index,
            offset_bytes,
            length_bytes: length_bytes as u32,
        }
    }

    fn fill(&mut self, data: &mut Vec<u8>, length_bytes: u64) {
        data.resize(length_bytes as usize, 0);
        if self.rng.below(100) < u64::from(self.spec.compressible_percent) {
            fill_compressible(&mut self.rng, data);
        } else {
            self.rng.fill(data);
        }
    }

    fn pick_length(&mut self, disk: DiskGeometry) -> u64 {
        let block = block_bytes(disk);
        let max = u64::from(self.spec.write_max_bytes.min(MAX_WRITE_BYTES))
            .min(disk.size_bytes)
            .max(block);
        let (low, high) = (block.ilog2(), max.ilog2());
        1u64 << (low + self.rng.below(u64::from(high - low + 1)) as u32)
    }

    fn pick_offset(&mut self, disk_index: usize, disk: DiskGeometry, length_bytes: u64) -> u64 {
        let block = u64::from(disk.block_size_bytes);
        let slots = (disk.size_bytes - length_bytes) / block + 1;
        match self.spec.pattern {
            Pattern::Uniform | Pattern::Bursty | Pattern::Database => self.rng.below(slots) * block,
            Pattern::HotSpot => {
                let zipf = &self.zipf[disk_index];
                let region = zipf.region_of_rank(zipf.sampler.sample(&mut self.rng));
                let start = region * zipf.region_bytes;
                let region_len = zipf.region_bytes.min(disk.size_bytes - start);
                if length_bytes <= region_len {
                    start + self.rng.below((region_len - length_bytes) / block + 1) * block
                } else {
                    // Longer than the region: it spills over into the next ones.
                    start.min(disk.size_bytes - length_bytes)
                }
            }
            Pattern::Sequential => {
                let cursor = &mut self.cursors_bytes[disk_index];
                if *cursor + length_bytes > disk.size_bytes {
                    *cursor = 0;
                }
                let offset = *cursor;
                *cursor += length_bytes;
                offset
            }
        }
    }

    /// A database op: a log append, or a page write or trim outside the log.
    fn database_op(&mut self, data: &mut Vec<u8>) -> Op {
        let Some(db) = self.database else {
            return self.placed_op(data);
        };
        let log_geometry = self.disks[db.log_disk];
        let log_block = block_bytes(log_geometry);
        let is_log = self.rng.below(100) < u64::from(self.spec.database.log_write_percent);
        // A page op on a disk with room for a page, else a log write.
        let page_disk = (!is_log)
            .then(|| self.rng.below(self.disks.len() as u64) as usize)
            .filter(|&index| self.page_room(&db, index).is_some());
        let Some(page_disk) = page_disk else {
            // Log: block size to 8 KiB, appended at the cursor, wrapping at the log's end.
            let blocks = (DATABASE_LOG_WRITE_MAX_BYTES / log_block).max(1);
            let length_bytes = (log_block * (1 + self.rng.below(blocks))).min(db.log_end_bytes);
            let cursor = &mut self.cursors_bytes[db.log_disk];
            if *cursor + length_bytes > db.log_end_bytes {
                *cursor = 0;
            }
            let offset_bytes = *cursor;
            *cursor += length_bytes;
            self.fill(data, length_bytes);
            return Op::Write {
                disk_index: db.log_disk as u16,
                offset_bytes,
                length_bytes: length_bytes as u32,
            };
        };
        let (start, end) = self.page_room(&db, page_disk).unwrap_or((0, 0));
        let disk = self.disks[page_disk];
        let block = block_bytes(disk);
        let align = DATABASE_PAGE_BYTES.max(block);
        let pages = 1 + self.rng.below(2);
        let length_bytes = (DATABASE_PAGE_BYTES * pages)
            .next_multiple_of(block)
            .min(end - start);
        let slots = (end - start - length_bytes) / align + 1;
        let offset_bytes = start + self.rng.below(slots) * align;
        self.write_or_trim(data, page_disk as u16, offset_bytes, length_bytes)
    }

    /// The page area of a disk, `(start, end)`: past the log on the log disk, whole disk
    /// elsewhere; `None` when it cannot hold one page.
    fn page_room(&self, db: &DatabaseLayout, disk_index: usize) -> Option<(u64, u64)> {
        let disk = self.disks[disk_index];
        let start = if disk_index == db.log_disk {
            db.log_end_bytes
        } else {
            0
        };
        let page = DATABASE_PAGE_BYTES.next_multiple_of(block_bytes(disk));
        (disk.size_bytes >= start + page).then_some((start, disk.size_bytes))
    }
}

/// A disk's write granule: its logical block size, at least [`MIN_WRITE_BYTES`].
fn block_bytes(disk: DiskGeometry) -> u64 {
    u64::from(disk.block_size_bytes.max(MIN_WRITE_BYTES))
}

/// The database pattern's layout, fixed at construction.
#[derive(Debug, Clone, Copy)]
struct DatabaseLayout {
    log_disk: usize,
    /// The log is `0..log_end_bytes` of the log disk.
    log_end_bytes: u64,
}

impl DatabaseLayout {
    fn new(disks: &[DiskGeometry], spec: DatabaseSpec) -> Self {
        let last = disks.len() - 1;
        let log_disk = spec
            .log_disk
            .map_or(last, |index| usize::from(index).min(last));
        let disk = disks[log_disk];
        let block = block_bytes(disk);
        let quarter = (disk.size_bytes / 4) / DATABASE_PAGE_BYTES * DATABASE_PAGE_BYTES;
        let smallest = DATABASE_LOG_WRITE_MAX_BYTES
            .next_multiple_of(block)
            .min(disk.size_bytes);
        let log_end_bytes = (spec.log_area_bytes / DATABASE_PAGE_BYTES * DATABASE_PAGE_BYTES)
            .min(quarter)
            .max(smallest);
        Self {
            log_disk,
            log_end_bytes,
        }
    }
}

/// One disk's hot-spot layout: regions, the Zipf sampler over their ranks, and the seeded
/// permutation from rank to region.
#[derive(Debug, Clone)]
struct ZipfDisk {
    region_bytes: u64,
    regions: u64,
    sampler: ZipfSampler,
    /// Rank `k` (1-based) is region `(multiplier × (k − 1) + shift) mod regions`.
    multiplier: u64,
    shift: u64,
}

impl ZipfDisk {
    fn new(rng: &mut Rng, disk: DiskGeometry, spec: ZipfSpec) -> Self {
        let block = u64::from(disk.block_size_bytes).max(1);
        let region_bytes = spec.region_bytes.max(block).next_multiple_of(block);
        let regions = disk.size_bytes.div_ceil(region_bytes).max(1);
        let exponent = if spec.exponent.is_finite() && spec.exponent > 0.0 {
            spec.exponent
        } else {
            ZipfSpec::default().exponent
        };
        let multiplier = if regions == 1 {
            1
        } else {
            loop {
                let candidate = 1 + rng.below(regions - 1);
                if gcd(candidate, regions) == 1 {
                    break candidate;
                }
            }
        };
        Self {
            region_bytes,
            regions,
            sampler: ZipfSampler::new(regions, exponent),
            multiplier,
            shift: rng.below(regions),
        }
    }

    fn region_of_rank(&self, rank: u64) -> u64 {
        let at = u128::from(self.multiplier) * u128::from(rank - 1) + u128::from(self.shift);
        (at % u128::from(self.regions)) as u64
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Zipf sampling over ranks `1..=n` by rejection-inversion (W. Hörmann, G. Derflinger,
/// "Rejection-inversion to generate variates from monotone discrete distributions", 1996;
/// as in Apache Commons RNG): O(1) memory and expected time for any `n` and exponent > 0.
#[derive(Debug, Clone)]
struct ZipfSampler {
    n: u64,
    exponent: f64,
    h_integral_x1: f64,
    h_integral_n: f64,
    s: f64,
}

impl ZipfSampler {
    fn new(n: u64, exponent: f64) -> Self {
        let mut sampler = Self {
            n,
            exponent,
            h_integral_x1: 0.0,
            h_integral_n: 0.0,
            s: 0.0,
        };
        sampler.h_integral_x1 = sampler.h_integral(1.5) - 1.0;
        sampler.h_integral_n = sampler.h_integral(n as f64 + 0.5);
        sampler.s = 2.0 - sampler.h_integral_inverse(sampler.h_integral(2.5) - sampler.h(2.0));
        sampler
    }

    fn sample(&self, rng: &mut Rng) -> u64 {
        loop {
            let uniform = (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
            let u = self.h_integral_n + uniform * (self.h_integral_x1 - self.h_integral_n);
            let x = self.h_integral_inverse(u);
            // `as` saturates (and maps NaN to 0), then the clamp keeps the rank in range.
            let k = ((x + 0.5) as u64).clamp(1, self.n);
            if k as f64 - x <= self.s || u >= self.h_integral(k as f64 + 0.5) - self.h(k as f64) {
                return k;
            }
        }
    }

    fn h(&self, x: f64) -> f64 {
        (-self.exponent * x.ln()).exp()
    }

    fn h_integral(&self, x: f64) -> f64 {
        let log_x = x.ln();
        helper2((1.0 - self.exponent) * log_x) * log_x
    }

    fn h_integral_inverse(&self, x: f64) -> f64 {
        let t = (x * (1.0 - self.exponent)).max(-1.0);
        (helper1(t) * x).exp()
    }
}

/// `ln(1 + x) / x`, accurate near 0.
fn helper1(x: f64) -> f64 {
    if x.abs() > 1e-8 {
        x.ln_1p() / x
    } else {
        1.0 - x * (0.5 - x * (1.0 / 3.0 - 0.25 * x))
    }
}

/// `(e^x − 1) / x`, accurate near 0.
fn helper2(x: f64) -> f64 {
    if x.abs() > 1e-8 {
        x.exp_m1() / x
    } else {
        1.0 + x * 0.5 * (1.0 + x / 3.0 * (1.0 + 0.25 * x))
    }
}

/// Data that compresses like real guest data: runs of zeros and a repeated seeded phrase.
fn fill_compressible(rng: &mut Rng, out: &mut [u8]) {
    let mut phrase = [0u8; 64];
    rng.fill(&mut phrase);
    for (index, chunk) in out.chunks_mut(512).enumerate() {
        if index % 4 == 0 {
            chunk.fill(0);
        } else {
            for (at, byte) in chunk.iter_mut().enumerate() {
                *byte = phrase[at % phrase.len()];
            }
        }
    }
}

/// Time for a [`Pacer`]: what time it is, and a way to wait.
pub trait Clock {
    /// Time since the clock's own origin.
    fn now(&self) -> Duration;
    /// Waits `duration`.
    fn sleep(&mut self, duration: Duration);
}

/// Real time: [`Instant`] since creation, [`std::thread::sleep`].
#[derive(Debug, Clone, Copy)]
pub struct SystemClock {
    origin: Instant,
}

impl SystemClock {
    /// A clock whose origin is now.
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    fn sleep(&mut self, duration: Duration) {
        std::thread::sleep(duration);
    }
}

/// A simulated clock for tests: sleeping advances it at once, and is counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ManualClock {
    now: Duration,
    sleeps: u64,
}

impl ManualClock {
    /// A clock at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves time forward (work that took time, without a sleep).
    pub fn advance(&mut self, duration: Duration) {
        self.now = self.now.saturating_add(duration);
    }

    /// How many times [`Clock::sleep`] was called.
    pub fn sleeps(&self) -> u64 {
        self.sleeps
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        self.now
    }

    fn sleep(&mut self, duration: Duration) {
        self.sleeps += 1;
        self.advance(duration);
    }
}

/// Paces ops to a target churn: a token bucket of `target` bytes per second holding at most
/// `burst` bytes (it starts full); and, for a pacer made by [`Pacer::for_workload`], the
/// workload clock's schedule: an op never goes before its workload time ([`Workload::op_at`],
/// counted from the real time of the first op), so idle gaps become real idle time and bursts
/// run at the burst rate as long as the bucket lasts.
///
/// A target of 0 is unlimited: every delay is zero and nothing ever sleeps.
///
/// Over any interval the bytes let through are at most `burst + target × interval`, so the
/// average rate of a long run converges to at most the target; a caller that keeps up (sleeps
/// the delays, and ops take no longer than the delays) gets the target within
/// `burst / (target × run time)`. A caller that falls behind is given at most `burst` bytes
/// of catch-up; one that falls behind the schedule by more than the bucket's time
/// (`burst / target`) has the schedule moved: lost time is not made up.
#[derive(Debug, Clone)]
pub struct Pacer {
    target_bytes_per_s: u64,
    burst_bytes: u64,
    /// Tokens, in bytes × 10⁹ (so that a nanosecond refills `target` units).
    tokens: u128,
    /// Time the tokens were last brought up to date (and no op may go before).
    last: Option<Duration>,
    /// Whether ops follow the workload clock's schedule.
    schedule: bool,
    /// Real time of workload time zero.
    origin: Option<Duration>,
}

impl Pacer {
    /// A pacer for `target_bytes_per_s` (0 = unlimited) with a bucket of 100 ms of the
    /// target, at least [`MAX_WRITE_BYTES`].
    pub fn new(target_bytes_per_s: u64) -> Self {
        let burst_bytes = (target_bytes_per_s / 10).max(u64::from(MAX_WRITE_BYTES));
        Self {
            target_bytes_per_s,
            burst_bytes,
            tokens: u128::from(burst_bytes) * NS_PER_S,
            last: None,
            schedule: false,
            origin: None,
        }
    }

    /// A pacer that never waits.
    pub fn unlimited() -> Self {
        Self::new(0)
    }

    /// A pacer for a workload: its churn as the target, following its clock's schedule,
    /// with a bucket that holds a whole burst of the bursty pattern (the churn of one
    /// burst-and-idle cycle), so that bursts run at the burst rate.
    pub fn for_workload(spec: &WorkloadSpec) -> Self {
        let mut pacer = Self::new(spec.churn_bytes_per_s);
        pacer.schedule = true;
        match spec.bursts() {
            Some(burst) => {
                let cycle_ms = u128::from(burst.burst_ms) + u128::from(burst.idle_ms);
                let cycle_bytes = u128::from(spec.churn_bytes_per_s) * cycle_ms / 1000;
                let burst_bytes = u64::try_from(cycle_bytes).unwrap_or(u64::MAX);
                let at_least = pacer.burst_bytes;
                pacer.with_burst_bytes(burst_bytes.max(at_least))
            }
            None => pacer,
        }
    }

    /// This pacer with a bucket of `burst_bytes` (at least 1), full.
    pub fn with_burst_bytes(mut self, burst_bytes: u64) -> Self {
        self.burst_bytes = burst_bytes.max(1);
        self.tokens = u128::from(self.burst_bytes) * NS_PER_S;
        self
    }

    /// The target, bytes per second (0 = unlimited).
    pub fn target_bytes_per_s(&self) -> u64 {
        self.target_bytes_per_s
    }

    /// The bucket's size, bytes.
    pub fn burst_bytes(&self) -> u64 {
        self.burst_bytes
    }

    /// Whether this pacer never waits.
    pub fn is_unlimited(&self) -> bool {
        self.target_bytes_per_s == 0
    }

    /// Whether this pacer follows the workload clock's schedule.
    pub fn follows_schedule(&self) -> bool {
        self.schedule
    }

    /// How long to wait, from `now`, before an op of `bytes` (token bucket only). The op is
    /// charged as if issued at `now` + the delay.
    pub fn delay(&mut self, now: Duration, bytes: u64) -> Duration {
        self.delay_at(now, Duration::ZERO, bytes)
    }

    /// How long to wait, from `now`, before an op of `bytes` whose workload time is `op_at`
    /// ([`Workload::op_at`]): the token bucket's wait and, if this pacer follows the schedule,
    /// not before `op_at` after the real time of workload time zero (the real time of the
    /// first call minus its `op_at`).
    pub fn delay_at(&mut self, now: Duration, op_at: Duration, bytes: u64) -> Duration {
        if self.is_unlimited() {
            return Duration::ZERO;
        }
        let rate = u128::from(self.target_bytes_per_s);
        let capacity = u128::from(self.burst_bytes) * NS_PER_S;
        // A caller that did not wait out the last delay is measured from where it should be.
        let base = self.last.map_or(now, |last| last.max(now));
        let op_at = if self.schedule { op_at } else { Duration::ZERO };
        let origin = *self.origin.get_or_insert(base.saturating_sub(op_at));
        let slack = Duration::from_nanos(u64::try_from(capacity / rate).unwrap_or(u64::MAX));
        let origin = if origin.saturating_add(op_at).saturating_add(slack) < base {
            // Behind the schedule by more than the bucket: move the schedule.
            *self.origin.insert(base.saturating_sub(op_at))
        } else {
            origin
        };
        if let Some(last) = self.last {
            let refill = (base - last).as_nanos().saturating_mul(rate);
            self.tokens = self.tokens.saturating_add(refill).min(capacity);
        }
        let need = u128::from(bytes) * NS_PER_S;
        let bucket_wait_ns = need.saturating_sub(self.tokens).div_ceil(rate);
        let schedule_wait_ns = origin.saturating_add(op_at).saturating_sub(base).as_nanos();
        let wait_ns = bucket_wait_ns.max(schedule_wait_ns);
        let wait = Duration::from_nanos(u64::try_from(wait_ns).unwrap_or(u64::MAX));
        // Refilled up to the op's time (never past the bucket, unless one op needs more),
        // then charged.
        self.tokens = self
            .tokens
            .saturating_add(wait_ns.saturating_mul(rate))
            .min(capacity.max(need))
            - need;
        self.last = Some(base + wait);
        (base - now) + wait
    }

    /// Waits on `clock` as [`Pacer::delay_at`] says (never calls `sleep` for a zero delay);
    /// returns the wait.
    pub fn pace(&mut self, clock: &mut impl Clock, op_at: Duration, bytes: u64) -> Duration {
        let wait = self.delay_at(clock.now(), op_at, bytes);
        if !wait.is_zero() {
            clock.sleep(wait);
        }
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disks() -> Vec<DiskGeometry> {
        vec![
            DiskGeometry {
                size_bytes: 8 << 20,
                block_size_bytes: 512,
            },
            DiskGeometry {
                size_bytes: 4 << 20,
                block_size_bytes: 4096,
            },
        ]
    }

    #[test]
    fn workload_extents_are_aligned_and_inside_their_disk() {
        for pattern in Pattern::ALL {
            let spec = WorkloadSpec {
                pattern,
                ..WorkloadSpec::default()
            };
            let mut workload = Workload::new(3, spec, disks());
            let mut data = Vec::new();
            for _ in 0..2000 {
                let op = workload.next_op(&mut data);
                let Some((disk_index, offset_bytes, length_bytes)) = op.extent() else {
                    continue;
                };
                if let Op::Write { length_bytes, .. } = op {
                    assert_eq!(data.len(), length_bytes as usize);
                }
                let disk = disks()[usize::from(disk_index)];
                assert_eq!(disk.check_extent(offset_bytes, length_bytes), Ok(()));
            }
        }
    }

    #[test]
    fn workload_same_seed_same_ops_and_bookmarks_at_interval() {
        let mut a = Workload::new(9, WorkloadSpec::default(), disks());
        let mut b = Workload::new(9, WorkloadSpec::default(), disks());
        let (mut data_a, mut data_b) = (Vec::new(), Vec::new());
        let mut bookmarks = 0;
        for _ in 0..400 {
            let op = a.next_op(&mut data_a);
            assert_eq!(op, b.next_op(&mut data_b));
            assert_eq!(data_a, data_b);
            if matches!(op, Op::Bookmark { .. }) {
                bookmarks += 1;
            }
        }
        assert_eq!(bookmarks, 8);
    }

    #[test]
    fn zipf_sampler_ranks_stay_in_range_and_rank_one_is_most_frequent() {
        for (n, exponent) in [(1u64, 1.1), (2, 0.5), (100, 1.0), (1000, 1.1), (7, 3.0)] {
            let sampler = ZipfSampler::new(n, exponent);
            let mut rng = Rng::new(n);
            let mut counts = vec![0u64; n as usize + 1];
            for _ in 0..20_000 {
                let k = sampler.sample(&mut rng);
                assert!((1..=n).contains(&k));
                counts[k as usize] += 1;
            }
            let max = counts.iter().max().copied().unwrap_or(0);
            assert_eq!(counts[1], max, "n {n} exponent {exponent}");
        }
    }

    #[test]
    fn zipf_sampler_matches_the_distribution() {
        // n = 10, s = 1: P(1) = 1 / H(10) ≈ 0.3414.
        let sampler = ZipfSampler::new(10, 1.0);
        let mut rng = Rng::new(5);
        let hits = (0..100_000)
            .filter(|_| sampler.sample(&mut rng) == 1)
            .count();
        let share = hits as f64 / 100_000.0;
        assert!((share - 0.3414).abs() < 0.01, "{share}");
    }

    #[test]
    fn zipf_permutation_is_a_bijection() {
        let mut rng = Rng::new(1);
        let disk = DiskGeometry {
            size_bytes: 100 << 20,
            block_size_bytes: 512,
        };
        let zipf = ZipfDisk::new(&mut rng, disk, ZipfSpec::default());
        let mut seen = vec![false; zipf.regions as usize];
        for rank in 1..=zipf.regions {
            let region = zipf.region_of_rank(rank) as usize;
            assert!(!seen[region]);
            seen[region] = true;
        }
    }

    #[test]
    fn pacer_charges_a_caller_that_did_not_wait() {
        let mut pacer = Pacer::new(1 << 20).with_burst_bytes(1 << 20);
        let now = Duration::from_secs(1);
        assert_eq!(pacer.delay(now, 1 << 20), Duration::ZERO);
        assert_eq!(pacer.delay(now, 1 << 20), Duration::from_secs(1));
        // Asked again at the same instant: the second op's second is still owed.
        assert_eq!(pacer.delay(now, 1 << 20), Duration::from_secs(2));
        assert_eq!(
            pacer.delay(now + Duration::from_secs(2), 1 << 19),
            Duration::from_millis(500)
        );
    }
}
