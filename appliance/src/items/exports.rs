//! Exports of an item's recovery points over NBD: make, list and remove them; drop an item's
//! exports when its replicas go away; serve the stored ones again at start.
//!
//! An export pins its point (the item's pins, which every apply worker of the item honours)
//! for as long as a disk of it is open, so retention keeps the point and every newer one.
//! Replication keeps running. A drill's overlay lives in the item's directory
//! (`exports/<export id>/disk-<i>.{data,map}`), so nothing of it ever reaches a replica or a
//! point, and disabling the item removes it with the rest.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use appliance_api::model::{ExportMode, ExportPurpose, ExportRequest, ExportView};
use engine::apply::ApplyConfig;
use engine::dirfd::Dir;
use engine::durable::StdDir;
use engine::export::{ExportDisk, Overlay, PointView, ViewSource};
use engine::meta::item_key;

use crate::exports::{ExportRecord, Live, NbdDisk};
use crate::secrets::random_bytes;
use crate::store::{item_hex, parse_item_hex};
use crate::target::{file_identity, written_id};

use super::error::{OpError, bad};
use super::item::{Item, lock};
use super::manager::Manager;
use super::materialize::point_choice;
use super::model::{ItemState, WrittenFile};
use super::record::ItemRecord;

/// Live exports at once, across items (each pins a point and holds files open).
pub const MAX_EXPORTS: usize = 64;

/// Grain of a drill's overlay.
pub const OVERLAY_GRAIN_BYTES: u32 = 4096;

/// States whose replicas and points an export may read.
fn exportable(state: ItemState) -> bool {
    matches!(
        state,
        ItemState::Protected
            | ItemState::TestFailover
            | ItemState::Resyncing
            | ItemState::FailedOver
            | ItemState::Committed
    )
}

impl Manager {
    /// `POST /v1/items/{id}/exports`: serves a retained point of the item over NBD.
    pub fn export(&self, hex: &str, request: ExportRequest) -> Result<ExportView, OpError> {
        let _ops = lock(&self.ops);
        let item = self.find(hex)?;
        let state = item.record().state;
        if !exportable(state) {
            return Err(OpError::Conflict {
                code: "wrong_state",
                message: format!(
                    "item {hex} is {state}: an export reads its replicas and recovery points, \
                     which exist while it is protected, test_failover, resyncing, failed_over \
                     or committed"
                ),
            });
        }
        let choice = point_choice(&request.point, false)?;
        let point_id = self.resolve(&item, choice)?;
        let live = self.make_export(&item, ExportPurpose::Export, request.mode, point_id)?;
        Ok(self.exports.view(&live))
    }

    /// Refuses a new export when [`MAX_EXPORTS`] are live.
    fn check_export_room(&self) -> Result<(), OpError> {
        let live = self.exports.all().len();
        if live >= MAX_EXPORTS {
            return Err(OpError::Conflict {
                code: "too_many_exports",
                message: format!(
                    "{live} exports are live, the limit is {MAX_EXPORTS}; remove one first"
                ),
            });
        }
        Ok(())
    }

    /// Makes, stores and serves a new export of `item` at `point_id` (under `ops`).
    pub(super) fn make_export(
        &self,
        item: &Item,
        purpose: ExportPurpose,
        mode: ExportMode,
        point_id: u64,
    ) -> Result<Arc<Live>, OpError> {
        self.check_export_room()?;
        let id: [u8; 16] = random_bytes()?;
        let disk_count = item.record().disks.len();
        let names = (0..disk_count)
            .map(|_| random_bytes::<16>().map(hex::encode))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let record = ExportRecord {
            id: item_hex(&id),
            item: item.hex.clone(),
            purpose,
            mode,
            point_id,
            created_ns: engine::clock::now_unix_ns(),
            names,
            copy: None,
            targets: Vec::new(),
        };
        let live = self.open_export(item, &record, true).map_err(|e| {
            remove_overlays(item, &record.id);
            match e.downcast_ref::<engine::export::ExportError>() {
                Some(engine::export::ExportError::NoSuchPoint { .. }) => OpError::NotFound {
                    code: "point_not_found",
                    message: crate::store::describe(&e),
                },
                _ => OpError::from(e),
            }
        })?;
        if let Err(e) = self
            .control
            .commit("recording an export", |c| c.put_export(&id, &record))
        {
            drop(live);
            remove_overlays(item, &record.id);
            return Err(OpError::Io(e.to_string()));
        }
        self.exports.insert(id, live.clone());
        tracing::info!(item = %item.hex, export = %record.id, point_id, mode = mode.name(),
            purpose = purpose.name(), "export served over NBD");
        Ok(live)
    }

