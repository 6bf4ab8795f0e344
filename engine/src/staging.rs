//! The cache staging area: a durable, bounded, per-item log of received frames.
//!
//! ```text
//!  staging dir of one item (on the appliance's cache disk)
//!  ├── seg-00000000000000000001.drs   ┐ sealed segments: each is a valid delta stream
//!  ├── seg-00000000000000004097.drs   ┘ (stream header with first_seq = the segment's first
//!  ├── seg-00000000000000009001.drs     frame, then frames verbatim, no end frame) — active
//!  └── RESYNC_REQUIRED                  present while the item needs a delta resync
//!
//!  append(frame) ──► batch in memory ──► commit(): pwrite ─► fdatasync ─► durable_seq ─► ACK
//!                                                   (one flush for the whole batch: group commit)
//!  StagingReader (apply) reads frames ≤ durable_seq;  reclaim(applied_seq) deletes sealed
//!  segments whose every frame is applied.
//! ```
//!
//! Invariants:
//! - A sequence number is reported durable (and may be acknowledged) only after the bytes of
//!   its frame and of every frame before it are on the media (`sync_data`, and `sync` of the
//!   directory for a new segment).
//! - Frames are stored exactly as received (their own XXH3 checksums protect them on disk);
//!   recovery decodes each segment with the one delta decoder, keeps every frame whose checksum
//!   holds, and cuts a torn tail of the last segment cleanly. A defect before the tail (media
//!   corruption) keeps the frames before it and marks the item *resync required*.
//! - `used_bytes` never exceeds `capacity_bytes`: a frame that does not fit is refused
//!   ([`StagingError::Full`]), never dropped after being accepted.
//! - After a failed flush the log is failed: nothing more is acknowledged until it is reopened
//!   (which recovers from what is on the media).

use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::delta::{
    DecodeErrorReason, DeltaDecoder, FRAME_HEADER_BYTES, FrameBody, FrameHeader, FrameKind,
    StreamHeader, check_frame_prefix, decode_frame_header, le_u64, validate_frame,
};
use crate::durable::{DurableDir, DurableFile};
use crate::handoff::PayloadHandoff;

/// Name of the marker file present while the item needs a delta resync.
pub const RESYNC_MARKER: &str = "RESYNC_REQUIRED";

/// Staging limits.
#[derive(Debug, Clone, Copy)]
pub struct StagingConfig {
    /// Most bytes the item's segments may hold.
    pub capacity_bytes: u64,
    /// A segment is sealed and a new one started once it reaches this size.
    pub segment_target_bytes: u64,
    /// Above this fill ratio (per mille), acknowledgements are slowed (back-pressure).
    pub backpressure_per_mille: u32,
    /// Longest delay back-pressure adds before an acknowledgement.
    pub backpressure_max_delay: Duration,
    /// How long the log may stay full before the item switches to resync required.
    pub full_timeout: Duration,
    /// Appended frames are written to the active segment (not flushed) once this many bytes
    /// wait in memory; `commit` writes the rest and flushes. Bounds a session's memory when
    /// its sender keeps a group of large frames in flight.
    pub batch_write_bytes: usize,
}

impl Default for StagingConfig {
    fn default() -> Self {
        Self {
            capacity_bytes: 2 << 30,
            segment_target_bytes: 64 << 20,
            backpressure_per_mille: 800,
            backpressure_max_delay: Duration::from_millis(200),
            full_timeout: Duration::from_secs(60),
            batch_write_bytes: 1 << 20,
        }
    }
}

/// Why staging failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StagingError {
    /// A frame whose sequence number is not the next one.
    #[error("frame seq {found} is not the next sequence number {expected}")]
    OutOfOrder {
        /// The next sequence number.
        expected: u64,
        /// The one given.
        found: u64,
    },
    /// No room: the frame was not stored and must not be acknowledged.
    #[error(
        "staging full: {used_bytes} of {capacity_bytes} bytes used, a {frame_bytes}-byte frame \
         does not fit"
    )]
    Full {
        /// Bytes in use.
        used_bytes: u64,
        /// Capacity.
        capacity_bytes: u64,
        /// Size of the refused frame.
        frame_bytes: u64,
    },
    /// The item needs a delta resync; frames are refused until it is done.
    #[error("item requires a delta resync: {reason}")]
    ResyncRequired {
        /// Why.
        reason: String,
    },
    /// The staging directory belongs to another item or disk layout.
    #[error("staging segment {segment} is for another item or disk layout")]
    WrongItem {
        /// The segment file.
        segment: String,
    },
    /// An earlier flush failed; the log accepts nothing until reopened.
    #[error("staging log failed after an earlier flush error; reopen to recover")]
    Failed,
    /// A frame read back from the log is damaged.
    #[error("staged frame seq {seq} in {segment} at byte {offset_bytes}: {reason}")]
    Corrupt {
        /// The segment file.
        segment: String,
        /// The sequence number expected there.
        seq: u64,
        /// Byte offset in the segment.
        offset_bytes: u64,
        /// What is wrong.
        reason: DecodeErrorReason,
    },
    /// The cache disk failed.
    #[error("staging I/O on {what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> StagingError {
    let what = what.into();
    move |source| StagingError::Io { what, source }
}

/// What recovery found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segments found.
    pub segments: usize,
    /// Frames kept.
    pub frames: u64,
    /// Bytes cut from a torn tail.
    pub torn_tail_bytes: u64,
    /// Damage found before the tail (item marked resync required), if any.
    pub corruption: Option<String>,
}

/// Back-pressure advice for the acknowledging side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pressure {
    /// Acknowledge at once.
    None,
    /// Wait this long before acknowledging, so the source slows down.
    Slow(Duration),
}

#[derive(Debug, Clone)]
struct Segment {
    name: String,
    first_seq: u64,
    /// Last sequence number in the segment (`first_seq - 1` when empty).
    last_seq: u64,
    len_bytes: u64,
}

#[derive(Debug)]
struct Shared {
    segments: Mutex<Vec<Segment>>,
    durable_seq: AtomicU64,
    /// Bumped when every segment is replaced (`resync_done`): readers reopen their file even
    /// if a new segment has the same name.
    generation: AtomicU64,
    /// Highest sequence number applied and durable on the replicas, as published by apply
    /// ([`StagingReader::set_applied`]); every commit reclaims up to it.
    applied_seq: AtomicU64,
    /// Payloads ingest decompressed, for apply (see [`crate::handoff`]).
    handoff: Arc<PayloadHandoff>,
    /// How many times the reader's waiter was woken (by a commit that made frames durable, or
    /// by [`StagingWaker::wake`]); a waiter returns once it differs from its ticket.
    wakes: Mutex<u64>,
    /// Signalled with `wakes`: the reader's thread waits here for new durable frames.
    wake: Condvar,
}

