//! Change point: the failed-over disks rewritten at another recovery point.

use engine::error::report;
use std::sync::Arc;

use anyhow::anyhow;

use crate::jobs::{JobKind, JobView};
use crate::target::written_id;

use super::error::OpError;
use super::item::lock;
use super::manager::Manager;
use super::materialize::{planned, point_choice, undo_pending};
use super::model::{ChangePointRequest, WrittenFile};
use super::state::{Event, Op};

impl Manager {
    /// Change the failed-over disks to another point.
    pub fn change_point(
        self: &Arc<Self>,
        hex: &str,
        request: ChangePointRequest,
    ) -> Result<JobView, OpError> {
        let _ops = lock(&self.ops);
        let item = self.find(hex)?;
        let record = self.check_allowed(&item, Op::ChangePoint)?;
        let choice = point_choice(&request.point, false)?;
        if let Some(export_id) = record.failover.as_ref().and_then(|f| f.export_id.clone()) {
            return self.change_point_export(&item, &export_id, choice);
        }
        self.check_job_room()?;
        let point_id = self.resolve(&item, choice)?;
        let current = record
            .failover
            .clone()
            .ok_or_else(|| OpError::Io("failed over without a failover record".into()))?;
        let target = self.change_target(&current, record.disks.len())?;
        let temp_names: Vec<String> = target.temps.iter().map(|t| t.name.clone()).collect();
        let pending = planned(&target, &temp_names, point_id, current.format);
        let job = self.start_target_job(
            &item,
            &target,
            JobKind::ChangePoint,
            format!("writing the disks at point {point_id}"),
            Event::Start(Op::ChangePoint),
            pending,
        )?;
        self.spawn_job(
            item,
            job,
            move |manager, item, job| {
                let dir = &target.dir;
                manager
                    .write_disks(
                        item,
                        point_id,
                        dir,
                        &target.temps,
                        current.format,
                        job,
                        (0, 95),
                    )
                    .inspect_err(|_| target.discard(&[]))?;
                // Each new file in the place of the one the failover wrote (and only that one).
                let mut replaced: Vec<WrittenFile> = Vec::new();
                let mut failure = None;
                for (temp, old) in target.temps.iter().zip(&current.written) {
                    let (from, to) = (
                        std::ffi::OsStr::new(&temp.name),
                        std::ffi::OsStr::new(&old.name),
                    );
                    match dir.replace_ours(from, temp.id, to, written_id(old)) {
                        Ok(()) => replaced.push(WrittenFile {
                            name: old.name.clone(),
                            ..temp.written()
                        }),
                        Err(error) => {
                            failure = Some(error);
                            break;
                        }
                    }
                }
                let synced = dir.sync();
                let _ops = lock(&manager.ops);
                if let Some(error) = failure {
                    target.discard(&[]);
                    if replaced.is_empty() {
                        return Err(anyhow!("{}; no disk was replaced", report(&error)));
                    }
                    // The record keeps naming what is there (for later change points and
                    // clean-ups): the disks already replaced are at the new point.
                    let count = replaced.len();
                    item.update(|r| {
                        if let Some(failover) = &mut r.failover {
                            failover.written.splice(..count, replaced);
                        }
                    })?;
                    return Err(anyhow!(
                        "{}; disks 0..{count} were already replaced with point {point_id}, \
                         the others are still at point {}",
                        report(&error),
                        current.point_id
                    ));
                }
                synced?;
                item.transition(Event::Done(Op::ChangePoint), |r| {
                    if let Some(failover) = &mut r.failover {
                        failover.point_id = point_id;
                        failover.written = replaced;
                    }
                    r.pending = None;
                })?;
                Ok(Some(format!("failed-over disks now at point {point_id}")))
            },
            |_, item, error| undo_pending(item, Op::ChangePoint, error),
        )
    }
}
