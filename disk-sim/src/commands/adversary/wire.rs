//! The adversary's own wire code, written from `docs/design/data-port.md`,
//! `docs/design/delta-stream.md` and RFC 8878 (zstd frames) rather than from the engine's codec:
//! a client built from the documents alone. It writes exactly the bytes it is told to,
//! including malformed ones; the only thing it gets right on purpose is the XXH3 checksum of
//! a frame, so that a broken payload reaches the checks behind the checksum.
//!
//! Reading answers: [`read_reply`] and [`read_record`] read the server's reply and its
//! ack/close records with a deadline, and say how the connection ended when no answer came.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use engine::delta::DiskGeometry;

/// `dr-delta` as a little-endian u64: the XXH3 seed of delta-stream checksums.
pub const DELTA_SEED: u64 = u64::from_le_bytes(*b"dr-delta");
/// Frame kinds (delta-stream.md, "Frame").
pub const KIND_WRITE: u8 = 1;
/// Zero range.
pub const KIND_ZERO: u8 = 2;
/// Bookmark.
pub const KIND_BOOKMARK: u8 = 3;
/// Resync block.
pub const KIND_RESYNC_BLOCK: u8 = 4;
/// End of stream.
pub const KIND_END: u8 = 5;
/// Payload stored as is.
pub const ENCODING_RAW: u8 = 0;
/// Payload of one or more zstd frames.
pub const ENCODING_ZSTD: u8 = 1;
/// "All disks" (bookmark and end frames).
pub const ALL_DISKS: u16 = 0xFFFF;

// ─────────────────────────── hello ───────────────────────────

/// The fields of a hello, each free to be wrong.
#[derive(Debug, Clone)]
pub struct RawHello {
    /// Bytes 0..4, `DRDP` when valid.
    pub magic: [u8; 4],
    /// Protocol version, 1.
    pub version: u16,
    /// 1 stream, 2 chunk hashes.
    pub mode: u8,
    /// Bit 0 RESYNC.
    pub flags: u8,
    /// The item.
    pub item_id: [u8; 16],
    /// The token length field (may disagree with `token`).
    pub token_len: u16,
    /// Mode 2: disk index.
    pub disk_index: u16,
    /// Mode 2: chunk size.
    pub chunk_size_bytes: u32,
    /// The token bytes sent after the fixed part.
    pub token: Vec<u8>,
}

impl RawHello {
    /// A valid hello for `mode` (disk and chunk size only matter in mode 2).
    pub fn valid(mode: u8, item_id: [u8; 16], token: &[u8], disk: u16, chunk: u32) -> Self {
        Self {
            magic: *b"DRDP",
            version: 1,
            mode,
            flags: 0,
            item_id,
            token_len: token.len() as u16,
            disk_index: if mode == 2 { disk } else { 0 },
            chunk_size_bytes: if mode == 2 { chunk } else { 0 },
            token: token.to_vec(),
        }
    }

    /// The bytes: 32 fixed, then the token.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + self.token.len());
        out.extend_from_slice(&self.magic);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.push(self.mode);
        out.push(self.flags);
        out.extend_from_slice(&self.item_id);
        out.extend_from_slice(&self.token_len.to_le_bytes());
        out.extend_from_slice(&self.disk_index.to_le_bytes());
        out.extend_from_slice(&self.chunk_size_bytes.to_le_bytes());
        out.extend_from_slice(&self.token);
        out
    }
}

// ─────────────────────────── delta stream ───────────────────────────

/// A stream header (delta-stream.md, "Stream header"), checksummed.
pub fn stream_header(
    item_id: &[u8; 16],
    name: &str,
    first_seq: u64,
    disks: &[DiskGeometry],
) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(b"DRDELTA\0");
    out.extend_from_slice(&1u16.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(disks.len() as u16).to_le_bytes());
    out.extend_from_slice(&(name.len() as u16).to_le_bytes());
    out.extend_from_slice(item_id);
    out.extend_from_slice(&first_seq.to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes());
    out.extend_from_slice(name.as_bytes());
    for disk in disks {
        out.extend_from_slice(&disk.size_bytes.to_le_bytes());
        out.extend_from_slice(&disk.block_size_bytes.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
    }
    let sum = xxhash_rust::xxh3::xxh3_64_with_seed(&out, DELTA_SEED);
    out.extend_from_slice(&sum.to_le_bytes());
    out
}

