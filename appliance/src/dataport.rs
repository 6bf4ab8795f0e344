//! The data port: the TCP endpoint where source agents stream delta frames to the appliance.
//!
//! The wire protocol is specified in `docs/design/data-port.md`; this module is its server
//! side (`disk-sim/src/agent.rs` is the client side). One thread accepts, one thread serves
//! each connection, and a connection is one of two sessions:
//!
//! ```text
//!  agent                                   appliance (this module)
//!  ─────                                   ───────────────────────
//!  hello "DRDP" v1 mode item token ──────► read within handshake_timeout, limits checked
//!                                          ItemRegistry: item known? token (constant time)?
//!                                          mode 1: lease the item (busy otherwise), lock its log
//!        ◄────────────────────────────── reply "DRDA" status next_seq message
//!  mode 1 (stream):
//!  stream header (first_seq ≤ next_seq) ─► engine::ingest::ingest_stream over the socket
//!  frame, frame, frame ... ─────────────►   decode ─► skip seq < next_seq ─► stage ─► commit
//!        ◄────────────────────────────── ack record (durable seq), after each group commit
//!        ◄────────────────────────────── close record (reason, durable seq, message), then
//!                                          the server half-closes and drains until EOF
//!  mode 2 (chunk hashes of one replica):
//!        ◄────────────────────────────── reply with payload = ChunkHashes::encode() bytes
//! ```
//!
//! Invariants:
//! - an ack carries a sequence number only after [`StagingLog::commit`] returned it durable;
//!   acks on a connection are monotonic;
//! - at most one streaming session per item ([`SessionLease`]); a second one is refused
//!   [`Status::Busy`] and changes nothing;
//! - every byte from the network is parsed with bounds checks and limits (hello, token,
//!   message lengths, frames through the engine's decoder); nothing here panics on input;
//! - every wait is bounded: handshake deadline, idle read timeout, write timeout, bounded
//!   back-pressure sleep, bounded drain after a close, bounded number of connections;
//! - [`DataPort::shutdown`] stops accepting, ends every session after its current commit
//!   (a blocked read is woken by shutting the socket for reading, and the session's reader
//!   reports the end of input from then on: the frames already decoded are committed and
//!   acknowledged, a close record says "shutting-down") and joins every thread.
//!
//! Known limit: a session holds its item's `StagingLog` mutex for its whole lifetime
//! (`ingest_stream` borrows the log mutably), so the apply side cannot `reclaim` staging
//! space while a session streams; see `docs/design/data-port.md`, "Open points".

// The daemon's `serve` command wires the port in; until it does, the tests are its only user.
#![allow(dead_code)]

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, ErrorKind, Read, Seek, SeekFrom, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use engine::delta::DecodeErrorReason;
use engine::ingest::{IngestConfig, IngestError, ingest_stream};
use engine::resync::{
    HASH_LIST_CHECKSUM_BYTES, HASH_LIST_HEADER_BYTES, ResyncError, ResyncOptions, chunk_count,
    hash_path, is_valid_chunk_size,
};
use engine::staging::{Pressure, StagingError, StagingLog};

/// Magic of the client's hello.
pub const HELLO_MAGIC: [u8; 4] = *b"DRDP";
/// Magic of the server's reply.
pub const REPLY_MAGIC: [u8; 4] = *b"DRDA";
/// The protocol version this server speaks (and the only one it accepts).
pub const PROTOCOL_VERSION: u16 = 1;
/// Size of the hello before the token.
pub const HELLO_FIXED_BYTES: usize = 32;
/// Size of the reply before its message.
pub const REPLY_FIXED_BYTES: usize = 32;
/// Size of an ack or close record before a close's message.
pub const RECORD_FIXED_BYTES: usize = 16;
/// Longest token accepted.
pub const MAX_TOKEN_BYTES: usize = 256;
/// Longest message in a reply or close record (longer texts are cut at a char boundary).
pub const MAX_MESSAGE_BYTES: usize = 1024;
/// Record kind: acknowledgement of a durable sequence number.
pub const RECORD_ACK: u8 = 1;
/// Record kind: the server ends the session.
pub const RECORD_CLOSE: u8 = 2;

/// Most bytes read and discarded after a close or refusal, waiting for the peer's EOF.
const MAX_DRAIN_BYTES: u64 = 64 << 20;

/// What a connection asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// Stream delta frames into the item's staging log.
    Stream = 1,
    /// Fetch the chunk hash list of one replica disk (delta resync).
    ChunkHashes = 2,
}

impl Mode {
    /// Parses the mode byte.
    pub fn from_u8(value: u8) -> Option<Self> {
        match value {
            1 => Some(Self::Stream),
            2 => Some(Self::ChunkHashes),
            _ => None,
        }
    }
}

/// Status of the server's reply to a hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// Accepted.
    Ok = 0,
    /// The hello is malformed (magic, reserved fields, lengths, mode arguments).
    BadHello = 1,
    /// A protocol version this server does not speak.
    UnsupportedVersion = 2,
    /// A mode this server does not know.
    UnsupportedMode = 3,
    /// No such protected item.
    UnknownItem = 4,
    /// The token does not match the item's stream token.
    BadToken = 5,
    /// Another session streams this item.
    Busy = 6,
    /// The item needs a delta resync; frames are refused until it is done.
    ResyncRequired = 7,
    /// The item's staging log failed; nothing is accepted until it is reopened.
    StagingFailed = 8,
    /// The port serves its maximum number of connections.
    TooManyConnections = 9,
    /// The appliance is shutting down.
    ShuttingDown = 10,
    /// The hello did not arrive complete within the handshake timeout.
    HandshakeTimeout = 11,
    /// Mode 2: the item has no such disk.
    UnknownDisk = 12,
    /// Mode 2: the chunk size is not allowed.
    InvalidChunkSize = 13,
    /// Mode 2: the hash list would exceed the configured limit.
    HashListTooLarge = 14,
    /// Mode 2: reading the replica failed.
    ReplicaReadFailed = 15,
}

