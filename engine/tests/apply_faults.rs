//! Faults and bad input: each gets a typed error naming what was wrong, and nothing already
//! stored changes; a replica I/O error fails the item, keeps staged data, and apply resumes
//! exactly once the fault is cleared.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use common::{Item, SourceOp, Storage, header, replica_name, script};
use engine::apply::{ApplyConfig, Health};
use engine::delta::{Consistency, DecodeErrorReason, Encoding, FrameHeader, FrameKind};
use engine::ingest::{IngestConfig, IngestError, ingest_stream};
use engine::io::{CrashMode, SimFaultPlan};

fn ops(seed: u8) -> Vec<SourceOp> {
    let mut ops = Vec::new();
    for i in 0..20u64 {
        let disk = (i % 2) as u16;
        let block = u64::from(header().disks[usize::from(disk)].block_size_bytes);
        ops.push(SourceOp::Write {
            disk,
            offset_bytes: (i * 5 % 40) * block,
            data: vec![seed.wrapping_add(i as u8) | 1; (block * (1 + i % 3)) as usize],
        });
        if i % 5 == 4 {
            ops.push(SourceOp::Bookmark(Consistency::Crash));
        }
    }
    ops
}

/// A stream with the item's header starting at `first_seq`, then `frames` as given.
fn raw_stream(first_seq: u64, frames: &[Vec<u8>]) -> Vec<u8> {
    let mut header = header();
    header.first_seq = first_seq;
    let mut out = Vec::new();
    header.encode_into(&mut out);
    for frame in frames {
        out.extend_from_slice(frame);
    }
    out
}

/// A frame with a valid checksum and whatever fields the test wants.
fn craft(kind: FrameKind, disk: u16, seq: u64, offset: u64, payload: &[u8]) -> Vec<u8> {
    let mut header = FrameHeader {
        kind,
        encoding: Encoding::Raw,
        disk_index: disk,
        seq,
        offset_bytes: offset,
        length_bytes: payload.len() as u64,
        payload_len_bytes: payload.len() as u32,
        checksum: 0,
    };
    let prefix = header.encode();
    header.checksum = FrameHeader::compute_checksum(&prefix[..40], payload);
    [header.encode().to_vec(), payload.to_vec()].concat()
}

/// Everything stored: staged frames, replica contents and points.
fn stored(item: &Item) -> (u64, Vec<Vec<u8>>, usize) {
    let replicas = (0..2)
        .map(|i| item.storage.disks.live_image(&replica_name(i)).unwrap())
        .collect();
    let points = item
        .meta
        .points(engine::meta::item_key(&header().item_id))
        .unwrap()
        .len();
    (item.staging.durable_seq(), replicas, points)
}

#[test]
fn ingest_bad_frames_are_refused_with_named_errors_and_change_nothing() {
    let script = script(&ops(1), false);
    let mut item = Item::open(Storage::new(), ApplyConfig::default(), 8);
    item.stage(&script.frames, 4);
    item.applier.apply_available().unwrap();
    let before = stored(&item);
    let next = item.staging.next_seq();
    let mut acks = Vec::new();
    let mut ingest = |bytes: Vec<u8>, item: &mut Item| {
        ingest_stream(
            bytes.as_slice(),
            &mut item.staging,
            IngestConfig::default(),
            &mut |seq, _| acks.push(seq),
        )
    };
    let block = vec![0xEE; 4096];
    // A frame for a disk the item does not have.
    let err = ingest(
        raw_stream(next, &[craft(FrameKind::Write, 7, next, 0, &block)]),
        &mut item,
    )
    .unwrap_err();
    let IngestError::Decode(decode) = &err else {
        panic!("{err}")
    };
    assert!(
        matches!(
            decode.reason,
            DecodeErrorReason::UnknownDisk {
                disk_index: 7,
                disk_count: 2
            }
        ),
        "{err}"
    );
    assert_eq!(decode.frame_index, Some(0));
    assert!(err.to_string().contains("frame 0, byte offset"), "{err}");
    // A write past the end of the disk.
    let end = header().disks[0].size_bytes;
    let err = ingest(
        raw_stream(next, &[craft(FrameKind::Write, 0, next, end, &block)]),
        &mut item,
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("out-of-range extent on disk 0"),
        "{err}"
    );
    // A sequence gap inside the stream.
    let err = ingest(
        raw_stream(next, &[craft(FrameKind::Write, 0, next + 1, 0, &block)]),
        &mut item,
    )
    .unwrap_err();
    let IngestError::Decode(decode) = &err else {
        panic!("{err}")
    };
    assert!(
        matches!(decode.reason, DecodeErrorReason::SequenceGap { .. }),
        "{err}"
    );
    // A stream that starts past the next expected frame.
    let err = ingest(raw_stream(next + 3, &[]), &mut item).unwrap_err();
    assert!(
        matches!(err, IngestError::Gap { first_seq, next_seq } if first_seq == next + 3 && next_seq == next),
        "{err}"
    );
    // A stream for another item.
    let mut other = header();
    other.item_id = [1; 16];
    other.first_seq = next;
    let mut bytes = Vec::new();
    other.encode_into(&mut bytes);
    let err = ingest(bytes, &mut item).unwrap_err();
    assert!(matches!(err, IngestError::WrongItem { .. }), "{err}");
    // Nothing was acknowledged, staged, applied or recorded.
    assert!(acks.is_empty(), "{acks:?}");
    item.applier.apply_available().unwrap();
    assert_eq!(stored(&item), before);
}

