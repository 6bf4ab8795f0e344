//! [`ExportDisk`]: one exported disk as the NBD adapter sees it (read-only point, drill over an
//! overlay, or a failover's target file), and the copy-to-target switch.
//!
//! Locks: `ExportDisk.state` guards only the current mode (an `Arc` cloned out per request,
//! swapped by rebase and the switch). `ExportDisk.chunks` (stripes by 1 MiB chunk) are held by
//! a write while it reads the mode and writes that chunk, and by the copy while it copies that
//! chunk (held across that I/O by design): so a write either lands before the copy reads its
//! chunk, or sees the copying mode and writes the target too.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::overlay::Overlay;
use super::point::PointView;
use super::{ExportError, Extent, check_range, file_extents, mark_data};

/// The chunk a copy reads and writes at once, and the unit of `ExportDisk.chunks`.
pub const COPY_CHUNK_BYTES: u64 = 1 << 20;
const CHUNK_STRIPES: usize = 64;

#[derive(Debug)]
enum Mode {
    ReadOnly(Arc<PointView>),
    Drill(Arc<PointView>, Overlay),
    Copying {
        view: Arc<PointView>,
        overlay: Option<Overlay>,
        target: Arc<File>,
    },
    Target(Arc<File>),
}

/// One exported disk; `Send + Sync`, called from many connection threads.
#[derive(Debug)]
pub struct ExportDisk {
    state: Mutex<Arc<Mode>>,
    chunks: Vec<Mutex<()>>,
    size_bytes: u64,
    writable: AtomicBool,
    written_bytes: AtomicU64,
    /// Bytes the overlay held when the export was made.
    overlay_bytes_at_start: u64,
    copying: AtomicBool,
    /// Set by [`ExportDisk::cancel_copy`]: the running copy stops at its next chunk.
    cancel: AtomicBool,
    closed: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Makes `[offset, offset+len)` of a file read zeros (a hole where possible).
fn zero_file(file: &File, offset_bytes: u64, len_bytes: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset_bytes), i64::try_from(len_bytes)) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    // SAFETY: fallocate on a descriptor borrowed for the call; no memory of ours is touched.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let error = io::Error::last_os_error();
    if error.raw_os_error() != Some(libc::EOPNOTSUPP) {
        return Err(error);
    }
    let zeros = &crate::durable::ZEROS;
    let mut at = offset_bytes;
    let end = offset_bytes.saturating_add(len_bytes);
    while at < end {
        let n = (end - at).min(zeros.len() as u64);
        file.write_all_at(&zeros[..n as usize], at)?;
        at += n;
    }
    Ok(())
}

impl ExportDisk {
    fn new(mode: Mode, size_bytes: u64, writable: bool, overlay_bytes_at_start: u64) -> Self {
        Self {
            state: Mutex::new(Arc::new(mode)),
            chunks: (0..CHUNK_STRIPES).map(|_| Mutex::new(())).collect(),
            size_bytes,
            writable: AtomicBool::new(writable),
            written_bytes: AtomicU64::new(0),
            overlay_bytes_at_start,
            copying: AtomicBool::new(false),
            cancel: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        }
    }

    /// A read-only export of a point.
    pub fn read_only(view: PointView) -> Self {
        let size = view.size_bytes();
        Self::new(Mode::ReadOnly(Arc::new(view)), size, false, 0)
    }

    /// A drill: reads the point under `overlay`, writes go to the overlay only.
    pub fn drill(view: PointView, overlay: Overlay) -> Self {
        let size = view.size_bytes();
        let before = overlay.written_bytes();
        Self::new(Mode::Drill(Arc::new(view), overlay), size, true, before)
    }

    /// A failover switched to its target file (after a restart).
    pub fn target(file: Arc<File>, size_bytes: u64) -> Self {
        Self::new(Mode::Target(file), size_bytes, true, 0)
    }

    fn mode(&self) -> Result<Arc<Mode>, ExportError> {
        if self.is_closed() {
            return Err(ExportError::Closed);
        }
        Ok(lock(&self.state).clone())
    }

    /// The disk's size.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// Whether writes are accepted.
    pub fn writable(&self) -> bool {
        self.writable.load(Ordering::Acquire)
    }

    /// The point read (None once switched to a target).
    pub fn point_id(&self) -> Option<u64> {
        match &*lock(&self.state).clone() {
            Mode::ReadOnly(view) | Mode::Drill(view, _) | Mode::Copying { view, .. } => {
                Some(view.point_id())
            }
            Mode::Target(_) => None,
        }
    }

