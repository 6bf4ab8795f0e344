//! The item manager: its struct, opening the data directory, item look-up and checks, job threads.

use super::model::ItemState;
use super::record::decode_record;
use super::state::holds_slots;
use crate::slots::{DiskRequest, ItemId};
use crate::store::item_hex;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::Context;
use engine::meta::MetaStore;

use crate::dataport::PortHandle;
use crate::db::ControlStore;
use crate::exports::Exports;
use crate::jobs::{Job, JobView, Jobs};
use crate::options::ServeOptions;
use crate::slots::{SlotError, SlotTable};
use crate::store::{DataDir, parse_item_hex};

use super::error::OpError;
use super::item::{Item, lock};
use super::record::ItemRecord;
use super::state::{Op, check_allowed};

/// The item manager. Shared as `Arc<Manager>` by the API, the data port and the daemon.
pub struct Manager {
    pub(crate) data: DataDir,
    /// The data directory, canonical.
    pub(crate) root: PathBuf,
    /// The data directory and the disk stores, canonical.
    pub(crate) roots: Vec<PathBuf>,
    pub(crate) meta: Arc<MetaStore>,
    /// Item records, jobs and the slot table (one transaction per lifecycle step).
    pub(crate) control: Arc<ControlStore>,
    pub(crate) options: ServeOptions,
    pub(crate) slots: Mutex<SlotTable>,
    pub(crate) items: Mutex<BTreeMap<[u8; 16], Arc<Item>>>,
    pub(crate) jobs: Jobs,
    pub(crate) ops: Mutex<()>,
    pub(crate) port: OnceLock<PortHandle>,
    pub(crate) next_op: AtomicU64,
    pub(crate) stopping: AtomicBool,
    pub(crate) supervisor: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Live exports over NBD (the NBD server's catalog).
    pub(crate) exports: Arc<Exports>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

impl Manager {
    /// Opens the data directory: migrates a first-release layout into the control store,
    /// then opens the slot table, the jobs, every item's record, and finishes or undoes what a
    /// crash interrupted. Starts nothing (see [`Manager::start`]).
    pub fn open(data_dir: &Path, options: ServeOptions) -> anyhow::Result<Arc<Self>> {
        let data = DataDir::open(data_dir)?;
        let root = std::fs::canonicalize(data_dir)
            .with_context(|| format!("resolving {}", data_dir.display()))?;
        let mut roots = vec![root.clone()];
        for store in &options.disk_stores {
            let canonical = std::fs::canonicalize(store)
                .with_context(|| format!("disk store {}", store.display()))?;
            roots.push(canonical);
        }
        let meta = data.meta()?;
        let control = Arc::new(data.control()?);
        if let Some(migrated) = crate::db::migrate_v1::migrate(&root, &control)
            .context("migrating the data directory into control.redb")?
        {
            tracing::warn!(records = migrated.records, jobs = migrated.jobs,
                slots = ?migrated.slots, "migrated a first-release data directory into control.redb");
        }
        let slots = match SlotTable::open(control.clone(), options.slot_count) {
            Err(SlotError::Corrupt { reason }) => {
                // The stored table cannot be trusted: rebuild it from the item records rather
                // than refusing to start (LUNs may change).
                let attached = slots_from_records(&control)?;
                let (table, left_out) =
                    SlotTable::rebuild(control.clone(), options.slot_count, attached)?;
                tracing::error!(%reason, ?left_out,
                    "slot table damaged: rebuilt from the item records (LUNs may change)");
                Ok(table)
            }
            other => other,
        }
        .context("opening the slot table")?;
        let jobs = Jobs::open(control.clone())?;
        let manager = Arc::new(Self {
            data,
            root,
            roots,
            meta,
            control,
            options,
            slots: Mutex::new(slots),
            items: Mutex::new(BTreeMap::new()),
            jobs,
            ops: Mutex::new(()),
            port: OnceLock::new(),
            next_op: AtomicU64::new(1),
            stopping: AtomicBool::new(false),
            supervisor: Mutex::new(None),
            exports: Arc::new(Exports::default()),
        });
        manager.load_items()?;
        manager.recover()?;
        manager.recover_exports()?;
        Ok(manager)
    }

    pub(super) fn all_items(&self) -> Vec<Arc<Item>> {
        lock(&self.items).values().cloned().collect()
    }

    pub(super) fn item(&self, id: &[u8; 16]) -> Option<Arc<Item>> {
        lock(&self.items).get(id).cloned()
    }

    pub(super) fn find(&self, hex: &str) -> Result<Arc<Item>, OpError> {
        let id = parse_item_hex(hex).map_err(|e| OpError::BadRequest {
            code: "bad_item_id",
            field: None,
            message: crate::store::describe(&e),
        })?;
        self.item(&id).ok_or_else(|| OpError::NotFound {
            code: "item_not_found",
            message: format!("no item {hex} on this appliance"),
        })
    }

    /// The item's record, if it allows `op` now (else 409 `wrong_state`).
    pub(super) fn check_allowed(&self, item: &Item, op: Op) -> Result<ItemRecord, OpError> {
        let record = item.record().clone();
        check_allowed(&item.hex, &record, op)?;
        Ok(record)
    }

    pub(super) fn check_job_room(&self) -> Result<(), OpError> {
        let running = self.jobs.running_work();
        if running >= self.options.max_jobs {
            return Err(OpError::Conflict {
                code: "too_many_jobs",
                message: format!(
                    "{running} jobs are running, the limit is {}; retry when one ends",
                    self.options.max_jobs
                ),
            });
        }
        Ok(())
    }

    /// Runs `work` on a job thread; on its error takes `ops`, runs `undo` and fails the job.
    pub(super) fn spawn_job(
        self: &Arc<Self>,
        item: Arc<Item>,
        job: Arc<Job>,
        work: impl FnOnce(&Arc<Self>, &Arc<Item>, &Job) -> anyhow::Result<Option<String>>
        + Send
        + 'static,
        undo: impl FnOnce(&Arc<Self>, &Arc<Item>, &str) + Send + 'static,
    ) -> Result<JobView, OpError> {
        let view = job.view();
        let manager = self.clone();
        std::thread::Builder::new()
            .name(format!("job-{}", view.id))
            .spawn(move || match work(&manager, &item, &job) {
                // The supervisor ends the job (a replication job).
                Ok(None) => {}
                Ok(Some(message)) => {
                    if let Err(error) = job.succeed(message) {
                        tracing::error!(error = %crate::store::describe(&error), "recording a job's end");
                    }
                }
                Err(error) => {
                    let message = crate::store::describe(&error);
                    tracing::error!(item = %item.hex, job = job.id(), error = %message, "job failed");
                    {
                        let _ops = lock(&manager.ops);
                        undo(&manager, &item, &message);
                    }
                    if let Err(error) = job.fail(message) {
                        tracing::error!(error = %crate::store::describe(&error), "recording a job's end");
                    }
                }
            })
            .map_err(|e| OpError::Io(format!("starting a job thread: {e}")))?;
        Ok(view)
    }
}

/// The disks that the readable records say hold slots, with their paths (to rebuild a damaged
/// slot table; quarantined and unreadable records give none).
fn slots_from_records(store: &ControlStore) -> anyhow::Result<Vec<(DiskRequest, PathBuf)>> {
    let mut attached = Vec::new();
    for (id, bytes) in store.records()? {
        let Ok(record) = decode_record(&item_hex(&id), &bytes) else {
            continue;
        };
        if !holds_slots(record.state) || record.state == ItemState::Quarantined {
            continue;
        }
        for disk in &record.disks {
            attached.push((
                DiskRequest {
                    item: ItemId(id),
                    disk_index: disk.index,
                },
                PathBuf::from(&disk.path),
            ));
        }
    }
    Ok(attached)
}
