//! Slot accounting: which data-disk slot (LUN) of the appliance VM holds which replica disk.
//!
//! The appliance VM has a fixed number of data-disk slots (32 by default, 1..=256). LUN 0 holds
//! the appliance's own cache disk; every other LUN holds at most one replica disk, and every
//! replica disk (an item's disk `i`) holds at most one LUN. The lifecycle follows TigerBeetle's
//! `FreeSet` (reserve → acquire → release), with *commit* as the acquire step:
//!
//! ```text
//!            reserve(op, disks)                  commit(reservation, paths)
//!   Free ─────────────────────────► Reserved ──────────────────────────────► Attached
//!    ▲   all-or-nothing, lowest      │  memory only                          │  on disk
//!    │   free LUNs first             │                                       │
//!    ├─── release_reservation ◄──────┘                                       │
//!    │    release_op / a refused commit / a restart                          │
//!    │                                                                       │
//!    └─────────────── detach(item, disk) / release_item(item) ◄──────────────┘
//!
//!   LUN 0: Appliance (the cache disk); never reserved, never released.
//! ```
//!
//! - **Reservations are not durable.** A reservation only says "an attach is in flight"; it
//!   lives in memory, so a restart releases every reservation whose operation never committed,
//!   and a slot cannot leak across a crash. Reservations carry the id of the table instance that
//!   made them, so a reservation from before a restart is refused instead of committed.
//! - **Every change to committed state is durable before it returns**: `commit`, `detach`,
//!   `release_item` and a slot-count change at `open` each write and sync a new page. A slot
//!   freed by `detach` is reusable only after that page is durable (TigerBeetle's
//!   "released → free after checkpoint"): the call holds `&mut self` until then.
//! - **Refusals change nothing**: every check runs before the first change. A refused `commit`
//!   is a failed attach, so it also frees its reservation (the caller cannot leak it).
//! - **After a failed write the table refuses every change** ([`SlotError::Failed`]): the page
//!   may or may not have reached the media, so only a reopen knows the durable state.
//!   (`release_reservation` and `release_op` still work: they touch memory only.)
//! - **One owner per directory**: two tables over the same files would overwrite each other's
//!   pages; the data directory's lock (`store::DataDir`) ensures one appliance process.
//!
//! # On-disk format
//!
//! Two page files, `slots-a.page` and `slots-b.page`, form a double-buffered superblock: each
//! holds one whole page, a new page always goes to the file *not* holding the newest valid
//! page, and on open the valid page with the higher generation wins. (Two files rather than two
//! regions of one file because a page's length varies with the paths in it; [`DurableDir`] has
//! no rename, and none is needed.) A page, all integers little-endian:
//!
//! ```text
//!   offset  bytes  field
//!   0       8      checksum: xxh3-64 of bytes [8, 40 + body_len_bytes)
//!   8       8      magic "DRSLOTS\0"
//!   16      4      format version (1)
//!   20      4      slot count (1..=256)
//!   24      8      generation (1 for the first page, +1 per page written)
//!   32      4      entry count (attached LUNs)
//!   36      4      body length in bytes
//!   40      ...    entries, one per attached LUN, in increasing LUN order:
//!                    0   4   LUN (1..slot count)
//!                    4   16  item id
//!                    20  4   disk index
//!                    24  2   path length in bytes (1..=4096)
//!                    26  n   path (the OS bytes of an absolute path, no NUL)
//! ```
//!
//! Free LUNs are the ones without an entry; LUN 0 is always the appliance's. A page is at most
//! 40 + 255 × (26 + 4096) bytes (about 1 MiB).
//!
//! # Crash safety
//!
//! A change writes the page of generation g + 1 into the file that does not hold the newest
//! valid page (generation g), truncates that file to the page's length, and syncs it. The file
//! holding generation g is never written while it is the newest, so a crash at any instant
//! leaves it intact. The file being written is then either complete (its checksum verifies:
//! the state *after* the change) or torn, short, stale or empty (the checksum fails, or it
//! verifies as an older generation: the state *before*). The length read from a torn header is
//! bounded before use and covered by the checksum. Nothing else is ever written, so no torn or
//! half-applied table can load, and since reservations are not stored, nothing can leak.
//!
//! The first open creates both files, syncs the directory, then writes generation 1 into
//! `slots-a.page`; `slots-b.page` is first written for generation 2. So "no valid page and an
//! empty `slots-b.page`" can only mean the first open never completed, which loads as a new,
//! empty table; "no valid page" in any other case is media damage and is refused
//! ([`SlotError::Corrupt`]), as is a page whose checksum verifies but whose content breaks an
//! invariant (a LUN twice, a disk twice, a path twice): that is a bug or tampering, and
//! guessing would risk double-booking a LUN.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fmt;
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use engine::durable::{DurableDir, DurableFile};
use xxhash_rust::xxh3::xxh3_64;

