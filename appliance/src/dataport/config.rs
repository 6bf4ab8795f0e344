//! Limits and timeouts of the data port ([`DataPortConfig`]), why it could not start
//! ([`DataPortError`]) and its counters ([`DataPortStats`]).

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use engine::ingest::IngestConfig;

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

/// Size of the read buffer of one hashing (what `ResyncOptions::default` uses).
pub(super) const HASH_READ_BUFFER_BYTES: usize = engine::resync::DEFAULT_READ_BUFFER_BYTES;
