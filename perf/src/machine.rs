//! The machine a run measured, and the scratch directory it measured on.
//!
//! ```text
//!  --dir DIR (else ./target, else .) ──► DIR/.perf-scratch-XXXXXX (removed at the end)
//!      │ checks: filesystem from /proc/self/mountinfo is not tmpfs/ramfs,
//!      │         O_DIRECT open + one aligned 4 KiB write works,
//!      │         enough free space (statvfs) for the plan
//!      ▼
//!  MachineInfo { git revision, kernel, CPU model, cores, scratch fs, fio version, backend }
//! ```

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use engine::io::{BufPool, BufPoolConfig, DirectIo, ReplicaFile};
use serde::Serialize;

/// Facts about the machine and the run's environment, for `results.json`.
#[derive(Debug, Clone, Serialize)]
pub struct MachineInfo {
    /// `git rev-parse HEAD` of the current directory, if it is a repository.
    pub git_revision: Option<String>,
    /// `uname -r`.
    pub kernel: String,
    /// `model name` of the first CPU in /proc/cpuinfo.
    pub cpu_model: String,
    /// Logical CPUs available.
    pub cpu_count: usize,
    /// Total memory, bytes (from /proc/meminfo).
    pub memory_bytes: Option<u64>,
    /// The scratch directory measured on.
    pub scratch_dir: String,
    /// Its filesystem type (from /proc/self/mountinfo).
    pub scratch_fs_type: String,
    /// The device or source of that filesystem.
    pub scratch_fs_source: String,
    /// Free space of the scratch filesystem at the start, bytes.
    pub scratch_free_bytes: u64,
    /// `fio --version`.
    pub fio_version: String,
    /// The engine's I/O backend (`uring` or `sync_file`) and why, when it fell back.
    pub io_backend: String,
    /// /proc/loadavg when the run started: other work on the machine skews CPU-bound rows.
    pub loadavg_start: String,
    /// /proc/loadavg when the run ended.
    pub loadavg_end: String,
}

/// The first three fields of /proc/loadavg (1, 5 and 15 minute load averages).
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (!text.is_empty()).then_some(text)
}

/// `git rev-parse HEAD` (read-only; nothing else of git is run).
pub fn git_revision() -> Option<String> {
    command_output("git", &["rev-parse", "HEAD"])
}

