use std::cell::Cell;
use std::path::Path;

use super::*;

mod files;
mod model;

const ITEM: [u8; 16] = [7; 16];
const MIB: u64 = 1 << 20;
const NAME: &str = "os";

/// A temporary state directory (on tmpfs when there is one: fdatasync is cheap there).
pub(super) fn tempdir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        tempfile::tempdir_in(shm).unwrap()
    } else {
        tempfile::tempdir().unwrap()
    }
}

/// Limits with a 16-extent log of 4 MiB extents.
pub(super) fn small_limits(max_map_bytes: u64) -> Limits {
    Limits {
        min_grain_bytes: 4096,
        max_map_bytes,
        al_extent_bytes: 4 * MIB,
        al_extents: 16,
    }
}

pub(super) fn no_sync() -> impl FnMut() -> std::io::Result<()> {
    || Ok(())
}

/// Opens fresh, resends the whole disk, acknowledges it and checkpoints: nothing unsent.
pub(super) fn drained(dir: &Path, disk_bytes: u64, limits: Limits) -> ChangeMap {
    let (mut map, recovered) = ChangeMap::open(dir, NAME, ITEM, disk_bytes, limits).unwrap();
    assert!(recovered.fresh);
    assert_eq!(recovered.unsent_bytes, disk_bytes);
    let mut seq = 0;
    while let Some((offset, length)) = map.next_unsent(32 * MIB) {
        seq += 1;
        map.resent(offset, length, seq);
    }
    map.acked(seq);
    map.checkpoint(&mut no_sync()).unwrap();
    assert_eq!(map.unsent_bytes(), 0);
    assert_eq!(map.stats().active_extents, 0);
    map
}

pub(super) fn reopen(dir: &Path, disk_bytes: u64, limits: Limits) -> (ChangeMap, Recovered) {
    ChangeMap::open(dir, NAME, ITEM, disk_bytes, limits).unwrap()
}

#[test]
fn limits_are_validated() {
    Limits::default().validate().unwrap();
    small_limits(1024).validate().unwrap();
    let bad = [
        Limits {
            min_grain_bytes: 2048,
            ..Limits::default()
        },
        Limits {
            min_grain_bytes: 6000,
            ..Limits::default()
        },
        Limits {
            max_map_bytes: 512,
            ..Limits::default()
        },
        Limits {
            max_map_bytes: MAX_MAP_BYTES_LIMIT + 1,
            ..Limits::default()
        },
        Limits {
            al_extent_bytes: 2048,
            ..Limits::default()
        },
        Limits {
            al_extent_bytes: 3 * MIB,
            ..Limits::default()
        },
        Limits {
            al_extents: 15,
            ..Limits::default()
        },
        Limits {
            al_extents: MAX_AL_EXTENTS + 1,
            ..Limits::default()
        },
        // 64 KiB extents: a 32 MiB write spans 513 of them.
        Limits {
            al_extent_bytes: 64 << 10,
            al_extents: 512,
            ..Limits::default()
        },
    ];
    for limits in bad {
        assert!(
            matches!(limits.validate(), Err(ChangeMapError::Limits(_))),
            "{limits:?}"
        );
    }
    let ok = Limits {
        al_extent_bytes: 64 << 10,
        al_extents: 513,
        ..Limits::default()
    };
    ok.validate().unwrap();
}

#[test]
fn names_are_plain_file_names() {
    let dir = tempdir();
    for name in ["", "a/b", "..\u{0}", &"x".repeat(65)] {
        let result = ChangeMap::open(dir.path(), name, ITEM, MIB, Limits::default());
        assert!(
            matches!(result, Err(ChangeMapError::Name { .. })),
            "{name:?}"
        );
    }
}

#[test]
fn fresh_open_marks_the_whole_disk_and_reopen_keeps_it() {
    let dir = tempdir();
    let disk = 10 * MIB + 512;
    let (map, recovered) =
        ChangeMap::open(dir.path(), NAME, ITEM, disk, Limits::default()).unwrap();
    assert_eq!(
        recovered,
        Recovered {
            fresh: true,
            from_map_bytes: 0,
            from_activity_log_bytes: 0,
            unsent_bytes: disk
        }
    );
    assert_eq!(map.unsent_bytes(), disk);
    drop(map);
    let (_, recovered) = reopen(dir.path(), disk, Limits::default());
    assert!(!recovered.fresh);
    assert_eq!(recovered.from_map_bytes, disk);
    assert_eq!(recovered.unsent_bytes, disk);
}

