//! io_uring-specific tests (and the OS backends' edge cases): probe, registration, drop, threads, fallbacks.

#![allow(clippy::unwrap_used)]

use super::*;

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
