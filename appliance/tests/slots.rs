//! Slot accounting: exhaustion refused with needed/free counts and no change, failed attaches
//! leak nothing, the table survives restarts, a crash at every sync point of a scripted
//! sequence leaves the state before or after the interrupted operation, and random operation
//! sequences agree with a simple model.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

use appliance::db::migrate_v1::{
    PAGE_FILE_NAMES, PAGE_FORMAT_VERSION, PAGE_MAGIC, PageError, read_slot_pages,
};
use appliance::db::{CONTROL_FILE, ControlStore};
use appliance::slots::{
    APPLIANCE_LUN, DiskRequest, ItemId, Lun, PATH_BYTES_MAX, Reservation, SLOT_COUNT_DEFAULT,
    SLOT_COUNT_MAX, SlotCounts, SlotError, SlotRow, SlotState, SlotTable,
};
use engine::durable::{DurableDir, SimDir, StdDir};
use proptest::prelude::*;
use xxhash_rust::xxh3::xxh3_64;

fn item(n: u8) -> ItemId {
    ItemId([n; 16])
}

fn disk(item_n: u8, disk_index: u32) -> DiskRequest {
    DiskRequest {
        item: item(item_n),
        disk_index,
    }
}

/// A replica path; long enough that pages span several 512-byte sectors (for torn writes).
fn path_for(request: &DiskRequest) -> PathBuf {
    PathBuf::from(format!(
        "/var/lib/appliance/items/{}/replicas/{}/disk-{}.img",
        request.item,
        "r".repeat(120),
        request.disk_index
    ))
}

fn paths_for(reservation: &Reservation) -> Vec<PathBuf> {
    reservation
        .slots()
        .iter()
        .map(|(_, request)| path_for(request))
        .collect()
}

fn open(dir: &SimDir, slot_count: u32) -> SlotTable {
    SlotTable::open_in(dir, slot_count).unwrap()
}

/// What a crash now would leave, as a fresh directory.
fn restarted(dir: &SimDir) -> SimDir {
    SimDir::from_image(dir.durable_image())
}

/// The table as a restart would show it: reservations are free.
fn committed(rows: &[SlotRow]) -> Vec<SlotRow> {
    rows.iter()
        .map(|row| SlotRow {
            lun: row.lun,
            state: match &row.state {
                SlotState::Reserved { .. } => SlotState::Free,
                other => other.clone(),
            },
        })
        .collect()
}

fn reserve_and_commit(table: &mut SlotTable, op_id: u64, disks: &[DiskRequest]) -> Vec<Lun> {
    let reservation = table.reserve(op_id, disks).unwrap();
    let luns = reservation.slots().iter().map(|(lun, _)| *lun).collect();
    let paths = paths_for(&reservation);
    table.commit(reservation, paths).unwrap();
    luns
}

/// Every LUN in exactly one state, LUN 0 the appliance's, no disk or path twice, counts add up.
fn check_rows(rows: &[SlotRow], slot_count: u32) {
    assert_eq!(rows.len(), slot_count as usize);
    let mut disks = BTreeSet::new();
    let mut paths = BTreeSet::new();
    let mut counts = SlotCounts::default();
    for (index, row) in rows.iter().enumerate() {
        assert_eq!(row.lun, Lun(index as u32), "rows in LUN order");
        assert_eq!(
            row.state == SlotState::Appliance,
            row.lun == APPLIANCE_LUN,
            "LUN 0 and only LUN 0 is the appliance's"
        );
        match &row.state {
            SlotState::Free => counts.free += 1,
            SlotState::Appliance => counts.appliance += 1,
            SlotState::Reserved {
                item, disk_index, ..
            } => {
                counts.reserved += 1;
                assert!(disks.insert((*item, *disk_index)), "disk twice: {rows:?}");
            }
            SlotState::Attached {
                item,
                disk_index,
                path,
            } => {
                counts.attached += 1;
                assert!(disks.insert((*item, *disk_index)), "disk twice: {rows:?}");
                assert!(paths.insert(path.clone()), "path twice: {rows:?}");
            }
        }
    }
    assert_eq!(
        counts.free + counts.reserved + counts.attached + counts.appliance,
        slot_count as usize
    );
}

fn check_table(table: &SlotTable) {
    let rows = table.table();
    check_rows(&rows, table.slot_count());
    let counts = table.counts();
    assert_eq!(counts.free, table.free_count());
    assert_eq!(counts.appliance, 1);
    assert_eq!(
        counts.free + counts.reserved + counts.attached + counts.appliance,
        table.slot_count() as usize
    );
    for row in &rows {
        if let SlotState::Reserved {
            item, disk_index, ..
        }
        | SlotState::Attached {
            item, disk_index, ..
        } = &row.state
        {
            assert_eq!(table.lun_of(*item, *disk_index), Some(row.lun));
        }
    }
}

#[test]
fn slots_open_new_table_has_31_free_of_32_and_lun0_is_the_appliance() {
    let dir = SimDir::new();
    let table = open(&dir, SLOT_COUNT_DEFAULT);
    assert_eq!(table.slot_count(), 32);
    assert_eq!(table.free_count(), 31);
    let rows = table.table();
    assert_eq!(rows[0].state, SlotState::Appliance);
    assert!(rows[1..].iter().all(|row| row.state == SlotState::Free));
    check_table(&table);
    assert_eq!(
        SlotTable::load_committed(&restarted(&dir)).unwrap(),
        Some(rows)
    );
}

