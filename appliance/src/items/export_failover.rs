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
//!                  reach the overlay and the target file); under ops: publish the files,
//!                  record copy: done and the files (durably), then switch the disks to them
//!                  (commit allowed); remove the overlays
//!  change point    (before the VM's first write) holds the copy, rebases, copies again
//!  restart         a cut copy starts again in a new job (the partial files made anew)
//! ```

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow};
use engine::dirfd::Dir;
use engine::error::report;
use engine::export::ExportError;
use engine::materialize::PointChoice;

use crate::exports::{ExportRecord, Live};
use crate::jobs::{Job, JobKind, JobView};
use crate::store::parse_item_hex;
use crate::target::{Target, disk_names, file_identity, remove_recorded};

use super::error::OpError;
use super::item::{Item, lock};
use super::manager::Manager;
use super::materialize::{planned, undo_pending};
use super::model::{
    CopyState, ExportMode, ExportPurpose, Format, ItemState, Materialized, PromoteRequest,
};
use super::state::{Event, Op};

/// How long a change point waits for the failover's copy to pause.
const COPY_HOLD_WAIT: Duration = Duration::from_secs(30);

/// Copies every disk of `live` not yet copied into the job's temporary files (each then
/// mirrors client writes into its file until the switch). A change point cancels the running
/// disk's copy (and undoes finished ones) and holds the job at the gate; then the copy starts
/// again from the first disk.
fn copy_disks(live: &Live, target: &Target, job: &Job) -> anyhow::Result<()> {
    let total: u64 = live
        .disks
        .iter()
        .map(|d| d.size_bytes_now())
        .sum::<u64>()
        .max(1);
    'copy: loop {
        let point_id = live.record().point_id;
        let mut done_before = 0u64;
        for ((index, disk), temp) in live.disks.iter().enumerate().zip(&target.temps) {
            let size = disk.size_bytes_now();
            if disk.disk().is_copied() || disk.disk().is_switched() {
                done_before += size;
                continue;
            }
            if live.copy_gate.is_held() {
                live.copy_gate.park();
                continue 'copy;
            }
            let file = temp.file.try_clone().context("opening the target file")?;
            let copied = disk.disk().copy_to_target(Arc::new(file), &mut |done| {
                crate::testhook::pause_point("export-failover:copied-chunk");
                job.progress(
                    5 + (done_before + done) * 90 / total,
                    format!("copying disk {index} (point {point_id} and the VM's writes)"),
                );
            });
            match copied {
                Ok(()) => {}
                Err(ExportError::Cancelled) => {
                    live.copy_gate.park();
                    continue 'copy;
                }
                Err(e) => anyhow::bail!("copying disk {index}: {}", report(&e)),
            }
            done_before += size;
        }
        return Ok(());
    }
}

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
                if result.is_err() && item.record().state != ItemState::FailedOver {
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
        let copied = self.finish_export_copy(item, job, &live, target, names)?;
        Ok(Some(format!(
            "{copied}{}",
            if source_shut_down {
                ""
            } else {
                " (the source was not declared shut down: writes it made after the last \
                 acknowledged frame are not in this point)"
            }
        )))
    }

    /// The copy of a failover in export mode, to its end: every disk copied (mirroring
    /// writes into its file), then under `ops` the files published and the switch recorded
    /// durably, and only then the disks switched to their files: a crash at any point finds
    /// every acknowledged write where the records say the disk is. The overlays go last.
    fn finish_export_copy(
        &self,
        item: &Arc<Item>,
        job: &Job,
        live: &Live,
        target: &Target,
        names: &[String],
    ) -> anyhow::Result<String> {
        let _ops = loop {
            copy_disks(live, target, job)?;
            let ops = lock(&self.ops);
            // A change point may have moved the disks between the copy and `ops`.
            if live.disks.iter().all(|d| d.disk().is_copied()) {
                break ops;
            }
        };
        let point_id = live.record().point_id;
        let published = target.publish_new(names)?;
        let dir = target.dir.path();
        {
            let mut record = live.record();
            record.copy = Some(CopyState::Done);
            record.targets = names
                .iter()
                .map(|n| dir.join(n).display().to_string())
                .collect();
        }
        self.store_export(live)?;
        item.update(|r| {
            if let Some(failover) = &mut r.failover {
                failover.written = published;
                failover.copy = Some(CopyState::Done);
            }
        })?;
        let mut overlays = Vec::new();
        for (index, disk) in live.disks.iter().enumerate() {
            let overlay = disk
                .disk()
                .switch_to_target()
                .map_err(|e| anyhow!("switching disk {index} to its file: {}", report(&e)))?;
            overlays.push(overlay);
        }
        drop(overlays);
        super::exports::remove_overlays(item, &live.record().id);
        Ok(format!(
            "failed over to point {point_id} in export mode; the disks were copied into {} \
             and the export serves them now",
            dir.display()
        ))
    }

    /// Start-up: a failover in export mode whose copy a restart cut copies again (a new job:
    /// the partial files it recorded are removed, by identity, and made anew). One that cannot
    /// is marked failed, with the reason.
    pub(super) fn resume_export_copies(self: &Arc<Self>) {
        for item in self.all_items() {
            let record = item.record().clone();
            let Some(failover) = record.failover.clone() else {
                continue;
            };
            if record.state != ItemState::FailedOver || failover.copy != Some(CopyState::Copying) {
                continue;
            }
            let Some(export_id) = failover.export_id.clone() else {
                continue;
            };
            if let Err(e) = self.resume_export_copy(&item, &failover, &export_id) {
                let error = format!(
                    "the failover's copy was cut by a restart and could not start again: {}",
                    crate::store::describe(&e)
                );
                tracing::error!(item = %item.hex, %error);
                let _ops = lock(&self.ops);
                self.undo_export_failover(&item, Op::Failover, &error);
            }
        }
    }

    fn resume_export_copy(
        self: &Arc<Self>,
        item: &Arc<Item>,
        failover: &Materialized,
        export_id: &str,
    ) -> anyhow::Result<()> {
        let (_, live) = self
            .find_export(export_id)
            .map_err(|e| anyhow!("export {export_id}: {e}"))?;
        let record = item.record().clone();
        let names = disk_names(record.disks.iter().map(|d| d.index), "raw");
        // The partial files, also where a publish before the crash renamed them.
        let left = remove_recorded(
            &failover.target_dir,
            failover.target_dir_id,
            &failover.written,
            &names,
            false,
        );
        if !left.is_empty() {
            anyhow::bail!("{}", left.join("; "));
        }
        let (dir, _) = Dir::open_nofollow(Path::new(&failover.target_dir), false)
            .map_err(|e| anyhow!("{}", report(&e)))?;
        if Some(file_identity(dir.id())) != failover.target_dir_id {
            anyhow::bail!(
                "{} is no longer the directory the failover chose",
                failover.target_dir
            );
        }
        let target = Target::create_temps(Arc::new(dir), failover.created_dir, &names)
            .map_err(|e| anyhow!("{}", report(&e)))?;
        let job = self.jobs.create(
            JobKind::Failover,
            &item.hex,
            "copying the failover's disks again (a restart cut the copy)",
        )?;
        job.hold_target_dir(target.dir.id().dev, target.dir.id().ino);
        let written = target.written();
        item.update(|r| {
            r.last_job = Some(job.id());
            if let Some(failover) = &mut r.failover {
                failover.written = written;
            }
        })?;
        self.spawn_job(
            item.clone(),
            job,
            move |manager, item, job| {
                let copied = manager.finish_export_copy(item, job, &live, &target, &names);
                if copied.is_err() {
                    target.discard(&names);
                }
                Ok(Some(copied?))
            },
            |manager, item, error| manager.undo_export_failover(item, Op::Failover, error),
        )
        .map_err(|e| anyhow!("{e}"))?;
        Ok(())
    }

    /// Undo of a failed export-mode failover: before the hand-over, as a failed failover
    /// (back to protected, or to the test failover for a promote); after it, the item stays
    /// failed over on the export, and the copy is marked failed (commit stays refused).
    fn undo_export_failover(&self, item: &Arc<Item>, op: Op, error: &str) {
        match item.record().state {
            ItemState::FailedOver => {}
            ItemState::FailingOver => {
                undo_pending(item, op, error);
                if item.repl().is_none()
                    && let Err(e) = self.start_replication(item)
                {
                    tracing::error!(item = %item.hex, error = %crate::store::describe(&e),
                        "replication did not restart after a failed failover");
                }
                return;
            }
            // Disabled meanwhile (its exports closed, which ended the copy): nothing to undo.
            _ => return,
        }
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

    /// Change point of a failover in export mode: allowed while the VM has written nothing to
    /// the export; the copy (if running) is held, the disks move to the new point, and the copy
    /// starts again. Refused, naming why, after the VM's first write or once a disk's copy is
    /// done (it serves its target file then).
    pub(super) fn change_point_export(
        &self,
        item: &Arc<Item>,
        export_id: &str,
        choice: PointChoice,
    ) -> Result<JobView, OpError> {
        let (_, live) = self.find_export(export_id)?;
        let refuse_written = || {
            let written: u64 = live.disks.iter().map(|d| d.written_bytes()).sum();
            OpError::Conflict {
                code: "written_since_failover",
                message: format!(
                    "item {}: the VM wrote to its disks since the failover (export {export_id}, \
                     {written} bytes since the appliance started); another point would lose \
                     those writes, so change point is refused: it is allowed only before the \
                     VM's first write",
                    item.hex
                ),
            }
        };
        if live.disks.iter().any(|d| d.disk().has_writes()) {
            return Err(refuse_written());
        }
        let point_id = self.resolve(item, choice)?;
        let old_point = live.record().point_id;
        // The new views first: pinned, and nothing changes if one cannot be opened.
        let views = (0..live.disks.len())
            .map(|index| self.open_view(item, index, point_id))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let quiet = live.copy_gate.hold(&live.disks, COPY_HOLD_WAIT);
        let moved = (|| {
            if !quiet {
                return Err(OpError::Conflict {
                    code: "copy_busy",
                    message: format!(
                        "item {}: the failover's copy did not pause within {} s; retry",
                        item.hex,
                        COPY_HOLD_WAIT.as_secs()
                    ),
                });
            }
            if let Some(index) = live.disks.iter().position(|d| d.disk().is_switched()) {
                return Err(OpError::Conflict {
                    code: "copy_done",
                    message: format!(
                        "item {}: disk {index} is already copied into its target file and the \
                         export serves that file; change point in export mode is allowed while \
                         the copy runs and the VM has not written",
                        item.hex
                    ),
                });
            }
            for (index, (disk, view)) in live.disks.iter().zip(views).enumerate() {
                if let Err(e) = disk.disk().rebase(view) {
                    self.rebase_back(item, &live, index, old_point);
                    return Err(match e {
                        ExportError::HasWrites { .. } => refuse_written(),
                        other => OpError::Io(report(&other)),
                    });
                }
            }
            live.record().point_id = point_id;
            self.store_export(&live)?;
            item.update(|r| {
                if let Some(failover) = &mut r.failover {
                    failover.point_id = point_id;
                }
                r.last_error = None;
            })?;
            Ok(())
        })();
        live.copy_gate.release();
        moved?;
        let job = self.jobs.create(
            JobKind::ChangePoint,
            &item.hex,
            format!("moving the export to point {point_id}"),
        )?;
        job.succeed(format!(
            "the failover's disks are point {point_id} now (export {export_id}); the copy into \
             the target files started again"
        ))?;
        Ok(job.view())
    }

    /// Undo of a change point that moved disks `..count` and failed on the next: moves them
    /// back to `point_id` (logged if that fails too).
    fn rebase_back(&self, item: &Item, live: &Live, count: usize, point_id: u64) {
        for (index, disk) in live.disks.iter().enumerate().take(count) {
            let back = self
                .open_view(item, index, point_id)
                .and_then(|view| Ok(disk.disk().rebase(view)?));
            if let Err(e) = back {
                tracing::error!(item = %item.hex, disk = index, point_id,
                    error = %crate::store::describe(&e),
                    "a change point failed half way and a disk could not move back");
            }
        }
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
