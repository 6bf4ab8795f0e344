//! Unit tests of exports: overlays against a model and through crashes, export disks
//! (refusals, rebase, extents, copy to target while a writer writes).

#![allow(clippy::unwrap_used, clippy::indexing_slicing)]

use super::*;
use crate::delta::{Consistency, DiskGeometry};
use crate::durable::{DurableDir, SimDir, StdDir};
use crate::meta::{MetaStore, PointOrigin, PointRecord, item_key};
use proptest::prelude::*;
use std::sync::Arc;

const GRAIN: u32 = 4096;

fn base_byte(at: u64) -> u8 {
    (at % 251) as u8 | 1
}

fn base_read(at: u64, out: &mut [u8]) -> Result<(), ExportError> {
    for (i, b) in out.iter_mut().enumerate() {
        *b = base_byte(at + i as u64);
    }
    Ok(())
}

#[derive(Debug, Clone)]
enum Op {
    Write(u64, usize, u8),
    Zero(u64, u64),
    Flush,
}

fn op(size: u64) -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..size, 1usize..20_000, any::<u8>()).prop_map(move |(at, len, fill)| {
            let len = len.min((size - at) as usize);
            Op::Write(at, len, fill | 1)
        }),
        2 => (0..size, 1u64..30_000).prop_map(move |(at, len)| Op::Zero(at, len.min(size - at))),
        1 => Just(Op::Flush),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Random writes, zeroings and flushes read back as a model of the disk does; reopening
    /// after a final flush shows the same disk.
    #[test]
    fn overlay_matches_a_model(ops in proptest::collection::vec(op(100_000 + 512), 1..40)) {
        let size = 100_000u64 + 512; // a partial last grain
        let dir = SimDir::new();
        let overlay = Overlay::create(&dir, "d", size, GRAIN).unwrap();
        let mut model: Vec<u8> = (0..size).map(base_byte).collect();
        for op in &ops {
            match *op {
                Op::Write(at, len, fill) => {
                    let data: Vec<u8> = (0..len).map(|i| fill.wrapping_add(i as u8) | 1).collect();
                    overlay.write_at(at, &data, &base_read).unwrap();
                    model[at as usize..at as usize + len].copy_from_slice(&data);
                }
                Op::Zero(at, len) => {
                    overlay.write_zeroes(at, len, &base_read).unwrap();
                    model[at as usize..(at + len) as usize].fill(0);
                }
                Op::Flush => overlay.flush().unwrap(),
            }
            let mut got = vec![0u8; size as usize];
            overlay.read_at(0, &mut got, &base_read).unwrap();
            prop_assert!(got == model, "after {:?}", op);
        }
        overlay.flush().unwrap();
        let reopened = Overlay::open(&SimDir::from_image(dir.durable_image()), "d", size, GRAIN).unwrap();
        let mut got = vec![0u8; size as usize];
        reopened.read_at(0, &mut got, &base_read).unwrap();
        prop_assert!(got == model);
        prop_assert_eq!(reopened.written_bytes(), overlay.written_bytes());
    }
}

