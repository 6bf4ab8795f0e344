//! A minimal NBD client for the first-byte timing: fixed newstyle handshake with
//! `NBD_OPT_EXPORT_NAME`, simple replies, one `NBD_CMD_READ` at a time, `NBD_CMD_DISC`.
//!
//! ```text
//!  connect ─► S: "NBDMAGIC" "IHAVEOPT" u16 flags      C: u32 flags (FIXED_NEWSTYLE, NO_ZEROES)
//!         ─► C: "IHAVEOPT" u32 EXPORT_NAME u32 len name
//!         ◄─ S: u64 size, u16 transmission flags (+ 124 zero bytes without NO_ZEROES)
//!  read   ─► C: 0x25609513 u16 0 u16 READ u64 cookie u64 offset u32 length
//!         ◄─ S: 0x67446698 u32 error u64 cookie, then the data when error = 0
//! ```
//!
//! Its own client (not `nbdinfo`) so that the timing has no process start in it.

// NBD is big-endian on the wire (network byte order, doc/proto.md "Conventions").
#![allow(clippy::big_endian_bytes)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const OPT_EXPORT_NAME: u32 = 1;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const CMD_READ: u16 = 0;
const CMD_DISC: u16 = 2;
/// Longest wait for any one answer.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// `nbd://host:port/name` → (`host:port`, `name`).
pub fn parse_uri(uri: &str) -> Result<(String, String)> {
    let rest = uri
        .strip_prefix("nbd://")
        .ok_or_else(|| anyhow!("{uri:?} is not an nbd:// URI"))?;
    let (addr, name) = rest
        .split_once('/')
        .ok_or_else(|| anyhow!("{uri:?} has no export name"))?;
    if addr.is_empty() || name.is_empty() {
        bail!("{uri:?} has an empty address or export name");
    }
    Ok((addr.to_owned(), name.to_owned()))
}

/// One connection in the transmission phase.
pub struct NbdClient {
    stream: TcpStream,
    size_bytes: u64,
    cookie: u64,
}

impl NbdClient {
    /// Connects to `uri` and negotiates its export.
    pub fn connect(uri: &str) -> Result<Self> {
        let (addr, name) = parse_uri(uri)?;
        let mut stream =
            TcpStream::connect(&addr).with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        let mut greeting = [0u8; 18];
        stream
            .read_exact(&mut greeting)
            .context("reading the server's greeting")?;
        let (magic, rest) = greeting.split_at(8);
        let (opt, flags) = rest.split_at(8);
        if u64::from_be_bytes(magic.try_into()?) != NBDMAGIC
            || u64::from_be_bytes(opt.try_into()?) != IHAVEOPT
        {
            bail!("{addr} did not greet as a newstyle NBD server");
        }
        let flags = u16::from_be_bytes(flags.try_into()?);
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            bail!("{addr} does not offer fixed newstyle negotiation");
        }
        let no_zeroes = flags & FLAG_NO_ZEROES != 0;
        let client_flags = u32::from(FLAG_FIXED_NEWSTYLE | (flags & FLAG_NO_ZEROES));
        let mut out = Vec::with_capacity(20 + name.len());
        out.extend_from_slice(&client_flags.to_be_bytes());
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
        out.extend_from_slice(&(name.len() as u32).to_be_bytes());
        out.extend_from_slice(name.as_bytes());
        stream.write_all(&out)?;
        let mut answer = [0u8; 10];
        stream
            .read_exact(&mut answer)
            .context("reading the export's size (the server closes on an unknown name)")?;
        let (size, _transmission_flags) = answer.split_at(8);
        let size_bytes = u64::from_be_bytes(size.try_into()?);
        if !no_zeroes {
            let mut zeroes = [0u8; 124];
            stream.read_exact(&mut zeroes)?;
        }
        Ok(Self {
            stream,
            size_bytes,
            cookie: 0,
        })
    }

    /// The export's size.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// Reads `out.len()` bytes at `offset_bytes`.
    pub fn read_at(&mut self, offset_bytes: u64, out: &mut [u8]) -> Result<()> {
        self.cookie += 1;
        self.request(CMD_READ, offset_bytes, out.len() as u32)?;
        let mut reply = [0u8; 16];
        self.stream
            .read_exact(&mut reply)
            .context("reading a read's reply")?;
        let (magic, rest) = reply.split_at(4);
        let (error, cookie) = rest.split_at(4);
        if u32::from_be_bytes(magic.try_into()?) != SIMPLE_REPLY_MAGIC {
            bail!("the reply has no simple-reply magic");
        }
        if u64::from_be_bytes(cookie.try_into()?) != self.cookie {
            bail!("the reply answers another request");
        }
        let error = u32::from_be_bytes(error.try_into()?);
        if error != 0 {
            bail!("the read at {offset_bytes} failed with NBD error {error}");
        }
        self.stream
            .read_exact(out)
            .context("reading a read's data")?;
        Ok(())
    }

    fn request(&mut self, kind: u16, offset_bytes: u64, length_bytes: u32) -> Result<()> {
        let mut h = [0u8; 28];
        h[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h[6..8].copy_from_slice(&kind.to_be_bytes());
        h[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        h[16..24].copy_from_slice(&offset_bytes.to_be_bytes());
        h[24..28].copy_from_slice(&length_bytes.to_be_bytes());
        self.stream.write_all(&h)?;
        Ok(())
    }

    /// Ends the session politely.
    pub fn disconnect(mut self) -> Result<()> {
        self.cookie += 1;
        self.request(CMD_DISC, 0, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_are_split_or_refused() {
        assert_eq!(
            parse_uri("nbd://127.0.0.1:10809/abc").unwrap(),
            ("127.0.0.1:10809".to_owned(), "abc".to_owned())
        );
        assert!(parse_uri("http://x/y").is_err());
        assert!(parse_uri("nbd://127.0.0.1:1").is_err());
        assert!(parse_uri("nbd:///name").is_err());
    }
}