#[test]
fn slots_open_slot_count_out_of_range_is_refused() {
    for slot_count in [0, SLOT_COUNT_MAX + 1] {
        let err = SlotTable::open_in(&SimDir::new(), slot_count).unwrap_err();
        assert!(matches!(err, SlotError::SlotCountOutOfRange { .. }));
        assert_eq!(
            err.to_string(),
            format!("slot count {slot_count} is outside 1..=256")
        );
    }
    let only_appliance = open(&SimDir::new(), 1);
    assert_eq!(only_appliance.free_count(), 0);
}

#[test]
fn slots_reserve_more_than_free_refuses_with_counts_and_changes_nothing() {
    let dir = SimDir::new();
    let mut table = open(&dir, 8);
    reserve_and_commit(
        &mut table,
        1,
        &[disk(1, 0), disk(1, 1), disk(1, 2), disk(1, 3)],
    );
    let before = table.table();
    let image = dir.durable_image();
    let syncs = dir.sync_count();

    let five: Vec<_> = (0..5).map(|d| disk(2, d)).collect();
    let err = table.reserve(2, &five).unwrap_err();
    assert!(matches!(
        err,
        SlotError::NotEnoughSlots { needed: 5, free: 3 }
    ));
    assert_eq!(err.to_string(), "needs 5 slots, 3 free");

    assert_eq!(table.table(), before);
    assert_eq!(dir.durable_image(), image);
    assert_eq!(dir.sync_count(), syncs);
    // Exactly as many as are free still works, and then one more is refused.
    let three = table.reserve(3, &five[..3]).unwrap();
    assert_eq!(table.free_count(), 0);
    let err = table.reserve(4, &[disk(3, 0)]).unwrap_err();
    assert_eq!(err.to_string(), "needs 1 slots, 0 free");
    table.release_reservation(three).unwrap();
    assert_eq!(table.table(), before);
}

#[test]
fn slots_reserve_commit_takes_lowest_luns_and_the_table_survives_a_real_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir: Arc<dyn DurableDir> = Arc::new(StdDir::open(tmp.path()).unwrap());
    let mut table = SlotTable::open_in(dir.as_ref(), SLOT_COUNT_DEFAULT).unwrap();
    let luns = reserve_and_commit(&mut table, 7, &[disk(1, 0), disk(1, 1), disk(1, 2)]);
    assert_eq!(luns, vec![Lun(1), Lun(2), Lun(3)]);
    table.detach(item(1), 1).unwrap();
    // The freed LUN 2 is the lowest free one again.
    let luns = reserve_and_commit(&mut table, 8, &[disk(2, 0), disk(2, 1)]);
    assert_eq!(luns, vec![Lun(2), Lun(4)]);
    let before = table.table();
    check_table(&table);
    drop(table);

    let reopened = SlotTable::open_in(dir.as_ref(), SLOT_COUNT_DEFAULT).unwrap();
    assert_eq!(reopened.table(), before);
    // The stored table, read-only once no table holds the store.
    drop(reopened);
    assert_eq!(
        SlotTable::load_committed(dir.as_ref()).unwrap(),
        Some(before)
    );
    let mut names = dir.list().unwrap();
    names.sort();
    assert_eq!(names, vec![CONTROL_FILE.to_owned()]);
}

#[test]
fn slots_failed_attach_release_leaks_nothing() {
    let dir = SimDir::new();
    let mut table = open(&dir, 8);
    reserve_and_commit(&mut table, 1, &[disk(1, 0)]);
    let before = table.table();
    let syncs = dir.sync_count();

    // The attach failed: release.
    let reservation = table
        .reserve(2, &[disk(2, 0), disk(2, 1), disk(2, 2)])
        .unwrap();
    assert_eq!(table.counts().reserved, 3);
    check_table(&table);
    table.release_reservation(reservation).unwrap();
    assert_eq!(table.table(), before);

    // A refused commit is a failed attach too: its reservation is freed.
    let reservation = table.reserve(3, &[disk(2, 0), disk(2, 1)]).unwrap();
    let err = table
        .commit(reservation, vec![PathBuf::from("/replica/a")])
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "operation 3 reserved 2 slots but gave 1 paths"
    );
    assert_eq!(table.table(), before);

    let reservation = table.reserve(4, &[disk(2, 0), disk(2, 1)]).unwrap();
    let err = table
        .commit(
            reservation,
            vec![PathBuf::from("/replica/a"), PathBuf::from("relative/b")],
        )
        .unwrap_err();
    assert!(matches!(err, SlotError::PathRefused { disk_index: 1, .. }));
    assert!(err.to_string().contains("is not absolute"), "{err}");
    assert_eq!(table.table(), before);

    for bad in [
        PathBuf::new(),
        PathBuf::from(format!("/{}", "x".repeat(PATH_BYTES_MAX))),
    ] {
        let reservation = table.reserve(5, &[disk(2, 0)]).unwrap();
        let err = table.commit(reservation, vec![bad]).unwrap_err();
        assert!(matches!(err, SlotError::PathRefused { .. }), "{err}");
        assert_eq!(table.table(), before);
    }

    // None of it was written.
    assert_eq!(dir.sync_count(), syncs);
    assert_eq!(
        SlotTable::load_committed(&restarted(&dir)).unwrap(),
        Some(committed(&before))
    );
}

