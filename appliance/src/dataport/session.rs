//! Mode 1: one streaming session — frames ingested and staged, acks after each group commit,
//! and the close record naming why the session ended.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use engine::delta::DecodeErrorReason;
use engine::error::report;
use engine::ingest::{IngestError, ingest_stream};
use engine::port::{
    CloseReason, Hello, Mode, Refusal, Status, encode_ack, encode_close, encode_reply,
};
use engine::staging::{Pressure, StagingError};

use super::close::{drain_and_close, refuse};
use super::conn::PortShared;
use super::registry::StreamSession;

/// Records the first 40 bytes read (through the stream header's `first_seq`), so that a
/// decode error can be reported with the sequence number of the bad frame.
///
/// Once the port is shutting down (or the session was ended) it reports the end of input, so
/// that the session ends at the next frame boundary even if the agent keeps sending.
pub(super) struct Tap<'a> {
    inner: &'a TcpStream,
    stopping: &'a AtomicBool,
    ended: &'a AtomicBool,
    head: [u8; 40],
    seen: usize,
}

impl Tap<'_> {
    pub(super) fn first_seq(&self) -> Option<u64> {
        let mut raw = [0u8; 8];
        raw.copy_from_slice(&self.head[32..40]);
        (self.seen >= 40).then_some(u64::from_le_bytes(raw))
    }
}

impl Read for Tap<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.stopping.load(Ordering::Acquire) || self.ended.load(Ordering::Acquire) {
            return Ok(0);
        }
        let n = self.inner.read(buf)?;
        let take = n.min(self.head.len() - self.seen);
        self.head[self.seen..self.seen + take].copy_from_slice(&buf[..take]);
        self.seen += take;
        Ok(n)
    }
}

pub(super) fn serve_stream(shared: &PortShared, stream: &TcpStream, id: u64, hello: &Hello) {
    let config = &shared.config;
    let session = match shared
        .registry
        .open_stream(&hello.item_id, &hello.token, hello.resync)
    {
        Ok(session) => session,
        Err(refusal) => return refuse(shared, stream, id, Mode::Stream as u8, &refusal),
    };
    if let Err(refusal) = shared.admit_session(id) {
        drop(session);
        return refuse(shared, stream, id, Mode::Stream as u8, &refusal);
    }
    let StreamSession { log, lease } = session;
    let mut guard = match log.lock() {
        Ok(guard) => guard,
        Err(_) => {
            let refusal = Refusal::new(
                Status::StagingFailed,
                "an earlier session on this item panicked while holding its staging log",
            );
            return refuse(shared, stream, id, Mode::Stream as u8, &refusal);
        }
    };
    if let Some(reason) = guard.resync_required() {
        if !hello.resync {
            let refusal = Refusal::new(Status::ResyncRequired, reason);
            return refuse(shared, stream, id, Mode::Stream as u8, &refusal);
        }
        // The agent fetched the hashes and now sends what differs. Every staged frame is
        // applied (the registry made sure), so the log starts afresh at its next seq.
        let next_seq = guard.next_seq();
        if let Err(error) = guard.resync_done(next_seq) {
            let refusal = Refusal::new(
                Status::StagingFailed,
                format!("starting the resync session: {}", report(&error)),
            );
            return refuse(shared, stream, id, Mode::Stream as u8, &refusal);
        }
        tracing::info!(conn = id, item = %hex::encode(hello.item_id), next_seq, "resync session");
    }
    let next_seq = guard.next_seq();
    if next_seq != guard.durable_seq().wrapping_add(1) {
        let refusal = Refusal::new(
            Status::StagingFailed,
            format!(
                "frames through seq {} were appended but never made durable (an earlier flush \
                 failed); the staging log must be reopened",
                next_seq.wrapping_sub(1)
            ),
        );
        return refuse(shared, stream, id, Mode::Stream as u8, &refusal);
    }
    let reply = encode_reply(
        Status::Ok,
        Mode::Stream as u8,
        next_seq,
        0,
        &format!("send frames from seq {next_seq}"),
    );
    if (&*stream).write_all(&reply).is_err() {
        return;
    }
    shared.sessions_started.fetch_add(1, Ordering::AcqRel);
    let item = hex::encode(hello.item_id);
    tracing::info!(conn = id, %item, next_seq, "data port session started");
    if stream.set_read_timeout(Some(config.idle_timeout)).is_err() {
        return;
    }
    let ended = shared.sockets().get(&id).map_or_else(
        || Arc::new(AtomicBool::new(false)),
        |conn| conn.ended.clone(),
    );
    let mut tap = Tap {
        inner: stream,
        stopping: &shared.shutting_down,
        ended: &ended,
        head: [0u8; 40],
        seen: 0,
    };
    let mut acks_broken = false;
    let result = ingest_stream(
        &mut tap,
        &mut guard,
        config.ingest,
        &mut |acked, pressure| {
            if acks_broken {
                return;
            }
            if let Pressure::Slow(delay) = pressure {
                std::thread::sleep(delay.min(config.max_backpressure_delay));
            }
            if (&*stream).write_all(&encode_ack(acked)).is_err() {
                // The agent does not read its acks: end the session (the reader sees EOF).
                acks_broken = true;
                let _ = stream.shutdown(Shutdown::Both);
            }
        },
    );
    let durable_seq = guard.durable_seq();
    // Release the item before telling the agent, so that its reconnect finds it free.
    drop(guard);
    drop(lease);
    let (reason, message) = close_reason(
        shared,
        &result,
        tap.first_seq(),
        ended.load(Ordering::Acquire),
    );
    match &result {
        Ok(report) => tracing::info!(
            conn = id, %item, staged = report.frames_staged, skipped = report.frames_skipped,
            durable_seq, %reason, "data port session ended"
        ),
        Err(_) => tracing::warn!(
            conn = id, %item, durable_seq, %reason, message = %message, "data port session closed"
        ),
    }
    if !acks_broken
        && (&*stream)
            .write_all(&encode_close(reason, durable_seq, &message))
            .is_ok()
    {
        drain_and_close(stream, config.close_drain_timeout);
    }
}

