//! Ingest validates every payload before it stages or acknowledges it (issue 11, obs. 2 and 3).
//!
//! Each stream here is: a good raw write (seq 1), the frame under test (seq 2, a valid
//! checksum, so only the payload check can refuse it), a good raw write (seq 3). A refused
//! payload must end the stream with the decoder's named reason at frame index 1, after seq 1
//! was committed and acknowledged, with nothing of seq 2 or later staged. A payload of several
//! zstd frames that together give the declared length is valid: staged, and decoded by the
//! same `PayloadDecoder` apply uses.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use std::sync::Arc;

use engine::delta::{
    DecodeErrorReason, DeltaEncoder, DiskGeometry, EncoderOptions, Encoding, FrameBody,
    FrameHeader, FrameKind, MAX_PAYLOAD_BYTES, PayloadDecoder, StreamHeader,
};
use engine::durable::StdDir;
use engine::ingest::{IngestConfig, IngestError, ingest_stream};
use engine::staging::{StagingConfig, StagingLog};

const DISK_BYTES: u64 = 8 << 20;
const LENGTH: usize = 1 << 20;

fn header() -> StreamHeader {
    StreamHeader {
        item_id: *b"ingest-validate!",
        item_name: "ingest-validation".into(),
        first_seq: 1,
        disks: vec![DiskGeometry {
            size_bytes: DISK_BYTES,
            block_size_bytes: 4096,
        }],
    }
}

fn data(length: usize, seed: u8) -> Vec<u8> {
    // Compressible but not trivial: runs of a counter.
    (0..length)
        .map(|i| (i / 64) as u8 ^ seed.wrapping_mul(31))
        .collect()
}

/// One frame with a correct checksum.
fn frame(
    kind: FrameKind,
    encoding: Encoding,
    seq: u64,
    offset: u64,
    length: u64,
    payload: &[u8],
) -> Vec<u8> {
    let mut header = FrameHeader {
        kind,
        encoding,
        disk_index: 0,
        seq,
        offset_bytes: offset,
        length_bytes: length,
        payload_len_bytes: payload.len() as u32,
        checksum: 0,
    };
    header.checksum = FrameHeader::compute_checksum(&header.encode()[..40], payload);
    let mut out = header.encode().to_vec();
    out.extend_from_slice(payload);
    out
}

fn zstd_write(seq: u64, length: usize, payload: &[u8]) -> Vec<u8> {
    frame(
        FrameKind::Write,
        Encoding::Zstd,
        seq,
        0,
        length as u64,
        payload,
    )
}

/// A stream: header, raw write seq 1, `middle` (seq 2), raw write seq 3; no end frame.
fn stream_with(middle: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    header().encode_into(&mut out);
    out.extend(frame(
        FrameKind::Write,
        Encoding::Raw,
        1,
        1 << 20,
        4096,
        &data(4096, 1),
    ));
    out.extend_from_slice(middle);
    out.extend(frame(
        FrameKind::Write,
        Encoding::Raw,
        3,
        2 << 20,
        4096,
        &data(4096, 3),
    ));
    out
}

fn zstd_without_content_size(data: &[u8]) -> Vec<u8> {
    let mut compressor = zstd::bulk::Compressor::new(1).unwrap();
    compressor
        .set_parameter(zstd::zstd_safe::CParameter::ContentSizeFlag(false))
        .unwrap();
    compressor.compress(data).unwrap()
}

struct Staged {
    _tmp: tempfile::TempDir,
    log: StagingLog,
    acks: Vec<u64>,
    result: Result<engine::ingest::IngestReport, IngestError>,
}

fn ingest(stream: &[u8]) -> Staged {
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, _) = StagingLog::open(
        Arc::new(StdDir::open(tmp.path()).unwrap()),
        header(),
        StagingConfig::default(),
    )
    .unwrap();
    let mut acks = Vec::new();
    let result = ingest_stream(stream, &mut log, IngestConfig::default(), &mut |seq, _| {
        acks.push(seq)
    });
    Staged {
        _tmp: tmp,
        log,
        acks,
        result,
    }
}

/// Every staged frame's seq and decoded data (zstd payloads through `PayloadDecoder`).
fn staged(log: &StagingLog) -> Vec<(u64, Vec<u8>)> {
    let mut reader = log.reader(1);
    let mut payloads = PayloadDecoder::new().unwrap();
    let mut out = vec![0u8; MAX_PAYLOAD_BYTES as usize];
    let mut frames = Vec::new();
    while let Some(frame) = reader.next_frame().unwrap() {
        let FrameBody::Write(extent) = &frame.body else {
            panic!("only writes here: {:?}", frame.body);
        };
        payloads.decode_into(extent, &mut out).unwrap();
        frames.push((frame.seq, out[..extent.length_bytes as usize].to_vec()));
    }
    frames
}

#[test]
fn a_payload_of_several_zstd_frames_making_the_declared_length_is_staged_and_decodes() {
    let whole = data(LENGTH, 2);
    // As observed: a first frame of 307200 bytes, then the rest, each with its content size.
    let mut payload = zstd::bulk::compress(&whole[..307_200], 1).unwrap();
    payload.extend(zstd::bulk::compress(&whole[307_200..700_000], 3).unwrap());
    payload.extend(zstd_without_content_size(&whole[700_000..]));
    let staged_run = ingest(&stream_with(&zstd_write(2, LENGTH, &payload)));
    let report = staged_run.result.unwrap();
    assert_eq!(report.frames_staged, 3);
    assert_eq!(staged_run.log.durable_seq(), 3);
    let frames = staged(&staged_run.log);
    assert_eq!(frames.len(), 3);
    assert_eq!(frames[1], (2, whole));
}

