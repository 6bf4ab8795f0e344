//! A source VM: its disks as real files on a site directory.
//!
//! This module owns the layout and content of a simulated protected VM's disks:
//!
//! ```text
//!  <site>/<vm>/disk-0.img    OS disk (first)
//!  <site>/<vm>/disk-1.img    data disks, in order
//!  …
//! ```
//!
//! Invariants:
//! - each disk file is exactly its disk's `size_bytes` long (created sparse, so a fresh disk
//!   reads as zeros and costs no space);
//! - the files always hold the source's current content: [`SourceVm::apply`] writes an op's
//!   bytes (or zeros, for a trim) with a positioned write before it returns; nothing is kept
//!   in memory instead of on disk;
//! - every write is checked against its disk (aligned to the logical block size, inside) and
//!   refused with a named error otherwise; nothing is written partly on a refusal;
//! - I/O errors name the file and what was being done.
//!
//! Content is not synced to stable storage on every write (the VM is a simulation; the page
//! cache is the truth for every reader on the machine); [`SourceVm::sync`] does it on demand.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use engine::delta::{DiskGeometry, ExtentError};

use super::digest::{DiskDigest, chunk_digest};
use super::error::{VmError, vm_io as io_error};
use crate::workload::Op;

/// Zeros written for trims.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
/// Read buffer of [`SourceVm::snapshot_digests`], rounded to a multiple of the chunk size.
const SCAN_BUFFER_BYTES: usize = 1 << 20;

/// A source VM's disks as files under `<site>/<vm>/`.
#[derive(Debug)]
pub struct SourceVm {
    name: String,
    dir: PathBuf,
    geometries: Vec<DiskGeometry>,
    paths: Vec<PathBuf>,
    files: Vec<File>,
}

impl SourceVm {
    /// The file of disk `disk_index` of VM `vm_name` on site `site_dir`:
    /// `<site>/<vm>/disk-<i>.img`.
    pub fn disk_path(site_dir: &Path, vm_name: &str, disk_index: usize) -> PathBuf {
        site_dir
            .join(vm_name)
            .join(format!("disk-{disk_index}.img"))
    }

    /// Creates the VM's directory (and the site's) and one new sparse file per disk, OS disk
    /// first. Refuses to overwrite an existing disk file.
    pub fn create(site_dir: &Path, vm_name: &str, disks: &[DiskGeometry]) -> Result<Self, VmError> {
        check_name(vm_name)?;
        Self::create_at(&site_dir.join(vm_name), vm_name, disks)
    }

    /// Creates VM `vm_name` with its disk files directly in `dir` (`<dir>/disk-<i>.img`,
    /// created with its parents). Refuses to overwrite an existing disk file.
    pub fn create_at(dir: &Path, vm_name: &str, disks: &[DiskGeometry]) -> Result<Self, VmError> {
        check_name(vm_name)?;
        check_geometries(disks)?;
        std::fs::create_dir_all(dir).map_err(io_error("create directory", dir))?;
        let mut vm = Self::empty(vm_name, dir.to_path_buf());
        for (index, geometry) in disks.iter().enumerate() {
            let path = dir.join(format!("disk-{index}.img"));
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(io_error("create", &path))?;
            file.set_len(geometry.size_bytes)
                .map_err(io_error("set length of", &path))?;
            vm.push(*geometry, path, file);
        }
        Ok(vm)
    }

    /// Opens an existing VM's disk files; each must be exactly its disk's size.
    pub fn open(site_dir: &Path, vm_name: &str, disks: &[DiskGeometry]) -> Result<Self, VmError> {
        check_name(vm_name)?;
        check_geometries(disks)?;
        let mut vm = Self::empty(vm_name, site_dir.join(vm_name));
        for (index, geometry) in disks.iter().enumerate() {
            let path = Self::disk_path(site_dir, vm_name, index);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(io_error("open", &path))?;
            let found_bytes = file.metadata().map_err(io_error("stat", &path))?.len();
            if found_bytes != geometry.size_bytes {
                return Err(VmError::SizeMismatch {
                    path,
                    expected_bytes: geometry.size_bytes,
                    found_bytes,
                });
            }
            vm.push(*geometry, path, file);
        }
        Ok(vm)
    }

