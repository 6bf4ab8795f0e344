//! The transmission phase: one request at a time, checked, handed to the export, answered.

use std::io::{self, Read, Write};

use crate::handshake::Negotiated;
use crate::proto::*;
use crate::{Counters, Extent, SessionEnd, SessionError};

/// A refusal: the NBD error value and what was wrong (sent in structured error chunks).
type Refusal = (u32, String);

/// Longest descriptor length sent: u32 rounded down to every allowed minimum block size.
const MAX_DESCRIPTOR_BYTES: u64 = 0xFFFF_0000;

struct Request {
    flags: u16,
    kind: u16,
    cookie: u64,
    offset_bytes: u64,
    length_bytes: u32,
}

/// Serves requests until DISC, hang-up, export close, or a protocol error.
pub fn transmit<S: Read + Write>(
    stream: &mut S,
    n: &Negotiated,
    counters: &Counters,
) -> Result<SessionEnd, SessionError> {
    // The connection's one buffer: grows up to max_payload_bytes + a chunk header, reused.
    let mut buf: Vec<u8> = Vec::new();
    let mut extents: Vec<Extent> = Vec::new();
    loop {
        let Some(req) = read_request(stream)? else {
            return Ok(SessionEnd::HungUp);
        };
        Counters::add(&counters.requests, 1);
        if req.kind == CMD_DISC {
            return Ok(SessionEnd::Disconnected);
        }
        if n.export.is_closed() {
            if req.kind == CMD_WRITE {
                discard(stream, u64::from(req.length_bytes))?;
            }
            let msg = "the export was removed";
            send_error(stream, n.structured, req.cookie, ESHUTDOWN, msg, &mut buf)?;
            return Ok(SessionEnd::ExportClosed);
        }
        let result = match req.kind {
            CMD_READ => read(stream, n, &req, &mut buf, counters)?,
            CMD_WRITE => write(stream, n, &req, &mut buf, counters)?,
            CMD_FLUSH => flush(n, &req),
            CMD_TRIM => trim_or_zero(n, &req, false),
            CMD_WRITE_ZEROES => trim_or_zero(n, &req, true),
            CMD_BLOCK_STATUS => block_status(stream, n, &req, &mut buf, &mut extents)?,
            other => Err((
                EINVAL,
                format!("command {other} is not supported by this server"),
            )),
        };
        match result {
            Ok(Reply::Sent) => {}
            Ok(Reply::Done) => send_simple(stream, req.cookie, 0, &mut buf)?,
            Err((errno, msg)) => {
                send_error(stream, n.structured, req.cookie, errno, &msg, &mut buf)?
            }
        }
    }
}

enum Reply {
    /// The handler already sent the whole reply.
    Sent,
    /// Success without payload: the caller sends it.
    Done,
}

