//! Delta resync of a protected item over the data port, as the source agent does it.
//!
//! The exchange is specified in `docs/design/data-port.md` ("Delta resync"):
//!
//! ```text
//!  for each disk i:  mode-2 hello (disk i, chunk size) ──► replica's ChunkHashes
//!                    (the appliance applies every acknowledged frame before it hashes)
//!                    hash the local source image ──► ChunkHashes ──► diff ──► [ChunkRange]
//!  mode-1 hello with RESYNC ──► Agent (resync: true)
//!      resync-block frames: every differing range, in pieces of ≤ 1 MiB (whole chunks)
//!      bookmark (crash-consistent, label "resync") ──► flush ──► close
//!  the appliance leaves the resync state once that bookmark's point is applied
//! ```
//!
//! The source images must not change from the start of the hashing to the bookmark: the
//! bookmark claims the replica then equals the sources at one instant. (A real agent would
//! resync from a snapshot, or track the writes made meanwhile and send them before the
//! bookmark.)
//!
//! Restarting after a failure is safe: the appliance applies the resync blocks it has already
//! acknowledged before it hashes again, so a second run sends only what is still missing.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use engine::delta::{Consistency, DiskGeometry, MAX_PAYLOAD_BYTES};
use engine::resync::{
    ChunkHashes, ChunkRange, HASH_LIST_CHECKSUM_BYTES, HASH_LIST_HEADER_BYTES, ResyncError,
    ResyncOptions, chunk_count, diff, hash_chunks, is_valid_chunk_size,
};

use crate::sender::{Agent, AgentConfig, AgentError, fetch_chunk_hashes};

/// Largest resync-block frame payload sent: 1 MiB (rounded down to whole chunks, at least
/// one chunk).
pub const MAX_RESYNC_PIECE_BYTES: u64 = 1 << 20;
/// Label of the bookmark that closes a resync.
pub const RESYNC_BOOKMARK_LABEL: &str = "resync";

/// What one disk's resync compared and sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskResyncReport {
    /// Size of the disk.
    pub size_bytes: u64,
    /// Chunks compared (all chunks of the disk).
    pub chunks: u64,
    /// Chunks whose hashes differ (all of them were sent).
    pub chunks_differing: u64,
    /// Runs of adjacent differing chunks.
    pub ranges: u64,
    /// Resync-block frames sent.
    pub frames: u64,
    /// Bytes of disk sent in resync-block frames (payload before compression).
    pub bytes_sent: u64,
}

/// The outcome of a [`delta_resync`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResyncReport {
    /// The chunk size of the comparison.
    pub chunk_size_bytes: u32,
    /// Per disk, by disk index.
    pub disks: Vec<DiskResyncReport>,
    /// Sum of the disks' `bytes_sent`.
    pub total_bytes_sent: u64,
    /// Sum of the disks' sizes.
    pub total_disk_bytes: u64,
    /// Seq of the first frame of the resync session (the bookmark's when nothing differed).
    pub first_seq: u64,
    /// Seq of the closing bookmark.
    pub bookmark_seq: u64,
    /// The closing bookmark's id (its source timestamp in ns since the Unix epoch).
    pub bookmark_id: u64,
    /// The highest seq the appliance acknowledged at the close (≥ `bookmark_seq`).
    pub acked_seq: u64,
}

impl ResyncReport {
    fn new(chunk_size_bytes: u32, disks: Vec<DiskResyncReport>) -> Self {
        Self {
            chunk_size_bytes,
            total_bytes_sent: disks.iter().map(|d| d.bytes_sent).sum(),
            total_disk_bytes: disks.iter().map(|d| d.size_bytes).sum(),
            disks,
            first_seq: 0,
            bookmark_seq: 0,
            bookmark_id: 0,
            acked_seq: 0,
        }
    }
}

