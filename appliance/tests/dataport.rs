//! The data port over loopback, end to end: `source_agent::sender::Agent` (and raw sockets for
//! hostile clients) against `DataPort` with a real `StagingLog` in a temporary directory.
//!
//! Every test checks outcomes, never timings: timeouts here are generous safety nets, except
//! the handshake timeout of the slow-hello test, which is the behaviour under test.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use appliance::dataport::{DataPort, DataPortConfig, MemoryRegistry};
use common::Rng;
use engine::delta::{
    Consistency, DecodeErrorReason, DeltaDecoder, DeltaEncoder, DiskGeometry, EncoderOptions,
    FRAME_HEADER_BYTES, StreamHeader,
};
use engine::durable::StdDir;
use engine::resync::{ResyncOptions, hash_path};
use engine::staging::{StagingConfig, StagingLog, StagingReader};
use source_agent::sender::{
    Agent, AgentConfig, AgentError, CloseReason, Fault, RefusalStatus, fetch_chunk_hashes,
};

const ITEM: [u8; 16] = *b"dataport-item-01";
const TOKEN: &[u8] = b"stream-token-0123456789abcdef";
const SAFETY: Duration = Duration::from_secs(30);

fn disks() -> Vec<DiskGeometry> {
    vec![
        DiskGeometry {
            size_bytes: 4 << 20,
            block_size_bytes: 4096,
        },
        DiskGeometry {
            size_bytes: 2 << 20,
            block_size_bytes: 512,
        },
    ]
}

fn header(first_seq: u64) -> StreamHeader {
    StreamHeader {
        item_id: ITEM,
        item_name: "dataport-test".into(),
        first_seq,
        disks: disks(),
    }
}

/// One frame of the test workload.
#[derive(Debug, Clone)]
enum Op {
    Write(u16, u64, Vec<u8>),
    Zero(u16, u64, u64),
    Bookmark(u64),
}

fn workload(seed: u64, count: usize) -> Vec<Op> {
    let mut rng = Rng::new(seed | 1);
    let disks = disks();
    (0..count)
        .map(|i| {
            let disk = rng.below(2) as u16;
            let geometry = disks[usize::from(disk)];
            let block = u64::from(geometry.block_size_bytes);
            let blocks = 1 + rng.below(16);
            let length = blocks * block;
            let offset = rng.below(geometry.size_bytes / block - blocks) * block;
            match rng.below(10) {
                0 => Op::Zero(disk, offset, length),
                1 => Op::Bookmark(i as u64),
                2..=5 => {
                    // Compressible.
                    let byte = rng.next_u64() as u8;
                    Op::Write(disk, offset, vec![byte; length as usize])
                }
                _ => {
                    let data = (0..length).map(|_| rng.next_u64() as u8).collect();
                    Op::Write(disk, offset, data)
                }
            }
        })
        .collect()
}

fn try_send(agent: &Agent, op: &Op) -> Result<u64, AgentError> {
    match op {
        Op::Write(disk, offset, data) => agent.write(*disk, *offset, data),
        Op::Zero(disk, offset, length) => agent.zero_range(*disk, *offset, *length),
        Op::Bookmark(id) => agent.bookmark(Consistency::Crash, *id, 1_000 + id, "bm"),
    }
}

fn send(agent: &Agent, op: &Op) -> u64 {
    try_send(agent, op).unwrap()
}

/// The frames the engine's encoder makes of `ops` from `first_seq`: (seq, wire bytes).
fn reference_frames(ops: &[Op], first_seq: u64) -> Vec<(u64, Vec<u8>)> {
    let mut encoder =
        DeltaEncoder::new(Vec::new(), &header(first_seq), EncoderOptions::default()).unwrap();
    for op in ops {
        match op {
            Op::Write(disk, offset, data) => encoder.write(*disk, *offset, data),
            Op::Zero(disk, offset, length) => encoder.zero_range(*disk, *offset, *length),
            Op::Bookmark(id) => encoder.bookmark(Consistency::Crash, *id, 1_000 + id, "bm"),
        }
        .unwrap();
    }
    let bytes = encoder.into_inner();
    frames_of(&bytes[..])
}

