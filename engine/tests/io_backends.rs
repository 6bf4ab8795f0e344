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

// ---------------------------------------------------------------------------------------------
// Simulator-specific tests.

fn sim_names(fx: &Fixture<SimEngine>) -> (SimDiskSet, Vec<String>) {
    fx.sim.clone().unwrap()
}

/// Crash keeps flushed writes and drops unflushed ones; after it, live == durable.
#[test]
fn sim_crash_drops_unflushed_keeps_flushed() {
    let mut fx = sim_fixture_with(false, 1);
    let (disks, names) = sim_names(&fx);
    let (f0, f1) = (fx.files[0], fx.files[1]);
    let a = pattern(1, 8192);
    let b = pattern(2, 8192);
    write_at(&mut fx, f0, 0, &a);
    write_at(&mut fx, f1, 0, &a);
    flush(&mut fx, f0);
    // f1 was never flushed; f0 gets a later, unflushed write.
    write_at(&mut fx, f0, 8192, &b);
    assert_eq!(disks.live_image(&names[0]).unwrap()[8192..16384], b[..]);
    assert!(
        disks.durable_image(&names[0]).unwrap()[8192..16384]
            .iter()
            .all(|&x| x == 0)
    );
    assert_eq!(disks.pending_write_count(&names[0]), Some(1));

    let images = disks.crash(CrashMode::DropUnflushed);
    let img0 = &images[&names[0]];
    assert_eq!(img0[..8192], a[..]);
    assert!(img0[8192..16384].iter().all(|&x| x == 0));
    assert!(images[&names[1]].iter().all(|&x| x == 0));
    for name in &names {
        assert_eq!(disks.live_image(name).as_ref(), Some(&images[name]));
        assert_eq!(disks.durable_image(name).as_ref(), Some(&images[name]));
    }
    // Reads after the crash see the crash image.
    assert_eq!(read_at(&mut fx, f0, 0, 16384)[..8192], a[..]);
}

/// A flush covers only writes that completed before it was submitted.
#[test]
fn sim_flush_covers_only_writes_completed_before_submit() {
    let mut fx = sim_fixture_with(false, 1);
    let (disks, names) = sim_names(&fx);
    let file = fx.files[0];
    write_at(&mut fx, file, 0, &pattern(1, 4096));
    // Write B is submitted but not completed when the flush is submitted.
    let buf = filled(&fx.pool, &pattern(2, 4096));
    fx.engine
        .submit(
            IoOp::Write {
                file,
                offset_bytes: 4096,
                buf,
            },
            10,
        )
        .unwrap();
    fx.engine.submit(IoOp::Flush { file }, 11).unwrap();
    let done = reap_n(&mut fx.engine, 2);
    assert!(done.iter().all(|c| c.result.is_ok()));
    let durable = disks.durable_image(&names[0]).unwrap();
    assert_eq!(durable[..4096], pattern(1, 4096)[..]);
    assert!(
        durable[4096..8192].iter().all(|&x| x == 0),
        "B must not be durable"
    );
    assert_eq!(disks.pending_write_count(&names[0]), Some(1));
}

/// Torn crashes apply whole blocks of unflushed writes, chosen by the seed, reproducibly.
#[test]
fn sim_crash_tear_is_per_block_and_deterministic() {
    let run_once = |seed: u64| {
        let mut fx = sim_fixture_with(false, 1);
        let (disks, names) = sim_names(&fx);
        let file = fx.files[0];
        write_at(&mut fx, file, 0, &pattern(9, 64 << 10));
        disks
            .crash(CrashMode::Tear {
                seed,
                apply_probability: 0.5,
            })
            .remove(&names[0])
            .unwrap()
    };
    let a = run_once(5);
    assert_eq!(a, run_once(5), "same seed, same image");
    let data = pattern(9, 64 << 10);
    let mut applied = 0;
    for (i, block) in a[..64 << 10].chunks(4096).enumerate() {
        if block == &data[i * 4096..(i + 1) * 4096] {
            applied += 1;
        } else {
            assert!(
                block.iter().all(|&x| x == 0),
                "block {i} is neither old nor new"
            );
        }
    }
    assert!(
        applied > 0 && applied < 16,
        "{applied} of 16 blocks applied"
    );
    let differs = (6..30).any(|seed| run_once(seed) != a);
    assert!(differs, "other seeds give other tears");
}

