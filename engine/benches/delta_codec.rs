//! Throughput of the delta-stream codec, in bytes of guest data per second.
//!
//! ```text
//! delta_encode/{raw,zstd1}/{64KiB,1MiB}   DeltaEncoder::write × n, then finish
//! delta_decode/{raw,zstd1}/{64KiB,1MiB}   DeltaDecoder::next_frame × n
//!                                         + PayloadDecoder::decode_into (one reused buffer)
//! ```
//!
//! Every iteration moves [`DATA_PER_ITERATION_BYTES`] of guest data, cut into writes of the
//! given size, over a realistic mix: a quarter text-like, a quarter mostly-zero blocks (both
//! compress well) and half random (does not compress, so zstd stores it raw after trying).
//! Run with `cargo bench -p engine --bench delta_codec`; each case is kept short so the whole
//! run takes about a minute after the build.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use engine::delta::{
    DeltaDecoder, DeltaEncoder, DiskGeometry, EncoderOptions, FrameBody, MAX_PAYLOAD_BYTES,
    PayloadDecoder, StreamHeader,
};

/// Guest data per benchmark iteration.
const DATA_PER_ITERATION_BYTES: usize = 4 << 20;
const DISK_BYTES: u64 = 64 << 20;

const WRITE_SIZES: [(&str, usize); 2] = [("64KiB", 64 << 10), ("1MiB", 1 << 20)];
const SETTINGS: [(&str, EncoderOptions); 2] = [
    ("raw", EncoderOptions { zstd_level: None }),
    (
        "zstd1",
        EncoderOptions {
            zstd_level: Some(1),
        },
    ),
];

fn header() -> StreamHeader {
    StreamHeader {
        item_id: *b"bench-item-00001",
        item_name: "bench".to_owned(),
        first_seq: 1,
        disks: vec![DiskGeometry {
            size_bytes: DISK_BYTES,
            block_size_bytes: 4096,
        }],
    }
}

struct Xorshift(u64);

impl Xorshift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Writes of `write_bytes` each, `DATA_PER_ITERATION_BYTES` in all: text, random, mostly
/// zeros, random, and again.
fn workload(write_bytes: usize) -> Vec<Vec<u8>> {
    const WORDS: [&[u8]; 10] = [
        b"INSERT ",
        b"INTO ",
        b"orders ",
        b"VALUES ",
        b"(42, ",
        b"'pending', ",
        b"2026-11-21",
        b");\n",
        b"<row id=\"",
        b"\"/>\n",
    ];
    let mut rng = Xorshift(0x5eed_cafe_f00d_0001);
    (0..DATA_PER_ITERATION_BYTES / write_bytes)
        .map(|i| {
            let mut data = vec![0u8; write_bytes];
            match i % 4 {
                0 => {
                    let mut at = 0;
                    while at < data.len() {
                        let word = WORDS[(rng.next() % WORDS.len() as u64) as usize];
                        let n = word.len().min(data.len() - at);
                        data[at..at + n].copy_from_slice(&word[..n]);
                        at += n;
                    }
                }
                2 => {
                    // A sparse block: zeros with a small random header every 4 KiB.
                    for block in data.chunks_mut(4096) {
                        block[..64].iter_mut().for_each(|b| *b = rng.next() as u8);
                    }
                }
                _ => data
                    .chunks_mut(8)
                    .for_each(|c| c.copy_from_slice(&rng.next().to_le_bytes()[..c.len()])),
            }
            data
        })
        .collect()
}

fn encode(writes: &[Vec<u8>], options: EncoderOptions, out: &mut Vec<u8>) {
    out.clear();
    let mut encoder = DeltaEncoder::new(out, &header(), options).expect("header");
    let mut offset = 0;
    for data in writes {
        encoder.write(0, offset, data).expect("write");
        offset += data.len() as u64;
    }
    encoder.finish().expect("finish");
}

fn decode(stream: &[u8], payloads: &mut PayloadDecoder, out: &mut [u8]) -> u64 {
    let mut decoder = DeltaDecoder::new(stream).expect("header");
    let mut decoded = 0u64;
    while let Some(frame) = decoder.next_frame().expect("frame") {
        if let FrameBody::Write(extent) = &frame.body {
            payloads.decode_into(extent, out).expect("payload");
            decoded += u64::from(extent.length_bytes);
        }
    }
    decoded
}

fn bench_codec(c: &mut Criterion) {
    let mut encoded = Vec::with_capacity(2 * DATA_PER_ITERATION_BYTES);
    let mut out = vec![0u8; MAX_PAYLOAD_BYTES as usize];
    let mut payloads = PayloadDecoder::new().expect("zstd context");
    let workloads: Vec<_> = WRITE_SIZES
        .iter()
        .map(|&(name, size)| (name, workload(size)))
        .collect();

    let mut group = c.benchmark_group("delta_encode");
    group.throughput(Throughput::Bytes(DATA_PER_ITERATION_BYTES as u64));
    for (size_name, writes) in &workloads {
        for (setting, options) in SETTINGS {
            group.bench_function(BenchmarkId::new(setting, size_name), |b| {
                b.iter(|| encode(black_box(writes), options, &mut encoded));
            });
        }
    }
    group.finish();

    let mut group = c.benchmark_group("delta_decode");
    group.throughput(Throughput::Bytes(DATA_PER_ITERATION_BYTES as u64));
    for (size_name, writes) in &workloads {
        for (setting, options) in SETTINGS {
            let mut stream = Vec::new();
            encode(writes, options, &mut stream);
            println!(
                "{setting}/{size_name}: {} bytes of data in a {}-byte stream ({:.2}x)",
                DATA_PER_ITERATION_BYTES,
                stream.len(),
                DATA_PER_ITERATION_BYTES as f64 / stream.len() as f64
            );
            group.bench_function(BenchmarkId::new(setting, size_name), |b| {
                b.iter(|| {
                    let decoded = decode(black_box(&stream), &mut payloads, &mut out);
                    assert_eq!(decoded, DATA_PER_ITERATION_BYTES as u64);
                    black_box(&out);
                });
            });
        }
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_codec
}
criterion_main!(benches);
