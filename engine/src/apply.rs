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

use std::collections::{BTreeMap, HashSet};
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::delta::{
    Consistency, DataExtent, DecodeErrorReason, DiskGeometry, Encoding, FrameBody, PayloadDecoder,
};
use crate::durable::{DurableDir, DurableFile};
use crate::handoff::{PayloadHandoff, PayloadKey};
use crate::io::{BufPool, Completion, FileId, IoBuf, IoEngine, IoOp, RejectReason};
use crate::meta::{ItemKey, MetaError, MetaStore, PointOrigin, PointRecord, PreservedEntry};
use crate::staging::{StagingError, StagingReader};

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

/// Why apply stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApplyError {
    /// A replica I/O failed; the item is failed until `clear_fault`.
    #[error("replica disk {disk_index}: {op} at byte {offset_bytes} failed: {source}")]
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
    #[error("preserve store: {what}: {source}")]
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

/// Points a materialize is reading: never pruned while pinned.
#[derive(Debug, Clone, Default)]
pub struct Pins(Arc<Mutex<BTreeMap<u64, u32>>>);

impl Pins {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, u32>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Pins `point_id` until the guard drops.
    pub fn pin(&self, point_id: u64) -> PinGuard {
        *self.lock().entry(point_id).or_default() += 1;
        PinGuard {
            pins: self.clone(),
            point_id,
        }
    }

    fn is_pinned(&self, point_id: u64) -> bool {
        self.lock().contains_key(&point_id)
    }
}

/// Keeps a point pinned.
#[derive(Debug)]
pub struct PinGuard {
    pins: Pins,
    point_id: u64,
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        let mut pins = self.pins.lock();
        if let Some(count) = pins.get_mut(&self.point_id) {
            *count -= 1;
            if *count == 0 {
                pins.remove(&self.point_id);
            }
        }
    }
}

