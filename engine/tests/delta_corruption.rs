//! The delta-stream decoder against damaged and hostile input, and the encoder's refusals.
//!
//! Two layers:
//!
//! - **Sweeps** over one small valid stream (two disks, 512- and 4096-byte blocks, every frame
//!   kind, raw and zstd payloads): every byte flipped wholly and by one bit, and every
//!   truncation. Each damaged stream must fail, at the frame that holds the damaged byte, and
//!   every frame yielded before the failure must equal the original frame at that index: a
//!   damaged stream never decodes to different data.
//! - **Named defects**, one per `DecodeErrorReason`, each crafted with a valid checksum where
//!   the check under test comes after the checksum, asserting the exact reason, `frame_index`
//!   and `offset_bytes`.

use std::io::Read;

use engine::delta::{
    ALL_DISKS, CHECKSUM_SEED, Consistency, DataExtent, DecodeError, DecodeErrorReason,
    DeltaDecoder, DeltaEncoder, DiskGeometry, EncodeError, EncoderOptions, Encoding, ExtentError,
    FORMAT_VERSION, FRAME_HEADER_BYTES, FrameBody, FrameHeader, FrameKind, HeaderFieldError,
    MAX_LABEL_BYTES, MAX_PAYLOAD_BYTES, PayloadDecoder, StreamHeader,
};

const DISK0_BYTES: u64 = 1 << 20;
const DISK1_BYTES: u64 = 16 << 20;
const FIRST_SEQ: u64 = 1000;

fn header() -> StreamHeader {
    StreamHeader {
        item_id: *b"corruption-item!",
        item_name: "fileserver-02".to_owned(),
        first_seq: FIRST_SEQ,
        disks: vec![
            DiskGeometry {
                size_bytes: DISK0_BYTES,
                block_size_bytes: 512,
            },
            DiskGeometry {
                size_bytes: DISK1_BYTES,
                block_size_bytes: 4096,
            },
        ],
    }
}

fn header_bytes() -> Vec<u8> {
    let mut out = Vec::new();
    header().encode_into(&mut out);
    out
}

fn noise(length: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..length)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()[0]
        })
        .collect()
}

/// The sweep stream: every frame kind; zstd and raw payloads on both disks.
fn sample_stream() -> Vec<u8> {
    let options = EncoderOptions {
        zstd_level: Some(1),
    };
    let mut enc = DeltaEncoder::new(Vec::new(), &header(), options).expect("header");
    enc.write(0, 512, &[0u8; 1024])
        .expect("zstd write on disk 0");
    enc.write(1, 8192, &noise(4096, 1))
        .expect("raw write on disk 1");
    enc.zero_range(0, 4096, 8192).expect("zero range on disk 0");
    enc.zero_range(1, 0, 4096).expect("zero range on disk 1");
    enc.bookmark(Consistency::Crash, 7, 1_700_000_000_000_000_000, "hourly")
        .expect("crash bookmark");
    enc.resync_block(1, 4096, &b"resync text ".repeat(342)[..4096])
        .expect("zstd resync on disk 1");
    enc.resync_block(0, 0, &noise(512, 2))
        .expect("raw resync on disk 0");
    enc.bookmark(Consistency::App, 8, 1_700_000_000_000_000_001, "vss ✓")
        .expect("app bookmark");
    enc.finish().expect("finish")
}

/// A frame with its payload decoded: what a consumer of the stream acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
struct OwnedFrame {
    index: u64,
    offset_bytes: u64,
    seq: u64,
    kind: FrameKind,
    /// The body with data extents' payloads replaced by their decoded data.
    body: String,
    data: Option<Vec<u8>>,
    encoding: Option<Encoding>,
    wire_bytes: Vec<u8>,
}

/// Where a decode attempt stopped.
#[derive(Debug)]
enum Failure {
    /// `DeltaDecoder::new` or `next_frame` failed.
    Stream(DecodeError),
    /// `PayloadDecoder::decode_into` failed for the frame at this index.
    Payload(u64, DecodeErrorReason),
}

/// Decodes the whole of `stream`, payloads included, into one reused buffer. Returns the
/// frames decoded and the failure, if any.
fn decode_all(stream: &[u8], out: &mut [u8]) -> (Vec<OwnedFrame>, Option<Failure>) {
    let mut payloads = PayloadDecoder::new().expect("zstd context");
    let mut frames = Vec::new();
    let mut decoder = match DeltaDecoder::new(stream) {
        Ok(decoder) => decoder,
        Err(e) => return (frames, Some(Failure::Stream(e))),
    };
    loop {
        let frame = match decoder.next_frame() {
            Ok(Some(frame)) => frame,
            Ok(None) => return (frames, None),
            Err(e) => return (frames, Some(Failure::Stream(e))),
        };
        let mut decode_data = |extent: &DataExtent<'_>| {
            let length = extent.length_bytes as usize;
            out[..length].fill(0xA5);
            payloads
                .decode_into(extent, out)
                .map(|()| out[..length].to_vec())
        };
        let (data, encoding, body) = match &frame.body {
            FrameBody::Write(extent) | FrameBody::ResyncBlock(extent) => {
                match decode_data(extent) {
                    Ok(data) => {
                        let body = format!(
                            "{} disk {} offset {} length {}",
                            frame.kind().name(),
                            extent.disk_index,
                            extent.offset_bytes,
                            extent.length_bytes
                        );
                        (Some(data), Some(extent.encoding), body)
                    }
                    Err(reason) => return (frames, Some(Failure::Payload(frame.index, reason))),
                }
            }
            other => (None, None, format!("{other:?}")),
        };
        frames.push(OwnedFrame {
            index: frame.index,
            offset_bytes: frame.offset_bytes,
            seq: frame.seq,
            kind: frame.kind(),
            body,
            data,
            encoding,
            wire_bytes: frame.wire_bytes.to_vec(),
        });
    }
}

