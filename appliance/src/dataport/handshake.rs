//! A data-port connection's handshake: the hello read within its deadline (a dropped or
//! stopping connection refused by name), then the dispatch to a session by mode.

use std::io::{self, ErrorKind, Read};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use engine::port::{
    HELLO_FIXED_BYTES, HELLO_MAGIC, Hello, Mode, Refusal, Status, decode_hello_fixed,
};

use super::close::refuse;
use super::config::DataPortConfig;
use super::conn::{Phase, PortShared};
use super::hashes::serve_hashes;
use super::session::serve_stream;

/// How reading the hello failed.
pub(super) enum HelloReadError {
    Timeout,
    Eof { got_bytes: usize },
    Io(io::Error),
}

/// Fills `buf` before `deadline` (a slow sender cannot stretch it).
pub(super) fn read_by(
    stream: &TcpStream,
    buf: &mut [u8],
    deadline: Instant,
    already: usize,
) -> Result<(), HelloReadError> {
    let mut filled = 0;
    while filled < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HelloReadError::Timeout);
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(HelloReadError::Io)?;
        match (&*stream).read(&mut buf[filled..]) {
            Ok(0) => {
                return Err(HelloReadError::Eof {
                    got_bytes: already + filled,
                });
            }
            Ok(n) => filled += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(HelloReadError::Io(e)),
        }
    }
    Ok(())
}

pub(super) fn read_hello(
    shared: &PortShared,
    stream: &TcpStream,
    dropped: &AtomicBool,
) -> Result<Hello, Refusal> {
    let timeout = shared.config.handshake_timeout;
    let deadline = Instant::now() + timeout;
    let named = |error: HelloReadError| {
        if dropped.load(Ordering::Acquire) {
            return dropped_refusal(&shared.config);
        }
        if shared.stopping() {
            return Refusal::new(Status::ShuttingDown, "the appliance is shutting down");
        }
        match error {
            HelloReadError::Timeout => Refusal::new(
                Status::HandshakeTimeout,
                format!(
                    "no complete hello within the {} ms handshake timeout",
                    timeout.as_millis()
                ),
            ),
            HelloReadError::Eof { got_bytes } => Refusal::new(
                Status::BadHello,
                format!("the connection ended after {got_bytes} bytes of the hello"),
            ),
            HelloReadError::Io(e) => {
                Refusal::new(Status::BadHello, format!("reading the hello failed: {e}"))
            }
        }
    };
    let mut fixed = [0u8; HELLO_FIXED_BYTES];
    // The magic first: a stranger (an HTTP probe) is told at once, not after a timeout.
    read_by(stream, &mut fixed[..4], deadline, 0).map_err(named)?;
    if fixed[..4] != HELLO_MAGIC {
        return Err(decode_hello_fixed(&fixed).err().unwrap_or_else(|| {
            Refusal::new(Status::BadHello, "bad hello magic (expected \"DRDP\")")
        }));
    }
    read_by(stream, &mut fixed[4..], deadline, 4).map_err(named)?;
    let head = decode_hello_fixed(&fixed)?;
    let mut token = vec![0u8; head.token_len]; // ≤ MAX_TOKEN_BYTES
    read_by(stream, &mut token, deadline, HELLO_FIXED_BYTES).map_err(named)?;
    Ok(head.with_token(token))
}

/// The refusal of a connection dropped to make room for newer ones.
pub(super) fn dropped_refusal(config: &DataPortConfig) -> Refusal {
    Refusal::new(
        Status::TooManyConnections,
        format!(
            "dropped before its hello was complete: the data port holds at most {} \
             unauthenticated connections ({} per address), and this was the oldest",
            config.max_handshakes, config.max_handshakes_per_ip
        ),
    )
}

pub(super) fn serve_connection(shared: &PortShared, stream: &TcpStream, id: u64) {
    let peer = stream.peer_addr().ok();
    let _ = stream.set_nodelay(true);
    if let Err(error) = stream.set_write_timeout(Some(shared.config.write_timeout)) {
        tracing::warn!(conn = id, %error, "cannot set the write timeout; dropping connection");
        return;
    }
    let dropped = shared
        .sockets()
        .get(&id)
        .map_or_else(|| Arc::new(AtomicBool::new(false)), |c| c.dropped.clone());
    let hello = match read_hello(shared, stream, &dropped) {
        Ok(hello) => hello,
        Err(refusal) => return refuse(shared, stream, id, 0, &refusal),
    };
    let mode = hello.mode as u8;
    if shared.set_phase(id, Phase::Checking) == Some(Phase::Dropped) {
        return refuse(shared, stream, id, mode, &dropped_refusal(&shared.config));
    }
    // From here `end_item` reaches the connection (a failover ends a hashing too).
    shared.set_item(id, hello.item_id);
    if shared.stopping() {
        let refusal = Refusal::new(Status::ShuttingDown, "the appliance is shutting down");
        return refuse(shared, stream, id, mode, &refusal);
    }
    tracing::debug!(conn = id, ?peer, ?hello, "data port hello");
    match hello.mode {
        Mode::Stream => serve_stream(shared, stream, id, &hello),
        Mode::ChunkHashes => serve_hashes(shared, stream, id, &hello),
    }
}
