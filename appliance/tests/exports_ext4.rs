//! A real ext4 through an export: a source disk made with `mkfs.ext4 -d` (files copied in) is
//! streamed by disk-sim's agent; a test failover in export mode serves a drill of it, which
//! is mounted through `nbdfuse` + a loop device; the source's files read back, new files are
//! written and read back, unmounted; `e2fsck -fn` is clean on the export's bytes; after the
//! clean-up the replica and every point equal the source (the drill's writes reached neither).

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;
mod nbd_tools;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use appliance_api::model::{
    DiskMode, DiskSpec, EnableRequest, Format, ItemState, MaterializeRequest, PointSpec,
};
use common::{Server, item_id, verify_item};
use engine::delta::DiskGeometry;
use nbd_tools::{agent, data_dir, have, nbd_read, ok, run, wait_for, wait_point};

const DISK_BYTES: u64 = 32 << 20;

/// nbdfuse running until dropped (then unmounted and reaped).
struct Fuse {
    child: Child,
    mountpoint: PathBuf,
}

impl Drop for Fuse {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.mountpoint)
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loop device, detached when dropped.
struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// A mount, unmounted when dropped.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i / 5) as u8).wrapping_mul(29).wrapping_add(seed))
        .collect()
}

#[test]
fn an_ext4_drill_mounts_takes_files_and_leaves_the_replica_alone() {
    if !have(&[
        "nbdfuse",
        "nbdcopy",
        "fusermount3",
        "losetup",
        "mkfs.ext4",
        "mount",
        "umount",
        "e2fsck",
        "debugfs",
    ]) {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIP: not root (loop devices and mount need it)");
        return;
    }
    if !Path::new("/dev/fuse").exists() {
        println!("SKIP: no /dev/fuse");
        return;
    }
    let (tmp, data) = data_dir();
    let scratch = tmp.path();

    // The source disk: ext4 with files copied in by mkfs.ext4 -d.
    let files = scratch.join("source-files");
    std::fs::create_dir_all(files.join("etc")).unwrap();
    let big = pattern(1 << 20, 3);
    std::fs::write(files.join("big.bin"), &big).unwrap();
    for i in 0..20 {
        std::fs::write(
            files.join("etc").join(format!("conf{i}")),
            format!("setting {i}\n"),
        )
        .unwrap();
    }
    let image_path = scratch.join("source.img");
    std::fs::File::create(&image_path)
        .unwrap()
        .set_len(DISK_BYTES)
        .unwrap();
    ok(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-d"])
        .arg(&files)
        .arg(&image_path));
    let image = std::fs::read(&image_path).unwrap();

    // Replicate it through the agent: every non-zero 64 KiB chunk.
    let server = Server::start(&data, &[]);
    let geometry = vec![DiskGeometry {
        size_bytes: DISK_BYTES,
        block_size_bytes: 4096,
    }];
    let enabled = server
        .api()
        .enable(&EnableRequest {
            name: "ext4".into(),
            disks: vec![DiskSpec::create(DISK_BYTES >> 20, None)],
            policy: None,
            temporary_os_disk: None,
        })
        .unwrap();
    let item = enabled.item.id.clone();
    let source = agent(
        &server,
        item_id(&item),
        &enabled.stream_token,
        "ext4",
        &geometry,
    );
    for (index, chunk) in image.chunks(64 << 10).enumerate() {
        if chunk.iter().any(|&b| b != 0) {
            source.write(0, (index as u64) << 16, chunk).unwrap();
        }
    }
    let point = source
        .bookmark(engine::delta::Consistency::Crash, 1, 1, "ext4")
        .unwrap();
    source.close(std::time::Duration::from_secs(60)).unwrap();
    server.wait_job(enabled.job.id);
    wait_point(&server, &item, point);

    // Test failover in export mode: a drill at the point.
    let job = server
        .api()
        .test_failover(
            &item,
            &MaterializeRequest {
                point: PointSpec::Id(point),
                target_dir: String::new(),
                format: Format::Raw,
                mode: DiskMode::Export,
            },
        )
        .unwrap();
    server.wait_job(job.id);
    let export_id = server
        .api()
        .item(&item)
        .unwrap()
        .test_failover
        .unwrap()
        .export_id
        .unwrap();
    let uri = server.api().export_view(&export_id).unwrap().disks[0]
        .uri
        .clone();
    assert!(
        nbd_read(&uri, scratch) == image,
        "the drill starts at the point"
    );

    // nbdfuse + loop + mount; the source's files are there; new files written and read back.
    let fuse_dir = scratch.join("fuse");
    let fs = scratch.join("fs");
    std::fs::create_dir(&fuse_dir).unwrap();
    std::fs::create_dir(&fs).unwrap();
    let pidfile = scratch.join("nbdfuse.pid");
    let child = Command::new("nbdfuse")
        .arg("-P")
        .arg(&pidfile)
        .arg(fuse_dir.join("disk"))
        .arg(&uri)
        .spawn()
        .unwrap();
    let fuse = Fuse {
        child,
        mountpoint: fuse_dir.clone(),
    };
    assert!(wait_for(&pidfile), "nbdfuse did not become ready");
    let dev = ok(Command::new("losetup")
        .args(["-f", "--show"])
        .arg(fuse_dir.join("disk")));
    let lo = Loop(dev.trim().to_owned());
    ok(Command::new("mount").arg(&lo.0).arg(&fs));
    let mounted = Mount(fs.clone());
    assert!(std::fs::read(fs.join("big.bin")).unwrap() == big);
    assert_eq!(
        std::fs::read_to_string(fs.join("etc/conf19")).unwrap(),
        "setting 19\n"
    );
    let new = pattern(3 << 20, 77);
    std::fs::write(fs.join("new.bin"), &new).unwrap();
    std::fs::create_dir(fs.join("drill")).unwrap();
    for i in 0..30 {
        std::fs::write(
            fs.join("drill").join(format!("f{i}")),
            format!("drill {i}\n"),
        )
        .unwrap();
    }
    std::fs::remove_file(fs.join("etc/conf0")).unwrap();
    ok(&mut Command::new("sync"));
    assert!(std::fs::read(fs.join("new.bin")).unwrap() == new);
    assert_eq!(
        std::fs::read_to_string(fs.join("drill/f29")).unwrap(),
        "drill 29\n"
    );
    drop(mounted);
    drop(lo);
    drop(fuse);

    // The export's bytes (not the page cache): a clean ext4 with the drill's files.
    let written = server.api().export_view(&export_id).unwrap().disks[0].written_bytes;
    assert!(written >= 3 << 20, "the drill took the writes: {written}");
    let copy = scratch.join("drill.img");
    ok(Command::new("nbdcopy").arg(&uri).arg(&copy));
    ok(Command::new("e2fsck").arg("-fn").arg(&copy));
    let out = run(Command::new("debugfs")
        .args(["-R", "cat /new.bin"])
        .arg(&copy));
    assert!(
        out.stdout == new,
        "new.bin read back through debugfs differs"
    );
    let out = ok(Command::new("debugfs")
        .args(["-R", "cat /drill/f7"])
        .arg(&copy));
    assert_eq!(out, "drill 7\n");
    let out = run(Command::new("debugfs")
        .args(["-R", "cat /big.bin"])
        .arg(&copy));
    assert!(out.stdout == big);

    let overlay = data
        .join("items")
        .join(&item)
        .join("exports")
        .join(&export_id);
    assert!(overlay.is_dir(), "{overlay:?}");
    // Clean-up drops the drill; the replica and every point are the source's, untouched.
    let view = server.api().test_failover_cleanup(&item).unwrap();
    assert_eq!(view.state, ItemState::Protected);
    assert!(server.api().exports().unwrap().is_empty());
    assert!(!overlay.exists(), "the drill's overlay is removed");
    server.stop();
    let digest = disk_sim::source::image_digest(&image);
    let verified = verify_item(
        &data,
        &item_id(&item),
        &geometry,
        &BTreeMap::from([(point, vec![digest])]),
        &[digest],
        scratch,
    );
    assert!(verified >= 1);
    ok(Command::new("e2fsck")
        .arg("-fn")
        .arg(data.join("items").join(&item).join("replicas/disk-0.img")));
}
