//! Named decoder defects, one per reason, each behind a valid checksum where the check comes after it.

#![allow(clippy::unwrap_used)]

use super::*;

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