/// Slots on the reference appliance size.
pub const SLOT_COUNT_DEFAULT: u32 = 32;
/// The largest slot count a table accepts.
pub const SLOT_COUNT_MAX: u32 = 256;
/// The LUN of the appliance's own cache disk.
pub const APPLIANCE_LUN: Lun = Lun(0);
/// The longest path a slot records (Linux `PATH_MAX`).
pub const PATH_BYTES_MAX: usize = 4096;
/// The two page files, in the data directory.
pub const PAGE_FILE_NAMES: [&str; 2] = ["slots-a.page", "slots-b.page"];
/// The magic at byte 8 of a page.
pub const PAGE_MAGIC: [u8; 8] = *b"DRSLOTS\0";
/// The page format this build writes and reads.
pub const PAGE_FORMAT_VERSION: u32 = 1;

const HEADER_BYTES: usize = 40;
const ENTRY_FIXED_BYTES: usize = 26;
const PAGE_BYTES_MAX: usize =
    HEADER_BYTES + (SLOT_COUNT_MAX as usize - 1) * (ENTRY_FIXED_BYTES + PATH_BYTES_MAX);

/// Distinguishes table instances, so a reservation from before a reopen is refused.
static NEXT_TABLE_ID: AtomicU64 = AtomicU64::new(1);

/// A data-disk slot number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lun(pub u32);

impl fmt::Display for Lun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A protected item's id (shown as 32 hex digits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ItemId(pub [u8; 16]);

impl fmt::Display for ItemId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|byte| write!(f, "{byte:02x}"))
    }
}

/// One replica disk that needs a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DiskRequest {
    /// The item the disk belongs to.
    pub item: ItemId,
    /// The disk's index within the item.
    pub disk_index: u32,
}

/// What a LUN holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotState {
    /// Nothing.
    Free,
    /// The appliance's own cache disk (LUN 0).
    Appliance,
    /// Held for an attach in flight (memory only: a restart frees it).
    Reserved {
        /// The operation that reserved it.
        op_id: u64,
        /// The item.
        item: ItemId,
        /// The disk of the item.
        disk_index: u32,
    },
    /// A replica disk is attached (durable).
    Attached {
        /// The item.
        item: ItemId,
        /// The disk of the item.
        disk_index: u32,
        /// The replica disk (file or block device).
        path: PathBuf,
    },
}

impl SlotState {
    fn disk(&self) -> Option<DiskRequest> {
        match *self {
            Self::Reserved {
                item, disk_index, ..
            }
            | Self::Attached {
                item, disk_index, ..
            } => Some(DiskRequest { item, disk_index }),
            Self::Free | Self::Appliance => None,
        }
    }
}

/// One row of the slot table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotRow {
    /// The slot.
    pub lun: Lun,
    /// What it holds.
    pub state: SlotState,
}

/// How many LUNs are in each state; the four always add up to the slot count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SlotCounts {
    /// Free LUNs.
    pub free: usize,
    /// LUNs reserved by operations in flight.
    pub reserved: usize,
    /// LUNs holding attached replica disks.
    pub attached: usize,
    /// The appliance's own LUN (1).
    pub appliance: usize,
}