/// One frame (delta-stream.md, "Frame") with a valid checksum over whatever it is given.
#[derive(Debug, Clone)]
pub struct RawFrame {
    /// 1 write, 2 zero range, 3 bookmark, 4 resync block, 5 end.
    pub kind: u8,
    /// 0 raw, 1 zstd.
    pub encoding: u8,
    /// Disk index, 0xFFFF for all disks.
    pub disk_index: u16,
    /// Sequence number.
    pub seq: u64,
    /// Extent offset.
    pub offset_bytes: u64,
    /// Extent length (the decompressed length for data frames).
    pub length_bytes: u64,
    /// The payload.
    pub payload: Vec<u8>,
}

impl RawFrame {
    /// The 48-byte header and the payload; checksum = XXH3-64(seed, header[0..40] ‖ payload).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(48 + self.payload.len());
        out.extend_from_slice(b"DRFR");
        out.push(self.kind);
        out.push(self.encoding);
        out.extend_from_slice(&self.disk_index.to_le_bytes());
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.offset_bytes.to_le_bytes());
        out.extend_from_slice(&self.length_bytes.to_le_bytes());
        out.extend_from_slice(&(self.payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        let mut hasher = xxhash_rust::xxh3::Xxh3::with_seed(DELTA_SEED);
        hasher.update(&out);
        hasher.update(&self.payload);
        out.extend_from_slice(&hasher.digest().to_le_bytes());
        out.extend_from_slice(&self.payload);
        out
    }

    /// A zero-range frame (no payload).
    pub fn zero(disk: u16, seq: u64, offset: u64, length: u64) -> Self {
        Self {
            kind: KIND_ZERO,
            encoding: ENCODING_RAW,
            disk_index: disk,
            seq,
            offset_bytes: offset,
            length_bytes: length,
            payload: Vec::new(),
        }
    }

    /// An end frame.
    pub fn end(seq: u64) -> Self {
        Self {
            kind: KIND_END,
            encoding: ENCODING_RAW,
            disk_index: ALL_DISKS,
            seq,
            offset_bytes: 0,
            length_bytes: 0,
            payload: Vec::new(),
        }
    }
}

// ─────────────────────────── zstd frames (RFC 8878) ───────────────────────────

/// Largest block of a zstd frame (Block_Maximum_Size for windows of 128 KiB or more).
const ZSTD_BLOCK_MAX: usize = 128 << 10;

/// A zstd frame of raw blocks holding `content`. `declared`: the Frame_Content_Size it
/// states (single-segment frame, 8-byte field), which may differ from the content; `None`:
/// no content size, an 8 MiB window.
pub fn zstd_frame(content: &[u8], declared: Option<u64>) -> Vec<u8> {
    let mut out = zstd_frame_header(declared);
    let mut blocks = content.chunks(ZSTD_BLOCK_MAX).peekable();
    if blocks.peek().is_none() {
        push_block_header(&mut out, true, 0, 0);
    }
    while let Some(block) = blocks.next() {
        push_block_header(&mut out, blocks.peek().is_none(), 0, block.len());
        out.extend_from_slice(block);
    }
    out
}

/// A zstd frame without a content size whose RLE blocks expand to `total` bytes of `byte`:
/// a few bytes on the wire, any size decompressed.
pub fn zstd_rle_frame(byte: u8, total: usize) -> Vec<u8> {
    let mut out = zstd_frame_header(None);
    let mut left = total;
    loop {
        let size = left.min(ZSTD_BLOCK_MAX);
        left -= size;
        push_block_header(&mut out, left == 0, 1, size);
        out.push(byte);
        if left == 0 {
            return out;
        }
    }
}

fn zstd_frame_header(declared: Option<u64>) -> Vec<u8> {
    let mut out = 0xFD2F_B528u32.to_le_bytes().to_vec();
    match declared {
        Some(size) => {
            // FCS_Field_Size flag 3 (8 bytes), Single_Segment_flag set, no checksum, no dict.
            out.push(0b1110_0000);
            out.extend_from_slice(&size.to_le_bytes());
        }
        None => {
            // No content size; Window_Descriptor: exponent 13 → 2^23 = 8 MiB.
            out.push(0);
            out.push(13 << 3);
        }
    }
    out
}

