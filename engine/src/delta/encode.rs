//! Delta-stream encoder: writes what the decoder accepts, and refuses what it would not.
//!
//! The encoder checks every frame against the stream header (disk index, alignment, range,
//! payload limit) before writing it, so a bug in a sender shows up at the sender. It keeps
//! one reusable frame buffer and one zstd context; a compressed payload that is not smaller
//! than the data is stored raw.

use std::io::Write;

use super::{
    ALL_DISKS, Bookmark, Consistency, DiskGeometry, Encoding, ExtentError, FRAME_HEADER_BYTES,
    FrameHeader, FrameKind, HeaderFieldError, MAX_LABEL_BYTES, MAX_PAYLOAD_BYTES, StreamHeader,
};

/// Why a frame or stream could not be encoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The stream header breaks a format limit.
    #[error("invalid stream header: {0}")]
    Header(#[from] HeaderFieldError),
    /// A frame names a disk the stream does not have.
    #[error("unknown disk {disk_index} (the stream has {disk_count} disks)")]
    UnknownDisk {
        /// The index given.
        disk_index: u16,
        /// The number of disks.
        disk_count: usize,
    },
    /// An extent that is empty, misaligned or past the end of its disk.
    #[error(
        "bad extent on disk {disk_index}: offset {offset_bytes}, length {length_bytes}: {why:?}"
    )]
    Extent {
        /// Disk index.
        disk_index: u16,
        /// Offset.
        offset_bytes: u64,
        /// Length.
        length_bytes: u64,
        /// What is wrong.
        why: ExtentError,
    },
    /// Data longer than [`MAX_PAYLOAD_BYTES`]; split it into several frames.
    #[error("data of {length_bytes} bytes is over the per-frame limit of {MAX_PAYLOAD_BYTES}")]
    TooLong {
        /// The length given.
        length_bytes: usize,
    },
    /// A bookmark label longer than [`MAX_LABEL_BYTES`].
    #[error("bookmark label of {length_bytes} bytes is over the limit of {MAX_LABEL_BYTES}")]
    LabelTooLong {
        /// The length given.
        length_bytes: usize,
    },
    /// Compression failed.
    #[error("zstd compression failed: {0}")]
    Compress(#[source] std::io::Error),
    /// The writer failed.
    #[error("write failed: {0}")]
    Io(#[source] std::io::Error),
}

/// Encoder settings.
#[derive(Debug, Clone, Copy)]
pub struct EncoderOptions {
    /// zstd level for data payloads, or `None` to store every payload raw.
    pub zstd_level: Option<i32>,
}

impl Default for EncoderOptions {
    fn default() -> Self {
        Self {
            zstd_level: Some(1),
        }
    }
}

/// Writes a delta stream to `W`.
pub struct DeltaEncoder<W> {
    writer: W,
    disks: Vec<DiskGeometry>,
    next_seq: u64,
    frame: Vec<u8>,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    bytes_written: u64,
}

impl<W> std::fmt::Debug for DeltaEncoder<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeltaEncoder")
            .field("next_seq", &self.next_seq)
            .field("bytes_written", &self.bytes_written)
            .finish_non_exhaustive()
    }
}

impl<W: Write> DeltaEncoder<W> {
    /// Writes the stream header.
    pub fn new(
        mut writer: W,
        header: &StreamHeader,
        options: EncoderOptions,
    ) -> Result<Self, EncodeError> {
        header.validate()?;
        let mut bytes = Vec::with_capacity(header.encoded_len_bytes());
        header.encode_into(&mut bytes);
        writer.write_all(&bytes).map_err(EncodeError::Io)?;
        let zstd = match options.zstd_level {
            Some(level) => Some(zstd::bulk::Compressor::new(level).map_err(EncodeError::Compress)?),
            None => None,
        };
        Ok(Self {
            writer,
            disks: header.disks.clone(),
            next_seq: header.first_seq,
            frame: Vec::new(),
            zstd,
            bytes_written: bytes.len() as u64,
        })
    }

