//! The delta-stream format: how a source agent sends an item's disk writes.
//!
//! The byte layout is specified in `docs/design/delta-stream.md`; this module is its only
//! implementation. A stream is one [`StreamHeader`] followed by frames:
//!
//! ```text
//! ┌──────────────┬───────────────────────┬───────────────────────┬─────┬───────────┐
//! │ StreamHeader │ frame seq=first       │ frame seq=first+1     │ ... │ End frame │
//! │ (checksummed)│ 48 B header + payload │ 48 B header + payload │     │           │
//! └──────────────┴───────────────────────┴───────────────────────┴─────┴───────────┘
//! ```
//!
//! Invariants the decoder enforces, whatever the input bytes:
//! - every checksum (XXH3-64, seed [`CHECKSUM_SEED`]) holds, over the header and the payload;
//! - sequence numbers start at the header's `first_seq` and increase by exactly one;
//! - payload sizes are checked against [`MAX_PAYLOAD_BYTES`] *before* any allocation or
//!   decompression;
//! - write, zero and resync extents name a disk of the stream, are aligned to that disk's
//!   logical block size and lie inside it;
//! - a zstd payload decompresses to exactly the declared length, into a caller-provided buffer.
//!
//! The encoder ([`encode`]) and decoder ([`decode`]) are pure: they work over `std::io::Write` /
//! `std::io::Read` and own no threads, so the source agent, the appliance's data port, the
//! staging log and the tests all share one implementation.

pub mod decode;
pub mod encode;
pub mod frame_reader;

pub use decode::{
    DataExtent, DecodeError, DecodeErrorReason, DeltaDecoder, Frame, FrameBody, PayloadDecoder,
    validate_frame,
};
pub use encode::{DeltaEncoder, EncodeError, EncoderOptions};
pub use frame_reader::{
    FrameReader, FrameSource, FromRead, check_frame_prefix, decode_frame_header, frame_wire_len,
    stream_header_wire_len,
};

use xxhash_rust::xxh3::Xxh3;

/// Magic bytes at the start of every stream.
pub const STREAM_MAGIC: [u8; 8] = *b"DRDELTA\0";
/// The format version this code writes and the only one it reads.
pub const FORMAT_VERSION: u16 = 1;
/// Magic bytes at the start of every frame header.
pub const FRAME_MAGIC: [u8; 4] = *b"DRFR";
/// Seed of every XXH3-64 checksum of the format (ASCII "dr-delta", little-endian).
pub const CHECKSUM_SEED: u64 = u64::from_le_bytes(*b"dr-delta");
/// Upper bound of a frame's stored payload and of a write's decompressed length.
pub const MAX_PAYLOAD_BYTES: u32 = 4 * 1024 * 1024;
/// Upper bound of the number of disks of one protected item.
pub const MAX_DISKS: u16 = 64;
/// Upper bound of the item name in the stream header, in bytes of UTF-8.
pub const MAX_ITEM_NAME_BYTES: usize = 255;
/// Upper bound of a bookmark label, in bytes of UTF-8.
pub const MAX_LABEL_BYTES: usize = 256;
/// Size of the fixed part of the stream header (before name and disk table).
pub const STREAM_HEADER_FIXED_BYTES: usize = 48;
/// Size of one disk entry of the stream header.
pub const DISK_ENTRY_BYTES: usize = 16;
/// Size of a frame header.
pub const FRAME_HEADER_BYTES: usize = 48;
/// Size of the fixed part of a bookmark payload (before the label).
pub const BOOKMARK_FIXED_BYTES: usize = 24;
/// `disk_index` of frames that concern the whole item (bookmark, end).
pub const ALL_DISKS: u16 = u16::MAX;

/// Logical block sizes a disk may declare.
pub const BLOCK_SIZES: [u32; 2] = [512, 4096];