fn push_block_header(out: &mut Vec<u8>, last: bool, block_type: u32, size: usize) {
    let header = u32::from(last) | (block_type << 1) | ((size as u32) << 3);
    out.extend_from_slice(&header.to_le_bytes()[..3]);
}

// ─────────────────────────── reading answers ───────────────────────────

/// How a read for an answer ended when no complete answer came.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Silence {
    /// Nothing (or not all of it) within the deadline; the connection is still open.
    #[error("no answer")]
    Timeout,
    /// The server closed the connection (`got` bytes of the answer had arrived).
    #[error("{}", closed_text(*got))]
    Closed {
        /// Bytes of the answer that arrived before the close.
        got: usize,
    },
    /// A reset or another socket error.
    #[error("socket error ({0})")]
    Error(String),
}

fn closed_text(got: usize) -> String {
    if got == 0 {
        "closed without an answer".to_owned()
    } else {
        format!("closed after {got} bytes of an answer")
    }
}

/// Reads exactly `buf.len()` bytes by `deadline`.
pub fn read_exact_by(
    stream: &mut TcpStream,
    buf: &mut [u8],
    deadline: Instant,
) -> Result<(), Silence> {
    let mut got = 0;
    while got < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Silence::Timeout);
        }
        stream
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .map_err(|e| Silence::Error(e.to_string()))?;
        match stream.read(&mut buf[got..]) {
            Ok(0) => return Err(Silence::Closed { got }),
            Ok(n) => got += n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Silence::Error(e.to_string())),
        }
    }
    Ok(())
}

/// A reply (data-port.md, "Reply").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// 0 ok, else a refusal status.
    pub status: u8,
    /// The echoed mode.
    pub mode: u8,
    /// Mode 1, ok: the first seq the server wants.
    pub next_seq: u64,
    /// Mode 2, ok: payload bytes after the message.
    pub payload_len: u64,
    /// The message.
    pub message: String,
}

/// Reads a reply by `deadline`. A reply that is not one (bad magic, version, message length)
/// is an error naming what was wrong.
pub fn read_reply(
    stream: &mut TcpStream,
    deadline: Instant,
) -> Result<Result<Reply, String>, Silence> {
    let mut fixed = [0u8; 32];
    read_exact_by(stream, &mut fixed, deadline)?;
    if &fixed[0..4] != b"DRDA" {
        return Ok(Err(format!("reply magic {:02x?}", &fixed[0..4])));
    }
    let version = u16::from_le_bytes([fixed[4], fixed[5]]);
    if version != 1 {
        return Ok(Err(format!("reply version {version}")));
    }
    let message_len = usize::from(u16::from_le_bytes([fixed[24], fixed[25]]));
    if message_len > 1024 {
        return Ok(Err(format!("reply message length {message_len} over 1024")));
    }
    let mut message = vec![0u8; message_len];
    read_exact_by(stream, &mut message, deadline)?;
    Ok(Ok(Reply {
        status: fixed[6],
        mode: fixed[7],
        next_seq: le_u64(&fixed[8..16]),
        payload_len: le_u64(&fixed[16..24]),
        message: String::from_utf8_lossy(&message).into_owned(),
    }))
}

/// A record (data-port.md, "Records").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// Every frame ≤ seq is durable.
    Ack(u64),
    /// The server ends the session.
    Close {
        /// Reason code.
        reason: u8,
        /// Durable seq at the close.
        seq: u64,
        /// Its message.
        message: String,
    },
    /// A kind this client does not know.
    Unknown(u8),
}

/// Reads one record by `deadline`.
pub fn read_record(stream: &mut TcpStream, deadline: Instant) -> Result<Record, Silence> {
    let mut fixed = [0u8; 16];
    read_exact_by(stream, &mut fixed, deadline)?;
    let seq = le_u64(&fixed[8..16]);
    match fixed[0] {
        1 => Ok(Record::Ack(seq)),
        2 => {
            let len = usize::from(u16::from_le_bytes([fixed[2], fixed[3]])).min(1024);
            let mut message = vec![0u8; len];
            read_exact_by(stream, &mut message, deadline)?;
            Ok(Record::Close {
                reason: fixed[1],
                seq,
                message: String::from_utf8_lossy(&message).into_owned(),
            })
        }
        kind => Ok(Record::Unknown(kind)),
    }
}

