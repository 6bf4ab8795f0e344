//! Payloads whose checksum holds but whose zstd content does not decode to the declared length.

#![allow(clippy::unwrap_used)]

use super::*;

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
