//! Unit tests of the staging log: round trips, group commit, crash points, torn tails,
//! damage, fullness, reclaim, failed flushes, and the reader's wake-up.

use super::*;
use crate::delta::{
    Consistency, DeltaEncoder, DiskGeometry, EncoderOptions, FrameKind, StreamHeader,
};
use crate::durable::{SimDir, StdDir};
use rand_xoshiro::rand_core::{Rng, SeedableRng};

fn header() -> StreamHeader {
    StreamHeader {
        item_id: [3; 16],
        item_name: "vm-staging".into(),
        first_seq: 1,
        disks: vec![
            DiskGeometry {
                size_bytes: 4 << 20,
                block_size_bytes: 4096,
            },
            DiskGeometry {
                size_bytes: 4 << 20,
                block_size_bytes: 512,
            },
        ],
    }
}

/// `count` frames' wire bytes (writes of varied sizes, zero ranges, bookmarks).
fn frames(count: u64, seed: u8) -> Vec<Vec<u8>> {
    let mut encoder = DeltaEncoder::new(Vec::new(), &header(), EncoderOptions::default()).unwrap();
    for i in 0..count {
        let len = 4096 * (1 + (i as usize * 7 + usize::from(seed)) % 9);
        match i % 10 {
            9 => encoder.bookmark(Consistency::Crash, i, i, "b").map(|_| ()),
            7 => encoder.zero_range(1, 512 * i, 1024).map(|_| ()),
            _ => {
                let mut data = vec![0u8; len];
                rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(u64::from(seed) << 32 | i)
                    .fill_bytes(&mut data);
                encoder.write((i % 2) as u16, 4096 * i, &data).map(|_| ())
            }
        }
        .unwrap();
    }
    let bytes = encoder.into_inner();
    let mut decoder = crate::delta::DeltaDecoder::new(bytes.as_slice()).unwrap();
    let mut out = Vec::new();
    loop {
        match decoder.next_frame() {
            Ok(Some(frame)) => out.push(frame.wire_bytes.to_vec()),
            Ok(None) => break,
            Err(e) => {
                assert!(matches!(e.reason, DecodeErrorReason::Truncated { .. }));
                break;
            }
        }
    }
    assert_eq!(out.len() as u64, count);
    out
}

/// Small segments and a small in-memory batch, so every test also crosses segment rolls
/// and writes before commit.
fn config() -> StagingConfig {
    StagingConfig {
        capacity_bytes: 64 << 20,
        segment_target_bytes: 96 << 10,
        batch_write_bytes: 40 << 10,
        ..StagingConfig::default()
    }
}

/// Reads every durable frame from `from_seq` and returns (seq, re-encoded wire bytes).
fn read_all(log: &StagingLog, from_seq: u64) -> Vec<(u64, FrameKind)> {
    let mut reader = log.reader(from_seq);
    let mut out = Vec::new();
    while let Some(frame) = reader.next_frame().unwrap() {
        let kind = match frame.body {
            FrameBody::Write(_) => FrameKind::Write,
            FrameBody::ZeroRange { .. } => FrameKind::ZeroRange,
            FrameBody::Bookmark(_) => FrameKind::Bookmark,
            FrameBody::ResyncBlock(_) => FrameKind::ResyncBlock,
            FrameBody::End => FrameKind::End,
        };
        out.push((frame.seq, kind));
    }
    out
}

/// The wire bytes of every frame in the durable segments, by seq (straight from the files).
fn staged_bytes(dir: &SimDir) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    for (name, bytes) in dir.durable_image() {
        if parse_segment_name(&name).is_none() {
            continue;
        }
        let mut decoder = crate::delta::DeltaDecoder::new(bytes.as_slice()).unwrap();
        while let Ok(Some(frame)) = decoder.next_frame() {
            out.push((frame.seq, frame.wire_bytes.to_vec()));
        }
    }
    out.sort();
    out
}

