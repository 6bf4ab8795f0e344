//! Seeded workloads: the writes, trims and bookmarks a simulated VM produces.
//!
//! A [`Workload`] yields [`Op`]s for the disks of one item. Everything comes from one seed, so
//! a workload replays exactly. Sizes are powers of two between the disk's logical block size
//! (at least 512 B) and 1 MiB; every extent is aligned and inside its disk.

use engine::delta::{Consistency, DiskGeometry};

use crate::rng::Rng;

/// Where writes land.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// Uniformly random offsets.
    Uniform,
    /// Each disk written front to back, wrapping at the end.
    Sequential,
    /// 80 % of writes into the first 10 % of each disk (a hot spot), the rest uniform.
    HotSpot,
}

/// What a workload looks like.
#[derive(Debug, Clone)]
pub struct WorkloadSpec {
    /// Where writes land.
    pub pattern: Pattern,
    /// Largest write, bytes (power of two, ≤ 1 MiB).
    pub write_max_bytes: u32,
    /// Per mille of operations that are zero ranges (trim) instead of writes.
    pub zero_range_per_mille: u32,
    /// Percent of writes whose data compresses well.
    pub compressible_percent: u32,
    /// A crash-consistent bookmark after this many operations (0 = never).
    pub crash_bookmark_every_ops: u64,
    /// An app-consistent bookmark after this many operations (0 = never).
    pub app_bookmark_every_ops: u64,
}

impl Default for WorkloadSpec {
    fn default() -> Self {
        Self {
            pattern: Pattern::Uniform,
            write_max_bytes: 1024 * 1024,
            zero_range_per_mille: 20,
            compressible_percent: 50,
            crash_bookmark_every_ops: 50,
            app_bookmark_every_ops: 200,
        }
    }
}

/// One operation of a workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Data written; the bytes are in the buffer passed to [`Workload::next_op`].
    Write {
        /// Disk index.
        disk_index: u16,
        /// Offset on the disk.
        offset_bytes: u64,
        /// Length of the data.
        length_bytes: u32,
    },
    /// A range trimmed to zeros.
    ZeroRange {
        /// Disk index.
        disk_index: u16,
        /// Offset on the disk.
        offset_bytes: u64,
        /// Length of the range.
        length_bytes: u64,
    },
    /// A recovery point across all disks.
    Bookmark {
        /// Crash- or app-consistent.
        consistency: Consistency,
        /// Id, increasing from 1.
        bookmark_id: u64,
    },
}

/// A seeded generator of [`Op`]s.
#[derive(Debug)]
pub struct Workload {
    rng: Rng,
    spec: WorkloadSpec,
    disks: Vec<DiskGeometry>,
    cursors_bytes: Vec<u64>,
    ops_count: u64,
    next_bookmark_id: u64,
}

impl Workload {
    /// A workload over `disks`, from `seed`.
    pub fn new(seed: u64, spec: WorkloadSpec, disks: Vec<DiskGeometry>) -> Self {
        Self {
            rng: Rng::new(seed),
            cursors_bytes: vec![0; disks.len()],
            spec,
            disks,
            ops_count: 0,
            next_bookmark_id: 1,
        }
    }

    /// The next operation; for a write, `data` is resized to and filled with its bytes.
    pub fn next_op(&mut self, data: &mut Vec<u8>) -> Op {
        self.ops_count += 1;
        for (every, consistency) in [
            (self.spec.app_bookmark_every_ops, Consistency::App),
            (self.spec.crash_bookmark_every_ops, Consistency::Crash),
        ] {
            if every != 0 && self.ops_count.is_multiple_of(every) {
                let bookmark_id = self.next_bookmark_id;
                self.next_bookmark_id += 1;
                return Op::Bookmark {
                    consistency,
                    bookmark_id,
                };
            }
        }
        let disk_index = self.rng.below(self.disks.len() as u64) as usize;
        let disk = self.disks[disk_index];
        let length_bytes = self.pick_length(disk);
        let offset_bytes = self.pick_offset(disk_index, disk, length_bytes);
        let disk_index = disk_index as u16;
        if self.rng.below(1000) < u64::from(self.spec.zero_range_per_mille) {
            return Op::ZeroRange {
                disk_index,
                offset_bytes,
                length_bytes,
            };
        }
        data.resize(length_bytes as usize, 0);
        if self.rng.below(100) < u64::from(self.spec.compressible_percent) {
            fill_compressible(&mut self.rng, data);
        } else {
            self.rng.fill(data);
        }
        Op::Write {
            disk_index,
            offset_bytes,
            length_bytes: length_bytes as u32,
        }
    }

