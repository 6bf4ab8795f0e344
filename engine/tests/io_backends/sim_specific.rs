//! Simulator-specific tests: crashes, tears, faults, reordering, all deterministic by seed.

#![allow(clippy::unwrap_used)]

use super::*;

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
