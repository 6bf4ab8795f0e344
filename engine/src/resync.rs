//! Delta resync by per-chunk hash comparison: how a replica that may have diverged from its
//! source (cache overflow, re-protect of a failed-over VM, a manual resync) is brought back to
//! byte equality while moving only the chunks that differ.
//!
//! It is DRBD's checksum-based resync applied to the whole disk at once:
//!
//! ```text
//!  source side                                   replica side
//!  ───────────                                   ────────────
//!  hash_chunks(source) ─► ChunkHashes            hash_chunks(replica) ─► ChunkHashes
//!            │                                                  │
//!            └────── encode() ──► wire ──► decode() ────────────┤
//!                                                               ▼
//!                                     diff(source, replica) ─► [ChunkRange] (coalesced)
//!                                                               │
//!            chunks of those ranges travel source ─► replica ◄──┘
//!            (locally: resync_local, pread/pwrite; networked: ResyncBlock frames, later)
//! ```
//!
//! The module owns the chunk hash, the hash list ([`ChunkHashes`]) and its wire encoding, the
//! diff, and the local file-to-file resync. Invariants:
//! - the disk is cut into chunks of `chunk_size_bytes` (a multiple of 4096, at most
//!   [`MAX_CHUNK_SIZE_BYTES`] so that a chunk fits one delta-stream payload), from offset 0;
//!   the last chunk is short when the disk size is not a multiple of the chunk size;
//! - a chunk's hash is XXH3-64 with seed [`CHUNK_HASH_SEED`] over exactly the chunk's bytes
//!   (the short last chunk is hashed short, not padded);
//! - a [`ChunkHashes`] always has `ceil(disk_size_bytes / chunk_size_bytes)` hashes;
//!   [`ChunkHashes::decode`] refuses anything else, and never panics on any input;
//! - two hash lists are compared only when chunk size and disk size are equal
//!   ([`ResyncError::ChunkSizeMismatch`], [`ResyncError::DiskSizeMismatch`]);
//! - after a successful [`resync_local`] the replica equals the source byte for byte (if the
//!   source did not change meanwhile: the caller quiesces it) and has been fdatasynced; only
//!   chunks whose hashes differ were written.
//!
//! Hash collisions: a differing chunk whose hashes collide is not sent. For unrelated content
//! the chance is about 2⁻⁶⁴ per differing chunk. XXH3 is not a cryptographic hash, so a guest
//! that wanted to could craft colliding blocks, but only to corrupt its own replica.
//!
//! Wire encoding of a hash list, all integers little-endian:
//!
//! ```text
//!  off  len      field
//!    0    8      magic "DRHASHES"
//!    8    2      version (1)
//!   10    2      flags (0)
//!   12    4      chunk_size_bytes
//!   16    8      disk_size_bytes
//!   24    8      chunk_count = ceil(disk_size_bytes / chunk_size_bytes)
//!   32    8×n    chunk hashes, in disk order
//!   32+8n 8      XXH3-64 (seed delta::CHECKSUM_SEED) of every byte before it
//! ```

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::delta::{CHECKSUM_SEED, MAX_PAYLOAD_BYTES};

/// Chunk size unless configured otherwise: 64 KiB.
pub const DEFAULT_CHUNK_SIZE_BYTES: u32 = 64 * 1024;
/// Chunk sizes are multiples of this.
pub const CHUNK_ALIGNMENT_BYTES: u32 = 4096;
/// Largest chunk size: one delta-stream payload, so that a chunk travels in one frame.
pub const MAX_CHUNK_SIZE_BYTES: u32 = MAX_PAYLOAD_BYTES;
/// Seed of the chunk hash (ASCII "dr-chunk", little-endian).
pub const CHUNK_HASH_SEED: u64 = u64::from_le_bytes(*b"dr-chunk");
/// Default size of the one read buffer of hashing and copying: 4 MiB.
pub const DEFAULT_READ_BUFFER_BYTES: usize = 4 << 20;
/// Largest read buffer accepted: 256 MiB.
pub const MAX_READ_BUFFER_BYTES: usize = 256 << 20;
/// Magic of an encoded hash list.
pub const HASH_LIST_MAGIC: [u8; 8] = *b"DRHASHES";
/// Version of the hash list encoding this code writes and reads.
pub const HASH_LIST_VERSION: u16 = 1;
/// Size of the encoded hash list's header (before the hashes).
pub const HASH_LIST_HEADER_BYTES: usize = 32;
/// Size of the encoded hash list's trailing checksum.
pub const HASH_LIST_CHECKSUM_BYTES: usize = 8;

