//! What goes wrong with the source model, named: [`VmError`] (the VM's files),
//! [`OracleError`] (recording and checking), and where a checked disk differs ([`Mismatch`]).

use std::io;
use std::path::{Path, PathBuf};

use engine::delta::DiskGeometry;

/// What went wrong with a source VM, named.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VmError {
    /// A file operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done ("create", "write", …).
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// A VM name that is not one path component.
    #[error("VM name {name:?} is not one path component (non-empty, no '/', not . or ..)")]
    InvalidName {
        /// The name.
        name: String,
    },
    /// A disk whose geometry cannot be: block size not 512 or 4096, or size not a non-zero
    /// multiple of it.
    #[error(
        "disk {disk_index}: size {} B with {} B blocks is not a disk (blocks of 512 or 4096 B, \
         size a non-zero multiple of the block)",
        geometry.size_bytes, geometry.block_size_bytes
    )]
    InvalidGeometry {
        /// Disk index.
        disk_index: usize,
        /// The geometry.
        geometry: DiskGeometry,
    },
    /// An existing disk file whose length is not the disk's size.
    #[error("{}: {found_bytes} B long, the disk is {expected_bytes} B", path.display())]
    SizeMismatch {
        /// The file.
        path: PathBuf,
        /// The disk's size.
        expected_bytes: u64,
        /// The file's length.
        found_bytes: u64,
    },
    /// No disk with this index.
    #[error("no disk {disk_index}: the VM has {disks} disks")]
    NoSuchDisk {
        /// The index asked for.
        disk_index: usize,
        /// Number of disks.
        disks: usize,
    },
    /// An extent that is empty, misaligned or outside its disk.
    #[error("disk {disk_index}: extent of {length_bytes} B at {offset_bytes}: {reason}")]
    BadExtent {
        /// Disk index.
        disk_index: usize,
        /// Offset.
        offset_bytes: u64,
        /// Length.
        length_bytes: u64,
        /// Why.
        reason: String,
    },
    /// A write whose data is not as long as the op says.
    #[error("write of {expected_bytes} B given {got_bytes} B of data")]
    DataLength {
        /// Length in the op.
        expected_bytes: u64,
        /// Length of the data given.
        got_bytes: usize,
    },
    /// A chunk size that is zero or not a multiple of 512.
    #[error("chunk size {chunk_bytes} B is not a non-zero multiple of 512")]
    InvalidChunkSize {
        /// The chunk size.
        chunk_bytes: u32,
    },
}

/// A closure for `map_err` that names the file and the operation.
pub(crate) fn vm_io(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> VmError {
    let path = path.to_path_buf();
    move |source| VmError::Io { op, path, source }
}

/// How a disk file to check is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    /// Fixed VHD when the file ends with a footer (cookie "conectix" at `length − 512`, and
    /// the length at least the disk's size + 512), else raw of exactly the disk's size.
    Auto,
    /// Raw: the disk is the file's first `size_bytes` (the file may be longer).
    Raw,
    /// Fixed VHD: the disk is the file's first `size_bytes`, then zero padding up to the
    /// footer's current size, then the 512-byte footer.
    FixedVhd,
}

/// Where a checked disk differs from the oracle: the first differing chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "disk {disk_index} chunk {chunk_index} (at {chunk_offset_bytes}): first differing byte at \
     offset {offset_bytes}; digest expected {expected:016x}, got {got:016x}"
)]
pub struct Mismatch {
    /// Disk index.
    pub disk_index: usize,
    /// Index of the chunk.
    pub chunk_index: u64,
    /// Offset of the chunk on the disk.
    pub chunk_offset_bytes: u64,
    /// Offset on the disk of the first byte that differs.
    pub offset_bytes: u64,
    /// The chunk's digest at the bookmark.
    pub expected: u64,
    /// The chunk's digest in the file.
    pub got: u64,
}

/// What went wrong recording or checking, named.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OracleError {
    /// A file operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// Reading the source VM failed.
    #[error("source VM: {0}")]
    Vm(#[from] VmError),
    /// A chunk size that is zero or not a multiple of 512.
    #[error("chunk size {chunk_bytes} B is not a non-zero multiple of 512")]
    InvalidChunkSize {
        /// The chunk size.
        chunk_bytes: u32,
    },
    /// The VM's disks are not the ones the oracle was made for.
    #[error("the VM's disks {found:?} are not the oracle's {expected:?}")]
    DisksChanged {
        /// The oracle's disks.
        expected: Vec<DiskGeometry>,
        /// The VM's disks.
        found: Vec<DiskGeometry>,
    },
    /// No bookmark recorded with this sequence number.
    #[error("no bookmark recorded at seq {seq}")]
    UnknownBookmark {
        /// The sequence number.
        seq: u64,
    },
    /// A bookmark whose sequence number is not above the last one recorded.
    #[error("bookmark seq {seq} is not above the last recorded, {last_seq}")]
    BookmarkOutOfOrder {
        /// The sequence number given.
        seq: u64,
        /// The last one recorded.
        last_seq: u64,
    },
    /// No disk with this index.
    #[error("no disk {disk_index}: the VM has {disks} disks")]
    NoSuchDisk {
        /// The index.
        disk_index: usize,
        /// Number of disks.
        disks: usize,
    },
    /// A file too short for the disk in the format.
    #[error(
        "{}: {file_bytes} B long, not a {format:?} image of a {disk_bytes} B disk",
        path.display()
    )]
    Length {
        /// The file.
        path: PathBuf,
        /// Its length.
        file_bytes: u64,
        /// The disk's size.
        disk_bytes: u64,
        /// The format asked for.
        format: DiskFormat,
    },
    /// A file checked as a fixed VHD whose footer is not one.
    #[error("{}: not a fixed VHD: {reason}", path.display())]
    VhdFooter {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A fixed VHD with non-zero bytes between the disk's end and the footer.
    #[error(
        "{}: non-zero byte at {offset_bytes}, between the disk's end and the VHD footer",
        path.display()
    )]
    VhdPadding {
        /// The file.
        path: PathBuf,
        /// Offset of the first non-zero byte.
        offset_bytes: u64,
    },
    /// The file's content differs from the disk at the bookmark.
    #[error("{} differs from the disk at bookmark seq {seq}: {mismatch}", path.display())]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// The bookmark.
        seq: u64,
        /// Where.
        mismatch: Mismatch,
    },
    /// [`crate::source::Oracle::audit`]: a chunk changed in the VM's files since the last
    /// bookmark without an op noted for it.
    #[error(
        "disk {disk_index} chunk {chunk_index} (at {chunk_offset_bytes}) changed since the last \
         bookmark, but no op touching it was noted"
    )]
    NotNoted {
        /// Disk index.
        disk_index: usize,
        /// Chunk index.
        chunk_index: u64,
        /// Offset of the chunk on the disk.
        chunk_offset_bytes: u64,
    },
}

impl OracleError {
    /// The mismatch, when the error is one.
    pub fn mismatch(&self) -> Option<&Mismatch> {
        match self {
            Self::Mismatch { mismatch, .. } => Some(mismatch),
            _ => None,
        }
    }
}

/// A closure for `map_err` that names the file and the operation.
pub(crate) fn oracle_io(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> OracleError {
    let path = path.to_path_buf();
    move |source| OracleError::Io { op, path, source }
}
