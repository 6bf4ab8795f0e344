//! Unit tests: a raw client speaking bytes to `serve_connection` over a Unix socket pair.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::memory::{MemoryCatalog, MemoryExport};
use crate::proto::*;
use crate::{BlockSizes, Limits, SessionEnd, SessionError, serve_connection};

mod commands;
mod options;
mod server;

const SIZE: u64 = 1 << 20;

pub(crate) struct Raw {
    s: UnixStream,
    server: Option<JoinHandle<Result<SessionEnd, SessionError>>>,
}

pub(crate) struct OptReply {
    option: u32,
    kind: u32,
    data: Vec<u8>,
}

pub(crate) struct Chunk {
    flags: u16,
    kind: u16,
    cookie: u64,
    data: Vec<u8>,
}

fn catalog(export: Arc<MemoryExport>, listable: bool) -> Arc<MemoryCatalog> {
    Arc::new(MemoryCatalog::new(listable).with("disk", export))
}

pub(crate) fn mem(read_only: bool) -> Arc<MemoryExport> {
    Arc::new(MemoryExport::new(SIZE, read_only).unwrap())
}

impl Raw {
    /// Connects to a fresh session and reads the server's greeting.
    fn start(cat: Arc<MemoryCatalog>, limits: Limits) -> Raw {
        let (client, server) = UnixStream::pair().unwrap();
        let handle = std::thread::spawn(move || serve_connection(server, cat.as_ref(), &limits));
        let mut raw = Raw {
            s: client,
            server: Some(handle),
        };
        let mut hello = [0u8; 18];
        raw.s.read_exact(&mut hello).unwrap();
        assert_eq!(u64::from_be_bytes(hello[..8].try_into().unwrap()), NBDMAGIC);
        assert_eq!(
            u64::from_be_bytes(hello[8..16].try_into().unwrap()),
            IHAVEOPT
        );
        assert_eq!(
            u16::from_be_bytes([hello[16], hello[17]]),
            FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
        );
        raw
    }

    fn new(export: Arc<MemoryExport>) -> Raw {
        let r = Raw::start(catalog(export, false), Limits::default());
        r.flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
    }

    fn flags(mut self, flags: u32) -> Raw {
        self.s.write_all(&flags.to_be_bytes()).unwrap();
        self
    }

    fn option(&mut self, option: u32, data: &[u8]) {
        let mut out = Vec::new();
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&option.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
        self.s.write_all(&out).unwrap();
    }

    fn opt_reply(&mut self) -> OptReply {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(
            u64::from_be_bytes(h[..8].try_into().unwrap()),
            OPTION_REPLY_MAGIC
        );
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut data = vec![0; len as usize];
        self.s.read_exact(&mut data).unwrap();
        OptReply {
            option: u32::from_be_bytes(h[8..12].try_into().unwrap()),
            kind: u32::from_be_bytes(h[12..16].try_into().unwrap()),
            data,
        }
    }

    /// Sends an option and returns every reply up to the final one (ACK or error).
    fn ask(&mut self, option: u32, data: &[u8]) -> Vec<OptReply> {
        self.option(option, data);
        let mut all = Vec::new();
        loop {
            let r = self.opt_reply();
            assert_eq!(r.option, option);
            let last = r.kind == REP_ACK || r.kind & (1 << 31) != 0;
            all.push(r);
            if last {
                return all;
            }
        }
    }

    fn structured(&mut self) {
        let r = self.ask(OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(r[0].kind, REP_ACK);
    }

    fn set_meta(&mut self, name: &str, queries: &[&str]) -> Vec<OptReply> {
        self.ask(OPT_SET_META_CONTEXT, &meta_data(name, queries))
    }

    /// GO on `name`; returns the transmission flags.
    fn go(&mut self, name: &str) -> u16 {
        let r = self.ask(OPT_GO, &go_data(name, &[INFO_BLOCK_SIZE]));
        let last = r.last().unwrap();
        assert_eq!(
            last.kind,
            REP_ACK,
            "GO refused: {}",
            String::from_utf8_lossy(&last.data)
        );
        let export = r
            .iter()
            .find(|r| r.data[..2] == INFO_EXPORT.to_be_bytes())
            .unwrap();
        assert_eq!(
            u64::from_be_bytes(export.data[2..10].try_into().unwrap()),
            SIZE
        );
        u16::from_be_bytes(export.data[10..12].try_into().unwrap())
    }

    fn request(&mut self, flags: u16, kind: u16, cookie: u64, offset: u64, length: u32) {
        let mut out = Vec::new();
        out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&cookie.to_be_bytes());
        out.extend_from_slice(&offset.to_be_bytes());
        out.extend_from_slice(&length.to_be_bytes());
        self.s.write_all(&out).unwrap();
    }

    /// A simple reply: (error, cookie); reads `payload` bytes more when error is 0.
    fn simple(&mut self, payload: usize) -> (u32, u64, Vec<u8>) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(
            u32::from_be_bytes(h[..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC
        );
        let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
        let mut data = vec![0; if err == 0 { payload } else { 0 }];
        self.s.read_exact(&mut data).unwrap();
        (err, u64::from_be_bytes(h[8..16].try_into().unwrap()), data)
    }

    fn chunk(&mut self) -> Chunk {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(
            u32::from_be_bytes(h[..4].try_into().unwrap()),
            STRUCTURED_REPLY_MAGIC
        );
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut data = vec![0; len as usize];
        self.s.read_exact(&mut data).unwrap();
        Chunk {
            flags: u16::from_be_bytes(h[4..6].try_into().unwrap()),
            kind: u16::from_be_bytes(h[6..8].try_into().unwrap()),
            cookie: u64::from_be_bytes(h[8..16].try_into().unwrap()),
            data,
        }
    }

    /// The structured error chunk's (errno, message).
    fn error_chunk(&mut self, cookie: u64) -> (u32, String) {
        let c = self.chunk();
        assert_eq!(c.cookie, cookie);
        assert_eq!(c.kind, REPLY_TYPE_ERROR);
        assert_eq!(c.flags, REPLY_FLAG_DONE);
        let errno = u32::from_be_bytes(c.data[..4].try_into().unwrap());
        let len = u16::from_be_bytes(c.data[4..6].try_into().unwrap()) as usize;
        assert_eq!(c.data.len(), 6 + len);
        (errno, String::from_utf8(c.data[6..].to_vec()).unwrap())
    }

    /// Waits for the server side to end and returns how.
    fn end(mut self) -> Result<SessionEnd, SessionError> {
        let _ = self.s.shutdown(std::net::Shutdown::Write);
        self.server.take().unwrap().join().unwrap()
    }
}

pub(crate) fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

pub(crate) fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

/// A session in transmission on a fresh memory export, structured (or not), with
/// base:allocation selected when structured.
pub(crate) fn session(read_only: bool, structured: bool) -> (Raw, Arc<MemoryExport>) {
    let export = mem(read_only);
    let mut raw = Raw::new(Arc::clone(&export));
    if structured {
        raw.structured();
        let r = raw.set_meta("disk", &["base:allocation"]);
        assert_eq!(r.len(), 2);
    }
    raw.go("disk");
    (raw, export)
}

#[test]
fn block_sizes_default_is_the_spec_default() {
    let b = BlockSizes::default();
    assert_eq!(
        (b.minimum_bytes, b.preferred_bytes, b.maximum_bytes),
        (1, 4096, 32 << 20)
    );
}