/// The hash of one chunk's bytes.
pub fn chunk_hash(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(bytes, CHUNK_HASH_SEED)
}

/// Number of chunks of a disk: `ceil(disk_size_bytes / chunk_size_bytes)`; 0 for a chunk size
/// of 0.
pub fn chunk_count(disk_size_bytes: u64, chunk_size_bytes: u32) -> u64 {
    if chunk_size_bytes == 0 {
        return 0;
    }
    disk_size_bytes.div_ceil(u64::from(chunk_size_bytes))
}

/// Whether a chunk size is allowed: a non-zero multiple of 4096, at most
/// [`MAX_CHUNK_SIZE_BYTES`].
pub fn is_valid_chunk_size(chunk_size_bytes: u32) -> bool {
    chunk_size_bytes != 0
        && chunk_size_bytes.is_multiple_of(CHUNK_ALIGNMENT_BYTES)
        && chunk_size_bytes <= MAX_CHUNK_SIZE_BYTES
}

/// What went wrong hashing, comparing or resyncing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ResyncError {
    /// A chunk size that is zero, not a multiple of 4096, or above [`MAX_CHUNK_SIZE_BYTES`].
    #[error(
        "chunk size {chunk_size_bytes} bytes: must be a non-zero multiple of \
         {CHUNK_ALIGNMENT_BYTES}, at most {MAX_CHUNK_SIZE_BYTES}"
    )]
    InvalidChunkSize {
        /// The size asked for.
        chunk_size_bytes: u32,
    },
    /// A read buffer smaller than one chunk or larger than [`MAX_READ_BUFFER_BYTES`].
    #[error(
        "read buffer of {read_buffer_bytes} bytes: must hold a chunk ({chunk_size_bytes}) and \
         be at most {MAX_READ_BUFFER_BYTES}"
    )]
    InvalidReadBuffer {
        /// The buffer size asked for.
        read_buffer_bytes: usize,
        /// The chunk size.
        chunk_size_bytes: u32,
    },
    /// The two hash lists were computed with different chunk sizes.
    #[error("chunk sizes differ: source {source_bytes} bytes, replica {replica_bytes} bytes")]
    ChunkSizeMismatch {
        /// The source's chunk size.
        source_bytes: u32,
        /// The replica's chunk size.
        replica_bytes: u32,
    },
    /// Source and replica are not the same size.
    #[error("disk sizes differ: source {source_bytes} bytes, replica {replica_bytes} bytes")]
    DiskSizeMismatch {
        /// The source's size.
        source_bytes: u64,
        /// The replica's size.
        replica_bytes: u64,
    },
    /// A hash list whose number of hashes does not match its disk and chunk sizes.
    #[error(
        "hash list has {found} hashes, a disk of {disk_size_bytes} bytes in chunks of \
         {chunk_size_bytes} has {expected}"
    )]
    HashCountMismatch {
        /// The disk size.
        disk_size_bytes: u64,
        /// The chunk size.
        chunk_size_bytes: u32,
        /// The number of chunks of that disk.
        expected: u64,
        /// The number of hashes in the list.
        found: u64,
    },
    /// The caller's cancellation check returned true.
    #[error("cancelled")]
    Cancelled,
    /// A read, write, sync or open failed.
    #[error("{op} {path} at offset {offset_bytes}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file ("<source>" for an unnamed reader).
        path: PathBuf,
        /// Where.
        offset_bytes: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Why bytes are not a valid encoded hash list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HashListError {
    /// Shorter than header plus checksum.
    #[error(
        "hash list of {length_bytes} bytes is shorter than its header and checksum ({} bytes)",
        HASH_LIST_HEADER_BYTES + HASH_LIST_CHECKSUM_BYTES
    )]
    Truncated {
        /// Length given.
        length_bytes: usize,
    },
    /// Not "DRHASHES".
    #[error("bad hash list magic {found:02x?}")]
    BadMagic {
        /// The 8 bytes found.
        found: [u8; 8],
    },
    /// A version other than [`HASH_LIST_VERSION`].
    #[error("unsupported hash list version {version}, expected {HASH_LIST_VERSION}")]
    UnsupportedVersion {
        /// The version found.
        version: u16,
    },
    /// The checksum does not match the bytes.
    #[error("hash list checksum mismatch: stored {stored:#018x}, computed {computed:#018x}")]
    BadChecksum {
        /// The stored checksum.
        stored: u64,
        /// The checksum of the bytes.
        computed: u64,
    },
    /// Non-zero flags (none are defined).
    #[error("hash list flags {flags:#06x}, none are defined")]
    UnknownFlags {
        /// The flags found.
        flags: u16,
    },
    /// A chunk size that is not allowed.
    #[error("hash list chunk size {chunk_size_bytes} bytes is not allowed")]
    InvalidChunkSize {
        /// The chunk size found.
        chunk_size_bytes: u32,
    },
    /// The chunk count does not match the disk and chunk sizes.
    #[error(
        "hash list says {chunk_count} chunks, a disk of {disk_size_bytes} bytes in chunks of \
         {chunk_size_bytes} has {expected}"
    )]
    ChunkCountMismatch {
        /// The chunk count found.
        chunk_count: u64,
        /// The disk size found.
        disk_size_bytes: u64,
        /// The chunk size found.
        chunk_size_bytes: u32,
        /// The count those sizes give.
        expected: u64,
    },
    /// The length does not match the chunk count.
    #[error("hash list of {length_bytes} bytes cannot hold {chunk_count} hashes")]
    LengthMismatch {
        /// The chunk count found.
        chunk_count: u64,
        /// Length given.
        length_bytes: usize,
    },
}

