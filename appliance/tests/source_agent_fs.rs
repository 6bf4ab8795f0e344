//! Real workloads on the source agent's disk, judged by their own checkers.
//!
//! The `source-agent` binary serves a disk image over NBD; the test attaches it like a VM's
//! disk (`nbdfuse` + a loop device), makes an ext4 on it and mounts it; real programs write
//! (a source tree copied, an sqlite3 database under a write loop, fio with crc32c verify
//! headers). At app-consistent bookmarks (`source-agent bookmark --freeze`, writers stopped
//! and synced first, so the recorded state is exactly the frozen one) the test records the
//! sha256 of every file and the database's row count; each app point is then test-failed-over
//! and mounted: `e2fsck -fn` clean, every checksum equal, `PRAGMA integrity_check` ok with the
//! same row count, `fio --verify_only` passes. A crash point (a flush bookmark taken while
//! the writers ran) passes `e2fsck` after journal replay, and its database opens clean. A
//! planned failover after `source-agent quiesce` loses no acknowledged write and lands on a
//! disk equal to the source byte for byte.
//!
//! Needs root, `/dev/fuse` and the tools (`scripts/install-tools.sh`); skips otherwise,
//! saying why.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod agent_tools;
mod common;
mod nbd_tools;

use std::path::{Path, PathBuf};
use std::process::Command;

use agent_tools::{
    AgentProc, Attached, Bookmarked, Mount, RecordWriter, SqliteLoop, agent_files, assert_records,
    assert_same_sums, bookmark, copy_tree, e2fsck_after_replay, e2fsck_clean, enable, fio_verify,
    fio_write, mkfs_ext4, point_of, preflight, quiesce, repo, serial, sqlite, sqlite_check, status,
    tree_sums, wait_protected, wait_status,
};
use appliance_api::model::{
    DiskMode, FailoverRequest, Format, ItemState, MaterializeRequest, PointConsistency, PointSpec,
};
use common::Server;
use nbd_tools::{data_dir, ok, run};

const TOOLS: &[&str] = &[
    "nbdfuse",
    "fusermount3",
    "losetup",
    "mkfs.ext4",
    "mount",
    "umount",
    "e2fsck",
    "dumpe2fs",
    "fsfreeze",
    "sqlite3",
    "fio",
    "sha256sum",
    "qemu-img",
];

/// The disk of the app-point test: room for three rounds of writes.
const DISK_BYTES: u64 = 512 << 20;

/// What the test recorded at one app-consistent bookmark.
struct AppPoint {
    bookmark: Bookmarked,
    sums: String,
    rows: u64,
    fio_seed: u64,
}

/// Test-fails-over the item at `point` (copy mode, into `target`, which the appliance
/// accepts only inside its data directory); returns the disk file.
fn test_failover_file(server: &Server, item: &str, point: u64, target: &Path) -> PathBuf {
    let job = server
        .api()
        .test_failover(
            item,
            &MaterializeRequest {
                point: PointSpec::Id(point),
                target_dir: target.display().to_string(),
                format: Format::Raw,
                mode: DiskMode::Copy,
            },
        )
        .unwrap();
    server.wait_job(job.id);
    let view = server.api().item(item).unwrap();
    assert_eq!(view.state, ItemState::TestFailover, "{view:?}");
    let materialized = view.test_failover.unwrap();
    assert_eq!(materialized.point_id, point);
    PathBuf::from(&materialized.files[0])
}

fn cleanup_test_failover(server: &Server, item: &str) {
    let view = server.api().test_failover_cleanup(item).unwrap();
    assert_eq!(view.state, ItemState::Protected, "{view:?}");
}

