//! Test failover and its clean-up: disks at a point into a directory while replication runs.

use std::sync::Arc;

use crate::jobs::{JobKind, JobView};
use crate::target::disk_names;

use super::error::OpError;
use super::item::lock;
use super::manager::Manager;
use super::materialize::{output_format, planned, point_choice, remove_materialized, undo_pending};
use super::model::{ItemView, MaterializeRequest, Materialized};
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

    /// Removes the test failover's disks; back to protected.
    pub fn test_failover_cleanup(&self, hex: &str) -> Result<ItemView, OpError> {
        let _ops = lock(&self.ops);
        let item = self.find(hex)?;
        let record = self.check_allowed(&item, Op::TestFailoverCleanup)?;
        if let Some(test) = &record.test_failover {
            remove_materialized(test);
        }
        item.transition(Event::Start(Op::TestFailoverCleanup), |r| {
            r.test_failover = None;
        })?;
        Ok(self.view(&item))
    }
}
