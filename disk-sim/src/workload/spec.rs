//! What a workload looks like: its pattern, sizes, bookmark triggers and churn.

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

pub(super) const NS_PER_S: u128 = 1_000_000_000;
pub(super) const NS_PER_MS: u64 = 1_000_000;

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

    /// The chaos workload: uniform writes of 512 B (or a block) to 256 KiB, half of them
    /// compressible, 2 % trims, a bookmark after every `bookmark_every` writes or trims
    /// (every fourth one app-consistent), no time-based bookmarks, unlimited churn.
    pub fn chaos(bookmark_every: u64) -> Self {
        let every = bookmark_every.max(1).saturating_add(1);
        Self {
            pattern: Pattern::Uniform,
            write_max_bytes: 256 << 10,
            zero_range_per_mille: 20,
            compressible_percent: 50,
            crash_bookmark_every_ops: every,
            app_bookmark_every_ops: every.saturating_mul(4),
            ..Self::default()
        }
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
    pub(super) fn bursts(&self) -> Option<BurstSpec> {
        (self.pattern == Pattern::Bursty && self.burst.burst_ms > 0).then_some(self.burst)
    }
}