/// Crashes at every sync point, torn or not: every grain written before the last completed
/// flush reads as flushed; every other sector reads as the base or one of its written
/// versions (never zeros from a map record whose data was not synced).
#[test]
fn overlay_crash_at_every_sync_keeps_flushed_writes_and_no_record_without_data() {
    let size = 64u64 << 10;
    let ops: Vec<(u64, usize, u8)> = (0..24u64)
        .map(|i| {
            (
                (i * 7919) % (size - 9000),
                1000 + (i as usize * 331) % 8000,
                i as u8 * 9 + 1,
            )
        })
        .collect();
    for crash_at in 3..40u64 {
        for tear in [None, Some(crash_at), Some(crash_at * 31 + 5)] {
            let dir = SimDir::new();
            let overlay = Overlay::create(&dir, "d", size, GRAIN).unwrap();
            dir.crash_at_sync(dir.sync_count() + crash_at - 3, tear);
            // Per byte: every value it held (base first), and the value at the last flush.
            let mut versions: Vec<Vec<u8>> = (0..size).map(|a| vec![base_byte(a)]).collect();
            let mut flushed: Vec<u8> = (0..size).map(base_byte).collect();
            let mut current = flushed.clone();
            // Bytes written since the last completed flush.
            let mut dirty = vec![false; size as usize];
            for (n, &(at, len, fill)) in ops.iter().enumerate() {
                let data: Vec<u8> = (0..len).map(|i| fill.wrapping_add(i as u8) | 1).collect();
                if overlay.write_at(at, &data, &base_read).is_err() {
                    break;
                }
                for (i, &b) in data.iter().enumerate() {
                    versions[at as usize + i].push(b);
                }
                current[at as usize..at as usize + len].copy_from_slice(&data);
                dirty[at as usize..at as usize + len].fill(true);
                if n % 3 == 2 {
                    if overlay.flush().is_err() {
                        break;
                    }
                    flushed.clone_from(&current);
                    dirty.fill(false);
                }
            }
            let image = dir.crash_image().unwrap_or_else(|| dir.durable_image());
            let reopened = Overlay::open(&SimDir::from_image(image), "d", size, GRAIN).unwrap();
            let mut got = vec![0u8; size as usize];
            reopened.read_at(0, &mut got, &base_read).unwrap();
            for a in 0..size as usize {
                assert!(
                    versions[a].contains(&got[a]),
                    "crash at {crash_at} tear {tear:?}: byte {a} reads {}, never written there",
                    got[a]
                );
            }
            // Every byte not written since the last completed flush reads as flushed.
            for a in (0..size as usize).filter(|&a| !dirty[a]) {
                assert_eq!(
                    got[a], flushed[a],
                    "crash at {crash_at} tear {tear:?}: flushed byte {a} lost"
                );
            }
        }
    }
}

#[test]
fn overlay_of_a_1_tib_disk_covers_its_first_and_last_grains_and_reopens() {
    let root = tempfile::tempdir().unwrap();
    let dir = StdDir::open(root.path()).unwrap();
    let size = 1u64 << 40;
    let last = size - u64::from(GRAIN);
    let overlay = Overlay::create(&dir, "big", size, GRAIN).unwrap();
    assert!(!overlay.is_covered(0) && !overlay.is_covered(last / u64::from(GRAIN)));
    let mut out = vec![0u8; GRAIN as usize];
    overlay.read_at(last, &mut out, &base_read).unwrap();
    assert!(
        out.iter()
            .enumerate()
            .all(|(i, &b)| b == base_byte(last + i as u64))
    );
    for at in [0, last] {
        overlay
            .write_at(at, &vec![7u8; GRAIN as usize], &base_read)
            .unwrap();
    }
    assert!(overlay.is_covered(0) && overlay.is_covered(last / u64::from(GRAIN)));
    assert!(!overlay.is_covered(1) && !overlay.is_covered(last / u64::from(GRAIN) - 1));
    assert_eq!(overlay.written_bytes(), 2 * u64::from(GRAIN));
    overlay.flush().unwrap();
    drop(overlay);
    let again = Overlay::open(&dir, "big", size, GRAIN).unwrap();
    assert_eq!(again.written_bytes(), 2 * u64::from(GRAIN));
    again.read_at(last, &mut out, &base_read).unwrap();
    assert!(out.iter().all(|&b| b == 7));
}

#[test]
fn overlay_create_refuses_existing_files_and_open_refuses_a_foreign_map() {
    let dir = SimDir::new();
    Overlay::create(&dir, "d", 1 << 20, GRAIN).unwrap();
    let again = Overlay::create(&dir, "d", 1 << 20, GRAIN).unwrap_err();
    assert!(again.to_string().contains("exists already"), "{again}");
    let other_size = Overlay::open(&dir, "d", 2 << 20, GRAIN).unwrap_err();
    assert!(
        other_size.to_string().contains("does not match"),
        "{other_size}"
    );
    Overlay::remove(&dir, "d").unwrap();
    assert!(dir.list().unwrap().is_empty());
}

