//! Unit tests of the applier: unappliable frames, the payload handoff, the buffer pool.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use super::*;
use crate::delta::{
    DeltaDecoder, DeltaEncoder, EncoderOptions, Encoding, FrameHeader, FrameKind, StreamHeader,
};
use crate::durable::SimDir;
use crate::io::{SimDiskSet, SimEngine, SimEngineConfig, SimFileConfig};
use crate::materialize::{Source, materialize_disk};
use crate::staging::{StagingConfig, StagingLog};

const DISK_BYTES: u64 = 256 << 10;

fn header(first_seq: u64) -> StreamHeader {
    StreamHeader {
        item_id: [0x51; 16],
        item_name: "poison".into(),
        first_seq,
        disks: vec![DiskGeometry {
            size_bytes: DISK_BYTES,
            block_size_bytes: 4096,
        }],
    }
}

/// The wire bytes of each frame `encode` writes, from `first_seq` on.
fn frames(first_seq: u64, encode: impl FnOnce(&mut DeltaEncoder<Vec<u8>>)) -> Vec<(u64, Vec<u8>)> {
    let mut encoder =
        DeltaEncoder::new(Vec::new(), &header(first_seq), EncoderOptions::default()).unwrap();
    encode(&mut encoder);
    let bytes = encoder.into_inner();
    let mut decoder = DeltaDecoder::new(bytes.as_slice()).unwrap();
    let mut out = Vec::new();
    loop {
        match decoder.next_frame() {
            Ok(Some(frame)) => out.push((frame.seq, frame.wire_bytes.to_vec())),
            Ok(None) => return out,
            // The stream has no end frame: its bytes end at a frame boundary.
            Err(_) => return out,
        }
    }
}

/// A write frame with a valid checksum whose zstd payload does not decompress.
fn broken_zstd_write(seq: u64, offset_bytes: u64) -> Vec<u8> {
    let payload = [0xA5u8; 64];
    let mut header = FrameHeader {
        kind: FrameKind::Write,
        encoding: Encoding::Zstd,
        disk_index: 0,
        seq,
        offset_bytes,
        length_bytes: 4096,
        payload_len_bytes: payload.len() as u32,
        checksum: 0,
    };
    header.checksum = FrameHeader::compute_checksum(&header.encode()[..40], &payload);
    [header.encode().as_slice(), &payload].concat()
}

fn write_model(model: &mut [u8], offset: u64, data: &[u8]) {
    model[offset as usize..offset as usize + data.len()].copy_from_slice(data);
}

/// An item on simulated storage: staging, metadata and preserve store on one [`SimDir`],
/// its replica on a [`SimDiskSet`].
fn rig() -> (
    SimDir,
    SimDiskSet,
    StagingLog,
    Arc<MetaStore>,
    ItemKey,
    Applier<SimEngine>,
) {
    rig_with_pool(default_pool_config(8))
}

/// [`rig`] with the apply buffer pool `pool`.
fn rig_with_pool(
    pool: crate::io::BufPoolConfig,
) -> (
    SimDir,
    SimDiskSet,
    StagingLog,
    Arc<MetaStore>,
    ItemKey,
    Applier<SimEngine>,
) {
    let storage = SimDir::new();
    let disks = SimDiskSet::new();
    disks
        .create_file(
            "replica-0",
            SimFileConfig {
                size_bytes: DISK_BYTES,
                block_size_bytes: 4096,
            },
        )
        .unwrap();
    let (log, _) = StagingLog::open(
        Arc::new(storage.clone()),
        header(1),
        StagingConfig::default(),
    )
    .unwrap();
    let meta = Arc::new(MetaStore::open(storage.open("meta.redb", true).unwrap()).unwrap());
    let mut engine = SimEngine::new(
        &disks,
        SimEngineConfig {
            queue_depth: 8,
            seed: 3,
            reorder: true,
        },
    )
    .unwrap();
    let file = engine.add_file("replica-0".into()).unwrap();
    let item = crate::meta::item_key(&header(1).item_id);
    let applier = Applier::new(
        item,
        header(1).disks,
        ApplyConfig::default(),
        engine,
        vec![file],
        BufPool::new(pool).unwrap(),
        meta.clone(),
        Arc::new(storage.clone()),
        log.reader(1),
    )
    .unwrap();
    (storage, disks, log, meta, item, applier)
}

