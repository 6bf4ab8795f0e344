//! Jobs: the long operations of the control API (initial replication, test failover,
//! failover, change point, failback, resync), with progress, persisted in the control store.
//!
//! Invariants:
//! - a job's id is unique for the data directory's life: the next id is one more than the
//!   highest id found at start, among readable *and* damaged jobs, and ids never wrap (a
//!   create beyond [`MAX_JOB_ID`] is refused);
//! - a stored job (table `jobs` of [`crate::db`], key its id) is loaded only if its key is in
//!   1..=[`MAX_JOB_ID`] and its content is a job with that id, a valid item id and a percent of
//!   at most 100; any other row is reported ([`Jobs::damaged`]) and left in place for the
//!   operator, and the rest of the table loads;
//! - a job counts as running (for [`Jobs::running_work`], which a graceful stop waits on)
//!   until its final state is durable: the end is decided in memory, written, and only then
//!   shown as ended;
//! - every change of a job's *state* (created, succeeded, failed) is committed before the call
//!   returns, so after a crash a job is found in the last state it was reported in; a job made
//!   by a lifecycle step is [`Jobs::prepare`]d and committed in that step's transaction
//!   ([`PendingJob::put`]), then [`Jobs::publish`]ed; percent and message changes are in
//!   memory only (they are re-derived after a restart);
//! - at most [`MAX_KEPT_JOBS`] finished jobs are kept; older ones are deleted, oldest first.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use crate::db::{Commit, ControlStore, DbError};

/// Finished jobs kept (in memory and on disk).
pub const MAX_KEPT_JOBS: usize = 1000;
/// The largest job id (2^53 - 1: every id is exact in a JSON number).
pub const MAX_JOB_ID: u64 = (1 << 53) - 1;

/// A stored job that could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DamagedJob {
    /// Its key in the store.
    pub id: u64,
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
            ended.finished_ns = Some(engine::clock::now_unix_ns());
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
    store: Arc<ControlStore>,
    jobs: Mutex<BTreeMap<u64, Arc<Job>>>,
    /// The next id (taken by `Jobs::create` with one atomic update: never given twice).
    next_id: AtomicU64,
    /// Stored jobs that could not be loaded at open.
    damaged: Vec<DamagedJob>,
}

impl Inner {
    fn persist(&self, view: &JobView) -> anyhow::Result<()> {
        self.store
            .commit("recording a job", |commit| commit.put_job(view.id, view))?;
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, Arc<Job>>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Deletes the oldest finished jobs beyond [`MAX_KEPT_JOBS`]: out of the table under its
    /// lock, then from the store without it (an id is never reused, so no new job can be hit).
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
        if dropped.is_empty() {
            return;
        }
        if let Err(error) = self
            .store
            .commit("deleting old jobs", |commit| commit.remove_jobs(&dropped))
        {
            tracing::warn!(%error, jobs = dropped.len(), "could not delete old jobs");
        }
    }
}

/// The job table.
#[derive(Debug, Clone)]
pub struct Jobs(Arc<Inner>);

impl Jobs {
    /// Loads the jobs of `store`. A stored job that cannot be loaded is reported (see
    /// [`Jobs::damaged`]) and skipped; its id is never given to a new job.
    pub fn open(store: Arc<ControlStore>) -> anyhow::Result<Self> {
        let mut views = Vec::new();
        let mut damaged = Vec::new();
        let mut highest = 0u64;
        for (id, bytes) in store.jobs()? {
            if id <= MAX_JOB_ID {
                highest = highest.max(id);
            }
            match load_job(id, &bytes) {
                Ok(view) => views.push(view),
                Err(reason) => {
                    tracing::error!(job = id, %reason,
                        "damaged job: skipped (left in the store; its id is not reused)");
                    damaged.push(DamagedJob { id, reason });
                }
            }
        }
        let inner = Arc::new(Inner {
            store,
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

    /// The stored jobs that could not be loaded at open.
    pub fn damaged(&self) -> &[DamagedJob] {
        &self.0.damaged
    }

    /// Creates a running job (durably, in a transaction of its own).
    pub fn create(
        &self,
        kind: JobKind,
        item: &str,
        message: impl Into<String>,
    ) -> anyhow::Result<Arc<Job>> {
        let pending = self.prepare(kind, item, message)?;
        self.0.persist(&pending.view)?;
        Ok(self.publish(pending))
    }

    /// A new running job with its id taken, not yet stored or listed: [`PendingJob::put`] it
    /// into a lifecycle step's transaction, then [`Jobs::publish`] it once that committed. A
    /// job never published leaves a gap in the ids, never a reused one.
    pub fn prepare(
        &self,
        kind: JobKind,
        item: &str,
        message: impl Into<String>,
    ) -> anyhow::Result<PendingJob> {
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
        Ok(PendingJob {
            view: JobView {
                id,
                kind,
                item: item.to_owned(),
                state: JobState::Running,
                percent: 0,
                message: message.into(),
                error: None,
                created_ns: engine::clock::now_unix_ns(),
                finished_ns: None,
            },
        })
    }

    /// Lists a prepared job whose transaction committed.
    pub fn publish(&self, pending: PendingJob) -> Arc<Job> {
        let id = pending.view.id;
        let job = Arc::new(Job {
            view: Mutex::new(pending.view),
            finishing: AtomicBool::new(false),
            table: self.0.clone(),
            target_dir: OnceLock::new(),
        });
        self.0.lock().insert(id, job.clone());
        job
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

/// A job taken by [`Jobs::prepare`], to be committed with a lifecycle step.
#[derive(Debug)]
#[must_use = "a prepared job is stored by `put` and listed by `Jobs::publish`"]
pub struct PendingJob {
    view: JobView,
}

impl PendingJob {
    /// Its id.
    pub fn id(&self) -> u64 {
        self.view.id
    }

    /// Adds the job to `commit`.
    pub fn put(&self, commit: &mut Commit<'_>) -> Result<(), DbError> {
        commit.put_job(self.view.id, &self.view)
    }
}

/// Checks one stored job; `id` is its key.
fn load_job(id: u64, bytes: &[u8]) -> Result<JobView, String> {
    if !(1..=MAX_JOB_ID).contains(&id) {
        return Err(format!("its key {id} is not a job id 1..={MAX_JOB_ID}"));
    }
    let view: JobView =
        serde_json::from_slice(bytes).map_err(|e| format!("not a job record: {e}"))?;
    if view.id != id {
        return Err(format!("it records job id {}, its key says {id}", view.id));
    }
    if view.percent > 100 {
        return Err(format!("percent {} is above 100", view.percent));
    }
    crate::store::parse_item_hex(&view.item).map_err(|e| format!("{e:#}"))?;
    Ok(view)
}

#[cfg(test)]
mod tests;