/// The frame index holding byte `position` of the original stream (`None` for the header).
fn frame_at(original: &[OwnedFrame], position: usize) -> Option<u64> {
    original
        .iter()
        .find(|f| {
            let start = f.offset_bytes as usize;
            (start..start + f.wire_bytes.len()).contains(&position)
        })
        .map(|f| f.index)
}

/// Asserts that a damaged stream failed at the frame holding `position`, yielding only
/// frames identical to the originals before it. Returns the stream error.
fn assert_fails_cleanly_at(
    what: &str,
    original: &[OwnedFrame],
    frames: &[OwnedFrame],
    failure: Option<Failure>,
    position: usize,
) -> DecodeError {
    let error = match failure {
        Some(Failure::Stream(error)) => error,
        Some(Failure::Payload(index, reason)) => {
            panic!("{what}: checksummed frame {index} passed and its payload failed: {reason}")
        }
        None => panic!("{what}: the damaged stream decoded without error"),
    };
    let at_frame = frame_at(original, position);
    assert_eq!(error.frame_index, at_frame, "{what}: error {error}");
    let frame_start = at_frame.map_or(0, |index| original[index as usize].offset_bytes);
    assert_eq!(error.offset_bytes, frame_start, "{what}: error {error}");
    assert_eq!(
        frames.len() as u64,
        at_frame.unwrap_or(0),
        "{what}: frames before error"
    );
    for (got, want) in frames.iter().zip(original) {
        assert_eq!(
            got, want,
            "{what}: frame {} differs from the original",
            got.index
        );
    }
    error
}

/// The sweep stream, decoded, with a sanity check of its shape.
fn sample_stream_and_frames(out: &mut [u8]) -> (Vec<u8>, Vec<OwnedFrame>) {
    let stream = sample_stream();
    let (original, failure) = decode_all(&stream, out);
    assert!(
        failure.is_none(),
        "the sample stream must decode: {failure:?}"
    );
    let kinds: Vec<FrameKind> = original.iter().map(|f| f.kind).collect();
    for kind in [
        FrameKind::Write,
        FrameKind::ZeroRange,
        FrameKind::Bookmark,
        FrameKind::ResyncBlock,
        FrameKind::End,
    ] {
        assert!(
            kinds.contains(&kind),
            "sample stream lacks a {kind:?} frame"
        );
    }
    let encodings: Vec<Encoding> = original.iter().filter_map(|f| f.encoding).collect();
    assert!(encodings.contains(&Encoding::Raw) && encodings.contains(&Encoding::Zstd));
    (stream, original)
}

#[test]
fn decoder_every_flipped_byte_fails_at_its_frame_and_never_changes_data() {
    let mut out = vec![0u8; 64 * 1024];
    let (stream, original) = sample_stream_and_frames(&mut out);
    let mut damaged = stream.clone();
    for position in 0..stream.len() {
        for mask in [0xFF, 0x01] {
            damaged[position] ^= mask;
            let (frames, failure) = decode_all(&damaged, &mut out);
            let what = format!("byte {position} ^ {mask:#04x}");
            assert_fails_cleanly_at(&what, &original, &frames, failure, position);
            damaged[position] ^= mask;
        }
    }
    assert_eq!(damaged, stream);
}

#[test]
fn decoder_every_truncation_fails_truncated_at_the_cut_frame() {
    let mut out = vec![0u8; 64 * 1024];
    let (stream, original) = sample_stream_and_frames(&mut out);
    for length in 0..stream.len() {
        let (frames, failure) = decode_all(&stream[..length], &mut out);
        let what = format!("truncated to {length} of {} bytes", stream.len());
        let error = assert_fails_cleanly_at(&what, &original, &frames, failure, length);
        assert!(
            matches!(error.reason, DecodeErrorReason::Truncated { .. }),
            "{what}: {error}"
        );
    }
}

// ---- Hand-built streams: frames with valid checksums that break one rule each. ----

/// One frame on the wire with a correct checksum.
fn frame_bytes(
    kind: FrameKind,
    encoding: Encoding,
    disk_index: u16,
    seq: u64,
    offset_bytes: u64,
    length_bytes: u64,
    payload: &[u8],
) -> Vec<u8> {
    let mut header = FrameHeader {
        kind,
        encoding,
        disk_index,
        seq,
        offset_bytes,
        length_bytes,
        payload_len_bytes: u32::try_from(payload.len()).expect("test payloads are small"),
        checksum: 0,
    };
    header.checksum = FrameHeader::compute_checksum(&header.encode()[..40], payload);
    let mut out = header.encode().to_vec();
    out.extend_from_slice(payload);
    out
}

fn raw_write(disk_index: u16, seq: u64, offset_bytes: u64, data: &[u8]) -> Vec<u8> {
    let length = data.len() as u64;
    frame_bytes(
        FrameKind::Write,
        Encoding::Raw,
        disk_index,
        seq,
        offset_bytes,
        length,
        data,
    )
}

fn end_frame(seq: u64) -> Vec<u8> {
    frame_bytes(FrameKind::End, Encoding::Raw, ALL_DISKS, seq, 0, 0, &[])
}

