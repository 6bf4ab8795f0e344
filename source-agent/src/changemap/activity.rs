//! The in-memory activity log: the set of active extents, with least-recently-used order.
//!
//! Fixed capacity, allocated once at open: a slot vector of `al_extents` entries and a hash
//! index (extent → slot) with that capacity reserved, so touching an active extent (the VM's
//! write path) neither allocates nor makes a system call. Recency is a use counter per slot;
//! the O(n) scan for the least recently used extent runs only when one must be evicted
//! (n ≤ `al_extents`).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A hasher for extent indices (u64 keys): one multiply and a fold. Extent indices are not
/// chosen by an adversary that could exploit collisions (they come from the VM's offsets,
/// bounded by the disk size), and the table is small.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct ExtentHasher(u64);

impl Hasher for ExtentHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, value: u64) {
        let x = value.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.0 = x ^ (x >> 29);
    }
}

/// One active extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Extent {
    /// Extent index (offset / extent size).
    pub(crate) index: u64,
    /// Highest frame seq sent into it (`sent`/`resent`), if any.
    pub(crate) max_sent_seq: Option<u64>,
    /// A write began (`begin_write`) and was neither sent nor marked unsent yet.
    pub(crate) pending: bool,
    /// Use counter at the last touch (larger = more recent).
    pub(crate) last_use: u64,
}

impl Extent {
    /// Every write into it reached the appliance durably (or is covered by the unsent set).
    pub(crate) fn is_clean(&self, acked_seq: Option<u64>) -> bool {
        !self.pending
            && match self.max_sent_seq {
                None => true,
                Some(sent) => acked_seq.is_some_and(|acked| sent <= acked),
            }
    }
}

/// The active extents.
#[derive(Debug)]
pub(crate) struct ActiveSet {
    capacity: usize,
    slots: Vec<Extent>,
    index: HashMap<u64, usize, BuildHasherDefault<ExtentHasher>>,
    clock: u64,
}

impl ActiveSet {
    /// An empty set holding at most `capacity` extents.
    pub(crate) fn new(capacity: usize) -> Self {
        let mut index = HashMap::with_hasher(BuildHasherDefault::default());
        index.reserve(capacity);
        ActiveSet {
            capacity,
            slots: Vec::with_capacity(capacity),
            index,
            clock: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    pub(crate) fn contains(&self, index: u64) -> bool {
        self.index.contains_key(&index)
    }

    /// Marks an active extent used now; `pending` marks a write begun. Returns false when the
    /// extent is not active.
    pub(crate) fn touch(&mut self, index: u64, pending: bool) -> bool {
        match self.index.get(&index) {
            Some(&slot) => {
                self.clock += 1;
                let extent = &mut self.slots[slot];
                extent.last_use = self.clock;
                extent.pending |= pending;
                true
            }
            None => false,
        }
    }

    /// The active extent `index`, to update.
    pub(crate) fn get_mut(&mut self, index: u64) -> Option<&mut Extent> {
        match self.index.get(&index) {
            Some(&slot) => self.slots.get_mut(slot),
            None => None,
        }
    }

    /// Activates `index` (not active yet; the set is not full).
    pub(crate) fn insert(&mut self, index: u64, pending: bool) {
        if self.index.contains_key(&index) || self.slots.len() >= self.capacity {
            return;
        }
        self.clock += 1;
        self.index.insert(index, self.slots.len());
        self.slots.push(Extent {
            index,
            max_sent_seq: None,
            pending,
            last_use: self.clock,
        });
    }

    /// Deactivates `index`; returns its state.
    pub(crate) fn remove(&mut self, index: u64) -> Option<Extent> {
        let slot = self.index.remove(&index)?;
        let removed = self.slots.swap_remove(slot);
        if let Some(moved) = self.slots.get(slot) {
            self.index.insert(moved.index, slot);
        }
        Some(removed)
    }

    /// The active extents (in slot order).
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Extent> + '_ {
        self.slots.iter()
    }

    /// The active extents, to update.
    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = &mut Extent> + '_ {
        self.slots.iter_mut()
    }

    /// The least recently used extent not in `protect` (an inclusive index range), and not
    /// already in `chosen`; preferring clean ones. Returns `(index, clean)`.
    pub(crate) fn lru_victim(
        &self,
        protect: (u64, u64),
        chosen: &[u64],
        acked_seq: Option<u64>,
    ) -> Option<(u64, bool)> {
        let candidates = || {
            self.slots.iter().filter(|e| {
                (e.index < protect.0 || e.index > protect.1) && !chosen.contains(&e.index)
            })
        };
        if let Some(clean) = candidates()
            .filter(|e| e.is_clean(acked_seq))
            .min_by_key(|e| e.last_use)
        {
            return Some((clean.index, true));
        }
        candidates()
            .min_by_key(|e| e.last_use)
            .map(|e| (e.index, false))
    }
}
