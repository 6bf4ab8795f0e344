//! Mode 2: the chunk hashes of one replica disk, computed while the item's streaming lease is
//! held and within the port's memory budget for hashing.

use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use engine::error::report;
use engine::port::{Hello, Mode, Refusal, Status, encode_reply};
use engine::resync::{
    HASH_LIST_CHECKSUM_BYTES, HASH_LIST_HEADER_BYTES, ResyncError, ResyncOptions, chunk_count,
    hash_path, is_valid_chunk_size,
};

use super::close::{drain_and_close, refuse};
use super::config::HASH_READ_BUFFER_BYTES;
use super::conn::PortShared;

/// Memory held for hashing by one mode-2 connection, returned to the port's budget on drop.
pub(super) struct HashMemory<'a> {
    shared: &'a PortShared,
    bytes: u64,
}

impl<'a> HashMemory<'a> {
    /// Reserves `bytes` of the port's `max_hash_memory_bytes`, or returns how much is in use.
    pub(super) fn reserve(shared: &'a PortShared, bytes: u64) -> Result<Self, u64> {
        let limit = shared.config.max_hash_memory_bytes;
        shared
            .hash_memory_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|&total| total <= limit)
            })
            .map(|_| Self { shared, bytes })
    }
}

impl Drop for HashMemory<'_> {
    fn drop(&mut self) {
        self.shared
            .hash_memory_bytes
            .fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

pub(super) fn serve_hashes(shared: &PortShared, stream: &TcpStream, id: u64, hello: &Hello) {
    let mode = Mode::ChunkHashes as u8;
    // The hello's own fields first: a bad chunk size never waits for apply.
    let chunk_size_bytes = hello.chunk_size_bytes;
    if !is_valid_chunk_size(chunk_size_bytes) {
        let refusal = Refusal::new(
            Status::InvalidChunkSize,
            format!(
                "chunk size {chunk_size_bytes} bytes: must be a non-zero multiple of 4096, at \
                 most {}",
                engine::resync::MAX_CHUNK_SIZE_BYTES
            ),
        );
        return refuse(shared, stream, id, mode, &refusal);
    }
    // The registry applies every acknowledged frame first and hands out a guard that keeps
    // the replica from being written until it is dropped (the item's streaming lease).
    let access = match shared
        .registry
        .replica(&hello.item_id, &hello.token, hello.disk_index)
    {
        Ok(access) => access,
        Err(refusal) => return refuse(shared, stream, id, mode, &refusal),
    };
    if let Err(refusal) = shared.admit_session(id) {
        drop(access);
        return refuse(shared, stream, id, mode, &refusal);
    }
    let path = access.path.clone();
    let read_failed = |what: String| Refusal::new(Status::ReplicaReadFailed, what);
    // Seek to the end rather than stat: a block device's metadata says 0 bytes.
    let size = File::open(&path).and_then(|mut f| f.seek(SeekFrom::End(0)));
    let disk_size_bytes = match size {
        Ok(size) => size,
        Err(e) => {
            let refusal = read_failed(format!(
                "disk {}: {}: {e}",
                hello.disk_index,
                path.display()
            ));
            drop(access);
            return refuse(shared, stream, id, mode, &refusal);
        }
    };
    let list_bytes = chunk_count(disk_size_bytes, chunk_size_bytes)
        .saturating_mul(8)
        .saturating_add((HASH_LIST_HEADER_BYTES + HASH_LIST_CHECKSUM_BYTES) as u64);
    if list_bytes > shared.config.max_hash_list_bytes {
        let refusal = Refusal::new(
            Status::HashListTooLarge,
            format!(
                "disk {} of {disk_size_bytes} bytes in chunks of {chunk_size_bytes} bytes needs \
                 a {list_bytes}-byte hash list, over the limit of {}; use larger chunks",
                hello.disk_index, shared.config.max_hash_list_bytes
            ),
        );
        drop(access);
        return refuse(shared, stream, id, mode, &refusal);
    }
    // The list is held once (it is streamed to the socket, not copied), plus one read buffer.
    let memory = match HashMemory::reserve(shared, list_bytes + HASH_READ_BUFFER_BYTES as u64) {
        Ok(memory) => memory,
        Err(used) => {
            let refusal = Refusal::new(
                Status::Busy,
                format!(
                    "hashing disk {} needs {} bytes of memory; other hash requests hold {used} \
                     of the port's {}; retry shortly",
                    hello.disk_index,
                    list_bytes + HASH_READ_BUFFER_BYTES as u64,
                    shared.config.max_hash_memory_bytes
                ),
            );
            drop(access);
            return refuse(shared, stream, id, mode, &refusal);
        }
    };
    let options = ResyncOptions {
        chunk_size_bytes,
        read_buffer_bytes: HASH_READ_BUFFER_BYTES,
    };
    let ended = shared.sockets().get(&id).map_or_else(
        || Arc::new(AtomicBool::new(false)),
        |conn| conn.ended.clone(),
    );
    let cancelled = || shared.stopping() || ended.load(Ordering::Acquire);
    let hashed = hash_path(&path, &options, &mut |_| {}, &cancelled);
    // The replica may be written again: nothing below reads it.
    drop(access);
    let hashes = match hashed {
        Ok(hashes) => hashes,
        Err(ResyncError::Cancelled) => {
            let refusal = Refusal::new(
                Status::ShuttingDown,
                "the appliance is shutting down or stopped this item's sessions",
            );
            return refuse(shared, stream, id, mode, &refusal);
        }
        Err(e) => {
            let refusal = read_failed(format!("disk {}: {}", hello.disk_index, report(&e)));
            return refuse(shared, stream, id, mode, &refusal);
        }
    };
    let message = format!(
        "disk {}: {} chunks of {chunk_size_bytes} bytes over {} bytes",
        hello.disk_index,
        hashes.hashes.len(),
        hashes.disk_size_bytes
    );
    let payload_len = hashes.encoded_len_bytes() as u64;
    let reply = encode_reply(Status::Ok, mode, 0, payload_len, &message);
    let mut out = io::BufWriter::with_capacity(64 * 1024, stream);
    let sent = out
        .write_all(&reply)
        .and_then(|()| hashes.encode_to(&mut out))
        .and_then(|()| out.flush());
    drop(out);
    drop(hashes);
    drop(memory);
    if sent.is_ok() {
        drain_and_close(stream, shared.config.close_drain_timeout);
    }
}
