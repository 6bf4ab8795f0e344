//! Fixed VHD: the disk format Hyper-V and Azure use, as the output of materialize and as the
//! temporary OS disk of re-protect.
//!
//! A *fixed* VHD (Microsoft "Virtual Hard Disk Image Format Specification", v1.0) is the raw
//! disk content followed by one 512-byte footer. There is no header and no block table:
//!
//! ```text
//!  offset 0                                   virtual_size_bytes          + 512
//!  ├──────────── raw disk data (sparse) ──────────────┼──── footer (512 B) ────┤
//! ```
//!
//! The footer, every integer big-endian as the specification requires:
//!
//! ```text
//!  off  len  field                  value written here
//!  ───  ───  ─────────────────────  ───────────────────────────────────────────────
//!    0    8  cookie                 "conectix"
//!    8    4  features               0x0000_0002 (the "reserved" bit, always set)
//!   12    4  file format version    0x0001_0000
//!   16    8  data offset            0xFFFF_FFFF_FFFF_FFFF (fixed disks have none)
//!   24    4  timestamp              seconds since 2000-01-01 00:00:00 UTC
//!   28    4  creator application    "win " (see below)
//!   32    4  creator version        0x000A_0000 (what Hyper-V 10.0 writes)
//!   36    4  creator host OS        "Wi2k"
//!   40    8  original size          virtual size in bytes
//!   48    8  current size           virtual size in bytes (authoritative)
//!   56    4  disk geometry          cylinders u16, heads u8, sectors per track u8
//!   60    4  disk type              2 = fixed
//!   64    4  checksum               !(sum of all 512 bytes with this field zero)
//!   68   16  unique id              random GUID bytes
//!   84    1  saved state            0
//!   85  427  reserved               zero
//! ```
//!
//! Invariants this module keeps:
//! - every VHD it writes has `file length == virtual_size_bytes + 512`, a virtual size that is
//!   a non-zero multiple of 1 MiB ([`AZURE_ALIGNMENT_BYTES`], which Azure requires) and at most
//!   [`MAX_VIRTUAL_SIZE_BYTES`], and a footer that [`VhdFooter::decode`] accepts;
//! - data regions never written, or written as whole 4 KiB blocks of zeros, stay holes in the
//!   file (nothing is allocated for them), so a mostly-empty disk costs almost no space;
//! - the decoder never panics, whatever the bytes; it names what is wrong ([`FooterError`],
//!   [`VhdError`]). [`read_fixed_vhd_info`] accepts VHDs from other writers (qemu-img, Hyper-V)
//!   as long as they are fixed and consistent with the file length; it does not require the
//!   1 MiB alignment, which [`FixedVhdInfo::is_azure_aligned`] reports separately;
//! - files are created with `O_EXCL`: nothing here overwrites an existing disk, except
//!   [`convert_raw_to_fixed_vhd`], which by its purpose rewrites the file it is given.
//!
//! # Current size versus CHS geometry, and the creator application
//!
//! A VHD states its size twice: the *current size* field, and the CHS geometry
//! (cylinders × heads × sectors per track × 512). The geometry is computed from the size with
//! the specification's algorithm ([`ChsGeometry::for_size_bytes`]), which rounds *down*, so
//! for most sizes the CHS product is smaller than the current size (1 GiB: 2080 × 16 × 63
//! sectors = 1 073 479 680 bytes, 256 KiB short). Virtual PC sized disks by the geometry;
//! Hyper-V and Azure use the current size. qemu decides which one to trust from the creator
//! application field (and always uses the current size when the geometry is the maximum one):
//!
//! - qemu up to 9.2 uses the current size only for an allow-list: `"win "` (Hyper-V),
//!   `"qem2"`, `"d2v "`, `"CTXS"`, `"tap\0"`; any other name, including `"qemu"` and a name of
//!   our own such as `"drap"`, is sized by its CHS product;
//! - qemu 10.0 and later (commit "vpc: Read images exported from Azure correctly") inverted
//!   the rule: only `"vpc "` and `"qemu"` are sized by CHS, every other name by current size.
//!
//! We therefore write creator application `"win "` with host OS `"Wi2k"` and creator version
//! 10.0, byte for byte what Hyper-V writes: our disks are Hyper-V-style disks whose current
//! size is authoritative, and `"win "` is a name that every qemu version, Hyper-V and Azure
//! size by the current size. A private name such as `"drap"` would identify our files, but
//! the qemu-img of Debian 12 or Ubuntu 24.04 (7.2, 8.2) would see such a disk 256 KiB (or
//! more) too small and truncate it on conversion. `engine/tests/vhd_qemu.rs` checks what the
//! installed `qemu-img` reports for `"win "`, `"drap"`, `"qemu"` and `"vpc "`. The geometry we
//! write is still the specification's, as Hyper-V writes it.
//!
//! When *reading*, the current size is the virtual size: qemu-img itself, when it creates a
//! fixed VHD without `force_size`, rounds the size *up* to a CHS product and stores that
//! product as the current size, so the current size is right for its images too.

