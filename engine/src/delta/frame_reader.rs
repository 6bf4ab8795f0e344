//! The one frame reader: a frame's wire length from its first bytes, and a checked frame
//! (magic, payload limit, payload, checksum, header fields) read from any source.
//!
//! ```text
//! source ──48 B──► check_frame_prefix (magic, payload ≤ limit) ──payload──► checksum
//!                  ──► decode_frame_header (kind, encoding, reserved) ──► FrameHeader
//! ```
//!
//! Used by the stream decoder ([`super::DeltaDecoder`], over a `Read`), the staging log's
//! reader (over a segment file at an offset) and disk-sim's fault proxy ([`frame_wire_len`],
//! [`stream_header_wire_len`] over the bytes it has so far). The checks come in one order
//! everywhere, so the same damaged bytes get the same [`DecodeErrorReason`]: a flipped bit is a
//! checksum mismatch, not a strange field.

use std::io::{ErrorKind, Read};

use super::{
    DISK_ENTRY_BYTES, DecodeErrorReason, Encoding, FRAME_HEADER_BYTES, FRAME_MAGIC, FrameHeader,
    FrameKind, MAX_DISKS, MAX_ITEM_NAME_BYTES, MAX_PAYLOAD_BYTES, STREAM_HEADER_FIXED_BYTES,
    STREAM_MAGIC, le_u16, le_u32, le_u64,
};

/// Checks what must hold before a frame's payload is read: the magic and the payload size
/// limit. Returns the payload length.
pub fn check_frame_prefix(bytes: &[u8; FRAME_HEADER_BYTES]) -> Result<u32, DecodeErrorReason> {
    if bytes[0..4] != FRAME_MAGIC {
        return Err(DecodeErrorReason::BadMagic {
            found: bytes[0..4].to_vec(),
        });
    }
    let payload_len_bytes = le_u32(bytes, 32);
    if payload_len_bytes > MAX_PAYLOAD_BYTES {
        return Err(DecodeErrorReason::LengthOverLimit {
            field: "frame payload",
            length_bytes: u64::from(payload_len_bytes),
            limit_bytes: u64::from(MAX_PAYLOAD_BYTES),
        });
    }
    Ok(payload_len_bytes)
}

/// Decodes the fixed frame header: [`check_frame_prefix`], then kind, encoding and reserved
/// bytes. The decoder calls it after the checksum holds, so a flipped bit is reported as a
/// checksum mismatch rather than as a strange field.
pub fn decode_frame_header(
    bytes: &[u8; FRAME_HEADER_BYTES],
) -> Result<FrameHeader, DecodeErrorReason> {
    let payload_len_bytes = check_frame_prefix(bytes)?;
    let kind = FrameKind::from_u8(bytes[4])
        .ok_or_else(|| DecodeErrorReason::invalid("frame kind", bytes[4]))?;
    let encoding = Encoding::from_u8(bytes[5])
        .ok_or_else(|| DecodeErrorReason::invalid("payload encoding", bytes[5]))?;
    if le_u32(bytes, 36) != 0 {
        return Err(DecodeErrorReason::invalid(
            "frame reserved bytes",
            "non-zero",
        ));
    }
    Ok(FrameHeader {
        kind,
        encoding,
        disk_index: le_u16(bytes, 6),
        seq: le_u64(bytes, 8),
        offset_bytes: le_u64(bytes, 16),
        length_bytes: le_u64(bytes, 24),
        payload_len_bytes,
        checksum: le_u64(bytes, 40),
    })
}

/// The wire length (header + payload) of the frame at the front of `bytes`, once its header
/// is there: `Ok(None)` while fewer bytes than that are present; an error as soon as the
/// magic (4 bytes) or the payload length (48 bytes) is wrong.
pub fn frame_wire_len(bytes: &[u8]) -> Result<Option<usize>, DecodeErrorReason> {
    let Some(magic) = bytes.get(..FRAME_MAGIC.len()) else {
        return Ok(None);
    };
    if magic != FRAME_MAGIC {
        return Err(DecodeErrorReason::BadMagic {
            found: magic.to_vec(),
        });
    }
    let Some(header) = bytes.first_chunk::<FRAME_HEADER_BYTES>() else {
        return Ok(None);
    };
    Ok(Some(
        FRAME_HEADER_BYTES + check_frame_prefix(header)? as usize,
    ))
}

