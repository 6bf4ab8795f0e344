//! Application-consistent bookmarks on Linux: freeze mounted filesystems around the bookmark.
//!
//! [`with_frozen`] runs `fsfreeze -f` for each mountpoint in order, then the caller's closure
//! (the bookmark), then `fsfreeze -u` for each frozen one in reverse order, always: after an
//! error of the closure, after a failed freeze (the ones already frozen are thawed) and after
//! a panic of the closure. Each command has a deadline; a command past it is killed.
//!
//! The filesystems frozen are those of the *protected VM* (mounted on this host through the
//! agent's NBD disk, e.g. nbdfuse + a loop device, or the kernel's nbd client). Never freeze
//! the filesystem holding the agent's disk images or its state directory: the agent's own
//! writes would then wait for the thaw it is about to run. Freezing needs `CAP_SYS_ADMIN`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[cfg(test)]
mod tests;

/// Deadline of one `fsfreeze` command.
pub const FSFREEZE_TIMEOUT: Duration = Duration::from_secs(30);
/// Most mountpoints frozen around one bookmark.
pub const MAX_MOUNTPOINTS: usize = 16;

/// Why a freeze, the closure's frame, or a thaw failed. Every variant names the mountpoint.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FreezeError {
    /// A mountpoint was refused before anything was frozen.
    #[error("cannot freeze {mountpoint}: {message}")]
    Invalid {
        /// The mountpoint as given.
        mountpoint: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// Too many mountpoints in one request.
    #[error("{count} mountpoints to freeze; at most {MAX_MOUNTPOINTS}")]
    TooMany {
        /// How many were given.
        count: usize,
    },
    /// `fsfreeze -f` failed (those frozen before it were thawed again).
    #[error("fsfreeze -f {mountpoint} failed: {message}")]
    Freeze {
        /// The mountpoint.
        mountpoint: PathBuf,
        /// The command's error output or why it could not run.
        message: String,
    },
    /// `fsfreeze -u` failed: the filesystem may still be frozen (run `fsfreeze -u` by hand).
    #[error(
        "fsfreeze -u {mountpoint} failed: {message}; the filesystem may still be frozen: run `fsfreeze -u {mountpoint}`"
    )]
    Thaw {
        /// The mountpoint.
        mountpoint: PathBuf,
        /// The command's error output or why it could not run.
        message: String,
    },
}

/// Checks each mountpoint (absolute, exists, a mountpoint per `/proc/self/mountinfo`, no
/// duplicates) and returns them canonicalised.
pub fn check_mountpoints(mountpoints: &[PathBuf]) -> Result<Vec<PathBuf>, FreezeError> {
    if mountpoints.len() > MAX_MOUNTPOINTS {
        return Err(FreezeError::TooMany {
            count: mountpoints.len(),
        });
    }
    let invalid = |m: &Path, message: String| FreezeError::Invalid {
        mountpoint: m.to_path_buf(),
        message,
    };
    let table = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| invalid(Path::new("/"), format!("reading /proc/self/mountinfo: {e}")))?;
    let mounted: Vec<PathBuf> = table.lines().filter_map(mount_point_of).collect();
    let mut checked: Vec<PathBuf> = Vec::with_capacity(mountpoints.len());
    for m in mountpoints {
        if !m.is_absolute() {
            return Err(invalid(m, "not an absolute path".into()));
        }
        let real = std::fs::canonicalize(m).map_err(|e| invalid(m, e.to_string()))?;
        if !real.is_dir() {
            return Err(invalid(m, "not a directory".into()));
        }
        if !mounted.contains(&real) {
            return Err(invalid(
                m,
                format!("{} is not a mountpoint", real.display()),
            ));
        }
        if real == Path::new("/") {
            return Err(invalid(
                m,
                "refusing to freeze the root filesystem (the agent's own files live there)".into(),
            ));
        }
        if checked.contains(&real) {
            return Err(invalid(m, "named twice".into()));
        }
        checked.push(real);
    }
    Ok(checked)
}

/// The mount point (5th field) of one `/proc/self/mountinfo` line, octal escapes decoded.
fn mount_point_of(line: &str) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStringExt;
    let field = line.split(' ').nth(4)?;
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && let Ok(text) = std::str::from_utf8(&bytes[i + 1..i + 4])
            && let Ok(v) = u8::from_str_radix(text, 8)
        {
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(PathBuf::from(std::ffi::OsString::from_vec(out)))
}

/// Freezes `mountpoints` (checked by [`check_mountpoints`]) in order, runs `f`, and thaws
/// them in reverse order, always. `timeout` bounds each `fsfreeze` command.
///
/// Returns `f`'s value, or the first error: a refused mountpoint, a failed freeze, or a
/// failed thaw (every thaw is attempted even after one failed; the first failure is
/// returned and all are logged).
pub fn with_frozen<T>(
    mountpoints: &[PathBuf],
    timeout: Duration,
    f: impl FnOnce() -> T,
) -> Result<T, FreezeError> {
    let checked = check_mountpoints(mountpoints)?;
    let mut guard = Thaw {
        frozen: Vec::with_capacity(checked.len()),
        timeout,
        error: None,
    };
    for m in checked {
        run_fsfreeze("-f", &m, timeout).map_err(|message| FreezeError::Freeze {
            mountpoint: m.clone(),
            message,
        })?;
        tracing::info!(mountpoint = %m.display(), "frozen");
        guard.frozen.push(m);
    }
    let value = f();
    guard.thaw_all();
    match guard.error.take() {
        Some(e) => Err(e),
        None => Ok(value),
    }
}

/// Thaws what it froze when dropped (on the error and panic paths) or by `thaw_all`.
struct Thaw {
    frozen: Vec<PathBuf>,
    timeout: Duration,
    error: Option<FreezeError>,
}

impl Thaw {
    fn thaw_all(&mut self) {
        while let Some(m) = self.frozen.pop() {
            match run_fsfreeze("-u", &m, self.timeout) {
                Ok(()) => tracing::info!(mountpoint = %m.display(), "thawed"),
                Err(message) => {
                    tracing::error!(mountpoint = %m.display(), %message, "thaw failed");
                    self.error.get_or_insert(FreezeError::Thaw {
                        mountpoint: m,
                        message,
                    });
                }
            }
        }
    }
}

impl Drop for Thaw {
    fn drop(&mut self) {
        self.thaw_all();
    }
}

/// Most bytes of `fsfreeze`'s error output kept for a message.
const MAX_STDERR_BYTES: u64 = 4096;
/// How often a running `fsfreeze` is polled for its exit.
const POLL_INTERVAL: Duration = Duration::from_millis(5);

/// Runs `fsfreeze <flag> <mountpoint>` with a deadline; Err: what went wrong, in words.
fn run_fsfreeze(flag: &str, mountpoint: &Path, timeout: Duration) -> Result<(), String> {
    let mut child = Command::new("fsfreeze")
        .arg(flag)
        .arg(mountpoint)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run fsfreeze (util-linux): {e}"))?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("no answer within {} s (killed)", timeout.as_secs()));
            }
            Ok(None) => std::thread::sleep(POLL_INTERVAL),
            Err(e) => return Err(format!("waiting for fsfreeze: {e}")),
        }
    };
    if status.success() {
        return Ok(());
    }
    let mut stderr = String::new();
    if let Some(pipe) = child.stderr.take() {
        let _ = pipe.take(MAX_STDERR_BYTES).read_to_string(&mut stderr);
    }
    Err(format!("{status}: {}", stderr.trim()))
}