impl Shared {
    fn segments(&self) -> MutexGuard<'_, Vec<Segment>> {
        self.segments.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wakes(&self) -> MutexGuard<'_, u64> {
        self.wakes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes whoever waits in [`StagingWaker::wait`].
    fn wake_reader(&self) {
        let mut wakes = self.wakes();
        *wakes = wakes.wrapping_add(1);
        drop(wakes);
        self.wake.notify_all();
    }
}

/// Lets the thread that reads a staging log sleep until frames become durable, and lets
/// another thread wake it without new frames (a stop request). Cheap to clone.
///
/// Take a [`ticket`](Self::ticket) before checking for work, then [`wait`](Self::wait) with
/// it: a commit or a wake-up between the two ends the wait at once, so none is lost.
#[derive(Debug, Clone)]
pub struct StagingWaker(Arc<Shared>);

impl StagingWaker {
    /// The current wake count, to pass to [`wait`](Self::wait).
    pub fn ticket(&self) -> u64 {
        *self.0.wakes()
    }

    /// Wakes the waiter (whoever called [`wait`](Self::wait)) without new frames.
    pub fn wake(&self) {
        self.0.wake_reader();
    }

    /// Sleeps until a frame after `seq` is durable, a commit or [`wake`](Self::wake) happened
    /// since `ticket`, or `timeout` passed.
    pub fn wait(&self, ticket: u64, seq: u64, timeout: Duration) {
        let guard = self.0.wakes();
        let _ = self.0.wake.wait_timeout_while(guard, timeout, |wakes| {
            *wakes == ticket && self.0.durable_seq.load(Ordering::Acquire) <= seq
        });
    }
}

/// The staging log of one item. One appender (the item's data-port connection) owns it;
/// [`StagingReader`]s share its segment list.
#[derive(Debug)]
pub struct StagingLog {
    dir: Arc<dyn DurableDir>,
    header: StreamHeader,
    config: StagingConfig,
    shared: Arc<Shared>,
    active: Arc<dyn DurableFile>,
    /// Files written since the last commit and not yet synced (sealed segment, new active).
    unsynced: Vec<Arc<dyn DurableFile>>,
    dir_dirty: bool,
    batch: Vec<u8>,
    /// Sequence number of the last frame appended (durable or not).
    appended_seq: u64,
    used_bytes: u64,
    full_since: Option<Instant>,
    resync_reason: Option<String>,
    failed: bool,
}

fn segment_name(first_seq: u64) -> String {
    format!("seg-{first_seq:020}.drs")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    name.strip_prefix("seg-")?
        .strip_suffix(".drs")?
        .parse()
        .ok()
}

/// Adapts a durable file to `Read` from a starting offset (for the decoder).
struct FileReader<'a> {
    file: &'a dyn DurableFile,
    offset_bytes: u64,
    len_bytes: u64,
}

impl Read for FileReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.len_bytes.saturating_sub(self.offset_bytes);
        let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        if n == 0 {
            return Ok(0);
        }
        self.file.read_exact_at(self.offset_bytes, &mut buf[..n])?;
        self.offset_bytes += n as u64;
        Ok(n)
    }
}

impl StagingLog {
    /// Opens the item's staging log and recovers it. `header` names the item and its disks;
    /// its `first_seq` is where a brand-new log starts.
    pub fn open(
        dir: Arc<dyn DurableDir>,
        header: StreamHeader,
        config: StagingConfig,
    ) -> Result<(Self, RecoveryReport), StagingError> {
        let names = dir
            .list()
            .map_err(io_err("listing the staging directory"))?;
        let resync_reason = if names.iter().any(|n| n == RESYNC_MARKER) {
            let file = dir
                .open(RESYNC_MARKER, false)
                .map_err(io_err("opening the resync marker"))?;
            let len = file
                .len_bytes()
                .map_err(io_err("reading the resync marker"))?;
            let mut text = vec![0u8; usize::try_from(len.min(4096)).unwrap_or(0)];
            file.read_exact_at(0, &mut text)
                .map_err(io_err("reading the resync marker"))?;
            Some(String::from_utf8_lossy(&text).into_owned())
        } else {
            None
        };
        let mut firsts: Vec<u64> = names.iter().filter_map(|n| parse_segment_name(n)).collect();
        firsts.sort_unstable();
        let mut report = RecoveryReport::default();
        let mut segments: Vec<Segment> = Vec::new();
        let mut corruption: Option<String> = None;
        let mut discard: Vec<String> = Vec::new();
        for (position, first_seq) in firsts.iter().copied().enumerate() {
            let name = segment_name(first_seq);
            if corruption.is_some() {
                discard.push(name);
                continue;
            }
            let is_last = position + 1 == firsts.len();
            let expected_first = segments.last().map(|s| s.last_seq.wrapping_add(1));
            if expected_first.is_some_and(|e| e != first_seq) {
                corruption = Some(format!(
                    "segment {name} starts at seq {first_seq}, expected {}",
                    expected_first.unwrap_or_default()
                ));
                discard.push(name);
                continue;
            }
            let file = dir
                .open(&name, false)
                .map_err(io_err(format!("opening {name}")))?;
            let scan = scan_segment(file.as_ref(), &name, &header, first_seq)?;
            report.segments += 1;
            report.frames += scan.frames;
            match scan.defect {
                None => {}
                Some(_) if is_last || scan.header_torn => {
                    // A torn tail: bytes after the last complete frame, never acknowledged.
                    report.torn_tail_bytes += scan.file_len - scan.good_len;
                }
                Some(defect) => {
                    corruption = Some(format!("{name}: {defect}"));
                    report.torn_tail_bytes += scan.file_len - scan.good_len;
                }
            }
            if scan.header_torn {
                // Created but its header never made it: nothing in it was acknowledged.
                discard.push(name);
                continue;
            }
            if scan.good_len != scan.file_len {
                file.set_len(scan.good_len)
                    .map_err(io_err(format!("cutting {name}")))?;
                file.sync_data()
                    .map_err(io_err(format!("syncing {name}")))?;
            }
            segments.push(Segment {
                name,
                first_seq,
                last_seq: first_seq.wrapping_add(scan.frames).wrapping_sub(1),
                len_bytes: scan.good_len,
            });
        }
        for name in &discard {
            dir.remove(name)
                .map_err(io_err(format!("removing {name}")))?;
        }
        if !discard.is_empty() {
            dir.sync()
                .map_err(io_err("syncing the staging directory"))?;
        }
        report.corruption = corruption.clone();
        let fresh = segments.is_empty();
        let (active, appended_seq) = match segments.last() {
            Some(last) => (
                dir.open(&last.name, false)
                    .map_err(io_err(format!("opening {}", last.name)))?,
                last.last_seq,
            ),
            None => {
                let (file, segment) = create_segment(dir.as_ref(), &header, header.first_seq)?;
                segments.push(segment);
                (file, header.first_seq.wrapping_sub(1))
            }
        };
        let mut log = Self {
            dir: dir.clone(),
            config,
            shared: Arc::new(Shared {
                segments: Mutex::new(Vec::new()),
                durable_seq: AtomicU64::new(appended_seq),
                generation: AtomicU64::new(0),
                applied_seq: AtomicU64::new(0),
                handoff: Arc::default(),
                wakes: Mutex::new(0),
                wake: Condvar::new(),
            }),
            unsynced: if fresh {
                vec![active.clone()]
            } else {
                Vec::new()
            },
            dir_dirty: fresh,
            active,
            batch: Vec::new(),
            appended_seq,
            used_bytes: segments.iter().map(|s| s.len_bytes).sum(),
            full_since: None,
            resync_reason,
            failed: false,
            header,
        };
        *log.shared.segments() = segments;
        if fresh {
            log.commit()?;
        }
        if let Some(reason) = corruption {
            log.require_resync(&reason)?;
        }
        Ok((log, report))
    }

