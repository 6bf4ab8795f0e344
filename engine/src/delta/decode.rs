//! Delta-stream decoder: never panics, never over-allocates, names every defect.
//!
//! ```text
//! Read ──► DeltaDecoder::new        (stream header: magic, version, limits, checksum)
//!      ──► DeltaDecoder::next_frame (frame header → limits → payload → checksum → stream rules)
//!                 │ Frame { body, wire_bytes }   borrows the decoder's one reusable buffer
//!                 ▼
//!          PayloadDecoder::decode_into(&frame data, caller's buffer)   raw copy or zstd
//! ```
//!
//! Buffer discipline: the decoder owns one `Vec<u8>` that grows to at most
//! `FRAME_HEADER_BYTES + MAX_PAYLOAD_BYTES`, and only after the declared payload size has been
//! checked against the limit. Decompression writes into the caller's buffer and never allocates.

use std::io::Read;

use super::frame_reader::{FrameReader, FromRead, read_full, read_some};

use super::{
    ALL_DISKS, BLOCK_SIZES, BOOKMARK_FIXED_BYTES, Bookmark, CHECKSUM_SEED, Consistency,
    DISK_ENTRY_BYTES, DiskGeometry, Encoding, ExtentError, FORMAT_VERSION, FrameHeader, FrameKind,
    MAX_DISKS, MAX_ITEM_NAME_BYTES, MAX_LABEL_BYTES, MAX_PAYLOAD_BYTES, STREAM_HEADER_FIXED_BYTES,
    STREAM_MAGIC, StreamHeader, le_u16, le_u32, le_u64,
};

/// A defect in a stream: where it is and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{}, byte offset {offset_bytes}: {reason}", FrameLabel(*.frame_index))]
pub struct DecodeError {
    /// Index of the frame (0 = first frame after the header), or `None` for the stream header.
    pub frame_index: Option<u64>,
    /// Byte offset in the stream of the start of the frame (or header) at fault.
    pub offset_bytes: u64,
    /// What is wrong.
    pub reason: DecodeErrorReason,
}

struct FrameLabel(Option<u64>);

impl std::fmt::Display for FrameLabel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(index) => write!(f, "frame {index}"),
            None => f.write_str("stream header"),
        }
    }
}

/// What is wrong with a stream.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeErrorReason {
    /// The stream or frame does not start with the format's magic bytes.
    #[error("bad magic {found:02x?}")]
    BadMagic {
        /// The bytes found.
        found: Vec<u8>,
    },
    /// A format version this decoder does not read.
    #[error("unsupported format version {found} (this decoder reads version {supported})")]
    UnsupportedVersion {
        /// The version found.
        found: u16,
        /// The version supported.
        supported: u16,
    },
    /// The stored checksum does not match the bytes.
    #[error("checksum mismatch: stored {stored:#018x}, computed {computed:#018x}")]
    ChecksumMismatch {
        /// Checksum in the stream.
        stored: u64,
        /// Checksum of the bytes read.
        computed: u64,
    },
    /// A length field exceeds its limit.
    #[error("{field} is {length_bytes} bytes, over the limit of {limit_bytes}")]
    LengthOverLimit {
        /// Which field.
        field: &'static str,
        /// Its value.
        length_bytes: u64,
        /// The limit.
        limit_bytes: u64,
    },
    /// An extent not aligned to the disk's logical block size.
    #[error(
        "misaligned extent on disk {disk_index}: offset {offset_bytes}, length {length_bytes}, \
         logical block size {block_size_bytes}"
    )]
    Misaligned {
        /// Disk index.
        disk_index: u16,
        /// Extent offset.
        offset_bytes: u64,
        /// Extent length.
        length_bytes: u64,
        /// The disk's block size.
        block_size_bytes: u32,
    },
    /// An extent that ends past the end of its disk.
    #[error(
        "out-of-range extent on disk {disk_index}: offset {offset_bytes}, length {length_bytes}, \
         disk size {disk_size_bytes}"
    )]
    OutOfRange {
        /// Disk index.
        disk_index: u16,
        /// Extent offset.
        offset_bytes: u64,
        /// Extent length.
        length_bytes: u64,
        /// The disk's size.
        disk_size_bytes: u64,
    },
    /// A frame for a disk the stream header does not declare.
    #[error("unknown disk {disk_index} (the stream has {disk_count} disks)")]
    UnknownDisk {
        /// Disk index found.
        disk_index: u16,
        /// Number of disks declared.
        disk_count: u16,
    },
    /// A sequence number larger than the next expected one: frames are missing.
    #[error("sequence gap: expected {expected}, found {found}")]
    SequenceGap {
        /// The next sequence number.
        expected: u64,
        /// The one found.
        found: u64,
    },
    /// A sequence number smaller than the next expected one: a duplicate or reordered frame.
    #[error("sequence reorder or duplicate: expected {expected}, found {found}")]
    SequenceReorder {
        /// The next sequence number.
        expected: u64,
        /// The one found.
        found: u64,
    },
    /// The input ends inside a header or frame, or before the end frame.
    #[error("truncated: needed {needed_bytes} bytes, only {available_bytes} present")]
    Truncated {
        /// Bytes the structure needs.
        needed_bytes: u64,
        /// Bytes that were there.
        available_bytes: u64,
    },
    /// A field holds a value the format does not define.
    #[error("invalid {field}: {value}")]
    InvalidField {
        /// Which field.
        field: &'static str,
        /// Its value, rendered.
        value: String,
    },
    /// A zstd payload is not a valid zstd frame.
    #[error("zstd payload does not decompress: {message}")]
    Decompress {
        /// zstd's message.
        message: String,
    },
    /// A payload decompressed to a size other than the declared length.
    #[error("payload decompressed to {actual_bytes} bytes, declared length {declared_bytes}")]
    DecompressedSizeMismatch {
        /// Declared length.
        declared_bytes: u64,
        /// Decompressed length (or the content size the zstd frame declares).
        actual_bytes: u64,
    },
    /// Bytes follow the end frame.
    #[error("data after the end frame")]
    TrailingData,
    /// The underlying reader failed.
    #[error("read failed: {0}")]
    Io(#[source] std::io::Error),
}

