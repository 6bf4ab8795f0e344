//! The fixed newstyle handshake: option haggling until GO/EXPORT_NAME, ABORT or a refusal.

use std::io::{self, Read, Write};
use std::sync::Arc;

use crate::proto::*;
use crate::{Catalog, Export, Limits, SessionEnd, SessionError};

/// What the handshake agreed on; transmission runs with it.
pub struct Negotiated {
    pub export: Arc<dyn Export>,
    pub name: String,
    /// `NBD_OPT_STRUCTURED_REPLY` was acknowledged.
    pub structured: bool,
    /// `base:allocation` was selected (with this export's name) by the last SET_META_CONTEXT.
    pub base_allocation: bool,
    pub transmission_flags: u16,
    /// Requests must be multiples of this (offset and length).
    pub minimum_bytes: u32,
    /// Largest READ/WRITE payload accepted (the advertised maximum).
    pub max_payload_bytes: u32,
}

impl std::fmt::Debug for Negotiated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Negotiated")
            .field("name", &self.name)
            .field("structured", &self.structured)
            .field("base_allocation", &self.base_allocation)
            .field("transmission_flags", &self.transmission_flags)
            .finish_non_exhaustive()
    }
}

pub enum Outcome {
    Ended(SessionEnd),
    Transmit(Negotiated),
}

struct State {
    no_zeroes: bool,
    structured: bool,
    /// Export name whose `base:allocation` the last SET_META_CONTEXT selected.
    meta_for: Option<String>,
}

/// Runs the handshake. `admit` is asked just before a session would start (a slot for an
/// established session); when it says no, GO is refused with `NBD_REP_ERR_SHUTDOWN`... and
/// the session ends as [`SessionEnd::Refused`].
pub fn negotiate<S: Read + Write>(
    stream: &mut S,
    catalog: &dyn Catalog,
    limits: &Limits,
    admit: &mut dyn FnMut() -> bool,
) -> Result<Outcome, SessionError> {
    let mut hello = [0u8; 18];
    hello[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    hello[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    hello[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    stream.write_all(&hello)?;
    stream.flush()?;

    let mut b4 = [0u8; 4];
    stream.read_exact(&mut b4)?;
    let client_flags = u32::from_be_bytes(b4);
    let unknown = client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    if unknown != 0 {
        return Err(SessionError::Protocol(format!(
            "client flags {client_flags:#x} set unknown bits {unknown:#x}"
        )));
    }
    let mut st = State {
        no_zeroes: client_flags & FLAG_C_NO_ZEROES != 0,
        structured: false,
        meta_for: None,
    };
    let mut data: Vec<u8> = Vec::new();
    let mut options = 0u32;
    loop {
        let mut head = [0u8; 16];
        stream.read_exact(&mut head)?;
        options += 1;
        if options > limits.max_options {
            return Err(SessionError::Protocol(format!(
                "more than {} options in one handshake",
                limits.max_options
            )));
        }
        let (magic, rest) = head.split_at(8);
        let magic = u64::from_be_bytes(magic.try_into().unwrap_or_default());
        if magic != IHAVEOPT {
            return Err(SessionError::Protocol(format!(
                "option header magic {magic:#x} is not IHAVEOPT"
            )));
        }
        let option = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
        let length = u32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]);
        if length > limits.max_option_bytes {
            if option == OPT_EXPORT_NAME {
                return Err(SessionError::Protocol(format!(
                    "NBD_OPT_EXPORT_NAME of {length} bytes, over the {}-byte option limit",
                    limits.max_option_bytes
                )));
            }
            discard(stream, u64::from(length))?;
            let msg = format!(
                "option {option} carries {length} bytes, over the {}-byte limit",
                limits.max_option_bytes
            );
            reply(stream, option, REP_ERR_TOO_BIG, msg.as_bytes())?;
            continue;
        }
        data.clear();
        data.resize(length as usize, 0);
        stream.read_exact(&mut data)?;
        if let Some(outcome) = one_option(stream, catalog, limits, admit, &mut st, option, &data)? {
            return Ok(outcome);
        }
    }
}

fn one_option<S: Read + Write>(
    stream: &mut S,
    catalog: &dyn Catalog,
    limits: &Limits,
    admit: &mut dyn FnMut() -> bool,
    st: &mut State,
    option: u32,
    data: &[u8],
) -> Result<Option<Outcome>, SessionError> {
    match option {
        OPT_EXPORT_NAME => {
            let name = std::str::from_utf8(data).map_err(|_| {
                SessionError::Protocol("NBD_OPT_EXPORT_NAME name is not UTF-8".into())
            })?;
            let Some(export) = catalog.lookup(name).filter(|e| !e.is_closed()) else {
                return Err(SessionError::Protocol(
                    "NBD_OPT_EXPORT_NAME names no export of this server".into(),
                ));
            };
            if !admit() {
                return Ok(Some(Outcome::Ended(SessionEnd::Refused)));
            }
            let n = negotiated(export, name, st, limits);
            let mut out = Vec::with_capacity(134);
            out.extend_from_slice(&n.export.size_bytes().to_be_bytes());
            out.extend_from_slice(&n.transmission_flags.to_be_bytes());
            if !st.no_zeroes {
                out.extend_from_slice(&[0u8; 124]);
            }
            stream.write_all(&out)?;
            stream.flush()?;
            Ok(Some(Outcome::Transmit(n)))
        }
        OPT_ABORT => {
            // The client may already have closed: a failed ACK is not an error.
            let _ = reply(stream, option, REP_ACK, &[]);
            Ok(Some(Outcome::Ended(SessionEnd::Aborted)))
        }
        OPT_LIST => {
            if !data.is_empty() {
                reply(
                    stream,
                    option,
                    REP_ERR_INVALID,
                    b"NBD_OPT_LIST carries no data",
                )?;
                return Ok(None);
            }
            match catalog.list() {
                None => reply(
                    stream,
                    option,
                    REP_ERR_POLICY,
                    b"this server does not list its exports",
                )?,
                Some(names) => {
                    for name in names {
                        let mut d = Vec::with_capacity(4 + name.len());
                        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
                        d.extend_from_slice(name.as_bytes());
                        reply(stream, option, REP_SERVER, &d)?;
                    }
                    reply(stream, option, REP_ACK, &[])?;
                }
            }
            Ok(None)
        }
        OPT_INFO | OPT_GO => info_or_go(stream, catalog, limits, admit, st, option, data),
        OPT_STRUCTURED_REPLY => {
            if data.is_empty() {
                st.structured = true;
                reply(stream, option, REP_ACK, &[])?;
            } else {
                reply(
                    stream,
                    option,
                    REP_ERR_INVALID,
                    b"NBD_OPT_STRUCTURED_REPLY carries no data",
                )?;
            }
            Ok(None)
        }
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
            meta_context(stream, catalog, st, option, data)?;
            Ok(None)
        }
        OPT_STARTTLS => {
            reply(
                stream,
                option,
                REP_ERR_UNSUP,
                b"TLS is not supported by this server",
            )?;
            Ok(None)
        }
        OPT_EXTENDED_HEADERS => {
            reply(
                stream,
                option,
                REP_ERR_UNSUP,
                b"extended headers are not supported",
            )?;
            Ok(None)
        }
        _ => {
            let msg = format!("option {option} is not supported by this server");
            reply(stream, option, REP_ERR_UNSUP, msg.as_bytes())?;
            Ok(None)
        }
    }
}