/// The per-chunk hashes of a whole disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkHashes {
    /// Chunk size; see [`is_valid_chunk_size`].
    pub chunk_size_bytes: u32,
    /// Size of the hashed disk.
    pub disk_size_bytes: u64,
    /// Hash of chunk `i` at index `i`; `chunk_count(disk_size_bytes, chunk_size_bytes)` of them.
    pub hashes: Vec<u64>,
}

impl ChunkHashes {
    /// Number of chunks of the disk.
    pub fn chunk_count(&self) -> u64 {
        chunk_count(self.disk_size_bytes, self.chunk_size_bytes)
    }

    /// Offset and length of chunk `index`, or `None` past the end. The last chunk may be short.
    pub fn chunk_extent(&self, index: u64) -> Option<(u64, u64)> {
        chunk_extent(self.disk_size_bytes, self.chunk_size_bytes, index)
    }

    /// Checks the chunk size and that there is one hash per chunk.
    pub fn validate(&self) -> Result<(), ResyncError> {
        if !is_valid_chunk_size(self.chunk_size_bytes) {
            return Err(ResyncError::InvalidChunkSize {
                chunk_size_bytes: self.chunk_size_bytes,
            });
        }
        let expected = self.chunk_count();
        let found = self.hashes.len() as u64;
        if found != expected {
            return Err(ResyncError::HashCountMismatch {
                disk_size_bytes: self.disk_size_bytes,
                chunk_size_bytes: self.chunk_size_bytes,
                expected,
                found,
            });
        }
        Ok(())
    }

    /// Size of [`encode`](Self::encode)'s output.
    pub fn encoded_len_bytes(&self) -> usize {
        HASH_LIST_HEADER_BYTES + self.hashes.len() * 8 + HASH_LIST_CHECKSUM_BYTES
    }

