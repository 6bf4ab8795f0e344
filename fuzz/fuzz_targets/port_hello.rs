//! Arbitrary bytes → the data port's handshake codec (`engine::port`): the hello parser the
//! server runs on every connection, and the reply and record decoders the agent runs on what
//! a server sends. None may panic, and what each accepts must be what the bytes say:
//!
//! - a hello accepted by `decode_hello_fixed` re-encodes (with the token that follows it) to
//!   exactly its input: magic, version, mode, flags, item id, token length, disk, chunk size;
//!   its token length is 1..=256, mode 1 carries no disk or chunk size, RESYNC only in mode 1;
//! - a refused hello names its status, and never `ok`;
//! - a reply accepted by `decode_reply_fixed` has the documented magic, version and a message
//!   length ≤ 1024, and its fields are the bytes at their documented offsets;
//! - a record's sequence number is bytes 8..16, a close's message length is clamped to 1024.

#![no_main]

use engine::port::{
    HELLO_FIXED_BYTES, HELLO_FLAG_RESYNC, MAX_MESSAGE_BYTES, MAX_TOKEN_BYTES, Mode,
    RECORD_FIXED_BYTES, REPLY_FIXED_BYTES, Record, Status, decode_hello_fixed, decode_record,
    decode_reply_fixed,
};
use libfuzzer_sys::fuzz_target;

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(raw)
}

fuzz_target!(|data: &[u8]| {
    if let Some(raw) = data.first_chunk::<HELLO_FIXED_BYTES>() {
        check_hello(raw, &data[HELLO_FIXED_BYTES..]);
    }
    if let Some(raw) = data.first_chunk::<REPLY_FIXED_BYTES>() {
        match decode_reply_fixed(raw) {
            Ok(reply) => {
                assert_eq!(&raw[0..4], b"DRDA");
                assert_eq!(le_u16(raw, 4), 1);
                assert_eq!(reply.status, raw[6]);
                assert_eq!(reply.mode, raw[7]);
                assert_eq!(reply.next_seq, le_u64(raw, 8));
                assert_eq!(reply.payload_len_bytes, le_u64(raw, 16));
                assert_eq!(reply.message_len, usize::from(le_u16(raw, 24)));
                assert!(reply.message_len <= MAX_MESSAGE_BYTES);
            }
            Err(error) => assert!(!error.to_string().is_empty()),
        }
    }
    if let Some(raw) = data.first_chunk::<RECORD_FIXED_BYTES>() {
        let seq = le_u64(raw, 8);
        match decode_record(raw) {
            Ok(record) => {
                assert_eq!(record.seq(), seq);
                match record {
                    Record::Ack { .. } => assert_eq!(raw[0], 1),
                    Record::Close {
                        reason,
                        message_len,
                        ..
                    } => {
                        assert_eq!(raw[0], 2);
                        assert_eq!(reason.code(), raw[1]);
                        assert_eq!(
                            message_len,
                            usize::from(le_u16(raw, 2)).min(MAX_MESSAGE_BYTES)
                        );
                    }
                }
            }
            Err(error) => {
                assert!(raw[0] != 1 && raw[0] != 2);
                assert_eq!(error.seq(), seq);
            }
        }
    }
});

fn check_hello(raw: &[u8; HELLO_FIXED_BYTES], rest: &[u8]) {
    match decode_hello_fixed(raw) {
        Ok(fixed) => {
            assert!((1..=MAX_TOKEN_BYTES).contains(&fixed.token_len));
            if fixed.mode == Mode::Stream {
                assert_eq!((fixed.disk_index, fixed.chunk_size_bytes), (0, 0));
            } else {
                assert!(!fixed.resync, "RESYNC accepted in mode 2");
            }
            assert_eq!(
                raw[7] & !HELLO_FLAG_RESYNC,
                0,
                "undefined flag bits accepted"
            );
            let token_len = fixed.token_len.min(rest.len());
            let token = rest[..token_len].to_vec();
            let hello = fixed.with_token(token);
            let encoded = hello.encode();
            // The token length field is the hello's own only when the whole token arrived.
            if token_len == fixed.token_len {
                assert_eq!(
                    &encoded[..HELLO_FIXED_BYTES],
                    &raw[..],
                    "hello does not re-encode"
                );
                assert_eq!(&encoded[HELLO_FIXED_BYTES..], &rest[..token_len]);
            } else {
                assert_eq!(&encoded[..24], &raw[..24], "hello does not re-encode");
                assert_eq!(&encoded[26..32], &raw[26..32], "hello does not re-encode");
            }
            // Never print a secret.
            let debug = format!("{hello:?}");
            assert!(debug.contains("token_len"));
        }
        Err(refusal) => {
            assert_ne!(refusal.status, Status::Ok, "a refusal with status ok");
            assert!(!refusal.message.is_empty(), "a refusal that names nothing");
        }
    }
}
