//! The control socket: a Unix stream socket (mode 0600) through which the CLI (and the
//! appliance's failover procedure, via an operator or a script) asks the running agent for
//! its status, bookmarks, quiesce and resume.
//!
//! Protocol ([`protocol`]): one JSON request per line, one JSON response per line, any number
//! of requests per connection. Limits: a request line is at most
//! [`protocol::MAX_REQUEST_BYTES`] (longer: refused and the connection closed); at most
//! [`MAX_CONNECTIONS`] connections at once (more: refused and closed); a connection idle
//! for [`READ_TIMEOUT`] is closed.
//!
//! The server talks to the agent through [`ControlTarget`], so it can be tested with a fake.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use engine::delta::Consistency;

pub mod client;
pub mod protocol;
#[cfg(test)]
mod tests;

use protocol::{BookmarkReply, DEFAULT_QUIESCE_TIMEOUT_SECS, MAX_REQUEST_BYTES, Request, Response};

/// Most control connections open at once.
pub const MAX_CONNECTIONS: usize = 8;
/// A connection that sends no complete request line for this long is closed.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline of writing one response.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the control socket controls: the daemon implements it over `capture::Capture` (and
/// over the write-through-only mode, which refuses bookmarks); tests use a fake. Errors are
/// sentences for the operator.
pub trait ControlTarget: Send + Sync {
    /// The capture's status as JSON (`CaptureStatus`).
    fn status(&self) -> Result<serde_json::Value, String>;
    /// Puts a bookmark into the stream.
    fn bookmark(&self, consistency: Consistency, label: &str) -> Result<BookmarkReply, String>;
    /// Waits until the appliance acknowledged `seq` as durable.
    fn wait_acked(&self, seq: u64, timeout: Duration) -> Result<(), String>;
    /// Planned failover: refuse writes, drain, bookmark, wait for its ack.
    fn quiesce(
        &self,
        consistency: Consistency,
        label: &str,
        timeout: Duration,
    ) -> Result<BookmarkReply, String>;
    /// Accept writes again.
    fn resume(&self) -> Result<(), String>;
}

/// Why the control socket could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// Another process answers on the socket: another agent runs with this configuration.
    #[error("control socket {path}: another agent answers on it (stop it first)")]
    InUse {
        /// The socket path.
        path: PathBuf,
    },
    /// Something that is not a socket is in the way.
    #[error("control socket {path}: exists and is not a socket (remove it or choose another path)")]
    NotASocket {
        /// The socket path.
        path: PathBuf,
    },
    /// A system call failed.
    #[error("control socket {path}: {op}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// Why it failed.
        source: std::io::Error,
    },
}

/// A running control socket server. [`ControlServer::stop`] (or drop) stops accepting and
/// removes the socket file (if it is still the one this server created).
pub struct ControlServer {
    path: PathBuf,
    identity: (u64, u64),
    stopping: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ControlServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlServer")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl ControlServer {
    /// Creates the socket at `path` (mode 0600; a stale socket nobody answers on is
    /// replaced, a live one refused) and serves it on a thread of its own.
    pub fn start(
        path: &Path,
        target: Arc<dyn ControlTarget>,
    ) -> Result<ControlServer, ControlError> {
        let io = |op, source| ControlError::Io {
            path: path.to_path_buf(),
            op,
            source,
        };
        remove_stale(path)?;
        // Bound under a temporary name, made 0600, then renamed into place: the socket is
        // never reachable at `path` with wider permissions.
        let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let tmp = path.with_file_name(format!(
            ".{}.{}.tmp",
            file_name.unwrap_or_else(|| "control.sock".into()),
            std::process::id()
        ));
        let _ = std::fs::remove_file(&tmp);
        let listener = UnixListener::bind(&tmp).map_err(|e| io("bind", e))?;
        let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| io("chmod 0600", e))
            .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| io("rename into place", e)));
        if let Err(e) = placed {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        let meta = std::fs::metadata(path).map_err(|e| io("stat", e))?;
        let stopping = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared {
            target,
            active: AtomicUsize::new(0),
            freeze_lock: Mutex::new(()),
        });
        let accept = {
            let stopping = Arc::clone(&stopping);
            std::thread::Builder::new()
                .name("control-accept".into())
                .spawn(move || accept_loop(&listener, &stopping, &shared))
                .map_err(|e| io("spawn the accept thread", e))?
        };
        Ok(ControlServer {
            path: path.to_path_buf(),
            identity: (meta.dev(), meta.ino()),
            stopping,
            accept: Some(accept),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting (connections being served finish their current request) and removes
    /// the socket file.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        let Some(accept) = self.accept.take() else {
            return;
        };
        self.stopping.store(true, Ordering::SeqCst);
        // Wake the blocked accept(2) with a connection of our own.
        let _ = UnixStream::connect(&self.path);
        let _ = accept.join();
        if let Ok(meta) = std::fs::symlink_metadata(&self.path)
            && (meta.dev(), meta.ino()) == self.identity
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

/// Removes a stale socket at `path`; refuses a live one or a non-socket.
fn remove_stale(path: &Path) -> Result<(), ControlError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(ControlError::Io {
                path: path.to_path_buf(),
                op: "stat",
                source: e,
            });
        }
    };
    if !meta.file_type().is_socket() {
        return Err(ControlError::NotASocket {
            path: path.to_path_buf(),
        });
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ControlError::InUse {
            path: path.to_path_buf(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            tracing::info!(path = %path.display(), "replacing a stale control socket");
            std::fs::remove_file(path).map_err(|e| ControlError::Io {
                path: path.to_path_buf(),
                op: "remove the stale socket",
                source: e,
            })
        }
        Err(e) => Err(ControlError::Io {
            path: path.to_path_buf(),
            op: "probe the existing socket",
            source: e,
        }),
    }
}