    /// Opens the disks of `record`, creating a drill's overlays when `create` (else opening
    /// and recovering them).
    pub(super) fn open_export(
        &self,
        item: &Item,
        record: &ExportRecord,
        create: bool,
    ) -> anyhow::Result<Arc<Live>> {
        let item_record = item.record().clone();
        let dir = export_dir(item, &record.id);
        let overlays = match record.mode {
            ExportMode::Drill if !record.switched() => {
                if create {
                    crate::store::create_private_dir(&dir)?;
                }
                Some(StdDir::open(&dir).with_context(|| format!("opening {}", dir.display()))?)
            }
            _ => None,
        };
        let targets = match record.switched() {
            true => Some(failover_files(&item_record)?),
            false => None,
        };
        let mut disks = Vec::with_capacity(item_record.disks.len());
        for (index, disk) in item_record.disks.iter().enumerate() {
            let export_disk = if let Some((dir, written)) = &targets {
                // The files the failover published, through its directory and by identity:
                // never a link or a file planted at the name since.
                let file = written
                    .get(index)
                    .with_context(|| format!("the failover recorded no file for disk {index}"))
                    .and_then(|w| {
                        dir.open_ours(std::ffi::OsStr::new(&w.name), written_id(w))
                            .map_err(|e| anyhow::anyhow!("{}", engine::error::report(&e)))
                    })
                    .with_context(|| format!("opening the failover's disk {index}"))?;
                ExportDisk::target(Arc::new(file), disk.size_bytes)
            } else {
                let view = self.open_view(item, index, record.point_id)?;
                match &overlays {
                    None => ExportDisk::read_only(view),
                    Some(dir) => {
                        let stem = ExportRecord::overlay_stem(index);
                        let overlay = if create {
                            Overlay::create(dir, &stem, disk.size_bytes, OVERLAY_GRAIN_BYTES)?
                        } else {
                            Overlay::open(dir, &stem, disk.size_bytes, OVERLAY_GRAIN_BYTES)?
                        };
                        ExportDisk::drill(view, overlay)
                    }
                }
            };
            disks.push(Arc::new(NbdDisk::new(export_disk, disk.block_size_bytes)));
        }
        Ok(Arc::new(Live {
            record: Mutex::new(record.clone()),
            disks,
            copy_gate: Default::default(),
        }))
    }

    /// Disk `index` of `item` at `point_id`, pinned while the view lives.
    pub(super) fn open_view(
        &self,
        item: &Item,
        index: usize,
        point_id: u64,
    ) -> anyhow::Result<PointView> {
        let record = item.record().clone();
        let geometries = record.geometries();
        let (Some(disk), Some(geometry)) = (record.disks.get(index), geometries.get(index)) else {
            anyhow::bail!("item {} has no disk {index}", item.hex);
        };
        let replica = File::open(&disk.path)
            .with_context(|| format!("opening replica disk {}", disk.path))?;
        Ok(PointView::open(
            ViewSource {
                meta: self.meta.clone(),
                item: item_key(&item.id),
                disk_index: u16::try_from(index).context("disk index")?,
                disk: *geometry,
                preserve_dir: Arc::new(item.dirs.preserve()?),
                grain_bytes: ApplyConfig::default().grain_bytes,
                pins: item.pins.clone(),
            },
            point_id,
            Arc::new(replica),
        )?)
    }