impl Status {
    /// Parses the status byte.
    pub fn from_u8(value: u8) -> Option<Self> {
        use Status::*;
        Some(match value {
            0 => Ok,
            1 => BadHello,
            2 => UnsupportedVersion,
            3 => UnsupportedMode,
            4 => UnknownItem,
            5 => BadToken,
            6 => Busy,
            7 => ResyncRequired,
            8 => StagingFailed,
            9 => TooManyConnections,
            10 => ShuttingDown,
            11 => HandshakeTimeout,
            12 => UnknownDisk,
            13 => InvalidChunkSize,
            14 => HashListTooLarge,
            15 => ReplicaReadFailed,
            _ => return None,
        })
    }

    /// A short kebab-case name, as logs and error messages show it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::BadHello => "bad-hello",
            Self::UnsupportedVersion => "unsupported-version",
            Self::UnsupportedMode => "unsupported-mode",
            Self::UnknownItem => "unknown-item",
            Self::BadToken => "bad-token",
            Self::Busy => "busy",
            Self::ResyncRequired => "resync-required",
            Self::StagingFailed => "staging-failed",
            Self::TooManyConnections => "too-many-connections",
            Self::ShuttingDown => "shutting-down",
            Self::HandshakeTimeout => "handshake-timeout",
            Self::UnknownDisk => "unknown-disk",
            Self::InvalidChunkSize => "invalid-chunk-size",
            Self::HashListTooLarge => "hash-list-too-large",
            Self::ReplicaReadFailed => "replica-read-failed",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why the server ends a streaming session (close record).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CloseReason {
    /// The input ended (an end frame, or the agent closed its sending half) and every
    /// durable frame was acknowledged.
    EndOfStream = 1,
    /// A frame (or the stream header) failed a check; the message names it and why.
    CorruptFrame = 2,
    /// The stream is for another item, another disk layout, or starts past `next_seq`.
    WrongStream = 3,
    /// Staging is full; retry later (acks were already slowed).
    StagingFull = 4,
    /// The item needs a delta resync.
    ResyncRequired = 5,
    /// The staging log failed (I/O); nothing more is acknowledged until it is reopened.
    StagingFailed = 6,
    /// Nothing was received for the idle timeout.
    IdleTimeout = 7,
    /// The appliance is shutting down.
    ShuttingDown = 8,
    /// Reading from the connection failed.
    ReadFailed = 9,
}

impl CloseReason {
    /// Parses the reason byte.
    pub fn from_u8(value: u8) -> Option<Self> {
        use CloseReason::*;
        Some(match value {
            1 => EndOfStream,
            2 => CorruptFrame,
            3 => WrongStream,
            4 => StagingFull,
            5 => ResyncRequired,
            6 => StagingFailed,
            7 => IdleTimeout,
            8 => ShuttingDown,
            9 => ReadFailed,
            _ => return None,
        })
    }

    /// A short kebab-case name.
    pub fn name(self) -> &'static str {
        match self {
            Self::EndOfStream => "end-of-stream",
            Self::CorruptFrame => "corrupt-frame",
            Self::WrongStream => "wrong-stream",
            Self::StagingFull => "staging-full",
            Self::ResyncRequired => "resync-required",
            Self::StagingFailed => "staging-failed",
            Self::IdleTimeout => "idle-timeout",
            Self::ShuttingDown => "shutting-down",
            Self::ReadFailed => "read-failed",
        }
    }
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A parsed hello.
#[derive(Clone, PartialEq, Eq)]
pub struct Hello {
    /// What the connection asks for.
    pub mode: Mode,
    /// The protected item.
    pub item_id: [u8; 16],
    /// The item's stream token (1..=[`MAX_TOKEN_BYTES`] bytes).
    pub token: Vec<u8>,
    /// Mode 2: the disk whose replica is hashed; 0 in mode 1.
    pub disk_index: u16,
    /// Mode 2: the chunk size; 0 in mode 1.
    pub chunk_size_bytes: u32,
}

impl std::fmt::Debug for Hello {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a secret.
        f.debug_struct("Hello")
            .field("mode", &self.mode)
            .field("item_id", &hex(&self.item_id))
            .field("token_len", &self.token.len())
            .field("disk_index", &self.disk_index)
            .field("chunk_size_bytes", &self.chunk_size_bytes)
            .finish()
    }
}

impl Hello {
    /// The wire encoding (what an agent sends).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HELLO_FIXED_BYTES + self.token.len());
        out.extend_from_slice(&HELLO_MAGIC);
        out.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        out.push(self.mode as u8);
        out.push(0);
        out.extend_from_slice(&self.item_id);
        out.extend_from_slice(&(self.token.len() as u16).to_le_bytes());
        out.extend_from_slice(&self.disk_index.to_le_bytes());
        out.extend_from_slice(&self.chunk_size_bytes.to_le_bytes());
        out.extend_from_slice(&self.token);
        out
    }
}

/// A hello or request the server refuses: the status and a message naming what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct Refusal {
    /// The status sent.
    pub status: Status,
    /// What was wrong, for a human.
    pub message: String,
}

impl Refusal {
    /// A refusal with a message.
    pub fn new(status: Status, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

/// The fixed part of a hello, checked; the token length tells how many bytes follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HelloFixed {
    mode: Mode,
    item_id: [u8; 16],
    token_len: usize,
    disk_index: u16,
    chunk_size_bytes: u32,
}

fn le_u16_at(bytes: &[u8], at: usize) -> u16 {
    let mut raw = [0u8; 2];
    if let Some(src) = bytes.get(at..at + 2) {
        raw.copy_from_slice(src);
    }
    u16::from_le_bytes(raw)
}

fn le_u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut raw = [0u8; 4];
    if let Some(src) = bytes.get(at..at + 4) {
        raw.copy_from_slice(src);
    }
    u32::from_le_bytes(raw)
}

fn le_u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut raw = [0u8; 8];
    if let Some(src) = bytes.get(at..at + 8) {
        raw.copy_from_slice(src);
    }
    u64::from_le_bytes(raw)
}