#[test]
fn overlay_torn_record_is_cut_and_later_records_append_after_it() {
    let dir = SimDir::new();
    let overlay = Overlay::create(&dir, "d", 1 << 20, GRAIN).unwrap();
    overlay.write_at(0, &[7u8; 4096], &base_read).unwrap();
    overlay.flush().unwrap();
    let mut image = dir.durable_image();
    image
        .get_mut("d.map")
        .unwrap()
        .extend_from_slice(&[0xAB; 20]); // a torn record
    let dir = SimDir::from_image(image);
    let reopened = Overlay::open(&dir, "d", 1 << 20, GRAIN).unwrap();
    assert_eq!(reopened.written_bytes(), 4096);
    reopened.write_at(8192, &[9u8; 4096], &base_read).unwrap();
    reopened.flush().unwrap();
    let again = Overlay::open(
        &SimDir::from_image(dir.durable_image()),
        "d",
        1 << 20,
        GRAIN,
    )
    .unwrap();
    assert_eq!(again.written_bytes(), 8192);
    assert_eq!(dir.live("d.map").unwrap().len(), 3 * overlay::RECORD_BYTES);
}

struct Rig {
    _tmp: tempfile::TempDir,
    meta: Arc<MetaStore>,
    replica: Arc<std::fs::File>,
    content: Vec<u8>,
    preserve: Arc<dyn DurableDir>,
    pins: crate::apply::Pins,
}

const DISK_BYTES: u64 = (3 << 20) + 4096;

/// An item with points 7 and 9 whose disk is a file (nothing preserved: both read the same).
fn rig() -> Rig {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let store = StdDir::open(&root.join("store")).unwrap();
    let meta = MetaStore::open(store.open("meta.redb", true).unwrap()).unwrap();
    for id in [7, 9] {
        let point = PointRecord {
            point_id: id,
            consistency: Consistency::Crash,
            origin: PointOrigin::Bookmark,
            bookmark_id: id,
            source_timestamp_ns: 1,
            processed_at_ns: 1,
            label: "p".into(),
        };
        meta.checkpoint(item_key(&[1; 16]), id, id, Some(&point))
            .unwrap();
    }
    // Data in the first MiB only; the rest a hole.
    let content: Vec<u8> = (0..DISK_BYTES)
        .map(|i| if i < 1 << 20 { (i % 251) as u8 } else { 0 })
        .collect();
    let path = root.join("replica");
    std::fs::write(&path, &content[..1 << 20]).unwrap();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    file.set_len(DISK_BYTES).unwrap();
    Rig {
        _tmp: tmp,
        meta: Arc::new(meta),
        replica: Arc::new(file),
        content,
        preserve: Arc::new(StdDir::open(&root.join("preserve")).unwrap()),
        pins: crate::apply::Pins::default(),
    }
}

impl Rig {
    fn view(&self, point_id: u64) -> Result<PointView, ExportError> {
        PointView::open(
            ViewSource {
                meta: self.meta.clone(),
                item: item_key(&[1; 16]),
                disk_index: 0,
                disk: DiskGeometry {
                    size_bytes: DISK_BYTES,
                    block_size_bytes: 4096,
                },
                preserve_dir: self.preserve.clone(),
                grain_bytes: GRAIN,
                pins: self.pins.clone(),
            },
            point_id,
            self.replica.clone(),
        )
    }
}

fn read_all(disk: &ExportDisk) -> Vec<u8> {
    let mut out = vec![0u8; disk.size_bytes() as usize];
    disk.read_at(0, &mut out).unwrap();
    out
}

fn covers_exactly(disk: &ExportDisk, offset: u64, len: u64) -> Vec<Extent> {
    let mut out = Vec::new();
    disk.extents(offset, len, &mut out).unwrap();
    assert!(!out.is_empty());
    assert_eq!(
        out.iter().map(|e| e.length_bytes).sum::<u64>(),
        len,
        "{out:?}"
    );
    assert!(
        out.windows(2).all(|w| w[0].hole != w[1].hole),
        "merged: {out:?}"
    );
    out
}