/// Name of the preserve file of a tag.
pub fn preserve_file_name(tag: u64) -> String {
    format!("pres-{tag:020}.dat")
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

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
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
                error: error.to_string(),
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

    /// Decode each frame straight into a buffer and submit it at once, keeping the queue full
    /// while the next frames are read; wait for the writes only at the end of the run (a
    /// bookmark, `max_frames`, the checkpoint interval when `checkpoint_bound`, or no more
    /// durable frames).
    fn run_streaming(
        &mut self,
        max_frames: u64,
        checkpoint_bound: bool,
    ) -> Result<(ApplyProgress, Option<Bookmark>), ApplyError> {
        let mut progress = ApplyProgress::default();
        let mut last_seq = None;
        let mut bookmark = None;
        while progress.frames < max_frames
            && (!checkpoint_bound
                || self.bytes_since_checkpoint + progress.bytes
                    < self.config.checkpoint_every_bytes)
        {
            // A buffer first (the frame borrows the reader); when every buffer is in flight,
            // wait for one to come back. Unused, it returns to the pool on drop.
            let mut buf = self.take_buf()?;
            let Some(frame) = self.reader.next_frame()? else {
                break;
            };
            let seq = frame.seq;
            last_seq = Some(seq);
            progress.frames += 1;
            // A zstd payload ingest already decompressed for exactly this frame is taken from
            // the handoff instead of being decompressed again.
            let handed = match &frame.body {
                FrameBody::Write(extent) | FrameBody::ResyncBlock(extent)
                    if extent.encoding == Encoding::Zstd =>
                {
                    let handed = self
                        .handoff
                        .take(&PayloadKey::of(seq, frame.checksum, extent));
                    match handed {
                        Some(_) => self.stats.payloads_handed_off += 1,
                        None => self.stats.payloads_decompressed += 1,
                    }
                    handed
                }
                _ => None,
            };
            let op = match frame.body {
                FrameBody::Write(extent) | FrameBody::ResyncBlock(extent)
                    if extent.length_bytes as usize > buf.capacity_bytes() =>
                {
                    // Larger than a buffer: decode once into the spill buffer (or take the
                    // handed-off bytes as the spill buffer), then write it in buffer-sized
                    // pieces (below, once the frame's borrow has ended).
                    if let Some(bytes) = handed {
                        let spare = std::mem::replace(&mut self.spill, bytes);
                        self.handoff.recycle(spare);
                    } else {
                        self.spill.resize(extent.length_bytes as usize, 0);
                        self.payloads
                            .decode_into(&extent, &mut self.spill)
                            .map_err(|reason| ApplyError::Payload {
                                seq,
                                disk_index: extent.disk_index,
                                offset_bytes: extent.offset_bytes,
                                reason,
                            })?;
                    }
                    Next::Spilled {
                        disk_index: extent.disk_index,
                        offset_bytes: extent.offset_bytes,
                        first: buf,
                    }
                }
                FrameBody::Write(extent) | FrameBody::ResyncBlock(extent) => {
                    if let Some(bytes) = handed {
                        buf.copy_from(&bytes);
                        self.handoff.recycle(bytes);
                    } else {
                        decode_into(&mut self.payloads, &extent, &mut buf).map_err(|reason| {
                            ApplyError::Payload {
                                seq,
                                disk_index: extent.disk_index,
                                offset_bytes: extent.offset_bytes,
                                reason,
                            }
                        })?;
                    }
                    Next::Op(PendingOp::Write {
                        disk_index: extent.disk_index,
                        offset_bytes: extent.offset_bytes,
                        buf,
                    })
                }
                FrameBody::ZeroRange {
                    disk_index,
                    offset_bytes,
                    length_bytes,
                } => Next::Op(PendingOp::Zero {
                    disk_index,
                    offset_bytes,
                    len_bytes: length_bytes,
                }),
                FrameBody::Bookmark(mark) => {
                    bookmark = Some((seq, mark));
                    break;
                }
                FrameBody::End => continue,
            };
            progress.bytes += match op {
                Next::Op(op) => self.submit_pending(op)?,
                Next::Spilled {
                    disk_index,
                    offset_bytes,
                    first,
                } => self.submit_spilled(disk_index, offset_bytes, first)?,
            };
            // Hand ops to the kernel a few at a time: one syscall for several writes.
            if progress.frames % STREAM_KICK_EVERY == 0 {
                self.engine.kick().map_err(|source| ApplyError::Replica {
                    disk_index: 0,
                    op: "kick",
                    offset_bytes: 0,
                    source,
                })?;
            }
        }
        self.reap_all("write", |_| {})?;
        if let Some(seq) = last_seq {
            self.applied_seq = seq;
        }
        Ok((progress, bookmark))
    }

    /// Writes the spill buffer at `offset_bytes` of disk `disk_index` in buffer-sized pieces,
    /// the first one in `first`. Returns its bytes.
    fn submit_spilled(
        &mut self,
        disk_index: u16,
        offset_bytes: u64,
        first: IoBuf,
    ) -> Result<u64, ApplyError> {
        let spill = std::mem::take(&mut self.spill);
        let result = (|| {
            let mut next = Some(first);
            for (index, piece) in spill.chunks(self.pool.buf_size_bytes()).enumerate() {
                let mut buf = match next.take() {
                    Some(buf) => buf,
                    None => self.take_buf()?,
                };
                buf.copy_from(piece);
                self.submit_pending(PendingOp::Write {
                    disk_index,
                    offset_bytes: offset_bytes + (index * self.pool.buf_size_bytes()) as u64,
                    buf,
                })?;
            }
            Ok(spill.len() as u64)
        })();
        self.spill = spill;
        result
    }

    /// A buffer from the pool; when every buffer is in flight, waits for one to come back.
    fn take_buf(&mut self) -> Result<IoBuf, ApplyError> {
        if let Some(buf) = self.pool.take() {
            return Ok(buf);
        }
        self.reap_some(1, "write")?;
        self.pool
            .take()
            .ok_or_else(|| ApplyError::Invalid("buffer pool exhausted".into()))
    }

    /// Preserves the old content of every grain the batch overwrites that was not preserved
    /// yet in this interval. Returns the number of grains preserved.
    fn preserve(&mut self, extents: &[(u16, u64, u64)]) -> Result<u64, ApplyError> {
        if !self.preserving {
            return Ok(0);
        }
        let grain = u64::from(self.config.grain_bytes);
        let run_max_grains = (self.pool.buf_size_bytes() as u64 / grain).max(1);
        // Runs of contiguous grains to read: (disk, first grain, grain count).
        let mut runs: Vec<(u16, u64, u64)> = Vec::new();
        let mut in_batch: HashSet<(u16, u64)> = HashSet::new();
        for &(disk_index, offset_bytes, len_bytes) in extents {
            // Planned from unverified headers: an extent that fits no disk is skipped here and
            // refused with a named error when its frame is read.
            let fits = self
                .disks
                .get(usize::from(disk_index))
                .is_some_and(|d| d.check_extent(offset_bytes, len_bytes).is_ok());
            if !fits {
                continue;
            }
            let first = offset_bytes / grain;
            let last = (offset_bytes + len_bytes - 1) / grain;
            for g in first..=last {
                if self.preserved_now.contains(&(disk_index, g))
                    || !in_batch.insert((disk_index, g))
                {
                    continue;
                }
                match runs.last_mut() {
                    Some((d, start, count))
                        if *d == disk_index && *start + *count == g && *count < run_max_grains =>
                    {
                        *count += 1
                    }
                    _ => runs.push((disk_index, g, 1)),
                }
            }
        }
        if runs.is_empty() {
            return Ok(0);
        }
        let tag = self.current_tag;
        let (file, mut file_len) = self.preserve_file_for(tag)?;
        let mut entries: Vec<PreservedEntry> = Vec::with_capacity(in_batch.len());
        let mut pending = runs.as_slice();
        while !pending.is_empty() {
            // One round: as many reads as there are free buffers.
            let round = pending
                .len()
                .min(self.pool.available())
                .min(self.engine.queue_depth())
                .max(1);
            let (now, later) = pending.split_at(round);
            pending = later;
            for (index, &(disk_index, first, count)) in now.iter().enumerate() {
                let size = self.disks[usize::from(disk_index)].size_bytes;
                let offset_bytes = first * grain;
                let len_bytes = (count * grain).min(size - offset_bytes);
                let Some(mut buf) = self.pool.take() else {
                    return Err(ApplyError::Invalid("buffer pool exhausted".into()));
                };
                buf.set_len_bytes(len_bytes as usize);
                let op = IoOp::Read {
                    file: self.files[usize::from(disk_index)],
                    offset_bytes,
                    buf,
                };
                self.submit(op, index as u64, disk_index, offset_bytes, len_bytes)?;
            }
            self.engine.kick().map_err(|source| ApplyError::Replica {
                disk_index: now[0].0,
                op: "kick",
                offset_bytes: 0,
                source,
            })?;
            let mut results: Vec<Option<IoBuf>> = (0..round).map(|_| None).collect();
            self.reap_all("read (preserve)", |completion| {
                if let Some(slot) = results.get_mut(completion.tag as usize) {
                    *slot = completion.buf.take();
                }
            })?;
            for (&(disk_index, first, _), buf) in now.iter().zip(results) {
                let Some(buf) = buf else {
                    return Err(ApplyError::Invalid(
                        "a preserve read returned no buffer".into(),
                    ));
                };
                let data = buf.as_slice();
                file.write_all_at(file_len, data)
                    .map_err(|source| ApplyError::Preserve {
                        what: format!("appending to {}", preserve_file_name(tag)),
                        source,
                    })?;
                for (i, _) in data.chunks(grain as usize).enumerate() {
                    entries.push(PreservedEntry {
                        disk_index,
                        grain: first + i as u64,
                        file_offset_bytes: file_len + i as u64 * grain,
                    });
                }
                file_len += data.len() as u64;
            }
        }
        file.sync_data().map_err(|source| ApplyError::Preserve {
            what: format!("flushing {}", preserve_file_name(tag)),
            source,
        })?;
        self.preserve_file = Some((tag, file, file_len));
        self.meta.add_preserved(self.item, tag, &entries)?;
        self.preserved_now.extend(in_batch);
        Ok(entries.len() as u64)
    }

    /// The preserve file of `tag` and its length, opened (and created durably) on first use.
    fn preserve_file_for(&mut self, tag: u64) -> Result<(Arc<dyn DurableFile>, u64), ApplyError> {
        if let Some((open_tag, file, len)) = &self.preserve_file
            && *open_tag == tag
        {
            return Ok((file.clone(), *len));
        }
        let name = preserve_file_name(tag);
        let err = |what: &str| {
            let what = format!("{what} {name}");
            move |source| ApplyError::Preserve { what, source }
        };
        let file = self
            .preserve_dir
            .open(&name, true)
            .map_err(err("opening"))?;
        let len = file.len_bytes().map_err(err("sizing"))?;
        if len == 0 {
            // A new file: its name must be durable before entries point into it.
            file.sync_data().map_err(err("flushing"))?;
            self.preserve_dir.sync().map_err(err("creating"))?;
        }
        Ok((file, len))
    }

    /// Submits one write or zero range once no write in flight overlaps it. Returns its bytes.
    fn submit_pending(&mut self, op: PendingOp) -> Result<u64, ApplyError> {
        let (disk_index, offset_bytes, len_bytes) = op.extent();
        let end = offset_bytes + len_bytes;
        while self
            .in_flight
            .iter()
            .any(|&(_, d, s, e)| d == disk_index && s < end && offset_bytes < e)
        {
            self.reap_some(1, "write")?;
        }
        let file = self.files[usize::from(disk_index)];
        let io_op = match op {
            PendingOp::Write { buf, .. } => IoOp::Write {
                file,
                offset_bytes,
                buf,
            },
            PendingOp::Zero { .. } => IoOp::WriteZeroes {
                file,
                offset_bytes,
                len_bytes,
            },
        };
        let tag = self.next_tag;
        self.next_tag += 1;
        self.submit(io_op, tag, disk_index, offset_bytes, len_bytes)?;
        Ok(len_bytes)
    }

    /// Submits one op, reaping while the queue is full.
    fn submit(
        &mut self,
        mut op: IoOp,
        tag: u64,
        disk_index: u16,
        offset_bytes: u64,
        len_bytes: u64,
    ) -> Result<(), ApplyError> {
        let kind = op.kind_name();
        loop {
            match self.engine.submit(op, tag) {
                Ok(()) => {
                    self.in_flight
                        .push((tag, disk_index, offset_bytes, offset_bytes + len_bytes));
                    return Ok(());
                }
                Err(rejected) if rejected.reason == RejectReason::QueueFull => {
                    op = rejected.op;
                    self.reap_some(1, kind)?;
                }
                Err(rejected) => {
                    return Err(ApplyError::Replica {
                        disk_index,
                        op: kind,
                        offset_bytes,
                        source: io::Error::new(io::ErrorKind::InvalidInput, rejected.to_string()),
                    });
                }
            }
        }
    }

    /// Reaps at least `min` completions; a failed op fails the batch.
    fn reap_some(&mut self, min: usize, op: &'static str) -> Result<(), ApplyError> {
        self.reap_with(min, op, &mut |_| {})
    }

    /// Reaps everything in flight; `on` sees each successful completion. The first error is
    /// returned after every op has come back.
    fn reap_all(
        &mut self,
        op: &'static str,
        mut on: impl FnMut(&mut Completion),
    ) -> Result<(), ApplyError> {
        let mut first_error = None;
        while self.engine.in_flight_count() > 0 {
            if let Err(e) = self.reap_with(1, op, &mut on) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn reap_with(
        &mut self,
        min: usize,
        op: &'static str,
        on: &mut dyn FnMut(&mut Completion),
    ) -> Result<(), ApplyError> {
        self.completions.clear();
        self.engine
            .reap(&mut self.completions, min)
            .map_err(|source| ApplyError::Replica {
                disk_index: 0,
                op: "reap",
                offset_bytes: 0,
                source,
            })?;
        let mut completions = std::mem::take(&mut self.completions);
        let mut first_error = None;
        for completion in completions.iter_mut() {
            let (disk_index, offset_bytes) =
                match self.in_flight.iter().position(|f| f.0 == completion.tag) {
                    Some(index) => {
                        let (_, disk_index, offset_bytes, _) = self.in_flight.swap_remove(index);
                        (disk_index, offset_bytes)
                    }
                    None => (0, 0),
                };
            match &completion.result {
                Ok(_) => on(completion),
                Err(e) => {
                    first_error.get_or_insert(ApplyError::Replica {
                        disk_index,
                        op,
                        offset_bytes,
                        source: io::Error::new(e.kind(), e.to_string()),
                    });
                }
            }
        }
        completions.clear(); // buffers go back to the pool here
        self.completions = completions;
        first_error.map_or(Ok(()), Err)
    }

    /// Flushes every replica, then commits the watermark (and `point`, which opens a new
    /// interval).
    fn checkpoint(&mut self, point: Option<PointRecord>) -> Result<(), ApplyError> {
        for (disk_index, &file) in self.files.clone().iter().enumerate() {
            let tag = self.next_tag;
            self.next_tag += 1;
            self.submit(IoOp::Flush { file }, tag, disk_index as u16, 0, 0)?;
        }
        self.engine.kick().map_err(|source| ApplyError::Replica {
            disk_index: 0,
            op: "kick",
            offset_bytes: 0,
            source,
        })?;
        self.reap_all("flush", |_| {})?;
        self.stats.flushes += 1;
        let tag = point.as_ref().map_or(self.current_tag, |p| p.point_id);
        self.meta
            .checkpoint(self.item, self.applied_seq, tag, point.as_ref())?;
        self.durable_seq = self.applied_seq;
        self.reader.set_applied(self.durable_seq);
        self.bytes_since_checkpoint = 0;
        if point.is_some() {
            self.discarded_since_point = false;
            self.current_tag = tag;
            self.preserving = self.config.preserve;
            self.preserved_now.clear();
        }
        Ok(())
    }

    /// Flushes the replicas and commits the watermark at the last applied frame (so staging
    /// can reclaim up to it), without making a point.
    pub fn flush(&mut self) -> Result<(), ApplyError> {
        self.ensure_healthy()?;
        if self.applied_seq == self.durable_seq {
            return Ok(());
        }
        let result = self.checkpoint(None);
        result.map_err(|e| self.fail(e))
    }

    /// Makes everything applied so far durable and, if anything was applied since the last
    /// point, records a "latest" point at the last applied frame. Returns the newest point id.
    pub fn mark_latest_point(&mut self) -> Result<Option<u64>, ApplyError> {
        self.ensure_healthy()?;
        if self.discarded_since_point {
            return Err(ApplyError::Invalid(format!(
                "no latest point: staged frames through seq {} were discarded and the replicas \
                 miss them until the delta resync's bookmark",
                self.applied_seq
            )));
        }
        if self.applied_seq == self.current_tag && self.current_tag != 0 {
            return Ok(Some(self.current_tag));
        }
        if self.applied_seq == 0 {
            return Ok(None);
        }
        let point = PointRecord {
            point_id: self.applied_seq,
            consistency: Consistency::Crash,
            origin: PointOrigin::Latest,
            bookmark_id: 0,
            source_timestamp_ns: 0,
            processed_at_ns: now_ns(),
            label: "latest".into(),
        };
        let result = self.checkpoint(Some(point));
        result.map_err(|e| self.fail(e))?;
        Ok(Some(self.applied_seq))
    }

    /// Prunes the oldest points beyond `retention` (never a pinned one, never skipping one).
    /// Returns the ids removed.
    pub fn prune(&mut self, retention: Retention, now_ns: u64) -> Result<Vec<u64>, ApplyError> {
        let points = self.meta.points(self.item)?;
        let mut removed = Vec::new();
        let mut left = points.len();
        for point in &points {
            let too_many = left > retention.max_count;
            let too_old = now_ns.saturating_sub(point.processed_at_ns) > retention.max_age_ns;
            if !(too_many || too_old) || self.pins.is_pinned(point.point_id) {
                break;
            }
            self.meta.remove_point(self.item, point.point_id)?;
            let name = preserve_file_name(point.point_id);
            match self.preserve_dir.remove(&name) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(ApplyError::Preserve {
                        what: format!("removing {name}"),
                        source,
                    });
                }
            }
            if self
                .preserve_file
                .as_ref()
                .is_some_and(|f| f.0 == point.point_id)
            {
                self.preserve_file = None;
            }
            if point.point_id == self.current_tag {
                // Every point is gone: nothing needs old content any more.
                self.preserving = false;
                self.preserved_now.clear();
            }
            removed.push(point.point_id);
            left -= 1;
        }
        if !removed.is_empty() {
            self.preserve_dir
                .sync()
                .map_err(|source| ApplyError::Preserve {
                    what: "syncing the preserve directory".into(),
                    source,
                })?;
        }
        Ok(removed)
    }
}

