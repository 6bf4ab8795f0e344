//! Payload handoff: a zstd payload ingest decompressed to validate it is handed to apply, so
//! that in the common case (apply caught up) it is decompressed once, not twice.
//!
//! ```text
//!  ingest (session thread)                        apply (item worker thread)
//!   lend(length) ─► a free buffer (or none)        StagingReader::next_frame ─► seq, checksum
//!   PayloadDecoder::decode_into(buffer)            take(key of that frame)
//!   StagingLog::append(wire bytes)                   hit: the bytes (swap into the spill
//!   StagingLog::commit() ─► publish(key) ─► ack           buffer, or copy into an I/O buffer)
//!                                                  miss: decompress from staging, as always
//!                                                  recycle(buffer it no longer needs)
//! ```
//!
//! One handoff per staging log (shared by the log and its readers), bounded by
//! [`HANDOFF_MAX_BYTES`] of buffers: free ones, published ones and those lent to ingest. When
//! the budget is used up (apply is behind), ingest decompresses into its own scratch buffer and
//! hands nothing off; apply then decompresses from staging. Nothing is allocated per frame once
//! the buffers exist.
//!
//! Invariants:
//! - bytes are published only after the frame's [`crate::staging::StagingLog::commit`]
//!   returned: what is published for a sequence number is the decompression of exactly the
//!   frame staging holds durably under it;
//! - apply uses published bytes only for a frame whose [`PayloadKey`] is equal in every field:
//!   sequence number, the frame's XXH3 checksum (which covers its header and payload), disk,
//!   offset and length; anything else is dropped, never used;
//! - published keys are in increasing sequence order (a lower one clears what is published),
//!   and [`PayloadHandoff::clear`] drops everything (the staging log's `resync_done`); a
//!   restart starts with an empty handoff, so apply then works from staging alone.
//!
//! Lock: one mutex, a leaf (taken with the staging log's mutex held by ingest, never held
//! while taking another lock, across I/O or across a decompression).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::delta::DataExtent;

/// Most bytes of buffers one item's handoff holds (free, published and lent together): two
/// 1 MiB payloads, or 32 of 64 KiB. A payload larger than this is never handed off.
pub const HANDOFF_MAX_BYTES: usize = 2 << 20;

/// Which frame handed-off bytes belong to: apply uses them only for a frame equal in every
/// field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PayloadKey {
    /// Sequence number.
    pub seq: u64,
    /// The frame's stored XXH3 checksum (header and payload).
    pub checksum: u64,
    /// Disk index.
    pub disk_index: u16,
    /// Offset on the disk.
    pub offset_bytes: u64,
    /// Decompressed length.
    pub length_bytes: u32,
}

impl PayloadKey {
    /// The key of frame `seq` with checksum `checksum` carrying `extent`.
    pub fn of(seq: u64, checksum: u64, extent: &DataExtent<'_>) -> Self {
        Self {
            seq,
            checksum,
            disk_index: extent.disk_index,
            offset_bytes: extent.offset_bytes,
            length_bytes: extent.length_bytes,
        }
    }
}

#[derive(Debug)]
struct Published {
    key: PayloadKey,
    bytes: Vec<u8>,
}

#[derive(Debug, Default)]
struct Ring {
    published: VecDeque<Published>,
    free: Vec<Vec<u8>>,
    /// Capacity of the buffers published, free and lent to ingest.
    held_bytes: usize,
}

/// Counters since the handoff was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HandoffStats {
    /// Payloads published by ingest.
    pub published: u64,
    /// Payloads apply took (and did not decompress).
    pub taken: u64,
    /// Published payloads dropped unused: apply had passed their sequence number, or the frame
    /// staging holds under it did not match the key, or the handoff was cleared.
    pub dropped: u64,
    /// Of `dropped`, those whose sequence number matched but another field did not.
    pub mismatched: u64,
}

/// The handoff of one item's decompressed payloads from ingest to apply.
#[derive(Debug)]
pub struct PayloadHandoff {
    max_bytes: usize,
    ring: Mutex<Ring>,
    published: AtomicU64,
    taken: AtomicU64,
    dropped: AtomicU64,
    mismatched: AtomicU64,
}

