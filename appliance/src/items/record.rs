//! The item's durable record (a row of the control store): its type, reading and writing it, checking it at start.

use std::path::{Path, PathBuf};

use anyhow::Context;
use engine::delta::{DiskGeometry, StreamHeader};
use serde::{Deserialize, Serialize};

use crate::db::{Commit, ControlStore, DbError};
use crate::slots::ItemId;
use crate::store::parse_item_hex;
use engine::clock::now_unix_ns;

use super::model::{DiskOrigin, DiskRecord, ItemState, Materialized, Policy, Role};

/// Name of an item's stream-token file (mode 0600).
const TOKEN_FILE: &str = "token";

// Persistence: the only functions that know where and how a record and a token are kept.

/// Decodes the stored record of item `hex`, or says why it cannot be.
pub(super) fn decode_record(hex: &str, bytes: &[u8]) -> Result<ItemRecord, String> {
    serde_json::from_slice::<ItemRecord>(bytes)
        .map_err(|e| format!("item {hex}: its record in control.redb is not an item record: {e}"))
}

/// Writes `record` of item `id` durably (a transaction of its own).
pub(super) fn write_record(
    store: &ControlStore,
    id: &[u8; 16],
    record: &ItemRecord,
) -> anyhow::Result<()> {
    store.commit("writing an item record", |commit| {
        put_record(commit, id, record)
    })?;
    Ok(())
}

/// Adds `record` of item `id` to a lifecycle step's transaction.
pub(super) fn put_record(
    commit: &mut Commit<'_>,
    id: &[u8; 16],
    record: &ItemRecord,
) -> Result<(), DbError> {
    commit.put_record(id, record)
}

/// Removes the record of item `id` (its directory is gone: the last step of a purge).
pub(super) fn remove_record(store: &ControlStore, id: &[u8; 16]) -> anyhow::Result<()> {
    store.commit("removing an item record", |commit| commit.remove_record(id))?;
    Ok(())
}

/// Reads the stream token of item `hex` in `root` (empty if there is none), or why it cannot be
/// read.
pub(super) fn read_token(root: &Path, hex: &str) -> Result<Vec<u8>, String> {
    match std::fs::read(root.join(TOKEN_FILE)) {
        Ok(token) => Ok(token),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(format!("{}/{TOKEN_FILE}: cannot read: {e}", hex)),
    }
}

/// Writes the stream token into `root` (mode 0600, durably).
pub(super) fn write_token(root: &Path, token: &str) -> anyhow::Result<()> {
    crate::store::write_secret(root, TOKEN_FILE, token.as_bytes())
}

/// Removes the stream token from `root` (nothing if there is none).
pub(super) fn remove_token(root: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(root.join(TOKEN_FILE)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).context("removing the stream token"),
    }
}

/// An item's durable record (table `items` of [`crate::db`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ItemRecord {
    /// Format version of this record (1).
    pub version: u32,
    /// Item id, 32 hex digits.
    pub id: String,
    /// Name.
    pub name: String,
    /// Lifecycle state.
    pub state: ItemState,
    /// Direction.
    pub role: Role,
    /// The item this one re-protects.
    pub reverse_of: Option<String>,
    /// The item that re-protects this one.
    pub reversed_by: Option<String>,
    /// Replica disks.
    pub disks: Vec<DiskRecord>,
    /// Policy.
    pub policy: Policy,
    /// The temporary OS disk made for the original VM by a re-protect.
    pub temporary_os_disk: Option<String>,
    /// The test failover's disks.
    pub test_failover: Option<Materialized>,
    /// The failover's disks.
    pub failover: Option<Materialized>,
    /// Disks a running job is writing (removed if the job is interrupted).
    pub pending: Option<Materialized>,
    /// The sync in progress ends with the first point whose id is at least this.
    pub sync_from_seq: u64,
    /// The newest job on this item.
    pub last_job: Option<u64>,
    /// The last job's error, if it failed.
    pub last_error: Option<String>,
    /// Created, ns since the Unix epoch.
    pub created_ns: u64,
    /// Last changed, ns since the Unix epoch.
    pub updated_ns: u64,
}

impl ItemRecord {
    /// The disks' geometries, in disk order (as the stream header lists them).
    pub(crate) fn geometries(&self) -> Vec<DiskGeometry> {
        self.disks
            .iter()
            .map(|d| DiskGeometry {
                size_bytes: d.size_bytes,
                block_size_bytes: d.block_size_bytes,
            })
            .collect()
    }
}

/// Checks a record read from disk against its directory and header.
pub(super) fn check_record(
    hex: &str,
    record: &ItemRecord,
    header: Option<&StreamHeader>,
) -> Result<(), String> {
    let Some(header) = header else {
        return Err(format!(
            "item {hex}: header.drs is missing but its record exists"
        ));
    };
    if record.version != 1 {
        return Err(format!(
            "item {hex}: its record has format version {}; this build reads version 1",
            record.version
        ));
    }
    if record.id != hex {
        return Err(format!(
            "item {hex}: the stored record records item id {:?}",
            record.id
        ));
    }
    if record.state == ItemState::Quarantined {
        return Err(format!("item {hex}: its record has the state quarantined"));
    }
    let indexed = record
        .disks
        .iter()
        .enumerate()
        .all(|(i, d)| d.index as usize == i);
    if !indexed || record.geometries() != header.disks {
        return Err(format!(
            "item {hex}: its record's disks ({:?}) do not match header.drs ({:?})",
            record.geometries(),
            header.disks
        ));
    }
    Ok(())
}

/// A record for a quarantined item whose stored record cannot be read: its disks from the
/// header, with the paths the slot table holds for them.
pub(super) fn stand_in_record(
    hex: &str,
    root: &Path,
    header: Option<&StreamHeader>,
    attached: &[(ItemId, u32, PathBuf)],
) -> ItemRecord {
    let now = now_unix_ns();
    let id = parse_item_hex(hex).unwrap_or_default();
    let disks = header.map_or_else(Vec::new, |header| {
        header
            .disks
            .iter()
            .enumerate()
            .map(|(index, geometry)| {
                let path = attached
                    .iter()
                    .find(|(item, disk, _)| item.0 == id && *disk as usize == index)
                    .map(|(_, _, path)| path.clone());
                let origin = match &path {
                    Some(path) if !path.starts_with(root) => DiskOrigin::Attached,
                    _ => DiskOrigin::Created,
                };
                DiskRecord {
                    index: index as u32,
                    size_bytes: geometry.size_bytes,
                    block_size_bytes: geometry.block_size_bytes,
                    path: path.map_or_else(String::new, |p| p.display().to_string()),
                    origin,
                }
            })
            .collect()
    });
    ItemRecord {
        version: 1,
        id: hex.to_owned(),
        name: header.map_or_else(String::new, |h| h.item_name.clone()),
        state: ItemState::Quarantined,
        role: Role::Forward,
        reverse_of: None,
        reversed_by: None,
        disks,
        policy: Policy {
            keep_points: 1,
            keep_minutes: 0,
            app_consistent_minutes: 60,
        },
        temporary_os_disk: None,
        test_failover: None,
        failover: None,
        pending: None,
        sync_from_seq: 1,
        last_job: None,
        last_error: None,
        created_ns: now,
        updated_ns: now,
    }
}

#[cfg(test)]
mod tests;
