//! The oracle: the exact content of every disk of a source VM at every bookmark, to check
//! what the appliance hands back.
//!
//! This module owns [`Oracle`]: per bookmark, keyed by the bookmark's stream sequence number
//! (what `Agent::bookmark` returns), every disk's chunk digests and whole digest
//! ([`super::digest`]), read from the [`SourceVm`]'s files at the bookmark; and a chunk log
//! from which any disk at any bookmark is rebuilt byte for byte ([`Oracle::write_disk_at`])
//! and any materialized disk is checked ([`Oracle::verify_file`] in [`super::verify`], raw or
//! fixed VHD), naming the first differing chunk and byte.
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
//! Checking a file against a bookmark (raw or fixed VHD) lives in [`super::verify`].

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use engine::delta::{Consistency, DiskGeometry};

pub use super::digest::DEFAULT_CHUNK_BYTES;
use super::digest::{DiskDigest, chunk_digest, whole_digest, zero_chunks};
use super::error::{OracleError, oracle_io as io_error};
use super::vm::SourceVm;
use crate::workload::Op;

/// Name of the chunk log in the scratch directory.
pub const LOG_FILE_NAME: &str = "oracle-chunks.log";

/// Location of a chunk version that is all zeros: nothing logged.
pub(super) const ZERO_LOCATION: u64 = u64::MAX;

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

    pub(super) fn index_of(&self, seq: u64) -> Result<usize, OracleError> {
        self.bookmarks
            .binary_search_by_key(&seq, |recorded| recorded.record.seq)
            .map_err(|_| OracleError::UnknownBookmark { seq })
    }

    pub(super) fn disk(&self, disk_index: usize) -> Result<DiskGeometry, OracleError> {
        self.disks
            .get(disk_index)
            .copied()
            .ok_or(OracleError::NoSuchDisk {
                disk_index,
                disks: self.disks.len(),
            })
    }

    /// Every chunk of disk `disk_index` at bookmark `seq`: `(digest, location)`.
    pub(super) fn state_at(
        &self,
        seq: u64,
        disk_index: usize,
    ) -> Result<Vec<(u64, u64)>, OracleError> {
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

    pub(super) fn read_log(&self, location: u64, out: &mut [u8]) -> Result<(), OracleError> {
        if location == ZERO_LOCATION {
            out.fill(0);
            return Ok(());
        }
        self.log
            .read_exact_at(out, location)
            .map_err(io_error("read", &self.log_path))
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
