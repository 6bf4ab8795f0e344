//! [`ChangeMap`]: the unsent set, the in-flight resends and the activity log together.

use std::path::{Path, PathBuf};

use super::activity::ActiveSet;
use super::file::{self, LogFile};
use super::runs::{RUN_COST_BYTES, Runs};
use super::{
    ChangeMapError, ChangeMapStats, HANDOUTS, Limits, MAX_DISK_BYTES, Recovered, clip, load, paths,
    validate_name, whole_grains,
};

/// A range handed out by `next_unsent`, and whether a write touched it since.
#[derive(Debug, Clone, Copy, Default)]
struct Handout {
    start: u64,
    end: u64,
    live: bool,
    touched: bool,
}

/// One disk's change map: which regions may differ between the local disk and what the
/// appliance holds durably. Files: `<dir>/<name>.cmap` (the unsent set) and `<dir>/<name>.al`
/// (the activity log). Not thread-safe by itself: the caller serialises (`&mut self`).
///
/// Caller's contract (the write path): `begin_write` before the disk write; then, under the
/// same serialisation, `sent` or `mark_unsent` for the same range, called only after the data
/// reached the disk (a write that failed is marked unsent). The catch-up: `next_unsent`, read
/// the range from the disk, send it, `resent`; a write touching the range in between keeps it
/// unsent (it is resent again later), so a resend that raced a write is never trusted.
#[derive(Debug)]
pub struct ChangeMap {
    dir: PathBuf,
    map_path: PathBuf,
    item_id: [u8; 16],
    disk_bytes: u64,
    limits: Limits,
    extent_shift: u32,
    unsent: Runs,
    /// Resent ranges not yet acknowledged: the filling set and the sealed one.
    inflight: Runs,
    inflight_max_seq: Option<u64>,
    sealed: Runs,
    sealed_max_seq: Option<u64>,
    /// The unsent set gained something since the last save.
    map_dirty: bool,
    active: ActiveSet,
    log: LogFile,
    acked_seq: Option<u64>,
    cursor_bytes: u64,
    handouts: [Handout; HANDOUTS],
    handout_next: usize,
    handouts_live: usize,
    al_transactions: u64,
    map_saves: u64,
    spilled_extents: u64,
}

impl ChangeMap {
    /// Opens (or creates) the files. `item_id` and `disk_size_bytes` are recorded; state files
    /// of another item or size are refused with a named error, never silently reused.
    /// After a crash: unsent = saved map ∪ every extent active in the activity log.
    /// Fresh: unsent = the whole disk. Either way the map is saved before returning (and the
    /// activity log restarts empty, with the current limits: what it held is in the map).
    /// If only one of the two files exists, the whole disk is marked unsent.
    pub fn open(
        dir: &Path,
        name: &str,
        item_id: [u8; 16],
        disk_size_bytes: u64,
        limits: Limits,
    ) -> Result<(Self, Recovered), ChangeMapError> {
        limits.validate()?;
        validate_name(name)?;
        if disk_size_bytes > MAX_DISK_BYTES {
            return Err(ChangeMapError::Limits(format!(
                "disk of {disk_size_bytes} bytes is larger than 2^62"
            )));
        }
        let loaded = load(dir, name, item_id, disk_size_bytes)?;
        let (map_path, al_path) = paths(dir, name);
        let (unsent_runs, inflight_runs) = limits.run_budget();
        let new_runs = |max| Runs::new(limits.min_grain_bytes, disk_size_bytes, max);
        let mut unsent = new_runs(unsent_runs);
        let mut recovered = Recovered::default();
        if let Some(map) = &loaded.map {
            unsent.start_at_grain(map.grain_bytes);
            for &(start, end) in &map.runs {
                recovered.from_map_bytes += end - start;
                unsent.insert(start, end - start);
            }
        }
        if let Some(log) = &loaded.log {
            for &index in &log.extents {
                let start = index * log.extent_bytes;
                let length = log.extent_bytes.min(disk_size_bytes - start);
                recovered.from_activity_log_bytes += length;
                unsent.insert(start, length);
            }
        }
        match (&loaded.map, &loaded.log) {
            (None, None) => recovered.fresh = true,
            (Some(_), Some(_)) => {}
            _ => tracing::warn!(
                map = %map_path.display(),
                activity_log = %al_path.display(),
                "one of the change map's two files is missing: the whole disk will be resent"
            ),
        }
        if loaded.map.is_none() || loaded.log.is_none() {
            unsent.insert(0, disk_size_bytes);
        }
        recovered.unsent_bytes = unsent.bytes();
        // The map (holding the old log's extents) is durable before the log restarts empty.
        let inflight = new_runs(inflight_runs);
        let sealed = new_runs(inflight_runs);
        let bytes = encode_union(item_id, disk_size_bytes, [&unsent, &inflight, &sealed]);
        file::write_atomic(dir, &map_path, &bytes)?;
        let log = LogFile::create(
            dir,
            &al_path,
            item_id,
            disk_size_bytes,
            limits.al_extent_bytes,
            u64::from(limits.al_extents),
        )?;
        let map = ChangeMap {
            dir: dir.to_path_buf(),
            map_path,
            item_id,
            disk_bytes: disk_size_bytes,
            limits,
            extent_shift: limits.al_extent_bytes.trailing_zeros(),
            unsent,
            inflight,
            inflight_max_seq: None,
            sealed,
            sealed_max_seq: None,
            map_dirty: false,
            active: ActiveSet::new(limits.al_extents as usize),
            log,
            acked_seq: None,
            cursor_bytes: 0,
            handouts: [Handout::default(); HANDOUTS],
            handout_next: 0,
            handouts_live: 0,
            al_transactions: 0,
            map_saves: 1,
            spilled_extents: 0,
        };
        Ok((map, recovered))
    }

