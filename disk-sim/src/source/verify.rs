//! Checks a materialized disk file against the oracle: byte for byte at a bookmark (raw or
//! fixed VHD), naming the first differing chunk and byte.
//!
//! A fixed VHD's footer is recognised by its cookie and decoded by the engine's one VHD
//! decoder ([`engine::vhd::read_fixed_vhd_info`]: checksum, disk type, current size); the
//! content is compared here alone. [`compare_file`] checks a file against a whole digest only
//! ([`super::digest`]), for callers that keep digests instead of an oracle.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::digest::{chunk_digest, file_digest};
use super::error::{DiskFormat, Mismatch, OracleError, oracle_io as io_error};
use super::oracle::Oracle;

/// Size of a fixed VHD's footer.
pub const VHD_FOOTER_BYTES: u64 = 512;
/// A fixed VHD footer's cookie, at its start.
pub const VHD_COOKIE: [u8; 8] = *b"conectix";
/// Read buffer of scans, a multiple of the chunk size at least this large.
const SCAN_BUFFER_BYTES: usize = 1 << 20;

impl Oracle {
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
        let chunk = self.chunk_bytes() as usize;
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
        if paths.len() != self.disks().len() {
            return Err(OracleError::NoSuchDisk {
                disk_index: paths.len().min(self.disks().len()),
                disks: self.disks().len(),
            });
        }
        for (disk_index, path) in paths.iter().enumerate() {
            self.verify_file(seq, disk_index, path)?;
        }
        Ok(())
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
/// Compares the file at `path` with `expected`, the [`super::digest::whole_digest`] of the
/// disk: `Ok(None)` when equal, else what differs (digest and length), or the read error.
pub fn compare_file(path: &Path, expected: u64) -> std::io::Result<Option<String>> {
    let (got, length) = file_digest(path)?;
    Ok((got != expected).then(|| {
        format!(
            "{}: digest {got:#018x} ({length} bytes), the source has {expected:#018x}",
            path.display()
        )
    }))
}

/// Where a list of materialized files differs from the disks' whole digests, by disk index:
/// a count that differs is reported on disk 0.
pub fn compare_files(files: &[PathBuf], digests: &[u64]) -> Vec<(usize, String)> {
    if files.len() != digests.len() {
        return vec![(
            0,
            format!("{} files for {} disks", files.len(), digests.len()),
        )];
    }
    let mut differ = Vec::new();
    for (disk, (file, want)) in files.iter().zip(digests).enumerate() {
        match compare_file(file, *want) {
            Ok(None) => {}
            Ok(Some(why)) => differ.push((disk, why)),
            Err(error) => differ.push((disk, format!("reading {}: {error}", file.display()))),
        }
    }
    differ
}
