//! Recovery points are exact: every retained point of every disk materializes byte for byte
//! to the source content at its bookmark, whatever the workload, batching and pruning.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use common::{Item, SourceOp, Storage, header, script};
use engine::apply::{ApplyConfig, Retention};
use engine::delta::Consistency;
use proptest::prelude::*;

fn op_strategy() -> impl Strategy<Value = SourceOp> {
    let disks = header().disks;
    prop_oneof![
        6 => (0u16..2, any::<u64>(), 1u64..40, any::<u8>()).prop_map(move |(disk, at, blocks, fill)| {
            let geometry = disks[usize::from(disk)];
            let block = u64::from(geometry.block_size_bytes);
            let total = geometry.size_bytes / block;
            let blocks = blocks.min(total);
            let offset_bytes = (at % (total - blocks + 1)) * block;
            let len = (blocks * block) as usize;
            let data = (0..len).map(|i| fill.wrapping_add((i / 512) as u8) | 1).collect();
            SourceOp::Write { disk, offset_bytes, data }
        }),
        1 => (0u16..2, any::<u64>(), 1u64..20).prop_map(move |(disk, at, blocks)| {
            let geometry = header().disks[usize::from(disk)];
            let block = u64::from(geometry.block_size_bytes);
            let total = geometry.size_bytes / block;
            let blocks = blocks.min(total);
            SourceOp::Zero { disk, offset_bytes: (at % (total - blocks + 1)) * block, len_bytes: blocks * block }
        }),
        1 => prop_oneof![Just(Consistency::Crash), Just(Consistency::App)].prop_map(SourceOp::Bookmark),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn apply_every_retained_point_materializes_exactly(
        ops in proptest::collection::vec(op_strategy(), 1..120),
        stage_batch in 1usize..20,
        apply_every in 1usize..6,
        keep in 1usize..8,
        queue_depth in 1usize..16,
        zstd in any::<bool>(),
    ) {
        let script = script(&ops, zstd);
        let mut item = Item::open(Storage::new(), ApplyConfig { stream_max_frames: 5, ..ApplyConfig::default() }, queue_depth);
        // Stage in batches, applying now and then, so apply batches straddle commits.
        for (round, chunk) in script.frames.chunks(stage_batch).enumerate() {
            item.stage(chunk, stage_batch);
            if round % apply_every == 0 {
                item.applier.apply_batch().unwrap();
            }
        }
        item.applier.apply_available().unwrap();
        prop_assert_eq!(item.applier.applied_seq(), script.frames.len() as u64);
        // Replicas hold the newest state.
        for (index, expected) in script.final_content.iter().enumerate() {
            let live = item.storage.disks.live_image(&common::replica_name(index)).unwrap();
            prop_assert!(&live == expected, "replica {} differs from the source", index);
        }
        let retention = Retention { max_count: keep, max_age_ns: u64::MAX };
        let pruned = item.applier.prune(retention, 0).unwrap();
        let points = item.meta.points(engine::meta::item_key(&header().item_id)).unwrap();
        prop_assert!(points.len() <= keep);
        prop_assert_eq!(points.len() + pruned.len(), script.snapshots.len());
        for point in &points {
            let expected = &script.snapshots[&point.point_id];
            let got = item.materialize(point.point_id);
            for disk in 0..expected.len() {
                prop_assert!(got[disk] == expected[disk], "point {} disk {} differs", point.point_id, disk);
            }
        }
        // A pruned point is refused, not silently wrong.
        for id in pruned {
            prop_assert!(item.meta.point(engine::meta::item_key(&header().item_id), id).unwrap().is_none());
        }
    }
}

#[test]
fn apply_without_preservation_writes_replicas_but_keeps_no_old_blocks() {
    let ops = vec![
        SourceOp::Write {
            disk: 0,
            offset_bytes: 0,
            data: vec![1; 8192],
        },
        SourceOp::Bookmark(Consistency::Crash),
        SourceOp::Write {
            disk: 0,
            offset_bytes: 4096,
            data: vec![2; 4096],
        },
    ];
    let script = script(&ops, false);
    let config = ApplyConfig {
        preserve: false,
        ..ApplyConfig::default()
    };
    let mut item = Item::open(Storage::new(), config, 4);
    item.stage(&script.frames, 10);
    let progress = item.applier.apply_available().unwrap();
    assert_eq!(progress.grains_preserved, 0);
    assert_eq!(
        item.storage.disks.live_image("replica-0").unwrap()[..8192],
        [[1u8; 4096], [2u8; 4096]].concat()[..]
    );
}

#[test]
fn latest_point_after_draining_staging_equals_the_newest_source_state() {
    let mut ops: Vec<SourceOp> = (0..12u64)
        .map(|i| SourceOp::Write {
            disk: (i % 2) as u16,
            offset_bytes: i * 4096,
            data: vec![i as u8 + 1; 4096],
        })
        .collect();
    ops.insert(5, SourceOp::Bookmark(Consistency::App));
    let script = script(&ops, true);
    let mut item = Item::open(Storage::new(), ApplyConfig::default(), 4);
    item.stage(&script.frames, 3);
    // "Latest": apply everything staged, then mark a point at the last applied frame.
    item.applier.apply_available().unwrap();
    let latest = item.applier.mark_latest_point().unwrap().unwrap();
    assert_eq!(latest, script.frames.len() as u64);
    assert_eq!(item.materialize(latest), script.final_content);
    // The bookmark before it is still exact too.
    let (&bookmark, snapshot) = script.snapshots.iter().next().unwrap();
    assert_eq!(&item.materialize(bookmark), snapshot);
    // Marking again without new frames returns the same point.
    assert_eq!(item.applier.mark_latest_point().unwrap(), Some(latest));
}

#[test]
fn prune_by_age_removes_oldest_first_and_stops_at_a_pinned_point() {
    let mut ops = Vec::new();
    for i in 0..6u64 {
        ops.push(SourceOp::Write {
            disk: 0,
            offset_bytes: 0,
            data: vec![i as u8 + 1; 8192],
        });
        ops.push(SourceOp::Bookmark(Consistency::Crash));
    }
    let script = script(&ops, false);
    let mut item = Item::open(Storage::new(), ApplyConfig::default(), 4);
    item.stage(&script.frames, 4);
    item.applier.apply_available().unwrap();
    let key = engine::meta::item_key(&header().item_id);
    let points = item.meta.points(key).unwrap();
    assert_eq!(points.len(), 6);
    let newest_ns = points.iter().map(|p| p.processed_at_ns).max().unwrap();
    // Everything older than "now + 1 h - 1 ns" by more than an hour: nothing yet.
    let hour_ns = 3_600_000_000_000;
    let keep_all = Retention {
        max_count: 100,
        max_age_ns: hour_ns,
    };
    assert!(item.applier.prune(keep_all, newest_ns).unwrap().is_empty());
    // Two hours later every point is too old, but a pinned one (being materialized) stops
    // pruning: the points before it go, it and the newer ones stay.
    let pinned = points[2].point_id;
    let guard = item.applier.pins().pin(pinned);
    let removed = item
        .applier
        .prune(keep_all, newest_ns + 2 * hour_ns)
        .unwrap();
    assert_eq!(removed, vec![points[0].point_id, points[1].point_id]);
    for point in &points[2..] {
        assert_eq!(
            &item.materialize(point.point_id),
            &script.snapshots[&point.point_id]
        );
    }
    drop(guard);
    let removed = item
        .applier
        .prune(keep_all, newest_ns + 2 * hour_ns)
        .unwrap();
    assert_eq!(removed.len(), 4);
    assert!(item.meta.points(key).unwrap().is_empty());
}

#[test]
fn payloads_larger_than_a_pool_buffer_are_written_in_pieces_and_every_point_is_exact() {
    // The test pool has 16 buffers of 16 KiB: a whole-disk write is 16 pieces on disk 0 and 7
    // (the last one partial) on disk 1; at queue depth 32 the pool runs dry before the queue
    // does, so the applier also has to wait for buffers to come back.
    let disks = header().disks;
    let whole = |disk: u16, fill: u8| SourceOp::Write {
        disk,
        offset_bytes: 0,
        data: (0..disks[usize::from(disk)].size_bytes)
            .map(|i| fill.wrapping_add((i / 4096) as u8) | 1)
            .collect(),
    };
    for zstd in [false, true] {
        let ops = vec![
            whole(0, 1),
            whole(1, 2),
            SourceOp::Bookmark(Consistency::Crash),
            whole(0, 3),
            SourceOp::Write {
                disk: 1,
                offset_bytes: 512,
                data: vec![9; 40 << 10],
            },
            SourceOp::Bookmark(Consistency::App),
            whole(1, 5),
        ];
        let script = script(&ops, zstd);
        let mut item = Item::open(Storage::new(), ApplyConfig::default(), 32);
        item.stage(&script.frames, 2);
        item.applier.apply_available().unwrap();
        let latest = item.applier.mark_latest_point().unwrap().unwrap();
        assert_eq!(
            item.materialize(latest),
            script.final_content,
            "zstd {zstd}"
        );
        for (&point, snapshot) in &script.snapshots {
            assert_eq!(
                &item.materialize(point),
                snapshot,
                "zstd {zstd}, point {point}"
            );
        }
    }
}