/// A failed flush comes back as EIO, poisons its file (every later op fails, buffers come
/// back) and leaves other files alone; a crash clears the poison.
#[test]
fn sim_failed_flush_poisons_file() {
    let mut fx = sim_fixture_with(false, 1);
    let (disks, names) = sim_names(&fx);
    let (f0, f1) = (fx.files[0], fx.files[1]);
    disks
        .set_faults(
            &names[0],
            SimFaultPlan {
                fail_flush_nth: Some(2),
                ..SimFaultPlan::default()
            },
        )
        .unwrap();
    write_at(&mut fx, f0, 0, &pattern(1, 4096));
    flush(&mut fx, f0);
    write_at(&mut fx, f0, 4096, &pattern(2, 4096));
    let c = run(&mut fx.engine, IoOp::Flush { file: f0 }, 20);
    assert_eq!(c.result.unwrap_err().raw_os_error(), Some(libc::EIO));
    assert_eq!(disks.is_poisoned(&names[0]), Some(true));

    let buf = filled(&fx.pool, &pattern(3, 4096));
    let index = buf.index();
    let c = run(
        &mut fx.engine,
        IoOp::Write {
            file: f0,
            offset_bytes: 8192,
            buf,
        },
        21,
    );
    assert_eq!(c.result.unwrap_err().raw_os_error(), Some(libc::EIO));
    assert_eq!(
        c.buf.unwrap().index(),
        index,
        "the buffer comes back with the error"
    );
    let mut buf = fx.pool.take().unwrap();
    buf.set_len_bytes(4096);
    let c = run(
        &mut fx.engine,
        IoOp::Read {
            file: f0,
            offset_bytes: 0,
            buf,
        },
        22,
    );
    assert!(c.result.is_err() && c.buf.is_some());
    let c = run(&mut fx.engine, IoOp::Flush { file: f0 }, 23);
    assert!(
        c.result.is_err(),
        "flushes fail too: never retry a failed flush"
    );
    // The other file is fine.
    write_at(&mut fx, f1, 0, &pattern(4, 4096));
    flush(&mut fx, f1);
    // The unflushed write before the failed flush is not durable.
    let img = disks
        .crash(CrashMode::DropUnflushed)
        .remove(&names[0])
        .unwrap();
    assert_eq!(img[..4096], pattern(1, 4096)[..]);
    assert!(img[4096..8192].iter().all(|&x| x == 0));
    assert_eq!(disks.is_poisoned(&names[0]), Some(false));
}

/// The Nth write fails with EIO and returns its buffer; others succeed; the failed write
/// leaves no trace in the image.
#[test]
fn sim_nth_write_fault() {
    let mut fx = sim_fixture_with(true, 3);
    let (disks, names) = sim_names(&fx);
    let file = fx.files[0];
    disks
        .set_faults(
            &names[0],
            SimFaultPlan {
                fail_write_nth: Some(3),
                ..SimFaultPlan::default()
            },
        )
        .unwrap();
    let mut index_of = BTreeMap::new();
    for i in 0..6u64 {
        let buf = filled(&fx.pool, &pattern(i, 4096));
        index_of.insert(i, buf.index());
        let op = IoOp::Write {
            file,
            offset_bytes: i * 4096,
            buf,
        };
        fx.engine.submit(op, i).unwrap();
    }
    fx.engine.kick().unwrap();
    for c in reap_n(&mut fx.engine, 6) {
        assert_eq!(
            c.buf.as_ref().map(IoBuf::index),
            index_of.get(&c.tag).copied()
        );
        if c.tag == 2 {
            let e = c.result.unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
        } else {
            assert_eq!(c.result.unwrap(), 4096, "tag {}", c.tag);
        }
    }
    let live = disks.live_image(&names[0]).unwrap();
    for i in 0..6usize {
        let block = &live[i * 4096..(i + 1) * 4096];
        if i == 2 {
            assert!(block.iter().all(|&x| x == 0));
        } else {
            assert_eq!(block, &pattern(i as u64, 4096)[..]);
        }
    }
}

