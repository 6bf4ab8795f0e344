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

/// The 512-byte footer, decoded. The checksum is not a field: [`VhdFooter::encode`] computes
/// it and [`VhdFooter::decode`] verifies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhdFooter {
    /// Features bit field; [`FEATURES_RESERVED`] at least.
    pub features: u32,
    /// [`FILE_FORMAT_VERSION`].
    pub file_format_version: u32,
    /// Offset of the dynamic-disk header; [`FIXED_DATA_OFFSET`] for fixed disks.
    pub data_offset: u64,
    /// Creation time, in seconds since 2000-01-01 00:00:00 UTC.
    pub timestamp_vhd_seconds: u32,
    /// Four ASCII bytes naming the writer.
    pub creator_application: [u8; 4],
    /// Version of the writer (major in the high 16 bits).
    pub creator_version: u32,
    /// Four ASCII bytes naming the host OS of the writer.
    pub creator_host_os: [u8; 4],
    /// Size of the disk at creation, in bytes.
    pub original_size_bytes: u64,
    /// Size of the disk now, in bytes: the virtual size.
    pub current_size_bytes: u64,
    /// CHS geometry.
    pub geometry: ChsGeometry,
    /// Disk type.
    pub disk_type: VhdDiskType,
    /// Identity of the disk (a GUID's bytes).
    pub unique_id: [u8; 16],
    /// 1 when the disk is in a saved state.
    pub saved_state: u8,
}

/// Why 512 bytes are not a valid footer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FooterError {
    /// Not exactly [`FOOTER_BYTES`] bytes.
    #[error("footer is {length_bytes} bytes, expected {FOOTER_BYTES}")]
    WrongLength {
        /// Length given.
        length_bytes: usize,
    },
    /// The first 8 bytes are not "conectix".
    #[error("bad footer cookie {found:02x?}, expected \"conectix\"")]
    BadCookie {
        /// The 8 bytes found.
        found: [u8; 8],
    },
    /// The stored checksum does not match the bytes.
    #[error("footer checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    BadChecksum {
        /// Checksum stored in the footer.
        stored: u32,
        /// Checksum of the footer's bytes.
        computed: u32,
    },
    /// A file format version other than 1.x.
    #[error("unsupported VHD file format version {version:#010x}, expected 0x00010000")]
    UnsupportedVersion {
        /// The version found.
        version: u32,
    },
}

/// The one's complement of the byte sum of a footer, with its checksum field taken as zero.
pub fn footer_checksum(footer: &[u8; FOOTER_BYTES]) -> u32 {
    let sum = footer
        .iter()
        .enumerate()
        .filter(|(index, _)| !(OFF_CHECKSUM..OFF_CHECKSUM + 4).contains(index))
        .fold(0u32, |sum, (_, &byte)| sum.wrapping_add(u32::from(byte)));
    !sum
}

// The VHD specification mandates big-endian integers in the footer; this is the only place of
// the workspace that reads or writes them.
#[allow(clippy::big_endian_bytes)]
impl VhdFooter {
    /// A footer for a fixed disk of `virtual_size_bytes`, as this module writes it.
    pub fn new_fixed(virtual_size_bytes: u64, options: &VhdCreateOptions) -> Self {
        Self {
            features: FEATURES_RESERVED,
            file_format_version: FILE_FORMAT_VERSION,
            data_offset: FIXED_DATA_OFFSET,
            timestamp_vhd_seconds: options.timestamp_vhd_seconds,
            creator_application: options.creator_application,
            creator_version: CREATOR_VERSION,
            creator_host_os: CREATOR_HOST_OS,
            original_size_bytes: virtual_size_bytes,
            current_size_bytes: virtual_size_bytes,
            geometry: ChsGeometry::for_size_bytes(virtual_size_bytes),
            disk_type: VhdDiskType::Fixed,
            unique_id: options.unique_id,
            saved_state: 0,
        }
    }