#[test]
fn crash_with_sent_unacked_writes_recovers_their_extents() {
    let dir = tempdir();
    let disk = 256 * MIB;
    let mut map = drained(dir.path(), disk, small_limits(4096));
    let syncs = Cell::new(0);
    let mut sync = || {
        syncs.set(syncs.get() + 1);
        Ok(())
    };
    // A write spanning extents 2 and 3, and one in extent 40.
    map.begin_write(12 * MIB - 4096, 8192, &mut sync).unwrap();
    map.sent(12 * MIB - 4096, 8192, 100);
    map.begin_write(160 * MIB + 512, 100, &mut sync).unwrap();
    map.sent(160 * MIB + 512, 100, 101);
    assert_eq!(map.stats().active_extents, 3);
    assert_eq!(
        map.stats().al_transactions,
        2,
        "the spanning write took one transaction"
    );
    assert_eq!(syncs.get(), 0, "nothing evicted, no disk sync");
    drop(map); // a crash: no checkpoint
    let (map, recovered) = reopen(dir.path(), disk, small_limits(4096));
    assert!(!recovered.fresh);
    assert_eq!(recovered.from_map_bytes, 0);
    assert_eq!(recovered.from_activity_log_bytes, 12 * MIB);
    assert_eq!(recovered.unsent_bytes, 12 * MIB);
    for offset in [8 * MIB, 16 * MIB - 1, 160 * MIB, 164 * MIB - 1] {
        assert!(map.is_unsent(offset, 1), "{offset}");
    }
    assert!(!map.is_unsent(16 * MIB, 1));
    assert_eq!(map.stats().active_extents, 0, "the log restarts empty");
}

#[test]
fn acked_and_checkpointed_recovers_nothing() {
    let dir = tempdir();
    let disk = 64 * MIB;
    let mut map = drained(dir.path(), disk, small_limits(4096));
    map.begin_write(MIB, 4096, &mut no_sync()).unwrap();
    map.sent(MIB, 4096, 50);
    map.begin_write(30 * MIB, 4096, &mut no_sync()).unwrap();
    map.sent(30 * MIB, 4096, 51);
    map.acked(51);
    let syncs = Cell::new(0);
    map.checkpoint(&mut || {
        syncs.set(syncs.get() + 1);
        Ok(())
    })
    .unwrap();
    assert_eq!(syncs.get(), 1);
    assert_eq!(map.stats().active_extents, 0);
    drop(map);
    let (map, recovered) = reopen(dir.path(), disk, small_limits(4096));
    assert_eq!(recovered, Recovered::default());
    assert_eq!(map.unsent_bytes(), 0);
}

#[test]
fn checkpoint_keeps_extents_with_unacked_writes() {
    let dir = tempdir();
    let disk = 64 * MIB;
    let mut map = drained(dir.path(), disk, small_limits(4096));
    map.begin_write(MIB, 4096, &mut no_sync()).unwrap();
    map.sent(MIB, 4096, 50);
    map.begin_write(30 * MIB, 4096, &mut no_sync()).unwrap();
    map.sent(30 * MIB, 4096, 51);
    map.acked(50);
    map.checkpoint(&mut no_sync()).unwrap();
    assert_eq!(map.stats().active_extents, 1);
    drop(map);
    let (map, recovered) = reopen(dir.path(), disk, small_limits(4096));
    assert_eq!(recovered.from_activity_log_bytes, 4 * MIB);
    assert!(map.is_unsent(30 * MIB, 4096));
    assert!(!map.is_unsent(MIB, 4096));
}

/// Writes one 4 KiB write into each of `extents`, sent as consecutive seqs from `seq`.
pub(super) fn write_extents(
    map: &mut ChangeMap,
    extents: impl Iterator<Item = u64>,
    seq: &mut u64,
) {
    for extent in extents {
        map.begin_write(extent * 4 * MIB, 4096, &mut no_sync())
            .unwrap();
        *seq += 1;
        map.sent(extent * 4 * MIB, 4096, *seq);
    }
}

