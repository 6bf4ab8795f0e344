//! Writing fixed VHDs: the hole-keeping writer, in-place conversion of a raw image, the
//! temporary OS disk, and reading a finished file's footer back.

use super::*;

/// Writes a new fixed VHD: create, write data at offsets in `[0, virtual size)`, finish.
///
/// The file is created (never overwritten) with length `virtual_size_bytes`, all hole. Data
/// written with [`write_at`](Self::write_at) goes to the same offsets of the file; whole 4 KiB
/// blocks of zeros are not written but left (or punched) as holes. [`finish`](Self::finish)
/// appends the footer and makes the file durable. A writer dropped without `finish` leaves a
/// file without footer, which [`read_fixed_vhd_info`] refuses; the caller removes it.
#[derive(Debug)]
pub struct FixedVhdWriter {
    file: File,
    path: PathBuf,
    virtual_size_bytes: u64,
    footer: VhdFooter,
    /// End of the highest non-zero data written: the file is all hole from here on.
    data_end_bytes: u64,
    /// Cleared after the filesystem refused `FALLOC_FL_PUNCH_HOLE`: write zeros instead.
    punch_supported: bool,
}

impl FixedVhdWriter {
    /// Creates the file (it must not exist) with the given virtual size, a non-zero multiple
    /// of 1 MiB (see [`fixed_vhd_virtual_size`]).
    pub fn create(
        path: &Path,
        virtual_size_bytes: u64,
        options: &VhdCreateOptions,
    ) -> Result<Self, VhdError> {
        check_virtual_size(virtual_size_bytes)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(io_error("create", path))?;
        if let Err(err) = file.set_len(virtual_size_bytes) {
            drop(file);
            let _ = std::fs::remove_file(path);
            return Err(io_error("set length of", path)(err));
        }
        Ok(Self {
            file,
            path: path.to_path_buf(),
            virtual_size_bytes,
            footer: VhdFooter::new_fixed(virtual_size_bytes, options),
            data_end_bytes: 0,
            punch_supported: true,
        })
    }

    /// The virtual size.
    pub fn virtual_size_bytes(&self) -> u64 {
        self.virtual_size_bytes
    }

    /// Writes disk data at `offset_bytes`. Whole 4 KiB-aligned blocks of zeros become holes:
    /// skipped above everything written so far, punched below it.
    pub fn write_at(&mut self, offset_bytes: u64, data: &[u8]) -> Result<(), VhdError> {
        let length_bytes = data.len() as u64;
        let end_bytes = offset_bytes
            .checked_add(length_bytes)
            .filter(|&end| end <= self.virtual_size_bytes)
            .ok_or(VhdError::WriteOutOfRange {
                offset_bytes,
                length_bytes,
                virtual_size_bytes: self.virtual_size_bytes,
            })?;
        // Walk granule by granule, coalescing runs of the same kind (data or whole-zero block).
        let mut run_start = offset_bytes;
        let mut run_is_zero = false;
        let mut position = offset_bytes;
        while position < end_bytes {
            let granule_end = ((position / HOLE_GRANULE_BYTES) + 1)
                .saturating_mul(HOLE_GRANULE_BYTES)
                .min(end_bytes);
            let piece = slice_of(data, offset_bytes, position, granule_end);
            let is_zero = granule_end - position == HOLE_GRANULE_BYTES && is_all_zero(piece);
            if position != run_start && is_zero != run_is_zero {
                self.flush_run(run_start, position, run_is_zero, data, offset_bytes)?;
                run_start = position;
            }
            run_is_zero = is_zero;
            position = granule_end;
        }
        if run_start < end_bytes {
            self.flush_run(run_start, end_bytes, run_is_zero, data, offset_bytes)?;
        }
        Ok(())
    }

