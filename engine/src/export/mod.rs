//! Exports: what a block-device export of a recovery point reads and writes (no NBD here).
//!
//! ```text
//!   ExportDisk ──┬─ read-only:  PointView (replica + preserved grains, pinned)
//!                ├─ drill:      Overlay (the drill's writes) over a PointView
//!                └─ target:     a failover's target file (after copy_to_target or a restart)
//! ```
//!
//! - [`point`]: the one point reader (shared with materialize) and [`PointView`].
//! - [`overlay`]: a drill's writes: sparse data file + durable grain map, never the replica.
//! - [`disk`]: [`ExportDisk`], what the NBD adapter calls, and the copy-to-target switch.
//!
//! See `docs/design/recovery-points.md`, "Exports and overlays".

pub mod disk;
pub mod overlay;
pub mod point;

use std::fs::File;
use std::io;

pub use disk::ExportDisk;
pub use overlay::Overlay;
pub use point::{DiskReader, PointReadError, PointReader, PointView, ViewSource};

use crate::meta::MetaError;

/// One run of a disk's allocation (NBD's `base:allocation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length.
    pub length_bytes: u64,
    /// Not allocated.
    pub hole: bool,
    /// Reads as zeros.
    pub zero: bool,
}

/// Why an export refused or failed a request.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    /// A write to a read-only export.
    #[error("the export is read-only")]
    ReadOnly,
    /// A request outside the disk.
    #[error(
        "request of {length_bytes} bytes at byte {offset_bytes} is outside the disk of {size_bytes} bytes"
    )]
    OutOfRange {
        /// Offset.
        offset_bytes: u64,
        /// Length.
        length_bytes: u64,
        /// Disk size.
        size_bytes: u64,
    },
    /// The point cannot change: the export was written.
    #[error("cannot change the point: {written_bytes} bytes were written to the export ({why})")]
    HasWrites {
        /// Bytes written so far.
        written_bytes: u64,
        /// What was asked.
        why: &'static str,
    },
    /// The export was closed.
    #[error("the export is closed")]
    Closed,
    /// The point does not exist (pruned or never made).
    #[error("recovery point {point_id} does not exist (pruned or never made)")]
    NoSuchPoint {
        /// The point.
        point_id: u64,
    },
    /// Overlay files exist already (create) or do not match (open).
    #[error("overlay {stem}: {why}")]
    Overlay {
        /// The overlay's stem.
        stem: String,
        /// What is wrong.
        why: String,
    },
    /// A view of another size.
    #[error("the new view has {other_bytes} bytes, the export {size_bytes}")]
    SizeMismatch {
        /// The export's size.
        size_bytes: u64,
        /// The other view's.
        other_bytes: u64,
    },
    /// A copy to target is already running or done.
    #[error("the export is already copying or switched to its target")]
    Busy,
    /// The copy to target was cancelled ([`ExportDisk::cancel_copy`]: a change point).
    #[error("the copy to the target was cancelled")]
    Cancelled,
    /// An I/O error.
    #[error("{what}")]
    Io {
        /// What was done.
        what: String,
        /// Error.
        #[source]
        source: io::Error,
    },
    /// Reading the point failed.
    #[error(transparent)]
    Point(#[from] PointReadError),
    /// The metadata store failed.
    #[error(transparent)]
    Meta(#[from] MetaError),
}

impl ExportError {
    /// The `io::ErrorKind` an NBD server maps to an errno.
    pub fn io_kind(&self) -> io::ErrorKind {
        match self {
            Self::ReadOnly => io::ErrorKind::PermissionDenied,
            Self::OutOfRange { .. } => io::ErrorKind::InvalidInput,
            Self::HasWrites { .. } | Self::Busy | Self::Cancelled => io::ErrorKind::ResourceBusy,
            Self::Closed => io::ErrorKind::BrokenPipe,
            Self::NoSuchPoint { .. } => io::ErrorKind::NotFound,
            Self::Io { source, .. }
            | Self::Point(PointReadError::Replica { source, .. })
            | Self::Point(PointReadError::Preserved { source, .. }) => source.kind(),
            _ => io::ErrorKind::Other,
        }
    }

    /// An `Io` error maker; `what` becomes a `String` only on an error.
    pub(crate) fn io<W: Into<String>>(what: W) -> impl FnOnce(io::Error) -> Self {
        move |source| Self::Io {
            what: what.into(),
            source,
        }
    }

    /// An `Io` error maker for a hot path: "`what` at byte `offset_bytes`", formatted only
    /// on an error (nothing allocated per request).
    pub(crate) fn io_at(what: &'static str, offset_bytes: u64) -> impl FnOnce(io::Error) -> Self {
        move |source| Self::Io {
            what: format!("{what} at byte {offset_bytes}"),
            source,
        }
    }
}

/// Refuses a request that does not lie within `size_bytes`.
pub(crate) fn check_range(
    offset_bytes: u64,
    length_bytes: u64,
    size_bytes: u64,
) -> Result<(), ExportError> {
    match offset_bytes.checked_add(length_bytes) {
        Some(end) if end <= size_bytes => Ok(()),
        _ => Err(ExportError::OutOfRange {
            offset_bytes,
            length_bytes,
            size_bytes,
        }),
    }
}

/// Appends a run, merging it into the last one when of the same kind.
pub(crate) fn push_extent(out: &mut Vec<Extent>, length_bytes: u64, hole: bool) {
    if length_bytes == 0 {
        return;
    }
    if let Some(last) = out.last_mut()
        && last.hole == hole
    {
        last.length_bytes += length_bytes;
        return;
    }
    out.push(Extent {
        length_bytes,
        hole,
        zero: hole,
    });
}

/// Extents of `base` runs (start, end, hole) with the sorted, disjoint `data` runs
/// (start, end) turned into data; appended to `out`.
pub(crate) fn mark_data(base: &[(u64, u64, bool)], data: &[(u64, u64)], out: &mut Vec<Extent>) {
    let mut data = data.iter().copied().peekable();
    for &(start, stop, hole) in base {
        let mut at = start;
        while at < stop {
            if !hole {
                push_extent(out, stop - at, false);
                break;
            }
            while data.peek().is_some_and(|&(_, e)| e <= at) {
                data.next();
            }
            match data.peek() {
                Some(&(s, e)) if s < stop => {
                    let from = s.max(at);
                    push_extent(out, from - at, true);
                    let to = e.min(stop);
                    push_extent(out, to - from, false);
                    at = to;
                }
                _ => {
                    push_extent(out, stop - at, true);
                    at = stop;
                }
            }
        }
    }
}

/// The data and hole runs of `file` in `[start, end)`: (start, end, hole), in order.
pub(crate) fn file_extents(
    file: &File,
    start: u64,
    end: u64,
    out: &mut Vec<(u64, u64, bool)>,
) -> Result<(), ExportError> {
    use std::os::fd::AsRawFd;
    out.clear();
    let seek = |whence: libc::c_int, at: u64| -> io::Result<Option<u64>> {
        let at = i64::try_from(at).map_err(io::Error::other)?;
        // SAFETY: lseek on a descriptor we borrow; it changes only the file offset, which no
        // reader here uses (every read is positioned).
        let r = unsafe { libc::lseek(file.as_raw_fd(), at, whence) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENXIO) => Ok(None),
                _ => Err(e),
            };
        }
        Ok(Some(r as u64))
    };
    let mut at = start;
    while at < end {
        let data = match seek(libc::SEEK_DATA, at) {
            Ok(found) => found.unwrap_or(end).clamp(at, end),
            // No SEEK_DATA here (some devices): all of it is data.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                out.push((at, end, false));
                break;
            }
            Err(e) => return Err(ExportError::io("finding data (SEEK_DATA)")(e)),
        };
        if data > at {
            out.push((at, data, true));
            at = data;
            continue;
        }
        let hole = seek(libc::SEEK_HOLE, at)
            .map_err(ExportError::io("finding a hole (SEEK_HOLE)"))?
            .unwrap_or(end)
            .clamp(at, end);
        // A hole at `at` itself cannot follow SEEK_DATA == at; guard against no progress.
        let hole = if hole == at { end } else { hole };
        out.push((at, hole, false));
        at = hole;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