#[test]
fn slots_release_op_frees_a_reservation_whose_token_was_lost() {
    let dir = SimDir::new();
    let mut table = open(&dir, 8);
    let before = table.table();
    let lost = table.reserve(9, &[disk(1, 0), disk(1, 1)]).unwrap();
    assert_eq!(lost.op_id(), 9);
    drop(lost);
    assert_eq!(table.counts().reserved, 2);
    assert_eq!(table.release_op(9), vec![Lun(1), Lun(2)]);
    assert_eq!(table.table(), before);
    assert!(table.release_op(9).is_empty());
}

#[test]
fn slots_reservations_are_not_durable_and_a_stale_one_is_refused() {
    let dir = SimDir::new();
    let mut table = open(&dir, 8);
    reserve_and_commit(&mut table, 1, &[disk(1, 0)]);
    let committed_before = table.table();
    let stale = table.reserve(2, &[disk(2, 0), disk(2, 1)]).unwrap();
    assert_eq!(table.free_count(), 4);

    // Restart: the reservation of the operation that never committed is gone.
    let dir = restarted(&dir);
    let mut table = open(&dir, 8);
    assert_eq!(table.table(), committed_before);
    assert_eq!(table.free_count(), 6);

    // Same op id, same disks, same LUNs: the stale token still belongs to the old table.
    let fresh = table.reserve(2, &[disk(2, 0), disk(2, 1)]).unwrap();
    assert_eq!(fresh.slots(), stale.slots());
    let paths = paths_for(&stale);
    let err = table.commit(stale, paths).unwrap_err();
    assert!(matches!(
        err,
        SlotError::UnknownReservation { op_id: 2, .. }
    ));
    assert!(err.to_string().contains("made before a restart"), "{err}");
    let paths = paths_for(&fresh);
    table.commit(fresh, paths).unwrap();
    check_table(&table);
}

#[test]
fn slots_double_booking_is_refused_and_changes_nothing() {
    let dir = SimDir::new();
    let mut table = open(&dir, 16);
    for d in 0..6 {
        reserve_and_commit(&mut table, u64::from(d), &[disk(9, d)]);
    }
    reserve_and_commit(&mut table, 10, &[disk(1, 0), disk(1, 1), disk(1, 2)]);
    let before = table.table();

    // Attached already.
    let err = table.reserve(20, &[disk(2, 0), disk(1, 2)]).unwrap_err();
    assert!(matches!(
        err,
        SlotError::DiskAlreadyHasSlot {
            disk_index: 2,
            lun: Lun(9),
            ..
        }
    ));
    assert_eq!(
        err.to_string(),
        format!("item {} disk 2 already holds LUN 9", item(1))
    );
    assert_eq!(table.table(), before);

    // Twice in one request.
    let err = table.reserve(20, &[disk(2, 0), disk(2, 0)]).unwrap_err();
    assert!(matches!(
        err,
        SlotError::DuplicateDisk { disk_index: 0, .. }
    ));
    assert_eq!(table.table(), before);

    // Reserved already, by this or another operation.
    let held = table.reserve(20, &[disk(2, 0)]).unwrap();
    let with_reservation = table.table();
    let err = table.reserve(21, &[disk(2, 0)]).unwrap_err();
    assert!(matches!(
        err,
        SlotError::DiskAlreadyHasSlot { lun: Lun(10), .. }
    ));
    let err = table.reserve(20, &[disk(3, 0)]).unwrap_err();
    assert!(matches!(
        err,
        SlotError::OperationAlreadyReserved { op_id: 20 }
    ));
    assert_eq!(table.table(), with_reservation);

    // The same replica path at two LUNs.
    let taken = path_for(&disk(1, 0));
    let err = table.commit(held, vec![taken.clone()]).unwrap_err();
    assert!(matches!(err, SlotError::PathInUse { lun: Lun(7), .. }));
    assert_eq!(table.table(), before);
    let pair = table.reserve(22, &[disk(2, 0), disk(2, 1)]).unwrap();
    let same = PathBuf::from("/replica/same");
    let err = table.commit(pair, vec![same.clone(), same]).unwrap_err();
    assert!(
        matches!(err, SlotError::PathInUse { lun: Lun(10), .. }),
        "{err}"
    );
    assert_eq!(table.table(), before);
    check_table(&table);
}

#[test]
fn slots_detach_and_release_item_free_slots_durably() {
    let dir = SimDir::new();
    let mut table = open(&dir, 8);
    reserve_and_commit(&mut table, 1, &[disk(1, 0), disk(1, 1), disk(1, 2)]);
    reserve_and_commit(&mut table, 2, &[disk(2, 0)]);

    assert_eq!(table.detach(item(1), 1).unwrap(), Lun(2));
    let err = table.detach(item(1), 1).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("item {} disk 1 is not attached", item(1))
    );
    assert_eq!(
        SlotTable::load_committed(&restarted(&dir)).unwrap(),
        Some(table.table())
    );

    // An attach in flight for the item blocks releasing it.
    let in_flight = table.reserve(3, &[disk(1, 5)]).unwrap();
    let before = table.table();
    let err = table.release_item(item(1)).unwrap_err();
    assert!(matches!(err, SlotError::ItemBusy { op_id: 3, .. }));
    assert_eq!(table.table(), before);
    // A reserved disk is not attached: detach refuses it.
    assert!(matches!(
        table.detach(item(1), 5).unwrap_err(),
        SlotError::NotAttached { disk_index: 5, .. }
    ));
    table.release_reservation(in_flight).unwrap();

    assert_eq!(table.release_item(item(1)).unwrap(), vec![Lun(1), Lun(3)]);
    let syncs = dir.sync_count();
    assert!(table.release_item(item(1)).unwrap().is_empty());
    assert_eq!(dir.sync_count(), syncs, "nothing to free, nothing written");
    assert_eq!(table.free_count(), 6);
    assert_eq!(table.lun_of(item(2), 0), Some(Lun(4)));
    let dir = restarted(&dir);
    assert_eq!(open(&dir, 8).table(), table.table());
}

