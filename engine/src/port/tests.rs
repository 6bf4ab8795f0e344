//! Unit tests of the data port's wire codec: hello, reply and record round trips and refusals.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use super::*;

fn hello_bytes(mode: u8, token_len: u16, disk: u16, chunk: u32) -> [u8; HELLO_FIXED_BYTES] {
    let mut raw = [0u8; HELLO_FIXED_BYTES];
    raw[0..4].copy_from_slice(&HELLO_MAGIC);
    raw[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    raw[6] = mode;
    raw[8..24].copy_from_slice(b"item-0123456789a");
    raw[24..26].copy_from_slice(&token_len.to_le_bytes());
    raw[26..28].copy_from_slice(&disk.to_le_bytes());
    raw[28..32].copy_from_slice(&chunk.to_le_bytes());
    raw
}

#[test]
fn hello_layout_matches_the_protocol_document() {
    let hello = encode_hello(Mode::ChunkHashes, b"0123456789abcdef", b"tok", 5, 65536);
    assert_eq!(hello.len(), HELLO_FIXED_BYTES + 3);
    assert_eq!(&hello[0..4], b"DRDP");
    assert_eq!(le_u16_at(&hello, 4), 1);
    assert_eq!((hello[6], hello[7]), (2, 0));
    assert_eq!(&hello[8..24], b"0123456789abcdef");
    assert_eq!(le_u16_at(&hello, 24), 3);
    assert_eq!(le_u16_at(&hello, 26), 5);
    assert_eq!(&hello[28..32], &65536u32.to_le_bytes());
    assert_eq!(&hello[32..], b"tok");
}

#[test]
fn hello_round_trips_and_every_defect_is_named() {
    let hello = Hello {
        mode: Mode::ChunkHashes,
        item_id: *b"item-0123456789a",
        token: b"secret".to_vec(),
        disk_index: 3,
        chunk_size_bytes: 65536,
        resync: false,
    };
    let bytes = hello.encode();
    let mut fixed = [0u8; HELLO_FIXED_BYTES];
    fixed.copy_from_slice(&bytes[..HELLO_FIXED_BYTES]);
    let head = decode_hello_fixed(&fixed).unwrap();
    assert_eq!(head.mode, Mode::ChunkHashes);
    assert_eq!(head.token_len, 6);
    assert_eq!((head.disk_index, head.chunk_size_bytes), (3, 65536));
    assert!(!head.resync);
    assert_eq!(head.with_token(bytes[HELLO_FIXED_BYTES..].to_vec()), hello);
    assert!(!format!("{hello:?}").contains("secret"));

    let status = |raw: [u8; HELLO_FIXED_BYTES]| decode_hello_fixed(&raw).unwrap_err().status;
    let mut raw = hello_bytes(1, 8, 0, 0);
    raw[0] = b'G';
    assert_eq!(status(raw), Status::BadHello);
    let mut raw = hello_bytes(1, 8, 0, 0);
    raw[4] = 9;
    assert_eq!(status(raw), Status::UnsupportedVersion);
    assert_eq!(status(hello_bytes(7, 8, 0, 0)), Status::UnsupportedMode);
    assert_eq!(status(hello_bytes(1, 0, 0, 0)), Status::BadHello);
    let error = decode_hello_fixed(&hello_bytes(1, 257, 0, 0)).unwrap_err();
    assert!(error.message.contains("token length 257"), "{error}");
    assert_eq!(status(hello_bytes(1, 8, 1, 0)), Status::BadHello);
    let mut raw = hello_bytes(1, 8, 0, 0);
    raw[7] = 2;
    assert_eq!(status(raw), Status::BadHello);
}

#[test]
fn the_resync_flag_round_trips_in_mode_1_only_and_unknown_flags_are_refused() {
    let hello = Hello {
        mode: Mode::Stream,
        item_id: *b"item-0123456789a",
        token: b"secret".to_vec(),
        disk_index: 0,
        chunk_size_bytes: 0,
        resync: true,
    };
    let bytes = hello.encode();
    assert_eq!(bytes[7], HELLO_FLAG_RESYNC);
    assert_eq!(hello.flags(), HELLO_FLAG_RESYNC);
    let mut fixed = [0u8; HELLO_FIXED_BYTES];
    fixed.copy_from_slice(&bytes[..HELLO_FIXED_BYTES]);
    let head = decode_hello_fixed(&fixed).unwrap();
    assert!(head.resync);
    assert_eq!(head.with_token(bytes[HELLO_FIXED_BYTES..].to_vec()), hello);
    assert!(format!("{hello:?}").contains("resync: true"));

    // Without the flag: byte 7 is zero, and the plain encoder agrees byte for byte.
    let plain = Hello {
        resync: false,
        ..hello.clone()
    };
    assert_eq!(plain.encode()[7], 0);
    assert_eq!(
        plain.encode(),
        encode_hello(Mode::Stream, &plain.item_id, b"secret", 0, 0)
    );
    fixed.copy_from_slice(&plain.encode()[..HELLO_FIXED_BYTES]);
    assert!(!decode_hello_fixed(&fixed).unwrap().resync);

    // Every undefined bit, alone or next to RESYNC, is refused by name.
    for bit in 1..8 {
        for with_resync in [0, HELLO_FLAG_RESYNC] {
            let mut raw = hello_bytes(1, 8, 0, 0);
            raw[7] = (1u8 << bit) | with_resync;
            let refusal = decode_hello_fixed(&raw).unwrap_err();
            assert_eq!(refusal.status, Status::BadHello);
            assert!(refusal.message.contains("not defined"), "{refusal}");
        }
    }

    // RESYNC in mode 2 is refused (encoded as given, refused by the decoder).
    let chunk_hello = Hello {
        mode: Mode::ChunkHashes,
        disk_index: 1,
        chunk_size_bytes: 65536,
        ..hello
    };
    let bytes = chunk_hello.encode();
    fixed.copy_from_slice(&bytes[..HELLO_FIXED_BYTES]);
    let refusal = decode_hello_fixed(&fixed).unwrap_err();
    assert_eq!(refusal.status, Status::BadHello);
    assert!(refusal.message.contains("mode 1"), "{refusal}");
}

#[test]
fn decoders_never_panic_on_any_fixed_bytes() {
    use rand_xoshiro::Xoshiro256PlusPlus;
    use rand_xoshiro::rand_core::{Rng, SeedableRng};

    let mut rng = Xoshiro256PlusPlus::seed_from_u64(0x9e37_79b9_7f4a_7c15);
    let mut next = move || rng.next_u64();
    for _ in 0..20_000 {
        let mut raw = [0u8; HELLO_FIXED_BYTES];
        for byte in raw.iter_mut() {
            *byte = next() as u8;
        }
        let magic = next().is_multiple_of(2);
        let mut hello = raw;
        let mut reply = raw;
        if magic {
            hello[0..4].copy_from_slice(&HELLO_MAGIC);
            hello[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
            reply[0..4].copy_from_slice(&REPLY_MAGIC);
            reply[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        }
        let _ = decode_hello_fixed(&hello);
        if let Ok(fixed) = decode_reply_fixed(&reply) {
            assert!(fixed.message_len <= MAX_MESSAGE_BYTES);
        }
        let mut record = [0u8; RECORD_FIXED_BYTES];
        record.copy_from_slice(&raw[..RECORD_FIXED_BYTES]);
        if magic {
            record[0] = RECORD_CLOSE;
        }
        if let Ok(Record::Close { message_len, .. }) = decode_record(&record) {
            assert!(message_len <= MAX_MESSAGE_BYTES);
        }
    }
}

#[test]
fn records_and_replies_have_the_documented_layout() {
    let ack = encode_ack(0x0102_0304_0506_0708);
    assert_eq!(ack[0], RECORD_ACK);
    assert_eq!(&ack[1..8], &[0u8; 7]);
    assert_eq!(le_u64_at(&ack, 8), 0x0102_0304_0506_0708);
    assert_eq!(
        decode_record(&ack),
        Ok(Record::Ack {
            seq: 0x0102_0304_0506_0708
        })
    );

    let close = encode_close(CloseReason::CorruptFrame, 41, "frame seq 42: bad");
    assert_eq!((close[0], close[1]), (RECORD_CLOSE, 2));
    assert_eq!(usize::from(le_u16_at(&close, 2)), "frame seq 42: bad".len());
    assert_eq!(le_u64_at(&close, 8), 41);
    assert_eq!(&close[RECORD_FIXED_BYTES..], b"frame seq 42: bad");
    let mut fixed = [0u8; RECORD_FIXED_BYTES];
    fixed.copy_from_slice(&close[..RECORD_FIXED_BYTES]);
    assert_eq!(
        decode_record(&fixed),
        Ok(Record::Close {
            reason: ReceivedCloseReason::CorruptFrame,
            seq: 41,
            message_len: "frame seq 42: bad".len(),
        })
    );
    fixed[0] = 7;
    let error = decode_record(&fixed).unwrap_err();
    assert_eq!(
        (error.to_string().as_str(), error.seq()),
        ("record kind 7", 41)
    );

    let long = "é".repeat(MAX_MESSAGE_BYTES);
    let reply = encode_reply(Status::Busy, 1, 7, 9, &long);
    assert_eq!(&reply[0..4], &REPLY_MAGIC);
    assert_eq!(le_u16_at(&reply, 4), PROTOCOL_VERSION);
    assert_eq!((reply[6], reply[7]), (Status::Busy as u8, 1));
    assert_eq!((le_u64_at(&reply, 8), le_u64_at(&reply, 16)), (7, 9));
    let message_len = usize::from(le_u16_at(&reply, 24));
    assert!(message_len <= MAX_MESSAGE_BYTES);
    assert_eq!(reply.len(), REPLY_FIXED_BYTES + message_len);
    assert!(std::str::from_utf8(&reply[REPLY_FIXED_BYTES..]).is_ok());
    let mut fixed = [0u8; REPLY_FIXED_BYTES];
    fixed.copy_from_slice(&reply[..REPLY_FIXED_BYTES]);
    let decoded = decode_reply_fixed(&fixed).unwrap();
    assert_eq!(
        (decoded.status, decoded.mode, decoded.next_seq),
        (Status::Busy as u8, 1, 7)
    );
    assert_eq!(
        (decoded.payload_len_bytes, decoded.message_len),
        (9, message_len)
    );

    fixed[24..26].copy_from_slice(&1025u16.to_le_bytes());
    assert_eq!(
        decode_reply_fixed(&fixed).unwrap_err().to_string(),
        "reply message of 1025 bytes, over 1024"
    );
    fixed[4] = 2;
    assert_eq!(
        decode_reply_fixed(&fixed),
        Err(ReplyError::UnsupportedVersion(2))
    );
    fixed[0] = b'X';
    assert!(matches!(
        decode_reply_fixed(&fixed),
        Err(ReplyError::BadMagic(_))
    ));
}

#[test]
fn codes_round_trip_in_both_views_and_unknown_codes_are_named() {
    for code in 0..=255u8 {
        if let Some(status) = Status::from_u8(code) {
            assert_eq!(status as u8, code);
        }
        if let Some(reason) = CloseReason::from_u8(code) {
            assert_eq!(reason as u8, code);
            assert_eq!(ReceivedCloseReason::from_u8(code).name(), reason.name());
        }
        assert_eq!(RefusalStatus::from_u8(code).code(), code);
        assert_eq!(ReceivedCloseReason::from_u8(code).code(), code);
    }
    assert_eq!(RefusalStatus::from_u8(0), RefusalStatus::Other(0));
    assert_eq!(RefusalStatus::from_u8(200), RefusalStatus::Other(200));
    assert_eq!(
        RefusalStatus::from_u8(200).to_string(),
        "unknown-status(200)"
    );
    assert_eq!(RefusalStatus::from_u8(5).to_string(), "bad-token");
    assert_eq!(Status::BadToken.to_string(), "bad-token");
    assert!(!ReceivedCloseReason::from_u8(99).is_transient());
    assert_eq!(
        ReceivedCloseReason::from_u8(99).to_string(),
        "unknown-reason(99)"
    );
    assert!(ReceivedCloseReason::from_u8(2).is_transient());
    assert_eq!(CloseReason::InvalidPayload as u8, 10);
    assert_eq!(
        ReceivedCloseReason::from_u8(10),
        ReceivedCloseReason::InvalidPayload
    );
    assert!(!ReceivedCloseReason::InvalidPayload.is_transient());
}

#[test]
fn not_replicating_is_code_16_and_final() {
    assert_eq!(Status::NotReplicating as u8, 16);
    assert_eq!(Status::from_u8(16), Some(Status::NotReplicating));
    assert_eq!(Status::NotReplicating.to_string(), "not-replicating");
    assert_eq!(RefusalStatus::from_u8(16), RefusalStatus::NotReplicating);
    assert_eq!(RefusalStatus::NotReplicating.code(), 16);
    assert_eq!(RefusalStatus::from_u8(16).to_string(), "not-replicating");
    assert!(!RefusalStatus::NotReplicating.is_transient());
    assert!(!RefusalStatus::ResyncRequired.is_transient());
    assert_eq!(RefusalStatus::from_u8(17), RefusalStatus::Other(17));
}
