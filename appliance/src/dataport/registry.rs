//! How the data port finds items and checks tokens ([`ItemRegistry`], implemented by the item
//! manager), the per-item streaming lease, and [`MemoryRegistry`] for the tests.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use engine::port::{Refusal, Status};
use engine::staging::StagingLog;

use crate::secrets::tokens_equal;

/// Exclusive right to stream into one item; released on drop.
#[derive(Debug)]
pub struct SessionLease {
    busy: Arc<AtomicBool>,
}

impl SessionLease {
    /// Takes the lease if nobody holds it.
    pub fn try_acquire(busy: &Arc<AtomicBool>) -> Option<Self> {
        busy.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| Self { busy: busy.clone() })
    }
}

impl Drop for SessionLease {
    fn drop(&mut self) {
        self.busy.store(false, Ordering::Release);
    }
}

/// A streaming session on one item, as the registry grants it.
pub struct StreamSession {
    /// The item's staging log; the connection locks it for the session's lifetime.
    pub log: Arc<Mutex<StagingLog>>,
    /// Held for the session's lifetime: a second session on the item is refused as busy.
    pub lease: SessionLease,
}

impl std::fmt::Debug for StreamSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamSession")
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

/// Read access to one replica disk, for hashing (mode 2).
pub struct ReplicaAccess {
    /// The replica file or block device.
    pub path: PathBuf,
    /// Held while hashing, e.g. to keep the apply side from writing the replica meanwhile.
    pub guard: Option<Box<dyn Send>>,
}

impl std::fmt::Debug for ReplicaAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaAccess")
            .field("path", &self.path)
            .field("guarded", &self.guard.is_some())
            .finish()
    }
}

/// How the port finds items and checks tokens; the daemon implements it over its item table.
///
/// Both methods must compare tokens with [`tokens_equal`] (constant time).
pub trait ItemRegistry: Send + Sync {
    /// Opens an exclusive streaming session on the item, or says why not
    /// ([`Status::UnknownItem`], [`Status::BadToken`], [`Status::Busy`], …). With
    /// `resync` (the hello's RESYNC flag) the registry must also make sure that every frame
    /// staged so far has been applied: the port then drops them with the resync marker.
    fn open_stream(
        &self,
        item_id: &[u8; 16],
        token: &[u8],
        resync: bool,
    ) -> Result<StreamSession, Refusal>;

    /// Gives read access to replica `disk_index` of the item, or says why not
    /// ([`Status::UnknownItem`], [`Status::BadToken`], [`Status::UnknownDisk`], …).
    fn replica(
        &self,
        item_id: &[u8; 16],
        token: &[u8],
        disk_index: u16,
    ) -> Result<ReplicaAccess, Refusal>;
}

struct MemoryItem {
    token: Vec<u8>,
    log: Arc<Mutex<StagingLog>>,
    busy: Arc<AtomicBool>,
    replicas: Vec<PathBuf>,
}

/// A registry over a map in memory, for tests; the daemon's registry is
/// `crate::items::Manager`.
#[derive(Default)]
pub struct MemoryRegistry {
    items: Mutex<HashMap<[u8; 16], MemoryItem>>,
}

impl std::fmt::Debug for MemoryRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryRegistry")
            .field("items", &self.lock().len())
            .finish()
    }
}

impl MemoryRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<[u8; 16], MemoryItem>> {
        self.items.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds (or replaces) an item: its token, staging log and replica paths (by disk index).
    pub fn insert(
        &self,
        item_id: [u8; 16],
        token: &[u8],
        log: Arc<Mutex<StagingLog>>,
        replicas: Vec<PathBuf>,
    ) {
        self.lock().insert(
            item_id,
            MemoryItem {
                token: token.to_vec(),
                log,
                busy: Arc::new(AtomicBool::new(false)),
                replicas,
            },
        );
    }

    fn check<'a>(
        items: &'a HashMap<[u8; 16], MemoryItem>,
        item_id: &[u8; 16],
        token: &[u8],
    ) -> Result<&'a MemoryItem, Refusal> {
        let item = items.get(item_id).ok_or_else(|| {
            Refusal::new(
                Status::UnknownItem,
                format!("no protected item {}", hex::encode(item_id)),
            )
        })?;
        if !tokens_equal(&item.token, token) {
            return Err(Refusal::new(
                Status::BadToken,
                format!(
                    "the token does not match item {}'s stream token",
                    hex::encode(item_id)
                ),
            ));
        }
        Ok(item)
    }
}

impl ItemRegistry for MemoryRegistry {
    fn open_stream(
        &self,
        item_id: &[u8; 16],
        token: &[u8],
        _resync: bool,
    ) -> Result<StreamSession, Refusal> {
        // No apply side here: the test registry has nothing to wait for.
        let items = self.lock();
        let item = Self::check(&items, item_id, token)?;
        let lease = SessionLease::try_acquire(&item.busy).ok_or_else(|| {
            Refusal::new(
                Status::Busy,
                format!(
                    "another session is streaming item {}; retry after it ends",
                    hex::encode(item_id)
                ),
            )
        })?;
        Ok(StreamSession {
            log: item.log.clone(),
            lease,
        })
    }

    fn replica(
        &self,
        item_id: &[u8; 16],
        token: &[u8],
        disk_index: u16,
    ) -> Result<ReplicaAccess, Refusal> {
        let items = self.lock();
        let item = Self::check(&items, item_id, token)?;
        let path = item.replicas.get(usize::from(disk_index)).ok_or_else(|| {
            Refusal::new(
                Status::UnknownDisk,
                format!(
                    "item {} has {} disks, no disk {disk_index}",
                    hex::encode(item_id),
                    item.replicas.len()
                ),
            )
        })?;
        Ok(ReplicaAccess {
            path: path.clone(),
            guard: None,
        })
    }
}
