//! Failback: final sync, the disks handed back to the original VM, slots released.

use std::sync::Arc;

use anyhow::anyhow;
use engine::meta::item_key;

use crate::jobs::{JobKind, JobView};
use crate::slots::ItemId;

use super::error::OpError;
use super::item::{lock, refuse_if_apply_failed};
use super::manager::Manager;
use super::record::put_record;
use super::state::{Event, Op};

impl Manager {
    /// Failback: final sync, disks handed back (slots released), temporary OS disk deleted.
    pub fn failback(self: &Arc<Self>, hex: &str) -> Result<JobView, OpError> {
        let _ops = lock(&self.ops);
        let item = self.find(hex)?;
        self.check_allowed(&item, Op::Failback)?;
        refuse_if_apply_failed(
            &item,
            "failback (its final sync applies every staged frame)",
        )?;
        self.check_job_room()?;
        // The replicas are handed back to the original VM: exports of them end now.
        self.drop_item_exports(&item);
        let job = self.jobs.create(JobKind::Failback, hex, "final sync")?;
        item.transition(Event::Start(Op::Failback), |r| {
            r.last_job = Some(job.id());
            r.last_error = None;
        })?;
        self.spawn_job(
            item,
            job,
            move |manager, item, job| {
                let applied = manager.stop_replication(item, true)?;
                job.progress(60, "handing the disks back");
                let _ops = lock(&manager.ops);
                let record = item.record().clone();
                let mut deleted = String::new();
                if let Some(path) = &record.temporary_os_disk {
                    match std::fs::remove_file(path) {
                        Ok(()) => deleted = format!("; temporary OS disk {path} deleted"),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(anyhow!("deleting {path}: {e}")),
                    }
                }
                let point = manager
                    .meta
                    .points(item_key(&item.id))?
                    .last()
                    .map(|p| p.point_id);
                // The disks leave their slots and the record says failed back: one
                // transaction (a crash never leaves a protected item without its slots).
                let failed_back = item.transitioned(Event::Done(Op::Failback), |r| {
                    r.temporary_os_disk = None;
                })?;
                let luns = lock(&manager.slots).release_item_with(ItemId(item.id), |commit| {
                    put_record(commit, &item.id, &failed_back)
                })?;
                item.set_record(failed_back);
                manager.remove_item_data(item)?;
                Ok(Some(format!(
                    "final sync through seq {}, last point {}; {} disks handed back (LUNs {:?} \
                     released){deleted}",
                    applied.unwrap_or(0),
                    point.map_or("none".into(), |p| p.to_string()),
                    record.disks.len(),
                    luns.iter().map(|l| l.0).collect::<Vec<_>>()
                )))
            },
            |manager, item, error| {
                let undone = item.transition(Event::Failed(Op::Failback), |r| {
                    r.last_error = Some(error.to_owned());
                });
                if undone.is_err() {
                    // Already failed back (only the clean-up after it failed; the next start
                    // retries it): the disks are the original VM's now, replication stays off.
                    let _ = item.update(|r| r.last_error = Some(error.to_owned()));
                    return;
                }
                if item.repl().is_none()
                    && let Err(e) = manager.start_replication(item)
                {
                    tracing::error!(item = %item.hex, error = %crate::store::describe(&e),
                        "replication did not restart after a failed failback");
                }
            },
        )
    }
}