/// The scripted run: batches of appends, each committed; a reclaim now and then.
/// Returns the highest acknowledged seq (a commit that returned Ok).
fn scripted_run(dir: SimDir, wire: &[Vec<u8>]) -> u64 {
    let now = Instant::now();
    let Ok((mut log, _)) = StagingLog::open(Arc::new(dir), header(), config()) else {
        return 0;
    };
    let mut acked = 0;
    let mut seq = 1u64;
    for (batch, chunk) in wire.chunks(5).enumerate() {
        for bytes in chunk {
            if log.append(seq, bytes, now).is_err() {
                return acked;
            }
            seq += 1;
        }
        match log.commit() {
            Ok(durable) => acked = durable,
            Err(_) => return acked,
        }
        if batch % 4 == 3 && log.reclaim(acked / 2).is_err() {
            return acked;
        }
    }
    acked
}

#[test]
fn staging_append_commit_read_round_trips_across_segments() {
    let wire = frames(60, 1);
    let dir = SimDir::new();
    let (mut log, report) = StagingLog::open(Arc::new(dir.clone()), header(), config()).unwrap();
    assert_eq!(report.frames, 0);
    for (i, bytes) in wire.iter().enumerate() {
        log.append(i as u64 + 1, bytes, Instant::now()).unwrap();
    }
    assert_eq!(log.durable_seq(), 0, "nothing is durable before commit");
    assert_eq!(read_all(&log, 1), vec![]);
    assert_eq!(log.commit().unwrap(), 60);
    let read = read_all(&log, 1);
    assert_eq!(read.len(), 60);
    assert!(
        read.iter()
            .enumerate()
            .all(|(i, (seq, _))| *seq == i as u64 + 1)
    );
    assert_eq!(read_all(&log, 37).first().map(|r| r.0), Some(37));
    let staged = staged_bytes(&dir);
    assert!(
        staged
            .iter()
            .all(|(seq, bytes)| wire[*seq as usize - 1] == *bytes)
    );
    assert!(
        dir.durable_image().len() > 3,
        "the 96 KiB segment target must have rolled over"
    );
}

#[test]
fn staging_batch_in_memory_stays_bounded_and_only_commit_makes_frames_durable() {
    let wire = frames(120, 5);
    let config = StagingConfig {
        segment_target_bytes: 64 << 20,
        ..config()
    };
    let total: usize = wire.iter().map(Vec::len).sum();
    assert!(total > 10 * config.batch_write_bytes, "{total}");
    let dir = SimDir::new();
    let (mut log, _) = StagingLog::open(Arc::new(dir.clone()), header(), config).unwrap();
    for (i, bytes) in wire.iter().enumerate() {
        log.append(i as u64 + 1, bytes, Instant::now()).unwrap();
        assert!(log.batch.len() <= config.batch_write_bytes.max(bytes.len()));
    }
    let header_bytes = header().encoded_len_bytes() as u64;
    assert_eq!(log.used_bytes(), total as u64 + header_bytes);
    assert_eq!(log.durable_seq(), 0, "written is not durable");
    assert_eq!(read_all(&log, 1), vec![]);
    assert_eq!(log.commit().unwrap(), 120);
    assert_eq!(read_all(&log, 1).len(), 120);
    let staged = staged_bytes(&dir);
    assert_eq!(staged.len(), 120);
    assert!(
        staged
            .iter()
            .all(|(seq, bytes)| wire[*seq as usize - 1] == *bytes)
    );
}

#[test]
fn staging_append_out_of_order_is_refused_and_changes_nothing() {
    let wire = frames(3, 2);
    let (mut log, _) = StagingLog::open(Arc::new(SimDir::new()), header(), config()).unwrap();
    log.append(1, &wire[0], Instant::now()).unwrap();
    let err = log.append(3, &wire[2], Instant::now()).unwrap_err();
    assert!(
        matches!(
            err,
            StagingError::OutOfOrder {
                expected: 2,
                found: 3
            }
        ),
        "{err}"
    );
    assert_eq!(log.commit().unwrap(), 1);
    assert_eq!(read_all(&log, 1).len(), 1);
}

