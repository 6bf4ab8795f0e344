//! Test failover and its clean-up: disks at a point into a directory while replication runs.

use std::sync::Arc;

use crate::jobs::{JobKind, JobView};
use crate::target::disk_names;

use super::error::OpError;
use super::exports::check_export_mode_request;
use super::item::Item;
use super::item::lock;
use super::manager::Manager;
use super::materialize::{output_format, planned, point_choice, remove_materialized, undo_pending};
use super::model::{
    DiskMode, ExportMode, ExportPurpose, Format, ItemView, MaterializeRequest, Materialized,
};
use super::state::{Event, Op};

impl Manager {
    /// Test failover: disks at a point into a directory; replication keeps running.
    pub fn test_failover(
        self: &Arc<Self>,
        hex: &str,
        request: MaterializeRequest,
    ) -> Result<JobView, OpError> {
        let _ops = lock(&self.ops);
        let item = self.find(hex)?;
        let record = self.check_allowed(&item, Op::TestFailover)?;
        let choice = point_choice(&request.point, false)?;
        if request.mode == DiskMode::Export {
            check_export_mode_request(Some(&request.target_dir), request.format)?;
            let point_id = self.resolve(&item, choice)?;
            return self.test_failover_export(&item, point_id);
        }
        self.check_job_room()?;
        let point_id = self.resolve(&item, choice)?;
        let format = request.format;
        let target = self.target_dir(&request.target_dir, &record.disks, format)?;
        let names = disk_names(
            record.disks.iter().map(|d| d.index),
            output_format(format).extension(),
        );
        let pending = planned(&target, &names, point_id, format);
        let job = self.start_target_job(
            &item,
            &target,
            JobKind::TestFailover,
            format!("writing the disks at point {point_id}"),
            Event::Start(Op::TestFailover),
            pending,
        )?;
        self.spawn_job(
            item,
            job,
            move |manager, item, job| {
                let dir = &target.dir;
                let published = manager
                    .write_disks(item, point_id, dir, &target.temps, format, job, (0, 100))
                    .and_then(|()| Ok(target.publish_new(&names)?))
                    .inspect_err(|_| target.discard(&names))?;
                let _ops = lock(&manager.ops);
                item.update(|r| {
                    r.test_failover = r.pending.take().map(|pending| Materialized {
                        written: published,
                        ..pending
                    });
                })
                .inspect_err(|_| target.discard(&names))?;
                Ok(Some(format!(
                    "test failover disks at point {point_id} in {}",
                    dir.path().display()
                )))
            },
            |_, item, error| undo_pending(item, Op::TestFailover, error),
        )
    }

    /// Test failover in export mode: the disks at `point_id` served over NBD at once as a
    /// writable drill; its job is done when this returns (under `ops`).
    fn test_failover_export(&self, item: &Arc<Item>, point_id: u64) -> Result<JobView, OpError> {
        let live = self.make_export(
            item,
            ExportPurpose::TestFailover,
            ExportMode::Drill,
            point_id,
        )?;
        let view = self.exports.view(&live);
        let id = live.record().id.clone();
        drop(live);
        let uris: Vec<String> = view.disks.iter().map(|d| d.uri.clone()).collect();
        let created = self
            .jobs
            .create(
                JobKind::TestFailover,
                &item.hex,
                "serving the disks over NBD",
            )
            .map_err(OpError::from)
            .and_then(|job| {
                item.transition(Event::Start(Op::TestFailover), |r| {
                    r.test_failover = Some(Materialized {
                        point_id,
                        target_dir: String::new(),
                        format: Format::Raw,
                        files: uris.clone(),
                        created_dir: false,
                        target_dir_id: None,
                        written: Vec::new(),
                        export_id: Some(id.clone()),
                        copy: None,
                    });
                })?;
                Ok(job)
            });
        let job = match created {
            Ok(job) => job,
            Err(e) => {
                if let Ok((export, _)) = self.find_export(&id)
                    && let Err(undo) = self.drop_export(&export)
                {
                    tracing::error!(error = %crate::store::describe(&undo), "removing an export");
                }
                return Err(e);
            }
        };
        job.succeed(format!(
            "test failover disks at point {point_id} served over NBD (a writable drill; export \
             {id}): {}",
            uris.join(" ")
        ))?;
        Ok(job.view())
    }

    /// Removes the test failover's disks; back to protected.
    pub fn test_failover_cleanup(&self, hex: &str) -> Result<ItemView, OpError> {
        let _ops = lock(&self.ops);
        let item = self.find(hex)?;
        let record = self.check_allowed(&item, Op::TestFailoverCleanup)?;
        match &record.test_failover {
            Some(test) if test.export_id.is_some() => {
                if let Some(id) = &test.export_id
                    && let Ok((export, _)) = self.find_export(id)
                {
                    self.drop_export(&export)?;
                }
            }
            Some(test) => remove_materialized(test),
            None => {}
        }
        item.transition(Event::Start(Op::TestFailoverCleanup), |r| {
            r.test_failover = None;
        })?;
        Ok(self.view(&item))
    }
}
