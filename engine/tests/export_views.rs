//! Point views read exactly what materialize writes: every point opened as a view while apply
//! keeps applying (new points freezing older tags) reads its source snapshot byte for byte, its
//! extents cover the disk exactly, and a viewed point is never pruned.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::{Item, SourceOp, Storage, header, replica_name, script};
use engine::apply::{ApplyConfig, Retention};
use engine::delta::Consistency;
use engine::export::{PointView, ViewSource};
use engine::meta::item_key;
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
        2 => Just(SourceOp::Bookmark(Consistency::Crash)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn views_opened_early_read_their_point_while_apply_continues(
        ops in proptest::collection::vec(op_strategy(), 1..80),
        stage_batch in 1usize..12,
    ) {
        let script = script(&ops, false);
        let mut item = Item::open(Storage::new(), ApplyConfig { stream_max_frames: 5, ..ApplyConfig::default() }, 4);
        let tmp = tempfile::tempdir().unwrap();
        let disks = header().disks;
        let replicas: Vec<Arc<std::fs::File>> = (0..disks.len())
            .map(|i| {
                let path = tmp.path().join(format!("replica-{i}"));
                std::fs::write(&path, []).unwrap();
                Arc::new(std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap())
            })
            .collect();
        let sync_replicas = |item: &Item| {
            for (i, file) in replicas.iter().enumerate() {
                let image = item.storage.disks.live_image(&replica_name(i)).unwrap();
                file.set_len(0).unwrap();
                std::os::unix::fs::FileExt::write_all_at(&**file, &image, 0).unwrap();
            }
        };
        let item_key = item_key(&header().item_id);
        let mut views: BTreeMap<(u64, usize), PointView> = BTreeMap::new();
        for chunk in script.frames.chunks(stage_batch) {
            item.stage(chunk, stage_batch);
            item.applier.apply_available().unwrap();
            sync_replicas(&item);
            for point in item.meta.points(item_key).unwrap() {
                for (d, geometry) in disks.iter().enumerate() {
                    views.entry((point.point_id, d)).or_insert_with(|| {
                        PointView::open(
                            ViewSource {
                                meta: item.meta.clone(),
                                item: item_key,
                                disk_index: d as u16,
                                disk: *geometry,
                                preserve_dir: Arc::new(item.storage.preserve.clone()),
                                grain_bytes: 4096,
                                pins: item.applier.pins(),
                            },
                            point.point_id,
                            replicas[d].clone(),
                        )
                        .unwrap()
                    });
                }
            }
            // Every open view still reads its snapshot, whatever was applied since.
            for (&(point_id, d), view) in &views {
                let mut got = vec![0u8; view.size_bytes() as usize];
                view.read_at(0, &mut got).unwrap();
                prop_assert!(got == script.snapshots[&point_id][d], "point {} disk {}", point_id, d);
                // An unaligned read too.
                let mut part = vec![0u8; 5000.min(got.len() - 77)];
                view.read_at(77, &mut part).unwrap();
                prop_assert!(part[..] == got[77..77 + part.len()]);
                let mut extents = Vec::new();
                view.extents(0, view.size_bytes(), &mut extents).unwrap();
                prop_assert_eq!(extents.iter().map(|e| e.length_bytes).sum::<u64>(), view.size_bytes());
                // Data wherever the snapshot has a non-zero byte.
                let mut at = 0usize;
                for e in &extents {
                    let end = at + e.length_bytes as usize;
                    if e.hole {
                        prop_assert!(got[at..end].iter().all(|&b| b == 0), "hole with data at {}", at);
                    }
                    at = end;
                }
            }
        }
        // Views read what materialize writes.
        for (&(point_id, d), view) in &views {
            let mut got = vec![0u8; view.size_bytes() as usize];
            view.read_at(0, &mut got).unwrap();
            prop_assert!(got == item.materialize(point_id)[d]);
        }
        // Viewed points are pinned: pruning to one point removes none of them.
        let pruned = item.applier.prune(Retention { max_count: 1, max_age_ns: u64::MAX }, 0).unwrap();
        prop_assert!(pruned.is_empty(), "pruned {:?} while viewed", pruned);
        drop(views);
        item.applier.prune(Retention { max_count: 1, max_age_ns: u64::MAX }, 0).unwrap();
        prop_assert!(item.meta.points(item_key).unwrap().len() <= 1, "unpinned once the views are gone");
    }
}