    /// Must be called before writing [offset, offset+len) to the disk (with the caller's
    /// serialising lock held until the write is queued or marked unsent). Makes every
    /// activity-log extent covering the range active; when one was not, writes one
    /// activity-log transaction (fdatasync'd) first. When the log is full it evicts the least
    /// recently used extent, preferring ones whose writes are all acknowledged; before an
    /// extent leaves the log, `sync_disk` is called (the disk's data must be durable, so a
    /// host crash cannot leave the appliance newer than the disk outside the log), and an
    /// extent with unacknowledged writes is first added to the unsent set and the map saved.
    ///
    /// When every extent is already active this neither allocates nor makes a system call.
    pub fn begin_write(
        &mut self,
        offset_bytes: u64,
        length_bytes: u64,
        sync_disk: &mut dyn FnMut() -> std::io::Result<()>,
    ) -> Result<(), ChangeMapError> {
        if length_bytes == 0 {
            return Ok(());
        }
        let end = offset_bytes
            .checked_add(length_bytes)
            .filter(|&end| end <= self.disk_bytes)
            .ok_or(ChangeMapError::OutOfRange {
                offset_bytes,
                length_bytes,
                disk_bytes: self.disk_bytes,
            })?;
        self.touch_handouts(offset_bytes, end);
        let first = offset_bytes >> self.extent_shift;
        let last = (end - 1) >> self.extent_shift;
        let mut missing = 0usize;
        for index in first..=last {
            if !self.active.touch(index, true) {
                missing += 1;
            }
        }
        if missing == 0 {
            return Ok(());
        }
        self.activate(first, last, missing, length_bytes, sync_disk)
    }

    /// Activates the missing extents of `first..=last` in one transaction, evicting first.
    #[cold]
    fn activate(
        &mut self,
        first: u64,
        last: u64,
        missing: usize,
        length_bytes: u64,
        sync_disk: &mut dyn FnMut() -> std::io::Result<()>,
    ) -> Result<(), ChangeMapError> {
        let span = last - first + 1;
        if span > self.active.capacity() as u64 {
            return Err(ChangeMapError::WriteSpan {
                length_bytes,
                extents: span,
                al_extents: self.limits.al_extents,
            });
        }
        let free = self.active.capacity() - self.active.len();
        let mut victims: Vec<u64> = Vec::new();
        let mut spilled = 0;
        while missing > free + victims.len() {
            let protect = (first, last);
            let Some((victim, clean)) = self.active.lru_victim(protect, &victims, self.acked_seq)
            else {
                break; // unreachable: span ≤ capacity leaves enough extents outside the write
            };
            if !clean {
                let start = victim << self.extent_shift;
                self.map_dirty |= self.unsent.insert(start, self.limits.al_extent_bytes);
                spilled += 1;
            }
            victims.push(victim);
        }
        if !victims.is_empty() {
            if self.map_dirty {
                self.save_map()?;
            }
            sync_disk().map_err(ChangeMapError::SyncDisk)?;
        }
        let kept = self
            .active
            .iter()
            .map(|e| e.index)
            .filter(|index| !victims.contains(index));
        let added = (first..=last).filter(|&index| !self.active.contains(index));
        self.log.write(kept.chain(added))?;
        self.al_transactions += 1;
        self.spilled_extents += spilled;
        for victim in victims {
            self.active.remove(victim);
        }
        for index in first..=last {
            if !self.active.touch(index, true) {
                self.active.insert(index, true);
            }
        }
        Ok(())
    }