    fn start_segment(&mut self, first_seq: u64) -> Result<(), StagingError> {
        let (file, segment) = create_segment(self.dir.as_ref(), &self.header, first_seq)?;
        self.used_bytes += segment.len_bytes;
        self.unsynced.push(file.clone());
        self.dir_dirty = true;
        self.active = file;
        self.shared.segments().push(segment);
        Ok(())
    }

    /// The item and disks this log stages.
    pub fn header(&self) -> &StreamHeader {
        &self.header
    }

    /// Sequence number of the next frame to append.
    pub fn next_seq(&self) -> u64 {
        self.appended_seq.wrapping_add(1)
    }

    /// Highest sequence number that is durable (and may be acknowledged).
    pub fn durable_seq(&self) -> u64 {
        self.shared.durable_seq.load(Ordering::Acquire)
    }

    /// Bytes the segments hold, including frames appended but not yet committed.
    pub fn used_bytes(&self) -> u64 {
        self.used_bytes + self.batch.len() as u64
    }

    /// The configured capacity.
    pub fn capacity_bytes(&self) -> u64 {
        self.config.capacity_bytes
    }

    /// Why the item needs a delta resync, if it does.
    pub fn resync_required(&self) -> Option<&str> {
        self.resync_reason.as_deref()
    }

    /// Appends one frame, exactly as received (header + payload, checksum already verified by
    /// the decoder). It is durable only after the next [`commit`](Self::commit).
    pub fn append(
        &mut self,
        seq: u64,
        wire_bytes: &[u8],
        now: Instant,
    ) -> Result<(), StagingError> {
        if self.failed {
            return Err(StagingError::Failed);
        }
        if let Some(reason) = &self.resync_reason {
            return Err(StagingError::ResyncRequired {
                reason: reason.clone(),
            });
        }
        if seq != self.next_seq() {
            return Err(StagingError::OutOfOrder {
                expected: self.next_seq(),
                found: seq,
            });
        }
        let frame_bytes = wire_bytes.len() as u64;
        if self.used_bytes() + frame_bytes > self.config.capacity_bytes {
            let since = *self.full_since.get_or_insert(now);
            if now.duration_since(since) >= self.config.full_timeout {
                let reason = format!(
                    "staging stayed full for {} s (capacity {} bytes); frames from seq {seq} \
                     were not staged",
                    self.config.full_timeout.as_secs(),
                    self.config.capacity_bytes
                );
                self.require_resync(&reason)?;
                return Err(StagingError::ResyncRequired { reason });
            }
            return Err(StagingError::Full {
                used_bytes: self.used_bytes(),
                capacity_bytes: self.config.capacity_bytes,
                frame_bytes,
            });
        }
        self.full_since = None;
        let active_len = self.shared.segments().last().map_or(0, |s| s.len_bytes);
        if active_len + self.batch.len() as u64 >= self.config.segment_target_bytes {
            self.write_batch()?;
            self.unsynced.push(self.active.clone());
            self.start_segment(seq)?;
        }
        // Bound the in-memory batch: past `batch_write_bytes` it goes to the file now (not yet
        // durable; `commit` still makes it so), so a session whose sender keeps data in flight
        // holds at most that plus one frame, not a whole group of frames.
        if !self.batch.is_empty()
            && self.batch.len() + wire_bytes.len() > self.config.batch_write_bytes
        {
            self.write_batch()?;
        }
        self.batch.extend_from_slice(wire_bytes);
        self.appended_seq = seq;
        Ok(())
    }