/// Slots held for one operation: commit it once the disks are attached, or release it.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a reservation holds slots until it is committed or released"]
pub struct Reservation {
    table_id: u64,
    op_id: u64,
    slots: Vec<(Lun, DiskRequest)>,
}

impl Reservation {
    /// The operation that made it.
    pub fn op_id(&self) -> u64 {
        self.op_id
    }

    /// The reserved LUNs with their disks, in request order.
    pub fn slots(&self) -> &[(Lun, DiskRequest)] {
        &self.slots
    }
}

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
        source: io::Error,
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

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> SlotError {
    move |source| SlotError::Io { what, source }
}

fn check_slot_count(slot_count: u32) -> Result<(), SlotError> {
    if (1..=SLOT_COUNT_MAX).contains(&slot_count) {
        Ok(())
    } else {
        Err(SlotError::SlotCountOutOfRange { slot_count })
    }
}

/// Why a path cannot be recorded, if it cannot.
fn path_problem(path: &Path) -> Option<String> {
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() {
        Some("it is empty".to_owned())
    } else if bytes.len() > PATH_BYTES_MAX {
        Some(format!(
            "it is {} bytes, more than {PATH_BYTES_MAX}",
            bytes.len()
        ))
    } else if bytes.contains(&0) {
        Some("it contains a NUL byte".to_owned())
    } else if !path.is_absolute() {
        Some("it is not absolute".to_owned())
    } else {
        None
    }
}

fn fresh_slots(slot_count: u32) -> Vec<SlotState> {
    let mut slots = vec![SlotState::Free; slot_count as usize];
    slots[APPLIANCE_LUN.0 as usize] = SlotState::Appliance;
    slots
}

/// The durable slot table. One owner; wrap it in a mutex to share it.
#[derive(Debug)]
pub struct SlotTable {
    files: [Arc<dyn DurableFile>; 2],
    table_id: u64,
    /// One state per LUN; index = LUN.
    slots: Vec<SlotState>,
    /// Generation of the newest durable page (0: none yet).
    generation: u64,
    /// Index into `files` of the file holding the newest durable page.
    newest_file: usize,
    /// Set by a failed write: what it was doing.
    failed: Option<&'static str>,
}

impl SlotTable {
    /// Loads the table from `dir`, or creates an empty one, with `slot_count` slots.
    ///
    /// A stored table with another slot count grows freely; it shrinks only if no attached LUN
    /// is dropped ([`SlotError::ShrinkWouldDropAttached`] otherwise). Reservations never
    /// survive: every LUN is free, attached or the appliance's after `open`.
    pub fn open(dir: Arc<dyn DurableDir>, slot_count: u32) -> Result<Self, SlotError> {
        check_slot_count(slot_count)?;
        let names = dir
            .list()
            .map_err(io_err("listing the slot table's directory"))?;
        let created = PAGE_FILE_NAMES
            .iter()
            .any(|name| !names.iter().any(|present| present == name));
        let files = [
            dir.open(PAGE_FILE_NAMES[0], true)
                .map_err(io_err("opening the slot table"))?,
            dir.open(PAGE_FILE_NAMES[1], true)
                .map_err(io_err("opening the slot table"))?,
        ];
        if created {
            dir.sync()
                .map_err(io_err("creating the slot table's files"))?;
        }
        let newest = load_newest([Some(&files[0]), Some(&files[1])])?;
        let mut table = Self {
            files,
            table_id: NEXT_TABLE_ID.fetch_add(1, Ordering::Relaxed),
            slots: fresh_slots(slot_count),
            generation: 0,
            newest_file: 1,
            failed: None,
        };
        match newest {
            None => table.persist(fresh_slots(slot_count), "creating the slot table")?,
            Some((page, file_index)) => {
                table.slots = page.slots;
                table.generation = page.generation;
                table.newest_file = file_index;
                if page.slot_count != slot_count {
                    let resized = table.resized(slot_count)?;
                    table.persist(resized, "changing the slot count")?;
                }
            }
        }
        Ok(table)
    }