struct Shared {
    target: Arc<dyn ControlTarget>,
    active: AtomicUsize,
    /// Bookmarks with fsfreeze run one at a time (two would race on the same mountpoints).
    freeze_lock: Mutex<()>,
}

fn accept_loop(listener: &UnixListener, stopping: &AtomicBool, shared: &Arc<Shared>) {
    for stream in listener.incoming() {
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "control socket accept failed");
                // EMFILE and the like: do not spin.
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let _ = stream.set_read_timeout(Some(READ_TIMEOUT));
        let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
        if shared.active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            shared.active.fetch_sub(1, Ordering::SeqCst);
            let message = format!("too many control connections (at most {MAX_CONNECTIONS})");
            let _ = stream.write_all(&Response::error(message).to_line());
            continue;
        }
        let conn_shared = Arc::clone(shared);
        let spawned = std::thread::Builder::new()
            .name("control-conn".into())
            .spawn(move || {
                serve_connection(stream, &conn_shared);
                conn_shared.active.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            shared.active.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(error = %e, "cannot spawn a control connection thread");
        }
    }
}

/// Serves requests until the client hangs up, idles past the read timeout, or sends a bad
/// line (oversized or not UTF-8 JSON: answered, then closed).
fn serve_connection(stream: UnixStream, shared: &Shared) {
    let Ok(write_half) = stream.try_clone() else {
        return;
    };
    let mut writer = write_half;
    let mut reader = BufReader::new(stream);
    let mut line = Vec::with_capacity(256);
    loop {
        line.clear();
        let limit = MAX_REQUEST_BYTES as u64 + 1;
        match reader.by_ref().take(limit).read_until(b'\n', &mut line) {
            Ok(0) => return,
            Ok(_) => {}
            Err(_) => return, // idle past the read timeout, or reset
        }
        if line.last() != Some(&b'\n') {
            let message = if line.len() > MAX_REQUEST_BYTES {
                format!("request line longer than {MAX_REQUEST_BYTES} bytes; closing")
            } else {
                "request line not terminated by a newline; closing".to_string()
            };
            let _ = writer.write_all(&Response::error(message).to_line());
            return;
        }
        let response = match Request::parse(&line[..line.len() - 1]) {
            Ok(request) => handle(&request, shared),
            Err(message) => Response::error(message),
        };
        if writer.write_all(&response.to_line()).is_err() {
            return;
        }
    }
}

/// Runs one request against the target.
fn handle(request: &Request, shared: &Shared) -> Response {
    let target = &*shared.target;
    let result = match request {
        Request::Status {} => target.status().map(|status| Response {
            status: Some(status),
            ..Response::ok()
        }),
        Request::Bookmark {
            consistency,
            label,
            freeze,
            wait_secs,
        } => bookmark(shared, (*consistency).into(), label, freeze, *wait_secs),
        Request::Quiesce {
            consistency,
            label,
            timeout_secs,
        } => {
            let timeout = Duration::from_secs(timeout_secs.unwrap_or(DEFAULT_QUIESCE_TIMEOUT_SECS));
            target
                .quiesce((*consistency).into(), label, timeout)
                .map(|b| Response {
                    bookmark: Some(b),
                    ..Response::ok()
                })
        }
        Request::Resume {} => target.resume().map(|()| Response::ok()),
    };
    result.unwrap_or_else(Response::error)
}

fn bookmark(
    shared: &Shared,
    consistency: Consistency,
    label: &str,
    freeze: &[PathBuf],
    wait_secs: Option<u64>,
) -> Result<Response, String> {
    let target = &*shared.target;
    let taken = if freeze.is_empty() {
        target.bookmark(consistency, label)?
    } else {
        let _one_at_a_time = shared.freeze_lock.lock().unwrap_or_else(|p| p.into_inner());
        crate::freeze::with_frozen(freeze, crate::freeze::FSFREEZE_TIMEOUT, || {
            target.bookmark(Consistency::App, label)
        })
        .map_err(|e| e.to_string())??
    };
    if let Some(secs) = wait_secs {
        target
            .wait_acked(taken.seq, Duration::from_secs(secs))
            .map_err(|e| {
                format!(
                    "bookmark {} (seq {}) was taken, but: {e}",
                    taken.bookmark_id, taken.seq
                )
            })?;
    }
    Ok(Response {
        bookmark: Some(taken),
        ..Response::ok()
    })
}
