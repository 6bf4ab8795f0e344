//! A bounded set of byte ranges ("runs") of one disk, kept aligned to a grain that coarsens
//! when the set would outgrow its bound.
//!
//! Representation: a `BTreeMap<start, end>` of disjoint, non-adjacent half-open byte ranges.
//! A run's start is a multiple of `min_grain_bytes`, its end too or the disk's size. Runs
//! inserted are aligned outward to the current grain; a removal (a resent range) is aligned
//! inward to the minimum grain, so it never uncovers part of a grain it did not cover whole.
//!
//! Memory: each run is counted as [`RUN_COST_BYTES`] (16 bytes of key and value, plus the
//! B-tree's node overhead: a leaf of `BTreeMap<u64, u64>` is 192 bytes for at most 11 runs,
//! about 24–38 bytes per run depending on fill). Between calls the set holds at most
//! `max_runs` runs; when an insertion takes it over, the grain doubles (every run re-aligned
//! outward to the coarser grain, neighbours merged) until it holds at most half of that.
//! Coarsening only ever grows the covered bytes. When the set becomes empty the grain
//! returns to the minimum.

use std::collections::BTreeMap;

/// Bytes one run is counted as in memory (see the module docs).
pub(crate) const RUN_COST_BYTES: u64 = 32;

/// Rounds `value` down to a multiple of `grain` (a power of two).
pub(crate) fn align_down(value: u64, grain: u64) -> u64 {
    value & !(grain - 1)
}

/// Rounds `value` up to a multiple of `grain` (a power of two), saturating at the largest
/// multiple representable.
pub(crate) fn align_up(value: u64, grain: u64) -> u64 {
    match value.checked_add(grain - 1) {
        Some(v) => align_down(v, grain),
        None => align_down(u64::MAX, grain),
    }
}

/// The bounded, coarsening set of runs.
#[derive(Debug, Clone)]
pub(crate) struct Runs {
    min_grain_bytes: u64,
    grain_bytes: u64,
    /// The coarsest grain: at it the set holds at most one run.
    max_grain_bytes: u64,
    disk_bytes: u64,
    max_runs: usize,
    map: BTreeMap<u64, u64>,
    bytes: u64,
    coarsenings: u64,
}

impl Runs {
    /// An empty set. `min_grain_bytes` is a power of two; `max_runs` ≥ 2.
    pub(crate) fn new(min_grain_bytes: u64, disk_bytes: u64, max_runs: usize) -> Self {
        Runs {
            min_grain_bytes,
            grain_bytes: min_grain_bytes,
            max_grain_bytes: disk_bytes
                .checked_next_power_of_two()
                .unwrap_or(1 << 63)
                .max(min_grain_bytes),
            disk_bytes,
            max_runs: max_runs.max(2),
            map: BTreeMap::new(),
            bytes: 0,
            coarsenings: 0,
        }
    }

    pub(crate) fn grain_bytes(&self) -> u64 {
        self.grain_bytes
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub(crate) fn coarsenings(&self) -> u64 {
        self.coarsenings
    }

    /// The runs in order, as `(start, end)` byte offsets.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.map.iter().map(|(&s, &e)| (s, e))
    }

    /// Sets the grain (when loading a saved map: start as coarse as it was), clamped to the
    /// minimum and the coarsest grain. Only on an empty set.
    pub(crate) fn start_at_grain(&mut self, grain_bytes: u64) {
        if self.map.is_empty() && grain_bytes.is_power_of_two() {
            self.grain_bytes = grain_bytes.clamp(self.min_grain_bytes, self.max_grain_bytes);
        }
    }

    /// Adds `[offset, offset + length)` (clipped to the disk), aligned outward to the grain.
    /// Returns whether the set changed.
    pub(crate) fn insert(&mut self, offset_bytes: u64, length_bytes: u64) -> bool {
        let end = offset_bytes
            .saturating_add(length_bytes)
            .min(self.disk_bytes);
        if length_bytes == 0 || offset_bytes >= end {
            return false;
        }
        let mut start = align_down(offset_bytes, self.grain_bytes);
        let mut stop = align_up(end, self.grain_bytes).min(self.disk_bytes);
        // Already covered by one run: nothing changes.
        if let Some((_, &run_end)) = self.map.range(..=start).next_back()
            && run_end >= stop
        {
            return false;
        }
        // Absorb every run overlapping or adjacent to [start, stop).
        while let Some((&run_start, &run_end)) = self.map.range(..=stop).next_back() {
            if run_end < start {
                break;
            }
            self.map.remove(&run_start);
            self.bytes -= run_end - run_start;
            start = start.min(run_start);
            stop = stop.max(run_end);
        }
        self.map.insert(start, stop);
        self.bytes += stop - start;
        if self.map.len() > self.max_runs {
            self.coarsen();
        }
        true
    }