use std::fs::{File, OpenOptions};
use std::hash::BuildHasher;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

mod footer;
mod writer;

pub use footer::{FooterError, VhdFooter, footer_checksum};
pub use writer::{
    FixedVhdWriter, convert_open_raw_to_fixed_vhd, convert_raw_to_fixed_vhd,
    create_temporary_os_disk, read_fixed_vhd_info,
};

/// Size of the footer, in bytes.
pub const FOOTER_BYTES: usize = 512;
/// Size of a VHD sector, in bytes: sizes in the footer are multiples of it.
pub const SECTOR_BYTES: u64 = 512;
/// Azure accepts only VHDs whose virtual size is a multiple of this (1 MiB).
pub const AZURE_ALIGNMENT_BYTES: u64 = 1 << 20;
/// Virtual size of the temporary OS disk of the re-protect flow: exactly 1 GiB.
pub const TEMPORARY_OS_DISK_SIZE_BYTES: u64 = 1 << 30;
/// Upper bound of the virtual size this module writes (64 TiB); above what Azure accepts
/// (32 767 GiB) and what Hyper-V makes as VHD (2040 GiB), it only guards arithmetic and typos.
pub const MAX_VIRTUAL_SIZE_BYTES: u64 = 64 << 40;

/// The footer's cookie.
pub const COOKIE: [u8; 8] = *b"conectix";
/// The features field: only the reserved bit, which the specification says is always set.
pub const FEATURES_RESERVED: u32 = 0x0000_0002;
/// File format version 1.0, the only one that exists.
pub const FILE_FORMAT_VERSION: u32 = 0x0001_0000;
/// Data offset of a fixed disk: none.
pub const FIXED_DATA_OFFSET: u64 = u64::MAX;
/// Creator application we write: Hyper-V's, so that every reader trusts the current size
/// (module doc, "Current size versus CHS geometry").
pub const CREATOR_APPLICATION: [u8; 4] = *b"win ";
/// Creator version we write: 10.0, as Hyper-V on Windows Server 2016 and later.
pub const CREATOR_VERSION: u32 = 0x000A_0000;
/// Creator host OS we write: "Wi2k" (Windows), as Hyper-V and qemu-img write.
pub const CREATOR_HOST_OS: [u8; 4] = *b"Wi2k";
/// 2000-01-01 00:00:00 UTC, the VHD epoch, in seconds since the Unix epoch.
pub const VHD_EPOCH_UNIX_SECONDS: u64 = 946_684_800;

/// Granule of hole tracking: whole blocks of zeros of this size become holes.
const HOLE_GRANULE_BYTES: u64 = 4096;
/// Zeros written where punching a hole is not supported.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

// Footer field offsets (module doc).
const OFF_COOKIE: usize = 0;
const OFF_FEATURES: usize = 8;
const OFF_VERSION: usize = 12;
const OFF_DATA_OFFSET: usize = 16;
const OFF_TIMESTAMP: usize = 24;
const OFF_CREATOR_APP: usize = 28;
const OFF_CREATOR_VERSION: usize = 32;
const OFF_CREATOR_OS: usize = 36;
const OFF_ORIGINAL_SIZE: usize = 40;
const OFF_CURRENT_SIZE: usize = 48;
const OFF_CYLINDERS: usize = 56;
const OFF_HEADS: usize = 58;
const OFF_SECTORS_PER_TRACK: usize = 59;
const OFF_DISK_TYPE: usize = 60;
const OFF_CHECKSUM: usize = 64;
const OFF_UNIQUE_ID: usize = 68;
const OFF_SAVED_STATE: usize = 84;

/// Rounds a data size up to the virtual size of a fixed VHD Azure accepts: the next multiple
/// of 1 MiB ([`AZURE_ALIGNMENT_BYTES`]). `0` stays `0` (which the writers refuse).
///
/// Saturates at the largest multiple of 1 MiB for sizes within 1 MiB of `u64::MAX`; such a size
/// is far above [`MAX_VIRTUAL_SIZE_BYTES`], so every writer refuses it anyway.
pub fn fixed_vhd_virtual_size(data_size_bytes: u64) -> u64 {
    data_size_bytes
        .div_ceil(AZURE_ALIGNMENT_BYTES)
        .checked_mul(AZURE_ALIGNMENT_BYTES)
        .unwrap_or(u64::MAX / AZURE_ALIGNMENT_BYTES * AZURE_ALIGNMENT_BYTES)
}

