//! The source agent's sender: delta frames to an appliance's data port, resent until
//! acknowledged, across disconnects.
//!
//! The wire protocol is specified in `docs/design/data-port.md` (the appliance's
//! `dataport.rs` is the server side); its bytes are encoded and decoded by the one codec in
//! [`engine::port`]. Frames are encoded by the engine's one [`DeltaEncoder`], kept in a
//! bounded backlog until the appliance acknowledges them as durable, and resent from the
//! appliance's `next_seq` after every reconnect:
//!
//! ```text
//!  caller ── write / zero_range / bookmark / resync_block ──► encode (seq n) ──► backlog
//!            (blocks while the backlog is full, up to send_timeout)          │ unacked frames,
//!                                                                            │ oldest first
//!  link thread:  connect ─► hello ─► reply(next_seq) ─► drop frames < next_seq
//!                ─► stream header(first_seq = next_seq) ─► frames from the backlog ──► socket
//!                on error / close record: shut the socket, back off, reconnect, resend
//!  ack thread (one per connection):  ack record(seq) ─► drop backlog frames ≤ seq
//!                                    close record    ─► reconnect (or a named fatal error)
//! ```
//!
//! Invariants:
//! - a frame accepted into the backlog stays there until an ack (or a reply's `next_seq`)
//!   covers it: it is never lost unless the caller gives up (drops the agent, or the agent
//!   stops with a fatal [`AgentError`] and the caller does not retry);
//! - the acknowledged sequence number only grows; an ack beyond the last frame made, or a
//!   `next_seq` below an acknowledged frame (the appliance lost acknowledged data), is a named
//!   error, never silently absorbed;
//! - every wait is bounded: connect, handshake and write timeouts, an ack timeout while frames
//!   are outstanding, backoff with a bounded number of consecutive failed attempts.
//!
//! Delta resync ([`AgentConfig::resync`]): an agent configured for it sets the RESYNC flag on
//! every hello, so that the appliance accepts its session while the item needs a resync; the
//! whole exchange (hash lists, diff, resync blocks, closing bookmark) is
//! [`crate::resync::delta_resync`]. A refusal or close with `resync-required` stops an
//! ordinary agent ([`AgentError::needs_resync`]); `not-replicating` stops any agent.
//!
//! Faults for tests ([`Fault`], [`Agent::drop_connection`]): drop the connection after or
//! inside a given frame, or flip a byte of a frame in transit, each on the frame's first
//! transmission only, so that the resend is clean.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use engine::delta::{
    BOOKMARK_FIXED_BYTES, Consistency, DeltaEncoder, DiskGeometry, EncoderOptions,
    FRAME_HEADER_BYTES, StreamHeader,
};
pub use engine::port::{
    HELLO_MAGIC, MAX_MESSAGE_BYTES, MAX_TOKEN_BYTES, PROTOCOL_VERSION, REPLY_MAGIC,
    ReceivedCloseReason as CloseReason, RefusalStatus,
};
use engine::port::{
    Hello, Mode, RECORD_FIXED_BYTES, REPLY_FIXED_BYTES, Record, decode_record, decode_reply_fixed,
    encode_hello,
};
use engine::resync::ChunkHashes;

/// How often blocked reads wake up to check for shutdown and the ack timeout.
const POLL: Duration = Duration::from_millis(100);
/// Closes remembered in [`AgentStats::closes`].
const MAX_CLOSES_KEPT: usize = 64;

/// What went wrong, named.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AgentError {
    /// A setting outside its range.
    Config(String),
    /// The appliance refused the hello with a status that retrying does not fix, or with a
    /// transient one (busy, …) on each of `max_attempts` attempts in a row.
    Refused {
        /// The appliance.
        addr: SocketAddr,
        /// The reply status.
        status: RefusalStatus,
        /// The appliance's message.
        message: String,
    },
    /// The appliance closed the session for a reason that resending does not fix.
    Closed {
        /// The close reason.
        reason: CloseReason,
        /// The appliance's message.
        message: String,
    },
    /// Every attempt in a row failed (connect, handshake, or sessions without progress).
    Unreachable {
        /// The appliance.
        addr: SocketAddr,
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        last_error: String,
    },
    /// The appliance sent something the protocol does not allow.
    Protocol {
        /// The appliance.
        addr: SocketAddr,
        /// What it sent.
        what: String,
    },
    /// The appliance wants a frame it had already acknowledged: acknowledged data was lost.
    AcknowledgedFramesLost {
        /// The appliance's next_seq.
        server_next_seq: u64,
        /// The highest acknowledged seq.
        acked_seq: u64,
    },
    /// The appliance wants frames past what this agent has made (its log was reset, e.g. by a
    /// resync): resending would skip frames silently, so the agent stops.
    ServerAhead {
        /// The appliance's next_seq.
        server_next_seq: u64,
        /// The seq of this agent's next frame.
        agent_next_seq: u64,
    },
    /// `send` waited `send_timeout` for room in the backlog.
    BacklogFull {
        /// Bytes waiting for acks.
        backlog_bytes: u64,
        /// The limit.
        limit_bytes: u64,
        /// Upper bound of the frame's encoded size.
        frame_bytes: u64,
        /// How long it waited.
        waited_ms: u64,
    },
    /// `flush` waited its timeout.
    FlushTimeout {
        /// How long it waited.
        waited_ms: u64,
        /// The acknowledged seq.
        acked_seq: u64,
        /// The last frame made.
        last_seq: u64,
    },
    /// The frame does not fit the stream (disk, alignment, range, size, label).
    Encode(String),
    /// The agent was closed.
    Stopped,
}

