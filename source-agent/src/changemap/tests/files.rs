//! The state files: torn activity-log transactions, and damaged, truncated, oversized or
//! foreign files, each refused with its named error.

use std::fs;
use std::path::Path;

use super::super::file::{self, MAX_MAP_FILE_BYTES};
use super::super::*;
use super::{ITEM, MIB, NAME, drained, no_sync, reopen, small_limits, tempdir, write_extents};

#[test]
fn a_torn_transaction_recovers_from_the_other_slot() {
    let limits = Limits {
        al_extents: 128,
        ..small_limits(64 << 10)
    };
    let disk = 1 << 30;
    for tear_first_sector in [true, false] {
        let dir = tempdir();
        let mut map = drained(dir.path(), disk, limits);
        let mut seq = 10;
        // 60 active extents: each snapshot is 64 + 8 × 60 + 8 bytes, more than a sector.
        write_extents(&mut map, (0..120).step_by(2), &mut seq);
        let al_path = dir.path().join("os.al");
        let before = fs::read(&al_path).unwrap();
        // The next transaction (61 extents) tears: only one of its sectors reached the disk.
        map.begin_write(121 * 4 * MIB, 4096, &mut no_sync())
            .unwrap();
        let (slot_offset, _) = map.log_file().newest_slot_span();
        let after = fs::read(&al_path).unwrap();
        drop(map);
        let mut torn = before.clone();
        let slot = slot_offset as usize;
        let sector = if tear_first_sector {
            slot..slot + 512
        } else {
            slot + 512..slot + 1024
        };
        torn[sector.clone()].copy_from_slice(&after[sector]);
        assert_ne!(torn, before);
        assert_ne!(torn, after);
        fs::write(&al_path, &torn).unwrap();
        let (map, recovered) = reopen(dir.path(), disk, limits);
        // Every extent whose data write could have happened (activated by a durable
        // transaction) is covered; extent 121's write had not begun.
        assert_eq!(recovered.from_activity_log_bytes, 60 * 4 * MIB);
        for extent in (0..120).step_by(2) {
            assert!(map.is_unsent(extent * 4 * MIB, 4096), "extent {extent}");
        }
    }
}

#[test]
fn the_newest_valid_slot_wins() {
    let limits = small_limits(4096);
    let disk = 256 * MIB;
    let dir = tempdir();
    let mut map = drained(dir.path(), disk, limits);
    let mut seq = 0;
    write_extents(&mut map, 0..3, &mut seq);
    drop(map);
    let (_, recovered) = reopen(dir.path(), disk, limits);
    assert_eq!(recovered.from_activity_log_bytes, 12 * MIB);
}

fn write_map_file(dir: &Path, bytes: &[u8]) {
    fs::write(dir.join("os.cmap"), bytes).unwrap();
}

fn open_err(dir: &Path, disk: u64) -> ChangeMapError {
    ChangeMap::open(dir, NAME, ITEM, disk, small_limits(4096)).unwrap_err()
}

#[test]
fn damaged_map_files_are_refused_by_name() {
    let disk = 64 * MIB;
    let dir = tempdir();
    drop(drained(dir.path(), disk, small_limits(4096)));
    let good = file::encode_map(ITEM, disk, 4096, &[(0, 8192), (MIB, 2 * MIB)]);
    write_map_file(dir.path(), &good);
    reopen(dir.path(), disk, small_limits(4096));
    let check = |bytes: &[u8], disk: u64, what: &str| {
        write_map_file(dir.path(), bytes);
        let err = open_err(dir.path(), disk);
        let ok = match what {
            "corrupt" => matches!(err, ChangeMapError::Corrupt { .. }),
            "too large" => matches!(err, ChangeMapError::TooLarge { .. }),
            "other item" => matches!(err, ChangeMapError::OtherItem { .. }),
            "size" => matches!(err, ChangeMapError::SizeChanged { .. }),
            "version" => matches!(err, ChangeMapError::Version { .. }),
            _ => false,
        };
        assert!(ok, "{what}: {err}");
    };
    let mut flipped = good.clone();
    flipped[60] ^= 1;
    check(&flipped, disk, "corrupt");
    check(&good[..good.len() - 1], disk, "corrupt");
    check(&good[..20], disk, "corrupt");
    check(&[], disk, "corrupt");
    let mut huge = good.clone();
    huge[48..56].copy_from_slice(&(1u64 << 60).to_le_bytes());
    check(&huge, disk, "too large");
    check(
        &file::encode_map([8; 16], disk, 4096, &[]),
        disk,
        "other item",
    );
    check(&good, disk + 4096, "size");
    check(
        &file::encode_map(ITEM, disk, 4096, &[(8192, 4096)]),
        disk,
        "corrupt",
    );
    check(
        &file::encode_map(ITEM, disk, 4096, &[(0, disk + 4096)]),
        disk,
        "corrupt",
    );
    check(
        &file::encode_map(ITEM, disk, 4096, &[(0, 8192), (4096, 12288)]),
        disk,
        "corrupt",
    );
    check(
        &file::encode_map(ITEM, disk, 4096, &[(100, 8192)]),
        disk,
        "corrupt",
    );
    check(&file::encode_map(ITEM, disk, 3000, &[]), disk, "corrupt");
    let mut version = good.clone();
    version[8] = 2;
    let body = version.len() - 8;
    let sum = xxhash_rust::xxh3::xxh3_64(&version[..body]).to_le_bytes();
    version[body..].copy_from_slice(&sum);
    check(&version, disk, "version");
    // A file longer than any map is refused before it is read.
    let big = fs::File::create(dir.path().join("os.cmap")).unwrap();
    big.set_len(MAX_MAP_FILE_BYTES + 1).unwrap();
    drop(big);
    assert!(matches!(
        open_err(dir.path(), disk),
        ChangeMapError::TooLarge { .. }
    ));
}

