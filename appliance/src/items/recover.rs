//! Start-up: load item records and directories, undo interrupted jobs, quarantine the damaged.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use engine::delta::StreamHeader;

use crate::slots::{ItemId, SlotState};
use crate::store::{ItemDirs, item_hex, parse_item_hex};

use super::item::{Item, lock};
use super::manager::Manager;
use super::materialize::remove_materialized;
use super::model::ItemState;
use super::record::{
    check_record, decode_record, put_record, read_token, remove_record, stand_in_record,
};
use super::state::{AtStart, Event, JobAtStart, at_start, job_at_start, sync_job_kind};

impl Manager {
    /// Loads every item directory with its record. A directory that a crash during enable
    /// left (the `enabling` marker or no header, and no record) is rolled back; one whose
    /// record or header cannot be read or disagree is quarantined; a record without a
    /// directory is removed if its item was disabled (a purge a crash interrupted), else
    /// quarantined; only an error listing `items/` or reading the store stops the start.
    pub(super) fn load_items(&self) -> anyhow::Result<()> {
        let attached: Vec<(ItemId, u32, PathBuf)> = lock(&self.slots)
            .table()
            .into_iter()
            .filter_map(|row| match row.state {
                SlotState::Attached {
                    item,
                    disk_index,
                    path,
                } => Some((item, disk_index, path)),
                _ => None,
            })
            .collect();
        // Read into a local table; `items` is taken once, to publish it (no lock across the
        // reads and clean-ups below).
        let mut items = BTreeMap::new();
        let mut stored = self.control.records()?;
        for found in self.data.found_items()? {
            let hex = item_hex(&found.id);
            let record = stored
                .remove(&found.id)
                .map(|bytes| decode_record(&hex, &bytes));
            if record.is_none() && (found.enabling || matches!(found.header, Ok(None))) {
                // Enable never wrote the record: nothing refers to what it made.
                if let Some(created) = &found.enabling_creates {
                    match std::fs::remove_file(created) {
                        Ok(()) => tracing::warn!(item = %hex, path = %created.display(),
                            "removed the temporary OS disk of an interrupted enable"),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(error) => tracing::error!(item = %hex, path = %created.display(),
                            %error, "could not remove an interrupted enable's file"),
                    }
                }
                match self.data.purge_item(&found.root) {
                    Ok(()) => tracing::warn!(item = %hex,
                        "rolled back an enable that a crash interrupted (no record)"),
                    Err(error) => tracing::error!(item = %hex,
                        error = %crate::store::describe(&error),
                        "could not roll back an interrupted enable (retried at the next start)"),
                }
                continue;
            }
            let header = found.header.clone();
            let Some(record) = record else {
                match header {
                    Ok(_) => {
                        tracing::info!(item = %hex, "no record (an `ingest` item): not served")
                    }
                    Err(reason) => tracing::error!(item = %hex, %reason,
                        "a damaged item directory without a record: not served"),
                }
                continue;
            };
            if found.enabling
                && let Err(error) = self.data.end_enabling(&found.root)
            {
                tracing::warn!(item = %hex, error = %crate::store::describe(&error),
                    "removing the enable marker");
            }
            let token = read_token(&found.root, &hex);
            let problem = match (&record, &header, &token) {
                (Err(why), _, _) | (_, Err(why), _) | (_, _, Err(why)) => Some(why.clone()),
                (Ok(record), Ok(header), _) => check_record(&hex, record, header.as_ref()).err(),
            };
            let placeholder = StreamHeader {
                item_id: found.id,
                item_name: String::new(),
                first_seq: 1,
                disks: Vec::new(),
            };
            let dirs = ItemDirs {
                root: found.root.clone(),
                header: header.clone().ok().flatten().unwrap_or(placeholder),
            };
            let Some(reason) = problem else {
                let (Ok(record), Ok(token)) = (record, token) else {
                    continue;
                };
                let item = Item::new(found.id, dirs, token, record, self.control.clone());
                items.insert(found.id, Arc::new(item));
                continue;
            };
            let record = record.unwrap_or_else(|_| {
                stand_in_record(&hex, &found.root, header.ok().flatten().as_ref(), &attached)
            });
            let item = Item::new(found.id, dirs, Vec::new(), record, self.control.clone());
            item.quarantine_now(reason, QUARANTINE_ACTION);
            items.insert(found.id, Arc::new(item));
        }
        for (id, bytes) in stored {
            let hex = item_hex(&id);
            let record = decode_record(&hex, &bytes);
            if record
                .as_ref()
                .is_ok_and(|r| r.state == ItemState::Disabled)
            {
                match remove_record(&self.control, &id) {
                    Ok(()) => tracing::warn!(item = %hex,
                        "removed the record of a disabled item whose purge a crash interrupted"),
                    Err(error) => tracing::error!(item = %hex,
                        error = %crate::store::describe(&error),
                        "could not remove a purged item's record (retried at the next start)"),
                }
                continue;
            }
            let root = self.data.item_root(&id);
            let reason = format!(
                "item {hex}: it has a record but no directory {}",
                root.display()
            );
            let record = record.unwrap_or_else(|_| stand_in_record(&hex, &root, None, &attached));
            let placeholder = StreamHeader {
                item_id: id,
                item_name: String::new(),
                first_seq: 1,
                disks: Vec::new(),
            };
            let dirs = ItemDirs {
                root,
                header: placeholder,
            };
            let item = Item::new(id, dirs, Vec::new(), record, self.control.clone());
            item.quarantine_now(reason, QUARANTINE_ACTION);
            items.insert(id, Arc::new(item));
        }
        lock(&self.items).extend(items);
        Ok(())
    }

