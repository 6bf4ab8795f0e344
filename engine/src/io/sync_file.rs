//! [`SyncFileEngine`]: the portable backend, pread/pwrite/fdatasync/fallocate.
//!
//! It owns the registered [`ReplicaFile`]s and two fixed-capacity queues: ops submitted and
//! not yet run, and completions not yet reaped. `kick` runs every queued op synchronously, in
//! submission order, on the calling thread; `reap` runs queued ops too if that is needed to
//! reach `min_count`. Its behaviour is the reference the other backends are tested against.
//!
//! Invariants:
//! - `queued.len() + ready.len() == in_flight_count() <= queue_depth`; neither queue grows
//!   past its preallocated capacity;
//! - ops run in submission order, so a `Flush` covers every write submitted before it (a
//!   stronger guarantee than the contract, which only covers writes completed before it);
//! - short transfers are continued and EINTR is retried; a write that transfers 0 bytes fails
//!   with `WriteZero` instead of looping;
//! - `WriteZeroes` uses `fallocate(FALLOC_FL_ZERO_RANGE)`; when the filesystem answers
//!   EOPNOTSUPP, that file switches for good to writing zeros from a lazily mapped, zeroed,
//!   page-aligned buffer (so it works with `O_DIRECT`).

use std::collections::VecDeque;
use std::io;
use std::os::unix::fs::FileExt;

use memmap2::{MmapOptions, MmapRaw};
use nix::fcntl::{FallocateFlags, fallocate};

use super::{
    Completion, FileId, IoEngine, IoOp, RejectReason, Rejected, ReplicaFile, check_op,
    check_queue_depth,
};

/// Size of the zero buffer used when `FALLOC_FL_ZERO_RANGE` is refused.
pub(crate) const ZERO_BUF_BYTES: usize = 1 << 20;

struct SyncFile {
    file: ReplicaFile,
    zero_range_unsupported: bool,
}

/// Synchronous backend: ops run inside [`kick`](IoEngine::kick).
pub struct SyncFileEngine {
    files: Vec<SyncFile>,
    queued: VecDeque<(u64, IoOp)>,
    ready: VecDeque<Completion>,
    queue_depth: usize,
    zero_buf: Option<MmapRaw>,
}

impl std::fmt::Debug for SyncFileEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncFileEngine")
            .field("files", &self.files.len())
            .field("queued", &self.queued.len())
            .field("ready", &self.ready.len())
            .field("queue_depth", &self.queue_depth)
            .finish()
    }
}

impl SyncFileEngine {
    /// An engine with room for `queue_depth` ops in flight.
    pub fn new(queue_depth: usize) -> io::Result<Self> {
        check_queue_depth(queue_depth)?;
        Ok(Self {
            files: Vec::new(),
            queued: VecDeque::with_capacity(queue_depth),
            ready: VecDeque::with_capacity(queue_depth),
            queue_depth,
            zero_buf: None,
        })
    }

    fn run(&mut self, tag: u64, op: IoOp) -> Completion {
        match op {
            IoOp::Read {
                file,
                offset_bytes,
                mut buf,
            } => {
                let result = match self.files.get(file.index() as usize) {
                    Some(f) => read_full(&f.file, offset_bytes, buf.as_mut_slice()),
                    None => Err(unknown_file()),
                };
                if let Ok(n) = result {
                    buf.set_len_bytes(n);
                }
                Completion {
                    tag,
                    buf: Some(buf),
                    result: result.map(len_u32),
                }
            }
            IoOp::Write {
                file,
                offset_bytes,
                buf,
            } => {
                let len = buf.len_bytes();
                let result = match self.files.get(file.index() as usize) {
                    Some(f) => write_full(&f.file, offset_bytes, buf.as_slice()),
                    None => Err(unknown_file()),
                };
                Completion {
                    tag,
                    buf: Some(buf),
                    result: result.map(|()| len_u32(len)),
                }
            }
            IoOp::WriteZeroes {
                file,
                offset_bytes,
                len_bytes,
            } => Completion {
                tag,
                buf: None,
                result: self.write_zeroes(file, offset_bytes, len_bytes).map(|()| 0),
            },
            IoOp::Flush { file } => {
                let result = match self.files.get(file.index() as usize) {
                    Some(f) => retry_eintr(|| f.file.as_file().sync_data()),
                    None => Err(unknown_file()),
                };
                Completion {
                    tag,
                    buf: None,
                    result: result.map(|()| 0),
                }
            }
        }
    }