impl DecodeErrorReason {
    pub(super) fn invalid(field: &'static str, value: impl std::fmt::Display) -> Self {
        Self::InvalidField {
            field,
            value: value.to_string(),
        }
    }
}

/// A data extent (write or resync block) as it appears in a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataExtent<'a> {
    /// Disk index.
    pub disk_index: u16,
    /// Offset on the disk.
    pub offset_bytes: u64,
    /// Decompressed length (≤ [`MAX_PAYLOAD_BYTES`]).
    pub length_bytes: u32,
    /// How `payload` is stored.
    pub encoding: Encoding,
    /// The stored payload (raw data, or one or more concatenated zstd frames).
    pub payload: &'a [u8],
}

/// The content of a decoded, validated frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameBody<'a> {
    /// Data written by the guest.
    Write(DataExtent<'a>),
    /// A range that now reads as zeros.
    ZeroRange {
        /// Disk index.
        disk_index: u16,
        /// Offset on the disk.
        offset_bytes: u64,
        /// Length of the range.
        length_bytes: u64,
    },
    /// A recovery point across all disks.
    Bookmark(Bookmark),
    /// A chunk sent by a delta resync.
    ResyncBlock(DataExtent<'a>),
    /// The end of the stream.
    End,
}

/// A decoded frame; borrows the decoder's buffer until the next call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame<'a> {
    /// Index of the frame in the stream (0 = first after the header).
    pub index: u64,
    /// Byte offset of the frame in the stream.
    pub offset_bytes: u64,
    /// Sequence number.
    pub seq: u64,
    /// What the frame says.
    pub body: FrameBody<'a>,
    /// The frame exactly as it was on the wire (header + payload), e.g. for a staging log.
    pub wire_bytes: &'a [u8],
}

impl Frame<'_> {
    /// The frame kind.
    pub fn kind(&self) -> FrameKind {
        match self.body {
            FrameBody::Write(_) => FrameKind::Write,
            FrameBody::ZeroRange { .. } => FrameKind::ZeroRange,
            FrameBody::Bookmark(_) => FrameKind::Bookmark,
            FrameBody::ResyncBlock(_) => FrameKind::ResyncBlock,
            FrameBody::End => FrameKind::End,
        }
    }
}

