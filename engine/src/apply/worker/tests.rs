//! Unit tests of the apply worker: retention while a backlog is applied, and a frame that
//! never applies (drained without a latest point, refused with one, discarded).

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::sync::atomic::AtomicU64;

use super::*;
use crate::delta::{Consistency, DeltaEncoder, EncoderOptions, StreamHeader};
use crate::durable::StdDir;
use crate::ingest::{IngestConfig, ingest_stream};
use crate::io::DirectIo;
use crate::staging::{StagingConfig, StagingLog};

#[test]
fn a_backlog_of_points_never_holds_more_than_keep_points_plus_the_newest() {
    const KEEP: usize = 4;
    const POINTS: u64 = 200;
    let tmp = tempfile::tempdir().unwrap();
    let header = StreamHeader {
        item_id: [7; 16],
        item_name: "backlog".into(),
        first_seq: 1,
        disks: vec![DiskGeometry {
            size_bytes: 1 << 20,
            block_size_bytes: 4096,
        }],
    };
    // A whole backlog staged before the worker starts: a write and a bookmark, 200 times.
    let mut encoder = DeltaEncoder::new(Vec::new(), &header, EncoderOptions::default()).unwrap();
    for i in 0..POINTS {
        encoder
            .write(0, (i % 256) * 4096, &[i as u8 | 1; 4096])
            .unwrap();
        encoder.bookmark(Consistency::Crash, i, i, "b").unwrap();
    }
    let dir = |name: &str| {
        std::fs::create_dir_all(tmp.path().join(name)).unwrap();
        StdDir::open(&tmp.path().join(name)).unwrap()
    };
    let (mut staging, _) = StagingLog::open(
        Arc::new(dir("staging")),
        header.clone(),
        StagingConfig::default(),
    )
    .unwrap();
    ingest_stream(
        encoder.into_inner().as_slice(),
        &mut staging,
        IngestConfig::default(),
        &mut |_, _| {},
    )
    .unwrap();
    let staged_seq = staging.durable_seq();
    assert_eq!(staged_seq, 2 * POINTS);
    let meta = Arc::new(MetaStore::open(dir("meta").open("meta.redb", true).unwrap()).unwrap());
    let replica =
        ReplicaFile::create(tmp.path().join("replica"), 1 << 20, DirectIo::Prefer).unwrap();
    let key = crate::meta::item_key(&header.item_id);
    let worker = ApplyWorker::start(
        "backlog",
        WorkerSetup {
            item: key,
            disks: header.disks.clone(),
            replicas: vec![replica],
            reader: staging.reader(1),
            meta: meta.clone(),
            preserve: Arc::new(dir("preserve")),
            on_unappliable: None,
            observer: Arc::new(()),
            pins: Default::default(),
        },
        ApplyOptions {
            keep_points: KEEP,
            max_age_ns: u64::MAX,
            queue_depth: 8,
        },
    )
    .unwrap();
    // Watch the point count while the backlog is applied: a batch adds at most one point
    // and retention follows it at once, so never more than KEEP + 1 are there.
    let mut most = 0;
    while worker.applied_seq() < staged_seq && !worker.failed() {
        most = most.max(meta.points(key).unwrap().len());
    }
    assert!(!worker.failed(), "{:?}", worker.status().error());
    worker.drain_and_stop(staged_seq, false).unwrap();
    most = most.max(meta.points(key).unwrap().len());
    assert!(
        most <= KEEP + 1,
        "{most} points at once, keep_points {KEEP}"
    );
    assert_eq!(meta.points(key).unwrap().len(), KEEP);
}

