//! Unit tests of the job table: state changes are durable, ids keep growing and never wrap,
//! damaged stored jobs are reported not fatal, a job owns its target directory while it runs.

use engine::durable::SimDir;

use super::*;

const ITEM_A: &str = "000102030405060708090a0b0c0d0e0f";
const ITEM_B: &str = "f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff";

fn store(dir: &SimDir) -> Arc<ControlStore> {
    Arc::new(ControlStore::open_in(dir).unwrap())
}

/// What a restart would find.
fn restarted(dir: &SimDir) -> SimDir {
    SimDir::from_image(dir.durable_image())
}

fn put_raw(dir: &SimDir, id: u64, bytes: &[u8]) {
    store(dir)
        .commit("test", |c| c.put_job_bytes(id, bytes))
        .unwrap();
}

#[test]
fn jobs_persist_their_state_and_ids_keep_growing() {
    let dir = SimDir::new();
    let jobs = Jobs::open(store(&dir)).unwrap();
    let a = jobs.create(JobKind::Failover, ITEM_A, "starting").unwrap();
    let b = jobs
        .create(JobKind::InitialReplication, ITEM_B, "waiting")
        .unwrap();
    assert_eq!((a.id(), b.id()), (1, 2));
    a.progress(150, "writing");
    assert_eq!(a.view().percent, 99, "running jobs never show 100");
    a.succeed("done").unwrap();
    b.fail("disk gone").unwrap();
    b.succeed("too late").unwrap();
    assert_eq!(jobs.running_work(), 0);
    drop(jobs);
    let reopened = Jobs::open(store(&restarted(&dir))).unwrap();
    let list = reopened.list();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0].id, 2, "newest first");
    assert_eq!(list[0].state, JobState::Failed);
    assert_eq!(list[0].error.as_deref(), Some("disk gone"));
    assert_eq!((list[1].state, list[1].percent), (JobState::Succeeded, 100));
    assert_eq!(
        reopened.create(JobKind::Resync, ITEM_A, "").unwrap().id(),
        3
    );
}

#[test]
fn a_prepared_job_is_stored_by_its_transaction_and_listed_once_published() {
    let dir = SimDir::new();
    let db = store(&dir);
    let jobs = Jobs::open(db.clone()).unwrap();
    let pending = jobs.prepare(JobKind::Reprotect, ITEM_A, "waiting").unwrap();
    assert!(jobs.list().is_empty(), "not listed before its commit");
    db.commit("step", |c| pending.put(c)).unwrap();
    let job = jobs.publish(pending);
    assert_eq!(jobs.get(job.id()).map(|j| j.id()), Some(1));
    // A prepared job whose transaction never committed leaves a gap, never a reused id.
    let lost = jobs.prepare(JobKind::Reprotect, ITEM_B, "").unwrap();
    assert_eq!(lost.id(), 2);
    drop(lost);
    assert_eq!(jobs.create(JobKind::Resync, ITEM_A, "").unwrap().id(), 3);
    drop(jobs);
    let reopened = Jobs::open(store(&restarted(&dir))).unwrap();
    assert_eq!(reopened.list().len(), 2);
}

#[test]
fn a_job_owns_its_target_directory_until_it_ends() {
    let dir = SimDir::new();
    let jobs = Jobs::open(store(&dir)).unwrap();
    let a = jobs.create(JobKind::TestFailover, ITEM_A, "").unwrap();
    let b = jobs.create(JobKind::Failover, ITEM_B, "").unwrap();
    a.hold_target_dir(1, 10);
    b.hold_target_dir(1, 11);
    assert_eq!(jobs.target_dir_holder(1, 10).map(|v| v.id), Some(a.id()));
    assert_eq!(jobs.target_dir_holder(1, 11).map(|v| v.id), Some(b.id()));
    assert!(jobs.target_dir_holder(2, 10).is_none(), "another device");
    a.fail("gone").unwrap();
    assert!(
        jobs.target_dir_holder(1, 10).is_none(),
        "released when it ends"
    );
}

#[test]
fn a_garbage_job_is_skipped_not_fatal_and_its_id_is_not_reused() {
    let dir = SimDir::new();
    put_raw(&dir, 7, b"{not json");
    let jobs = Jobs::open(store(&dir)).unwrap();
    assert!(jobs.list().is_empty());
    assert_eq!(jobs.damaged().len(), 1);
    assert!(jobs.damaged()[0].reason.contains("not a job record"));
    assert_eq!(jobs.create(JobKind::Resync, ITEM_A, "").unwrap().id(), 8);
}

/// A job whose id is the largest u64 made the next id wrap to 0 (and a debug build panic):
/// ids read from the store are checked, and creating past the largest id is refused.
#[test]
fn job_ids_from_disk_are_checked_and_never_wrap() {
    let dir = SimDir::new();
    let jobs = Jobs::open(store(&dir)).unwrap();
    let job = jobs.create(JobKind::Failover, ITEM_A, "x").unwrap();
    drop(jobs);
    let good = String::from_utf8(store(&dir).jobs().unwrap().remove(&1).unwrap()).unwrap();
    let max = u64::MAX.to_string();
    put_raw(
        &dir,
        u64::MAX,
        good.replace("\"id\": 1,", &format!("\"id\": {max},"))
            .as_bytes(),
    );
    put_raw(&dir, 5, good.replace("\"id\": 1,", "\"id\": 6,").as_bytes());
    put_raw(&dir, 0, good.replace("\"id\": 1,", "\"id\": 0,").as_bytes());
    let jobs = Jobs::open(store(&dir)).unwrap();
    let reasons: Vec<&str> = jobs.damaged().iter().map(|d| d.reason.as_str()).collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(
        reasons.iter().any(|r| r.contains("records job id 6")),
        "{reasons:?}"
    );
    assert_eq!(jobs.list().len(), 1);
    assert_eq!(jobs.list()[0].id, job.id());
    assert_eq!(jobs.create(JobKind::Resync, ITEM_A, "").unwrap().id(), 6);

    let dir = SimDir::new();
    put_raw(
        &dir,
        MAX_JOB_ID,
        good.replace("\"id\": 1,", &format!("\"id\": {MAX_JOB_ID},"))
            .as_bytes(),
    );
    let jobs = Jobs::open(store(&dir)).unwrap();
    assert!(jobs.damaged().is_empty());
    let refused = jobs.create(JobKind::Resync, ITEM_A, "").unwrap_err();
    assert!(format!("{refused}").contains("used up"), "{refused}");
}

/// A job shows as ended only once its end is durable.
#[test]
fn a_job_counts_as_running_until_its_end_is_written() {
    let dir = SimDir::new();
    let jobs = Jobs::open(store(&dir)).unwrap();
    let job = jobs.create(JobKind::Failover, ITEM_A, "x").unwrap();
    // The commit of the end fails (its sync fails): the job still ends in memory.
    dir.fail_sync_at(dir.sync_count());
    assert!(job.fail("boom").is_err());
    assert_eq!(job.view().state, JobState::Failed);
    assert_eq!(jobs.running_work(), 0);
}