#[test]
fn staging_crash_at_every_flush_point_keeps_every_acknowledged_frame() {
    let wire = frames(80, 3);
    // Dry run: count the flush points of the script.
    let dry = SimDir::new();
    let full_ack = scripted_run(dry.clone(), &wire);
    assert_eq!(full_ack, 80);
    let flush_points = dry.sync_count();
    assert!(flush_points > 20, "{flush_points}");
    for crash_at in 0..flush_points {
        for tear in [None, Some(crash_at * 31 + 7)] {
            let dir = SimDir::new();
            dir.crash_at_sync(crash_at, tear);
            let acked = scripted_run(dir.clone(), &wire);
            let image = dir.crash_image().expect("the run reached the crash point");
            let recovered = SimDir::from_image(image);
            let (mut log, report) =
                StagingLog::open(Arc::new(recovered.clone()), header(), config())
                    .unwrap_or_else(|e| panic!("crash at {crash_at} tear {tear:?}: {e}"));
            let ctx = format!("crash at flush {crash_at}, tear {tear:?}, acked {acked}");
            assert!(report.corruption.is_none(), "{ctx}: {report:?}");
            assert!(
                log.durable_seq() >= acked,
                "{ctx}: durable {}",
                log.durable_seq()
            );
            // Every frame still staged is byte-identical to what was sent, and every
            // acknowledged frame not yet reclaimed (seq > acked/2 at the last reclaim)
            // is among them.
            let staged = staged_bytes(&recovered);
            for (seq, bytes) in &staged {
                assert_eq!(&wire[*seq as usize - 1], bytes, "{ctx}: seq {seq} differs");
            }
            let first = staged.first().map_or(log.next_seq(), |s| s.0);
            let seqs: Vec<u64> = staged.iter().map(|s| s.0).collect();
            let expected: Vec<u64> = (first..log.next_seq()).collect();
            assert_eq!(seqs, expected, "{ctx}: staged frames are contiguous");
            assert!(
                first <= acked / 2 + 1 || acked == 0,
                "{ctx}: first staged {first}"
            );
            // The log goes on from where it stopped.
            let next = log.next_seq();
            if next <= 80 {
                log.append(next, &wire[next as usize - 1], Instant::now())
                    .unwrap();
                assert_eq!(log.commit().unwrap(), next, "{ctx}");
            }
        }
    }
}

#[test]
fn staging_torn_tail_is_cut_and_frames_before_it_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let wire = frames(10, 4);
    {
        let dir = Arc::new(StdDir::open(tmp.path()).unwrap());
        let (mut log, _) = StagingLog::open(dir, header(), config()).unwrap();
        for (i, bytes) in wire.iter().enumerate() {
            log.append(i as u64 + 1, bytes, Instant::now()).unwrap();
        }
        log.commit().unwrap();
    }
    // Half of an 11th frame, as a crash mid-write leaves it.
    let last = StdDir::open(tmp.path())
        .unwrap()
        .list()
        .unwrap()
        .pop()
        .unwrap();
    let name = tmp.path().join(last);
    let mut bytes = std::fs::read(&name).unwrap();
    let good_len = bytes.len() as u64;
    bytes.extend_from_slice(&wire[3][..100]);
    std::fs::write(&name, &bytes).unwrap();
    let dir = Arc::new(StdDir::open(tmp.path()).unwrap());
    let (log, report) = StagingLog::open(dir, header(), config()).unwrap();
    assert_eq!(report.torn_tail_bytes, 100);
    assert_eq!(report.frames, 10);
    assert!(report.corruption.is_none());
    assert_eq!(std::fs::metadata(&name).unwrap().len(), good_len);
    assert_eq!(log.next_seq(), 11);
    assert_eq!(read_all(&log, 1).len(), 10);
}

