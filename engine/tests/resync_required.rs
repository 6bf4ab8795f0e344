//! A small cache: acknowledgements slow down as it fills, a full cache refuses frames, and a
//! cache that stays full switches the item to *resync required*. A delta resync (only the
//! chunks whose hashes differ, sent as resync-block frames through staging and apply) then
//! brings the replicas to exact equality with the source, and older points stay exact.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{SourceOp, header, pool, script};
use engine::apply::{Applier, ApplyConfig};
use engine::delta::{Consistency, DeltaDecoder, DeltaEncoder, EncoderOptions};
use engine::durable::{DurableDir, StdDir};
use engine::io::{DirectIo, IoEngine, ReplicaFile, SyncFileEngine};
use engine::materialize::{Source, materialize_disk};
use engine::meta::{MetaStore, item_key};
use engine::resync::{ResyncOptions, diff, hash_path};
use engine::staging::{Pressure, StagingConfig, StagingError, StagingLog};

fn writes(round: u8, count: u64) -> Vec<SourceOp> {
    (0..count)
        .map(|i| {
            let disk = (i % 2) as u16;
            let geometry = header().disks[usize::from(disk)];
            let block = u64::from(geometry.block_size_bytes);
            let blocks = 8.min(geometry.size_bytes / block);
            SourceOp::Write {
                disk,
                offset_bytes: ((i * 11 + u64::from(round))
                    % (geometry.size_bytes / block - blocks))
                    * block,
                data: (0..blocks * block)
                    .map(|b| (b as u8) ^ round ^ (i as u8) | 1)
                    .collect(),
            }
        })
        .collect()
}