/// Decodes a stream header from the start of `bytes`; returns it and its encoded length.
pub fn decode_stream_header(bytes: &[u8]) -> Result<(StreamHeader, usize), DecodeErrorReason> {
    let fixed = need(bytes, STREAM_HEADER_FIXED_BYTES)?;
    if fixed[0..8] != STREAM_MAGIC {
        return Err(DecodeErrorReason::BadMagic {
            found: fixed[0..8].to_vec(),
        });
    }
    let version = le_u16(fixed, 8);
    if version != FORMAT_VERSION {
        return Err(DecodeErrorReason::UnsupportedVersion {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let flags = le_u16(fixed, 10);
    let disk_count = le_u16(fixed, 12);
    let name_len = usize::from(le_u16(fixed, 14));
    if name_len > MAX_ITEM_NAME_BYTES {
        return Err(DecodeErrorReason::LengthOverLimit {
            field: "item name",
            length_bytes: name_len as u64,
            limit_bytes: MAX_ITEM_NAME_BYTES as u64,
        });
    }
    if disk_count == 0 || disk_count > MAX_DISKS {
        return Err(DecodeErrorReason::invalid("disk count", disk_count));
    }
    let total = STREAM_HEADER_FIXED_BYTES + name_len + usize::from(disk_count) * DISK_ENTRY_BYTES;
    let all = need(bytes, total + 8)?;
    let stored = le_u64(all, total);
    let computed = xxhash_rust::xxh3::xxh3_64_with_seed(&all[..total], CHECKSUM_SEED);
    if stored != computed {
        return Err(DecodeErrorReason::ChecksumMismatch { stored, computed });
    }
    // Checksummed from here on: field errors are the sender's, not the wire's.
    if flags != 0 {
        return Err(DecodeErrorReason::invalid("header flags", flags));
    }
    if le_u64(all, 40) != 0 {
        return Err(DecodeErrorReason::invalid(
            "header reserved bytes",
            "non-zero",
        ));
    }
    let mut item_id = [0u8; 16];
    item_id.copy_from_slice(&all[16..32]);
    let first_seq = le_u64(all, 32);
    let name_bytes = &all[STREAM_HEADER_FIXED_BYTES..STREAM_HEADER_FIXED_BYTES + name_len];
    let item_name = std::str::from_utf8(name_bytes)
        .map_err(|_| DecodeErrorReason::invalid("item name", "not UTF-8"))?
        .to_owned();
    let mut disks = Vec::with_capacity(usize::from(disk_count));
    for index in 0..usize::from(disk_count) {
        let at = STREAM_HEADER_FIXED_BYTES + name_len + index * DISK_ENTRY_BYTES;
        let disk = DiskGeometry {
            size_bytes: le_u64(all, at),
            block_size_bytes: le_u32(all, at + 8),
        };
        if le_u32(all, at + 12) != 0 {
            return Err(DecodeErrorReason::invalid(
                "disk entry reserved bytes",
                "non-zero",
            ));
        }
        if !BLOCK_SIZES.contains(&disk.block_size_bytes) {
            return Err(DecodeErrorReason::invalid(
                "disk logical block size",
                format_args!("disk {index}: {}", disk.block_size_bytes),
            ));
        }
        if disk.size_bytes == 0
            || !disk
                .size_bytes
                .is_multiple_of(u64::from(disk.block_size_bytes))
        {
            return Err(DecodeErrorReason::invalid(
                "disk size",
                format_args!("disk {index}: {} bytes", disk.size_bytes),
            ));
        }
        disks.push(disk);
    }
    Ok((
        StreamHeader {
            item_id,
            item_name,
            first_seq,
            disks,
        },
        total + 8,
    ))
}

fn need(bytes: &[u8], needed: usize) -> Result<&[u8], DecodeErrorReason> {
    bytes.get(..needed).ok_or(DecodeErrorReason::Truncated {
        needed_bytes: needed as u64,
        available_bytes: bytes.len() as u64,
    })
}

/// Checks a frame whose checksum holds against the rules of its kind and the stream's disks,
/// and builds its body. `payload` is the stored payload.
pub fn validate_frame<'a>(
    header: &FrameHeader,
    payload: &'a [u8],
    disks: &[DiskGeometry],
) -> Result<FrameBody<'a>, DecodeErrorReason> {
    let no_payload = |what: &'static str| -> Result<(), DecodeErrorReason> {
        if header.encoding != Encoding::Raw {
            return Err(DecodeErrorReason::invalid("payload encoding", what));
        }
        if header.payload_len_bytes != 0 {
            return Err(DecodeErrorReason::invalid(
                "payload length",
                format_args!("{} bytes on a {what} frame", header.payload_len_bytes),
            ));
        }
        Ok(())
    };
    let whole_item = |what: &'static str| -> Result<(), DecodeErrorReason> {
        if header.disk_index != ALL_DISKS || header.offset_bytes != 0 || header.length_bytes != 0 {
            return Err(DecodeErrorReason::invalid(
                "extent",
                format_args!("a {what} frame names no disk, offset or length"),
            ));
        }
        Ok(())
    };
    match header.kind {
        FrameKind::Write | FrameKind::ResyncBlock => {
            if header.length_bytes > u64::from(MAX_PAYLOAD_BYTES) {
                return Err(DecodeErrorReason::LengthOverLimit {
                    field: "write length",
                    length_bytes: header.length_bytes,
                    limit_bytes: u64::from(MAX_PAYLOAD_BYTES),
                });
            }
            check_extent(header, disks)?;
            if header.encoding == Encoding::Raw
                && u64::from(header.payload_len_bytes) != header.length_bytes
            {
                return Err(DecodeErrorReason::invalid(
                    "payload length",
                    format_args!(
                        "raw payload of {} bytes for a {}-byte write",
                        header.payload_len_bytes, header.length_bytes
                    ),
                ));
            }
            let extent = DataExtent {
                disk_index: header.disk_index,
                offset_bytes: header.offset_bytes,
                length_bytes: header.length_bytes as u32,
                encoding: header.encoding,
                payload,
            };
            Ok(if header.kind == FrameKind::Write {
                FrameBody::Write(extent)
            } else {
                FrameBody::ResyncBlock(extent)
            })
        }
        FrameKind::ZeroRange => {
            no_payload("zero-range")?;
            check_extent(header, disks)?;
            Ok(FrameBody::ZeroRange {
                disk_index: header.disk_index,
                offset_bytes: header.offset_bytes,
                length_bytes: header.length_bytes,
            })
        }
        FrameKind::Bookmark => {
            whole_item("bookmark")?;
            if header.encoding != Encoding::Raw {
                return Err(DecodeErrorReason::invalid("payload encoding", "bookmark"));
            }
            Ok(FrameBody::Bookmark(decode_bookmark(payload)?))
        }
        FrameKind::End => {
            whole_item("end")?;
            no_payload("end")?;
            Ok(FrameBody::End)
        }
    }
}

