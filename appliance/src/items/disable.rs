//! Disable: protection stopped, slots released, the item's data removed.

use anyhow::Context;
use engine::meta::item_key;

use crate::slots::ItemId;

use super::error::OpError;
use super::item::{Item, lock};
use super::manager::Manager;
use super::materialize::remove_materialized;
use super::model::ItemView;
use super::record::remove_token;
use super::state::{Event, Op};

impl Manager {
    /// Disable protection: replication stopped, slots released, staging, points and created
    /// replica disks removed; attached disks and failed-over disks are left alone.
    pub fn disable(&self, hex: &str) -> Result<ItemView, OpError> {
        let (item, record) = {
            let _ops = lock(&self.ops);
            let item = self.find(hex)?;
            let record = self.check_allowed(&item, Op::Disable)?;
            item.transition(Event::Start(Op::Disable), |_| {})?;
            (item, record)
        };
        // Durably disabled: no operation is allowed on the item any more, and a restart
        // finishes the clean-up. The slow part (ending its sessions, draining its apply worker,
        // removing its data) runs without the ops lock, so operations on other items (a
        // failover in a disaster) never wait behind it.
        if let Err(error) = self.stop_replication(&item, false) {
            // The worker was joined (its thread ended on an error, logged): nothing of the
            // item runs any more, so its data can go. Only sessions that did not end stop it.
            if item.repl().is_some() {
                return Err(error.into());
            }
            tracing::warn!(item = %item.hex, error = %crate::store::describe(&error),
                "apply had stopped on an error; its staged frames go with the item");
        }
        // Exports read the replicas and points about to be removed: their clients are
        // disconnected and their overlays go with the item's directory.
        self.drop_item_exports(&item);
        if let Some(test) = record
            .test_failover
            .as_ref()
            .filter(|t| t.export_id.is_none())
        {
            remove_materialized(test);
        }
        if let Some(job) = record.last_job.and_then(|id| self.jobs.get(id)) {
            job.fail("protection was disabled")?;
        }
        self.remove_item_data(&item)?;
        // Clean-up complete: the record goes too (the item stays listed as disabled until the
        // appliance restarts; a crash before this purges it at the next start).
        self.purge(&item)?;
        tracing::info!(item = %item.hex, "protection disabled");
        Ok(self.view(&item))
    }

    /// Releases the item's slots and removes its staging, preserve files, points, created
    /// replicas and token. Idempotent (run again at start for disabled items).
    pub(super) fn remove_item_data(&self, item: &Item) -> anyhow::Result<()> {
        lock(&self.slots).release_item(ItemId(item.id))?;
        for sub in ["staging", "preserve", "replicas"] {
            let path = item.dirs.root.join(sub);
            match std::fs::remove_dir_all(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
            }
        }
        remove_token(&item.dirs.root)?;
        self.meta.remove_item(item_key(&item.id))?;
        Ok(())
    }
}