/// One disk of a protected item, as the stream header declares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskGeometry {
    /// Size of the disk; a multiple of `block_size_bytes`.
    pub size_bytes: u64,
    /// Logical block size: 512 or 4096.
    pub block_size_bytes: u32,
}

impl DiskGeometry {
    /// Checks an extent against this disk: non-empty, aligned, inside.
    pub fn check_extent(&self, offset_bytes: u64, length_bytes: u64) -> Result<(), ExtentError> {
        let block = u64::from(self.block_size_bytes);
        if length_bytes == 0 {
            return Err(ExtentError::Empty);
        }
        if !offset_bytes.is_multiple_of(block) || !length_bytes.is_multiple_of(block) {
            return Err(ExtentError::Misaligned {
                block_size_bytes: self.block_size_bytes,
            });
        }
        match offset_bytes.checked_add(length_bytes) {
            Some(end) if end <= self.size_bytes => Ok(()),
            _ => Err(ExtentError::OutOfRange {
                disk_size_bytes: self.size_bytes,
            }),
        }
    }
}

/// Why an extent does not fit a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentError {
    /// Zero length.
    Empty,
    /// Offset or length not a multiple of the block size.
    Misaligned {
        /// The disk's logical block size.
        block_size_bytes: u32,
    },
    /// The extent ends past the end of the disk.
    OutOfRange {
        /// The disk's size.
        disk_size_bytes: u64,
    },
}

/// The stream header: who the stream is for and the disks it writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamHeader {
    /// Opaque 16-byte identity of the protected item (a UUID in practice).
    pub item_id: [u8; 16],
    /// Human-readable item name, at most [`MAX_ITEM_NAME_BYTES`] bytes.
    pub item_name: String,
    /// Sequence number of the first frame.
    pub first_seq: u64,
    /// The item's disks; frames name them by index.
    pub disks: Vec<DiskGeometry>,
}

impl StreamHeader {
    /// Encoded size of this header in bytes.
    pub fn encoded_len_bytes(&self) -> usize {
        STREAM_HEADER_FIXED_BYTES + self.item_name.len() + self.disks.len() * DISK_ENTRY_BYTES + 8
    }

    /// Checks the limits the decoder enforces, so an encoder never writes what it would refuse.
    pub fn validate(&self) -> Result<(), HeaderFieldError> {
        if self.item_name.len() > MAX_ITEM_NAME_BYTES {
            return Err(HeaderFieldError::ItemNameTooLong {
                length_bytes: self.item_name.len(),
            });
        }
        if self.disks.is_empty() || self.disks.len() > usize::from(MAX_DISKS) {
            return Err(HeaderFieldError::DiskCount {
                count: self.disks.len(),
            });
        }
        for (index, disk) in self.disks.iter().enumerate() {
            if !BLOCK_SIZES.contains(&disk.block_size_bytes) {
                return Err(HeaderFieldError::BlockSize {
                    disk_index: index,
                    block_size_bytes: disk.block_size_bytes,
                });
            }
            if disk.size_bytes == 0 || disk.size_bytes % u64::from(disk.block_size_bytes) != 0 {
                return Err(HeaderFieldError::DiskSize {
                    disk_index: index,
                    size_bytes: disk.size_bytes,
                    block_size_bytes: disk.block_size_bytes,
                });
            }
        }
        Ok(())
    }

    /// Appends the encoded header to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&STREAM_MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes()); // flags
        out.extend_from_slice(&(self.disks.len() as u16).to_le_bytes());
        out.extend_from_slice(&(self.item_name.len() as u16).to_le_bytes());
        out.extend_from_slice(&self.item_id);
        out.extend_from_slice(&self.first_seq.to_le_bytes());
        out.extend_from_slice(&[0u8; 8]); // reserved
        out.extend_from_slice(self.item_name.as_bytes());
        for disk in &self.disks {
            out.extend_from_slice(&disk.size_bytes.to_le_bytes());
            out.extend_from_slice(&disk.block_size_bytes.to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
        }
        let checksum = xxhash_rust::xxh3::xxh3_64_with_seed(&out[start..], CHECKSUM_SEED);
        out.extend_from_slice(&checksum.to_le_bytes());
    }
}

