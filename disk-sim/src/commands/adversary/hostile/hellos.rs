//! Hostile hellos: every hello variant, hash requests for unknown disks, empty streams.

use std::time::{Duration, Instant};

use super::*;
use crate::commands::adversary::wire::{
    RawHello, Reply, connect, half_close, read_exact_by, read_reply, send, stream_header,
};
use crate::rng::Rng;

pub(super) fn hello_attack(kind: HostileKind, ctx: &Context, rng: &mut Rng) -> Outcome {
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
pub(super) fn exchange(
    ctx: &Context,
    bytes: &[u8],
    half: bool,
    expect: u8,
    variant: &str,
) -> Outcome {
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

pub(super) fn judge_reply(reply: &Reply, expect: u8, variant: &str) -> Outcome {
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

pub(super) fn hash_ok(ctx: &Context, rng: &mut Rng) -> Outcome {
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

pub(super) fn stream_empty(ctx: &Context, rng: &mut Rng) -> Outcome {
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