#[test]
fn app_points_of_real_programs_mount_clean_with_every_file_intact() {
    let _serial = serial();
    if !preflight(TOOLS) {
        return;
    }
    let (tmp, data) = data_dir();
    let scratch = tmp.path();
    let server = Server::start(&data, &[]);
    let item = enable(&server, "fs-app", DISK_BYTES);
    let files = agent_files(
        &scratch.join("agent"),
        &server,
        &item,
        DISK_BYTES,
        "bookmark_interval_ms = 500",
    );
    let config = files.config.as_path();
    let agent = AgentProc::start(&files);
    let mut vm = Attached::attach(&scratch.join("fuse"), agent.uri("os"));
    mkfs_ext4(vm.dev());
    wait_protected(&server, &item, config);
    let fs = vm.mount(&scratch.join("fs"), "");
    let db = fs.join("db.sqlite");

    // Three rounds of writes, each ending at an app point; the crash point in the second.
    let mut app_points: Vec<AppPoint> = Vec::new();
    let mut crash: Option<Bookmarked> = None;
    let mut inserts = 0;
    for round in 0..3u64 {
        let writer = SqliteLoop::start(&db, &scratch.join(format!("sqlite-stop-{round}")));
        let tree = fs.join(format!("tree-{round}"));
        std::fs::create_dir(&tree).unwrap();
        copy_tree(&repo().join("engine/src"), &tree.join("engine"));
        copy_tree(&repo().join("appliance/src"), &tree.join("appliance"));
        if round == 2 {
            std::fs::remove_dir_all(fs.join("tree-0")).unwrap();
        }
        fio_write(&fs.join("fio.dat"), round + 1);
        if round == 1 {
            // A flush bookmark made while the sqlite loop commits (each commit FLUSHes).
            let after = app_points.last().unwrap().bookmark.bookmark_id;
            let now = wait_status(config, "a flush bookmark during the writes", |s| {
                s.last_bookmark()
                    .is_some_and(|b| b.consistency == "crash" && b.bookmark_id > after)
            });
            crash = now.last_bookmark();
        }
        inserts += writer.stop();
        // The writers are stopped and everything is written back: what is recorded now is
        // what the freeze will hold.
        ok(&mut Command::new("sync"));
        let sums = tree_sums(&fs);
        let rows: u64 = sqlite(&db, "select count(*) from t;").parse().unwrap();
        let label = format!("round {round}");
        let bookmark = bookmark(config, false, &[&fs], &label, 60);
        assert_eq!(bookmark.consistency, "app", "{bookmark:?}");
        println!(
            "app point {round}: bookmark {} ({} files, {rows} rows)",
            bookmark.bookmark_id,
            sums.lines().count()
        );
        app_points.push(AppPoint {
            bookmark,
            sums,
            rows,
            fio_seed: round + 1,
        });
    }
    assert!(inserts > 0, "the sqlite loop committed nothing");
    let crash = crash.unwrap();
    let written = status(config).sum("written_bytes");
    println!("written through the agent: {written} bytes, {inserts} sqlite inserts");
    // The VM shuts down.
    vm.shut_down();

    // Each app point: a test failover, mounted.
    for (index, point) in app_points.iter().enumerate() {
        let what = format!("app point {index}");
        let view = point_of(&server, &item.id, point.bookmark.bookmark_id);
        assert_eq!(view.consistency, PointConsistency::App, "{what}: {view:?}");
        let image = test_failover_file(
            &server,
            &item.id,
            view.id,
            &data.join(format!("tf-{index}")),
        );
        e2fsck_clean(&image, &what);
        let mounted = Mount::at(
            &image.display().to_string(),
            &scratch.join(format!("tf-{index}-fs")),
            "ro,loop",
        );
        assert_same_sums(&point.sums, &tree_sums(&mounted.dir), &what);
        let (check, rows) = sqlite_check(
            &mounted.dir,
            "db.sqlite",
            &scratch.join(format!("tf-{index}-db")),
        );
        assert_eq!(check, "ok", "{what}: PRAGMA integrity_check");
        assert_eq!(rows, point.rows, "{what}: rows");
        let fio_copy = scratch.join(format!("tf-{index}-fio.dat"));
        std::fs::copy(mounted.dir.join("fio.dat"), &fio_copy).unwrap();
        fio_verify(&fio_copy, point.fio_seed);
        std::fs::remove_file(&fio_copy).unwrap();
        mounted.unmount();
        cleanup_test_failover(&server, &item.id);
        println!("{what}: e2fsck clean, checksums equal, sqlite ok ({rows} rows), fio verified");
    }

    // The crash point: clean after journal replay; its database opens clean (a hot journal
    // rolled back) with at least the rows of the app point before it; the files of round 0
    // (written before that app point, untouched since) are there, equal.
    let what = "crash point";
    let view = point_of(&server, &item.id, crash.bookmark_id);
    assert_eq!(view.consistency, PointConsistency::Crash, "{view:?}");
    let image = test_failover_file(&server, &item.id, view.id, &data.join("tf-crash"));
    let replayed = e2fsck_after_replay(&image, &scratch.join("crash-replayed.img"), what);
    cleanup_test_failover(&server, &item.id);
    let mounted = Mount::at(
        &replayed.display().to_string(),
        &scratch.join("crash-fs"),
        "ro,loop",
    );
    let (check, rows) = sqlite_check(&mounted.dir, "db.sqlite", &scratch.join("crash-db"));
    assert_eq!(check, "ok", "{what}: PRAGMA integrity_check");
    assert!(
        rows >= app_points[0].rows && rows <= app_points[1].rows,
        "{what}: {rows} rows, app points had {} and {}",
        app_points[0].rows,
        app_points[1].rows
    );
    let round0 = |sums: &str| -> String {
        sums.lines()
            .filter(|l| l.contains("./tree-0/"))
            .map(|l| format!("{l}\n"))
            .collect()
    };
    assert_same_sums(
        &round0(&app_points[0].sums),
        &round0(&tree_sums(&mounted.dir)),
        what,
    );
    mounted.unmount();
    println!("{what}: e2fsck clean after journal replay, sqlite ok ({rows} rows)");

    agent.stop();
    server.stop();
}

