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

use engine::delta::{
    DISK_ENTRY_BYTES, FRAME_HEADER_BYTES, FRAME_MAGIC, MAX_DISKS, MAX_ITEM_NAME_BYTES,
    MAX_PAYLOAD_BYTES, STREAM_HEADER_FIXED_BYTES, STREAM_MAGIC,
};
use engine::port::{HELLO_FIXED_BYTES, HELLO_MAGIC, MAX_TOKEN_BYTES};

use crate::rng::Rng;

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

/// A delay per forwarded chunk: `fixed` plus a seeded uniform `0..=jitter`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Delay {
    /// Always waited.
    pub fixed: Duration,
    /// Up to this much more, chosen per chunk.
    pub jitter: Duration,
}

impl Delay {
    /// A fixed delay.
    pub fn fixed(fixed: Duration) -> Self {
        Self {
            fixed,
            jitter: Duration::ZERO,
        }
    }

    /// `fixed` plus up to `jitter`.
    pub fn jittered(fixed: Duration, jitter: Duration) -> Self {
        Self { fixed, jitter }
    }

    fn pick(&self, rng: &mut Rng) -> Duration {
        let jitter = self.jitter.as_micros() as u64;
        let extra = if jitter == 0 {
            0
        } else {
            rng.below(jitter + 1)
        };
        self.fixed + Duration::from_micros(extra)
    }
}

/// Standing faults, applied to every connection until replaced ([`Proxy::set`]). The
/// default is a clean proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FaultPlan {
    /// Seeds the per-connection random choices (with the connection's number).
    pub seed: u64,
    /// Delay of each agent → appliance chunk (a frame, or a read in plain forwarding).
    pub delay_up: Option<Delay>,
    /// Delay of each appliance → agent chunk (replies, acks, closes).
    pub delay_down: Option<Delay>,
    /// Drop each connection after this many agent → appliance bytes (taken when the
    /// connection starts).
    pub drop_after_bytes: Option<u64>,
    /// Chance per frame, in parts per million, of dropping the connection inside the frame.
    pub drop_ppm: u32,
    /// Chance per frame (ppm) of flipping one of its bytes.
    pub flip_ppm: u32,
    /// Chance per frame (ppm) of sending it twice.
    pub duplicate_ppm: u32,
    /// Chance per frame (ppm) of swapping it with the next frame.
    pub reorder_ppm: u32,
}

/// A one-shot fault ([`Proxy::arm`]): applies once, to the next traffic that passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetFault {
    /// Drop the connection carrying the next agent → appliance bytes after `bytes` more of
    /// them (inside a frame, or between two).
    DropAfterBytes(u64),
    /// Flip (xor with a random non-zero value) one byte of the next frame, at a seeded
    /// offset outside its magic and its payload-length field (so the appliance always
    /// reports a checksum mismatch).
    Flip,
    /// Send the next frame twice.
    Duplicate,
    /// Swap the next two frames.
    Reorder,
    /// Delay each of the next `chunks` agent → appliance chunks.
    DelayUp {
        /// The delay per chunk.
        delay: Delay,
        /// How many chunks.
        chunks: u32,
    },
    /// Delay each of the next `chunks` appliance → agent chunks (acks).
    DelayDown {
        /// The delay per chunk.
        delay: Delay,
        /// How many chunks.
        chunks: u32,
    },
}

/// The kinds of fault, for counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FaultKind {
    /// A connection dropped.
    Drop,
    /// A chunk delayed.
    Delay,
    /// A byte flipped.
    Flip,
    /// A frame sent twice.
    Duplicate,
    /// Two frames swapped.
    Reorder,
}

impl FaultKind {
    /// Every kind.
    pub const ALL: [FaultKind; 5] = [
        Self::Drop,
        Self::Delay,
        Self::Flip,
        Self::Duplicate,
        Self::Reorder,
    ];

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Drop => "drop",
            Self::Delay => "delay",
            Self::Flip => "flip",
            Self::Duplicate => "duplicate",
            Self::Reorder => "reorder",
        }
    }
}

impl NetFault {
    /// Its kind.
    pub fn kind(&self) -> FaultKind {
        match self {
            Self::DropAfterBytes(_) => FaultKind::Drop,
            Self::Flip => FaultKind::Flip,
            Self::Duplicate => FaultKind::Duplicate,
            Self::Reorder => FaultKind::Reorder,
            Self::DelayUp { .. } | Self::DelayDown { .. } => FaultKind::Delay,
        }
    }
}