#[test]
fn slots_grow_is_allowed_and_shrink_below_an_attached_lun_is_refused() {
    let dir = SimDir::new();
    let mut table = open(&dir, 32);
    let disks: Vec<_> = (0..20).map(|d| disk(4, d)).collect();
    reserve_and_commit(&mut table, 1, &disks);
    let before = table.table();
    drop(table);

    let err = SlotTable::open_in(&dir, 16).unwrap_err();
    assert!(matches!(
        err,
        SlotError::ShrinkWouldDropAttached {
            slot_count: 16,
            lun: Lun(16),
            disk_index: 15,
            ..
        }
    ));
    assert_eq!(
        err.to_string(),
        format!(
            "slot count 16 would drop LUN 16 attached to item {} disk 15",
            item(4)
        )
    );
    // (The store's file itself changes: redb marks it open and closed.)
    assert_eq!(
        SlotTable::load_committed(&restarted(&dir)).unwrap(),
        Some(before.clone()),
        "a refused resize writes nothing"
    );

    let mut table = open(&dir, 32);
    assert_eq!(table.table(), before);
    for d in 15..20 {
        table.detach(item(4), d).unwrap();
    }
    drop(table);
    let table = open(&dir, 16);
    assert_eq!(table.slot_count(), 16);
    assert_eq!(table.free_count(), 0);
    drop(table);

    let table = open(&dir, 64);
    assert_eq!(table.free_count(), 48);
    check_table(&table);
    let grown = table.table();
    drop(table);
    // The new count is durable.
    assert_eq!(
        SlotTable::load_committed(&restarted(&dir)).unwrap(),
        Some(grown)
    );
}

#[test]
fn slots_largest_page_round_trips() {
    let dir = SimDir::new();
    let mut table = open(&dir, SLOT_COUNT_MAX);
    let disks: Vec<_> = (0..SLOT_COUNT_MAX - 1).map(|d| disk(5, d)).collect();
    let reservation = table.reserve(1, &disks).unwrap();
    let paths = reservation
        .slots()
        .iter()
        .map(|(lun, _)| {
            let name = format!("/{lun:03}-");
            PathBuf::from(format!("{name}{}", "p".repeat(PATH_BYTES_MAX - name.len())))
        })
        .collect();
    table.commit(reservation, paths).unwrap();
    assert_eq!(table.free_count(), 0);
    let err = table.reserve(2, &[disk(6, 0)]).unwrap_err();
    assert_eq!(err.to_string(), "needs 1 slots, 0 free");
    assert_eq!(
        open(&restarted(&dir), SLOT_COUNT_MAX).table(),
        table.table()
    );
}

/// One step of the crash script.
#[derive(Debug, Clone)]
enum Step {
    /// (Re)open with a slot count: in-flight reservations die with the old table.
    Open(u32),
    Reserve(u64, Vec<DiskRequest>),
    Commit(u64),
    Release(u64),
    Detach(u8, u32),
    ReleaseItem(u8),
}

fn crash_script() -> Vec<Step> {
    use Step::*;
    vec![
        Open(8),
        Reserve(1, vec![disk(1, 0), disk(1, 1), disk(1, 2)]),
        Commit(1),
        Reserve(2, vec![disk(2, 0), disk(2, 1)]),
        Release(2),
        Reserve(3, vec![disk(2, 0), disk(2, 1), disk(2, 2)]),
        Commit(3),
        Detach(1, 1),
        Reserve(4, vec![disk(3, 0)]),
        Open(8),
        Open(12),
        Reserve(5, vec![disk(3, 0), disk(3, 1), disk(3, 2)]),
        Commit(5),
        ReleaseItem(1),
        Detach(2, 0),
        Open(10),
        Reserve(6, vec![disk(4, 0)]),
        Commit(6),
        ReleaseItem(3),
    ]
}

/// Runs `steps` until one fails; calls `after` after each step that succeeded. Returns the
/// index of the failed step and its error.
fn run_script(
    dir: &SimDir,
    steps: &[Step],
    mut after: impl FnMut(usize, &SlotTable),
) -> Option<(usize, SlotError)> {
    let mut table: Option<SlotTable> = None;
    let mut held: BTreeMap<u64, Reservation> = BTreeMap::new();
    for (index, step) in steps.iter().enumerate() {
        let result = match step {
            Step::Open(slot_count) => {
                held.clear();
                table = None;
                SlotTable::open_in(dir, *slot_count).map(|t| table = Some(t))
            }
            Step::Reserve(op_id, disks) => table
                .as_mut()
                .unwrap()
                .reserve(*op_id, disks)
                .map(|r| drop(held.insert(*op_id, r))),
            Step::Commit(op_id) => {
                let reservation = held.remove(op_id).unwrap();
                let paths = paths_for(&reservation);
                table.as_mut().unwrap().commit(reservation, paths)
            }
            Step::Release(op_id) => table
                .as_mut()
                .unwrap()
                .release_reservation(held.remove(op_id).unwrap()),
            Step::Detach(item_n, disk_index) => table
                .as_mut()
                .unwrap()
                .detach(item(*item_n), *disk_index)
                .map(drop),
            Step::ReleaseItem(item_n) => table
                .as_mut()
                .unwrap()
                .release_item(item(*item_n))
                .map(drop),
        };
        match result {
            Ok(()) => after(index, table.as_ref().unwrap()),
            Err(err) => return Some((index, err)),
        }
    }
    None
}

