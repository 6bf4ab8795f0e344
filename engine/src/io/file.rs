//! Opening replica files and block devices for the OS backends ([`uring`](super::uring) and
//! [`sync_file`](super::sync_file)).
//!
//! A [`ReplicaFile`] is an open descriptor (`O_RDWR | O_CLOEXEC`, plus `O_DIRECT` unless the
//! caller accepts buffered I/O) together with the alignment every op on it must respect.
//!
//! Invariants:
//! - `alignment_bytes` is a power of two between 512 and [`BUF_ALIGN_BYTES`]; every offset and
//!   length submitted for this file is a multiple of it (checked at submit, so the kernel never
//!   sees a misaligned `O_DIRECT` op and answers EINVAL), and every pool buffer's address is a
//!   multiple of it;
//! - `is_direct()` tells the truth: when `O_DIRECT` was refused and the caller allowed the
//!   fallback, the file is buffered and a warning was logged.
//!
//! `O_DIRECT` policy ([`DirectIo`]): `Require` (the default) returns
//! [`OpenError::DirectIoUnsupported`] when the filesystem refuses it; `Prefer` falls back to
//! buffered I/O with a `tracing::warn!`; `Off` never asks for it. `O_DIRECT` is not
//! durability: a `Flush` (fdatasync) is still needed before data counts as durable.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::buf::BUF_ALIGN_BYTES;

/// Alignment used when the kernel does not report one for a direct-I/O file.
const FALLBACK_DIRECT_ALIGNMENT_BYTES: u32 = 4096;
/// Alignment required of buffered files (the smallest logical block size there is).
const BUFFERED_ALIGNMENT_BYTES: u32 = 512;

/// Whether to open with `O_DIRECT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DirectIo {
    /// `O_DIRECT` or an error ([`OpenError::DirectIoUnsupported`]).
    #[default]
    Require,
    /// `O_DIRECT` if the filesystem allows it, else buffered I/O with a warning.
    Prefer,
    /// Buffered I/O.
    Off,
}

/// Why a replica file could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// `open(2)` (or creating / sizing the file) failed.
    #[error("cannot open replica file {path}")]
    Open {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The filesystem refuses `O_DIRECT` and [`DirectIo::Require`] was asked for.
    #[error(
        "the filesystem holding {path} does not support O_DIRECT; put replica files on a \
         filesystem or block device with direct I/O, or open with DirectIo::Prefer to accept \
         buffered I/O"
    )]
    DirectIoUnsupported {
        /// The path.
        path: PathBuf,
        /// The OS error (usually EINVAL).
        #[source]
        source: io::Error,
    },
    /// The device wants buffers aligned beyond what the buffer pool gives.
    #[error(
        "{path}: direct I/O needs {align_bytes}-byte alignment, more than the pool's \
         {BUF_ALIGN_BYTES} bytes"
    )]
    AlignmentTooLarge {
        /// The path.
        path: PathBuf,
        /// The alignment the kernel asks for.
        align_bytes: u32,
    },
}

/// An open replica file or block device, with the alignment its ops must respect.
#[derive(Debug)]
pub struct ReplicaFile {
    file: File,
    path: PathBuf,
    direct: bool,
    alignment_bytes: u32,
}

impl ReplicaFile {
    /// Opens an existing file or block device read-write.
    pub fn open(path: impl AsRef<Path>, direct: DirectIo) -> Result<Self, OpenError> {
        Self::open_inner(path.as_ref(), direct, None)
    }

    /// Opens `path`, creating it if missing, and sets its length to `len_bytes` (a regular
    /// file only; for tests, the disk simulator and file-backed replicas).
    pub fn create(
        path: impl AsRef<Path>,
        len_bytes: u64,
        direct: DirectIo,
    ) -> Result<Self, OpenError> {
        Self::open_inner(path.as_ref(), direct, Some(len_bytes))
    }