/// ENOSPC: scripted on the Nth write, and for writes past the end of the disk.
#[test]
fn sim_enospc() {
    let mut fx = sim_fixture_with(false, 1);
    let (disks, names) = sim_names(&fx);
    let file = fx.files[0];
    disks
        .set_faults(
            &names[0],
            SimFaultPlan {
                enospc_write_nth: Some(1),
                ..SimFaultPlan::default()
            },
        )
        .unwrap();
    let c = run(
        &mut fx.engine,
        IoOp::WriteZeroes {
            file,
            offset_bytes: 0,
            len_bytes: 4096,
        },
        1,
    );
    assert_eq!(c.result.unwrap_err().raw_os_error(), Some(libc::ENOSPC));
    let buf = filled(&fx.pool, &pattern(1, 8192));
    let c = run(
        &mut fx.engine,
        IoOp::Write {
            file,
            offset_bytes: FILE_BYTES - 4096,
            buf,
        },
        2,
    );
    assert_eq!(c.result.unwrap_err().raw_os_error(), Some(libc::ENOSPC));
    assert!(c.buf.is_some());
}

/// After N ops every op fails with EIO; the file is not poisoned (the faults are the device's).
#[test]
fn sim_fail_all_after_ops() {
    let mut fx = sim_fixture_with(false, 1);
    let (disks, names) = sim_names(&fx);
    let file = fx.files[0];
    disks
        .set_faults(
            &names[0],
            SimFaultPlan {
                fail_all_after_ops: Some(2),
                ..SimFaultPlan::default()
            },
        )
        .unwrap();
    write_at(&mut fx, file, 0, &pattern(1, 4096));
    flush(&mut fx, file);
    for tag in 0..3 {
        let c = run(&mut fx.engine, IoOp::Flush { file }, tag);
        assert_eq!(c.result.unwrap_err().raw_os_error(), Some(libc::EIO));
    }
    assert_eq!(disks.is_poisoned(&names[0]), Some(false));
    let f1 = fx.files[1];
    write_at(&mut fx, f1, 0, &pattern(1, 4096));
}

/// Ops submitted before a crash complete with an error after it.
#[test]
fn sim_crash_fails_ops_in_flight() {
    let mut fx = sim_fixture_with(false, 1);
    let (disks, names) = sim_names(&fx);
    let file = fx.files[0];
    let buf = filled(&fx.pool, &pattern(1, 4096));
    fx.engine
        .submit(
            IoOp::Write {
                file,
                offset_bytes: 0,
                buf,
            },
            1,
        )
        .unwrap();
    fx.engine.kick().unwrap();
    disks.crash(CrashMode::DropUnflushed);
    let c = reap_n(&mut fx.engine, 1).remove(0);
    assert!(c.result.is_err() && c.buf.is_some());
    assert!(disks.live_image(&names[0]).unwrap().iter().all(|&x| x == 0));
    // New ops work.
    write_at(&mut fx, file, 0, &pattern(2, 4096));
}

/// The completion order of a reordering sim engine depends only on its seed.
#[test]
fn sim_reorder_is_deterministic() {
    let order = |seed: u64| {
        let mut fx = sim_fixture_with(true, seed);
        for i in 0..QD as u64 {
            let op = IoOp::WriteZeroes {
                file: fx.files[0],
                offset_bytes: i * 4096,
                len_bytes: 4096,
            };
            fx.engine.submit(op, i).unwrap();
        }
        reap_n(&mut fx.engine, QD)
            .iter()
            .map(|c| c.tag)
            .collect::<Vec<_>>()
    };
    assert_eq!(order(7), order(7));
    assert_ne!(
        order(7),
        (0..QD as u64).collect::<Vec<_>>(),
        "seed 7 reorders"
    );
    assert!((8..20).any(|s| order(s) != order(7)));
}

// ---------------------------------------------------------------------------------------------
// io_uring-specific tests.

