//! Backend matrix for `engine::io`: one suite, written once over `IoEngine`, run for every
//! backend (io_uring with and without registered buffers, pread/pwrite, the simulator in
//! submission order and reordered), followed by backend-specific tests.
//!
//! OS-backend files live under `CARGO_TARGET_TMPDIR` (the target directory's filesystem)
//! and are opened with `O_DIRECT` required. When io_uring or `O_DIRECT` is unavailable, the
//! affected tests print a loud `SKIPPED` line on stderr and return; they do not fail.

// Test helpers outside #[test] functions unwrap too: a failure here is a test failure.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use engine::io::uring::RingSetup;
use engine::io::{
    BackendChoice, BufPool, BufPoolConfig, Completion, CrashMode, DirectIo, FileId, IoBuf,
    IoEngine, IoOp, OpenError, RejectReason, ReplicaFile, SimDiskSet, SimEngine, SimEngineConfig,
    SimFaultPlan, SimFileConfig, SyncFileEngine, UringConfig, UringEngine, open_os_engine, probe,
};
use rand_xoshiro::Xoshiro256PlusPlus;
use rand_xoshiro::rand_core::{Rng, SeedableRng};

const QD: usize = 16;
const BUF_BYTES: usize = 1 << 20;
const POOL_BUFS: usize = QD + 8;
const FILE_BYTES: u64 = 8 << 20;
const FILES: usize = 2;

struct Fixture<E> {
    engine: E,
    pool: BufPool,
    files: Vec<FileId>,
    /// For OS backends: the paths of the files, for checks with std.
    paths: Vec<PathBuf>,
    /// For the sim backend: the disks and file names.
    sim: Option<(SimDiskSet, Vec<String>)>,
    _dir: Option<tempfile::TempDir>,
}

fn new_pool() -> BufPool {
    BufPool::new(BufPoolConfig {
        buf_size_bytes: BUF_BYTES,
        buf_count: POOL_BUFS,
        ..BufPoolConfig::default()
    })
    .unwrap()
}

fn skip(what: &str, why: &str) {
    eprintln!();
    eprintln!("************************************************************************");
    eprintln!("*** SKIPPED {what}: {why}");
    eprintln!("************************************************************************");
}

/// Creates `FILES` files of `FILE_BYTES` with O_DIRECT, or `None` (loudly) if refused.
fn os_files(what: &str) -> Option<(tempfile::TempDir, Vec<ReplicaFile>)> {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mut files = Vec::new();
    for i in 0..FILES {
        match ReplicaFile::create(
            dir.path().join(format!("replica{i}")),
            FILE_BYTES,
            DirectIo::Require,
        ) {
            Ok(f) => files.push(f),
            Err(e @ OpenError::DirectIoUnsupported { .. }) => {
                skip(what, &e.to_string());
                return None;
            }
            Err(e) => panic!("{e}"),
        }
    }
    Some((dir, files))
}

fn uring_available(what: &str) -> bool {
    match probe() {
        BackendChoice::Uring => true,
        BackendChoice::SyncFile { reason } => {
            skip(what, &format!("io_uring unavailable here: {reason}"));
            false
        }
    }
}

fn uring_fixture(register_buffers: bool) -> Option<Fixture<UringEngine>> {
    if !uring_available("io_uring test") {
        return None;
    }
    let (dir, files) = os_files("io_uring test")?;
    let pool = new_pool();
    let mut engine = UringEngine::new(
        Some(&pool),
        UringConfig {
            queue_depth: QD,
            register_buffers,
            ..UringConfig::default()
        },
    )
    .unwrap();
    if register_buffers && !engine.buffers_registered() {
        eprintln!("WARNING: io_uring buffer registration failed (memlock?); testing unregistered");
    }
    let paths = files.iter().map(|f| f.path().to_path_buf()).collect();
    let ids = files
        .into_iter()
        .map(|f| engine.add_file(f).unwrap())
        .collect();
    Some(Fixture {
        engine,
        pool,
        files: ids,
        paths,
        sim: None,
        _dir: Some(dir),
    })
}

fn sync_fixture() -> Option<Fixture<SyncFileEngine>> {
    let (dir, files) = os_files("sync_file test")?;
    let mut engine = SyncFileEngine::new(QD).unwrap();
    let paths = files.iter().map(|f| f.path().to_path_buf()).collect();
    let ids = files
        .into_iter()
        .map(|f| engine.add_file(f).unwrap())
        .collect();
    Some(Fixture {
        engine,
        pool: new_pool(),
        files: ids,
        paths,
        sim: None,
        _dir: Some(dir),
    })
}