    fn write_zeroes(&mut self, file: FileId, offset_bytes: u64, len_bytes: u64) -> io::Result<()> {
        let index = file.index() as usize;
        let f = self.files.get_mut(index).ok_or_else(unknown_file)?;
        if !f.zero_range_unsupported {
            let (off, len) = match (i64::try_from(offset_bytes), i64::try_from(len_bytes)) {
                (Ok(o), Ok(l)) => (o, l),
                _ => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
            };
            let res = retry_eintr(|| {
                fallocate(
                    f.file.as_file(),
                    FallocateFlags::FALLOC_FL_ZERO_RANGE,
                    off,
                    len,
                )
                .map_err(io::Error::from)
            });
            match res {
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    f.zero_range_unsupported = true;
                }
                other => return other,
            }
        }
        if self.zero_buf.is_none() {
            self.zero_buf = Some(map_zero_buf()?);
        }
        let (Some(f), Some(zero)) = (self.files.get(index), self.zero_buf.as_ref()) else {
            return Err(unknown_file());
        };
        // SAFETY: the map is ZERO_BUF_BYTES long, zero-filled, and only ever read (never
        // written, never handed out mutably), so a shared slice over it is sound.
        let zeros = unsafe { std::slice::from_raw_parts(zero.as_ptr(), zero.len()) };
        let mut done = 0u64;
        while done < len_bytes {
            let chunk = (len_bytes - done).min(zeros.len() as u64) as usize;
            write_full(&f.file, offset_bytes + done, &zeros[..chunk])?;
            done += chunk as u64;
        }
        Ok(())
    }
}

/// Maps a zeroed, page-aligned buffer of [`ZERO_BUF_BYTES`] for zero-writing.
pub(crate) fn map_zero_buf() -> io::Result<MmapRaw> {
    Ok(MmapRaw::from(
        MmapOptions::new().len(ZERO_BUF_BYTES).map_anon()?,
    ))
}

fn len_u32(n: usize) -> u32 {
    // Buffers are at most 1 GiB, so this never saturates.
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn unknown_file() -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, "unknown file id")
}

fn retry_eintr<T>(mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// pread until `out` is full or end of file; returns the bytes read. A short read that ends
/// off the file's alignment is the end of a file whose size is not a multiple of it (reading
/// on would be a misaligned O_DIRECT read), so it counts as end of file too.
fn read_full(file: &ReplicaFile, offset_bytes: u64, out: &mut [u8]) -> io::Result<usize> {
    let align = file.alignment_bytes().max(1) as usize;
    let mut done = 0usize;
    while done < out.len() {
        match file
            .as_file()
            .read_at(&mut out[done..], offset_bytes + done as u64)
        {
            Ok(0) => break,
            Ok(n) => {
                done += n;
                if !done.is_multiple_of(align) {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// pwrite all of `data`, continuing short writes.
fn write_full(file: &ReplicaFile, offset_bytes: u64, data: &[u8]) -> io::Result<()> {
    let mut done = 0usize;
    while done < data.len() {
        match file
            .as_file()
            .write_at(&data[done..], offset_bytes + done as u64)
        {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "pwrite wrote 0 bytes",
                ));
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl IoEngine for SyncFileEngine {
    type File = ReplicaFile;

    fn backend_name(&self) -> &'static str {
        "sync_file"
    }

    fn add_file(&mut self, file: ReplicaFile) -> io::Result<FileId> {
        let id = FileId::from_usize(self.files.len());
        self.files.push(SyncFile {
            file,
            zero_range_unsupported: false,
        });
        Ok(id)
    }

    fn alignment_bytes(&self, file: FileId) -> Option<u32> {
        self.files
            .get(file.index() as usize)
            .map(|f| f.file.alignment_bytes())
    }

    fn queue_depth(&self) -> usize {
        self.queue_depth
    }

    fn submit(&mut self, op: IoOp, tag: u64) -> Result<(), Rejected> {
        let reject = |op, reason| Err(Rejected { op, reason });
        if self.in_flight_count() >= self.queue_depth {
            return reject(op, RejectReason::QueueFull);
        }
        let Some(align) = self.alignment_bytes(op.file()) else {
            return reject(op, RejectReason::UnknownFile);
        };
        if let Err(reason) = check_op(&op, align) {
            return reject(op, reason);
        }
        self.queued.push_back((tag, op));
        Ok(())
    }

    fn kick(&mut self) -> io::Result<usize> {
        let mut ran = 0;
        while let Some((tag, op)) = self.queued.pop_front() {
            let completion = self.run(tag, op);
            self.ready.push_back(completion);
            ran += 1;
        }
        Ok(ran)
    }

    fn reap(&mut self, out: &mut Vec<Completion>, min_count: usize) -> io::Result<usize> {
        if self.ready.len() < min_count {
            self.kick()?;
        }
        let n = self.ready.len();
        out.extend(self.ready.drain(..));
        Ok(n)
    }

    fn in_flight_count(&self) -> usize {
        self.queued.len() + self.ready.len()
    }
}
