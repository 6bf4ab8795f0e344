//! One protected disk on the source host: an image file or a block device, read and written
//! in place. [`DiskFile`] is also the NBD export of a disk served without capture (`capture =
//! false`, to measure what capture costs); the export with capture is `export.rs`'s.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nbd_server::{BlockSizes, Export, Extent};

use super::{CaptureError, DiskConfig};

/// Largest NBD request this agent accepts (the NBD server's default).
pub const MAX_REQUEST_BYTES: u32 = 32 << 20;

/// Zeros for writing zero ranges where the filesystem or device cannot punch them.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// One disk, opened read-write.
#[derive(Debug)]
pub struct DiskFile {
    path: PathBuf,
    file: File,
    size_bytes: u64,
    block_size_bytes: u32,
}

impl DiskFile {
    /// Opens the disk named by `config`: it must exist, be a regular file or a block device,
    /// and be a non-zero multiple of the block size (512 or 4096).
    pub fn open(config: &DiskConfig) -> Result<Arc<Self>, CaptureError> {
        let path = config.path.clone();
        let fail = |what: &'static str, source: io::Error| CaptureError::Disk {
            path: path.clone(),
            what,
            source,
        };
        if !matches!(config.block_size_bytes, 512 | 4096) {
            return Err(CaptureError::Config(format!(
                "disk {}: block size {} bytes (must be 512 or 4096)",
                config.name, config.block_size_bytes
            )));
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| fail("opening", e))?;
        let kind = file.metadata().map_err(|e| fail("reading metadata", e))?;
        let kind = kind.file_type();
        if !kind.is_file() && !kind.is_block_device() {
            return Err(CaptureError::Config(format!(
                "disk {}: {} is neither a regular file nor a block device",
                config.name,
                path.display()
            )));
        }
        let size_bytes = file
            .seek(SeekFrom::End(0))
            .map_err(|e| fail("finding the size", e))?;
        let block = u64::from(config.block_size_bytes);
        if size_bytes == 0 || !size_bytes.is_multiple_of(block) {
            return Err(CaptureError::Config(format!(
                "disk {}: {} is {size_bytes} bytes, not a non-zero multiple of its block size \
                 {block}",
                config.name,
                path.display()
            )));
        }
        Ok(Arc::new(Self {
            path,
            file,
            size_bytes,
            block_size_bytes: config.block_size_bytes,
        }))
    }

    /// The disk's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The disk's size.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// The open file (for hashing).
    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// The disk's logical block size.
    pub fn block_size_bytes(&self) -> u32 {
        self.block_size_bytes
    }

    /// Reads exactly `out.len()` bytes at `offset_bytes`.
    pub fn read_exact_at(&self, offset_bytes: u64, out: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(out, offset_bytes)
    }

    /// Writes all of `data` at `offset_bytes`.
    pub fn write_all_at(&self, offset_bytes: u64, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, offset_bytes)
    }

    /// Makes every completed write durable (fdatasync).
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Makes `[offset, offset + length)` read as zeros: punched where the file system or
    /// device can, written with zeros where it cannot.
    pub fn zero(&self, offset_bytes: u64, length_bytes: u64) -> io::Result<()> {
        let (Ok(offset), Ok(length)) = (
            libc::off_t::try_from(offset_bytes),
            libc::off_t::try_from(length_bytes),
        ) else {
            return Err(io::Error::from_raw_os_error(libc::EOVERFLOW));
        };
        // SAFETY: fallocate on an fd we own; no memory is passed.
        let punched = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                length,
            )
        };
        if punched == 0 {
            return Ok(());
        }
        let mut done = 0;
        while done < length_bytes {
            let piece = (length_bytes - done).min(ZEROS.len() as u64) as usize;
            self.file
                .write_all_at(&ZEROS[..piece], offset_bytes + done)?;
            done += piece as u64;
        }
        Ok(())
    }

    /// Refuses a range that does not lie inside the disk (EINVAL).
    pub(super) fn check(&self, offset_bytes: u64, length_bytes: u64) -> io::Result<()> {
        match offset_bytes.checked_add(length_bytes) {
            Some(end) if end <= self.size_bytes => Ok(()),
            _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }
}

/// Any alignment is accepted (a client with 512-byte sectors on a 4096-byte disk works: an
/// unaligned write reaches the stream as the whole blocks read back from the disk); whole
/// blocks are preferred.
fn block_sizes(block_size_bytes: u32) -> BlockSizes {
    BlockSizes {
        minimum_bytes: 1,
        preferred_bytes: block_size_bytes.max(4096),
        maximum_bytes: MAX_REQUEST_BYTES,
    }
}

fn all_data(length_bytes: u64, out: &mut Vec<Extent>) {
    out.push(Extent {
        length_bytes,
        hole: false,
        zero: false,
    });
}

impl Export for DiskFile {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// A flush on any connection syncs the one file every connection writes.
    fn multi_conn(&self) -> bool {
        true
    }

    fn read_only(&self) -> bool {
        false
    }

    fn block_sizes(&self) -> BlockSizes {
        block_sizes(self.block_size_bytes)
    }

    fn read_at(&self, offset_bytes: u64, out: &mut [u8]) -> io::Result<()> {
        self.check(offset_bytes, out.len() as u64)?;
        self.read_exact_at(offset_bytes, out)
    }

    fn write_at(&self, offset_bytes: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.check(offset_bytes, data.len() as u64)?;
        self.write_all_at(offset_bytes, data)?;
        if fua { self.sync() } else { Ok(()) }
    }

    fn flush(&self) -> io::Result<()> {
        self.sync()
    }

    fn trim(&self, offset_bytes: u64, length_bytes: u64, fua: bool) -> io::Result<()> {
        self.write_zeroes(offset_bytes, length_bytes, fua)
    }

    fn write_zeroes(&self, offset_bytes: u64, length_bytes: u64, fua: bool) -> io::Result<()> {
        self.check(offset_bytes, length_bytes)?;
        self.zero(offset_bytes, length_bytes)?;
        if fua { self.sync() } else { Ok(()) }
    }

    fn block_status(
        &self,
        _offset_bytes: u64,
        length_bytes: u64,
        out: &mut Vec<Extent>,
    ) -> io::Result<()> {
        all_data(length_bytes, out);
        Ok(())
    }
}