/// Checks the fixed 32 bytes of a hello. Never panics.
fn parse_hello_fixed(raw: &[u8; HELLO_FIXED_BYTES]) -> Result<HelloFixed, Refusal> {
    if raw[0..4] != HELLO_MAGIC {
        return Err(Refusal::new(
            Status::BadHello,
            format!(
                "bad hello magic {:02x?} (expected \"DRDP\"): not a data-port client",
                &raw[0..4]
            ),
        ));
    }
    let version = le_u16_at(raw, 4);
    if version != PROTOCOL_VERSION {
        return Err(Refusal::new(
            Status::UnsupportedVersion,
            format!("protocol version {version}; this appliance speaks version {PROTOCOL_VERSION}"),
        ));
    }
    let Some(mode) = Mode::from_u8(raw[6]) else {
        return Err(Refusal::new(
            Status::UnsupportedMode,
            format!(
                "mode {}; this appliance knows 1 (stream) and 2 (chunk hashes)",
                raw[6]
            ),
        ));
    };
    if raw[7] != 0 {
        return Err(Refusal::new(
            Status::BadHello,
            format!("hello flags {:#04x}; none are defined", raw[7]),
        ));
    }
    let mut item_id = [0u8; 16];
    item_id.copy_from_slice(&raw[8..24]);
    let token_len = usize::from(le_u16_at(raw, 24));
    if token_len == 0 || token_len > MAX_TOKEN_BYTES {
        return Err(Refusal::new(
            Status::BadHello,
            format!("token length {token_len} outside 1..={MAX_TOKEN_BYTES}"),
        ));
    }
    let disk_index = le_u16_at(raw, 26);
    let chunk_size_bytes = le_u32_at(raw, 28);
    if mode == Mode::Stream && (disk_index != 0 || chunk_size_bytes != 0) {
        return Err(Refusal::new(
            Status::BadHello,
            format!(
                "mode 1 (stream) needs disk index 0 and chunk size 0, found {disk_index} and \
                 {chunk_size_bytes}"
            ),
        ));
    }
    Ok(HelloFixed {
        mode,
        item_id,
        token_len,
        disk_index,
        chunk_size_bytes,
    })
}

/// Cuts `text` to at most [`MAX_MESSAGE_BYTES`] at a char boundary.
fn bounded_message(text: &str) -> &str {
    if text.len() <= MAX_MESSAGE_BYTES {
        return text;
    }
    let mut end = MAX_MESSAGE_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Encodes a reply (the payload, if any, follows it separately).
pub fn encode_reply(
    status: Status,
    mode: u8,
    next_seq: u64,
    payload_len_bytes: u64,
    message: &str,
) -> Vec<u8> {
    let message = bounded_message(message);
    let mut out = Vec::with_capacity(REPLY_FIXED_BYTES + message.len());
    out.extend_from_slice(&REPLY_MAGIC);
    out.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    out.push(status as u8);
    out.push(mode);
    out.extend_from_slice(&next_seq.to_le_bytes());
    out.extend_from_slice(&payload_len_bytes.to_le_bytes());
    out.extend_from_slice(&(message.len() as u16).to_le_bytes());
    out.extend_from_slice(&[0u8; 6]);
    out.extend_from_slice(message.as_bytes());
    out
}

/// Encodes an ack record.
pub fn encode_ack(durable_seq: u64) -> [u8; RECORD_FIXED_BYTES] {
    let mut out = [0u8; RECORD_FIXED_BYTES];
    out[0] = RECORD_ACK;
    out[8..16].copy_from_slice(&durable_seq.to_le_bytes());
    out
}

/// Encodes a close record with its message.
pub fn encode_close(reason: CloseReason, durable_seq: u64, message: &str) -> Vec<u8> {
    let message = bounded_message(message);
    let mut out = Vec::with_capacity(RECORD_FIXED_BYTES + message.len());
    out.push(RECORD_CLOSE);
    out.push(reason as u8);
    out.extend_from_slice(&(message.len() as u16).to_le_bytes());
    out.extend_from_slice(&[0u8; 4]);
    out.extend_from_slice(&durable_seq.to_le_bytes());
    out.extend_from_slice(message.as_bytes());
    out
}

/// Compares a presented token with the expected one in time that does not depend on where
/// they differ (only on the presented length).
pub fn tokens_equal(expected: &[u8], presented: &[u8]) -> bool {
    let mut diff = u8::from(expected.len() != presented.len());
    for (index, byte) in presented.iter().enumerate() {
        let other = expected.get(index).copied().unwrap_or(!*byte);
        diff |= std::hint::black_box(byte ^ other);
    }
    std::hint::black_box(diff) == 0
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ───────────────────────────── registry ─────────────────────────────

/// Exclusive right to stream into one item; released on drop.
#[derive(Debug)]
pub struct SessionLease {
    busy: Arc<AtomicBool>,
}

impl SessionLease {
    /// Takes the lease if nobody holds it.
    pub fn try_acquire(busy: &Arc<AtomicBool>) -> Option<Self> {
        busy.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| Self { busy: busy.clone() })
    }
}

impl Drop for SessionLease {
    fn drop(&mut self) {
        self.busy.store(false, Ordering::Release);
    }
}

/// Called with each newly durable sequence number of a session (before its ack is sent), so
/// the apply side can pick the frames up.
pub type DurableNotify = Box<dyn FnMut(u64) + Send>;

/// A streaming session on one item, as the registry grants it.
pub struct StreamSession {
    /// The item's staging log; the connection locks it for the session's lifetime.
    pub log: Arc<Mutex<StagingLog>>,
    /// Held for the session's lifetime: a second session on the item is refused as busy.
    pub lease: SessionLease,
    /// Told about every commit.
    pub on_durable: DurableNotify,
}

impl std::fmt::Debug for StreamSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamSession")
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

/// Read access to one replica disk, for hashing (mode 2).
pub struct ReplicaAccess {
    /// The replica file or block device.
    pub path: PathBuf,
    /// Held while hashing, e.g. to keep the apply side from writing the replica meanwhile.
    pub guard: Option<Box<dyn Send>>,
}

impl std::fmt::Debug for ReplicaAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaAccess")
            .field("path", &self.path)
            .field("guarded", &self.guard.is_some())
            .finish()
    }
}

/// How the port finds items and checks tokens; the daemon implements it over its item table.
///
/// Both methods must compare tokens with [`tokens_equal`] (constant time).
pub trait ItemRegistry: Send + Sync {
    /// Opens an exclusive streaming session on the item, or says why not
    /// ([`Status::UnknownItem`], [`Status::BadToken`], [`Status::Busy`], …).
    fn open_stream(&self, item_id: &[u8; 16], token: &[u8]) -> Result<StreamSession, Refusal>;

