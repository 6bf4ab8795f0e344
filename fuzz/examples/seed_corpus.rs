//! Writes valid delta streams into `corpus/delta_decode/` as the fuzzer's seed corpus.
//!
//! Run from `fuzz/`: `cargo run --example seed_corpus`. The corpus directory is gitignored;
//! the seeds are small (a few KiB) so that libFuzzer's default `max_len` stays small.

use std::path::Path;

use engine::delta::{
    Consistency, DeltaEncoder, DiskGeometry, EncodeError, EncoderOptions, StreamHeader,
};

fn header(first_seq: u64, disks: &[(u64, u32)]) -> StreamHeader {
    StreamHeader {
        item_id: *b"seed-corpus-item",
        item_name: "vm-seed".to_owned(),
        first_seq,
        disks: disks
            .iter()
            .map(|&(size_bytes, block_size_bytes)| DiskGeometry {
                size_bytes,
                block_size_bytes,
            })
            .collect(),
    }
}

fn noise(length: usize, mut state: u64) -> Vec<u8> {
    (0..length)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()[0]
        })
        .collect()
}

fn every_kind(level: Option<i32>, first_seq: u64) -> Result<Vec<u8>, EncodeError> {
    let header = header(first_seq, &[(1 << 20, 512), (4 << 20, 4096)]);
    let mut enc = DeltaEncoder::new(Vec::new(), &header, EncoderOptions { zstd_level: level })?;
    enc.write(0, 512, &vec![0u8; 1024])?;
    enc.write(1, 8192, &noise(4096, 7))?;
    enc.zero_range(0, 0, 4096)?;
    enc.zero_range(1, 4096, 4096)?;
    enc.bookmark(Consistency::Crash, 1, 1_700_000_000_000_000_000, "hourly")?;
    enc.resync_block(1, 0, &b"text block ".repeat(373)[..4096])?;
    enc.resync_block(0, 1024, &noise(512, 9))?;
    enc.bookmark(
        Consistency::App,
        2,
        1_700_000_000_000_000_001,
        "vss: app-consistent",
    )?;
    enc.finish()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = Path::new("corpus/delta_decode");
    std::fs::create_dir_all(dir)?;
    let minimal = DeltaEncoder::new(
        Vec::new(),
        &header(0, &[(4096, 512)]),
        EncoderOptions { zstd_level: None },
    )?
    .finish()?;
    let seeds = [
        ("minimal", minimal),
        ("every_kind_raw", every_kind(None, 0)?),
        ("every_kind_zstd", every_kind(Some(1), 41)?),
        (
            "every_kind_zstd_high_seq",
            every_kind(Some(3), (1 << 62) + 5)?,
        ),
    ];
    for (name, bytes) in &seeds {
        std::fs::write(dir.join(format!("seed_{name}")), bytes)?;
        println!("{name}: {} bytes", bytes.len());
    }
    Ok(())
}
