//! The control store: item records, jobs and the slot table in one transactional redb file,
//! `DATA_DIR/control.redb`, so that a lifecycle step commits all it changes at once.
//!
//! ```text
//!  table     key                         value
//!  ────────  ──────────────────────────  ────────────────────────────────────────────────
//!  items     item id u128 (LE of bytes)  the item's record, JSON (the v1 `item.json` bytes)
//!  jobs      job id u64                  the job, JSON (the v1 `jobs/<id>.json` bytes)
//!  slots     LUN u32 (1..slot count)     an attached replica disk: item id 16 bytes,
//!                                        disk index u32 LE, path (OS bytes of an absolute path)
//!  settings  name &str                   u64: `format_version` (1), `slot_count`,
//!                                        `slots_need_rebuild` (1: see `migrate_v1`)
//! ```
//!
//! Invariants:
//! - every change is one [`ControlStore::commit`]: one redb write transaction with two-phase
//!   commit and quick repair (the allocator state saved with each commit), so a crash leaves
//!   the state before or after it; a stopped appliance's store can be read without changing
//!   it ([`ControlStore::open_read_only`]);
//! - the store holds no reservation: slot reservations are memory only ([`crate::slots`]);
//! - values are decoded by their owners (records by the item manager, jobs by
//!   [`crate::jobs`], slot rows by [`crate::slots`]); a value that does not decode damages
//!   only its own item, job or the slot table, never the store.
//!
//! Why a file of its own rather than tables in the engine's `meta.redb`: the engine's store is
//! written by the apply workers at every checkpoint and knows nothing of items' lifecycle;
//! keeping the appliance's control state apart keeps the engine free of appliance types, keeps
//! checkpoint commits out of lifecycle transactions (redb serialises writers), and lets the
//! appliance migrate its own formats without touching the engine's. No lifecycle step needs a
//! point and a record in one transaction: points are only ever added by the engine, and removed
//! after the record says the item is gone.

pub mod migrate_v1;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use engine::durable::{DurableDir, DurableFile, StdDir};
use engine::meta::RedbBackend;
use redb::{
    Database, ReadOnlyDatabase, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction,
};
use serde::Serialize;

/// The store's file, in the data directory.
pub const CONTROL_FILE: &str = "control.redb";
/// Present in the data directory only while [`CONTROL_FILE`] is being created.
pub const CREATING_MARKER: &str = "control.redb.creating";
/// The format of the store's tables this build writes and reads.
pub const FORMAT_VERSION: u64 = 1;

/// Records by item (redb table `items`).
pub const ITEMS: TableDefinition<'_, u128, &[u8]> = TableDefinition::new("items");
/// Jobs by id (redb table `jobs`).
pub const JOBS: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("jobs");
/// Attached slots by LUN (redb table `slots`).
pub const SLOTS: TableDefinition<'_, u32, &[u8]> = TableDefinition::new("slots");
/// Named numbers (redb table `settings`).
pub const SETTINGS: TableDefinition<'_, &str, u64> = TableDefinition::new("settings");
/// Exports (`crate::exports`): export id (as [`item_key`]) → the export's record (JSON).
/// Made by the first export; a store without it has none.
pub const EXPORTS: TableDefinition<'_, u128, &[u8]> = TableDefinition::new("exports");

const SETTING_FORMAT: &str = "format_version";
const SETTING_SLOT_COUNT: &str = "slot_count";
const SETTING_SLOTS_NEED_REBUILD: &str = "slots_need_rebuild";

/// An item's key in the store.
pub fn item_key(item: &[u8; 16]) -> u128 {
    u128::from_le_bytes(*item)
}

fn item_of(key: u128) -> [u8; 16] {
    key.to_le_bytes()
}

/// Why the control store failed.
#[derive(Debug, thiserror::Error)]
#[error("control store: {what}: {message}")]
pub struct DbError {
    /// What was being done.
    pub what: &'static str,
    /// redb's or the encoder's message.
    pub message: String,
}

fn db_err<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> DbError {
    move |e| DbError {
        what,
        message: e.to_string(),
    }
}

/// One attached slot as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotEntry {
    /// The LUN.
    pub lun: u32,
    /// The item.
    pub item: [u8; 16],
    /// The disk of the item.
    pub disk_index: u32,
    /// The replica disk.
    pub path: PathBuf,
}