#[test]
fn a_quiesced_planned_failover_loses_no_acknowledged_write() {
    const DISK_BYTES: u64 = 128 << 20;
    let _serial = serial();
    if !preflight(TOOLS) {
        return;
    }
    let (tmp, data) = data_dir();
    let scratch = tmp.path();
    let server = Server::start(&data, &[]);
    let item = enable(&server, "fs-quiesce", DISK_BYTES);
    let files = agent_files(&scratch.join("agent"), &server, &item, DISK_BYTES, "");
    let config = files.config.as_path();
    let agent = AgentProc::start(&files);
    let mut vm = Attached::attach(&scratch.join("fuse"), agent.uri("os"));
    mkfs_ext4(vm.dev());
    wait_protected(&server, &item, config);
    let fs = vm.mount(&scratch.join("fs"), "");
    copy_tree(&repo().join("engine/src"), &fs.join("engine"));

    // A writer appends records, each fsync'd; the acknowledged ones must all survive.
    let writer = RecordWriter::start(&fs.join("records.bin"));
    writer.wait_acked(300);
    let (acked, ended) = writer.finish();
    assert_eq!(ended, Ok(acked), "the writer ended with an error");
    ok(&mut Command::new("sync"));
    let sums = tree_sums(&fs);

    // Shut the machine down (unmount), then quiesce: drained, a final bookmark acknowledged.
    vm.mount.take().unwrap().unmount();
    let quiesced = quiesce(config, "planned failover", 60);
    let now = status(config);
    assert!(now.quiesced(), "status after quiesce: {}", now.0);
    assert_eq!(now.sum("unsent_bytes"), 0, "{}", now.0);
    assert_eq!(
        now.last_bookmark().map(|b| b.bookmark_id),
        Some(quiesced.bookmark_id),
        "{}",
        now.0
    );
    // New writes are refused now (the disk must stay at the quiesced point).
    let block = scratch.join("block.bin");
    std::fs::write(&block, vec![0x5a; 4096]).unwrap();
    let out = run(Command::new("dd")
        .arg(format!("if={}", block.display()))
        .arg(format!("of={}", vm.dev()))
        .args(["bs=4096", "count=1", "oflag=direct", "conv=notrunc"])
        .arg(format!("seek={}", DISK_BYTES / 4096 - 1)));
    assert!(
        !out.status.success(),
        "a write after quiesce was accepted: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    vm.shut_down();

    // Failover at the quiesced point.
    let point = point_of(&server, &item.id, quiesced.bookmark_id);
    let target = data.join("failover");
    let job = server
        .api()
        .failover(
            &item.id,
            &FailoverRequest {
                point: PointSpec::Id(point.id),
                target_dir: target.display().to_string(),
                format: Format::Raw,
                source_shut_down: true,
                mode: DiskMode::Copy,
            },
        )
        .unwrap();
    server.wait_job(job.id);
    let view = server.api().item(&item.id).unwrap();
    assert_eq!(view.state, ItemState::FailedOver, "{view:?}");
    let failed_over = PathBuf::from(&view.failover.unwrap().files[0]);

    // Byte for byte the source disk (qemu-img compare judges), a clean ext4, every record.
    let out = run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&files.image)
        .arg(&failed_over));
    assert_eq!(
        out.status.code(),
        Some(0),
        "qemu-img compare source failover: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(nbd_tools::cmp(&files.image, &failed_over));
    e2fsck_clean(&failed_over, "the failed-over disk");
    let mounted = Mount::at(
        &failed_over.display().to_string(),
        &scratch.join("failover-fs"),
        "ro,loop",
    );
    assert_records(
        &mounted.dir.join("records.bin"),
        acked,
        "the failed-over disk",
    );
    assert_same_sums(&sums, &tree_sums(&mounted.dir), "the failed-over disk");
    mounted.unmount();
    println!(
        "planned failover at bookmark {} (seq {}): {acked} acknowledged records all there; \
         the disk equals the source",
        quiesced.bookmark_id, quiesced.seq
    );
    agent.stop();
    server.stop();
}