#[test]
fn an_unappliable_frame_stops_at_the_watermark_keeps_every_point_and_is_discarded_on_request() {
    let (storage, disks, mut log, meta, item, mut applier) = rig();
    // Points 2 and 4, then a write and the broken frame 6 in one run, then more.
    let (a, b, c, d) = ([1u8; 8192], [2u8; 8192], [3u8; 4096], [4u8; 4096]);
    let mut staged = frames(1, |e| {
        e.write(0, 0, &a).unwrap();
        e.bookmark(Consistency::Crash, 1, 1, "p2").unwrap();
        e.write(0, 4096, &b).unwrap();
        e.bookmark(Consistency::App, 2, 2, "p4").unwrap();
        e.write(0, 0, &c).unwrap();
    });
    staged.push((6, broken_zstd_write(6, 64 << 10)));
    staged.extend(frames(7, |e| {
        e.write(0, 128 << 10, &d).unwrap();
        e.bookmark(Consistency::Crash, 3, 3, "p8").unwrap();
    }));
    for (seq, wire) in &staged {
        log.append(*seq, wire, std::time::Instant::now()).unwrap();
    }
    assert_eq!(log.commit().unwrap(), 8);
    let mut at_2 = vec![0u8; DISK_BYTES as usize];
    write_model(&mut at_2, 0, &a);
    let mut at_4 = at_2.clone();
    write_model(&mut at_4, 4096, &b);

    let error = applier.apply_available().unwrap_err();
    let frame = error.unappliable().unwrap_or_else(|| panic!("{error}"));
    assert_eq!(
        (frame.seq, frame.disk_index, frame.offset_bytes),
        (6, Some(0), Some(64 << 10)),
        "{frame}"
    );
    assert!(frame.reason.contains("zstd"), "{frame}");
    assert_eq!(applier.health(), &Health::Unappliable { frame });
    assert_eq!(
        applier.durable_seq(),
        4,
        "the watermark stays before the run"
    );
    assert_eq!(meta.state(item).unwrap().0, 4);
    // Retrying cannot help, and no latest point is made past a frame that never applies.
    assert!(matches!(
        applier.apply_batch(),
        Err(ApplyError::Failed { .. })
    ));
    assert!(applier.mark_latest_point().is_err());
    let materialize = |applier: &Applier<SimEngine>, point_id: u64| {
        let source = Source {
            meta: &meta,
            item,
            disks: &header(1).disks,
            preserve_dir: Arc::new(storage.clone()),
            grain_bytes: 4096,
            pins: applier.pins(),
        };
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("disk.raw");
        let replica = disks.live_image("replica-0").unwrap();
        let out = std::fs::File::create(&path).unwrap();
        materialize_disk(&source, point_id, 0, &replica, &out, &mut |_| {}).unwrap();
        std::fs::read(&path).unwrap()
    };
    let points = |meta: &MetaStore| -> Vec<u64> {
        meta.points(item)
            .unwrap()
            .iter()
            .map(|p| p.point_id)
            .collect()
    };
    assert_eq!(points(&meta), [2, 4]);
    // Frame 5 reached the replica before frame 6 failed; the points do not see it.
    assert!(materialize(&applier, 2) == at_2, "point 2");
    assert!(materialize(&applier, 4) == at_4, "point 4");

    // Discarding moves the watermark past every staged frame; apply goes on after them.
    assert_eq!(applier.discard_unapplied().unwrap(), 8);
    assert_eq!(applier.health(), &Health::Healthy);
    assert_eq!(meta.state(item).unwrap().0, 8);
    assert!(
        applier.mark_latest_point().is_err(),
        "the replicas miss the discarded frames: no latest point until a bookmark"
    );
    let after = frames(9, |e| {
        e.write(0, 192 << 10, &d).unwrap();
        e.bookmark(Consistency::Crash, 4, 4, "p10").unwrap();
    });
    for (seq, wire) in &after {
        log.append(*seq, wire, std::time::Instant::now()).unwrap();
    }
    log.commit().unwrap();
    let progress = applier.apply_available().unwrap();
    assert_eq!(progress.point, Some(10));
    assert_eq!(points(&meta), [2, 4, 10]);
    assert!(
        materialize(&applier, 2) == at_2,
        "point 2 after the discard"
    );
    assert!(
        materialize(&applier, 4) == at_4,
        "point 4 after the discard"
    );
    assert_eq!(applier.mark_latest_point().unwrap(), Some(10));
}