/// The stream header followed by `frames`.
fn stream_of(frames: &[Vec<u8>]) -> Vec<u8> {
    let mut out = header_bytes();
    for frame in frames {
        out.extend_from_slice(frame);
    }
    out
}

/// Decodes frames until the first error and returns it with the number of frames before it.
fn first_error(stream: &[u8]) -> (u64, DecodeError) {
    let mut decoder = match DeltaDecoder::new(stream) {
        Ok(decoder) => decoder,
        Err(error) => return (0, error),
    };
    let mut frames = 0;
    loop {
        match decoder.next_frame() {
            Ok(Some(_)) => frames += 1,
            Ok(None) => panic!("stream decoded without error after {frames} frames"),
            Err(e) => return (frames, e),
        }
    }
}

/// Decodes a single-frame stream whose one data frame must pass the stream checks, and
/// returns the payload decoder's verdict with the frame's index and offset.
fn payload_error(frame: Vec<u8>) -> (u64, u64, DecodeErrorReason) {
    let stream = stream_of(&[frame, end_frame(FIRST_SEQ + 1)]);
    let mut decoder = DeltaDecoder::new(stream.as_slice()).expect("header");
    let frame = decoder
        .next_frame()
        .expect("frame passes")
        .expect("a frame");
    let FrameBody::Write(extent) = &frame.body else {
        panic!("expected a write, got {:?}", frame.body);
    };
    let mut out = vec![0xA5; MAX_PAYLOAD_BYTES as usize];
    let reason = PayloadDecoder::new()
        .expect("zstd context")
        .decode_into(extent, &mut out)
        .expect_err("payload must be refused");
    // Whatever went wrong, nothing was written past the declared length.
    let length = extent.length_bytes as usize;
    assert!(
        out[length..].iter().all(|&b| b == 0xA5),
        "output written past {length}"
    );
    (frame.index, frame.offset_bytes, reason)
}

#[test]
fn decoder_bad_stream_magic_fails_bad_magic_at_header() {
    let mut stream = stream_of(&[end_frame(FIRST_SEQ)]);
    stream[0] = b'X';
    let error = DeltaDecoder::new(stream.as_slice()).expect_err("bad magic");
    assert_eq!((error.frame_index, error.offset_bytes), (None, 0));
    match error.reason {
        DecodeErrorReason::BadMagic { found } => assert_eq!(found, b"XRDELTA\0"),
        other => panic!("expected BadMagic, got {other:?}"),
    }
}

#[test]
fn decoder_unsupported_version_fails_before_checksum_check() {
    let mut stream = stream_of(&[end_frame(FIRST_SEQ)]);
    let header_len = header().encoded_len_bytes();
    stream[8..10].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
    // The stored checksum no longer holds for the changed bytes...
    let stored = u64::from_le_bytes(stream[header_len - 8..header_len].try_into().expect("8"));
    let computed = xxhash_rust::xxh3::xxh3_64_with_seed(&stream[..header_len - 8], CHECKSUM_SEED);
    assert_ne!(stored, computed);
    // ...yet the version is what is reported.
    let error = DeltaDecoder::new(stream.as_slice()).expect_err("version 2");
    assert_eq!((error.frame_index, error.offset_bytes), (None, 0));
    assert!(
        matches!(
            error.reason,
            DecodeErrorReason::UnsupportedVersion { found, supported }
                if found == FORMAT_VERSION + 1 && supported == FORMAT_VERSION
        ),
        "{error}"
    );
    // And with the checksum made valid, it is still the version.
    stream[header_len - 8..header_len].copy_from_slice(&computed.to_le_bytes());
    let error = DeltaDecoder::new(stream.as_slice()).expect_err("version 2");
    assert!(
        matches!(error.reason, DecodeErrorReason::UnsupportedVersion { .. }),
        "{error}"
    );
}

#[test]
fn decoder_header_checksum_mismatch_reports_stored_and_computed() {
    let mut stream = stream_of(&[end_frame(FIRST_SEQ)]);
    let header_len = header().encoded_len_bytes();
    stream[32] ^= 0x01; // first_seq
    let stored = u64::from_le_bytes(stream[header_len - 8..header_len].try_into().expect("8"));
    let computed = xxhash_rust::xxh3::xxh3_64_with_seed(&stream[..header_len - 8], CHECKSUM_SEED);
    let error = DeltaDecoder::new(stream.as_slice()).expect_err("checksum");
    assert_eq!((error.frame_index, error.offset_bytes), (None, 0));
    match error.reason {
        DecodeErrorReason::ChecksumMismatch {
            stored: s,
            computed: c,
        } => assert_eq!((s, c), (stored, computed)),
        other => panic!("expected ChecksumMismatch, got {other:?}"),
    }
}

#[test]
fn decoder_frame_checksum_mismatch_fails_at_that_frame() {
    let first = raw_write(0, FIRST_SEQ, 0, &noise(512, 3));
    let mut second = raw_write(1, FIRST_SEQ + 1, 4096, &noise(4096, 4));
    let stored = u64::from_le_bytes(second[40..48].try_into().expect("8"));
    second[FRAME_HEADER_BYTES + 100] ^= 0x10;
    let computed = FrameHeader::compute_checksum(&second[..40], &second[FRAME_HEADER_BYTES..]);
    let stream = stream_of(&[first.clone(), second, end_frame(FIRST_SEQ + 2)]);
    let (frames, error) = first_error(&stream);
    assert_eq!(frames, 1);
    assert_eq!(error.frame_index, Some(1));
    assert_eq!(
        error.offset_bytes,
        (header_bytes().len() + first.len()) as u64
    );
    match error.reason {
        DecodeErrorReason::ChecksumMismatch {
            stored: s,
            computed: c,
        } => assert_eq!((s, c), (stored, computed)),
        other => panic!("expected ChecksumMismatch, got {other:?}"),
    }
}

