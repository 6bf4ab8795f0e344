//! Resync on demand: pause, apply what is staged, require the agent's delta resync.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::anyhow;

use crate::jobs::{Job, JobKind, JobView};

use super::error::OpError;
use super::item::{Item, lock};
use super::manager::Manager;
use super::state::{Event, Op};

impl Manager {
    /// Resync on demand: pause, apply what is staged, mark the log as needing a resync; the
    /// agent then runs the hash exchange and the job ends at the first point after it.
    pub fn resync(self: &Arc<Self>, hex: &str) -> Result<JobView, OpError> {
        let _ops = lock(&self.ops);
        let item = self.find(hex)?;
        self.check_allowed(&item, Op::Resync)?;
        let job = self
            .jobs
            .create(JobKind::Resync, hex, "pausing replication")?;
        item.pausing.store(true, Ordering::Release);
        item.transition(Event::Start(Op::Resync), |r| {
            r.sync_from_seq = u64::MAX;
            r.last_job = Some(job.id());
            r.last_error = None;
        })?;
        self.spawn_job(
            item,
            job,
            move |manager, item, job| {
                manager.end_sessions(item)?;
                manager.discard_unappliable(item, job)?;
                job.progress(2, "applying what is staged");
                manager.wait_caught_up(item)?;
                // The log's handle out of `repl`, whose guard is dropped before the marker's
                // write + fsync (views take `repl`). The log's own mutex covers that I/O: it
                // is the log's only writer, and the item's sessions have ended.
                let log = item
                    .repl()
                    .as_ref()
                    .map(|repl| repl.log.clone())
                    .ok_or_else(|| anyhow!("the item is not replicating"))?;
                let next_seq = {
                    let mut log = lock(&log);
                    crate::testhook::pause_point("resync:marker");
                    log.require_resync("the operator asked for a delta resync")?;
                    log.next_seq()
                };
                item.update(|r| r.sync_from_seq = next_seq)?;
                item.pausing.store(false, Ordering::Release);
                job.progress(
                    5,
                    "waiting for the agent's delta resync (hash exchange, differing chunks, \
                     bookmark)",
                );
                // The supervisor ends the job at the first point after `next_seq`.
                Ok(None)
            },
            |_, item, error| {
                item.pausing.store(false, Ordering::Release);
                let _ = item.transition(Event::Failed(Op::Resync), |r| {
                    r.sync_from_seq = 1;
                    r.last_error = Some(error.to_owned());
                });
            },
        )
    }

    /// For a resync of an `apply_failed` item: makes the delta resync required (durably,
    /// first: the replicas will miss the discarded frames), then has the worker discard the
    /// staged frames after its watermark and resume. Nothing to do for a healthy item.
    pub(super) fn discard_unappliable(&self, item: &Item, job: &Job) -> anyhow::Result<()> {
        let Some((failure, frame)) = item.status().and_then(|s| s.apply_failure()) else {
            return Ok(());
        };
        job.progress(
            2,
            format!(
                "discarding the staged frames after seq {} ({frame})",
                failure.applied_seq
            ),
        );
        let (log, status) = {
            let repl = item.repl();
            let repl = repl
                .as_ref()
                .ok_or_else(|| anyhow!("the item is not replicating"))?;
            (repl.log.clone(), repl.worker.status())
        };
        lock(&log).require_resync(&format!(
            "apply_failed: {frame}; the operator asked for a delta resync"
        ))?;
        let through = status.discard_unapplied()?;
        tracing::warn!(item = %item.hex, %frame, through_seq = through,
            "staged frames discarded for the operator's resync");
        Ok(())
    }
}
