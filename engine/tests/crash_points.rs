//! Durability through the I/O seam: a simulated crash at every flush point of a scripted run
//! (staging commits, preserve flushes, metadata commits, replica flushes before them), with
//! and without torn writes; then recovery, then the rest of the stream. Every acknowledged
//! frame must survive and every retained recovery point must equal the oracle byte for byte.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use common::{Item, SourceOp, Storage, header, script};
use engine::apply::Health;
use engine::apply::{ApplyConfig, Retention};
use engine::delta::Consistency;
use engine::durable::SimDir;
use engine::io::{CrashMode, SimFaultPlan};
use engine::meta::item_key;

fn ops() -> Vec<SourceOp> {
    let mut ops = Vec::new();
    for i in 0..48u64 {
        let disk = (i % 3 == 0) as u16;
        let geometry = header().disks[usize::from(disk)];
        let block = u64::from(geometry.block_size_bytes);
        let blocks = 1 + (i * 7) % 12;
        let offset_bytes = ((i * 37) % (geometry.size_bytes / block - blocks)) * block;
        if i % 11 == 5 {
            ops.push(SourceOp::Zero {
                disk,
                offset_bytes,
                len_bytes: blocks * block,
            });
        } else {
            let data = vec![(i as u8).wrapping_mul(31) | 1; (blocks * block) as usize];
            ops.push(SourceOp::Write {
                disk,
                offset_bytes,
                data,
            });
        }
        if i % 6 == 5 {
            ops.push(SourceOp::Bookmark(if i % 12 == 11 {
                Consistency::App
            } else {
                Consistency::Crash
            }));
        }
    }
    ops
}

const RETENTION: Retention = Retention {
    max_count: 4,
    max_age_ns: u64::MAX,
};

fn config() -> ApplyConfig {
    ApplyConfig {
        stream_max_frames: 4,
        checkpoint_every_bytes: 64 << 10,
        ..ApplyConfig::default()
    }
}

/// Stages 3 frames at a time, applies a batch after each commit, prunes and reclaims.
/// Stops at the first error (the crash). Returns the highest acknowledged seq.
fn run(item: &mut Item, frames: &[(u64, Vec<u8>)]) -> u64 {
    let mut acked = item.staging.durable_seq();
    let start = frames
        .iter()
        .position(|(seq, _)| *seq == item.staging.next_seq())
        .unwrap_or(frames.len());
    for chunk in frames[start..].chunks(3) {
        for (seq, wire) in chunk {
            if item
                .staging
                .append(*seq, wire, std::time::Instant::now())
                .is_err()
            {
                return acked;
            }
        }
        match item.staging.commit() {
            Ok(seq) => acked = seq,
            Err(_) => return acked,
        }
        if item.applier.apply_batch().is_err()
            || item.applier.prune(RETENTION, 0).is_err()
            || item.staging.reclaim(item.applier.durable_seq()).is_err()
        {
            return acked;
        }
    }
    if item.applier.apply_available().is_err() || item.applier.prune(RETENTION, 0).is_err() {
        return acked;
    }
    acked
}

/// Recovers an item from a crash image and the crashed disks, sends the rest of the stream,
/// and checks acknowledged frames, replicas and every retained point against the oracle.
fn recover_and_verify(
    ctx: &str,
    script: &common::Script,
    image: SimDir,
    disks: engine::io::SimDiskSet,
    acked: u64,
) {
    let frames = &script.frames;
    let mut item = Item::open(Storage::on(image, disks), config(), 8);
    assert!(
        item.staging.durable_seq() >= acked,
        "{ctx}: acked {acked}, durable {}",
        item.staging.durable_seq()
    );
    assert!(
        item.applier.durable_seq() <= item.staging.durable_seq(),
        "{ctx}"
    );
    assert_eq!(
        run(&mut item, frames),
        frames.len() as u64,
        "{ctx}: the recovered item must take the rest"
    );
    for (index, expected) in script.final_content.iter().enumerate() {
        let live = item
            .storage
            .disks
            .live_image(&common::replica_name(index))
            .unwrap();
        assert!(
            &live == expected,
            "{ctx}: replica {index} differs after recovery"
        );
    }
    let points = item.meta.points(item_key(&header().item_id)).unwrap();
    assert!(
        !points.is_empty() && points.len() <= RETENTION.max_count,
        "{ctx}: {} points",
        points.len()
    );
    assert_eq!(
        points.last().unwrap().point_id,
        *script.snapshots.keys().last().unwrap(),
        "{ctx}"
    );
    for point in &points {
        let got = item.materialize(point.point_id);
        let expected = &script.snapshots[&point.point_id];
        for disk in 0..expected.len() {
            assert!(
                got[disk] == expected[disk],
                "{ctx}: point {} disk {disk} differs",
                point.point_id
            );
        }
    }
}