    /// The committed table stored in `dir`, without changing anything (reservations are
    /// never stored, so reserved LUNs show as free); `None` when no table was ever created.
    pub fn load_committed(dir: &dyn DurableDir) -> Result<Option<Vec<SlotRow>>, SlotError> {
        let names = dir
            .list()
            .map_err(io_err("listing the slot table's directory"))?;
        let mut files: [Option<Arc<dyn DurableFile>>; 2] = [None, None];
        for (slot, name) in files.iter_mut().zip(PAGE_FILE_NAMES) {
            if names.iter().any(|present| present == name) {
                *slot = Some(
                    dir.open(name, false)
                        .map_err(io_err("opening the slot table"))?,
                );
            }
        }
        let newest = load_newest([files[0].as_ref(), files[1].as_ref()])?;
        Ok(newest.map(|(page, _)| rows(&page.slots)))
    }

    /// Reserves one free LUN per disk, lowest LUNs first, for operation `op_id`: all or
    /// nothing. A refusal changes nothing.
    pub fn reserve(
        &mut self,
        op_id: u64,
        requests: &[DiskRequest],
    ) -> Result<Reservation, SlotError> {
        self.check_usable()?;
        if self
            .slots
            .iter()
            .any(|state| matches!(state, SlotState::Reserved { op_id: held, .. } if *held == op_id))
        {
            return Err(SlotError::OperationAlreadyReserved { op_id });
        }
        for (index, request) in requests.iter().enumerate() {
            if requests[..index].contains(request) {
                return Err(SlotError::DuplicateDisk {
                    item: request.item,
                    disk_index: request.disk_index,
                });
            }
            if let Some(lun) = self.lun_of(request.item, request.disk_index) {
                return Err(SlotError::DiskAlreadyHasSlot {
                    item: request.item,
                    disk_index: request.disk_index,
                    lun,
                });
            }
        }
        let free: Vec<Lun> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, state)| **state == SlotState::Free)
            .map(|(index, _)| Lun(index as u32))
            .collect();
        if requests.len() > free.len() {
            return Err(SlotError::NotEnoughSlots {
                needed: requests.len(),
                free: free.len(),
            });
        }
        let slots: Vec<(Lun, DiskRequest)> =
            free.into_iter().zip(requests.iter().copied()).collect();
        for &(lun, request) in &slots {
            self.slots[lun.0 as usize] = SlotState::Reserved {
                op_id,
                item: request.item,
                disk_index: request.disk_index,
            };
        }
        Ok(Reservation {
            table_id: self.table_id,
            op_id,
            slots,
        })
    }

    /// Attaches the reserved disks at their LUNs (`paths[i]` is the disk of
    /// `reservation.slots()[i]`), durably. Any refusal is a failed attach: the reservation is
    /// released and the committed table is unchanged.
    pub fn commit(
        &mut self,
        reservation: Reservation,
        paths: Vec<PathBuf>,
    ) -> Result<(), SlotError> {
        self.check_usable()?;
        self.check_live(&reservation)?;
        if let Err(refusal) = self.check_paths(&reservation, &paths) {
            self.free_reserved(&reservation);
            return Err(refusal);
        }
        if reservation.slots.is_empty() {
            return Ok(());
        }
        let mut attached = self.slots.clone();
        for (&(lun, request), path) in reservation.slots.iter().zip(paths) {
            attached[lun.0 as usize] = SlotState::Attached {
                item: request.item,
                disk_index: request.disk_index,
                path,
            };
        }
        self.persist(attached, "committing a reservation")
    }

    /// Frees the slots of a reservation whose attach failed (memory only: nothing to sync).
    pub fn release_reservation(&mut self, reservation: Reservation) -> Result<(), SlotError> {
        self.check_live(&reservation)?;
        self.free_reserved(&reservation);
        Ok(())
    }

    /// Frees whatever operation `op_id` still has reserved (for a job that failed without its
    /// [`Reservation`]); returns the LUNs freed.
    pub fn release_op(&mut self, op_id: u64) -> Vec<Lun> {
        let mut freed = Vec::new();
        for (index, state) in self.slots.iter_mut().enumerate() {
            if matches!(state, SlotState::Reserved { op_id: held, .. } if *held == op_id) {
                *state = SlotState::Free;
                freed.push(Lun(index as u32));
            }
        }
        freed
    }

    /// Frees the LUN of an attached disk, durably; returns it.
    pub fn detach(&mut self, item: ItemId, disk_index: u32) -> Result<Lun, SlotError> {
        self.check_usable()?;
        let lun = self
            .slots
            .iter()
            .position(|state| {
                matches!(state, SlotState::Attached { item: i, disk_index: d, .. }
                    if *i == item && *d == disk_index)
            })
            .ok_or(SlotError::NotAttached { item, disk_index })?;
        let mut detached = self.slots.clone();
        detached[lun] = SlotState::Free;
        self.persist(detached, "detaching a disk")?;
        Ok(Lun(lun as u32))
    }

    /// Frees every attached LUN of `item`, durably; returns them (none: nothing is written).
    /// Refused while the item has a reservation in flight.
    pub fn release_item(&mut self, item: ItemId) -> Result<Vec<Lun>, SlotError> {
        self.check_usable()?;
        let mut freed = Vec::new();
        let mut released = self.slots.clone();
        for (index, state) in released.iter_mut().enumerate() {
            match state {
                SlotState::Reserved { op_id, item: i, .. } if *i == item => {
                    return Err(SlotError::ItemBusy {
                        item,
                        op_id: *op_id,
                    });
                }
                SlotState::Attached { item: i, .. } if *i == item => {
                    *state = SlotState::Free;
                    freed.push(Lun(index as u32));
                }
                _ => {}
            }
        }
        if !freed.is_empty() {
            self.persist(released, "releasing an item's disks")?;
        }
        Ok(freed)
    }

    /// Every LUN and what it holds, in LUN order (as the API shows it).
    pub fn table(&self) -> Vec<SlotRow> {
        rows(&self.slots)
    }

    /// Free LUNs.
    pub fn free_count(&self) -> usize {
        self.counts().free
    }

    /// LUNs per state.
    pub fn counts(&self) -> SlotCounts {
        let mut counts = SlotCounts::default();
        for state in &self.slots {
            match state {
                SlotState::Free => counts.free += 1,
                SlotState::Appliance => counts.appliance += 1,
                SlotState::Reserved { .. } => counts.reserved += 1,
                SlotState::Attached { .. } => counts.attached += 1,
            }
        }
        counts
    }

    /// The number of slots, LUN 0 included.
    pub fn slot_count(&self) -> u32 {
        self.slots.len() as u32
    }

    /// The LUN a disk holds (attached or reserved).
    pub fn lun_of(&self, item: ItemId, disk_index: u32) -> Option<Lun> {
        let wanted = DiskRequest { item, disk_index };
        self.slots
            .iter()
            .position(|state| state.disk() == Some(wanted))
            .map(|lun| Lun(lun as u32))
    }

    fn check_usable(&self) -> Result<(), SlotError> {
        match self.failed {
            Some(what) => Err(SlotError::Failed { what }),
            None => Ok(()),
        }
    }

    fn check_live(&self, reservation: &Reservation) -> Result<(), SlotError> {
        for &(lun, request) in &reservation.slots {
            let live = reservation.table_id == self.table_id
                && self.slots.get(lun.0 as usize)
                    == Some(&SlotState::Reserved {
                        op_id: reservation.op_id,
                        item: request.item,
                        disk_index: request.disk_index,
                    });
            if !live {
                return Err(SlotError::UnknownReservation {
                    op_id: reservation.op_id,
                    lun,
                });
            }
        }
        Ok(())
    }

    fn check_paths(&self, reservation: &Reservation, paths: &[PathBuf]) -> Result<(), SlotError> {
        if paths.len() != reservation.slots.len() {
            return Err(SlotError::PathCountMismatch {
                op_id: reservation.op_id,
                reserved: reservation.slots.len(),
                given: paths.len(),
            });
        }
        for (index, (&(_, request), path)) in reservation.slots.iter().zip(paths).enumerate() {
            if let Some(reason) = path_problem(path) {
                return Err(SlotError::PathRefused {
                    item: request.item,
                    disk_index: request.disk_index,
                    path: path.clone(),
                    reason,
                });
            }
            let held = self.slots.iter().position(
                |state| matches!(state, SlotState::Attached { path: p, .. } if p == path),
            );
            if let Some(held) = held {
                return Err(SlotError::PathInUse {
                    path: path.clone(),
                    lun: Lun(held as u32),
                });
            }
            if let Some(earlier) = paths[..index].iter().position(|p| p == path) {
                return Err(SlotError::PathInUse {
                    path: path.clone(),
                    lun: reservation.slots[earlier].0,
                });
            }
        }
        Ok(())
    }

    fn free_reserved(&mut self, reservation: &Reservation) {
        for &(lun, _) in &reservation.slots {
            self.slots[lun.0 as usize] = SlotState::Free;
        }
    }

    /// The slots for a new slot count, or why the count would drop an attached disk.
    fn resized(&self, slot_count: u32) -> Result<Vec<SlotState>, SlotError> {
        let mut slots = self.slots.clone();
        for (index, state) in slots.iter().enumerate().skip(slot_count as usize) {
            if let SlotState::Attached {
                item, disk_index, ..
            } = state
            {
                return Err(SlotError::ShrinkWouldDropAttached {
                    slot_count,
                    lun: Lun(index as u32),
                    item: *item,
                    disk_index: *disk_index,
                });
            }
        }
        slots.resize(slot_count as usize, SlotState::Free);
        Ok(slots)
    }

    /// Writes `slots` as the next page into the file not holding the newest one, syncs it, and
    /// only then makes it the table's state. A failure marks the table failed.
    fn persist(&mut self, slots: Vec<SlotState>, what: &'static str) -> Result<(), SlotError> {
        self.check_usable()?;
        let generation = self.generation + 1;
        let page = encode_page(generation, &slots);
        let target = 1 - self.newest_file;
        let file = &self.files[target];
        let written = file
            .write_all_at(0, &page)
            .and_then(|()| file.set_len(page.len() as u64))
            .and_then(|()| file.sync_data());
        if let Err(source) = written {
            self.failed = Some(what);
            return Err(SlotError::Io { what, source });
        }
        self.slots = slots;
        self.generation = generation;
        self.newest_file = target;
        Ok(())
    }
}

