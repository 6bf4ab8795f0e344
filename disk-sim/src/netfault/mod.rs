//! A fault-injecting TCP proxy between a source agent and an appliance's data port.
//!
//! ```text
//!  agent ──► Proxy::local_addr() ──[up: frame-aware, faults]──► upstream (the data port)
//!        ◄──────────────────────────[down: delays, drops]◄────
//! ```
//!
//! Every accepted connection gets its own thread (plus one helper for the appliance → agent
//! direction) and its own upstream connection. Faults can be changed while traffic flows:
//!
//! - **standing** faults, a [`FaultPlan`] set with [`Proxy::set`]: a delay per forwarded
//!   chunk in either direction (fixed, or jittered), dropping every connection after a number
//!   of agent → appliance bytes, and per-frame chances (parts per million) of dropping the
//!   connection inside the frame, flipping a byte, duplicating the frame or swapping it with
//!   the next one. The random choices come from a [`Rng`] seeded with the plan's seed and the
//!   connection's number, so a plan replays;
//! - **one-shot** faults, armed with [`Proxy::arm`] ([`NetFault`]): each applies once, to
//!   the next frame (or bytes, or chunks) that passes, whichever connection carries it;
//! - [`Proxy::drop_connections`] drops every live connection at once.
//!
//! **Frame-aware** (agent → appliance only): the proxy parses the data-port hello
//! (32 + T bytes, `docs/design/data-port.md`), then, for a mode-1 session, the stream header
//! (48 + N + 16·D + 8 bytes) and each frame (48-byte header, payload length at offset 32;
//! `docs/design/delta-stream.md`), and forwards whole frames, so it can flip a byte inside a
//! frame, send a frame twice or swap two adjacent ones. Anything it does not recognise (a
//! mode-2 session, a stranger, a length over the limits) switches that connection to plain
//! forwarding of the bytes as they come; it never panics on odd bytes. The appliance → agent
//! direction (reply, acks, close records) is forwarded as it comes, only delayed or dropped:
//! the agent treats a malformed record as a protocol violation, which is not a network fault
//! this proxy models.
//!
//! What the appliance makes of each fault (data-port.md): a flipped byte fails the frame's
//! checksum (`corrupt-frame` close naming the frame's seq; the agent resends from the reply's
//! `next_seq`); a duplicated frame is a "sequence reorder or duplicate", two swapped frames a
//! "sequence gap", both refused as `corrupt-frame` too; a drop ends the session (inside a
//! frame: the valid prefix is kept) and the agent resumes; delays only slow things down. A
//! flip never touches the frame's payload-length field (bytes 32..36): a changed length would
//! make the appliance wait for bytes that never come, until its idle timeout, instead of
//! refusing the frame at once; nor its magic, so that the appliance's answer is always a
//! checksum mismatch.
//!
//! Memory is bounded per connection: one frame being assembled (≤ 48 bytes + 4 MiB), one
//! frame held back for a swap, and a 64 KiB read buffer per direction. A frame held for a
//! swap is released unswapped after [`HOLD_TIMEOUT`] if no next frame comes (the agent may be
//! waiting for acks), and the swap stays armed.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use engine::delta::{frame_wire_len, stream_header_wire_len};
use engine::port::{HELLO_FIXED_BYTES, HELLO_MAGIC, MAX_TOKEN_BYTES};

use crate::rng::Rng;

mod plan;
mod proxy;
mod up;

pub use plan::{Delay, FaultKind, FaultPlan, NetFault, ProxyStats};
pub use proxy::Proxy;

/// How long a frame held back for a swap waits for the next frame.
pub const HOLD_TIMEOUT: Duration = Duration::from_millis(100);
/// How often blocked reads wake up to check for a drop or shutdown.
const POLL: Duration = Duration::from_millis(25);
/// Read buffer per direction.
const READ_BUFFER_BYTES: usize = 64 << 10;
/// Upstream connect timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Timeout of one socket write.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Offset of a frame header's payload length (u32).
const PAYLOAD_LEN_AT: usize = 32;

#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) connections: AtomicU64,
    pub(super) upstream_failures: AtomicU64,
    pub(super) unframed: AtomicU64,
    pub(super) bytes_up: AtomicU64,
    pub(super) bytes_down: AtomicU64,
    pub(super) frames: AtomicU64,
    pub(super) drops: AtomicU64,
    pub(super) delays: AtomicU64,
    pub(super) delay_ms: AtomicU64,
    pub(super) flips: AtomicU64,
    pub(super) duplicates: AtomicU64,
    pub(super) reorders: AtomicU64,
    pub(super) reorders_released: AtomicU64,
}

pub(super) fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// One-shot faults waiting for traffic.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Armed {
    pub(super) drop_after: Option<u64>,
    pub(super) flips: u32,
    pub(super) duplicates: u32,
    pub(super) reorders: u32,
    pub(super) delay_up: Option<(Delay, u32)>,
    pub(super) delay_down: Option<(Delay, u32)>,
}

/// A live connection's sockets, to drop it from outside.
#[derive(Debug)]
pub(super) struct Live {
    pub(super) id: u64,
    pub(super) agent: TcpStream,
    pub(super) upstream: Option<TcpStream>,
    pub(super) dead: Arc<AtomicBool>,
}

#[derive(Debug)]
pub(super) struct Shared {
    pub(super) upstream: Mutex<SocketAddr>,
    pub(super) plan: Mutex<FaultPlan>,
    pub(super) armed: Mutex<Armed>,
    pub(super) live: Mutex<Vec<Live>>,
    pub(super) counters: Counters,
    pub(super) stopping: AtomicBool,
}

pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub(super) fn plan(&self) -> FaultPlan {
        *lock(&self.plan)
    }

    pub(super) fn register(&self, live: Live) {
        lock(&self.live).push(live);
    }

    pub(super) fn set_upstream_socket(&self, id: u64, socket: &TcpStream) {
        if let Some(live) = lock(&self.live).iter_mut().find(|l| l.id == id) {
            live.upstream = socket.try_clone().ok();
        }
    }

    pub(super) fn unregister(&self, id: u64) {
        lock(&self.live).retain(|l| l.id != id);
    }
}

/// Both sockets of a connection.
#[derive(Debug)]
pub(super) struct Conn {
    pub(super) agent: TcpStream,
    pub(super) upstream: TcpStream,
    pub(super) dead: Arc<AtomicBool>,
}

impl Conn {
    pub(super) fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// Ends the connection on both sides.
    pub(super) fn abort(&self) {
        self.dead.store(true, Ordering::Release);
        let _ = self.agent.shutdown(Shutdown::Both);
        let _ = self.upstream.shutdown(Shutdown::Both);
    }
}

pub(super) fn sleep_counted(shared: &Shared, delay: Duration) {
    bump(&shared.counters.delays, 1);
    bump(&shared.counters.delay_ms, delay.as_millis() as u64);
    std::thread::sleep(delay);
}

#[cfg(test)]
mod tests;
