//! The hostile kinds: what each one sends to the data port, and how its answer is judged.
//!
//! Each kind is one seeded action over one connection (the idle flood: many). Its
//! [`Outcome`] is a short answer label (aggregated in the summary) and, when the answer is
//! not the one the documents promise, a failure naming what happened.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use engine::delta::DiskGeometry;
use engine::port::{ReceivedCloseReason, RefusalStatus};

use super::wire::{
    ENCODING_RAW, ENCODING_ZSTD, KIND_RESYNC_BLOCK, KIND_WRITE, RawFrame, RawHello, Record, Reply,
    Silence, connect, half_close, read_exact_by, read_record, read_reply, send, stream_header,
    zstd_frame, zstd_rle_frame,
};
use crate::agent::Agent;
use crate::rng::Rng;

macro_rules! kinds {
    ($( $(#[$meta:meta])* $variant:ident => $name:literal, )*) => {
        /// One kind of hostile traffic (`disk-sim adversary --only NAME,…`).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum HostileKind {
            $( $(#[$meta])* $variant, )*
        }

        impl HostileKind {
            /// Every kind, in summary order.
            pub const ALL: &'static [HostileKind] = &[$( HostileKind::$variant, )*];

            /// Its name on the command line and in the summary.
            pub fn name(self) -> &'static str {
                match self {
                    $( HostileKind::$variant => $name, )*
                }
            }
        }
    };
}

kinds! {
    /// A write frame, encoding zstd, whose payload is not zstd at all.
    ZstdGarbage => "zstd-garbage",
    /// A valid zstd frame cut short.
    ZstdTruncated => "zstd-truncated",
    /// A zstd payload without a content size that decompresses to less than the length.
    ZstdShort => "zstd-short",
    /// A zstd payload that decompresses to more than the length (some: RLE bombs of 8-64 MiB).
    ZstdLong => "zstd-long",
    /// A zstd frame header that declares a content size other than the frame's length.
    ZstdWrongSize => "zstd-wrong-size",
    /// Two zstd frames, each with its content size, whose total is not the length.
    ZstdConcatWrongTotal => "zstd-concat-wrong-total",
    /// Control: two zstd frames whose total is the length; must be acknowledged and applied
    /// (hostile items only).
    ZstdConcatValid => "zstd-concat-valid",
    /// A raw write whose payload is not `length` bytes.
    RawWrongLength => "raw-wrong-length",
    /// A frame whose seq skips ahead of the stream's first seq.
    SeqGap => "seq-gap",
    /// A frame whose seq is below the stream's first seq.
    SeqReorder => "seq-reorder",
    /// The same seq twice.
    SeqDuplicate => "seq-duplicate",
    /// A stream header whose first seq is past the reply's next seq.
    FirstSeqAhead => "first-seq-ahead",
    /// A resync-block frame in a session opened without RESYNC (hostile items only): valid in
    /// any session (data-port.md), so it must be acknowledged and applied like a write.
    ResyncOutside => "resync-outside-resync",
    /// A stream header and an end frame, the socket left open: the close must come anyway.
    EndFrame => "end-frame",
    /// Not a data-port client at all (HTTP, TLS, other magic).
    HelloBadMagic => "hello-bad-magic",
    /// Protocol version 0, 2 or 65535.
    HelloBadVersion => "hello-bad-version",
    /// Mode 0, 3 or 255.
    HelloBadMode => "hello-bad-mode",
    /// Undefined flag bits, or RESYNC in mode 2.
    HelloBadFlags => "hello-bad-flags",
    /// Token length 0, 257 or 65535 (no token sent).
    HelloBadTokenLen => "hello-bad-token-len",
    /// Mode 1 with a disk index or chunk size.
    HelloMode1Args => "hello-mode1-args",
    /// An item id that does not exist (modes 1 and 2).
    HelloUnknownItem => "hello-unknown-item",
    /// A wrong token (modes 1 and 2), replicating items included.
    HelloBadToken => "hello-bad-token",
    /// A hello cut short, then the sending half closed.
    HelloCutShort => "hello-cut-short",
    /// Mode 2, valid token, a disk the item does not have.
    HashUnknownDisk => "hash-unknown-disk",
    /// Mode 2, chunk sizes that are not a multiple of 4096 within 4 MiB.
    HashBadChunk => "hash-bad-chunk",
    /// Mode 2, valid: the hash list must come, with the documented size.
    HashOk => "hash-ok",
    /// Mode 1, valid, a stream header, then the sending half closed.
    StreamEmpty => "stream-empty",
    /// A connection that sends nothing for 1 s up to --idle-max-s.
    Idle => "idle",
    /// A valid hello trickled one byte at a time (up to 12 s in all).
    SlowTrickle => "slow-trickle",
    /// --flood idle connections held while a real agent must reconnect and be served.
    IdleFlood => "idle-flood",
}

impl HostileKind {
    /// Parses a name.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|k| k.name() == name)
    }
}

/// An item hostile traffic is aimed at.
#[derive(Debug)]
pub struct Target {
    /// Item id.
    pub id: [u8; 16],
    /// Item name.
    pub name: String,
    /// Its stream token.
    pub token: Vec<u8>,
    /// Its disks.
    pub disks: Vec<DiskGeometry>,
    /// The real agent replicating it, or `None` for an item only hostile traffic uses.
    pub agent: Option<Arc<Agent>>,
}

/// What the hostile workers share.
#[derive(Debug)]
pub struct Context {
    /// The data port.
    pub data_addr: SocketAddr,
    /// Replicating and hostile items.
    pub targets: Vec<Target>,
    /// How long an answer may take.
    pub answer_timeout: Duration,
    /// Longest idle connection.
    pub idle_max: Duration,
    /// Connections of an idle flood.
    pub flood_connections: usize,
    /// How long an agent may take to be served during a flood.
    pub flood_serve_deadline: Duration,
    /// An idle flood is running.
    pub flooding: AtomicBool,
    /// Per target: the highest seq of a valid control frame acknowledged.
    pub controls: Mutex<BTreeMap<usize, u64>>,
}

/// How one action was answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Short label, aggregated in the summary.
    pub answer: String,
    /// Why this answer breaks the documented contract, if it does.
    pub failure: Option<String>,
}