    /// The sequence number the next frame will carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Bytes written so far, header included.
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written
    }

    /// Writes a guest write. Returns its sequence number.
    pub fn write(
        &mut self,
        disk_index: u16,
        offset_bytes: u64,
        data: &[u8],
    ) -> Result<u64, EncodeError> {
        self.data_frame(FrameKind::Write, disk_index, offset_bytes, data)
    }

    /// Writes a resync block. Returns its sequence number.
    pub fn resync_block(
        &mut self,
        disk_index: u16,
        offset_bytes: u64,
        data: &[u8],
    ) -> Result<u64, EncodeError> {
        self.data_frame(FrameKind::ResyncBlock, disk_index, offset_bytes, data)
    }

    /// Writes a zero range. Returns its sequence number.
    pub fn zero_range(
        &mut self,
        disk_index: u16,
        offset_bytes: u64,
        length_bytes: u64,
    ) -> Result<u64, EncodeError> {
        self.check_extent(disk_index, offset_bytes, length_bytes)?;
        self.frame.clear();
        self.frame.resize(FRAME_HEADER_BYTES, 0);
        self.emit(
            FrameKind::ZeroRange,
            Encoding::Raw,
            disk_index,
            offset_bytes,
            length_bytes,
        )
    }

    /// Writes a bookmark. Returns its sequence number.
    pub fn bookmark(
        &mut self,
        consistency: Consistency,
        bookmark_id: u64,
        source_timestamp_ns: u64,
        label: &str,
    ) -> Result<u64, EncodeError> {
        if label.len() > MAX_LABEL_BYTES {
            return Err(EncodeError::LabelTooLong {
                length_bytes: label.len(),
            });
        }
        self.frame.clear();
        self.frame.resize(FRAME_HEADER_BYTES, 0);
        Bookmark {
            consistency,
            bookmark_id,
            source_timestamp_ns,
            label: label.to_owned(),
        }
        .encode_into(&mut self.frame);
        self.emit(FrameKind::Bookmark, Encoding::Raw, ALL_DISKS, 0, 0)
    }

    /// Writes the end frame and returns the writer.
    pub fn finish(mut self) -> Result<W, EncodeError> {
        self.frame.clear();
        self.frame.resize(FRAME_HEADER_BYTES, 0);
        self.emit(FrameKind::End, Encoding::Raw, ALL_DISKS, 0, 0)?;
        self.writer.flush().map_err(EncodeError::Io)?;
        Ok(self.writer)
    }

    /// Gives back the writer without an end frame (a stream that continues on reconnect).
    pub fn into_inner(self) -> W {
        self.writer
    }

    fn data_frame(
        &mut self,
        kind: FrameKind,
        disk_index: u16,
        offset_bytes: u64,
        data: &[u8],
    ) -> Result<u64, EncodeError> {
        if data.len() > MAX_PAYLOAD_BYTES as usize {
            return Err(EncodeError::TooLong {
                length_bytes: data.len(),
            });
        }
        self.check_extent(disk_index, offset_bytes, data.len() as u64)?;
        self.frame.clear();
        self.frame.resize(FRAME_HEADER_BYTES, 0);
        let mut encoding = Encoding::Raw;
        if let Some(zstd) = self.zstd.as_mut() {
            // Compress straight after the header; keep it only if it is smaller.
            let bound = zstd::zstd_safe::compress_bound(data.len());
            self.frame.resize(FRAME_HEADER_BYTES + bound, 0);
            let n = zstd
                .compress_to_buffer(data, &mut self.frame[FRAME_HEADER_BYTES..])
                .map_err(EncodeError::Compress)?;
            if n < data.len() {
                self.frame.truncate(FRAME_HEADER_BYTES + n);
                encoding = Encoding::Zstd;
            } else {
                self.frame.truncate(FRAME_HEADER_BYTES);
            }
        }
        if encoding == Encoding::Raw {
            self.frame.extend_from_slice(data);
        }
        self.emit(kind, encoding, disk_index, offset_bytes, data.len() as u64)
    }

    fn check_extent(
        &self,
        disk_index: u16,
        offset_bytes: u64,
        length_bytes: u64,
    ) -> Result<(), EncodeError> {
        let disk = self
            .disks
            .get(usize::from(disk_index))
            .ok_or(EncodeError::UnknownDisk {
                disk_index,
                disk_count: self.disks.len(),
            })?;
        disk.check_extent(offset_bytes, length_bytes)
            .map_err(|why| EncodeError::Extent {
                disk_index,
                offset_bytes,
                length_bytes,
                why,
            })
    }

    /// Fills in the header of `self.frame` (payload already after it) and writes the frame.
    fn emit(
        &mut self,
        kind: FrameKind,
        encoding: Encoding,
        disk_index: u16,
        offset_bytes: u64,
        length_bytes: u64,
    ) -> Result<u64, EncodeError> {
        let seq = self.next_seq;
        let mut header = FrameHeader {
            kind,
            encoding,
            disk_index,
            seq,
            offset_bytes,
            length_bytes,
            payload_len_bytes: (self.frame.len() - FRAME_HEADER_BYTES) as u32,
            checksum: 0,
        };
        let prefix = header.encode();
        header.checksum =
            FrameHeader::compute_checksum(&prefix[..40], &self.frame[FRAME_HEADER_BYTES..]);
        self.frame[..FRAME_HEADER_BYTES].copy_from_slice(&header.encode());
        self.writer
            .write_all(&self.frame)
            .map_err(EncodeError::Io)?;
        self.bytes_written += self.frame.len() as u64;
        self.next_seq = seq.wrapping_add(1);
        Ok(seq)
    }
}