/// Every frame of a stream without end frame.
fn frames_of(reader: impl Read) -> Vec<(u64, Vec<u8>)> {
    let mut decoder = DeltaDecoder::new(reader).unwrap();
    let mut frames = Vec::new();
    loop {
        match decoder.next_frame() {
            Ok(Some(frame)) => frames.push((frame.seq, frame.wire_bytes.to_vec())),
            Ok(None) => break,
            Err(e)
                if matches!(
                    e.reason,
                    DecodeErrorReason::Truncated {
                        available_bytes: 0,
                        ..
                    }
                ) =>
            {
                break;
            }
            Err(e) => panic!("staged segment damaged: {e}"),
        }
    }
    frames
}

/// Every frame in the staging directory, segment after segment, as stored.
fn staged_frames(dir: &Path) -> Vec<(u64, Vec<u8>)> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("seg-"))
        .collect();
    names.sort();
    names
        .iter()
        .flat_map(|name| frames_of(File::open(dir.join(name)).unwrap()))
        .collect()
}

struct Rig {
    _tmp: tempfile::TempDir,
    staging: std::path::PathBuf,
    replicas: Vec<std::path::PathBuf>,
    log: Option<Arc<Mutex<StagingLog>>>,
    port: DataPort,
    /// A reader of the item's staging log: what the apply side sees as durable (a commit
    /// publishes it, and wakes apply, before the ack goes out).
    durable_notified: Arc<StagingReader>,
}

impl Rig {
    fn new(config: DataPortConfig) -> Self {
        Self::with_staging(config, StagingConfig::default())
    }

    fn with_staging(config: DataPortConfig, staging_config: StagingConfig) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let staging = tmp.path().join("staging");
        let (log, _) = StagingLog::open(
            Arc::new(StdDir::open(&staging).unwrap()),
            header(1),
            staging_config,
        )
        .unwrap();
        let log = Arc::new(Mutex::new(log));
        let replicas: Vec<_> = (0..2)
            .map(|i| tmp.path().join(format!("replica-{i}.img")))
            .collect();
        let registry = Arc::new(MemoryRegistry::new());
        registry.insert(ITEM, TOKEN, log.clone(), replicas.clone());
        let durable_notified = Arc::new(log.lock().unwrap().reader(1));
        let port =
            DataPort::bind("127.0.0.1:0".parse().unwrap(), registry.clone(), config).unwrap();
        Self {
            _tmp: tmp,
            staging,
            replicas,
            log: Some(log),
            port,
            durable_notified,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.port.local_addr()
    }

    /// An agent config with fast backoff and generous safety timeouts.
    fn agent_config(&self, token: &[u8]) -> AgentConfig {
        let mut config = AgentConfig::new(self.addr(), ITEM, token, "dataport-test", disks());
        config.backoff_initial = Duration::from_millis(2);
        config.backoff_max = Duration::from_millis(50);
        config.max_attempts = 200;
        config.send_timeout = SAFETY;
        config.io_timeout = SAFETY;
        config.ack_timeout = SAFETY;
        config
    }

    /// Stops the port, drops the log, and reopens it from disk: what survived.
    fn stop_and_reopen(&mut self) -> StagingLog {
        self.port.shutdown();
        self.log = None;
        let (log, recovery) = StagingLog::open(
            Arc::new(StdDir::open(&self.staging).unwrap()),
            header(1),
            StagingConfig::default(),
        )
        .unwrap();
        assert_eq!(recovery.corruption, None);
        log
    }
}

/// Records acks and checks, as each arrives, that it is monotonic and was durable first.
#[derive(Clone, Default)]
struct AckLog {
    acks: Arc<Mutex<Vec<u64>>>,
    violation: Arc<AtomicBool>,
}

impl AckLog {
    fn attach(&self, config: &mut AgentConfig, durable_notified: &Arc<StagingReader>) {
        let (acks, violation, durable) = (
            self.acks.clone(),
            self.violation.clone(),
            durable_notified.clone(),
        );
        config.ack_observer = Some(Arc::new(move |seq| {
            let mut acks = acks.lock().unwrap();
            if acks.last().is_some_and(|&last| seq <= last) {
                violation.store(true, Ordering::Release);
            }
            // The apply side's reader saw `seq` durable before the ack was sent, which happens
            // only after the commit returned; the reply's next_seq is durable too.
            if seq > durable.durable_seq() && seq != 0 {
                violation.store(true, Ordering::Release);
            }
            acks.push(seq);
        }));
    }