/// What the proxy did (a snapshot of its counters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Connections accepted.
    pub connections: u64,
    /// Accepted connections whose upstream connect failed (closed at once).
    pub upstream_failures: u64,
    /// Connections that fell back to plain forwarding (not a mode-1 stream, or odd bytes).
    pub unframed: u64,
    /// Bytes forwarded agent → appliance (duplicates included).
    pub bytes_up: u64,
    /// Bytes forwarded appliance → agent.
    pub bytes_down: u64,
    /// Whole frames seen agent → appliance.
    pub frames: u64,
    /// Connections dropped (one-shot, standing, or [`Proxy::drop_connections`]).
    pub drops: u64,
    /// Chunks delayed (either direction).
    pub delays: u64,
    /// Total delay, in milliseconds.
    pub delay_ms: u64,
    /// Bytes flipped.
    pub flips: u64,
    /// Frames sent twice.
    pub duplicates: u64,
    /// Pairs of frames swapped.
    pub reorders: u64,
    /// Frames held for a swap and released unswapped (no next frame in time).
    pub reorders_released: u64,
}

impl ProxyStats {
    /// How many faults of `kind` were injected.
    pub fn count(&self, kind: FaultKind) -> u64 {
        match kind {
            FaultKind::Drop => self.drops,
            FaultKind::Delay => self.delays,
            FaultKind::Flip => self.flips,
            FaultKind::Duplicate => self.duplicates,
            FaultKind::Reorder => self.reorders,
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    connections: AtomicU64,
    upstream_failures: AtomicU64,
    unframed: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    frames: AtomicU64,
    drops: AtomicU64,
    delays: AtomicU64,
    delay_ms: AtomicU64,
    flips: AtomicU64,
    duplicates: AtomicU64,
    reorders: AtomicU64,
    reorders_released: AtomicU64,
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// One-shot faults waiting for traffic.
#[derive(Debug, Default, Clone, Copy)]
struct Armed {
    drop_after: Option<u64>,
    flips: u32,
    duplicates: u32,
    reorders: u32,
    delay_up: Option<(Delay, u32)>,
    delay_down: Option<(Delay, u32)>,
}

/// A live connection's sockets, to drop it from outside.
#[derive(Debug)]
struct Live {
    id: u64,
    agent: TcpStream,
    upstream: Option<TcpStream>,
    dead: Arc<AtomicBool>,
}

#[derive(Debug)]
struct Shared {
    upstream: Mutex<SocketAddr>,
    plan: Mutex<FaultPlan>,
    armed: Mutex<Armed>,
    live: Mutex<Vec<Live>>,
    counters: Counters,
    stopping: AtomicBool,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn plan(&self) -> FaultPlan {
        *lock(&self.plan)
    }

    fn register(&self, live: Live) {
        lock(&self.live).push(live);
    }

    fn set_upstream_socket(&self, id: u64, socket: &TcpStream) {
        if let Some(live) = lock(&self.live).iter_mut().find(|l| l.id == id) {
            live.upstream = socket.try_clone().ok();
        }
    }

    fn unregister(&self, id: u64) {
        lock(&self.live).retain(|l| l.id != id);
    }
}

/// A running fault-injecting proxy. Dropping it stops accepting and drops every connection.
#[derive(Debug)]
pub struct Proxy {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    accept: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Listens on a loopback port of its own and forwards each connection to `upstream`,
    /// with the standing faults of `plan`.
    pub fn start(upstream: SocketAddr, plan: FaultPlan) -> io::Result<Self> {
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let local_addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream: Mutex::new(upstream),
            plan: Mutex::new(plan),
            armed: Mutex::new(Armed::default()),
            live: Mutex::new(Vec::new()),
            counters: Counters::default(),
            stopping: AtomicBool::new(false),
        });
        let accept = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("netfault-accept".into())
                .spawn(move || accept_loop(&shared, &listener))?
        };
        Ok(Self {
            shared,
            local_addr,
            accept: Some(accept),
        })
    }

    /// The address agents connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Where new connections are forwarded to.
    pub fn upstream(&self) -> SocketAddr {
        *lock(&self.shared.upstream)
    }