/// On this machine io_uring must work; the probe says so and the OS engine is io_uring.
#[test]
fn uring_probe_and_os_engine_choice() {
    let choice = probe();
    eprintln!("probe: {choice:?}");
    if !uring_available("uring_probe_and_os_engine_choice") {
        return;
    }
    let pool = new_pool();
    let (engine, choice) = open_os_engine(&pool, QD).unwrap();
    assert_eq!(choice, BackendChoice::Uring);
    assert_eq!(engine.backend_name(), "uring");
}

/// The ring gets the best setup this kernel has, and registers the pool and files.
#[test]
fn uring_setup_and_registration() {
    let Some(fx) = uring_fixture(true) else {
        return;
    };
    eprintln!("{:?}", fx.engine);
    assert_eq!(fx.engine.ring_setup(), RingSetup::SingleIssuerDeferTaskrun);
    assert!(fx.engine.files_registered());
    for &file in &fx.files {
        assert_eq!(fx.engine.file_is_fixed(file), Some(true));
    }
    if !fx.engine.buffers_registered() {
        eprintln!("WARNING: buffers not registered (memlock limit without CAP_IPC_LOCK?)");
    }
}

/// A pool of several arenas is registered as several buffers; ops in every arena work, and
/// so do buffers of a pool that is not registered.
#[test]
fn uring_multi_arena_and_foreign_buffers() {
    if !uring_available("uring_multi_arena_and_foreign_buffers") {
        return;
    }
    let Some((_dir, files)) = os_files("uring_multi_arena_and_foreign_buffers") else {
        return;
    };
    let pool = BufPool::new(BufPoolConfig {
        buf_size_bytes: 64 << 10,
        buf_count: 10,
        arena_max_bytes: 128 << 10,
    })
    .unwrap();
    assert_eq!(pool.arena_count(), 5);
    let foreign = BufPool::new(BufPoolConfig {
        buf_size_bytes: 64 << 10,
        buf_count: 2,
        ..BufPoolConfig::default()
    })
    .unwrap();
    let mut engine = UringEngine::new(Some(&pool), UringConfig::default()).unwrap();
    let file = files
        .into_iter()
        .map(|f| engine.add_file(f).unwrap())
        .next()
        .unwrap();
    let mut bufs: Vec<IoBuf> = (0..10).map(|_| pool.take().unwrap()).collect();
    bufs.push(foreign.take().unwrap());
    for (i, buf) in bufs.iter_mut().enumerate() {
        buf.copy_from(&pattern(i as u64, 64 << 10));
    }
    for (i, buf) in bufs.into_iter().enumerate() {
        let op = IoOp::Write {
            file,
            offset_bytes: (i as u64) * (64 << 10),
            buf,
        };
        engine.submit(op, i as u64).unwrap();
    }
    engine.kick().unwrap();
    let done = reap_n(&mut engine, 11);
    let bufs: Vec<IoBuf> = done
        .into_iter()
        .map(|c| {
            assert_eq!(c.result.unwrap(), 64 << 10);
            c.buf.unwrap()
        })
        .collect();
    for (i, mut buf) in bufs.into_iter().enumerate() {
        buf.as_mut_slice().fill(0);
        let offset_bytes = (i as u64) * (64 << 10);
        let c = run(
            &mut engine,
            IoOp::Read {
                file,
                offset_bytes,
                buf,
            },
            100,
        );
        let want = pattern(offset_bytes / (64 << 10), 64 << 10);
        assert_eq!(c.buf.unwrap().as_slice(), &want[..], "block {i}");
    }
}

/// Dropping the engine with writes in flight waits for them: every buffer is back in the
/// pool afterwards and the data is on disk.
#[test]
fn uring_drop_waits_for_in_flight() {
    let Some(fx) = uring_fixture(true) else {
        return;
    };
    let Fixture {
        mut engine,
        pool,
        files,
        paths,
        _dir,
        ..
    } = fx;
    for i in 0..QD {
        let buf = filled(&pool, &pattern(i as u64 + 50, BUF_BYTES));
        let op = IoOp::Write {
            file: files[i % FILES],
            offset_bytes: ((i / FILES) * BUF_BYTES) as u64,
            buf,
        };
        engine.submit(op, i as u64).unwrap();
    }
    engine.kick().unwrap();
    assert_eq!(pool.available(), pool.capacity() - QD);
    drop(engine);
    assert_eq!(pool.available(), pool.capacity());
    for i in 0..QD {
        let mut got = vec![0; BUF_BYTES];
        std::fs::File::open(&paths[i % FILES])
            .unwrap()
            .read_exact_at(&mut got, ((i / FILES) * BUF_BYTES) as u64)
            .unwrap();
        assert!(
            got == pattern(i as u64 + 50, BUF_BYTES),
            "write {i} not on disk"
        );
    }
}