/// A stream header field outside the format's limits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderFieldError {
    /// The item name is longer than [`MAX_ITEM_NAME_BYTES`].
    #[error("item name is {length_bytes} bytes, limit {MAX_ITEM_NAME_BYTES}")]
    ItemNameTooLong {
        /// Its length.
        length_bytes: usize,
    },
    /// No disks, or more than [`MAX_DISKS`].
    #[error("disk count {count} outside 1..={MAX_DISKS}")]
    DiskCount {
        /// The count.
        count: usize,
    },
    /// A block size other than 512 or 4096.
    #[error("disk {disk_index}: logical block size {block_size_bytes} is not 512 or 4096")]
    BlockSize {
        /// Which disk.
        disk_index: usize,
        /// The size declared.
        block_size_bytes: u32,
    },
    /// A disk size that is zero or not a multiple of its block size.
    #[error(
        "disk {disk_index}: size {size_bytes} bytes is zero or not a multiple of its \
         {block_size_bytes}-byte block size"
    )]
    DiskSize {
        /// Which disk.
        disk_index: usize,
        /// The size declared.
        size_bytes: u64,
        /// Its block size.
        block_size_bytes: u32,
    },
}

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// Data written by the guest at `offset_bytes` of disk `disk_index`.
    Write = 1,
    /// A range that now reads as zeros (trim, unmap, zero fill); no payload.
    ZeroRange = 2,
    /// A recovery point across all disks of the item.
    Bookmark = 3,
    /// A chunk sent by a delta resync; applied like a write.
    ResyncBlock = 4,
    /// The sender closes the stream; nothing may follow.
    End = 5,
}

impl FrameKind {
    /// Parses the kind byte.
    pub fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            1 => Self::Write,
            2 => Self::ZeroRange,
            3 => Self::Bookmark,
            4 => Self::ResyncBlock,
            5 => Self::End,
            _ => return None,
        })
    }

    /// A short lower-case name for summaries and errors.
    pub fn name(self) -> &'static str {
        match self {
            Self::Write => "write",
            Self::ZeroRange => "zero-range",
            Self::Bookmark => "bookmark",
            Self::ResyncBlock => "resync-block",
            Self::End => "end",
        }
    }
}

/// How a data payload is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Encoding {
    /// The payload is the data.
    Raw = 0,
    /// The payload is one zstd frame that decompresses to exactly `length_bytes`.
    Zstd = 1,
}

impl Encoding {
    /// Parses the encoding byte.
    pub fn from_u8(value: u8) -> Option<Self> {
        match value {
            0 => Some(Self::Raw),
            1 => Some(Self::Zstd),
            _ => None,
        }
    }
}

/// Crash- or application-consistent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Consistency {
    /// All disks as they were at one instant, as after a power cut.
    Crash = 1,
    /// Applications flushed and quiesced (VSS or fsfreeze) before the instant.
    App = 2,
}

impl Consistency {
    /// Parses the consistency byte.
    pub fn from_u8(value: u8) -> Option<Self> {
        match value {
            1 => Some(Self::Crash),
            2 => Some(Self::App),
            _ => None,
        }
    }

    /// "crash" or "app".
    pub fn name(self) -> &'static str {
        match self {
            Self::Crash => "crash",
            Self::App => "app",
        }
    }
}

/// The fixed 48-byte header of every frame, decoded but not yet checked against a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// What the frame is.
    pub kind: FrameKind,
    /// How the payload is stored.
    pub encoding: Encoding,
    /// Disk index, or [`ALL_DISKS`] for bookmark and end frames.
    pub disk_index: u16,
    /// Sequence number.
    pub seq: u64,
    /// Byte offset on the disk (write, zero range, resync block), else 0.
    pub offset_bytes: u64,
    /// Logical length of the extent (decompressed length for data), else 0.
    pub length_bytes: u64,
    /// Bytes of payload that follow the header.
    pub payload_len_bytes: u32,
    /// XXH3-64 over the first 40 header bytes and the payload.
    pub checksum: u64,
}