fn le_u64(bytes: &[u8]) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(raw)
}

/// A TCP connection to `addr` with a 5 s connect timeout and a 10 s write timeout.
pub fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_nodelay(true)?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    Ok(stream)
}

/// Writes `bytes`; the error text on failure (the server may have closed early on purpose).
pub fn send(stream: &mut TcpStream, bytes: &[u8]) -> Result<(), String> {
    stream.write_all(bytes).map_err(|e| e.to_string())
}

/// Closes our sending half (the end of input for the server).
pub fn half_close(stream: &TcpStream) {
    let _ = stream.shutdown(Shutdown::Write);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use engine::delta::{DeltaDecoder, FrameBody, PayloadDecoder};

    fn disks() -> Vec<DiskGeometry> {
        vec![DiskGeometry {
            size_bytes: 1 << 20,
            block_size_bytes: 4096,
        }]
    }

    /// The bytes written from the documents decode with the engine's decoder: the header,
    /// checksums, a raw write, zstd writes (with and without a content size, RLE blocks), a
    /// zero range and the end frame.
    #[test]
    fn frames_written_from_the_docs_decode_with_the_engine() {
        let content: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let content = &content[..(300_000 / 4096) * 4096];
        let mut stream = stream_header(&[7; 16], "doc-client", 5, &disks());
        let frames = [
            RawFrame {
                kind: KIND_WRITE,
                encoding: ENCODING_RAW,
                disk_index: 0,
                seq: 5,
                offset_bytes: 4096,
                length_bytes: 8192,
                payload: vec![3; 8192],
            },
            RawFrame {
                kind: KIND_WRITE,
                encoding: ENCODING_ZSTD,
                disk_index: 0,
                seq: 6,
                offset_bytes: 0,
                length_bytes: content.len() as u64,
                payload: zstd_frame(content, Some(content.len() as u64)),
            },
            RawFrame {
                kind: KIND_WRITE,
                encoding: ENCODING_ZSTD,
                disk_index: 0,
                seq: 7,
                offset_bytes: 0,
                length_bytes: content.len() as u64,
                payload: zstd_frame(content, None),
            },
            RawFrame {
                kind: KIND_WRITE,
                encoding: ENCODING_ZSTD,
                disk_index: 0,
                seq: 8,
                offset_bytes: 0,
                length_bytes: 256 << 10,
                payload: zstd_rle_frame(9, 256 << 10),
            },
            RawFrame::zero(0, 9, 0, 4096),
            RawFrame::end(10),
        ];
        for frame in &frames {
            stream.extend_from_slice(&frame.encode());
        }
        let mut decoder = DeltaDecoder::new(stream.as_slice()).unwrap();
        assert_eq!(decoder.header().first_seq, 5);
        assert_eq!(decoder.header().item_name, "doc-client");
        let mut payload = PayloadDecoder::new().unwrap();
        let mut out = vec![0u8; 1 << 20];
        let mut seen = 0;
        while let Some(frame) = decoder.next_frame().unwrap() {
            if let FrameBody::Write(extent) = &frame.body {
                payload.decode_into(extent, &mut out).unwrap();
                let len = extent.length_bytes as usize;
                match frame.seq {
                    5 => assert_eq!(&out[..len], &[3u8; 8192][..]),
                    6 | 7 => assert_eq!(&out[..len], content),
                    _ => assert!(out[..len].iter().all(|&b| b == 9)),
                }
            }
            seen += 1;
        }
        assert_eq!(seen, frames.len());
    }

    #[test]
    fn hello_layout_is_the_documented_one() {
        let hello = RawHello::valid(2, [1; 16], b"tok", 3, 65536).encode();
        let fixed: [u8; 32] = hello[..32].try_into().unwrap();
        let parsed = engine::port::decode_hello_fixed(&fixed).unwrap();
        assert_eq!(parsed.disk_index, 3);
        assert_eq!(parsed.chunk_size_bytes, 65536);
        assert_eq!(parsed.token_len, 3);
        assert_eq!(&hello[32..], b"tok");
    }
}