#[test]
fn read_only_export_reads_the_point_refuses_writes_and_maps_holes() {
    let rig = rig();
    assert!(matches!(
        rig.view(8),
        Err(ExportError::NoSuchPoint { point_id: 8 })
    ));
    let disk = ExportDisk::read_only(rig.view(7).unwrap());
    assert!(!disk.writable());
    assert_eq!(read_all(&disk), rig.content);
    let refused = disk.write_at(0, &[1], false).unwrap_err();
    assert!(matches!(refused, ExportError::ReadOnly));
    assert_eq!(refused.io_kind(), std::io::ErrorKind::PermissionDenied);
    assert!(matches!(
        disk.trim(0, 4096, false),
        Err(ExportError::ReadOnly)
    ));
    let out = disk.read_at(DISK_BYTES - 1, &mut [0u8; 2]).unwrap_err();
    assert_eq!(out.io_kind(), std::io::ErrorKind::InvalidInput);
    let extents = covers_exactly(&disk, 0, DISK_BYTES);
    assert!(
        !extents[0].hole && extents.last().unwrap().hole,
        "{extents:?}"
    );
    covers_exactly(&disk, 4095, 10_000);
    assert_eq!(read_all(&disk), rig.content, "refusals changed nothing");
    disk.close();
    assert!(matches!(
        disk.read_at(0, &mut [0u8; 1]),
        Err(ExportError::Closed)
    ));
}

#[test]
fn drill_writes_stay_in_the_overlay_and_rebase_is_refused_after_a_write() {
    let rig = rig();
    let dir = SimDir::new();
    let overlay = Overlay::create(&dir, "drill", DISK_BYTES, GRAIN).unwrap();
    let disk = ExportDisk::drill(rig.view(7).unwrap(), overlay);
    assert!(disk.writable() && !disk.has_writes());
    disk.rebase(rig.view(9).unwrap()).unwrap();
    assert_eq!(disk.point_id(), Some(9));
    let mut model = rig.content.clone();
    disk.write_at(100, &[0xEE; 10_000], false).unwrap();
    model[100..10_100].fill(0xEE);
    disk.write_zeroes(20_000, 5000, false).unwrap();
    model[20_000..25_000].fill(0);
    disk.trim((2 << 20) + 7, 100, true).unwrap();
    assert_eq!(read_all(&disk), model);
    assert!(disk.has_writes());
    let refused = disk.rebase(rig.view(7).unwrap()).unwrap_err();
    assert!(
        matches!(refused, ExportError::HasWrites { .. }),
        "{refused}"
    );
    assert!(
        refused.to_string().contains("bytes were written"),
        "{refused}"
    );
    // The replica is untouched.
    let mut replica = vec![0u8; DISK_BYTES as usize];
    std::os::unix::fs::FileExt::read_exact_at(&*rig.replica, &mut replica, 0).unwrap();
    assert_eq!(replica, rig.content);
    // After a restart: the overlay reopened from what was flushed (the trim had FUA).
    let reopened = Overlay::open(
        &SimDir::from_image(dir.durable_image()),
        "drill",
        DISK_BYTES,
        GRAIN,
    )
    .unwrap();
    let again = ExportDisk::drill(rig.view(9).unwrap(), reopened);
    assert!(again.has_writes());
    assert_eq!(read_all(&again), model);
    assert!(matches!(
        again.rebase(rig.view(7).unwrap()),
        Err(ExportError::HasWrites { .. })
    ));
    let extents = covers_exactly(&disk, 0, DISK_BYTES);
    // The overlay's grain in the hole region is data.
    let mut at = 0;
    let mut found = false;
    for e in &extents {
        if !e.hole && at <= (2 << 20) && (2 << 20) < at + e.length_bytes {
            found = true;
        }
        at += e.length_bytes;
    }
    assert!(found, "{extents:?}");
}