#[test]
fn staging_damage_before_the_tail_keeps_prefix_and_requires_resync() {
    let dir = SimDir::new();
    let wire = frames(40, 5);
    let (mut log, _) = StagingLog::open(Arc::new(dir.clone()), header(), config()).unwrap();
    for (i, bytes) in wire.iter().enumerate() {
        log.append(i as u64 + 1, bytes, Instant::now()).unwrap();
        log.commit().unwrap();
    }
    drop(log);
    let mut image = dir.durable_image();
    let first = image.get_mut(&segment_name(1)).unwrap();
    let at = first.len() / 2;
    first[at] ^= 0x10; // bit rot inside a sealed segment
    let recovered = SimDir::from_image(image);
    let (mut log, report) =
        StagingLog::open(Arc::new(recovered.clone()), header(), config()).unwrap();
    let corruption = report.corruption.expect("damage must be reported");
    assert!(corruption.contains("checksum mismatch"), "{corruption}");
    assert!(log.resync_required().is_some());
    let err = log
        .append(log.next_seq(), &wire[0], Instant::now())
        .unwrap_err();
    assert!(matches!(err, StagingError::ResyncRequired { .. }), "{err}");
    // Frames before the damage are still there and exact.
    for (seq, bytes) in staged_bytes(&recovered) {
        assert_eq!(wire[seq as usize - 1], bytes);
    }
    // The marker survives a restart.
    let (log, _) = StagingLog::open(Arc::new(recovered), header(), config()).unwrap();
    assert!(log.resync_required().is_some());
}

#[test]
fn staging_full_refuses_then_requires_resync_after_timeout_and_resync_clears() {
    let wire = frames(30, 6);
    let config = StagingConfig {
        capacity_bytes: 200 << 10,
        segment_target_bytes: 64 << 10,
        full_timeout: Duration::from_secs(30),
        ..StagingConfig::default()
    };
    let dir = SimDir::new();
    let (mut log, _) = StagingLog::open(Arc::new(dir.clone()), header(), config).unwrap();
    let t0 = Instant::now();
    let mut seq = 1;
    let mut saw_pressure = false;
    let full = loop {
        match log.append(seq, &wire[seq as usize - 1], t0) {
            Ok(()) => {
                log.commit().unwrap();
                saw_pressure |= matches!(log.pressure(), Pressure::Slow(_));
                seq += 1;
            }
            Err(e) => break e,
        }
    };
    assert!(matches!(full, StagingError::Full { .. }), "{full}");
    assert!(saw_pressure, "acks must slow down before the log is full");
    assert!(log.used_bytes() <= config.capacity_bytes);
    let durable = log.durable_seq();
    // Still full 10 s later: still refused, still only Full.
    let later = log.append(seq, &wire[seq as usize - 1], t0 + Duration::from_secs(10));
    assert!(matches!(later, Err(StagingError::Full { .. })));
    // Past the timeout: resync required, recorded durably; nothing staged was lost.
    let err = log
        .append(seq, &wire[seq as usize - 1], t0 + Duration::from_secs(31))
        .unwrap_err();
    assert!(matches!(err, StagingError::ResyncRequired { .. }), "{err}");
    assert_eq!(log.durable_seq(), durable);
    let (mut log, _) = StagingLog::open(Arc::new(dir.clone()), header(), config).unwrap();
    assert!(log.resync_required().unwrap().contains("stayed full"));
    log.resync_done(1000).unwrap();
    assert!(log.resync_required().is_none());
    assert_eq!(log.next_seq(), 1000);
    assert!(!dir.durable_image().contains_key(RESYNC_MARKER));
}

#[test]
fn staging_commit_reclaims_what_the_reader_side_published_as_applied() {
    let wire = frames(60, 9);
    let (mut log, _) = StagingLog::open(Arc::new(SimDir::new()), header(), config()).unwrap();
    let reader = log.reader(1);
    for (i, bytes) in wire.iter().take(40).enumerate() {
        log.append(i as u64 + 1, bytes, Instant::now()).unwrap();
    }
    log.commit().unwrap();
    let before = log.used_bytes();
    reader.set_applied(30);
    log.append(41, &wire[40], Instant::now()).unwrap();
    log.commit().unwrap();
    assert!(
        log.used_bytes() < before + wire[40].len() as u64,
        "applied segments freed"
    );
    assert_eq!(
        read_all(&log, 31).len(),
        11,
        "frames after the applied seq stay readable"
    );
}