    fn open_inner(
        path: &Path,
        direct: DirectIo,
        create_len: Option<u64>,
    ) -> Result<Self, OpenError> {
        let open_err = |source| OpenError::Open {
            path: path.to_path_buf(),
            source,
        };
        if let Some(len_bytes) = create_len {
            // Create and size the file without O_DIRECT (O_CREAT | O_DIRECT is fine on most
            // filesystems, but sizing needs no direct I/O and this keeps errors distinct).
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(open_err)?;
            f.set_len(len_bytes).map_err(open_err)?;
        }
        let open = |flags: i32| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                // std adds O_CLOEXEC itself; it is named here so the intent is visible.
                .custom_flags(flags | libc::O_CLOEXEC)
                .open(path)
        };
        let (file, is_direct) = if direct == DirectIo::Off {
            (open(0).map_err(open_err)?, false)
        } else {
            match open(libc::O_DIRECT) {
                Ok(f) => (f, true),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    if direct == DirectIo::Require {
                        return Err(OpenError::DirectIoUnsupported {
                            path: path.to_path_buf(),
                            source: e,
                        });
                    }
                    tracing::warn!(
                        path = %path.display(),
                        error = %e,
                        "O_DIRECT refused by the filesystem; using buffered I/O for this replica"
                    );
                    (open(0).map_err(open_err)?, false)
                }
                Err(e) => return Err(open_err(e)),
            }
        };
        let alignment_bytes = if is_direct {
            match direct_alignment(&file) {
                Ok(a) => a,
                Err(AlignProbe::Unsupported) if direct == DirectIo::Prefer => {
                    tracing::warn!(
                        path = %path.display(),
                        "the filesystem reports no direct-I/O support for this file; using \
                         buffered I/O for this replica"
                    );
                    let file = open(0).map_err(open_err)?;
                    return Ok(Self {
                        file,
                        path: path.to_path_buf(),
                        direct: false,
                        alignment_bytes: BUFFERED_ALIGNMENT_BYTES,
                    });
                }
                Err(AlignProbe::Unsupported) => {
                    return Err(OpenError::DirectIoUnsupported {
                        path: path.to_path_buf(),
                        source: io::Error::from_raw_os_error(libc::EINVAL),
                    });
                }
                Err(AlignProbe::TooLarge(align_bytes)) => {
                    return Err(OpenError::AlignmentTooLarge {
                        path: path.to_path_buf(),
                        align_bytes,
                    });
                }
            }
        } else {
            BUFFERED_ALIGNMENT_BYTES
        };
        Ok(Self {
            file,
            path: path.to_path_buf(),
            direct: is_direct,
            alignment_bytes,
        })
    }

    /// The path it was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the descriptor has `O_DIRECT`.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Alignment of offsets and lengths of every op on this file.
    pub fn alignment_bytes(&self) -> u32 {
        self.alignment_bytes
    }

    /// Current size (file length, or block device size).
    pub fn len_bytes(&self) -> io::Result<u64> {
        (&self.file).seek(SeekFrom::End(0))
    }

    /// The open descriptor.
    pub fn as_file(&self) -> &File {
        &self.file
    }
}

enum AlignProbe {
    /// The kernel says this file cannot do direct I/O.
    Unsupported,
    /// The kernel asks for more than the pool's buffer alignment.
    TooLarge(u32),
}

/// Alignment for a direct-I/O descriptor: the logical block size of a block device, else
/// `statx(STATX_DIOALIGN)`, else [`FALLBACK_DIRECT_ALIGNMENT_BYTES`].
fn direct_alignment(file: &File) -> Result<u32, AlignProbe> {
    let is_block_device = file
        .metadata()
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false);
    let (offset_align, mem_align) = if is_block_device {
        match rustix::fs::ioctl_blksszget(file) {
            Ok(lbs) if lbs > 0 => (lbs, lbs),
            _ => (
                FALLBACK_DIRECT_ALIGNMENT_BYTES,
                FALLBACK_DIRECT_ALIGNMENT_BYTES,
            ),
        }
    } else {
        match rustix::fs::statx(
            file,
            "",
            rustix::fs::AtFlags::EMPTY_PATH,
            rustix::fs::StatxFlags::DIOALIGN,
        ) {
            Ok(stx) if stx.stx_mask & rustix::fs::StatxFlags::DIOALIGN.bits() != 0 => {
                if stx.stx_dio_offset_align == 0 {
                    return Err(AlignProbe::Unsupported);
                }
                (stx.stx_dio_offset_align, stx.stx_dio_mem_align)
            }
            // Old kernel or filesystem that does not report: be conservative.
            _ => (
                FALLBACK_DIRECT_ALIGNMENT_BYTES,
                FALLBACK_DIRECT_ALIGNMENT_BYTES,
            ),
        }
    };
    if mem_align as usize > BUF_ALIGN_BYTES {
        return Err(AlignProbe::TooLarge(mem_align));
    }
    if offset_align as usize > BUF_ALIGN_BYTES {
        // Pool buffers are multiples of 4096, but the ops' offsets are chosen by the caller;
        // refuse rather than let every op fail.
        return Err(AlignProbe::TooLarge(offset_align));
    }
    // Offsets below 512 never happen for real devices; round up to a sane power of two.
    Ok(offset_align
        .max(BUFFERED_ALIGNMENT_BYTES)
        .next_power_of_two())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_direct_in_tmp_and_report_alignment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("replica");
        match ReplicaFile::create(&path, 1 << 20, DirectIo::Require) {
            Ok(f) => {
                assert!(f.is_direct());
                assert!(f.alignment_bytes().is_power_of_two());
                assert!((512..=4096).contains(&f.alignment_bytes()));
                assert_eq!(f.len_bytes().unwrap(), 1 << 20);
            }
            Err(OpenError::DirectIoUnsupported { .. }) => {
                eprintln!(
                    "SKIP: the filesystem of {} refuses O_DIRECT",
                    dir.path().display()
                );
            }
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn buffered_open_is_buffered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("replica");
        let f = ReplicaFile::create(&path, 4096, DirectIo::Off).unwrap();
        assert!(!f.is_direct());
        assert_eq!(f.alignment_bytes(), 512);
    }

    #[test]
    fn missing_file_is_an_open_error() {
        let err = ReplicaFile::open("/nonexistent/dir/replica", DirectIo::Prefer).unwrap_err();
        assert!(matches!(err, OpenError::Open { .. }), "{err}");
    }
}