/// A reader that counts the bytes it hands out.
struct CountingReader<R> {
    inner: R,
    bytes_read: u64,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bytes_read += n as u64;
        Ok(n)
    }
}

/// A stream header and one frame header declaring `payload_len_bytes`, then endless bytes.
fn endless_after_frame_header(payload_len_bytes: u32) -> CountingReader<impl Read> {
    let header = FrameHeader {
        kind: FrameKind::Write,
        encoding: Encoding::Raw,
        disk_index: 1,
        seq: FIRST_SEQ,
        offset_bytes: 0,
        length_bytes: u64::from(payload_len_bytes),
        payload_len_bytes,
        checksum: 0,
    };
    let mut prefix = header_bytes();
    prefix.extend_from_slice(&header.encode());
    CountingReader {
        inner: std::io::Cursor::new(prefix).chain(std::io::repeat(0xAB)),
        bytes_read: 0,
    }
}

#[test]
fn decoder_payload_len_over_limit_fails_without_reading_payload() {
    let header_len = header_bytes().len() as u64;
    let mut reader = endless_after_frame_header(MAX_PAYLOAD_BYTES + 1);
    let mut decoder = DeltaDecoder::new(&mut reader).expect("header");
    let error = decoder.next_frame().expect_err("over the limit");
    assert_eq!(error.frame_index, Some(0));
    assert_eq!(error.offset_bytes, header_len);
    assert!(
        matches!(
            error.reason,
            DecodeErrorReason::LengthOverLimit { field: "frame payload", length_bytes, limit_bytes }
                if length_bytes == u64::from(MAX_PAYLOAD_BYTES) + 1
                    && limit_bytes == u64::from(MAX_PAYLOAD_BYTES)
        ),
        "{error}"
    );
    drop(decoder);
    assert_eq!(reader.bytes_read, header_len + FRAME_HEADER_BYTES as u64);
}

#[test]
fn decoder_payload_len_at_limit_reads_exactly_the_payload() {
    // The contrast case: exactly MAX_PAYLOAD_BYTES is legal, so the payload is read (and then
    // fails its checksum), and not one byte more.
    let header_len = header_bytes().len() as u64;
    let mut reader = endless_after_frame_header(MAX_PAYLOAD_BYTES);
    let mut decoder = DeltaDecoder::new(&mut reader).expect("header");
    let error = decoder.next_frame().expect_err("checksum");
    assert_eq!(
        (error.frame_index, error.offset_bytes),
        (Some(0), header_len)
    );
    assert!(
        matches!(error.reason, DecodeErrorReason::ChecksumMismatch { .. }),
        "{error}"
    );
    drop(decoder);
    let expected = header_len + FRAME_HEADER_BYTES as u64 + u64::from(MAX_PAYLOAD_BYTES);
    assert_eq!(reader.bytes_read, expected);
}

#[test]
fn decoder_write_length_over_limit_fails_length_over_limit() {
    let length = u64::from(MAX_PAYLOAD_BYTES) + 4096; // aligned and inside disk 1
    let payload = zstd::bulk::compress(&[0u8; 4096], 1).expect("compress");
    let frame = frame_bytes(
        FrameKind::Write,
        Encoding::Zstd,
        1,
        FIRST_SEQ,
        0,
        length,
        &payload,
    );
    let (frames, error) = first_error(&stream_of(&[frame, end_frame(FIRST_SEQ + 1)]));
    assert_eq!(frames, 0);
    assert_eq!(error.frame_index, Some(0));
    assert_eq!(error.offset_bytes, header_bytes().len() as u64);
    assert!(
        matches!(
            error.reason,
            DecodeErrorReason::LengthOverLimit { field: "write length", length_bytes, limit_bytes }
                if length_bytes == length && limit_bytes == u64::from(MAX_PAYLOAD_BYTES)
        ),
        "{error}"
    );
}

#[test]
fn decoder_misaligned_extents_fail_misaligned() {
    let header_len = header_bytes().len() as u64;
    let data_512 = noise(512, 5);
    let cases = [
        // (frame, disk, offset, length, block size)
        (
            raw_write(0, FIRST_SEQ, 256, &data_512),
            0u16,
            256u64,
            512u64,
            512u32,
        ),
        (raw_write(0, FIRST_SEQ, 0, &data_512[..500]), 0, 0, 500, 512),
        // 512-aligned is not enough on a 4096-byte disk.
        (
            raw_write(1, FIRST_SEQ, 512, &noise(4096, 6)),
            1,
            512,
            4096,
            4096,
        ),
        (raw_write(1, FIRST_SEQ, 0, &data_512), 1, 0, 512, 4096),
        (
            frame_bytes(
                FrameKind::ZeroRange,
                Encoding::Raw,
                1,
                FIRST_SEQ,
                4096,
                6144,
                &[],
            ),
            1,
            4096,
            6144,
            4096,
        ),
    ];
    for (frame, disk, offset, length, block) in cases {
        let (frames, error) = first_error(&stream_of(&[frame, end_frame(FIRST_SEQ + 1)]));
        assert_eq!(
            (frames, error.frame_index, error.offset_bytes),
            (0, Some(0), header_len)
        );
        match error.reason {
            DecodeErrorReason::Misaligned {
                disk_index,
                offset_bytes,
                length_bytes,
                block_size_bytes,
            } => assert_eq!(
                (disk_index, offset_bytes, length_bytes, block_size_bytes),
                (disk, offset, length, block)
            ),
            other => panic!("expected Misaligned for disk {disk} at {offset}, got {other:?}"),
        }
    }
}

