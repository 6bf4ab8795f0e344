//! Unit tests of the item record: persistence, the start-up check, the stand-in record.

use super::*;

const HEX: &str = "00112233445566778899aabbccddeeff";

fn geometry(size_bytes: u64) -> DiskGeometry {
    DiskGeometry {
        size_bytes,
        block_size_bytes: 4096,
    }
}

fn header(disks: Vec<DiskGeometry>) -> StreamHeader {
    StreamHeader {
        item_id: parse_item_hex(HEX).unwrap_or_default(),
        item_name: "vm".into(),
        first_seq: 1,
        disks,
    }
}

/// A record as enable writes it, with one disk of `size_bytes` at `path`.
fn record(size_bytes: u64, path: &str) -> ItemRecord {
    let mut record = stand_in_record(HEX, Path::new("/data"), None, &[]);
    record.name = "vm".into();
    record.state = ItemState::Protected;
    record.disks = vec![DiskRecord {
        index: 0,
        size_bytes,
        block_size_bytes: 4096,
        path: path.into(),
        origin: DiskOrigin::Created,
    }];
    record
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"))
}

fn store() -> ControlStore {
    ControlStore::open_in(&engine::durable::SimDir::new())
        .unwrap_or_else(|e| panic!("a control store: {e}"))
}

#[test]
fn a_written_record_reads_back() {
    let store = store();
    let id = parse_item_hex(HEX).unwrap_or_default();
    let written = record(1 << 20, "/data/items/x/replicas/disk-0.raw");
    let result = write_record(&store, &id, &written);
    assert!(result.is_ok(), "{result:?}");
    let read = store
        .record_bytes(&id)
        .ok()
        .flatten()
        .map(|bytes| decode_record(HEX, &bytes).map(|r| serde_json::to_value(r).ok()));
    assert_eq!(read, Some(Ok(serde_json::to_value(&written).ok())));
    assert!(remove_record(&store, &id).is_ok());
    assert_eq!(store.record_bytes(&id).ok(), Some(None), "removed");
}

#[test]
fn no_record_is_none_and_a_damaged_one_names_its_item() {
    let store = store();
    let id = parse_item_hex(HEX).unwrap_or_default();
    assert_eq!(store.record_bytes(&id).ok(), Some(None));
    let why = decode_record(HEX, b"{ not json").err().unwrap_or_default();
    assert!(
        why.contains(HEX) && why.contains("not an item record"),
        "{why}"
    );
}

#[test]
fn a_token_reads_back_and_a_missing_one_is_empty() {
    let dir = tempdir();
    assert_eq!(read_token(dir.path(), HEX), Ok(Vec::new()));
    assert!(write_token(dir.path(), "abc123").is_ok());
    assert_eq!(read_token(dir.path(), HEX), Ok(b"abc123".to_vec()));
    assert!(remove_token(dir.path()).is_ok());
    assert!(remove_token(dir.path()).is_ok(), "removing twice is fine");
    assert_eq!(read_token(dir.path(), HEX), Ok(Vec::new()));
}

#[test]
fn check_record_accepts_a_record_matching_its_header() {
    let record = record(1 << 20, "/d");
    assert_eq!(
        check_record(HEX, &record, Some(&header(vec![geometry(1 << 20)]))),
        Ok(())
    );
}

#[test]
fn check_record_refuses_what_disagrees() {
    let good = record(1 << 20, "/d");
    let head = header(vec![geometry(1 << 20)]);
    let refused = |record: &ItemRecord, header: Option<&StreamHeader>| {
        check_record(HEX, record, header).err().unwrap_or_default()
    };
    assert!(refused(&good, None).contains("header.drs is missing"));
    let mut version = good.clone();
    version.version = 2;
    assert!(refused(&version, Some(&head)).contains("format version 2"));
    let mut id = good.clone();
    id.id = "ff".repeat(16);
    assert!(refused(&id, Some(&head)).contains("records item id"));
    let mut quarantined = good.clone();
    quarantined.state = ItemState::Quarantined;
    assert!(refused(&quarantined, Some(&head)).contains("the state quarantined"));
    let other_size = header(vec![geometry(2 << 20)]);
    assert!(refused(&good, Some(&other_size)).contains("do not match header.drs"));
    let mut unindexed = good.clone();
    unindexed.disks[0].index = 1;
    assert!(refused(&unindexed, Some(&head)).contains("do not match header.drs"));
}

#[test]
fn a_stand_in_record_takes_its_disks_from_the_header_and_the_slot_table() {
    let id = ItemId(parse_item_hex(HEX).unwrap_or_default());
    let head = header(vec![
        geometry(1 << 20),
        geometry(2 << 20),
        geometry(3 << 20),
    ]);
    let attached = [
        (id, 0, PathBuf::from("/data/items/x/replicas/disk-0.raw")),
        (id, 1, PathBuf::from("/elsewhere/disk-1.raw")),
    ];
    let record = stand_in_record(HEX, Path::new("/data"), Some(&head), &attached);
    assert_eq!(record.state, ItemState::Quarantined);
    assert_eq!(record.name, "vm");
    assert_eq!(record.geometries(), head.disks);
    let origins: Vec<(DiskOrigin, &str)> = record
        .disks
        .iter()
        .map(|d| (d.origin, d.path.as_str()))
        .collect();
    assert_eq!(
        origins,
        [
            (DiskOrigin::Created, "/data/items/x/replicas/disk-0.raw"),
            (DiskOrigin::Attached, "/elsewhere/disk-1.raw"),
            (DiskOrigin::Created, ""),
        ]
    );
    let bare = stand_in_record(HEX, Path::new("/data"), None, &[]);
    assert!(bare.disks.is_empty());
}