/// A pool of 16 KiB buffers: 32 KiB payloads go through the spill buffer, 8 KiB ones
/// straight into a pool buffer.
fn small_buffers() -> crate::io::BufPoolConfig {
    crate::io::BufPoolConfig {
        buf_size_bytes: 16 << 10,
        buf_count: 8,
        ..crate::io::BufPoolConfig::default()
    }
}

/// Compressible content that differs from frame to frame.
fn content(tag: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (((i / 96) as u64).wrapping_mul(31) ^ tag.wrapping_mul(0x9E37)) as u8)
        .collect()
}

/// `count` zstd writes from seq `first_seq` alternating 32 KiB and 8 KiB, overlapping;
/// returns the stream bytes (with an end frame) and applies them to `model`.
fn zstd_writes(first_seq: u64, count: u64, model: &mut [u8]) -> Vec<u8> {
    let mut encoder =
        DeltaEncoder::new(Vec::new(), &header(first_seq), EncoderOptions::default()).unwrap();
    for n in 0..count {
        let seq = first_seq + n;
        let len = if n % 2 == 0 { 32 << 10 } else { 8 << 10 };
        let offset = (seq * 12288) % (DISK_BYTES - (32 << 10));
        let data = content(seq, len);
        encoder.write(0, offset, &data).unwrap();
        write_model(model, offset, &data);
    }
    encoder.finish().unwrap()
}

fn ingest(log: &mut StagingLog, stream: &[u8]) -> crate::ingest::IngestReport {
    crate::ingest::ingest_stream(
        stream,
        log,
        crate::ingest::IngestConfig::default(),
        &mut |_, _| {},
    )
    .unwrap()
}

#[test]
fn payloads_ingest_validated_are_applied_without_a_second_decompression_byte_exact() {
    let (_storage, disks, mut log, _meta, _item, mut applier) = rig_with_pool(small_buffers());
    let mut model = vec![0u8; DISK_BYTES as usize];
    let report = ingest(&mut log, &zstd_writes(1, 12, &mut model));
    assert_eq!(report.frames_staged, 12);
    assert_eq!(log.handoff().stats().published, 12);
    let progress = applier.apply_available().unwrap();
    assert_eq!(progress.frames, 12);
    let stats = applier.stats();
    assert_eq!(
        (stats.payloads_handed_off, stats.payloads_decompressed),
        (12, 0),
        "apply caught up takes every payload from the handoff (spilled and pooled)"
    );
    assert!(disks.live_image("replica-0").unwrap() == model, "replica");
    // The buffers went back: the next stream hands off again without allocating more.
    let held = log.handoff().held_bytes();
    assert!(
        held > 0 && held <= crate::handoff::HANDOFF_MAX_BYTES,
        "{held}"
    );
    ingest(&mut log, &zstd_writes(13, 6, &mut model));
    applier.apply_available().unwrap();
    assert_eq!(applier.stats().payloads_handed_off, 18);
    assert!(log.handoff().held_bytes() <= crate::handoff::HANDOFF_MAX_BYTES);
    assert!(disks.live_image("replica-0").unwrap() == model, "replica");
}

#[test]
fn ingest_commits_early_when_apply_took_every_handed_off_payload() {
    let (_storage, disks, mut log, _meta, _item, mut applier) = rig_with_pool(small_buffers());
    let mut model = vec![0u8; DISK_BYTES as usize];
    // 60 frames (1.2 MiB decompressed) arrive in one read, so the input is idle only at
    // the end; once the pending frames hold 1 MiB (half the budget) handed off and nothing
    // published waits, ingest commits so that apply gets them while they are handed off.
    let report = ingest(&mut log, &zstd_writes(1, 60, &mut model));
    assert_eq!(report.commits, 2, "{report:?}");
    applier.apply_available().unwrap();
    assert_eq!(applier.stats().payloads_handed_off, 60);
    assert!(disks.live_image("replica-0").unwrap() == model, "replica");
}