    /// The wire encoding (module doc). The decoder refuses a list that fails
    /// [`validate`](Self::validate), so encode only valid lists.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len_bytes());
        // Writing into a Vec cannot fail.
        let _ = self.encode_to(&mut out);
        out
    }

    /// Writes [`encode`](Self::encode)'s bytes to `out` in pieces of at most 64 KiB, with the
    /// checksum computed on the way: no second copy of the list in memory (the data port
    /// streams a replica's list to the socket this way).
    pub fn encode_to(&self, out: &mut impl io::Write) -> io::Result<()> {
        const PIECE_HASHES: usize = 8 * 1024;
        let mut checksum = xxhash_rust::xxh3::Xxh3::with_seed(CHECKSUM_SEED);
        let mut header = [0u8; HASH_LIST_HEADER_BYTES];
        header[0..8].copy_from_slice(&HASH_LIST_MAGIC);
        header[8..10].copy_from_slice(&HASH_LIST_VERSION.to_le_bytes());
        // 10..12: flags, 0.
        header[12..16].copy_from_slice(&self.chunk_size_bytes.to_le_bytes());
        header[16..24].copy_from_slice(&self.disk_size_bytes.to_le_bytes());
        header[24..32].copy_from_slice(&(self.hashes.len() as u64).to_le_bytes());
        checksum.update(&header);
        out.write_all(&header)?;
        let mut piece = Vec::with_capacity(PIECE_HASHES.min(self.hashes.len()) * 8);
        for hashes in self.hashes.chunks(PIECE_HASHES) {
            piece.clear();
            for hash in hashes {
                piece.extend_from_slice(&hash.to_le_bytes());
            }
            checksum.update(&piece);
            out.write_all(&piece)?;
        }
        out.write_all(&checksum.digest().to_le_bytes())
    }

    /// Decodes and verifies an encoded hash list: magic, version, checksum, flags, chunk size,
    /// chunk count against sizes and length. Never panics; allocates at most the input's size.
    pub fn decode(bytes: &[u8]) -> Result<Self, HashListError> {
        let truncated = HashListError::Truncated {
            length_bytes: bytes.len(),
        };
        if bytes.len() < HASH_LIST_HEADER_BYTES + HASH_LIST_CHECKSUM_BYTES {
            return Err(truncated);
        }
        let (body, stored) = bytes.split_at(bytes.len() - HASH_LIST_CHECKSUM_BYTES);
        let (header, hash_bytes) = body.split_at(HASH_LIST_HEADER_BYTES);
        let magic: [u8; 8] = array_at(header, 0).ok_or(truncated.clone())?;
        if magic != HASH_LIST_MAGIC {
            return Err(HashListError::BadMagic { found: magic });
        }
        let version = u16::from_le_bytes(array_at(header, 8).ok_or(truncated.clone())?);
        if version != HASH_LIST_VERSION {
            return Err(HashListError::UnsupportedVersion { version });
        }
        let stored = u64::from_le_bytes(array_at(stored, 0).ok_or(truncated.clone())?);
        let computed = xxhash_rust::xxh3::xxh3_64_with_seed(body, CHECKSUM_SEED);
        if stored != computed {
            return Err(HashListError::BadChecksum { stored, computed });
        }
        let flags = u16::from_le_bytes(array_at(header, 10).ok_or(truncated.clone())?);
        if flags != 0 {
            return Err(HashListError::UnknownFlags { flags });
        }
        let chunk_size_bytes = u32::from_le_bytes(array_at(header, 12).ok_or(truncated.clone())?);
        if !is_valid_chunk_size(chunk_size_bytes) {
            return Err(HashListError::InvalidChunkSize { chunk_size_bytes });
        }
        let disk_size_bytes = u64::from_le_bytes(array_at(header, 16).ok_or(truncated.clone())?);
        let count = u64::from_le_bytes(array_at(header, 24).ok_or(truncated)?);
        let expected = chunk_count(disk_size_bytes, chunk_size_bytes);
        if count != expected {
            return Err(HashListError::ChunkCountMismatch {
                chunk_count: count,
                disk_size_bytes,
                chunk_size_bytes,
                expected,
            });
        }
        if !hash_bytes.len().is_multiple_of(8) || hash_bytes.len() as u64 / 8 != count {
            return Err(HashListError::LengthMismatch {
                chunk_count: count,
                length_bytes: bytes.len(),
            });
        }
        let hashes = hash_bytes
            .chunks_exact(8)
            .map(|word| array_at(word, 0).map(u64::from_le_bytes).unwrap_or(0))
            .collect();
        Ok(Self {
            chunk_size_bytes,
            disk_size_bytes,
            hashes,
        })
    }
}

/// The `N` bytes at `offset`, or `None` when they are not all there.
fn array_at<const N: usize>(bytes: &[u8], offset: usize) -> Option<[u8; N]> {
    bytes
        .get(offset..offset.checked_add(N)?)
        .and_then(|slice| slice.try_into().ok())
}

fn chunk_extent(disk_size_bytes: u64, chunk_size_bytes: u32, index: u64) -> Option<(u64, u64)> {
    let offset_bytes = index.checked_mul(u64::from(chunk_size_bytes))?;
    if offset_bytes >= disk_size_bytes {
        return None;
    }
    Some((
        offset_bytes,
        (disk_size_bytes - offset_bytes).min(u64::from(chunk_size_bytes)),
    ))
}

