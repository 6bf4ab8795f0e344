//! `engine::resync` end to end over real files: after a local resync the replica equals the
//! source byte for byte, exactly the differing chunks were sent, and hash lists survive their
//! wire encoding while any corruption of it is detected.

// Test helpers outside #[test] functions unwrap too: a failure here is a test failure.
#![allow(clippy::unwrap_used)]

use std::cell::Cell;
use std::path::Path;

use engine::resync::{
    ChunkHashes, HashListError, ResyncError, ResyncOptions, ResyncPhase, ResyncStats, diff,
    hash_path, resync_local,
};
use proptest::prelude::*;
use rand_xoshiro::Xoshiro256PlusPlus;
use rand_xoshiro::rand_core::{Rng, SeedableRng};

/// Fills `data` from the workspace's one seeded RNG (the same seed gives the same bytes).
fn seeded_fill(data: &mut [u8], seed: u64) {
    Xoshiro256PlusPlus::seed_from_u64(seed).fill_bytes(data);
}

/// How a test damages the replica.
#[derive(Debug, Clone)]
enum Change {
    /// Flip one byte at this fraction of the disk.
    Byte(u32),
    /// Overwrite chunk number `n % chunks` with new content.
    Chunk(u32, u64),
    /// Change a byte of the last (possibly short) chunk.
    LastChunk(u16),
    /// Make every byte different.
    WholeDisk,
}

fn change_strategy() -> impl Strategy<Value = Change> {
    prop_oneof![
        4 => any::<u32>().prop_map(Change::Byte),
        4 => (any::<u32>(), any::<u64>()).prop_map(|(n, seed)| Change::Chunk(n, seed)),
        2 => any::<u16>().prop_map(Change::LastChunk),
        1 => Just(Change::WholeDisk),
    ]
}

fn apply(replica: &mut [u8], change: &Change, chunk_size_bytes: usize) {
    let len = replica.len();
    if len == 0 {
        return;
    }
    let chunks = len.div_ceil(chunk_size_bytes);
    match *change {
        Change::Byte(at) => {
            let index = ((u64::from(at) * len as u64) >> 32) as usize;
            replica[index] ^= 0x5A;
        }
        Change::Chunk(n, seed) => {
            let start = (n as usize % chunks) * chunk_size_bytes;
            let end = (start + chunk_size_bytes).min(len);
            seeded_fill(&mut replica[start..end], seed);
        }
        Change::LastChunk(at) => {
            let start = (chunks - 1) * chunk_size_bytes;
            let index = start + usize::from(at) % (len - start);
            replica[index] = replica[index].wrapping_add(1);
        }
        Change::WholeDisk => replica.iter_mut().for_each(|b| *b = !*b),
    }
}

/// Chunks whose content differs, and their bytes, by direct comparison.
fn differing(source: &[u8], replica: &[u8], chunk_size_bytes: usize) -> (u64, u64) {
    source
        .chunks(chunk_size_bytes)
        .zip(replica.chunks(chunk_size_bytes))
        .filter(|(a, b)| a != b)
        .fold((0, 0), |(n, bytes), (a, _)| (n + 1, bytes + a.len() as u64))
}

