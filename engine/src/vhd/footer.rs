//! The 512-byte fixed VHD footer: its fields, checksum, encoder and checked decoder.

use super::*;

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
pub(super) fn put(footer: &mut [u8; FOOTER_BYTES], offset: usize, value: &[u8]) {
    footer[offset..offset + value.len()].copy_from_slice(value);
}

/// The `N` bytes of the footer at `offset` (constant offsets inside the 512 bytes).
pub(super) fn field<const N: usize>(footer: &[u8; FOOTER_BYTES], offset: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&footer[offset..offset + N]);
    out
}