impl SlotEntry {
    fn encode(&self) -> Vec<u8> {
        use std::os::unix::ffi::OsStrExt;
        let path = self.path.as_os_str().as_bytes();
        let mut out = Vec::with_capacity(20 + path.len());
        out.extend_from_slice(&self.item);
        out.extend_from_slice(&self.disk_index.to_le_bytes());
        out.extend_from_slice(path);
        out
    }

    fn decode(lun: u32, bytes: &[u8]) -> Result<Self, String> {
        use std::os::unix::ffi::OsStrExt;
        if bytes.len() < 20 {
            return Err(format!(
                "slot row of LUN {lun} is {} bytes, shorter than 20",
                bytes.len()
            ));
        }
        let mut item = [0u8; 16];
        item.copy_from_slice(&bytes[..16]);
        let mut disk = [0u8; 4];
        disk.copy_from_slice(&bytes[16..20]);
        Ok(Self {
            lun,
            item,
            disk_index: u32::from_le_bytes(disk),
            path: PathBuf::from(std::ffi::OsStr::from_bytes(&bytes[20..])),
        })
    }
}

/// The slot table as stored: the slot count and one row per attached LUN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSlots {
    /// The slot count (LUN 0 included).
    pub slot_count: u32,
    /// Attached LUNs in LUN order; a row that does not decode says why.
    pub rows: Vec<Result<SlotEntry, String>>,
    /// Set by a migration that could not read the old slot pages: the table must be rebuilt
    /// from the records.
    pub need_rebuild: bool,
}

/// The changes of one transaction (see [`ControlStore::commit`]).
pub struct Commit<'t> {
    txn: &'t WriteTransaction,
}

impl std::fmt::Debug for Commit<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Commit").finish_non_exhaustive()
    }
}

