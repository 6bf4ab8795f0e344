//! The agent's settings, the faults tests inject, and the counters it keeps.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use engine::delta::{DiskGeometry, EncoderOptions, StreamHeader};
use engine::port::MAX_TOKEN_BYTES;

use super::CloseReason;
use super::error::AgentError;

/// Called with each new acknowledged sequence number (monotonic).
pub type AckObserver = Arc<dyn Fn(u64) + Send + Sync>;

/// Settings of an [`Agent`](super::Agent).
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
            .field("item_id", &hex::encode(self.item_id))
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

    pub(super) fn validate(&self) -> Result<(), AgentError> {
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

    pub(super) fn header(&self, first_seq: u64) -> StreamHeader {
        StreamHeader {
            item_id: self.item_id,
            item_name: self.item_name.clone(),
            first_seq,
            disks: self.disks.clone(),
        }
    }

    pub(super) fn backoff(&self, failures: u32) -> Duration {
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
    pub(super) fn seq(&self) -> u64 {
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