    fn check(&self) -> Vec<u64> {
        assert!(
            !self.violation.load(Ordering::Acquire),
            "acks not monotonic or ahead of durability: {:?}",
            self.acks.lock().unwrap()
        );
        self.acks.lock().unwrap().clone()
    }
}

/// A raw client: sends `bytes`, returns the reply's status and message.
fn raw_hello(addr: SocketAddr, bytes: &[u8]) -> (u8, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(SAFETY)).unwrap();
    stream.write_all(bytes).unwrap();
    read_reply(&mut stream)
}

fn read_reply(stream: &mut TcpStream) -> (u8, String) {
    let mut fixed = [0u8; 32];
    stream.read_exact(&mut fixed).unwrap();
    assert_eq!(&fixed[0..4], b"DRDA");
    let message_len = usize::from(u16::from_le_bytes([fixed[24], fixed[25]]));
    let mut message = vec![0u8; message_len];
    stream.read_exact(&mut message).unwrap();
    (fixed[6], String::from_utf8(message).unwrap())
}

fn hello(token: &[u8]) -> Vec<u8> {
    appliance::dataport::Hello {
        mode: appliance::dataport::Mode::Stream,
        item_id: ITEM,
        token: token.to_vec(),
        disk_index: 0,
        chunk_size_bytes: 0,
        resync: false,
    }
    .encode()
}

fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let started = Instant::now();
    while !condition() {
        assert!(started.elapsed() < SAFETY, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn frames_are_staged_exactly_once_in_order_byte_identical_and_acked_when_durable() {
    let mut rig = Rig::new(DataPortConfig::default());
    let acks = AckLog::default();
    let mut config = rig.agent_config(TOKEN);
    acks.attach(&mut config, &rig.durable_notified);
    let agent = Agent::connect(config).unwrap();
    assert_eq!(agent.next_seq(), 1);
    let ops = workload(7, 300);
    for op in &ops {
        send(&agent, op);
    }
    assert_eq!(agent.flush(SAFETY).unwrap(), 300);
    assert_eq!(agent.backlog(), (0, 0));
    let stats = agent.stats();
    assert_eq!(stats.sessions, 1);
    assert_eq!(stats.frames_retransmitted, 0);
    assert_eq!(agent.close(SAFETY).unwrap(), 300);

    let acked = acks.check();
    assert_eq!(acked.last(), Some(&300));
    let log = rig.stop_and_reopen();
    assert_eq!(log.durable_seq(), 300);
    assert_eq!(staged_frames(&rig.staging), reference_frames(&ops, 1));
}

#[test]
fn wrong_token_and_unknown_item_are_refused_by_name_and_stage_nothing() {
    let mut rig = Rig::new(DataPortConfig::default());
    let error = Agent::connect(rig.agent_config(b"not-the-token")).unwrap_err();
    let AgentError::Refused {
        status, message, ..
    } = &error
    else {
        panic!("expected a refusal, got {error}");
    };
    assert_eq!(*status, RefusalStatus::BadToken, "{error}");
    assert!(message.contains("token"), "{message}");

    let mut config = rig.agent_config(TOKEN);
    config.item_id = *b"no-such-item-000";
    let error = Agent::connect(config).unwrap_err();
    assert!(
        matches!(
            &error,
            AgentError::Refused {
                status: RefusalStatus::UnknownItem,
                ..
            }
        ),
        "{error}"
    );
    assert!(error.to_string().contains("unknown-item"), "{error}");

    // A raw client with the wrong token never gets to send a frame.
    let (status, message) = raw_hello(rig.addr(), &hello(b"x"));
    assert_eq!(
        status,
        appliance::dataport::Status::BadToken as u8,
        "{message}"
    );

    let log = rig.stop_and_reopen();
    assert_eq!((log.next_seq(), log.durable_seq()), (1, 0));
    assert!(staged_frames(&rig.staging).is_empty());
}

#[test]
fn dropped_connections_lose_nothing_and_stage_nothing_twice() {
    let mut rig = Rig::new(DataPortConfig::default());
    let acks = AckLog::default();
    let mut config = rig.agent_config(TOKEN);
    acks.attach(&mut config, &rig.durable_notified);
    let agent = Agent::connect(config).unwrap();
    for seq in [5, 23, 24, 61] {
        agent.inject(Fault::DropAfter { seq });
    }
    // Cut inside the header, and inside the payload.
    agent.inject(Fault::CutInside { seq: 40, bytes: 20 });
    agent.inject(Fault::CutInside {
        seq: 90,
        bytes: FRAME_HEADER_BYTES + 3,
    });
    let ops = workload(11, 150);
    for (i, op) in ops.iter().enumerate() {
        send(&agent, op);
        if i == 120 {
            agent.drop_connection();
        }
    }
    assert_eq!(agent.flush(SAFETY).unwrap(), 150);
    let stats = agent.stats();
    assert!(stats.sessions >= 7, "{stats:?}");
    assert!(stats.frames_transmitted >= 150, "{stats:?}");
    drop(agent);

    let acked = acks.check();
    assert_eq!(acked.last(), Some(&150));
    let log = rig.stop_and_reopen();
    assert_eq!(log.durable_seq(), 150);
    assert_eq!(staged_frames(&rig.staging), reference_frames(&ops, 1));
}

#[test]
fn a_byte_flipped_in_transit_closes_with_the_frame_and_reason_then_is_resent() {
    let mut rig = Rig::new(DataPortConfig::default());
    let acks = AckLog::default();
    let mut config = rig.agent_config(TOKEN);
    acks.attach(&mut config, &rig.durable_notified);
    let agent = Agent::connect(config).unwrap();
    agent.inject(Fault::FlipByte {
        seq: 37,
        offset_in_frame: FRAME_HEADER_BYTES,
    });
    // Every frame carries a payload byte at FRAME_HEADER_BYTES or is clamped into its header.
    let ops = workload(13, 80);
    for op in &ops {
        send(&agent, op);
    }
    assert_eq!(agent.flush(SAFETY).unwrap(), 80);
    let stats = agent.stats();
    let close = stats
        .closes
        .iter()
        .find(|c| c.reason == CloseReason::CorruptFrame)
        .unwrap_or_else(|| panic!("no corrupt-frame close: {stats:?}"));
    assert!(close.message.contains("frame seq 37"), "{}", close.message);
    assert!(
        close.message.contains("checksum mismatch"),
        "{}",
        close.message
    );
    assert!(close.durable_seq <= 36, "{close:?}");
    assert!(stats.frames_retransmitted >= 1, "{stats:?}");
    assert_eq!(agent.error(), None);
    drop(agent);

    acks.check();
    let log = rig.stop_and_reopen();
    assert_eq!(log.durable_seq(), 80);
    assert_eq!(staged_frames(&rig.staging), reference_frames(&ops, 1));
}

#[test]
fn a_second_concurrent_session_for_the_item_is_refused_busy() {
    let mut rig = Rig::new(DataPortConfig::default());
    let first = Agent::connect(rig.agent_config(TOKEN)).unwrap();
    send(&first, &Op::Zero(0, 0, 4096));
    first.flush(SAFETY).unwrap();

    let mut config = rig.agent_config(TOKEN);
    config.max_attempts = 1;
    let error = Agent::connect(config).unwrap_err();
    let AgentError::Refused {
        status, message, ..
    } = &error
    else {
        panic!("expected busy, got {error}");
    };
    assert_eq!(*status, RefusalStatus::Busy, "{error}");
    assert!(message.contains("another session"), "{message}");
    assert!(error.to_string().contains(": busy: "), "{error}");

    let (status, message) = raw_hello(rig.addr(), &hello(TOKEN));
    assert_eq!(status, appliance::dataport::Status::Busy as u8, "{message}");
    assert!(message.contains("another session"), "{message}");

    // The first session is unharmed.
    send(&first, &Op::Zero(1, 512, 512));
    assert_eq!(first.flush(SAFETY).unwrap(), 2);
    drop(first);
    assert_eq!(rig.stop_and_reopen().durable_seq(), 2);
}

#[test]
fn hostile_hellos_are_refused_by_name_and_the_port_keeps_serving() {
    let config = DataPortConfig {
        handshake_timeout: Duration::from_millis(300),
        ..DataPortConfig::default()
    };
    let mut rig = Rig::new(config);
    let addr = rig.addr();

    let (status, message) = raw_hello(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, appliance::dataport::Status::BadHello as u8);
    assert!(message.contains("magic"), "{message}");

    let mut oversized = hello(TOKEN);
    oversized[24..26].copy_from_slice(&4000u16.to_le_bytes());
    let (status, message) = raw_hello(addr, &oversized);
    assert_eq!(status, appliance::dataport::Status::BadHello as u8);
    assert!(message.contains("token length 4000"), "{message}");

    let mut future = hello(TOKEN);
    future[4] = 2;
    let (status, _) = raw_hello(addr, &future);
    assert_eq!(
        status,
        appliance::dataport::Status::UnsupportedVersion as u8
    );

    let mut odd_mode = hello(TOKEN);
    odd_mode[6] = 9;
    let (status, _) = raw_hello(addr, &odd_mode);
    assert_eq!(status, appliance::dataport::Status::UnsupportedMode as u8);

    // Slowloris: part of a hello, then silence; the deadline covers the whole hello.
    let mut slow = TcpStream::connect(addr).unwrap();
    slow.set_read_timeout(Some(SAFETY)).unwrap();
    slow.write_all(&hello(TOKEN)[..10]).unwrap();
    let (status, message) = read_reply(&mut slow);
    assert_eq!(status, appliance::dataport::Status::HandshakeTimeout as u8);
    assert!(message.contains("handshake timeout"), "{message}");
    drop(slow);

    // Random bytes after a valid prefix, and a hello cut short: named, no panic.
    let mut rng = Rng::new(99);
    for _ in 0..30 {
        let mut bytes = hello(TOKEN);
        let at = 4 + rng.below(bytes.len() as u64 - 4) as usize;
        bytes[at] = rng.next_u64() as u8;
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(SAFETY)).unwrap();
        stream.write_all(&bytes).unwrap();
        let (status, _) = read_reply(&mut stream);
        assert!(appliance::dataport::Status::from_u8(status).is_some());
        drop(stream);
    }
    let mut cut = TcpStream::connect(addr).unwrap();
    cut.write_all(&hello(TOKEN)[..20]).unwrap();
    drop(cut);

    // Garbage after a good handshake: the stream header is refused with a named reason.
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(SAFETY)).unwrap();
    stream.write_all(&hello(TOKEN)).unwrap();
    let (status, _) = read_reply(&mut stream);
    assert_eq!(status, appliance::dataport::Status::Ok as u8);
    stream.write_all(&[0x5a; 200]).unwrap();
    let mut record = [0u8; 16];
    stream.read_exact(&mut record).unwrap();
    assert_eq!(
        (record[0], record[1]),
        (
            appliance::dataport::RECORD_CLOSE,
            appliance::dataport::CloseReason::CorruptFrame as u8
        )
    );
    let mut message = vec![0u8; usize::from(u16::from_le_bytes([record[2], record[3]]))];
    stream.read_exact(&mut message).unwrap();
    let message = String::from_utf8(message).unwrap();
    assert!(message.starts_with("stream header: bad magic"), "{message}");
    drop(stream);

    // Still serving.
    wait_until("the item to be free", || rig.port.stats().active == 0);
    let agent = Agent::connect(rig.agent_config(TOKEN)).unwrap();
    send(&agent, &Op::Bookmark(1));
    assert_eq!(agent.flush(SAFETY).unwrap(), 1);
    drop(agent);
    assert_eq!(rig.stop_and_reopen().durable_seq(), 1);
}

