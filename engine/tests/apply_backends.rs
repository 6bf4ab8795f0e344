//! The apply and recovery-point checks over the real backends (io_uring and pread/pwrite, on
//! real files with O_DIRECT), and materialize running while apply keeps writing.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use common::{SourceOp, header, pool, script};
use engine::apply::{Applier, ApplyConfig};
use engine::delta::Consistency;
use engine::durable::{DurableDir, StdDir};
use engine::io::{
    BackendChoice, DirectIo, IoEngine, ReplicaFile, SyncFileEngine, UringConfig, UringEngine,
};
use engine::materialize::{OutputFormat, Source, materialize_disk, materialize_to_path};
use engine::meta::{MetaStore, item_key};
use engine::staging::StagingLog;

fn ops(rounds: u64) -> Vec<SourceOp> {
    let mut ops = Vec::new();
    for i in 0..rounds {
        let disk = (i % 2) as u16;
        let geometry = header().disks[usize::from(disk)];
        let block = u64::from(geometry.block_size_bytes);
        let blocks = 1 + (i * 13) % 24;
        let offset_bytes = ((i * 29) % (geometry.size_bytes / block - blocks)) * block;
        if i % 9 == 8 {
            ops.push(SourceOp::Zero {
                disk,
                offset_bytes,
                len_bytes: blocks * block,
            });
        } else {
            ops.push(SourceOp::Write {
                disk,
                offset_bytes,
                data: (0..blocks * block)
                    .map(|b| (b / 512 + i) as u8 | 1)
                    .collect(),
            });
        }
        if i % 7 == 6 {
            ops.push(SourceOp::Bookmark(if i % 14 == 13 {
                Consistency::App
            } else {
                Consistency::Crash
            }));
        }
    }
    ops
}

struct Rig {
    dir: StdDir,
    staging: StagingLog,
    meta: Arc<MetaStore>,
    replicas: Vec<std::path::PathBuf>,
}

fn rig(root: &Path) -> (Rig, Vec<ReplicaFile>) {
    let dir = StdDir::open(root).unwrap();
    let (staging, _) =
        StagingLog::open(Arc::new(dir.clone()), header(), common::staging_config()).unwrap();
    let meta = Arc::new(MetaStore::open(dir.open("meta.redb", true).unwrap()).unwrap());
    let mut replicas = Vec::new();
    let mut files = Vec::new();
    for (index, disk) in header().disks.iter().enumerate() {
        let path = root.join(format!("replica-{index}.img"));
        files.push(ReplicaFile::create(&path, disk.size_bytes, DirectIo::Require).unwrap());
        replicas.push(path);
    }
    (
        Rig {
            dir,
            staging,
            meta,
            replicas,
        },
        files,
    )
}

fn applier<E: IoEngine<File = ReplicaFile>>(
    rig: &Rig,
    mut engine: E,
    files: Vec<ReplicaFile>,
    pool: engine::io::BufPool,
) -> Applier<E> {
    let ids = files
        .into_iter()
        .map(|f| engine.add_file(f).unwrap())
        .collect();
    Applier::new(
        item_key(&header().item_id),
        header().disks,
        ApplyConfig {
            stream_max_frames: 6,
            ..ApplyConfig::default()
        },
        engine,
        ids,
        pool,
        rig.meta.clone(),
        Arc::new(rig.dir.clone()),
        rig.staging.reader(1),
    )
    .unwrap()
}

fn materialize(rig: &Rig, pins: engine::apply::Pins, point_id: u64) -> Vec<Vec<u8>> {
    let disks = header().disks;
    let source = Source {
        meta: &rig.meta,
        item: item_key(&header().item_id),
        disks: &disks,
        preserve_dir: Arc::new(rig.dir.clone()),
        grain_bytes: 4096,
        pins,
    };
    let out_dir = tempfile::tempdir().unwrap();
    (0..disks.len())
        .map(|i| {
            let replica = std::fs::File::open(&rig.replicas[i]).unwrap();
            let path = out_dir.path().join(format!("out-{i}.raw"));
            let out = std::fs::File::create(&path).unwrap();
            materialize_disk(&source, point_id, i as u16, &replica, &out, &mut |_| {}).unwrap();
            std::fs::read(&path).unwrap()
        })
        .collect()
}

fn check_backend<E: IoEngine<File = ReplicaFile>>(
    name: &str,
    make: impl FnOnce(&engine::io::BufPool) -> E,
) {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let script = script(&ops(60), true);
    let (mut rig, files) = rig(tmp.path());
    for (seq, wire) in &script.frames {
        rig.staging.append(*seq, wire, Instant::now()).unwrap();
    }
    rig.staging.commit().unwrap();
    let pool = pool();
    let mut applier = applier(&rig, make(&pool), files, pool);
    assert_eq!(applier.backend_name(), name);
    applier.apply_available().unwrap();
    assert!(applier.stats().grains_preserved > 0);
    for (index, expected) in script.final_content.iter().enumerate() {
        assert!(
            &std::fs::read(&rig.replicas[index]).unwrap() == expected,
            "{name}: replica {index}"
        );
    }
    for (id, snapshot) in &script.snapshots {
        assert!(
            &materialize(&rig, applier.pins(), *id) == snapshot,
            "{name}: point {id}"
        );
    }
}