/// The committed table stored in `dir` after each step (index 0: before the first).
fn script_states(steps: &[Step]) -> (Vec<Option<Vec<SlotRow>>>, u64) {
    let dir = SimDir::new();
    let mut states = vec![None];
    // Syncs through the last step (closing the store at the end syncs too: no step's).
    let mut sync_total = 0;
    let failed = run_script(&dir, steps, |_, table| {
        check_table(table);
        let stored = SlotTable::load_committed(&restarted(&dir)).unwrap();
        assert_eq!(stored.as_deref(), Some(&committed(&table.table())[..]));
        states.push(stored);
        sync_total = dir.sync_count();
    });
    assert!(failed.is_none(), "the script runs clean: {failed:?}");
    (states, sync_total)
}

#[test]
fn slots_crash_at_every_sync_point_leaves_the_state_before_or_after_the_operation() {
    let steps = crash_script();
    let (states, sync_total) = script_states(&steps);
    assert!(sync_total >= 10, "the script syncs {sync_total} times");
    let (mut saw_before, mut saw_after) = (0, 0);
    for sync_index in 0..sync_total {
        for tear_seed in std::iter::once(None).chain((0..16).map(Some)) {
            let dir = SimDir::new();
            dir.crash_at_sync(sync_index, tear_seed);
            let (failed_step, err) = run_script(&dir, &steps, |_, _| {})
                .unwrap_or_else(|| panic!("sync {sync_index} was never reached"));
            assert!(matches!(err, SlotError::Io { .. }), "{err}");
            let image = SimDir::from_image(dir.crash_image().unwrap());
            let loaded = SlotTable::load_committed(&image)
                .unwrap_or_else(|e| panic!("crash at sync {sync_index} (seed {tear_seed:?}): {e}"));
            let (before, after) = (&states[failed_step], &states[failed_step + 1]);
            if loaded == *before {
                saw_before += 1;
            } else if loaded == *after {
                saw_after += 1;
            } else {
                panic!(
                    "crash at sync {sync_index} (seed {tear_seed:?}) in step {failed_step} \
                     {:?}: {loaded:?} is neither {before:?} nor {after:?}",
                    steps[failed_step]
                );
            }
            // The image opens, holds no reservation, and works.
            if let Some(rows) = &loaded {
                check_rows(rows, rows.len() as u32);
                let mut table = open(&image, rows.len() as u32);
                assert_eq!(table.table(), *rows);
                check_table(&table);
                if table.free_count() > 0 {
                    reserve_and_commit(&mut table, 99, &[disk(42, 0)]);
                    check_table(&table);
                }
            }
        }
    }
    eprintln!(
        "{sync_total} sync points: {saw_before} crashes left the state before, {saw_after} after"
    );
    assert!(
        saw_before > 0 && saw_after > 0,
        "{saw_before} before, {saw_after} after"
    );
}

#[test]
fn slots_failed_sync_refuses_changes_until_reopened() {
    let steps = crash_script();
    let (states, sync_total) = script_states(&steps);
    for sync_index in 0..sync_total {
        let dir = SimDir::new();
        dir.fail_sync_at(sync_index);
        let (failed_step, err) = run_script(&dir, &steps, |_, _| {})
            .unwrap_or_else(|| panic!("sync {sync_index} was never reached"));
        assert!(matches!(err, SlotError::Io { .. }), "{err}");
        let stored = SlotTable::load_committed(&restarted(&dir)).unwrap();
        assert!(stored == states[failed_step] || stored == states[failed_step + 1]);
    }

    // The table itself refuses every change after the failure.
    let dir = SimDir::new();
    let mut table = open(&dir, 8);
    let reservation = table.reserve(1, &[disk(1, 0)]).unwrap();
    dir.fail_sync_at(dir.sync_count());
    let paths = paths_for(&reservation);
    let err = table.commit(reservation, paths).unwrap_err();
    assert!(matches!(
        err,
        SlotError::Io {
            what: "committing a reservation",
            ..
        }
    ));
    let err = table.reserve(2, &[disk(2, 0)]).unwrap_err();
    assert!(matches!(err, SlotError::Failed { .. }));
    assert!(err.to_string().contains("reopen"), "{err}");
    assert!(matches!(
        table.release_item(item(1)).unwrap_err(),
        SlotError::Failed { .. }
    ));
    let dir = restarted(&dir);
    let table = open(&dir, 8);
    assert_eq!(table.free_count(), 7);
}