    /// Removes `[offset, offset + length)` aligned inward to the minimum grain (the disk's
    /// end counts as aligned). Returns whether the set changed. A removal that splits a run
    /// may take the set over its bound; it then coarsens (re-covering, never losing).
    pub(crate) fn remove(&mut self, offset_bytes: u64, length_bytes: u64) -> bool {
        let end = offset_bytes
            .saturating_add(length_bytes)
            .min(self.disk_bytes);
        let start = align_up(offset_bytes, self.min_grain_bytes);
        let stop = if end == self.disk_bytes {
            end
        } else {
            align_down(end, self.min_grain_bytes)
        };
        if start >= stop {
            return false;
        }
        let mut changed = false;
        while let Some((&run_start, &run_end)) = self.map.range(..stop).next_back() {
            if run_end <= start {
                break;
            }
            changed = true;
            self.map.remove(&run_start);
            self.bytes -= run_end - run_start;
            if run_end > stop {
                self.map.insert(stop, run_end);
                self.bytes += run_end - stop;
            }
            if run_start < start {
                self.map.insert(run_start, start);
                self.bytes += start - run_start;
                break;
            }
        }
        if self.map.is_empty() {
            self.grain_bytes = self.min_grain_bytes;
        } else if self.map.len() > self.max_runs {
            self.coarsen();
        }
        changed
    }

    /// Empties the set; the grain returns to the minimum.
    pub(crate) fn clear(&mut self) {
        self.map.clear();
        self.bytes = 0;
        self.grain_bytes = self.min_grain_bytes;
    }

    /// Moves every run of `other` into `self` (and empties `other`).
    pub(crate) fn absorb(&mut self, other: &mut Runs) -> bool {
        let mut changed = false;
        for (start, end) in other.iter() {
            changed |= self.insert(start, end - start);
        }
        other.clear();
        changed
    }

    /// Whether byte `offset` is covered.
    #[cfg(test)]
    pub(crate) fn contains(&self, offset_bytes: u64) -> bool {
        self.map
            .range(..=offset_bytes)
            .next_back()
            .is_some_and(|(_, &end)| end > offset_bytes)
    }

    /// Whether any byte of `[start, end)` is covered.
    pub(crate) fn intersects(&self, start: u64, end: u64) -> bool {
        self.map
            .range(..end)
            .next_back()
            .is_some_and(|(_, &run_end)| run_end > start)
    }

    /// The first run ending after `cursor` (the run holding it, or the next one), else the
    /// first run (wrapping around).
    pub(crate) fn run_at_or_after(&self, cursor_bytes: u64) -> Option<(u64, u64)> {
        if let Some((&start, &end)) = self.map.range(..=cursor_bytes).next_back()
            && end > cursor_bytes
        {
            return Some((start, end));
        }
        self.map
            .range(cursor_bytes..)
            .next()
            .or_else(|| self.map.iter().next())
            .map(|(&s, &e)| (s, e))
    }

    /// Doubles the grain until the set holds at most half of `max_runs` runs.
    fn coarsen(&mut self) {
        while self.map.len() > self.max_runs / 2 && self.grain_bytes < self.max_grain_bytes {
            self.grain_bytes *= 2;
            self.coarsenings += 1;
            let grain = self.grain_bytes;
            let old = std::mem::take(&mut self.map);
            let mut current: Option<(u64, u64)> = None;
            for (start, end) in old {
                let start = align_down(start, grain);
                let end = align_up(end, grain).min(self.disk_bytes);
                current = match current {
                    Some((cs, ce)) if start <= ce => Some((cs, ce.max(end))),
                    Some((cs, ce)) => {
                        self.map.insert(cs, ce);
                        Some((start, end))
                    }
                    None => Some((start, end)),
                };
            }
            if let Some((cs, ce)) = current {
                self.map.insert(cs, ce);
            }
            self.bytes = self.map.iter().map(|(&s, &e)| e - s).sum();
        }
    }
}
