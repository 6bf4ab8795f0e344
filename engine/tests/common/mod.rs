//! A whole item on simulated storage: staging, metadata and preserve store on [`SimDir`]s,
//! replicas on a [`SimDiskSet`]; and an in-memory model of the source disks.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use engine::apply::{Applier, ApplyConfig};
use engine::delta::{
    Consistency, DeltaDecoder, DeltaEncoder, DiskGeometry, EncoderOptions, StreamHeader,
};
use engine::durable::{DurableDir, SimDir};
use engine::io::{BufPool, BufPoolConfig, SimDiskSet, SimEngine, SimEngineConfig, SimFileConfig};
use engine::materialize::{Source, materialize_disk};
use engine::meta::{MetaStore, item_key};
use engine::staging::{StagingConfig, StagingLog};

pub fn header() -> StreamHeader {
    StreamHeader {
        item_id: [0x42; 16],
        item_name: "vm-under-test".into(),
        first_seq: 1,
        disks: vec![
            DiskGeometry {
                size_bytes: 256 << 10,
                block_size_bytes: 4096,
            },
            // Not a multiple of the 4 KiB grain: the last grain is partial.
            DiskGeometry {
                size_bytes: (100 << 10) + 512,
                block_size_bytes: 512,
            },
        ],
    }
}

/// One operation of a scripted source workload.
#[derive(Debug, Clone)]
pub enum SourceOp {
    Write {
        disk: u16,
        offset_bytes: u64,
        data: Vec<u8>,
    },
    Zero {
        disk: u16,
        offset_bytes: u64,
        len_bytes: u64,
    },
    Bookmark(Consistency),
}

/// The frames of a workload: (seq, wire bytes), plus the source content at every bookmark.
pub struct Script {
    pub frames: Vec<(u64, Vec<u8>)>,
    /// Point id (bookmark seq) → content of every disk.
    pub snapshots: BTreeMap<u64, Vec<Vec<u8>>>,
    /// Content after the last op.
    pub final_content: Vec<Vec<u8>>,
}

pub fn script(ops: &[SourceOp], zstd: bool) -> Script {
    let header = header();
    let options = EncoderOptions {
        zstd_level: zstd.then_some(1),
    };
    let mut encoder = DeltaEncoder::new(Vec::new(), &header, options).unwrap();
    let mut model: Vec<Vec<u8>> = header
        .disks
        .iter()
        .map(|d| vec![0u8; d.size_bytes as usize])
        .collect();
    let mut snapshots = BTreeMap::new();
    for (i, op) in ops.iter().enumerate() {
        match op {
            SourceOp::Write {
                disk,
                offset_bytes,
                data,
            } => {
                encoder.write(*disk, *offset_bytes, data).unwrap();
                let at = *offset_bytes as usize;
                model[usize::from(*disk)][at..at + data.len()].copy_from_slice(data);
            }
            SourceOp::Zero {
                disk,
                offset_bytes,
                len_bytes,
            } => {
                encoder
                    .zero_range(*disk, *offset_bytes, *len_bytes)
                    .unwrap();
                let at = *offset_bytes as usize;
                model[usize::from(*disk)][at..at + *len_bytes as usize].fill(0);
            }
            SourceOp::Bookmark(consistency) => {
                let seq = encoder
                    .bookmark(*consistency, i as u64, i as u64 * 1000, "bm")
                    .unwrap();
                snapshots.insert(seq, model.clone());
            }
        }
    }
    let bytes = encoder.into_inner();
    let mut decoder = DeltaDecoder::new(bytes.as_slice()).unwrap();
    let mut frames = Vec::new();
    while let Ok(Some(frame)) = decoder.next_frame() {
        frames.push((frame.seq, frame.wire_bytes.to_vec()));
    }
    assert_eq!(frames.len(), ops.len());
    Script {
        frames,
        snapshots,
        final_content: model,
    }
}

/// The item's storage, which survives a simulated crash. Staging, preserve store and metadata
/// share one [`SimDir`] (their file names differ), so one counter numbers every flush point.
#[derive(Clone)]
pub struct Storage {
    pub staging: SimDir,
    pub preserve: SimDir,
    pub meta: SimDir,
    pub disks: SimDiskSet,
}