    /// The 512 bytes of this footer, checksum included.
    pub fn encode(&self) -> [u8; FOOTER_BYTES] {
        let mut out = [0u8; FOOTER_BYTES];
        put(&mut out, OFF_COOKIE, &COOKIE);
        put(&mut out, OFF_FEATURES, &self.features.to_be_bytes());
        put(
            &mut out,
            OFF_VERSION,
            &self.file_format_version.to_be_bytes(),
        );
        put(&mut out, OFF_DATA_OFFSET, &self.data_offset.to_be_bytes());
        put(
            &mut out,
            OFF_TIMESTAMP,
            &self.timestamp_vhd_seconds.to_be_bytes(),
        );
        put(&mut out, OFF_CREATOR_APP, &self.creator_application);
        put(
            &mut out,
            OFF_CREATOR_VERSION,
            &self.creator_version.to_be_bytes(),
        );
        put(&mut out, OFF_CREATOR_OS, &self.creator_host_os);
        put(
            &mut out,
            OFF_ORIGINAL_SIZE,
            &self.original_size_bytes.to_be_bytes(),
        );
        put(
            &mut out,
            OFF_CURRENT_SIZE,
            &self.current_size_bytes.to_be_bytes(),
        );
        put(
            &mut out,
            OFF_CYLINDERS,
            &self.geometry.cylinders.to_be_bytes(),
        );
        put(&mut out, OFF_HEADS, &[self.geometry.heads]);
        put(
            &mut out,
            OFF_SECTORS_PER_TRACK,
            &[self.geometry.sectors_per_track],
        );
        put(
            &mut out,
            OFF_DISK_TYPE,
            &self.disk_type.to_u32().to_be_bytes(),
        );
        put(&mut out, OFF_UNIQUE_ID, &self.unique_id);
        put(&mut out, OFF_SAVED_STATE, &[self.saved_state]);
        let checksum = footer_checksum(&out);
        put(&mut out, OFF_CHECKSUM, &checksum.to_be_bytes());
        out
    }

    /// Decodes and verifies a footer: length, cookie, checksum, version. Any disk type is
    /// accepted here; [`read_fixed_vhd_info`] requires a fixed one. Never panics.
    pub fn decode(bytes: &[u8]) -> Result<Self, FooterError> {
        let footer: &[u8; FOOTER_BYTES] =
            bytes.try_into().map_err(|_| FooterError::WrongLength {
                length_bytes: bytes.len(),
            })?;
        let cookie: [u8; 8] = field(footer, OFF_COOKIE);
        if cookie != COOKIE {
            return Err(FooterError::BadCookie { found: cookie });
        }
        let stored = u32::from_be_bytes(field(footer, OFF_CHECKSUM));
        let computed = footer_checksum(footer);
        if stored != computed {
            return Err(FooterError::BadChecksum { stored, computed });
        }
        let file_format_version = u32::from_be_bytes(field(footer, OFF_VERSION));
        if file_format_version >> 16 != FILE_FORMAT_VERSION >> 16 {
            return Err(FooterError::UnsupportedVersion {
                version: file_format_version,
            });
        }
        Ok(Self {
            features: u32::from_be_bytes(field(footer, OFF_FEATURES)),
            file_format_version,
            data_offset: u64::from_be_bytes(field(footer, OFF_DATA_OFFSET)),
            timestamp_vhd_seconds: u32::from_be_bytes(field(footer, OFF_TIMESTAMP)),
            creator_application: field(footer, OFF_CREATOR_APP),
            creator_version: u32::from_be_bytes(field(footer, OFF_CREATOR_VERSION)),
            creator_host_os: field(footer, OFF_CREATOR_OS),
            original_size_bytes: u64::from_be_bytes(field(footer, OFF_ORIGINAL_SIZE)),
            current_size_bytes: u64::from_be_bytes(field(footer, OFF_CURRENT_SIZE)),
            geometry: ChsGeometry {
                cylinders: u16::from_be_bytes(field(footer, OFF_CYLINDERS)),
                heads: footer[OFF_HEADS],
                sectors_per_track: footer[OFF_SECTORS_PER_TRACK],
            },
            disk_type: VhdDiskType::from_u32(u32::from_be_bytes(field(footer, OFF_DISK_TYPE))),
            unique_id: field(footer, OFF_UNIQUE_ID),
            saved_state: footer[OFF_SAVED_STATE],
        })
    }
}

/// Copies `value` into the footer at `offset` (constant offsets inside the 512 bytes).
fn put(footer: &mut [u8; FOOTER_BYTES], offset: usize, value: &[u8]) {
    footer[offset..offset + value.len()].copy_from_slice(value);
}

