//! Workloads: seeded offsets and data, the delta frames that carry them, and the files both
//! sides write.
//!
//! ```text
//!  Rng(seed)        ──► offsets: sequential, or a random permutation of the disk's blocks
//!                       (each block at most once, like fio's random map)
//!                  └──► data:    incompressible, or ~60 % compressible (zstd rows)
//!  FrameWriter: DeltaEncoder ─► one frame's wire bytes at a time ─► StagingLog::append
//! ```
//!
//! Frames are produced one at a time into a reused buffer, so staging a GiB never holds a GiB
//! in memory.

use std::cell::RefCell;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::rc::Rc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use engine::delta::{Consistency, DeltaEncoder, DiskGeometry, EncoderOptions, StreamHeader};
use engine::durable::StdDir;
use engine::io::{BufPool, BufPoolConfig, DirectIo, ReplicaFile};
use engine::staging::{StagingConfig, StagingLog};

/// The one item every benchmark stages: one disk of `disk_size_bytes`, 4 KiB blocks.
pub fn item_header(name: &str, disk_size_bytes: u64) -> StreamHeader {
    StreamHeader {
        item_id: *b"perf-bench-item\0",
        item_name: name.to_owned(),
        first_seq: 1,
        disks: vec![DiskGeometry {
            size_bytes: disk_size_bytes,
            block_size_bytes: 4096,
        }],
    }
}

/// The seeded generator of offsets and data: the workspace's one RNG (disk-sim's
/// Xoshiro256++, stable output for a seed, so a run can be repeated).
pub use disk_sim::rng::Rng;

/// Where the writes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offsets {
    /// `0, bs, 2·bs, …`.
    Sequential,
    /// Distinct random `bs`-aligned blocks (a seeded permutation).
    Random {
        /// Seed.
        seed: u64,
    },
}

/// The offsets of `count` writes of `block_bytes` on a disk of `disk_bytes`.
pub fn offsets(
    pattern: Offsets,
    block_bytes: u64,
    disk_bytes: u64,
    count: u64,
) -> Result<Vec<u64>> {
    let blocks = disk_bytes / block_bytes;
    if count > blocks {
        bail!("{count} distinct blocks of {block_bytes} bytes do not fit in {disk_bytes} bytes");
    }
    Ok(match pattern {
        Offsets::Sequential => (0..count).map(|i| i * block_bytes).collect(),
        Offsets::Random { seed } => {
            // Partial Fisher–Yates: the first `count` entries are a uniform random selection
            // in random order.
            let mut rng = Rng::new(seed);
            let mut all: Vec<u64> = (0..blocks).collect();
            for i in 0..count as usize {
                let j = i + rng.below(blocks - i as u64) as usize;
                all.swap(i, j);
            }
            all.truncate(count as usize);
            all.into_iter().map(|b| b * block_bytes).collect()
        }
    })
}

/// What the written data looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataKind {
    /// Random bytes (zstd cannot shrink them).
    Incompressible,
    /// Per 512 bytes: 192 random bytes, then a repeated text (zstd level 1 stores ≈ 40 %).
    Compressible,
}

/// A few distinct buffers of `len` bytes to cycle through (each frame stamps its sequence
/// number into the first 8 bytes, so no two frames carry the same data).
pub fn data_variants(kind: DataKind, len: usize, seed: u64) -> Vec<Vec<u8>> {
    const PATTERN: &[u8] = b"replicated block of a protected virtual machine disk; ";
    let mut rng = Rng::new(seed);
    (0..8)
        .map(|_| {
            let mut buf = vec![0u8; len];
            match kind {
                DataKind::Incompressible => rng.fill(&mut buf),
                DataKind::Compressible => {
                    for chunk in buf.chunks_mut(512) {
                        let (random, text) = chunk.split_at_mut(chunk.len().min(192));
                        rng.fill(random);
                        for (i, b) in text.iter_mut().enumerate() {
                            *b = PATTERN[i % PATTERN.len()];
                        }
                    }
                }
            }
            buf
        })
        .collect()
}

/// A `Write` into a shared buffer, so the encoder's output can be taken frame by frame.
#[derive(Debug, Clone, Default)]
struct SharedBuf(Rc<RefCell<Vec<u8>>>);

impl Write for SharedBuf {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.0.borrow_mut().extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Encodes frames one at a time and hands each frame's wire bytes to a sink.
#[derive(Debug)]
pub struct FrameWriter {
    encoder: DeltaEncoder<SharedBuf>,
    out: SharedBuf,
    /// Payload bytes as stored in frames (after compression), headers excluded.
    pub stored_payload_bytes: u64,
    /// Wire bytes of every frame, headers included.
    pub wire_bytes: u64,
}

impl FrameWriter {
    /// A writer for `header`'s item; `zstd_level: None` stores payloads raw.
    pub fn new(header: &StreamHeader, zstd_level: Option<i32>) -> Result<Self> {
        let out = SharedBuf::default();
        let encoder = DeltaEncoder::new(out.clone(), header, EncoderOptions { zstd_level })?;
        out.0.borrow_mut().clear(); // the stream header: staging writes its own per segment
        Ok(Self {
            encoder,
            out,
            stored_payload_bytes: 0,
            wire_bytes: 0,
        })
    }

    fn emit(&mut self, seq: u64, sink: &mut dyn FnMut(u64, &[u8]) -> Result<()>) -> Result<()> {
        let mut bytes = self.out.0.borrow_mut();
        self.wire_bytes += bytes.len() as u64;
        self.stored_payload_bytes += bytes
            .len()
            .saturating_sub(engine::delta::FRAME_HEADER_BYTES)
            as u64;
        sink(seq, &bytes)?;
        bytes.clear();
        Ok(())
    }