impl FrameHeader {
    /// Encodes the header with the given checksum.
    pub fn encode(&self) -> [u8; FRAME_HEADER_BYTES] {
        let mut out = [0u8; FRAME_HEADER_BYTES];
        out[0..4].copy_from_slice(&FRAME_MAGIC);
        out[4] = self.kind as u8;
        out[5] = self.encoding as u8;
        out[6..8].copy_from_slice(&self.disk_index.to_le_bytes());
        out[8..16].copy_from_slice(&self.seq.to_le_bytes());
        out[16..24].copy_from_slice(&self.offset_bytes.to_le_bytes());
        out[24..32].copy_from_slice(&self.length_bytes.to_le_bytes());
        out[32..36].copy_from_slice(&self.payload_len_bytes.to_le_bytes());
        // 36..40 reserved, zero.
        out[40..48].copy_from_slice(&self.checksum.to_le_bytes());
        out
    }

    /// The checksum of a frame whose first 40 header bytes are `header_prefix`.
    pub fn compute_checksum(header_prefix: &[u8], payload: &[u8]) -> u64 {
        let mut hasher = Xxh3::with_seed(CHECKSUM_SEED);
        hasher.update(header_prefix);
        hasher.update(payload);
        hasher.digest()
    }
}

/// A bookmark: a recovery point that covers every disk of the item at the same instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bookmark {
    /// Crash- or app-consistent.
    pub consistency: Consistency,
    /// Source-assigned id, unique within the item.
    pub bookmark_id: u64,
    /// Source wall-clock time of the instant, nanoseconds since the Unix epoch.
    pub source_timestamp_ns: u64,
    /// Free text, at most [`MAX_LABEL_BYTES`] bytes of UTF-8.
    pub label: String,
}

impl Bookmark {
    /// Appends the encoded bookmark payload to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.push(self.consistency as u8);
        out.push(0);
        out.extend_from_slice(&(self.label.len() as u16).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&self.bookmark_id.to_le_bytes());
        out.extend_from_slice(&self.source_timestamp_ns.to_le_bytes());
        out.extend_from_slice(self.label.as_bytes());
    }
}

/// Little-endian field readers over slices whose length the caller has already checked.
pub(crate) fn le_u16(bytes: &[u8], at: usize) -> u16 {
    let mut raw = [0u8; 2];
    raw.copy_from_slice(&bytes[at..at + 2]);
    u16::from_le_bytes(raw)
}

pub(crate) fn le_u32(bytes: &[u8], at: usize) -> u32 {
    let mut raw = [0u8; 4];
    raw.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(raw)
}

pub(crate) fn le_u64(bytes: &[u8], at: usize) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_check_extent_rejects_misaligned_empty_and_past_end() {
        let disk = DiskGeometry {
            size_bytes: 8192,
            block_size_bytes: 4096,
        };
        assert_eq!(disk.check_extent(0, 8192), Ok(()));
        assert_eq!(disk.check_extent(4096, 0), Err(ExtentError::Empty));
        assert!(matches!(
            disk.check_extent(512, 4096),
            Err(ExtentError::Misaligned { .. })
        ));
        assert!(matches!(
            disk.check_extent(4096, 8192),
            Err(ExtentError::OutOfRange { .. })
        ));
        assert!(matches!(
            disk.check_extent(u64::MAX - 4095, 4096),
            Err(ExtentError::Misaligned { .. } | ExtentError::OutOfRange { .. })
        ));
    }

    #[test]
    fn checksum_seed_is_the_documented_constant() {
        assert_eq!(CHECKSUM_SEED, 0x6174_6c65_642d_7264);
    }
}