/// A page with a valid checksum and the given header fields and body.
fn forged_page(
    version: u32,
    slot_count: u32,
    generation: u64,
    entries: &[(u32, u8, u32, &str)],
) -> Vec<u8> {
    let mut body = Vec::new();
    for &(lun, item_n, disk_index, path) in entries {
        body.extend_from_slice(&lun.to_le_bytes());
        body.extend_from_slice(&[item_n; 16]);
        body.extend_from_slice(&disk_index.to_le_bytes());
        body.extend_from_slice(&(path.len() as u16).to_le_bytes());
        body.extend_from_slice(path.as_bytes());
    }
    let mut page = vec![0u8; 8];
    page.extend_from_slice(&PAGE_MAGIC);
    page.extend_from_slice(&version.to_le_bytes());
    page.extend_from_slice(&slot_count.to_le_bytes());
    page.extend_from_slice(&generation.to_le_bytes());
    page.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    page.extend_from_slice(&(body.len() as u32).to_le_bytes());
    page.extend_from_slice(&body);
    let checksum = xxh3_64(&page[8..]);
    page[..8].copy_from_slice(&checksum.to_le_bytes());
    page
}

fn image_with(a: Vec<u8>, b: Vec<u8>) -> SimDir {
    SimDir::from_image(BTreeMap::from([
        (PAGE_FILE_NAMES[0].to_owned(), a),
        (PAGE_FILE_NAMES[1].to_owned(), b),
    ]))
}

/// The table that migrating the first release's slot pages in `dir` gives (the pages read by
/// `appliance::db::migrate_v1`, written into a new control store in `dir`).
fn open_v1(dir: &SimDir, slot_count: u32) -> Result<SlotTable, PageError> {
    let found = read_slot_pages(dir)?;
    let store = Arc::new(ControlStore::open_in(dir).unwrap());
    if let Some(v1) = found {
        store
            .commit("migrating", |c| c.put_slots(v1.slot_count, &v1.entries))
            .unwrap();
    }
    Ok(SlotTable::open(store, slot_count).unwrap())
}

/// The first release's page format, now read only by the migration: a damaged newest page
/// falls back to the older one, and unreadable or invariant-breaking pages are refused by name.
#[test]
fn slots_damaged_pages_fall_back_or_are_refused_by_name() {
    // A forged page in this test's own encoding loads as written: the layout is as documented.
    let good = forged_page(
        PAGE_FORMAT_VERSION,
        8,
        3,
        &[(2, 1, 0, "/r/a"), (5, 1, 1, "/r/b")],
    );
    let table = open_v1(&image_with(good.clone(), Vec::new()), 8).unwrap();
    assert_eq!(table.lun_of(item(1), 0), Some(Lun(2)));
    assert_eq!(table.lun_of(item(1), 1), Some(Lun(5)));
    assert_eq!(table.free_count(), 5);

    // The newest page damaged (a torn write): the older one wins.
    let older = forged_page(PAGE_FORMAT_VERSION, 8, 2, &[(2, 1, 0, "/r/a")]);
    let mut torn = good.clone();
    let last = torn.len() - 1;
    torn[last] ^= 0xff;
    let table = open_v1(&image_with(torn.clone(), older.clone()), 8).unwrap();
    assert_eq!(table.counts().attached, 1);

    // Both damaged, or a verified page that breaks an invariant: refused, naming the file.
    let err = open_v1(&image_with(torn, vec![7; 100]), 8).unwrap_err();
    assert!(matches!(err, PageError::Corrupt { .. }));
    assert!(err.to_string().contains("no valid page"), "{err}");
    let cases = [
        (
            forged_page(
                PAGE_FORMAT_VERSION,
                8,
                4,
                &[(2, 1, 0, "/r/a"), (3, 1, 0, "/r/b")],
            ),
            "holds more than one LUN",
        ),
        (
            forged_page(
                PAGE_FORMAT_VERSION,
                8,
                4,
                &[(2, 1, 0, "/r/a"), (3, 1, 1, "/r/a")],
            ),
            "attached twice",
        ),
        (
            forged_page(
                PAGE_FORMAT_VERSION,
                8,
                4,
                &[(3, 1, 0, "/r/a"), (2, 1, 1, "/r/b")],
            ),
            "out of order",
        ),
        (
            forged_page(PAGE_FORMAT_VERSION, 8, 4, &[(0, 1, 0, "/r/a")]),
            "out of order",
        ),
        (
            forged_page(PAGE_FORMAT_VERSION, 8, 4, &[(8, 1, 0, "/r/a")]),
            "outside 1..8",
        ),
        (
            forged_page(PAGE_FORMAT_VERSION, 8, 4, &[(1, 1, 0, "r/a")]),
            "not absolute",
        ),
        (
            forged_page(PAGE_FORMAT_VERSION + 1, 8, 4, &[]),
            "format version 2",
        ),
        (forged_page(PAGE_FORMAT_VERSION, 0, 4, &[]), "slot count 0"),
        (
            forged_page(PAGE_FORMAT_VERSION, 8, 2, &[]),
            "both hold generation 2",
        ),
    ];
    for (page, expected) in cases {
        let err = open_v1(&image_with(page, older.clone()), 8).unwrap_err();
        assert!(matches!(err, PageError::Corrupt { .. }), "{err}");
        assert!(
            err.to_string().contains(expected),
            "{err} lacks {expected:?}"
        );
        assert!(err.to_string().contains(PAGE_FILE_NAMES[0]), "{err}");
    }

    // No valid page and an empty second file: the first open never completed.
    let table = open_v1(&image_with(vec![1; 30], Vec::new()), 8).unwrap();
    assert_eq!(table.free_count(), 7);
}