#[test]
fn ingest_keeps_the_valid_prefix_before_a_bad_frame_and_resumes_after_reconnect() {
    let script = script(&ops(2), true);
    let mut item = Item::open(Storage::new(), ApplyConfig::default(), 8);
    let (good, rest) = script.frames.split_at(10);
    let mut bytes = raw_stream(1, &good.iter().map(|f| f.1.clone()).collect::<Vec<_>>());
    bytes.extend_from_slice(&craft(FrameKind::Write, 0, 11, 512, &[1; 4096])); // misaligned
    let mut acks = Vec::new();
    let err = ingest_stream(
        bytes.as_slice(),
        &mut item.staging,
        IngestConfig::default(),
        &mut |s, _| acks.push(s),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("misaligned extent on disk 0"),
        "{err}"
    );
    assert_eq!(
        acks.last(),
        Some(&10),
        "the valid prefix is durable and acknowledged"
    );
    // The agent reconnects and resends from its last acknowledgement; resent frames are skipped.
    let all: Vec<Vec<u8>> = script.frames.iter().map(|f| f.1.clone()).collect();
    let report = ingest_stream(
        raw_stream(1, &all).as_slice(),
        &mut item.staging,
        IngestConfig::default(),
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(report.frames_skipped, 10);
    assert_eq!(report.frames_staged, rest.len() as u64);
    item.applier.apply_available().unwrap();
    for (index, expected) in script.final_content.iter().enumerate() {
        assert!(&item.storage.disks.live_image(&replica_name(index)).unwrap() == expected);
    }
}

#[test]
fn replica_write_error_fails_the_item_keeps_staging_and_resumes_when_cleared() {
    let script = script(&ops(3), false);
    let storage = Storage::new();
    let mut item = Item::open(
        storage.clone(),
        ApplyConfig {
            stream_max_frames: 3,
            ..ApplyConfig::default()
        },
        4,
    );
    let acked = item.stage(&script.frames, 5);
    storage
        .disks
        .set_faults(
            &replica_name(1),
            SimFaultPlan {
                fail_write_nth: Some(4),
                ..SimFaultPlan::default()
            },
        )
        .unwrap();
    let err = item.applier.apply_available().unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("replica disk 1") && text.contains("write"),
        "{text}"
    );
    let Health::Failed { error } = item.applier.health().clone() else {
        panic!("not failed")
    };
    assert!(error.contains("replica disk 1"), "{error}");
    // Failed stays failed; staged data is all still there.
    assert!(matches!(
        item.applier.apply_batch(),
        Err(engine::apply::ApplyError::Failed { .. })
    ));
    assert_eq!(item.staging.durable_seq(), acked);
    // The operator clears the fault: apply resumes from the watermark and ends exact.
    storage
        .disks
        .set_faults(&replica_name(1), SimFaultPlan::default())
        .unwrap();
    item.applier.clear_fault().unwrap();
    item.applier.apply_available().unwrap();
    assert_eq!(item.applier.applied_seq(), script.frames.len() as u64);
    for (index, expected) in script.final_content.iter().enumerate() {
        assert!(&storage.disks.live_image(&replica_name(index)).unwrap() == expected);
    }
    for (id, snapshot) in &script.snapshots {
        assert!(&item.materialize(*id) == snapshot, "point {id}");
    }
}

#[test]
fn replica_flush_failure_fails_the_item_and_replay_restores_lost_writes() {
    let script = script(&ops(4), false);
    let storage = Storage::new();
    let mut item = Item::open(storage.clone(), ApplyConfig::default(), 8);
    item.stage(&script.frames, 50);
    storage
        .disks
        .set_faults(
            &replica_name(0),
            SimFaultPlan {
                fail_flush_nth: Some(2),
                ..SimFaultPlan::default()
            },
        )
        .unwrap();
    let err = item.applier.apply_available().unwrap_err();
    assert!(err.to_string().contains("replica disk 0: flush"), "{err}");
    let watermark = item.applier.durable_seq();
    // A failed flush may have lost writes: the device is reset (unflushed writes gone).
    storage.disks.crash(CrashMode::DropUnflushed);
    storage
        .disks
        .set_faults(&replica_name(0), SimFaultPlan::default())
        .unwrap();
    item.applier.clear_fault().unwrap();
    assert_eq!(
        item.applier.applied_seq(),
        watermark,
        "replay starts at the watermark"
    );
    item.applier.apply_available().unwrap();
    for (index, expected) in script.final_content.iter().enumerate() {
        assert!(&storage.disks.live_image(&replica_name(index)).unwrap() == expected);
    }
    for (id, snapshot) in &script.snapshots {
        assert!(&item.materialize(*id) == snapshot, "point {id}");
    }
}