#[test]
fn copy_to_target_while_a_writer_writes_ends_equal_to_the_disk_and_switches() {
    let rig = rig();
    let dir = SimDir::new();
    let overlay = Overlay::create(&dir, "drill", DISK_BYTES, GRAIN).unwrap();
    let disk = Arc::new(ExportDisk::drill(rig.view(7).unwrap(), overlay));
    disk.write_at(5000, &[3u8; 3000], false).unwrap();
    let target_path = rig._tmp.path().join("target");
    let target = Arc::new(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&target_path)
            .unwrap(),
    );
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let disk = disk.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut i = 0u64;
            let mut writes = 0u64;
            // At least some writes, then until the copy is done.
            while !stop.load(std::sync::atomic::Ordering::Acquire) || writes < 50 {
                let at = (i * 104_729) % (DISK_BYTES - 9000);
                let fill = (i % 200) as u8 + 1;
                match disk.write_at(at, &vec![fill; 5000 + (i % 4000) as usize], false) {
                    Ok(()) => writes += 1,
                    Err(e) => panic!("write {i}: {e}"),
                }
                if i.is_multiple_of(7) {
                    disk.write_zeroes(at + 100, 3000, false).unwrap();
                }
                i += 1;
            }
            writes
        })
    };
    let mut last = 0;
    disk.copy_to_target(target.clone(), &mut |done| last = done)
        .unwrap();
    assert!(disk.is_copied(), "copied, still mirroring until the switch");
    stop.store(true, std::sync::atomic::Ordering::Release);
    let writes = writer.join().unwrap();
    let returned = disk.switch_to_target().unwrap();
    assert!(writes >= 50);
    assert_eq!(last, DISK_BYTES);
    assert_eq!(returned.map(|o| o.stem().to_owned()), Some("drill".into()));
    assert_eq!(disk.point_id(), None, "switched: the view is dropped");
    // After the switch the disk is the target file.
    let seen = read_all(&disk);
    assert_eq!(std::fs::read(&target_path).unwrap(), seen);
    disk.write_at(0, &[0x55; 512], true).unwrap();
    assert_eq!(std::fs::read(&target_path).unwrap()[..512], [0x55; 512]);
    assert!(matches!(
        disk.copy_to_target(target, &mut |_| {}),
        Err(ExportError::Busy)
    ));
    assert!(matches!(disk.switch_to_target(), Err(ExportError::Busy)));
}

#[test]
fn copy_to_target_of_a_quiet_drill_equals_the_drill() {
    let rig = rig();
    let dir = SimDir::new();
    let overlay = Overlay::create(&dir, "drill", DISK_BYTES, GRAIN).unwrap();
    let disk = ExportDisk::drill(rig.view(7).unwrap(), overlay);
    disk.write_at(1 << 20, &[9u8; 70_000], false).unwrap();
    let before = read_all(&disk);
    let path = rig._tmp.path().join("quiet");
    let target = Arc::new(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap(),
    );
    disk.copy_to_target(target, &mut |_| {}).unwrap();
    disk.switch_to_target().unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), before);
    let reopened = ExportDisk::target(Arc::new(std::fs::File::open(&path).unwrap()), DISK_BYTES);
    assert_eq!(read_all(&reopened), before);
    covers_exactly(&reopened, 0, DISK_BYTES);
}

