//! The data port: the TCP endpoint where source agents stream delta frames to the appliance.
//!
//! The wire protocol is specified in `docs/design/data-port.md`; this module is its server
//! side (`disk-sim/src/agent.rs` is the client side), and both encode and decode the bytes
//! with the one codec in [`engine::port`]. One thread accepts, one thread serves each
//! connection, and a connection is one of two sessions:
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
//!   back-pressure sleep, bounded drain after a close;
//! - connections are bounded in two classes that cannot crowd each other out: unauthenticated
//!   ones (reading the hello, or being refused) per peer address and in all, where a new one
//!   drops the oldest instead of being refused, and authenticated sessions (`max_sessions`);
//! - a frame is acknowledged only after ingest checked everything apply needs (zstd payloads
//!   decompressed to their declared length), so a sender's bad payload ends the session with
//!   `invalid-payload` and is never staged;
//! - mode 2 hashes a replica only while it holds the item's streaming lease (no frame can be
//!   staged, and every staged one was applied), and within a port-wide memory budget;
//! - [`DataPort::shutdown`] stops accepting, ends every session after its current commit
//!   (a blocked read is woken by shutting the socket for reading, and the session's reader
//!   reports the end of input from then on: the frames already decoded are committed and
//!   acknowledged, a close record says "shutting-down") and joins every thread.
//!
//! Locks: a session holds its item's `StagingLog` mutex for its whole lifetime
//! (`ingest_stream` borrows the log mutably), across socket reads, ack writes and staging
//! flushes. Nothing else needs that lock meanwhile: every commit reclaims up to the watermark
//! the apply side publishes through its `StagingReader`, and status reads use the reader's
//! lock-free durable seq. The port's own `sockets` mutex (the served connections, their
//! phase and item) and `threads` mutex are held only for map updates and for `shutdown(2)`
//! calls, which do not block; never across a read, a write or a registry call.

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
// The codec's types are this module's API too (the registry's refusals, the tests' raw
// clients); the wire constants are re-exported for the tests, which the binary does not use.
#[allow(unused_imports)]
pub use engine::port::RECORD_CLOSE;
pub use engine::port::{CloseReason, Hello, Mode, Refusal, Status};
use engine::port::{
    HELLO_FIXED_BYTES, HELLO_MAGIC, decode_hello_fixed, encode_ack, encode_close, encode_reply,
};
use engine::resync::{
    HASH_LIST_CHECKSUM_BYTES, HASH_LIST_HEADER_BYTES, ResyncError, ResyncOptions, chunk_count,
    hash_path, is_valid_chunk_size,
};
use engine::staging::{Pressure, StagingError, StagingLog};

/// Most bytes read and discarded after a close or refusal, waiting for the peer's EOF.
const MAX_DRAIN_BYTES: u64 = 64 << 20;

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

use engine::port::hex;

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
    /// ([`Status::UnknownItem`], [`Status::BadToken`], [`Status::Busy`], …). With
    /// `resync` (the hello's RESYNC flag) the registry must also make sure that every frame
    /// staged so far has been applied: the port then drops them with the resync marker.
    fn open_stream(
        &self,
        item_id: &[u8; 16],
        token: &[u8],
        resync: bool,
    ) -> Result<StreamSession, Refusal>;

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

/// A registry over a map in memory, for tests; the daemon's registry is
/// `crate::items::Manager`.
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
    fn open_stream(
        &self,
        item_id: &[u8; 16],
        token: &[u8],
        _resync: bool,
    ) -> Result<StreamSession, Refusal> {
        // No apply side here: the test registry has nothing to wait for.
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
    /// Authenticated sessions (mode 1 and mode 2) served at once; a hello the registry
    /// accepted beyond it is refused [`Status::TooManyConnections`]. Connections still in their
    /// handshake never count here, so they cannot lock an agent out.
    pub max_sessions: usize,
    /// Unauthenticated connections (no hello accepted yet, or being refused) held at once.
    /// When a new connection would exceed it, the oldest one of the address holding the most
    /// is dropped (refused [`Status::TooManyConnections`] if it is still in its handshake).
    pub max_handshakes: usize,
    /// Unauthenticated connections held at once per peer IP address; a new one beyond it drops
    /// that address's oldest.
    pub max_handshakes_per_ip: usize,
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
    /// Memory all mode-2 connections together may hold for hashing (each its hash list and
    /// its read buffer); a hash request beyond it is refused [`Status::Busy`].
    pub max_hash_memory_bytes: u64,
    /// Group commit and read buffer of each session.
    pub ingest: IngestConfig,
}

