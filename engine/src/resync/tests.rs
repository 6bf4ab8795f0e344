//! Unit tests of delta resync: chunk hashes, hash-list encoding, diff, local resync.

use super::*;

fn list(chunk_size_bytes: u32, disk_size_bytes: u64, hashes: &[u64]) -> ChunkHashes {
    ChunkHashes {
        chunk_size_bytes,
        disk_size_bytes,
        hashes: hashes.to_vec(),
    }
}

#[test]
fn chunk_counts_and_extents() {
    assert_eq!(chunk_count(0, 4096), 0);
    assert_eq!(chunk_count(1, 4096), 1);
    assert_eq!(chunk_count(8192, 4096), 2);
    assert_eq!(chunk_count(8193, 4096), 3);
    let l = list(4096, 8193, &[0, 0, 0]);
    assert_eq!(l.chunk_extent(0), Some((0, 4096)));
    assert_eq!(l.chunk_extent(2), Some((8192, 1)));
    assert_eq!(l.chunk_extent(3), None);
    assert_eq!(l.chunk_extent(u64::MAX), None);
}

#[test]
fn chunk_size_rules() {
    assert!(is_valid_chunk_size(4096));
    assert!(is_valid_chunk_size(DEFAULT_CHUNK_SIZE_BYTES));
    assert!(is_valid_chunk_size(MAX_CHUNK_SIZE_BYTES));
    assert!(!is_valid_chunk_size(0));
    assert!(!is_valid_chunk_size(512));
    assert!(!is_valid_chunk_size(MAX_CHUNK_SIZE_BYTES + 4096));
}

#[test]
fn diff_coalesces_adjacent_chunks() {
    let a = list(4096, 4096 * 6 + 100, &[1, 2, 3, 4, 5, 6, 7]);
    let b = list(4096, 4096 * 6 + 100, &[1, 0, 0, 4, 0, 6, 0]);
    let ranges = diff(&a, &b).unwrap();
    assert_eq!(
        ranges,
        vec![
            ChunkRange {
                first_chunk: 1,
                chunk_count: 2,
                offset_bytes: 4096,
                length_bytes: 8192
            },
            ChunkRange {
                first_chunk: 4,
                chunk_count: 1,
                offset_bytes: 16384,
                length_bytes: 4096
            },
            ChunkRange {
                first_chunk: 6,
                chunk_count: 1,
                offset_bytes: 24576,
                length_bytes: 100
            },
        ]
    );
    assert!(diff(&a, &a).unwrap().is_empty());
}

#[test]
fn diff_refuses_mismatches() {
    let a = list(4096, 8192, &[1, 2]);
    assert!(matches!(
        diff(&a, &list(8192, 8192, &[1])),
        Err(ResyncError::ChunkSizeMismatch {
            source_bytes: 4096,
            replica_bytes: 8192
        })
    ));
    assert!(matches!(
        diff(&a, &list(4096, 4096, &[1])),
        Err(ResyncError::DiskSizeMismatch { .. })
    ));
    assert!(matches!(
        diff(&a, &list(4096, 8192, &[1])),
        Err(ResyncError::HashCountMismatch {
            expected: 2,
            found: 1,
            ..
        })
    ));
    assert!(matches!(
        diff(&list(100, 8192, &[]), &list(100, 8192, &[])),
        Err(ResyncError::InvalidChunkSize {
            chunk_size_bytes: 100
        })
    ));
}

#[test]
fn pieces_split_on_chunk_boundaries() {
    let range = ChunkRange {
        first_chunk: 2,
        chunk_count: 5,
        offset_bytes: 8192,
        length_bytes: 4 * 4096 + 10,
    };
    let pieces: Vec<_> = range.pieces(4096, 10_000).collect();
    assert_eq!(
        pieces,
        vec![(8192, 8192), (16384, 8192), (24576, 10)],
        "{pieces:?}"
    );
    // A limit below one chunk still moves whole chunks.
    assert_eq!(range.pieces(4096, 1).count(), 5);
}

#[test]
fn wire_round_trip_and_errors() {
    let l = list(4096, 3 * 4096 + 1, &[1, u64::MAX, 3, 0x0123_4567_89ab_cdef]);
    let bytes = l.encode();
    assert_eq!(bytes.len(), l.encoded_len_bytes());
    assert_eq!(ChunkHashes::decode(&bytes).unwrap(), l);
    assert_eq!(&bytes[..8], b"DRHASHES");

    assert_eq!(
        ChunkHashes::decode(&bytes[..39]),
        Err(HashListError::Truncated { length_bytes: 39 })
    );
    // Truncating whole hashes breaks the checksum first.
    assert!(matches!(
        ChunkHashes::decode(&bytes[..bytes.len() - 8]),
        Err(HashListError::BadChecksum { .. })
    ));
    // A list encoded with a wrong count is refused even with a valid checksum.
    let wrong = list(4096, 3 * 4096 + 1, &[1, 2]).encode();
    assert!(matches!(
        ChunkHashes::decode(&wrong),
        Err(HashListError::ChunkCountMismatch {
            chunk_count: 2,
            expected: 4,
            ..
        })
    ));
    let bad_chunk = list(1000, 0, &[]).encode();
    assert_eq!(
        ChunkHashes::decode(&bad_chunk),
        Err(HashListError::InvalidChunkSize {
            chunk_size_bytes: 1000
        })
    );
    let empty = list(4096, 0, &[]);
    assert_eq!(ChunkHashes::decode(&empty.encode()).unwrap(), empty);
}

#[test]
fn hashing_reads_in_buffers_and_reports_progress() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk");
    let data: Vec<u8> = (0..(5 * 4096 + 7)).map(|i| (i * 7 % 256) as u8).collect();
    std::fs::write(&path, &data).unwrap();
    let options = ResyncOptions {
        chunk_size_bytes: 4096,
        read_buffer_bytes: 2 * 4096 + 100, // rounds down to 2 chunks
    };
    let mut reports = Vec::new();
    let hashes = hash_path(&path, &options, &mut |done| reports.push(done), &|| false).unwrap();
    assert_eq!(reports, vec![8192, 16384, 5 * 4096 + 7]);
    let expected: Vec<u64> = data.chunks(4096).map(chunk_hash).collect();
    assert_eq!(hashes.hashes, expected);
    assert_eq!(hashes.disk_size_bytes, data.len() as u64);

    assert!(matches!(
        hash_path(&path, &options, &mut |_| {}, &|| true),
        Err(ResyncError::Cancelled)
    ));
    let file = File::open(&path).unwrap();
    let err = hash_chunks(&file, 1 << 20, &options, &mut |_| {}, &|| false).unwrap_err();
    assert!(
        matches!(&err, ResyncError::Io { source, .. } if source.kind() == io::ErrorKind::UnexpectedEof),
        "{err}"
    );
    assert!(matches!(
        hash_path(
            &path,
            &ResyncOptions {
                chunk_size_bytes: 8192,
                read_buffer_bytes: 4096
            },
            &mut |_| {},
            &|| false
        ),
        Err(ResyncError::InvalidReadBuffer { .. })
    ));
    let too_big = ResyncOptions {
        chunk_size_bytes: 4096,
        read_buffer_bytes: MAX_READ_BUFFER_BYTES + 4096,
    };
    assert!(matches!(
        hash_path(&path, &too_big, &mut |_| {}, &|| false),
        Err(ResyncError::InvalidReadBuffer { .. })
    ));
}