/// The encoded length (with its checksum) of the stream header at the front of `bytes`, from
/// its disk count and name length (bytes 12..16): `Ok(None)` while fewer bytes are present;
/// an error as soon as the magic (8 bytes) or either count is out of the format's limits.
/// Only what the length needs is checked; [`super::decode::decode_stream_header`] checks
/// the rest.
pub fn stream_header_wire_len(bytes: &[u8]) -> Result<Option<usize>, DecodeErrorReason> {
    let Some(magic) = bytes.get(..STREAM_MAGIC.len()) else {
        return Ok(None);
    };
    if magic != STREAM_MAGIC {
        return Err(DecodeErrorReason::BadMagic {
            found: magic.to_vec(),
        });
    }
    if bytes.len() < STREAM_COUNTS_END {
        return Ok(None);
    }
    let (disk_count, name_len) = (le_u16(bytes, 12), usize::from(le_u16(bytes, 14)));
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
    Ok(Some(
        STREAM_HEADER_FIXED_BYTES + name_len + usize::from(disk_count) * DISK_ENTRY_BYTES + 8,
    ))
}

/// End of the stream header's disk count (u16 at 12) and name length (u16 at 14).
const STREAM_COUNTS_END: usize = 16;

/// Where a [`FrameReader`] reads a frame's bytes from.
pub trait FrameSource {
    /// Fills `buf` completely, or says how much was there ([`DecodeErrorReason::Truncated`])
    /// or why it could not be read ([`DecodeErrorReason::Io`]).
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), DecodeErrorReason>;
}

/// A frame source over a `Read` (a socket, a file read in order).
#[derive(Debug)]
pub struct FromRead<'a, R>(pub &'a mut R);

impl<R: Read> FrameSource for FromRead<'_, R> {
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), DecodeErrorReason> {
        read_full(self.0, buf)
    }
}

/// Reads checked frames into one reusable buffer (header, then payload), which grows only
/// after the declared payload length passed the limit: at most `FRAME_HEADER_BYTES +
/// MAX_PAYLOAD_BYTES`.
#[derive(Debug, Default)]
pub struct FrameReader {
    buf: Vec<u8>,
}

impl FrameReader {
    /// A reader that reuses `buf`'s allocation.
    pub fn with_buffer(mut buf: Vec<u8>) -> Self {
        buf.clear();
        Self { buf }
    }

    /// Reads one frame from `source`: its header, the magic and payload limit, its payload,
    /// its checksum, then its header fields. A payload cut short is reported with the
    /// frame's whole length as needed. The frame's stream rules (sequence, kind, extent) are
    /// the caller's ([`super::validate_frame`]).
    pub fn read(
        &mut self,
        source: &mut impl FrameSource,
    ) -> Result<FrameHeader, DecodeErrorReason> {
        self.buf.clear();
        let mut raw = [0u8; FRAME_HEADER_BYTES];
        source.fill(&mut raw)?;
        let payload_len = check_frame_prefix(&raw)? as usize; // ≤ the limit.
        self.buf.extend_from_slice(&raw);
        self.buf.resize(FRAME_HEADER_BYTES + payload_len, 0);
        source
            .fill(&mut self.buf[FRAME_HEADER_BYTES..])
            .map_err(|reason| match reason {
                DecodeErrorReason::Truncated {
                    needed_bytes,
                    available_bytes,
                } => DecodeErrorReason::Truncated {
                    needed_bytes: needed_bytes + FRAME_HEADER_BYTES as u64,
                    available_bytes: available_bytes + FRAME_HEADER_BYTES as u64,
                },
                other => other,
            })?;
        let stored = le_u64(&raw, 40);
        let computed = FrameHeader::compute_checksum(&raw[..40], self.payload());
        if computed != stored {
            return Err(DecodeErrorReason::ChecksumMismatch { stored, computed });
        }
        decode_frame_header(&raw)
    }

    /// The last frame read, as on the wire (header and payload).
    pub fn wire_bytes(&self) -> &[u8] {
        &self.buf
    }

    /// The last frame's payload.
    pub fn payload(&self) -> &[u8] {
        self.buf.get(FRAME_HEADER_BYTES..).unwrap_or_default()
    }
}