impl Default for DataPortConfig {
    fn default() -> Self {
        Self {
            max_sessions: 64,
            max_handshakes: 128,
            max_handshakes_per_ip: 16,
            handshake_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(120),
            write_timeout: Duration::from_secs(30),
            close_drain_timeout: Duration::from_secs(2),
            max_backpressure_delay: Duration::from_secs(1),
            max_hash_list_bytes: 256 << 20,
            max_hash_memory_bytes: (256 << 20) + 2 * HASH_READ_BUFFER_BYTES as u64,
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
    /// Connections being served now (handshakes and sessions).
    pub active: usize,
    /// Of those, unauthenticated ones (in their handshake, or being refused).
    pub handshakes: usize,
    /// Of those, authenticated sessions.
    pub sessions_active: usize,
    /// Authenticated hellos refused because `max_sessions` sessions were being served.
    pub refused_over_limit: u64,
    /// Unauthenticated connections dropped to make room for newer ones.
    pub handshakes_dropped: u64,
    /// Memory the mode-2 connections reserved for hashing now.
    pub hash_memory_bytes: u64,
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
    handshakes_dropped: AtomicU64,
    /// Bytes the mode-2 connections hold for hashing now (≤ `max_hash_memory_bytes`).
    hash_memory_bytes: AtomicU64,
    sessions_started: AtomicU64,
    next_conn_id: AtomicU64,
    /// Each served connection, to end sessions at shutdown or per item.
    sockets: Mutex<HashMap<u64, Conn>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// A served connection: a clone of its socket, the item its hello names (once read), whether
/// the session was told to end, and where it stands with the limits.
struct Conn {
    stream: TcpStream,
    item: Option<[u8; 16]>,
    ended: Arc<AtomicBool>,
    /// Set when the connection was dropped to make room (limits on unauthenticated ones).
    dropped: Arc<AtomicBool>,
    peer_ip: Option<IpAddr>,
    phase: Phase,
}

/// Where a connection stands with the port's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading the hello: unauthenticated, counted against the handshake limits, may be dropped.
    Handshake,
    /// The hello is read and the registry is checking it: counted nowhere (it is either
    /// refused at once or accepted).
    Checking,
    /// The registry accepted the hello: counted against `max_sessions`.
    Session,
    /// Being refused (reply sent, draining): counted against the handshake limits again, may be
    /// dropped.
    Refused,
    /// Dropped to make room; its thread is ending.
    Dropped,
}

impl Phase {
    fn unauthenticated(self) -> bool {
        matches!(self, Self::Handshake | Self::Refused)
    }
}

impl Conn {
    fn end(&self) {
        self.ended.store(true, Ordering::Release);
        let _ = self.stream.shutdown(Shutdown::Read);
    }

    /// Drops an unauthenticated connection: a thread reading the hello sees the end of input
    /// and refuses it by name; one that is draining after a refusal stops at once.
    fn drop_for_room(&mut self) {
        self.dropped.store(true, Ordering::Release);
        let how = if self.phase == Phase::Handshake {
            Shutdown::Read
        } else {
            Shutdown::Both
        };
        // shutdown(2) does not block.
        let _ = self.stream.shutdown(how);
        self.phase = Phase::Dropped;
    }
}

/// A handle on a running port for the rest of the appliance: ends the streaming sessions of
/// one item (failover, failback, disable, resync) and reads the counters. Cheap to clone.
#[derive(Clone)]
pub struct PortHandle(Arc<PortShared>);

impl std::fmt::Debug for PortHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PortHandle")
    }
}

impl PortHandle {
    /// The port's counters.
    pub fn stats(&self) -> DataPortStats {
        stats_of(&self.0)
    }

    /// Ends every session streaming `item_id` after its current commit, with a
    /// `shutting-down` close record (a reconnect then learns from the registry whether the
    /// item still replicates); returns how many there were.
    pub fn end_item(&self, item_id: &[u8; 16]) -> usize {
        let sockets = self.0.sockets();
        let mine: Vec<&Conn> = sockets
            .values()
            .filter(|conn| conn.item.as_ref() == Some(item_id))
            .collect();
        mine.iter().for_each(|conn| conn.end());
        mine.len()
    }
}

impl PortShared {
    fn sockets(&self) -> MutexGuard<'_, HashMap<u64, Conn>> {
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

impl PortShared {
    /// Moves connection `id` to `phase` (not out of `Dropped`); returns its phase before.
    fn set_phase(&self, id: u64, phase: Phase) -> Option<Phase> {
        let mut sockets = self.sockets();
        let conn = sockets.get_mut(&id)?;
        let before = conn.phase;
        if before != Phase::Dropped {
            conn.phase = phase;
        }
        Some(before)
    }