impl Outcome {
    fn ok(answer: impl Into<String>) -> Self {
        Self {
            answer: answer.into(),
            failure: None,
        }
    }

    fn bad(answer: impl Into<String>, why: impl Into<String>) -> Self {
        Self {
            answer: answer.into(),
            failure: Some(why.into()),
        }
    }
}

fn status_name(status: u8) -> String {
    if status == 0 {
        "ok".into()
    } else {
        RefusalStatus::from_u8(status).to_string()
    }
}

fn reason_name(reason: u8) -> String {
    ReceivedCloseReason::from_u8(reason).to_string()
}

/// Refusals that say "try later", acceptable for any hello.
fn transient(status: u8) -> bool {
    RefusalStatus::from_u8(status).is_transient()
}

/// Runs one action of `kind`.
pub fn act(kind: HostileKind, ctx: &Context, rng: &mut Rng) -> Outcome {
    use HostileKind::*;
    match kind {
        ZstdGarbage | ZstdTruncated | ZstdShort | ZstdLong | ZstdWrongSize
        | ZstdConcatWrongTotal | ZstdConcatValid | RawWrongLength | SeqGap | SeqReorder
        | SeqDuplicate | FirstSeqAhead | ResyncOutside | EndFrame => frame_attack(kind, ctx, rng),
        HelloBadMagic | HelloBadVersion | HelloBadMode | HelloBadFlags | HelloBadTokenLen
        | HelloMode1Args | HelloUnknownItem | HelloBadToken | HelloCutShort | HashUnknownDisk
        | HashBadChunk => hello_attack(kind, ctx, rng),
        HashOk => hash_ok(ctx, rng),
        StreamEmpty => stream_empty(ctx, rng),
        Idle => idle(ctx, rng),
        SlowTrickle => slow_trickle(ctx, rng),
        IdleFlood => idle_flood(ctx, rng),
    }
}