/// `uname -r`, or /proc/sys/kernel/osrelease.
pub fn kernel_release() -> String {
    command_output("uname", &["-r"])
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .ok()
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The first `model name` of /proc/cpuinfo.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape_mount_path(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && let Some(v) = std::str::from_utf8(&bytes[i + 1..i + 4])
                .ok()
                .and_then(|s| u8::from_str_radix(s, 8).ok())
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// (filesystem type, source) of the mount holding `path`, from a mountinfo text.
fn filesystem_of(mountinfo: &str, path: &Path) -> Option<(String, String)> {
    let mut best: Option<(usize, String, String)> = None;
    for line in mountinfo.lines() {
        let (left, right) = line.split_once(" - ")?;
        let mount_point = unescape_mount_path(left.split_whitespace().nth(4)?);
        let mut right = right.split_whitespace();
        let (fs_type, source) = (right.next()?, right.next().unwrap_or(""));
        if !path.starts_with(&mount_point) {
            continue;
        }
        let depth = Path::new(&mount_point).components().count();
        // Later lines mount over earlier ones at the same point: `>=` keeps the last.
        if best.as_ref().is_none_or(|(d, _, _)| depth >= *d) {
            best = Some((depth, fs_type.to_owned(), source.to_owned()));
        }
    }
    best.map(|(_, t, s)| (t, s))
}

fn free_bytes(path: &Path) -> Result<u64> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .with_context(|| format!("{} contains a NUL byte", path.display()))?;
    // SAFETY: statvfs is plain old data; all-zero is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c_path` is a valid NUL-terminated string and `st` a writable statvfs, both
    // alive for the duration of the call.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("statvfs {}", path.display()));
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// The scratch directory of a run: a fresh temporary directory, removed when dropped.
#[derive(Debug)]
pub struct Scratch {
    dir: tempfile::TempDir,
    /// Filesystem type.
    pub fs_type: String,
    /// Filesystem source (device).
    pub fs_source: String,
    /// Free bytes at the start.
    pub free_bytes: u64,
}

impl Scratch {
    /// Creates `parent/.perf-scratch-XXXXXX` and checks that it can hold `need_bytes` and is
    /// a real filesystem with `O_DIRECT`. The parent is `--dir`, else `./target` when it
    /// exists (git ignores it, so a `git add -A` during a run cannot pick up GiB-sized scratch
    /// files), else the current directory.
    pub fn create(parent: Option<&Path>, need_bytes: u64) -> Result<Self> {
        let parent = match parent {
            Some(p) => p.to_path_buf(),
            None => {
                let cwd = std::env::current_dir().context("reading the current directory")?;
                let target = cwd.join("target");
                if target.is_dir() { target } else { cwd }
            }
        };
        std::fs::create_dir_all(&parent)
            .with_context(|| format!("creating {}", parent.display()))?;
        let parent = parent
            .canonicalize()
            .with_context(|| format!("resolving {}", parent.display()))?;
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let (fs_type, fs_source) = filesystem_of(&mountinfo, &parent)
            .unwrap_or_else(|| ("unknown".into(), "unknown".into()));
        if matches!(fs_type.as_str(), "tmpfs" | "ramfs") {
            bail!(
                "{} is on {fs_type} (memory): the benchmarks must run on a real disk; pass \
                 --dir on a disk-backed filesystem",
                parent.display()
            );
        }
        let free_bytes = free_bytes(&parent)?;
        if free_bytes < need_bytes {
            bail!(
                "{} has {} MiB free; this run needs about {} MiB (use --quick or another --dir)",
                parent.display(),
                free_bytes >> 20,
                need_bytes >> 20
            );
        }
        let dir = tempfile::Builder::new()
            .prefix(".perf-scratch-")
            .tempdir_in(&parent)
            .with_context(|| format!("creating a scratch directory in {}", parent.display()))?;
        check_direct_io(dir.path())?;
        Ok(Self {
            dir,
            fs_type,
            fs_source,
            free_bytes,
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A path inside it.
    pub fn join(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// Opens a probe file with `O_DIRECT` and writes one aligned 4 KiB block through it.
fn check_direct_io(dir: &Path) -> Result<()> {
    let path = dir.join("o_direct.probe");
    let file = ReplicaFile::create(&path, 4096, DirectIo::Require).with_context(|| {
        format!(
            "O_DIRECT does not work in {}; pass --dir on a filesystem that supports it",
            dir.display()
        )
    })?;
    let pool = BufPool::new(BufPoolConfig {
        buf_size_bytes: 4096,
        buf_count: 1,
        ..BufPoolConfig::default()
    })?;
    let Some(mut buf) = pool.take() else {
        bail!("a one-buffer pool gave no buffer");
    };
    buf.as_mut_slice().fill(0xa5);
    std::os::unix::fs::FileExt::write_all_at(file.as_file(), buf.as_slice(), 0)
        .with_context(|| format!("an O_DIRECT write in {} failed", dir.display()))?;
    drop(file);
    std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    Ok(())
}

/// Drops the page-cache pages of `path` (`posix_fadvise(POSIX_FADV_DONTNEED)` after an
/// fdatasync, so dirty pages are written and then dropped too): the next buffered read of it
/// comes from the disk.
pub fn drop_page_cache(path: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    file.sync_data()
        .with_context(|| format!("syncing {}", path.display()))?;
    // SAFETY: the descriptor is open for the duration of the call; fadvise only advises.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc))
            .with_context(|| format!("posix_fadvise(DONTNEED) on {}", path.display()));
    }
    Ok(())
}

/// Gathers the machine facts.
pub fn machine_info(
    scratch: &Scratch,
    fio_version: &str,
    io_backend: String,
    loadavg_start: String,
) -> MachineInfo {
    MachineInfo {
        git_revision: git_revision(),
        kernel: kernel_release(),
        cpu_model: cpu_model(),
        cpu_count: std::thread::available_parallelism().map_or(1, |n| n.get()),
        memory_bytes: memory_bytes(),
        scratch_dir: scratch.path().display().to_string(),
        scratch_fs_type: scratch.fs_type.clone(),
        scratch_fs_source: scratch.fs_source.clone(),
        scratch_free_bytes: scratch.free_bytes,
        fio_version: fio_version.to_owned(),
        io_backend,
        loadavg_start,
        loadavg_end: loadavg(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 254:0 / / rw,relatime - ext4 /dev/vda rw
23 22 0:21 / /tmp rw,nosuid - tmpfs tmpfs rw
24 22 0:22 / /mnt/my\\040disk rw - xfs /dev/vdb rw
25 23 0:23 / /tmp/inner rw - ext4 /dev/vdc rw
";

    #[test]
    fn longest_mount_prefix_wins() {
        let fs = |p: &str| filesystem_of(MOUNTINFO, Path::new(p)).unwrap().0;
        assert_eq!(fs("/work/main"), "ext4");
        assert_eq!(fs("/tmp/x"), "tmpfs");
        assert_eq!(fs("/tmp/inner/y"), "ext4");
        assert_eq!(fs("/tmpfoo"), "ext4");
        assert_eq!(fs("/mnt/my disk/z"), "xfs");
    }

    #[test]
    fn scratch_refuses_nothing_on_a_disk_and_checks_o_direct() {
        // Runs where the tests run; only meaningful on a disk-backed filesystem.
        let here = tempfile::tempdir().unwrap();
        match Scratch::create(Some(here.path()), 0) {
            Ok(s) => assert!(s.path().starts_with(here.path().canonicalize().unwrap())),
            Err(e) => eprintln!("SKIP: {e:#}"),
        }
    }
}