fn sim_fixture_with(reorder: bool, seed: u64) -> Fixture<SimEngine> {
    let disks = SimDiskSet::new();
    let mut engine = SimEngine::new(
        &disks,
        SimEngineConfig {
            queue_depth: QD,
            seed,
            reorder,
        },
    )
    .unwrap();
    let mut names = Vec::new();
    let mut ids = Vec::new();
    for i in 0..FILES {
        let name = format!("disk{i}");
        disks
            .create_file(
                &name,
                SimFileConfig {
                    size_bytes: FILE_BYTES,
                    block_size_bytes: 4096,
                },
            )
            .unwrap();
        ids.push(engine.add_file(name.clone()).unwrap());
        names.push(name);
    }
    Fixture {
        engine,
        pool: new_pool(),
        files: ids,
        paths: Vec::new(),
        sim: Some((disks, names)),
        _dir: None,
    }
}

fn sim_fixture(reorder: bool) -> Option<Fixture<SimEngine>> {
    Some(sim_fixture_with(reorder, 42))
}

// ---------------------------------------------------------------------------------------------
// Helpers, generic over the engine.

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0; len];
    Xoshiro256PlusPlus::seed_from_u64(seed).fill_bytes(&mut out);
    out
}

fn filled(pool: &BufPool, data: &[u8]) -> IoBuf {
    let mut buf = pool.take().expect("pool exhausted");
    buf.copy_from(data);
    buf
}

/// Reaps until `n` completions have arrived.
fn reap_n<E: IoEngine + ?Sized>(engine: &mut E, n: usize) -> Vec<Completion> {
    let mut out = Vec::new();
    let mut idle_rounds = 0;
    while out.len() < n {
        let before = out.len();
        engine.reap(&mut out, 1).unwrap();
        if out.len() == before {
            idle_rounds += 1;
            assert!(
                idle_rounds < 1000,
                "reap makes no progress ({} of {n})",
                out.len()
            );
        }
    }
    assert_eq!(out.len(), n, "more completions than ops");
    out
}

/// Submits one op, kicks, and waits for its completion.
fn run<E: IoEngine + ?Sized>(engine: &mut E, op: IoOp, tag: u64) -> Completion {
    engine.submit(op, tag).unwrap();
    engine.kick().unwrap();
    let mut c = reap_n(engine, 1);
    let c = c.remove(0);
    assert_eq!(c.tag, tag);
    c
}

fn write_at<E: IoEngine>(fx: &mut Fixture<E>, file: FileId, offset_bytes: u64, data: &[u8]) {
    let buf = filled(&fx.pool, data);
    let c = run(
        &mut fx.engine,
        IoOp::Write {
            file,
            offset_bytes,
            buf,
        },
        1,
    );
    assert_eq!(c.result.unwrap() as usize, data.len());
    assert!(c.buf.is_some());
}

fn read_at<E: IoEngine>(
    fx: &mut Fixture<E>,
    file: FileId,
    offset_bytes: u64,
    len: usize,
) -> Vec<u8> {
    let mut buf = fx.pool.take().expect("pool exhausted");
    buf.set_len_bytes(len);
    let c = run(
        &mut fx.engine,
        IoOp::Read {
            file,
            offset_bytes,
            buf,
        },
        2,
    );
    let n = c.result.unwrap() as usize;
    let buf = c.buf.unwrap();
    assert_eq!(buf.len_bytes(), n);
    buf.as_slice().to_vec()
}

fn flush<E: IoEngine>(fx: &mut Fixture<E>, file: FileId) {
    let c = run(&mut fx.engine, IoOp::Flush { file }, 3);
    assert_eq!(c.result.unwrap(), 0);
    assert!(c.buf.is_none());
}