#[test]
fn sessions_beyond_the_limit_are_refused_by_name_and_idle_sockets_count_apart() {
    let config = DataPortConfig {
        max_sessions: 1,
        max_handshakes: 4,
        max_handshakes_per_ip: 2,
        ..DataPortConfig::default()
    };
    let rig = Rig::new(config);
    // Idle sockets (no hello) beyond the handshake limits only push out older idle sockets.
    let idle: Vec<TcpStream> = (0..6)
        .map(|_| TcpStream::connect(rig.addr()).unwrap())
        .collect();
    wait_until("older idle sockets dropped", || {
        rig.port.stats().handshakes_dropped >= 4
    });
    assert!(rig.port.stats().handshakes <= 2, "{:?}", rig.port.stats());
    // The one session slot goes to the agent.
    let agent = Agent::connect(rig.agent_config(TOKEN)).unwrap();
    send(&agent, &Op::Bookmark(1));
    assert_eq!(agent.flush(SAFETY).unwrap(), 1);
    assert_eq!(rig.port.stats().sessions_active, 1);
    // A second authenticated session (a hash request) finds no slot.
    let error =
        fetch_chunk_hashes(rig.addr(), &ITEM, TOKEN, 1, 65536, SAFETY, 1 << 20).unwrap_err();
    let AgentError::Refused {
        status, message, ..
    } = &error
    else {
        panic!("expected too-many-connections, got {error}");
    };
    assert_eq!(*status, RefusalStatus::TooManyConnections, "{error}");
    assert!(message.contains("maximum of 1 sessions"), "{message}");
    assert_eq!(rig.port.stats().refused_over_limit, 1);
    drop(idle);
    drop(agent);
    wait_until("connections to end", || rig.port.stats().active == 0);
}

