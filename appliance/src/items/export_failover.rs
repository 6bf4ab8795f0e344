//! Failover in export mode, and the promotion of a test failover's drill to it: the VM runs on
//! the export at once while a job copies the point and the overlay's writes into the target
//! files, then the export serves those files without interrupting its clients.
//!
//! ```text
//!  request (ops)   target dir + temporary files, job, Start(Failover | TestFailoverPromote)
//!                  -> failing_over
//!  job             stop replication; the export (new, or the drill's); Done(Failover)
//!                  -> failed_over: the VM may run on the export now (copy: copying)
//!                  copy every disk (ExportDisk::copy_to_target: client writes during the copy
//!                  reach the overlay and the target), publish the files, switch the export
//!                  to them (copy: done; commit allowed); remove the overlays
//! ```

use std::sync::Arc;

use anyhow::{Context, anyhow};
use engine::error::report;
use engine::materialize::PointChoice;

use crate::exports::{ExportRecord, Live};
use crate::jobs::{Job, JobKind, JobView};
use crate::store::parse_item_hex;
use crate::target::{Target, disk_names};

use super::error::OpError;
use super::exports::check_export_mode_request;
use super::item::{Item, lock};
use super::manager::Manager;
use super::materialize::{planned, undo_pending};
use super::model::{CopyState, ExportMode, ExportPurpose, Format, Materialized, PromoteRequest};
use super::state::{Event, Op};

/// Where the disks come from.
#[derive(Debug, Clone, Copy)]
pub(super) enum Source {
    /// A new export at the chosen point.
    Point(PointChoice),
    /// The test failover's drill (promote): its export, point and writes.
    Drill,
}

impl Manager {
    /// Failover (`mode: export`) or promote: the request's synchronous step.
    pub(super) fn failover_export(
        self: &Arc<Self>,
        item: Arc<Item>,
        source: Source,
        target_dir: &str,
        source_shut_down: bool,
    ) -> Result<JobView, OpError> {
        let record = item.record().clone();
        check_export_mode_request(None, Format::Raw)?;
        self.check_job_room()?;
        let (op, drill) = match source {
            Source::Point(choice) => {
                if choice != PointChoice::Latest {
                    self.resolve(&item, choice)?;
                }
                (Op::Failover, None)
            }
            Source::Drill => {
                let test = record.test_failover.clone();
                let id = test
                    .as_ref()
                    .and_then(|t| t.export_id.clone())
                    .ok_or_else(|| OpError::Conflict {
                        code: "wrong_state",
                        message: format!(
                            "item {}'s test failover copied its disks (copy mode): only a drill \
                             served over NBD (export mode) can be promoted",
                            item.hex
                        ),
                    })?;
                let (_, live) = self.find_export(&id)?;
                (Op::TestFailoverPromote, Some(live))
            }
        };
        let target = self.target_dir(target_dir, &record.disks, Format::Raw)?;
        let names = disk_names(record.disks.iter().map(|d| d.index), "raw");
        let pending = planned(&target, &names, 0, Format::Raw);
        let job = self.start_target_job(
            &item,
            &target,
            JobKind::Failover,
            "stopping replication".to_owned(),
            Event::Start(op),
            pending,
        )?;
        self.spawn_job(
            item,
            job,
            move |manager, item, job| {
                let result = manager.run_export_failover(
                    item,
                    job,
                    source,
                    drill,
                    &target,
                    &names,
                    source_shut_down,
                );
                if result.is_err() && item.record().state != super::model::ItemState::FailedOver {
                    target.discard(&names);
                }
                result
            },
            move |manager, item, error| manager.undo_export_failover(item, op, error),
        )
    }

