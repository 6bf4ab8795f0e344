//! Enable: checks, slots, replica disks, token, record, replication and job of a new item.

/// Most disks per item (the stream format allows more; one VM rarely has more than 64).
const MAX_ITEM_DISKS: usize = 64;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::Context;
use engine::delta::{DiskGeometry, StreamHeader};

use crate::jobs::PendingJob;
use crate::slots::{DiskRequest, ItemId, SlotError, SlotState};
use crate::store::{ItemDirs, item_hex};
use engine::clock::now_unix_ns;

use super::error::{OpError, bad};
use super::item::{Item, lock};
use super::manager::Manager;
use super::model::{
    DiskOrigin, DiskRecord, EnableRequest, Enabled, MAX_NAME_CHARS, Policy, PolicyRequest, Role,
};
use super::paths::disk_size;
use super::record::{ItemRecord, put_record, write_token};
use super::state::initial;

impl Manager {
    /// Enable protection: slots, replica disks, token, record, replication, job.
    pub fn enable(&self, request: EnableRequest) -> Result<Enabled, OpError> {
        let _ops = lock(&self.ops);
        self.enable_locked(request, Role::Forward, None)
    }

    pub(super) fn policy(&self, request: Option<PolicyRequest>) -> Result<Policy, OpError> {
        let request = request.unwrap_or_default();
        let keep_points = request
            .keep_points
            .unwrap_or(self.options.keep_points as u64);
        if !(1..=100_000).contains(&keep_points) {
            return Err(bad("policy.keep_points", "must be 1..=100000"));
        }
        let keep_minutes = request.keep_minutes.unwrap_or(0);
        if keep_minutes > 60 * 24 * 366 {
            return Err(bad(
                "policy.keep_minutes",
                "must be at most a year (527040)",
            ));
        }
        let app_consistent_minutes = request.app_consistent_minutes.unwrap_or(60);
        if !(1..=60 * 24).contains(&app_consistent_minutes) {
            return Err(bad("policy.app_consistent_minutes", "must be 1..=1440"));
        }
        Ok(Policy {
            keep_points,
            keep_minutes,
            app_consistent_minutes,
        })
    }