    /// Opens existing disk files at any `paths` (`paths[i]` is disk `i`; each exactly its
    /// disk's size): a VM that now runs on the disks a failover or failback made. Its
    /// directory is the first file's.
    pub fn open_paths(
        vm_name: &str,
        paths: &[PathBuf],
        disks: &[DiskGeometry],
    ) -> Result<Self, VmError> {
        check_name(vm_name)?;
        check_geometries(disks)?;
        if paths.len() != disks.len() {
            return Err(VmError::NoSuchDisk {
                disk_index: paths.len().min(disks.len()),
                disks: disks.len(),
            });
        }
        let dir = paths
            .first()
            .and_then(|p| p.parent())
            .map_or_else(PathBuf::new, Path::to_path_buf);
        let mut vm = Self::empty(vm_name, dir);
        for (path, geometry) in paths.iter().zip(disks) {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(io_error("open", path))?;
            let found_bytes = file.metadata().map_err(io_error("stat", path))?.len();
            if found_bytes != geometry.size_bytes {
                return Err(VmError::SizeMismatch {
                    path: path.clone(),
                    expected_bytes: geometry.size_bytes,
                    found_bytes,
                });
            }
            vm.push(*geometry, path.clone(), file);
        }
        Ok(vm)
    }

    fn empty(name: &str, dir: PathBuf) -> Self {
        Self {
            name: name.to_owned(),
            dir,
            geometries: Vec::new(),
            paths: Vec::new(),
            files: Vec::new(),
        }
    }