    /// The job: stop replication, serve the export, hand the item over, copy, switch.
    #[allow(clippy::too_many_arguments)]
    fn run_export_failover(
        &self,
        item: &Arc<Item>,
        job: &Job,
        source: Source,
        drill: Option<Arc<Live>>,
        target: &Target,
        names: &[String],
        source_shut_down: bool,
    ) -> anyhow::Result<Option<String>> {
        let latest = matches!(source, Source::Point(PointChoice::Latest));
        self.stop_replication(item, latest)?;
        job.progress(2, "serving the disks over NBD");
        let live = {
            let _ops = lock(&self.ops);
            let live = match (source, drill) {
                (Source::Point(choice), _) => {
                    let choice = match choice {
                        PointChoice::Latest => PointChoice::LatestProcessed,
                        other => other,
                    };
                    let point_id = self
                        .resolve(item, choice)
                        .map_err(|e| anyhow!("{}", report(&e)))?;
                    self.make_export(item, ExportPurpose::Failover, ExportMode::Drill, point_id)
                        .map_err(|e| anyhow!("{e}"))?
                }
                (Source::Drill, Some(live)) => live,
                (Source::Drill, None) => anyhow::bail!("promote without the drill's export"),
            };
            let (point_id, id) = {
                let mut record = live.record();
                record.purpose = ExportPurpose::Failover;
                record.copy = Some(CopyState::Copying);
                (record.point_id, record.id.clone())
            };
            self.store_export(&live)?;
            item.transition(Event::Done(Op::Failover), |r| {
                r.failover = r.pending.take().map(|pending| Materialized {
                    point_id,
                    export_id: Some(id.clone()),
                    copy: Some(CopyState::Copying),
                    ..pending
                });
                r.test_failover = None;
            })?;
            live
        };
        let point_id = live.record().point_id;
        let total: u64 = live
            .disks
            .iter()
            .map(|d| d.size_bytes_now())
            .sum::<u64>()
            .max(1);
        let mut done_before = 0u64;
        let mut overlays = Vec::new();
        for ((index, disk), temp) in live.disks.iter().enumerate().zip(&target.temps) {
            let file = temp.file.try_clone().context("opening the target file")?;
            let size = disk.size_bytes_now();
            let overlay = disk
                .disk()
                .copy_to_target(Arc::new(file), &mut |done| {
                    crate::testhook::pause_point("export-failover:copied-chunk");
                    job.progress(
                        5 + (done_before + done) * 90 / total,
                        format!("copying disk {index} (point {point_id} and the VM's writes)"),
                    );
                })
                .map_err(|e| anyhow!("copying disk {index}: {}", report(&e)))?;
            overlays.push(overlay);
            done_before += size;
        }
        let published = target.publish_new(names)?;
        let _ops = lock(&self.ops);
        let dir = target.dir.path();
        {
            let mut record = live.record();
            record.copy = Some(CopyState::Done);
            record.targets = names
                .iter()
                .map(|n| dir.join(n).display().to_string())
                .collect();
        }
        self.store_export(&live)?;
        item.update(|r| {
            if let Some(failover) = &mut r.failover {
                failover.written = published;
                failover.copy = Some(CopyState::Done);
            }
        })?;
        drop(overlays);
        super::exports::remove_overlays(item, &live.record().id);
        Ok(Some(format!(
            "failed over to point {point_id} in export mode; the disks were copied into {} \
             and the export serves them now{}",
            dir.display(),
            if source_shut_down {
                ""
            } else {
                " (the source was not declared shut down: writes it made after the last \
                 acknowledged frame are not in this point)"
            }
        )))
    }

    /// Undo of a failed export-mode failover: before the hand-over, as a failed failover
    /// (back to protected, or to the test failover for a promote); after it, the item stays
    /// failed over on the export, and the copy is marked failed (commit stays refused).
    fn undo_export_failover(&self, item: &Arc<Item>, op: Op, error: &str) {
        if item.record().state == super::model::ItemState::FailedOver {
            let export = item
                .record()
                .failover
                .as_ref()
                .and_then(|f| f.export_id.clone());
            if let Some(Ok((_, live))) = export.map(|id| self.find_export(&id)) {
                live.record().copy = Some(CopyState::Failed);
                if let Err(e) = self.store_export(&live) {
                    tracing::error!(error = %crate::store::describe(&e), "recording a failed copy");
                }
            }
            if let Err(e) = item.update(|r| {
                if let Some(failover) = &mut r.failover {
                    failover.copy = Some(CopyState::Failed);
                }
                r.last_error = Some(error.to_owned());
            }) {
                tracing::error!(error = %crate::store::describe(&e), "recording a failed copy");
            }
            return;
        }
        undo_pending(item, op, error);
        if item.repl().is_none()
            && let Err(e) = self.start_replication(item)
        {
            tracing::error!(item = %item.hex, error = %crate::store::describe(&e),
                "replication did not restart after a failed failover");
        }
    }

    /// `POST /v1/items/{id}/test-failover/promote`: the test failover's drill becomes the
    /// failover, keeping its writes (its export and overlay are the failover's from then on; no
    /// second copy of anything).
    pub fn promote(
        self: &Arc<Self>,
        hex: &str,
        request: PromoteRequest,
    ) -> Result<JobView, OpError> {
        let _ops = lock(&self.ops);
        let item = self.find(hex)?;
        self.check_allowed(&item, Op::TestFailoverPromote)?;
        self.failover_export(
            item,
            Source::Drill,
            &request.target_dir,
            request.source_shut_down,
        )
    }

    /// Writes `live`'s record to the control store.
    pub(super) fn store_export(&self, live: &Live) -> anyhow::Result<()> {
        let record: ExportRecord = live.record().clone();
        let id = parse_item_hex(&record.id)?;
        self.control
            .commit("recording an export", |c| c.put_export(&id, &record))?;
        Ok(())
    }
}