#[test]
fn decoder_out_of_range_extents_fail_out_of_range() {
    let header_len = header_bytes().len() as u64;
    let past_end = u64::MAX - 511; // 512-aligned; offset + length overflows u64
    let cases = [
        (
            raw_write(0, FIRST_SEQ, DISK0_BYTES - 512, &noise(1024, 7)),
            0u16,
            DISK0_BYTES - 512,
        ),
        (
            raw_write(0, FIRST_SEQ, DISK0_BYTES, &noise(512, 8)),
            0,
            DISK0_BYTES,
        ),
        (
            raw_write(0, FIRST_SEQ, past_end, &noise(512, 9)),
            0,
            past_end,
        ),
        (
            frame_bytes(
                FrameKind::ZeroRange,
                Encoding::Raw,
                1,
                FIRST_SEQ,
                4096,
                DISK1_BYTES,
                &[],
            ),
            1,
            4096,
        ),
    ];
    for (frame, disk, offset) in cases {
        let (frames, error) = first_error(&stream_of(&[frame, end_frame(FIRST_SEQ + 1)]));
        assert_eq!(
            (frames, error.frame_index, error.offset_bytes),
            (0, Some(0), header_len)
        );
        let disk_size = header().disks[usize::from(disk)].size_bytes;
        match error.reason {
            DecodeErrorReason::OutOfRange {
                disk_index,
                offset_bytes,
                disk_size_bytes,
                ..
            } => assert_eq!(
                (disk_index, offset_bytes, disk_size_bytes),
                (disk, offset, disk_size)
            ),
            other => panic!("expected OutOfRange for disk {disk} at {offset}, got {other:?}"),
        }
    }
}

#[test]
fn decoder_unknown_disk_fails_unknown_disk() {
    let header_len = header_bytes().len() as u64;
    for disk in [2u16, ALL_DISKS] {
        let write = raw_write(disk, FIRST_SEQ, 0, &noise(512, 10));
        let zero = frame_bytes(
            FrameKind::ZeroRange,
            Encoding::Raw,
            disk,
            FIRST_SEQ,
            0,
            512,
            &[],
        );
        for frame in [write, zero] {
            let (frames, error) = first_error(&stream_of(&[frame, end_frame(FIRST_SEQ + 1)]));
            assert_eq!(
                (frames, error.frame_index, error.offset_bytes),
                (0, Some(0), header_len)
            );
            assert!(
                matches!(
                    error.reason,
                    DecodeErrorReason::UnknownDisk { disk_index, disk_count: 2 }
                        if disk_index == disk
                ),
                "{error}"
            );
        }
    }
}

/// Recomputes a hand-edited frame's checksum.
fn reseal_frame(frame: &mut [u8]) {
    let checksum = FrameHeader::compute_checksum(&frame[..40], &frame[FRAME_HEADER_BYTES..]);
    frame[40..48].copy_from_slice(&checksum.to_le_bytes());
}

/// Recomputes a hand-edited stream header's checksum (the header is the first `len` bytes).
fn reseal_header(stream: &mut [u8], len: usize) {
    let checksum = xxhash_rust::xxh3::xxh3_64_with_seed(&stream[..len - 8], CHECKSUM_SEED);
    stream[len - 8..len].copy_from_slice(&checksum.to_le_bytes());
}

