//! Apply: staged frames → replica disks, keeping every retained recovery point restorable.
//!
//! ```text
//!  StagingReader ──► batch (≤ stream_max_frames, ends at a bookmark)
//!      │   decompress each payload straight into an aligned pool buffer (IoBuf); a payload
//!      │   larger than one buffer goes through the spill buffer and is written in pieces;
//!      │   a zstd payload ingest decompressed for exactly this frame (same seq, checksum,
//!      │   disk, offset, length: crate::handoff) is copied, or swapped in as the spill
//!      │   buffer, instead of being decompressed again
//!      ▼
//!  preserve: grains the batch overwrites that were not yet preserved in this interval
//!      │   read old content (IoOp::Read) ─► append to preserve/pres-<tag>.dat ─► fdatasync
//!      │   ─► commit index entries (redb)                         (durable BEFORE any write)
//!      ▼
//!  write: IoOp::Write / WriteZeroes, overlapping extents serialised, queue depth bounded
//!      ▼
//!  bookmark (or every checkpoint_every_bytes): IoOp::Flush every replica
//!      ─► commit watermark (+ the new point, which becomes the current tag) in redb
//! ```
//!
//! Recovery points by copy on first write: the replica always holds the newest applied state.
//! The *tag* of an interval is the id of the point that opened it. Before a grain is first
//! overwritten in the interval of tag `t`, its old content — the content at point `t` — is
//! preserved under `t`. The disk at point `p` is then, grain by grain, the preserved copy with
//! the smallest tag ≥ `p`, or the replica where there is none (`materialize`).
//!
//! Invariants:
//! - a grain modified on a replica since point `t` has an index entry under `t` (the entry is
//!   committed before the write is submitted), so replay after a crash never preserves new
//!   data as old;
//! - the watermark only moves after a flush of every replica, and apply is idempotent (same
//!   frames, same order, same offsets), so replay from the watermark is exact;
//! - overlapping writes are never in flight together;
//! - an I/O error fails the item (health names the disk and op); staged data is untouched and
//!   `clear_fault` resumes from the watermark.
//! - a staged frame that can never be applied (its payload does not decode, or it is damaged
//!   in the staging log) stops apply at the watermark with [`Health::Unappliable`] naming the
//!   frame; every point at or below the watermark stays exact, and only
//!   [`Applier::discard_unapplied`] (after the caller made a delta resync required) moves on.
//! - pruning removes the oldest point only (entries under tag `t` serve every point ≤ `t`),
//!   and never a pinned one (a materialize in progress).

use crate::clock::now_unix_ns as now_ns;
use std::collections::{BTreeMap, HashSet};
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::delta::{
    Consistency, DataExtent, DecodeErrorReason, DiskGeometry, Encoding, FrameBody, PayloadDecoder,
};
use crate::durable::{DurableDir, DurableFile};
use crate::handoff::{PayloadHandoff, PayloadKey};
use crate::io::{BufPool, Completion, FileId, IoBuf, IoEngine, IoOp, RejectReason};
use crate::meta::{ItemKey, MetaError, MetaStore, PointOrigin, PointRecord, PreservedEntry};
use crate::staging::{StagingError, StagingReader};

mod preserve;
mod retention;
mod submit;
pub mod worker;

pub use preserve::preserve_file_name;
pub use retention::{PinGuard, Pins};
pub use worker::{
    ApplyObserver, ApplyOptions, ApplyWorker, Drained, IDLE_CHECKPOINT_AFTER, OnUnappliable,
    WorkerSetup, WorkerStatus,
};

/// While streaming, ops are handed to the kernel after this many submissions (and whenever
/// the run waits).
const STREAM_KICK_EVERY: u64 = 4;

/// Bytes of an item's apply buffer pool at the default queue depth (32) and below. The buffers
/// are registered with the ring, so they are resident for the item's whole life, and an
/// appliance runs one pool per item: this, not the frame size, bounds them.
pub const APPLY_POOL_BYTES: usize = 4 << 20;
/// Smallest apply buffer; above queue depth 32 the pool grows by this per queue slot.
pub const APPLY_BUF_MIN_BYTES: usize = 128 << 10;

