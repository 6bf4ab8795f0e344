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
//!   `release_item` and a slot-count change at `open` each commit one transaction of the
//!   control store ([`crate::db`]). A slot freed by `detach` is reusable only after that commit
//!   (TigerBeetle's "released → free after checkpoint"): the call holds `&mut self` until then.
//!   The `*_with` forms add the caller's own changes (an item's record, its job) to that same
//!   transaction, so a lifecycle step's slots and record are committed together or not at all.
//! - **Refusals change nothing**: every check runs before the first change. A refused `commit`
//!   is a failed attach, so it also frees its reservation (the caller cannot leak it).
//! - **After a failed commit the table refuses every change** ([`SlotError::Failed`]): the
//!   commit may or may not have reached the media, so only a reopen knows the durable state.
//!   (`release_reservation` and `release_op` still work: they touch memory only.)
//! - **One owner per store**: two tables over the same store would overwrite each other's
//!   rows; the data directory's lock (`store::DataDir`) ensures one appliance process.
//!
//! # Stored form
//!
//! The table `slots` of `control.redb` holds one row per attached LUN (key: the LUN; value: item
//! id, disk index, path), and the setting `slot_count` the table's size; free LUNs are the ones
//! without a row and LUN 0 is always the appliance's (see [`crate::db`]). redb's commit is
//! atomic and checksummed, so a crash leaves the table of the last commit; a stored table that
//! breaks an invariant (a LUN outside the table, a disk or a path twice, a row that does not
//! decode) is refused ([`SlotError::Corrupt`]): that is a bug or tampering, and guessing would
//! risk double-booking a LUN. The first release's page format is read only by the migration
//! ([`crate::db::migrate_v1`]).

use std::collections::BTreeSet;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use engine::durable::DurableDir;

use crate::db::{Commit, ControlStore, DbError};

mod error;
mod stored;

pub use error::SlotError;
use stored::{decode_stored, entries};

/// Slots on the reference appliance size.
pub const SLOT_COUNT_DEFAULT: u32 = 32;
/// The largest slot count a table accepts.
pub const SLOT_COUNT_MAX: u32 = 256;
/// The LUN of the appliance's own cache disk.
pub const APPLIANCE_LUN: Lun = Lun(0);
/// The longest path a slot records (Linux `PATH_MAX`).
pub const PATH_BYTES_MAX: usize = 4096;

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
        f.write_str(&hex::encode(self.0))
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
    store: Arc<ControlStore>,
    table_id: u64,
    /// One state per LUN; index = LUN.
    slots: Vec<SlotState>,
    /// Set by a failed commit: what it was doing.
    failed: Option<&'static str>,
}

impl SlotTable {
    /// Loads the table from `store`, or creates an empty one, with `slot_count` slots.
    ///
    /// A stored table with another slot count grows freely; it shrinks only if no attached LUN
    /// is dropped ([`SlotError::ShrinkWouldDropAttached`] otherwise). Reservations never
    /// survive: every LUN is free, attached or the appliance's after `open`.
    pub fn open(store: Arc<ControlStore>, slot_count: u32) -> Result<Self, SlotError> {
        check_slot_count(slot_count)?;
        let stored = store.slots().map_err(store_err("reading the slot table"))?;
        let mut table = Self {
            store,
            table_id: NEXT_TABLE_ID.fetch_add(1, Ordering::Relaxed),
            slots: fresh_slots(slot_count),
            failed: None,
        };
        match stored {
            None => table.persist(fresh_slots(slot_count), "creating the slot table", no_more)?,
            Some(stored) => {
                let stored_count = stored.slot_count;
                table.slots = decode_stored(stored)?;
                if stored_count != slot_count {
                    let resized = table.resized(slot_count)?;
                    table.persist(resized, "changing the slot count", no_more)?;
                }
            }
        }
        Ok(table)
    }

    /// Replaces a damaged stored table with `attached` (disks and their paths, LUNs given
    /// lowest first in the order given) and opens it: the repair for [`SlotError::Corrupt`],
    /// from the item records. A disk that does not fit, or repeats a disk or a path, is left
    /// out and returned.
    pub fn rebuild(
        store: Arc<ControlStore>,
        slot_count: u32,
        attached: Vec<(DiskRequest, PathBuf)>,
    ) -> Result<(Self, Vec<DiskRequest>), SlotError> {
        check_slot_count(slot_count)?;
        let mut slots = fresh_slots(slot_count);
        let mut left_out = Vec::new();
        let mut next = 1usize;
        let mut disks = BTreeSet::new();
        let mut paths = BTreeSet::new();
        for (request, path) in attached {
            let fits = next < slots.len()
                && path_problem(&path).is_none()
                && disks.insert(request)
                && paths.insert(path.clone());
            if !fits {
                left_out.push(request);
                continue;
            }
            slots[next] = SlotState::Attached {
                item: request.item,
                disk_index: request.disk_index,
                path,
            };
            next += 1;
        }
        let mut table = Self {
            store,
            table_id: NEXT_TABLE_ID.fetch_add(1, Ordering::Relaxed),
            slots: fresh_slots(slot_count),
            failed: None,
        };
        table.persist(slots, "rebuilding the slot table", no_more)?;
        Ok((table, left_out))
    }

