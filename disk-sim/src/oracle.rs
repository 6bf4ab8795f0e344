//! The oracle: the exact content of every disk of a source VM at every bookmark, to check
//! what the appliance hands back.
//!
//! This module owns:
//! - the digest definitions: [`chunk_digest`] (xxh3-64 of a chunk's bytes, unseeded, chosen
//!   independently of the engine's resync hashes) per [`DEFAULT_CHUNK_BYTES`] chunk, and
//!   [`whole_digest`] per disk (xxh3-64 over the size, the chunk size and the chunk digests in
//!   order, little-endian: equal for two disks exactly when every chunk digest is);
//! - [`Oracle`]: per bookmark, keyed by the bookmark's stream sequence number (what
//!   `Agent::bookmark` returns), every disk's chunk digests and whole digest, read from the
//!   [`SourceVm`]'s files at the bookmark; and a chunk log from which any disk at any bookmark
//!   is rebuilt byte for byte ([`Oracle::write_disk_at`]) and any materialized disk is checked
//!   ([`Oracle::verify_file`], raw or fixed VHD), naming the first differing chunk and byte.
//!
//! # How it records
//!
//! The caller applies each op to the VM and tells the oracle ([`Oracle::apply`], or
//! [`SourceVm::apply`] then [`Oracle::note`]); the oracle only marks the chunks the op touches
//! as dirty. At a bookmark ([`Oracle::record_bookmark`]) it reads the dirty chunks from the
//! VM's files, and for each one whose digest differs from the previous bookmark's, logs a new
//! *chunk version*: its digest and, unless the chunk is all zeros, its bytes appended to a log
//! file in the scratch directory (a redo log: post-images at each bookmark). At creation it
//! records a baseline the same way from a full scan (a fresh VM's baseline is all zeros and
//! logs nothing). A disk at bookmark `b` is then, chunk by chunk, the latest version logged at
//! or before `b`, else zeros. [`OracleOptions::full_scan`] rereads every chunk at every
//! bookmark instead of trusting the notes; [`Oracle::audit`] checks the notes against a full
//! scan.
//!
//! Invariants:
//! - bookmark sequence numbers strictly increase; a bookmark's digests are those of the files
//!   when it was recorded, provided every op applied since the previous one was noted;
//! - the log is append-only; a chunk version, once logged, is never changed, so every
//!   recorded bookmark stays rebuildable for the oracle's lifetime;
//! - a failed recording (an I/O error) changes no recorded state: it can be retried;
//! - errors name the file and the operation, the bookmark, the disk, the chunk.
//!
//! # Memory and disk
//!
//! With `C` chunks per disk (disk size / chunk size, 16 384 for 1 GiB at 64 KiB):
//! - resident: per disk `8 B × C` (current digests) + `C / 8` B (dirty bitmap) + 8 B per chunk
//!   dirtied since the last bookmark; per bookmark about 100 B + 32 B per disk; per chunk
//!   version 24 B (chunk index, digest, log offset). A chunk version exists only for a chunk
//!   whose content changed between two bookmarks, so the index is about 24 B per 64 KiB of
//!   change (0.04 % of the log);
//! - queries ([`Oracle::digests_at`], [`Oracle::verify_file`], [`Oracle::write_disk_at`]) use
//!   `16 B × C` of one disk plus a 1 MiB read buffer, transiently;
//! - on disk: one log file, [`LOG_FILE_NAME`] in the scratch directory, holding the bytes of
//!   every non-zero chunk version: at most one chunk size per chunk changed per bookmark
//!   interval (plus the non-zero chunks of the baseline). It is never compacted and is removed
//!   when the oracle is dropped.
//!
//! Time: a bookmark reads only the chunks dirtied since the previous one (every chunk with
//! [`OracleOptions::full_scan`]) and hashes `8 B × C` per disk for the whole digest; a check
//! or a rebuild reads the file (or the log) once.
//!
//! A fixed VHD's footer is recognised by its cookie and decoded by the engine's one VHD
//! decoder ([`engine::vhd::read_fixed_vhd_info`]: checksum, disk type, current size); the
//! content is compared by this module alone.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use engine::delta::{Consistency, DiskGeometry};
use xxhash_rust::xxh3::{Xxh3, xxh3_64};