    /// `DELETE /v1/exports/{export_id}`: an export made by `POST .../exports` (a test
    /// failover's or failover's goes with that operation).
    pub fn remove_export(&self, id_hex: &str) -> Result<ExportView, OpError> {
        let _ops = lock(&self.ops);
        let (id, live) = self.find_export(id_hex)?;
        let purpose = live.record().purpose;
        let item = live.record().item.clone();
        match purpose {
            ExportPurpose::Export => {}
            ExportPurpose::TestFailover => {
                return Err(OpError::Conflict {
                    code: "export_in_use",
                    message: format!(
                        "export {id_hex} holds item {item}'s test failover: \
                         POST /v1/items/{item}/test-failover/cleanup removes it"
                    ),
                });
            }
            ExportPurpose::Failover => {
                return Err(OpError::Conflict {
                    code: "export_in_use",
                    message: format!(
                        "export {id_hex} serves item {item}'s failover (the VM runs on it); it \
                         stays until the item is disabled"
                    ),
                });
            }
        }
        let view = self.exports.view(&live);
        drop(live);
        self.drop_export(&id)?;
        Ok(view)
    }

    /// Stops serving export `id` (clients disconnected), forgets its record and removes its
    /// overlay files. The point is unpinned once the last client's connection ends.
    pub(super) fn drop_export(&self, id: &[u8; 16]) -> anyhow::Result<()> {
        let live = self.exports.remove(id);
        self.control
            .commit("removing an export", |c| c.remove_export(id))?;
        if let Some(live) = live {
            let record = live.record().clone();
            drop(live);
            if let Some(item) = parse_item_hex(&record.item)
                .ok()
                .and_then(|item| self.item(&item))
            {
                remove_overlays(&item, &record.id);
            }
        }
        Ok(())
    }

    /// Drops every export of `item` (its replicas are going away or being handed back).
    pub(super) fn drop_item_exports(&self, item: &Item) {
        for (id, _) in self.exports.of_item(&item.hex) {
            if let Err(e) = self.drop_export(&id) {
                tracing::error!(item = %item.hex, export = %item_hex(&id),
                    error = %crate::store::describe(&e), "removing an export");
            }
        }
    }

    /// Shutdown, after the NBD server stopped: makes every export's acknowledged writes
    /// durable (a drill's overlay map, a failover's target files), as a client's FLUSH would,
    /// so a clean stop loses none of them. Returns what could not be flushed.
    pub(super) fn flush_exports(&self) -> Vec<String> {
        let mut failures = Vec::new();
        for (id, live) in self.exports.all() {
            for (index, disk) in live.disks.iter().enumerate() {
                if let Err(e) = disk.disk().flush() {
                    failures.push(format!(
                        "export {} disk {index}: flushing its writes: {}",
                        item_hex(&id),
                        engine::error::report(&e)
                    ));
                }
            }
        }
        failures
    }

    /// The NBD server's catalog: every live export's disks by their secret names.
    pub fn nbd_catalog(&self) -> Arc<dyn nbd_server::Catalog> {
        self.exports.clone()
    }

    /// Tells the exports where the NBD server listens (for their URIs) and how to end a
    /// removed export's sessions.
    pub fn set_nbd_server(&self, server: &nbd_server::Server) {
        self.exports
            .set_server(server.local_addr(), server.disconnector());
    }

    /// `GET /v1/exports`.
    pub fn exports_view(&self) -> Vec<ExportView> {
        self.exports
            .all()
            .iter()
            .map(|(_, live)| self.exports.view(live))
            .collect()
    }

    /// `GET /v1/exports/{export_id}`.
    pub fn export_view(&self, id_hex: &str) -> Result<ExportView, OpError> {
        let (_, live) = self.find_export(id_hex)?;
        Ok(self.exports.view(&live))
    }