impl Commit<'_> {
    /// Writes an item's record (JSON).
    pub fn put_record<T: Serialize>(&mut self, item: &[u8; 16], record: &T) -> Result<(), DbError> {
        let bytes = serde_json::to_vec_pretty(record).map_err(db_err("encoding an item record"))?;
        self.put_record_bytes(item, &bytes)
    }

    /// Writes an item's record as given (the migration; tests that damage a record).
    pub fn put_record_bytes(&mut self, item: &[u8; 16], bytes: &[u8]) -> Result<(), DbError> {
        let what = "writing an item record";
        let mut table = self.txn.open_table(ITEMS).map_err(db_err(what))?;
        table.insert(item_key(item), bytes).map_err(db_err(what))?;
        Ok(())
    }

    /// Removes an item's record (none: nothing happens).
    pub fn remove_record(&mut self, item: &[u8; 16]) -> Result<(), DbError> {
        let what = "removing an item record";
        let mut table = self.txn.open_table(ITEMS).map_err(db_err(what))?;
        table.remove(item_key(item)).map_err(db_err(what))?;
        Ok(())
    }

    /// Writes an export's record (JSON).
    pub fn put_export<T: Serialize>(&mut self, id: &[u8; 16], export: &T) -> Result<(), DbError> {
        let what = "writing an export";
        let bytes = serde_json::to_vec_pretty(export).map_err(db_err("encoding an export"))?;
        let mut table = self.txn.open_table(EXPORTS).map_err(db_err(what))?;
        table
            .insert(item_key(id), bytes.as_slice())
            .map_err(db_err(what))?;
        Ok(())
    }

    /// Removes an export's record (none: nothing happens).
    pub fn remove_export(&mut self, id: &[u8; 16]) -> Result<(), DbError> {
        let what = "removing an export";
        let mut table = self.txn.open_table(EXPORTS).map_err(db_err(what))?;
        table.remove(item_key(id)).map_err(db_err(what))?;
        Ok(())
    }

    /// Writes a job (JSON).
    pub fn put_job<T: Serialize>(&mut self, id: u64, job: &T) -> Result<(), DbError> {
        let bytes = serde_json::to_vec_pretty(job).map_err(db_err("encoding a job"))?;
        self.put_job_bytes(id, &bytes)
    }

    /// Writes a job as given (the migration; tests that damage a job).
    pub fn put_job_bytes(&mut self, id: u64, bytes: &[u8]) -> Result<(), DbError> {
        let what = "writing a job";
        let mut table = self.txn.open_table(JOBS).map_err(db_err(what))?;
        table.insert(id, bytes).map_err(db_err(what))?;
        Ok(())
    }

    /// Removes jobs (absent ones are skipped).
    pub fn remove_jobs(&mut self, ids: &[u64]) -> Result<(), DbError> {
        let what = "removing jobs";
        let mut table = self.txn.open_table(JOBS).map_err(db_err(what))?;
        for id in ids {
            table.remove(*id).map_err(db_err(what))?;
        }
        Ok(())
    }

    /// Replaces the whole slot table: its slot count and its attached LUNs (clears a pending
    /// rebuild).
    pub fn put_slots(&mut self, slot_count: u32, entries: &[SlotEntry]) -> Result<(), DbError> {
        let what = "writing the slot table";
        let mut table = self.txn.open_table(SLOTS).map_err(db_err(what))?;
        table.retain(|_, _| false).map_err(db_err(what))?;
        for entry in entries {
            table
                .insert(entry.lun, entry.encode().as_slice())
                .map_err(db_err(what))?;
        }
        let mut settings = self.txn.open_table(SETTINGS).map_err(db_err(what))?;
        settings
            .insert(SETTING_SLOT_COUNT, u64::from(slot_count))
            .map_err(db_err(what))?;
        settings
            .remove(SETTING_SLOTS_NEED_REBUILD)
            .map_err(db_err(what))?;
        Ok(())
    }

    /// Writes one slot row as given, without checks (tests that damage the slot table).
    pub fn put_slot_bytes(&mut self, lun: u32, bytes: &[u8]) -> Result<(), DbError> {
        let what = "writing a slot row";
        let mut table = self.txn.open_table(SLOTS).map_err(db_err(what))?;
        table.insert(lun, bytes).map_err(db_err(what))?;
        Ok(())
    }

    /// Marks the slot table as to be rebuilt from the records at the next open.
    pub fn mark_slots_for_rebuild(&mut self) -> Result<(), DbError> {
        let what = "marking the slot table for a rebuild";
        let mut settings = self.txn.open_table(SETTINGS).map_err(db_err(what))?;
        settings
            .insert(SETTING_SLOTS_NEED_REBUILD, 1)
            .map_err(db_err(what))?;
        Ok(())
    }
}

/// The control store. Cheap to share (`Arc`); redb serialises writers.
pub struct ControlStore {
    db: Database,
}

impl std::fmt::Debug for ControlStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlStore").finish_non_exhaustive()
    }
}

/// A read-only view of a store no process has open (a stopped appliance's).
pub struct ControlView {
    db: ReadOnlyDatabase,
}

impl std::fmt::Debug for ControlView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlView").finish_non_exhaustive()
    }
}

impl ControlStore {
    /// Opens or creates the store in `file`; refuses a store of another format version.
    pub fn open(file: Arc<dyn DurableFile>) -> Result<Self, DbError> {
        let db = Database::builder()
            .set_cache_size(4 << 20)
            .create_with_backend(RedbBackend(file))
            .map_err(db_err("opening"))?;
        let store = Self { db };
        let what = "creating tables";
        let version = store.setting(SETTING_FORMAT)?;
        match version {
            Some(FORMAT_VERSION) => {}
            Some(other) => {
                return Err(DbError {
                    what: "opening",
                    message: format!(
                        "format version {other}; this build reads version {FORMAT_VERSION}"
                    ),
                });
            }
            None => store.commit(what, |commit| {
                let mut settings = commit.txn.open_table(SETTINGS).map_err(db_err(what))?;
                settings
                    .insert(SETTING_FORMAT, FORMAT_VERSION)
                    .map_err(db_err(what))?;
                commit.txn.open_table(ITEMS).map_err(db_err(what))?;
                commit.txn.open_table(JOBS).map_err(db_err(what))?;
                commit.txn.open_table(SLOTS).map_err(db_err(what))?;
                Ok(())
            })?,
        }
        Ok(store)
    }

