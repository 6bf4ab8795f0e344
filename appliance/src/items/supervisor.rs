//! The running manager: start (replication, the supervisor thread), the tick ending syncs, stop.

/// Longest a graceful shutdown waits for running jobs that write files.
const JOB_STOP_WAIT: Duration = Duration::from_secs(120);
/// The supervisor's period.
const TICK: Duration = Duration::from_millis(100);

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use engine::meta::item_key;

use crate::dataport::PortHandle;

use super::item::lock;
use super::manager::Manager;
use super::state::{Event, replicating, sync_job_kind};

impl Manager {
    /// Starts replication of every replicating item and the supervisor thread. An item whose
    /// replication cannot start keeps the reason in `last_error`; the others start.
    pub fn start(self: &Arc<Self>, port: PortHandle) -> anyhow::Result<()> {
        let _ = self.port.set(port);
        for item in self.all_items() {
            if replicating(item.record().state)
                && let Err(error) = self.start_replication(&item)
            {
                let message = crate::store::describe(&error);
                tracing::error!(item = %item.hex, error = %message, "cannot start replication");
                if let Err(e) = item.update(|r| r.last_error = Some(message.clone())) {
                    tracing::error!(item = %item.hex, error = %crate::store::describe(&e),
                        "recording why replication did not start");
                }
            }
        }
        self.resume_export_copies();
        let manager = Arc::downgrade(self);
        let handle = std::thread::Builder::new()
            .name("supervisor".into())
            .spawn(move || {
                while let Some(manager) = manager.upgrade() {
                    if manager.stopping.load(Ordering::Acquire) {
                        break;
                    }
                    manager.tick();
                    drop(manager);
                    std::thread::sleep(TICK);
                }
            })
            .context("starting the supervisor thread")?;
        *lock(&self.supervisor) = Some(handle);
        Ok(())
    }

    /// Stops the supervisor and every item's replication (applying what is staged, flushing).
    /// Returns the items that could not be stopped cleanly.
    pub fn shutdown(&self) -> Vec<String> {
        self.stopping.store(true, Ordering::Release);
        // Bound first: in `if let` the guard would be held across the join.
        let supervisor = lock(&self.supervisor).take();
        if let Some(handle) = supervisor {
            let _ = handle.join();
        }
        // Let jobs that write files finish (bounded): a restart would undo their work.
        let deadline = Instant::now() + JOB_STOP_WAIT;
        while self.jobs.running_work() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut failures = Vec::new();
        for item in self.all_items() {
            let Some(repl) = item.repl().take() else {
                continue;
            };
            let failed = repl.worker.failed();
            let target = repl.reader.durable_seq();
            match repl.worker.drain_and_stop(target, false) {
                Ok(drained) => {
                    tracing::info!(item = %item.hex, applied_seq = drained.applied_seq, "stopped")
                }
                Err(_) if failed => failures.push(format!(
                    "item {}: apply had stopped on an error (logged above)",
                    item.hex
                )),
                Err(e) => {
                    failures.push(format!("item {}: {}", item.hex, crate::store::describe(&e)))
                }
            }
        }
        failures
    }

    /// One supervisor pass: an item whose sync reached its first point becomes protected and its
    /// job ends; the others' jobs get their progress.
    pub(super) fn tick(&self) {
        for item in self.all_items() {
            let record = item.record().clone();
            let Some(kind) = sync_job_kind(record.state) else {
                continue;
            };
            let Some(job) = record.last_job.and_then(|id| self.jobs.get(id)) else {
                continue;
            };
            if job.view().kind != kind {
                continue;
            }
            let newest = match self.meta.latest_point(item_key(&item.id)) {
                Ok(point) => point.map(|p| p.point_id),
                Err(error) => {
                    tracing::warn!(item = %item.hex, error = %engine::error::report(&error), "reading points");
                    continue;
                }
            };
            match newest {
                Some(point) if point >= record.sync_from_seq => {
                    let _ops = lock(&self.ops);
                    if item.record().state != record.state {
                        continue;
                    }
                    if let Err(error) = item.transition(Event::Synchronized, |_| {}) {
                        // Retried every tick: say it once, not ten times a second.
                        let error = crate::store::describe(&error);
                        let mut last = lock(&item.tick_error);
                        if last.as_deref() != Some(error.as_str()) {
                            tracing::error!(item = %item.hex, %error,
                                "recording protected (retried until it works)");
                            *last = Some(error);
                        }
                        continue;
                    }
                    *lock(&item.tick_error) = None;
                    let _ = job.succeed(format!(
                        "synchronized; first recovery point {point} applied; protected"
                    ));
                    tracing::info!(item = %item.hex, point, "protected");
                }
                _ => {
                    let percent = self.sync_percent(&item, &record);
                    if record.sync_from_seq != u64::MAX {
                        job.progress(
                            u64::from(percent),
                            "receiving and applying; protected at the first recovery point",
                        );
                    }
                }
            }
        }
    }
}