/// A run of consecutive differing chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRange {
    /// Index of the first chunk.
    pub first_chunk: u64,
    /// Number of chunks (≥ 1).
    pub chunk_count: u64,
    /// Byte offset of the first chunk.
    pub offset_bytes: u64,
    /// Bytes covered; the disk's last chunk counts only its real, possibly short, length.
    pub length_bytes: u64,
}

impl ChunkRange {
    /// The range cut into `(offset_bytes, length_bytes)` pieces of at most `max_piece_bytes`
    /// (rounded down to whole chunks, at least one chunk): what one read, write or frame moves.
    pub fn pieces(&self, chunk_size_bytes: u32, max_piece_bytes: u64) -> ChunkRangePieces {
        let chunk = u64::from(chunk_size_bytes).max(1);
        ChunkRangePieces {
            next_offset_bytes: self.offset_bytes,
            end_bytes: self.offset_bytes.saturating_add(self.length_bytes),
            piece_bytes: (max_piece_bytes / chunk).max(1) * chunk,
        }
    }
}

/// Iterator of [`ChunkRange::pieces`].
#[derive(Debug, Clone)]
pub struct ChunkRangePieces {
    next_offset_bytes: u64,
    end_bytes: u64,
    piece_bytes: u64,
}

impl Iterator for ChunkRangePieces {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        if self.next_offset_bytes >= self.end_bytes {
            return None;
        }
        let offset_bytes = self.next_offset_bytes;
        let length_bytes = (self.end_bytes - offset_bytes).min(self.piece_bytes);
        self.next_offset_bytes = offset_bytes + length_bytes;
        Some((offset_bytes, length_bytes))
    }
}

/// The chunks whose hashes differ, coalesced into ranges of adjacent chunks, in disk order.
/// Refuses lists of different chunk or disk sizes, and malformed lists.
pub fn diff(source: &ChunkHashes, replica: &ChunkHashes) -> Result<Vec<ChunkRange>, ResyncError> {
    if source.chunk_size_bytes != replica.chunk_size_bytes {
        return Err(ResyncError::ChunkSizeMismatch {
            source_bytes: source.chunk_size_bytes,
            replica_bytes: replica.chunk_size_bytes,
        });
    }
    if source.disk_size_bytes != replica.disk_size_bytes {
        return Err(ResyncError::DiskSizeMismatch {
            source_bytes: source.disk_size_bytes,
            replica_bytes: replica.disk_size_bytes,
        });
    }
    source.validate()?;
    replica.validate()?;
    let chunk = u64::from(source.chunk_size_bytes);
    let mut ranges: Vec<ChunkRange> = Vec::new();
    for (index, (a, b)) in source.hashes.iter().zip(&replica.hashes).enumerate() {
        if a == b {
            continue;
        }
        let index = index as u64;
        let Some((offset_bytes, length_bytes)) = source.chunk_extent(index) else {
            continue; // unreachable for a validated list
        };
        match ranges.last_mut() {
            Some(last) if last.first_chunk + last.chunk_count == index => {
                last.chunk_count += 1;
                last.length_bytes += length_bytes;
            }
            _ => ranges.push(ChunkRange {
                first_chunk: index,
                chunk_count: 1,
                offset_bytes,
                length_bytes,
            }),
        }
        debug_assert_eq!(offset_bytes, index * chunk);
    }
    Ok(ranges)
}

/// Counters of one resync.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResyncStats {
    /// Chunks whose hashes were compared (all chunks of the disk).
    pub chunks_compared: u64,
    /// Chunks whose hashes differ.
    pub chunks_differing: u64,
    /// Chunks copied to the replica.
    pub chunks_sent: u64,
    /// Bytes copied to the replica.
    pub bytes_sent: u64,
    /// Bytes of disk covered by the comparison (the disk size; each side hashed it once).
    pub bytes_compared: u64,
}

/// Tuning of hashing and copying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResyncOptions {
    /// Chunk size; see [`is_valid_chunk_size`]. Default [`DEFAULT_CHUNK_SIZE_BYTES`].
    pub chunk_size_bytes: u32,
    /// Size of the one reused buffer, rounded down to whole chunks; at least one chunk, at
    /// most [`MAX_READ_BUFFER_BYTES`]. Default [`DEFAULT_READ_BUFFER_BYTES`].
    pub read_buffer_bytes: usize,
}

impl Default for ResyncOptions {
    fn default() -> Self {
        Self {
            chunk_size_bytes: DEFAULT_CHUNK_SIZE_BYTES,
            read_buffer_bytes: DEFAULT_READ_BUFFER_BYTES,
        }
    }
}