#[test]
fn damaged_activity_logs_are_refused_by_name() {
    let disk = 64 * MIB;
    let dir = tempdir();
    let mut map = drained(dir.path(), disk, small_limits(4096));
    let mut seq = 0;
    write_extents(&mut map, 0..2, &mut seq);
    drop(map);
    let al_path = dir.path().join("os.al");
    let good = fs::read(&al_path).unwrap();
    let check = |bytes: &[u8], disk: u64, expect: fn(&ChangeMapError) -> bool| {
        fs::write(&al_path, bytes).unwrap();
        let err = open_err(dir.path(), disk);
        assert!(expect(&err), "{err}");
    };
    let corrupt = |e: &ChangeMapError| matches!(e, ChangeMapError::Corrupt { .. });
    check(&good[..good.len() - 1], disk, corrupt);
    check(&[], disk, corrupt);
    let mut both = good.clone();
    let half = both.len() / 2;
    both[20] ^= 1;
    both[half + 20] ^= 1;
    check(&both, disk, corrupt);
    check(&log_file(disk, 4 * MIB, &[1, 1]), disk, corrupt);
    check(&log_file(disk, 4 * MIB, &[16]), disk, corrupt);
    check(&log_file(disk, 3 * MIB, &[1]), disk, corrupt);
    let mut version = log_file(disk, 4 * MIB, &[1]);
    version[8] = 9;
    let sum = xxhash_rust::xxh3::xxh3_64(&version[..72]).to_le_bytes();
    version[72..80].copy_from_slice(&sum);
    check(&version, disk, |e| {
        matches!(e, ChangeMapError::Version { .. })
    });
    fs::write(&al_path, log_file(disk, 4 * MIB, &[1, 3])).unwrap();
    let (_, recovered) = reopen(dir.path(), disk, small_limits(4096));
    assert_eq!(
        recovered.from_activity_log_bytes,
        8 * MIB,
        "a hand-made log is read"
    );
    check(&good, disk + 4096, |e| {
        matches!(e, ChangeMapError::SizeChanged { .. })
    });
    let big = fs::File::create(&al_path).unwrap();
    big.set_len(file::max_al_file_bytes() + 8192).unwrap();
    drop(big);
    assert!(matches!(
        open_err(dir.path(), disk),
        ChangeMapError::TooLarge { .. }
    ));
    // Another item's log.
    let other = tempdir();
    drop(ChangeMap::open(other.path(), NAME, [9; 16], disk, small_limits(4096)).unwrap());
    let other_log = fs::read(other.path().join("os.al")).unwrap();
    check(&other_log, disk, |e| {
        matches!(e, ChangeMapError::OtherItem { .. })
    });
}

#[test]
fn a_missing_file_marks_the_whole_disk() {
    let disk = 64 * MIB;
    for missing in ["os.cmap", "os.al"] {
        let dir = tempdir();
        drop(drained(dir.path(), disk, small_limits(4096)));
        fs::remove_file(dir.path().join(missing)).unwrap();
        let (_, recovered) = reopen(dir.path(), disk, small_limits(4096));
        assert!(!recovered.fresh);
        assert_eq!(recovered.unsent_bytes, disk, "{missing}");
    }
}

/// An activity log with one valid slot (generation 5) holding `extents`, then a zero slot.
fn log_file(disk: u64, extent_bytes: u64, extents: &[u64]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(b"SAGENTAL");
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&5u64.to_le_bytes());
    out.extend_from_slice(&ITEM);
    out.extend_from_slice(&disk.to_le_bytes());
    out.extend_from_slice(&extent_bytes.to_le_bytes());
    out.extend_from_slice(&(extents.len() as u64).to_le_bytes());
    for index in extents {
        out.extend_from_slice(&index.to_le_bytes());
    }
    let sum = xxhash_rust::xxh3::xxh3_64(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    out.resize(8192, 0);
    out
}
