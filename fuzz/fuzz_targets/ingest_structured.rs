//! Structure-aware ingest: `arbitrary` builds a sequence of frame specs (kind, disk, offset,
//! length, payload kind, seq step), which are encoded with VALID XXH3 checksums (so mutations
//! reach the field, sequence and payload checks behind the checksum), and fed through
//! `engine::ingest::ingest_stream` into a real staging log in a temporary directory.
//!
//! Invariants:
//! - nothing panics;
//! - acks are monotonic and never past what was sent;
//! - every acknowledged frame is applicable: read back from the staging log, each data frame's
//!   payload decodes (`PayloadDecoder::decode_into`, what apply does) to its declared length.
//!   A payload that does not decompress, decompresses short or long, or declares another
//!   content size must be refused before it is acknowledged.

#![no_main]

use std::sync::Arc;

use arbitrary::Arbitrary;
use engine::delta::{
    CHECKSUM_SEED, DiskGeometry, FrameBody, MAX_PAYLOAD_BYTES, PayloadDecoder, StreamHeader,
};
use engine::durable::StdDir;
use engine::ingest::{IngestConfig, ingest_stream};
use engine::staging::{StagingConfig, StagingLog};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input {
    /// The header's first seq, small.
    first_seq: u8,
    frames: Vec<FrameSpec>,
    /// Append an end frame.
    end: bool,
}

#[derive(Debug, Arbitrary)]
struct FrameSpec {
    /// 1..=5 mostly; other values test "unknown kind".
    kind: u8,
    /// 0, 1 (the two disks), others unknown.
    disk: u8,
    /// In 512-byte units.
    offset_sectors: u16,
    /// In 512-byte units; 0 is illegal for extents.
    length_sectors: u8,
    payload: PayloadSpec,
    /// Added to the expected seq: 0 in order, others a gap or (wrapping) a reorder.
    seq_step: i8,
}

#[derive(Debug, Arbitrary)]
enum PayloadSpec {
    /// Exactly `length` bytes of a byte, raw.
    Raw(u8),
    /// `length` bytes compressed into one zstd frame.
    Zstd(u8),
    /// Two zstd frames splitting `length` at `split` (valid when both parts add up).
    Concat { byte: u8, split: u16, extra: i16 },
    /// Arbitrary bytes, declared zstd.
    Garbage(Vec<u8>),
    /// A valid zstd frame cut at `cut`.
    Truncated { byte: u8, cut: u16 },
    /// A zstd frame of `length + delta` bytes (short or long).
    WrongSize { byte: u8, delta: i16 },
    /// Raw bytes of another length.
    RawWrong { byte: u8, delta: i16 },
}

const DISK_SECTORS: u64 = 2048; // 1 MiB disks

fn disks() -> Vec<DiskGeometry> {
    vec![
        DiskGeometry {
            size_bytes: DISK_SECTORS * 512,
            block_size_bytes: 4096,
        },
        DiskGeometry {
            size_bytes: DISK_SECTORS * 512,
            block_size_bytes: 512,
        },
    ]
}

fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::bulk::compress(data, 1).expect("zstd compresses")
}

fn payload(spec: &PayloadSpec, length: usize) -> (u8, Vec<u8>) {
    let sized = |delta: i16| (length as i64 + i64::from(delta)).clamp(0, 1 << 20) as usize;
    match spec {
        PayloadSpec::Raw(byte) => (0, vec![*byte; length]),
        PayloadSpec::Zstd(byte) => (1, zstd(&vec![*byte; length])),
        PayloadSpec::Concat { byte, split, extra } => {
            let split = usize::from(*split).min(length);
            let second = sized(*extra).saturating_sub(split);
            let mut out = zstd(&vec![*byte; split]);
            out.extend(zstd(&vec![byte.wrapping_add(1); second]));
            (1, out)
        }
        PayloadSpec::Garbage(bytes) => (1, bytes.clone()),
        PayloadSpec::Truncated { byte, cut } => {
            let mut whole = zstd(&vec![*byte; length]);
            whole.truncate(usize::from(*cut) % whole.len().max(1));
            (1, whole)
        }
        PayloadSpec::WrongSize { byte, delta } => (1, zstd(&vec![*byte; sized(*delta)])),
        PayloadSpec::RawWrong { byte, delta } => (0, vec![*byte; sized(*delta)]),
    }
}