    /// Gives read access to replica `disk_index` of the item, or says why not
    /// ([`Status::UnknownItem`], [`Status::BadToken`], [`Status::UnknownDisk`], …).
    fn replica(
        &self,
        item_id: &[u8; 16],
        token: &[u8],
        disk_index: u16,
    ) -> Result<ReplicaAccess, Refusal>;
}

struct MemoryItem {
    token: Vec<u8>,
    log: Arc<Mutex<StagingLog>>,
    busy: Arc<AtomicBool>,
    replicas: Vec<PathBuf>,
    on_durable: Arc<dyn Fn(u64) + Send + Sync>,
}

/// A registry over a map in memory: for tests and the embedded demo.
#[derive(Default)]
pub struct MemoryRegistry {
    items: Mutex<HashMap<[u8; 16], MemoryItem>>,
}

impl std::fmt::Debug for MemoryRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryRegistry")
            .field("items", &self.lock().len())
            .finish()
    }
}

impl MemoryRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<[u8; 16], MemoryItem>> {
        self.items.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds (or replaces) an item: its token, staging log and replica paths (by disk index).
    pub fn insert(
        &self,
        item_id: [u8; 16],
        token: &[u8],
        log: Arc<Mutex<StagingLog>>,
        replicas: Vec<PathBuf>,
    ) {
        self.lock().insert(
            item_id,
            MemoryItem {
                token: token.to_vec(),
                log,
                busy: Arc::new(AtomicBool::new(false)),
                replicas,
                on_durable: Arc::new(|_| {}),
            },
        );
    }

    /// Sets the callback told about each commit of the item's sessions.
    pub fn set_on_durable(&self, item_id: &[u8; 16], notify: Arc<dyn Fn(u64) + Send + Sync>) {
        if let Some(item) = self.lock().get_mut(item_id) {
            item.on_durable = notify;
        }
    }

    fn check<'a>(
        items: &'a HashMap<[u8; 16], MemoryItem>,
        item_id: &[u8; 16],
        token: &[u8],
    ) -> Result<&'a MemoryItem, Refusal> {
        let item = items.get(item_id).ok_or_else(|| {
            Refusal::new(
                Status::UnknownItem,
                format!("no protected item {}", hex(item_id)),
            )
        })?;
        if !tokens_equal(&item.token, token) {
            return Err(Refusal::new(
                Status::BadToken,
                format!(
                    "the token does not match item {}'s stream token",
                    hex(item_id)
                ),
            ));
        }
        Ok(item)
    }
}

impl ItemRegistry for MemoryRegistry {
    fn open_stream(&self, item_id: &[u8; 16], token: &[u8]) -> Result<StreamSession, Refusal> {
        let items = self.lock();
        let item = Self::check(&items, item_id, token)?;
        let lease = SessionLease::try_acquire(&item.busy).ok_or_else(|| {
            Refusal::new(
                Status::Busy,
                format!(
                    "another session is streaming item {}; retry after it ends",
                    hex(item_id)
                ),
            )
        })?;
        let notify = item.on_durable.clone();
        Ok(StreamSession {
            log: item.log.clone(),
            lease,
            on_durable: Box::new(move |seq| notify(seq)),
        })
    }

    fn replica(
        &self,
        item_id: &[u8; 16],
        token: &[u8],
        disk_index: u16,
    ) -> Result<ReplicaAccess, Refusal> {
        let items = self.lock();
        let item = Self::check(&items, item_id, token)?;
        let path = item.replicas.get(usize::from(disk_index)).ok_or_else(|| {
            Refusal::new(
                Status::UnknownDisk,
                format!(
                    "item {} has {} disks, no disk {disk_index}",
                    hex(item_id),
                    item.replicas.len()
                ),
            )
        })?;
        Ok(ReplicaAccess {
            path: path.clone(),
            guard: None,
        })
    }
}

// ───────────────────────────── the port ─────────────────────────────

/// Limits and timeouts of the data port.
#[derive(Debug, Clone, Copy)]
pub struct DataPortConfig {
    /// Connections served at once (handshakes included); more are refused
    /// [`Status::TooManyConnections`].
    pub max_connections: usize,
    /// The whole hello must arrive within this time of the accept.
    pub handshake_timeout: Duration,
    /// A streaming session that receives nothing for this long is closed
    /// ([`CloseReason::IdleTimeout`]).
    pub idle_timeout: Duration,
    /// Longest a write of a reply or record may block (the peer does not read).
    pub write_timeout: Duration,
    /// After a close or refusal, how long to read and discard what the peer still sends
    /// before closing (so the close is not lost to a TCP reset).
    pub close_drain_timeout: Duration,
    /// Cap on the back-pressure delay before one ack.
    pub max_backpressure_delay: Duration,
    /// Largest hash list served in mode 2.
    pub max_hash_list_bytes: u64,
    /// Group commit and read buffer of each session.
    pub ingest: IngestConfig,
}

impl Default for DataPortConfig {
    fn default() -> Self {
        Self {
            max_connections: 64,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            write_timeout: Duration::from_secs(30),
            close_drain_timeout: Duration::from_secs(2),
            max_backpressure_delay: Duration::from_secs(1),
            max_hash_list_bytes: 256 << 20,
            ingest: IngestConfig::default(),
        }
    }
}

/// Why the port could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataPortError {
    /// A setting outside its range.
    #[error("data port config: {0}")]
    Config(String),
    /// Binding the address failed.
    #[error("binding the data port to {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Starting the accept thread failed.
    #[error("starting the data port's accept thread: {0}")]
    Thread(#[source] io::Error),
}

/// Counters of the port.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DataPortStats {
    /// Connections accepted.
    pub accepted: u64,
    /// Connections being served now.
    pub active: usize,
    /// Connections refused because the port was at its limit.
    pub refused_over_limit: u64,
    /// Streaming sessions that got an OK reply.
    pub sessions: u64,
}