fn info_or_go<S: Read + Write>(
    stream: &mut S,
    catalog: &dyn Catalog,
    limits: &Limits,
    admit: &mut dyn FnMut() -> bool,
    st: &mut State,
    option: u32,
    data: &[u8],
) -> Result<Option<Outcome>, SessionError> {
    let parsed = (|| {
        let mut f = Fields::new(data);
        let name = f.string("export name")?;
        let count = f.u16("number of information requests")?;
        let mut wanted = [false; 4];
        for _ in 0..count {
            let info = f.u16("information request")?;
            if let Some(w) = wanted.get_mut(info as usize) {
                *w = true;
            }
        }
        if f.remaining_bytes() != 0 {
            return Err(format!(
                "{} bytes follow the information requests",
                f.remaining_bytes()
            ));
        }
        Ok((name, wanted))
    })();
    let (name, wanted) = match parsed {
        Ok(p) => p,
        Err(msg) => {
            reply(stream, option, REP_ERR_INVALID, msg.as_bytes())?;
            return Ok(None);
        }
    };
    let Some(export) = catalog.lookup(name).filter(|e| !e.is_closed()) else {
        reply(
            stream,
            option,
            REP_ERR_UNKNOWN,
            b"no export of that name on this server",
        )?;
        return Ok(None);
    };
    let n = negotiated(export, name, st, limits);
    let mut d = Vec::with_capacity(16);
    d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    d.extend_from_slice(&n.export.size_bytes().to_be_bytes());
    d.extend_from_slice(&n.transmission_flags.to_be_bytes());
    reply(stream, option, REP_INFO, &d)?;
    if wanted[INFO_NAME as usize] {
        d.clear();
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        reply(stream, option, REP_INFO, &d)?;
    }
    if wanted[INFO_DESCRIPTION as usize]
        && let Some(text) = n.export.description()
    {
        d.clear();
        d.extend_from_slice(&INFO_DESCRIPTION.to_be_bytes());
        d.extend_from_slice(truncate_str(&text, MAX_STRING_BYTES).as_bytes());
        reply(stream, option, REP_INFO, &d)?;
    }
    // Always sent: the minimum block size is enforced, so clients must know it.
    let sizes = n.export.block_sizes();
    d.clear();
    d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    d.extend_from_slice(&n.minimum_bytes.to_be_bytes());
    d.extend_from_slice(&preferred_bytes(sizes.preferred_bytes, &n).to_be_bytes());
    d.extend_from_slice(&n.max_payload_bytes.to_be_bytes());
    reply(stream, option, REP_INFO, &d)?;
    if option == OPT_INFO {
        reply(stream, option, REP_ACK, &[])?;
        return Ok(None);
    }
    if !admit() {
        reply(
            stream,
            option,
            REP_ERR_SHUTDOWN,
            b"the server has its maximum of sessions",
        )?;
        return Ok(Some(Outcome::Ended(SessionEnd::Refused)));
    }
    reply(stream, option, REP_ACK, &[])?;
    Ok(Some(Outcome::Transmit(n)))
}