#[test]
fn chunk_hashes_of_a_replica_equal_hash_path() {
    let rig = Rig::new(DataPortConfig::default());
    let mut rng = Rng::new(5);
    let data: Vec<u8> = (0..(1 << 20) + 12 * 1024)
        .map(|i| if i % 3 == 0 { 0 } else { rng.next_u64() as u8 })
        .collect();
    std::fs::write(&rig.replicas[1], &data).unwrap();
    let options = ResyncOptions {
        chunk_size_bytes: 64 * 1024,
        ..ResyncOptions::default()
    };
    let expected = hash_path(&rig.replicas[1], &options, &mut |_| {}, &|| false).unwrap();
    let fetched =
        fetch_chunk_hashes(rig.addr(), &ITEM, TOKEN, 1, 64 * 1024, SAFETY, 1 << 20).unwrap();
    assert_eq!(fetched, expected);
    assert_eq!(fetched.hashes.len(), 17);

    let refused = |disk, chunk, token: &[u8]| match fetch_chunk_hashes(
        rig.addr(),
        &ITEM,
        token,
        disk,
        chunk,
        SAFETY,
        1 << 20,
    ) {
        Err(AgentError::Refused {
            status, message, ..
        }) => (status, message),
        other => panic!("expected a refusal, got {other:?}"),
    };
    let (status, message) = refused(5, 65536, TOKEN);
    assert_eq!(status, RefusalStatus::UnknownDisk);
    assert!(message.contains("no disk 5"), "{message}");
    assert_eq!(refused(1, 1000, TOKEN).0, RefusalStatus::InvalidChunkSize);
    assert_eq!(refused(1, 65536, b"nope").0, RefusalStatus::BadToken);
    // Disk 0's replica does not exist: a named read failure, not a hang or a panic.
    assert_eq!(refused(0, 65536, TOKEN).0, RefusalStatus::ReplicaReadFailed);
    // Hash lists are bounded.
    let small = DataPortConfig {
        max_hash_list_bytes: 64,
        ..DataPortConfig::default()
    };
    let tight = Rig::new(small);
    std::fs::write(&tight.replicas[0], &data).unwrap();
    let error =
        fetch_chunk_hashes(tight.addr(), &ITEM, TOKEN, 0, 4096, SAFETY, 1 << 20).unwrap_err();
    assert!(
        matches!(
            &error,
            AgentError::Refused {
                status: RefusalStatus::HashListTooLarge,
                ..
            }
        ),
        "{error}"
    );
}

#[test]
fn shutdown_mid_stream_keeps_every_acknowledged_frame() {
    let mut rig = Rig::new(DataPortConfig::default());
    let acks = AckLog::default();
    let mut config = rig.agent_config(TOKEN);
    config.max_attempts = 3;
    acks.attach(&mut config, &rig.durable_notified);
    let agent = Arc::new(Agent::connect(config).unwrap());
    let ops = workload(17, 400);
    let sender = {
        let (agent, ops) = (agent.clone(), ops.clone());
        std::thread::spawn(move || {
            for op in &ops {
                if try_send(&agent, op).is_err() {
                    break;
                }
            }
        })
    };
    wait_until("some acks", || agent.acked_seq() >= 50);
    rig.port.shutdown();
    sender.join().unwrap();
    let acked = acks.check();
    let last_ack = acked.last().copied().unwrap_or(0);
    let stats = agent.stats();
    let log = rig.stop_and_reopen();
    assert!(
        log.durable_seq() >= last_ack,
        "acked {last_ack}, durable {}",
        log.durable_seq()
    );
    for close in &stats.closes {
        assert!(close.durable_seq <= log.durable_seq(), "{close:?}");
    }
    // What is staged is a prefix of what was sent, exactly.
    let staged = staged_frames(&rig.staging);
    assert_eq!(staged.len() as u64, log.durable_seq());
    let reference = reference_frames(&ops, 1);
    assert_eq!(staged[..], reference[..staged.len()]);
}

