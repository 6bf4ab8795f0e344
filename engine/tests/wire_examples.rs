//! The worked examples of `docs/design/delta-stream.md` and `docs/design/data-port.md`, made
//! by the real encoders: every hex dump and test vector printed in those documents is produced
//! here, must appear there verbatim, and decodes with the real decoders. So the examples cannot
//! drift from the code: a change to a layout, a seed or a message fails this test.
//!
//! To see (or re-paste after a deliberate format change) every example:
//! `cargo test -p engine --test wire_examples -- --nocapture`.

// Test helpers outside #[test] functions unwrap too: a failure here is a test failure.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::Path;

use engine::delta::{
    CHECKSUM_SEED, Consistency, DeltaDecoder, DeltaEncoder, DiskGeometry, EncoderOptions,
    FRAME_HEADER_BYTES, FrameBody, PayloadDecoder, StreamHeader,
};
use engine::port::{
    CloseReason, HELLO_FIXED_BYTES, Hello, Mode, RECORD_FIXED_BYTES, REPLY_FIXED_BYTES, Record,
    Status, decode_hello_fixed, decode_record, decode_reply_fixed, encode_ack, encode_close,
    encode_hello, encode_reply,
};
use engine::resync::{CHUNK_HASH_SEED, ChunkHashes, ResyncOptions, chunk_hash, hash_path};

/// The item id of every example, as the control API shows it.
const ITEM_HEX: &str = "00112233445566778899aabbccddeeff";
/// A stream token as `POST /v1/items` returns it (64 lower-case hex digits).
const TOKEN: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// `hexdump -C` style: offset, 16 bytes in two groups of 8, printable ASCII.
fn dump(bytes: &[u8]) -> String {
    let mut out = String::new();
    for (line, chunk) in bytes.chunks(16).enumerate() {
        let mut hex = String::new();
        for (i, byte) in chunk.iter().enumerate() {
            if i == 8 {
                hex.push(' ');
            }
            hex.push_str(&format!("{byte:02x} "));
        }
        let ascii: String = chunk
            .iter()
            .map(|&b| {
                if b.is_ascii_graphic() || b == b' ' {
                    b as char
                } else {
                    '.'
                }
            })
            .collect();
        out.push_str(&format!("{:04x}  {hex:<49} |{ascii}|\n", line * 16));
    }
    out
}

/// A u64 as the documents write constants: `0x6174_6c65_642d_7264`.
fn grouped(value: u64) -> String {
    let hex = format!("{value:016x}");
    format!(
        "0x{}_{}_{}_{}",
        &hex[0..4],
        &hex[4..8],
        &hex[8..12],
        &hex[12..16]
    )
}

fn item_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    for (i, byte) in id.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&ITEM_HEX[2 * i..2 * i + 2], 16).unwrap();
    }
    id
}

fn header() -> StreamHeader {
    StreamHeader {
        item_id: item_id(),
        item_name: "vm1".into(),
        first_seq: 1,
        disks: vec![DiskGeometry {
            size_bytes: 1 << 20,
            block_size_bytes: 4096,
        }],
    }
}

/// One document and the examples it lacks.
struct Examples {
    name: &'static str,
    document: String,
    missing: Vec<String>,
}

impl Examples {
    fn of(name: &'static str) -> Self {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../docs/design")
            .join(name);
        Self {
            name,
            document: std::fs::read_to_string(&path).unwrap(),
            missing: Vec::new(),
        }
    }

    /// Prints `text` under `title`; notes it if the document does not hold it verbatim.
    fn check(&mut self, title: &str, text: &str) {
        println!("── {}: {title}\n{text}", self.name);
        if !self.document.contains(text) {
            self.missing.push(title.to_owned());
        }
    }

    /// Fails naming every example the document lacks (all of them were printed).
    fn finish(self) {
        assert!(
            self.missing.is_empty(),
            "{} does not hold these examples as the code makes them (run with --nocapture \
             to see them): {:?}",
            self.name,
            self.missing
        );
    }
}

