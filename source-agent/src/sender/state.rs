//! What the caller and the link thread share: the backlog of unacknowledged frames, the
//! acknowledged seq, the live connection, and the frame encoder's buffer.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use engine::delta::DeltaEncoder;

use super::config::{AgentConfig, AgentStats, Fault};
use super::error::AgentError;

pub(super) struct Pending {
    pub(super) seq: u64,
    pub(super) bytes: Arc<Vec<u8>>,
}

pub(super) struct State {
    pub(super) backlog: VecDeque<Pending>,
    pub(super) backlog_bytes: u64,
    /// Seq of the next frame made.
    pub(super) next_seq: u64,
    pub(super) acked_seq: u64,
    /// Generation of the live connection, if any.
    pub(super) connected: Option<u64>,
    pub(super) generation: u64,
    /// A clone of the live socket (to drop it from outside the link thread).
    pub(super) socket: Option<TcpStream>,
    /// Next seq to write on the live connection.
    pub(super) transmit_seq: u64,
    /// Highest seq ever written (to count resends).
    pub(super) highest_transmitted: Option<u64>,
    /// Last time the ack advanced (or a session started).
    pub(super) last_progress: Instant,
    pub(super) fatal: Option<AgentError>,
    pub(super) closing: Option<Closing>,
    pub(super) drop_requested: bool,
    pub(super) faults: Vec<Fault>,
    pub(super) stats: AgentStats,
}

#[derive(Clone, Copy)]
pub(super) struct Closing {
    pub(super) graceful: bool,
    pub(super) deadline: Instant,
}

impl State {
    pub(super) fn frame_at(&self, seq: u64) -> Option<(u64, Arc<Vec<u8>>)> {
        let front = self.backlog.front()?.seq;
        let index = usize::try_from(seq.checked_sub(front)?).ok()?;
        self.backlog.get(index).map(|p| (p.seq, p.bytes.clone()))
    }

    /// Applies an acknowledged seq; returns it if it advanced.
    pub(super) fn ack(&mut self, seq: u64) -> Option<u64> {
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

    pub(super) fn stopped(&self) -> bool {
        self.closing.is_some() || self.fatal.is_some()
    }
}

pub(super) struct Shared {
    pub(super) config: AgentConfig,
    pub(super) state: Mutex<State>,
    pub(super) changed: Condvar,
}

impl Shared {
    pub(super) fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn wait<'a>(
        &self,
        guard: MutexGuard<'a, State>,
        timeout: Duration,
    ) -> MutexGuard<'a, State> {
        match self.changed.wait_timeout(guard, timeout) {
            Ok((guard, _)) => guard,
            Err(poisoned) => poisoned.into_inner().0,
        }
    }

    pub(super) fn observe(&self, acked: Option<u64>) {
        if let (Some(seq), Some(observer)) = (acked, &self.config.ack_observer) {
            observer(seq);
        }
    }

    pub(super) fn fail(&self, error: AgentError) {
        let mut state = self.state();
        if state.fatal.is_none() {
            state.fatal = Some(error);
        }
        drop(state);
        self.changed.notify_all();
    }

    /// Marks connection `generation` as gone and shuts its socket.
    pub(super) fn disconnect(&self, generation: u64) {
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
pub(super) struct Encoder {
    pub(super) encoder: DeltaEncoder<FrameSink>,
    pub(super) sink: Arc<Mutex<Vec<u8>>>,
}

pub(super) struct FrameSink(pub(super) Arc<Mutex<Vec<u8>>>);

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