    /// Bytes written, zeroed or trimmed since the export was made.
    pub fn written_bytes(&self) -> u64 {
        self.written_bytes.load(Ordering::Acquire)
    }

    /// Whether the disk differs from its point (writes now, or an overlay reopened with some).
    pub fn has_writes(&self) -> bool {
        self.written_bytes() > 0 || self.overlay_bytes_at_start > 0
    }

    fn read_mode(mode: &Mode, offset_bytes: u64, out: &mut [u8]) -> Result<(), ExportError> {
        match mode {
            Mode::ReadOnly(view)
            | Mode::Copying {
                view,
                overlay: None,
                ..
            } => view.read_at(offset_bytes, out),
            Mode::Drill(view, overlay)
            | Mode::Copying {
                view,
                overlay: Some(overlay),
                ..
            } => overlay.read_at(offset_bytes, out, &|at, buf| view.read_at(at, buf)),
            Mode::Target(file) => file
                .read_exact_at(out, offset_bytes)
                .map_err(ExportError::io_at("reading the target", offset_bytes)),
        }
    }

    /// Reads `out.len()` bytes at `offset_bytes`.
    pub fn read_at(&self, offset_bytes: u64, out: &mut [u8]) -> Result<(), ExportError> {
        check_range(offset_bytes, out.len() as u64, self.size_bytes)?;
        let mode = self.mode()?;
        Self::read_mode(&mode, offset_bytes, out)
    }