    fn pick_length(&mut self, disk: DiskGeometry) -> u64 {
        let block = u64::from(disk.block_size_bytes).max(512);
        let max = u64::from(self.spec.write_max_bytes).clamp(block, disk.size_bytes);
        let (low, high) = (block.ilog2(), max.ilog2());
        1u64 << (low + self.rng.below(u64::from(high - low + 1)) as u32)
    }

    fn pick_offset(&mut self, disk_index: usize, disk: DiskGeometry, length_bytes: u64) -> u64 {
        let block = u64::from(disk.block_size_bytes);
        let slots = (disk.size_bytes - length_bytes) / block + 1;
        match self.spec.pattern {
            Pattern::Uniform => self.rng.below(slots) * block,
            Pattern::HotSpot => {
                let hot = (slots / 10).max(1);
                let range = if self.rng.chance(8, 10) { hot } else { slots };
                self.rng.below(range) * block
            }
            Pattern::Sequential => {
                let cursor = &mut self.cursors_bytes[disk_index];
                if *cursor + length_bytes > disk.size_bytes {
                    *cursor = 0;
                }
                let offset = *cursor;
                *cursor += length_bytes;
                offset
            }
        }
    }
}

/// Data that compresses like real guest data: runs of zeros and a repeated seeded phrase.
fn fill_compressible(rng: &mut Rng, out: &mut [u8]) {
    let mut phrase = [0u8; 64];
    rng.fill(&mut phrase);
    for (index, chunk) in out.chunks_mut(512).enumerate() {
        if index % 4 == 0 {
            chunk.fill(0);
        } else {
            for (at, byte) in chunk.iter_mut().enumerate() {
                *byte = phrase[at % phrase.len()];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disks() -> Vec<DiskGeometry> {
        vec![
            DiskGeometry {
                size_bytes: 8 << 20,
                block_size_bytes: 512,
            },
            DiskGeometry {
                size_bytes: 4 << 20,
                block_size_bytes: 4096,
            },
        ]
    }

    #[test]
    fn workload_extents_are_aligned_and_inside_their_disk() {
        for pattern in [Pattern::Uniform, Pattern::Sequential, Pattern::HotSpot] {
            let spec = WorkloadSpec {
                pattern,
                ..WorkloadSpec::default()
            };
            let mut workload = Workload::new(3, spec, disks());
            let mut data = Vec::new();
            for _ in 0..2000 {
                let (disk_index, offset_bytes, length_bytes) = match workload.next_op(&mut data) {
                    Op::Write {
                        disk_index,
                        offset_bytes,
                        length_bytes,
                    } => {
                        assert_eq!(data.len(), length_bytes as usize);
                        (disk_index, offset_bytes, u64::from(length_bytes))
                    }
                    Op::ZeroRange {
                        disk_index,
                        offset_bytes,
                        length_bytes,
                    } => (disk_index, offset_bytes, length_bytes),
                    Op::Bookmark { .. } => continue,
                };
                let disk = disks()[usize::from(disk_index)];
                assert_eq!(disk.check_extent(offset_bytes, length_bytes), Ok(()));
            }
        }
    }

    #[test]
    fn workload_same_seed_same_ops_and_bookmarks_at_interval() {
        let mut a = Workload::new(9, WorkloadSpec::default(), disks());
        let mut b = Workload::new(9, WorkloadSpec::default(), disks());
        let (mut data_a, mut data_b) = (Vec::new(), Vec::new());
        let mut bookmarks = 0;
        for _ in 0..400 {
            let op = a.next_op(&mut data_a);
            assert_eq!(op, b.next_op(&mut data_b));
            assert_eq!(data_a, data_b);
            if matches!(op, Op::Bookmark { .. }) {
                bookmarks += 1;
            }
        }
        assert_eq!(bookmarks, 8);
    }
}