#[test]
fn eviction_prefers_clean_extents_and_syncs_the_disk_first() {
    let dir = tempdir();
    let disk = 256 * MIB;
    let limits = small_limits(4096);
    let mut map = drained(dir.path(), disk, limits);
    let mut seq = 0;
    write_extents(&mut map, 0..16, &mut seq);
    map.acked(8); // extents 0..8 clean
    let syncs = Cell::new(0);
    let mut sync = || {
        syncs.set(syncs.get() + 1);
        Ok(())
    };
    map.begin_write(20 * 4 * MIB, 4096, &mut sync).unwrap();
    assert_eq!(syncs.get(), 1);
    assert_eq!(map.stats().spilled_extents, 0);
    assert_eq!(map.stats().active_extents, 16);
    assert_eq!(
        map.unsent_bytes(),
        0,
        "a clean extent leaves nothing unsent"
    );
    // Touch extents 1..8 so the unacked ones (8..16) are older, then fill with new ones:
    // after the 7 clean ones, unacked ones are spilled.
    for extent in 1..8 {
        map.begin_write(extent * 4 * MIB, 4096, &mut sync).unwrap();
        map.sent(extent * 4 * MIB, 4096, 5);
    }
    let before_saves = map.stats().map_saves;
    // One write spanning 3 new extents (21, 22, 23): one transaction.
    let transactions = map.stats().al_transactions;
    map.begin_write(21 * 4 * MIB, 12 * MIB, &mut sync).unwrap();
    assert_eq!(map.stats().al_transactions, transactions + 1);
    assert_eq!(
        map.stats().spilled_extents,
        0,
        "clean extents 1..3 went first"
    );
    map.begin_write(30 * 4 * MIB, 4096, &mut sync).unwrap();
    map.begin_write(31 * 4 * MIB, 4096, &mut sync).unwrap();
    map.begin_write(32 * 4 * MIB, 4096, &mut sync).unwrap();
    map.begin_write(33 * 4 * MIB, 4096, &mut sync).unwrap();
    // 8 clean extents evicted by now (0..8); the next eviction spills the least recently
    // used unacknowledged one: extent 8 (seq 9).
    assert_eq!(map.stats().spilled_extents, 0);
    assert_eq!(
        syncs.get(),
        6,
        "a disk sync before each evicting transaction"
    );
    map.begin_write(34 * 4 * MIB, 4096, &mut sync).unwrap();
    assert_eq!(map.stats().spilled_extents, 1);
    assert!(map.is_unsent(8 * 4 * MIB, 4 * MIB));
    assert_eq!(map.unsent_bytes(), 4 * MIB);
    assert_eq!(
        map.stats().map_saves,
        before_saves + 1,
        "the map was saved before the spill"
    );
    drop(map);
    let (_, recovered) = reopen(dir.path(), disk, limits);
    assert_eq!(recovered.from_map_bytes, 4 * MIB);
}

#[test]
fn a_failed_disk_sync_activates_nothing() {
    let dir = tempdir();
    let disk = 256 * MIB;
    let mut map = drained(dir.path(), disk, small_limits(4096));
    let mut seq = 0;
    write_extents(&mut map, 0..16, &mut seq);
    map.acked(seq);
    let transactions = map.stats().al_transactions;
    let mut failing = || Err(std::io::Error::other("disk gone"));
    let result = map.begin_write(40 * 4 * MIB, 4096, &mut failing);
    assert!(
        matches!(result, Err(ChangeMapError::SyncDisk(_))),
        "{result:?}"
    );
    assert_eq!(map.stats().al_transactions, transactions);
    assert_eq!(map.stats().active_extents, 16);
    map.begin_write(40 * 4 * MIB, 4096, &mut no_sync()).unwrap();
    assert_eq!(map.stats().active_extents, 16);
}

