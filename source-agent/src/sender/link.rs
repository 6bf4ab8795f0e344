//! The link thread: handshakes, sessions that send the backlog, and the ack reader.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::port::{
    Hello, Mode, RECORD_FIXED_BYTES, REPLY_FIXED_BYTES, Record, RefusalStatus, decode_record,
    decode_reply_fixed,
};

use super::config::{AgentConfig, CloseInfo, Fault};
use super::error::AgentError;
use super::state::Shared;

/// How often blocked reads wake up to check for shutdown and the ack timeout.
pub(super) const POLL: Duration = Duration::from_millis(100);
/// Closes remembered in [`AgentStats::closes`].
pub(super) const MAX_CLOSES_KEPT: usize = 64;

/// A connection whose handshake succeeded.
pub(super) struct Established {
    pub(super) stream: TcpStream,
    pub(super) next_seq: u64,
}

/// Why a handshake failed.
pub(super) enum HandshakeError {
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

/// A reply, parsed.
pub(super) struct Reply {
    pub(super) status: u8,
    pub(super) next_seq: u64,
    pub(super) payload_len_bytes: u64,
    pub(super) message: String,
}

/// Connects, sends `hello`, reads the reply. Transport failures are transient.
pub(super) fn handshake(
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
pub(super) fn stream_hello(config: &AgentConfig) -> Vec<u8> {
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
pub(super) fn stream_handshake(config: &AgentConfig) -> Result<Established, HandshakeError> {
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
pub(super) fn connect_with_retry(
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
pub(super) fn link_loop(shared: &Arc<Shared>, first: Established) {
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
pub(super) fn adopt(shared: &Shared, server_next_seq: u64) -> Result<(), AgentError> {
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

pub(super) enum SessionOutcome {
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
pub(super) fn run_session(shared: &Arc<Shared>, stream: TcpStream) -> SessionOutcome {
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

pub(super) enum ReadOutcome {
    Done,
    /// EOF, error, or the connection is no longer the live one: stop reading.
    Gone,
}

/// Fills `buf`, waking every [`POLL`] to check for shutdown and the ack timeout.
pub(super) fn read_polling(
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
pub(super) fn read_records(shared: &Shared, stream: &TcpStream, generation: u64) {
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
