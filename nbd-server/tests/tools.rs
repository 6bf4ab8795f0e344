//! Interop: real NBD clients (libnbd's nbdinfo/nbdcopy/nbdfuse, qemu-img) judge the server,
//! and a real ext4 filesystem goes through it (nbdfuse + loop device + mkfs + mount + e2fsck).
//! Each test skips with a printed reason when its tools (or root, /dev/fuse) are missing.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nbd_server::memory::{MemoryCatalog, MemoryExport};
use nbd_server::{Export, Server, ServerConfig};

const SIZE: u64 = 64 << 20;

fn have(tools: &[&str]) -> bool {
    for t in tools {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            println!("SKIP: {t} is not installed (scripts/install-tools.sh installs it)");
            return false;
        }
    }
    true
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Fixture {
    server: Server,
    disk: Arc<MemoryExport>,
    ro: Arc<MemoryExport>,
}

impl Fixture {
    fn new() -> Fixture {
        let disk = Arc::new(MemoryExport::new(SIZE, false).unwrap());
        // Data at 1 MiB and at 40 MiB; the rest holes.
        disk.fill(1 << 20, &pattern(256 << 10, 7)).unwrap();
        disk.fill(40 << 20, &pattern(64 << 10, 9)).unwrap();
        let ro = Arc::new(MemoryExport::new(SIZE, true).unwrap());
        ro.fill(0, &pattern(4096, 1)).unwrap();
        let catalog = MemoryCatalog::new(false)
            .with("disk", disk.clone() as Arc<dyn Export>)
            .with("ro", ro.clone() as Arc<dyn Export>);
        let config = ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            ..ServerConfig::default()
        };
        let server = Server::start(config, Arc::new(catalog)).unwrap();
        Fixture { server, disk, ro }
    }

    fn uri(&self, name: &str) -> String {
        format!("nbd://127.0.0.1:{}/{name}", self.server.local_addr().port())
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i / 7) as u8).wrapping_mul(13).wrapping_add(seed))
        .collect()
}

#[test]
fn nbdinfo_reports_size_and_maps_holes() {
    if !have(&["nbdinfo"]) {
        return;
    }
    let f = Fixture::new();
    let size = ok(Command::new("nbdinfo").args(["--size", &f.uri("disk")]));
    assert_eq!(size.trim(), SIZE.to_string());
    let map = ok(Command::new("nbdinfo").args(["--map", &f.uri("disk")]));
    // "offset length type description" per extent.
    let rows: Vec<(u64, u64, String)> = map
        .lines()
        .map(|l| {
            let mut w = l.split_whitespace();
            let off = w.next().unwrap().parse().unwrap();
            let len = w.next().unwrap().parse().unwrap();
            let _ty = w.next();
            (off, len, w.collect::<Vec<_>>().join(" "))
        })
        .collect();
    assert_eq!(rows.iter().map(|r| r.1).sum::<u64>(), SIZE, "{map}");
    let data: Vec<_> = rows
        .iter()
        .filter(|r| r.2 == "data")
        .map(|r| (r.0, r.1))
        .collect();
    assert_eq!(
        data,
        vec![(1 << 20, 256 << 10), (40 << 20, 64 << 10)],
        "{map}"
    );
    assert!(rows.iter().any(|r| r.2 == "hole,zero"), "{map}");
    let info = ok(Command::new("nbdinfo").arg(f.uri("ro")));
    assert!(info.contains("is_read_only: true"), "{info}");
    assert!(info.contains("block_size_preferred: 4096"), "{info}");
}

#[test]
fn nbdcopy_and_qemu_img_compare_see_the_exact_image() {
    if !have(&["nbdcopy", "qemu-img"]) {
        return;
    }
    let f = Fixture::new();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("copy.img");
    ok(Command::new("nbdcopy").args([&f.uri("disk"), out.to_str().unwrap()]));
    assert!(
        std::fs::read(&out).unwrap() == f.disk.snapshot(),
        "nbdcopy output differs"
    );
    let same = run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&out)
        .arg(f.uri("disk")));
    assert!(
        same.status.success(),
        "{}",
        String::from_utf8_lossy(&same.stdout)
    );
    // Change one byte through nbdcopy into the export: qemu-img sees the difference.
    let patch = dir.path().join("patch.img");
    let mut img = f.disk.snapshot();
    img[12345] ^= 0xff;
    std::fs::write(&patch, &img).unwrap();
    ok(Command::new("nbdcopy").arg(&patch).arg(f.uri("disk")));
    assert!(f.disk.snapshot() == img, "nbdcopy into the export differs");
    let differ = run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&out)
        .arg(f.uri("disk")));
    assert_eq!(
        differ.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&differ.stdout)
    );
}