/// Two threads write the two halves of the same uncovered grains at once: each partial write
/// is a read-modify-write of the base, serialised per grain, so neither half is lost.
#[test]
fn concurrent_partial_writes_to_one_grain_both_survive() {
    let dir = SimDir::new();
    let grains = 64u64;
    let overlay = Overlay::create(&dir, "d", grains * u64::from(GRAIN), GRAIN).unwrap();
    let half = GRAIN as usize / 2;
    std::thread::scope(|s| {
        for (side, fill) in [(0usize, 0xA1u8), (1, 0xB2)] {
            let overlay = overlay.clone();
            s.spawn(move || {
                for g in 0..grains {
                    let at = g * u64::from(GRAIN) + (side * half) as u64;
                    overlay.write_at(at, &vec![fill; half], &base_read).unwrap();
                }
            });
        }
    });
    let mut got = vec![0u8; (grains * u64::from(GRAIN)) as usize];
    overlay.read_at(0, &mut got, &base_read).unwrap();
    for (g, grain) in got.chunks(GRAIN as usize).enumerate() {
        assert!(
            grain[..half].iter().all(|&b| b == 0xA1),
            "grain {g} lost its first half"
        );
        assert!(
            grain[half..].iter().all(|&b| b == 0xB2),
            "grain {g} lost its second half"
        );
    }
}

#[test]
fn a_read_only_export_rebases_and_copies_to_a_target_it_then_writes() {
    let rig = rig();
    let disk = ExportDisk::read_only(rig.view(7).unwrap());
    disk.rebase(rig.view(9).unwrap()).unwrap();
    assert_eq!(disk.point_id(), Some(9));
    let path = rig._tmp.path().join("ro-target");
    let target = Arc::new(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap(),
    );
    disk.copy_to_target(target, &mut |_| {}).unwrap();
    let overlay = disk.switch_to_target().unwrap();
    assert!(overlay.is_none());
    assert_eq!(std::fs::read(&path).unwrap(), rig.content);
    assert!(disk.writable(), "a switched disk is the failover's disk");
    disk.write_at(4096, &[1u8; 4096], false).unwrap();
    disk.flush().unwrap();
    assert_eq!(std::fs::read(&path).unwrap()[4096..8192], [1u8; 4096]);
    // The copy left holes where the disk is zero.
    let extents = covers_exactly(&disk, 0, DISK_BYTES);
    assert!(extents.last().unwrap().hole, "{extents:?}");
}

/// A change point during a failover's copy: the copy cancelled at its next chunk goes back to
/// the drill, which rebases (no writes) and copies again; the target then equals the new point.
#[test]
fn a_cancelled_copy_returns_to_the_drill_which_rebases_and_copies_again() {
    let rig = rig();
    let dir = SimDir::new();
    let overlay = Overlay::create(&dir, "drill", DISK_BYTES, GRAIN).unwrap();
    let disk = ExportDisk::drill(rig.view(7).unwrap(), overlay);
    let path = rig._tmp.path().join("cancelled");
    let target = Arc::new(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap(),
    );
    let mut chunks = 0;
    let cancelled = disk.copy_to_target(target.clone(), &mut |_| {
        chunks += 1;
        disk.cancel_copy();
    });
    assert!(
        matches!(cancelled, Err(ExportError::Cancelled)),
        "{cancelled:?}"
    );
    assert_eq!(chunks, 1, "stopped at the chunk after the cancel");
    assert!(!disk.is_copying() && !disk.is_switched());
    assert_eq!(disk.point_id(), Some(7));
    disk.rebase(rig.view(9).unwrap()).unwrap();
    assert_eq!(disk.point_id(), Some(9));
    // No stale cancel: the next copy runs to the end. A finished copy not yet switched goes
    // back to the drill on a cancel, keeping what was written meanwhile.
    disk.copy_to_target(target.clone(), &mut |_| {}).unwrap();
    disk.write_at(8192, &[7u8; 4096], true).unwrap();
    disk.cancel_copy();
    assert!(!disk.is_copied() && !disk.is_switched());
    assert_eq!(read_all(&disk)[8192..12288], [7u8; 4096]);
    assert!(disk.has_writes());
    disk.copy_to_target(target, &mut |_| {}).unwrap();
    disk.switch_to_target().unwrap();
    assert!(disk.is_switched() && !disk.is_copying());
    let mut expected = rig.content.clone();
    expected[8192..12288].fill(7);
    assert_eq!(std::fs::read(&path).unwrap(), expected);
    // A cancel after the switch changes nothing.
    disk.cancel_copy();
    assert_eq!(read_all(&disk), expected);
}
