//! The data port's registry: which item may stream (token, state, lease), replicas for hashing.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use engine::port::{Refusal, Status};

use crate::dataport::{ItemRegistry, ReplicaAccess, SessionLease, StreamSession, tokens_equal};
use crate::store::item_hex;

use super::item::Item;
use super::manager::Manager;
use super::model::ItemState;
use super::state::replicating;

fn refusal(status: Status, message: impl Into<String>) -> Refusal {
    Refusal::new(status, message.into())
}

impl Manager {
    fn session_item(&self, item_id: &[u8; 16], token: &[u8]) -> Result<Arc<Item>, Refusal> {
        let item = self.item(item_id).ok_or_else(|| {
            refusal(
                Status::UnknownItem,
                format!("no protected item {}", item_hex(item_id)),
            )
        })?;
        if item.token.is_empty() || !tokens_equal(&item.token, token) {
            return Err(refusal(
                Status::BadToken,
                format!("the token does not match item {}'s stream token", item.hex),
            ));
        }
        let state = item.record().state;
        if !replicating(state) {
            return Err(refusal(
                Status::NotReplicating,
                format!(
                    "item {} is {}: it takes no frames in that state",
                    item.hex,
                    state.name()
                ),
            ));
        }
        if let Some(frame) = item.status().and_then(|s| s.unappliable()) {
            return Err(refusal(
                Status::NotReplicating,
                format!(
                    "item {} is apply_failed: {frame}; it takes no frames until an operator \
                     runs resync (or disable)",
                    item.hex
                ),
            ));
        }
        if item.pausing.load(Ordering::Acquire) {
            return Err(refusal(
                Status::Busy,
                format!("item {} is pausing for a resync; retry shortly", item.hex),
            ));
        }
        Ok(item)
    }
}

impl ItemRegistry for Manager {
    fn open_stream(
        &self,
        item_id: &[u8; 16],
        token: &[u8],
        resync: bool,
    ) -> Result<StreamSession, Refusal> {
        let item = self.session_item(item_id, token)?;
        if !resync && item.record().state == ItemState::Resyncing {
            // Until the resync's bookmark is applied the replica may be half old, half new:
            // only the agent's resync session may stream.
            return Err(refusal(
                Status::ResyncRequired,
                format!(
                    "item {} is resyncing: fetch the chunk hashes and reconnect with the \
                     RESYNC flag",
                    item.hex
                ),
            ));
        }
        if resync {
            self.wait_caught_up(&item).map_err(|e| {
                refusal(
                    Status::StagingFailed,
                    format!("item {}: {}", item.hex, crate::store::describe(&e)),
                )
            })?;
        }
        let repl = item.repl();
        let repl = repl.as_ref().ok_or_else(|| {
            refusal(
                Status::StagingFailed,
                format!(
                    "item {}'s replication is not running (see the appliance log)",
                    item.hex
                ),
            )
        })?;
        let lease = SessionLease::try_acquire(&item.busy).ok_or_else(|| {
            refusal(
                Status::Busy,
                format!(
                    "another session is streaming item {}; retry after it ends",
                    item.hex
                ),
            )
        })?;
        let notifier = repl.worker.notifier();
        Ok(StreamSession {
            log: repl.log.clone(),
            lease,
            on_durable: Box::new(move |seq| notifier.notify(seq)),
        })
    }

    fn replica(
        &self,
        item_id: &[u8; 16],
        token: &[u8],
        disk_index: u16,
    ) -> Result<ReplicaAccess, Refusal> {
        let item = self.session_item(item_id, token)?;
        // One lock of the record, released before anything waits.
        let (path, disk_count) = {
            let record = item.record();
            let path = record
                .disks
                .get(usize::from(disk_index))
                .map(|d| PathBuf::from(&d.path));
            (path, record.disks.len())
        };
        let path = path.ok_or_else(|| {
            refusal(
                Status::UnknownDisk,
                format!(
                    "item {} has {disk_count} disks, no disk {disk_index}",
                    item.hex
                ),
            )
        })?;
        let caught_up = |item: &Item| {
            self.wait_caught_up(item).map_err(|e| {
                refusal(
                    Status::ReplicaReadFailed,
                    format!("item {}: {}", item.hex, crate::store::describe(&e)),
                )
            })
        };
        // The hashes must reflect every acknowledged frame, and the replica must not be
        // written while it is hashed: apply what is staged, then take the item's streaming
        // lease (no session can stage frames while the guard lives), then apply what a session
        // staged in between. Apply then has nothing left to write.
        let busy = || {
            refusal(
                Status::Busy,
                format!(
                    "a session is streaming item {}; its replica cannot be hashed while it \
                     changes; retry after the session ends",
                    item.hex
                ),
            )
        };
        if item.busy.load(Ordering::Acquire) {
            return Err(busy());
        }
        caught_up(&item)?;
        let lease = SessionLease::try_acquire(&item.busy).ok_or_else(busy)?;
        caught_up(&item)?;
        Ok(ReplicaAccess {
            path,
            guard: Some(Box::new(lease)),
        })
    }
}