    /// Writes the batch to the active segment (not yet durable).
    fn write_batch(&mut self) -> Result<(), StagingError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let mut segments = self.shared.segments();
        let Some(active) = segments.last_mut() else {
            return Err(StagingError::Failed);
        };
        let (offset, name) = (active.len_bytes, active.name.clone());
        drop(segments);
        if let Err(e) = self.active.write_all_at(offset, &self.batch) {
            self.failed = true;
            return Err(io_err(format!("appending to {name}"))(e));
        }
        let mut segments = self.shared.segments();
        if let Some(active) = segments.last_mut() {
            active.len_bytes += self.batch.len() as u64;
            active.last_seq = self.appended_seq;
        }
        self.used_bytes += self.batch.len() as u64;
        self.batch.clear();
        Ok(())
    }

    /// Makes every appended frame durable with one flush per file touched (group commit) and
    /// returns the durable sequence number, which may now be acknowledged.
    pub fn commit(&mut self) -> Result<u64, StagingError> {
        if self.failed {
            return Err(StagingError::Failed);
        }
        self.write_batch()?;
        let mut files = std::mem::take(&mut self.unsynced);
        if !files.iter().any(|f| Arc::ptr_eq(f, &self.active)) {
            files.push(self.active.clone());
        }
        for file in &files {
            if let Err(e) = file.sync_data() {
                self.failed = true;
                return Err(io_err("flushing the staging log")(e));
            }
        }
        if self.dir_dirty {
            if let Err(e) = self.dir.sync() {
                self.failed = true;
                return Err(io_err("syncing the staging directory")(e));
            }
            self.dir_dirty = false;
        }
        let newly_durable = self
            .shared
            .durable_seq
            .swap(self.appended_seq, Ordering::AcqRel)
            != self.appended_seq;
        if newly_durable {
            // The reader's thread (apply) waits for exactly this: wake it here, so nobody
            // has to relay the durable seq to it.
            self.shared.wake_reader();
        }
        // Free what apply has made durable elsewhere, so a long session never fills the
        // cache with applied frames.
        let applied = self.shared.applied_seq.load(Ordering::Acquire);
        if applied > 0 {
            self.reclaim(applied)?;
        }
        Ok(self.appended_seq)
    }

    /// How long to hold the next acknowledgement (grows with the fill above the threshold).
    pub fn pressure(&self) -> Pressure {
        let threshold =
            self.config.capacity_bytes / 1000 * u64::from(self.config.backpressure_per_mille);
        let used = self.used_bytes();
        if used <= threshold || self.config.capacity_bytes <= threshold {
            return Pressure::None;
        }
        let over = (used - threshold) as f64 / (self.config.capacity_bytes - threshold) as f64;
        Pressure::Slow(self.config.backpressure_max_delay.mul_f64(over.min(1.0)))
    }

    /// Deletes sealed segments whose every frame is at or below `applied_seq` (applied to the
    /// replicas and durable there). Returns the bytes freed.
    pub fn reclaim(&mut self, applied_seq: u64) -> Result<u64, StagingError> {
        let victims: Vec<Segment> = {
            let mut segments = self.shared.segments();
            let keep_from = segments
                .iter()
                .position(|s| s.last_seq > applied_seq || s.last_seq < s.first_seq)
                .unwrap_or(segments.len())
                .min(segments.len().saturating_sub(1)); // never the active segment
            segments.drain(..keep_from).collect()
        };
        let mut freed = 0;
        for victim in &victims {
            self.dir
                .remove(&victim.name)
                .map_err(io_err(format!("removing {}", victim.name)))?;
            freed += victim.len_bytes;
        }
        if !victims.is_empty() {
            self.dir
                .sync()
                .map_err(io_err("syncing the staging directory"))?;
        }
        self.used_bytes -= freed;
        Ok(freed)
    }

    /// Marks the item as needing a delta resync (durably). Staged frames stay until
    /// [`StagingLog::resync_done`], which drops them: after the resync the replica is exact
    /// and the old frames would be stale.
    pub fn require_resync(&mut self, reason: &str) -> Result<(), StagingError> {
        let marker = self
            .dir
            .open(RESYNC_MARKER, true)
            .map_err(io_err("creating the resync marker"))?;
        marker
            .set_len(0)
            .map_err(io_err("writing the resync marker"))?;
        marker
            .write_all_at(0, reason.as_bytes())
            .map_err(io_err("writing the resync marker"))?;
        marker
            .sync_data()
            .map_err(io_err("syncing the resync marker"))?;
        self.dir
            .sync()
            .map_err(io_err("syncing the staging directory"))?;
        self.resync_reason = Some(reason.to_owned());
        Ok(())
    }

    /// After a completed delta resync: drops all staged frames, starts a fresh segment at
    /// `next_seq`, and clears the resync marker.
    pub fn resync_done(&mut self, next_seq: u64) -> Result<(), StagingError> {
        self.batch.clear();
        self.shared.handoff.clear();
        self.shared.generation.fetch_add(1, Ordering::AcqRel);
        let old: Vec<Segment> = std::mem::take(&mut *self.shared.segments());
        for segment in &old {
            self.dir
                .remove(&segment.name)
                .map_err(io_err(format!("removing {}", segment.name)))?;
        }
        self.used_bytes = 0;
        self.unsynced.clear();
        self.appended_seq = next_seq.wrapping_sub(1);
        self.start_segment(next_seq)?;
        self.commit()?;
        self.dir
            .remove(RESYNC_MARKER)
            .map_err(io_err("removing the resync marker"))?;
        self.dir
            .sync()
            .map_err(io_err("syncing the staging directory"))?;
        self.resync_reason = None;
        self.full_since = None;
        Ok(())
    }

    /// The handoff of decompressed payloads from ingest to this log's readers.
    pub fn handoff(&self) -> Arc<PayloadHandoff> {
        self.shared.handoff.clone()
    }

    /// A reader of durable frames from `from_seq` on.
    pub fn reader(&self, from_seq: u64) -> StagingReader {
        StagingReader {
            dir: self.dir.clone(),
            shared: self.shared.clone(),
            disks: self.header.disks.clone(),
            header_len_bytes: self.header.encoded_len_bytes() as u64,
            next_seq: from_seq,
            current: None,
            generation: self.shared.generation.load(Ordering::Acquire),
            buf: Vec::new(),
        }
    }
}

/// Creates a segment file holding only its stream header (not yet durable).
fn create_segment(
    dir: &dyn DurableDir,
    header: &StreamHeader,
    first_seq: u64,
) -> Result<(Arc<dyn DurableFile>, Segment), StagingError> {
    let name = segment_name(first_seq);
    let file = dir
        .open(&name, true)
        .map_err(io_err(format!("creating {name}")))?;
    let mut header = header.clone();
    header.first_seq = first_seq;
    let mut bytes = Vec::with_capacity(header.encoded_len_bytes());
    header.encode_into(&mut bytes);
    file.set_len(0)
        .map_err(io_err(format!("creating {name}")))?;
    file.write_all_at(0, &bytes)
        .map_err(io_err(format!("writing {name}")))?;
    let segment = Segment {
        name,
        first_seq,
        last_seq: first_seq.wrapping_sub(1),
        len_bytes: bytes.len() as u64,
    };
    Ok((file, segment))
}

struct SegmentScan {
    frames: u64,
    good_len: u64,
    file_len: u64,
    defect: Option<String>,
    header_torn: bool,
}

fn scan_segment(
    file: &dyn DurableFile,
    name: &str,
    header: &StreamHeader,
    first_seq: u64,
) -> Result<SegmentScan, StagingError> {
    let file_len = file.len_bytes().map_err(io_err(format!("sizing {name}")))?;
    let reader = FileReader {
        file,
        offset_bytes: 0,
        len_bytes: file_len,
    };
    let mut decoder = match DeltaDecoder::new(io::BufReader::with_capacity(1 << 20, reader)) {
        Ok(decoder) => decoder,
        Err(e) => {
            return Ok(SegmentScan {
                frames: 0,
                good_len: 0,
                file_len,
                defect: Some(e.to_string()),
                header_torn: true,
            });
        }
    };
    let stored = decoder.header();
    if stored.item_id != header.item_id
        || stored.disks != header.disks
        || stored.first_seq != first_seq
    {
        return Err(StagingError::WrongItem {
            segment: name.to_owned(),
        });
    }
    let mut frames = 0;
    let mut good_len = decoder.offset_bytes();
    let defect = loop {
        match decoder.next_frame() {
            Ok(Some(_)) => {
                frames += 1;
                good_len = decoder.offset_bytes();
            }
            Ok(None) => break None,
            // End of the bytes exactly at a frame boundary is the normal end of a segment.
            Err(e)
                if matches!(
                    e.reason,
                    DecodeErrorReason::Truncated {
                        available_bytes: 0,
                        ..
                    }
                ) =>
            {
                break None;
            }
            Err(e) => break Some(e.to_string()),
        }
    };
    Ok(SegmentScan {
        frames,
        good_len,
        file_len,
        defect,
        header_torn: false,
    })
}