/// Once bound to a thread, a single-issuer ring refuses calls from another thread with an
/// error (no panic), and keeps working on its own thread.
#[test]
fn uring_other_thread_gets_an_error() {
    let Some(mut fx) = uring_fixture(true) else {
        return;
    };
    if !matches!(
        fx.engine.ring_setup(),
        RingSetup::SingleIssuerDeferTaskrun | RingSetup::SingleIssuerCoopTaskrun
    ) {
        skip(
            "uring_other_thread_gets_an_error",
            "ring is not single-issuer",
        );
        return;
    }
    let f0 = fx.files[0];
    write_at(&mut fx, f0, 0, &pattern(1, 4096));
    let engine = fx.engine;
    let mut engine = std::thread::spawn(move || {
        let mut engine = engine;
        let err = engine.kick().unwrap_err();
        assert!(err.to_string().contains("bound to thread"), "{err}");
        let mut out = Vec::new();
        assert!(engine.reap(&mut out, 0).is_err());
        engine
    })
    .join()
    .unwrap();
    let mut out = Vec::new();
    assert_eq!(engine.reap(&mut out, 0).unwrap(), 0);
}

/// On tmpfs (no FALLOC_FL_ZERO_RANGE), WriteZeroes falls back to writing zeros, for both OS
/// backends.
#[test]
fn write_zeroes_fallback_on_tmpfs() {
    let shm = std::path::Path::new("/dev/shm");
    if !shm.is_dir() {
        skip("write_zeroes_fallback_on_tmpfs", "/dev/shm does not exist");
        return;
    }
    let dir = tempfile::tempdir_in(shm).unwrap();
    let open =
        |name: &str| ReplicaFile::create(dir.path().join(name), 4 << 20, DirectIo::Prefer).unwrap();
    // The kernel refuses ZERO_RANGE on tmpfs; check, so the test knows what it covers.
    let probe_file = open("probe");
    let refused = nix::fcntl::fallocate(
        probe_file.as_file(),
        nix::fcntl::FallocateFlags::FALLOC_FL_ZERO_RANGE,
        0,
        4096,
    )
    .is_err();
    eprintln!(
        "tmpfs: O_DIRECT {}, ZERO_RANGE refused: {refused}",
        probe_file.is_direct()
    );

    let pool = new_pool();
    let check = |engine: &mut dyn IoEngine<File = ReplicaFile>, file: ReplicaFile| {
        let file = engine.add_file(file).unwrap();
        let mut buf = pool.take().unwrap();
        buf.as_mut_slice().fill(0xAB);
        engine
            .submit(
                IoOp::Write {
                    file,
                    offset_bytes: 0,
                    buf,
                },
                1,
            )
            .unwrap();
        engine.kick().unwrap();
        let c = reap_n(engine, 1).remove(0);
        assert_eq!(c.result.unwrap() as usize, BUF_BYTES);
        // Two zero ops, longer than the 1 MiB zero buffer, to use it piecewise and twice.
        for tag in [2, 3] {
            let op = IoOp::WriteZeroes {
                file,
                offset_bytes: 4096,
                len_bytes: (2 << 20) - 8192,
            };
            engine.submit(op, tag).unwrap();
            engine.kick().unwrap();
            let c = reap_n(engine, 1).remove(0);
            assert_eq!(c.result.unwrap(), 0, "{}", engine.backend_name());
        }
        let mut buf = c.buf.unwrap();
        buf.as_mut_slice().fill(1);
        engine
            .submit(
                IoOp::Read {
                    file,
                    offset_bytes: 0,
                    buf,
                },
                4,
            )
            .unwrap();
        let c = reap_n(engine, 1).remove(0);
        let got = c.buf.unwrap();
        assert!(got.as_slice()[..4096].iter().all(|&b| b == 0xAB));
        assert!(
            got.as_slice()[4096..].iter().all(|&b| b == 0),
            "{}",
            engine.backend_name()
        );
    };
    let mut sync = SyncFileEngine::new(QD).unwrap();
    check(&mut sync, open("sync"));
    if uring_available("write_zeroes_fallback_on_tmpfs (uring part)") {
        let mut uring = UringEngine::new(Some(&pool), UringConfig::default()).unwrap();
        check(&mut uring, open("uring"));
    }
}

