//! Failover: stop replication, pick the point, write the disks.

use std::sync::Arc;

use anyhow::anyhow;
use engine::error::report;
use engine::materialize::PointChoice;

use crate::jobs::{JobKind, JobView};
use crate::target::disk_names;

use super::error::OpError;
use super::export_failover::Source;
use super::exports::check_export_mode_request;
use super::item::{lock, refuse_if_apply_failed};
use super::manager::Manager;
use super::materialize::{output_format, planned, point_choice, undo_pending};
use super::model::{DiskMode, FailoverRequest, Materialized};
use super::state::{Event, Op};

impl Manager {
    /// Failover: stop replication, pick the point, write the disks.
    pub fn failover(
        self: &Arc<Self>,
        hex: &str,
        request: FailoverRequest,
    ) -> Result<JobView, OpError> {
        let _ops = lock(&self.ops);
        let item = self.find(hex)?;
        let record = self.check_allowed(&item, Op::Failover)?;
        let choice = point_choice(&request.point, true)?;
        if choice == PointChoice::Latest {
            refuse_if_apply_failed(&item, "failover to \"latest\"")?;
        }
        if request.mode == DiskMode::Export {
            check_export_mode_request(None, request.format)?;
            return self.failover_export(
                item,
                Source::Point(choice),
                &request.target_dir,
                request.source_shut_down,
            );
        }
        self.check_job_room()?;
        if choice != PointChoice::Latest {
            // Refuse an unknown point now, not in the job.
            self.resolve(&item, choice)?;
        }
        let format = request.format;
        let target = self.target_dir(&request.target_dir, &record.disks, format)?;
        let names = disk_names(
            record.disks.iter().map(|d| d.index),
            output_format(format).extension(),
        );
        let pending = planned(&target, &names, 0, format);
        let job = self.start_target_job(
            &item,
            &target,
            JobKind::Failover,
            "stopping replication".to_owned(),
            Event::Start(Op::Failover),
            pending,
        )?;
        let shut_down = request.source_shut_down;
        self.spawn_job(
            item,
            job,
            move |manager, item, job| {
                let dir = &target.dir;
                let published = (|| {
                    manager.stop_replication(item, choice == PointChoice::Latest)?;
                    job.progress(5, "resolving the recovery point");
                    let point_id = manager
                        .resolve(
                            item,
                            match choice {
                                PointChoice::Latest => PointChoice::LatestProcessed,
                                other => other,
                            },
                        )
                        .map_err(|e| anyhow!("{}", report(&e)))?;
                    manager.write_disks(
                        item,
                        point_id,
                        dir,
                        &target.temps,
                        format,
                        job,
                        (5, 100),
                    )?;
                    Ok::<_, anyhow::Error>((point_id, target.publish_new(&names)?))
                })();
                let (point_id, published) = published.inspect_err(|_| target.discard(&names))?;
                let _ops = lock(&manager.ops);
                item.transition(Event::Done(Op::Failover), |r| {
                    r.failover = r.pending.take().map(|pending| Materialized {
                        point_id,
                        written: published,
                        ..pending
                    });
                })
                .inspect_err(|_| target.discard(&names))?;
                Ok(Some(format!(
                    "failed over to point {point_id}; disks in {}{}",
                    dir.path().display(),
                    if shut_down {
                        ""
                    } else {
                        " (the source was not declared shut down: writes it made after the \
                         last acknowledged frame are not in this point)"
                    }
                )))
            },
            |manager, item, error| {
                undo_pending(item, Op::Failover, error);
                if item.repl().is_none()
                    && let Err(e) = manager.start_replication(item)
                {
                    tracing::error!(item = %item.hex, error = %crate::store::describe(&e),
                        "replication did not restart after a failed failover");
                }
            },
        )
    }
}