impl fmt::Display for AgentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Config(what) => write!(f, "agent config: {what}"),
            Self::Refused {
                addr,
                status,
                message,
            } => write!(
                f,
                "appliance {addr} refused the session: {status}: {message}"
            ),
            Self::Closed { reason, message } => {
                write!(f, "appliance closed the session: {reason}: {message}")
            }
            Self::Unreachable {
                addr,
                attempts,
                last_error,
            } => write!(
                f,
                "appliance {addr} unreachable after {attempts} attempts in a row; last: \
                 {last_error}"
            ),
            Self::Protocol { addr, what } => {
                write!(f, "protocol violation by appliance {addr}: {what}")
            }
            Self::AcknowledgedFramesLost {
                server_next_seq,
                acked_seq,
            } => write!(
                f,
                "appliance wants seq {server_next_seq}, but it acknowledged seq {acked_seq}: \
                 acknowledged frames were lost on the appliance"
            ),
            Self::ServerAhead {
                server_next_seq,
                agent_next_seq,
            } => write!(
                f,
                "appliance wants seq {server_next_seq}, past this agent's next frame \
                 {agent_next_seq}; restart the agent (after a resync) from the appliance's seq"
            ),
            Self::BacklogFull {
                backlog_bytes,
                limit_bytes,
                frame_bytes,
                waited_ms,
            } => write!(
                f,
                "backlog full: {backlog_bytes} of {limit_bytes} bytes unacknowledged, a frame \
                 of up to {frame_bytes} bytes waited {waited_ms} ms"
            ),
            Self::FlushTimeout {
                waited_ms,
                acked_seq,
                last_seq,
            } => write!(
                f,
                "flush timed out after {waited_ms} ms: acknowledged through seq {acked_seq}, \
                 frames made through seq {last_seq}"
            ),
            Self::Encode(what) => write!(f, "cannot encode the frame: {what}"),
            Self::Stopped => f.write_str("the agent is closed"),
        }
    }
}

impl std::error::Error for AgentError {}

impl AgentError {
    /// The refusal status, when the appliance refused the hello.
    pub fn refusal_status(&self) -> Option<RefusalStatus> {
        match self {
            Self::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether the appliance said the item needs a delta resync (a `resync-required` refusal
    /// or close): the caller runs [`crate::resync::delta_resync`], then streams again.
    pub fn needs_resync(&self) -> bool {
        matches!(
            self,
            Self::Refused {
                status: RefusalStatus::ResyncRequired,
                ..
            } | Self::Closed {
                reason: CloseReason::ResyncRequired,
                ..
            }
        )
    }
}

/// Called with each new acknowledged sequence number (monotonic).
pub type AckObserver = Arc<dyn Fn(u64) + Send + Sync>;

/// Settings of an [`Agent`].
#[derive(Clone)]
pub struct AgentConfig {
    /// The appliance's data port.
    pub addr: SocketAddr,
    /// The protected item.
    pub item_id: [u8; 16],
    /// The item's stream token.
    pub token: Vec<u8>,
    /// The item's name (in each stream header).
    pub item_name: String,
    /// The item's disks.
    pub disks: Vec<DiskGeometry>,
    /// Compression of data payloads.
    pub encoder: EncoderOptions,
    /// Most bytes of unacknowledged frames kept (one frame is always admitted when the
    /// backlog is empty).
    pub backlog_limit_bytes: u64,
    /// How long a send waits for room in the backlog.
    pub send_timeout: Duration,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Timeout of the handshake reply and of each socket write.
    pub io_timeout: Duration,
    /// With frames outstanding and no ack for this long, the connection is dropped and
    /// re-established.
    pub ack_timeout: Duration,
    /// First delay before a reconnect; doubles per failure.
    pub backoff_initial: Duration,
    /// Longest delay before a reconnect.
    pub backoff_max: Duration,
    /// Consecutive failed attempts (connects, refusals, sessions that ended with frames
    /// outstanding and no progress) before the agent gives up.
    pub max_attempts: u32,
    /// Told about every new acknowledged seq.
    pub ack_observer: Option<AckObserver>,
    /// Set the RESYNC flag on every hello: this agent's session is the item's delta resync
    /// (opened after fetching the chunk hashes of every disk; see
    /// [`crate::resync::delta_resync`]). Default false.
    pub resync: bool,
}

impl fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentConfig")
            .field("addr", &self.addr)
            .field("item_id", &hex(&self.item_id))
            .field("token_len", &self.token.len())
            .field("item_name", &self.item_name)
            .field("disks", &self.disks)
            .field("backlog_limit_bytes", &self.backlog_limit_bytes)
            .field("max_attempts", &self.max_attempts)
            .field("resync", &self.resync)
            .finish_non_exhaustive()
    }
}

impl AgentConfig {
    /// Settings with defaults: 64 MiB backlog, zstd level 1, 30 s send, 5 s connect, 30 s
    /// I/O, 60 s ack timeouts, backoff 50 ms to 5 s, 30 attempts, no RESYNC flag.
    pub fn new(
        addr: SocketAddr,
        item_id: [u8; 16],
        token: &[u8],
        item_name: &str,
        disks: Vec<DiskGeometry>,
    ) -> Self {
        Self {
            addr,
            item_id,
            token: token.to_vec(),
            item_name: item_name.to_owned(),
            disks,
            encoder: EncoderOptions::default(),
            backlog_limit_bytes: 64 << 20,
            send_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(30),
            ack_timeout: Duration::from_secs(60),
            backoff_initial: Duration::from_millis(50),
            backoff_max: Duration::from_secs(5),
            max_attempts: 30,
            ack_observer: None,
            resync: false,
        }
    }

    fn validate(&self) -> Result<(), AgentError> {
        let bad = |what: &str| Err(AgentError::Config(what.to_owned()));
        if self.token.is_empty() || self.token.len() > MAX_TOKEN_BYTES {
            return bad("token length must be 1..=256 bytes");
        }
        if self.max_attempts == 0 {
            return bad("max_attempts must be at least 1");
        }
        if self.backlog_limit_bytes == 0 {
            return bad("backlog_limit_bytes must be non-zero");
        }
        for (name, value) in [
            ("connect_timeout", self.connect_timeout),
            ("io_timeout", self.io_timeout),
            ("ack_timeout", self.ack_timeout),
        ] {
            if value.is_zero() {
                return Err(AgentError::Config(format!("{name} must be non-zero")));
            }
        }
        self.header(0)
            .validate()
            .map_err(|e| AgentError::Config(e.to_string()))
    }