    /// Writes `[start, end)` of the disk, which is all data or all whole zero blocks.
    pub(super) fn flush_run(
        &mut self,
        start_bytes: u64,
        end_bytes: u64,
        is_zero: bool,
        data: &[u8],
        data_offset_bytes: u64,
    ) -> Result<(), VhdError> {
        if !is_zero {
            let piece = slice_of(data, data_offset_bytes, start_bytes, end_bytes);
            self.file
                .write_all_at(piece, start_bytes)
                .map_err(io_error("write data to", &self.path))?;
            self.data_end_bytes = self.data_end_bytes.max(end_bytes);
            return Ok(());
        }
        // Above `data_end_bytes` the file is still the hole `set_len` made.
        let punch_end_bytes = end_bytes.min(self.data_end_bytes);
        if start_bytes >= punch_end_bytes {
            return Ok(());
        }
        let length_bytes = punch_end_bytes - start_bytes;
        if self.punch_supported {
            let flags =
                rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE;
            match rustix::fs::fallocate(&self.file, flags, start_bytes, length_bytes) {
                Ok(()) => return Ok(()),
                Err(errno) if errno == rustix::io::Errno::OPNOTSUPP => {
                    self.punch_supported = false;
                }
                Err(errno) => return Err(io_error("punch hole in", &self.path)(errno.into())),
            }
        }
        let mut position = start_bytes;
        while position < punch_end_bytes {
            let step = (punch_end_bytes - position).min(ZEROS.len() as u64);
            let zeros = ZEROS
                .get(..usize::try_from(step).unwrap_or(0))
                .unwrap_or(&[]);
            self.file
                .write_all_at(zeros, position)
                .map_err(io_error("write zeros to", &self.path))?;
            position += step;
        }
        Ok(())
    }

    /// Appends the footer at the virtual size, makes the file and its directory entry durable
    /// (fdatasync, fsync of the parent directory) and returns what was written.
    pub fn finish(self) -> Result<FixedVhdInfo, VhdError> {
        self.file
            .write_all_at(&self.footer.encode(), self.virtual_size_bytes)
            .map_err(io_error("write footer to", &self.path))?;
        self.file
            .sync_data()
            .map_err(io_error("fdatasync", &self.path))?;
        sync_parent_dir(&self.path)?;
        Ok(FixedVhdInfo {
            virtual_size_bytes: self.virtual_size_bytes,
            file_size_bytes: self.virtual_size_bytes + FOOTER_BYTES as u64,
            footer: self.footer,
        })
    }
}

/// `data[start - data_offset .. end - data_offset]`; the caller keeps `[start, end)` inside
/// the data's extent, an empty slice otherwise.
pub(super) fn slice_of(
    data: &[u8],
    data_offset_bytes: u64,
    start_bytes: u64,
    end_bytes: u64,
) -> &[u8] {
    let from = usize::try_from(start_bytes.saturating_sub(data_offset_bytes)).unwrap_or(0);
    let to = usize::try_from(end_bytes.saturating_sub(data_offset_bytes)).unwrap_or(0);
    data.get(from..to).unwrap_or(&[])
}

pub(super) fn is_all_zero(bytes: &[u8]) -> bool {
    let mut words = bytes.chunks_exact(16);
    let words_zero = words
        .by_ref()
        .all(|word| <[u8; 16]>::try_from(word).is_ok_and(|w| u128::from_le_bytes(w) == 0));
    words_zero && words.remainder().iter().all(|&byte| byte == 0)
}

pub(super) fn sync_parent_dir(path: &Path) -> Result<(), VhdError> {
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    File::open(parent)
        .and_then(|dir| dir.sync_all())
        .map_err(io_error("fsync directory of", path))
}

/// Turns a raw disk image into a fixed VHD in place: extends it (with holes) to the next
/// multiple of 1 MiB, appends the footer, fdatasyncs. The data is not moved or rewritten.
///
/// Refuses an empty file and a file that already is a fixed VHD (so converting twice does not
/// turn the first footer into disk data). A crash before the footer is durable leaves a raw
/// image, possibly extended with zeros; converting it again is then correct.
pub fn convert_raw_to_fixed_vhd(
    path: &Path,
    options: &VhdCreateOptions,
) -> Result<FixedVhdInfo, VhdError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_error("open", path))?;
    convert_open_raw_to_fixed_vhd(&file, path, options)
}