fn rows(slots: &[SlotState]) -> Vec<SlotRow> {
    slots
        .iter()
        .enumerate()
        .map(|(index, state)| SlotRow {
            lun: Lun(index as u32),
            state: state.clone(),
        })
        .collect()
}

fn encode_page(generation: u64, slots: &[SlotState]) -> Vec<u8> {
    let mut body = Vec::new();
    let mut entry_count: u32 = 0;
    for (index, state) in slots.iter().enumerate() {
        if let SlotState::Attached {
            item,
            disk_index,
            path,
        } = state
        {
            let path_bytes = path.as_os_str().as_bytes();
            body.extend_from_slice(&(index as u32).to_le_bytes());
            body.extend_from_slice(&item.0);
            body.extend_from_slice(&disk_index.to_le_bytes());
            body.extend_from_slice(&(path_bytes.len() as u16).to_le_bytes());
            body.extend_from_slice(path_bytes);
            entry_count += 1;
        }
    }
    let mut page = Vec::with_capacity(HEADER_BYTES + body.len());
    page.extend_from_slice(&[0u8; 8]);
    page.extend_from_slice(&PAGE_MAGIC);
    page.extend_from_slice(&PAGE_FORMAT_VERSION.to_le_bytes());
    page.extend_from_slice(&(slots.len() as u32).to_le_bytes());
    page.extend_from_slice(&generation.to_le_bytes());
    page.extend_from_slice(&entry_count.to_le_bytes());
    page.extend_from_slice(&(body.len() as u32).to_le_bytes());
    page.extend_from_slice(&body);
    let checksum = xxh3_64(&page[8..]);
    page[0..8].copy_from_slice(&checksum.to_le_bytes());
    page
}