/// The `N` bytes of the footer at `offset` (constant offsets inside the 512 bytes).
fn field<const N: usize>(footer: &[u8; FOOTER_BYTES], offset: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&footer[offset..offset + N]);
    out
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
    #[error("{op} {path}: {source}")]
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
    #[error("{path}: invalid VHD footer: {source}")]
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
    fn flush_run(
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
fn slice_of(data: &[u8], data_offset_bytes: u64, start_bytes: u64, end_bytes: u64) -> &[u8] {
    let from = usize::try_from(start_bytes.saturating_sub(data_offset_bytes)).unwrap_or(0);
    let to = usize::try_from(end_bytes.saturating_sub(data_offset_bytes)).unwrap_or(0);
    data.get(from..to).unwrap_or(&[])
}

fn is_all_zero(bytes: &[u8]) -> bool {
    let mut words = bytes.chunks_exact(16);
    let words_zero = words
        .by_ref()
        .all(|word| <[u8; 16]>::try_from(word).is_ok_and(|w| u128::from_le_bytes(w) == 0));
    words_zero && words.remainder().iter().all(|&byte| byte == 0)
}

fn sync_parent_dir(path: &Path) -> Result<(), VhdError> {
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

fn fixed_info_of_open_file(
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;

    fn options() -> VhdCreateOptions {
        VhdCreateOptions {
            unique_id: *b"0123456789abcdef",
            timestamp_vhd_seconds: 0x3294_d7cb,
            creator_application: CREATOR_APPLICATION,
        }
    }

    #[test]
    fn footer_round_trips() {
        let footer = VhdFooter::new_fixed(GIB, &options());
        let bytes = footer.encode();
        assert_eq!(&bytes[..8], b"conectix");
        assert_eq!(VhdFooter::decode(&bytes).unwrap(), footer);
        // Every field at its place, big-endian.
        assert_eq!(&bytes[8..16], &[0, 0, 0, 2, 0, 1, 0, 0]);
        assert_eq!(&bytes[16..24], &[0xFF; 8]);
        assert_eq!(&bytes[24..28], &[0x32, 0x94, 0xd7, 0xcb]);
        assert_eq!(&bytes[28..40], b"win \x00\x0a\x00\x00Wi2k");
        assert_eq!(&bytes[40..48], &[0, 0, 0, 0, 0x40, 0, 0, 0]); // 1 GiB, big-endian
        assert_eq!(&bytes[48..56], &[0, 0, 0, 0, 0x40, 0, 0, 0]);
        assert_eq!(&bytes[56..60], &[0x08, 0x20, 16, 63]); // 2080 / 16 / 63
        assert_eq!(&bytes[60..64], &[0, 0, 0, 2]);
        assert_eq!(&bytes[68..84], b"0123456789abcdef");
        assert!(bytes[84..].iter().all(|&b| b == 0));
    }

    #[test]
    fn checksum_matches_spec_definition() {
        let bytes = VhdFooter::new_fixed(10 * MIB, &options()).encode();
        let sum: u32 = bytes
            .iter()
            .enumerate()
            .filter(|(i, _)| !(64..68).contains(i))
            .map(|(_, &b)| u32::from(b))
            .sum();
        let stored = bytes[64..68]
            .iter()
            .fold(0u32, |acc, &b| (acc << 8) | u32::from(b));
        assert_eq!(stored, !sum);
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let bytes = VhdFooter::new_fixed(GIB, &options()).encode();
        for index in 0..FOOTER_BYTES {
            let mut corrupt = bytes;
            corrupt[index] ^= 0x01;
            let err = VhdFooter::decode(&corrupt).unwrap_err();
            if index < 8 {
                assert!(
                    matches!(err, FooterError::BadCookie { .. }),
                    "{index}: {err}"
                );
            } else {
                assert!(
                    matches!(err, FooterError::BadChecksum { .. }),
                    "{index}: {err}"
                );
            }
        }
    }

    #[test]
    fn decode_errors_are_typed() {
        assert_eq!(
            VhdFooter::decode(&[0u8; 511]),
            Err(FooterError::WrongLength { length_bytes: 511 })
        );
        assert!(matches!(
            VhdFooter::decode(&[0u8; 512]),
            Err(FooterError::BadCookie { .. })
        ));
        let mut footer = VhdFooter::new_fixed(GIB, &options());
        footer.file_format_version = 0x0002_0000;
        assert_eq!(
            VhdFooter::decode(&footer.encode()),
            Err(FooterError::UnsupportedVersion {
                version: 0x0002_0000
            })
        );
        footer.file_format_version = FILE_FORMAT_VERSION;
        footer.disk_type = VhdDiskType::Dynamic;
        assert_eq!(
            VhdFooter::decode(&footer.encode()).unwrap().disk_type,
            VhdDiskType::Dynamic
        );
    }

    #[test]
    fn decoder_never_panics_on_arbitrary_bytes() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        for round in 0..2000u64 {
            let mut bytes = VhdFooter::new_fixed(GIB, &options()).encode();
            for _ in 0..(round % 7) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                bytes[(state % 512) as usize] = (state >> 32) as u8;
            }
            let length = if round.is_multiple_of(5) {
                (state % 600) as usize
            } else {
                512
            };
            let input: Vec<u8> = bytes.iter().copied().cycle().take(length).collect();
            let _ = VhdFooter::decode(&input);
        }
    }

    #[test]
    fn chs_geometry_follows_the_spec() {
        let chs = |size| {
            let g = ChsGeometry::for_size_bytes(size);
            (g.cylinders, g.heads, g.sectors_per_track)
        };
        // 1 GiB: 2097152 sectors → 63 sectors/track, 16 heads, 2080 cylinders (rounded down).
        assert_eq!(chs(GIB), (2080, 16, 63));
        assert_eq!(ChsGeometry::for_size_bytes(GIB).size_bytes(), 1_073_479_680);
        // What qemu-img picks for "1G" without force_size: the smallest CHS product ≥ 1 GiB,
        // 2081 × 16 × 63, which the algorithm maps to itself.
        assert_eq!(chs(2081 * 16 * 63 * 512), (2081, 16, 63));
        // Small disks: 17 sectors/track, at least 4 heads.
        assert_eq!(chs(10 * MIB), (301, 4, 17));
        assert_eq!(chs(MIB), (30, 4, 17));
        // From 65535 × 16 × 255 sectors (≈ 127.5 GiB) on: the maximum geometry.
        assert_eq!(chs(127 * GIB), (65278, 16, 255));
        assert_eq!(chs(128 * GIB), (65535, 16, 255));
        assert_eq!(chs(2 << 40), (65535, 16, 255));
        assert_eq!(chs(0), (0, 4, 17));
        // The product never exceeds the size.
        for size in [
            MIB,
            3 * MIB,
            100 * MIB,
            500 * MIB,
            4 * GIB,
            40 * GIB,
            126 * GIB,
        ] {
            assert!(
                ChsGeometry::for_size_bytes(size).size_bytes() <= size,
                "{size}"
            );
        }
    }

    #[test]
    fn virtual_size_rounds_up_to_mib() {
        assert_eq!(fixed_vhd_virtual_size(0), 0);
        assert_eq!(fixed_vhd_virtual_size(1), MIB);
        assert_eq!(fixed_vhd_virtual_size(MIB), MIB);
        assert_eq!(fixed_vhd_virtual_size(MIB + 512), 2 * MIB);
        assert_eq!(fixed_vhd_virtual_size(GIB - 1), GIB);
        assert_eq!(fixed_vhd_virtual_size(u64::MAX) % MIB, 0);
    }

    #[test]
    fn timestamp_counts_from_2000() {
        let at = |secs| UNIX_EPOCH + std::time::Duration::from_secs(secs);
        assert_eq!(vhd_timestamp(at(VHD_EPOCH_UNIX_SECONDS)), 0);
        assert_eq!(vhd_timestamp(at(VHD_EPOCH_UNIX_SECONDS + 86_400)), 86_400);
        assert_eq!(vhd_timestamp(at(0)), 0);
    }

    #[test]
    fn generated_ids_differ() {
        let a = VhdCreateOptions::generate();
        let b = VhdCreateOptions::generate();
        assert_ne!(a.unique_id, b.unique_id);
        assert_eq!(a.unique_id[6] >> 4, 4);
        assert_eq!(a.creator_application, *b"win ");
    }

    #[test]
    fn writer_keeps_zeros_as_holes_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.vhd");
        let mut writer = FixedVhdWriter::create(&path, 4 * MIB, &options()).unwrap();
        let mut data = vec![0u8; 2 * MIB as usize];
        data[100..5000].fill(0xAB); // granules 0 and 1 data
        data[MIB as usize + 7] = 1; // one granule in the middle
        writer.write_at(0, &data).unwrap();
        // Overwrite data with zeros: must become zeros (punched), not keep the old bytes.
        writer.write_at(0, &vec![0u8; 8192]).unwrap();
        writer.write_at(3 * MIB + 1, b"xyz").unwrap(); // unaligned
        assert!(matches!(
            writer.write_at(4 * MIB - 1, b"ab"),
            Err(VhdError::WriteOutOfRange { .. })
        ));
        let info = writer.finish().unwrap();
        assert_eq!(info.file_size_bytes, 4 * MIB + 512);
        assert_eq!(read_fixed_vhd_info(&path).unwrap(), info);

        let content = std::fs::read(&path).unwrap();
        let mut expected = vec![0u8; 4 * MIB as usize];
        expected[MIB as usize + 7] = 1;
        expected[3 * MIB as usize + 1..3 * MIB as usize + 4].copy_from_slice(b"xyz");
        assert_eq!(&content[..4 * MIB as usize], &expected[..]);
        // Three data granules at most (plus the footer's), not the 4 MiB.
        let allocated = std::fs::metadata(&path).unwrap().blocks() * 512;
        assert!(allocated <= 64 * 1024, "allocated {allocated}");
    }

    #[test]
    fn writer_refuses_bad_sizes_and_existing_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.vhd");
        for size in [0, MIB - 512, MIB + 512, MAX_VIRTUAL_SIZE_BYTES + MIB] {
            assert!(matches!(
                FixedVhdWriter::create(&path, size, &options()),
                Err(VhdError::InvalidVirtualSize { .. })
            ));
        }
        std::fs::write(&path, b"precious").unwrap();
        assert!(matches!(
            FixedVhdWriter::create(&path, MIB, &options()),
            Err(VhdError::Io { op: "create", .. })
        ));
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    }

    #[test]
    fn convert_in_place_extends_and_refuses_twice() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raw.img");
        let raw: Vec<u8> = (0..(MIB + 4096) as usize)
            .map(|i| (i % 251) as u8)
            .collect();
        std::fs::write(&path, &raw).unwrap();
        let info = convert_raw_to_fixed_vhd(&path, &options()).unwrap();
        assert_eq!(info.virtual_size_bytes, 2 * MIB);
        assert!(info.is_azure_aligned());
        let content = std::fs::read(&path).unwrap();
        assert_eq!(content.len() as u64, 2 * MIB + 512);
        assert_eq!(&content[..raw.len()], &raw[..]);
        assert!(content[raw.len()..2 * MIB as usize].iter().all(|&b| b == 0));
        assert_eq!(read_fixed_vhd_info(&path).unwrap(), info);
        assert!(matches!(
            convert_raw_to_fixed_vhd(&path, &options()),
            Err(VhdError::AlreadyVhd { .. })
        ));

        let empty = dir.path().join("empty.img");
        std::fs::write(&empty, b"").unwrap();
        assert!(matches!(
            convert_raw_to_fixed_vhd(&empty, &options()),
            Err(VhdError::EmptyImage { .. })
        ));
    }

    #[test]
    fn reader_errors_name_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.vhd");

        std::fs::write(&path, [0u8; 100]).unwrap();
        assert!(matches!(
            read_fixed_vhd_info(&path),
            Err(VhdError::FileTooShort {
                file_size_bytes: 100,
                ..
            })
        ));

        std::fs::write(&path, [0u8; 4096]).unwrap();
        assert!(matches!(
            read_fixed_vhd_info(&path),
            Err(VhdError::Footer {
                source: FooterError::BadCookie { .. },
                ..
            })
        ));

        // A valid footer whose size does not match the file.
        let mut file = vec![0u8; MIB as usize];
        file.extend_from_slice(&VhdFooter::new_fixed(2 * MIB, &options()).encode());
        std::fs::write(&path, &file).unwrap();
        assert!(matches!(
            read_fixed_vhd_info(&path),
            Err(VhdError::SizeMismatch {
                current_size_bytes,
                ..
            }) if current_size_bytes == 2 * MIB
        ));

        // A dynamic disk.
        let mut footer = VhdFooter::new_fixed(MIB, &options());
        footer.disk_type = VhdDiskType::Dynamic;
        let len = file.len();
        file[len - 512..].copy_from_slice(&footer.encode());
        std::fs::write(&path, &file).unwrap();
        assert!(matches!(
            read_fixed_vhd_info(&path),
            Err(VhdError::NotFixed {
                disk_type: VhdDiskType::Dynamic,
                ..
            })
        ));

        // A flipped byte in the footer of a real file.
        let mut footer_bytes = VhdFooter::new_fixed(MIB, &options()).encode();
        footer_bytes[300] = 1;
        file[len - 512..].copy_from_slice(&footer_bytes);
        std::fs::write(&path, &file).unwrap();
        let err = read_fixed_vhd_info(&path).unwrap_err();
        assert!(
            matches!(
                err,
                VhdError::Footer {
                    source: FooterError::BadChecksum { .. },
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("checksum"), "{err}");
    }

    #[test]
    fn temporary_os_disk_is_one_gib_and_sparse() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tmp-os.vhd");
        let info = create_temporary_os_disk(&path).unwrap();
        assert_eq!(info.virtual_size_bytes, GIB);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), GIB + 512);
        assert!(
            meta.blocks() * 512 < MIB,
            "allocated {}",
            meta.blocks() * 512
        );
        assert_eq!(read_fixed_vhd_info(&path).unwrap(), info);
    }
}