/// Decompresses (or copies) an extent's payload straight into `buf`.
fn decode_into(
    payloads: &mut PayloadDecoder,
    extent: &DataExtent<'_>,
    buf: &mut IoBuf,
) -> Result<(), DecodeErrorReason> {
    let len = extent.length_bytes as usize;
    buf.set_len_bytes(len);
    payloads.decode_into(extent, buf.as_mut_slice())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

    use super::*;
    use crate::delta::{
        DeltaDecoder, DeltaEncoder, EncoderOptions, Encoding, FrameHeader, FrameKind, StreamHeader,
    };
    use crate::durable::SimDir;
    use crate::io::{SimDiskSet, SimEngine, SimEngineConfig, SimFileConfig};
    use crate::materialize::{Source, materialize_disk};
    use crate::staging::{StagingConfig, StagingLog};

    const DISK_BYTES: u64 = 256 << 10;

    fn header(first_seq: u64) -> StreamHeader {
        StreamHeader {
            item_id: [0x51; 16],
            item_name: "poison".into(),
            first_seq,
            disks: vec![DiskGeometry {
                size_bytes: DISK_BYTES,
                block_size_bytes: 4096,
            }],
        }
    }

    /// The wire bytes of each frame `encode` writes, from `first_seq` on.
    fn frames(
        first_seq: u64,
        encode: impl FnOnce(&mut DeltaEncoder<Vec<u8>>),
    ) -> Vec<(u64, Vec<u8>)> {
        let mut encoder =
            DeltaEncoder::new(Vec::new(), &header(first_seq), EncoderOptions::default()).unwrap();
        encode(&mut encoder);
        let bytes = encoder.into_inner();
        let mut decoder = DeltaDecoder::new(bytes.as_slice()).unwrap();
        let mut out = Vec::new();
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => out.push((frame.seq, frame.wire_bytes.to_vec())),
                Ok(None) => return out,
                // The stream has no end frame: its bytes end at a frame boundary.
                Err(_) => return out,
            }
        }
    }

    /// A write frame with a valid checksum whose zstd payload does not decompress.
    fn broken_zstd_write(seq: u64, offset_bytes: u64) -> Vec<u8> {
        let payload = [0xA5u8; 64];
        let mut header = FrameHeader {
            kind: FrameKind::Write,
            encoding: Encoding::Zstd,
            disk_index: 0,
            seq,
            offset_bytes,
            length_bytes: 4096,
            payload_len_bytes: payload.len() as u32,
            checksum: 0,
        };
        header.checksum = FrameHeader::compute_checksum(&header.encode()[..40], &payload);
        [header.encode().as_slice(), &payload].concat()
    }

    fn write_model(model: &mut [u8], offset: u64, data: &[u8]) {
        model[offset as usize..offset as usize + data.len()].copy_from_slice(data);
    }

    /// An item on simulated storage: staging, metadata and preserve store on one [`SimDir`],
    /// its replica on a [`SimDiskSet`].
    fn rig() -> (
        SimDir,
        SimDiskSet,
        StagingLog,
        Arc<MetaStore>,
        ItemKey,
        Applier<SimEngine>,
    ) {
        rig_with_pool(default_pool_config(8))
    }

    /// [`rig`] with the apply buffer pool `pool`.
    fn rig_with_pool(
        pool: crate::io::BufPoolConfig,
    ) -> (
        SimDir,
        SimDiskSet,
        StagingLog,
        Arc<MetaStore>,
        ItemKey,
        Applier<SimEngine>,
    ) {
        let storage = SimDir::new();
        let disks = SimDiskSet::new();
        disks
            .create_file(
                "replica-0",
                SimFileConfig {
                    size_bytes: DISK_BYTES,
                    block_size_bytes: 4096,
                },
            )
            .unwrap();
        let (log, _) = StagingLog::open(
            Arc::new(storage.clone()),
            header(1),
            StagingConfig::default(),
        )
        .unwrap();
        let meta = Arc::new(MetaStore::open(storage.open("meta.redb", true).unwrap()).unwrap());
        let mut engine = SimEngine::new(
            &disks,
            SimEngineConfig {
                queue_depth: 8,
                seed: 3,
                reorder: true,
            },
        )
        .unwrap();
        let file = engine.add_file("replica-0".into()).unwrap();
        let item = crate::meta::item_key(&header(1).item_id);
        let applier = Applier::new(
            item,
            header(1).disks,
            ApplyConfig::default(),
            engine,
            vec![file],
            BufPool::new(pool).unwrap(),
            meta.clone(),
            Arc::new(storage.clone()),
            log.reader(1),
        )
        .unwrap();
        (storage, disks, log, meta, item, applier)
    }

    #[test]
    fn an_unappliable_frame_stops_at_the_watermark_keeps_every_point_and_is_discarded_on_request() {
        let (storage, disks, mut log, meta, item, mut applier) = rig();
        // Points 2 and 4, then a write and the broken frame 6 in one run, then more.
        let (a, b, c, d) = ([1u8; 8192], [2u8; 8192], [3u8; 4096], [4u8; 4096]);
        let mut staged = frames(1, |e| {
            e.write(0, 0, &a).unwrap();
            e.bookmark(Consistency::Crash, 1, 1, "p2").unwrap();
            e.write(0, 4096, &b).unwrap();
            e.bookmark(Consistency::App, 2, 2, "p4").unwrap();
            e.write(0, 0, &c).unwrap();
        });
        staged.push((6, broken_zstd_write(6, 64 << 10)));
        staged.extend(frames(7, |e| {
            e.write(0, 128 << 10, &d).unwrap();
            e.bookmark(Consistency::Crash, 3, 3, "p8").unwrap();
        }));
        for (seq, wire) in &staged {
            log.append(*seq, wire, std::time::Instant::now()).unwrap();
        }
        assert_eq!(log.commit().unwrap(), 8);
        let mut at_2 = vec![0u8; DISK_BYTES as usize];
        write_model(&mut at_2, 0, &a);
        let mut at_4 = at_2.clone();
        write_model(&mut at_4, 4096, &b);

        let error = applier.apply_available().unwrap_err();
        let frame = error.unappliable().unwrap_or_else(|| panic!("{error}"));
        assert_eq!(
            (frame.seq, frame.disk_index, frame.offset_bytes),
            (6, Some(0), Some(64 << 10)),
            "{frame}"
        );
        assert!(frame.reason.contains("zstd"), "{frame}");
        assert_eq!(applier.health(), &Health::Unappliable { frame });
        assert_eq!(
            applier.durable_seq(),
            4,
            "the watermark stays before the run"
        );
        assert_eq!(meta.state(item).unwrap().0, 4);
        // Retrying cannot help, and no latest point is made past a frame that never applies.
        assert!(matches!(
            applier.apply_batch(),
            Err(ApplyError::Failed { .. })
        ));
        assert!(applier.mark_latest_point().is_err());
        let materialize = |applier: &Applier<SimEngine>, point_id: u64| {
            let source = Source {
                meta: &meta,
                item,
                disks: &header(1).disks,
                preserve_dir: Arc::new(storage.clone()),
                grain_bytes: 4096,
                pins: applier.pins(),
            };
            let tmp = tempfile::tempdir().unwrap();
            let path = tmp.path().join("disk.raw");
            let replica = disks.live_image("replica-0").unwrap();
            let out = std::fs::File::create(&path).unwrap();
            materialize_disk(&source, point_id, 0, &replica, &out, &mut |_| {}).unwrap();
            std::fs::read(&path).unwrap()
        };
        let points = |meta: &MetaStore| -> Vec<u64> {
            meta.points(item)
                .unwrap()
                .iter()
                .map(|p| p.point_id)
                .collect()
        };
        assert_eq!(points(&meta), [2, 4]);
        // Frame 5 reached the replica before frame 6 failed; the points do not see it.
        assert!(materialize(&applier, 2) == at_2, "point 2");
        assert!(materialize(&applier, 4) == at_4, "point 4");

        // Discarding moves the watermark past every staged frame; apply goes on after them.
        assert_eq!(applier.discard_unapplied().unwrap(), 8);
        assert_eq!(applier.health(), &Health::Healthy);
        assert_eq!(meta.state(item).unwrap().0, 8);
        assert!(
            applier.mark_latest_point().is_err(),
            "the replicas miss the discarded frames: no latest point until a bookmark"
        );
        let after = frames(9, |e| {
            e.write(0, 192 << 10, &d).unwrap();
            e.bookmark(Consistency::Crash, 4, 4, "p10").unwrap();
        });
        for (seq, wire) in &after {
            log.append(*seq, wire, std::time::Instant::now()).unwrap();
        }
        log.commit().unwrap();
        let progress = applier.apply_available().unwrap();
        assert_eq!(progress.point, Some(10));
        assert_eq!(points(&meta), [2, 4, 10]);
        assert!(
            materialize(&applier, 2) == at_2,
            "point 2 after the discard"
        );
        assert!(
            materialize(&applier, 4) == at_4,
            "point 4 after the discard"
        );
        assert_eq!(applier.mark_latest_point().unwrap(), Some(10));
    }

    /// A pool of 16 KiB buffers: 32 KiB payloads go through the spill buffer, 8 KiB ones
    /// straight into a pool buffer.
    fn small_buffers() -> crate::io::BufPoolConfig {
        crate::io::BufPoolConfig {
            buf_size_bytes: 16 << 10,
            buf_count: 8,
            ..crate::io::BufPoolConfig::default()
        }
    }

    /// Compressible content that differs from frame to frame.
    fn content(tag: u64, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (((i / 96) as u64).wrapping_mul(31) ^ tag.wrapping_mul(0x9E37)) as u8)
            .collect()
    }

    /// `count` zstd writes from seq `first_seq` alternating 32 KiB and 8 KiB, overlapping;
    /// returns the stream bytes (with an end frame) and applies them to `model`.
    fn zstd_writes(first_seq: u64, count: u64, model: &mut [u8]) -> Vec<u8> {
        let mut encoder =
            DeltaEncoder::new(Vec::new(), &header(first_seq), EncoderOptions::default()).unwrap();
        for n in 0..count {
            let seq = first_seq + n;
            let len = if n % 2 == 0 { 32 << 10 } else { 8 << 10 };
            let offset = (seq * 12288) % (DISK_BYTES - (32 << 10));
            let data = content(seq, len);
            encoder.write(0, offset, &data).unwrap();
            write_model(model, offset, &data);
        }
        encoder.finish().unwrap()
    }

    fn ingest(log: &mut StagingLog, stream: &[u8]) -> crate::ingest::IngestReport {
        crate::ingest::ingest_stream(
            stream,
            log,
            crate::ingest::IngestConfig::default(),
            &mut |_, _| {},
        )
        .unwrap()
    }

    #[test]
    fn payloads_ingest_validated_are_applied_without_a_second_decompression_byte_exact() {
        let (_storage, disks, mut log, _meta, _item, mut applier) = rig_with_pool(small_buffers());
        let mut model = vec![0u8; DISK_BYTES as usize];
        let report = ingest(&mut log, &zstd_writes(1, 12, &mut model));
        assert_eq!(report.frames_staged, 12);
        assert_eq!(log.handoff().stats().published, 12);
        let progress = applier.apply_available().unwrap();
        assert_eq!(progress.frames, 12);
        let stats = applier.stats();
        assert_eq!(
            (stats.payloads_handed_off, stats.payloads_decompressed),
            (12, 0),
            "apply caught up takes every payload from the handoff (spilled and pooled)"
        );
        assert!(disks.live_image("replica-0").unwrap() == model, "replica");
        // The buffers went back: the next stream hands off again without allocating more.
        let held = log.handoff().held_bytes();
        assert!(
            held > 0 && held <= crate::handoff::HANDOFF_MAX_BYTES,
            "{held}"
        );
        ingest(&mut log, &zstd_writes(13, 6, &mut model));
        applier.apply_available().unwrap();
        assert_eq!(applier.stats().payloads_handed_off, 18);
        assert!(log.handoff().held_bytes() <= crate::handoff::HANDOFF_MAX_BYTES);
        assert!(disks.live_image("replica-0").unwrap() == model, "replica");
    }

    #[test]
    fn ingest_commits_early_when_apply_took_every_handed_off_payload() {
        let (_storage, disks, mut log, _meta, _item, mut applier) = rig_with_pool(small_buffers());
        let mut model = vec![0u8; DISK_BYTES as usize];
        // 60 frames (1.2 MiB decompressed) arrive in one read, so the input is idle only at
        // the end; once the pending frames hold 1 MiB (half the budget) handed off and nothing
        // published waits, ingest commits so that apply gets them while they are handed off.
        let report = ingest(&mut log, &zstd_writes(1, 60, &mut model));
        assert_eq!(report.commits, 2, "{report:?}");
        applier.apply_available().unwrap();
        assert_eq!(applier.stats().payloads_handed_off, 60);
        assert!(disks.live_image("replica-0").unwrap() == model, "replica");
    }

    #[test]
    fn apply_behind_or_a_handoff_for_another_frame_decompresses_from_staging_byte_exact() {
        let (_storage, disks, mut log, _meta, _item, mut applier) = rig_with_pool(small_buffers());
        let mut model = vec![0u8; DISK_BYTES as usize];
        // Apply far behind: 160 frames (3.1 MiB decompressed) do not fit the 2 MiB budget; the
        // ones that did not are decompressed from staging.
        ingest(&mut log, &zstd_writes(1, 160, &mut model));
        let published = log.handoff().stats().published;
        assert!(published > 0 && published < 160, "{published}");
        applier.apply_available().unwrap();
        let stats = applier.stats().clone();
        assert_eq!(stats.payloads_handed_off, published);
        assert_eq!(stats.payloads_decompressed, 160 - published);
        assert!(disks.live_image("replica-0").unwrap() == model, "replica");

        // The handoff holds bytes for seq 161 with the same disk, offset and length as the
        // frame staging holds under 161, but not for that frame (another checksum: e.g. what
        // was validated before a resync replaced the staged frames). They must not be used.
        let mut other = model.clone();
        let stream = zstd_writes(161, 1, &mut model);
        let mut decoder = DeltaDecoder::new(stream.as_slice()).unwrap();
        let frame = decoder.next_frame().unwrap().unwrap();
        let FrameBody::Write(extent) = frame.body else {
            panic!("a write")
        };
        assert_eq!(extent.encoding, Encoding::Zstd);
        let staged_checksum = u64::from_le_bytes(frame.wire_bytes[40..48].try_into().unwrap());
        let forged = PayloadKey::of(161, staged_checksum ^ 1, &extent);
        log.append(161, frame.wire_bytes, std::time::Instant::now())
            .unwrap();
        log.commit().unwrap();
        let handoff = log.handoff();
        let mut lent = handoff.lend(extent.length_bytes as usize).unwrap();
        lent.as_mut_slice().fill(0xEE);
        lent.publish(forged);
        write_model(&mut other, extent.offset_bytes, &vec![0xEE; 32 << 10]);
        applier.apply_available().unwrap();
        let replica = disks.live_image("replica-0").unwrap();
        assert!(replica != other, "the forged bytes were written");
        assert!(replica == model, "replica");
        let after = applier.stats();
        assert_eq!(after.payloads_handed_off, stats.payloads_handed_off);
        assert_eq!(after.payloads_decompressed, stats.payloads_decompressed + 1);
        assert_eq!(handoff.stats().mismatched, 1);
    }

    #[test]
    fn a_frame_damaged_in_the_staging_log_is_unappliable_with_its_segment_and_offset() {
        let (storage, _disks, mut log, meta, item, mut applier) = rig();
        let staged = frames(1, |e| {
            e.write(0, 0, &[1u8; 8192]).unwrap();
            e.bookmark(Consistency::Crash, 1, 1, "p2").unwrap();
            e.write(0, 4096, &[2u8; 8192]).unwrap();
        });
        for (seq, wire) in &staged {
            log.append(*seq, wire, std::time::Instant::now()).unwrap();
        }
        log.commit().unwrap();
        // Bit rot after staging: one payload byte of frame 3 flips on the cache disk.
        let frame_3_at =
            (header(1).encoded_len_bytes() + staged[0].1.len() + staged[1].1.len()) as u64;
        let segment = "seg-00000000000000000001.drs";
        let file = storage.open(segment, false).unwrap();
        let mut byte = [0u8; 1];
        let at = frame_3_at + crate::delta::FRAME_HEADER_BYTES as u64 + 7;
        file.read_exact_at(at, &mut byte).unwrap();
        file.write_all_at(at, &[byte[0] ^ 0x10]).unwrap();

        let error = applier.apply_available().unwrap_err();
        let frame = error.unappliable().unwrap_or_else(|| panic!("{error}"));
        assert_eq!(frame.seq, 3, "{frame}");
        assert_eq!(frame.segment.as_deref(), Some(segment), "{frame}");
        assert_eq!(frame.segment_offset_bytes, Some(frame_3_at), "{frame}");
        assert!(frame.reason.contains("checksum"), "{frame}");
        assert!(matches!(applier.health(), Health::Unappliable { .. }));
        assert_eq!(meta.state(item).unwrap().0, 2, "stopped at point 2");
        assert_eq!(applier.discard_unapplied().unwrap(), 3);
        assert_eq!(meta.state(item).unwrap().0, 3);
    }

    #[test]
    fn default_pool_holds_4_mib_up_to_queue_depth_32_then_grows_by_min_buffers() {
        for (queue_depth, count, size) in [
            (1, 4, 1 << 20),
            (4, 4, 1 << 20),
            (8, 8, 512 << 10),
            (12, 12, 256 << 10),
            (32, 32, 128 << 10),
            (64, 64, 128 << 10),
        ] {
            let config = default_pool_config(queue_depth);
            assert_eq!(
                (config.buf_count, config.buf_size_bytes),
                (count, size),
                "queue depth {queue_depth}"
            );
            assert!(BufPool::new(config).is_ok(), "queue depth {queue_depth}");
        }
    }
}
