//! What the export tests share: outside NBD tools run and judged (nbdinfo, nbdcopy,
//! qemu-img), a minimal raw NBD client (to hold a session open), a source VM model that
//! remembers what it wrote, and the agent that streams it.

#![allow(dead_code)] // not every test uses every helper
#![allow(clippy::big_endian_bytes)] // the NBD protocol is big-endian on the wire

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use disk_sim::rng::Rng;
use engine::delta::{Consistency, DiskGeometry};
use source_agent::sender::{Agent, AgentConfig};

use crate::common::Server;

/// Whether every tool is installed; prints which one is missing.
pub fn have(tools: &[&str]) -> bool {
    for tool in tools {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            println!("SKIP: {tool} is not installed (scripts/install-tools.sh installs it)");
            return false;
        }
    }
    true
}

/// Runs a command to its end.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

/// Runs a command that must succeed; returns its stdout.
pub fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `nbdinfo --size`.
pub fn nbd_size(uri: &str) -> u64 {
    ok(Command::new("nbdinfo").args(["--size", uri]))
        .trim()
        .parse()
        .unwrap()
}

/// One extent of `nbdinfo --map` (base:allocation): offset, length, hole, zero.
#[derive(Debug, Clone, Copy)]
pub struct MapExtent {
    pub offset: u64,
    pub length: u64,
    pub hole: bool,
    pub zero: bool,
}

/// `nbdinfo --map`, parsed.
pub fn nbd_map(uri: &str) -> Vec<MapExtent> {
    ok(Command::new("nbdinfo").args(["--map", uri]))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let kind: u32 = fields[2].parse().unwrap();
            MapExtent {
                offset: fields[0].parse().unwrap(),
                length: fields[1].parse().unwrap(),
                hole: kind & 1 != 0,
                zero: kind & 2 != 0,
            }
        })
        .collect()
}

/// The whole export as `nbdcopy` reads it, through a file in `scratch`.
pub fn nbd_read(uri: &str, scratch: &Path) -> Vec<u8> {
    let out = scratch.join("nbdcopy-out.raw");
    let _ = std::fs::remove_file(&out);
    ok(Command::new("nbdcopy").arg(uri).arg(&out));
    let bytes = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    bytes
}

/// `nbdcopy --flush` of `bytes` (the whole disk) into the export (a FLUSH at the end).
pub fn nbd_write(uri: &str, bytes: &[u8], scratch: &Path) -> Output {
    nbd_write_with(uri, bytes, scratch, true)
}

/// `nbdcopy` of `bytes` (the whole disk) into the export, with `--flush` or without (then
/// nbdcopy sends no FLUSH: the writes are acknowledged, not made durable).
pub fn nbd_write_with(uri: &str, bytes: &[u8], scratch: &Path, flush: bool) -> Output {
    let src = scratch.join("nbdcopy-in.raw");
    std::fs::write(&src, bytes).unwrap();
    let out = run(Command::new("nbdcopy")
        .args(if flush { &["--flush"][..] } else { &[][..] })
        .arg(&src)
        .arg(uri));
    std::fs::remove_file(&src).unwrap();
    out
}