/// A worker over a fresh item whose staging holds `write, bookmark, write, <a write whose
/// checksum holds but whose zstd payload does not decompress>, write`; `on_unappliable`
/// counts its calls.
fn poisoned_worker(
    tmp: &std::path::Path,
) -> (
    ApplyWorker,
    Arc<AtomicU64>,
    Arc<MetaStore>,
    crate::meta::ItemKey,
    StagingLog,
) {
    use crate::delta::{Encoding, FrameHeader, FrameKind};
    let header = StreamHeader {
        item_id: [9; 16],
        item_name: "poison".into(),
        first_seq: 1,
        disks: vec![DiskGeometry {
            size_bytes: 1 << 20,
            block_size_bytes: 4096,
        }],
    };
    let mut encoder = DeltaEncoder::new(Vec::new(), &header, EncoderOptions::default()).unwrap();
    encoder.write(0, 0, &[1; 4096]).unwrap();
    encoder.bookmark(Consistency::Crash, 1, 1, "p2").unwrap();
    encoder.write(0, 4096, &[2; 4096]).unwrap();
    let mut stream = encoder.into_inner();
    let payload = [0x28, 0xB5, 0x2F, 0xFD, 1, 2, 3, 4, 5, 6, 7, 8];
    let mut bad = FrameHeader {
        kind: FrameKind::Write,
        encoding: Encoding::Zstd,
        disk_index: 0,
        seq: 4,
        offset_bytes: 8192,
        length_bytes: 4096,
        payload_len_bytes: payload.len() as u32,
        checksum: 0,
    };
    bad.checksum = FrameHeader::compute_checksum(&bad.encode()[..40], &payload);
    stream.extend_from_slice(&bad.encode());
    stream.extend_from_slice(&payload);
    let mut rest_header = header.clone();
    rest_header.first_seq = 5;
    let mut rest = DeltaEncoder::new(Vec::new(), &rest_header, EncoderOptions::default()).unwrap();
    rest.write(0, 12288, &[3; 4096]).unwrap();
    let rest = rest.into_inner();
    stream.extend_from_slice(&rest[rest_header.encoded_len_bytes()..]);
    let dir = |name: &str| {
        std::fs::create_dir_all(tmp.join(name)).unwrap();
        StdDir::open(&tmp.join(name)).unwrap()
    };
    let (mut staging, _) = StagingLog::open(
        Arc::new(dir("staging")),
        header.clone(),
        StagingConfig::default(),
    )
    .unwrap();
    // Staged behind the decoder's back: straight into the log, as media corruption would.
    let mut offset = header.encoded_len_bytes();
    let mut seq = 1;
    while offset < stream.len() {
        let len = crate::delta::FRAME_HEADER_BYTES
            + u32::from_le_bytes(stream[offset + 32..offset + 36].try_into().unwrap()) as usize;
        staging
            .append(
                seq,
                &stream[offset..offset + len],
                std::time::Instant::now(),
            )
            .unwrap();
        offset += len;
        seq += 1;
    }
    assert_eq!(staging.commit().unwrap(), 5);
    let meta = Arc::new(MetaStore::open(dir("meta").open("meta.redb", true).unwrap()).unwrap());
    let replica = ReplicaFile::create(tmp.join("replica"), 1 << 20, DirectIo::Prefer).unwrap();
    let key = crate::meta::item_key(&header.item_id);
    let calls = Arc::new(AtomicU64::new(0));
    let counted = calls.clone();
    let worker = ApplyWorker::start(
        "poison",
        WorkerSetup {
            item: key,
            disks: header.disks.clone(),
            replicas: vec![replica],
            reader: staging.reader(1),
            meta: meta.clone(),
            preserve: Arc::new(dir("preserve")),
            on_unappliable: Some(Box::new(move |frame| {
                assert_eq!(frame.seq, 4);
                counted.fetch_add(1, Ordering::AcqRel);
            })),
            observer: Arc::new(()),
            pins: Default::default(),
        },
        ApplyOptions {
            keep_points: 10,
            max_age_ns: u64::MAX,
            queue_depth: 4,
        },
    )
    .unwrap();
    (worker, calls, meta, key, staging)
}

fn wait_unappliable(worker: &ApplyWorker) -> UnappliableFrame {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(frame) = worker.status().unappliable() {
            return frame;
        }
        assert!(std::time::Instant::now() < deadline, "apply never stopped");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn an_unappliable_frame_keeps_the_worker_waiting_drainable_without_latest_and_discardable() {
    let tmp = tempfile::tempdir().unwrap();
    // Drained without a latest point: stops at its watermark, names the frame.
    let (worker, calls, meta, key, _staging) = poisoned_worker(&tmp.path().join("a"));
    let frame = wait_unappliable(&worker);
    assert_eq!(
        (frame.seq, frame.disk_index, frame.offset_bytes),
        (4, Some(0), Some(8192))
    );
    assert_eq!(
        calls.load(Ordering::Acquire),
        1,
        "on_unappliable called once"
    );
    let status = worker.status();
    assert!(status.failed());
    assert!(
        status
            .error()
            .unwrap()
            .starts_with("apply_failed: staged frame seq 4")
    );
    // What the appliance's `apply_failure` view is made of: the frame and the watermark.
    let failure = status.unappliable().unwrap();
    assert_eq!((failure.seq, status.applied_seq()), (4, 2));
    let drained = worker.drain_and_stop(5, false).unwrap();
    assert_eq!(drained.applied_seq, 2);
    assert_eq!(drained.unappliable.map(|f| f.seq), Some(4));
    assert_eq!(meta.state(key).unwrap().0, 2);

    // Asked for a latest point: refused by name.
    let (worker, _, _, _, _staging) = poisoned_worker(&tmp.path().join("b"));
    wait_unappliable(&worker);
    let error = worker.drain_and_stop(5, true).unwrap_err();
    assert!(format!("{error:#}").contains("apply_failed"), "{error:#}");

    // Discarded: the watermark moves past every staged frame, apply goes on after them.
    let (worker, _, meta, key, mut staging) = poisoned_worker(&tmp.path().join("c"));
    wait_unappliable(&worker);
    staging.require_resync("test").unwrap();
    assert_eq!(worker.status().discard_unapplied().unwrap(), 5);
    assert!(!worker.failed());
    assert!(worker.status().unappliable().is_none());
    assert_eq!(meta.state(key).unwrap().0, 5);
    let next = staging.next_seq();
    staging.resync_done(next).unwrap();
    let mut encoder = DeltaEncoder::new(
        Vec::new(),
        &StreamHeader {
            first_seq: 6,
            ..staging.header().clone()
        },
        EncoderOptions::default(),
    )
    .unwrap();
    encoder.bookmark(Consistency::Crash, 2, 2, "p6").unwrap();
    let bytes = encoder.into_inner();
    ingest_stream(
        bytes.as_slice(),
        &mut staging,
        IngestConfig::default(),
        &mut |_, _| {},
    )
    .unwrap();
    let drained = worker.drain_and_stop(6, true).unwrap();
    assert_eq!((drained.applied_seq, drained.unappliable), (6, None));
    let points: Vec<u64> = meta
        .points(key)
        .unwrap()
        .iter()
        .map(|p| p.point_id)
        .collect();
    assert_eq!(points, [2, 6]);
}