/// The preferred size advertised: a power of two ≥ max(minimum, 512) and ≤ the maximum payload.
fn preferred_bytes(asked: u32, n: &Negotiated) -> u32 {
    let floor = n.minimum_bytes.max(512);
    let p = asked.max(floor);
    let p = if p.is_power_of_two() {
        p
    } else {
        p.checked_next_power_of_two().unwrap_or(floor)
    };
    p.min(prev_power_of_two(n.max_payload_bytes)).max(floor)
}

fn prev_power_of_two(x: u32) -> u32 {
    if x == 0 {
        0
    } else {
        1 << (31 - x.leading_zeros())
    }
}

fn negotiated(export: Arc<dyn Export>, name: &str, st: &State, limits: &Limits) -> Negotiated {
    let sizes = export.block_sizes();
    // The minimum must be a power of two ≤ 64 KiB (spec); anything else is served as 1.
    let minimum_bytes = if sizes.minimum_bytes.is_power_of_two() && sizes.minimum_bytes <= 65536 {
        sizes.minimum_bytes
    } else {
        1
    };
    let max_payload_bytes = sizes
        .maximum_bytes
        .min(limits.max_request_bytes)
        .max(minimum_bytes.max(512));
    let mut flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA;
    if export.read_only() {
        flags |= FLAG_READ_ONLY;
    } else {
        flags |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES;
    }
    if st.structured {
        flags |= FLAG_SEND_DF;
    }
    if export.multi_conn() {
        flags |= FLAG_CAN_MULTI_CONN;
    }
    Negotiated {
        base_allocation: st.structured && st.meta_for.as_deref() == Some(name),
        export,
        name: name.to_owned(),
        structured: st.structured,
        transmission_flags: flags,
        minimum_bytes,
        max_payload_bytes,
    }
}

fn meta_context<S: Write>(
    stream: &mut S,
    catalog: &dyn Catalog,
    st: &mut State,
    option: u32,
    data: &[u8],
) -> io::Result<()> {
    let set = option == OPT_SET_META_CONTEXT;
    if set {
        // SET replaces the selection even when it fails.
        st.meta_for = None;
    }
    if !st.structured {
        return reply(
            stream,
            option,
            REP_ERR_INVALID,
            b"negotiate NBD_OPT_STRUCTURED_REPLY before meta contexts",
        );
    }
    let parsed = (|| {
        let mut f = Fields::new(data);
        let name = f.string("export name")?;
        let count = f.u32("number of queries")?;
        let mut matched = count == 0 && !set;
        for _ in 0..count {
            let q = f.string("query")?;
            if !q.contains(':') {
                return Err(format!("query {q:?} has no namespace (no colon)"));
            }
            matched |= q == BASE_ALLOCATION || (!set && q == "base:");
        }
        if f.remaining_bytes() != 0 {
            return Err(format!("{} bytes follow the queries", f.remaining_bytes()));
        }
        Ok((name, matched))
    })();
    let (name, matched) = match parsed {
        Ok(p) => p,
        Err(msg) => return reply(stream, option, REP_ERR_INVALID, msg.as_bytes()),
    };
    if catalog.lookup(name).filter(|e| !e.is_closed()).is_none() {
        return reply(
            stream,
            option,
            REP_ERR_UNKNOWN,
            b"no export of that name on this server",
        );
    }
    if matched {
        let id = if set { BASE_ALLOCATION_ID } else { 0 };
        let mut d = Vec::with_capacity(4 + BASE_ALLOCATION.len());
        d.extend_from_slice(&id.to_be_bytes());
        d.extend_from_slice(BASE_ALLOCATION.as_bytes());
        reply(stream, option, REP_META_CONTEXT, &d)?;
        if set {
            st.meta_for = Some(name.to_owned());
        }
    }
    reply(stream, option, REP_ACK, &[])
}

/// Sends one option reply (error replies carry a message for people).
fn reply<S: Write>(stream: &mut S, option: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    stream.write_all(&out)?;
    stream.flush()
}