fn check_extent(header: &FrameHeader, disks: &[DiskGeometry]) -> Result<(), DecodeErrorReason> {
    let disk = disks
        .get(usize::from(header.disk_index))
        .ok_or(DecodeErrorReason::UnknownDisk {
            disk_index: header.disk_index,
            disk_count: disks.len() as u16,
        })?;
    disk.check_extent(header.offset_bytes, header.length_bytes)
        .map_err(|e| match e {
            ExtentError::Empty => DecodeErrorReason::invalid("extent length", 0),
            ExtentError::Misaligned { block_size_bytes } => DecodeErrorReason::Misaligned {
                disk_index: header.disk_index,
                offset_bytes: header.offset_bytes,
                length_bytes: header.length_bytes,
                block_size_bytes,
            },
            ExtentError::OutOfRange { disk_size_bytes } => DecodeErrorReason::OutOfRange {
                disk_index: header.disk_index,
                offset_bytes: header.offset_bytes,
                length_bytes: header.length_bytes,
                disk_size_bytes,
            },
        })
}

/// Decodes a bookmark payload.
pub fn decode_bookmark(payload: &[u8]) -> Result<Bookmark, DecodeErrorReason> {
    let fixed = need(payload, BOOKMARK_FIXED_BYTES)?;
    let consistency = Consistency::from_u8(fixed[0])
        .ok_or_else(|| DecodeErrorReason::invalid("bookmark consistency", fixed[0]))?;
    if fixed[1] != 0 || le_u32(fixed, 4) != 0 {
        return Err(DecodeErrorReason::invalid(
            "bookmark reserved bytes",
            "non-zero",
        ));
    }
    let label_len = usize::from(le_u16(fixed, 2));
    if label_len > MAX_LABEL_BYTES {
        return Err(DecodeErrorReason::LengthOverLimit {
            field: "bookmark label",
            length_bytes: label_len as u64,
            limit_bytes: MAX_LABEL_BYTES as u64,
        });
    }
    if payload.len() != BOOKMARK_FIXED_BYTES + label_len {
        return Err(DecodeErrorReason::invalid(
            "bookmark payload length",
            format_args!("{} bytes for a {label_len}-byte label", payload.len()),
        ));
    }
    let label = std::str::from_utf8(&payload[BOOKMARK_FIXED_BYTES..])
        .map_err(|_| DecodeErrorReason::invalid("bookmark label", "not UTF-8"))?
        .to_owned();
    Ok(Bookmark {
        consistency,
        bookmark_id: le_u64(fixed, 8),
        source_timestamp_ns: le_u64(fixed, 16),
        label,
    })
}