struct PortShared {
    registry: Arc<dyn ItemRegistry>,
    config: DataPortConfig,
    shutting_down: AtomicBool,
    active: AtomicUsize,
    accepted: AtomicU64,
    refused_over_limit: AtomicU64,
    sessions_started: AtomicU64,
    next_conn_id: AtomicU64,
    /// A clone of each served socket, to end sessions at shutdown.
    sockets: Mutex<HashMap<u64, TcpStream>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl PortShared {
    fn sockets(&self) -> MutexGuard<'_, HashMap<u64, TcpStream>> {
        self.sockets.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn threads(&self) -> MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.threads.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stopping(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }
}

/// Releases a connection's slot and socket registration, even if its thread panics.
struct ConnSlot<'a> {
    shared: &'a PortShared,
    id: u64,
}

impl Drop for ConnSlot<'_> {
    fn drop(&mut self) {
        self.shared.sockets().remove(&self.id);
        self.shared.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The data port: a listener and its connection threads.
pub struct DataPort {
    local_addr: SocketAddr,
    shared: Arc<PortShared>,
    accept_thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for DataPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataPort")
            .field("local_addr", &self.local_addr)
            .field("stats", &self.stats())
            .finish()
    }
}

impl DataPort {
    /// Binds `addr` (port 0 picks a free port) and starts accepting.
    pub fn bind(
        addr: SocketAddr,
        registry: Arc<dyn ItemRegistry>,
        config: DataPortConfig,
    ) -> Result<Self, DataPortError> {
        if config.max_connections == 0 {
            return Err(DataPortError::Config(
                "max_connections must be at least 1".into(),
            ));
        }
        for (name, value) in [
            ("handshake_timeout", config.handshake_timeout),
            ("idle_timeout", config.idle_timeout),
            ("write_timeout", config.write_timeout),
        ] {
            if value.is_zero() {
                return Err(DataPortError::Config(format!("{name} must be non-zero")));
            }
        }
        let listener =
            TcpListener::bind(addr).map_err(|source| DataPortError::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| DataPortError::Bind { addr, source })?;
        let shared = Arc::new(PortShared {
            registry,
            config,
            shutting_down: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            accepted: AtomicU64::new(0),
            refused_over_limit: AtomicU64::new(0),
            sessions_started: AtomicU64::new(0),
            next_conn_id: AtomicU64::new(1),
            sockets: Mutex::new(HashMap::new()),
            threads: Mutex::new(Vec::new()),
        });
        let accept_thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("dataport-accept".into())
                .spawn(move || accept_loop(&shared, listener))
                .map_err(DataPortError::Thread)?
        };
        tracing::info!(%local_addr, "data port listening");
        Ok(Self {
            local_addr,
            shared,
            accept_thread: Some(accept_thread),
        })
    }

    /// The address the port listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Counters.
    pub fn stats(&self) -> DataPortStats {
        DataPortStats {
            accepted: self.shared.accepted.load(Ordering::Acquire),
            active: self.shared.active.load(Ordering::Acquire),
            refused_over_limit: self.shared.refused_over_limit.load(Ordering::Acquire),
            sessions: self.shared.sessions_started.load(Ordering::Acquire),
        }
    }

    /// Stops accepting, ends every session after its current commit (with a
    /// [`CloseReason::ShuttingDown`] record carrying the durable sequence number) and joins
    /// every thread. Idempotent.
    pub fn shutdown(&mut self) {
        let Some(accept_thread) = self.accept_thread.take() else {
            return;
        };
        self.shared.shutting_down.store(true, Ordering::Release);
        // Wake the blocking accept with a connection of our own.
        let wake = wake_addr(self.local_addr);
        match TcpStream::connect_timeout(&wake, Duration::from_secs(1)) {
            Ok(_) => {
                if accept_thread.join().is_err() {
                    tracing::error!("the data port's accept thread panicked");
                }
            }
            Err(error) => {
                // The thread exits at its next accept; leave it rather than hang here.
                tracing::warn!(%error, "could not wake the data port's accept thread");
            }
        }
        for socket in self.shared.sockets().values() {
            let _ = socket.shutdown(Shutdown::Read);
        }
        let threads = std::mem::take(&mut *self.shared.threads());
        for thread in threads {
            if thread.join().is_err() {
                tracing::error!("a data port connection thread panicked");
            }
        }
        tracing::info!(local_addr = %self.local_addr, "data port stopped");
    }
}

impl Drop for DataPort {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn wake_addr(local: SocketAddr) -> SocketAddr {
    let ip = match local.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, local.port())
}