/// Where a frame error is, by sequence number when the stream header was read.
pub(super) fn frame_place(error: &engine::delta::DecodeError, first_seq: Option<u64>) -> String {
    match (error.frame_index, first_seq) {
        (Some(index), Some(first)) => format!(
            "frame seq {} (frame {index} of this connection, byte offset {})",
            first.wrapping_add(index),
            error.offset_bytes
        ),
        (Some(index), None) => format!("frame {index}, byte offset {}", error.offset_bytes),
        (None, _) => "stream header".to_owned(),
    }
}

/// Names why a session ended.
pub(super) fn close_reason(
    shared: &PortShared,
    result: &Result<engine::ingest::IngestReport, IngestError>,
    first_seq: Option<u64>,
    ended: bool,
) -> (CloseReason, String) {
    let stopping = shared.stopping() || ended;
    let shutting_down = || {
        (
            CloseReason::ShuttingDown,
            if ended {
                "the appliance stopped this item's session (failover, failback, resync or \
                 disable); reconnecting says whether the item still replicates"
            } else {
                "the appliance is shutting down; reconnect and resume later"
            }
            .to_owned(),
        )
    };
    match result {
        Ok(_) if stopping => shutting_down(),
        Ok(report) if report.ended => (CloseReason::EndOfStream, "end frame received".into()),
        Ok(_) => (
            CloseReason::EndOfStream,
            "the agent closed its stream".into(),
        ),
        Err(IngestError::Decode(error)) => match &error.reason {
            DecodeErrorReason::Io(io)
                if matches!(io.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
            {
                (
                    CloseReason::IdleTimeout,
                    format!(
                        "nothing received for the {} s idle timeout",
                        shared.config.idle_timeout.as_secs_f64()
                    ),
                )
            }
            _ if stopping => shutting_down(),
            DecodeErrorReason::Io(io) => (CloseReason::ReadFailed, format!("read failed: {io}")),
            reason @ (DecodeErrorReason::Decompress { .. }
            | DecodeErrorReason::DecompressedSizeMismatch { .. }) => (
                CloseReason::InvalidPayload,
                format!(
                    "{}: {reason}; nothing of it was staged",
                    frame_place(error, first_seq)
                ),
            ),
            reason => (
                CloseReason::CorruptFrame,
                format!("{}: {reason}", frame_place(error, first_seq)),
            ),
        },
        Err(
            error @ (IngestError::WrongItem { .. }
            | IngestError::WrongDisks { .. }
            | IngestError::Gap { .. }),
        ) => (CloseReason::WrongStream, report(error)),
        Err(error @ IngestError::Staging { source, .. }) => match source {
            StagingError::Full { .. } => (CloseReason::StagingFull, report(error)),
            StagingError::ResyncRequired { .. } => (CloseReason::ResyncRequired, report(error)),
            _ => (CloseReason::StagingFailed, report(error)),
        },
        Err(error) => (CloseReason::StagingFailed, report(error)),
    }
}