    /// The range's data went into the stream as frame `seq`. (Parts past the disk's end are
    /// ignored.)
    pub fn sent(&mut self, offset_bytes: u64, length_bytes: u64, seq: u64) {
        let Some((start, end)) = clip(offset_bytes, length_bytes, self.disk_bytes) else {
            return;
        };
        self.touch_handouts(start, end);
        self.note_sent(start, end, Some(seq));
    }

    /// The range's data could not go into the stream (the link's backlog was full).
    pub fn mark_unsent(&mut self, offset_bytes: u64, length_bytes: u64) {
        let Some((start, end)) = clip(offset_bytes, length_bytes, self.disk_bytes) else {
            return;
        };
        self.touch_handouts(start, end);
        self.map_dirty |= self.unsent.insert(start, end - start);
        self.note_sent(start, end, None);
    }

    /// Every frame with seq ≤ `seq` is durable at the appliance.
    pub fn acked(&mut self, seq: u64) {
        self.acked_seq = self.acked_seq.max(Some(seq));
        self.settle_inflight();
    }

    /// The stream was restarted: frames after `acked_seq` are lost; the ranges of every
    /// active extent with writes after it become unsent (the whole extent), and so do the
    /// resent ranges not acknowledged. Sequence numbers after `acked_seq` may be reused.
    pub fn requeue_unacked(&mut self, acked_seq: u64) {
        self.acked(acked_seq);
        let mut changed = self.unsent.absorb(&mut self.sealed);
        changed |= self.unsent.absorb(&mut self.inflight);
        self.sealed_max_seq = None;
        self.inflight_max_seq = None;
        for extent in self.active.iter_mut() {
            if extent.max_sent_seq.is_some_and(|sent| sent > acked_seq) {
                let start = extent.index << self.extent_shift;
                changed |= self.unsent.insert(start, self.limits.al_extent_bytes);
                extent.max_sent_seq = None;
            }
        }
        self.map_dirty |= changed;
    }

    /// The next unsent range to resend: grain-aligned, at most `max_length_bytes` (a
    /// multiple of the grain is not required: the range is clipped to the disk), starting
    /// at or after an internal cursor and wrapping around. Does not remove it.
    ///
    /// The range starts and ends on multiples of `min_grain_bytes` (or the disk's end) and
    /// is at least one such grain long even when `max_length_bytes` is smaller.
    pub fn next_unsent(&mut self, max_length_bytes: u64) -> Option<(u64, u64)> {
        let (run_start, run_end) = self.unsent.run_at_or_after(self.cursor_bytes)?;
        let start = if (run_start..run_end).contains(&self.cursor_bytes) {
            self.cursor_bytes
        } else {
            run_start
        };
        let most = whole_grains(max_length_bytes, self.limits.min_grain_bytes);
        let end = run_end.min(start.saturating_add(most));
        self.cursor_bytes = if end >= self.disk_bytes { 0 } else { end };
        let slot = &mut self.handouts[self.handout_next];
        if !slot.live {
            self.handouts_live += 1;
        }
        *slot = Handout {
            start,
            end,
            live: true,
            touched: false,
        };
        self.handout_next = (self.handout_next + 1) % HANDOUTS;
        Some((start, end - start))
    }