#[test]
fn staging_reclaim_frees_only_applied_sealed_segments() {
    let wire = frames(60, 7);
    let (mut log, _) = StagingLog::open(Arc::new(SimDir::new()), header(), config()).unwrap();
    for (i, bytes) in wire.iter().enumerate() {
        log.append(i as u64 + 1, bytes, Instant::now()).unwrap();
    }
    log.commit().unwrap();
    let before = log.used_bytes();
    assert_eq!(log.reclaim(0).unwrap(), 0);
    let freed = log.reclaim(30).unwrap();
    assert!(freed > 0);
    assert_eq!(log.used_bytes(), before - freed);
    let read = read_all(&log, 31);
    assert_eq!(
        read.len(),
        30,
        "every frame after the applied seq stays readable"
    );
    let freed_all = log.reclaim(60).unwrap();
    assert!(
        log.used_bytes() > 0,
        "the active segment is never reclaimed"
    );
    assert!(freed_all > 0);
}

#[test]
fn staging_failed_flush_fails_the_log_until_reopened() {
    let dir = SimDir::new();
    let wire = frames(4, 8);
    let (mut log, _) = StagingLog::open(Arc::new(dir.clone()), header(), config()).unwrap();
    log.append(1, &wire[0], Instant::now()).unwrap();
    log.commit().unwrap();
    log.append(2, &wire[1], Instant::now()).unwrap();
    dir.fail_sync_at(dir.sync_count());
    assert!(matches!(log.commit(), Err(StagingError::Io { .. })));
    assert_eq!(log.durable_seq(), 1, "a failed flush acknowledges nothing");
    assert!(matches!(
        log.append(3, &wire[2], Instant::now()),
        Err(StagingError::Failed)
    ));
    assert!(matches!(log.commit(), Err(StagingError::Failed)));
}

#[test]
fn staging_of_another_item_is_refused() {
    let dir = SimDir::new();
    StagingLog::open(Arc::new(dir.clone()), header(), config()).unwrap();
    let mut other = header();
    other.item_id = [9; 16];
    let err = StagingLog::open(Arc::new(dir), other, config()).unwrap_err();
    assert!(matches!(err, StagingError::WrongItem { .. }), "{err}");
}

#[test]
fn staging_commit_wakes_a_waiting_reader_and_wake_ends_a_wait_without_frames() {
    let wire = frames(2, 5);
    let dir = SimDir::new();
    let (mut log, _) = StagingLog::open(Arc::new(dir), header(), config()).unwrap();
    let waker = log.reader(1).waker();
    // Nothing durable: the wait lasts its timeout.
    let started = Instant::now();
    waker.wait(waker.ticket(), 0, Duration::from_millis(30));
    assert!(started.elapsed() >= Duration::from_millis(30));
    // A commit after the ticket was taken ends the wait at once, even one that happened
    // before the wait began (no lost wake-up).
    let ticket = waker.ticket();
    log.append(1, &wire[0], Instant::now()).unwrap();
    log.commit().unwrap();
    let started = Instant::now();
    waker.wait(ticket, 0, Duration::from_secs(60));
    assert!(started.elapsed() < Duration::from_secs(30));
    // A commit from another thread wakes a reader already asleep.
    let ticket = waker.ticket();
    let committer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        log.append(2, &wire[1], Instant::now()).unwrap();
        log.commit().unwrap()
    });
    let started = Instant::now();
    waker.wait(ticket, 1, Duration::from_secs(60));
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(committer.join().unwrap(), 2);
    // A wake without frames (a stop request) ends a wait too.
    let ticket = waker.ticket();
    let stopper = waker.clone();
    let handle = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        stopper.wake();
    });
    let started = Instant::now();
    waker.wait(ticket, u64::MAX, Duration::from_secs(60));
    assert!(started.elapsed() < Duration::from_secs(30));
    handle.join().unwrap();
}
