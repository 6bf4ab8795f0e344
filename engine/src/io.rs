//! The replica-disk I/O seam: owned aligned buffers and a completion-based engine trait with
//! three backends.
//!
//! The apply pipeline drives one [`IoEngine`] per worker thread, over many replica files. It
//! never waits on a single op: it submits ops tagged with a `u64`, kicks them to the device,
//! and reaps completions in whatever order they finish.
//!
//! ```text
//!  network / zstd thread             worker (ring) thread
//!  ─────────────────────             ─────────────────────────────────────────────────────
//!  pool.take() ─► IoBuf ─(channel)─► submit(IoOp::Write{file, offset_bytes, buf}, tag)
//!       ▲           fill                  │  Err(Rejected{op, reason}) ◄─ queue full,
//!       │                                 │      misaligned, unknown file: op comes back
//!       │                                 ▼
//!       │                              kick() ──► kernel / simulator
//!       │                                 │
//!       │                              reap(&mut out, min_count)
//!       │                                 ▼
//!       └──── drop(buf) ◄── Completion { tag, buf: Some(IoBuf), result: io::Result<u32> }
//! ```
//!
//! Modules:
//! - [`buf`]: [`BufPool`] / [`IoBuf`], page-aligned buffers sliced from ≤ 1 GiB anonymous
//!   arenas; no allocation per I/O; the pool's capacity is the back-pressure.
//! - [`file`]: [`ReplicaFile`], opening replicas with `O_DIRECT` and learning their alignment.
//! - [`uring`]: [`UringEngine`], io_uring with registered arenas and files.
//! - [`sync_file`]: [`SyncFileEngine`], pread/pwrite/fdatasync, completing inside `kick`: the
//!   reference semantics and the fallback when io_uring is unavailable.
//! - [`sim`]: [`SimEngine`] over a [`SimDiskSet`], in-memory, seeded, fault-injecting, with a
//!   crash model (live vs durable image) for tests and `disk-sim`.
//!
//! Contract every backend keeps (the suite in `engine/tests/io_backends.rs` checks it):
//! - an op moves its [`IoBuf`] in; the buffer comes back in its [`Completion`], on success and
//!   on error alike. `Flush` and `WriteZeroes` carry no buffer;
//! - at most `queue_depth` ops are in flight (submitted and not yet returned by `reap`); one
//!   more is [`Rejected`] with [`RejectReason::QueueFull`] and the op given back. Ops that are
//!   misaligned, empty, out of range or name an unknown file are rejected the same way, before
//!   any I/O;
//! - `Read` and `Write` complete with the number of bytes transferred. A `Write` transfers all
//!   of `buf.len_bytes()` or fails (short writes are resubmitted). A `Read` transfers all of it
//!   unless it reaches end of file, in which case the count is smaller and `buf.len_bytes()` is
//!   set to it. `Flush` and `WriteZeroes` complete with `Ok(0)`;
//! - `Flush{file}` is fdatasync of that file: it completes only after every write to that file
//!   that *completed* before the flush was submitted is durable. Writes still in flight when it
//!   is submitted are not covered: to order "data, then flush", reap the writes first. A failed
//!   flush means the data may be lost; never retry it and assume earlier writes are durable;
//! - `reap` also submits ops not yet kicked (as `io_uring_enter` does), and waits for at most as
//!   many completions as there are ops in flight, so it cannot block forever;
//! - no `unwrap`/`panic` on kernel results: every failure is a completion error or an
//!   `io::Error` from `kick`/`reap`.

pub mod buf;
pub mod file;
pub mod sim;
pub mod sync_file;
pub mod uring;

use std::fmt;
use std::io;

pub use buf::{BufPool, BufPoolConfig, BufPoolError, IoBuf};
pub use file::{DirectIo, OpenError, ReplicaFile};
pub use sim::{CrashMode, SimDiskSet, SimEngine, SimEngineConfig, SimFaultPlan, SimFileConfig};
pub use sync_file::SyncFileEngine;
pub use uring::{UringConfig, UringEngine};