/// Reads durable staged frames in sequence order (used by apply), verifying each checksum.
#[derive(Debug)]
pub struct StagingReader {
    dir: Arc<dyn DurableDir>,
    shared: Arc<Shared>,
    disks: Vec<crate::delta::DiskGeometry>,
    /// Every segment starts with the item's stream header: same name, same disks.
    header_len_bytes: u64,
    next_seq: u64,
    current: Option<(Segment, Arc<dyn DurableFile>, u64)>,
    /// The log's generation when `current` was opened.
    generation: u64,
    buf: Vec<u8>,
}

/// A frame read back from the staging log; borrows the reader's buffer.
#[derive(Debug)]
pub struct StagedFrame<'a> {
    /// Sequence number.
    pub seq: u64,
    /// The frame's stored (and verified) XXH3 checksum.
    pub checksum: u64,
    /// What the frame says.
    pub body: FrameBody<'a>,
}

impl StagingReader {
    /// The log's durable sequence number, read without the log's lock (for status reports
    /// while a session holds the log).
    pub fn durable_seq(&self) -> u64 {
        self.shared.durable_seq.load(Ordering::Acquire)
    }

    /// Bytes the log's segments take on disk, read without the log's lock (the durable
    /// length of the segment being appended to, plus the sealed ones).
    pub fn used_bytes(&self) -> u64 {
        self.shared.segments().iter().map(|s| s.len_bytes).sum()
    }

    /// Sequence number of the next frame this reader returns.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Publishes that every frame up to `seq` is applied and durable on the replicas; the log
    /// reclaims up to it at its next commit (the reader's side needs no access to the log).
    pub fn set_applied(&self, seq: u64) {
        self.shared.applied_seq.fetch_max(seq, Ordering::AcqRel);
    }

    /// The handoff of decompressed payloads from ingest (shared with the log).
    pub fn handoff(&self) -> Arc<PayloadHandoff> {
        self.shared.handoff.clone()
    }

    /// The handle that waits for this log's next commit, or wakes the waiter.
    pub fn waker(&self) -> StagingWaker {
        StagingWaker(self.shared.clone())
    }

    /// Moves the reader so that the next frame it returns is `seq`.
    pub fn seek(&mut self, seq: u64) {
        self.next_seq = seq;
        self.current = None;
    }

    /// Opens `segment` positioned at `next_seq`, skipping earlier frames by their headers.
    fn open_at(
        &self,
        segment: Segment,
    ) -> Result<(Segment, Arc<dyn DurableFile>, u64), StagingError> {
        let file = self
            .dir
            .open(&segment.name, false)
            .map_err(io_err(format!("opening {}", segment.name)))?;
        let mut offset = self.header_len_bytes;
        for seq in segment.first_seq..self.next_seq {
            let mut raw = [0u8; FRAME_HEADER_BYTES];
            file.read_exact_at(offset, &mut raw)
                .map_err(io_err(format!("reading {}", segment.name)))?;
            let payload = check_frame_prefix(&raw).map_err(|reason| StagingError::Corrupt {
                segment: segment.name.clone(),
                seq,
                offset_bytes: offset,
                reason,
            })?;
            offset += FRAME_HEADER_BYTES as u64 + u64::from(payload);
        }
        Ok((segment, file, offset))
    }

    /// Looks ahead without moving the reader: the extents (disk, offset, length) written by the
    /// next durable frames, from their headers only, up to `max_frames` frames or a bookmark
    /// (included in the count). Returns the number of frames covered and whether the last one
    /// is a bookmark. Checksums are verified when the frames are read with
    /// [`next_frame`](Self::next_frame); a defect found here just ends the look-ahead early.
    pub fn peek_extents(
        &mut self,
        max_frames: usize,
        out: &mut Vec<(u16, u64, u64)>,
    ) -> Result<(u64, bool), StagingError> {
        out.clear();
        let durable = self.shared.durable_seq.load(Ordering::Acquire);
        let mut seq = self.next_seq;
        let mut frames = 0u64;
        let mut cursor: Option<(Segment, Arc<dyn DurableFile>, u64)> = None;
        while seq <= durable && (frames as usize) < max_frames {
            let holding = self
                .shared
                .segments()
                .iter()
                .find(|s| s.first_seq <= seq && seq <= s.last_seq)
                .cloned();
            let Some(holding) = holding else {
                break;
            };
            if cursor.as_ref().is_none_or(|c| c.0.name != holding.name) {
                let saved = self.next_seq;
                self.next_seq = seq;
                let opened = self.open_at(holding);
                self.next_seq = saved;
                cursor = Some(opened?);
            }
            let Some((segment, file, offset)) = cursor.as_mut() else {
                break;
            };
            let mut raw = [0u8; FRAME_HEADER_BYTES];
            file.read_exact_at(*offset, &mut raw)
                .map_err(io_err(format!("reading {}", segment.name)))?;
            let Ok(header) = decode_frame_header(&raw) else {
                break;
            };
            if header.seq != seq {
                break;
            }
            *offset += FRAME_HEADER_BYTES as u64 + u64::from(header.payload_len_bytes);
            seq += 1;
            frames += 1;
            match header.kind {
                FrameKind::Write | FrameKind::ResyncBlock | FrameKind::ZeroRange => {
                    out.push((header.disk_index, header.offset_bytes, header.length_bytes));
                }
                FrameKind::Bookmark => return Ok((frames, true)),
                FrameKind::End => {}
            }
        }
        Ok((frames, false))
    }

