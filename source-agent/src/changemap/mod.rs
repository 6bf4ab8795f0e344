//! The change map: one disk's persistent, bounded, crash-safe record of which regions may
//! differ between the local disk and what the appliance holds durably.
//!
//! Two parts, two files in the state directory:
//!
//! - the **unsent set** (`<name>.cmap`): grain-aligned runs of bytes the catch-up must read
//!   back from the disk and resend (writes the link could not take, extents spilled from
//!   the activity log, the whole disk at first start). Bounded by [`Limits::max_map_bytes`]:
//!   when it would outgrow the bound its grain doubles, covering more, never less (see
//!   `runs.rs`). Saved whole and atomically (tmp file, fdatasync, rename, directory fsync)
//!   at open, at [`ChangeMap::checkpoint`], and before an activity-log transaction that
//!   removes extents if it changed since the last save. Ranges resent by the catch-up but
//!   not yet acknowledged are kept (coarsely, in two small sets rotated on acknowledgements)
//!   and saved with it, so a crash before the acknowledgement resends them.
//! - the **activity log** (`<name>.al`): the extents (`al_extent_bytes` each) the VM may be
//!   writing into, kept durable *before* any write into them reaches the disk, like DRBD's
//!   activity log. On the write path an already-active extent costs a hash lookup; a new
//!   one costs one transaction (write a slot, fdatasync).
//!
//! After a crash, `open` marks unsent: the saved map ∪ every extent of the log's newest valid
//! snapshot. That covers every byte that may differ:
//! - a write's data reaches the disk only after `begin_write` returned, i.e. after the
//!   transaction making its extents active was fdatasync'd; an extent leaves the log only
//!   when its writes are all acknowledged by the appliance *and* `sync_disk` made the local
//!   disk durable (so neither side is newer than the other outside the log), or after its
//!   whole range was added to the unsent set and the map saved (a spill);
//! - a byte the link did not take (`mark_unsent`) is in the unsent set, which is saved before
//!   any extent holding it can leave the log;
//! - a resent range leaves the unsent set only into the in-flight sets saved with the map,
//!   until its frame is acknowledged.
//!
//! Torn transactions: a transaction writes a whole snapshot, with the next generation, into
//! the slot that does *not* hold the newest durable snapshot, then fdatasyncs; the slots are
//! 4096-byte aligned so a torn write cannot reach the other slot. A crash mid-transaction
//! leaves the new slot failing its checksum (recovery then takes the other slot: the previous
//! snapshot, durable before this transaction began) or valid (the new snapshot). Both are
//! safe: no data write into an extent the new snapshot adds has happened (it waits for the
//! fdatasync to return), and every extent the new snapshot drops was already covered without
//! the log (clean and disk-synced, or spilled into the saved map). A transaction that failed
//! (an I/O error, no crash) does not advance the newest slot, so the next one overwrites the
//! failed slot, never the last good one.

mod activity;
mod file;
mod runs;
#[cfg(test)]
mod tests;

use std::io;
use std::path::{Path, PathBuf};

use file::{SavedLog, SavedMap};
use runs::{RUN_COST_BYTES, align_down};

/// The smallest grain (and activity-log extent) allowed: 4096 bytes.
pub const MIN_GRAIN_BYTES: u64 = 4096;
/// The smallest [`Limits::max_map_bytes`] allowed.
pub const MIN_MAP_BYTES: u64 = 1024;
/// The largest [`Limits::max_map_bytes`] allowed (also bounds what `open` reads).
pub const MAX_MAP_BYTES_LIMIT: u64 = 64 << 20;
/// The fewest activity-log extents allowed.
pub const MIN_AL_EXTENTS: u32 = 16;
/// The most activity-log extents allowed.
pub const MAX_AL_EXTENTS: u32 = 1 << 20;
/// The largest activity-log extent allowed: 1 TiB.
pub const MAX_AL_EXTENT_BYTES: u64 = 1 << 40;
/// The largest write the activity log must hold at once (the NBD server's largest request):
/// `Limits::validate` requires `al_extents` ≥ the extents such a write can span.
pub const MAX_WRITE_BYTES: u64 = 32 << 20;
/// The largest disk a change map is for (2^62 bytes: offsets never overflow).
pub const MAX_DISK_BYTES: u64 = 1 << 62;
/// Ranges handed out by `next_unsent` remembered until `resent` (oldest forgotten first).
const HANDOUTS: usize = 64;