fn accept_loop(shared: &Arc<PortShared>, listener: TcpListener) {
    for incoming in listener.incoming() {
        if shared.stopping() {
            break;
        }
        let stream = match incoming {
            Ok(stream) => stream,
            Err(error) => {
                // EMFILE and the like: do not spin.
                tracing::warn!(%error, "data port accept failed");
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        shared.accepted.fetch_add(1, Ordering::AcqRel);
        shared.threads().retain(|t| !t.is_finished());
        if shared.active.load(Ordering::Acquire) >= shared.config.max_connections {
            shared.refused_over_limit.fetch_add(1, Ordering::AcqRel);
            let message = format!(
                "the data port serves its maximum of {} connections; retry later",
                shared.config.max_connections
            );
            refuse_without_blocking(&stream, Status::TooManyConnections, &message);
            continue;
        }
        let id = shared.next_conn_id.fetch_add(1, Ordering::AcqRel);
        match stream.try_clone() {
            Ok(clone) => {
                shared.sockets().insert(id, clone);
            }
            Err(error) => {
                refuse_without_blocking(
                    &stream,
                    Status::TooManyConnections,
                    &format!("cannot serve the connection: {error}"),
                );
                continue;
            }
        }
        shared.active.fetch_add(1, Ordering::AcqRel);
        let spawned = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("dataport-{id}"))
                .spawn(move || {
                    let _slot = ConnSlot {
                        shared: &shared,
                        id,
                    };
                    serve_connection(&shared, &stream, id);
                })
        };
        match spawned {
            Ok(handle) => shared.threads().push(handle),
            Err(error) => {
                tracing::warn!(%error, "cannot start a data port connection thread");
                if let Some(stream) = shared.sockets().remove(&id) {
                    refuse_without_blocking(
                        &stream,
                        Status::TooManyConnections,
                        &format!("cannot serve the connection: {error}"),
                    );
                }
                shared.active.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
}

/// Refuses from the accept thread: read what has already arrived (so closing does not reset
/// the connection over unread bytes), send the reply, close. Never blocks.
fn refuse_without_blocking(stream: &TcpStream, status: Status, message: &str) {
    tracing::info!(peer = ?stream.peer_addr().ok(), %status, message, "data port refused");
    if stream.set_nonblocking(true).is_ok() {
        let mut buf = [0u8; 4096];
        let mut budget = 16;
        while budget > 0 && matches!((&*stream).read(&mut buf), Ok(n) if n > 0) {
            budget -= 1;
        }
    }
    let _ = (&*stream).write_all(&encode_reply(status, 0, 0, 0, message));
    let _ = stream.shutdown(Shutdown::Write);
}

/// Half-closes and reads until the peer's EOF (or the timeout, or a byte budget), so that
/// what was just written is not destroyed by a reset over unread input.
fn drain_and_close(stream: &TcpStream, timeout: Duration) {
    let _ = stream.shutdown(Shutdown::Write);
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 16 * 1024];
    let mut drained = 0u64;
    while drained < MAX_DRAIN_BYTES {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            break;
        }
        match (&*stream).read(&mut buf) {
            Ok(0) => break,
            Ok(n) => drained += n as u64,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
}

fn refuse(shared: &PortShared, stream: &TcpStream, mode: u8, refusal: &Refusal) {
    tracing::info!(
        peer = ?stream.peer_addr().ok(),
        status = %refusal.status,
        message = %refusal.message,
        "data port refused a session"
    );
    let reply = encode_reply(refusal.status, mode, 0, 0, &refusal.message);
    if (&*stream).write_all(&reply).is_ok() {
        drain_and_close(stream, shared.config.close_drain_timeout);
    }
}

/// How reading the hello failed.
enum HelloReadError {
    Timeout,
    Eof { got_bytes: usize },
    Io(io::Error),
}

/// Fills `buf` before `deadline` (a slow sender cannot stretch it).
fn read_by(
    stream: &TcpStream,
    buf: &mut [u8],
    deadline: Instant,
    already: usize,
) -> Result<(), HelloReadError> {
    let mut filled = 0;
    while filled < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HelloReadError::Timeout);
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(HelloReadError::Io)?;
        match (&*stream).read(&mut buf[filled..]) {
            Ok(0) => {
                return Err(HelloReadError::Eof {
                    got_bytes: already + filled,
                });
            }
            Ok(n) => filled += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(HelloReadError::Io(e)),
        }
    }
    Ok(())
}

fn read_hello(shared: &PortShared, stream: &TcpStream) -> Result<Hello, Refusal> {
    let timeout = shared.config.handshake_timeout;
    let deadline = Instant::now() + timeout;
    let named = |error: HelloReadError| {
        if shared.stopping() {
            return Refusal::new(Status::ShuttingDown, "the appliance is shutting down");
        }
        match error {
            HelloReadError::Timeout => Refusal::new(
                Status::HandshakeTimeout,
                format!(
                    "no complete hello within the {} ms handshake timeout",
                    timeout.as_millis()
                ),
            ),
            HelloReadError::Eof { got_bytes } => Refusal::new(
                Status::BadHello,
                format!("the connection ended after {got_bytes} bytes of the hello"),
            ),
            HelloReadError::Io(e) => {
                Refusal::new(Status::BadHello, format!("reading the hello failed: {e}"))
            }
        }
    };
    let mut fixed = [0u8; HELLO_FIXED_BYTES];
    // The magic first: a stranger (an HTTP probe) is told at once, not after a timeout.
    read_by(stream, &mut fixed[..4], deadline, 0).map_err(named)?;
    if fixed[..4] != HELLO_MAGIC {
        return Err(parse_hello_fixed(&fixed).err().unwrap_or_else(|| {
            Refusal::new(Status::BadHello, "bad hello magic (expected \"DRDP\")")
        }));
    }
    read_by(stream, &mut fixed[4..], deadline, 4).map_err(named)?;
    let head = parse_hello_fixed(&fixed)?;
    let mut token = vec![0u8; head.token_len]; // ≤ MAX_TOKEN_BYTES
    read_by(stream, &mut token, deadline, HELLO_FIXED_BYTES).map_err(named)?;
    Ok(Hello {
        mode: head.mode,
        item_id: head.item_id,
        token,
        disk_index: head.disk_index,
        chunk_size_bytes: head.chunk_size_bytes,
    })
}

fn serve_connection(shared: &PortShared, stream: &TcpStream, id: u64) {
    let peer = stream.peer_addr().ok();
    let _ = stream.set_nodelay(true);
    if let Err(error) = stream.set_write_timeout(Some(shared.config.write_timeout)) {
        tracing::warn!(conn = id, %error, "cannot set the write timeout; dropping connection");
        return;
    }
    let hello = match read_hello(shared, stream) {
        Ok(hello) => hello,
        Err(refusal) => return refuse(shared, stream, 0, &refusal),
    };
    if shared.stopping() {
        let refusal = Refusal::new(Status::ShuttingDown, "the appliance is shutting down");
        return refuse(shared, stream, hello.mode as u8, &refusal);
    }
    tracing::debug!(conn = id, ?peer, ?hello, "data port hello");
    match hello.mode {
        Mode::Stream => serve_stream(shared, stream, id, &hello),
        Mode::ChunkHashes => serve_hashes(shared, stream, &hello),
    }
}

/// Records the first 40 bytes read (through the stream header's `first_seq`), so that a
/// decode error can be reported with the sequence number of the bad frame.
///
/// Once the port is shutting down it reports the end of input, so that the session ends at
/// the next frame boundary even if the agent keeps sending.
struct Tap<'a> {
    inner: &'a TcpStream,
    stopping: &'a AtomicBool,
    head: [u8; 40],
    seen: usize,
}

impl Tap<'_> {
    fn first_seq(&self) -> Option<u64> {
        (self.seen >= 40).then(|| le_u64_at(&self.head, 32))
    }
}

impl Read for Tap<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.stopping.load(Ordering::Acquire) {
            return Ok(0);
        }
        let n = self.inner.read(buf)?;
        let take = n.min(self.head.len() - self.seen);
        self.head[self.seen..self.seen + take].copy_from_slice(&buf[..take]);
        self.seen += take;
        Ok(n)
    }
}