fn expect_rejected<E: IoEngine>(engine: &mut E, op: IoOp, reason: RejectReason) -> IoOp {
    match engine.submit(op, 99) {
        Ok(()) => panic!("op accepted, expected {reason:?}"),
        Err(r) => {
            assert_eq!(r.reason, reason);
            r.op
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The generic suite.

/// Writes of several sizes at several aligned offsets read back identically, on two files.
fn write_read_back<E: IoEngine>(fx: &mut Fixture<E>) {
    let cases: [(u64, usize); 6] = [
        (0, 4096),
        (4096 * 3, 8192),
        (1 << 20, 64 << 10),
        (3 << 20, BUF_BYTES),
        (FILE_BYTES - 4096, 4096),
        ((5 << 20) + 4096 * 7, 12288),
    ];
    for (i, &(offset, len)) in cases.iter().enumerate() {
        for (f, &file) in fx.files.clone().iter().enumerate() {
            let data = pattern((i * 10 + f) as u64, len);
            write_at(fx, file, offset, &data);
            assert_eq!(read_at(fx, file, offset, len), data, "case {i} file {f}");
        }
    }
    // Earlier writes are not disturbed by later ones.
    let data = pattern(0, 4096);
    assert_eq!(read_at(fx, fx.files[0], 0, 4096), data);
}

/// `queue_depth` ops can be in flight at once; every tag comes back exactly once.
fn many_in_flight_up_to_queue_depth<E: IoEngine>(fx: &mut Fixture<E>) {
    let qd = fx.engine.queue_depth();
    assert_eq!(qd, QD);
    let len = 64 << 10;
    for i in 0..qd {
        let file = fx.files[i % FILES];
        let buf = filled(&fx.pool, &pattern(100 + i as u64, len));
        let op = IoOp::Write {
            file,
            offset_bytes: (i * len) as u64,
            buf,
        };
        fx.engine.submit(op, i as u64).unwrap();
    }
    assert_eq!(fx.engine.in_flight_count(), qd);
    fx.engine.kick().unwrap();
    let done = reap_n(&mut fx.engine, qd);
    assert_eq!(fx.engine.in_flight_count(), 0);
    let tags: BTreeSet<u64> = done.iter().map(|c| c.tag).collect();
    assert_eq!(tags, (0..qd as u64).collect());
    for c in &done {
        assert_eq!(*c.result.as_ref().unwrap() as usize, len);
    }
    drop(done);
    for i in 0..qd {
        let got = read_at(fx, fx.files[i % FILES], (i * len) as u64, len);
        assert_eq!(got, pattern(100 + i as u64, len), "op {i}");
    }
}

/// One op past the queue depth is rejected with QueueFull and comes back whole; after a
/// reap there is room again.
fn queue_full_gives_op_back<E: IoEngine>(fx: &mut Fixture<E>) {
    let file = fx.files[0];
    for i in 0..QD {
        let op = IoOp::WriteZeroes {
            file,
            offset_bytes: (i * 4096) as u64,
            len_bytes: 4096,
        };
        fx.engine.submit(op, i as u64).unwrap();
    }
    let data = pattern(7, 8192);
    let buf = filled(&fx.pool, &data);
    let index = buf.index();
    let op = IoOp::Write {
        file,
        offset_bytes: 1 << 20,
        buf,
    };
    let op = expect_rejected(&mut fx.engine, op, RejectReason::QueueFull);
    let IoOp::Write {
        file: back_file,
        offset_bytes,
        buf,
    } = op
    else {
        panic!("a different op came back");
    };
    assert_eq!((back_file, offset_bytes), (file, 1 << 20));
    assert_eq!(buf.index(), index);
    assert_eq!(buf.as_slice(), &data[..]);
    assert_eq!(fx.engine.in_flight_count(), QD);

    fx.engine.kick().unwrap();
    let done = reap_n(&mut fx.engine, QD);
    assert!(done.iter().all(|c| c.result.is_ok()));
    let op = IoOp::Write {
        file,
        offset_bytes: 1 << 20,
        buf,
    };
    fx.engine.submit(op, 500).unwrap();
    fx.engine.kick().unwrap();
    let c = reap_n(&mut fx.engine, 1).remove(0);
    assert_eq!((c.tag, c.result.unwrap()), (500, 8192));
}

/// Misaligned, empty and unknown-file ops are refused at submit, with the op given back,
/// and nothing is in flight.
fn invalid_ops_rejected<E: IoEngine>(fx: &mut Fixture<E>) {
    let file = fx.files[0];
    let align = u64::from(fx.engine.alignment_bytes(file).unwrap());
    assert!(align.is_power_of_two() && (512..=4096).contains(&align));

    let buf = filled(&fx.pool, &[1; 4096]);
    let op = IoOp::Write {
        file,
        offset_bytes: 100,
        buf,
    };
    let op = expect_rejected(&mut fx.engine, op, RejectReason::Misaligned);
    let mut buf = op.into_buf().unwrap();
    buf.set_len_bytes(100);
    let op = IoOp::Read {
        file,
        offset_bytes: 0,
        buf,
    };
    let op = expect_rejected(&mut fx.engine, op, RejectReason::Misaligned);
    let mut buf = op.into_buf().unwrap();
    buf.set_len_bytes(0);
    let op = IoOp::Write {
        file,
        offset_bytes: 0,
        buf,
    };
    let op = expect_rejected(&mut fx.engine, op, RejectReason::EmptyLength);
    let mut buf = op.into_buf().unwrap();
    buf.set_len_bytes(4096);
    let op = IoOp::Write {
        file: bogus_file(fx),
        offset_bytes: 0,
        buf,
    };
    let op = expect_rejected(&mut fx.engine, op, RejectReason::UnknownFile);
    drop(op);
    let op = IoOp::WriteZeroes {
        file,
        offset_bytes: align,
        len_bytes: 1000,
    };
    expect_rejected(&mut fx.engine, op, RejectReason::Misaligned);
    let bogus = bogus_file(fx);
    expect_rejected(
        &mut fx.engine,
        IoOp::Flush { file: bogus },
        RejectReason::UnknownFile,
    );
    assert_eq!(fx.engine.in_flight_count(), 0);
    assert_eq!(fx.pool.available(), fx.pool.capacity());
    // Nothing was queued: a reap returns nothing.
    let mut out = Vec::new();
    assert_eq!(fx.engine.reap(&mut out, 0).unwrap(), 0);
    assert!(out.is_empty());
}

/// A FileId that the fixture's engine never handed out.
fn bogus_file<E: IoEngine>(fx: &Fixture<E>) -> FileId {
    FileId::from_index(fx.files.len() as u32 + 5)
}

/// WriteZeroes over written data reads back zeros there, and leaves the rest alone.
fn write_zeroes_reads_back_zeros<E: IoEngine>(fx: &mut Fixture<E>) {
    let file = fx.files[1];
    let data = pattern(3, 256 << 10);
    write_at(fx, file, 1 << 20, &data);
    let c = run(
        &mut fx.engine,
        IoOp::WriteZeroes {
            file,
            offset_bytes: (1 << 20) + (64 << 10),
            len_bytes: 128 << 10,
        },
        9,
    );
    assert_eq!(c.result.unwrap(), 0);
    assert!(c.buf.is_none());
    let got = read_at(fx, file, 1 << 20, 256 << 10);
    assert_eq!(got[..64 << 10], data[..64 << 10]);
    assert!(got[64 << 10..192 << 10].iter().all(|&b| b == 0));
    assert_eq!(got[192 << 10..], data[192 << 10..]);
}

/// A flush after completed writes completes with Ok(0) and no buffer; the data is there.
fn flush_completes<E: IoEngine>(fx: &mut Fixture<E>) {
    for &file in &fx.files.clone() {
        let data = pattern(11, 32 << 10);
        write_at(fx, file, 0, &data);
        flush(fx, file);
        assert_eq!(read_at(fx, file, 0, 32 << 10), data);
    }
    if let Some((disks, names)) = &fx.sim {
        for name in names {
            assert_eq!(disks.pending_write_count(name), Some(0));
        }
    }
    for (i, path) in fx.paths.iter().enumerate() {
        let mut got = vec![0; 32 << 10];
        std::fs::File::open(path)
            .unwrap()
            .read_exact_at(&mut got, 0)
            .unwrap();
        assert_eq!(got, pattern(11, 32 << 10), "file {i} seen through std");
    }
}

/// Buffers stay with the engine while in flight and come back, the same ones, in the
/// completions; dropping the completions returns them to the pool.
fn buffer_ownership_returns<E: IoEngine>(fx: &mut Fixture<E>) {
    let cap = fx.pool.capacity();
    let mut by_tag = BTreeMap::new();
    for i in 0..QD {
        let buf = filled(&fx.pool, &pattern(i as u64, 4096));
        by_tag.insert(i as u64, buf.index());
        let op = if i.is_multiple_of(2) {
            IoOp::Write {
                file: fx.files[0],
                offset_bytes: (i * 4096) as u64,
                buf,
            }
        } else {
            IoOp::Read {
                file: fx.files[1],
                offset_bytes: (i * 4096) as u64,
                buf,
            }
        };
        fx.engine.submit(op, i as u64).unwrap();
    }
    assert_eq!(fx.pool.available(), cap - QD);
    fx.engine.kick().unwrap();
    let done = reap_n(&mut fx.engine, QD);
    assert_eq!(
        fx.pool.available(),
        cap - QD,
        "completions hold the buffers"
    );
    for c in &done {
        assert!(c.result.is_ok(), "{:?}", c.result);
        assert_eq!(
            c.buf.as_ref().map(IoBuf::index),
            by_tag.get(&c.tag).copied()
        );
    }
    drop(done);
    assert_eq!(fx.pool.available(), cap);
}

/// A read reaching past end of file completes short, with the buffer shortened.
fn read_past_eof_is_short<E: IoEngine>(fx: &mut Fixture<E>) {
    let file = fx.files[0];
    let data = pattern(5, 4096);
    write_at(fx, file, FILE_BYTES - 4096, &data);
    let got = read_at(fx, file, FILE_BYTES - 4096, 16384);
    assert_eq!(got, data);
    assert!(read_at(fx, file, FILE_BYTES, 4096).is_empty());
}

/// Mixed ops on both files, polled with `reap(min_count = 0)` until all are back.
fn poll_with_zero_min_count<E: IoEngine>(fx: &mut Fixture<E>) {
    let mut expected = BTreeSet::new();
    for i in 0..QD as u64 {
        let file = fx.files[(i % 2) as usize];
        let op = match i % 4 {
            0 | 1 => IoOp::Write {
                file,
                offset_bytes: i * 8192,
                buf: filled(&fx.pool, &pattern(i, 8192)),
            },
            2 => IoOp::WriteZeroes {
                file,
                offset_bytes: (2 << 20) + i * 8192,
                len_bytes: 8192,
            },
            _ => IoOp::Flush { file },
        };
        fx.engine.submit(op, i).unwrap();
        expected.insert(i);
    }
    fx.engine.kick().unwrap();
    let mut out = Vec::new();
    let mut rounds = 0u64;
    while out.len() < QD {
        fx.engine.reap(&mut out, 0).unwrap();
        rounds += 1;
        assert!(rounds < 1_000_000, "polling never finished");
        if out.len() < QD {
            std::thread::yield_now();
        }
    }
    assert_eq!(out.iter().map(|c| c.tag).collect::<BTreeSet<_>>(), expected);
    assert!(out.iter().all(|c| c.result.is_ok()));
    assert_eq!(fx.engine.in_flight_count(), 0);
}

/// The engine can be built on one thread and driven from another (the worker), and dropped
/// there.
fn engine_moves_to_worker_thread<E: IoEngine + 'static>(fx: Fixture<E>) {
    let Fixture {
        engine,
        pool,
        files,
        _dir,
        ..
    } = fx;
    std::thread::spawn(move || {
        let mut engine = engine;
        let buf = filled(&pool, &pattern(77, 4096));
        let op = IoOp::Write {
            file: files[0],
            offset_bytes: 4096,
            buf,
        };
        let c = run(&mut engine, op, 1);
        assert_eq!(c.result.unwrap(), 4096);
        let mut buf = c.buf.unwrap();
        buf.as_mut_slice().fill(0);
        let op = IoOp::Read {
            file: files[0],
            offset_bytes: 4096,
            buf,
        };
        let c = run(&mut engine, op, 2);
        assert_eq!(c.buf.unwrap().as_slice(), &pattern(77, 4096)[..]);
        drop(engine);
    })
    .join()
    .unwrap();
}

/// Instantiates every test of the suite for one backend: `$fixture` makes the fixture (or
/// returns `None` after a loud skip message).
macro_rules! suite_for {
    ($backend:ident, $fixture:expr) => {
        mod $backend {
            suite_for!(@tests $fixture;
                write_read_back,
                many_in_flight_up_to_queue_depth,
                queue_full_gives_op_back,
                invalid_ops_rejected,
                write_zeroes_reads_back_zeros,
                flush_completes,
                buffer_ownership_returns,
                read_past_eof_is_short,
                poll_with_zero_min_count,
            );
            #[test]
            fn engine_moves_to_worker_thread() {
                if let Some(fx) = $fixture {
                    super::engine_moves_to_worker_thread(fx);
                }
            }
        }
    };
    (@tests $fixture:expr; $($test:ident),* $(,)?) => {
        $(
            #[test]
            fn $test() {
                if let Some(mut fx) = $fixture {
                    super::$test(&mut fx);
                }
            }
        )*
    };
}

suite_for!(uring, super::uring_fixture(true));
suite_for!(uring_unregistered, super::uring_fixture(false));
suite_for!(sync_file, super::sync_fixture());
suite_for!(sim, super::sim_fixture(false));
suite_for!(sim_reordered, super::sim_fixture(true));

mod sim_specific;
mod uring_specific;