#[test]
fn writes_past_the_end_or_too_wide_are_refused() {
    let dir = tempdir();
    let disk = 256 * MIB;
    let mut map = drained(dir.path(), disk, small_limits(4096));
    let result = map.begin_write(disk - 4096, 8192, &mut no_sync());
    assert!(
        matches!(result, Err(ChangeMapError::OutOfRange { .. })),
        "{result:?}"
    );
    let result = map.begin_write(u64::MAX, 2, &mut no_sync());
    assert!(
        matches!(result, Err(ChangeMapError::OutOfRange { .. })),
        "{result:?}"
    );
    let result = map.begin_write(0, 17 * 4 * MIB, &mut no_sync());
    assert!(
        matches!(result, Err(ChangeMapError::WriteSpan { extents: 17, .. })),
        "{result:?}"
    );
    map.begin_write(4096, 32 * MIB, &mut no_sync()).unwrap();
    assert_eq!(map.stats().active_extents, 9);
}

#[test]
fn requeue_marks_extents_with_lost_frames_unsent() {
    let dir = tempdir();
    let disk = 256 * MIB;
    let mut map = drained(dir.path(), disk, small_limits(4096));
    let mut seq = 0;
    write_extents(&mut map, 0..4, &mut seq);
    map.acked(2);
    map.requeue_unacked(2);
    assert_eq!(map.unsent_bytes(), 8 * MIB);
    assert!(map.is_unsent(2 * 4 * MIB, 4 * MIB) && map.is_unsent(3 * 4 * MIB, 4 * MIB));
    assert!(!map.is_unsent(0, 8 * MIB));
}

#[test]
fn a_resend_touched_by_a_write_stays_unsent() {
    let dir = tempdir();
    let disk = 64 * MIB;
    let mut map = drained(dir.path(), disk, small_limits(4096));
    map.begin_write(MIB, 8192, &mut no_sync()).unwrap();
    map.mark_unsent(MIB, 8192);
    let (offset, length) = map.next_unsent(MIB).unwrap();
    assert_eq!((offset, length), (MIB, 8192));
    map.begin_write(MIB + 4096, 512, &mut no_sync()).unwrap();
    map.sent(MIB + 4096, 512, 9);
    map.resent(offset, length, 10);
    assert_eq!(
        map.unsent_bytes(),
        8192,
        "the resend raced a write: not trusted"
    );
    let (offset, length) = map.next_unsent(MIB).unwrap();
    map.resent(offset, length, 11);
    assert_eq!(map.unsent_bytes(), 0);
    // Resent, not acknowledged: a crash resends it.
    drop(map);
    let (map, recovered) = reopen(dir.path(), disk, small_limits(4096));
    assert!(map.is_unsent(MIB, 8192));
    assert!(recovered.unsent_bytes >= 8192);
}

#[test]
fn resent_ranges_leave_the_saved_map_once_acknowledged() {
    let dir = tempdir();
    let disk = 64 * MIB;
    let mut map = drained(dir.path(), disk, small_limits(4096));
    map.begin_write(MIB, 8192, &mut no_sync()).unwrap();
    map.mark_unsent(MIB, 8192);
    let (offset, length) = map.next_unsent(MIB).unwrap();
    map.resent(offset, length, 20);
    map.checkpoint(&mut no_sync()).unwrap();
    let (_, recovered) = reopen_after(&mut Some(map), dir.path(), disk);
    assert_eq!(recovered.from_map_bytes, 8192, "unacknowledged resend kept");
    let (mut map, _) = reopen(dir.path(), disk, small_limits(4096));
    let mut seq = 20;
    while let Some((offset, length)) = map.next_unsent(MIB) {
        seq += 1;
        map.resent(offset, length, seq);
    }
    map.acked(seq);
    map.checkpoint(&mut no_sync()).unwrap();
    let (_, recovered) = reopen_after(&mut Some(map), dir.path(), disk);
    assert_eq!(recovered, Recovered::default());
}

fn reopen_after(map: &mut Option<ChangeMap>, dir: &Path, disk: u64) -> (ChangeMap, Recovered) {
    drop(map.take());
    reopen(dir, disk, small_limits(4096))
}

