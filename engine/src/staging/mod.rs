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
//!                                                   and wakes the reader (StagingWaker)
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
    DecodeErrorReason, DeltaDecoder, FRAME_HEADER_BYTES, FrameBody, FrameKind, FrameReader,
    FrameSource, StreamHeader, check_frame_prefix, decode_frame_header, validate_frame,
};
use crate::durable::{DurableDir, DurableFile};
use crate::handoff::PayloadHandoff;

mod log;
mod reader;
mod recover;

pub use reader::{StagedFrame, StagingReader};
use recover::create_segment;

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
    #[error("staging I/O on {what}")]
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

#[cfg(test)]
mod tests;