// ---- model-based property test ---------------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Reserve { op_id: u64, disks: Vec<(u8, u32)> },
    Commit { op_id: u64 },
    CommitBadPath { op_id: u64 },
    Release { op_id: u64 },
    ReleaseById { op_id: u64 },
    Detach { item_n: u8, disk_index: u32 },
    ReleaseItem { item_n: u8 },
    Restart,
    Resize { slot_count: u32 },
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0..4u64, prop::collection::vec((0..4u8, 0..3u32), 0..5))
            .prop_map(|(op_id, disks)| Op::Reserve { op_id, disks }),
        4 => (0..4u64).prop_map(|op_id| Op::Commit { op_id }),
        1 => (0..4u64).prop_map(|op_id| Op::CommitBadPath { op_id }),
        1 => (0..4u64).prop_map(|op_id| Op::Release { op_id }),
        1 => (0..4u64).prop_map(|op_id| Op::ReleaseById { op_id }),
        2 => (0..4u8, 0..3u32).prop_map(|(item_n, disk_index)| Op::Detach { item_n, disk_index }),
        1 => (0..4u8).prop_map(|item_n| Op::ReleaseItem { item_n }),
        1 => Just(Op::Restart),
        1 => (2..10u32).prop_map(|slot_count| Op::Resize { slot_count }),
    ]
}

/// The reference: one state per LUN, lowest free LUN first, reservations gone on restart.
#[derive(Debug)]
struct Model {
    slots: Vec<SlotState>,
}

/// Which error the model expects.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    OperationAlreadyReserved,
    DuplicateDisk,
    DiskAlreadyHasSlot(Lun),
    NotEnoughSlots { needed: usize, free: usize },
    PathRefused,
    NotAttached,
    ItemBusy(u64),
    ShrinkWouldDropAttached(Lun),
}

fn refusal(err: &SlotError) -> Refusal {
    match *err {
        SlotError::OperationAlreadyReserved { .. } => Refusal::OperationAlreadyReserved,
        SlotError::DuplicateDisk { .. } => Refusal::DuplicateDisk,
        SlotError::DiskAlreadyHasSlot { lun, .. } => Refusal::DiskAlreadyHasSlot(lun),
        SlotError::NotEnoughSlots { needed, free } => Refusal::NotEnoughSlots { needed, free },
        SlotError::PathRefused { .. } => Refusal::PathRefused,
        SlotError::NotAttached { .. } => Refusal::NotAttached,
        SlotError::ItemBusy { op_id, .. } => Refusal::ItemBusy(op_id),
        SlotError::ShrinkWouldDropAttached { lun, .. } => Refusal::ShrinkWouldDropAttached(lun),
        ref other => panic!("unexpected error: {other}"),
    }
}

impl Model {
    fn new(slot_count: u32) -> Self {
        let mut slots = vec![SlotState::Free; slot_count as usize];
        slots[0] = SlotState::Appliance;
        Self { slots }
    }

    fn rows(&self) -> Vec<SlotRow> {
        self.slots
            .iter()
            .enumerate()
            .map(|(index, state)| SlotRow {
                lun: Lun(index as u32),
                state: state.clone(),
            })
            .collect()
    }

    fn holder(&self, request: DiskRequest) -> Option<Lun> {
        self.slots
            .iter()
            .position(|state| match state {
                SlotState::Reserved {
                    item, disk_index, ..
                }
                | SlotState::Attached {
                    item, disk_index, ..
                } => *item == request.item && *disk_index == request.disk_index,
                _ => false,
            })
            .map(|lun| Lun(lun as u32))
    }

    fn reserve(&mut self, op_id: u64, disks: &[DiskRequest]) -> Result<Vec<Lun>, Refusal> {
        if self
            .slots
            .iter()
            .any(|s| matches!(s, SlotState::Reserved { op_id: o, .. } if *o == op_id))
        {
            return Err(Refusal::OperationAlreadyReserved);
        }
        for (index, request) in disks.iter().enumerate() {
            if disks[..index].contains(request) {
                return Err(Refusal::DuplicateDisk);
            }
            if let Some(lun) = self.holder(*request) {
                return Err(Refusal::DiskAlreadyHasSlot(lun));
            }
        }
        let free: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i] == SlotState::Free)
            .collect();
        if disks.len() > free.len() {
            return Err(Refusal::NotEnoughSlots {
                needed: disks.len(),
                free: free.len(),
            });
        }
        for (&lun, request) in free.iter().zip(disks) {
            self.slots[lun] = SlotState::Reserved {
                op_id,
                item: request.item,
                disk_index: request.disk_index,
            };
        }
        Ok(free
            .iter()
            .take(disks.len())
            .map(|&l| Lun(l as u32))
            .collect())
    }

    fn set(&mut self, lun: Lun, state: SlotState) {
        self.slots[lun.0 as usize] = state;
    }

    fn drop_reservations(&mut self) {
        for state in &mut self.slots {
            if matches!(state, SlotState::Reserved { .. }) {
                *state = SlotState::Free;
            }
        }
    }
}