/// Reads one request header; None when the client closed the stream before its first byte.
fn read_request<S: Read>(stream: &mut S) -> Result<Option<Request>, SessionError> {
    let mut h = [0u8; REQUEST_HEADER_BYTES];
    // One read usually brings the whole header; the rest (if any) is read exactly.
    let got = loop {
        match stream.read(&mut h) {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
    };
    if got == 0 {
        return Ok(None);
    }
    stream.read_exact(&mut h[got..])?;
    let magic = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
    if magic != REQUEST_MAGIC {
        return Err(SessionError::Protocol(format!(
            "request magic {magic:#x} is not NBD_REQUEST_MAGIC"
        )));
    }
    let mut cookie = [0u8; 8];
    cookie.copy_from_slice(&h[8..16]);
    let mut offset = [0u8; 8];
    offset.copy_from_slice(&h[16..24]);
    Ok(Some(Request {
        flags: u16::from_be_bytes([h[4], h[5]]),
        kind: u16::from_be_bytes([h[6], h[7]]),
        cookie: u64::from_be_bytes(cookie),
        offset_bytes: u64::from_be_bytes(offset),
        length_bytes: u32::from_be_bytes([h[24], h[25], h[26], h[27]]),
    }))
}

fn check_flags(req: &Request, allowed: u16, name: &str) -> Result<(), Refusal> {
    let bad = req.flags & !allowed;
    if bad != 0 {
        return Err((EINVAL, format!("flags {bad:#x} are not valid on {name}")));
    }
    Ok(())
}

/// Offset and length within the export (`past_end` is the error for the overrun) and aligned.
fn check_range(n: &Negotiated, req: &Request, past_end: u32) -> Result<(), Refusal> {
    let size_bytes = n.export.size_bytes();
    let length = u64::from(req.length_bytes);
    match req.offset_bytes.checked_add(length) {
        Some(end) if end <= size_bytes => {}
        _ => {
            return Err((
                past_end,
                format!(
                    "offset {} + length {} is past the export size {size_bytes}",
                    req.offset_bytes, req.length_bytes
                ),
            ));
        }
    }
    let min = u64::from(n.minimum_bytes);
    if !req.offset_bytes.is_multiple_of(min) || !length.is_multiple_of(min) {
        return Err((
            EINVAL,
            format!(
                "offset {} and length {} must be multiples of the minimum block size {min}",
                req.offset_bytes, req.length_bytes
            ),
        ));
    }
    Ok(())
}

fn io_refusal(what: &str, e: &io::Error) -> Refusal {
    (errno_of(e), format!("{what} failed: {e}"))
}

/// Makes sure `buf` holds at least `need` bytes (it only grows, up to the request limit).
fn ensure(buf: &mut Vec<u8>, need: usize) -> &mut [u8] {
    if buf.len() < need {
        buf.resize(need, 0);
    }
    &mut buf[..need]
}

fn read<S: Write>(
    stream: &mut S,
    n: &Negotiated,
    req: &Request,
    buf: &mut Vec<u8>,
    counters: &Counters,
) -> io::Result<Result<Reply, Refusal>> {
    let allowed = if n.structured {
        CMD_FLAG_FUA | CMD_FLAG_DF
    } else {
        CMD_FLAG_FUA
    };
    if let Err(r) = check_flags(req, allowed, "NBD_CMD_READ") {
        return Ok(Err(r));
    }
    if req.length_bytes > n.max_payload_bytes {
        let errno = if n.structured { EOVERFLOW } else { EINVAL };
        let msg = format!(
            "read of {} bytes is over the maximum payload {}",
            req.length_bytes, n.max_payload_bytes
        );
        return Ok(Err((errno, msg)));
    }
    if let Err(r) = check_range(n, req, EINVAL) {
        return Ok(Err(r));
    }
    let len = req.length_bytes as usize;
    let head = if n.structured {
        CHUNK_HEADER_BYTES + 8
    } else {
        16
    };
    let out = ensure(buf, head + len);
    let (header, data) = out.split_at_mut(head);
    if len > 0
        && let Err(e) = n.export.read_at(req.offset_bytes, data)
    {
        return Ok(Err(io_refusal("read", &e)));
    }
    Counters::add(&counters.read_bytes, len as u64);
    if n.structured {
        if len == 0 {
            chunk_header(header, REPLY_FLAG_DONE, REPLY_TYPE_NONE, req.cookie, 0);
            stream.write_all(&header[..CHUNK_HEADER_BYTES])?;
        } else {
            let payload = (8 + len) as u32;
            chunk_header(
                header,
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                req.cookie,
                payload,
            );
            header[CHUNK_HEADER_BYTES..].copy_from_slice(&req.offset_bytes.to_be_bytes());
            stream.write_all(&out[..head + len])?;
        }
    } else {
        simple_header(header, req.cookie, 0);
        stream.write_all(&out[..head + len])?;
    }
    stream.flush()?;
    Ok(Ok(Reply::Sent))
}

fn write<S: Read>(
    stream: &mut S,
    n: &Negotiated,
    req: &Request,
    buf: &mut Vec<u8>,
    counters: &Counters,
) -> io::Result<Result<Reply, Refusal>> {
    let refusal = if let Err(r) = check_flags(req, CMD_FLAG_FUA, "NBD_CMD_WRITE") {
        Some(r)
    } else if req.length_bytes > n.max_payload_bytes {
        Some((
            EINVAL,
            format!(
                "write of {} bytes is over the maximum payload {}",
                req.length_bytes, n.max_payload_bytes
            ),
        ))
    } else if n.export.read_only() {
        Some((EPERM, "the export is read-only".to_owned()))
    } else {
        check_range(n, req, ENOSPC).err()
    };
    if let Some(r) = refusal {
        // The payload follows the header whatever the answer: read past it to stay in step.
        discard(stream, u64::from(req.length_bytes))?;
        return Ok(Err(r));
    }
    let data = ensure(buf, req.length_bytes as usize);
    stream.read_exact(data)?;
    if data.is_empty() {
        return Ok(Ok(Reply::Done));
    }
    let fua = req.flags & CMD_FLAG_FUA != 0;
    if let Err(e) = n.export.write_at(req.offset_bytes, data, fua) {
        return Ok(Err(io_refusal("write", &e)));
    }
    Counters::add(&counters.written_bytes, data.len() as u64);
    Ok(Ok(Reply::Done))
}

fn flush(n: &Negotiated, req: &Request) -> Result<Reply, Refusal> {
    check_flags(req, CMD_FLAG_FUA, "NBD_CMD_FLUSH")?;
    if req.offset_bytes != 0 || req.length_bytes != 0 {
        return Err((
            EINVAL,
            "NBD_CMD_FLUSH must have offset and length 0".to_owned(),
        ));
    }
    n.export.flush().map_err(|e| io_refusal("flush", &e))?;
    Ok(Reply::Done)
}

fn trim_or_zero(n: &Negotiated, req: &Request, zero: bool) -> Result<Reply, Refusal> {
    let (name, allowed) = if zero {
        ("NBD_CMD_WRITE_ZEROES", CMD_FLAG_FUA | CMD_FLAG_NO_HOLE)
    } else {
        ("NBD_CMD_TRIM", CMD_FLAG_FUA)
    };
    check_flags(req, allowed, name)?;
    if n.export.read_only() {
        return Err((EPERM, "the export is read-only".to_owned()));
    }
    check_range(n, req, if zero { ENOSPC } else { EINVAL })?;
    if req.length_bytes == 0 {
        return Ok(Reply::Done);
    }
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let length = u64::from(req.length_bytes);
    let r = if zero {
        n.export.write_zeroes(req.offset_bytes, length, fua)
    } else {
        n.export.trim(req.offset_bytes, length, fua)
    };
    r.map_err(|e| io_refusal(if zero { "write zeroes" } else { "trim" }, &e))?;
    Ok(Reply::Done)
}

fn block_status<S: Write>(
    stream: &mut S,
    n: &Negotiated,
    req: &Request,
    buf: &mut Vec<u8>,
    extents: &mut Vec<Extent>,
) -> io::Result<Result<Reply, Refusal>> {
    let checked = (|| {
        check_flags(req, CMD_FLAG_FUA | CMD_FLAG_REQ_ONE, "NBD_CMD_BLOCK_STATUS")?;
        if !n.base_allocation {
            return Err((
                EINVAL,
                "no metadata context was selected (NBD_OPT_SET_META_CONTEXT base:allocation)"
                    .to_owned(),
            ));
        }
        if req.length_bytes == 0 {
            return Err((EINVAL, "NBD_CMD_BLOCK_STATUS of length 0".to_owned()));
        }
        check_range(n, req, EINVAL)
    })();
    if let Err(r) = checked {
        return Ok(Err(r));
    }
    extents.clear();
    let length = u64::from(req.length_bytes);
    if let Err(e) = n.export.block_status(req.offset_bytes, length, extents) {
        return Ok(Err(io_refusal("block status", &e)));
    }
    let req_one = req.flags & CMD_FLAG_REQ_ONE != 0;
    // The reply fits the connection's buffer bound (max payload + header) and the spec's 2^20.
    let max_descriptors = (n.max_payload_bytes as usize / 8).clamp(1, MAX_EXTENTS_PER_REPLY);
    // Descriptors go straight into buf after the chunk header and context id.
    let start = CHUNK_HEADER_BYTES + 4;
    let mut used = start;
    let mut covered: u64 = 0;
    let room = n.export.size_bytes().saturating_sub(req.offset_bytes);
    let mut last_flags: Option<u32> = None;
    let mut count = 0usize;
    for e in extents.iter() {
        if e.length_bytes == 0 {
            return Ok(Err((
                EIO,
                "the export reported an extent of length 0".to_owned(),
            )));
        }
        if covered >= length || covered >= room {
            break;
        }
        let flags = (u32::from(e.hole) * STATE_HOLE) | (u32::from(e.zero) * STATE_ZERO);
        let mut len = e.length_bytes.min(room - covered);
        if req_one {
            len = len.min(length - covered);
        }
        let clamped = len > MAX_DESCRIPTOR_BYTES;
        len = len.min(MAX_DESCRIPTOR_BYTES);
        if last_flags == Some(flags) && used >= start + 8 {
            // Merge with the previous descriptor if the sum still fits.
            let prev = &mut buf[used - 8..used - 4];
            let prev_len = u64::from(u32::from_be_bytes([prev[0], prev[1], prev[2], prev[3]]));
            if prev_len + len <= MAX_DESCRIPTOR_BYTES {
                prev.copy_from_slice(&((prev_len + len) as u32).to_be_bytes());
                covered += len;
                if clamped {
                    break;
                }
                continue;
            }
        }
        if req_one && count == 1 || count == max_descriptors {
            break;
        }
        let d = &mut ensure(buf, used + 8)[used..];
        d[..4].copy_from_slice(&(len as u32).to_be_bytes());
        d[4..8].copy_from_slice(&flags.to_be_bytes());
        used += 8;
        count += 1;
        covered += len;
        last_flags = Some(flags);
        if clamped {
            break;
        }
    }
    if count == 0 {
        return Ok(Err((EIO, "the export reported no extents".to_owned())));
    }
    let out = ensure(buf, used);
    let payload = (used - CHUNK_HEADER_BYTES) as u32;
    chunk_header(
        out,
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        req.cookie,
        payload,
    );
    out[CHUNK_HEADER_BYTES..start].copy_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
    stream.write_all(out)?;
    stream.flush()?;
    Ok(Ok(Reply::Sent))
}

fn chunk_header(out: &mut [u8], flags: u16, kind: u16, cookie: u64, length: u32) {
    out[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&kind.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out[16..20].copy_from_slice(&length.to_be_bytes());
}

fn simple_header(out: &mut [u8], cookie: u64, errno: u32) {
    out[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&errno.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
}

fn send_simple<S: Write>(s: &mut S, cookie: u64, errno: u32, buf: &mut Vec<u8>) -> io::Result<()> {
    let out = ensure(buf, 16);
    simple_header(out, cookie, errno);
    s.write_all(out)?;
    s.flush()
}

/// An error reply: a structured `NBD_REPLY_TYPE_ERROR` chunk with the message when
/// structured replies were negotiated, else a simple reply with the error value.
fn send_error<S: Write>(
    s: &mut S,
    structured: bool,
    cookie: u64,
    errno: u32,
    msg: &str,
    buf: &mut Vec<u8>,
) -> io::Result<()> {
    if !structured {
        return send_simple(s, cookie, errno, buf);
    }
    let msg = truncate_str(msg, MAX_STRING_BYTES).as_bytes();
    let total = CHUNK_HEADER_BYTES + 6 + msg.len();
    let out = ensure(buf, total);
    chunk_header(
        out,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        (6 + msg.len()) as u32,
    );
    out[20..24].copy_from_slice(&errno.to_be_bytes());
    out[24..26].copy_from_slice(&(msg.len() as u16).to_be_bytes());
    out[26..].copy_from_slice(msg);
    s.write_all(out)?;
    s.flush()
}