/// [`convert_raw_to_fixed_vhd`] of a file already open for reading and writing (`path` only
/// names it in errors): for a file created through a directory handle, never reopened by path.
pub fn convert_open_raw_to_fixed_vhd(
    file: &File,
    path: &Path,
    options: &VhdCreateOptions,
) -> Result<FixedVhdInfo, VhdError> {
    let raw_size_bytes = file_len(file, path)?;
    if raw_size_bytes == 0 {
        return Err(VhdError::EmptyImage {
            path: path.to_path_buf(),
        });
    }
    if let Ok(info) = fixed_info_of_open_file(file, path, raw_size_bytes) {
        return Err(VhdError::AlreadyVhd {
            path: path.to_path_buf(),
            virtual_size_bytes: info.virtual_size_bytes,
        });
    }
    let virtual_size_bytes = fixed_vhd_virtual_size(raw_size_bytes);
    check_virtual_size(virtual_size_bytes)?;
    if virtual_size_bytes != raw_size_bytes {
        file.set_len(virtual_size_bytes)
            .map_err(io_error("extend", path))?;
    }
    let footer = VhdFooter::new_fixed(virtual_size_bytes, options);
    file.write_all_at(&footer.encode(), virtual_size_bytes)
        .map_err(io_error("write footer to", path))?;
    file.sync_data().map_err(io_error("fdatasync", path))?;
    Ok(FixedVhdInfo {
        virtual_size_bytes,
        file_size_bytes: virtual_size_bytes + FOOTER_BYTES as u64,
        footer,
    })
}

/// Creates the temporary OS disk of the re-protect flow: a fixed VHD of exactly 1 GiB
/// ([`TEMPORARY_OS_DISK_SIZE_BYTES`]) whose data is all hole, so it takes a few KiB on disk.
/// The file must not exist.
pub fn create_temporary_os_disk(path: &Path) -> Result<FixedVhdInfo, VhdError> {
    FixedVhdWriter::create(
        path,
        TEMPORARY_OS_DISK_SIZE_BYTES,
        &VhdCreateOptions::generate(),
    )?
    .finish()
}

/// Reads and validates the footer of a fixed VHD (a file or a block device): valid footer,
/// fixed disk type, current size in whole sectors and equal to the file length minus 512.
pub fn read_fixed_vhd_info(path: &Path) -> Result<FixedVhdInfo, VhdError> {
    let file = File::open(path).map_err(io_error("open", path))?;
    let file_size_bytes = file_len(&file, path)?;
    fixed_info_of_open_file(&file, path, file_size_bytes)
}

pub(super) fn fixed_info_of_open_file(
    file: &File,
    path: &Path,
    file_size_bytes: u64,
) -> Result<FixedVhdInfo, VhdError> {
    let footer_offset_bytes = file_size_bytes
        .checked_sub(FOOTER_BYTES as u64)
        .ok_or_else(|| VhdError::FileTooShort {
            path: path.to_path_buf(),
            file_size_bytes,
        })?;
    let mut bytes = [0u8; FOOTER_BYTES];
    file.read_exact_at(&mut bytes, footer_offset_bytes)
        .map_err(io_error("read footer of", path))?;
    let footer = VhdFooter::decode(&bytes).map_err(|source| VhdError::Footer {
        path: path.to_path_buf(),
        source,
    })?;
    if footer.disk_type != VhdDiskType::Fixed {
        return Err(VhdError::NotFixed {
            path: path.to_path_buf(),
            disk_type: footer.disk_type,
        });
    }
    if footer.current_size_bytes != footer_offset_bytes
        || !footer.current_size_bytes.is_multiple_of(SECTOR_BYTES)
    {
        return Err(VhdError::SizeMismatch {
            path: path.to_path_buf(),
            current_size_bytes: footer.current_size_bytes,
            file_size_bytes,
        });
    }
    Ok(FixedVhdInfo {
        virtual_size_bytes: footer.current_size_bytes,
        file_size_bytes,
        footer,
    })
}
