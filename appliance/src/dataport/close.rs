//! Ending a data-port connection so the peer reads the last reply or record: refusals (from
//! the accept thread without blocking, or from a connection's thread) and the close drain.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use engine::port::{Refusal, Status, encode_reply};

use super::conn::{Phase, PortShared};

/// Most bytes read and discarded after a close or refusal, waiting for the peer's EOF.
const MAX_DRAIN_BYTES: u64 = 64 << 20;

/// Refuses from the accept thread: read what has already arrived (so closing does not reset
/// the connection over unread bytes), send the reply, close. Never blocks.
pub(super) fn refuse_without_blocking(stream: &TcpStream, status: Status, message: &str) {
    tracing::info!(peer = ?stream.peer_addr().ok(), %status, message, "data port refused");
    if stream.set_nonblocking(true).is_ok() {
        let mut buf = [0u8; 4096];
        let mut budget = 16;
        while budget > 0 && matches!((&*stream).read(&mut buf), Ok(n) if n > 0) {
            budget -= 1;
        }
    }
    let _ = (&*stream).write_all(&encode_reply(status, 0, 0, 0, message));
    let _ = stream.shutdown(Shutdown::Write);
}

/// Half-closes and reads until the peer's EOF (or the timeout, or a byte budget), so that
/// what was just written is not destroyed by a reset over unread input.
pub(super) fn drain_and_close(stream: &TcpStream, timeout: Duration) {
    let _ = stream.shutdown(Shutdown::Write);
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 16 * 1024];
    let mut drained = 0u64;
    while drained < MAX_DRAIN_BYTES {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            break;
        }
        match (&*stream).read(&mut buf) {
            Ok(0) => break,
            Ok(n) => drained += n as u64,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
}

pub(super) fn refuse(
    shared: &PortShared,
    stream: &TcpStream,
    id: u64,
    mode: u8,
    refusal: &Refusal,
) {
    // Counted as unauthenticated again (and droppable) while the reply drains.
    shared.set_phase(id, Phase::Refused);
    tracing::info!(
        peer = ?stream.peer_addr().ok(),
        status = %refusal.status,
        message = %refusal.message,
        "data port refused a session"
    );
    let reply = encode_reply(refusal.status, mode, 0, 0, &refusal.message);
    if (&*stream).write_all(&reply).is_ok() {
        drain_and_close(stream, shared.config.close_drain_timeout);
    }
}