use crate::vm::{SourceVm, VmError};
use crate::workload::Op;

/// Chunk size of the digests unless configured otherwise: 64 KiB.
pub const DEFAULT_CHUNK_BYTES: u32 = 64 * 1024;
/// Name of the chunk log in the scratch directory.
pub const LOG_FILE_NAME: &str = "oracle-chunks.log";
/// Size of a fixed VHD's footer.
pub const VHD_FOOTER_BYTES: u64 = 512;
/// A fixed VHD footer's cookie, at its start.
pub const VHD_COOKIE: [u8; 8] = *b"conectix";

/// Location of a chunk version that is all zeros: nothing logged.
const ZERO_LOCATION: u64 = u64::MAX;
/// Read buffer of scans, a multiple of the chunk size at least this large.
const SCAN_BUFFER_BYTES: usize = 1 << 20;

/// The digest of one chunk's bytes: xxh3-64, unseeded.
pub fn chunk_digest(bytes: &[u8]) -> u64 {
    xxh3_64(bytes)
}

/// The whole-disk digest: xxh3-64 over `size_bytes`, `chunk_bytes` and every chunk digest in
/// order, little-endian.
pub fn whole_digest(size_bytes: u64, chunk_bytes: u32, chunks: &[u64]) -> u64 {
    let mut hasher = Xxh3::new();
    hasher.update(&size_bytes.to_le_bytes());
    hasher.update(&chunk_bytes.to_le_bytes());
    let mut batch = [0u8; 4096];
    for group in chunks.chunks(batch.len() / 8) {
        for (slot, digest) in batch.chunks_exact_mut(8).zip(group) {
            slot.copy_from_slice(&digest.to_le_bytes());
        }
        hasher.update(&batch[..group.len() * 8]);
    }
    hasher.digest()
}

/// One disk's digests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskDigest {
    /// Size of the disk.
    pub size_bytes: u64,
    /// Chunk size; the last chunk is shorter when the size is not a multiple.
    pub chunk_bytes: u32,
    /// [`chunk_digest`] of each chunk, in order.
    pub chunks: Vec<u64>,
    /// [`whole_digest`] of the disk.
    pub whole: u64,
}

impl DiskDigest {
    /// The digests of a disk from its chunk digests (computes the whole digest).
    pub fn from_chunks(size_bytes: u64, chunk_bytes: u32, chunks: Vec<u64>) -> Self {
        let whole = whole_digest(size_bytes, chunk_bytes, &chunks);
        Self {
            size_bytes,
            chunk_bytes,
            chunks,
            whole,
        }
    }
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "disk {} chunk {} (at {}): first differing byte at offset {}; digest expected \
             {:016x}, got {:016x}",
            self.disk_index,
            self.chunk_index,
            self.chunk_offset_bytes,
            self.offset_bytes,
            self.expected,
            self.got
        )
    }
}