/// The buffer pool an [`Applier`] at `queue_depth` is built with by default: one buffer per
/// queue slot (at least 4) sharing [`APPLY_POOL_BYTES`], each a power of two of at least
/// [`APPLY_BUF_MIN_BYTES`]: 4 × 1 MiB at queue depth 1, 8 × 512 KiB at 8, 32 × 128 KiB at 32,
/// 64 × 128 KiB at 64. A payload larger than one buffer (frames carry up to
/// [`crate::delta::MAX_PAYLOAD_BYTES`]) is decoded into the applier's spill buffer and written
/// in buffer-sized pieces, submitted one after the other without waiting.
pub fn default_pool_config(queue_depth: usize) -> crate::io::BufPoolConfig {
    let buf_count = queue_depth.max(4);
    let share_bytes = (APPLY_POOL_BYTES / buf_count).max(APPLY_BUF_MIN_BYTES);
    // The largest power of two not above the share (the share is ≥ 128 KiB, so this is too).
    let buf_size_bytes = 1usize << share_bytes.ilog2();
    crate::io::BufPoolConfig {
        buf_size_bytes,
        buf_count,
        ..crate::io::BufPoolConfig::default()
    }
}

/// Apply settings.
#[derive(Debug, Clone, Copy)]
pub struct ApplyConfig {
    /// Granularity of recovery-point preservation (a multiple of 4096).
    pub grain_bytes: u32,
    /// Most frames per run: a run plans its frames' extents (when points are kept, their old
    /// blocks are preserved with one flush), submits writes as frames are read, and waits for
    /// them only at its end.
    pub stream_max_frames: usize,
    /// Flush replicas and commit the watermark after this many bytes without a bookmark, so
    /// staging space can be reclaimed.
    pub checkpoint_every_bytes: u64,
    /// Keep recovery points (copy on first write). Off only for benchmarks.
    pub preserve: bool,
}

impl Default for ApplyConfig {
    fn default() -> Self {
        Self {
            grain_bytes: 4096,
            stream_max_frames: 1024,
            checkpoint_every_bytes: 256 << 20,
            preserve: true,
        }
    }
}

/// Retention of recovery points.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Most points kept.
    pub max_count: usize,
    /// Oldest point kept, by processing time, in ns.
    pub max_age_ns: u64,
}