/// Default number of ops one engine keeps in flight.
pub const DEFAULT_QUEUE_DEPTH: usize = 64;
/// Upper bound of any engine's queue depth.
pub const MAX_QUEUE_DEPTH: usize = 4096;

/// A file registered with one engine (index into that engine's file table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileId(u32);

impl FileId {
    /// The index in the engine's file table.
    pub fn index(self) -> u32 {
        self.0
    }

    /// The id with this index. Engines hand out ids from `add_file`; building one by hand
    /// is for tests and tools (an id an engine does not know is rejected with `UnknownFile`).
    pub fn from_index(index: u32) -> Self {
        Self(index)
    }

    pub(crate) fn from_usize(index: usize) -> Self {
        // Engines cap their file tables far below u32::MAX.
        Self(u32::try_from(index).unwrap_or(u32::MAX))
    }
}

/// One replica-disk operation. Buffers move in and come back in the [`Completion`].
#[derive(Debug)]
pub enum IoOp {
    /// Read `buf.len_bytes()` bytes at `offset_bytes` into `buf`.
    Read {
        /// Target file.
        file: FileId,
        /// Byte offset, aligned.
        offset_bytes: u64,
        /// Destination; `len_bytes` is how much to read.
        buf: IoBuf,
    },
    /// Write `buf.as_slice()` at `offset_bytes`.
    Write {
        /// Target file.
        file: FileId,
        /// Byte offset, aligned.
        offset_bytes: u64,
        /// Source; `len_bytes` is how much to write.
        buf: IoBuf,
    },
    /// Make `[offset_bytes, offset_bytes + len_bytes)` read as zeros
    /// (`fallocate(FALLOC_FL_ZERO_RANGE)`, or written zeros where that is refused).
    WriteZeroes {
        /// Target file.
        file: FileId,
        /// Byte offset, aligned.
        offset_bytes: u64,
        /// Length, aligned, non-zero.
        len_bytes: u64,
    },
    /// fdatasync of `file`: durable are all writes to it completed before this was submitted.
    Flush {
        /// Target file.
        file: FileId,
    },
}

impl IoOp {
    /// The file the op targets.
    pub fn file(&self) -> FileId {
        match self {
            IoOp::Read { file, .. }
            | IoOp::Write { file, .. }
            | IoOp::WriteZeroes { file, .. }
            | IoOp::Flush { file } => *file,
        }
    }

    /// The buffer the op carries, if any.
    pub fn buf(&self) -> Option<&IoBuf> {
        match self {
            IoOp::Read { buf, .. } | IoOp::Write { buf, .. } => Some(buf),
            IoOp::WriteZeroes { .. } | IoOp::Flush { .. } => None,
        }
    }

    /// Takes the buffer back out of the op.
    pub fn into_buf(self) -> Option<IoBuf> {
        match self {
            IoOp::Read { buf, .. } | IoOp::Write { buf, .. } => Some(buf),
            IoOp::WriteZeroes { .. } | IoOp::Flush { .. } => None,
        }
    }

    /// Short name for messages.
    pub fn kind_name(&self) -> &'static str {
        match self {
            IoOp::Read { .. } => "read",
            IoOp::Write { .. } => "write",
            IoOp::WriteZeroes { .. } => "write-zeroes",
            IoOp::Flush { .. } => "flush",
        }
    }
}

/// A finished op.
#[derive(Debug)]
pub struct Completion {
    /// The tag given to `submit`.
    pub tag: u64,
    /// The op's buffer, back to the caller (`None` for `Flush` and `WriteZeroes`).
    pub buf: Option<IoBuf>,
    /// Bytes transferred (see the module docs), or the error.
    pub result: io::Result<u32>,
}