fn pick(ctx: &Context, rng: &mut Rng, hostile_only: bool) -> Option<usize> {
    let candidates: Vec<usize> = (0..ctx.targets.len())
        .filter(|&i| !hostile_only || ctx.targets[i].agent.is_none())
        .collect();
    if candidates.is_empty() {
        return None;
    }
    Some(candidates[rng.below(candidates.len() as u64) as usize])
}

// ─────────────────────────── frames ───────────────────────────

/// What a frame session must end with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
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
fn open_session(ctx: &Context, t: &Target) -> Result<(TcpStream, u64), Outcome> {
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

fn open_session_once(ctx: &Context, t: &Target) -> Result<(TcpStream, u64), Outcome> {
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
fn length(rng: &mut Rng) -> u64 {
    4096 * (1 + rng.below(32))
}

fn data(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    if rng.chance(1, 2) {
        rng.fill(&mut bytes);
    } else {
        let byte = rng.below(256) as u8;
        bytes.fill(byte);
    }
    bytes
}

fn write(
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
fn frames_for(
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
fn concat_wrong_sizes(length_bytes: usize, rng: &mut Rng) -> (usize, usize) {
    let first = 4096 * (1 + rng.below(length_bytes as u64 / 4096)) as usize;
    let second = if first < length_bytes && rng.chance(1, 2) {
        (length_bytes - first) / 2
    } else {
        length_bytes - first + 4096
    };
    (first, second)
}

fn frame_attack(kind: HostileKind, ctx: &Context, rng: &mut Rng) -> Outcome {
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
fn judge(stream: &mut TcpStream, n: u64, expect: Expect, timeout: Duration) -> Outcome {
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

// ─────────────────────────── hellos ───────────────────────────

fn hello_attack(kind: HostileKind, ctx: &Context, rng: &mut Rng) -> Outcome {
    use HostileKind::*;
    let index = pick(ctx, rng, false).unwrap_or(0);
    let t = &ctx.targets[index];
    let mode = 1 + rng.below(2) as u8;
    let disk = rng.below(t.disks.len() as u64) as u16;
    let mut hello = RawHello::valid(mode, t.id, &t.token, disk, 64 << 10);
    let mut cut: Option<usize> = None;
    let mut half = false;
    let (expect, variant): (u8, String) = match kind {
        HelloBadMagic => {
            let bytes: Vec<u8> = match rng.below(4) {
                0 => b"GET /v1/items HTTP/1.1\r\nHost: appliance\r\n\r\n".to_vec(),
                1 => vec![0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00],
                2 => b"DRDQ".to_vec(),
                _ => {
                    let mut b = vec![0u8; 4 + rng.below(28) as usize];
                    rng.fill(&mut b);
                    b[0] = b'X';
                    b
                }
            };
            return exchange(ctx, &bytes, false, 1, "not a data-port client");
        }
        HelloBadVersion => {
            hello.version = [0, 2, 0xFFFF][rng.below(3) as usize];
            (2, format!("version {}", hello.version))
        }
        HelloBadMode => {
            hello.mode = [0, 3, 255][rng.below(3) as usize];
            (3, format!("mode {}", hello.mode))
        }
        HelloBadFlags => {
            if rng.chance(1, 3) {
                hello = RawHello::valid(2, t.id, &t.token, disk, 64 << 10);
                hello.flags = 1;
                (1, "RESYNC in mode 2".into())
            } else {
                hello.flags = [0x02, 0x80, 0xFE, 0xFF][rng.below(4) as usize];
                (1, format!("flags {:#04x}", hello.flags))
            }
        }
        HelloBadTokenLen => {
            hello.token_len = [0, 257, 0xFFFF][rng.below(3) as usize];
            hello.token.clear();
            (1, format!("token length {}", hello.token_len))
        }
        HelloMode1Args => {
            hello = RawHello::valid(1, t.id, &t.token, 0, 0);
            if rng.chance(1, 2) {
                hello.disk_index = 1 + rng.below(3) as u16;
            } else {
                hello.chunk_size_bytes = 64 << 10;
            }
            (1, "mode 1 with mode-2 arguments".into())
        }
        HelloUnknownItem => {
            rng.fill(&mut hello.item_id);
            (4, format!("mode {mode}"))
        }
        HelloBadToken => {
            let mut token = t.token.clone();
            match rng.below(3) {
                0 if !token.is_empty() => {
                    let i = rng.below(token.len() as u64) as usize;
                    token[i] ^= 1 + rng.below(255) as u8;
                }
                1 => token.push(b'0'),
                _ => {
                    token = vec![0u8; 1 + rng.below(256) as usize];
                    rng.fill(&mut token);
                }
            }
            if token == t.token {
                token.push(b'x');
            }
            hello.token_len = token.len() as u16;
            hello.token = token;
            (5, format!("mode {mode}"))
        }
        HelloCutShort => {
            let whole = hello.encode().len();
            cut = Some(1 + rng.below(whole as u64 - 1) as usize);
            half = true;
            (
                1,
                format!("mode {mode}, {} of {whole} bytes", cut.unwrap_or(0)),
            )
        }
        HashUnknownDisk => {
            hello = RawHello::valid(2, t.id, &t.token, 0, 64 << 10);
            hello.disk_index = match rng.below(3) {
                0 => t.disks.len() as u16,
                1 => 64,
                _ => 0xFFFF,
            };
            (12, format!("disk {}", hello.disk_index))
        }
        _ => {
            hello = RawHello::valid(2, t.id, &t.token, disk, 0);
            hello.chunk_size_bytes = [
                0,
                1,
                512,
                4095,
                4097,
                12_289,
                (4 << 20) + 4096,
                8 << 20,
                u32::MAX,
            ][rng.below(9) as usize];
            (13, format!("chunk {}", hello.chunk_size_bytes))
        }
    };
    let mut bytes = hello.encode();
    if let Some(cut) = cut {
        bytes.truncate(cut);
    }
    let outcome = exchange(ctx, &bytes, half, expect, &variant);
    match outcome.failure {
        Some(why) => Outcome::bad(
            outcome.answer,
            format!("{} on item {}: {why}", kind.name(), t.name),
        ),
        None => outcome,
    }
}

/// Sends `bytes` (then half-closes when `half`) and reads the reply: `expect`, or a
/// transient refusal, is the documented answer.
fn exchange(ctx: &Context, bytes: &[u8], half: bool, expect: u8, variant: &str) -> Outcome {
    let mut stream = match connect(ctx.data_addr) {
        Ok(stream) => stream,
        Err(e) => return Outcome::bad("connect failed", format!("connect: {e}")),
    };
    let write_error = send(&mut stream, bytes).err();
    if half {
        half_close(&stream);
    }
    let outcome = match read_reply(&mut stream, Instant::now() + ctx.answer_timeout) {
        Ok(Ok(reply)) => judge_reply(&reply, expect, variant),
        Ok(Err(malformed)) => Outcome::bad("malformed reply", format!("{variant}: {malformed}")),
        Err(silence) => Outcome::bad(
            format!("{silence}"),
            format!(
                "{variant}: {silence} within {:?}{}",
                ctx.answer_timeout,
                write_error
                    .map(|e| format!(" (our write failed: {e})"))
                    .unwrap_or_default()
            ),
        ),
    };
    half_close(&stream);
    outcome
}

fn judge_reply(reply: &Reply, expect: u8, variant: &str) -> Outcome {
    let name = status_name(reply.status);
    if reply.status == expect || (reply.status != 0 && transient(reply.status)) {
        Outcome::ok(format!("refused {name}"))
    } else {
        Outcome::bad(
            format!("answered {name}"),
            format!(
                "{variant}: answered {name} ({}), the documented answer is {}",
                reply.message,
                status_name(expect)
            ),
        )
    }
}

fn hash_ok(ctx: &Context, rng: &mut Rng) -> Outcome {
    let index = pick(ctx, rng, false).unwrap_or(0);
    let t = &ctx.targets[index];
    let disk = rng.below(t.disks.len() as u64) as u16;
    let chunk: u32 = [4096, 64 << 10, 1 << 20, 4 << 20][rng.below(4) as usize];
    let mut stream = match connect(ctx.data_addr) {
        Ok(stream) => stream,
        Err(e) => return Outcome::bad("connect failed", format!("connect: {e}")),
    };
    let hello = RawHello::valid(2, t.id, &t.token, disk, chunk).encode();
    let _ = send(&mut stream, &hello);
    // The server applies what it acknowledged before hashing: give it time.
    let deadline = Instant::now() + ctx.answer_timeout.max(Duration::from_secs(30));
    let reply = match read_reply(&mut stream, deadline) {
        Ok(Ok(reply)) => reply,
        Ok(Err(malformed)) => return Outcome::bad("malformed reply", malformed),
        Err(silence) => {
            return Outcome::bad(
                format!("{silence}"),
                format!("hash-ok on item {} disk {disk}: {silence}", t.name),
            );
        }
    };
    if reply.status != 0 {
        return if transient(reply.status) {
            Outcome::ok(format!("refused {}", status_name(reply.status)))
        } else {
            Outcome::bad(
                format!("refused {}", status_name(reply.status)),
                format!(
                    "a valid hash request for {} disk {disk}: {}",
                    t.name, reply.message
                ),
            )
        };
    }
    let size = t.disks[usize::from(disk)].size_bytes;
    let want = 40 + 8 * size.div_ceil(u64::from(chunk));
    if reply.payload_len != want {
        return Outcome::bad(
            "hash list of the wrong size",
            format!(
                "hash list of {} bytes, the documented size is {want}",
                reply.payload_len
            ),
        );
    }
    let mut payload = vec![0u8; want as usize];
    match read_exact_by(&mut stream, &mut payload, deadline) {
        Ok(()) if payload.starts_with(b"DRHASHES") => Outcome::ok("hash list"),
        Ok(()) => Outcome::bad(
            "hash list without DRHASHES",
            "the hash list's magic is not DRHASHES",
        ),
        Err(silence) => Outcome::bad(
            format!("hash list: {silence}"),
            format!("reading the hash list: {silence}"),
        ),
    }
}

fn stream_empty(ctx: &Context, rng: &mut Rng) -> Outcome {
    let index = pick(ctx, rng, false).unwrap_or(0);
    let t = &ctx.targets[index];
    let (mut stream, n) = match open_session(ctx, t) {
        Ok(session) => session,
        Err(outcome) => return outcome,
    };
    // A stream header, then the end of input "between frames" (data-port.md, mode 1).
    let _ = send(&mut stream, &stream_header(&t.id, &t.name, n, &t.disks));
    half_close(&stream);
    let outcome = judge(&mut stream, n, Expect::EndOfStream, ctx.answer_timeout);
    match outcome.failure {
        Some(why) => Outcome::bad(
            outcome.answer,
            format!("stream-empty on item {}: {why}", t.name),
        ),
        None => outcome,
    }
}

// ─────────────────────────── connections ───────────────────────────

fn idle(ctx: &Context, rng: &mut Rng) -> Outcome {
    let hold = Duration::from_millis(
        1000 + rng.below(ctx.idle_max.as_millis().saturating_sub(1000) as u64 + 1),
    );
    let mut stream = match connect(ctx.data_addr) {
        Ok(stream) => stream,
        Err(e) => return Outcome::bad("connect failed", format!("connect: {e}")),
    };
    match read_reply(&mut stream, Instant::now() + hold) {
        Err(Silence::Timeout) => Outcome::ok("held open, no answer"),
        Ok(Ok(reply)) if reply.status == 11 || reply.status == 9 => {
            Outcome::ok(format!("refused {}", status_name(reply.status)))
        }
        Ok(Ok(reply)) => Outcome::bad(
            format!("answered {}", status_name(reply.status)),
            format!(
                "an idle connection was answered {}: {}",
                status_name(reply.status),
                reply.message
            ),
        ),
        Ok(Err(malformed)) => Outcome::bad("malformed reply", malformed),
        Err(silence) => Outcome::bad(
            format!("{silence}"),
            format!("an idle connection (held {hold:?}): {silence}"),
        ),
    }
}

fn slow_trickle(ctx: &Context, rng: &mut Rng) -> Outcome {
    let index = pick(ctx, rng, false).unwrap_or(0);
    let t = &ctx.targets[index];
    let hello = RawHello::valid(1, t.id, &t.token, 0, 0).encode();
    let interval = Duration::from_millis(10 + rng.below(12_000 / hello.len() as u64));
    let mut stream = match connect(ctx.data_addr) {
        Ok(stream) => stream,
        Err(e) => return Outcome::bad("connect failed", format!("connect: {e}")),
    };
    for byte in &hello {
        if send(&mut stream, std::slice::from_ref(byte)).is_err() {
            break;
        }
        std::thread::sleep(interval);
    }
    let reply = match read_reply(&mut stream, Instant::now() + ctx.answer_timeout) {
        Ok(Ok(reply)) => reply,
        Ok(Err(malformed)) => return Outcome::bad("malformed reply", malformed),
        Err(silence) => {
            return Outcome::bad(
                format!("{silence}"),
                format!("a hello trickled at one byte per {interval:?}: {silence}"),
            );
        }
    };
    match reply.status {
        0 => {
            let _ = send(
                &mut stream,
                &stream_header(&t.id, &t.name, reply.next_seq, &t.disks),
            );
            half_close(&stream);
            let outcome = judge(
                &mut stream,
                reply.next_seq,
                Expect::EndOfStream,
                ctx.answer_timeout,
            );
            Outcome {
                answer: format!("ok, then {}", outcome.answer),
                failure: outcome.failure,
            }
        }
        status if transient(status) => Outcome::ok(format!("refused {}", status_name(status))),
        status => Outcome::bad(
            format!("refused {}", status_name(status)),
            format!(
                "a valid trickled hello refused {}: {}",
                status_name(status),
                reply.message
            ),
        ),
    }
}

fn idle_flood(ctx: &Context, rng: &mut Rng) -> Outcome {
    if ctx.flooding.swap(true, Ordering::AcqRel) {
        return idle(ctx, rng);
    }
    let outcome = flood(ctx, rng);
    ctx.flooding.store(false, Ordering::Release);
    outcome
}

fn flood(ctx: &Context, rng: &mut Rng) -> Outcome {
    let mut held = Vec::with_capacity(ctx.flood_connections);
    for _ in 0..ctx.flood_connections {
        match connect(ctx.data_addr) {
            Ok(stream) => held.push(stream),
            Err(_) => break,
        }
    }
    let agents: Vec<&Arc<Agent>> = ctx
        .targets
        .iter()
        .filter_map(|t| t.agent.as_ref())
        .collect();
    let started = Instant::now();
    let outcome = if agents.is_empty() {
        // No agent: a valid hello must still be served.
        let index = pick(ctx, rng, false).unwrap_or(0);
        match open_session(ctx, &ctx.targets[index]) {
            Ok((mut stream, n)) => {
                half_close(&stream);
                let _ = judge(&mut stream, n, Expect::EndOfStream, ctx.answer_timeout);
                Outcome::ok("valid hello served")
            }
            Err(outcome) if outcome.answer.contains("too-many-connections") => Outcome::bad(
                "valid hello locked out",
                format!(
                    "with {} idle connections open a valid hello was refused too-many-connections",
                    held.len()
                ),
            ),
            Err(outcome) => outcome,
        }
    } else {
        let agent = agents[rng.below(agents.len() as u64) as usize];
        let before = agent.acked_seq();
        agent.drop_connection();
        loop {
            if agent.acked_seq() > before {
                break Outcome::ok("agent served");
            }
            if started.elapsed() > ctx.flood_serve_deadline {
                break Outcome::bad(
                    "AGENT LOCKED OUT",
                    format!(
                        "with {} idle connections open, the real agent reconnected and got no \
                         ack for {:?}",
                        held.len(),
                        ctx.flood_serve_deadline
                    ),
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    drop(held);
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concatenated_frames_of_the_wrong_total_never_add_up() {
        // A seed-7 run acknowledged 3 of 91 such payloads: the first frame was the whole
        // length and the second empty, which is a valid payload, not a hostile one.
        let mut rng = Rng::new(7);
        for length_bytes in [4096, 8192, 65536, 1 << 20] {
            for _ in 0..10_000 {
                let (first, second) = concat_wrong_sizes(length_bytes, &mut rng);
                assert!(first > 0 && first <= length_bytes);
                assert_ne!(first + second, length_bytes, "{first} + {second}");
            }
        }
    }
}
