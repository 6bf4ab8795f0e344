//! Seeded workloads: the generator of the writes, trims and bookmarks a simulated VM
//! produces, on the workload clock.
//!
//! This module owns [`Workload`], a generator of [`Op`]s over the disks of one item, from one
//! seed, and the *workload clock*: a deterministic time line, independent of the machine, on
//! which every op has a time ([`Workload::op_at`]) and time-based bookmarks fall. Its rooms:
//! - `spec`: [`WorkloadSpec`] and its parts (pattern, Zipf, bursts, database, limits);
//! - `patterns`: where the patterns put writes (Zipf layout, database log area) and the
//!   bytes of compressible data;
//! - `pacer`: [`Pacer`], a token bucket that tells a caller how long to wait before each op so
//!   that the churn holds a target rate, following the workload clock's bursts and idle gaps;
//! - `clock`: [`Clock`], with [`SystemClock`] (real time, real sleep) and [`ManualClock`]
//!   (simulated, for tests: sleeping only advances a counter).
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

use std::time::Duration;

use engine::delta::{Consistency, DiskGeometry};

use crate::rng::Rng;

mod clock;
mod pacer;
mod patterns;
mod spec;
#[cfg(test)]
mod tests;

pub use clock::{Clock, ManualClock, SystemClock};
pub use pacer::Pacer;
use patterns::{DatabaseLayout, ZipfDisk, block_bytes, fill_compressible};
pub use spec::{
    BurstSpec, DATABASE_LOG_WRITE_MAX_BYTES, DATABASE_PAGE_BYTES, DatabaseSpec, MAX_WRITE_BYTES,
    MIN_WRITE_BYTES, NOMINAL_CHURN_BYTES_PER_S, Pattern, WorkloadSpec, ZipfSpec,
};
use spec::{NS_PER_MS, NS_PER_S};

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