/// Why apply stopped. Its text does not repeat its cause: print it with
/// [`crate::error::report`] (or anyhow's `{:#}`) to see the whole chain.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApplyError {
    /// A replica I/O failed; the item is failed until `clear_fault`.
    #[error("replica disk {disk_index}: {op} at byte {offset_bytes} failed")]
    Replica {
        /// Disk index.
        disk_index: u16,
        /// The op.
        op: &'static str,
        /// Where.
        offset_bytes: u64,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The preserve store failed.
    #[error("preserve store: {what}")]
    Preserve {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The metadata store failed.
    #[error(transparent)]
    Meta(#[from] MetaError),
    /// Reading the staging log failed.
    #[error(transparent)]
    Staging(#[from] StagingError),
    /// A staged payload did not decode (checksum held, so the sender encoded it wrongly).
    #[error("frame seq {seq} (disk {disk_index}, byte {offset_bytes}): payload: {reason}")]
    Payload {
        /// Sequence number.
        seq: u64,
        /// The disk the frame writes.
        disk_index: u16,
        /// Where on the disk.
        offset_bytes: u64,
        /// What is wrong.
        reason: DecodeErrorReason,
    },
    /// The item is failed; clear the fault first.
    #[error("item failed: {error}; clear the fault to resume")]
    Failed {
        /// The error that failed it.
        error: String,
    },
    /// A bad configuration or argument.
    #[error("invalid apply setup: {0}")]
    Invalid(String),
}

impl From<ApplyError> for crate::error::Error {
    fn from(e: ApplyError) -> Self {
        use crate::error::{Error, ErrorKind};
        let kind = if e.unappliable().is_some() {
            ErrorKind::Unappliable
        } else {
            match &e {
                ApplyError::Meta(_) => ErrorKind::Meta,
                ApplyError::Invalid(_) => ErrorKind::Invalid,
                ApplyError::Failed { .. } => ErrorKind::Stopped,
                ApplyError::Staging(staging) => Error::kind_of_staging(staging),
                _ => ErrorKind::Io,
            }
        };
        Error::transparent(kind, e)
    }
}

impl ApplyError {
    /// The staged frame this error is about, if retrying can never help: a payload that does
    /// not decode, or a frame damaged in the staging log (checksum, header, sequence). `None`
    /// for replica, preserve, metadata and staging I/O errors, which a cleared fault or a
    /// restart may cure.
    pub fn unappliable(&self) -> Option<UnappliableFrame> {
        match self {
            Self::Payload {
                seq,
                disk_index,
                offset_bytes,
                reason,
            } => Some(UnappliableFrame {
                seq: *seq,
                disk_index: Some(*disk_index),
                offset_bytes: Some(*offset_bytes),
                segment: None,
                segment_offset_bytes: None,
                reason: format!("payload: {reason}"),
            }),
            Self::Staging(StagingError::Corrupt {
                segment,
                seq,
                offset_bytes,
                reason,
            }) => Some(UnappliableFrame {
                seq: *seq,
                disk_index: None,
                offset_bytes: None,
                segment: Some(segment.clone()),
                segment_offset_bytes: Some(*offset_bytes),
                reason: format!("damaged in the staging log: {reason}"),
            }),
            _ => None,
        }
    }
}

/// A staged frame that can never be applied; apply stopped right before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnappliableFrame {
    /// Its sequence number.
    pub seq: u64,
    /// The disk it writes, when its header could be read.
    pub disk_index: Option<u16>,
    /// Where on that disk.
    pub offset_bytes: Option<u64>,
    /// The staging segment holding it, for a frame damaged in the staging log.
    pub segment: Option<String>,
    /// Its byte offset in that segment.
    pub segment_offset_bytes: Option<u64>,
    /// What is wrong with it.
    pub reason: String,
}

impl std::fmt::Display for UnappliableFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "staged frame seq {}", self.seq)?;
        if let (Some(disk), Some(offset)) = (self.disk_index, self.offset_bytes) {
            write!(f, " (disk {disk}, byte {offset})")?;
        }
        if let (Some(segment), Some(offset)) = (&self.segment, self.segment_offset_bytes) {
            write!(f, " ({segment}, byte {offset})")?;
        }
        write!(f, " cannot be applied: {}", self.reason)
    }
}

/// Replication health of an item's apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Applying.
    Healthy,
    /// Stopped on an error, named here.
    Failed {
        /// The error.
        error: String,
    },
    /// Stopped right before a staged frame that can never be applied; the watermark and every
    /// point at or below it are intact. [`Applier::discard_unapplied`] moves on.
    Unappliable {
        /// The frame.
        frame: UnappliableFrame,
    },
}

/// What one call to [`Applier::apply_batch`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyProgress {
    /// Frames applied.
    pub frames: u64,
    /// Data bytes written or zeroed.
    pub bytes: u64,
    /// Grains preserved.
    pub grains_preserved: u64,
    /// A point made processed by this batch.
    pub point: Option<u64>,
}

/// Totals since the applier was built.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyStats {
    /// Frames applied.
    pub frames: u64,
    /// Data bytes applied.
    pub bytes: u64,
    /// Grains preserved.
    pub grains_preserved: u64,
    /// Replica flush rounds.
    pub flushes: u64,
    /// zstd payloads apply decompressed from staging.
    pub payloads_decompressed: u64,
    /// zstd payloads apply took from ingest's handoff instead (decompressed once, by ingest).
    pub payloads_handed_off: u64,
}

enum PendingOp {
    Write {
        disk_index: u16,
        offset_bytes: u64,
        buf: IoBuf,
    },
    Zero {
        disk_index: u16,
        offset_bytes: u64,
        len_bytes: u64,
    },
}

impl PendingOp {
    fn extent(&self) -> (u16, u64, u64) {
        match self {
            PendingOp::Write {
                disk_index,
                offset_bytes,
                buf,
            } => (*disk_index, *offset_bytes, buf.len_bytes() as u64),
            PendingOp::Zero {
                disk_index,
                offset_bytes,
                len_bytes,
            } => (*disk_index, *offset_bytes, *len_bytes),
        }
    }
}