#[test]
fn full_cache_requires_resync_and_delta_resync_restores_exact_equality() {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let dir = StdDir::open(tmp.path()).unwrap();
    let config = StagingConfig {
        capacity_bytes: 160 << 10,
        segment_target_bytes: 32 << 10,
        full_timeout: Duration::from_secs(30),
        ..StagingConfig::default()
    };
    let (mut staging, _) = StagingLog::open(Arc::new(dir.clone()), header(), config).unwrap();
    let meta = Arc::new(MetaStore::open(dir.open("meta.redb", true).unwrap()).unwrap());
    let mut io = SyncFileEngine::new(8).unwrap();
    let mut replica_paths = Vec::new();
    let mut ids = Vec::new();
    for (index, disk) in header().disks.iter().enumerate() {
        let path = tmp.path().join(format!("replica-{index}.img"));
        ids.push(
            io.add_file(ReplicaFile::create(&path, disk.size_bytes, DirectIo::Prefer).unwrap())
                .unwrap(),
        );
        replica_paths.push(path);
    }
    let key = item_key(&header().item_id);
    let mut applier = Applier::new(
        key,
        header().disks,
        ApplyConfig::default(),
        io,
        ids,
        pool(),
        meta.clone(),
        Arc::new(dir.clone()),
        staging.reader(1),
    )
    .unwrap();

    // Phase 1: replicated normally up to a point P1.
    let mut ops = writes(1, 6);
    ops.push(SourceOp::Bookmark(Consistency::App));
    // Phase 2: the source keeps writing while apply is stalled.
    ops.extend(writes(2, 200));
    let script = script(&ops, false);
    let p1 = *script.snapshots.keys().next().unwrap();
    let t0 = Instant::now();
    let mut seq = 1usize;
    while seq as u64 <= p1 {
        staging
            .append(seq as u64, &script.frames[seq - 1].1, t0)
            .unwrap();
        seq += 1;
    }
    staging.commit().unwrap();
    applier.apply_available().unwrap();
    staging.reclaim(applier.durable_seq()).unwrap();
    // Stage until the cache is full; acknowledgements slow down on the way.
    let mut slowed = false;
    let full = loop {
        match staging.append(seq as u64, &script.frames[seq - 1].1, t0) {
            Ok(()) => {
                staging.commit().unwrap();
                slowed |= matches!(staging.pressure(), Pressure::Slow(d) if d > Duration::ZERO);
                seq += 1;
            }
            Err(e) => break e,
        }
    };
    assert!(matches!(full, StagingError::Full { .. }), "{full}");
    assert!(
        slowed,
        "acknowledgements must slow down before the cache is full"
    );
    assert!(staging.used_bytes() <= config.capacity_bytes);
    let acked = staging.durable_seq();
    // Still full past the timeout: resync required, and it survives a restart.
    let err = staging
        .append(
            seq as u64,
            &script.frames[seq - 1].1,
            t0 + Duration::from_secs(31),
        )
        .unwrap_err();
    assert!(matches!(err, StagingError::ResyncRequired { .. }), "{err}");
    assert_eq!(
        staging.durable_seq(),
        acked,
        "nothing acknowledged was dropped"
    );
    let (reopened, _) = StagingLog::open(Arc::new(dir.clone()), header(), config).unwrap();
    assert!(
        reopened.resync_required().is_some(),
        "the marker is durable"
    );
    drop(reopened);

    // The source's disks as they are now (every write of the script made).
    let source_paths: Vec<_> = script
        .final_content
        .iter()
        .enumerate()
        .map(|(index, content)| {
            let path = tmp.path().join(format!("source-{index}.img"));
            std::fs::write(&path, content).unwrap();
            path
        })
        .collect();

    // Recovery: apply what was staged, restart the log after it, resync the difference.
    applier.apply_available().unwrap();
    applier.flush().unwrap();
    let next_seq = applier.applied_seq() + 1;
    staging.resync_done(next_seq).unwrap();
    assert!(staging.resync_required().is_none());
    let options = ResyncOptions::default();
    let mut header_now = header();
    header_now.first_seq = next_seq;
    let mut encoder =
        DeltaEncoder::new(Vec::new(), &header_now, EncoderOptions::default()).unwrap();
    let (mut differing, mut sent_bytes, mut differing_bytes) = (0u64, 0u64, 0u64);
    for (index, disk) in header().disks.iter().enumerate() {
        let src = hash_path(&source_paths[index], &options, &mut |_| {}, &|| false).unwrap();
        let rep = hash_path(&replica_paths[index], &options, &mut |_| {}, &|| false).unwrap();
        assert_eq!(src.disk_size_bytes, disk.size_bytes);
        let source_file = std::fs::File::open(&source_paths[index]).unwrap();
        for range in diff(&src, &rep).unwrap() {
            differing += range.chunk_count;
            differing_bytes += range.length_bytes;
            for (offset, len) in range.pieces(options.chunk_size_bytes, 1 << 20) {
                let mut data = vec![0u8; len as usize];
                source_file.read_exact_at(&mut data, offset).unwrap();
                encoder.resync_block(index as u16, offset, &data).unwrap();
                sent_bytes += len;
            }
        }
    }
    encoder
        .bookmark(Consistency::Crash, 999, 0, "after resync")
        .unwrap();
    assert!(
        differing > 0,
        "the stalled writes must have left differences"
    );
    assert!(
        sent_bytes as f64 <= 1.1 * differing_bytes as f64,
        "sent {sent_bytes} for {differing_bytes} differing"
    );
    let bytes = encoder.into_inner();
    let mut decoder = DeltaDecoder::new(bytes.as_slice()).unwrap();
    while let Ok(Some(frame)) = decoder.next_frame() {
        staging
            .append(frame.seq, frame.wire_bytes, Instant::now())
            .unwrap();
    }
    staging.commit().unwrap();
    applier.apply_available().unwrap();

    for (index, expected) in script.final_content.iter().enumerate() {
        let got = std::fs::read(&replica_paths[index]).unwrap();
        let first_diff = got.iter().zip(expected).position(|(a, b)| a != b);
        assert!(
            &got == expected,
            "replica {index} is not exact after resync: first difference at {first_diff:?}, applied {} frames {}",
            applier.applied_seq(),
            script.frames.len()
        );
    }
    // P1, from before the resync, is still exact: resync blocks were preserved like writes.
    let disks = header().disks;
    let source = Source {
        meta: &meta,
        item: key,
        disks: &disks,
        preserve_dir: Arc::new(dir.clone()),
        grain_bytes: 4096,
        pins: applier.pins(),
    };
    for (index, expected) in script.snapshots[&p1].iter().enumerate() {
        let replica = std::fs::File::open(&replica_paths[index]).unwrap();
        let path = tmp.path().join("p1.raw");
        let out = std::fs::File::create(&path).unwrap();
        materialize_disk(&source, p1, index as u16, &replica, &out, &mut |_| {}).unwrap();
        assert!(
            &std::fs::read(&path).unwrap() == expected,
            "point {p1} disk {index}"
        );
    }
    eprintln!(
        "resync: {differing} differing chunks, {sent_bytes} bytes sent for {differing_bytes} differing bytes"
    );
}