    pub(super) fn enable_locked(
        &self,
        request: EnableRequest,
        role: Role,
        reverse_of: Option<String>,
    ) -> Result<Enabled, OpError> {
        // Characters, not bytes, so that the OpenAPI schema can state it (maxLength); 63
        // characters of UTF-8 always fit the stream header's 255 bytes.
        let name = request.name.trim().to_owned();
        if name.is_empty()
            || request.name.chars().count() > MAX_NAME_CHARS
            || request.name.chars().any(char::is_control)
        {
            return Err(bad(
                "name",
                format!(
                    "must be 1..={MAX_NAME_CHARS} characters without control characters, not \
                     only white space"
                ),
            ));
        }
        if request.disks.is_empty() || request.disks.len() > MAX_ITEM_DISKS {
            return Err(bad(
                "disks",
                format!("needs 1..={MAX_ITEM_DISKS} disks, OS disk first"),
            ));
        }
        let policy = self.policy(request.policy)?;
        // Every check before the first change.
        let attached_paths: Vec<PathBuf> = lock(&self.slots)
            .table()
            .into_iter()
            .filter_map(|row| match row.state {
                SlotState::Attached { path, .. } => Some(path),
                _ => None,
            })
            .collect();
        let mut planned: Vec<(DiskGeometry, Option<PathBuf>)> = Vec::new();
        for (index, disk) in request.disks.iter().enumerate() {
            let field = format!("disks[{index}]");
            let block_size_bytes = disk.block_size_bytes.unwrap_or(4096);
            if !engine::delta::BLOCK_SIZES.contains(&block_size_bytes) {
                return Err(bad(
                    format!("{field}.block_size_bytes"),
                    "must be 512 or 4096",
                ));
            }
            match (disk.size_mib, &disk.path) {
                (Some(size_mib), None) => {
                    if size_mib == 0 || size_mib > 64 << 20 {
                        return Err(bad(format!("{field}.size_mib"), "must be 1..=67108864"));
                    }
                    planned.push((
                        DiskGeometry {
                            size_bytes: size_mib << 20,
                            block_size_bytes,
                        },
                        None,
                    ));
                }
                (None, Some(raw)) => {
                    let path = self.check_path(raw, &format!("{field}.path"))?;
                    let size_bytes = disk_size(&path).map_err(|why| OpError::Conflict {
                        code: "disk_mismatch",
                        message: format!("{field}.path {}: {why}", path.display()),
                    })?;
                    if size_bytes == 0 || size_bytes % u64::from(block_size_bytes) != 0 {
                        return Err(OpError::Conflict {
                            code: "disk_mismatch",
                            message: format!(
                                "{field}.path {}: {size_bytes} bytes is not a non-zero multiple \
                                 of the {block_size_bytes}-byte block size",
                                path.display()
                            ),
                        });
                    }
                    if attached_paths.contains(&path)
                        || planned.iter().any(|(_, p)| p.as_ref() == Some(&path))
                    {
                        return Err(OpError::Conflict {
                            code: "path_in_use",
                            message: format!(
                                "{field}.path {} is already attached as a replica disk",
                                path.display()
                            ),
                        });
                    }
                    planned.push((
                        DiskGeometry {
                            size_bytes,
                            block_size_bytes,
                        },
                        Some(path),
                    ));
                }
                _ => {
                    return Err(bad(
                        field,
                        "give exactly one of size_mib (create a disk) or path (attach one)",
                    ));
                }
            }
        }
        let temporary = match &request.temporary_os_disk {
            Some(raw) => {
                let path = self.check_path(raw, "temporary_os_disk")?;
                if path.exists() {
                    return Err(OpError::Conflict {
                        code: "path_in_use",
                        message: format!("temporary_os_disk {} already exists", path.display()),
                    });
                }
                if !path.parent().is_some_and(Path::is_dir) {
                    return Err(bad(
                        "temporary_os_disk",
                        format!("{}: its directory does not exist", path.display()),
                    ));
                }
                Some(path)
            }
            None => None,
        };
        let item_id: [u8; 16] = crate::secrets::random_bytes()?;
        let hex = item_hex(&item_id);
        let header = StreamHeader {
            item_id,
            item_name: name.clone(),
            first_seq: 1,
            disks: planned.iter().map(|(g, _)| *g).collect(),
        };
        header
            .validate()
            .map_err(|e| bad("disks", format!("{e}")))?;
        let requests: Vec<DiskRequest> = (0..planned.len() as u32)
            .map(|disk_index| DiskRequest {
                item: ItemId(item_id),
                disk_index,
            })
            .collect();
        let op = self.next_op.fetch_add(1, Ordering::Relaxed);
        let reservation = lock(&self.slots)
            .reserve(op, &requests)
            .map_err(|e| match e {
                SlotError::NotEnoughSlots { needed, free } => {
                    OpError::NotEnoughSlots { needed, free }
                }
                other => OpError::Io(format!("slot table: {other}")),
            })?;
        crate::testhook::crash_point("enable:reserved");
        // From here on a failure undoes what was made. A crash before the commit below leaves
        // the `enabling` marker and no record: the next start rolls the item back.
        let mut made: Vec<PathBuf> = Vec::new();
        let built = (|| -> anyhow::Result<(ItemDirs, ItemRecord, String, PendingJob)> {
            made.push(self.data.begin_item(&item_id)?);
            crate::testhook::crash_point("enable:item-dir");
            let dirs = self.data.item_for(&header)?;
            crate::testhook::crash_point("enable:header");
            let mut disks = Vec::new();
            for (index, (geometry, attach)) in planned.iter().enumerate() {
                let (path, origin) = match attach {
                    Some(path) => (path.clone(), DiskOrigin::Attached),
                    None => {
                        let path = dirs.replica_path(index);
                        let file = crate::store::create_private_file(&path)?;
                        file.set_len(geometry.size_bytes).map_err(|source| {
                            if source.raw_os_error() == Some(nix::libc::EFBIG) {
                                anyhow::Error::new(DiskTooLarge {
                                    field: format!("disks[{index}].size_mib"),
                                    size_bytes: geometry.size_bytes,
                                    path: path.display().to_string(),
                                    source,
                                })
                            } else {
                                anyhow::Error::new(source)
                                    .context(format!("sizing {}", path.display()))
                            }
                        })?;
                        file.sync_all()?;
                        (path, DiskOrigin::Created)
                    }
                };
                disks.push(DiskRecord {
                    index: index as u32,
                    size_bytes: geometry.size_bytes,
                    block_size_bytes: geometry.block_size_bytes,
                    path: path.display().to_string(),
                    origin,
                });
            }
            if let Some(path) = &temporary {
                self.data.note_enabling(&dirs.root, path)?;
                engine::vhd::create_temporary_os_disk(path)
                    .with_context(|| format!("creating {}", path.display()))?;
                made.push(path.clone());
                if let Some(parent) = path.parent() {
                    crate::store::sync_dir(parent)?;
                }
            }
            crate::store::sync_dir(&dirs.root.join("replicas"))?;
            crate::testhook::crash_point("enable:replicas");
            let token = crate::secrets::new_token()?;
            write_token(&dirs.root, &token)?;
            crate::testhook::crash_point("enable:token");
            let reverse = role == Role::Reverse || temporary.is_some();
            let (state, kind) = initial(reverse);
            let job = self.jobs.prepare(
                kind,
                &hex,
                "waiting for the agent's first full copy and first recovery point",
            )?;
            crate::testhook::crash_point("enable:job");
            let now = now_unix_ns();
            let record = ItemRecord {
                version: 1,
                id: hex.clone(),
                name: name.clone(),
                state,
                role: if reverse {
                    Role::Reverse
                } else {
                    Role::Forward
                },
                reverse_of: reverse_of.clone(),
                reversed_by: None,
                disks,
                policy,
                temporary_os_disk: temporary.as_ref().map(|p| p.display().to_string()),
                test_failover: None,
                failover: None,
                pending: None,
                sync_from_seq: 1,
                last_job: Some(job.id()),
                last_error: None,
                created_ns: now,
                updated_ns: now,
            };
            Ok((dirs, record, token, job))
        })();
        let undo_made = |made: &[PathBuf]| {
            for path in made.iter().rev() {
                let _ = if path.is_dir() {
                    std::fs::remove_dir_all(path)
                } else {
                    std::fs::remove_file(path)
                };
            }
        };
        let (dirs, record, token, job) = match built {
            Ok(built) => built,
            Err(error) => {
                let _ = lock(&self.slots).release_reservation(reservation);
                undo_made(&made);
                if let Some(too_large) = error.downcast_ref::<DiskTooLarge>() {
                    return Err(OpError::Conflict {
                        code: "disk_too_large",
                        message: too_large.to_string(),
                    });
                }
                return Err(error.into());
            }
        };
        let paths = record
            .disks
            .iter()
            .map(|d| PathBuf::from(&d.path))
            .collect();
        // The commit point: the slots, the record and the job in one transaction. Before it a
        // crash leaves the `enabling` marker and no record (the next start rolls the item
        // back); after it the item is whole. Bound first: the guard of an `if let` scrutinee
        // lives through its block.
        let committed = if crate::testhook::fail_point("enable:slots-commit") {
            Err("APPLIANCE_TEST_FAIL_AT=enable:slots-commit".to_owned())
        } else {
            lock(&self.slots)
                .commit_with(reservation, paths, |commit| {
                    job.put(commit)?;
                    put_record(commit, &item_id, &record)
                })
                .map_err(|e| e.to_string())
        };
        if let Err(error) = committed {
            // A commit that failed may leave the reservation (it is consumed): free it. Nothing
            // was recorded: what enable made goes.
            let _ = lock(&self.slots).release_op(op);
            undo_made(&made);
            return Err(OpError::Io(format!(
                "attaching the disks to slots failed: {error}"
            )));
        }
        crate::testhook::crash_point("enable:record");
        let job = self.jobs.publish(job);
        let item = Arc::new(Item::new(
            item_id,
            dirs,
            token.clone().into_bytes(),
            record,
            self.control.clone(),
        ));
        if let Err(error) = self.data.end_enabling(&item.dirs.root) {
            // Harmless: the next start removes a marker beside a record.
            tracing::warn!(item = %hex, error = %crate::store::describe(&error),
                "removing the enable marker");
        }
        crate::testhook::crash_point("enable:slots");
        lock(&self.items).insert(item_id, item.clone());
        if let Err(error) = self.start_replication(&item) {
            let message = crate::store::describe(&error);
            let _ = item.update(|r| r.last_error = Some(message.clone()));
            return Err(OpError::Io(format!(
                "item {hex} was created but its replication did not start: {message}"
            )));
        }
        crate::testhook::crash_point("enable:started");
        tracing::info!(item = %hex, %name, disks = planned.len(), "protection enabled");
        Ok(Enabled {
            item: self.view(&item),
            stream_token: token,
            job: job.view(),
        })
    }
}

/// A disk larger than the filesystem allows for one file (EFBIG at its creation).
#[derive(Debug, thiserror::Error)]
#[error(
    "{field}: {size_bytes} bytes is larger than the filesystem of {path} allows for one file ({source})"
)]
struct DiskTooLarge {
    field: String,
    size_bytes: u64,
    path: String,
    source: std::io::Error,
}
