//! Jobs: the long operations of the control API (initial replication, test failover,
//! failover, change point, failback, resync), with progress, persisted in `DATA_DIR/jobs/`.
//!
//! Invariants:
//! - a job's id is unique for the data directory's life: the next id is one more than the
//!   highest id found at start, among readable *and* damaged job files, and ids never wrap
//!   (a create beyond [`MAX_JOB_ID`] is refused);
//! - a job file is loaded only if its name is `<id>.json` with `id` in 1..=[`MAX_JOB_ID`],
//!   its content is a job with that id, a valid item id and a percent of at most 100; any
//!   other file is reported ([`Jobs::damaged`]) and left in place for the operator, and the
//!   rest of the table loads;
//! - a job counts as running (for [`Jobs::running_work`], which a graceful stop waits on)
//!   until its final state is durable: the end is decided in memory, written, and only then
//!   shown as ended;
//! - every change of a job's *state* (created, succeeded, failed) is written with
//!   write-temp, fsync, rename, fsync-dir before the call returns, so after a crash a job is
//!   found in the last state it was reported in; percent and message changes are in memory
//!   only (they are re-derived after a restart);
//! - at most [`MAX_KEPT_JOBS`] finished jobs are kept; older ones are deleted, oldest first.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use anyhow::Context;

use crate::store::write_atomic;

/// Finished jobs kept (in memory and on disk).
pub const MAX_KEPT_JOBS: usize = 1000;
/// The largest job id (2^53 - 1: every id is exact in a JSON number).
pub const MAX_JOB_ID: u64 = (1 << 53) - 1;

/// A job file that could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DamagedJob {
    /// The file.
    pub path: PathBuf,
    /// What is wrong with it.
    pub reason: String,
}

pub use appliance_api::model::{JobKind, JobState, JobView};

/// A job in the table; progress updates go through it.
#[derive(Debug)]
pub struct Job {
    view: Mutex<JobView>,
    /// Set by the first `finish`: the end is decided, its record being written.
    finishing: AtomicBool,
    table: Arc<Inner>,
    /// The target directory (device, inode) the job owns while it runs (memory only: after a
    /// restart no file-changing job runs).
    target_dir: OnceLock<(u64, u64)>,
}

impl Job {
    fn lock(&self) -> MutexGuard<'_, JobView> {
        self.view.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A copy of the job's view.
    pub fn view(&self) -> JobView {
        self.lock().clone()
    }

    /// Its id.
    pub fn id(&self) -> u64 {
        self.lock().id
    }

    /// Records that the job owns the target directory `(dev, inode)` until it ends (see
    /// [`Jobs::target_dir_holder`]). Set once.
    pub fn hold_target_dir(&self, dev: u64, ino: u64) {
        let _ = self.target_dir.set((dev, ino));
    }

    /// Sets percent (clamped to 0..=99 while running) and message (memory only).
    pub fn progress(&self, percent: u64, message: impl Into<String>) {
        let mut view = self.lock();
        if view.state == JobState::Running {
            view.percent = percent.min(99) as u8;
            view.message = message.into();
        }
    }

    /// Ends the job successfully (durably).
    pub fn succeed(&self, message: impl Into<String>) -> anyhow::Result<()> {
        self.finish(JobState::Succeeded, message.into(), None)
    }

    /// Ends the job on an error (durably).
    pub fn fail(&self, error: impl Into<String>) -> anyhow::Result<()> {
        let error = error.into();
        self.finish(JobState::Failed, "failed".into(), Some(error))
    }

    fn finish(
        &self,
        state: JobState,
        message: String,
        error: Option<String>,
    ) -> anyhow::Result<()> {
        let ended = {
            let view = self.lock();
            if view.state != JobState::Running || self.finishing.swap(true, Ordering::AcqRel) {
                return Ok(());
            }
            let mut ended = view.clone();
            ended.state = state;
            if state == JobState::Succeeded {
                ended.percent = 100;
            }
            ended.message = message;
            ended.error = error;
            ended.finished_ns = Some(crate::store::now_ns());
            ended
        };
        crate::testhook::pause_point(&format!("job:finish:{}", ended.kind.name()));
        // Shown as ended only once the record is written (or its write failed: then a restart
        // finds it running and fails it as interrupted), so a graceful stop that waits for
        // running jobs also waits for this write.
        let persisted = self.table.persist(&ended);
        *self.lock() = ended;
        self.table.trim();
        persisted
    }
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    jobs: Mutex<BTreeMap<u64, Arc<Job>>>,
    /// The next id (taken by `Jobs::create` with one atomic update: never given twice).
    next_id: AtomicU64,
    /// Job files that could not be loaded at open.
    damaged: Vec<DamagedJob>,
}

