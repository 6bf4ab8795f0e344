//! Why a slot-table call was refused or failed: [`SlotError`].

use std::path::PathBuf;

use super::{ItemId, Lun, SLOT_COUNT_MAX};

/// Why a slot-table call was refused or failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SlotError {
    /// A slot count outside 1..=256.
    #[error("slot count {slot_count} is outside 1..={SLOT_COUNT_MAX}")]
    SlotCountOutOfRange {
        /// The count given.
        slot_count: u32,
    },
    /// More disks than free slots: nothing was reserved.
    #[error("needs {needed} slots, {free} free")]
    NotEnoughSlots {
        /// Slots the operation needs.
        needed: usize,
        /// Slots free.
        free: usize,
    },
    /// The disk already holds a slot (attached or reserved).
    #[error("item {item} disk {disk_index} already holds LUN {lun}")]
    DiskAlreadyHasSlot {
        /// The item.
        item: ItemId,
        /// The disk.
        disk_index: u32,
        /// The LUN it holds.
        lun: Lun,
    },
    /// A request names the same disk twice.
    #[error("item {item} disk {disk_index} appears twice in one request")]
    DuplicateDisk {
        /// The item.
        item: ItemId,
        /// The disk.
        disk_index: u32,
    },
    /// The operation already holds a reservation.
    #[error("operation {op_id} already holds a reservation")]
    OperationAlreadyReserved {
        /// The operation.
        op_id: u64,
    },
    /// The reservation is not live in this table.
    #[error(
        "operation {op_id} holds no live reservation of LUN {lun} in this slot table (committed, \
         released, or made before a restart)"
    )]
    UnknownReservation {
        /// The operation.
        op_id: u64,
        /// The first LUN that does not match.
        lun: Lun,
    },
    /// `commit` got a different number of paths than reserved slots; the reservation was released.
    #[error("operation {op_id} reserved {reserved} slots but gave {given} paths")]
    PathCountMismatch {
        /// The operation.
        op_id: u64,
        /// Slots reserved.
        reserved: usize,
        /// Paths given.
        given: usize,
    },
    /// A path a slot cannot record; the reservation was released.
    #[error("path {path:?} for item {item} disk {disk_index} is refused: {reason}")]
    PathRefused {
        /// The item.
        item: ItemId,
        /// The disk.
        disk_index: u32,
        /// The path.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The path is already attached at a LUN; the reservation was released.
    #[error("path {path:?} is already attached at LUN {lun}")]
    PathInUse {
        /// The path.
        path: PathBuf,
        /// The LUN holding it.
        lun: Lun,
    },
    /// The disk holds no attached LUN.
    #[error("item {item} disk {disk_index} is not attached")]
    NotAttached {
        /// The item.
        item: ItemId,
        /// The disk.
        disk_index: u32,
    },
    /// The item has an attach in flight.
    #[error("item {item} has slots reserved by operation {op_id}; commit or release them first")]
    ItemBusy {
        /// The item.
        item: ItemId,
        /// The operation holding the reservation.
        op_id: u64,
    },
    /// Shrinking the table would drop an attached disk.
    #[error(
        "slot count {slot_count} would drop LUN {lun} attached to item {item} disk {disk_index}"
    )]
    ShrinkWouldDropAttached {
        /// The count asked for.
        slot_count: u32,
        /// The lowest attached LUN at or above it.
        lun: Lun,
        /// Its item.
        item: ItemId,
        /// Its disk.
        disk_index: u32,
    },
    /// The stored table is damaged or was not written by this code.
    #[error("slot table is corrupt: {reason}")]
    Corrupt {
        /// What is wrong, naming the file.
        reason: String,
    },
    /// Reading or writing the table failed.
    #[error("slot table I/O failed while {what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The caller's changes for the same transaction failed before the commit: nothing was
    /// written (for a commit, the reservation was released).
    #[error("slot table: {what} refused: {reason}")]
    Refused {
        /// What was being done.
        what: &'static str,
        /// Why the caller's changes failed.
        reason: String,
    },
    /// An earlier write failed; the table refuses changes until reopened.
    #[error(
        "slot table refuses changes after a failed write while {what}; reopen it to learn the \
         durable state"
    )]
    Failed {
        /// What the failed write was doing.
        what: &'static str,
    },
}
