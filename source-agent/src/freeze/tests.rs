use std::io::Write;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::*;

#[test]
fn mountinfo_escapes_are_decoded() {
    let line = "36 35 98:0 / /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw";
    assert_eq!(mount_point_of(line), Some(PathBuf::from("/mnt/with space")));
    assert_eq!(mount_point_of("short line"), None);
}

#[test]
fn bad_mountpoints_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let refused = |paths: &[PathBuf], what: &str| {
        let message = check_mountpoints(paths).unwrap_err().to_string();
        assert!(message.contains(what), "{what} not in {message}");
    };
    refused(&[PathBuf::from("relative")], "absolute");
    refused(&[dir.path().join("missing")], "missing");
    refused(&[dir.path().to_path_buf()], "not a mountpoint");
    refused(&[PathBuf::from("/")], "root filesystem");
    refused(&[PathBuf::from("/proc"), PathBuf::from("/proc")], "twice");
    refused(
        &vec![PathBuf::from("/proc"); MAX_MOUNTPOINTS + 1],
        "at most",
    );
    check_mountpoints(&[PathBuf::from("/proc")]).unwrap();
}

#[test]
fn a_refused_mountpoint_never_runs_the_closure() {
    let ran = AtomicBool::new(false);
    let result = with_frozen(&[PathBuf::from("rel")], FSFREEZE_TIMEOUT, || {
        ran.store(true, Ordering::SeqCst)
    });
    assert!(result.is_err());
    assert!(!ran.load(Ordering::SeqCst));
}

/// A loop-mounted ext4 (and a tmpfs beside it, which cannot be frozen), unmounted on drop.
struct Mounts {
    dir: tempfile::TempDir,
    ext4: PathBuf,
    tmpfs: PathBuf,
}

impl Drop for Mounts {
    fn drop(&mut self) {
        for m in [&self.ext4, &self.tmpfs] {
            let _ = Command::new("fsfreeze").arg("-u").arg(m).output();
            let _ = Command::new("umount").arg(m).status();
        }
        let _ = &self.dir;
    }
}

fn run(cmd: &mut Command) -> bool {
    cmd.output().map(|o| o.status.success()).unwrap_or(false)
}

/// None (with the reason printed) unless root with fsfreeze, mkfs.ext4 and loop mounts.
fn mounts() -> Option<Mounts> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: freezing needs root (CAP_SYS_ADMIN)");
        return None;
    }
    if !run(Command::new("fsfreeze").arg("--version")) {
        eprintln!("skipped: fsfreeze (util-linux) is not installed");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("fs.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let ext4 = dir.path().join("ext4");
    let tmpfs = dir.path().join("tmpfs");
    std::fs::create_dir(&ext4).unwrap();
    std::fs::create_dir(&tmpfs).unwrap();
    if !run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image)) {
        eprintln!("skipped: mkfs.ext4 failed or is missing");
        return None;
    }
    let mounts = Mounts { dir, ext4, tmpfs };
    if !run(Command::new("mount")
        .args(["-o", "loop"])
        .arg(&image)
        .arg(&mounts.ext4))
        || !run(Command::new("mount")
            .args(["-t", "tmpfs", "tmpfs"])
            .arg(&mounts.tmpfs))
    {
        eprintln!("skipped: cannot loop-mount ext4 or mount tmpfs here");
        return None;
    }
    Some(mounts)
}

/// Thread state letter from /proc (R, S, D, ...).
fn thread_state(tid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    after.trim_start().chars().next()
}

#[test]
fn a_write_waits_for_the_thaw() {
    let Some(m) = mounts() else { return };
    let file = m.ext4.join("f");
    let done = Arc::new(AtomicBool::new(false));
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let writer = with_frozen(std::slice::from_ref(&m.ext4), FSFREEZE_TIMEOUT, || {
        let finished = Arc::clone(&done);
        let file = file.clone();
        let writer = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tid_tx.send(unsafe { libc::gettid() }).unwrap();
            let mut f = std::fs::File::create(&file).unwrap();
            f.write_all(b"after thaw").unwrap();
            f.sync_all().unwrap();
            finished.store(true, Ordering::SeqCst);
        });
        let tid = tid_rx.recv().unwrap();
        // The writer must reach uninterruptible sleep (blocked on the frozen filesystem).
        let deadline = Instant::now() + Duration::from_secs(20);
        while thread_state(tid) != Some('D') {
            assert!(
                !done.load(Ordering::SeqCst),
                "write finished on a frozen fs"
            );
            assert!(Instant::now() < deadline, "writer never blocked");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!done.load(Ordering::SeqCst));
        writer
    })
    .unwrap();
    writer.join().unwrap();
    assert!(done.load(Ordering::SeqCst));
    assert_eq!(std::fs::read(&file).unwrap(), b"after thaw");
}

#[test]
fn a_failed_second_freeze_thaws_the_first() {
    let Some(m) = mounts() else { return };
    let ran = AtomicBool::new(false);
    let error = with_frozen(&[m.ext4.clone(), m.tmpfs.clone()], FSFREEZE_TIMEOUT, || {
        ran.store(true, Ordering::SeqCst)
    })
    .unwrap_err();
    assert!(matches!(error, FreezeError::Freeze { .. }), "{error}");
    assert!(error.to_string().contains("tmpfs"), "{error}");
    assert!(!ran.load(Ordering::SeqCst));
    // Thawed: thawing again is refused by the kernel (not frozen), and a write completes.
    assert!(!run(Command::new("fsfreeze").arg("-u").arg(&m.ext4)));
    let mut f = std::fs::File::create(m.ext4.join("g")).unwrap();
    f.write_all(b"x").unwrap();
    f.sync_all().unwrap();
}

#[test]
fn a_panicking_closure_still_thaws() {
    let Some(m) = mounts() else { return };
    let ext4 = m.ext4.clone();
    let result = std::panic::catch_unwind(move || {
        with_frozen(&[ext4], FSFREEZE_TIMEOUT, || panic!("bookmark exploded"))
    });
    assert!(result.is_err());
    assert!(!run(Command::new("fsfreeze").arg("-u").arg(&m.ext4)));
}