fn serve_stream(shared: &PortShared, stream: &TcpStream, id: u64, hello: &Hello) {
    let config = &shared.config;
    let session = match shared.registry.open_stream(&hello.item_id, &hello.token) {
        Ok(session) => session,
        Err(refusal) => return refuse(shared, stream, Mode::Stream as u8, &refusal),
    };
    let StreamSession {
        log,
        lease,
        mut on_durable,
    } = session;
    let mut guard = match log.lock() {
        Ok(guard) => guard,
        Err(_) => {
            let refusal = Refusal::new(
                Status::StagingFailed,
                "an earlier session on this item panicked while holding its staging log",
            );
            return refuse(shared, stream, Mode::Stream as u8, &refusal);
        }
    };
    if let Some(reason) = guard.resync_required() {
        let refusal = Refusal::new(Status::ResyncRequired, reason);
        return refuse(shared, stream, Mode::Stream as u8, &refusal);
    }
    let next_seq = guard.next_seq();
    if next_seq != guard.durable_seq().wrapping_add(1) {
        let refusal = Refusal::new(
            Status::StagingFailed,
            format!(
                "frames through seq {} were appended but never made durable (an earlier flush \
                 failed); the staging log must be reopened",
                next_seq.wrapping_sub(1)
            ),
        );
        return refuse(shared, stream, Mode::Stream as u8, &refusal);
    }
    let reply = encode_reply(
        Status::Ok,
        Mode::Stream as u8,
        next_seq,
        0,
        &format!("send frames from seq {next_seq}"),
    );
    if (&*stream).write_all(&reply).is_err() {
        return;
    }
    shared.sessions_started.fetch_add(1, Ordering::AcqRel);
    let item = hex(&hello.item_id);
    tracing::info!(conn = id, %item, next_seq, "data port session started");
    if stream.set_read_timeout(Some(config.idle_timeout)).is_err() {
        return;
    }
    let mut tap = Tap {
        inner: stream,
        stopping: &shared.shutting_down,
        head: [0u8; 40],
        seen: 0,
    };
    let mut acks_broken = false;
    let result = ingest_stream(
        &mut tap,
        &mut guard,
        config.ingest,
        &mut |acked, pressure| {
            on_durable(acked);
            if acks_broken {
                return;
            }
            if let Pressure::Slow(delay) = pressure {
                std::thread::sleep(delay.min(config.max_backpressure_delay));
            }
            if (&*stream).write_all(&encode_ack(acked)).is_err() {
                // The agent does not read its acks: end the session (the reader sees EOF).
                acks_broken = true;
                let _ = stream.shutdown(Shutdown::Both);
            }
        },
    );
    let durable_seq = guard.durable_seq();
    // Release the item before telling the agent, so that its reconnect finds it free.
    drop(guard);
    drop(lease);
    let (reason, message) = close_reason(shared, &result, tap.first_seq());
    match &result {
        Ok(report) => tracing::info!(
            conn = id, %item, staged = report.frames_staged, skipped = report.frames_skipped,
            durable_seq, %reason, "data port session ended"
        ),
        Err(_) => tracing::warn!(
            conn = id, %item, durable_seq, %reason, message = %message, "data port session closed"
        ),
    }
    if !acks_broken
        && (&*stream)
            .write_all(&encode_close(reason, durable_seq, &message))
            .is_ok()
    {
        drain_and_close(stream, config.close_drain_timeout);
    }
}

