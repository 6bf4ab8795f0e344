//! Arbitrary client bytes → one NBD session (`nbd_server::serve_connection`) against a 1 MiB
//! memory export. Nothing may panic, the server must always greet first, and what it sends
//! stays bounded by the request limit. The first input byte picks the start: odd inputs are
//! prefixed with a valid handshake (structured replies, base:allocation, GO "disk") so the
//! fuzzer spends its time on transmission requests; even inputs fuzz the handshake itself.

#![no_main]

use std::io::{self, Cursor, Read, Write};
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use nbd_server::memory::{MemoryCatalog, MemoryExport};
use nbd_server::{Export, Limits, serve_connection};

const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const MAX_REQUEST_BYTES: u32 = 64 << 10;

struct Pipe {
    input: Cursor<Vec<u8>>,
    output: Vec<u8>,
}

impl Read for Pipe {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Pipe {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // Keep only the greeting: checking it is enough, and memory stays flat.
        let keep = 18usize.saturating_sub(self.output.len()).min(buf.len());
        self.output.extend_from_slice(&buf[..keep]);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn option(out: &mut Vec<u8>, opt: u32, data: &[u8]) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

fn handshake_prefix() -> Vec<u8> {
    let mut out = 3u32.to_be_bytes().to_vec();
    option(&mut out, 8, &[]);
    let mut meta = Vec::new();
    meta.extend_from_slice(&4u32.to_be_bytes());
    meta.extend_from_slice(b"disk");
    meta.extend_from_slice(&1u32.to_be_bytes());
    meta.extend_from_slice(&15u32.to_be_bytes());
    meta.extend_from_slice(b"base:allocation");
    option(&mut out, 10, &meta);
    let mut go = Vec::new();
    go.extend_from_slice(&4u32.to_be_bytes());
    go.extend_from_slice(b"disk");
    go.extend_from_slice(&1u16.to_be_bytes());
    go.extend_from_slice(&3u16.to_be_bytes());
    option(&mut out, 7, &go);
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut input = if mode & 1 == 1 { handshake_prefix() } else { Vec::new() };
    input.extend_from_slice(rest);
    let export = Arc::new(MemoryExport::new(1 << 20, mode & 2 == 2).expect("1 MiB export"));
    export.fill(4096, &[0xab; 8192]).expect("fill within the export");
    let catalog = MemoryCatalog::new(mode & 4 == 4).with("disk", export as Arc<dyn Export>);
    let limits = Limits { max_options: 16, max_option_bytes: 4096, max_request_bytes: MAX_REQUEST_BYTES };
    let mut pipe = Pipe { input: Cursor::new(input), output: Vec::new() };
    let _ = serve_connection(&mut pipe, &catalog, &limits);
    assert_eq!(pipe.output.get(..8), Some(&b"NBDMAGIC"[..]), "the server greets first");
});