/// Reads a delta stream: the header at construction, then one frame per
/// [`next_frame`](Self::next_frame) call.
#[derive(Debug)]
pub struct DeltaDecoder<R> {
    reader: R,
    header: StreamHeader,
    /// Reads each frame into its one reused buffer (header bytes then payload).
    frames: FrameReader,
    next_index: u64,
    next_seq: u64,
    offset_bytes: u64,
    ended: bool,
}

impl<R: Read> DeltaDecoder<R> {
    /// Reads and checks the stream header.
    pub fn new(mut reader: R) -> Result<Self, DecodeError> {
        let at_header = |reason| DecodeError {
            frame_index: None,
            offset_bytes: 0,
            reason,
        };
        let mut buf = vec![0u8; STREAM_HEADER_FIXED_BYTES];
        read_full(&mut reader, &mut buf).map_err(at_header)?;
        // Learn the full length from the fixed part, bounded by the format's limits.
        let total = match decode_stream_header(&buf) {
            Err(DecodeErrorReason::Truncated { needed_bytes, .. }) => needed_bytes as usize,
            Err(other) => return Err(at_header(other)),
            Ok(_) => STREAM_HEADER_FIXED_BYTES,
        };
        buf.resize(total, 0);
        read_full(&mut reader, &mut buf[STREAM_HEADER_FIXED_BYTES..]).map_err(|reason| {
            at_header(match reason {
                DecodeErrorReason::Truncated {
                    needed_bytes,
                    available_bytes,
                } => DecodeErrorReason::Truncated {
                    needed_bytes: needed_bytes + STREAM_HEADER_FIXED_BYTES as u64,
                    available_bytes: available_bytes + STREAM_HEADER_FIXED_BYTES as u64,
                },
                other => other,
            })
        })?;
        let (header, len) = decode_stream_header(&buf).map_err(at_header)?;
        Ok(Self {
            reader,
            next_seq: header.first_seq,
            header,
            frames: FrameReader::with_buffer(buf),
            next_index: 0,
            offset_bytes: len as u64,
            ended: false,
        })
    }

    /// The stream header.
    pub fn header(&self) -> &StreamHeader {
        &self.header
    }

    /// The reader under the decoder (e.g. to see whether a buffered reader has data left).
    pub fn reader_mut(&mut self) -> &mut R {
        &mut self.reader
    }

    /// Bytes consumed so far.
    pub fn offset_bytes(&self) -> u64 {
        self.offset_bytes
    }

    /// Whether the end frame has been read.
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// The sequence number the next frame must carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Reads the next frame. Returns `Ok(None)` once the end frame has been read and the input
    /// is exhausted; input that ends before the end frame is [`DecodeErrorReason::Truncated`].
    pub fn next_frame(&mut self) -> Result<Option<Frame<'_>>, DecodeError> {
        let index = self.next_index;
        let offset_bytes = self.offset_bytes;
        let at = |reason| DecodeError {
            frame_index: Some(index),
            offset_bytes,
            reason,
        };
        if self.ended {
            let mut probe = [0u8; 1];
            return match read_some(&mut self.reader, &mut probe).map_err(at)? {
                0 => Ok(None),
                _ => Err(at(DecodeErrorReason::TrailingData)),
            };
        }
        let header = self
            .frames
            .read(&mut FromRead(&mut self.reader))
            .map_err(at)?;
        if header.seq > self.next_seq {
            return Err(at(DecodeErrorReason::SequenceGap {
                expected: self.next_seq,
                found: header.seq,
            }));
        }
        if header.seq < self.next_seq {
            return Err(at(DecodeErrorReason::SequenceReorder {
                expected: self.next_seq,
                found: header.seq,
            }));
        }
        let body =
            validate_frame(&header, self.frames.payload(), &self.header.disks).map_err(at)?;
        self.ended = matches!(body, FrameBody::End);
        self.next_index += 1;
        self.next_seq = self.next_seq.wrapping_add(1);
        let wire_bytes = self.frames.wire_bytes();
        self.offset_bytes += wire_bytes.len() as u64;
        Ok(Some(Frame {
            index,
            offset_bytes,
            seq: header.seq,
            body,
            wire_bytes,
        }))
    }
}

