//! What goes wrong in the agent, named.

use std::net::SocketAddr;

use engine::port::RefusalStatus;

use super::CloseReason;

/// What went wrong, named.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// A setting outside its range.
    #[error("agent config: {0}")]
    Config(String),
    /// The appliance refused the hello with a status that retrying does not fix, or with a
    /// transient one (busy, …) on each of `max_attempts` attempts in a row.
    #[error("appliance {addr} refused the session: {status}: {message}")]
    Refused {
        /// The appliance.
        addr: SocketAddr,
        /// The reply status.
        status: RefusalStatus,
        /// The appliance's message.
        message: String,
    },
    /// The appliance closed the session for a reason that resending does not fix.
    #[error("appliance closed the session: {reason}: {message}")]
    Closed {
        /// The close reason.
        reason: CloseReason,
        /// The appliance's message.
        message: String,
    },
    /// Every attempt in a row failed (connect, handshake, or sessions without progress).
    #[error("appliance {addr} unreachable after {attempts} attempts in a row; last: {last_error}")]
    Unreachable {
        /// The appliance.
        addr: SocketAddr,
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        last_error: String,
    },
    /// The appliance sent something the protocol does not allow.
    #[error("protocol violation by appliance {addr}: {what}")]
    Protocol {
        /// The appliance.
        addr: SocketAddr,
        /// What it sent.
        what: String,
    },
    /// The appliance wants a frame it had already acknowledged: acknowledged data was lost.
    #[error(
        "appliance wants seq {server_next_seq}, but it acknowledged seq {acked_seq}: \
         acknowledged frames were lost on the appliance"
    )]
    AcknowledgedFramesLost {
        /// The appliance's next_seq.
        server_next_seq: u64,
        /// The highest acknowledged seq.
        acked_seq: u64,
    },
    /// The appliance wants frames past what this agent has made (its log was reset, e.g. by a
    /// resync): resending would skip frames silently, so the agent stops.
    #[error(
        "appliance wants seq {server_next_seq}, past this agent's next frame {agent_next_seq}; \
         restart the agent (after a resync) from the appliance's seq"
    )]
    ServerAhead {
        /// The appliance's next_seq.
        server_next_seq: u64,
        /// The seq of this agent's next frame.
        agent_next_seq: u64,
    },
    /// `send` waited `send_timeout` for room in the backlog.
    #[error(
        "backlog full: {backlog_bytes} of {limit_bytes} bytes unacknowledged, a frame of up to \
         {frame_bytes} bytes waited {waited_ms} ms"
    )]
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
    #[error(
        "flush timed out after {waited_ms} ms: acknowledged through seq {acked_seq}, frames \
         made through seq {last_seq}"
    )]
    FlushTimeout {
        /// How long it waited.
        waited_ms: u64,
        /// The acknowledged seq.
        acked_seq: u64,
        /// The last frame made.
        last_seq: u64,
    },
    /// The frame does not fit the stream (disk, alignment, range, size, label).
    #[error("cannot encode the frame: {0}")]
    Encode(String),
    /// The agent was closed.
    #[error("the agent is closed")]
    Stopped,
}

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