    fn header(&self, first_seq: u64) -> StreamHeader {
        StreamHeader {
            item_id: self.item_id,
            item_name: self.item_name.clone(),
            first_seq,
            disks: self.disks.clone(),
        }
    }

    fn backoff(&self, failures: u32) -> Duration {
        let shift = failures.saturating_sub(1).min(20);
        self.backoff_initial
            .saturating_mul(1u32 << shift)
            .min(self.backoff_max)
    }
}

/// A fault to inject, for tests. Each fires once, on the named frame's first transmission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Flip (xor 0xff) the byte at `offset_in_frame` (clamped to the frame) of frame `seq`.
    FlipByte {
        /// The frame.
        seq: u64,
        /// Byte offset in the frame (48-byte header, then payload).
        offset_in_frame: usize,
    },
    /// Drop the connection right after frame `seq` is written.
    DropAfter {
        /// The frame.
        seq: u64,
    },
    /// Write only the first `bytes` of frame `seq`, then drop the connection.
    CutInside {
        /// The frame.
        seq: u64,
        /// Bytes of it written.
        bytes: usize,
    },
}

impl Fault {
    fn seq(&self) -> u64 {
        match *self {
            Self::FlipByte { seq, .. } | Self::DropAfter { seq } | Self::CutInside { seq, .. } => {
                seq
            }
        }
    }
}

/// A close record received from the appliance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseInfo {
    /// Why.
    pub reason: CloseReason,
    /// The durable seq at the close.
    pub durable_seq: u64,
    /// The appliance's message.
    pub message: String,
}

/// Counters of an agent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentStats {
    /// Successful handshakes.
    pub sessions: u64,
    /// Frames written (first sends and resends).
    pub frames_transmitted: u64,
    /// Frames written again after a reconnect.
    pub frames_retransmitted: u64,
    /// Ack records received.
    pub acks: u64,
    /// The last close records received (at most 64).
    pub closes: Vec<CloseInfo>,
}

struct Pending {
    seq: u64,
    bytes: Arc<Vec<u8>>,
}

struct State {
    backlog: VecDeque<Pending>,
    backlog_bytes: u64,
    /// Seq of the next frame made.
    next_seq: u64,
    acked_seq: u64,
    /// Generation of the live connection, if any.
    connected: Option<u64>,
    generation: u64,
    /// A clone of the live socket (to drop it from outside the link thread).
    socket: Option<TcpStream>,
    /// Next seq to write on the live connection.
    transmit_seq: u64,
    /// Highest seq ever written (to count resends).
    highest_transmitted: Option<u64>,
    /// Last time the ack advanced (or a session started).
    last_progress: Instant,
    fatal: Option<AgentError>,
    closing: Option<Closing>,
    drop_requested: bool,
    faults: Vec<Fault>,
    stats: AgentStats,
}

#[derive(Clone, Copy)]
struct Closing {
    graceful: bool,
    deadline: Instant,
}

impl State {
    fn frame_at(&self, seq: u64) -> Option<(u64, Arc<Vec<u8>>)> {
        let front = self.backlog.front()?.seq;
        let index = usize::try_from(seq.checked_sub(front)?).ok()?;
        self.backlog.get(index).map(|p| (p.seq, p.bytes.clone()))
    }

    /// Applies an acknowledged seq; returns it if it advanced.
    fn ack(&mut self, seq: u64) -> Option<u64> {
        if seq <= self.acked_seq {
            return None;
        }
        self.acked_seq = seq;
        while self.backlog.front().is_some_and(|p| p.seq <= seq) {
            if let Some(done) = self.backlog.pop_front() {
                self.backlog_bytes -= done.bytes.len() as u64;
            }
        }
        self.last_progress = Instant::now();
        Some(seq)
    }

    fn stopped(&self) -> bool {
        self.closing.is_some() || self.fatal.is_some()
    }
}

struct Shared {
    config: AgentConfig,
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, State>, timeout: Duration) -> MutexGuard<'a, State> {
        match self.changed.wait_timeout(guard, timeout) {
            Ok((guard, _)) => guard,
            Err(poisoned) => poisoned.into_inner().0,
        }
    }

    fn observe(&self, acked: Option<u64>) {
        if let (Some(seq), Some(observer)) = (acked, &self.config.ack_observer) {
            observer(seq);
        }
    }

    fn fail(&self, error: AgentError) {
        let mut state = self.state();
        if state.fatal.is_none() {
            state.fatal = Some(error);
        }
        drop(state);
        self.changed.notify_all();
    }

    /// Marks connection `generation` as gone and shuts its socket.
    fn disconnect(&self, generation: u64) {
        let mut state = self.state();
        if state.connected == Some(generation) {
            state.connected = None;
            if let Some(socket) = state.socket.take() {
                let _ = socket.shutdown(Shutdown::Both);
            }
        }
        drop(state);
        self.changed.notify_all();
    }
}

/// The encoder and the buffer it writes each frame into.
struct Encoder {
    encoder: DeltaEncoder<FrameSink>,
    sink: Arc<Mutex<Vec<u8>>>,
}

struct FrameSink(Arc<Mutex<Vec<u8>>>);

impl Write for FrameSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A connection whose handshake succeeded.
struct Established {
    stream: TcpStream,
    next_seq: u64,
}

/// Why a handshake failed.
enum HandshakeError {
    /// The transport failed: worth retrying.
    Transient(String),
    /// The appliance refused with a status that retrying may fix (busy, …).
    Retry {
        /// The status.
        status: RefusalStatus,
        /// The appliance's message.
        message: String,
    },
    /// Not worth retrying.
    Fatal(AgentError),
}