/// Turns data payloads into bytes in a caller's buffer; holds one reusable zstd context.
pub struct PayloadDecoder {
    zstd: zstd::bulk::Decompressor<'static>,
}

impl std::fmt::Debug for PayloadDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PayloadDecoder").finish_non_exhaustive()
    }
}

impl PayloadDecoder {
    /// Creates the zstd context.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            zstd: zstd::bulk::Decompressor::new()?,
        })
    }

    /// Writes the extent's data into `out[..length_bytes]`. `out` must hold at least
    /// `length_bytes`; for zstd, the payload is one or more whole zstd frames that together
    /// decompress to exactly `length_bytes` (frames declaring other content sizes are refused
    /// from their headers, before decompressing).
    pub fn decode_into(
        &mut self,
        extent: &DataExtent<'_>,
        out: &mut [u8],
    ) -> Result<(), DecodeErrorReason> {
        let length = extent.length_bytes as usize;
        let out_len = out.len();
        let dest = out
            .get_mut(..length)
            .ok_or(DecodeErrorReason::LengthOverLimit {
                field: "output buffer for payload",
                length_bytes: length as u64,
                limit_bytes: out_len as u64,
            })?;
        match extent.encoding {
            Encoding::Raw => {
                if extent.payload.len() != length {
                    return Err(DecodeErrorReason::invalid(
                        "payload length",
                        format_args!("raw payload of {} bytes for {length}", extent.payload.len()),
                    ));
                }
                dest.copy_from_slice(extent.payload);
                Ok(())
            }
            Encoding::Zstd => {
                // Refuse frames whose declared content sizes disagree before decompressing.
                check_zstd_frames(extent.payload, length as u64)?;
                // One call decompresses every frame of the payload, one after the other.
                match self.zstd.decompress_to_buffer(extent.payload, dest) {
                    Ok(n) if n == length => Ok(()),
                    Ok(n) => Err(DecodeErrorReason::DecompressedSizeMismatch {
                        declared_bytes: length as u64,
                        actual_bytes: n as u64,
                    }),
                    Err(e) => Err(DecodeErrorReason::Decompress {
                        message: e.to_string(),
                    }),
                }
            }
        }
    }
}

/// Walks the zstd frames of a payload (one or more, skippable frames included) through their
/// headers only and checks the content sizes they declare: a payload whose frames all declare
/// their size must add up to exactly `length_bytes`, and no prefix of declared sizes may exceed
/// it. A payload that is not a sequence of whole zstd frames is refused here, before any
/// decompression. Frames without a declared size are left to the decompression, which writes
/// into a buffer of exactly `length_bytes`.
fn check_zstd_frames(payload: &[u8], length_bytes: u64) -> Result<(), DecodeErrorReason> {
    let not_zstd = |at: usize, what: &str| DecodeErrorReason::Decompress {
        message: format!("zstd frame at payload byte {at}: {what}"),
    };
    let mut declared_bytes = 0u64;
    let mut all_declared = true;
    let mut at = 0usize;
    while at < payload.len() {
        let rest = payload.get(at..).unwrap_or_default();
        match zstd::zstd_safe::get_frame_content_size(rest) {
            Ok(Some(size)) => declared_bytes = declared_bytes.saturating_add(size),
            Ok(None) => all_declared = false,
            Err(_) => return Err(not_zstd(at, "not a zstd frame header")),
        }
        if declared_bytes > length_bytes {
            return Err(DecodeErrorReason::DecompressedSizeMismatch {
                declared_bytes: length_bytes,
                actual_bytes: declared_bytes,
            });
        }
        let frame_bytes = zstd::zstd_safe::find_frame_compressed_size(rest)
            .map_err(|code| not_zstd(at, zstd::zstd_safe::get_error_name(code)))?;
        if frame_bytes == 0 {
            return Err(not_zstd(at, "empty frame"));
        }
        at = at.saturating_add(frame_bytes);
    }
    if at == 0 {
        return Err(not_zstd(0, "empty payload"));
    }
    if all_declared && declared_bytes != length_bytes {
        return Err(DecodeErrorReason::DecompressedSizeMismatch {
            declared_bytes: length_bytes,
            actual_bytes: declared_bytes,
        });
    }
    Ok(())
}