    pub(super) fn find_export(&self, id_hex: &str) -> Result<([u8; 16], Arc<Live>), OpError> {
        let id = parse_item_hex(id_hex).map_err(|_| OpError::BadRequest {
            code: "bad_export_id",
            field: None,
            message: format!("{id_hex:?} is not an export id (32 hex digits)"),
        })?;
        let live = self.exports.get(&id).ok_or_else(|| OpError::NotFound {
            code: "export_not_found",
            message: format!("no export {id_hex} on this appliance"),
        })?;
        Ok((id, live))
    }

    /// Start-up: serves every stored export again under its names, before replication starts
    /// (so each point is pinned before any pruning). An export whose item is gone or no longer
    /// has its replicas is dropped; one that cannot be opened is reported and, unless a
    /// failover runs on it, dropped.
    pub(super) fn recover_exports(&self) -> anyhow::Result<()> {
        for (id, bytes) in self.control.exports()? {
            let record: ExportRecord = match serde_json::from_slice(&bytes) {
                Ok(record) => record,
                Err(e) => {
                    tracing::error!(export = %item_hex(&id), error = %e,
                        "export record unreadable: dropped");
                    self.control
                        .commit("removing an export", |c| c.remove_export(&id))?;
                    continue;
                }
            };
            let item = parse_item_hex(&record.item)
                .ok()
                .and_then(|item| self.item(&item));
            let Some(item) = item.filter(|i| exportable(i.record().state)) else {
                tracing::warn!(export = %record.id, item = %record.item,
                    "export dropped at start: its item is gone or holds no replicas now");
                self.control
                    .commit("removing an export", |c| c.remove_export(&id))?;
                continue;
            };
            match self.open_export(&item, &record, false) {
                Ok(live) => {
                    self.exports.insert(id, live);
                    tracing::info!(export = %record.id, item = %record.item,
                        "export served again after the restart");
                }
                Err(e) if record.purpose == ExportPurpose::Export => {
                    tracing::error!(export = %record.id, error = %crate::store::describe(&e),
                        "export could not be opened at start: dropped");
                    self.control
                        .commit("removing an export", |c| c.remove_export(&id))?;
                    remove_overlays(&item, &record.id);
                }
                Err(e) => {
                    tracing::error!(export = %record.id, purpose = record.purpose.name(),
                        error = %crate::store::describe(&e),
                        "export could not be opened at start: not served (its record is kept)");
                }
            }
        }
        Ok(())
    }
}

/// The directory of the failover's disks (the one it chose, by identity) and the files it
/// published there.
fn failover_files(record: &ItemRecord) -> anyhow::Result<(Dir, Vec<WrittenFile>)> {
    let failover = record
        .failover
        .as_ref()
        .context("the export serves a failover's files, but the item records no failover")?;
    let (dir, _) = Dir::open_nofollow(Path::new(&failover.target_dir), false)
        .map_err(|e| anyhow::anyhow!("{}", engine::error::report(&e)))?;
    if Some(file_identity(dir.id())) != failover.target_dir_id {
        anyhow::bail!(
            "{} is no longer the directory the failover wrote",
            failover.target_dir
        );
    }
    Ok((dir, failover.written.clone()))
}

/// Where export `id_hex` of `item` keeps its overlays.
fn export_dir(item: &Item, id_hex: &str) -> PathBuf {
    item.dirs.root.join("exports").join(id_hex)
}

/// Removes an export's directory (its overlays), if any; failures are logged.
pub(super) fn remove_overlays(item: &Item, id_hex: &str) {
    let dir = export_dir(item, id_hex);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::error!(dir = %dir.display(), error = %e, "removing an export's overlay");
        }
    }
}

/// An export's request checked for test failover and failover in export mode.
pub(super) fn check_export_mode_request(
    target_dir: Option<&str>,
    format: appliance_api::model::Format,
) -> Result<(), OpError> {
    if format != appliance_api::model::Format::Raw {
        return Err(bad(
            "format",
            "export mode serves raw disks over NBD; a format applies to copy mode",
        ));
    }
    if let Some(dir) = target_dir
        && !dir.is_empty()
    {
        return Err(bad(
            "target_dir",
            "a test failover in export mode writes no files; leave target_dir out",
        ));
    }
    Ok(())
}