#[test]
fn decoder_undefined_values_behind_valid_checksums_fail_invalid_field() {
    let header_len = header_bytes().len();
    let name_len = header().item_name.len();
    let disk1_entry = 48 + name_len + 16;
    // (what, byte to set in the stream header, value, expected field)
    let header_cases: [(&str, usize, u8, &str); 5] = [
        ("flags", 10, 1, "header flags"),
        ("reserved", 47, 1, "header reserved bytes"),
        (
            "disk reserved",
            disk1_entry + 15,
            1,
            "disk entry reserved bytes",
        ),
        (
            "block size 4097",
            disk1_entry + 8,
            1,
            "disk logical block size",
        ),
        ("disk size", disk1_entry, 1, "disk size"),
    ];
    for (what, at, value, field) in header_cases {
        let mut stream = stream_of(&[end_frame(FIRST_SEQ)]);
        stream[at] ^= value;
        reseal_header(&mut stream, header_len);
        let error = DeltaDecoder::new(stream.as_slice()).expect_err(what);
        assert_eq!((error.frame_index, error.offset_bytes), (None, 0), "{what}");
        assert!(
            matches!(&error.reason, DecodeErrorReason::InvalidField { field: f, .. } if *f == field),
            "{what}: {error}"
        );
    }

    let bookmark = |consistency: u8, reserved: u8, label: &[u8]| {
        let mut payload = vec![consistency, reserved];
        payload.extend_from_slice(&(label.len() as u16).to_le_bytes());
        payload.extend_from_slice(&[0; 4]);
        payload.extend_from_slice(&[0; 16]);
        payload.extend_from_slice(label);
        frame_bytes(
            FrameKind::Bookmark,
            Encoding::Raw,
            ALL_DISKS,
            FIRST_SEQ,
            0,
            0,
            &payload,
        )
    };
    let patched = |mut frame: Vec<u8>, at: usize, value: u8| {
        frame[at] = value;
        reseal_frame(&mut frame);
        frame
    };
    let write = raw_write(0, FIRST_SEQ, 0, &noise(512, 30));
    let zero = frame_bytes(
        FrameKind::ZeroRange,
        Encoding::Raw,
        0,
        FIRST_SEQ,
        0,
        512,
        &[],
    );
    let frame_cases: [(&str, Vec<u8>, &str); 10] = [
        ("kind 9", patched(write.clone(), 4, 9), "frame kind"),
        (
            "encoding 7",
            patched(write.clone(), 5, 7),
            "payload encoding",
        ),
        (
            "frame reserved",
            patched(write.clone(), 37, 1),
            "frame reserved bytes",
        ),
        (
            "raw payload shorter than length",
            frame_bytes(
                FrameKind::Write,
                Encoding::Raw,
                0,
                FIRST_SEQ,
                0,
                1024,
                &[1; 512],
            ),
            "payload length",
        ),
        (
            "zero range with payload",
            frame_bytes(
                FrameKind::ZeroRange,
                Encoding::Raw,
                0,
                FIRST_SEQ,
                0,
                512,
                &[0; 8],
            ),
            "payload length",
        ),
        // Length 512 is 00 02 00.. little-endian at byte 24: clearing byte 25 makes it 0.
        ("zero range, empty", patched(zero, 25, 0), "extent length"),
        (
            "end naming a disk",
            frame_bytes(FrameKind::End, Encoding::Raw, 0, FIRST_SEQ, 0, 0, &[]),
            "extent",
        ),
        (
            "consistency 3",
            bookmark(3, 0, b"x"),
            "bookmark consistency",
        ),
        (
            "bookmark reserved",
            bookmark(1, 1, b"x"),
            "bookmark reserved bytes",
        ),
        (
            "label not UTF-8",
            bookmark(1, 0, &[0xC3, 0x28]),
            "bookmark label",
        ),
    ];
    for (what, frame, field) in frame_cases {
        let (frames, error) = first_error(&stream_of(&[frame, end_frame(FIRST_SEQ + 1)]));
        assert_eq!(
            (frames, error.frame_index, error.offset_bytes),
            (0, Some(0), header_len as u64),
            "{what}"
        );
        assert!(
            matches!(&error.reason, DecodeErrorReason::InvalidField { field: f, .. } if *f == field),
            "{what}: {error}"
        );
    }
}

#[test]
fn decoder_sequence_gap_fails_sequence_gap() {
    let first = raw_write(0, FIRST_SEQ, 0, &noise(512, 11));
    let skipped = raw_write(0, FIRST_SEQ + 2, 512, &noise(512, 12));
    let stream = stream_of(&[first.clone(), skipped, end_frame(FIRST_SEQ + 3)]);
    let (frames, error) = first_error(&stream);
    assert_eq!(frames, 1);
    assert_eq!(error.frame_index, Some(1));
    assert_eq!(
        error.offset_bytes,
        (header_bytes().len() + first.len()) as u64
    );
    assert!(
        matches!(
            error.reason,
            DecodeErrorReason::SequenceGap { expected, found }
                if expected == FIRST_SEQ + 1 && found == FIRST_SEQ + 2
        ),
        "{error}"
    );
}

#[test]
fn decoder_duplicate_or_reordered_sequence_fails_sequence_reorder() {
    let first = raw_write(0, FIRST_SEQ, 0, &noise(512, 13));
    let second = raw_write(0, FIRST_SEQ + 1, 512, &noise(512, 14));
    let header_len = header_bytes().len();
    // A duplicate of frame 0 at index 1, and an older frame at index 2.
    let cases = [
        (
            vec![first.clone(), first.clone()],
            1u64,
            FIRST_SEQ + 1,
            FIRST_SEQ,
        ),
        (
            vec![first.clone(), second.clone(), first.clone()],
            2,
            FIRST_SEQ + 2,
            FIRST_SEQ,
        ),
    ];
    for (mut frames_in, index, expected_seq, found_seq) in cases {
        let offset: usize = header_len + frames_in.iter().map(Vec::len).sum::<usize>()
            - frames_in.last().map_or(0, Vec::len);
        frames_in.push(end_frame(expected_seq));
        let (frames, error) = first_error(&stream_of(&frames_in));
        assert_eq!(frames, index);
        assert_eq!(
            (error.frame_index, error.offset_bytes),
            (Some(index), offset as u64)
        );
        assert!(
            matches!(
                error.reason,
                DecodeErrorReason::SequenceReorder { expected, found }
                    if expected == expected_seq && found == found_seq
            ),
            "{error}"
        );
    }
}

#[test]
fn decoder_truncation_mid_payload_fails_truncated_with_counts() {
    let header_len = header_bytes().len();
    let write = raw_write(1, FIRST_SEQ, 0, &noise(4096, 15));
    let stream = stream_of(&[write]);
    let cut = header_len + FRAME_HEADER_BYTES + 1000;
    let (frames, error) = first_error(&stream[..cut]);
    assert_eq!(frames, 0);
    assert_eq!(
        (error.frame_index, error.offset_bytes),
        (Some(0), header_len as u64)
    );
    assert!(
        matches!(
            error.reason,
            DecodeErrorReason::Truncated { needed_bytes, available_bytes }
                if needed_bytes == (FRAME_HEADER_BYTES + 4096) as u64
                    && available_bytes == (FRAME_HEADER_BYTES + 1000) as u64
        ),
        "{error}"
    );
}