#[test]
fn apply_points_exact_over_io_uring() {
    if let BackendChoice::SyncFile { reason } = engine::io::probe() {
        eprintln!("**** SKIPPED: io_uring unavailable here: {reason} ****");
        return;
    }
    check_backend("uring", |pool| {
        let engine = UringEngine::new(
            Some(pool),
            UringConfig {
                queue_depth: 16,
                ..UringConfig::default()
            },
        )
        .unwrap();
        assert!(
            engine.buffers_registered(),
            "the pool is registered with the ring"
        );
        engine
    });
}

#[test]
fn apply_points_exact_over_pread_pwrite() {
    check_backend("sync_file", |_| SyncFileEngine::new(16).unwrap());
}

#[test]
fn materialize_while_apply_runs_is_exact_and_leaves_replication_untouched() {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let script = script(&ops(400), false);
    let (mut rig, files) = rig(tmp.path());
    // Stage and apply up to (and including) the first bookmark: that point is materialized
    // over and over while the rest is applied by another thread.
    let first_point = *script.snapshots.keys().next().unwrap();
    for (seq, wire) in &script.frames {
        rig.staging.append(*seq, wire, Instant::now()).unwrap();
    }
    rig.staging.commit().unwrap();
    let mut applier = applier(&rig, SyncFileEngine::new(16).unwrap(), files, pool());
    while applier.applied_seq() < first_point {
        applier.apply_batch().unwrap();
    }
    let pins = applier.pins();
    let rig = Arc::new(rig);
    let total = script.frames.len() as u64;
    let writer = std::thread::spawn(move || {
        while applier.applied_seq() < total {
            applier.apply_batch().unwrap();
            std::thread::yield_now();
        }
        applier
    });
    let mut rounds = 0;
    loop {
        let done = writer.is_finished();
        let got = materialize(&rig, pins.clone(), first_point);
        assert!(
            got == script.snapshots[&first_point],
            "round {rounds}: point {first_point} changed under apply"
        );
        rounds += 1;
        if done {
            break;
        }
    }
    let applier = writer.join().unwrap();
    assert_eq!(applier.applied_seq(), total);
    for (index, expected) in script.final_content.iter().enumerate() {
        assert!(
            &std::fs::read(&rig.replicas[index]).unwrap() == expected,
            "replica {index}"
        );
    }
    eprintln!("materialized point {first_point} {rounds} times while apply ran");
}

#[test]
fn materialized_fixed_vhd_opens_in_qemu_img_and_equals_the_raw_image() {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let script = script(&ops(40), true);
    let (mut rig, files) = rig(tmp.path());
    for (seq, wire) in &script.frames {
        rig.staging.append(*seq, wire, Instant::now()).unwrap();
    }
    rig.staging.commit().unwrap();
    let mut applier = applier(&rig, SyncFileEngine::new(8).unwrap(), files, pool());
    applier.apply_available().unwrap();
    let point = *script.snapshots.keys().nth(1).unwrap();
    let disks = header().disks;
    let source = Source {
        meta: &rig.meta,
        item: item_key(&header().item_id),
        disks: &disks,
        preserve_dir: Arc::new(rig.dir.clone()),
        grain_bytes: 4096,
        pins: applier.pins(),
    };
    for (index, expected) in script.snapshots[&point].iter().enumerate() {
        let replica = std::fs::File::open(&rig.replicas[index]).unwrap();
        let raw = tmp.path().join(format!("d{index}.raw"));
        let vhd = tmp.path().join(format!("d{index}.vhd"));
        for (path, format) in [(&raw, OutputFormat::Raw), (&vhd, OutputFormat::FixedVhd)] {
            materialize_to_path(
                &source,
                point,
                index as u16,
                &replica,
                path,
                format,
                &mut |_| {},
            )
            .unwrap();
        }
        assert!(&std::fs::read(&raw).unwrap() == expected);
        let info = std::process::Command::new("qemu-img")
            .args(["info", "-f", "vpc", "--output=json"])
            .arg(&vhd)
            .output()
            .expect("qemu-img must be installed (scripts/install-tools.sh)");
        assert!(
            info.status.success(),
            "{}",
            String::from_utf8_lossy(&info.stderr)
        );
        let json = String::from_utf8_lossy(&info.stdout);
        let virtual_size = engine::vhd::fixed_vhd_virtual_size(disks[index].size_bytes);
        assert!(
            json.contains(&format!("\"virtual-size\": {virtual_size}")),
            "{json}"
        );
        // The VHD's disk is the raw image padded with zeros to a 1 MiB multiple.
        let padded = tmp.path().join(format!("d{index}.padded"));
        let mut bytes = expected.clone();
        bytes.resize(virtual_size as usize, 0);
        std::fs::write(&padded, bytes).unwrap();
        let compare = std::process::Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "vpc"])
            .arg(&padded)
            .arg(&vhd)
            .output()
            .unwrap();
        assert!(
            compare.status.success(),
            "qemu-img compare: {}",
            String::from_utf8_lossy(&compare.stdout)
        );
        // Never overwrites.
        let again = materialize_to_path(
            &source,
            point,
            index as u16,
            &replica,
            &vhd,
            OutputFormat::FixedVhd,
            &mut |_| {},
        );
        assert!(matches!(
            again,
            Err(engine::materialize::MaterializeError::Exists { .. })
        ));
    }
}