    /// Forwards new connections to `upstream` from now on (live ones keep theirs).
    pub fn set_upstream(&self, upstream: SocketAddr) {
        *lock(&self.shared.upstream) = upstream;
    }

    /// Replaces the standing faults (live connections see the new chances and delays at
    /// their next frame or chunk; `drop_after_bytes` and the seed apply to new connections).
    pub fn set(&self, plan: FaultPlan) {
        *lock(&self.shared.plan) = plan;
    }

    /// The standing faults.
    pub fn plan(&self) -> FaultPlan {
        self.shared.plan()
    }

    /// Arms a one-shot fault. Several of a kind add up (two `Flip`s flip two frames); a new
    /// `DropAfterBytes` or delay replaces an armed one of the same kind.
    pub fn arm(&self, fault: NetFault) {
        let mut armed = lock(&self.shared.armed);
        match fault {
            NetFault::DropAfterBytes(bytes) => armed.drop_after = Some(bytes),
            NetFault::Flip => armed.flips += 1,
            NetFault::Duplicate => armed.duplicates += 1,
            NetFault::Reorder => armed.reorders += 1,
            NetFault::DelayUp { delay, chunks } => armed.delay_up = Some((delay, chunks)),
            NetFault::DelayDown { delay, chunks } => armed.delay_down = Some((delay, chunks)),
        }
    }

    /// Forgets every armed one-shot fault that has not fired yet.
    pub fn disarm(&self) {
        *lock(&self.shared.armed) = Armed::default();
    }

    /// How many one-shot faults are armed and have not fired yet.
    pub fn armed(&self) -> u32 {
        let armed = *lock(&self.shared.armed);
        u32::from(armed.drop_after.is_some())
            + armed.flips
            + armed.duplicates
            + armed.reorders
            + u32::from(armed.delay_up.is_some())
            + u32::from(armed.delay_down.is_some())
    }

    /// Drops every live connection now (both sides see the connection end). Returns how many.
    pub fn drop_connections(&self) -> usize {
        let live = lock(&self.shared.live);
        let mut dropped = 0;
        for connection in live.iter() {
            if !connection.dead.swap(true, Ordering::AcqRel) {
                dropped += 1;
                bump(&self.shared.counters.drops, 1);
            }
            let _ = connection.agent.shutdown(Shutdown::Both);
            if let Some(upstream) = &connection.upstream {
                let _ = upstream.shutdown(Shutdown::Both);
            }
        }
        dropped
    }

    /// Connections open now.
    pub fn live_connections(&self) -> usize {
        lock(&self.shared.live).len()
    }

    /// What it did so far.
    pub fn stats(&self) -> ProxyStats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ProxyStats {
            connections: get(&c.connections),
            upstream_failures: get(&c.upstream_failures),
            unframed: get(&c.unframed),
            bytes_up: get(&c.bytes_up),
            bytes_down: get(&c.bytes_down),
            frames: get(&c.frames),
            drops: get(&c.drops),
            delays: get(&c.delays),
            delay_ms: get(&c.delay_ms),
            flips: get(&c.flips),
            duplicates: get(&c.duplicates),
            reorders: get(&c.reorders),
            reorders_released: get(&c.reorders_released),
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::Release);
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(&self.local_addr, Duration::from_secs(1));
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        for connection in lock(&self.shared.live).iter() {
            connection.dead.store(true, Ordering::Release);
            let _ = connection.agent.shutdown(Shutdown::Both);
            if let Some(upstream) = &connection.upstream {
                let _ = upstream.shutdown(Shutdown::Both);
            }
        }
    }
}

fn accept_loop(shared: &Arc<Shared>, listener: &TcpListener) {
    let mut next_id = 0u64;
    loop {
        let accepted = listener.accept();
        if shared.stopping.load(Ordering::Acquire) {
            return;
        }
        let Ok((agent, _)) = accepted else {
            std::thread::sleep(POLL);
            continue;
        };
        next_id += 1;
        let id = next_id;
        bump(&shared.counters.connections, 1);
        let dead = Arc::new(AtomicBool::new(false));
        let Ok(agent_clone) = agent.try_clone() else {
            continue;
        };
        shared.register(Live {
            id,
            agent: agent_clone,
            upstream: None,
            dead: dead.clone(),
        });
        let thread_shared = shared.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("netfault-{id}"))
            .spawn(move || {
                serve(&thread_shared, id, agent, &dead);
                thread_shared.unregister(id);
            });
        if spawned.is_err() {
            shared.unregister(id);
        }
    }
}