/// Fills `buf` completely or reports how much was there.
pub(super) fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> Result<(), DecodeErrorReason> {
    let mut filled = 0;
    while filled < buf.len() {
        match read_some(reader, &mut buf[filled..])? {
            0 => {
                return Err(DecodeErrorReason::Truncated {
                    needed_bytes: buf.len() as u64,
                    available_bytes: filled as u64,
                });
            }
            n => filled += n,
        }
    }
    Ok(())
}

pub(super) fn read_some(
    reader: &mut impl Read,
    buf: &mut [u8],
) -> Result<usize, DecodeErrorReason> {
    loop {
        match reader.read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(DecodeErrorReason::Io(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

    use super::*;
    use crate::delta::{DeltaEncoder, DiskGeometry, EncoderOptions, StreamHeader};

    /// A stream of a header and two writes, and the header's length.
    fn stream() -> (Vec<u8>, usize) {
        let header = StreamHeader {
            item_id: [4; 16],
            item_name: "frames".into(),
            first_seq: 1,
            disks: vec![DiskGeometry {
                size_bytes: 1 << 20,
                block_size_bytes: 4096,
            }],
        };
        let mut encoder =
            DeltaEncoder::new(Vec::new(), &header, EncoderOptions::default()).unwrap();
        encoder.write(0, 0, &[7; 4096]).unwrap();
        encoder.write(0, 8192, &[9; 8192]).unwrap();
        (encoder.into_inner(), header.encoded_len_bytes())
    }

    #[test]
    fn wire_lengths_come_from_the_first_bytes_and_odd_bytes_are_refused_early() {
        let (bytes, header_len) = stream();
        assert_eq!(stream_header_wire_len(&bytes[..7]).unwrap(), None);
        assert_eq!(stream_header_wire_len(&bytes[..15]).unwrap(), None);
        assert_eq!(
            stream_header_wire_len(&bytes[..16]).unwrap(),
            Some(header_len)
        );
        assert!(stream_header_wire_len(b"NOTMAGIC").is_err());
        let frames = &bytes[header_len..];
        assert_eq!(frame_wire_len(&frames[..3]).unwrap(), None);
        assert_eq!(frame_wire_len(&frames[..47]).unwrap(), None);
        let first = frame_wire_len(frames).unwrap().unwrap();
        assert!(first > FRAME_HEADER_BYTES);
        assert!(frame_wire_len(b"XXXX").is_err());
        let mut over = frames[..FRAME_HEADER_BYTES].to_vec();
        over[32..36].copy_from_slice(&(MAX_PAYLOAD_BYTES + 1).to_le_bytes());
        assert!(matches!(
            frame_wire_len(&over),
            Err(DecodeErrorReason::LengthOverLimit { .. })
        ));
    }

    #[test]
    fn the_reader_checks_each_frame_in_one_order() {
        let (bytes, header_len) = stream();
        let mut input = &bytes[header_len..];
        let mut reader = FrameReader::default();
        let first = reader.read(&mut FromRead(&mut input)).unwrap();
        assert_eq!((first.kind, first.seq), (FrameKind::Write, 1));
        assert_eq!(
            reader.wire_bytes().len(),
            frame_wire_len(&bytes[header_len..]).unwrap().unwrap()
        );
        assert_eq!(reader.payload().len(), first.payload_len_bytes as usize);
        // A flipped payload byte is a checksum mismatch, not a strange field.
        let second_at = header_len + reader.wire_bytes().len();
        let mut damaged = bytes[second_at..].to_vec();
        let last = damaged.len() - 1;
        damaged[last] ^= 1;
        let error = reader
            .read(&mut FromRead(&mut damaged.as_slice()))
            .unwrap_err();
        assert!(
            matches!(error, DecodeErrorReason::ChecksumMismatch { .. }),
            "{error}"
        );
        // Cut short: the whole frame's length is what was needed.
        let whole = bytes.len() - second_at;
        let cut = &bytes[second_at..bytes.len() - 1];
        match reader.read(&mut FromRead(&mut &cut[..])).unwrap_err() {
            DecodeErrorReason::Truncated {
                needed_bytes,
                available_bytes,
            } => assert_eq!(
                (needed_bytes, available_bytes),
                (whole as u64, whole as u64 - 1)
            ),
            other => panic!("{other}"),
        }
    }
}
