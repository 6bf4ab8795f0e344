//! Checks shared by the process-level tests: an item's replicas and every recovery point
//! against an oracle of per-disk digests.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use engine::delta::DiskGeometry;
use engine::durable::{DurableDir, StdDir};
use engine::materialize::{Source, materialize_disk};
use engine::meta::{MetaStore, item_key};
use xxhash_rust::xxh3::xxh3_64;

/// Checks the item's replicas against `final_digests` and every retained point against
/// `oracle` (point id → digest per disk; a point not in it, such as a "latest" point, must
/// equal the final state). Returns the number of points verified.
pub fn verify_item(
    data: &Path,
    item_id: &[u8; 16],
    disks: &[DiskGeometry],
    oracle: &BTreeMap<u64, Vec<u64>>,
    final_digests: &[u64],
    scratch: &Path,
) -> usize {
    let hex: String = item_id.iter().map(|b| format!("{b:02x}")).collect();
    let item = data.join("items").join(hex);
    let replica = |index: usize| item.join("replicas").join(format!("disk-{index}.img"));
    for (index, digest) in final_digests.iter().enumerate() {
        let bytes = std::fs::read(replica(index)).unwrap();
        assert_eq!(
            xxh3_64(&bytes),
            *digest,
            "replica {index} differs from the source"
        );
    }
    let meta =
        MetaStore::open(StdDir::open(data).unwrap().open("meta.redb", true).unwrap()).unwrap();
    let key = item_key(item_id);
    let points = meta.points(key).unwrap();
    assert!(
        oracle
            .keys()
            .all(|seq| points.iter().any(|p| p.point_id == *seq)),
        "every bookmark became a point"
    );
    let source = Source {
        meta: &meta,
        item: key,
        disks,
        preserve_dir: Arc::new(StdDir::open(&item.join("preserve")).unwrap()),
        grain_bytes: 4096,
        pins: engine::apply::Pins::default(),
    };
    let path = scratch.join("verify-point.raw");
    for point in &points {
        let expected = oracle
            .get(&point.point_id)
            .map_or(final_digests, Vec::as_slice);
        for (index, digest) in expected.iter().enumerate() {
            let replica = std::fs::File::open(replica(index)).unwrap();
            let out = std::fs::File::create(&path).unwrap();
            materialize_disk(
                &source,
                point.point_id,
                index as u16,
                &replica,
                &out,
                &mut |_| {},
            )
            .unwrap();
            let got = xxh3_64(&std::fs::read(&path).unwrap());
            assert_eq!(got, *digest, "point {} disk {index}", point.point_id);
        }
    }
    points.len()
}
