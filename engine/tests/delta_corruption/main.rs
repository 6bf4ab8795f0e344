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

mod decoder_defects;
mod encoder_refusals;
mod payload_defects;