    /// The next durable frame, or `None` when every durable frame has been read.
    pub fn next_frame(&mut self) -> Result<Option<StagedFrame<'_>>, StagingError> {
        let durable = self.shared.durable_seq.load(Ordering::Acquire);
        if self.next_seq > durable {
            return Ok(None);
        }
        // Stay on the current segment while it holds next_seq; else open the one that does.
        let next_seq = self.next_seq;
        let holding = self
            .shared
            .segments()
            .iter()
            .find(|s| s.first_seq <= next_seq && next_seq <= s.last_seq)
            .cloned();
        let Some(holding) = holding else {
            return Ok(None);
        };
        let generation = self.shared.generation.load(Ordering::Acquire);
        if generation != self.generation
            || self
                .current
                .as_ref()
                .is_none_or(|c| c.0.name != holding.name)
        {
            self.current = Some(self.open_at(holding)?);
            self.generation = generation;
        }
        let Some((segment, file, offset)) = self.current.as_mut() else {
            return Ok(None);
        };
        let corrupt = |offset_bytes, reason| StagingError::Corrupt {
            segment: segment.name.clone(),
            seq: self.next_seq,
            offset_bytes,
            reason,
        };
        let mut raw = [0u8; FRAME_HEADER_BYTES];
        file.read_exact_at(*offset, &mut raw)
            .map_err(io_err(format!("reading {}", segment.name)))?;
        let payload_len = check_frame_prefix(&raw).map_err(|r| corrupt(*offset, r))? as usize;
        self.buf.resize(payload_len, 0);
        file.read_exact_at(*offset + FRAME_HEADER_BYTES as u64, &mut self.buf)
            .map_err(io_err(format!("reading {}", segment.name)))?;
        let stored = le_u64(&raw, 40);
        let computed = FrameHeader::compute_checksum(&raw[..40], &self.buf);
        if stored != computed {
            return Err(corrupt(
                *offset,
                DecodeErrorReason::ChecksumMismatch { stored, computed },
            ));
        }
        let header = decode_frame_header(&raw).map_err(|r| corrupt(*offset, r))?;
        if header.seq != self.next_seq {
            return Err(corrupt(
                *offset,
                DecodeErrorReason::SequenceGap {
                    expected: self.next_seq,
                    found: header.seq,
                },
            ));
        }
        let at = *offset;
        *offset += (FRAME_HEADER_BYTES + payload_len) as u64;
        let seq = self.next_seq;
        self.next_seq += 1;
        let body = validate_frame(&header, &self.buf, &self.disks).map_err(|reason| {
            StagingError::Corrupt {
                segment: segment.name.clone(),
                seq,
                offset_bytes: at,
                reason,
            }
        })?;
        Ok(Some(StagedFrame {
            seq,
            checksum: stored,
            body,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delta::{
        Consistency, DeltaEncoder, DiskGeometry, EncoderOptions, FrameKind, StreamHeader,
    };
    use crate::durable::{SimDir, StdDir};

    fn header() -> StreamHeader {
        StreamHeader {
            item_id: [3; 16],
            item_name: "vm-staging".into(),
            first_seq: 1,
            disks: vec![
                DiskGeometry {
                    size_bytes: 4 << 20,
                    block_size_bytes: 4096,
                },
                DiskGeometry {
                    size_bytes: 4 << 20,
                    block_size_bytes: 512,
                },
            ],
        }
    }

    /// `count` frames' wire bytes (writes of varied sizes, zero ranges, bookmarks).
    fn frames(count: u64, seed: u8) -> Vec<Vec<u8>> {
        let mut encoder =
            DeltaEncoder::new(Vec::new(), &header(), EncoderOptions::default()).unwrap();
        for i in 0..count {
            let len = 4096 * (1 + (i as usize * 7 + usize::from(seed)) % 9);
            match i % 10 {
                9 => encoder.bookmark(Consistency::Crash, i, i, "b").map(|_| ()),
                7 => encoder.zero_range(1, 512 * i, 1024).map(|_| ()),
                _ => {
                    let mut state = u64::from(seed) << 32 | i | 1;
                    let data: Vec<u8> = (0..len)
                        .map(|_| {
                            state ^= state << 13;
                            state ^= state >> 7;
                            state ^= state << 17;
                            state as u8
                        })
                        .collect();
                    encoder.write((i % 2) as u16, 4096 * i, &data).map(|_| ())
                }
            }
            .unwrap();
        }
        let bytes = encoder.into_inner();
        let mut decoder = crate::delta::DeltaDecoder::new(bytes.as_slice()).unwrap();
        let mut out = Vec::new();
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => out.push(frame.wire_bytes.to_vec()),
                Ok(None) => break,
                Err(e) => {
                    assert!(matches!(e.reason, DecodeErrorReason::Truncated { .. }));
                    break;
                }
            }
        }
        assert_eq!(out.len() as u64, count);
        out
    }

    /// Small segments and a small in-memory batch, so every test also crosses segment rolls
    /// and writes before commit.
    fn config() -> StagingConfig {
        StagingConfig {
            capacity_bytes: 64 << 20,
            segment_target_bytes: 96 << 10,
            batch_write_bytes: 40 << 10,
            ..StagingConfig::default()
        }
    }

    /// Reads every durable frame from `from_seq` and returns (seq, re-encoded wire bytes).
    fn read_all(log: &StagingLog, from_seq: u64) -> Vec<(u64, FrameKind)> {
        let mut reader = log.reader(from_seq);
        let mut out = Vec::new();
        while let Some(frame) = reader.next_frame().unwrap() {
            let kind = match frame.body {
                FrameBody::Write(_) => FrameKind::Write,
                FrameBody::ZeroRange { .. } => FrameKind::ZeroRange,
                FrameBody::Bookmark(_) => FrameKind::Bookmark,
                FrameBody::ResyncBlock(_) => FrameKind::ResyncBlock,
                FrameBody::End => FrameKind::End,
            };
            out.push((frame.seq, kind));
        }
        out
    }

    /// The wire bytes of every frame in the durable segments, by seq (straight from the files).
    fn staged_bytes(dir: &SimDir) -> Vec<(u64, Vec<u8>)> {
        let mut out = Vec::new();
        for (name, bytes) in dir.durable_image() {
            if parse_segment_name(&name).is_none() {
                continue;
            }
            let mut decoder = crate::delta::DeltaDecoder::new(bytes.as_slice()).unwrap();
            while let Ok(Some(frame)) = decoder.next_frame() {
                out.push((frame.seq, frame.wire_bytes.to_vec()));
            }
        }
        out.sort();
        out
    }

    /// The scripted run: batches of appends, each committed; a reclaim now and then.
    /// Returns the highest acknowledged seq (a commit that returned Ok).
    fn scripted_run(dir: SimDir, wire: &[Vec<u8>]) -> u64 {
        let now = Instant::now();
        let Ok((mut log, _)) = StagingLog::open(Arc::new(dir), header(), config()) else {
            return 0;
        };
        let mut acked = 0;
        let mut seq = 1u64;
        for (batch, chunk) in wire.chunks(5).enumerate() {
            for bytes in chunk {
                if log.append(seq, bytes, now).is_err() {
                    return acked;
                }
                seq += 1;
            }
            match log.commit() {
                Ok(durable) => acked = durable,
                Err(_) => return acked,
            }
            if batch % 4 == 3 && log.reclaim(acked / 2).is_err() {
                return acked;
            }
        }
        acked
    }

    #[test]
    fn staging_append_commit_read_round_trips_across_segments() {
        let wire = frames(60, 1);
        let dir = SimDir::new();
        let (mut log, report) =
            StagingLog::open(Arc::new(dir.clone()), header(), config()).unwrap();
        assert_eq!(report.frames, 0);
        for (i, bytes) in wire.iter().enumerate() {
            log.append(i as u64 + 1, bytes, Instant::now()).unwrap();
        }
        assert_eq!(log.durable_seq(), 0, "nothing is durable before commit");
        assert_eq!(read_all(&log, 1), vec![]);
        assert_eq!(log.commit().unwrap(), 60);
        let read = read_all(&log, 1);
        assert_eq!(read.len(), 60);
        assert!(
            read.iter()
                .enumerate()
                .all(|(i, (seq, _))| *seq == i as u64 + 1)
        );
        assert_eq!(read_all(&log, 37).first().map(|r| r.0), Some(37));
        let staged = staged_bytes(&dir);
        assert!(
            staged
                .iter()
                .all(|(seq, bytes)| wire[*seq as usize - 1] == *bytes)
        );
        assert!(
            dir.durable_image().len() > 3,
            "the 96 KiB segment target must have rolled over"
        );
    }

    #[test]
    fn staging_batch_in_memory_stays_bounded_and_only_commit_makes_frames_durable() {
        let wire = frames(120, 5);
        let config = StagingConfig {
            segment_target_bytes: 64 << 20,
            ..config()
        };
        let total: usize = wire.iter().map(Vec::len).sum();
        assert!(total > 10 * config.batch_write_bytes, "{total}");
        let dir = SimDir::new();
        let (mut log, _) = StagingLog::open(Arc::new(dir.clone()), header(), config).unwrap();
        for (i, bytes) in wire.iter().enumerate() {
            log.append(i as u64 + 1, bytes, Instant::now()).unwrap();
            assert!(log.batch.len() <= config.batch_write_bytes.max(bytes.len()));
        }
        let header_bytes = header().encoded_len_bytes() as u64;
        assert_eq!(log.used_bytes(), total as u64 + header_bytes);
        assert_eq!(log.durable_seq(), 0, "written is not durable");
        assert_eq!(read_all(&log, 1), vec![]);
        assert_eq!(log.commit().unwrap(), 120);
        assert_eq!(read_all(&log, 1).len(), 120);
        let staged = staged_bytes(&dir);
        assert_eq!(staged.len(), 120);
        assert!(
            staged
                .iter()
                .all(|(seq, bytes)| wire[*seq as usize - 1] == *bytes)
        );
    }

    #[test]
    fn staging_append_out_of_order_is_refused_and_changes_nothing() {
        let wire = frames(3, 2);
        let (mut log, _) = StagingLog::open(Arc::new(SimDir::new()), header(), config()).unwrap();
        log.append(1, &wire[0], Instant::now()).unwrap();
        let err = log.append(3, &wire[2], Instant::now()).unwrap_err();
        assert!(
            matches!(
                err,
                StagingError::OutOfOrder {
                    expected: 2,
                    found: 3
                }
            ),
            "{err}"
        );
        assert_eq!(log.commit().unwrap(), 1);
        assert_eq!(read_all(&log, 1).len(), 1);
    }

    #[test]
    fn staging_crash_at_every_flush_point_keeps_every_acknowledged_frame() {
        let wire = frames(80, 3);
        // Dry run: count the flush points of the script.
        let dry = SimDir::new();
        let full_ack = scripted_run(dry.clone(), &wire);
        assert_eq!(full_ack, 80);
        let flush_points = dry.sync_count();
        assert!(flush_points > 20, "{flush_points}");
        for crash_at in 0..flush_points {
            for tear in [None, Some(crash_at * 31 + 7)] {
                let dir = SimDir::new();
                dir.crash_at_sync(crash_at, tear);
                let acked = scripted_run(dir.clone(), &wire);
                let image = dir.crash_image().expect("the run reached the crash point");
                let recovered = SimDir::from_image(image);
                let (mut log, report) =
                    StagingLog::open(Arc::new(recovered.clone()), header(), config())
                        .unwrap_or_else(|e| panic!("crash at {crash_at} tear {tear:?}: {e}"));
                let ctx = format!("crash at flush {crash_at}, tear {tear:?}, acked {acked}");
                assert!(report.corruption.is_none(), "{ctx}: {report:?}");
                assert!(
                    log.durable_seq() >= acked,
                    "{ctx}: durable {}",
                    log.durable_seq()
                );
                // Every frame still staged is byte-identical to what was sent, and every
                // acknowledged frame not yet reclaimed (seq > acked/2 at the last reclaim)
                // is among them.
                let staged = staged_bytes(&recovered);
                for (seq, bytes) in &staged {
                    assert_eq!(&wire[*seq as usize - 1], bytes, "{ctx}: seq {seq} differs");
                }
                let first = staged.first().map_or(log.next_seq(), |s| s.0);
                let seqs: Vec<u64> = staged.iter().map(|s| s.0).collect();
                let expected: Vec<u64> = (first..log.next_seq()).collect();
                assert_eq!(seqs, expected, "{ctx}: staged frames are contiguous");
                assert!(
                    first <= acked / 2 + 1 || acked == 0,
                    "{ctx}: first staged {first}"
                );
                // The log goes on from where it stopped.
                let next = log.next_seq();
                if next <= 80 {
                    log.append(next, &wire[next as usize - 1], Instant::now())
                        .unwrap();
                    assert_eq!(log.commit().unwrap(), next, "{ctx}");
                }
            }
        }
    }

    #[test]
    fn staging_torn_tail_is_cut_and_frames_before_it_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let wire = frames(10, 4);
        {
            let dir = Arc::new(StdDir::open(tmp.path()).unwrap());
            let (mut log, _) = StagingLog::open(dir, header(), config()).unwrap();
            for (i, bytes) in wire.iter().enumerate() {
                log.append(i as u64 + 1, bytes, Instant::now()).unwrap();
            }
            log.commit().unwrap();
        }
        // Half of an 11th frame, as a crash mid-write leaves it.
        let last = StdDir::open(tmp.path())
            .unwrap()
            .list()
            .unwrap()
            .pop()
            .unwrap();
        let name = tmp.path().join(last);
        let mut bytes = std::fs::read(&name).unwrap();
        let good_len = bytes.len() as u64;
        bytes.extend_from_slice(&wire[3][..100]);
        std::fs::write(&name, &bytes).unwrap();
        let dir = Arc::new(StdDir::open(tmp.path()).unwrap());
        let (log, report) = StagingLog::open(dir, header(), config()).unwrap();
        assert_eq!(report.torn_tail_bytes, 100);
        assert_eq!(report.frames, 10);
        assert!(report.corruption.is_none());
        assert_eq!(std::fs::metadata(&name).unwrap().len(), good_len);
        assert_eq!(log.next_seq(), 11);
        assert_eq!(read_all(&log, 1).len(), 10);
    }