    /// Opens or creates [`CONTROL_FILE`] in `dir`. A creation is bracketed by the marker
    /// [`CREATING_MARKER`] (made durable first, removed after the store's first commit), so a
    /// crash in the middle of it leaves the marker and a creation that starts over, never a
    /// half-made store taken for a damaged one.
    pub fn open_in(dir: &dyn DurableDir) -> Result<Self, DbError> {
        let what = "opening control.redb";
        let names = dir.list().map_err(db_err(what))?;
        let present = |name: &str| names.iter().any(|n| n == name);
        let creating = present(CREATING_MARKER);
        if present(CONTROL_FILE) && !creating {
            return Self::open(dir.open(CONTROL_FILE, false).map_err(db_err(what))?);
        }
        let what = "creating control.redb";
        if !creating {
            dir.open(CREATING_MARKER, true).map_err(db_err(what))?;
            dir.sync().map_err(db_err(what))?;
        }
        if present(CONTROL_FILE) {
            dir.remove(CONTROL_FILE).map_err(db_err(what))?;
        }
        let file = dir.open(CONTROL_FILE, true).map_err(db_err(what))?;
        dir.sync().map_err(db_err(what))?;
        let store = Self::open(file)?;
        dir.remove(CREATING_MARKER).map_err(db_err(what))?;
        dir.sync().map_err(db_err(what))?;
        Ok(store)
    }

    /// Opens or creates the store of the data directory `data_dir`.
    pub fn open_data_dir(data_dir: &Path) -> Result<Self, DbError> {
        let dir = StdDir::open(data_dir).map_err(|e| DbError {
            what: "opening the data directory",
            message: format!("{}: {e}", data_dir.display()),
        })?;
        Self::open_in(&dir)
    }

    /// A read-only view of the store in `dir`, which no handle may have open (redb refuses a
    /// store whose last writer did not close it: open it for writing to repair it); `None` when
    /// there is none or its creation never completed.
    pub fn open_read_only(dir: &dyn DurableDir) -> Result<Option<ControlView>, DbError> {
        let what = "opening control.redb read-only";
        let names = dir.list().map_err(db_err(what))?;
        let present = |name: &str| names.iter().any(|n| n == name);
        if !present(CONTROL_FILE) || present(CREATING_MARKER) {
            return Ok(None);
        }
        let file = dir.open(CONTROL_FILE, false).map_err(db_err(what))?;
        let db = Database::builder()
            .set_cache_size(1 << 20)
            .open_read_only_with_backend(RedbBackend(file))
            .map_err(db_err(what))?;
        Ok(Some(ControlView { db }))
    }

    /// Runs `change` in one write transaction and commits it durably (two-phase commit); an
    /// error from `change` aborts the transaction and changes nothing.
    pub fn commit<T>(
        &self,
        what: &'static str,
        change: impl FnOnce(&mut Commit<'_>) -> Result<T, DbError>,
    ) -> Result<T, DbError> {
        let mut txn = self.db.begin_write().map_err(db_err(what))?;
        txn.set_two_phase_commit(true);
        txn.set_quick_repair(true);
        let out = change(&mut Commit { txn: &txn })?;
        txn.commit().map_err(db_err(what))?;
        Ok(out)
    }

    fn setting(&self, name: &str) -> Result<Option<u64>, DbError> {
        read_setting(&self.db, name)
    }

    /// Every record, by item, as stored.
    pub fn records(&self) -> Result<BTreeMap<[u8; 16], Vec<u8>>, DbError> {
        read_records(&self.db)
    }

    /// One item's record as stored.
    pub fn record_bytes(&self, item: &[u8; 16]) -> Result<Option<Vec<u8>>, DbError> {
        read_record(&self.db, item)
    }

    /// Every job, by id, as stored.
    pub fn jobs(&self) -> Result<BTreeMap<u64, Vec<u8>>, DbError> {
        read_jobs(&self.db)
    }

    /// The slot table; `None` when it was never written.
    pub fn slots(&self) -> Result<Option<StoredSlots>, DbError> {
        read_slots(&self.db)
    }

    /// Every export's record, by export id, as stored.
    pub fn exports(&self) -> Result<BTreeMap<[u8; 16], Vec<u8>>, DbError> {
        let what = "reading the exports";
        let txn = self.db.begin_read().map_err(db_err(what))?;
        let table = match txn.open_table(EXPORTS) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(BTreeMap::new()),
            Err(e) => return Err(db_err(what)(e)),
        };
        let mut out = BTreeMap::new();
        for entry in table.iter().map_err(db_err(what))? {
            let (key, value) = entry.map_err(db_err(what))?;
            out.insert(item_of(key.value()), value.value().to_vec());
        }
        Ok(out)
    }
}