/// Why `submit` refused an op.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RejectReason {
    /// `queue_depth` ops are already in flight; reap some and retry.
    QueueFull,
    /// Offset or length is not a multiple of the file's alignment.
    Misaligned,
    /// Zero-length read, write or write-zeroes.
    EmptyLength,
    /// `offset_bytes + len_bytes` overflows the file offset type.
    OutOfRange,
    /// The `FileId` is not registered with this engine.
    UnknownFile,
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RejectReason::QueueFull => "queue full",
            RejectReason::Misaligned => "offset or length not aligned to the file's block size",
            RejectReason::EmptyLength => "zero-length op",
            RejectReason::OutOfRange => "offset + length out of range",
            RejectReason::UnknownFile => "unknown file id",
        })
    }
}

/// A refused op, given back whole so the caller can retry it or fail it.
#[derive(Debug, thiserror::Error)]
#[error("{} op rejected: {reason}", op.kind_name())]
pub struct Rejected {
    /// The op, untouched.
    pub op: IoOp,
    /// Why.
    pub reason: RejectReason,
}

/// A completion-based replica I/O engine. One instance per worker thread, many files.
///
/// The trait is dyn-compatible for a fixed `File` type, e.g.
/// `Box<dyn IoEngine<File = ReplicaFile>>` for the OS backends.
pub trait IoEngine: Send {
    /// What [`add_file`](Self::add_file) takes: [`ReplicaFile`] for the OS backends, a sim
    /// file name for [`SimEngine`].
    type File;

    /// `"uring"`, `"sync_file"` or `"sim"`.
    fn backend_name(&self) -> &'static str;

    /// Registers a file; ops name it by the returned id from then on.
    fn add_file(&mut self, file: Self::File) -> io::Result<FileId>;

    /// Alignment of offsets and lengths of ops on `file`, or `None` for an unknown id.
    fn alignment_bytes(&self, file: FileId) -> Option<u32>;

    /// The maximum number of ops in flight.
    fn queue_depth(&self) -> usize;

    /// Queues an op. Never blocks and never does I/O; a refused op comes back in [`Rejected`].
    fn submit(&mut self, op: IoOp, tag: u64) -> Result<(), Rejected>;

    /// Hands queued ops to the kernel or simulator. Returns how many were handed over.
    fn kick(&mut self) -> io::Result<usize>;

    /// Appends finished ops to `out`, waiting until at least `min_count` have been appended by
    /// this call (capped at the number in flight). Returns the number appended.
    fn reap(&mut self, out: &mut Vec<Completion>, min_count: usize) -> io::Result<usize>;

    /// Ops submitted and not yet returned by `reap`.
    fn in_flight_count(&self) -> usize;
}

/// A boxed engine is an engine, so generic code (`ApplyPipeline<E: IoEngine>`) also accepts
/// the `Box<dyn IoEngine<File = ReplicaFile>>` that [`open_os_engine`] returns.
impl<E: IoEngine + ?Sized> IoEngine for Box<E> {
    type File = E::File;

    fn backend_name(&self) -> &'static str {
        (**self).backend_name()
    }

    fn add_file(&mut self, file: Self::File) -> io::Result<FileId> {
        (**self).add_file(file)
    }

    fn alignment_bytes(&self, file: FileId) -> Option<u32> {
        (**self).alignment_bytes(file)
    }

    fn queue_depth(&self) -> usize {
        (**self).queue_depth()
    }

    fn submit(&mut self, op: IoOp, tag: u64) -> Result<(), Rejected> {
        (**self).submit(op, tag)
    }

    fn kick(&mut self) -> io::Result<usize> {
        (**self).kick()
    }

    fn reap(&mut self, out: &mut Vec<Completion>, min_count: usize) -> io::Result<usize> {
        (**self).reap(out, min_count)
    }

    fn in_flight_count(&self) -> usize {
        (**self).in_flight_count()
    }
}

/// Which OS backend to use, as decided by [`probe`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendChoice {
    /// io_uring works here.
    Uring,
    /// io_uring is unavailable; use [`SyncFileEngine`].
    SyncFile {
        /// Why io_uring cannot be used (for the start-up warning).
        reason: String,
    },
}

/// Finds out whether io_uring works here: sets up a small ring and runs a NOP through it.
/// Never panics; a seccomp filter (Docker's default profile), `io_uring_disabled` sysctl or an
/// old kernel all yield [`BackendChoice::SyncFile`] with the reason.
pub fn probe() -> BackendChoice {
    match uring::probe_nop() {
        Ok(()) => BackendChoice::Uring,
        Err(reason) => BackendChoice::SyncFile { reason },
    }
}