    /// Removes a disabled item's directory, then its record (a crash between the two leaves a
    /// record without a directory, removed at the next start).
    pub(super) fn purge(&self, item: &Item) -> anyhow::Result<()> {
        self.data.purge_item(&item.dirs.root)?;
        remove_record(&self.control, &item.id)
    }

    /// Undoes what a crash interrupted (see the module's invariants). A failure on one item
    /// quarantines that item; the others are recovered.
    pub(super) fn recover(&self) -> anyhow::Result<()> {
        const INTERRUPTED: &str = "interrupted by an appliance restart";
        for item in self.all_items() {
            let record = item.record().clone();
            if record.state == ItemState::Quarantined {
                continue;
            }
            match at_start(&record) {
                AtStart::Serve => {}
                AtStart::Undo { to } => {
                    if let Some(pending) = &record.pending {
                        remove_materialized(pending);
                    }
                    tracing::warn!(item = %item.hex, from = record.state.name(), to = to.name(),
                        "an interrupted job's state undone");
                    if let Err(error) = item.transition(Event::Interrupted, |r| {
                        r.pending = None;
                        r.last_error = Some(format!("{} job {INTERRUPTED}", record.state.name()));
                    }) {
                        item.quarantine_now(
                            format!(
                                "undoing its interrupted {} job failed: {}",
                                record.state.name(),
                                crate::store::describe(&error)
                            ),
                            QUARANTINE_ACTION,
                        );
                    }
                }
                AtStart::CleanUp { purge } => {
                    let cleaned = self.remove_item_data(&item).and_then(|()| {
                        if purge {
                            self.purge(&item)?;
                            lock(&self.items).remove(&item.id);
                        }
                        Ok(())
                    });
                    if let Err(error) = cleaned {
                        tracing::error!(item = %item.hex, error = %crate::store::describe(&error),
                            "clean-up of a {} item failed (retried at the next start)",
                            record.state.name());
                    }
                }
            }
        }
        for job in self.jobs.running() {
            let view = job.view();
            let owner = parse_item_hex(&view.item)
                .ok()
                .and_then(|id| self.item(&id));
            let state = owner.as_ref().map(|item| item.record().state);
            let last_job = owner
                .as_ref()
                .is_some_and(|item| item.record().last_job == Some(view.id));
            match job_at_start(view.kind, state, last_job) {
                JobAtStart::Succeeded => {
                    if let Err(error) = job.succeed("synchronized; protected (recorded at restart)")
                    {
                        tracing::error!(job = view.id, error = %crate::store::describe(&error),
                            "recording a finished sync");
                    }
                }
                JobAtStart::Continues => {}
                JobAtStart::Interrupted => {
                    if let Err(error) = job.fail(format!(
                        "{INTERRUPTED} (item then {})",
                        state.map_or("gone", ItemState::name)
                    )) {
                        tracing::error!(job = view.id, error = %crate::store::describe(&error),
                            "recording an interrupted job");
                    }
                }
            }
        }
        // A replicating item whose job file was damaged (or lost) gets a new job: the
        // supervisor ends the sync through it.
        for item in self.all_items() {
            let record = item.record().clone();
            let Some(kind) = sync_job_kind(record.state) else {
                continue;
            };
            if record.last_job.and_then(|id| self.jobs.get(id)).is_some() {
                continue;
            }
            // The new job and the record naming it: one transaction.
            let replaced = self
                .jobs
                .prepare(
                    kind,
                    &item.hex,
                    "its job's record was unreadable at start: this job replaces it",
                )
                .and_then(|job| {
                    let mut record = item.record().clone();
                    record.last_job = Some(job.id());
                    record.updated_ns = engine::clock::now_unix_ns();
                    self.control.commit("replacing a lost job", |commit| {
                        job.put(commit)?;
                        put_record(commit, &item.id, &record)
                    })?;
                    self.jobs.publish(job);
                    item.set_record(record);
                    Ok(())
                });
            if let Err(error) = replaced {
                tracing::error!(item = %item.hex, error = %crate::store::describe(&error),
                    "could not replace the item's lost job");
            }
        }
        Ok(())
    }
}

/// What an operator can do about a quarantined item (shown with the reason).
const QUARANTINE_ACTION: &str = "the item is not served and its slots stay held. Repair or \
     restore the named file (e.g. from a backup) and restart the appliance to serve the item \
     again, or disable it (DELETE /v1/items/{id}, `appliance disable`) to remove it: that \
     releases its slots and deletes its staging, recovery points and created replica disks \
     (attached and failed-over disks are left alone)";