/// What went wrong, named.
#[derive(Debug)]
#[non_exhaustive]
pub enum OracleError {
    /// A file operation failed.
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// Reading the source VM failed.
    Vm(VmError),
    /// A chunk size that is zero or not a multiple of 512.
    InvalidChunkSize {
        /// The chunk size.
        chunk_bytes: u32,
    },
    /// The VM's disks are not the ones the oracle was made for.
    DisksChanged {
        /// The oracle's disks.
        expected: Vec<DiskGeometry>,
        /// The VM's disks.
        found: Vec<DiskGeometry>,
    },
    /// No bookmark recorded with this sequence number.
    UnknownBookmark {
        /// The sequence number.
        seq: u64,
    },
    /// A bookmark whose sequence number is not above the last one recorded.
    BookmarkOutOfOrder {
        /// The sequence number given.
        seq: u64,
        /// The last one recorded.
        last_seq: u64,
    },
    /// No disk with this index.
    NoSuchDisk {
        /// The index.
        disk_index: usize,
        /// Number of disks.
        disks: usize,
    },
    /// A file too short for the disk in the format.
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
    VhdFooter {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A fixed VHD with non-zero bytes between the disk's end and the footer.
    VhdPadding {
        /// The file.
        path: PathBuf,
        /// Offset of the first non-zero byte.
        offset_bytes: u64,
    },
    /// The file's content differs from the disk at the bookmark.
    Mismatch {
        /// The file.
        path: PathBuf,
        /// The bookmark.
        seq: u64,
        /// Where.
        mismatch: Mismatch,
    },
    /// [`Oracle::audit`]: a chunk changed in the VM's files since the last bookmark without
    /// an op noted for it.
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

impl fmt::Display for OracleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io { op, path, source } => write!(f, "{op} {}: {source}", path.display()),
            Self::Vm(error) => write!(f, "source VM: {error}"),
            Self::InvalidChunkSize { chunk_bytes } => write!(
                f,
                "chunk size {chunk_bytes} B is not a non-zero multiple of 512"
            ),
            Self::DisksChanged { expected, found } => write!(
                f,
                "the VM's disks {found:?} are not the oracle's {expected:?}"
            ),
            Self::UnknownBookmark { seq } => write!(f, "no bookmark recorded at seq {seq}"),
            Self::BookmarkOutOfOrder { seq, last_seq } => write!(
                f,
                "bookmark seq {seq} is not above the last recorded, {last_seq}"
            ),
            Self::NoSuchDisk { disk_index, disks } => {
                write!(f, "no disk {disk_index}: the VM has {disks} disks")
            }
            Self::Length {
                path,
                file_bytes,
                disk_bytes,
                format,
            } => write!(
                f,
                "{}: {file_bytes} B long, not a {format:?} image of a {disk_bytes} B disk",
                path.display()
            ),
            Self::VhdFooter { path, reason } => {
                write!(f, "{}: not a fixed VHD: {reason}", path.display())
            }
            Self::VhdPadding { path, offset_bytes } => write!(
                f,
                "{}: non-zero byte at {offset_bytes}, between the disk's end and the VHD footer",
                path.display()
            ),
            Self::Mismatch {
                path,
                seq,
                mismatch,
            } => write!(
                f,
                "{} differs from the disk at bookmark seq {seq}: {mismatch}",
                path.display()
            ),
            Self::NotNoted {
                disk_index,
                chunk_index,
                chunk_offset_bytes,
            } => write!(
                f,
                "disk {disk_index} chunk {chunk_index} (at {chunk_offset_bytes}) changed since \
                 the last bookmark, but no op touching it was noted"
            ),
        }
    }
}

impl std::error::Error for OracleError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io { source, .. } => Some(source),
            Self::Vm(error) => Some(error),
            _ => None,
        }
    }
}

impl From<VmError> for OracleError {
    fn from(error: VmError) -> Self {
        Self::Vm(error)
    }
}

fn io_error(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> OracleError {
    let path = path.to_path_buf();
    move |source| OracleError::Io { op, path, source }
}

/// How the oracle records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OracleOptions {
    /// Chunk size of the digests and of the log (a non-zero multiple of 512).
    pub chunk_bytes: u32,
    /// Reread every chunk of every disk at every bookmark instead of only the noted ones
    /// (slower; does not depend on [`Oracle::note`]).
    pub full_scan: bool,
}

impl Default for OracleOptions {
    fn default() -> Self {
        Self {
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            full_scan: false,
        }
    }
}

/// What was recorded at a bookmark.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BookmarkRecord {
    /// The bookmark's stream sequence number.
    pub seq: u64,
    /// Crash- or app-consistent.
    pub consistency: Consistency,
    /// [`whole_digest`] of each disk.
    pub whole_digests: Vec<u64>,
    /// Chunk versions logged (chunks whose content changed since the previous bookmark).
    pub changed_chunks: u64,
    /// Bytes appended to the log.
    pub logged_bytes: u64,
}

/// Sizes, for the bounds in the module doc.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OracleStats {
    /// Bookmarks recorded.
    pub bookmarks: u64,
    /// Chunk versions indexed (baseline included).
    pub chunk_versions: u64,
    /// Length of the log file.
    pub log_bytes: u64,
}