#[test]
fn decoder_data_after_end_fails_trailing_data() {
    let valid = stream_of(&[
        raw_write(0, FIRST_SEQ, 0, &noise(512, 16)),
        end_frame(FIRST_SEQ + 1),
    ]);
    // One stray byte, and a whole well-formed frame that continues the sequence.
    for trailer in [vec![0u8], raw_write(0, FIRST_SEQ + 2, 0, &noise(512, 17))] {
        let mut stream = valid.clone();
        stream.extend_from_slice(&trailer);
        let (frames, error) = first_error(&stream);
        assert_eq!(frames, 2);
        assert_eq!(
            (error.frame_index, error.offset_bytes),
            (Some(2), valid.len() as u64)
        );
        assert!(
            matches!(error.reason, DecodeErrorReason::TrailingData),
            "{error}"
        );
    }
}

#[test]
fn payload_zstd_with_other_declared_content_size_fails_size_mismatch() {
    let payload = zstd::bulk::compress(&vec![7u8; 8192], 1).expect("compress");
    let frame = frame_bytes(
        FrameKind::Write,
        Encoding::Zstd,
        1,
        FIRST_SEQ,
        0,
        4096,
        &payload,
    );
    let (index, offset, reason) = payload_error(frame);
    assert_eq!((index, offset), (0, header_bytes().len() as u64));
    assert!(
        matches!(
            reason,
            DecodeErrorReason::DecompressedSizeMismatch {
                declared_bytes: 4096,
                actual_bytes: 8192
            }
        ),
        "{reason}"
    );
}

/// A zstd frame without the content-size field, so only decompression can tell the size.
fn zstd_without_content_size(data: &[u8]) -> Vec<u8> {
    let mut compressor = zstd::bulk::Compressor::new(1).expect("compressor");
    compressor
        .set_parameter(zstd::zstd_safe::CParameter::ContentSizeFlag(false))
        .expect("parameter");
    let payload = compressor.compress(data).expect("compress");
    assert!(matches!(
        zstd::zstd_safe::get_frame_content_size(&payload),
        Ok(None)
    ));
    payload
}

#[test]
fn payload_zstd_decompressing_short_fails_size_mismatch() {
    let payload = zstd_without_content_size(&vec![7u8; 4096]);
    let frame = frame_bytes(
        FrameKind::Write,
        Encoding::Zstd,
        1,
        FIRST_SEQ,
        0,
        8192,
        &payload,
    );
    let (index, offset, reason) = payload_error(frame);
    assert_eq!((index, offset), (0, header_bytes().len() as u64));
    assert!(
        matches!(
            reason,
            DecodeErrorReason::DecompressedSizeMismatch {
                declared_bytes: 8192,
                actual_bytes: 4096
            }
        ),
        "{reason}"
    );
}

#[test]
fn payload_zstd_decompressing_long_fails_without_overrunning_length() {
    // 8192 bytes behind a 4096-byte declared length and no content-size field: the output
    // window is exactly the declared length, so zstd stops with "destination too small".
    let payload = zstd_without_content_size(&vec![7u8; 8192]);
    let frame = frame_bytes(
        FrameKind::Write,
        Encoding::Zstd,
        1,
        FIRST_SEQ,
        0,
        4096,
        &payload,
    );
    let (index, offset, reason) = payload_error(frame);
    assert_eq!((index, offset), (0, header_bytes().len() as u64));
    assert!(
        matches!(
            reason,
            DecodeErrorReason::Decompress { .. }
                | DecodeErrorReason::DecompressedSizeMismatch {
                    declared_bytes: 4096,
                    ..
                }
        ),
        "{reason}"
    );
}

#[test]
fn payload_zstd_garbage_fails_decompress() {
    let mut with_magic = vec![0x28, 0xB5, 0x2F, 0xFD];
    with_magic.extend_from_slice(&noise(60, 18));
    for garbage in [noise(64, 19), with_magic] {
        let frame = frame_bytes(
            FrameKind::Write,
            Encoding::Zstd,
            1,
            FIRST_SEQ,
            0,
            4096,
            &garbage,
        );
        let (index, offset, reason) = payload_error(frame);
        assert_eq!((index, offset), (0, header_bytes().len() as u64));
        assert!(
            matches!(reason, DecodeErrorReason::Decompress { .. }),
            "{reason}"
        );
    }
}

#[test]
fn decode_error_display_names_frame_offset_and_reason() {
    let first = raw_write(0, FIRST_SEQ, 0, &noise(512, 20));
    let offset = header_bytes().len() + first.len();
    let stream = stream_of(&[first, raw_write(0, FIRST_SEQ + 5, 0, &noise(512, 21))]);
    let (_, error) = first_error(&stream);
    let text = error.to_string();
    assert!(text.contains("frame 1"), "{text}");
    assert!(text.contains(&format!("byte offset {offset}")), "{text}");
    assert!(text.contains("sequence gap"), "{text}");
    assert!(
        text.contains(&format!("expected {}", FIRST_SEQ + 1)),
        "{text}"
    );

    let error = DeltaDecoder::new(&b"short"[..]).expect_err("truncated header");
    let text = error.to_string();
    assert!(text.contains("stream header"), "{text}");
    assert!(text.contains("byte offset 0"), "{text}");
    assert!(text.contains("truncated"), "{text}");
}

// ---- Encoder refusals: the encoder never writes what the decoder would refuse. ----

/// An encoder call that must be refused.
type Refusal = Box<dyn FnOnce(&mut DeltaEncoder<Vec<u8>>) -> Result<u64, EncodeError>>;