    /// Encodes a write of `data` at `offset_bytes` of disk 0.
    pub fn write(
        &mut self,
        offset_bytes: u64,
        data: &[u8],
        sink: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<()> {
        let seq = self.encoder.write(0, offset_bytes, data)?;
        self.emit(seq, sink)
    }

    /// Encodes a crash-consistent bookmark.
    pub fn bookmark(
        &mut self,
        bookmark_id: u64,
        sink: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<()> {
        let seq = self
            .encoder
            .bookmark(Consistency::Crash, bookmark_id, 0, "perf")?;
        self.emit(seq, sink)
    }
}

/// A fresh staging log in `dir` for `header`, holding `data_bytes` of frames with 256 MiB to
/// spare (the defaults otherwise, as in the appliance).
pub fn open_staging(dir: &Path, header: &StreamHeader, data_bytes: u64) -> Result<StagingLog> {
    let config = StagingConfig {
        capacity_bytes: data_bytes + (256 << 20),
        ..StagingConfig::default()
    };
    let (log, _) = StagingLog::open(
        std::sync::Arc::new(StdDir::open(dir)?),
        header.clone(),
        config,
    )?;
    Ok(log)
}

/// Appends frames to a staging log, committing every `commit_every` frames (not timed: this
/// is how the apply benchmarks fill staging before they measure apply).
#[derive(Debug)]
pub struct Stager<'a> {
    log: &'a mut StagingLog,
    commit_every: usize,
    pending: usize,
}

impl<'a> Stager<'a> {
    /// Stages into `log`.
    pub fn new(log: &'a mut StagingLog, commit_every: usize) -> Self {
        Self {
            log,
            commit_every: commit_every.max(1),
            pending: 0,
        }
    }

    /// Appends one frame.
    pub fn append(&mut self, seq: u64, wire_bytes: &[u8]) -> Result<()> {
        self.log.append(seq, wire_bytes, Instant::now())?;
        self.pending += 1;
        if self.pending >= self.commit_every {
            self.log.commit()?;
            self.pending = 0;
        }
        Ok(())
    }

    /// Commits what is left; returns the durable sequence number.
    pub fn finish(self) -> Result<u64> {
        Ok(self.log.commit()?)
    }
}

/// Creates `path` of `len_bytes` and writes every block once with `O_DIRECT` (then
/// fdatasync), so later overwrites by either side find every extent allocated and written,
/// and no page cache pages of the file exist to be invalidated.
pub fn prepare_replica(path: &Path, len_bytes: u64) -> Result<()> {
    const CHUNK_BYTES: usize = 4 << 20;
    let file = ReplicaFile::create(path, len_bytes, DirectIo::Require)?;
    let pool = BufPool::new(BufPoolConfig {
        buf_size_bytes: CHUNK_BYTES,
        buf_count: 1,
        ..BufPoolConfig::default()
    })?;
    let Some(mut buf) = pool.take() else {
        bail!("a one-buffer pool gave no buffer");
    };
    Rng::new(0x5eed).fill(buf.as_mut_slice());
    let mut offset = 0u64;
    while offset < len_bytes {
        let len = (len_bytes - offset).min(CHUNK_BYTES as u64) as usize;
        buf.set_len_bytes(len);
        file.as_file()
            .write_all_at(buf.as_slice(), offset)
            .with_context(|| format!("writing {} at {offset}", path.display()))?;
        offset += len as u64;
    }
    file.as_file()
        .sync_data()
        .with_context(|| format!("syncing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_offsets_are_distinct_aligned_and_inside() {
        let offs = offsets(Offsets::Random { seed: 1 }, 4096, 1 << 20, 200).unwrap();
        assert_eq!(offs.len(), 200);
        let mut sorted = offs.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 200);
        assert!(offs.iter().all(|o| o % 4096 == 0 && *o < 1 << 20));
        assert_eq!(
            offs,
            offsets(Offsets::Random { seed: 1 }, 4096, 1 << 20, 200).unwrap()
        );
        assert!(offsets(Offsets::Random { seed: 1 }, 4096, 8192, 3).is_err());
    }

    #[test]
    fn frames_round_trip_through_the_decoder() {
        let header = item_header("t", 1 << 20);
        let mut writer = FrameWriter::new(&header, Some(1)).unwrap();
        let data = data_variants(DataKind::Compressible, 65536, 3);
        let mut frames: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut sink = |seq: u64, bytes: &[u8]| {
            frames.push((seq, bytes.to_vec()));
            Ok(())
        };
        writer.bookmark(1, &mut sink).unwrap();
        writer.write(65536, &data[0], &mut sink).unwrap();
        assert!(
            writer.stored_payload_bytes < 65536,
            "compressible data compresses"
        );
        let mut stream = Vec::new();
        header.encode_into(&mut stream);
        for (_, bytes) in &frames {
            stream.extend_from_slice(bytes);
        }
        let mut decoder = engine::delta::DeltaDecoder::new(stream.as_slice()).unwrap();
        let mut seqs = Vec::new();
        while let Ok(Some(frame)) = decoder.next_frame() {
            seqs.push(frame.seq);
        }
        assert_eq!(seqs, vec![1, 2]);
        assert_eq!(frames.iter().map(|f| f.0).collect::<Vec<_>>(), vec![1, 2]);
    }
}