/// A decoded page.
#[derive(Debug)]
struct Page {
    slot_count: u32,
    generation: u64,
    slots: Vec<SlotState>,
}

/// What one page file holds.
#[derive(Debug)]
enum PageRead {
    Valid(Page),
    /// Torn, short, empty or missing: why.
    Invalid(String),
}

/// The newest valid page and the index of its file; `None` if the first open never completed.
fn load_newest(
    files: [Option<&Arc<dyn DurableFile>>; 2],
) -> Result<Option<(Page, usize)>, SlotError> {
    let mut reads = Vec::with_capacity(2);
    let mut second_len_bytes = 0;
    for (index, (file, name)) in files.into_iter().zip(PAGE_FILE_NAMES).enumerate() {
        let Some(file) = file else {
            reads.push(PageRead::Invalid("missing".to_owned()));
            continue;
        };
        let len_bytes = file.len_bytes().map_err(io_err("reading the slot table"))?;
        if index == 1 {
            second_len_bytes = len_bytes;
        }
        reads.push(read_page(name, file.as_ref(), len_bytes)?);
    }
    let mut reads = reads.into_iter();
    let (Some(first), Some(second)) = (reads.next(), reads.next()) else {
        return Err(SlotError::Corrupt {
            reason: "internal: expected two page reads".to_owned(),
        });
    };
    match (first, second) {
        (PageRead::Valid(a), PageRead::Valid(b)) => {
            if a.generation == b.generation {
                Err(SlotError::Corrupt {
                    reason: format!(
                        "{} and {} both hold generation {}",
                        PAGE_FILE_NAMES[0], PAGE_FILE_NAMES[1], a.generation
                    ),
                })
            } else if a.generation > b.generation {
                Ok(Some((a, 0)))
            } else {
                Ok(Some((b, 1)))
            }
        }
        (PageRead::Valid(a), PageRead::Invalid(_)) => Ok(Some((a, 0))),
        (PageRead::Invalid(_), PageRead::Valid(b)) => Ok(Some((b, 1))),
        (PageRead::Invalid(_), PageRead::Invalid(_)) if second_len_bytes == 0 => Ok(None),
        (PageRead::Invalid(why_a), PageRead::Invalid(why_b)) => Err(SlotError::Corrupt {
            reason: format!(
                "no valid page: {}: {why_a}; {}: {why_b}",
                PAGE_FILE_NAMES[0], PAGE_FILE_NAMES[1]
            ),
        }),
    }
}