/// What the next staged frame turns into.
enum Next {
    /// One op.
    Op(PendingOp),
    /// A payload larger than one buffer, decoded into the spill buffer; `first` is the buffer
    /// taken for its first piece.
    Spilled {
        disk_index: u16,
        offset_bytes: u64,
        first: IoBuf,
    },
}

/// A bookmark frame: its sequence number and content.
type Bookmark = (u64, crate::delta::Bookmark);

/// Applies one item's staged frames to its replica disks.
pub struct Applier<E: IoEngine> {
    item: ItemKey,
    disks: Vec<DiskGeometry>,
    config: ApplyConfig,
    engine: E,
    files: Vec<FileId>,
    pool: BufPool,
    meta: Arc<MetaStore>,
    preserve_dir: Arc<dyn DurableDir>,
    preserve_file: Option<(u64, Arc<dyn DurableFile>, u64)>,
    reader: StagingReader,
    /// Where the reader started: replay begins here until a watermark exists.
    first_seq: u64,
    payloads: PayloadDecoder,
    /// Payloads ingest decompressed while validating them (shared with the staging log).
    handoff: Arc<PayloadHandoff>,
    /// Payloads larger than one pool buffer are decoded here first (grows to the largest such
    /// payload, at most [`crate::delta::MAX_PAYLOAD_BYTES`], and is reused).
    spill: Vec<u8>,
    /// Last frame applied (written, maybe not flushed).
    applied_seq: u64,
    /// Last frame whose effect is flushed and committed.
    durable_seq: u64,
    bytes_since_checkpoint: u64,
    current_tag: u64,
    preserving: bool,
    preserved_now: HashSet<(u16, u64)>,
    /// Extents of the frames planned ahead (reused).
    plan: Vec<(u16, u64, u64)>,
    in_flight: Vec<(u64, u16, u64, u64)>,
    next_tag: u64,
    completions: Vec<Completion>,
    health: Health,
    /// Set by [`Applier::discard_unapplied`] until the next bookmark's point: the replicas
    /// lack the discarded frames, so no "latest" point may be made of them.
    discarded_since_point: bool,
    pins: Pins,
    stats: ApplyStats,
}

impl<E: IoEngine> std::fmt::Debug for Applier<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Applier")
            .field("item", &self.item)
            .field("applied_seq", &self.applied_seq)
            .field("durable_seq", &self.durable_seq)
            .field("current_tag", &self.current_tag)
            .field("health", &self.health)
            .finish_non_exhaustive()
    }
}