impl Default for PayloadHandoff {
    fn default() -> Self {
        Self::new(HANDOFF_MAX_BYTES)
    }
}

/// A buffer lent to ingest, holding `length` bytes to decompress into. Dropped without being
/// published, it goes back to the free buffers.
#[derive(Debug)]
pub struct LentBuffer {
    bytes: Vec<u8>,
    home: Arc<PayloadHandoff>,
}

impl LentBuffer {
    /// The bytes to fill (exactly the length asked for).
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.bytes
    }

    /// Makes the bytes available to apply for the frame `key` (call only once that frame is
    /// durable in staging).
    pub fn publish(mut self, key: PayloadKey) {
        let bytes = std::mem::take(&mut self.bytes);
        self.home.publish(key, bytes);
    }
}

impl Drop for LentBuffer {
    fn drop(&mut self) {
        if self.bytes.capacity() > 0 {
            let bytes = std::mem::take(&mut self.bytes);
            self.home.lock().free.push(bytes);
        }
    }
}

impl PayloadHandoff {
    /// An empty handoff that holds at most `max_bytes` of buffers.
    pub fn new(max_bytes: usize) -> Self {
        Self {
            max_bytes,
            ring: Mutex::new(Ring::default()),
            published: AtomicU64::new(0),
            taken: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            mismatched: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The counters.
    pub fn stats(&self) -> HandoffStats {
        HandoffStats {
            published: self.published.load(Ordering::Relaxed),
            taken: self.taken.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            mismatched: self.mismatched.load(Ordering::Relaxed),
        }
    }

    /// Most bytes of buffers it holds.
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// Whether published payloads wait for apply (apply has not reached them yet).
    pub fn has_published(&self) -> bool {
        !self.lock().published.is_empty()
    }

    /// Bytes of buffers held now (free, published and lent).
    pub fn held_bytes(&self) -> usize {
        self.lock().held_bytes
    }

    /// A buffer of `length` bytes for ingest to decompress into, or `None` when the budget
    /// does not allow it (apply is behind, or the payload is larger than the budget).
    pub fn lend(self: &Arc<Self>, length: usize) -> Option<LentBuffer> {
        let mut ring = self.lock();
        let bytes = match ring.free.pop() {
            Some(mut bytes) => {
                let before = bytes.capacity();
                if length > before && ring.held_bytes - before + length > self.max_bytes {
                    ring.free.push(bytes);
                    return None;
                }
                // Contents are overwritten by the decompression; resize only sets the length
                // (and zero-fills a buffer the first time it grows).
                bytes.resize(length, 0);
                ring.held_bytes = ring.held_bytes - before + bytes.capacity();
                bytes
            }
            None if ring.held_bytes + length <= self.max_bytes => {
                let bytes = vec![0u8; length];
                ring.held_bytes += bytes.capacity();
                bytes
            }
            None => return None,
        };
        Some(LentBuffer {
            bytes,
            home: self.clone(),
        })
    }

    fn publish(&self, key: PayloadKey, bytes: Vec<u8>) {
        let mut ring = self.lock();
        // Keys arrive in increasing sequence order; a lower one means a discontinuity.
        if ring.published.back().is_some_and(|p| p.key.seq >= key.seq) {
            self.drop_all_published(&mut ring);
        }
        ring.published.push_back(Published { key, bytes });
        self.published.fetch_add(1, Ordering::Relaxed);
    }

    /// The bytes published for exactly `key`, if any. Published payloads for earlier sequence
    /// numbers (apply passed them), and one for this sequence number with another key, are
    /// dropped. The caller owns the bytes; [`PayloadHandoff::recycle`] gives a buffer back.
    pub fn take(&self, key: &PayloadKey) -> Option<Vec<u8>> {
        let mut ring = self.lock();
        while let Some(front) = ring.published.front() {
            if front.key.seq > key.seq {
                return None;
            }
            let front = ring.published.pop_front()?;
            if front.key == *key {
                ring.held_bytes -= front.bytes.capacity();
                self.taken.fetch_add(1, Ordering::Relaxed);
                return Some(front.bytes);
            }
            self.dropped.fetch_add(1, Ordering::Relaxed);
            let same_seq = front.key.seq == key.seq;
            if same_seq {
                self.mismatched.fetch_add(1, Ordering::Relaxed);
            }
            ring.free.push(front.bytes);
            if same_seq {
                return None;
            }
        }
        None
    }

    /// Gives apply's spare buffer to the handoff for reuse, or drops it when the budget is
    /// full.
    pub fn recycle(&self, bytes: Vec<u8>) {
        let mut ring = self.lock();
        if bytes.capacity() > 0 && ring.held_bytes + bytes.capacity() <= self.max_bytes {
            ring.held_bytes += bytes.capacity();
            ring.free.push(bytes);
        }
    }

    /// Drops everything published (a discontinuity: the staged frames were replaced).
    pub fn clear(&self) {
        let mut ring = self.lock();
        self.drop_all_published(&mut ring);
    }

    fn drop_all_published(&self, ring: &mut Ring) {
        while let Some(published) = ring.published.pop_front() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            ring.free.push(published.bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

    use super::*;

    fn key(seq: u64, checksum: u64) -> PayloadKey {
        PayloadKey {
            seq,
            checksum,
            disk_index: 0,
            offset_bytes: seq << 20,
            length_bytes: 4096,
        }
    }

    fn publish(handoff: &Arc<PayloadHandoff>, key: PayloadKey, fill: u8) {
        let mut lent = handoff.lend(key.length_bytes as usize).unwrap();
        lent.as_mut_slice().fill(fill);
        lent.publish(key);
    }

    #[test]
    fn only_an_exactly_matching_key_gets_the_bytes_and_earlier_ones_are_dropped() {
        let handoff = Arc::new(PayloadHandoff::new(64 << 10));
        publish(&handoff, key(1, 11), 1);
        publish(&handoff, key(2, 22), 2);
        publish(&handoff, key(3, 33), 3);
        publish(&handoff, key(5, 55), 5);
        // Seq 2 with another checksum (staging holds another frame under it): not used.
        assert_eq!(handoff.take(&key(2, 99)), None);
        let other_offset = PayloadKey {
            offset_bytes: 0,
            ..key(3, 33)
        };
        assert_eq!(handoff.take(&other_offset), None);
        // Seq 4 was never published; 5 is ahead and stays.
        assert_eq!(handoff.take(&key(4, 44)), None);
        assert_eq!(handoff.take(&key(5, 55)), Some(vec![5u8; 4096]));
        let stats = handoff.stats();
        assert_eq!(
            (
                stats.published,
                stats.taken,
                stats.dropped,
                stats.mismatched
            ),
            (4, 1, 3, 2)
        );
    }

    #[test]
    fn the_budget_bounds_lent_published_and_recycled_buffers() {
        let handoff = Arc::new(PayloadHandoff::new(8192));
        let first = handoff.lend(4096).unwrap();
        let second = handoff.lend(4096).unwrap();
        assert!(handoff.lend(1).is_none(), "the budget is used up");
        drop(first); // back to the free buffers, still counted
        assert_eq!(handoff.held_bytes(), 8192);
        second.publish(key(1, 1));
        let bytes = handoff.take(&key(1, 1)).unwrap();
        assert_eq!(handoff.held_bytes(), 4096);
        handoff.recycle(bytes);
        handoff.recycle(vec![0u8; 4096]); // over the budget: dropped
        assert_eq!(handoff.held_bytes(), 8192);
        assert!(
            handoff.lend(8192).is_none(),
            "growing past the budget is refused"
        );
        assert!(handoff.lend(4096).is_some());
    }

    #[test]
    fn a_lower_sequence_number_or_a_clear_drops_what_was_published() {
        let handoff = Arc::new(PayloadHandoff::new(64 << 10));
        publish(&handoff, key(7, 7), 7);
        publish(&handoff, key(3, 3), 3); // a discontinuity: 7 is dropped
        assert_eq!(handoff.take(&key(7, 7)), None);
        publish(&handoff, key(8, 8), 8);
        handoff.clear();
        assert_eq!(handoff.take(&key(8, 8)), None);
        assert_eq!(handoff.stats().taken, 0);
    }
}
