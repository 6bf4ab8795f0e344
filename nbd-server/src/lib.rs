//! A standalone NBD server: the traits an export implements and one connection's entry point.
//!
//! Written to NetworkBlockDevice/nbd `doc/proto.md`: fixed newstyle handshake, `NBD_OPT_GO`,
//! structured replies, `base:allocation` block status. See `docs/design/nbd.md` for what is
//! supported, the limits and every refusal. [`serve_connection`] runs one session over any
//! byte stream; [`Server`] listens on TCP and applies connection and handshake limits.

// NBD is big-endian on the wire (network byte order, doc/proto.md "Conventions").
#![allow(clippy::big_endian_bytes)]

mod handshake;
pub mod memory;
mod proto;
mod server;
mod transmission;

#[cfg(test)]
mod tests;

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub use server::{Disconnector, Server, ServerConfig, Stats};

/// The block sizes advertised in `NBD_INFO_BLOCK_SIZE`. `minimum_bytes` is enforced: requests
/// whose offset or length is not a multiple of it are refused with `NBD_EINVAL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    pub minimum_bytes: u32,
    pub preferred_bytes: u32,
    pub maximum_bytes: u32,
}

impl Default for BlockSizes {
    fn default() -> Self {
        Self {
            minimum_bytes: 1,
            preferred_bytes: 4096,
            maximum_bytes: 32 << 20,
        }
    }
}

/// One extent of `base:allocation`: `hole` → `NBD_STATE_HOLE`, `zero` → `NBD_STATE_ZERO`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length_bytes: u64,
    pub hole: bool,
    pub zero: bool,
}

/// A block device served over NBD. Called from one thread per connection, concurrently.
/// The server checks bounds, alignment, sizes and read-only before calling.
pub trait Export: Send + Sync {
    fn size_bytes(&self) -> u64;
    fn read_only(&self) -> bool;
    /// Advertised in `NBD_INFO_BLOCK_SIZE` (the maximum is further capped by the server's
    /// `max_request_bytes`).
    fn block_sizes(&self) -> BlockSizes;
    /// `NBD_FLAG_CAN_MULTI_CONN`: flush on one connection covers writes of every connection.
    fn multi_conn(&self) -> bool {
        false
    }
    /// Sent as `NBD_INFO_DESCRIPTION` when a client asks for it.
    fn description(&self) -> Option<String> {
        None
    }
    fn read_at(&self, offset_bytes: u64, out: &mut [u8]) -> io::Result<()>;
    fn write_at(&self, offset_bytes: u64, data: &[u8], fua: bool) -> io::Result<()>;
    fn flush(&self) -> io::Result<()>;
    fn trim(&self, offset_bytes: u64, length_bytes: u64, fua: bool) -> io::Result<()>;
    fn write_zeroes(&self, offset_bytes: u64, length_bytes: u64, fua: bool) -> io::Result<()>;
    /// Extents covering [offset, offset+length) in order (may stop early, never empty).
    fn block_status(
        &self,
        offset_bytes: u64,
        length_bytes: u64,
        out: &mut Vec<Extent>,
    ) -> io::Result<()>;
    /// The export was removed: requests get NBD_ESHUTDOWN and the connection ends.
    fn is_closed(&self) -> bool {
        false
    }
}

/// The exports a server offers, by name.
pub trait Catalog: Send + Sync {
    fn lookup(&self, name: &str) -> Option<Arc<dyn Export>>;
    /// Names OPT_LIST may disclose; None: OPT_LIST is refused with NBD_REP_ERR_POLICY
    /// (the appliance's names are secrets).
    fn list(&self) -> Option<Vec<String>> {
        None
    }
}

/// What one connection may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Options accepted in one handshake; one more ends the connection.
    pub max_options: u32,
    /// Largest option data read; longer options are discarded and refused `NBD_REP_ERR_TOO_BIG`.
    pub max_option_bytes: u32,
    /// Largest READ/WRITE payload; also the advertised maximum block size (capped by the
    /// export's). The connection's one buffer never grows past this plus a header.
    pub max_request_bytes: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_options: 64,
            max_option_bytes: 64 << 10,
            max_request_bytes: 32 << 20,
        }
    }
}

/// How a session ended without a protocol or I/O error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    /// `NBD_OPT_ABORT` during the handshake.
    Aborted,
    /// `NBD_CMD_DISC`.
    Disconnected,
    /// The client closed the stream between messages.
    HungUp,
    /// The export was closed (`Export::is_closed`): the last request got `NBD_ESHUTDOWN`.
    ExportClosed,
    /// The server refused to start the session (connection limit); the client was told.
    Refused,
}

/// Why a session ended abnormally. Every variant names what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("connection I/O failed: {0}")]
    Io(#[from] io::Error),
    #[error("client broke the NBD protocol: {0}")]
    Protocol(String),
}

/// Counters one connection adds to (shared by every connection of a [`Server`]).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) requests: AtomicU64,
    pub(crate) read_bytes: AtomicU64,
    pub(crate) written_bytes: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// Runs one NBD session (handshake, then transmission) over `stream` until the client
/// disconnects, the export closes, or the client breaks the protocol.
pub fn serve_connection<S: Read + Write>(
    mut stream: S,
    catalog: &dyn Catalog,
    limits: &Limits,
) -> Result<SessionEnd, SessionError> {
    let counters = Counters::default();
    match handshake::negotiate(&mut stream, catalog, limits, &mut || true)? {
        handshake::Outcome::Ended(end) => Ok(end),
        handshake::Outcome::Transmit(negotiated) => {
            transmission::transmit(&mut stream, &negotiated, &counters)
        }
    }
}

/// Default handshake time limit used by [`ServerConfig::default`].
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