fn le_u32(bytes: &[u8; HEADER_BYTES], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn read_page(name: &str, file: &dyn DurableFile, len_bytes: u64) -> Result<PageRead, SlotError> {
    if len_bytes < HEADER_BYTES as u64 {
        return Ok(PageRead::Invalid(format!(
            "{len_bytes} bytes, shorter than a page header"
        )));
    }
    let mut header = [0u8; HEADER_BYTES];
    file.read_exact_at(0, &mut header)
        .map_err(io_err("reading the slot table"))?;
    if header[8..16] != PAGE_MAGIC {
        return Ok(PageRead::Invalid("no page magic".to_owned()));
    }
    let body_len_bytes = le_u32(&header, 36) as usize;
    let page_len_bytes = HEADER_BYTES + body_len_bytes;
    if page_len_bytes > PAGE_BYTES_MAX {
        return Ok(PageRead::Invalid(format!(
            "page length {page_len_bytes} bytes is beyond the largest page"
        )));
    }
    if page_len_bytes as u64 > len_bytes {
        return Ok(PageRead::Invalid(format!(
            "page of {page_len_bytes} bytes in a file of {len_bytes}"
        )));
    }
    let mut page = vec![0u8; page_len_bytes];
    file.read_exact_at(0, &mut page)
        .map_err(io_err("reading the slot table"))?;
    let mut stored = [0u8; 8];
    stored.copy_from_slice(&page[0..8]);
    if u64::from_le_bytes(stored) != xxh3_64(&page[8..]) {
        return Ok(PageRead::Invalid("checksum mismatch".to_owned()));
    }
    // The checksum verifies: these are the bytes that were written. Anything wrong from here
    // on is a bug or tampering, not a torn write, and is refused rather than guessed around.
    decode_page(&page)
        .map(PageRead::Valid)
        .map_err(|reason| SlotError::Corrupt {
            reason: format!("{name}: {reason}"),
        })
}

/// Reads little-endian fields from a byte slice, failing past its end.
struct Cursor<'a> {
    bytes: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, count: usize) -> Result<&'a [u8], String> {
        if count > self.bytes.len() {
            return Err(format!(
                "truncated: {count} bytes wanted, {} left",
                self.bytes.len()
            ));
        }
        let (head, tail) = self.bytes.split_at(count);
        self.bytes = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u16(&mut self) -> Result<u16, String> {
        self.array().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Result<u32, String> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, String> {
        self.array().map(u64::from_le_bytes)
    }
}