fn crash_mode(tear: Option<u64>) -> CrashMode {
    match tear {
        None => CrashMode::DropUnflushed,
        Some(seed) => CrashMode::Tear {
            seed,
            apply_probability: 0.5,
        },
    }
}

#[test]
fn crash_at_every_metadata_and_staging_flush_loses_no_ack_and_keeps_points_exact() {
    let script = script(&ops(), true);
    let frames = &script.frames;
    // Dry run: the flush points of the scripted run.
    let storage = Storage::new();
    let mut item = Item::open(storage.clone(), config(), 8);
    assert_eq!(run(&mut item, frames), frames.len() as u64);
    let flush_points = storage.staging.sync_count();
    assert!(flush_points > 50, "only {flush_points} flush points");
    for crash_at in 0..flush_points {
        for tear in [None, Some(crash_at * 7919 + 1)] {
            let ctx = format!("crash at flush point {crash_at}/{flush_points}, tear {tear:?}");
            let storage = Storage::new();
            storage.staging.crash_at_sync(crash_at, tear);
            let acked = match Item::try_open(storage.clone(), config(), 8) {
                Ok(mut item) => run(&mut item, frames),
                Err(_) => 0, // the crash hit while opening: nothing was acknowledged
            };
            let Some(image) = storage.staging.crash_image() else {
                panic!("{ctx}: the run never reached the crash point");
            };
            storage.disks.crash(crash_mode(tear));
            recover_and_verify(
                &ctx,
                &script,
                SimDir::from_image(image),
                storage.disks.clone(),
                acked,
            );
        }
    }
}

#[test]
fn crash_at_every_replica_flush_loses_no_ack_and_keeps_points_exact() {
    let script = script(&ops(), true);
    let frames = &script.frames;
    let mut crash_points = 0;
    for disk in 0..header().disks.len() {
        'nth: for nth in 1u64.. {
            for tear in [None, Some(nth * 104_729 + disk as u64)] {
                let ctx = format!("crash at flush {nth} of replica {disk}, tear {tear:?}");
                let storage = Storage::new();
                let plan = SimFaultPlan {
                    fail_flush_nth: Some(nth),
                    ..SimFaultPlan::default()
                };
                storage
                    .disks
                    .set_faults(&common::replica_name(disk), plan)
                    .unwrap();
                let mut item = Item::open(storage.clone(), config(), 8);
                let acked = run(&mut item, frames);
                if matches!(item.applier.health(), Health::Healthy) {
                    assert_eq!(acked, frames.len() as u64, "{ctx}");
                    assert!(nth > 3, "{ctx}: too few replica flushes in the script");
                    crash_points += nth - 1;
                    break 'nth;
                }
                // The process dies at the failed flush: what is durable now is what survives.
                drop(item);
                let image = storage.staging.durable_image();
                storage.disks.crash(crash_mode(tear));
                storage
                    .disks
                    .set_faults(&common::replica_name(disk), SimFaultPlan::default())
                    .unwrap();
                recover_and_verify(
                    &ctx,
                    &script,
                    SimDir::from_image(image),
                    storage.disks.clone(),
                    acked,
                );
            }
        }
    }
    assert!(crash_points > 10, "{crash_points}");
}