    /// A write (`Some`) or zeroing (`None`) of a checked range, chunk by chunk under the
    /// chunk's stripe lock.
    fn change(
        &self,
        offset_bytes: u64,
        length_bytes: u64,
        data: Option<&[u8]>,
        fua: bool,
    ) -> Result<(), ExportError> {
        check_range(offset_bytes, length_bytes, self.size_bytes)?;
        if self.is_closed() {
            return Err(ExportError::Closed);
        }
        if !self.writable() {
            return Err(ExportError::ReadOnly);
        }
        let end = offset_bytes + length_bytes;
        let mut at = offset_bytes;
        while at < end {
            let chunk = at / COPY_CHUNK_BYTES;
            let piece_end = ((chunk + 1) * COPY_CHUNK_BYTES).min(end);
            let piece =
                data.map(|d| &d[(at - offset_bytes) as usize..(piece_end - offset_bytes) as usize]);
            let _stripe = lock(&self.chunks[(chunk % CHUNK_STRIPES as u64) as usize]);
            let mode = self.mode()?;
            let len = piece_end - at;
            let (overlay_and_view, target) = match &*mode {
                Mode::ReadOnly(_)
                | Mode::Copying {
                    overlay: None,
                    target: _,
                    ..
                } => return Err(ExportError::ReadOnly),
                Mode::Drill(view, overlay) => (Some((view, overlay)), None),
                Mode::Copying {
                    view,
                    overlay: Some(overlay),
                    target,
                } => (Some((view, overlay)), Some(target)),
                Mode::Target(file) => (None, Some(file)),
            };
            if let Some((view, overlay)) = overlay_and_view {
                let base = |at: u64, buf: &mut [u8]| view.read_at(at, buf);
                match piece {
                    Some(p) => overlay.write_at(at, p, &base)?,
                    None => overlay.write_zeroes(at, len, &base)?,
                }
            }
            if let Some(file) = target {
                match piece {
                    Some(p) => file.write_all_at(p, at),
                    None => zero_file(file, at, len),
                }
                .map_err(ExportError::io_at("writing the target", at))?;
            }
            self.written_bytes.fetch_add(len, Ordering::AcqRel);
            at = piece_end;
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes `data` at `offset_bytes` (refused with [`ExportError::ReadOnly`] when
    /// read-only); with `fua`, durable before it returns.
    pub fn write_at(&self, offset_bytes: u64, data: &[u8], fua: bool) -> Result<(), ExportError> {
        self.change(offset_bytes, data.len() as u64, Some(data), fua)
    }

    /// Makes a range read zeros.
    pub fn write_zeroes(
        &self,
        offset_bytes: u64,
        length_bytes: u64,
        fua: bool,
    ) -> Result<(), ExportError> {
        self.change(offset_bytes, length_bytes, None, fua)
    }

    /// Discards a range: it reads zeros afterwards (never the point's data again).
    pub fn trim(&self, offset_bytes: u64, length_bytes: u64, fua: bool) -> Result<(), ExportError> {
        self.change(offset_bytes, length_bytes, None, fua)
    }

    /// Makes every completed write durable.
    pub fn flush(&self) -> Result<(), ExportError> {
        let mode = self.mode()?;
        match &*mode {
            Mode::ReadOnly(_) => Ok(()),
            Mode::Drill(_, overlay) => overlay.flush(),
            Mode::Copying {
                overlay, target, ..
            } => {
                if let Some(overlay) = overlay {
                    overlay.flush()?;
                }
                target
                    .sync_data()
                    .map_err(ExportError::io("syncing the target"))
            }
            Mode::Target(file) => file
                .sync_data()
                .map_err(ExportError::io("syncing the target")),
        }
    }

    /// Extents covering `[offset, offset+length)` in order (may stop early).
    pub fn extents(
        &self,
        offset_bytes: u64,
        length_bytes: u64,
        out: &mut Vec<Extent>,
    ) -> Result<(), ExportError> {
        check_range(offset_bytes, length_bytes, self.size_bytes)?;
        let mode = self.mode()?;
        match &*mode {
            Mode::ReadOnly(view)
            | Mode::Copying {
                view,
                overlay: None,
                ..
            } => view.extents(offset_bytes, length_bytes, out),
            Mode::Drill(view, overlay)
            | Mode::Copying {
                view,
                overlay: Some(overlay),
                ..
            } => {
                view.extents(offset_bytes, length_bytes, out)?;
                let mut base = Vec::with_capacity(out.len());
                let mut at = offset_bytes;
                for e in out.iter() {
                    base.push((at, at + e.length_bytes, e.hole));
                    at += e.length_bytes;
                }
                let mut runs = Vec::new();
                overlay.covered_runs(offset_bytes, at, &mut runs);
                out.clear();
                mark_data(&base, &runs, out);
                Ok(())
            }
            Mode::Target(file) => {
                out.clear();
                let mut runs = Vec::new();
                file_extents(file, offset_bytes, offset_bytes + length_bytes, &mut runs)?;
                mark_data(&runs, &[], out);
                Ok(())
            }
        }
    }

    /// Changes the point read; refused once the export was written.
    pub fn rebase(&self, view: PointView) -> Result<(), ExportError> {
        if self.has_writes() {
            return Err(ExportError::HasWrites {
                written_bytes: self.written_bytes().max(self.overlay_bytes_at_start),
                why: "a written disk cannot move to another point",
            });
        }
        if view.size_bytes() != self.size_bytes {
            return Err(ExportError::SizeMismatch {
                size_bytes: self.size_bytes,
                other_bytes: view.size_bytes(),
            });
        }
        let mut state = lock(&self.state);
        let next = match &**state {
            Mode::ReadOnly(_) => Mode::ReadOnly(Arc::new(view)),
            Mode::Drill(_, overlay) => Mode::Drill(Arc::new(view), overlay.clone()),
            Mode::Copying { .. } | Mode::Target(_) => return Err(ExportError::Busy),
        };
        // Checked again under the lock: a write may have landed since.
        if self.has_writes() {
            return Err(ExportError::HasWrites {
                written_bytes: self.written_bytes(),
                why: "a written disk cannot move to another point",
            });
        }
        *state = Arc::new(next);
        Ok(())
    }

    /// Failover in export mode: copies the disk as clients see it into `target` (sparse)
    /// while they keep reading and writing, and syncs it. On success the disk stays in the
    /// copying mode (every write reaches the overlay and the target) until
    /// [`ExportDisk::switch_to_target`]: the caller records the switch durably first, so a
    /// crash never finds writes only in a target its records do not name. See the module doc.
    pub fn copy_to_target(
        &self,
        target: Arc<File>,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(), ExportError> {
        if self.copying.swap(true, Ordering::AcqRel) {
            return Err(ExportError::Busy);
        }
        self.cancel.store(false, Ordering::Release);
        let result = self.copy(target, progress);
        // Done or failed, no copy runs now (a second one finds the copying mode: Busy).
        self.copying.store(false, Ordering::Release);
        result
    }

    fn copy(&self, target: Arc<File>, progress: &mut dyn FnMut(u64)) -> Result<(), ExportError> {
        target
            .set_len(0)
            .and_then(|()| target.set_len(self.size_bytes))
            .map_err(ExportError::io("sizing the target"))?;
        let (before, copying) = {
            let mut state = lock(&self.state);
            if self.is_closed() {
                return Err(ExportError::Closed);
            }
            let (view, overlay) = match &**state {
                Mode::ReadOnly(view) => (view.clone(), None),
                Mode::Drill(view, overlay) => (view.clone(), Some(overlay.clone())),
                Mode::Copying { .. } | Mode::Target(_) => return Err(ExportError::Busy),
            };
            let copying = Arc::new(Mode::Copying {
                view,
                overlay,
                target: target.clone(),
            });
            (std::mem::replace(&mut *state, copying.clone()), copying)
        };
        let copied = self.copy_chunks(&copying, &target, progress);
        if let Err(error) = copied {
            // Back to the mode before the copy (the target's partial content is the caller's).
            *lock(&self.state) = before;
            return Err(error);
        }
        Ok(())
    }

    /// After [`ExportDisk::copy_to_target`]: the disk reads and writes its target file only
    /// from now on (the view, and its pin, are dropped). Returns the overlay, whose files the
    /// caller removes. Refused ([`ExportError::Busy`]) when no finished copy waits.
    pub fn switch_to_target(&self) -> Result<Option<Overlay>, ExportError> {
        let mut state = lock(&self.state);
        if self.copying.load(Ordering::Acquire) {
            return Err(ExportError::Busy);
        }
        let (target, overlay) = match &**state {
            Mode::Copying {
                target, overlay, ..
            } => (target.clone(), overlay.clone()),
            _ => return Err(ExportError::Busy),
        };
        *state = Arc::new(Mode::Target(target));
        drop(state);
        self.writable.store(true, Ordering::Release);
        Ok(overlay)
    }

    /// Whether a finished copy waits for [`ExportDisk::switch_to_target`].
    pub fn is_copied(&self) -> bool {
        !self.copying.load(Ordering::Acquire) && matches!(**lock(&self.state), Mode::Copying { .. })
    }

    fn copy_chunks(
        &self,
        copying: &Mode,
        target: &File,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(), ExportError> {
        let mut buf = vec![0u8; COPY_CHUNK_BYTES as usize];
        let mut at = 0u64;
        while at < self.size_bytes {
            if self.is_closed() {
                return Err(ExportError::Closed);
            }
            if self.cancel.swap(false, Ordering::AcqRel) {
                return Err(ExportError::Cancelled);
            }
            let len = (self.size_bytes - at).min(COPY_CHUNK_BYTES);
            let chunk = at / COPY_CHUNK_BYTES;
            let piece = &mut buf[..len as usize];
            {
                let _stripe = lock(&self.chunks[(chunk % CHUNK_STRIPES as u64) as usize]);
                Self::read_mode(copying, at, piece)?;
                if piece.iter().any(|&b| b != 0) {
                    target
                        .write_all_at(piece, at)
                        .map_err(ExportError::io_at("copying to the target", at))?;
                } else {
                    // A hole; a client's write may have put data here already.
                    zero_file(target, at, len)
                        .map_err(ExportError::io_at("zeroing the target", at))?;
                }
            }
            at += len;
            progress(at);
        }
        target
            .sync_all()
            .map_err(ExportError::io("syncing the target"))
    }

    /// Undoes a copy to target not yet switched (a change point rebases the disk, then the
    /// copy starts again): a running [`ExportDisk::copy_to_target`] stops at its next chunk
    /// and returns [`ExportError::Cancelled`], back in the mode before it; a finished one
    /// goes back to that mode now (its writes are in the overlay too). No effect otherwise.
    pub fn cancel_copy(&self) {
        if self.copying.load(Ordering::Acquire) {
            self.cancel.store(true, Ordering::Release);
            return;
        }
        let mut state = lock(&self.state);
        if self.copying.load(Ordering::Acquire) {
            self.cancel.store(true, Ordering::Release);
            return;
        }
        let before = match &**state {
            Mode::Copying {
                view,
                overlay: Some(overlay),
                ..
            } => Mode::Drill(view.clone(), overlay.clone()),
            Mode::Copying {
                view,
                overlay: None,
                ..
            } => Mode::ReadOnly(view.clone()),
            _ => return,
        };
        *state = Arc::new(before);
    }

    /// Whether a copy runs now.
    pub fn is_copying(&self) -> bool {
        self.copying.load(Ordering::Acquire)
    }

    /// Whether the disk serves its failover's target file (its copy is done).
    pub fn is_switched(&self) -> bool {
        matches!(**lock(&self.state), Mode::Target(_))
    }

    /// Closes the export: every later request fails with [`ExportError::Closed`].
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }

    /// Whether [`ExportDisk::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}
