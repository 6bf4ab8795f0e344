//! Unit tests of the control store: tables round-trip, one commit is all or nothing, a crash
//! at any sync point leaves the state before or after a commit, and a read-only view works
//! beside the writer.

use std::path::PathBuf;

use engine::durable::SimDir;

use super::*;

const A: [u8; 16] = [0xa; 16];
const B: [u8; 16] = [0xb; 16];

fn store(dir: &SimDir) -> ControlStore {
    ControlStore::open_in(dir).unwrap()
}

fn entry(lun: u32, item: [u8; 16], disk_index: u32) -> SlotEntry {
    SlotEntry {
        lun,
        item,
        disk_index,
        path: PathBuf::from(format!("/r/{lun}")),
    }
}

#[test]
fn records_jobs_and_slots_round_trip_and_commit_together() {
    let dir = SimDir::new();
    let db = store(&dir);
    assert_eq!(
        db.slots().unwrap(),
        None,
        "no slot table before the first write"
    );
    db.commit("enable", |c| {
        c.put_record(&A, &serde_json::json!({"state": "protected"}))?;
        c.put_job(7, &serde_json::json!({"id": 7}))?;
        c.put_slots(8, &[entry(1, A, 0), entry(2, A, 1)])
    })
    .unwrap();
    drop(db);
    let db = store(&SimDir::from_image(dir.durable_image()));
    let records = db.records().unwrap();
    let record: serde_json::Value = serde_json::from_slice(&records[&A]).unwrap();
    assert_eq!(record["state"], "protected");
    assert_eq!(
        db.jobs().unwrap().keys().copied().collect::<Vec<_>>(),
        vec![7]
    );
    let slots = db.slots().unwrap().unwrap();
    assert_eq!(
        slot_count_and_rows(&slots),
        (8, vec![entry(1, A, 0), entry(2, A, 1)])
    );

    // put_slots replaces the whole table; remove_* drop rows.
    db.commit("disable", |c| {
        c.remove_record(&A)?;
        c.remove_jobs(&[7, 8])?;
        c.put_slots(8, &[entry(3, B, 0)])
    })
    .unwrap();
    assert!(db.records().unwrap().is_empty());
    assert!(db.jobs().unwrap().is_empty());
    assert_eq!(
        slot_count_and_rows(&db.slots().unwrap().unwrap()),
        (8, vec![entry(3, B, 0)])
    );
}

fn slot_count_and_rows(slots: &StoredSlots) -> (u32, Vec<SlotEntry>) {
    (
        slots.slot_count,
        slots.rows.iter().map(|r| r.clone().unwrap()).collect(),
    )
}

#[test]
fn an_error_inside_a_commit_changes_nothing() {
    let dir = SimDir::new();
    let db = store(&dir);
    let err = db
        .commit("enable", |c| {
            c.put_record_bytes(&A, b"{}")?;
            Err::<(), _>(DbError {
                what: "test",
                message: "refused".into(),
            })
        })
        .unwrap_err();
    assert_eq!(err.message, "refused");
    assert!(db.records().unwrap().is_empty());
}

#[test]
fn a_crash_at_every_sync_point_leaves_the_state_before_or_after_a_commit() {
    let run = |dir: &SimDir| -> Result<(), DbError> {
        let db = ControlStore::open_in(dir)?;
        for n in 0..4u8 {
            db.commit("step", |c| {
                c.put_record_bytes(&[n; 16], &[n; 100])?;
                c.put_job_bytes(u64::from(n), &[n; 50])?;
                c.put_slots(8, &[entry(u32::from(n) + 1, [n; 16], 0)])
            })?;
        }
        Ok(())
    };
    let clean = SimDir::new();
    run(&clean).unwrap();
    let total = clean.sync_count();
    assert!(total >= 8, "{total} syncs");
    for at in 0..total {
        let dir = SimDir::new();
        dir.crash_at_sync(at, Some(at));
        let _ = run(&dir);
        let image = dir.crash_image().unwrap_or_else(|| dir.durable_image());
        let Ok(db) = ControlStore::open_in(&SimDir::from_image(image)) else {
            // Only a crash before the store's first commit may leave nothing usable: then
            // it is created again.
            continue;
        };
        let records = db.records().unwrap();
        let jobs = db.jobs().unwrap();
        let done = records.len();
        assert_eq!(
            jobs.len(),
            done,
            "records and jobs commit together (sync {at})"
        );
        match db.slots().unwrap() {
            None => assert_eq!(done, 0, "sync {at}"),
            Some(slots) => {
                let rows = slot_count_and_rows(&slots).1;
                let last = (done - 1) as u8;
                assert_eq!(
                    rows,
                    vec![entry(u32::from(last) + 1, [last; 16], 0)],
                    "sync {at}"
                );
            }
        }
        for n in 0..done as u8 {
            assert_eq!(records[&[n; 16]], vec![n; 100]);
        }
    }
}

#[test]
fn a_read_only_view_sees_the_last_commit() {
    let dir = SimDir::new();
    let db = store(&dir);
    db.commit("enable", |c| c.put_record_bytes(&A, b"one"))
        .unwrap();
    drop(db);
    let view = ControlStore::open_read_only(&dir).unwrap().unwrap();
    assert_eq!(view.record_bytes(&A).unwrap(), Some(b"one".to_vec()));
    assert!(
        ControlStore::open_read_only(&SimDir::new())
            .unwrap()
            .is_none()
    );
}

#[test]
fn a_slot_row_that_does_not_decode_is_reported_not_fatal() {
    let dir = SimDir::new();
    let db = store(&dir);
    db.commit("damage", |c| {
        c.put_slots(8, &[entry(1, A, 0)])?;
        c.put_slot_bytes(2, b"short")
    })
    .unwrap();
    let slots = db.slots().unwrap().unwrap();
    assert!(slots.rows[0].is_ok());
    assert!(
        slots.rows[1].as_ref().unwrap_err().contains("LUN 2"),
        "{:?}",
        slots.rows[1]
    );
    db.commit("rebuild mark", |c| c.mark_slots_for_rebuild())
        .unwrap();
    assert!(db.slots().unwrap().unwrap().need_rebuild);
    db.commit("rebuilt", |c| c.put_slots(8, &[])).unwrap();
    assert!(!db.slots().unwrap().unwrap().need_rebuild);
}

#[test]
fn another_format_version_is_refused() {
    let dir = SimDir::new();
    let db = store(&dir);
    db.commit("future", |c| {
        let mut settings = c.txn.open_table(SETTINGS).map_err(db_err("test"))?;
        settings
            .insert(SETTING_FORMAT, FORMAT_VERSION + 1)
            .map_err(db_err("test"))?;
        Ok(())
    })
    .unwrap();
    drop(db);
    let err = ControlStore::open_in(&SimDir::from_image(dir.durable_image())).unwrap_err();
    assert!(err.to_string().contains("format version 2"), "{err}");
}