/// The `disk type` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VhdDiskType {
    /// 2: data then footer.
    Fixed,
    /// 3: header and block allocation table.
    Dynamic,
    /// 4: dynamic with a parent.
    Differencing,
    /// Any other value (0 none, 1/5/6 reserved, or garbage).
    Other(u32),
}

impl VhdDiskType {
    /// The field's value.
    pub fn to_u32(self) -> u32 {
        match self {
            Self::Fixed => 2,
            Self::Dynamic => 3,
            Self::Differencing => 4,
            Self::Other(value) => value,
        }
    }

    /// Interprets the field's value.
    pub fn from_u32(value: u32) -> Self {
        match value {
            2 => Self::Fixed,
            3 => Self::Dynamic,
            4 => Self::Differencing,
            other => Self::Other(other),
        }
    }
}

/// The CHS disk geometry of the footer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChsGeometry {
    /// Cylinders.
    pub cylinders: u16,
    /// Heads.
    pub heads: u8,
    /// Sectors per track.
    pub sectors_per_track: u8,
}

impl ChsGeometry {
    /// The geometry the specification's algorithm (appendix "CHS Calculation") gives for a disk
    /// of `size_bytes`. It rounds down, and is capped at 65535 × 16 × 255 sectors (≈ 127 GiB):
    /// larger disks all get that maximum geometry.
    pub fn for_size_bytes(size_bytes: u64) -> Self {
        const MAX_SECTORS: u64 = 65_535 * 16 * 255;
        let total_sectors = (size_bytes / SECTOR_BYTES).min(MAX_SECTORS);
        let (sectors_per_track, heads, cylinders_times_heads): (u64, u64, u64);
        if total_sectors >= 65_535 * 16 * 63 {
            sectors_per_track = 255;
            heads = 16;
            cylinders_times_heads = total_sectors / sectors_per_track;
        } else {
            let mut spt = 17;
            let mut cth = total_sectors / spt;
            let mut h = cth.div_ceil(1024).max(4);
            if cth >= h * 1024 || h > 16 {
                spt = 31;
                h = 16;
                cth = total_sectors / spt;
            }
            if cth >= h * 1024 {
                spt = 63;
                h = 16;
                cth = total_sectors / spt;
            }
            sectors_per_track = spt;
            heads = h;
            cylinders_times_heads = cth;
        }
        // The branches above bound every value to its field (cylinders ≤ 65535, heads ≤ 16,
        // sectors ≤ 255); the saturating conversions never trigger.
        Self {
            cylinders: u16::try_from(cylinders_times_heads / heads).unwrap_or(u16::MAX),
            heads: u8::try_from(heads).unwrap_or(u8::MAX),
            sectors_per_track: u8::try_from(sectors_per_track).unwrap_or(u8::MAX),
        }
    }

    /// Cylinders × heads × sectors per track.
    pub fn total_sectors(&self) -> u64 {
        u64::from(self.cylinders) * u64::from(self.heads) * u64::from(self.sectors_per_track)
    }

    /// The size the geometry describes, in bytes (what Virtual PC, and qemu for unknown creator
    /// applications, take as the disk size).
    pub fn size_bytes(&self) -> u64 {
        self.total_sectors() * SECTOR_BYTES
    }
}

/// The per-disk values of a footer that are not derived from the size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhdCreateOptions {
    /// Identity of the new disk.
    pub unique_id: [u8; 16],
    /// Creation time, in seconds since 2000-01-01 00:00:00 UTC.
    pub timestamp_vhd_seconds: u32,
    /// Creator application; [`CREATOR_APPLICATION`] unless a test wants to see what readers do
    /// with another one.
    pub creator_application: [u8; 4],
}

impl VhdCreateOptions {
    /// Options with a fresh random GUID (version 4 layout) and the current time. Deterministic
    /// callers (the simulator, tests) build the struct themselves.
    pub fn generate() -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let now = SystemTime::now();
        let since_unix = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        // Per-process random keys (std's RandomState), mixed with time, pid and a counter.
        let seed = std::collections::hash_map::RandomState::new().hash_one((
            since_unix.as_nanos(),
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
        ));
        let mut unique_id =
            xxhash_rust::xxh3::xxh3_128_with_seed(&since_unix.as_nanos().to_le_bytes(), seed)
                .to_le_bytes();
        unique_id[6] = (unique_id[6] & 0x0F) | 0x40; // version 4
        unique_id[8] = (unique_id[8] & 0x3F) | 0x80; // RFC 4122 variant
        Self {
            unique_id,
            timestamp_vhd_seconds: vhd_timestamp(now),
            creator_application: CREATOR_APPLICATION,
        }
    }
}