/// The sender of one protected item's frames to an appliance.
pub struct Agent {
    shared: Arc<Shared>,
    encoder: Mutex<Encoder>,
    link: Mutex<Option<JoinHandle<()>>>,
}

impl fmt::Debug for Agent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.shared.state();
        f.debug_struct("Agent")
            .field("addr", &self.shared.config.addr)
            .field("next_seq", &state.next_seq)
            .field("acked_seq", &state.acked_seq)
            .field("backlog_frames", &state.backlog.len())
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// Connects (retrying transient failures with backoff), learns the appliance's `next_seq`
    /// (the first frame this agent makes carries it) and starts sending.
    pub fn connect(config: AgentConfig) -> Result<Self, AgentError> {
        config.validate()?;
        let established = connect_with_retry(&config, None)?;
        let next_seq = established.next_seq;
        let sink = Arc::new(Mutex::new(Vec::new()));
        let encoder = DeltaEncoder::new(
            FrameSink(sink.clone()),
            &config.header(next_seq),
            config.encoder,
        )
        .map_err(|e| AgentError::Encode(e.to_string()))?;
        sink.lock().unwrap_or_else(|e| e.into_inner()).clear(); // the header goes per connection
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                backlog: VecDeque::new(),
                backlog_bytes: 0,
                next_seq,
                acked_seq: next_seq.wrapping_sub(1),
                connected: None,
                generation: 0,
                socket: None,
                transmit_seq: next_seq,
                highest_transmitted: None,
                last_progress: Instant::now(),
                fatal: None,
                closing: None,
                drop_requested: false,
                faults: Vec::new(),
                stats: AgentStats::default(),
            }),
            changed: Condvar::new(),
            config,
        });
        let link = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("agent-link".into())
                .spawn(move || link_loop(&shared, established))
                .map_err(|e| AgentError::Config(format!("cannot start the link thread: {e}")))?
        };
        Ok(Self {
            shared,
            encoder: Mutex::new(Encoder { encoder, sink }),
            link: Mutex::new(Some(link)),
        })
    }

    /// Queues a guest write. Returns its sequence number.
    pub fn write(
        &self,
        disk_index: u16,
        offset_bytes: u64,
        data: &[u8],
    ) -> Result<u64, AgentError> {
        let bound = (FRAME_HEADER_BYTES + data.len()) as u64;
        self.submit(bound, |e| e.write(disk_index, offset_bytes, data))
    }

    /// Queues a resync block. Returns its sequence number.
    pub fn resync_block(
        &self,
        disk_index: u16,
        offset_bytes: u64,
        data: &[u8],
    ) -> Result<u64, AgentError> {
        let bound = (FRAME_HEADER_BYTES + data.len()) as u64;
        self.submit(bound, |e| e.resync_block(disk_index, offset_bytes, data))
    }

    /// Queues a zero range. Returns its sequence number.
    pub fn zero_range(
        &self,
        disk_index: u16,
        offset_bytes: u64,
        length_bytes: u64,
    ) -> Result<u64, AgentError> {
        self.submit(FRAME_HEADER_BYTES as u64, |e| {
            e.zero_range(disk_index, offset_bytes, length_bytes)
        })
    }

    /// Queues a bookmark. Returns its sequence number.
    pub fn bookmark(
        &self,
        consistency: Consistency,
        bookmark_id: u64,
        source_timestamp_ns: u64,
        label: &str,
    ) -> Result<u64, AgentError> {
        let bound = (FRAME_HEADER_BYTES + BOOKMARK_FIXED_BYTES + label.len()) as u64;
        self.submit(bound, |e| {
            e.bookmark(consistency, bookmark_id, source_timestamp_ns, label)
        })
    }

    /// Waits for room (for a frame of at most `bound` bytes), encodes, queues.
    fn submit(
        &self,
        bound: u64,
        encode: impl FnOnce(&mut DeltaEncoder<FrameSink>) -> Result<u64, engine::delta::EncodeError>,
    ) -> Result<u64, AgentError> {
        let config = &self.shared.config;
        // One sender at a time: sequence numbers are handed out in backlog order.
        let mut slot = self.encoder.lock().unwrap_or_else(|e| e.into_inner());
        let started = Instant::now();
        let mut state = self.shared.state();
        loop {
            if let Some(error) = &state.fatal {
                return Err(error.clone());
            }
            if state.closing.is_some() {
                return Err(AgentError::Stopped);
            }
            if state.backlog.is_empty()
                || state.backlog_bytes.saturating_add(bound) <= config.backlog_limit_bytes
            {
                break;
            }
            let left = config.send_timeout.saturating_sub(started.elapsed());
            if left.is_zero() {
                return Err(AgentError::BacklogFull {
                    backlog_bytes: state.backlog_bytes,
                    limit_bytes: config.backlog_limit_bytes,
                    frame_bytes: bound,
                    waited_ms: started.elapsed().as_millis() as u64,
                });
            }
            state = self.shared.wait(state, left);
        }
        // Acks only shrink the backlog meanwhile: the room stays.
        drop(state);
        let Encoder { encoder, sink } = &mut *slot;
        sink.lock().unwrap_or_else(|e| e.into_inner()).clear();
        let seq = encode(encoder).map_err(|e| AgentError::Encode(e.to_string()))?;
        let bytes = std::mem::take(&mut *sink.lock().unwrap_or_else(|e| e.into_inner()));
        let mut state = self.shared.state();
        state.backlog_bytes += bytes.len() as u64;
        state.backlog.push_back(Pending {
            seq,
            bytes: Arc::new(bytes),
        });
        state.next_seq = seq.wrapping_add(1);
        drop(state);
        drop(slot);
        self.shared.changed.notify_all();
        Ok(seq)
    }

    /// The highest sequence number the appliance has acknowledged as durable.
    pub fn acked_seq(&self) -> u64 {
        self.shared.state().acked_seq
    }

    /// The sequence number the next frame will carry.
    pub fn next_seq(&self) -> u64 {
        self.shared.state().next_seq
    }

    /// Frames and bytes waiting for acks.
    pub fn backlog(&self) -> (usize, u64) {
        let state = self.shared.state();
        (state.backlog.len(), state.backlog_bytes)
    }

    /// The error that stopped the agent, if one did.
    pub fn error(&self) -> Option<AgentError> {
        self.shared.state().fatal.clone()
    }

    /// Counters.
    pub fn stats(&self) -> AgentStats {
        self.shared.state().stats.clone()
    }

    /// Waits until every frame made so far is acknowledged; returns the acked seq.
    pub fn flush(&self, timeout: Duration) -> Result<u64, AgentError> {
        let started = Instant::now();
        let mut state = self.shared.state();
        loop {
            if state.backlog.is_empty() {
                return Ok(state.acked_seq);
            }
            if let Some(error) = &state.fatal {
                return Err(error.clone());
            }
            let left = timeout.saturating_sub(started.elapsed());
            if left.is_zero() {
                return Err(AgentError::FlushTimeout {
                    waited_ms: started.elapsed().as_millis() as u64,
                    acked_seq: state.acked_seq,
                    last_seq: state.next_seq.wrapping_sub(1),
                });
            }
            state = self.shared.wait(state, left);
        }
    }

    /// Injects a fault (tests).
    pub fn inject(&self, fault: Fault) {
        self.shared.state().faults.push(fault);
    }

    /// Drops the live connection now, as a network failure would (tests). The agent
    /// reconnects and resends what is unacknowledged.
    pub fn drop_connection(&self) {
        let mut state = self.shared.state();
        if state.connected.is_some() {
            state.drop_requested = true;
        }
        if let Some(socket) = &state.socket {
            let _ = socket.shutdown(Shutdown::Both);
        }
        drop(state);
        self.shared.changed.notify_all();
    }

    /// Flushes (up to `timeout`), then ends the session cleanly: the sending half is closed
    /// and the appliance's final records are read. Returns the acked seq.
    pub fn close(self, timeout: Duration) -> Result<u64, AgentError> {
        let flushed = self.flush(timeout);
        self.stop(true);
        flushed
    }

    fn stop(&self, graceful: bool) {
        let mut state = self.shared.state();
        if state.closing.is_none() {
            state.closing = Some(Closing {
                graceful,
                deadline: Instant::now() + self.shared.config.io_timeout,
            });
        }
        if !graceful && let Some(socket) = &state.socket {
            let _ = socket.shutdown(Shutdown::Both);
        }
        drop(state);
        self.shared.changed.notify_all();
        let link = self.link.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(link) = link {
            let _ = link.join();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop(false);
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A reply, parsed.
struct Reply {
    status: u8,
    next_seq: u64,
    payload_len_bytes: u64,
    message: String,
}

/// Connects, sends `hello`, reads the reply. Transport failures are transient.
fn handshake(
    addr: SocketAddr,
    hello: &[u8],
    connect_timeout: Duration,
    io_timeout: Duration,
) -> Result<(TcpStream, Reply), HandshakeError> {
    let transient = |what: &str, e: io::Error| HandshakeError::Transient(format!("{what}: {e}"));
    let stream =
        TcpStream::connect_timeout(&addr, connect_timeout).map_err(|e| transient("connect", e))?;
    stream
        .set_nodelay(true)
        .and_then(|()| stream.set_write_timeout(Some(io_timeout)))
        .and_then(|()| stream.set_read_timeout(Some(io_timeout)))
        .map_err(|e| transient("socket options", e))?;
    (&stream)
        .write_all(hello)
        .map_err(|e| transient("sending the hello", e))?;
    let mut fixed = [0u8; REPLY_FIXED_BYTES];
    (&stream)
        .read_exact(&mut fixed)
        .map_err(|e| transient("reading the reply", e))?;
    let fixed = decode_reply_fixed(&fixed).map_err(|error| {
        HandshakeError::Fatal(AgentError::Protocol {
            addr,
            what: error.to_string(),
        })
    })?;
    let mut message = vec![0u8; fixed.message_len]; // ≤ MAX_MESSAGE_BYTES
    (&stream)
        .read_exact(&mut message)
        .map_err(|e| transient("reading the reply message", e))?;
    Ok((
        stream,
        Reply {
            status: fixed.status,
            next_seq: fixed.next_seq,
            payload_len_bytes: fixed.payload_len_bytes,
            message: String::from_utf8_lossy(&message).into_owned(),
        },
    ))
}

/// The mode-1 hello of this agent (with the RESYNC flag when configured).
fn stream_hello(config: &AgentConfig) -> Vec<u8> {
    Hello {
        mode: Mode::Stream,
        item_id: config.item_id,
        token: config.token.clone(),
        disk_index: 0,
        chunk_size_bytes: 0,
        resync: config.resync,
    }
    .encode()
}

/// One streaming handshake.
fn stream_handshake(config: &AgentConfig) -> Result<Established, HandshakeError> {
    let hello = stream_hello(config);
    let (stream, reply) = handshake(
        config.addr,
        &hello,
        config.connect_timeout,
        config.io_timeout,
    )?;
    if reply.status != 0 {
        let status = RefusalStatus::from_u8(reply.status);
        return Err(if status.is_transient() {
            HandshakeError::Retry {
                status,
                message: reply.message,
            }
        } else {
            HandshakeError::Fatal(AgentError::Refused {
                addr: config.addr,
                status,
                message: reply.message,
            })
        });
    }
    Ok(Established {
        stream,
        next_seq: reply.next_seq,
    })
}

/// Handshakes until success, a fatal refusal, `max_attempts` failures, or the agent stops.
fn connect_with_retry(
    config: &AgentConfig,
    shared: Option<&Shared>,
) -> Result<Established, AgentError> {
    let mut failures = 0u32;
    loop {
        match stream_handshake(config) {
            Ok(established) => return Ok(established),
            Err(HandshakeError::Fatal(error)) => return Err(error),
            Err(failed @ (HandshakeError::Transient(_) | HandshakeError::Retry { .. })) => {
                failures += 1;
                if failures >= config.max_attempts {
                    return Err(match failed {
                        // The appliance answered every time: report its answer.
                        HandshakeError::Retry { status, message } => AgentError::Refused {
                            addr: config.addr,
                            status,
                            message: format!("{message} (after {failures} attempts)"),
                        },
                        HandshakeError::Transient(last_error) => AgentError::Unreachable {
                            addr: config.addr,
                            attempts: failures,
                            last_error,
                        },
                        HandshakeError::Fatal(error) => error, // matched above
                    });
                }
                let delay = config.backoff(failures);
                match shared {
                    Some(shared) => {
                        let state = shared.state();
                        if state.stopped() {
                            return Err(AgentError::Stopped);
                        }
                        let state = shared.wait(state, delay);
                        if state.stopped() {
                            return Err(AgentError::Stopped);
                        }
                    }
                    None => std::thread::sleep(delay),
                }
            }
        }
    }
}

/// The link thread: sessions one after the other until the agent stops.
fn link_loop(shared: &Arc<Shared>, first: Established) {
    let config = &shared.config;
    let mut next = Some(first);
    let mut failures = 0u32;
    loop {
        let established = match next.take() {
            Some(established) => established,
            None => {
                // Reconnect only when there is something to deliver.
                let mut state = shared.state();
                while state.backlog.is_empty() && !state.stopped() {
                    state = shared.wait(state, POLL * 5);
                }
                if state.stopped() {
                    return;
                }
                drop(state);
                if failures > 0 {
                    let state = shared.state();
                    let state = shared.wait(state, config.backoff(failures));
                    if state.stopped() {
                        return;
                    }
                }
                match connect_with_retry(config, Some(shared)) {
                    Ok(established) => established,
                    Err(AgentError::Stopped) => return,
                    Err(error) => return shared.fail(error),
                }
            }
        };
        let outcome = match adopt(shared, established.next_seq) {
            Ok(()) => run_session(shared, established.stream),
            Err(error) => return shared.fail(error),
        };
        match outcome {
            SessionOutcome::Stopped => return,
            SessionOutcome::Progress | SessionOutcome::NothingOutstanding => failures = 0,
            SessionOutcome::Stalled(why) => {
                failures += 1;
                if failures >= config.max_attempts {
                    return shared.fail(AgentError::Unreachable {
                        addr: config.addr,
                        attempts: failures,
                        last_error: why,
                    });
                }
            }
        }
    }
}

/// Takes the appliance's `next_seq`: what is below it is durable there.
fn adopt(shared: &Shared, server_next_seq: u64) -> Result<(), AgentError> {
    let mut state = shared.state();
    let server_durable = server_next_seq.wrapping_sub(1);
    if server_durable < state.acked_seq {
        return Err(AgentError::AcknowledgedFramesLost {
            server_next_seq,
            acked_seq: state.acked_seq,
        });
    }
    if server_next_seq > state.next_seq {
        return Err(AgentError::ServerAhead {
            server_next_seq,
            agent_next_seq: state.next_seq,
        });
    }
    let advanced = state.ack(server_durable);
    state.transmit_seq = server_next_seq;
    state.last_progress = Instant::now();
    drop(state);
    shared.observe(advanced);
    shared.changed.notify_all();
    Ok(())
}

enum SessionOutcome {
    /// The agent stops.
    Stopped,
    /// Acks advanced during the session.
    Progress,
    /// It ended with nothing outstanding (idle close): not a failure.
    NothingOutstanding,
    /// It ended with frames outstanding and no ack progress.
    Stalled(String),
}

/// Sends the stream header and frames on one connection until it fails or the agent stops.
fn run_session(shared: &Arc<Shared>, stream: TcpStream) -> SessionOutcome {
    let config = &shared.config;
    let (generation, first_seq, acked_at_start) = {
        let mut state = shared.state();
        state.generation += 1;
        state.stats.sessions += 1;
        state.connected = Some(state.generation);
        state.socket = stream.try_clone().ok();
        (state.generation, state.transmit_seq, state.acked_seq)
    };
    let reader = match stream.try_clone() {
        Ok(clone) => {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("agent-acks".into())
                .spawn(move || read_records(&shared, &clone, generation))
                .ok()
        }
        Err(_) => None,
    };
    let mut why = String::from("connection lost");
    let mut header = Vec::new();
    config.header(first_seq).encode_into(&mut header);
    let mut graceful_close = false;
    if reader.is_none() {
        why = "cannot start the ack reader".into();
    } else if let Err(e) = (&stream).write_all(&header) {
        why = format!("sending the stream header: {e}");
    } else {
        loop {
            let next = {
                let mut state = shared.state();
                loop {
                    if let Some(closing) = state.closing {
                        graceful_close = closing.graceful;
                        break None;
                    }
                    if state.fatal.is_some() || state.connected != Some(generation) {
                        break None;
                    }
                    if state.drop_requested {
                        state.drop_requested = false;
                        why = "connection dropped on request".into();
                        break None;
                    }
                    if let Some(front) = state.backlog.front()
                        && state.transmit_seq < front.seq
                    {
                        state.transmit_seq = front.seq;
                    }
                    if let Some((seq, bytes)) = state.frame_at(state.transmit_seq) {
                        state.transmit_seq = seq + 1;
                        let resent = state.highest_transmitted.is_some_and(|h| seq <= h);
                        state.stats.frames_transmitted += 1;
                        if resent {
                            state.stats.frames_retransmitted += 1;
                        } else {
                            state.highest_transmitted = Some(seq);
                        }
                        let fault = state
                            .faults
                            .iter()
                            .position(|f| f.seq() == seq && !resent)
                            .map(|i| state.faults.remove(i));
                        break Some((seq, bytes, fault));
                    }
                    state = shared.wait(state, POLL * 5);
                }
            };
            let Some((seq, bytes, fault)) = next else {
                break;
            };
            let written = match fault {
                None => (&stream).write_all(&bytes).map(|()| true),
                Some(Fault::FlipByte {
                    offset_in_frame, ..
                }) => {
                    let mut copy = bytes.as_ref().clone();
                    let at = offset_in_frame.min(copy.len().saturating_sub(1));
                    if let Some(byte) = copy.get_mut(at) {
                        *byte ^= 0xff;
                    }
                    (&stream).write_all(&copy).map(|()| true)
                }
                Some(Fault::DropAfter { .. }) => (&stream).write_all(&bytes).map(|()| false),
                Some(Fault::CutInside { bytes: cut, .. }) => (&stream)
                    .write_all(&bytes[..cut.min(bytes.len())])
                    .map(|()| false),
            };
            match written {
                Ok(true) => {}
                Ok(false) => {
                    why = format!("fault injected at frame seq {seq}");
                    break;
                }
                Err(e) => {
                    why = format!("sending frame seq {seq}: {e}");
                    break;
                }
            }
        }
    }
    if graceful_close {
        // Half-close: the appliance commits, acks, sends its close record and closes.
        let _ = stream.shutdown(Shutdown::Write);
    } else {
        shared.disconnect(generation);
        let _ = stream.shutdown(Shutdown::Both);
    }
    if let Some(reader) = reader {
        let _ = reader.join();
    }
    shared.disconnect(generation);
    let state = shared.state();
    if state.stopped() {
        SessionOutcome::Stopped
    } else if state.acked_seq > acked_at_start {
        SessionOutcome::Progress
    } else if state.backlog.is_empty() {
        SessionOutcome::NothingOutstanding
    } else {
        let last_close = state.stats.closes.last().map(|c| c.reason);
        SessionOutcome::Stalled(match last_close {
            Some(reason) => format!("{why}; last close: {reason}"),
            None => why,
        })
    }
}

enum ReadOutcome {
    Done,
    /// EOF, error, or the connection is no longer the live one: stop reading.
    Gone,
}

/// Fills `buf`, waking every [`POLL`] to check for shutdown and the ack timeout.
fn read_polling(
    shared: &Shared,
    stream: &TcpStream,
    generation: u64,
    buf: &mut [u8],
) -> ReadOutcome {
    let mut filled = 0;
    while filled < buf.len() {
        match (&*stream).read(&mut buf[filled..]) {
            Ok(0) => return ReadOutcome::Gone,
            Ok(n) => filled += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                let state = shared.state();
                if let Some(closing) = state.closing
                    && (!closing.graceful || Instant::now() >= closing.deadline)
                {
                    return ReadOutcome::Gone;
                }
                if state.closing.is_none() && state.connected != Some(generation) {
                    return ReadOutcome::Gone;
                }
                let outstanding = state
                    .highest_transmitted
                    .is_some_and(|h| h > state.acked_seq);
                if outstanding && state.last_progress.elapsed() >= shared.config.ack_timeout {
                    tracing::warn!(
                        acked_seq = state.acked_seq,
                        "no ack for {} s with frames outstanding; reconnecting",
                        shared.config.ack_timeout.as_secs_f64()
                    );
                    return ReadOutcome::Gone;
                }
            }
            Err(_) => return ReadOutcome::Gone,
        }
    }
    ReadOutcome::Done
}

/// The ack thread of one connection.
fn read_records(shared: &Shared, stream: &TcpStream, generation: u64) {
    let addr = shared.config.addr;
    if stream.set_read_timeout(Some(POLL)).is_err() {
        return shared.disconnect(generation);
    }
    loop {
        let mut record = [0u8; RECORD_FIXED_BYTES];
        if let ReadOutcome::Gone = read_polling(shared, stream, generation, &mut record) {
            return shared.disconnect(generation);
        }
        let record = decode_record(&record);
        let seq = match &record {
            Ok(record) => record.seq(),
            Err(error) => error.seq(),
        };
        let mut state = shared.state();
        if seq >= state.next_seq {
            let what = format!(
                "acknowledged seq {seq}, but the last frame made is {}",
                state.next_seq.wrapping_sub(1)
            );
            drop(state);
            shared.fail(AgentError::Protocol { addr, what });
            return shared.disconnect(generation);
        }
        match record {
            Ok(Record::Ack { .. }) => {
                state.stats.acks += 1;
                let advanced = state.ack(seq);
                drop(state);
                shared.observe(advanced);
                shared.changed.notify_all();
            }
            Ok(Record::Close {
                reason,
                message_len,
                ..
            }) => {
                drop(state);
                let mut message = vec![0u8; message_len]; // ≤ MAX_MESSAGE_BYTES
                let complete = matches!(
                    read_polling(shared, stream, generation, &mut message),
                    ReadOutcome::Done
                );
                let message = String::from_utf8_lossy(&message).into_owned();
                let mut state = shared.state();
                let advanced = state.ack(seq);
                if state.stats.closes.len() == MAX_CLOSES_KEPT {
                    state.stats.closes.remove(0);
                }
                state.stats.closes.push(CloseInfo {
                    reason,
                    durable_seq: seq,
                    message: message.clone(),
                });
                drop(state);
                shared.observe(advanced);
                tracing::info!(%reason, durable_seq = seq, %message, complete, "appliance closed the session");
                if !reason.is_transient() {
                    shared.fail(AgentError::Closed { reason, message });
                }
                return shared.disconnect(generation);
            }
            Err(error) => {
                drop(state);
                shared.fail(AgentError::Protocol {
                    addr,
                    what: error.to_string(),
                });
                return shared.disconnect(generation);
            }
        }
    }
}

/// Asks the appliance for the chunk hash list of replica `disk_index` (mode 2).
/// `timeout` bounds connect, the wait for the reply (the appliance first applies every
/// acknowledged frame, then hashes the replica: give it time for both), and each read.
/// Every refusal is returned as [`AgentError::Refused`] without retrying.
pub fn fetch_chunk_hashes(
    addr: SocketAddr,
    item_id: &[u8; 16],
    token: &[u8],
    disk_index: u16,
    chunk_size_bytes: u32,
    timeout: Duration,
    max_list_bytes: u64,
) -> Result<ChunkHashes, AgentError> {
    if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
        return Err(AgentError::Config(
            "token length must be 1..=256 bytes".into(),
        ));
    }
    let hello = encode_hello(
        Mode::ChunkHashes,
        item_id,
        token,
        disk_index,
        chunk_size_bytes,
    );
    let (stream, reply) = match handshake(addr, &hello, timeout, timeout) {
        Ok(done) => done,
        Err(HandshakeError::Fatal(error)) => return Err(error),
        Err(HandshakeError::Retry { status, message }) => {
            return Err(AgentError::Refused {
                addr,
                status,
                message,
            });
        }
        Err(HandshakeError::Transient(last_error)) => {
            return Err(AgentError::Unreachable {
                addr,
                attempts: 1,
                last_error,
            });
        }
    };
    if reply.status != 0 {
        return Err(AgentError::Refused {
            addr,
            status: RefusalStatus::from_u8(reply.status),
            message: reply.message,
        });
    }
    if reply.payload_len_bytes > max_list_bytes {
        return Err(AgentError::Protocol {
            addr,
            what: format!(
                "hash list of {} bytes, over this agent's limit of {max_list_bytes}",
                reply.payload_len_bytes
            ),
        });
    }
    let mut payload = Vec::new();
    (&stream)
        .take(reply.payload_len_bytes)
        .read_to_end(&mut payload)
        .map_err(|e| AgentError::Unreachable {
            addr,
            attempts: 1,
            last_error: format!("reading the hash list: {e}"),
        })?;
    if payload.len() as u64 != reply.payload_len_bytes {
        return Err(AgentError::Protocol {
            addr,
            what: format!(
                "hash list cut at {} of {} bytes",
                payload.len(),
                reply.payload_len_bytes
            ),
        });
    }
    ChunkHashes::decode(&payload).map_err(|e| AgentError::Protocol {
        addr,
        what: format!("hash list: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let mut config = AgentConfig::new(
            "127.0.0.1:1".parse().unwrap(),
            [0; 16],
            b"t",
            "x",
            vec![DiskGeometry {
                size_bytes: 4096,
                block_size_bytes: 4096,
            }],
        );
        config.backoff_initial = Duration::from_millis(10);
        config.backoff_max = Duration::from_millis(50);
        let delays: Vec<u128> = (1..6).map(|n| config.backoff(n).as_millis()).collect();
        assert_eq!(delays, vec![10, 20, 40, 50, 50]);
        assert!(config.validate().is_ok());
        config.token.clear();
        assert!(matches!(config.validate(), Err(AgentError::Config(_))));
    }

    #[test]
    fn the_resync_setting_sets_the_flag_on_the_stream_hello() {
        let mut config = AgentConfig::new(
            "127.0.0.1:1".parse().unwrap(),
            *b"item-0123456789a",
            b"tok",
            "x",
            vec![DiskGeometry {
                size_bytes: 4096,
                block_size_bytes: 4096,
            }],
        );
        assert!(!config.resync);
        let plain = stream_hello(&config);
        assert_eq!(plain[7], 0);
        assert_eq!(
            plain,
            encode_hello(Mode::Stream, &config.item_id, b"tok", 0, 0)
        );
        config.resync = true;
        let resync = stream_hello(&config);
        assert_eq!(resync[7], engine::port::HELLO_FLAG_RESYNC);
        let mut fixed = [0u8; engine::port::HELLO_FIXED_BYTES];
        fixed.copy_from_slice(&resync[..engine::port::HELLO_FIXED_BYTES]);
        let head = engine::port::decode_hello_fixed(&fixed).unwrap();
        assert!(head.resync);
        assert_eq!(head.mode, Mode::Stream);
        assert!(format!("{config:?}").contains("resync: true"));
    }

    #[test]
    fn resync_required_and_not_replicating_are_final_and_named() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let refused = |code: u8| AgentError::Refused {
            addr,
            status: RefusalStatus::from_u8(code),
            message: "m".into(),
        };
        assert!(refused(7).needs_resync());
        assert_eq!(
            refused(7).refusal_status(),
            Some(RefusalStatus::ResyncRequired)
        );
        assert!(!refused(16).needs_resync());
        assert_eq!(
            refused(16).refusal_status(),
            Some(RefusalStatus::NotReplicating)
        );
        assert!(refused(16).to_string().contains("not-replicating"));
        assert!(!RefusalStatus::NotReplicating.is_transient());
        assert!(!RefusalStatus::ResyncRequired.is_transient());
        let closed = AgentError::Closed {
            reason: CloseReason::ResyncRequired,
            message: "m".into(),
        };
        assert!(closed.needs_resync());
        assert_eq!(closed.refusal_status(), None);
        assert!(!AgentError::Stopped.needs_resync());
    }

    #[test]
    fn unknown_codes_are_named_not_fatal_to_parse() {
        // The codes are engine::port's (tested there); these are the names this API exports.
        assert_eq!(RefusalStatus::from_u8(200), RefusalStatus::Other(200));
        assert_eq!(RefusalStatus::from_u8(5).to_string(), "bad-token");
        assert!(!CloseReason::from_u8(99).is_transient());
        assert!(CloseReason::from_u8(2).is_transient());
    }
}