impl Inner {
    fn persist(&self, view: &JobView) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec_pretty(view).context("encoding a job")?;
        write_atomic(&self.dir, &format!("{}.json", view.id), &bytes)
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, Arc<Job>>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Deletes the oldest finished jobs beyond [`MAX_KEPT_JOBS`]: out of the table under its
    /// lock, then their files without it (an id is never reused, so no new file can be hit).
    fn trim(&self) {
        let dropped: Vec<u64> = {
            let mut jobs = self.lock();
            let finished: Vec<u64> = jobs
                .iter()
                .filter(|(_, job)| job.lock().state != JobState::Running)
                .map(|(id, _)| *id)
                .collect();
            let dropped: Vec<u64> = finished
                .iter()
                .take(finished.len().saturating_sub(MAX_KEPT_JOBS))
                .copied()
                .collect();
            for id in &dropped {
                jobs.remove(id);
            }
            dropped
        };
        for id in dropped {
            let path = self.dir.join(format!("{id}.json"));
            if let Err(error) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), %error, "could not delete an old job");
            }
        }
    }
}

/// The job table.
#[derive(Debug, Clone)]
pub struct Jobs(Arc<Inner>);

impl Jobs {
    /// Loads `dir` (created if missing). A job file that cannot be loaded is reported (see
    /// [`Jobs::damaged`]) and skipped; its id is never given to a new job.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        crate::store::create_private_dir(dir)?;
        let mut views = Vec::new();
        let mut damaged = Vec::new();
        let mut highest = 0u64;
        for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
            let path = entry?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let id = path
                .file_stem()
                .and_then(|stem| stem.to_str())
                .and_then(|stem| stem.parse::<u64>().ok());
            if let Some(id) = id.filter(|id| *id <= MAX_JOB_ID) {
                highest = highest.max(id);
            }
            match load_job(&path, id) {
                Ok(view) => views.push(view),
                Err(reason) => {
                    tracing::error!(path = %path.display(), %reason,
                        "damaged job file: skipped (left in place; its id is not reused)");
                    damaged.push(DamagedJob { path, reason });
                }
            }
        }
        let inner = Arc::new(Inner {
            dir: dir.to_path_buf(),
            jobs: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(highest + 1),
            damaged,
        });
        let jobs = views
            .into_iter()
            .map(|view| {
                let job = Arc::new(Job {
                    view: Mutex::new(view),
                    finishing: AtomicBool::new(false),
                    table: inner.clone(),
                    target_dir: OnceLock::new(),
                });
                (job.id(), job)
            })
            .collect();
        *inner.lock() = jobs;
        Ok(Self(inner))
    }

    /// The job files that could not be loaded at open.
    pub fn damaged(&self) -> &[DamagedJob] {
        &self.0.damaged
    }

    /// Creates a running job (durably).
    pub fn create(
        &self,
        kind: JobKind,
        item: &str,
        message: impl Into<String>,
    ) -> anyhow::Result<Arc<Job>> {
        // The id is reserved first, the file written without the table's lock, the job
        // inserted after: a failed write leaves a gap in the ids, never a reused one.
        let id = self
            .0
            .next_id
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |id| {
                (id <= MAX_JOB_ID).then_some(id + 1)
            })
            .map_err(|_| {
                anyhow::anyhow!(
                    "job ids are used up (the largest is {MAX_JOB_ID}); no job was created"
                )
            })?;
        let view = JobView {
            id,
            kind,
            item: item.to_owned(),
            state: JobState::Running,
            percent: 0,
            message: message.into(),
            error: None,
            created_ns: crate::store::now_ns(),
            finished_ns: None,
        };
        self.0.persist(&view)?;
        let job = Arc::new(Job {
            view: Mutex::new(view),
            finishing: AtomicBool::new(false),
            table: self.0.clone(),
            target_dir: OnceLock::new(),
        });
        self.0.lock().insert(id, job.clone());
        Ok(job)
    }

    /// A job by id.
    pub fn get(&self, id: u64) -> Option<Arc<Job>> {
        self.0.lock().get(&id).cloned()
    }

    /// Every job, newest first.
    pub fn list(&self) -> Vec<JobView> {
        self.0.lock().values().rev().map(|job| job.view()).collect()
    }

    /// Running jobs that change files themselves (not replication monitors).
    pub fn running_work(&self) -> usize {
        self.0
            .lock()
            .values()
            .filter(|job| {
                let view = job.lock();
                view.state == JobState::Running && !view.kind.is_replication()
            })
            .count()
    }

    /// The running job that owns the target directory `(dev, inode)`, if one does.
    pub fn target_dir_holder(&self, dev: u64, ino: u64) -> Option<JobView> {
        self.0
            .lock()
            .values()
            .filter(|job| job.target_dir.get() == Some(&(dev, ino)))
            .map(|job| job.view())
            .find(|view| view.state == JobState::Running)
    }

    /// The running jobs.
    pub fn running(&self) -> Vec<Arc<Job>> {
        self.0
            .lock()
            .values()
            .filter(|job| job.lock().state == JobState::Running)
            .cloned()
            .collect()
    }
}