impl ResyncOptions {
    /// Checks the options; returns the buffer size to use (whole chunks).
    fn buffer_len(&self) -> Result<usize, ResyncError> {
        if !is_valid_chunk_size(self.chunk_size_bytes) {
            return Err(ResyncError::InvalidChunkSize {
                chunk_size_bytes: self.chunk_size_bytes,
            });
        }
        let chunk = self.chunk_size_bytes as usize;
        if self.read_buffer_bytes < chunk || self.read_buffer_bytes > MAX_READ_BUFFER_BYTES {
            return Err(ResyncError::InvalidReadBuffer {
                read_buffer_bytes: self.read_buffer_bytes,
                chunk_size_bytes: self.chunk_size_bytes,
            });
        }
        Ok(self.read_buffer_bytes / chunk * chunk)
    }
}

/// Hashes the first `disk_size_bytes` of `source` (a file or block device) chunk by chunk,
/// reading sequentially through one buffer. `progress` gets the bytes hashed so far after each
/// buffer; `is_cancelled` is checked before each buffer. The source must be at least
/// `disk_size_bytes` long (a short read is an [`ResyncError::Io`] with `UnexpectedEof`).
pub fn hash_chunks<R: FileExt + ?Sized>(
    source: &R,
    disk_size_bytes: u64,
    options: &ResyncOptions,
    progress: &mut dyn FnMut(u64),
    is_cancelled: &dyn Fn() -> bool,
) -> Result<ChunkHashes, ResyncError> {
    let mut buffer = vec![0u8; options.buffer_len()?];
    hash_with_buffer(
        source,
        Path::new("<source>"),
        disk_size_bytes,
        options.chunk_size_bytes,
        &mut buffer,
        progress,
        is_cancelled,
    )
}

/// [`hash_chunks`] of a whole file or block device, by path.
pub fn hash_path(
    path: &Path,
    options: &ResyncOptions,
    progress: &mut dyn FnMut(u64),
    is_cancelled: &dyn Fn() -> bool,
) -> Result<ChunkHashes, ResyncError> {
    let mut buffer = vec![0u8; options.buffer_len()?];
    let file = File::open(path).map_err(io_error("open", path, 0))?;
    let disk_size_bytes = file_len(&file, path)?;
    hash_with_buffer(
        &file,
        path,
        disk_size_bytes,
        options.chunk_size_bytes,
        &mut buffer,
        progress,
        is_cancelled,
    )
}

fn hash_with_buffer<R: FileExt + ?Sized>(
    source: &R,
    path: &Path,
    disk_size_bytes: u64,
    chunk_size_bytes: u32,
    buffer: &mut [u8],
    progress: &mut dyn FnMut(u64),
    is_cancelled: &dyn Fn() -> bool,
) -> Result<ChunkHashes, ResyncError> {
    let count = chunk_count(disk_size_bytes, chunk_size_bytes);
    // Reserve up front (so the list never grows by reallocation: a 256 MiB list is 2²⁵
    // hashes), but not blindly for a caller's absurd size: reads fail first.
    let mut hashes = Vec::with_capacity(usize::try_from(count.min(1 << 25)).unwrap_or(0));
    let mut offset_bytes = 0u64;
    while offset_bytes < disk_size_bytes {
        if is_cancelled() {
            return Err(ResyncError::Cancelled);
        }
        let length_bytes = (disk_size_bytes - offset_bytes).min(buffer.len() as u64);
        let filled = buffer
            .get_mut(..usize::try_from(length_bytes).unwrap_or(0))
            .unwrap_or_default();
        source
            .read_exact_at(filled, offset_bytes)
            .map_err(io_error("read", path, offset_bytes))?;
        hashes.extend(filled.chunks(chunk_size_bytes as usize).map(chunk_hash));
        offset_bytes += length_bytes;
        progress(offset_bytes);
    }
    Ok(ChunkHashes {
        chunk_size_bytes,
        disk_size_bytes,
        hashes,
    })
}

/// Phase of a [`resync_local`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResyncPhase {
    /// Hashing the source.
    HashSource,
    /// Hashing the replica.
    HashReplica,
    /// Copying differing chunks.
    Copy,
}