/// Bounds of one disk's change map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Finest resolution of the unsent set: a power of two ≥ 4096 (default 4096).
    pub min_grain_bytes: u64,
    /// Most bytes the unsent set may take, in memory and in its file (default 256 KiB);
    /// when it would exceed this, the grain doubles (coarsens) until it fits in half.
    /// Each run is counted as 32 bytes (a `BTreeMap` entry with its node overhead); the file
    /// takes 16 bytes a run. Three quarters of it go to the unsent set proper, one eighth
    /// each to the two sets of resent, not yet acknowledged ranges.
    pub max_map_bytes: u64,
    /// Size of one activity-log extent: a power of two ≥ min_grain_bytes (default 4 MiB).
    pub al_extent_bytes: u64,
    /// Most extents active at once (default 1024).
    pub al_extents: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            min_grain_bytes: 4096,
            max_map_bytes: 256 << 10,
            al_extent_bytes: 4 << 20,
            al_extents: 1024,
        }
    }
}

impl Limits {
    /// Checks every bound; the error names the field and the allowed range.
    pub fn validate(&self) -> Result<(), ChangeMapError> {
        let fail = |what: String| Err(ChangeMapError::Limits(what));
        if !self.min_grain_bytes.is_power_of_two()
            || !(MIN_GRAIN_BYTES..=MAX_AL_EXTENT_BYTES).contains(&self.min_grain_bytes)
        {
            return fail(format!(
                "min_grain_bytes {} is not a power of two in [4096, 2^40]",
                self.min_grain_bytes
            ));
        }
        if !(MIN_MAP_BYTES..=MAX_MAP_BYTES_LIMIT).contains(&self.max_map_bytes) {
            return fail(format!(
                "max_map_bytes {} is not in [{MIN_MAP_BYTES}, {MAX_MAP_BYTES_LIMIT}]",
                self.max_map_bytes
            ));
        }
        if !self.al_extent_bytes.is_power_of_two()
            || self.al_extent_bytes < self.min_grain_bytes
            || self.al_extent_bytes > MAX_AL_EXTENT_BYTES
        {
            return fail(format!(
                "al_extent_bytes {} is not a power of two in [min_grain_bytes {}, 2^40]",
                self.al_extent_bytes, self.min_grain_bytes
            ));
        }
        let span = max_span_extents(MAX_WRITE_BYTES, self.al_extent_bytes);
        let least = u64::from(MIN_AL_EXTENTS).max(span);
        if u64::from(self.al_extents) < least || self.al_extents > MAX_AL_EXTENTS {
            return fail(format!(
                "al_extents {} is not in [{least}, {MAX_AL_EXTENTS}] (at least 16, and a \
                 {MAX_WRITE_BYTES}-byte write spans up to {span} extents of {} bytes)",
                self.al_extents, self.al_extent_bytes
            ));
        }
        Ok(())
    }

    /// Runs the unsent set proper may hold, and each in-flight set.
    fn run_budget(&self) -> (usize, usize) {
        let total = (self.max_map_bytes / RUN_COST_BYTES) as usize;
        let inflight = (total / 8).max(2);
        (total - 2 * inflight, inflight)
    }
}

/// Most extents a write of `length_bytes` can span, at any offset.
fn max_span_extents(length_bytes: u64, extent_bytes: u64) -> u64 {
    if length_bytes == 0 {
        0
    } else {
        (length_bytes - 1) / extent_bytes + 2
    }
}

/// What `open` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Recovered {
    /// No state files existed: the whole disk is marked unsent (the initial sync).
    pub fresh: bool,
    /// Bytes marked unsent from the saved map.
    pub from_map_bytes: u64,
    /// Bytes marked unsent because their extents were active in the activity log (writes
    /// that may not have reached the appliance, or reached it but not the disk).
    pub from_activity_log_bytes: u64,
    /// Bytes unsent after recovery (the union; what the catch-up will resend).
    pub unsent_bytes: u64,
}

/// Counters and state for status output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChangeMapStats {
    /// Bytes in the unsent set.
    pub unsent_bytes: u64,
    /// Runs in the unsent set.
    pub unsent_runs: u64,
    /// The unsent set's current grain.
    pub grain_bytes: u64,
    /// Extents active in the activity log.
    pub active_extents: u32,
    /// Activity-log transactions written since open (open's own not counted).
    pub al_transactions: u64,
    /// Map saves since open (open's own counted).
    pub map_saves: u64,
    /// Grain doublings since open.
    pub coarsenings: u64,
    /// Active extents evicted with unacknowledged data (moved to the unsent set).
    pub spilled_extents: u64,
}