/// `qemu-img compare` of the export against a raw file: true when identical.
pub fn qemu_identical(uri: &str, file: &Path) -> bool {
    let out = run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", uri])
        .arg(file));
    match out.status.code() {
        Some(0) => true,
        Some(1) => false,
        _ => panic!(
            "qemu-img compare {uri} {}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// `cmp` of two files: true when identical.
pub fn cmp(a: &Path, b: &Path) -> bool {
    match run(Command::new("cmp").arg(a).arg(b)).status.code() {
        Some(0) => true,
        Some(1) => false,
        other => panic!("cmp {} {}: {other:?}", a.display(), b.display()),
    }
}

/// Waits until `path` exists (a bound on how long a broken run may hang, not a pass/fail
/// timing).
pub fn wait_for(path: &Path) -> bool {
    let until = Instant::now() + Duration::from_secs(60);
    while Instant::now() < until {
        if path.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// A minimal NBD client (fixed newstyle, `NBD_OPT_EXPORT_NAME`, simple replies) that holds
/// one session open.
pub struct RawClient {
    stream: TcpStream,
    handle: u64,
}

impl RawClient {
    /// Connects to `nbd://host:port/name` and enters transmission.
    pub fn connect(uri: &str) -> std::io::Result<Self> {
        let (addr, name) = uri.strip_prefix("nbd://").unwrap().split_once('/').unwrap();
        let mut stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut hello = [0u8; 18];
        stream.read_exact(&mut hello)?;
        assert_eq!(&hello[..8], b"NBDMAGIC");
        assert_eq!(&hello[8..16], b"IHAVEOPT");
        // NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES.
        stream.write_all(&3u32.to_be_bytes())?;
        let mut option = Vec::new();
        option.extend_from_slice(b"IHAVEOPT");
        option.extend_from_slice(&1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
        option.extend_from_slice(&(name.len() as u32).to_be_bytes());
        option.extend_from_slice(name.as_bytes());
        stream.write_all(&option)?;
        let mut export = [0u8; 10]; // size, transmission flags (no zeroes)
        stream.read_exact(&mut export)?;
        Ok(Self { stream, handle: 0 })
    }

    /// `NBD_CMD_READ`; an error reply is an error.
    pub fn read(&mut self, offset_bytes: u64, length_bytes: u32) -> std::io::Result<Vec<u8>> {
        self.handle += 1;
        let mut request = Vec::with_capacity(28);
        request.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        request.extend_from_slice(&0u16.to_be_bytes()); // flags
        request.extend_from_slice(&0u16.to_be_bytes()); // NBD_CMD_READ
        request.extend_from_slice(&self.handle.to_be_bytes());
        request.extend_from_slice(&offset_bytes.to_be_bytes());
        request.extend_from_slice(&length_bytes.to_be_bytes());
        self.stream.write_all(&request)?;
        let mut reply = [0u8; 16];
        self.stream.read_exact(&mut reply)?;
        assert_eq!(
            reply[..4],
            0x6744_6698u32.to_be_bytes(),
            "simple reply magic"
        );
        let error = u32::from_be_bytes([reply[4], reply[5], reply[6], reply[7]]);
        if error != 0 {
            return Err(std::io::Error::other(format!("NBD error {error}")));
        }
        let mut data = vec![0u8; length_bytes as usize];
        self.stream.read_exact(&mut data)?;
        Ok(data)
    }
}

/// A source VM: its disks in memory, changed by seeded sparse writes, with every range it
/// ever wrote remembered per disk.
pub struct Vm {
    pub disks: Vec<Vec<u8>>,
    pub block_bytes: Vec<u64>,
    /// Per disk: (offset, length) of every write, in order.
    pub written: Vec<Vec<(u64, u64)>>,
    rng: Rng,
}

impl Vm {
    pub fn new(geometry: &[DiskGeometry], seed: u64) -> Self {
        Self {
            disks: geometry
                .iter()
                .map(|d| vec![0; d.size_bytes as usize])
                .collect(),
            block_bytes: geometry
                .iter()
                .map(|d| u64::from(d.block_size_bytes))
                .collect(),
            written: vec![Vec::new(); geometry.len()],
            rng: Rng::new(seed | 1),
        }
    }

    pub fn next(&mut self) -> u64 {
        self.rng.next_u64()
    }

    /// A random write of 1 to 16 blocks of non-zero bytes; applied to the model and sent.
    pub fn write(&mut self, agent: &Agent) {
        let disk = (self.next() % self.disks.len() as u64) as usize;
        let block = self.block_bytes[disk];
        let blocks_total = self.disks[disk].len() as u64 / block;
        let blocks = (1 + self.next() % 16).min(blocks_total);
        let offset = (self.next() % (blocks_total - blocks + 1)) * block;
        let fill = self.next();
        let data: Vec<u8> = (0..blocks * block)
            .map(|b| ((fill >> (b % 8)) as u8 ^ (b / 512) as u8) | 1)
            .collect();
        self.put(agent, disk, offset, &data);
    }

    /// Writes `data` at `offset` of `disk`: the model, the record, the agent.
    pub fn put(&mut self, agent: &Agent, disk: usize, offset: u64, data: &[u8]) {
        agent.write(disk as u16, offset, data).unwrap();
        self.disks[disk][offset as usize..offset as usize + data.len()].copy_from_slice(data);
        self.written[disk].push((offset, data.len() as u64));
    }

    /// The grains of `grain_bytes` of `disk` that any write touched.
    pub fn written_grains(&self, disk: usize, grain_bytes: u64) -> std::collections::BTreeSet<u64> {
        let mut grains = std::collections::BTreeSet::new();
        for &(offset, length) in &self.written[disk] {
            for grain in offset / grain_bytes..(offset + length).div_ceil(grain_bytes) {
                grains.insert(grain);
            }
        }
        grains
    }

    /// Each disk's digest ([`disk_sim::source::image_digest`]).
    pub fn digests(&self) -> Vec<u64> {
        self.disks
            .iter()
            .map(|d| disk_sim::source::image_digest(d))
            .collect()
    }
}

/// The agent of item `id`.
pub fn agent(
    server: &Server,
    id: [u8; 16],
    token: &str,
    name: &str,
    disks: &[DiskGeometry],
) -> Agent {
    let mut config = AgentConfig::new(server.data, id, token.as_bytes(), name, disks.to_vec());
    config.backoff_initial = Duration::from_millis(20);
    config.backoff_max = Duration::from_millis(200);
    config.max_attempts = 50;
    Agent::connect(config).unwrap()
}

/// A crash-consistent bookmark; the model's disks at it go into `oracle`.
pub fn bookmark(oracle: &mut BTreeMap<u64, Vec<Vec<u8>>>, vm: &Vm, agent: &Agent, id: u64) -> u64 {
    let seq = agent
        .bookmark(Consistency::Crash, id, id, "export test")
        .unwrap();
    oracle.insert(seq, vm.disks.clone());
    seq
}

/// Waits until `point` of `item` is applied.
pub fn wait_point(server: &Server, item: &str, point: u64) {
    server
        .api()
        .wait_point(
            item,
            point,
            Duration::from_millis(20),
            Duration::from_secs(60),
        )
        .unwrap_or_else(|e| panic!("point {point} of {item} never applied: {e}"));
}

/// `oracle` as digests (what [`crate::common::verify_item`] takes).
pub fn digests(oracle: &BTreeMap<u64, Vec<Vec<u8>>>) -> BTreeMap<u64, Vec<u64>> {
    oracle
        .iter()
        .map(|(point, disks)| {
            (
                *point,
                disks
                    .iter()
                    .map(|d| disk_sim::source::image_digest(d))
                    .collect(),
            )
        })
        .collect()
}

/// A fresh temporary directory under the target dir, with `data/` made.
pub fn data_dir() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    (tmp, data)
}

/// `bytes` with `patches` (offset, length, seed) written over it, each a non-zero pattern.
pub fn patched(bytes: &[u8], patches: &[(usize, usize, u8)]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    for &(offset, length, seed) in patches {
        for (i, byte) in out[offset..offset + length].iter_mut().enumerate() {
            *byte = ((i / 3) as u8).wrapping_mul(31).wrapping_add(seed) | 0x80;
        }
    }
    out
}