/// One chunk's content at some point: its digest, and where its bytes are in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ChunkVersion {
    chunk: u64,
    digest: u64,
    /// Offset in the log, or [`ZERO_LOCATION`].
    location: u64,
}

#[derive(Debug)]
struct Recorded {
    record: BookmarkRecord,
    /// Per disk, the chunk versions logged at this bookmark, by chunk index.
    changes: Vec<Vec<ChunkVersion>>,
}

/// The exact truth about a source VM's disks at every bookmark (module doc).
#[derive(Debug)]
pub struct Oracle {
    options: OracleOptions,
    disks: Vec<DiskGeometry>,
    log_path: PathBuf,
    log: File,
    log_bytes: u64,
    /// Per disk, every chunk's digest as last recorded.
    current: Vec<Vec<u64>>,
    /// Per disk, one bit per chunk touched since the last bookmark, and their indices.
    dirty_bits: Vec<Vec<u64>>,
    dirty: Vec<Vec<u64>>,
    /// Per disk, the non-zero chunks at creation.
    baseline: Vec<Vec<ChunkVersion>>,
    bookmarks: Vec<Recorded>,
    chunk_versions: u64,
}

impl Oracle {
    /// An oracle for `vm` with 64 KiB chunks, its log in `scratch_dir` (created if missing;
    /// it must not already hold a log). Reads every disk once for the baseline.
    pub fn new(scratch_dir: &Path, vm: &SourceVm) -> Result<Self, OracleError> {
        Self::with_options(scratch_dir, vm, OracleOptions::default())
    }