#[test]
fn delta_stream_examples_are_what_the_encoder_writes() {
    let mut doc = Examples::of("delta-stream.md");

    // The stream: header, a zstd write, a zero range, a bookmark, the end frame.
    let mut encoder = DeltaEncoder::new(
        Vec::new(),
        &header(),
        EncoderOptions {
            zstd_level: Some(1),
        },
    )
    .unwrap();
    let mut cuts = vec![0, encoder.bytes_written() as usize];
    assert_eq!(encoder.write(0, 8192, &[0xab; 4096]).unwrap(), 1);
    cuts.push(encoder.bytes_written() as usize);
    assert_eq!(encoder.zero_range(0, 65536, 65536).unwrap(), 2);
    cuts.push(encoder.bytes_written() as usize);
    let stamp = 1_700_000_000_000_000_000;
    assert_eq!(
        encoder
            .bookmark(Consistency::Crash, 1, stamp, "b1")
            .unwrap(),
        3
    );
    cuts.push(encoder.bytes_written() as usize);
    let stream = encoder.finish().unwrap();
    cuts.push(stream.len());
    let titles = [
        "stream header",
        "write, zstd",
        "zero range",
        "bookmark",
        "end",
    ];
    for (index, title) in titles.iter().enumerate() {
        doc.check(
            &format!("{title} at stream offset {}", cuts[index]),
            &dump(&stream[cuts[index]..cuts[index + 1]]),
        );
    }
    doc.check("stream length", &format!("{} bytes in all", stream.len()));

    // The same write stored raw: its 48-byte header (the 4096 payload bytes 0xab follow).
    let mut raw =
        DeltaEncoder::new(Vec::new(), &header(), EncoderOptions { zstd_level: None }).unwrap();
    let start = raw.bytes_written() as usize;
    raw.write(0, 8192, &[0xab; 4096]).unwrap();
    let raw = raw.into_inner();
    assert_eq!(raw.len(), start + FRAME_HEADER_BYTES + 4096);
    doc.check(
        "write, raw: frame header",
        &dump(&raw[start..start + FRAME_HEADER_BYTES]),
    );
    doc.check("checksum seed", &grouped(CHECKSUM_SEED));

    // Everything above decodes, payloads included.
    let mut decoder = DeltaDecoder::new(stream.as_slice()).unwrap();
    let mut payloads = PayloadDecoder::new().unwrap();
    let mut out = vec![0u8; 4096];
    let mut seqs = Vec::new();
    while let Some(frame) = decoder.next_frame().unwrap() {
        seqs.push(frame.seq);
        if let FrameBody::Write(extent) = &frame.body {
            payloads.decode_into(extent, &mut out).unwrap();
            assert!(out.iter().all(|&b| b == 0xab));
        }
    }
    assert_eq!(
        seqs,
        [1, 2, 3, 4],
        "the end frame carries a sequence number too"
    );
    doc.finish();
}

#[test]
fn data_port_examples_are_what_the_codec_writes() {
    let mut doc = Examples::of("data-port.md");
    let id = item_id();

    let hello = Hello {
        mode: Mode::Stream,
        item_id: id,
        token: TOKEN.as_bytes().to_vec(),
        disk_index: 0,
        chunk_size_bytes: 0,
        resync: false,
    }
    .encode();
    doc.check("mode-1 hello", &dump(&hello));
    let fixed: [u8; HELLO_FIXED_BYTES] = hello[..HELLO_FIXED_BYTES].try_into().unwrap();
    let parsed = decode_hello_fixed(&fixed).unwrap();
    assert_eq!((parsed.item_id, parsed.token_len), (id, 64));

    let reply = encode_reply(
        Status::Ok,
        Mode::Stream as u8,
        1,
        0,
        "send frames from seq 1",
    );
    doc.check("mode-1 reply", &dump(&reply));
    let fixed: [u8; REPLY_FIXED_BYTES] = reply[..REPLY_FIXED_BYTES].try_into().unwrap();
    assert_eq!(decode_reply_fixed(&fixed).unwrap().next_seq, 1);

    let ack = encode_ack(3);
    doc.check("ack", &dump(&ack));
    assert_eq!(decode_record(&ack).unwrap(), Record::Ack { seq: 3 });
    let close = encode_close(CloseReason::EndOfStream, 3, "end frame received");
    doc.check("close", &dump(&close));
    let fixed: [u8; RECORD_FIXED_BYTES] = close[..RECORD_FIXED_BYTES].try_into().unwrap();
    assert_eq!(decode_record(&fixed).unwrap().seq(), 3);

    // Mode 2: a 12,800-byte disk in 4096-byte chunks; chunk 1 is 0xab, the rest zeros, and
    // the last chunk is 512 bytes.
    let hello = encode_hello(Mode::ChunkHashes, &id, TOKEN.as_bytes(), 0, 4096);
    doc.check("mode-2 hello", &dump(&hello));
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk-0");
    let mut content = vec![0u8; 12_800];
    content[4096..8192].fill(0xab);
    std::fs::File::create(&disk)
        .unwrap()
        .write_all(&content)
        .unwrap();
    let options = ResyncOptions {
        chunk_size_bytes: 4096,
        ..ResyncOptions::default()
    };
    let hashes = hash_path(&disk, &options, &mut |_| {}, &|| false).unwrap();
    assert_eq!(hashes.hashes.len(), 4);
    assert_eq!(hashes.hashes[0], hashes.hashes[2], "no chunk is special");
    assert_eq!(hashes.hashes[0], chunk_hash(&[0u8; 4096]));
    assert_eq!(hashes.hashes[3], chunk_hash(&[0u8; 512]), "hashed short");
    assert_ne!(hashes.hashes[3], hashes.hashes[0]);
    let list = hashes.encode();
    assert_eq!(ChunkHashes::decode(&list).unwrap(), hashes);
    let reply = encode_reply(
        Status::Ok,
        Mode::ChunkHashes as u8,
        0,
        list.len() as u64,
        "disk 0: 4 chunks of 4096 bytes over 12800 bytes",
    );
    doc.check("mode-2 reply", &dump(&reply));
    doc.check("hash list", &dump(&list));
    doc.check("chunk seed", &grouped(CHUNK_HASH_SEED));
    for (what, bytes) in [
        ("4096 zero bytes", &[0u8; 4096][..]),
        ("512 zero bytes", &[0u8; 512][..]),
        ("4096 bytes 0xab", &[0xabu8; 4096][..]),
    ] {
        doc.check(what, &format!("{:#018x}", chunk_hash(bytes)));
    }
    doc.finish();
}