/// Seconds since 2000-01-01 00:00:00 UTC, saturating (0 before 2000, `u32::MAX` after 2136).
pub fn vhd_timestamp(time: SystemTime) -> u32 {
    let unix_seconds = time
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    u32::try_from(unix_seconds.saturating_sub(VHD_EPOCH_UNIX_SECONDS)).unwrap_or(u32::MAX)
}

/// A validated fixed VHD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FixedVhdInfo {
    /// Size of the disk the VHD holds (the footer's current size).
    pub virtual_size_bytes: u64,
    /// Length of the file: `virtual_size_bytes + 512`.
    pub file_size_bytes: u64,
    /// The decoded footer.
    pub footer: VhdFooter,
}

impl FixedVhdInfo {
    /// Whether Azure accepts the size: a non-zero multiple of 1 MiB.
    pub fn is_azure_aligned(&self) -> bool {
        self.virtual_size_bytes != 0
            && self
                .virtual_size_bytes
                .is_multiple_of(AZURE_ALIGNMENT_BYTES)
    }
}

/// What went wrong creating, writing or reading a VHD file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VhdError {
    /// A system call failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done ("open", "write data", "write footer", ...).
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The last 512 bytes are not a valid footer.
    #[error("{path}: invalid VHD footer")]
    Footer {
        /// The file.
        path: PathBuf,
        /// What is wrong with the footer.
        #[source]
        source: FooterError,
    },
    /// A valid footer of a dynamic or differencing disk.
    #[error("{path}: VHD disk type {disk_type:?}, only fixed disks are supported")]
    NotFixed {
        /// The file.
        path: PathBuf,
        /// The footer's disk type.
        disk_type: VhdDiskType,
    },
    /// Shorter than a footer.
    #[error("{path}: {file_size_bytes} bytes, too short for a VHD footer")]
    FileTooShort {
        /// The file.
        path: PathBuf,
        /// Its length.
        file_size_bytes: u64,
    },
    /// The footer's current size does not match the file's length, or is not whole sectors.
    #[error(
        "{path}: footer current size {current_size_bytes} inconsistent with file length \
         {file_size_bytes} (expected current size + 512, in whole 512-byte sectors)"
    )]
    SizeMismatch {
        /// The file.
        path: PathBuf,
        /// The footer's current size.
        current_size_bytes: u64,
        /// The file's length.
        file_size_bytes: u64,
    },
    /// A virtual size this module will not write.
    #[error(
        "virtual size {virtual_size_bytes} bytes: must be a non-zero multiple of 1 MiB \
         and at most {MAX_VIRTUAL_SIZE_BYTES}"
    )]
    InvalidVirtualSize {
        /// The size asked for.
        virtual_size_bytes: u64,
    },
    /// A write outside `[0, virtual size)`.
    #[error(
        "write of {length_bytes} bytes at {offset_bytes} outside the virtual disk \
         ({virtual_size_bytes} bytes)"
    )]
    WriteOutOfRange {
        /// Offset of the write.
        offset_bytes: u64,
        /// Length of the write.
        length_bytes: u64,
        /// The disk's virtual size.
        virtual_size_bytes: u64,
    },
    /// In-place conversion of a file that already is a fixed VHD.
    #[error("{path}: already a fixed VHD of {virtual_size_bytes} bytes, not converting again")]
    AlreadyVhd {
        /// The file.
        path: PathBuf,
        /// Its virtual size.
        virtual_size_bytes: u64,
    },
    /// In-place conversion of an empty file.
    #[error("{path}: empty raw image, nothing to convert")]
    EmptyImage {
        /// The file.
        path: PathBuf,
    },
}

fn io_error<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> VhdError + 'a {
    move |source| VhdError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn check_virtual_size(virtual_size_bytes: u64) -> Result<(), VhdError> {
    if virtual_size_bytes == 0
        || !virtual_size_bytes.is_multiple_of(AZURE_ALIGNMENT_BYTES)
        || virtual_size_bytes > MAX_VIRTUAL_SIZE_BYTES
    {
        return Err(VhdError::InvalidVirtualSize { virtual_size_bytes });
    }
    Ok(())
}

/// Length of a regular file or block device (seeking to the end works for both).
fn file_len(file: &File, path: &Path) -> Result<u64, VhdError> {
    let mut handle = file;
    handle
        .seek(SeekFrom::End(0))
        .map_err(io_error("seek", path))
}

#[cfg(test)]
mod tests;