    #[test]
    fn staging_damage_before_the_tail_keeps_prefix_and_requires_resync() {
        let dir = SimDir::new();
        let wire = frames(40, 5);
        let (mut log, _) = StagingLog::open(Arc::new(dir.clone()), header(), config()).unwrap();
        for (i, bytes) in wire.iter().enumerate() {
            log.append(i as u64 + 1, bytes, Instant::now()).unwrap();
            log.commit().unwrap();
        }
        drop(log);
        let mut image = dir.durable_image();
        let first = image.get_mut(&segment_name(1)).unwrap();
        let at = first.len() / 2;
        first[at] ^= 0x10; // bit rot inside a sealed segment
        let recovered = SimDir::from_image(image);
        let (mut log, report) =
            StagingLog::open(Arc::new(recovered.clone()), header(), config()).unwrap();
        let corruption = report.corruption.expect("damage must be reported");
        assert!(corruption.contains("checksum mismatch"), "{corruption}");
        assert!(log.resync_required().is_some());
        let err = log
            .append(log.next_seq(), &wire[0], Instant::now())
            .unwrap_err();
        assert!(matches!(err, StagingError::ResyncRequired { .. }), "{err}");
        // Frames before the damage are still there and exact.
        for (seq, bytes) in staged_bytes(&recovered) {
            assert_eq!(wire[seq as usize - 1], bytes);
        }
        // The marker survives a restart.
        let (log, _) = StagingLog::open(Arc::new(recovered), header(), config()).unwrap();
        assert!(log.resync_required().is_some());
    }