/// One connection: connect upstream, run both directions, tear down.
fn serve(shared: &Arc<Shared>, id: u64, agent: TcpStream, dead: &Arc<AtomicBool>) {
    let upstream_addr = *lock(&shared.upstream);
    let upstream = match TcpStream::connect_timeout(&upstream_addr, CONNECT_TIMEOUT) {
        Ok(upstream) => upstream,
        Err(_) => {
            bump(&shared.counters.upstream_failures, 1);
            let _ = agent.shutdown(Shutdown::Both);
            return;
        }
    };
    shared.set_upstream_socket(id, &upstream);
    if dead.load(Ordering::Acquire) || shared.stopping.load(Ordering::Acquire) {
        let _ = agent.shutdown(Shutdown::Both);
        let _ = upstream.shutdown(Shutdown::Both);
        return;
    }
    let setup = (|| -> io::Result<(TcpStream, TcpStream)> {
        for socket in [&agent, &upstream] {
            socket.set_nodelay(true)?;
            socket.set_read_timeout(Some(POLL))?;
            socket.set_write_timeout(Some(WRITE_TIMEOUT))?;
        }
        Ok((agent.try_clone()?, upstream.try_clone()?))
    })();
    let Ok((agent_down, upstream_down)) = setup else {
        let _ = agent.shutdown(Shutdown::Both);
        let _ = upstream.shutdown(Shutdown::Both);
        return;
    };
    let plan = shared.plan();
    let conn = Arc::new(Conn {
        agent,
        upstream,
        dead: dead.clone(),
    });
    let down = {
        let shared = shared.clone();
        let conn = conn.clone();
        let seed = plan.seed ^ id.wrapping_mul(0xd1b5_4a32_d192_ed03) ^ 0x646f_776e;
        std::thread::Builder::new()
            .name(format!("netfault-{id}-down"))
            .spawn(move || down_loop(&shared, &conn, &agent_down, &upstream_down, seed))
    };
    if down.is_err() {
        conn.abort();
        return;
    }
    let mut up = Up {
        shared,
        conn: &conn,
        rng: Rng::new(plan.seed ^ id.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        pending: Vec::new(),
        phase: Phase::Hello,
        held: None,
        standing_drop: plan.drop_after_bytes,
    };
    up.run();
    if let Ok(down) = down {
        let _ = down.join();
    }
    conn.abort();
}

/// Both sockets of a connection.
#[derive(Debug)]
struct Conn {
    agent: TcpStream,
    upstream: TcpStream,
    dead: Arc<AtomicBool>,
}

impl Conn {
    fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// Ends the connection on both sides.
    fn abort(&self) {
        self.dead.store(true, Ordering::Release);
        let _ = self.agent.shutdown(Shutdown::Both);
        let _ = self.upstream.shutdown(Shutdown::Both);
    }
}

/// The appliance → agent direction: forwarded as it comes, delayed if asked.
fn down_loop(shared: &Shared, conn: &Conn, agent: &TcpStream, upstream: &TcpStream, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut buf = vec![0u8; READ_BUFFER_BYTES];
    loop {
        if conn.is_dead() || shared.stopping.load(Ordering::Acquire) {
            return;
        }
        let n = match (&*upstream).read(&mut buf) {
            Ok(0) => {
                // The appliance closed its sending half: pass that on.
                let _ = agent.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                continue;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return conn.abort(),
        };
        let delay = {
            let mut armed = lock(&shared.armed);
            match armed.delay_down.as_mut() {
                Some((delay, chunks)) if *chunks > 0 => {
                    let delay = *delay;
                    *chunks -= 1;
                    if *chunks == 0 {
                        armed.delay_down = None;
                    }
                    Some(delay)
                }
                _ => shared.plan().delay_down,
            }
        };
        if let Some(delay) = delay {
            sleep_counted(shared, delay.pick(&mut rng));
        }
        if conn.is_dead() {
            return;
        }
        if (&*agent).write_all(&buf[..n]).is_err() {
            return conn.abort();
        }
        bump(&shared.counters.bytes_down, n as u64);
    }
}

fn sleep_counted(shared: &Shared, delay: Duration) {
    bump(&shared.counters.delays, 1);
    bump(&shared.counters.delay_ms, delay.as_millis() as u64);
    std::thread::sleep(delay);
}

/// Where the agent → appliance parser is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Hello,
    StreamHeader,
    Frames,
    /// Not (or no longer) understood: bytes forwarded as they come.
    Plain,
}

/// The connection was dropped (by a fault or a failure): stop.
struct Gone;

/// The agent → appliance direction.
struct Up<'a> {
    shared: &'a Shared,
    conn: &'a Conn,
    rng: Rng,
    /// Bytes received and not yet forwarded (at most one unit being assembled).
    pending: Vec<u8>,
    phase: Phase,
    /// A frame held back for a swap, and until when it waits.
    held: Option<(Vec<u8>, Instant)>,
    /// Agent → appliance bytes left before the standing drop.
    standing_drop: Option<u64>,
}