    /// An oracle with `options`.
    pub fn with_options(
        scratch_dir: &Path,
        vm: &SourceVm,
        options: OracleOptions,
    ) -> Result<Self, OracleError> {
        if options.chunk_bytes == 0 || !options.chunk_bytes.is_multiple_of(512) {
            return Err(OracleError::InvalidChunkSize {
                chunk_bytes: options.chunk_bytes,
            });
        }
        std::fs::create_dir_all(scratch_dir).map_err(io_error("create directory", scratch_dir))?;
        let log_path = scratch_dir.join(LOG_FILE_NAME);
        let log = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&log_path)
            .map_err(io_error("create", &log_path))?;
        let disks = vm.geometries().to_vec();
        let chunk = u64::from(options.chunk_bytes);
        let mut oracle = Self {
            options,
            current: disks
                .iter()
                .map(|disk| zero_chunks(disk.size_bytes, options.chunk_bytes))
                .collect(),
            dirty_bits: disks
                .iter()
                .map(|disk| vec![0; disk.size_bytes.div_ceil(chunk).div_ceil(64) as usize])
                .collect(),
            dirty: vec![Vec::new(); disks.len()],
            baseline: Vec::new(),
            bookmarks: Vec::new(),
            chunk_versions: 0,
            disks,
            log_path,
            log,
            log_bytes: 0,
        };
        let (baseline, _) = oracle.capture(vm, true)?;
        oracle.commit(&baseline);
        oracle.baseline = baseline;
        Ok(oracle)
    }

    /// The disks, OS disk first.
    pub fn disks(&self) -> &[DiskGeometry] {
        &self.disks
    }

    /// The chunk size.
    pub fn chunk_bytes(&self) -> u32 {
        self.options.chunk_bytes
    }

    /// The log file.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Sizes.
    pub fn stats(&self) -> OracleStats {
        OracleStats {
            bookmarks: self.bookmarks.len() as u64,
            chunk_versions: self.chunk_versions,
            log_bytes: self.log_bytes,
        }
    }

    /// Applies `op` to `vm` and notes it.
    pub fn apply(&mut self, vm: &mut SourceVm, op: &Op, data: &[u8]) -> Result<(), OracleError> {
        vm.apply(op, data)?;
        self.note(op);
        Ok(())
    }

    /// Notes that `op` was applied to the VM (bookmarks change nothing). Parts outside the
    /// disks are ignored.
    pub fn note(&mut self, op: &Op) {
        if let Some((disk_index, offset_bytes, length_bytes)) = op.extent() {
            self.note_extent(usize::from(disk_index), offset_bytes, length_bytes);
        }
    }

    /// Notes that `length_bytes` at `offset_bytes` of disk `disk_index` changed in the VM's
    /// files (for writes made other than by [`Op`]s). Parts outside the disks are ignored.
    pub fn note_extent(&mut self, disk_index: usize, offset_bytes: u64, length_bytes: u64) {
        let Some(disk) = self.disks.get(disk_index) else {
            return;
        };
        let end = offset_bytes
            .saturating_add(length_bytes)
            .min(disk.size_bytes);
        if offset_bytes >= end {
            return;
        }
        let chunk = u64::from(self.options.chunk_bytes);
        for index in offset_bytes / chunk..=(end - 1) / chunk {
            let (word, bit) = ((index / 64) as usize, index % 64);
            let bits = &mut self.dirty_bits[disk_index][word];
            if *bits & (1 << bit) == 0 {
                *bits |= 1 << bit;
                self.dirty[disk_index].push(index);
            }
        }
    }

    /// Records the bookmark with stream sequence number `seq`: the VM's files as they are
    /// now, all ops applied before the bookmark having been noted.
    pub fn record_bookmark(
        &mut self,
        vm: &SourceVm,
        seq: u64,
        consistency: Consistency,
    ) -> Result<&BookmarkRecord, OracleError> {
        if let Some(last) = self.bookmarks.last()
            && seq <= last.record.seq
        {
            return Err(OracleError::BookmarkOutOfOrder {
                seq,
                last_seq: last.record.seq,
            });
        }
        let log_before = self.log_bytes;
        let (changes, log_bytes) = self.capture(vm, self.options.full_scan)?;
        self.commit(&changes);
        self.log_bytes = log_bytes;
        for (bits, dirty) in self.dirty_bits.iter_mut().zip(&mut self.dirty) {
            for index in dirty.drain(..) {
                bits[(index / 64) as usize] = 0;
            }
        }
        let record = BookmarkRecord {
            seq,
            consistency,
            whole_digests: self
                .disks
                .iter()
                .zip(&self.current)
                .map(|(disk, chunks)| {
                    whole_digest(disk.size_bytes, self.options.chunk_bytes, chunks)
                })
                .collect(),
            changed_chunks: changes.iter().map(|c| c.len() as u64).sum(),
            logged_bytes: log_bytes - log_before,
        };
        self.bookmarks.push(Recorded { record, changes });
        Ok(&self.bookmarks[self.bookmarks.len() - 1].record)
    }

    /// Reads the chunks to record (every chunk with `all`, else the dirty ones, in order) and
    /// logs the versions that differ from the current digests. Changes no recorded state;
    /// returns the versions per disk and the log length after them.
    fn capture(
        &self,
        vm: &SourceVm,
        all: bool,
    ) -> Result<(Vec<Vec<ChunkVersion>>, u64), OracleError> {
        if vm.geometries() != self.disks.as_slice() {
            return Err(OracleError::DisksChanged {
                expected: self.disks.clone(),
                found: vm.geometries().to_vec(),
            });
        }
        let chunk = u64::from(self.options.chunk_bytes);
        let mut buffer = vec![0u8; self.options.chunk_bytes as usize];
        let mut log_bytes = self.log_bytes;
        let mut changes = Vec::with_capacity(self.disks.len());
        for (disk_index, disk) in self.disks.iter().enumerate() {
            let indices: Vec<u64> = if all {
                (0..disk.size_bytes.div_ceil(chunk)).collect()
            } else {
                let mut dirty = self.dirty[disk_index].clone();
                dirty.sort_unstable();
                dirty
            };
            let mut versions = Vec::new();
            for index in indices {
                let offset = index * chunk;
                let len = (disk.size_bytes - offset).min(chunk) as usize;
                let bytes = &mut buffer[..len];
                vm.read_at(disk_index, offset, bytes)?;
                let digest = chunk_digest(bytes);
                if digest == self.current[disk_index][index as usize] {
                    continue;
                }
                let location = if bytes.iter().all(|&b| b == 0) {
                    ZERO_LOCATION
                } else {
                    self.log
                        .write_all_at(bytes, log_bytes)
                        .map_err(io_error("append to", &self.log_path))?;
                    log_bytes += len as u64;
                    log_bytes - len as u64
                };
                versions.push(ChunkVersion {
                    chunk: index,
                    digest,
                    location,
                });
            }
            changes.push(versions);
        }
        Ok((changes, log_bytes))
    }

    fn commit(&mut self, changes: &[Vec<ChunkVersion>]) {
        for (current, versions) in self.current.iter_mut().zip(changes) {
            for version in versions {
                current[version.chunk as usize] = version.digest;
            }
            self.chunk_versions += versions.len() as u64;
        }
    }

    /// What was recorded at every bookmark, in order.
    pub fn bookmarks(&self) -> impl Iterator<Item = &BookmarkRecord> {
        self.bookmarks.iter().map(|recorded| &recorded.record)
    }

    /// What was recorded at bookmark `seq`.
    pub fn bookmark(&self, seq: u64) -> Option<&BookmarkRecord> {
        self.index_of(seq)
            .ok()
            .map(|index| &self.bookmarks[index].record)
    }

    /// The last bookmark recorded.
    pub fn latest(&self) -> Option<&BookmarkRecord> {
        self.bookmarks.last().map(|recorded| &recorded.record)
    }

    fn index_of(&self, seq: u64) -> Result<usize, OracleError> {
        self.bookmarks
            .binary_search_by_key(&seq, |recorded| recorded.record.seq)
            .map_err(|_| OracleError::UnknownBookmark { seq })
    }

    fn disk(&self, disk_index: usize) -> Result<DiskGeometry, OracleError> {
        self.disks
            .get(disk_index)
            .copied()
            .ok_or(OracleError::NoSuchDisk {
                disk_index,
                disks: self.disks.len(),
            })
    }

    /// Every chunk of disk `disk_index` at bookmark `seq`: `(digest, location)`.
    fn state_at(&self, seq: u64, disk_index: usize) -> Result<Vec<(u64, u64)>, OracleError> {
        let disk = self.disk(disk_index)?;
        let last = self.index_of(seq)?;
        let mut state: Vec<(u64, u64)> = zero_chunks(disk.size_bytes, self.options.chunk_bytes)
            .into_iter()
            .map(|digest| (digest, ZERO_LOCATION))
            .collect();
        let generations = std::iter::once(&self.baseline[disk_index]).chain(
            self.bookmarks[..=last]
                .iter()
                .map(|recorded| &recorded.changes[disk_index]),
        );
        for versions in generations {
            for version in versions {
                state[version.chunk as usize] = (version.digest, version.location);
            }
        }
        Ok(state)
    }

    /// The digests of disk `disk_index` at bookmark `seq`.
    pub fn digests_at(&self, seq: u64, disk_index: usize) -> Result<DiskDigest, OracleError> {
        let disk = self.disk(disk_index)?;
        let chunks = self
            .state_at(seq, disk_index)?
            .into_iter()
            .map(|(digest, _)| digest)
            .collect();
        Ok(DiskDigest::from_chunks(
            disk.size_bytes,
            self.options.chunk_bytes,
            chunks,
        ))
    }

    /// Writes disk `disk_index` as it was at bookmark `seq` to a new raw image at `out_path`
    /// (sparse: all-zero chunks stay holes), synced. Refuses to overwrite a file.
    pub fn write_disk_at(
        &self,
        seq: u64,
        disk_index: usize,
        out_path: &Path,
    ) -> Result<(), OracleError> {
        let disk = self.disk(disk_index)?;
        let state = self.state_at(seq, disk_index)?;
        let out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(out_path)
            .map_err(io_error("create", out_path))?;
        out.set_len(disk.size_bytes)
            .map_err(io_error("set length of", out_path))?;
        let chunk = u64::from(self.options.chunk_bytes);
        let mut buffer = vec![0u8; self.options.chunk_bytes as usize];
        for (index, &(_, location)) in state.iter().enumerate() {
            if location == ZERO_LOCATION {
                continue;
            }
            let offset = index as u64 * chunk;
            let bytes = &mut buffer[..(disk.size_bytes - offset).min(chunk) as usize];
            self.read_log(location, bytes)?;
            out.write_all_at(bytes, offset)
                .map_err(io_error("write", out_path))?;
        }
        out.sync_all().map_err(io_error("sync", out_path))
    }

    fn read_log(&self, location: u64, out: &mut [u8]) -> Result<(), OracleError> {
        if location == ZERO_LOCATION {
            out.fill(0);
            return Ok(());
        }
        self.log
            .read_exact_at(out, location)
            .map_err(io_error("read", &self.log_path))
    }

    /// Checks that the file at `path` holds disk `disk_index` as it was at bookmark `seq`,
    /// as a raw image or a fixed VHD ([`DiskFormat::Auto`]).
    pub fn verify_file(&self, seq: u64, disk_index: usize, path: &Path) -> Result<(), OracleError> {
        self.verify_file_as(seq, disk_index, path, DiskFormat::Auto)
    }

    /// [`Oracle::verify_file`] with the format given. A difference is
    /// [`OracleError::Mismatch`], naming the first differing chunk and byte.
    pub fn verify_file_as(
        &self,
        seq: u64,
        disk_index: usize,
        path: &Path,
        format: DiskFormat,
    ) -> Result<(), OracleError> {
        let disk = self.disk(disk_index)?;
        let state = self.state_at(seq, disk_index)?;
        let file = File::open(path).map_err(io_error("open", path))?;
        let file_bytes = file.metadata().map_err(io_error("stat", path))?.len();
        let padding_end = data_layout(&file, path, file_bytes, disk.size_bytes, format)?;
        let chunk = self.options.chunk_bytes as usize;
        let mut buffer = vec![0u8; SCAN_BUFFER_BYTES.max(chunk) / chunk * chunk];
        let mut at = 0u64;
        while at < disk.size_bytes {
            let len = (disk.size_bytes - at).min(buffer.len() as u64) as usize;
            file.read_exact_at(&mut buffer[..len], at)
                .map_err(io_error("read", path))?;
            for (within, got_bytes) in buffer[..len].chunks(chunk).enumerate() {
                let offset = at + (within * chunk) as u64;
                let index = offset / chunk as u64;
                let (expected, location) = state[index as usize];
                let got = chunk_digest(got_bytes);
                if got == expected {
                    continue;
                }
                let mut expected_bytes = vec![0u8; got_bytes.len()];
                self.read_log(location, &mut expected_bytes)?;
                let first = expected_bytes
                    .iter()
                    .zip(got_bytes)
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                return Err(OracleError::Mismatch {
                    path: path.to_path_buf(),
                    seq,
                    mismatch: Mismatch {
                        disk_index,
                        chunk_index: index,
                        chunk_offset_bytes: offset,
                        offset_bytes: offset + first as u64,
                        expected,
                        got,
                    },
                });
            }
            at += len as u64;
        }
        // A fixed VHD's padding up to the footer must be zeros.
        let mut at = disk.size_bytes;
        while at < padding_end {
            let len = (padding_end - at).min(buffer.len() as u64) as usize;
            file.read_exact_at(&mut buffer[..len], at)
                .map_err(io_error("read", path))?;
            if let Some(first) = buffer[..len].iter().position(|&b| b != 0) {
                return Err(OracleError::VhdPadding {
                    path: path.to_path_buf(),
                    offset_bytes: at + first as u64,
                });
            }
            at += len as u64;
        }
        Ok(())
    }

    /// Checks every disk of the VM at bookmark `seq`: `paths[i]` is disk `i`.
    pub fn verify_files(&self, seq: u64, paths: &[PathBuf]) -> Result<(), OracleError> {
        if paths.len() != self.disks.len() {
            return Err(OracleError::NoSuchDisk {
                disk_index: paths.len().min(self.disks.len()),
                disks: self.disks.len(),
            });
        }
        for (disk_index, path) in paths.iter().enumerate() {
            self.verify_file(seq, disk_index, path)?;
        }
        Ok(())
    }

    /// Checks the notes: every chunk not noted since the last bookmark must read as
    /// recorded. Reads every disk.
    pub fn audit(&self, vm: &SourceVm) -> Result<(), OracleError> {
        if vm.geometries() != self.disks.as_slice() {
            return Err(OracleError::DisksChanged {
                expected: self.disks.clone(),
                found: vm.geometries().to_vec(),
            });
        }
        let snapshot = vm.snapshot_digests(self.options.chunk_bytes)?;
        for (disk_index, digests) in snapshot.iter().enumerate() {
            for (index, (&now, &recorded)) in digests
                .chunks
                .iter()
                .zip(&self.current[disk_index])
                .enumerate()
            {
                let noted = self.dirty_bits[disk_index][index / 64] & (1 << (index % 64)) != 0;
                if now != recorded && !noted {
                    return Err(OracleError::NotNoted {
                        disk_index,
                        chunk_index: index as u64,
                        chunk_offset_bytes: index as u64 * u64::from(self.options.chunk_bytes),
                    });
                }
            }
        }
        Ok(())
    }
}