#[test]
fn apply_behind_or_a_handoff_for_another_frame_decompresses_from_staging_byte_exact() {
    let (_storage, disks, mut log, _meta, _item, mut applier) = rig_with_pool(small_buffers());
    let mut model = vec![0u8; DISK_BYTES as usize];
    // Apply far behind: 160 frames (3.1 MiB decompressed) do not fit the 2 MiB budget; the
    // ones that did not are decompressed from staging.
    ingest(&mut log, &zstd_writes(1, 160, &mut model));
    let published = log.handoff().stats().published;
    assert!(published > 0 && published < 160, "{published}");
    applier.apply_available().unwrap();
    let stats = applier.stats().clone();
    assert_eq!(stats.payloads_handed_off, published);
    assert_eq!(stats.payloads_decompressed, 160 - published);
    assert!(disks.live_image("replica-0").unwrap() == model, "replica");

    // The handoff holds bytes for seq 161 with the same disk, offset and length as the
    // frame staging holds under 161, but not for that frame (another checksum: e.g. what
    // was validated before a resync replaced the staged frames). They must not be used.
    let mut other = model.clone();
    let stream = zstd_writes(161, 1, &mut model);
    let mut decoder = DeltaDecoder::new(stream.as_slice()).unwrap();
    let frame = decoder.next_frame().unwrap().unwrap();
    let FrameBody::Write(extent) = frame.body else {
        panic!("a write")
    };
    assert_eq!(extent.encoding, Encoding::Zstd);
    let staged_checksum = u64::from_le_bytes(frame.wire_bytes[40..48].try_into().unwrap());
    let forged = PayloadKey::of(161, staged_checksum ^ 1, &extent);
    log.append(161, frame.wire_bytes, std::time::Instant::now())
        .unwrap();
    log.commit().unwrap();
    let handoff = log.handoff();
    let mut lent = handoff.lend(extent.length_bytes as usize).unwrap();
    lent.as_mut_slice().fill(0xEE);
    lent.publish(forged);
    write_model(&mut other, extent.offset_bytes, &vec![0xEE; 32 << 10]);
    applier.apply_available().unwrap();
    let replica = disks.live_image("replica-0").unwrap();
    assert!(replica != other, "the forged bytes were written");
    assert!(replica == model, "replica");
    let after = applier.stats();
    assert_eq!(after.payloads_handed_off, stats.payloads_handed_off);
    assert_eq!(after.payloads_decompressed, stats.payloads_decompressed + 1);
    assert_eq!(handoff.stats().mismatched, 1);
}

#[test]
fn a_frame_damaged_in_the_staging_log_is_unappliable_with_its_segment_and_offset() {
    let (storage, _disks, mut log, meta, item, mut applier) = rig();
    let staged = frames(1, |e| {
        e.write(0, 0, &[1u8; 8192]).unwrap();
        e.bookmark(Consistency::Crash, 1, 1, "p2").unwrap();
        e.write(0, 4096, &[2u8; 8192]).unwrap();
    });
    for (seq, wire) in &staged {
        log.append(*seq, wire, std::time::Instant::now()).unwrap();
    }
    log.commit().unwrap();
    // Bit rot after staging: one payload byte of frame 3 flips on the cache disk.
    let frame_3_at = (header(1).encoded_len_bytes() + staged[0].1.len() + staged[1].1.len()) as u64;
    let segment = "seg-00000000000000000001.drs";
    let file = storage.open(segment, false).unwrap();
    let mut byte = [0u8; 1];
    let at = frame_3_at + crate::delta::FRAME_HEADER_BYTES as u64 + 7;
    file.read_exact_at(at, &mut byte).unwrap();
    file.write_all_at(at, &[byte[0] ^ 0x10]).unwrap();

    let error = applier.apply_available().unwrap_err();
    let frame = error.unappliable().unwrap_or_else(|| panic!("{error}"));
    assert_eq!(frame.seq, 3, "{frame}");
    assert_eq!(frame.segment.as_deref(), Some(segment), "{frame}");
    assert_eq!(frame.segment_offset_bytes, Some(frame_3_at), "{frame}");
    assert!(frame.reason.contains("checksum"), "{frame}");
    assert!(matches!(applier.health(), Health::Unappliable { .. }));
    assert_eq!(meta.state(item).unwrap().0, 2, "stopped at point 2");
    assert_eq!(applier.discard_unapplied().unwrap(), 3);
    assert_eq!(meta.state(item).unwrap().0, 3);
}

#[test]
fn default_pool_holds_4_mib_up_to_queue_depth_32_then_grows_by_min_buffers() {
    for (queue_depth, count, size) in [
        (1, 4, 1 << 20),
        (4, 4, 1 << 20),
        (8, 8, 512 << 10),
        (12, 12, 256 << 10),
        (32, 32, 128 << 10),
        (64, 64, 128 << 10),
    ] {
        let config = default_pool_config(queue_depth);
        assert_eq!(
            (config.buf_count, config.buf_size_bytes),
            (count, size),
            "queue depth {queue_depth}"
        );
        assert!(BufPool::new(config).is_ok(), "queue depth {queue_depth}");
    }
}