fn run_model_case(slot_count: u32, ops: &[Op]) {
    let mut dir = SimDir::new();
    let mut table = open(&dir, slot_count);
    let mut model = Model::new(slot_count);
    let mut held: BTreeMap<u64, Reservation> = BTreeMap::new();
    for op in ops {
        match op {
            Op::Reserve { op_id, disks } => {
                let disks: Vec<_> = disks.iter().map(|&(i, d)| disk(i, d)).collect();
                let before = table.table();
                let expected = model.reserve(*op_id, &disks);
                match table.reserve(*op_id, &disks) {
                    Ok(reservation) => {
                        let luns: Vec<_> = reservation.slots().iter().map(|(l, _)| *l).collect();
                        assert_eq!(Ok(luns), expected);
                        held.insert(*op_id, reservation);
                    }
                    Err(err) => {
                        assert_eq!(Err(refusal(&err)), expected.map(drop));
                        assert_eq!(table.table(), before, "a refused reserve changes nothing");
                    }
                }
            }
            Op::Commit { op_id } => {
                let Some(reservation) = held.remove(op_id) else {
                    continue;
                };
                for (&(lun, request), path) in
                    reservation.slots().iter().zip(paths_for(&reservation))
                {
                    model.set(
                        lun,
                        SlotState::Attached {
                            item: request.item,
                            disk_index: request.disk_index,
                            path,
                        },
                    );
                }
                let paths = paths_for(&reservation);
                table.commit(reservation, paths).unwrap();
            }
            Op::CommitBadPath { op_id } => {
                let Some(reservation) = held.remove(op_id) else {
                    continue;
                };
                let empty = reservation.slots().is_empty();
                for &(lun, _) in reservation.slots() {
                    model.set(lun, SlotState::Free);
                }
                let paths = vec![PathBuf::from("not/absolute"); reservation.slots().len()];
                let result = table.commit(reservation, paths);
                if empty {
                    result.unwrap();
                } else {
                    assert_eq!(refusal(&result.unwrap_err()), Refusal::PathRefused);
                }
            }
            Op::Release { op_id } => {
                let Some(reservation) = held.remove(op_id) else {
                    continue;
                };
                for &(lun, _) in reservation.slots() {
                    model.set(lun, SlotState::Free);
                }
                table.release_reservation(reservation).unwrap();
            }
            Op::ReleaseById { op_id } => {
                held.remove(op_id);
                let mut expected = Vec::new();
                for (index, state) in model.slots.iter_mut().enumerate() {
                    if matches!(state, SlotState::Reserved { op_id: o, .. } if o == op_id) {
                        *state = SlotState::Free;
                        expected.push(Lun(index as u32));
                    }
                }
                assert_eq!(table.release_op(*op_id), expected);
            }
            Op::Detach { item_n, disk_index } => {
                let position = model.slots.iter().position(|s| {
                    matches!(s, SlotState::Attached { item: i, disk_index: d, .. } if *i == item(*item_n) && d == disk_index)
                });
                match (position, table.detach(item(*item_n), *disk_index)) {
                    (Some(lun), Ok(got)) => {
                        assert_eq!(got, Lun(lun as u32));
                        model.slots[lun] = SlotState::Free;
                    }
                    (None, Err(err)) => assert_eq!(refusal(&err), Refusal::NotAttached),
                    (expected, got) => panic!("detach: model {expected:?}, table {got:?}"),
                }
            }
            Op::ReleaseItem { item_n } => {
                let wanted = item(*item_n);
                let busy = model.slots.iter().find_map(|s| match s {
                    SlotState::Reserved { op_id, item: i, .. } if *i == wanted => Some(*op_id),
                    _ => None,
                });
                let result = table.release_item(wanted);
                if let Some(op_id) = busy {
                    assert_eq!(refusal(&result.unwrap_err()), Refusal::ItemBusy(op_id));
                } else {
                    let mut expected = Vec::new();
                    for (index, state) in model.slots.iter_mut().enumerate() {
                        if matches!(state, SlotState::Attached { item: i, .. } if *i == wanted) {
                            *state = SlotState::Free;
                            expected.push(Lun(index as u32));
                        }
                    }
                    assert_eq!(result.unwrap(), expected);
                }
            }
            Op::Restart | Op::Resize { .. } => {
                let old_count = table.slot_count();
                let new_count = match op {
                    Op::Resize { slot_count } => *slot_count,
                    _ => old_count,
                };
                held.clear();
                drop(table);
                model.drop_reservations();
                dir = restarted(&dir);
                // Everything acknowledged is durable, and nothing reserved survived.
                assert_eq!(SlotTable::load_committed(&dir).unwrap(), Some(model.rows()));
                let dropped = model
                    .slots
                    .iter()
                    .enumerate()
                    .skip(new_count as usize)
                    .find(|(_, s)| matches!(s, SlotState::Attached { .. }));
                match (dropped, SlotTable::open_in(&dir, new_count)) {
                    (None, Ok(reopened)) => {
                        table = reopened;
                        model.slots.resize(new_count as usize, SlotState::Free);
                    }
                    (Some((lun, _)), Err(err)) => {
                        assert_eq!(
                            refusal(&err),
                            Refusal::ShrinkWouldDropAttached(Lun(lun as u32))
                        );
                        table = open(&dir, old_count);
                    }
                    (expected, got) => {
                        panic!("resize to {new_count}: model {expected:?}, table {got:?}")
                    }
                }
            }
        }
        assert_eq!(table.table(), model.rows(), "after {op:?}");
        check_table(&table);
    }
    // The end state survives a restart too.
    let committed_rows = committed(&table.table());
    assert_eq!(
        SlotTable::load_committed(&restarted(&dir)).unwrap(),
        Some(committed_rows)
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn slots_random_operations_agree_with_the_model(
        slot_count in 2..10u32,
        ops in prop::collection::vec(op_strategy(), 1..60),
    ) {
        run_model_case(slot_count, &ops);
    }
}