impl Drop for Oracle {
    fn drop(&mut self) {
        // The log is the oracle's own; nothing else can read it.
        let _ = std::fs::remove_file(&self.log_path);
    }
}

/// Where a disk file's data ends and, for a fixed VHD, where its zero padding ends (the
/// footer's offset); for raw, the disk's size (no padding).
fn data_layout(
    file: &File,
    path: &Path,
    file_bytes: u64,
    disk_bytes: u64,
    format: DiskFormat,
) -> Result<u64, OracleError> {
    let too_short = || OracleError::Length {
        path: path.to_path_buf(),
        file_bytes,
        disk_bytes,
        format,
    };
    let room_for_footer = file_bytes >= disk_bytes.saturating_add(VHD_FOOTER_BYTES);
    if format == DiskFormat::Raw || (format == DiskFormat::FixedVhd && !room_for_footer) {
        return if file_bytes >= disk_bytes && format == DiskFormat::Raw {
            Ok(disk_bytes)
        } else {
            Err(too_short())
        };
    }
    // Whether the file ends with a footer: the cookie at `length − 512`.
    let mut cookie = [0u8; 8];
    if room_for_footer {
        file.read_exact_at(&mut cookie, file_bytes - VHD_FOOTER_BYTES)
            .map_err(io_error("read footer of", path))?;
    }
    if cookie != VHD_COOKIE {
        return match format {
            DiskFormat::Auto if file_bytes == disk_bytes => Ok(disk_bytes),
            DiskFormat::Auto | DiskFormat::Raw => Err(too_short()),
            DiskFormat::FixedVhd => Err(OracleError::VhdFooter {
                path: path.to_path_buf(),
                reason: "no \"conectix\" cookie at the start of the last 512 bytes".to_owned(),
            }),
        };
    }
    // The footer's fields (big-endian) are decoded by the engine's one VHD decoder, which
    // checks the checksum, the disk type and that the current size is the footer's offset.
    let info = engine::vhd::read_fixed_vhd_info(path).map_err(|error| OracleError::VhdFooter {
        path: path.to_path_buf(),
        reason: error.to_string(),
    })?;
    if info.file_size_bytes != file_bytes || info.virtual_size_bytes < disk_bytes {
        return Err(too_short());
    }
    Ok(info.virtual_size_bytes)
}

/// The digest of every chunk of an all-zero disk of `size_bytes`.
fn zero_chunks(size_bytes: u64, chunk_bytes: u32) -> Vec<u64> {
    let chunk = u64::from(chunk_bytes);
    let count = size_bytes.div_ceil(chunk);
    let mut zeros = vec![0u8; chunk_bytes as usize];
    let full = chunk_digest(&zeros);
    let mut digests = vec![full; count as usize];
    let last_len = size_bytes - count.saturating_sub(1) * chunk;
    if let Some(last) = digests.last_mut()
        && last_len != chunk
    {
        zeros.truncate(last_len as usize);
        *last = chunk_digest(&zeros);
    }
    digests
}