    #[test]
    fn staging_full_refuses_then_requires_resync_after_timeout_and_resync_clears() {
        let wire = frames(30, 6);
        let config = StagingConfig {
            capacity_bytes: 200 << 10,
            segment_target_bytes: 64 << 10,
            full_timeout: Duration::from_secs(30),
            ..StagingConfig::default()
        };
        let dir = SimDir::new();
        let (mut log, _) = StagingLog::open(Arc::new(dir.clone()), header(), config).unwrap();
        let t0 = Instant::now();
        let mut seq = 1;
        let mut saw_pressure = false;
        let full = loop {
            match log.append(seq, &wire[seq as usize - 1], t0) {
                Ok(()) => {
                    log.commit().unwrap();
                    saw_pressure |= matches!(log.pressure(), Pressure::Slow(_));
                    seq += 1;
                }
                Err(e) => break e,
            }
        };
        assert!(matches!(full, StagingError::Full { .. }), "{full}");
        assert!(saw_pressure, "acks must slow down before the log is full");
        assert!(log.used_bytes() <= config.capacity_bytes);
        let durable = log.durable_seq();
        // Still full 10 s later: still refused, still only Full.
        let later = log.append(seq, &wire[seq as usize - 1], t0 + Duration::from_secs(10));
        assert!(matches!(later, Err(StagingError::Full { .. })));
        // Past the timeout: resync required, recorded durably; nothing staged was lost.
        let err = log
            .append(seq, &wire[seq as usize - 1], t0 + Duration::from_secs(31))
            .unwrap_err();
        assert!(matches!(err, StagingError::ResyncRequired { .. }), "{err}");
        assert_eq!(log.durable_seq(), durable);
        let (mut log, _) = StagingLog::open(Arc::new(dir.clone()), header(), config).unwrap();
        assert!(log.resync_required().unwrap().contains("stayed full"));
        log.resync_done(1000).unwrap();
        assert!(log.resync_required().is_none());
        assert_eq!(log.next_seq(), 1000);
        assert!(!dir.durable_image().contains_key(RESYNC_MARKER));
    }

    #[test]
    fn staging_commit_reclaims_what_the_reader_side_published_as_applied() {
        let wire = frames(60, 9);
        let (mut log, _) = StagingLog::open(Arc::new(SimDir::new()), header(), config()).unwrap();
        let reader = log.reader(1);
        for (i, bytes) in wire.iter().take(40).enumerate() {
            log.append(i as u64 + 1, bytes, Instant::now()).unwrap();
        }
        log.commit().unwrap();
        let before = log.used_bytes();
        reader.set_applied(30);
        log.append(41, &wire[40], Instant::now()).unwrap();
        log.commit().unwrap();
        assert!(
            log.used_bytes() < before + wire[40].len() as u64,
            "applied segments freed"
        );
        assert_eq!(
            read_all(&log, 31).len(),
            11,
            "frames after the applied seq stay readable"
        );
    }

    #[test]
    fn staging_reclaim_frees_only_applied_sealed_segments() {
        let wire = frames(60, 7);
        let (mut log, _) = StagingLog::open(Arc::new(SimDir::new()), header(), config()).unwrap();
        for (i, bytes) in wire.iter().enumerate() {
            log.append(i as u64 + 1, bytes, Instant::now()).unwrap();
        }
        log.commit().unwrap();
        let before = log.used_bytes();
        assert_eq!(log.reclaim(0).unwrap(), 0);
        let freed = log.reclaim(30).unwrap();
        assert!(freed > 0);
        assert_eq!(log.used_bytes(), before - freed);
        let read = read_all(&log, 31);
        assert_eq!(
            read.len(),
            30,
            "every frame after the applied seq stays readable"
        );
        let freed_all = log.reclaim(60).unwrap();
        assert!(
            log.used_bytes() > 0,
            "the active segment is never reclaimed"
        );
        assert!(freed_all > 0);
    }

    #[test]
    fn staging_failed_flush_fails_the_log_until_reopened() {
        let dir = SimDir::new();
        let wire = frames(4, 8);
        let (mut log, _) = StagingLog::open(Arc::new(dir.clone()), header(), config()).unwrap();
        log.append(1, &wire[0], Instant::now()).unwrap();
        log.commit().unwrap();
        log.append(2, &wire[1], Instant::now()).unwrap();
        dir.fail_sync_at(dir.sync_count());
        assert!(matches!(log.commit(), Err(StagingError::Io { .. })));
        assert_eq!(log.durable_seq(), 1, "a failed flush acknowledges nothing");
        assert!(matches!(
            log.append(3, &wire[2], Instant::now()),
            Err(StagingError::Failed)
        ));
        assert!(matches!(log.commit(), Err(StagingError::Failed)));
    }

    #[test]
    fn staging_of_another_item_is_refused() {
        let dir = SimDir::new();
        StagingLog::open(Arc::new(dir.clone()), header(), config()).unwrap();
        let mut other = header();
        other.item_id = [9; 16];
        let err = StagingLog::open(Arc::new(dir), other, config()).unwrap_err();
        assert!(matches!(err, StagingError::WrongItem { .. }), "{err}");
    }
}