#[test]
fn nbdinfo_list_is_refused_cleanly_and_the_server_goes_on() {
    if !have(&["nbdinfo"]) {
        return;
    }
    let f = Fixture::new();
    let root = format!("nbd://127.0.0.1:{}", f.server.local_addr().port());
    let out = run(Command::new("nbdinfo").args(["--list", &root]));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains("disk"), "the names are secrets: {text}");
    // libnbd reports the refusal ("server replied with error to list request") and exits 1.
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("list"), "{text}");
    let size = ok(Command::new("nbdinfo").args(["--size", &f.uri("disk")]));
    assert_eq!(size.trim(), SIZE.to_string());
}

#[test]
fn nbdcopy_into_a_read_only_export_fails_and_changes_nothing() {
    if !have(&["nbdcopy"]) {
        return;
    }
    let f = Fixture::new();
    let before = f.ro.snapshot();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    std::fs::write(&src, pattern(SIZE as usize, 3)).unwrap();
    let out = run(Command::new("nbdcopy").arg(&src).arg(f.uri("ro")));
    assert!(
        !out.status.success(),
        "nbdcopy into a read-only export succeeded"
    );
    assert!(f.ro.snapshot() == before);
}

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

struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn wait_for(path: &Path) -> bool {
    // Not a pass/fail timing: a bound on how long a broken setup may hang the suite.
    let until = Instant::now() + Duration::from_secs(30);
    while Instant::now() < until {
        if path.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn ext4_through_nbdfuse_and_a_loop_device_survives_e2fsck() {
    if !have(&[
        "nbdfuse",
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
    let f = Fixture::new();
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("fuse");
    let fs = dir.path().join("fs");
    std::fs::create_dir(&mnt).unwrap();
    std::fs::create_dir(&fs).unwrap();
    let pidfile = dir.path().join("nbdfuse.pid");
    let child = Command::new("nbdfuse")
        .arg("-P")
        .arg(&pidfile)
        .arg(mnt.join("disk"))
        .arg(f.uri("disk"))
        .spawn()
        .unwrap();
    let fuse = Fuse {
        child,
        mountpoint: mnt.clone(),
    };
    assert!(wait_for(&pidfile), "nbdfuse did not become ready");
    let image = mnt.join("disk");
    let dev = ok(Command::new("losetup").args(["-f", "--show"]).arg(&image));
    let lo = Loop(dev.trim().to_owned());
    ok(Command::new("mkfs.ext4").args(["-q", "-F", &lo.0]));
    ok(Command::new("mount").arg(&lo.0).arg(&fs));
    let mounted = Mount(fs.clone());
    let big = pattern(3 << 20, 42);
    std::fs::write(fs.join("big.bin"), &big).unwrap();
    std::fs::create_dir(fs.join("sub")).unwrap();
    for i in 0..50 {
        std::fs::write(fs.join("sub").join(format!("f{i}")), format!("file {i}\n")).unwrap();
    }
    ok(&mut Command::new("sync"));
    drop(mounted);
    drop(lo);
    drop(fuse);
    // Judge what the export holds, not what the page cache remembers.
    let copy = dir.path().join("export.img");
    std::fs::write(&copy, f.disk.snapshot()).unwrap();
    ok(Command::new("e2fsck").arg("-fn").arg(&copy));
    let out = run(Command::new("debugfs")
        .args(["-R", "cat /big.bin"])
        .arg(&copy));
    assert!(
        out.stdout == big,
        "big.bin read back through debugfs differs"
    );
    let out = ok(Command::new("debugfs")
        .args(["-R", "cat /sub/f49"])
        .arg(&copy));
    assert_eq!(out, "file 49\n");
}