fn le_u16(bytes: &[u8], at: usize) -> usize {
    usize::from(u16::from_le_bytes([bytes[at], bytes[at + 1]]))
}

impl Up<'_> {
    fn run(&mut self) {
        let mut buf = vec![0u8; READ_BUFFER_BYTES];
        loop {
            if self.drain_units().is_err() {
                return;
            }
            if let Some((_, until)) = &self.held
                && Instant::now() >= *until
                && self.release_held().is_err()
            {
                return;
            }
            if self.conn.is_dead() || self.shared.stopping.load(Ordering::Acquire) {
                return self.conn.abort();
            }
            match (&self.conn.agent).read(&mut buf) {
                Ok(0) => {
                    // The agent closed its sending half (or the connection): forward what is
                    // left, then pass the end on.
                    let rest = std::mem::take(&mut self.pending);
                    if self.release_held().is_ok()
                        && (rest.is_empty() || self.forward(&rest).is_ok())
                    {
                        let _ = self.conn.upstream.shutdown(Shutdown::Write);
                    }
                    return;
                }
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return self.conn.abort(),
            }
        }
    }

    /// The length of the next complete unit at the front of `pending`, if it is complete;
    /// switches to plain forwarding on anything not understood.
    fn next_unit(&mut self) -> Option<usize> {
        let p = &self.pending;
        let len = match self.phase {
            Phase::Plain => return (!p.is_empty()).then_some(p.len()),
            Phase::Hello => {
                if p.len() < HELLO_MAGIC.len() {
                    return None;
                }
                if p[..HELLO_MAGIC.len()] != HELLO_MAGIC {
                    return self.plain();
                }
                if p.len() < HELLO_FIXED_BYTES {
                    return None;
                }
                let token = le_u16(p, 24);
                if token == 0 || token > MAX_TOKEN_BYTES {
                    return self.plain();
                }
                HELLO_FIXED_BYTES + token
            }
            Phase::StreamHeader => {
                if p.len() < STREAM_MAGIC.len() {
                    return None;
                }
                if p[..STREAM_MAGIC.len()] != STREAM_MAGIC {
                    return self.plain();
                }
                if p.len() < 16 {
                    return None;
                }
                let (disks, name) = (le_u16(p, 12), le_u16(p, 14));
                if disks == 0 || disks > usize::from(MAX_DISKS) || name > MAX_ITEM_NAME_BYTES {
                    return self.plain();
                }
                STREAM_HEADER_FIXED_BYTES + name + DISK_ENTRY_BYTES * disks + 8
            }
            Phase::Frames => {
                if p.len() < FRAME_MAGIC.len() {
                    return None;
                }
                if p[..FRAME_MAGIC.len()] != FRAME_MAGIC {
                    return self.plain();
                }
                if p.len() < FRAME_HEADER_BYTES {
                    return None;
                }
                let payload = u32::from_le_bytes([
                    p[PAYLOAD_LEN_AT],
                    p[PAYLOAD_LEN_AT + 1],
                    p[PAYLOAD_LEN_AT + 2],
                    p[PAYLOAD_LEN_AT + 3],
                ]);
                if payload > MAX_PAYLOAD_BYTES {
                    return self.plain();
                }
                FRAME_HEADER_BYTES + payload as usize
            }
        };
        (p.len() >= len).then_some(len)
    }

    fn plain(&mut self) -> Option<usize> {
        self.phase = Phase::Plain;
        bump(&self.shared.counters.unframed, 1);
        (!self.pending.is_empty()).then_some(self.pending.len())
    }

    /// Forwards every complete unit in `pending`.
    fn drain_units(&mut self) -> Result<(), Gone> {
        while let Some(len) = self.next_unit() {
            let phase = self.phase;
            let unit: Vec<u8> = self.pending.drain(..len).collect();
            match phase {
                Phase::Hello => {
                    // Mode 1 (stream) is followed by a stream header; anything else is not
                    // parsed further.
                    self.phase = if unit[6] == 1 {
                        Phase::StreamHeader
                    } else {
                        bump(&self.shared.counters.unframed, 1);
                        Phase::Plain
                    };
                    self.forward(&unit)?;
                }
                Phase::StreamHeader => {
                    self.phase = Phase::Frames;
                    self.forward(&unit)?;
                }
                Phase::Frames => self.frame(unit)?,
                Phase::Plain => self.forward(&unit)?,
            }
        }
        Ok(())
    }

    /// One whole frame: the faults that apply to it, then on to the appliance.
    fn frame(&mut self, frame: Vec<u8>) -> Result<(), Gone> {
        let counters = &self.shared.counters;
        bump(&counters.frames, 1);
        if let Some((held, _)) = self.held.take() {
            // The swap: this frame first, then the one held back.
            bump(&counters.reorders, 1);
            self.forward(&frame)?;
            return self.forward(&held);
        }
        let plan = self.shared.plan();
        let armed = {
            let mut armed = lock(&self.shared.armed);
            if armed.flips > 0 {
                armed.flips -= 1;
                Some(FaultKind::Flip)
            } else if armed.duplicates > 0 {
                armed.duplicates -= 1;
                Some(FaultKind::Duplicate)
            } else if armed.reorders > 0 {
                armed.reorders -= 1;
                Some(FaultKind::Reorder)
            } else {
                None
            }
        };
        let rng = &mut self.rng;
        let mut chance = |ppm: u32| ppm > 0 && rng.chance(u64::from(ppm), 1_000_000);
        let fault = armed.or_else(|| {
            if chance(plan.drop_ppm) {
                Some(FaultKind::Drop)
            } else if chance(plan.flip_ppm) {
                Some(FaultKind::Flip)
            } else if chance(plan.duplicate_ppm) {
                Some(FaultKind::Duplicate)
            } else if chance(plan.reorder_ppm) {
                Some(FaultKind::Reorder)
            } else {
                None
            }
        });
        match fault {
            None | Some(FaultKind::Delay) => self.forward(&frame),
            Some(FaultKind::Drop) => {
                let cut = self.rng.below(frame.len() as u64) as usize;
                self.forward(&frame[..cut])?;
                bump(&counters.drops, 1);
                self.conn.abort();
                Err(Gone)
            }
            Some(FaultKind::Flip) => {
                let mut copy = frame;
                // Any byte but the magic (0..4) and the payload length (32..36).
                let choices = copy.len() - 8;
                let mut at = 4 + self.rng.below(choices as u64) as usize;
                if at >= PAYLOAD_LEN_AT {
                    at += 4;
                }
                copy[at] ^= (1 + self.rng.below(255)) as u8;
                bump(&counters.flips, 1);
                self.forward(&copy)
            }
            Some(FaultKind::Duplicate) => {
                bump(&counters.duplicates, 1);
                self.forward(&frame)?;
                self.forward(&frame)
            }
            Some(FaultKind::Reorder) => {
                self.held = Some((frame, Instant::now() + HOLD_TIMEOUT));
                Ok(())
            }
        }
    }

    /// Sends a frame held for a swap that found no partner; the swap stays armed.
    fn release_held(&mut self) -> Result<(), Gone> {
        let Some((held, _)) = self.held.take() else {
            return Ok(());
        };
        bump(&self.shared.counters.reorders_released, 1);
        lock(&self.shared.armed).reorders += 1;
        self.forward(&held)
    }

    /// One chunk to the appliance: delay, drop countdowns, write.
    fn forward(&mut self, bytes: &[u8]) -> Result<(), Gone> {
        if self.conn.is_dead() {
            return Err(Gone);
        }
        let (delay, allowed) = {
            let mut armed = lock(&self.shared.armed);
            let delay = match armed.delay_up.as_mut() {
                Some((delay, chunks)) if *chunks > 0 => {
                    let delay = *delay;
                    *chunks -= 1;
                    if *chunks == 0 {
                        armed.delay_up = None;
                    }
                    Some(delay)
                }
                _ => self.shared.plan().delay_up,
            };
            let len = bytes.len() as u64;
            let one_shot = armed.drop_after;
            if let Some(left) = one_shot {
                armed.drop_after = (left >= len).then(|| left - len);
            }
            let standing = self.standing_drop;
            if let Some(left) = standing {
                self.standing_drop = Some(left.saturating_sub(len));
            }
            let allowed = [one_shot, standing]
                .into_iter()
                .flatten()
                .filter(|left| *left < len)
                .min();
            (delay, allowed)
        };
        if let Some(delay) = delay {
            sleep_counted(self.shared, delay.pick(&mut self.rng));
        }
        let send = allowed.map_or(bytes.len(), |a| a as usize);
        if (&self.conn.upstream).write_all(&bytes[..send]).is_err() {
            self.conn.abort();
            return Err(Gone);
        }
        bump(&self.shared.counters.bytes_up, send as u64);
        if allowed.is_some() {
            if !self.conn.dead.swap(true, Ordering::AcqRel) {
                bump(&self.shared.counters.drops, 1);
            }
            self.conn.abort();
            return Err(Gone);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// An upstream that records everything it receives per connection.
    fn recorder() -> (SocketAddr, std::sync::mpsc::Receiver<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let tx = tx.clone();
                std::thread::spawn(move || {
                    let mut all = Vec::new();
                    let _ = stream.read_to_end(&mut all);
                    let _ = tx.send(all);
                });
            }
        });
        (addr, rx)
    }

    fn hello() -> Vec<u8> {
        let mut hello = vec![0u8; HELLO_FIXED_BYTES];
        hello[..4].copy_from_slice(&HELLO_MAGIC);
        hello[4] = 1;
        hello[6] = 1;
        hello[24] = 3;
        hello.extend_from_slice(b"tok");
        hello
    }

    fn stream_header() -> Vec<u8> {
        let mut header = vec![0u8; STREAM_HEADER_FIXED_BYTES];
        header[..8].copy_from_slice(&STREAM_MAGIC);
        header[12] = 1; // one disk
        header[14] = 2; // name of 2 bytes
        header.extend_from_slice(b"vm");
        header.extend_from_slice(&[0u8; DISK_ENTRY_BYTES]);
        header.extend_from_slice(&[0u8; 8]);
        header
    }

    fn frame(seq: u8, payload: usize) -> Vec<u8> {
        let mut frame = vec![0u8; FRAME_HEADER_BYTES];
        frame[..4].copy_from_slice(&FRAME_MAGIC);
        frame[8] = seq;
        frame[PAYLOAD_LEN_AT..PAYLOAD_LEN_AT + 4].copy_from_slice(&(payload as u32).to_le_bytes());
        frame.extend(std::iter::repeat_n(seq, payload));
        frame
    }

    fn send(proxy: &Proxy, bytes: &[u8]) {
        let mut stream = TcpStream::connect(proxy.local_addr()).unwrap();
        stream.write_all(bytes).unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        let mut sink = Vec::new();
        let _ = stream.read_to_end(&mut sink);
    }

    fn recv(rx: &std::sync::mpsc::Receiver<Vec<u8>>) -> Vec<u8> {
        rx.recv_timeout(Duration::from_secs(10)).unwrap()
    }

    #[test]
    fn clean_proxy_forwards_every_byte() {
        let (upstream, rx) = recorder();
        let proxy = Proxy::start(upstream, FaultPlan::default()).unwrap();
        let mut bytes = [hello(), stream_header()].concat();
        for seq in 0..20 {
            bytes.extend(frame(seq, 1000 * usize::from(seq)));
        }
        send(&proxy, &bytes);
        assert_eq!(recv(&rx), bytes);
        let stats = proxy.stats();
        assert_eq!((stats.frames, stats.unframed), (20, 0));
    }

    #[test]
    fn one_shot_duplicate_reorder_and_flip_hit_whole_frames() {
        let (upstream, rx) = recorder();
        let proxy = Proxy::start(upstream, FaultPlan::default()).unwrap();
        let head = [hello(), stream_header()].concat();
        let frames: Vec<Vec<u8>> = (0..4).map(|s| frame(s, 100)).collect();
        let bytes = [head.clone(), frames.concat()].concat();

        proxy.arm(NetFault::Duplicate);
        send(&proxy, &bytes);
        let expected = [
            head.clone(),
            frames[0].clone(),
            frames[0].clone(),
            frames[1..].concat(),
        ]
        .concat();
        assert_eq!(recv(&rx), expected);

        proxy.arm(NetFault::Reorder);
        send(&proxy, &bytes);
        let expected = [
            head.clone(),
            frames[1].clone(),
            frames[0].clone(),
            frames[2..].concat(),
        ]
        .concat();
        assert_eq!(recv(&rx), expected);

        proxy.arm(NetFault::Flip);
        send(&proxy, &bytes);
        let got = recv(&rx);
        assert_eq!(got.len(), bytes.len());
        let differing: Vec<usize> = (0..got.len()).filter(|&i| got[i] != bytes[i]).collect();
        assert_eq!(differing.len(), 1, "one byte flipped");
        let at = differing[0] - head.len();
        assert!(
            (4..frames[0].len()).contains(&at) && !(32..36).contains(&at),
            "{at}"
        );
        let stats = proxy.stats();
        assert_eq!((stats.duplicates, stats.reorders, stats.flips), (1, 1, 1));
    }

    #[test]
    fn drop_after_bytes_cuts_the_connection_there() {
        let (upstream, rx) = recorder();
        let proxy = Proxy::start(upstream, FaultPlan::default()).unwrap();
        let bytes = [hello(), stream_header(), frame(0, 5000), frame(1, 5000)].concat();
        proxy.arm(NetFault::DropAfterBytes(200));
        send(&proxy, &bytes);
        assert_eq!(recv(&rx), bytes[..200]);
        assert_eq!(proxy.stats().drops, 1);
        // Disarmed after firing: the next connection is clean.
        send(&proxy, &bytes);
        assert_eq!(recv(&rx), bytes);
    }

    #[test]
    fn odd_bytes_fall_back_to_plain_forwarding() {
        let (upstream, rx) = recorder();
        let proxy = Proxy::start(upstream, FaultPlan::default()).unwrap();
        let mut garbage = b"GET / HTTP/1.1\r\n\r\n".to_vec();
        garbage.extend(std::iter::repeat_n(0xffu8, 10_000));
        send(&proxy, &garbage);
        assert_eq!(recv(&rx), garbage);
        // A frame header claiming more than the limit: forwarded as it is.
        let mut bad = [hello(), stream_header()].concat();
        let mut huge = frame(0, 0);
        huge[PAYLOAD_LEN_AT..PAYLOAD_LEN_AT + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        bad.extend(huge);
        proxy.arm(NetFault::Flip);
        send(&proxy, &bad);
        assert_eq!(recv(&rx), bad);
        assert_eq!(proxy.stats().flips, 0);
        assert_eq!(proxy.armed(), 1);
    }

    #[test]
    fn a_held_frame_is_released_when_no_next_frame_comes() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let proxy = Proxy::start(listener.local_addr().unwrap(), FaultPlan::default()).unwrap();
        proxy.arm(NetFault::Reorder);
        let mut agent = TcpStream::connect(proxy.local_addr()).unwrap();
        let bytes = [hello(), stream_header(), frame(0, 10)].concat();
        agent.write_all(&bytes).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        let mut got = vec![0u8; bytes.len()];
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        server.read_exact(&mut got).unwrap();
        assert_eq!(got, bytes);
        assert_eq!(proxy.stats().reorders_released, 1);
        assert_eq!(proxy.armed(), 1, "the swap stays armed");
    }

    #[test]
    fn standing_delay_slows_each_chunk() {
        let (upstream, rx) = recorder();
        let plan = FaultPlan {
            delay_up: Some(Delay::fixed(Duration::from_millis(20))),
            ..FaultPlan::default()
        };
        let proxy = Proxy::start(upstream, plan).unwrap();
        let bytes = [hello(), stream_header(), frame(0, 10), frame(1, 10)].concat();
        let started = Instant::now();
        send(&proxy, &bytes);
        assert_eq!(recv(&rx), bytes);
        assert!(started.elapsed() >= Duration::from_millis(80));
        assert_eq!(proxy.stats().delays, 4);
    }
}