#[test]
fn next_unsent_sweeps_round_robin() {
    let dir = tempdir();
    let disk = 256 * MIB;
    let mut map = drained(dir.path(), disk, small_limits(4096));
    map.mark_unsent(0, 8 * MIB);
    map.mark_unsent(100 * MIB, MIB);
    let got: Vec<_> = (0..4).map(|_| map.next_unsent(4 * MIB).unwrap()).collect();
    assert_eq!(
        got,
        [
            (0, 4 * MIB),
            (4 * MIB, 4 * MIB),
            (100 * MIB, MIB),
            (0, 4 * MIB)
        ]
    );
    assert_eq!(map.next_unsent(1000).unwrap().1, 4096, "at least one grain");
}

#[test]
fn coarsening_keeps_every_byte_and_the_bound() {
    let dir = tempdir();
    let disk = 256 * MIB;
    let limits = small_limits(1024);
    let mut map = drained(dir.path(), disk, limits);
    let marked: Vec<u64> = (0..2000u64)
        .map(|i| (i * 7919 % 60_000) * 4096 + 17)
        .collect();
    for &offset in &marked {
        map.mark_unsent(offset, 100);
        assert!(map.map_memory_bytes() <= limits.max_map_bytes);
    }
    let stats = map.stats();
    assert!(
        stats.coarsenings > 0 && stats.grain_bytes > 4096,
        "{stats:?}"
    );
    assert!(stats.unsent_runs * 32 <= 1024, "{stats:?}");
    for &offset in &marked {
        assert!(map.is_unsent(offset, 100), "{offset}");
    }
    map.checkpoint(&mut no_sync()).unwrap();
    drop(map);
    let (mut map, recovered) = reopen(dir.path(), disk, limits);
    for &offset in &marked {
        assert!(map.is_unsent(offset, 100), "{offset} after reopen");
    }
    assert!(recovered.from_map_bytes >= 2000 * 4096);
    let mut seq = 0;
    while let Some((offset, length)) = map.next_unsent(64 * MIB) {
        seq += 1;
        map.resent(offset, length, seq);
    }
    assert_eq!(
        map.stats().grain_bytes,
        4096,
        "an empty set returns to the finest grain"
    );
}

#[test]
fn a_fresh_map_narrows_to_the_differences_and_the_extents_written_meanwhile() {
    let dir = tempdir();
    let limits = small_limits(64 << 10);
    let disk = 64 * MIB;
    let (mut map, recovered) = ChangeMap::open(dir.path(), NAME, ITEM, disk, limits).unwrap();
    assert!(recovered.fresh);
    // A write during the comparison (no sender yet: marked unsent), in extent 5.
    map.begin_write(5 * 4 * MIB + 4096, 8192, &mut no_sync())
        .unwrap();
    map.mark_unsent(5 * 4 * MIB + 4096, 8192);
    assert!(map.narrow_fresh(&[(0, 65536), (40 * MIB, 4096)]).unwrap());
    // Kept: the two differing ranges and the whole written extent; nothing else.
    assert_eq!(map.unsent_bytes(), 65536 + 4096 + 4 * MIB);
    assert!(map.is_unsent(0, 1) && map.is_unsent(40 * MIB, 4096));
    assert!(map.is_unsent(5 * 4 * MIB, 4 * MIB));
    assert!(!map.is_unsent(MIB, MIB));
    // Saved: a crash now recovers at least as much (the extent is in the log too).
    drop(map);
    let (map, recovered) = reopen(dir.path(), disk, limits);
    assert!(!recovered.fresh);
    assert!(recovered.unsent_bytes >= 65536 + 4096 + 4 * MIB);
    assert!(!map.is_unsent(MIB, MIB));
    // Only once, and only while untouched: a reopened map is not fresh-whole any more.
    let mut map = map;
    assert!(!map.narrow_fresh(&[]).unwrap());
    assert!(map.is_unsent(0, 1));
}

#[test]
fn a_map_that_resent_anything_is_not_narrowed() {
    let dir = tempdir();
    let limits = small_limits(64 << 10);
    let disk = 16 * MIB;
    let (mut map, _) = ChangeMap::open(dir.path(), NAME, ITEM, disk, limits).unwrap();
    let (offset, length) = map.next_unsent(MIB).unwrap();
    map.resent(offset, length, 1);
    assert!(!map.narrow_fresh(&[]).unwrap());
    assert_eq!(map.unsent_bytes(), disk - length);
}
