//! The source model's digest definitions: one chunk's digest, one disk's whole digest.
//!
//! - [`chunk_digest`]: xxh3-64 of a chunk's bytes, unseeded (chosen independently of the
//!   engine's resync hashes), per [`DEFAULT_CHUNK_BYTES`] chunk, the last one shorter when the
//!   disk's size is not a multiple;
//! - [`whole_digest`]: xxh3-64 over the size, the chunk size and the chunk digests in order,
//!   little-endian: equal for two disks exactly when every chunk digest is.
//!
//! Every check of a disk by digest (the oracle's bookmarks, chaos's points, the appliance
//! tests' `verify_item`) uses these two; [`image_digest`] and [`file_digest`] compute the
//! whole digest of a disk held in memory or in a file.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use xxhash_rust::xxh3::{Xxh3, xxh3_64};

/// Chunk size of the digests unless configured otherwise: 64 KiB.
pub const DEFAULT_CHUNK_BYTES: u32 = 64 * 1024;

/// The digest of one chunk's bytes: xxh3-64, unseeded.
pub fn chunk_digest(bytes: &[u8]) -> u64 {
    xxh3_64(bytes)
}

/// The whole-disk digest: xxh3-64 over `size_bytes`, `chunk_bytes` and every chunk digest in
/// order, little-endian.
pub fn whole_digest(size_bytes: u64, chunk_bytes: u32, chunks: &[u64]) -> u64 {
    let mut hasher = Xxh3::new();
    hasher.update(&size_bytes.to_le_bytes());
    hasher.update(&chunk_bytes.to_le_bytes());
    let mut batch = [0u8; 4096];
    for group in chunks.chunks(batch.len() / 8) {
        for (slot, digest) in batch.chunks_exact_mut(8).zip(group) {
            slot.copy_from_slice(&digest.to_le_bytes());
        }
        hasher.update(&batch[..group.len() * 8]);
    }
    hasher.digest()
}

/// One disk's digests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskDigest {
    /// Size of the disk.
    pub size_bytes: u64,
    /// Chunk size; the last chunk is shorter when the size is not a multiple.
    pub chunk_bytes: u32,
    /// [`chunk_digest`] of each chunk, in order.
    pub chunks: Vec<u64>,
    /// [`whole_digest`] of the disk.
    pub whole: u64,
}

impl DiskDigest {
    /// The digests of a disk from its chunk digests (computes the whole digest).
    pub fn from_chunks(size_bytes: u64, chunk_bytes: u32, chunks: Vec<u64>) -> Self {
        let whole = whole_digest(size_bytes, chunk_bytes, &chunks);
        Self {
            size_bytes,
            chunk_bytes,
            chunks,
            whole,
        }
    }
}

/// The whole digest of a disk image held in memory, with [`DEFAULT_CHUNK_BYTES`] chunks.
pub fn image_digest(bytes: &[u8]) -> u64 {
    let chunks: Vec<u64> = bytes
        .chunks(DEFAULT_CHUNK_BYTES as usize)
        .map(chunk_digest)
        .collect();
    whole_digest(bytes.len() as u64, DEFAULT_CHUNK_BYTES, &chunks)
}

/// The whole digest of the disk image in the file at `path` (all of the file, with
/// [`DEFAULT_CHUNK_BYTES`] chunks), and the file's length. Reads the file once, a chunk at a
/// time.
pub fn file_digest(path: &Path) -> std::io::Result<(u64, u64)> {
    let mut file = File::open(path)?;
    let mut buffer = vec![0u8; DEFAULT_CHUNK_BYTES as usize];
    let mut chunks = Vec::new();
    let mut length = 0u64;
    loop {
        let mut filled = 0;
        while filled < buffer.len() {
            match file.read(&mut buffer[filled..])? {
                0 => break,
                n => filled += n,
            }
        }
        if filled == 0 {
            break;
        }
        chunks.push(chunk_digest(&buffer[..filled]));
        length += filled as u64;
        if filled < buffer.len() {
            break;
        }
    }
    Ok((whole_digest(length, DEFAULT_CHUNK_BYTES, &chunks), length))
}

/// The digest of every chunk of an all-zero disk of `size_bytes`.
pub(crate) fn zero_chunks(size_bytes: u64, chunk_bytes: u32) -> Vec<u64> {
    let chunk = u64::from(chunk_bytes);
    let count = size_bytes.div_ceil(chunk);
    let mut zeros = vec![0u8; chunk_bytes as usize];
    let full = chunk_digest(&zeros);
    let mut digests = vec![full; count as usize];
    let last_len = size_bytes - count.saturating_sub(1) * chunk;
    if let Some(last) = digests.last_mut()
        && last_len != chunk
    {
        zeros.truncate(last_len as usize);
        *last = chunk_digest(&zeros);
    }
    digests
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn image_and_file_digests_agree() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = vec![0u8; 3 * DEFAULT_CHUNK_BYTES as usize + 4096];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = (i * 7 / 3) as u8;
        }
        let path = dir.path().join("disk.img");
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(
            file_digest(&path).unwrap(),
            (image_digest(&bytes), bytes.len() as u64)
        );
        bytes[5] ^= 1;
        assert_ne!(file_digest(&path).unwrap().0, image_digest(&bytes));
    }
}