#[test]
fn a_stream_for_another_disk_layout_is_closed_as_wrong_stream() {
    let rig = Rig::new(DataPortConfig::default());
    let mut config = rig.agent_config(TOKEN);
    config.disks.pop();
    let agent = Agent::connect(config).unwrap();
    // The appliance refuses the stream header; frames queued meanwhile stay unacknowledged.
    let _ = agent.zero_range(0, 0, 4096);
    wait_until("the close", || agent.error().is_some());
    let error = agent.error().unwrap();
    let AgentError::Closed { reason, message } = &error else {
        panic!("expected a close, got {error}");
    };
    assert_eq!(*reason, CloseReason::WrongStream);
    assert!(message.contains("disks"), "{message}");
}

#[test]
fn a_full_cache_slows_acks_then_ends_in_a_named_resync_required() {
    let staging = StagingConfig {
        capacity_bytes: 64 * 1024,
        backpressure_per_mille: 500,
        backpressure_max_delay: Duration::from_millis(2),
        full_timeout: Duration::from_millis(100),
        ..StagingConfig::default()
    };
    let mut rig = Rig::with_staging(DataPortConfig::default(), staging);
    let acks = AckLog::default();
    let mut config = rig.agent_config(TOKEN);
    acks.attach(&mut config, &rig.durable_notified);
    let agent = Agent::connect(config).unwrap();
    let mut rng = Rng::new(3);
    let ops: Vec<Op> = (0..40)
        .map(|i| {
            Op::Write(
                0,
                i * 4096,
                (0..4096).map(|_| rng.next_u64() as u8).collect(),
            )
        })
        .collect();
    for op in &ops {
        if try_send(&agent, op).is_err() {
            break;
        }
    }
    wait_until("the agent to stop", || agent.error().is_some());
    let error = agent.error().unwrap();
    let AgentError::Closed { reason, message } = &error else {
        panic!("expected a resync-required close, got {error}");
    };
    assert_eq!(*reason, CloseReason::ResyncRequired, "{error}");
    assert!(message.contains("staging stayed full"), "{message}");
    let stats = agent.stats();
    assert!(
        stats
            .closes
            .iter()
            .any(|c| c.reason == CloseReason::StagingFull),
        "{stats:?}"
    );
    // Unacknowledged frames stay with the agent; nothing acknowledged is lost.
    let (unacked, _) = agent.backlog();
    assert!(unacked > 0);
    assert_eq!(agent.acked_seq() + unacked as u64, 40);
    drop(agent);
    let acked = acks.check();
    let log = rig.stop_and_reopen();
    assert!(log.resync_required().is_some());
    assert!(log.durable_seq() >= acked.last().copied().unwrap_or(0));
    let staged = staged_frames(&rig.staging);
    assert_eq!(staged[..], reference_frames(&ops, 1)[..staged.len()]);
}

#[test]
fn hashings_share_a_bounded_memory_budget_and_give_it_back() {
    let mut rng = Rng::new(21);
    let data: Vec<u8> = (0..(1 << 20) + 12 * 1024)
        .map(|_| rng.next_u64() as u8)
        .collect();
    // 17 chunks of 64 KiB: a 176-byte list, plus the 4 MiB read buffer.
    let need = 40 + 17 * 8 + (4u64 << 20);
    let fetch = |rig: &Rig| fetch_chunk_hashes(rig.addr(), &ITEM, TOKEN, 1, 65536, SAFETY, 1 << 20);
    let short = Rig::new(DataPortConfig {
        max_hash_memory_bytes: need - 1,
        ..DataPortConfig::default()
    });
    std::fs::write(&short.replicas[1], &data).unwrap();
    let error = fetch(&short).unwrap_err();
    let AgentError::Refused {
        status, message, ..
    } = &error
    else {
        panic!("expected busy, got {error}");
    };
    assert_eq!(*status, RefusalStatus::Busy, "{error}");
    assert!(message.contains("memory"), "{message}");
    let exact = Rig::new(DataPortConfig {
        max_hash_memory_bytes: need,
        ..DataPortConfig::default()
    });
    std::fs::write(&exact.replicas[1], &data).unwrap();
    // One at a time fits, again and again: each hashing returns what it reserved.
    for _ in 0..3 {
        assert_eq!(fetch(&exact).unwrap().hashes.len(), 17);
        wait_until("the hashing to return its memory", || {
            exact.port.stats().hash_memory_bytes == 0
        });
    }
}