/// Builds the OS engine [`probe`] picks, logging a warning when it falls back to
/// [`SyncFileEngine`]. The pool is registered with the ring when io_uring is used.
pub fn open_os_engine(
    pool: &BufPool,
    queue_depth: usize,
) -> io::Result<(Box<dyn IoEngine<File = ReplicaFile>>, BackendChoice)> {
    let choice = probe();
    let engine: Box<dyn IoEngine<File = ReplicaFile>> = match &choice {
        BackendChoice::Uring => Box::new(UringEngine::new(
            Some(pool),
            UringConfig {
                queue_depth,
                ..UringConfig::default()
            },
        )?),
        BackendChoice::SyncFile { reason } => {
            tracing::warn!(%reason, "io_uring unavailable; using the pread/pwrite backend");
            Box::new(SyncFileEngine::new(queue_depth)?)
        }
    };
    Ok((engine, choice))
}

/// Length in bytes of what the op touches on disk (0 for a flush).
fn op_len_bytes(op: &IoOp) -> u64 {
    match op {
        IoOp::Read { buf, .. } | IoOp::Write { buf, .. } => buf.len_bytes() as u64,
        IoOp::WriteZeroes { len_bytes, .. } => *len_bytes,
        IoOp::Flush { .. } => 0,
    }
}

/// Shared submit-time checks: alignment, non-empty, range.
pub(crate) fn check_op(op: &IoOp, alignment_bytes: u32) -> Result<(), RejectReason> {
    let (offset_bytes, len_bytes) = match op {
        IoOp::Flush { .. } => return Ok(()),
        IoOp::Read { offset_bytes, .. }
        | IoOp::Write { offset_bytes, .. }
        | IoOp::WriteZeroes { offset_bytes, .. } => (*offset_bytes, op_len_bytes(op)),
    };
    if len_bytes == 0 {
        return Err(RejectReason::EmptyLength);
    }
    let align = u64::from(alignment_bytes.max(1));
    if !offset_bytes.is_multiple_of(align) || !len_bytes.is_multiple_of(align) {
        return Err(RejectReason::Misaligned);
    }
    match offset_bytes.checked_add(len_bytes) {
        Some(end) if end <= i64::MAX as u64 => Ok(()),
        _ => Err(RejectReason::OutOfRange),
    }
}

/// Checks a queue depth given to an engine constructor.
pub(crate) fn check_queue_depth(queue_depth: usize) -> io::Result<()> {
    if queue_depth == 0 || queue_depth > MAX_QUEUE_DEPTH {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("queue depth {queue_depth} not in 1..={MAX_QUEUE_DEPTH}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_op_rules() {
        let pool = BufPool::new(BufPoolConfig {
            buf_size_bytes: 8192,
            buf_count: 2,
            ..Default::default()
        })
        .unwrap();
        let file = FileId(0);
        let mut buf = pool.take().unwrap();
        buf.set_len_bytes(4096);
        let op = IoOp::Write {
            file,
            offset_bytes: 512,
            buf,
        };
        assert_eq!(check_op(&op, 512), Ok(()));
        assert_eq!(check_op(&op, 4096), Err(RejectReason::Misaligned));
        let zero = IoOp::WriteZeroes {
            file,
            offset_bytes: 0,
            len_bytes: 0,
        };
        assert_eq!(check_op(&zero, 512), Err(RejectReason::EmptyLength));
        let far = IoOp::WriteZeroes {
            file,
            offset_bytes: u64::MAX - 511,
            len_bytes: 4096,
        };
        assert_eq!(check_op(&far, 512), Err(RejectReason::OutOfRange));
        assert_eq!(check_op(&IoOp::Flush { file }, 4096), Ok(()));
    }

    #[test]
    fn probe_never_panics() {
        let choice = probe();
        eprintln!("io backend probe: {choice:?}");
    }
}