    fn push(&mut self, geometry: DiskGeometry, path: PathBuf, file: File) {
        self.geometries.push(geometry);
        self.paths.push(path);
        self.files.push(file);
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The VM's directory, `<site>/<vm>`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The disks' geometries, OS disk first.
    pub fn geometries(&self) -> &[DiskGeometry] {
        &self.geometries
    }

    /// The disks' files, OS disk first.
    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// Applies a workload op: a write's `data`, or zeros over a trimmed range. Bookmarks
    /// change nothing.
    pub fn apply(&mut self, op: &Op, data: &[u8]) -> Result<(), VmError> {
        match *op {
            Op::Write {
                disk_index,
                offset_bytes,
                length_bytes,
            } => {
                if data.len() as u64 != u64::from(length_bytes) {
                    return Err(VmError::DataLength {
                        expected_bytes: u64::from(length_bytes),
                        got_bytes: data.len(),
                    });
                }
                self.write(usize::from(disk_index), offset_bytes, data)
            }
            Op::ZeroRange {
                disk_index,
                offset_bytes,
                length_bytes,
            } => self.zero_range(usize::from(disk_index), offset_bytes, length_bytes),
            Op::Bookmark { .. } => Ok(()),
        }
    }

    /// Writes `data` at `offset_bytes` of disk `disk_index`.
    pub fn write(
        &mut self,
        disk_index: usize,
        offset_bytes: u64,
        data: &[u8],
    ) -> Result<(), VmError> {
        self.check_extent(disk_index, offset_bytes, data.len() as u64)?;
        let path = &self.paths[disk_index];
        self.files[disk_index]
            .write_all_at(data, offset_bytes)
            .map_err(io_error("write", path))
    }

    /// Writes zeros over `length_bytes` at `offset_bytes` of disk `disk_index`.
    pub fn zero_range(
        &mut self,
        disk_index: usize,
        offset_bytes: u64,
        length_bytes: u64,
    ) -> Result<(), VmError> {
        self.check_extent(disk_index, offset_bytes, length_bytes)?;
        let (file, path) = (&self.files[disk_index], &self.paths[disk_index]);
        let mut at = offset_bytes;
        let end = offset_bytes + length_bytes;
        while at < end {
            let len = (end - at).min(ZEROS.len() as u64) as usize;
            file.write_all_at(&ZEROS[..len], at)
                .map_err(io_error("write zeros to", path))?;
            at += len as u64;
        }
        Ok(())
    }

    /// Reads `out.len()` bytes at `offset_bytes` of disk `disk_index` (any offset and length
    /// inside the disk).
    pub fn read_at(
        &self,
        disk_index: usize,
        offset_bytes: u64,
        out: &mut [u8],
    ) -> Result<(), VmError> {
        let geometry = self.geometry(disk_index)?;
        let inside = offset_bytes
            .checked_add(out.len() as u64)
            .is_some_and(|end| end <= geometry.size_bytes);
        if !inside {
            return Err(VmError::BadExtent {
                disk_index,
                offset_bytes,
                length_bytes: out.len() as u64,
                reason: format!("outside the disk of {} B", geometry.size_bytes),
            });
        }
        self.files[disk_index]
            .read_exact_at(out, offset_bytes)
            .map_err(io_error("read", &self.paths[disk_index]))
    }

    /// Flushes every disk file to stable storage.
    pub fn sync(&self) -> Result<(), VmError> {
        for (file, path) in self.files.iter().zip(&self.paths) {
            file.sync_all().map_err(io_error("sync", path))?;
        }
        Ok(())
    }

    /// Every disk's chunk digests and whole-disk digest, read from the files now (the
    /// oracle's definition: [`chunk_digest`] per `chunk_bytes` chunk, the last
    /// one shorter when the size is not a multiple). Reads every byte of every disk.
    pub fn snapshot_digests(&self, chunk_bytes: u32) -> Result<Vec<DiskDigest>, VmError> {
        if chunk_bytes == 0 || !chunk_bytes.is_multiple_of(512) {
            return Err(VmError::InvalidChunkSize { chunk_bytes });
        }
        let chunk = chunk_bytes as usize;
        let mut buffer = vec![0u8; SCAN_BUFFER_BYTES.max(chunk) / chunk * chunk];
        let mut digests = Vec::with_capacity(self.files.len());
        for (index, geometry) in self.geometries.iter().enumerate() {
            let mut chunks =
                Vec::with_capacity(geometry.size_bytes.div_ceil(u64::from(chunk_bytes)) as usize);
            let mut at = 0u64;
            while at < geometry.size_bytes {
                let len = (geometry.size_bytes - at).min(buffer.len() as u64) as usize;
                self.read_at(index, at, &mut buffer[..len])?;
                chunks.extend(buffer[..len].chunks(chunk).map(chunk_digest));
                at += len as u64;
            }
            digests.push(DiskDigest::from_chunks(
                geometry.size_bytes,
                chunk_bytes,
                chunks,
            ));
        }
        Ok(digests)
    }

    fn geometry(&self, disk_index: usize) -> Result<DiskGeometry, VmError> {
        self.geometries
            .get(disk_index)
            .copied()
            .ok_or(VmError::NoSuchDisk {
                disk_index,
                disks: self.geometries.len(),
            })
    }

    fn check_extent(
        &self,
        disk_index: usize,
        offset_bytes: u64,
        length_bytes: u64,
    ) -> Result<(), VmError> {
        self.geometry(disk_index)?
            .check_extent(offset_bytes, length_bytes)
            .map_err(|error| VmError::BadExtent {
                disk_index,
                offset_bytes,
                length_bytes,
                reason: match error {
                    ExtentError::Empty => "empty".to_owned(),
                    ExtentError::Misaligned { block_size_bytes } => {
                        format!("not aligned to the {block_size_bytes} B block")
                    }
                    ExtentError::OutOfRange { disk_size_bytes } => {
                        format!("outside the disk of {disk_size_bytes} B")
                    }
                },
            })
    }
}

fn check_name(name: &str) -> Result<(), VmError> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(VmError::InvalidName {
            name: name.to_owned(),
        });
    }
    Ok(())
}

fn check_geometries(disks: &[DiskGeometry]) -> Result<(), VmError> {
    for (disk_index, geometry) in disks.iter().enumerate() {
        let block = u64::from(geometry.block_size_bytes);
        if !matches!(block, 512 | 4096)
            || geometry.size_bytes == 0
            || !geometry.size_bytes.is_multiple_of(block)
        {
            return Err(VmError::InvalidGeometry {
                disk_index,
                geometry: *geometry,
            });
        }
    }
    Ok(())
}