/// Names why a session ended.
fn close_reason(
    shared: &PortShared,
    result: &Result<engine::ingest::IngestReport, IngestError>,
    first_seq: Option<u64>,
) -> (CloseReason, String) {
    let stopping = shared.stopping();
    let shutting_down = || {
        (
            CloseReason::ShuttingDown,
            "the appliance is shutting down; reconnect and resume later".to_owned(),
        )
    };
    match result {
        Ok(_) if stopping => shutting_down(),
        Ok(report) if report.ended => (CloseReason::EndOfStream, "end frame received".into()),
        Ok(_) => (
            CloseReason::EndOfStream,
            "the agent closed its stream".into(),
        ),
        Err(IngestError::Decode(error)) => match &error.reason {
            DecodeErrorReason::Io(io)
                if matches!(io.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
            {
                (
                    CloseReason::IdleTimeout,
                    format!(
                        "nothing received for the {} s idle timeout",
                        shared.config.idle_timeout.as_secs_f64()
                    ),
                )
            }
            _ if stopping => shutting_down(),
            DecodeErrorReason::Io(io) => (CloseReason::ReadFailed, format!("read failed: {io}")),
            reason => {
                let place = match (error.frame_index, first_seq) {
                    (Some(index), Some(first)) => format!(
                        "frame seq {} (frame {index} of this connection, byte offset {})",
                        first.wrapping_add(index),
                        error.offset_bytes
                    ),
                    (Some(index), None) => {
                        format!("frame {index}, byte offset {}", error.offset_bytes)
                    }
                    (None, _) => "stream header".to_owned(),
                };
                (CloseReason::CorruptFrame, format!("{place}: {reason}"))
            }
        },
        Err(
            error @ (IngestError::WrongItem { .. }
            | IngestError::WrongDisks { .. }
            | IngestError::Gap { .. }),
        ) => (CloseReason::WrongStream, error.to_string()),
        Err(error @ IngestError::Staging { source, .. }) => match source {
            StagingError::Full { .. } => (CloseReason::StagingFull, error.to_string()),
            StagingError::ResyncRequired { .. } => (CloseReason::ResyncRequired, error.to_string()),
            _ => (CloseReason::StagingFailed, error.to_string()),
        },
        Err(error) => (CloseReason::StagingFailed, error.to_string()),
    }
}

fn serve_hashes(shared: &PortShared, stream: &TcpStream, hello: &Hello) {
    let mode = Mode::ChunkHashes as u8;
    let access = match shared
        .registry
        .replica(&hello.item_id, &hello.token, hello.disk_index)
    {
        Ok(access) => access,
        Err(refusal) => return refuse(shared, stream, mode, &refusal),
    };
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
        return refuse(shared, stream, mode, &refusal);
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
            return refuse(shared, stream, mode, &refusal);
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
        return refuse(shared, stream, mode, &refusal);
    }
    let options = ResyncOptions {
        chunk_size_bytes,
        ..ResyncOptions::default()
    };
    let hashed = hash_path(&path, &options, &mut |_| {}, &|| shared.stopping());
    drop(access);
    let hashes = match hashed {
        Ok(hashes) => hashes,
        Err(ResyncError::Cancelled) => {
            let refusal = Refusal::new(Status::ShuttingDown, "the appliance is shutting down");
            return refuse(shared, stream, mode, &refusal);
        }
        Err(e) => {
            let refusal = read_failed(format!("disk {}: {e}", hello.disk_index));
            return refuse(shared, stream, mode, &refusal);
        }
    };
    let payload = hashes.encode();
    let message = format!(
        "disk {}: {} chunks of {chunk_size_bytes} bytes over {} bytes",
        hello.disk_index,
        hashes.hashes.len(),
        hashes.disk_size_bytes
    );
    let reply = encode_reply(Status::Ok, mode, 0, payload.len() as u64, &message);
    if (&*stream).write_all(&reply).is_ok() && (&*stream).write_all(&payload).is_ok() {
        drain_and_close(stream, shared.config.close_drain_timeout);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello_bytes(mode: u8, token_len: u16, disk: u16, chunk: u32) -> [u8; HELLO_FIXED_BYTES] {
        let mut raw = [0u8; HELLO_FIXED_BYTES];
        raw[0..4].copy_from_slice(&HELLO_MAGIC);
        raw[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        raw[6] = mode;
        raw[8..24].copy_from_slice(b"item-0123456789a");
        raw[24..26].copy_from_slice(&token_len.to_le_bytes());
        raw[26..28].copy_from_slice(&disk.to_le_bytes());
        raw[28..32].copy_from_slice(&chunk.to_le_bytes());
        raw
    }

    #[test]
    fn hello_round_trips_and_every_defect_is_named() {
        let hello = Hello {
            mode: Mode::ChunkHashes,
            item_id: *b"item-0123456789a",
            token: b"secret".to_vec(),
            disk_index: 3,
            chunk_size_bytes: 65536,
        };
        let bytes = hello.encode();
        let mut fixed = [0u8; HELLO_FIXED_BYTES];
        fixed.copy_from_slice(&bytes[..HELLO_FIXED_BYTES]);
        let head = parse_hello_fixed(&fixed).unwrap();
        assert_eq!(head.mode, Mode::ChunkHashes);
        assert_eq!(head.token_len, 6);
        assert_eq!((head.disk_index, head.chunk_size_bytes), (3, 65536));
        assert!(!format!("{hello:?}").contains("secret"));

        let status = |raw: [u8; HELLO_FIXED_BYTES]| parse_hello_fixed(&raw).unwrap_err().status;
        let mut raw = hello_bytes(1, 8, 0, 0);
        raw[0] = b'G';
        assert_eq!(status(raw), Status::BadHello);
        let mut raw = hello_bytes(1, 8, 0, 0);
        raw[4] = 9;
        assert_eq!(status(raw), Status::UnsupportedVersion);
        assert_eq!(status(hello_bytes(7, 8, 0, 0)), Status::UnsupportedMode);
        assert_eq!(status(hello_bytes(1, 0, 0, 0)), Status::BadHello);
        let error = parse_hello_fixed(&hello_bytes(1, 257, 0, 0)).unwrap_err();
        assert!(error.message.contains("token length 257"), "{error}");
        assert_eq!(status(hello_bytes(1, 8, 1, 0)), Status::BadHello);
        let mut raw = hello_bytes(1, 8, 0, 0);
        raw[7] = 1;
        assert_eq!(status(raw), Status::BadHello);
    }

    #[test]
    fn parse_never_panics_on_any_fixed_hello() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            let mut raw = [0u8; HELLO_FIXED_BYTES];
            for byte in raw.iter_mut() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *byte = state as u8;
            }
            if state.is_multiple_of(2) {
                raw[0..4].copy_from_slice(&HELLO_MAGIC);
                raw[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
            }
            let _ = parse_hello_fixed(&raw);
        }
    }

    #[test]
    fn records_and_replies_have_the_documented_layout() {
        let ack = encode_ack(0x0102_0304_0506_0708);
        assert_eq!(ack[0], RECORD_ACK);
        assert_eq!(&ack[1..8], &[0u8; 7]);
        assert_eq!(le_u64_at(&ack, 8), 0x0102_0304_0506_0708);

        let close = encode_close(CloseReason::CorruptFrame, 41, "frame seq 42: bad");
        assert_eq!((close[0], close[1]), (RECORD_CLOSE, 2));
        assert_eq!(usize::from(le_u16_at(&close, 2)), "frame seq 42: bad".len());
        assert_eq!(le_u64_at(&close, 8), 41);
        assert_eq!(&close[RECORD_FIXED_BYTES..], b"frame seq 42: bad");

        let long = "é".repeat(MAX_MESSAGE_BYTES);
        let reply = encode_reply(Status::Busy, 1, 7, 9, &long);
        assert_eq!(&reply[0..4], &REPLY_MAGIC);
        assert_eq!(le_u16_at(&reply, 4), PROTOCOL_VERSION);
        assert_eq!((reply[6], reply[7]), (Status::Busy as u8, 1));
        assert_eq!((le_u64_at(&reply, 8), le_u64_at(&reply, 16)), (7, 9));
        let message_len = usize::from(le_u16_at(&reply, 24));
        assert!(message_len <= MAX_MESSAGE_BYTES);
        assert_eq!(reply.len(), REPLY_FIXED_BYTES + message_len);
        assert!(std::str::from_utf8(&reply[REPLY_FIXED_BYTES..]).is_ok());
    }

    #[test]
    fn codes_round_trip_and_tokens_compare_exactly() {
        for code in 0..=255u8 {
            if let Some(status) = Status::from_u8(code) {
                assert_eq!(status as u8, code);
            }
            if let Some(reason) = CloseReason::from_u8(code) {
                assert_eq!(reason as u8, code);
            }
        }
        assert!(tokens_equal(b"abc", b"abc"));
        assert!(!tokens_equal(b"abc", b"abd"));
        assert!(!tokens_equal(b"abc", b"ab"));
        assert!(!tokens_equal(b"abc", b"abcd"));
        assert!(!tokens_equal(b"", b"\xff"));
    }
}