/// Why a change map could not be opened or updated. Every variant names what was wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChangeMapError {
    /// A file operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was done ("open", "fdatasync", ...).
        op: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A state file is damaged or not one of ours.
    #[error("{}: corrupt change-map state: {what}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        what: String,
    },
    /// A state file belongs to another protected item.
    #[error("{}: belongs to item {recorded}, not {expected}", path.display())]
    OtherItem {
        /// The file.
        path: PathBuf,
        /// The item id recorded in it (hex).
        recorded: String,
        /// The item id expected (hex).
        expected: String,
    },
    /// A state file was written for a disk of another size.
    #[error("{}: recorded for a disk of {recorded_bytes} bytes, the disk has {disk_bytes}", path.display())]
    SizeChanged {
        /// The file.
        path: PathBuf,
        /// The size recorded in it.
        recorded_bytes: u64,
        /// The disk's size now.
        disk_bytes: u64,
    },
    /// A state file of a format version this build does not read.
    #[error("{}: format version {found}, this build reads {supported}", path.display())]
    Version {
        /// The file.
        path: PathBuf,
        /// The version recorded.
        found: u32,
        /// The version this build reads.
        supported: u32,
    },
    /// A state file (or what its header claims) exceeds what is ever written.
    #[error("{}: {bytes} bytes, more than the limit of {limit_bytes}", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its (claimed) size.
        bytes: u64,
        /// The most allowed.
        limit_bytes: u64,
    },
    /// The limits (or the disk's size) are out of range.
    #[error("change map limits: {0}")]
    Limits(String),
    /// The change map's name is not a plain file name.
    #[error("change map name {name:?} is not 1 to 64 characters of [A-Za-z0-9_.-]")]
    Name {
        /// The name given.
        name: String,
    },
    /// A write range lies (partly) past the disk's end.
    #[error(
        "range at {offset_bytes} of {length_bytes} bytes lies past the disk's end ({disk_bytes} bytes)"
    )]
    OutOfRange {
        /// The range's offset.
        offset_bytes: u64,
        /// The range's length.
        length_bytes: u64,
        /// The disk's size.
        disk_bytes: u64,
    },
    /// A write spans more activity-log extents than the log holds.
    #[error(
        "a write of {length_bytes} bytes spans {extents} activity-log extents, more than the {al_extents} the log holds"
    )]
    WriteSpan {
        /// The write's length.
        length_bytes: u64,
        /// Extents it spans.
        extents: u64,
        /// The log's capacity.
        al_extents: u32,
    },
    /// The caller's `sync_disk` failed (nothing was evicted).
    #[error("syncing the disk before an activity-log transaction: {0}")]
    SyncDisk(#[source] io::Error),
}

mod map;
pub use map::ChangeMap;

fn validate_name(name: &str) -> Result<(), ChangeMapError> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ChangeMapError::Name {
            name: name.to_string(),
        })
    }
}

/// What the state files hold, read without changing anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Loaded {
    pub(crate) map: Option<SavedMap>,
    pub(crate) log: Option<SavedLog>,
}

/// Reads and checks both state files of `name` in `dir`.
pub(crate) fn load(
    dir: &Path,
    name: &str,
    item_id: [u8; 16],
    disk_size_bytes: u64,
) -> Result<Loaded, ChangeMapError> {
    let (map_path, al_path) = paths(dir, name);
    let map = file::read_capped(&map_path, file::MAX_MAP_FILE_BYTES)?
        .map(|bytes| file::decode_map(&map_path, &bytes, item_id, disk_size_bytes))
        .transpose()?;
    let log = file::read_capped(&al_path, file::max_al_file_bytes())?
        .map(|bytes| file::decode_al(&al_path, &bytes, item_id, disk_size_bytes))
        .transpose()?;
    Ok(Loaded { map, log })
}

fn paths(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{name}.cmap")),
        dir.join(format!("{name}.al")),
    )
}

/// The byte range `[offset, offset + length)` clipped to the disk, if not empty.
fn clip(offset_bytes: u64, length_bytes: u64, disk_bytes: u64) -> Option<(u64, u64)> {
    let end = offset_bytes.saturating_add(length_bytes).min(disk_bytes);
    (offset_bytes < end).then_some((offset_bytes, end))
}

/// Rounds down to the minimum grain (used for the catch-up's range lengths).
fn whole_grains(bytes: u64, grain_bytes: u64) -> u64 {
    align_down(bytes, grain_bytes).max(grain_bytes)
}