/// What went wrong in a [`delta_resync`], named with the disk it concerns.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeltaResyncError {
    /// Arguments that cannot work (disk and source counts, chunk size, token, …).
    #[error("delta resync: {0}")]
    Config(String),
    /// A source image could not be opened or read, or does not have the disk's size.
    #[error("delta resync: disk {disk_index}: source {}: {what}", path.display())]
    Source {
        /// The disk.
        disk_index: u16,
        /// The image.
        path: PathBuf,
        /// What failed.
        what: String,
    },
    /// Hashing a source image failed.
    #[error("delta resync: disk {disk_index}: hashing source {}: {error}", path.display())]
    HashSource {
        /// The disk.
        disk_index: u16,
        /// The image.
        path: PathBuf,
        /// The error.
        #[source]
        error: ResyncError,
    },
    /// Fetching the replica's chunk hashes failed (a refusal, the network, a bad list).
    #[error("delta resync: disk {disk_index}: fetching the replica's chunk hashes: {error}")]
    FetchHashes {
        /// The disk.
        disk_index: u16,
        /// The error; [`AgentError::Refused`] carries the appliance's status.
        #[source]
        error: AgentError,
    },
    /// The replica's hash list does not fit the source's (disk or chunk size).
    #[error("delta resync: disk {disk_index}: replica and source do not compare: {error}")]
    Diff {
        /// The disk.
        disk_index: u16,
        /// The error.
        #[source]
        error: ResyncError,
    },
    /// The RESYNC streaming session failed (refused, closed, unreachable, timed out).
    #[error("delta resync: sending the resync: {0}")]
    Stream(#[source] AgentError),
}

impl DeltaResyncError {
    /// The agent's error, when the appliance or the network was the cause.
    pub fn agent_error(&self) -> Option<&AgentError> {
        match self {
            Self::FetchHashes { error, .. } | Self::Stream(error) => Some(error),
            _ => None,
        }
    }
}

/// Brings the item's replica to the content of `sources` (one image per disk, in disk order)
/// over the data port at `addr`, sending only the chunks whose hashes differ, and ends with a
/// crash-consistent bookmark labelled [`RESYNC_BOOKMARK_LABEL`].
///
/// `timeout` bounds each hash-list fetch (connect, the appliance's apply and hashing, each
/// read; give it time for a whole disk) and the final flush. The agent uses
/// [`AgentConfig::new`]'s other defaults; [`delta_resync_with`] takes a whole config.
///
/// The sources must not change until it returns (module doc).
#[allow(clippy::too_many_arguments)] // the item's identity, its disks and the limits
pub fn delta_resync(
    addr: SocketAddr,
    item_id: [u8; 16],
    token: &[u8],
    item_name: &str,
    disks: &[DiskGeometry],
    sources: &[PathBuf],
    chunk_size_bytes: u32,
    timeout: Duration,
) -> Result<ResyncReport, DeltaResyncError> {
    let config = AgentConfig::new(addr, item_id, token, item_name, disks.to_vec());
    delta_resync_with(config, sources, chunk_size_bytes, timeout)
}