/// Whether a refusal's reason is the one expected.
type Expect = fn(&DecodeErrorReason) -> bool;

#[test]
fn payloads_that_do_not_decode_to_the_declared_length_are_refused_by_name_and_not_staged() {
    let whole = data(LENGTH, 4);
    let mut garbage = zstd::bulk::compress(&whole, 1).unwrap();
    let middle = garbage.len() / 2;
    garbage[middle..middle + 64].fill(0x5a);
    let mut two_too_many = zstd::bulk::compress(&whole[..LENGTH / 2], 1).unwrap();
    two_too_many.extend(zstd::bulk::compress(&whole, 1).unwrap());
    let mut frame_then_junk = zstd::bulk::compress(&whole, 1).unwrap();
    frame_then_junk.extend_from_slice(b"junk after the frame");
    let cut = zstd::bulk::compress(&whole, 1).unwrap();
    let cases: Vec<(&str, Vec<u8>, Expect)> = vec![
        ("not zstd at all", vec![0xEE; 4096], |r| {
            matches!(r, DecodeErrorReason::Decompress { .. })
        }),
        ("damaged inside a block", garbage, |r| {
            matches!(r, DecodeErrorReason::Decompress { .. })
        }),
        ("cut short", cut[..cut.len() - 100].to_vec(), |r| {
            matches!(r, DecodeErrorReason::Decompress { .. })
        }),
        (
            "decompresses short (no content size)",
            zstd_without_content_size(&whole[..LENGTH - 4096]),
            |r| {
                matches!(
                    r,
                    DecodeErrorReason::DecompressedSizeMismatch {
                        declared_bytes: 1_048_576,
                        actual_bytes: 1_044_480,
                    }
                )
            },
        ),
        (
            "decompresses long (no content size)",
            zstd_without_content_size(&data(LENGTH + 4096, 4)),
            |r| matches!(r, DecodeErrorReason::Decompress { .. }),
        ),
        (
            "declares another content size",
            zstd::bulk::compress(&whole[..LENGTH / 2], 1).unwrap(),
            |r| {
                matches!(
                    r,
                    DecodeErrorReason::DecompressedSizeMismatch {
                        actual_bytes: 524_288,
                        ..
                    }
                )
            },
        ),
        ("frames declaring more than the length", two_too_many, |r| {
            matches!(
                r,
                DecodeErrorReason::DecompressedSizeMismatch {
                    actual_bytes: 1_572_864,
                    ..
                }
            )
        }),
        ("a frame followed by junk", frame_then_junk, |r| {
            matches!(r, DecodeErrorReason::Decompress { .. })
        }),
    ];
    for (what, payload, expected) in cases {
        let run = ingest(&stream_with(&zstd_write(2, LENGTH, &payload)));
        let Err(IngestError::Decode(error)) = &run.result else {
            panic!("{what}: expected a decode error, got {:?}", run.result);
        };
        assert!(expected(&error.reason), "{what}: {error}");
        assert_eq!(error.frame_index, Some(1), "{what}: {error}");
        // The frame before it is durable and acknowledged; nothing of it or after it is.
        assert_eq!(run.acks, vec![1], "{what}");
        assert_eq!(run.log.durable_seq(), 1, "{what}");
        assert_eq!(run.log.next_seq(), 2, "{what}");
        let frames = staged(&run.log);
        assert_eq!(frames.len(), 1, "{what}");
        assert_eq!(frames[0].0, 1, "{what}");
    }
}

#[test]
fn a_zstd_resync_block_is_checked_like_a_write() {
    let payload = zstd_without_content_size(&data(LENGTH / 2, 5));
    let bad = frame(
        FrameKind::ResyncBlock,
        Encoding::Zstd,
        2,
        0,
        LENGTH as u64,
        &payload,
    );
    let run = ingest(&stream_with(&bad));
    assert!(
        matches!(&run.result, Err(IngestError::Decode(e)) if matches!(e.reason, DecodeErrorReason::DecompressedSizeMismatch { .. })),
        "{:?}",
        run.result
    );
    assert_eq!(run.log.durable_seq(), 1);
}

#[test]
fn an_end_frame_ends_the_stream_without_waiting_for_the_input_to_end() {
    // A reader that never ends after the end frame: ingest must return anyway.
    struct Endless {
        stream: std::io::Cursor<Vec<u8>>,
    }
    impl std::io::Read for Endless {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            match self.stream.read(buf)? {
                0 => panic!("ingest read past the end frame (it would block on a socket)"),
                n => Ok(n),
            }
        }
    }
    let mut encoder = DeltaEncoder::new(Vec::new(), &header(), EncoderOptions::default()).unwrap();
    encoder.write(0, 0, &data(8192, 6)).unwrap();
    let bytes = encoder.finish().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, _) = StagingLog::open(
        Arc::new(StdDir::open(tmp.path()).unwrap()),
        header(),
        StagingConfig::default(),
    )
    .unwrap();
    let mut acks = Vec::new();
    let report = ingest_stream(
        Endless {
            stream: std::io::Cursor::new(bytes),
        },
        &mut log,
        IngestConfig::default(),
        &mut |seq, _| acks.push(seq),
    )
    .unwrap();
    assert!(report.ended);
    assert_eq!(report.frames_staged, 1);
    assert_eq!(acks, vec![1]);
}