/// Reads and checks one job file; `id` is the number its name carries, if any.
fn load_job(path: &Path, id: Option<u64>) -> Result<JobView, String> {
    let id = id
        .filter(|id| (1..=MAX_JOB_ID).contains(id))
        .ok_or_else(|| format!("its name is not <job id 1..={MAX_JOB_ID}>.json"))?;
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read it: {e}"))?;
    let view: JobView =
        serde_json::from_slice(&bytes).map_err(|e| format!("not a job record: {e}"))?;
    if view.id != id {
        return Err(format!("it records job id {}, its name says {id}", view.id));
    }
    if view.percent > 100 {
        return Err(format!("percent {} is above 100", view.percent));
    }
    crate::store::parse_item_hex(&view.item).map_err(|e| format!("{e:#}"))?;
    Ok(view)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_persist_their_state_and_ids_keep_growing() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = Jobs::open(dir.path()).unwrap();
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
        let reopened = Jobs::open(dir.path()).unwrap();
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

    const ITEM_A: &str = "000102030405060708090a0b0c0d0e0f";
    const ITEM_B: &str = "f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff";

    #[test]
    fn a_job_owns_its_target_directory_until_it_ends() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = Jobs::open(dir.path()).unwrap();
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
    fn a_garbage_job_file_is_skipped_not_fatal_and_its_id_is_not_reused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("7.json"), b"{not json").unwrap();
        let jobs = Jobs::open(dir.path()).unwrap();
        assert!(jobs.list().is_empty());
        assert_eq!(jobs.damaged().len(), 1);
        assert!(jobs.damaged()[0].reason.contains("not a job record"));
        assert_eq!(jobs.create(JobKind::Resync, ITEM_A, "").unwrap().id(), 8);
    }

    /// A job file whose id is the largest u64 made the next id wrap to 0 (and a debug build
    /// panic): ids read from disk are checked, and creating past the largest id is refused.
    #[test]
    fn job_ids_from_disk_are_checked_and_never_wrap() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = Jobs::open(dir.path()).unwrap();
        let job = jobs.create(JobKind::Failover, ITEM_A, "x").unwrap();
        drop(jobs);
        let good = std::fs::read_to_string(dir.path().join("1.json")).unwrap();
        let max = u64::MAX.to_string();
        std::fs::write(
            dir.path().join(format!("{max}.json")),
            good.replace("\"id\": 1,", &format!("\"id\": {max},")),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("5.json"),
            good.replace("\"id\": 1,", "\"id\": 6,"),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("0.json"),
            good.replace("\"id\": 1,", "\"id\": 0,"),
        )
        .unwrap();
        let jobs = Jobs::open(dir.path()).unwrap();
        let reasons: Vec<&str> = jobs.damaged().iter().map(|d| d.reason.as_str()).collect();
        assert_eq!(reasons.len(), 3, "{reasons:?}");
        assert!(
            reasons.iter().any(|r| r.contains("records job id 6")),
            "{reasons:?}"
        );
        assert_eq!(jobs.list().len(), 1);
        assert_eq!(jobs.list()[0].id, job.id());
        assert_eq!(jobs.create(JobKind::Resync, ITEM_A, "").unwrap().id(), 6);

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(format!("{MAX_JOB_ID}.json")),
            good.replace("\"id\": 1,", &format!("\"id\": {MAX_JOB_ID},")),
        )
        .unwrap();
        let jobs = Jobs::open(dir.path()).unwrap();
        assert!(jobs.damaged().is_empty());
        let refused = jobs.create(JobKind::Resync, ITEM_A, "").unwrap_err();
        assert!(format!("{refused}").contains("used up"), "{refused}");
    }

    /// A job shows as ended only once its end is durable.
    #[test]
    fn a_job_counts_as_running_until_its_end_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = Jobs::open(dir.path()).unwrap();
        let job = jobs.create(JobKind::Failover, ITEM_A, "x").unwrap();
        // The write of the end fails (its directory is gone): the job still ends in memory.
        std::fs::remove_dir_all(dir.path()).unwrap();
        assert!(job.fail("boom").is_err());
        assert_eq!(job.view().state, JobState::Failed);
        assert_eq!(jobs.running_work(), 0);
    }
}