/// [`delta_resync`] with every agent setting given: `config` names the appliance, the item
/// and its disks; its `resync` flag is set here.
pub fn delta_resync_with(
    mut config: AgentConfig,
    sources: &[PathBuf],
    chunk_size_bytes: u32,
    timeout: Duration,
) -> Result<ResyncReport, DeltaResyncError> {
    config.resync = true;
    let files = open_sources(&config, sources, chunk_size_bytes)?;

    // 1. Every disk: the replica's hashes (after the appliance applied every acknowledged
    //    frame), the source's hashes, the differing ranges.
    let mut plans: Vec<Vec<ChunkRange>> = Vec::with_capacity(files.len());
    let mut disks = Vec::with_capacity(files.len());
    for (index, ((disk, file), path)) in config.disks.iter().zip(&files).zip(sources).enumerate() {
        let disk_index = disk_index(index)?;
        let replica = fetch_chunk_hashes(
            config.addr,
            &config.item_id,
            &config.token,
            disk_index,
            chunk_size_bytes,
            timeout,
            hash_list_bytes(disk.size_bytes, chunk_size_bytes),
        )
        .map_err(|error| DeltaResyncError::FetchHashes { disk_index, error })?;
        let options = ResyncOptions {
            chunk_size_bytes,
            ..ResyncOptions::default()
        };
        let source = hash_chunks(file, disk.size_bytes, &options, &mut |_| {}, &|| false).map_err(
            |error| DeltaResyncError::HashSource {
                disk_index,
                path: path.clone(),
                error,
            },
        )?;
        let ranges = diff(&source, &replica)
            .map_err(|error| DeltaResyncError::Diff { disk_index, error })?;
        let report = disk_report(&source, &ranges, chunk_size_bytes);
        tracing::info!(
            disk_index,
            chunks = report.chunks,
            chunks_differing = report.chunks_differing,
            bytes = report.bytes_sent,
            "delta resync: disk compared"
        );
        disks.push(report);
        plans.push(ranges);
    }
    let mut report = ResyncReport::new(chunk_size_bytes, disks);

    // 2. One RESYNC session: the differing chunks, then the bookmark.
    let agent = Agent::connect(config).map_err(DeltaResyncError::Stream)?;
    report.first_seq = agent.next_seq();
    let piece_max = piece_bytes(chunk_size_bytes);
    let mut buffer = Vec::new();
    for (index, (ranges, file)) in plans.iter().zip(&files).enumerate() {
        let disk_index = disk_index(index)?;
        for (offset_bytes, length_bytes) in pieces(ranges, chunk_size_bytes) {
            debug_assert!(length_bytes <= piece_max);
            buffer.resize(length_bytes as usize, 0); // ≤ 4 MiB
            file.read_exact_at(&mut buffer, offset_bytes).map_err(|e| {
                DeltaResyncError::Source {
                    disk_index,
                    path: sources[index].clone(),
                    what: format!("reading {length_bytes} bytes at offset {offset_bytes}: {e}"),
                }
            })?;
            agent
                .resync_block(disk_index, offset_bytes, &buffer)
                .map_err(DeltaResyncError::Stream)?;
        }
    }
    let source_timestamp_ns = engine::clock::now_unix_ns();
    report.bookmark_id = source_timestamp_ns;
    report.bookmark_seq = agent
        .bookmark(
            Consistency::Crash,
            report.bookmark_id,
            source_timestamp_ns,
            RESYNC_BOOKMARK_LABEL,
        )
        .map_err(DeltaResyncError::Stream)?;
    report.acked_seq = agent.close(timeout).map_err(DeltaResyncError::Stream)?;
    tracing::info!(
        first_seq = report.first_seq,
        bookmark_seq = report.bookmark_seq,
        acked_seq = report.acked_seq,
        bytes_sent = report.total_bytes_sent,
        disk_bytes = report.total_disk_bytes,
        "delta resync: sent and acknowledged"
    );
    Ok(report)
}

/// Checks the arguments and opens every source, before anything touches the network.
fn open_sources(
    config: &AgentConfig,
    sources: &[PathBuf],
    chunk_size_bytes: u32,
) -> Result<Vec<File>, DeltaResyncError> {
    let config_error = |what: String| Err(DeltaResyncError::Config(what));
    if sources.len() != config.disks.len() {
        return config_error(format!(
            "{} source images for {} disks",
            sources.len(),
            config.disks.len()
        ));
    }
    if config.disks.is_empty() {
        return config_error("the item has no disks".into());
    }
    if !is_valid_chunk_size(chunk_size_bytes) {
        return config_error(format!(
            "chunk size {chunk_size_bytes} bytes: must be a non-zero multiple of 4096, at most \
             {MAX_PAYLOAD_BYTES}"
        ));
    }
    if config.token.is_empty() || config.token.len() > engine::port::MAX_TOKEN_BYTES {
        return config_error("token length must be 1..=256 bytes".into());
    }
    let mut files = Vec::with_capacity(sources.len());
    for (index, (disk, path)) in config.disks.iter().zip(sources).enumerate() {
        let disk_index = disk_index(index)?;
        let source_error = |what: String| DeltaResyncError::Source {
            disk_index,
            path: path.clone(),
            what,
        };
        let file = File::open(path).map_err(|e| source_error(format!("open: {e}")))?;
        let size_bytes = source_size(&file, path).map_err(|e| source_error(e.to_string()))?;
        if size_bytes != disk.size_bytes {
            return Err(source_error(format!(
                "{size_bytes} bytes, but the disk has {} bytes",
                disk.size_bytes
            )));
        }
        files.push(file);
    }
    Ok(files)
}

/// Seek to the end rather than stat: a block device's metadata says 0 bytes.
fn source_size(file: &File, path: &Path) -> io::Result<u64> {
    let mut handle = file;
    handle
        .seek(SeekFrom::End(0))
        .map_err(|e| io::Error::new(e.kind(), format!("size of {}: {e}", path.display())))
}

fn disk_index(index: usize) -> Result<u16, DeltaResyncError> {
    u16::try_from(index).map_err(|_| DeltaResyncError::Config(format!("disk index {index}")))
}

