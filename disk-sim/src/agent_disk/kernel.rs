//! An NBD disk as a kernel block device (nbdfuse + a loop device), ext4 on it, mounts, and
//! checksums of a file tree.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::run_checked;

/// How long nbdfuse may take to connect and mount.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(30);
/// The programs the real-disk path runs, with the Debian package of each.
const PROGRAMS: [(&str, &str); 6] = [
    ("nbdfuse", "nbdfuse"),
    ("fusermount3", "fuse3"),
    ("losetup", "mount"),
    ("mount", "mount"),
    ("umount", "mount"),
    ("mkfs.ext4", "e2fsprogs"),
];

fn on_path(program: &str) -> bool {
    let dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    dirs.iter()
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")].iter())
        .any(|d| d.join(program).is_file())
}

/// Whether this process runs with effective user id 0 (`Uid:` of /proc/self/status: real,
/// effective, saved, filesystem).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|text| {
        text.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            == Some("0")
    })
}

/// Why NBD disks cannot be mounted here (not root, no `/dev/fuse`, no loop devices, a missing
/// program), or `None` when they can.
pub fn why_not_runnable() -> Option<String> {
    if !is_root() {
        return Some("needs root (loop devices, mount, FUSE)".into());
    }
    if !Path::new("/dev/fuse").exists() {
        return Some("no /dev/fuse (FUSE is not available)".into());
    }
    if !Path::new("/dev/loop-control").exists() {
        return Some("no /dev/loop-control (loop devices are not available)".into());
    }
    let missing: Vec<String> = PROGRAMS
        .iter()
        .filter(|(p, _)| !on_path(p))
        .map(|(p, pkg)| format!("{p} (Debian package {pkg})"))
        .collect();
    if !missing.is_empty() {
        return Some(format!("missing programs: {}", missing.join(", ")));
    }
    None
}

/// An NBD export seen by the kernel: nbdfuse presents it as the file `<dir>/nbd`, a loop
/// device (direct I/O on, 4096-byte logical sectors) makes that a block device. The sector
/// size matters: the agent advertises a 4096-byte minimum block size, and libnbd (inside
/// nbdfuse) refuses smaller or unaligned requests, e.g. ext4's 1 KiB superblock read at 1024. Detached (loop device freed, FUSE
/// unmounted) when dropped.
#[derive(Debug)]
pub struct KernelDisk {
    nbdfuse: Option<Child>,
    fuse_dir: PathBuf,
    /// The block device, `/dev/loopN`.
    pub device: PathBuf,
}

impl KernelDisk {
    /// Mounts `uri` with nbdfuse on `fuse_dir` (created) and attaches a loop device to it.
    pub fn attach(uri: &str, fuse_dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(fuse_dir)
            .with_context(|| format!("creating {}", fuse_dir.display()))?;
        let pidfile = fuse_dir.with_extension("nbdfuse.pid");
        let _ = std::fs::remove_file(&pidfile);
        let mut child = Command::new("nbdfuse")
            .arg("-P")
            .arg(&pidfile)
            .arg(fuse_dir)
            .arg(uri)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting nbdfuse")?;
        let deadline = Instant::now() + ATTACH_TIMEOUT;
        loop {
            if std::fs::metadata(&pidfile).is_ok_and(|m| m.len() > 0) {
                break;
            }
            if let Some(status) = child.try_wait()? {
                let mut said = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut said);
                }
                bail!(
                    "nbdfuse {} {uri} exited ({status}): {}",
                    fuse_dir.display(),
                    said.trim()
                );
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "nbdfuse {} {uri}: not ready within {ATTACH_TIMEOUT:?}",
                    fuse_dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // From here on, a failure detaches what is there (Drop).
        let mut disk = Self {
            nbdfuse: Some(child),
            fuse_dir: fuse_dir.to_path_buf(),
            device: PathBuf::new(),
        };
        let file = fuse_dir.join("nbd");
        let out = run_checked(
            Command::new("losetup")
                .args([
                    "--find",
                    "--show",
                    "--direct-io=on",
                    "--sector-size",
                    "4096",
                ])
                .arg(&file),
        )?;
        disk.device = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if !disk.device.starts_with("/dev") {
            bail!("losetup printed {:?}, not a device", disk.device);
        }
        Ok(disk)
    }

    /// Frees the loop device and unmounts the FUSE file (nbdfuse then disconnects and exits);
    /// an error naming what failed.
    pub fn detach(mut self) -> anyhow::Result<()> {
        self.release()
    }

    fn release(&mut self) -> anyhow::Result<()> {
        let mut result = Ok(());
        if !self.device.as_os_str().is_empty() {
            let device = std::mem::take(&mut self.device);
            result = run_checked(Command::new("losetup").arg("-d").arg(&device)).map(drop);
        }
        let Some(mut child) = self.nbdfuse.take() else {
            return result;
        };
        // The loop device lets go of the file asynchronously: retry the unmount briefly.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match run_checked(Command::new("fusermount3").arg("-u").arg(&self.fuse_dir)) {
                Ok(_) => break,
                Err(e) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return result.and(Err(e));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
        loop {
            if child.try_wait()?.is_some() {
                break;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        result
    }
}

impl Drop for KernelDisk {
    fn drop(&mut self) {
        let _ = self.release();
    }
}

/// `mkfs.ext4 -q -F device` (with `-E nodiscard`: nothing to trim on a new image).
pub fn mkfs_ext4(device: &Path) -> anyhow::Result<()> {
    run_checked(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "nodiscard"])
            .arg(device),
    )
    .map(drop)
}

/// A mounted filesystem; unmounted when dropped.
#[derive(Debug)]
pub struct Mounted {
    /// Where.
    pub mountpoint: PathBuf,
    mounted: bool,
}

impl Mounted {
    /// `mount [-o options] source mountpoint` (the mountpoint is created). For an image file,
    /// give `loop` in the options.
    pub fn mount(source: &Path, mountpoint: &Path, options: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(mountpoint)
            .with_context(|| format!("creating {}", mountpoint.display()))?;
        let mut cmd = Command::new("mount");
        if !options.is_empty() {
            cmd.args(["-o", options]);
        }
        run_checked(cmd.arg(source).arg(mountpoint))?;
        Ok(Self {
            mountpoint: mountpoint.to_path_buf(),
            mounted: true,
        })
    }

    /// `umount`; an error naming what umount said.
    pub fn unmount(mut self) -> anyhow::Result<()> {
        self.mounted = false;
        run_checked(Command::new("umount").arg(&self.mountpoint)).map(drop)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.mountpoint)
                .output();
        }
    }
}

/// xxh3-128 of every regular file under `root`, by path relative to it.
pub fn tree_digests(root: &Path) -> anyhow::Result<BTreeMap<PathBuf, u128>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?
        {
            let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
            let path = entry.path();
            let kind = entry.file_type()?;
            if kind.is_dir() {
                if entry.file_name() != "lost+found" {
                    stack.push(path);
                }
            } else if kind.is_file() {
                let data =
                    std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
                let rel = path.strip_prefix(root).unwrap_or(&path).to_path_buf();
                out.insert(rel, xxhash_rust::xxh3::xxh3_128(&data));
            }
        }
    }
    Ok(out)
}