fn run_resync(source: &Path, replica: &Path, options: &ResyncOptions) -> ResyncStats {
    resync_local(source, replica, options, &mut |_| {}, &|| false).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn resync_makes_replica_equal_sending_only_differing_chunks(
        chunk_shift in 0u32..3,
        chunks in 1usize..48,
        tail_bytes in 0usize..4096,
        buffer_chunks in 1usize..6,
        seed in any::<u64>(),
        changes in proptest::collection::vec(change_strategy(), 0..6),
    ) {
        let chunk_size_bytes = 4096usize << chunk_shift;
        let size = (chunks - 1) * chunk_size_bytes + if tail_bytes == 0 {
            chunk_size_bytes
        } else {
            tail_bytes
        };
        let mut source = vec![0u8; size];
        seeded_fill(&mut source, seed);
        let mut replica = source.clone();
        for change in &changes {
            apply(&mut replica, change, chunk_size_bytes);
        }
        let (expected_chunks, expected_bytes) = differing(&source, &replica, chunk_size_bytes);

        let dir = tempfile::tempdir().unwrap();
        let source_path = dir.path().join("source");
        let replica_path = dir.path().join("replica");
        std::fs::write(&source_path, &source).unwrap();
        std::fs::write(&replica_path, &replica).unwrap();
        let options = ResyncOptions {
            chunk_size_bytes: chunk_size_bytes as u32,
            read_buffer_bytes: buffer_chunks * chunk_size_bytes,
        };
        let stats = run_resync(&source_path, &replica_path, &options);

        prop_assert!(std::fs::read(&replica_path).unwrap() == source, "replica differs");
        prop_assert_eq!(stats.chunks_compared, chunks as u64);
        prop_assert_eq!(stats.bytes_compared, size as u64);
        prop_assert_eq!(stats.chunks_differing, expected_chunks);
        prop_assert_eq!(stats.chunks_sent, expected_chunks);
        prop_assert!(stats.bytes_sent * 10 <= expected_bytes * 11);
        prop_assert_eq!(stats.bytes_sent, expected_bytes);

        // A second pass finds nothing to do.
        let again = run_resync(&source_path, &replica_path, &options);
        prop_assert_eq!(again.chunks_sent, 0);
        prop_assert_eq!(again.bytes_sent, 0);
    }

    #[test]
    fn wire_encoding_round_trips_and_detects_any_corrupt_byte(
        chunk_shift in 0u32..4,
        disk_size_bytes in 0u64..(40 * 4096),
        seed in any::<u64>(),
        flip in 1u8..=255,
    ) {
        let chunk_size_bytes = 4096u32 << chunk_shift;
        let count = disk_size_bytes.div_ceil(u64::from(chunk_size_bytes));
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        let hashes = (0..count).map(|_| rng.next_u64()).collect();
        let list = ChunkHashes { chunk_size_bytes, disk_size_bytes, hashes };
        let bytes = list.encode();
        prop_assert_eq!(&ChunkHashes::decode(&bytes).unwrap(), &list);
        for index in 0..bytes.len() {
            let mut corrupt = bytes.clone();
            corrupt[index] ^= flip;
            prop_assert!(ChunkHashes::decode(&corrupt).is_err(), "byte {} undetected", index);
        }
        for cut in [0, 1, 8, 39, bytes.len() - 1] {
            prop_assert!(ChunkHashes::decode(&bytes[..cut.min(bytes.len())]).is_err());
        }
        let mut longer = bytes.clone();
        longer.extend_from_slice(&[0; 8]);
        prop_assert!(ChunkHashes::decode(&longer).is_err());
    }

    #[test]
    fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = ChunkHashes::decode(&bytes);
    }
}

#[test]
fn identical_disks_send_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut data = vec![0u8; 3 << 20];
    seeded_fill(&mut data, 7);
    let source = dir.path().join("source");
    let replica = dir.path().join("replica");
    std::fs::write(&source, &data).unwrap();
    std::fs::write(&replica, &data).unwrap();
    let stats = run_resync(&source, &replica, &ResyncOptions::default());
    assert_eq!(
        stats,
        ResyncStats {
            chunks_compared: 48,
            chunks_differing: 0,
            chunks_sent: 0,
            bytes_sent: 0,
            bytes_compared: 3 << 20,
        }
    );
}

#[test]
fn whole_disk_different_sends_everything() {
    let dir = tempfile::tempdir().unwrap();
    let size = (1 << 20) + 512;
    let mut data = vec![0u8; size];
    seeded_fill(&mut data, 11);
    let source = dir.path().join("source");
    let replica = dir.path().join("replica");
    std::fs::write(&source, &data).unwrap();
    std::fs::write(&replica, vec![0u8; size]).unwrap();
    let stats = run_resync(&source, &replica, &ResyncOptions::default());
    assert_eq!(stats.chunks_sent, 17);
    assert_eq!(stats.bytes_sent, size as u64);
    assert_eq!(std::fs::read(&replica).unwrap(), data);
}