    /// A range returned by `next_unsent` was resent as frame `seq`: removes it from the
    /// unsent set (only if still exactly covered: a coarsening in between leaves it) and
    /// notes it sent.
    ///
    /// Precisely: it is removed when it lies within a range handed out by `next_unsent`
    /// (one of the last 64) that no `begin_write`, `sent` or `mark_unsent` touched since;
    /// partial grains stay. Until `seq` is acknowledged it is kept in the in-flight sets,
    /// which are saved with the map.
    pub fn resent(&mut self, offset_bytes: u64, length_bytes: u64, seq: u64) {
        let Some((start, end)) = clip(offset_bytes, length_bytes, self.disk_bytes) else {
            return;
        };
        let mut trusted = false;
        for handout in self.handouts.iter_mut() {
            if handout.live && handout.start <= start && end <= handout.end {
                trusted |= !handout.touched;
                if handout.start == start && handout.end == end {
                    handout.live = false;
                    self.handouts_live -= 1;
                }
            }
        }
        if trusted && self.unsent.remove(start, end - start) {
            self.inflight.insert(start, end - start);
            self.inflight_max_seq = self.inflight_max_seq.max(Some(seq));
            if self.unsent.is_empty() {
                // Nothing left to resend: no handout can remove anything any more, and the
                // write path need not look at them.
                self.handouts = [Handout::default(); HANDOUTS];
                self.handouts_live = 0;
            }
        }
        self.note_sent(start, end, Some(seq));
    }

    /// Narrows a fresh map (the whole disk unsent, as `open` left it) to `keep`, the ranges
    /// where the replica differs from the disk (found by comparing chunk hashes), plus every
    /// active extent: each write since `open` began in one, so what changed during the
    /// comparison stays unsent. Only while nothing was resent or spilled since a fresh `open`
    /// and the whole disk is still unsent; otherwise it changes nothing and returns false.
    /// The narrowed map is saved before it returns true.
    pub fn narrow_fresh(&mut self, keep: &[(u64, u64)]) -> Result<bool, ChangeMapError> {
        let untouched = self.handouts_live == 0
            && self.spilled_extents == 0
            && self.inflight.is_empty()
            && self.sealed.is_empty()
            && self.unsent.bytes() == self.disk_bytes;
        if !untouched {
            return Ok(false);
        }
        let extent_bytes = self.limits.al_extent_bytes;
        let written: Vec<u64> = self.active.iter().map(|e| e.index).collect();
        self.unsent.clear();
        for &(offset, length) in keep {
            if let Some((start, end)) = clip(offset, length, self.disk_bytes) {
                self.unsent.insert(start, end - start);
            }
        }
        for index in written {
            let start = index * extent_bytes;
            self.unsent
                .insert(start, extent_bytes.min(self.disk_bytes - start));
        }
        self.save_map()?;
        Ok(true)
    }

    /// Bytes in the unsent set.
    pub fn unsent_bytes(&self) -> u64 {
        self.unsent.bytes()
    }

    /// Saves the map, and rewrites the activity log with only the extents that still have
    /// unacknowledged writes (after `sync_disk`). After a clean stop with everything
    /// acknowledged, the next `open` recovers nothing.
    pub fn checkpoint(
        &mut self,
        sync_disk: &mut dyn FnMut() -> std::io::Result<()>,
    ) -> Result<(), ChangeMapError> {
        sync_disk().map_err(ChangeMapError::SyncDisk)?;
        self.save_map()?;
        let acked = self.acked_seq;
        if self.active.iter().all(|e| !e.is_clean(acked)) {
            return Ok(());
        }
        let kept = self
            .active
            .iter()
            .filter(|e| !e.is_clean(acked))
            .map(|e| e.index);
        self.log.write(kept)?;
        self.al_transactions += 1;
        let clean: Vec<u64> = (self.active.iter())
            .filter(|e| e.is_clean(acked))
            .map(|e| e.index)
            .collect();
        for index in clean {
            self.active.remove(index);
        }
        Ok(())
    }

    /// Counters and state for status output.
    pub fn stats(&self) -> ChangeMapStats {
        ChangeMapStats {
            unsent_bytes: self.unsent.bytes(),
            unsent_runs: self.unsent.len() as u64,
            grain_bytes: self.unsent.grain_bytes(),
            active_extents: self.active.len() as u32,
            al_transactions: self.al_transactions,
            map_saves: self.map_saves,
            coarsenings: self.unsent.coarsenings()
                + self.inflight.coarsenings()
                + self.sealed.coarsenings(),
            spilled_extents: self.spilled_extents,
        }
    }