    /// Opens the control store in `dir` and the table in it (see [`SlotTable::open`]).
    pub fn open_in(dir: &dyn DurableDir, slot_count: u32) -> Result<Self, SlotError> {
        check_slot_count(slot_count)?;
        let store = ControlStore::open_in(dir).map_err(store_err("opening the control store"))?;
        Self::open(Arc::new(store), slot_count)
    }

    /// The committed table stored in `dir`'s control store (reservations are never stored, so
    /// reserved LUNs show as free); `None` when no table was ever created. Read-only for a
    /// closed store; a store that a crash left open is first repaired, as a restart would, so
    /// never call it on a store a live table holds (use a copy of it).
    pub fn load_committed(dir: &dyn DurableDir) -> Result<Option<Vec<SlotRow>>, SlotError> {
        let stored = match ControlStore::open_read_only(dir) {
            Ok(None) => return Ok(None),
            Ok(Some(view)) => view.slots(),
            Err(_) => ControlStore::open_in(dir).and_then(|store| store.slots()),
        };
        match stored.map_err(store_err("reading the slot table"))? {
            None => Ok(None),
            Some(stored) => Ok(Some(rows(&decode_stored(stored)?))),
        }
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
        self.commit_with(reservation, paths, no_more)
    }

    /// [`SlotTable::commit`] with the caller's `more` changes in the same transaction (e.g.
    /// the new item's record and job): all of them are committed, or none. An error from
    /// `more` is a failed attach (the reservation is released), with nothing written.
    pub fn commit_with(
        &mut self,
        reservation: Reservation,
        paths: Vec<PathBuf>,
        more: impl FnOnce(&mut Commit<'_>) -> Result<(), DbError>,
    ) -> Result<(), SlotError> {
        self.check_usable()?;
        self.check_live(&reservation)?;
        if let Err(refusal) = self.check_paths(&reservation, &paths) {
            self.free_reserved(&reservation);
            return Err(refusal);
        }
        let mut attached = self.slots.clone();
        for (&(lun, request), path) in reservation.slots.iter().zip(paths) {
            attached[lun.0 as usize] = SlotState::Attached {
                item: request.item,
                disk_index: request.disk_index,
                path,
            };
        }
        let committed = self.persist(attached, "committing a reservation", more);
        if matches!(committed, Err(SlotError::Refused { .. })) {
            self.free_reserved(&reservation);
        }
        committed
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
        self.persist(detached, "detaching a disk", no_more)?;
        Ok(Lun(lun as u32))
    }

    /// Frees every attached LUN of `item`, durably; returns them (none: nothing is written).
    /// Refused while the item has a reservation in flight.
    pub fn release_item(&mut self, item: ItemId) -> Result<Vec<Lun>, SlotError> {
        self.release(item, None::<fn(&mut Commit<'_>) -> Result<(), DbError>>)
    }

    /// [`SlotTable::release_item`] with the caller's `more` changes in the same transaction
    /// (committed even when the item holds no LUN).
    pub fn release_item_with(
        &mut self,
        item: ItemId,
        more: impl FnOnce(&mut Commit<'_>) -> Result<(), DbError>,
    ) -> Result<Vec<Lun>, SlotError> {
        self.release(item, Some(more))
    }

    fn release(
        &mut self,
        item: ItemId,
        more: Option<impl FnOnce(&mut Commit<'_>) -> Result<(), DbError>>,
    ) -> Result<Vec<Lun>, SlotError> {
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
        match more {
            Some(more) => self.persist(released, "releasing an item's disks", more)?,
            None if !freed.is_empty() => {
                self.persist(released, "releasing an item's disks", no_more)?;
            }
            None => {}
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

    /// Commits `slots` (with the caller's `more` changes) in one transaction of the control
    /// store, and only then makes it the table's state. A failed commit marks the table failed;
    /// an error from `more` is a refusal ([`SlotError::Refused`]) and changes nothing.
    fn persist(
        &mut self,
        slots: Vec<SlotState>,
        what: &'static str,
        more: impl FnOnce(&mut Commit<'_>) -> Result<(), DbError>,
    ) -> Result<(), SlotError> {
        self.check_usable()?;
        let slot_count = slots.len() as u32;
        let rows = entries(&slots);
        let mut refused = None;
        let committed = self.store.commit(what, |commit| {
            if let Err(error) = more(commit) {
                refused = Some(error.to_string());
                return Err(error);
            }
            commit.put_slots(slot_count, &rows)
        });
        if let Some(reason) = refused {
            return Err(SlotError::Refused { what, reason });
        }
        if let Err(error) = committed {
            self.failed = Some(what);
            return Err(SlotError::Io {
                what,
                source: std::io::Error::other(error),
            });
        }
        self.slots = slots;
        Ok(())
    }
}

/// No changes beside the slot table's own.
fn no_more(_: &mut Commit<'_>) -> Result<(), DbError> {
    Ok(())
}

fn store_err(what: &'static str) -> impl FnOnce(DbError) -> SlotError {
    move |error| SlotError::Io {
        what,
        source: std::io::Error::other(error),
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