/// The exact size of a disk's encoded hash list (the most a fetch accepts).
pub(crate) fn hash_list_bytes(disk_size_bytes: u64, chunk_size_bytes: u32) -> u64 {
    chunk_count(disk_size_bytes, chunk_size_bytes)
        .saturating_mul(8)
        .saturating_add((HASH_LIST_HEADER_BYTES + HASH_LIST_CHECKSUM_BYTES) as u64)
}

/// Payload bound of one resync-block frame: [`MAX_RESYNC_PIECE_BYTES`] in whole chunks, at
/// least one chunk (which is at most [`MAX_PAYLOAD_BYTES`]).
fn piece_bytes(chunk_size_bytes: u32) -> u64 {
    let chunk = u64::from(chunk_size_bytes).max(1);
    (MAX_RESYNC_PIECE_BYTES / chunk).max(1) * chunk
}

/// The `(offset, length)` of every resync-block frame of one disk, in disk order.
fn pieces(ranges: &[ChunkRange], chunk_size_bytes: u32) -> impl Iterator<Item = (u64, u64)> + '_ {
    ranges
        .iter()
        .flat_map(move |range| range.pieces(chunk_size_bytes, MAX_RESYNC_PIECE_BYTES))
}

/// What one disk's resync will compare and send.
fn disk_report(
    source: &ChunkHashes,
    ranges: &[ChunkRange],
    chunk_size_bytes: u32,
) -> DiskResyncReport {
    DiskResyncReport {
        size_bytes: source.disk_size_bytes,
        chunks: source.chunk_count(),
        chunks_differing: ranges.iter().map(|r| r.chunk_count).sum(),
        ranges: ranges.len() as u64,
        frames: pieces(ranges, chunk_size_bytes).count() as u64,
        bytes_sent: ranges.iter().map(|r| r.length_bytes).sum(),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use engine::resync::hash_path;

    use super::*;

    const KIB: u64 = 1024;
    const MIB: u64 = 1 << 20;

    fn range(first_chunk: u64, chunk_count: u64, chunk: u64, disk_size: u64) -> ChunkRange {
        let offset_bytes = first_chunk * chunk;
        ChunkRange {
            first_chunk,
            chunk_count,
            offset_bytes,
            length_bytes: (chunk_count * chunk).min(disk_size - offset_bytes),
        }
    }

    #[test]
    fn pieces_are_whole_chunks_of_at_most_one_mib_and_cover_every_range() {
        let disk = 10 * MIB + 8 * KIB; // the last 64 KiB chunk is short (8 KiB)
        let chunk = 64 * KIB;
        let ranges = vec![
            range(0, 1, chunk, disk),
            range(3, 40, chunk, disk),  // 2.5 MiB: 1 MiB + 1 MiB + 0.5 MiB
            range(160, 1, chunk, disk), // the short last chunk
        ];
        let planned: Vec<(u64, u64)> = pieces(&ranges, chunk as u32).collect();
        assert_eq!(
            planned,
            vec![
                (0, chunk),
                (3 * chunk, MIB),
                (3 * chunk + MIB, MIB),
                (3 * chunk + 2 * MIB, MIB / 2),
                (160 * chunk, 8 * KIB),
            ]
        );
        for &(offset, length) in &planned {
            assert_eq!(offset % chunk, 0);
            assert!(length <= MAX_RESYNC_PIECE_BYTES && length <= u64::from(MAX_PAYLOAD_BYTES));
        }
        let total: u64 = planned.iter().map(|p| p.1).sum();
        assert_eq!(total, ranges.iter().map(|r| r.length_bytes).sum::<u64>());

        // Chunks over 1 MiB travel one per frame; 4 MiB chunks fit the payload limit.
        assert_eq!(piece_bytes(64 * KIB as u32), MIB);
        assert_eq!(piece_bytes(192 * KIB as u32), 5 * 192 * KIB);
        assert_eq!(piece_bytes(3 * MIB as u32), 3 * MIB);
        assert_eq!(piece_bytes(MAX_PAYLOAD_BYTES), u64::from(MAX_PAYLOAD_BYTES));
        let big = [range(0, 3, 2 * MIB, 6 * MIB)];
        assert_eq!(
            pieces(&big, 2 * MIB as u32).collect::<Vec<_>>(),
            vec![(0, 2 * MIB), (2 * MIB, 2 * MIB), (4 * MIB, 2 * MIB)]
        );
    }

    fn image(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let path = dir.join(name);
        let mut file = File::create(&path).unwrap();
        file.write_all(bytes).unwrap();
        path
    }

    #[test]
    fn reports_count_exactly_what_the_diff_of_two_real_images_sends() {
        let dir = tempfile::tempdir().unwrap();
        let chunk = 64 * KIB;
        let size = 3 * MIB + 4 * KIB; // 49 chunks, the last one 4 KiB
        let mut source = vec![0u8; size as usize];
        for (i, byte) in source.iter_mut().enumerate() {
            *byte = (i / 4096) as u8;
        }
        let mut replica = source.clone();
        replica[5] ^= 1; // chunk 0
        for at in [20 * chunk, 21 * chunk + 7, 36 * chunk - 1] {
            replica[at as usize] ^= 1; // chunks 20, 21 and 35: 20..=21 and 35
        }
        for chunk_index in 36..47 {
            replica[(chunk_index * chunk) as usize] ^= 1; // 36..=46, joined to 35
        }
        replica[size as usize - 1] ^= 1; // the short last chunk, 48
        let options = ResyncOptions {
            chunk_size_bytes: chunk as u32,
            ..ResyncOptions::default()
        };
        let hash = |path: &Path| hash_path(path, &options, &mut |_| {}, &|| false).unwrap();
        let source_hashes = hash(&image(dir.path(), "source", &source));
        let replica_hashes = hash(&image(dir.path(), "replica", &replica));
        let ranges = diff(&source_hashes, &replica_hashes).unwrap();
        let report = disk_report(&source_hashes, &ranges, chunk as u32);
        assert_eq!(
            report,
            DiskResyncReport {
                size_bytes: size,
                chunks: 49,
                chunks_differing: 1 + 2 + 12 + 1,
                ranges: 4,
                // chunk 0; 20..=21; 35..=46 (12 chunks = 768 KiB); chunk 48
                frames: 4,
                bytes_sent: 15 * chunk + 4 * KIB,
            }
        );

        // Applying exactly the planned pieces makes the replica equal to the source.
        for (offset, length) in pieces(&ranges, chunk as u32) {
            let (from, to) = (offset as usize, (offset + length) as usize);
            replica[from..to].copy_from_slice(&source[from..to]);
        }
        assert_eq!(replica, source);

        let other = DiskResyncReport {
            size_bytes: MIB,
            chunks: 16,
            chunks_differing: 0,
            ranges: 0,
            frames: 0,
            bytes_sent: 0,
        };
        let total = ResyncReport::new(chunk as u32, vec![report, other]);
        assert_eq!(total.total_bytes_sent, 15 * chunk + 4 * KIB);
        assert_eq!(total.total_disk_bytes, size + MIB);
        assert_eq!(hash_list_bytes(size, chunk as u32), 40 + 8 * 49);
    }

    #[test]
    fn bad_arguments_and_sources_are_named_before_any_connection() {
        let dir = tempfile::tempdir().unwrap();
        // Nothing listens here; every case must fail before connecting.
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let disk = DiskGeometry {
            size_bytes: 128 * KIB,
            block_size_bytes: 4096,
        };
        let good = image(dir.path(), "good", &vec![7u8; 128 * KIB as usize]);
        let short = image(dir.path(), "short", &vec![7u8; 64 * KIB as usize]);
        let run = |sources: &[PathBuf], chunk: u32, token: &[u8]| {
            delta_resync(
                addr,
                [1; 16],
                token,
                "vm",
                &[disk, disk],
                sources,
                chunk,
                Duration::from_secs(1),
            )
            .unwrap_err()
        };
        let chunk = 64 * KIB as u32;
        assert!(matches!(
            run(std::slice::from_ref(&good), chunk, b"t"),
            DeltaResyncError::Config(_)
        ));
        let two = [good.clone(), good.clone()];
        assert!(matches!(run(&two, 1000, b"t"), DeltaResyncError::Config(_)));
        assert!(matches!(run(&two, chunk, b""), DeltaResyncError::Config(_)));
        let error = run(&[good.clone(), short], chunk, b"t");
        assert!(
            matches!(error, DeltaResyncError::Source { disk_index: 1, .. }),
            "{error}"
        );
        assert!(error.to_string().contains("65536 bytes"), "{error}");
        let error = run(&[dir.path().join("missing"), good], chunk, b"t");
        assert!(
            matches!(error, DeltaResyncError::Source { disk_index: 0, .. }),
            "{error}"
        );
        assert!(error.agent_error().is_none());
    }
}