/// Progress report of a [`resync_local`]: `done_bytes` of `total_bytes` of the current phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResyncProgress {
    /// The phase.
    pub phase: ResyncPhase,
    /// Bytes done in this phase.
    pub done_bytes: u64,
    /// Bytes this phase will do (disk size when hashing; differing bytes when copying).
    pub total_bytes: u64,
}

/// Brings the replica file (or block device) to the source's content: hashes both, diffs,
/// copies only the differing chunks with pread/pwrite, fdatasyncs the replica.
///
/// Sizes must be equal ([`ResyncError::DiskSizeMismatch`], before anything is written). The
/// source must not change during the call. On an error or cancellation during the copy, the
/// replica holds a mix of old and new chunks and must be resynced again before use.
pub fn resync_local(
    source_path: &Path,
    replica_path: &Path,
    options: &ResyncOptions,
    progress: &mut dyn FnMut(ResyncProgress),
    is_cancelled: &dyn Fn() -> bool,
) -> Result<ResyncStats, ResyncError> {
    let buffer_len = options.buffer_len()?;
    let source = File::open(source_path).map_err(io_error("open", source_path, 0))?;
    let replica = OpenOptions::new()
        .read(true)
        .write(true)
        .open(replica_path)
        .map_err(io_error("open", replica_path, 0))?;
    let source_bytes = file_len(&source, source_path)?;
    let replica_bytes = file_len(&replica, replica_path)?;
    if source_bytes != replica_bytes {
        return Err(ResyncError::DiskSizeMismatch {
            source_bytes,
            replica_bytes,
        });
    }
    let disk_size_bytes = source_bytes;
    let chunk_size_bytes = options.chunk_size_bytes;
    let mut buffer = vec![0u8; buffer_len];

    let mut hash = |file: &File, path: &Path, phase, buffer: &mut [u8]| {
        hash_with_buffer(
            file,
            path,
            disk_size_bytes,
            chunk_size_bytes,
            buffer,
            &mut |done_bytes| {
                progress(ResyncProgress {
                    phase,
                    done_bytes,
                    total_bytes: disk_size_bytes,
                })
            },
            is_cancelled,
        )
    };
    let source_hashes = hash(&source, source_path, ResyncPhase::HashSource, &mut buffer)?;
    let replica_hashes = hash(
        &replica,
        replica_path,
        ResyncPhase::HashReplica,
        &mut buffer,
    )?;
    let ranges = diff(&source_hashes, &replica_hashes)?;

    let chunks_differing: u64 = ranges.iter().map(|range| range.chunk_count).sum();
    let total_bytes: u64 = ranges.iter().map(|range| range.length_bytes).sum();
    let mut stats = ResyncStats {
        chunks_compared: source_hashes.chunk_count(),
        chunks_differing,
        chunks_sent: 0,
        bytes_sent: 0,
        bytes_compared: disk_size_bytes,
    };
    for range in &ranges {
        for (offset_bytes, length_bytes) in range.pieces(chunk_size_bytes, buffer_len as u64) {
            if is_cancelled() {
                return Err(ResyncError::Cancelled);
            }
            let piece = buffer
                .get_mut(..usize::try_from(length_bytes).unwrap_or(0))
                .unwrap_or_default();
            source.read_exact_at(piece, offset_bytes).map_err(io_error(
                "read",
                source_path,
                offset_bytes,
            ))?;
            replica.write_all_at(piece, offset_bytes).map_err(io_error(
                "write",
                replica_path,
                offset_bytes,
            ))?;
            stats.bytes_sent += length_bytes;
            progress(ResyncProgress {
                phase: ResyncPhase::Copy,
                done_bytes: stats.bytes_sent,
                total_bytes,
            });
        }
        stats.chunks_sent += range.chunk_count;
    }
    if stats.chunks_sent > 0 {
        replica
            .sync_data()
            .map_err(io_error("fdatasync", replica_path, 0))?;
    }
    Ok(stats)
}

fn io_error<'a>(
    op: &'static str,
    path: &'a Path,
    offset_bytes: u64,
) -> impl FnOnce(io::Error) -> ResyncError + 'a {
    move |source| ResyncError::Io {
        op,
        path: path.to_path_buf(),
        offset_bytes,
        source,
    }
}

/// Length of a regular file or block device (seeking to the end works for both).
fn file_len(file: &File, path: &Path) -> Result<u64, ResyncError> {
    let mut handle = file;
    handle
        .seek(SeekFrom::End(0))
        .map_err(io_error("seek", path, 0))
}

#[cfg(test)]
mod tests;