fn frame(
    kind: u8,
    encoding: u8,
    disk: u16,
    seq: u64,
    offset: u64,
    length: u64,
    payload: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(48 + payload.len());
    out.extend_from_slice(b"DRFR");
    out.push(kind);
    out.push(encoding);
    out.extend_from_slice(&disk.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&length.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    let mut hasher = xxhash_rust::xxh3::Xxh3::with_seed(CHECKSUM_SEED);
    hasher.update(&out);
    hasher.update(payload);
    out.extend_from_slice(&hasher.digest().to_le_bytes());
    out.extend_from_slice(payload);
    out
}

fn bookmark_payload(id: u64) -> Vec<u8> {
    let mut out = vec![1u8, 0, 0, 0, 0, 0, 0, 0];
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&id.to_le_bytes());
    out
}

fuzz_target!(|input: Input| {
    let header = StreamHeader {
        item_id: *b"fuzz-ingest-item",
        item_name: "fuzz".into(),
        first_seq: u64::from(input.first_seq) + 1,
        disks: disks(),
    };
    let mut stream = Vec::new();
    header.encode_into(&mut stream);
    let mut seq = header.first_seq;
    let mut sent_max = 0u64;
    for spec in input.frames.iter().take(24) {
        let kind = spec.kind % 7; // 0 and 6 are undefined kinds
        let disk = u16::from(spec.disk % 3);
        let offset = u64::from(spec.offset_sectors) % DISK_SECTORS * 512;
        let length = u64::from(spec.length_sectors) * 512;
        let this_seq = seq.wrapping_add_signed(i64::from(spec.seq_step % 3));
        let bytes = match kind {
            1 | 4 => {
                let (encoding, data) = payload(&spec.payload, length as usize);
                frame(kind, encoding, disk, this_seq, offset, length, &data)
            }
            2 => frame(2, 0, disk, this_seq, offset, length, &[]),
            3 => frame(3, 0, 0xFFFF, this_seq, 0, 0, &bookmark_payload(this_seq)),
            other => frame(other, 0, 0xFFFF, this_seq, 0, 0, &[]),
        };
        if bytes.len() - 48 > MAX_PAYLOAD_BYTES as usize {
            continue;
        }
        stream.extend_from_slice(&bytes);
        sent_max = sent_max.max(this_seq);
        seq = this_seq.wrapping_add(1);
    }
    if input.end {
        stream.extend_from_slice(&frame(5, 0, 0xFFFF, seq, 0, 0, &[]));
    }

    let tmp = tempfile::tempdir_in(scratch_dir()).expect("temporary directory");
    let dir = Arc::new(StdDir::open(tmp.path()).expect("staging directory"));
    let config = StagingConfig {
        capacity_bytes: 64 << 20,
        segment_target_bytes: 4 << 20,
        ..StagingConfig::default()
    };
    let (mut log, _) = StagingLog::open(dir, header.clone(), config).expect("staging log opens");
    let mut acked = 0u64;
    let _ = ingest_stream(
        stream.as_slice(),
        &mut log,
        IngestConfig::default(),
        &mut |seq, _| {
            assert!(seq >= acked, "acks went backwards: {acked} then {seq}");
            acked = seq;
        },
    );
    assert!(
        acked <= sent_max.max(header.first_seq.saturating_sub(1)),
        "ack {acked} past the frames sent"
    );

    // Every acknowledged frame is applicable.
    let mut reader = log.reader(header.first_seq);
    let mut payload = PayloadDecoder::new().expect("zstd context");
    let mut out = vec![0u8; MAX_PAYLOAD_BYTES as usize];
    while let Some(staged) = reader
        .next_frame()
        .expect("an acknowledged frame reads back")
    {
        if staged.seq > acked {
            break;
        }
        if let FrameBody::Write(extent) | FrameBody::ResyncBlock(extent) = &staged.body {
            if let Err(reason) = payload.decode_into(extent, &mut out) {
                panic!(
                    "acknowledged frame seq {} cannot be applied: {reason}",
                    staged.seq
                );
            }
        }
    }
});

/// /dev/shm when there is one (no disk I/O per execution), else the system temp dir.
fn scratch_dir() -> std::path::PathBuf {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}