#[test]
fn mismatched_sizes_are_refused_before_any_write() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source");
    let replica = dir.path().join("replica");
    std::fs::write(&source, vec![1u8; 8192]).unwrap();
    std::fs::write(&replica, vec![2u8; 4096]).unwrap();
    let err = resync_local(
        &source,
        &replica,
        &ResyncOptions::default(),
        &mut |_| {},
        &|| false,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            ResyncError::DiskSizeMismatch {
                source_bytes: 8192,
                replica_bytes: 4096
            }
        ),
        "{err}"
    );
    assert_eq!(std::fs::read(&replica).unwrap(), vec![2u8; 4096]);

    // The same refusal from hash lists, and for different chunk sizes.
    let a = hash_path(&source, &ResyncOptions::default(), &mut |_| {}, &|| false).unwrap();
    let b = hash_path(&replica, &ResyncOptions::default(), &mut |_| {}, &|| false).unwrap();
    assert!(matches!(
        diff(&a, &b),
        Err(ResyncError::DiskSizeMismatch { .. })
    ));
    let small_chunks = ResyncOptions {
        chunk_size_bytes: 4096,
        ..ResyncOptions::default()
    };
    let c = hash_path(&source, &small_chunks, &mut |_| {}, &|| false).unwrap();
    assert!(matches!(
        diff(&a, &c),
        Err(ResyncError::ChunkSizeMismatch {
            source_bytes: 65536,
            replica_bytes: 4096
        })
    ));
}

/// The networked shape: the source's list crosses the wire, the replica side diffs it.
#[test]
fn diff_over_the_wire_matches_local_diff() {
    let dir = tempfile::tempdir().unwrap();
    let mut data = vec![0u8; 2 << 20];
    seeded_fill(&mut data, 3);
    let source = dir.path().join("source");
    std::fs::write(&source, &data).unwrap();
    data[100] ^= 1;
    data[65536 * 5 + 3] ^= 1;
    data[65536 * 6] ^= 1;
    let replica = dir.path().join("replica");
    std::fs::write(&replica, &data).unwrap();

    let options = ResyncOptions::default();
    let source_hashes = hash_path(&source, &options, &mut |_| {}, &|| false).unwrap();
    let replica_hashes = hash_path(&replica, &options, &mut |_| {}, &|| false).unwrap();
    let received = ChunkHashes::decode(&source_hashes.encode()).unwrap();
    let ranges = diff(&received, &replica_hashes).unwrap();
    assert_eq!(ranges, diff(&source_hashes, &replica_hashes).unwrap());
    let summary: Vec<(u64, u64, u64, u64)> = ranges
        .iter()
        .map(|r| (r.first_chunk, r.chunk_count, r.offset_bytes, r.length_bytes))
        .collect();
    assert_eq!(summary, vec![(0, 1, 0, 65536), (5, 2, 327_680, 131_072)]);

    let mut corrupt = source_hashes.encode();
    corrupt[40] ^= 0x10;
    assert!(matches!(
        ChunkHashes::decode(&corrupt),
        Err(HashListError::BadChecksum { .. })
    ));
}

#[test]
fn progress_is_reported_per_phase_and_cancellation_stops_the_copy() {
    let dir = tempfile::tempdir().unwrap();
    let mut data = vec![0u8; 1 << 20];
    seeded_fill(&mut data, 5);
    let source = dir.path().join("source");
    let replica = dir.path().join("replica");
    std::fs::write(&source, &data).unwrap();
    std::fs::write(&replica, vec![0u8; 1 << 20]).unwrap();
    let options = ResyncOptions {
        chunk_size_bytes: 65536,
        read_buffer_bytes: 256 * 1024,
    };

    // Cancel as soon as the copy has started.
    let copying = Cell::new(false);
    let mut reports = Vec::new();
    let err = resync_local(
        &source,
        &replica,
        &options,
        &mut |p| {
            copying.set(p.phase == ResyncPhase::Copy);
            reports.push(p);
        },
        &|| copying.get(),
    )
    .unwrap_err();
    assert!(matches!(err, ResyncError::Cancelled), "{err}");
    let phases: Vec<(ResyncPhase, u64)> = reports.iter().map(|p| (p.phase, p.done_bytes)).collect();
    assert_eq!(
        phases,
        vec![
            (ResyncPhase::HashSource, 256 * 1024),
            (ResyncPhase::HashSource, 512 * 1024),
            (ResyncPhase::HashSource, 768 * 1024),
            (ResyncPhase::HashSource, 1 << 20),
            (ResyncPhase::HashReplica, 256 * 1024),
            (ResyncPhase::HashReplica, 512 * 1024),
            (ResyncPhase::HashReplica, 768 * 1024),
            (ResyncPhase::HashReplica, 1 << 20),
            (ResyncPhase::Copy, 256 * 1024),
        ]
    );
    assert!(reports.iter().all(|p| p.total_bytes == 1 << 20));

    // Finishing it later gives the source's content, sending only what is still different.
    let stats = run_resync(&source, &replica, &options);
    assert_eq!(stats.chunks_sent, 12);
    assert_eq!(std::fs::read(&replica).unwrap(), data);
}