impl<E: IoEngine> Applier<E> {
    /// Builds the applier of an item. `files[i]` is replica disk `i` registered with `engine`;
    /// `reader` is positioned anywhere (it is moved to the watermark); `pool` (see
    /// [`default_pool_config`]) holds at least 4 buffers of at least one grain each and is
    /// shared with nobody else.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        item: ItemKey,
        disks: Vec<DiskGeometry>,
        config: ApplyConfig,
        engine: E,
        files: Vec<FileId>,
        pool: BufPool,
        meta: Arc<MetaStore>,
        preserve_dir: Arc<dyn DurableDir>,
        reader: StagingReader,
    ) -> Result<Self, ApplyError> {
        if files.len() != disks.len() {
            return Err(ApplyError::Invalid(format!(
                "{} replica files for {} disks",
                files.len(),
                disks.len()
            )));
        }
        if config.grain_bytes == 0 || !config.grain_bytes.is_multiple_of(4096) {
            return Err(ApplyError::Invalid(format!(
                "grain of {} bytes is not a multiple of 4096",
                config.grain_bytes
            )));
        }
        if pool.buf_size_bytes() < config.grain_bytes as usize || pool.capacity() < 4 {
            return Err(ApplyError::Invalid(format!(
                "buffer pool of {} × {} bytes: need at least 4 buffers of at least one grain \
                 ({} bytes)",
                pool.capacity(),
                pool.buf_size_bytes(),
                config.grain_bytes
            )));
        }
        let payloads = PayloadDecoder::new().map_err(|e| ApplyError::Invalid(e.to_string()))?;
        let mut applier = Self {
            item,
            disks,
            config,
            engine,
            files,
            pool,
            meta,
            preserve_dir,
            preserve_file: None,
            first_seq: reader.next_seq(),
            handoff: reader.handoff(),
            reader,
            payloads,
            spill: Vec::new(),
            applied_seq: 0,
            durable_seq: 0,
            bytes_since_checkpoint: 0,
            current_tag: 0,
            preserving: false,
            preserved_now: HashSet::new(),
            plan: Vec::new(),
            in_flight: Vec::new(),
            next_tag: 1,
            completions: Vec::new(),
            health: Health::Healthy,
            discarded_since_point: false,
            pins: Pins::default(),
            stats: ApplyStats::default(),
        };
        applier.restart_from_watermark()?;
        Ok(applier)
    }

    /// Re-reads the watermark and the current interval from the store, and positions the
    /// reader right after the watermark (used at start and when a fault is cleared).
    fn restart_from_watermark(&mut self) -> Result<(), ApplyError> {
        let (applied_seq, current_tag) = self.meta.state(self.item)?;
        self.reader.seek(if applied_seq == 0 {
            self.first_seq
        } else {
            applied_seq + 1
        });
        self.applied_seq = self.reader.next_seq().wrapping_sub(1);
        self.durable_seq = self.applied_seq;
        self.current_tag = current_tag;
        self.bytes_since_checkpoint = 0;
        self.preserve_file = None;
        self.preserved_now.clear();
        self.preserving = self.config.preserve
            && current_tag != 0
            && self.meta.point(self.item, current_tag)?.is_some();
        if self.preserving {
            for disk_index in 0..self.disks.len() as u16 {
                for (grain, _) in self.meta.preserved(self.item, current_tag, disk_index)? {
                    self.preserved_now.insert((disk_index, grain));
                }
            }
        }
        Ok(())
    }

    /// The I/O backend in use.
    pub fn backend_name(&self) -> &'static str {
        self.engine.backend_name()
    }

    /// Last frame applied and made durable on the replicas (the watermark).
    pub fn durable_seq(&self) -> u64 {
        self.durable_seq
    }

    /// Last frame applied (written; durable at the next checkpoint).
    pub fn applied_seq(&self) -> u64 {
        self.applied_seq
    }

    /// Health.
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// Totals.
    pub fn stats(&self) -> &ApplyStats {
        &self.stats
    }

    /// The pins of this item's points (for materialize).
    pub fn pins(&self) -> Pins {
        self.pins.clone()
    }

    /// Honours `pins` (the caller's, shared with readers that outlive this applier) from now
    /// on instead of its own.
    pub fn use_pins(&mut self, pins: Pins) {
        self.pins = pins;
    }

    /// Clears a failed state: apply resumes from the watermark (idempotent replay).
    pub fn clear_fault(&mut self) -> Result<(), ApplyError> {
        self.drain_in_flight();
        self.health = Health::Healthy;
        self.restart_from_watermark()
    }

    fn ensure_healthy(&self) -> Result<(), ApplyError> {
        match &self.health {
            Health::Healthy => Ok(()),
            Health::Failed { error } => Err(ApplyError::Failed {
                error: error.clone(),
            }),
            Health::Unappliable { frame } => Err(ApplyError::Failed {
                error: frame.to_string(),
            }),
        }
    }

    fn fail(&mut self, error: ApplyError) -> ApplyError {
        self.drain_in_flight();
        self.health = match error.unappliable() {
            Some(frame) => Health::Unappliable { frame },
            None => Health::Failed {
                error: crate::error::report(&error),
            },
        };
        error
    }

    /// After [`Health::Unappliable`]: gives up on every staged frame after the watermark, up
    /// to the staging log's durable seq, so that apply goes on with the frames staged after
    /// them. The replicas are flushed (the frames before the bad one in its run were written),
    /// then the watermark is committed at that seq without a point. Returns the new watermark.
    ///
    /// The replicas then lack the discarded frames: the caller must first have made a delta
    /// resync required durably (so nothing else is staged and the source resends what
    /// differs) and must not make a point before the resync's bookmark. Every retained point
    /// stays exact: the frames written before the bad one had their old blocks preserved
    /// first, and the discarded ones wrote nothing.
    pub fn discard_unapplied(&mut self) -> Result<u64, ApplyError> {
        if !matches!(self.health, Health::Unappliable { .. }) {
            return Err(ApplyError::Invalid(
                "staged frames are discarded only after an unappliable frame".into(),
            ));
        }
        self.drain_in_flight();
        let through_seq = self.reader.durable_seq().max(self.durable_seq);
        self.health = Health::Healthy;
        self.applied_seq = through_seq;
        let result = self.checkpoint(None);
        result.map_err(|e| self.fail(e))?;
        self.reader.seek(through_seq.wrapping_add(1));
        self.discarded_since_point = true;
        Ok(through_seq)
    }

    /// Waits for every op in flight, ignoring results (after a failure).
    fn drain_in_flight(&mut self) {
        while self.engine.in_flight_count() > 0 {
            self.completions.clear();
            if self.engine.reap(&mut self.completions, 1).is_err() {
                break;
            }
        }
        self.completions.clear();
        self.in_flight.clear();
    }

    /// Applies all durable staged frames (several batches). Returns the totals.
    pub fn apply_available(&mut self) -> Result<ApplyProgress, ApplyError> {
        let mut total = ApplyProgress::default();
        loop {
            let progress = self.apply_batch()?;
            if progress.frames == 0 {
                return Ok(total);
            }
            total.frames += progress.frames;
            total.bytes += progress.bytes;
            total.grains_preserved += progress.grains_preserved;
            total.point = progress.point.or(total.point);
        }
    }

    /// Applies one batch of durable staged frames.
    pub fn apply_batch(&mut self) -> Result<ApplyProgress, ApplyError> {
        self.ensure_healthy()?;
        // With no point to keep, nothing has to happen between reading a frame and writing
        // it: stream. Otherwise collect a batch so its old blocks are preserved first.
        let result = if self.preserving {
            self.run_preserving_batch()
        } else {
            self.run_streaming_batch()
        };
        let (mut progress, bookmark) = match result {
            Ok(outcome) => outcome,
            Err(e) => return Err(self.fail(e)),
        };
        if progress.frames == 0 {
            return Ok(progress);
        }
        self.bytes_since_checkpoint += progress.bytes;
        let result = match bookmark {
            Some((seq, bookmark)) => {
                let point = PointRecord {
                    point_id: seq,
                    consistency: bookmark.consistency,
                    origin: PointOrigin::Bookmark,
                    bookmark_id: bookmark.bookmark_id,
                    source_timestamp_ns: bookmark.source_timestamp_ns,
                    processed_at_ns: now_ns(),
                    label: bookmark.label,
                };
                progress.point = Some(seq);
                self.checkpoint(Some(point))
            }
            None if self.bytes_since_checkpoint >= self.config.checkpoint_every_bytes => {
                self.checkpoint(None)
            }
            None => Ok(()),
        };
        match result {
            Ok(()) => {
                self.stats.frames += progress.frames;
                self.stats.bytes += progress.bytes;
                self.stats.grains_preserved += progress.grains_preserved;
                Ok(progress)
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Plan the next frames by their headers (up to `stream_max_frames`, stopping at a
    /// bookmark), preserve the old content of every grain they overwrite with one preserve
    /// flush and one index commit, then stream exactly those frames.
    fn run_preserving_batch(&mut self) -> Result<(ApplyProgress, Option<Bookmark>), ApplyError> {
        let mut plan = std::mem::take(&mut self.plan);
        let planned = self
            .reader
            .peek_extents(self.config.stream_max_frames, &mut plan)
            .map_err(ApplyError::from)
            .and_then(|(frames, _)| Ok((frames, self.preserve(&plan)?)));
        self.plan = plan;
        let (frames, grains_preserved) = planned?;
        if frames == 0 {
            return Ok((ApplyProgress::default(), None));
        }
        let (mut progress, bookmark) = self.run_streaming(frames, false)?;
        progress.grains_preserved = grains_preserved;
        Ok((progress, bookmark))
    }

    fn run_streaming_batch(&mut self) -> Result<(ApplyProgress, Option<Bookmark>), ApplyError> {
        self.run_streaming(self.config.stream_max_frames as u64, true)
    }
}

#[cfg(test)]
mod tests;
