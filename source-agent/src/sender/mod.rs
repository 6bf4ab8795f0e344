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
use std::net::Shutdown;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use engine::delta::{BOOKMARK_FIXED_BYTES, Consistency, DeltaEncoder, FRAME_HEADER_BYTES};
pub use engine::port::{
    HELLO_MAGIC, MAX_MESSAGE_BYTES, MAX_TOKEN_BYTES, PROTOCOL_VERSION, REPLY_MAGIC,
    ReceivedCloseReason as CloseReason, RefusalStatus,
};

mod config;
mod error;
mod hashes;
mod link;
mod state;
#[cfg(test)]
mod tests;

pub use config::{AckObserver, AgentConfig, AgentStats, CloseInfo, Fault};
pub use error::AgentError;
pub use hashes::fetch_chunk_hashes;
use link::{connect_with_retry, link_loop};
use state::{Closing, Encoder, FrameSink, Pending, Shared, State};

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

    /// Whether a session with the appliance is up now (an idle agent whose connection
    /// ended reconnects only when it has something to send).
    pub fn is_connected(&self) -> bool {
        self.shared.state().connected.is_some()
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
