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
//! - an ack carries a sequence number only after [`engine::staging::StagingLog::commit`]
//!   returned it durable;
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
//!
//! Rooms, in `dataport/` (siblings; none imports its parent, none closes a circle):
//!
//! | file | its one job |
//! |---|---|
//! | `config.rs` | limits and timeouts, start errors, counters |
//! | `registry.rs` | finding items, checking tokens (`ItemRegistry`), the lease, tests' registry |
//! | `conn.rs` | the served connections: phases, handshake and session limits, per-item ends |
//! | `listener.rs` | `DataPort`: bind, the accept thread, shutdown |
//! | `close.rs` | refusals and closes that are not lost to a TCP reset |
//! | `handshake.rs` | the hello within its deadline, then the dispatch by mode |
//! | `session.rs` | mode 1: a streaming session (ingest, acks, the close record) |
//! | `hashes.rs` | mode 2: one replica's chunk hashes, within the port's memory budget |

mod close;
mod config;
mod conn;
mod handshake;
mod hashes;
mod listener;
mod registry;
mod session;

// The codec's types are this module's API too (the registry's refusals, the tests' raw
// clients); the wire constants are re-exported for the tests, which the binary does not use.
#[allow(unused_imports)]
pub use engine::port::RECORD_CLOSE;
pub use engine::port::{CloseReason, Hello, Mode, Refusal, Status};

pub use config::{DataPortConfig, DataPortError, DataPortStats};
pub use conn::PortHandle;
pub use listener::DataPort;
pub use registry::{ItemRegistry, MemoryRegistry, ReplicaAccess, SessionLease, StreamSession};