    /// Records the item a connection's hello names (so that `end_item` reaches it).
    fn set_item(&self, id: u64, item: [u8; 16]) {
        if let Some(conn) = self.sockets().get_mut(&id) {
            conn.item = Some(item);
        }
    }

    /// Counts an accepted hello as a session, or says why it cannot be served.
    fn admit_session(&self, id: u64) -> Result<(), Refusal> {
        let mut sockets = self.sockets();
        let sessions = sockets
            .values()
            .filter(|conn| conn.phase == Phase::Session)
            .count();
        let conn = sockets
            .get_mut(&id)
            .ok_or_else(|| Refusal::new(Status::ShuttingDown, "the connection is being closed"))?;
        if conn.phase == Phase::Dropped {
            return Err(Refusal::new(
                Status::TooManyConnections,
                "the connection was dropped to make room for newer ones",
            ));
        }
        if sessions >= self.config.max_sessions {
            self.refused_over_limit.fetch_add(1, Ordering::AcqRel);
            return Err(Refusal::new(
                Status::TooManyConnections,
                format!(
                    "the data port serves its maximum of {} sessions; retry later",
                    self.config.max_sessions
                ),
            ));
        }
        conn.phase = Phase::Session;
        Ok(())
    }

    /// Makes room for a new unauthenticated connection from `peer_ip`: drops that address's
    /// oldest one when it holds `max_handshakes_per_ip`, else, when all of them together hold
    /// `max_handshakes`, the oldest one of the address holding the most.
    fn make_room_for_handshake(&self, peer_ip: Option<IpAddr>) {
        let mut sockets = self.sockets();
        let mut per_ip: HashMap<Option<IpAddr>, (usize, u64)> = HashMap::new();
        let mut total = 0usize;
        for (&id, conn) in sockets.iter() {
            if conn.phase.unauthenticated() {
                total += 1;
                let entry = per_ip.entry(conn.peer_ip).or_insert((0, id));
                entry.0 += 1;
                entry.1 = entry.1.min(id);
            }
        }
        let victim = match per_ip.get(&peer_ip) {
            Some(&(count, oldest)) if count >= self.config.max_handshakes_per_ip => Some(oldest),
            _ if total >= self.config.max_handshakes => per_ip
                .values()
                .max_by_key(|&&(count, oldest)| (count, std::cmp::Reverse(oldest)))
                .map(|&(_, oldest)| oldest),
            _ => None,
        };
        if let Some(conn) = victim.and_then(|id| sockets.get_mut(&id)) {
            conn.drop_for_room();
            self.handshakes_dropped.fetch_add(1, Ordering::AcqRel);
        }
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
        for (name, value) in [
            ("max_sessions", config.max_sessions),
            ("max_handshakes", config.max_handshakes),
            ("max_handshakes_per_ip", config.max_handshakes_per_ip),
        ] {
            if value == 0 {
                return Err(DataPortError::Config(format!("{name} must be at least 1")));
            }
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
            handshakes_dropped: AtomicU64::new(0),
            hash_memory_bytes: AtomicU64::new(0),
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

    /// A handle for the rest of the appliance (per-item session ends, counters).
    pub fn handle(&self) -> PortHandle {
        PortHandle(self.shared.clone())
    }

    /// Counters.
    pub fn stats(&self) -> DataPortStats {
        stats_of(&self.shared)
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
        for conn in self.shared.sockets().values() {
            conn.end();
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

fn stats_of(shared: &PortShared) -> DataPortStats {
    let (handshakes, sessions_active) = {
        let sockets = shared.sockets();
        let count =
            |wanted: fn(Phase) -> bool| sockets.values().filter(|conn| wanted(conn.phase)).count();
        (
            count(Phase::unauthenticated),
            count(|phase| phase == Phase::Session),
        )
    };
    DataPortStats {
        accepted: shared.accepted.load(Ordering::Acquire),
        active: shared.active.load(Ordering::Acquire),
        handshakes,
        sessions_active,
        refused_over_limit: shared.refused_over_limit.load(Ordering::Acquire),
        handshakes_dropped: shared.handshakes_dropped.load(Ordering::Acquire),
        hash_memory_bytes: shared.hash_memory_bytes.load(Ordering::Acquire),
        sessions: shared.sessions_started.load(Ordering::Acquire),
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
        // Unauthenticated connections never block anyone: a new one makes room by dropping the
        // oldest of its address (or of the address holding the most), so an agent's hello is
        // always read. Sessions have their own limit (`admit_session`).
        let peer_ip = stream.peer_addr().ok().map(|addr| addr.ip());
        shared.make_room_for_handshake(peer_ip);
        let id = shared.next_conn_id.fetch_add(1, Ordering::AcqRel);
        match stream.try_clone() {
            Ok(clone) => {
                shared.sockets().insert(
                    id,
                    Conn {
                        stream: clone,
                        item: None,
                        ended: Arc::new(AtomicBool::new(false)),
                        dropped: Arc::new(AtomicBool::new(false)),
                        peer_ip,
                        phase: Phase::Handshake,
                    },
                );
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
                // Bound first: in `if let` the `sockets` guard would be held across the write.
                let removed = shared.sockets().remove(&id);
                if let Some(conn) = removed {
                    refuse_without_blocking(
                        &conn.stream,
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

fn refuse(shared: &PortShared, stream: &TcpStream, id: u64, mode: u8, refusal: &Refusal) {
    // Counted as unauthenticated again (and droppable) while the reply drains.
    shared.set_phase(id, Phase::Refused);
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

fn read_hello(
    shared: &PortShared,
    stream: &TcpStream,
    dropped: &AtomicBool,
) -> Result<Hello, Refusal> {
    let timeout = shared.config.handshake_timeout;
    let deadline = Instant::now() + timeout;
    let named = |error: HelloReadError| {
        if dropped.load(Ordering::Acquire) {
            return dropped_refusal(&shared.config);
        }
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
        return Err(decode_hello_fixed(&fixed).err().unwrap_or_else(|| {
            Refusal::new(Status::BadHello, "bad hello magic (expected \"DRDP\")")
        }));
    }
    read_by(stream, &mut fixed[4..], deadline, 4).map_err(named)?;
    let head = decode_hello_fixed(&fixed)?;
    let mut token = vec![0u8; head.token_len]; // ≤ MAX_TOKEN_BYTES
    read_by(stream, &mut token, deadline, HELLO_FIXED_BYTES).map_err(named)?;
    Ok(head.with_token(token))
}

/// The refusal of a connection dropped to make room for newer ones.
fn dropped_refusal(config: &DataPortConfig) -> Refusal {
    Refusal::new(
        Status::TooManyConnections,
        format!(
            "dropped before its hello was complete: the data port holds at most {} \
             unauthenticated connections ({} per address), and this was the oldest",
            config.max_handshakes, config.max_handshakes_per_ip
        ),
    )
}

fn serve_connection(shared: &PortShared, stream: &TcpStream, id: u64) {
    let peer = stream.peer_addr().ok();
    let _ = stream.set_nodelay(true);
    if let Err(error) = stream.set_write_timeout(Some(shared.config.write_timeout)) {
        tracing::warn!(conn = id, %error, "cannot set the write timeout; dropping connection");
        return;
    }
    let dropped = shared
        .sockets()
        .get(&id)
        .map_or_else(|| Arc::new(AtomicBool::new(false)), |c| c.dropped.clone());
    let hello = match read_hello(shared, stream, &dropped) {
        Ok(hello) => hello,
        Err(refusal) => return refuse(shared, stream, id, 0, &refusal),
    };
    let mode = hello.mode as u8;
    if shared.set_phase(id, Phase::Checking) == Some(Phase::Dropped) {
        return refuse(shared, stream, id, mode, &dropped_refusal(&shared.config));
    }
    // From here `end_item` reaches the connection (a failover ends a hashing too).
    shared.set_item(id, hello.item_id);
    if shared.stopping() {
        let refusal = Refusal::new(Status::ShuttingDown, "the appliance is shutting down");
        return refuse(shared, stream, id, mode, &refusal);
    }
    tracing::debug!(conn = id, ?peer, ?hello, "data port hello");
    match hello.mode {
        Mode::Stream => serve_stream(shared, stream, id, &hello),
        Mode::ChunkHashes => serve_hashes(shared, stream, id, &hello),
    }
}

/// Records the first 40 bytes read (through the stream header's `first_seq`), so that a
/// decode error can be reported with the sequence number of the bad frame.
///
/// Once the port is shutting down (or the session was ended) it reports the end of input, so
/// that the session ends at the next frame boundary even if the agent keeps sending.
struct Tap<'a> {
    inner: &'a TcpStream,
    stopping: &'a AtomicBool,
    ended: &'a AtomicBool,
    head: [u8; 40],
    seen: usize,
}

impl Tap<'_> {
    fn first_seq(&self) -> Option<u64> {
        let mut raw = [0u8; 8];
        raw.copy_from_slice(&self.head[32..40]);
        (self.seen >= 40).then_some(u64::from_le_bytes(raw))
    }
}

impl Read for Tap<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.stopping.load(Ordering::Acquire) || self.ended.load(Ordering::Acquire) {
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
    let session = match shared
        .registry
        .open_stream(&hello.item_id, &hello.token, hello.resync)
    {
        Ok(session) => session,
        Err(refusal) => return refuse(shared, stream, id, Mode::Stream as u8, &refusal),
    };
    if let Err(refusal) = shared.admit_session(id) {
        drop(session);
        return refuse(shared, stream, id, Mode::Stream as u8, &refusal);
    }
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
            return refuse(shared, stream, id, Mode::Stream as u8, &refusal);
        }
    };
    if let Some(reason) = guard.resync_required() {
        if !hello.resync {
            let refusal = Refusal::new(Status::ResyncRequired, reason);
            return refuse(shared, stream, id, Mode::Stream as u8, &refusal);
        }
        // The agent fetched the hashes and now sends what differs. Every staged frame is
        // applied (the registry made sure), so the log starts afresh at its next seq.
        let next_seq = guard.next_seq();
        if let Err(error) = guard.resync_done(next_seq) {
            let refusal = Refusal::new(
                Status::StagingFailed,
                format!("starting the resync session: {error}"),
            );
            return refuse(shared, stream, id, Mode::Stream as u8, &refusal);
        }
        tracing::info!(conn = id, item = %hex(&hello.item_id), next_seq, "resync session");
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
        return refuse(shared, stream, id, Mode::Stream as u8, &refusal);
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
    let ended = shared.sockets().get(&id).map_or_else(
        || Arc::new(AtomicBool::new(false)),
        |conn| conn.ended.clone(),
    );
    let mut tap = Tap {
        inner: stream,
        stopping: &shared.shutting_down,
        ended: &ended,
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
    let (reason, message) = close_reason(
        shared,
        &result,
        tap.first_seq(),
        ended.load(Ordering::Acquire),
    );
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

/// Where a frame error is, by sequence number when the stream header was read.
fn frame_place(error: &engine::delta::DecodeError, first_seq: Option<u64>) -> String {
    match (error.frame_index, first_seq) {
        (Some(index), Some(first)) => format!(
            "frame seq {} (frame {index} of this connection, byte offset {})",
            first.wrapping_add(index),
            error.offset_bytes
        ),
        (Some(index), None) => format!("frame {index}, byte offset {}", error.offset_bytes),
        (None, _) => "stream header".to_owned(),
    }
}

/// Names why a session ended.
fn close_reason(
    shared: &PortShared,
    result: &Result<engine::ingest::IngestReport, IngestError>,
    first_seq: Option<u64>,
    ended: bool,
) -> (CloseReason, String) {
    let stopping = shared.stopping() || ended;
    let shutting_down = || {
        (
            CloseReason::ShuttingDown,
            if ended {
                "the appliance stopped this item's session (failover, failback, resync or \
                 disable); reconnecting says whether the item still replicates"
            } else {
                "the appliance is shutting down; reconnect and resume later"
            }
            .to_owned(),
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
            reason @ (DecodeErrorReason::Decompress { .. }
            | DecodeErrorReason::DecompressedSizeMismatch { .. }) => (
                CloseReason::InvalidPayload,
                format!(
                    "{}: {reason}; nothing of it was staged",
                    frame_place(error, first_seq)
                ),
            ),
            reason => (
                CloseReason::CorruptFrame,
                format!("{}: {reason}", frame_place(error, first_seq)),
            ),
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

/// Memory held for hashing by one mode-2 connection, returned to the port's budget on drop.
struct HashMemory<'a> {
    shared: &'a PortShared,
    bytes: u64,
}

impl<'a> HashMemory<'a> {
    /// Reserves `bytes` of the port's `max_hash_memory_bytes`, or returns how much is in use.
    fn reserve(shared: &'a PortShared, bytes: u64) -> Result<Self, u64> {
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

/// Size of the read buffer of one hashing (what `ResyncOptions::default` uses).
const HASH_READ_BUFFER_BYTES: usize = engine::resync::DEFAULT_READ_BUFFER_BYTES;

fn serve_hashes(shared: &PortShared, stream: &TcpStream, id: u64, hello: &Hello) {
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
            let refusal = read_failed(format!("disk {}: {e}", hello.disk_index));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_exactly() {
        assert!(tokens_equal(b"abc", b"abc"));
        assert!(!tokens_equal(b"abc", b"abd"));
        assert!(!tokens_equal(b"abc", b"ab"));
        assert!(!tokens_equal(b"abc", b"abcd"));
        assert!(!tokens_equal(b"", b"\xff"));
    }
}
