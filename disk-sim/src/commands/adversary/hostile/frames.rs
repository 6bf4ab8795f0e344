//! Hostile frames: broken payloads, frames out of sequence, resync blocks outside a RESYNC
//! session, each judged by the appliance's answer.

use std::net::TcpStream;
use std::time::{Duration, Instant};

use super::*;
use crate::commands::adversary::wire::{
    ENCODING_RAW, ENCODING_ZSTD, KIND_RESYNC_BLOCK, KIND_WRITE, RawFrame, RawHello, Record,
    connect, half_close, read_record, read_reply, send, stream_header, zstd_frame, zstd_rle_frame,
};
use crate::rng::Rng;

/// What a frame session must end with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Expect {
    /// A close refusing the frame (`corrupt-frame` or `wrong-stream`), nothing of it durable.
    Refusal,
    /// A close `invalid-payload` (the payload does not give its declared length), nothing of it
    /// durable.
    InvalidPayload,
    /// An ack covering the frame, then (after our half-close) `end-of-stream`.
    Ack,
    /// `end-of-stream`, with the socket still open.
    EndOfStream,
}

/// Opens a mode-1 session on target `t`, retrying `busy` up to 10 times 50 ms apart as the
/// documents advise; the reply's next seq, or the outcome of a refusal.
pub(super) fn open_session(ctx: &Context, t: &Target) -> Result<(TcpStream, u64), Outcome> {
    let mut attempts = 0;
    loop {
        match open_session_once(ctx, t) {
            Err(outcome) if outcome.answer.starts_with("refused busy") && attempts < 10 => {
                attempts += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            result => return result,
        }
    }
}

pub(super) fn open_session_once(ctx: &Context, t: &Target) -> Result<(TcpStream, u64), Outcome> {
    let mut stream = connect(ctx.data_addr)
        .map_err(|e| Outcome::bad("connect failed", format!("connect: {e}")))?;
    let hello = RawHello::valid(1, t.id, &t.token, 0, 0).encode();
    if let Err(error) = send(&mut stream, &hello) {
        return Err(Outcome::bad(
            "hello not sent",
            format!("writing a valid hello: {error}"),
        ));
    }
    match read_reply(&mut stream, Instant::now() + ctx.answer_timeout) {
        Ok(Ok(reply)) if reply.status == 0 => Ok((stream, reply.next_seq)),
        Ok(Ok(reply)) if transient(reply.status) || reply.status == 7 => Err(Outcome::ok(format!(
            "refused {} (frame not sent)",
            status_name(reply.status)
        ))),
        Ok(Ok(reply)) => Err(Outcome::bad(
            format!("refused {}", status_name(reply.status)),
            format!(
                "a valid stream hello for {} refused: {}: {}",
                t.name,
                status_name(reply.status),
                reply.message
            ),
        )),
        Ok(Err(malformed)) => Err(Outcome::bad("malformed reply", malformed)),
        Err(silence) => Err(Outcome::bad(
            format!("hello: {silence}"),
            format!(
                "a valid stream hello for {}: {silence} within {:?}",
                t.name, ctx.answer_timeout
            ),
        )),
    }
}

/// A payload length: 4 KiB to 128 KiB, in 4 KiB.
pub(super) fn length(rng: &mut Rng) -> u64 {
    4096 * (1 + rng.below(32))
}

pub(super) fn data(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    if rng.chance(1, 2) {
        rng.fill(&mut bytes);
    } else {
        let byte = rng.below(256) as u8;
        bytes.fill(byte);
    }
    bytes
}

pub(super) fn write(
    seq: u64,
    disk: u16,
    offset: u64,
    length: u64,
    encoding: u8,
    payload: Vec<u8>,
) -> RawFrame {
    RawFrame {
        kind: KIND_WRITE,
        encoding,
        disk_index: disk,
        seq,
        offset_bytes: offset,
        length_bytes: length,
        payload,
    }
}

/// The frames of `kind` for a session whose reply said `n`: (first seq of the header, frames,
/// what must happen, a short variant name).
pub(super) fn frames_for(
    kind: HostileKind,
    t: &Target,
    n: u64,
    rng: &mut Rng,
) -> (u64, Vec<RawFrame>, Expect, &'static str) {
    use HostileKind::*;
    let disk = rng.below(t.disks.len() as u64) as u16;
    let geometry = t.disks[usize::from(disk)];
    let len = length(rng).min(geometry.size_bytes);
    let offset = rng.below((geometry.size_bytes - len) / 4096 + 1) * 4096;
    let l = len as usize;
    let zstd = |seq, payload| write(seq, disk, offset, len, ENCODING_ZSTD, payload);
    match kind {
        ZstdGarbage => {
            let mut garbage = vec![0u8; 16 + rng.below(4096) as usize];
            rng.fill(&mut garbage);
            garbage[0] = 0; // never the zstd magic
            (
                n,
                vec![zstd(n, garbage)],
                Expect::InvalidPayload,
                "random bytes",
            )
        }
        ZstdTruncated => {
            let whole = zstd_frame(&data(rng, l), Some(len));
            let cut = 1 + rng.below(whole.len() as u64 - 1) as usize;
            (
                n,
                vec![zstd(n, whole[..cut].to_vec())],
                Expect::InvalidPayload,
                "cut",
            )
        }
        ZstdShort => {
            let short = l - 4096 * (1 + rng.below(len / 4096) as usize).min(l);
            let payload = zstd_frame(&data(rng, short), None);
            (
                n,
                vec![zstd(n, payload)],
                Expect::InvalidPayload,
                "no content size",
            )
        }
        ZstdLong => {
            if rng.chance(1, 3) {
                let total = (8 + rng.below(57) as usize) << 20;
                let payload = zstd_rle_frame(rng.below(256) as u8, total);
                (
                    n,
                    vec![zstd(n, payload)],
                    Expect::InvalidPayload,
                    "rle bomb",
                )
            } else {
                let long = l + 512 * (1 + rng.below(64) as usize);
                let payload = zstd_frame(&data(rng, long), None);
                (
                    n,
                    vec![zstd(n, payload)],
                    Expect::InvalidPayload,
                    "no content size",
                )
            }
        }
        ZstdWrongSize => {
            let other = if rng.chance(1, 2) {
                len + 4096 * (1 + rng.below(16))
            } else {
                len / 2
            };
            if rng.chance(1, 2) {
                // Declares `other`, holds `len` bytes.
                let payload = zstd_frame(&data(rng, l), Some(other));
                (
                    n,
                    vec![zstd(n, payload)],
                    Expect::InvalidPayload,
                    "declared ≠ content",
                )
            } else {
                // Consistent frame of `other` bytes.
                let payload = zstd_frame(&data(rng, other as usize), Some(other));
                (
                    n,
                    vec![zstd(n, payload)],
                    Expect::InvalidPayload,
                    "declared ≠ length",
                )
            }
        }
        ZstdConcatWrongTotal => {
            let (first, second) = concat_wrong_sizes(l, rng);
            let mut payload = zstd_frame(&data(rng, first), Some(first as u64));
            payload.extend(zstd_frame(&data(rng, second), Some(second as u64)));
            (
                n,
                vec![zstd(n, payload)],
                Expect::InvalidPayload,
                "two frames",
            )
        }
        ZstdConcatValid => {
            let first = 1 + rng.below(len - 1) as usize;
            let content = data(rng, l);
            let mut payload = zstd_frame(&content[..first], Some(first as u64));
            payload.extend(zstd_frame(&content[first..], Some((l - first) as u64)));
            (n, vec![zstd(n, payload)], Expect::Ack, "two frames")
        }
        RawWrongLength => {
            let wrong = if rng.chance(1, 2) {
                l - 512 * (1 + rng.below(8) as usize).min(l / 512)
            } else {
                l + 512 * (1 + rng.below(8) as usize)
            };
            let frame = write(n, disk, offset, len, ENCODING_RAW, data(rng, wrong));
            (n, vec![frame], Expect::Refusal, "raw")
        }
        SeqGap => {
            let seq = n + 1 + rng.below(5);
            (
                n,
                vec![RawFrame::zero(disk, seq, offset, len)],
                Expect::Refusal,
                "gap",
            )
        }
        SeqReorder => {
            let frame = RawFrame::zero(disk, n.saturating_sub(1 + rng.below(3)), offset, len);
            (n, vec![frame], Expect::Refusal, "below first seq")
        }
        SeqDuplicate if n >= 2 => {
            // The first copy is a resend below next_seq (skipped); the second repeats it.
            let frames = vec![
                RawFrame::zero(disk, n - 1, offset, len),
                RawFrame::zero(disk, n - 1, offset, len),
            ];
            (n - 1, frames, Expect::Refusal, "duplicate")
        }
        SeqDuplicate => (
            n,
            vec![RawFrame::zero(disk, n + 1, offset, len)],
            Expect::Refusal,
            "gap (no seq below next_seq yet)",
        ),
        FirstSeqAhead => {
            let first = n + 1 + rng.below(100);
            (
                first,
                vec![RawFrame::zero(disk, first, offset, len)],
                Expect::Refusal,
                "ahead",
            )
        }
        ResyncOutside => {
            let frame = RawFrame {
                kind: KIND_RESYNC_BLOCK,
                ..write(n, disk, offset, len, ENCODING_RAW, data(rng, l))
            };
            (
                n,
                vec![frame],
                Expect::Ack,
                "raw resync block (valid in any session)",
            )
        }
        _ => (n, vec![RawFrame::end(n)], Expect::EndOfStream, "end frame"),
    }
}

/// Sizes of two zstd frames whose total is never `length_bytes` (a multiple of 4096): short
/// (the second frame half of what is missing) or long (4096 bytes too many). When the first
/// frame alone is the whole length, only "long" is wrong: a second empty frame would make a
/// valid payload.
pub(super) fn concat_wrong_sizes(length_bytes: usize, rng: &mut Rng) -> (usize, usize) {
    let first = 4096 * (1 + rng.below(length_bytes as u64 / 4096)) as usize;
    let second = if first < length_bytes && rng.chance(1, 2) {
        (length_bytes - first) / 2
    } else {
        length_bytes - first + 4096
    };
    (first, second)
}

pub(super) fn frame_attack(kind: HostileKind, ctx: &Context, rng: &mut Rng) -> Outcome {
    let hostile_only = matches!(
        kind,
        HostileKind::ZstdConcatValid | HostileKind::ResyncOutside
    );
    let Some(index) = pick(ctx, rng, hostile_only) else {
        return Outcome::ok("skipped (no hostile item)");
    };
    let t = &ctx.targets[index];
    if let Some(agent) = &t.agent
        && rng.chance(1, 2)
    {
        // Free the lease now and then, so a hostile session gets in between the agent's.
        agent.drop_connection();
    }
    let (mut stream, n) = match open_session(ctx, t) {
        Ok(session) => session,
        Err(outcome) => return outcome,
    };
    let (first_seq, frames, expect, variant) = frames_for(kind, t, n, rng);
    let mut bytes = stream_header(&t.id, &t.name, first_seq, &t.disks);
    for frame in &frames {
        bytes.extend_from_slice(&frame.encode());
    }
    let write_error = send(&mut stream, &bytes).err();
    let outcome = judge(&mut stream, n, expect, ctx.answer_timeout);
    if expect == Expect::Ack && outcome.failure.is_none() {
        let mut controls = ctx.controls.lock().unwrap_or_else(|p| p.into_inner());
        let seq = controls.entry(index).or_insert(0);
        *seq = (*seq).max(n);
    }
    match (&outcome.failure, write_error) {
        (Some(why), Some(error)) => Outcome::bad(
            outcome.answer,
            format!(
                "{} ({variant}), item {}: {why} (our write failed: {error})",
                kind.name(),
                t.name
            ),
        ),
        (Some(why), None) => Outcome::bad(
            outcome.answer,
            format!("{} ({variant}), item {}: {why}", kind.name(), t.name),
        ),
        (None, _) => outcome,
    }
}

/// Reads records after our frames (the first of them at seq `n`) and judges them.
pub(super) fn judge(stream: &mut TcpStream, n: u64, expect: Expect, timeout: Duration) -> Outcome {
    let deadline = Instant::now() + timeout;
    let mut acked = false;
    loop {
        match read_record(stream, deadline) {
            Ok(Record::Ack(seq)) if seq >= n => {
                if expect != Expect::Ack {
                    half_close(stream);
                    return Outcome::bad(
                        "ACKNOWLEDGED",
                        format!("a hostile frame at seq {n} was acknowledged (ack {seq})"),
                    );
                }
                acked = true;
                half_close(stream);
            }
            Ok(Record::Ack(_)) => {}
            Ok(Record::Close {
                reason,
                seq,
                message,
            }) => {
                let name = reason_name(reason);
                return match expect {
                    Expect::Ack if acked && reason == 1 => {
                        Outcome::ok("acknowledged, close end-of-stream")
                    }
                    Expect::Ack => Outcome::bad(
                        format!("close {name}"),
                        format!("a valid frame at seq {n} was refused: close {name}: {message}"),
                    ),
                    _ if seq >= n => Outcome::bad(
                        "ACKNOWLEDGED (close seq)",
                        format!("close {name} says seq {seq} ≥ the hostile frame's {n} is durable"),
                    ),
                    Expect::Refusal if reason == 2 || reason == 3 => {
                        Outcome::ok(format!("close {name}"))
                    }
                    Expect::InvalidPayload if reason == 10 => Outcome::ok(format!("close {name}")),
                    Expect::EndOfStream if reason == 1 => Outcome::ok(format!("close {name}")),
                    _ => Outcome::bad(
                        format!("close {name}"),
                        format!("unexpected close {name}: {message}"),
                    ),
                };
            }
            Ok(Record::Unknown(kind)) => {
                return Outcome::bad("unknown record", format!("a record of unknown kind {kind}"));
            }
            Err(silence) => {
                let what = match expect {
                    Expect::Ack if acked => "no close after our half-close",
                    Expect::Ack => "no ack of a valid frame",
                    Expect::Refusal | Expect::InvalidPayload => "no refusal of a broken frame",
                    Expect::EndOfStream => "no close after an end frame (socket left open)",
                };
                return Outcome::bad(
                    format!("{silence}"),
                    format!("{what}: {silence} within {timeout:?}"),
                );
            }
        }
    }
}