    /// Bytes the unsent set (with the resent, unacknowledged ranges) is counted as in memory:
    /// 32 bytes a run; at most `max_map_bytes` between calls.
    pub fn map_memory_bytes(&self) -> u64 {
        (self.unsent.len() + self.inflight.len() + self.sealed.len()) as u64 * RUN_COST_BYTES
    }

    /// Whether any byte of the range is in the unsent set.
    pub fn is_unsent(&self, offset_bytes: u64, length_bytes: u64) -> bool {
        clip(offset_bytes, length_bytes, self.disk_bytes)
            .is_some_and(|(start, end)| self.unsent.intersects(start, end))
    }

    /// Updates the active extents of `[start, end)`: a frame was sent into them (`seq`), or
    /// their write was marked unsent (`None`); either way no write is pending any more.
    fn note_sent(&mut self, start: u64, end: u64, seq: Option<u64>) {
        let first = start >> self.extent_shift;
        let last = (end - 1) >> self.extent_shift;
        let update = |extent: &mut super::activity::Extent| {
            extent.pending = false;
            extent.max_sent_seq = extent.max_sent_seq.max(seq);
        };
        if last - first >= self.active.len() as u64 {
            for extent in self.active.iter_mut() {
                if (first..=last).contains(&extent.index) {
                    update(extent);
                }
            }
        } else {
            for index in first..=last {
                if let Some(extent) = self.active.get_mut(index) {
                    update(extent);
                }
            }
        }
    }

    /// A write touched `[start, end)`: a resend of an overlapping handout is not trusted.
    fn touch_handouts(&mut self, start: u64, end: u64) {
        if self.handouts_live == 0 {
            return;
        }
        for handout in self.handouts.iter_mut() {
            if handout.live && handout.start < end && start < handout.end {
                handout.touched = true;
            }
        }
    }

    /// Clears the in-flight sets whose frames are all acknowledged; seals the filling one.
    fn settle_inflight(&mut self) {
        let Some(acked) = self.acked_seq else { return };
        if self.sealed_max_seq.is_some_and(|max| max <= acked) {
            self.sealed.clear();
            self.sealed_max_seq = None;
        }
        if self.sealed.is_empty() && !self.inflight.is_empty() {
            if self.inflight_max_seq.is_none_or(|max| max <= acked) {
                self.inflight.clear();
                self.inflight_max_seq = None;
            } else {
                std::mem::swap(&mut self.sealed, &mut self.inflight);
                self.sealed_max_seq = self.inflight_max_seq.take();
            }
        }
    }

    /// Saves unsent ∪ in-flight atomically.
    fn save_map(&mut self) -> Result<(), ChangeMapError> {
        let sets = [&self.unsent, &self.inflight, &self.sealed];
        let bytes = encode_union(self.item_id, self.disk_bytes, sets);
        file::write_atomic(&self.dir, &self.map_path, &bytes)?;
        self.map_dirty = false;
        self.map_saves += 1;
        Ok(())
    }
}

/// The map file's bytes for the union of `sets` (the first one's grain recorded).
fn encode_union(item_id: [u8; 16], disk_bytes: u64, sets: [&Runs; 3]) -> Vec<u8> {
    let mut all: Vec<(u64, u64)> = sets.iter().flat_map(|set| set.iter()).collect();
    all.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(all.len());
    for (start, end) in all {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    file::encode_map(item_id, disk_bytes, sets[0].grain_bytes(), &merged)
}

#[cfg(test)]
impl ChangeMap {
    /// Whether byte `offset` is covered in memory: unsent, in flight, or in an active extent.
    pub(crate) fn covers(&self, offset_bytes: u64) -> bool {
        self.unsent.contains(offset_bytes)
            || self.inflight.contains(offset_bytes)
            || self.sealed.contains(offset_bytes)
            || self.active.contains(offset_bytes >> self.extent_shift)
    }

    /// The activity log file (to corrupt its newest slot).
    pub(crate) fn log_file(&self) -> &LogFile {
        &self.log
    }
}
