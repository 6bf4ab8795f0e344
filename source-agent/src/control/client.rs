//! The client half of the control socket, used by the CLI's `status`, `bookmark`, `quiesce`
//! and `resume`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::protocol::{Request, Response};

/// Longest response line read (a status of 64 disks is a few tens of KiB).
pub const MAX_RESPONSE_BYTES: u64 = 1 << 20;
/// Added to a request's own wait for the client's read timeout.
pub const ANSWER_MARGIN: Duration = Duration::from_secs(30);

/// Why a control request did not succeed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The socket could not be reached (no agent running, or no permission).
    #[error(
        "cannot reach the agent's control socket {path}: {source} (is `source-agent run` running with this configuration?)"
    )]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Sending the request or reading the answer failed.
    #[error("control socket {path}: {op}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// The answer was not a response line.
    #[error("control socket {path}: bad answer: {message}")]
    BadAnswer {
        /// The socket path.
        path: PathBuf,
        /// What was wrong with it.
        message: String,
    },
    /// The agent refused the request.
    #[error("{0}")]
    Refused(String),
}

/// Sends `request` to the agent at `socket` and returns its successful response.
pub fn call(socket: &Path, request: &Request) -> Result<Response, ClientError> {
    let io = |op, source| ClientError::Io {
        path: socket.to_path_buf(),
        op,
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: socket.to_path_buf(),
        source,
    })?;
    let wait = Duration::from_secs(request.answer_within_secs()) + ANSWER_MARGIN;
    stream
        .set_read_timeout(Some(wait))
        .map_err(|e| io("set read timeout", e))?;
    stream
        .set_write_timeout(Some(super::WRITE_TIMEOUT))
        .map_err(|e| io("set write timeout", e))?;
    let mut line = serde_json::to_vec(request).map_err(|e| ClientError::BadAnswer {
        path: socket.to_path_buf(),
        message: format!("encoding the request: {e}"),
    })?;
    line.push(b'\n');
    stream.write_all(&line).map_err(|e| io("send", e))?;
    let mut answer = Vec::new();
    BufReader::new(stream)
        .take(MAX_RESPONSE_BYTES)
        .read_until(b'\n', &mut answer)
        .map_err(|e| io("read the answer", e))?;
    if answer.last() != Some(&b'\n') {
        return Err(ClientError::BadAnswer {
            path: socket.to_path_buf(),
            message: format!("no complete line ({} bytes)", answer.len()),
        });
    }
    let response: Response =
        serde_json::from_slice(&answer).map_err(|e| ClientError::BadAnswer {
            path: socket.to_path_buf(),
            message: e.to_string(),
        })?;
    if response.ok {
        Ok(response)
    } else {
        Err(ClientError::Refused(
            response
                .error
                .unwrap_or_else(|| "refused without a reason".into()),
        ))
    }
}