/// Runs `refuse` on a fresh encoder, checks that it wrote nothing and used no sequence
/// number, and that the stream it then finishes still decodes. Returns the error.
fn refused(
    refuse: impl FnOnce(&mut DeltaEncoder<Vec<u8>>) -> Result<u64, EncodeError>,
) -> EncodeError {
    let options = EncoderOptions {
        zstd_level: Some(1),
    };
    let mut enc = DeltaEncoder::new(Vec::new(), &header(), options).expect("header");
    enc.write(0, 0, &[1u8; 512]).expect("a legal write first");
    let (seq, written) = (enc.next_seq(), enc.bytes_written());
    let error = refuse(&mut enc).expect_err("must be refused");
    assert_eq!(
        (enc.next_seq(), enc.bytes_written()),
        (seq, written),
        "{error}"
    );
    let stream = enc.finish().expect("finish");
    assert_eq!(stream.len() as u64, written + FRAME_HEADER_BYTES as u64);
    let mut out = vec![0u8; 4096];
    let (frames, failure) = decode_all(&stream, &mut out);
    assert!(failure.is_none(), "{failure:?}");
    assert_eq!(frames.len(), 2);
    error
}

#[test]
fn encoder_unknown_disk_is_refused() {
    for disk in [2u16, ALL_DISKS] {
        let error = refused(|enc| enc.write(disk, 0, &[0u8; 512]));
        assert!(
            matches!(error, EncodeError::UnknownDisk { disk_index, disk_count: 2 } if disk_index == disk),
            "{error}"
        );
        let error = refused(|enc| enc.zero_range(disk, 0, 512));
        assert!(matches!(error, EncodeError::UnknownDisk { .. }), "{error}");
    }
}

#[test]
fn encoder_misaligned_extent_is_refused() {
    let cases: [(&str, Refusal); 4] = [
        (
            "offset on 512",
            Box::new(|enc| enc.write(0, 100, &[0u8; 512])),
        ),
        (
            "length on 512",
            Box::new(|enc| enc.resync_block(0, 0, &[0u8; 700])),
        ),
        (
            "512 on 4096",
            Box::new(|enc| enc.write(1, 512, &[0u8; 4096])),
        ),
        ("zero on 4096", Box::new(|enc| enc.zero_range(1, 0, 512))),
    ];
    for (what, refuse) in cases {
        let error = refused(refuse);
        assert!(
            matches!(
                error,
                EncodeError::Extent {
                    why: ExtentError::Misaligned { .. },
                    ..
                }
            ),
            "{what}: {error}"
        );
    }
}

#[test]
fn encoder_out_of_range_and_empty_extents_are_refused() {
    let error = refused(|enc| enc.write(0, DISK0_BYTES - 512, &[0u8; 1024]));
    assert!(
        matches!(
            error,
            EncodeError::Extent {
                disk_index: 0,
                why: ExtentError::OutOfRange {
                    disk_size_bytes: DISK0_BYTES
                },
                ..
            }
        ),
        "{error}"
    );
    let error = refused(|enc| enc.zero_range(1, u64::MAX - 4095, 4096));
    assert!(
        matches!(
            error,
            EncodeError::Extent {
                why: ExtentError::OutOfRange { .. },
                ..
            }
        ),
        "{error}"
    );
    let error = refused(|enc| enc.zero_range(0, 0, 0));
    assert!(
        matches!(
            error,
            EncodeError::Extent {
                why: ExtentError::Empty,
                ..
            }
        ),
        "{error}"
    );
    let error = refused(|enc| enc.write(1, 0, &[]));
    assert!(
        matches!(
            error,
            EncodeError::Extent {
                why: ExtentError::Empty,
                ..
            }
        ),
        "{error}"
    );
}

#[test]
fn encoder_data_over_max_payload_is_refused() {
    let too_long = vec![0u8; MAX_PAYLOAD_BYTES as usize + 4096];
    let error = refused(|enc| enc.write(1, 0, &too_long));
    assert!(
        matches!(error, EncodeError::TooLong { length_bytes } if length_bytes == too_long.len()),
        "{error}"
    );
    let error = refused(|enc| enc.resync_block(1, 0, &too_long));
    assert!(matches!(error, EncodeError::TooLong { .. }), "{error}");
}

#[test]
fn encoder_label_over_max_is_refused() {
    let label = "x".repeat(MAX_LABEL_BYTES + 1);
    let error = refused(|enc| enc.bookmark(Consistency::App, 1, 2, &label));
    assert!(
        matches!(error, EncodeError::LabelTooLong { length_bytes } if length_bytes == MAX_LABEL_BYTES + 1),
        "{error}"
    );
}

#[test]
fn encoder_invalid_header_is_refused() {
    let mut bad_block = header();
    bad_block.disks[1].block_size_bytes = 1024;
    let mut no_disks = header();
    no_disks.disks.clear();
    let options = EncoderOptions { zstd_level: None };
    let error = DeltaEncoder::new(Vec::new(), &bad_block, options).expect_err("block size");
    assert!(
        matches!(
            error,
            EncodeError::Header(HeaderFieldError::BlockSize {
                disk_index: 1,
                block_size_bytes: 1024
            })
        ),
        "{error}"
    );
    let error = DeltaEncoder::new(Vec::new(), &no_disks, options).expect_err("no disks");
    assert!(
        matches!(
            error,
            EncodeError::Header(HeaderFieldError::DiskCount { count: 0 })
        ),
        "{error}"
    );
}