impl ControlView {
    /// Every record, by item, as stored.
    pub fn records(&self) -> Result<BTreeMap<[u8; 16], Vec<u8>>, DbError> {
        read_records(&self.db)
    }

    /// One item's record as stored.
    pub fn record_bytes(&self, item: &[u8; 16]) -> Result<Option<Vec<u8>>, DbError> {
        read_record(&self.db, item)
    }

    /// Every job, by id, as stored.
    pub fn jobs(&self) -> Result<BTreeMap<u64, Vec<u8>>, DbError> {
        read_jobs(&self.db)
    }

    /// The slot table; `None` when it was never written.
    pub fn slots(&self) -> Result<Option<StoredSlots>, DbError> {
        read_slots(&self.db)
    }
}

fn read_setting(db: &impl ReadableDatabase, name: &str) -> Result<Option<u64>, DbError> {
    let what = "reading a setting";
    let txn = db.begin_read().map_err(db_err(what))?;
    let table = match txn.open_table(SETTINGS) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(db_err(what)(e)),
    };
    Ok(table.get(name).map_err(db_err(what))?.map(|v| v.value()))
}

fn read_records(db: &impl ReadableDatabase) -> Result<BTreeMap<[u8; 16], Vec<u8>>, DbError> {
    let what = "reading the item records";
    let txn = db.begin_read().map_err(db_err(what))?;
    let table = txn.open_table(ITEMS).map_err(db_err(what))?;
    let mut out = BTreeMap::new();
    for entry in table.iter().map_err(db_err(what))? {
        let (key, value) = entry.map_err(db_err(what))?;
        out.insert(item_of(key.value()), value.value().to_vec());
    }
    Ok(out)
}

fn read_record(db: &impl ReadableDatabase, item: &[u8; 16]) -> Result<Option<Vec<u8>>, DbError> {
    let what = "reading an item record";
    let txn = db.begin_read().map_err(db_err(what))?;
    let table = txn.open_table(ITEMS).map_err(db_err(what))?;
    Ok(table
        .get(item_key(item))
        .map_err(db_err(what))?
        .map(|v| v.value().to_vec()))
}

fn read_jobs(db: &impl ReadableDatabase) -> Result<BTreeMap<u64, Vec<u8>>, DbError> {
    let what = "reading the jobs";
    let txn = db.begin_read().map_err(db_err(what))?;
    let table = txn.open_table(JOBS).map_err(db_err(what))?;
    let mut out = BTreeMap::new();
    for entry in table.iter().map_err(db_err(what))? {
        let (key, value) = entry.map_err(db_err(what))?;
        out.insert(key.value(), value.value().to_vec());
    }
    Ok(out)
}

fn read_slots(db: &impl ReadableDatabase) -> Result<Option<StoredSlots>, DbError> {
    let what = "reading the slot table";
    let need_rebuild = read_setting(db, SETTING_SLOTS_NEED_REBUILD)? == Some(1);
    let slot_count = match read_setting(db, SETTING_SLOT_COUNT)? {
        Some(count) => count,
        None if need_rebuild => 0,
        None => return Ok(None),
    };
    let slot_count = u32::try_from(slot_count).map_err(|_| DbError {
        what,
        message: format!("slot count {slot_count} is beyond u32"),
    })?;
    let txn = db.begin_read().map_err(db_err(what))?;
    let table = txn.open_table(SLOTS).map_err(db_err(what))?;
    let mut rows = Vec::new();
    for entry in table.iter().map_err(db_err(what))? {
        let (key, value) = entry.map_err(db_err(what))?;
        rows.push(SlotEntry::decode(key.value(), value.value()));
    }
    Ok(Some(StoredSlots {
        slot_count,
        rows,
        need_rebuild,
    }))
}