fn decode_page(page: &[u8]) -> Result<Page, String> {
    let mut cursor = Cursor { bytes: page };
    let _checksum = cursor.u64()?;
    let _magic = cursor.take(8)?;
    let version = cursor.u32()?;
    if version != PAGE_FORMAT_VERSION {
        return Err(format!(
            "format version {version}; this build reads version {PAGE_FORMAT_VERSION}"
        ));
    }
    let slot_count = cursor.u32()?;
    if check_slot_count(slot_count).is_err() {
        return Err(format!(
            "slot count {slot_count} is outside 1..={SLOT_COUNT_MAX}"
        ));
    }
    let generation = cursor.u64()?;
    if generation == 0 {
        return Err("generation 0".to_owned());
    }
    let entry_count = cursor.u32()?;
    let _body_len_bytes = cursor.u32()?;
    let mut slots = fresh_slots(slot_count);
    let mut disks = BTreeSet::new();
    let mut paths = BTreeSet::new();
    let mut previous_lun = 0;
    for _ in 0..entry_count {
        let lun = cursor.u32()?;
        let item = ItemId(cursor.array()?);
        let disk_index = cursor.u32()?;
        let path_len_bytes = usize::from(cursor.u16()?);
        let path = PathBuf::from(OsString::from_vec(cursor.take(path_len_bytes)?.to_vec()));
        if lun <= previous_lun || lun >= slot_count {
            return Err(format!(
                "entry for LUN {lun} is out of order or outside 1..{slot_count}"
            ));
        }
        previous_lun = lun;
        if let Some(reason) = path_problem(&path) {
            return Err(format!("LUN {lun}: path {path:?}: {reason}"));
        }
        if !disks.insert((item, disk_index)) {
            return Err(format!(
                "item {item} disk {disk_index} holds more than one LUN (again at LUN {lun})"
            ));
        }
        if !paths.insert(path.clone()) {
            return Err(format!(
                "path {path:?} is attached twice (again at LUN {lun})"
            ));
        }
        slots[lun as usize] = SlotState::Attached {
            item,
            disk_index,
            path,
        };
    }
    if !cursor.bytes.is_empty() {
        return Err(format!(
            "{} bytes after the last of {entry_count} entries",
            cursor.bytes.len()
        ));
    }
    Ok(Page {
        slot_count,
        generation,
        slots,
    })
}