/// Generic code can hold any OS backend behind `dyn IoEngine`.
#[test]
fn dyn_engine_runs_the_suite_helpers() {
    let Some(fx) = sync_fixture() else { return };
    let Fixture {
        engine,
        pool,
        files,
        paths,
        _dir,
        ..
    } = fx;
    let mut fx: Fixture<Box<dyn IoEngine<File = ReplicaFile>>> = Fixture {
        engine: Box::new(engine),
        pool,
        files,
        paths,
        sim: None,
        _dir,
    };
    write_read_back(&mut fx);
}

/// A sim file name the engine does not know is an error at `add_file`, not later.
#[test]
fn sim_add_unknown_file_fails() {
    let disks = SimDiskSet::new();
    let mut engine = SimEngine::new(&disks, SimEngineConfig::default()).unwrap();
    let err = engine.add_file("nope".to_owned()).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::NotFound);
}

/// When the kernel refuses the buffer registration (here: more arenas than io_uring accepts,
/// standing in for ENOMEM under a memlock limit), the engine falls back to unregistered I/O
/// and still works.
#[test]
fn uring_registration_failure_falls_back() {
    if !uring_available("uring_registration_failure_falls_back") {
        return;
    }
    let Some((_dir, files)) = os_files("uring_registration_failure_falls_back") else {
        return;
    };
    // io_uring accepts at most 16384 registered buffers; one arena per buffer here.
    let pool = BufPool::new(BufPoolConfig {
        buf_size_bytes: 4096,
        buf_count: 16385,
        arena_max_bytes: 4096,
    })
    .unwrap();
    let mut engine = UringEngine::new(Some(&pool), UringConfig::default()).unwrap();
    assert!(!engine.buffers_registered());
    let file = files
        .into_iter()
        .map(|f| engine.add_file(f).unwrap())
        .next()
        .unwrap();
    let mut buf = pool.take().unwrap();
    buf.copy_from(&pattern(1, 4096));
    let c = run(
        &mut engine,
        IoOp::Write {
            file,
            offset_bytes: 0,
            buf,
        },
        1,
    );
    assert_eq!(c.result.unwrap(), 4096);
}

/// A file whose size is not a multiple of the alignment: a read over its end completes with
/// the bytes up to the end (not EINVAL from a misaligned follow-up read), on both OS backends.
#[test]
fn os_read_over_unaligned_end_of_file() {
    let Some((dir, _files)) = os_files("os_read_over_unaligned_end_of_file") else {
        return;
    };
    let path = dir.path().join("odd");
    std::fs::write(&path, pattern(8, 5000)).unwrap();
    let pool = new_pool();
    let check = |engine: &mut dyn IoEngine<File = ReplicaFile>| {
        let file = ReplicaFile::open(&path, DirectIo::Require).unwrap();
        let file = engine.add_file(file).unwrap();
        let mut buf = pool.take().unwrap();
        buf.set_len_bytes(8192);
        let c = run(
            engine,
            IoOp::Read {
                file,
                offset_bytes: 0,
                buf,
            },
            1,
        );
        assert_eq!(c.result.unwrap(), 5000, "{}", engine.backend_name());
        assert_eq!(c.buf.unwrap().as_slice(), &pattern(8, 5000)[..]);
    };
    check(&mut SyncFileEngine::new(QD).unwrap());
    if uring_available("os_read_over_unaligned_end_of_file (uring part)") {
        check(&mut UringEngine::new(Some(&pool), UringConfig::default()).unwrap());
    }
}