impl Storage {
    pub fn new() -> Self {
        let disks = SimDiskSet::new();
        for (index, disk) in header().disks.iter().enumerate() {
            disks
                .create_file(
                    &replica_name(index),
                    SimFileConfig {
                        size_bytes: disk.size_bytes,
                        block_size_bytes: disk.block_size_bytes,
                    },
                )
                .unwrap();
        }
        Self::on(SimDir::new(), disks)
    }

    /// Storage over an existing directory and disk set (after a crash).
    pub fn on(dir: SimDir, disks: SimDiskSet) -> Self {
        Self {
            staging: dir.clone(),
            preserve: dir.clone(),
            meta: dir,
            disks,
        }
    }
}

pub fn replica_name(index: usize) -> String {
    format!("replica-{index}")
}

pub fn staging_config() -> StagingConfig {
    StagingConfig {
        capacity_bytes: 64 << 20,
        segment_target_bytes: 128 << 10,
        ..StagingConfig::default()
    }
}

/// A running item over `storage`.
pub struct Item {
    pub storage: Storage,
    pub staging: StagingLog,
    pub applier: Applier<SimEngine>,
    pub meta: Arc<MetaStore>,
}

/// Small buffers, so most writes of the tests are larger than one and take the applier's
/// spill-and-split path.
pub fn pool() -> BufPool {
    BufPool::new(BufPoolConfig {
        buf_size_bytes: 16 << 10,
        buf_count: 16,
        ..BufPoolConfig::default()
    })
    .unwrap()
}

impl Item {
    pub fn open(storage: Storage, config: ApplyConfig, queue_depth: usize) -> Self {
        Self::try_open(storage, config, queue_depth).unwrap()
    }

    /// Opens the item; an error when storage fails (e.g. a simulated crash while opening).
    pub fn try_open(
        storage: Storage,
        config: ApplyConfig,
        queue_depth: usize,
    ) -> Result<Self, String> {
        let header = header();
        let (staging, _) = StagingLog::open(
            Arc::new(storage.staging.clone()),
            header.clone(),
            staging_config(),
        )
        .map_err(|e| e.to_string())?;
        let meta_file = storage
            .meta
            .open("meta.redb", true)
            .map_err(|e| e.to_string())?;
        let meta = Arc::new(MetaStore::open(meta_file).map_err(|e| e.to_string())?);
        let mut engine = SimEngine::new(
            &storage.disks,
            SimEngineConfig {
                queue_depth,
                seed: 7,
                reorder: true,
            },
        )
        .unwrap();
        let files = (0..header.disks.len())
            .map(|i| {
                use engine::io::IoEngine;
                engine.add_file(replica_name(i)).unwrap()
            })
            .collect();
        let first = staging.durable_seq().min(header.first_seq);
        let applier = Applier::new(
            item_key(&header.item_id),
            header.disks.clone(),
            config,
            engine,
            files,
            pool(),
            meta.clone(),
            Arc::new(storage.preserve.clone()),
            staging.reader(first.max(header.first_seq)),
        )
        .map_err(|e| e.to_string())?;
        Ok(Self {
            storage,
            staging,
            applier,
            meta,
        })
    }

    /// Stages frames `from..` (by index into `frames`), committing every `batch` frames.
    pub fn stage(&mut self, frames: &[(u64, Vec<u8>)], batch: usize) -> u64 {
        let mut acked = self.staging.durable_seq();
        for chunk in frames.chunks(batch.max(1)) {
            for (seq, wire) in chunk {
                self.staging.append(*seq, wire, Instant::now()).unwrap();
            }
            acked = self.staging.commit().unwrap();
        }
        acked
    }

    /// Materializes every disk at `point_id` and returns the images.
    pub fn materialize(&self, point_id: u64) -> Vec<Vec<u8>> {
        let header = header();
        let source = Source {
            meta: &self.meta,
            item: item_key(&header.item_id),
            disks: &header.disks,
            preserve_dir: Arc::new(self.storage.preserve.clone()),
            grain_bytes: 4096,
            pins: self.applier.pins(),
        };
        let tmp = tempfile::tempdir().unwrap();
        (0..header.disks.len())
            .map(|i| {
                let replica = self.storage.disks.live_image(&replica_name(i)).unwrap();
                let path = tmp.path().join(format!("disk{i}.raw"));
                let out = std::fs::File::create(&path).unwrap();
                materialize_disk(&source, point_id, i as u16, &replica, &out, &mut |_| {}).unwrap();
                std::fs::read(&path).unwrap()
            })
            .collect()
    }
}
