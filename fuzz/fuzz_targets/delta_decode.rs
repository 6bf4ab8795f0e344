//! Arbitrary bytes → `DeltaDecoder` → `PayloadDecoder`: must never panic, hang or over-allocate.
//!
//! Besides "no panic", every accepted structure is checked against the input it came from:
//!
//! - the decoded stream header re-encodes to exactly the bytes it was read from (the decoder
//!   rejects non-zero flags and reserved bytes, so decoding is injective);
//! - each frame's `wire_bytes` is the input slice at `frame.offset_bytes`, frames are
//!   contiguous, and indexes and sequence numbers count up from 0 and `first_seq`;
//! - a bookmark re-encodes to the frame's payload;
//! - a data payload that decodes fills exactly `length_bytes` (raw: equals the payload);
//! - `Ok(None)` comes only after the end frame, and only once the input is used up.
//!
//! Each input is decoded twice: as it is, and with every checksum it appears to have
//! recomputed ([`fix_checksums`]). Random mutations almost never keep an XXH3 checksum valid,
//! so without the second pass the fuzzer would rarely get past the checksum checks to the
//! field, extent, sequence and payload rules behind them.

#![no_main]

use std::cell::RefCell;

use engine::delta::{
    CHECKSUM_SEED, DISK_ENTRY_BYTES, DataExtent, DeltaDecoder, FRAME_HEADER_BYTES, FrameBody,
    FrameHeader, MAX_PAYLOAD_BYTES, PayloadDecoder, STREAM_HEADER_FIXED_BYTES, StreamHeader,
};
use libfuzzer_sys::fuzz_target;

struct Scratch {
    payload: PayloadDecoder,
    /// One reused output buffer, as large as the biggest legal write.
    out: Vec<u8>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch {
        payload: PayloadDecoder::new().expect("zstd context"),
        out: vec![0u8; MAX_PAYLOAD_BYTES as usize],
    });
}

fuzz_target!(|data: &[u8]| {
    SCRATCH.with(|scratch| {
        let scratch = &mut scratch.borrow_mut();
        check(data, scratch);
        let mut fixed = data.to_vec();
        if fix_checksums(&mut fixed) {
            check(&fixed, scratch);
        }
    });
});

fn le_u16(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

fn le_u32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

/// Rewrites the stream header checksum and every frame checksum, reading lengths the way the
/// decoder does, as far as the bytes allow. Returns whether anything changed.
fn fix_checksums(bytes: &mut [u8]) -> bool {
    let original_len = bytes.len();
    let mut changed = false;
    let (Some(disk_count), Some(name_len)) = (le_u16(bytes, 12), le_u16(bytes, 14)) else {
        return false;
    };
    let header_len = STREAM_HEADER_FIXED_BYTES
        + usize::from(name_len)
        + usize::from(disk_count) * DISK_ENTRY_BYTES;
    if bytes.len() < header_len + 8 {
        return false;
    }
    let sum = xxhash_rust::xxh3::xxh3_64_with_seed(&bytes[..header_len], CHECKSUM_SEED);
    changed |= bytes[header_len..header_len + 8] != sum.to_le_bytes();
    bytes[header_len..header_len + 8].copy_from_slice(&sum.to_le_bytes());
    let mut at = header_len + 8;
    while let Some(payload_len) = le_u32(bytes, at + 32) {
        let payload_len = payload_len as usize;
        let end = at + FRAME_HEADER_BYTES + payload_len;
        if payload_len > MAX_PAYLOAD_BYTES as usize || end > bytes.len() {
            break;
        }
        let sum = FrameHeader::compute_checksum(
            &bytes[at..at + 40],
            &bytes[at + FRAME_HEADER_BYTES..end],
        );
        changed |= bytes[at + 40..at + 48] != sum.to_le_bytes();
        bytes[at + 40..at + 48].copy_from_slice(&sum.to_le_bytes());
        at = end;
    }
    debug_assert_eq!(bytes.len(), original_len);
    changed
}

fn check(data: &[u8], scratch: &mut Scratch) {
    let Ok(mut decoder) = DeltaDecoder::new(data) else {
        return;
    };
    let header: StreamHeader = decoder.header().clone();
    let mut reencoded = Vec::new();
    header.encode_into(&mut reencoded);
    assert_eq!(
        reencoded.as_slice(),
        &data[..reencoded.len()],
        "stream header does not re-encode to its input"
    );
    let mut expected_offset = reencoded.len() as u64;
    let mut expected_index = 0u64;
    let mut expected_seq = header.first_seq;
    loop {
        let ended_before = decoder.ended();
        let frame = match decoder.next_frame() {
            Ok(Some(frame)) => frame,
            Ok(None) => {
                assert!(ended_before, "Ok(None) before the end frame");
                assert_eq!(
                    expected_offset,
                    data.len() as u64,
                    "Ok(None) with input left"
                );
                return;
            }
            Err(_) => return,
        };
        assert!(!ended_before, "a frame after the end frame");
        assert_eq!(frame.index, expected_index);
        assert_eq!(frame.offset_bytes, expected_offset);
        assert_eq!(frame.seq, expected_seq);
        let start = usize::try_from(frame.offset_bytes).expect("offset fits usize");
        assert_eq!(
            frame.wire_bytes,
            &data[start..start + frame.wire_bytes.len()],
            "wire bytes are not the input"
        );
        let payload = &frame.wire_bytes[FRAME_HEADER_BYTES..];
        match &frame.body {
            FrameBody::Write(extent) | FrameBody::ResyncBlock(extent) => {
                check_extent(&header, extent, payload, scratch);
            }
            FrameBody::ZeroRange {
                disk_index,
                offset_bytes,
                length_bytes,
            } => {
                let disk = header.disks[usize::from(*disk_index)];
                assert!(*length_bytes > 0);
                assert_eq!(offset_bytes % u64::from(disk.block_size_bytes), 0);
                assert!(offset_bytes + length_bytes <= disk.size_bytes);
                assert!(payload.is_empty());
            }
            FrameBody::Bookmark(bookmark) => {
                let mut encoded = Vec::new();
                bookmark.encode_into(&mut encoded);
                assert_eq!(encoded.as_slice(), payload, "bookmark does not re-encode");
            }
            FrameBody::End => assert!(payload.is_empty()),
        }
        expected_offset += frame.wire_bytes.len() as u64;
        expected_index += 1;
        expected_seq = expected_seq.wrapping_add(1);
    }
}

fn check_extent(header: &StreamHeader, extent: &DataExtent<'_>, payload: &[u8], s: &mut Scratch) {
    assert_eq!(extent.payload, payload);
    let disk = header.disks[usize::from(extent.disk_index)];
    let length = u64::from(extent.length_bytes);
    assert!(length > 0 && length <= u64::from(MAX_PAYLOAD_BYTES));
    assert_eq!(extent.offset_bytes % u64::from(disk.block_size_bytes), 0);
    assert_eq!(length % u64::from(disk.block_size_bytes), 0);
    assert!(extent.offset_bytes + length <= disk.size_bytes);
    if s.payload.decode_into(extent, &mut s.out).is_ok()
        && extent.encoding == engine::delta::Encoding::Raw
    {
        assert_eq!(&s.out[..extent.length_bytes as usize], payload);
    }
}
