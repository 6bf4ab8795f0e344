//! The control socket's messages: one JSON object per line each way.
//!
//! Requests name their operation in `op`; unknown operations and unknown fields are refused
//! by name. Every response has `ok`; a refusal carries `error` (a sentence naming what was
//! wrong), a success the operation's result (`status`, `bookmark`).

use std::path::PathBuf;

use engine::delta::{Consistency, MAX_LABEL_BYTES};
use serde::{Deserialize, Serialize};

/// Longest request line, newline included; a longer one is refused and the connection closed.
pub const MAX_REQUEST_BYTES: usize = 4096;
/// Longest `wait_secs` / `timeout_secs` accepted.
pub const MAX_WAIT_SECS: u64 = 3600;
/// `quiesce`'s timeout when the request names none.
pub const DEFAULT_QUIESCE_TIMEOUT_SECS: u64 = 60;

/// Crash- or app-consistent, as the protocol spells it (`"crash"`, `"app"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConsistencyName {
    /// All disks at one instant, as after a power cut.
    #[default]
    Crash,
    /// Applications flushed and quiesced (e.g. fsfreeze) before the instant.
    App,
}

impl From<ConsistencyName> for Consistency {
    fn from(c: ConsistencyName) -> Self {
        match c {
            ConsistencyName::Crash => Consistency::Crash,
            ConsistencyName::App => Consistency::App,
        }
    }
}

/// One request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    /// The capture's status (`CaptureStatus` JSON in `status`). (Braced so that unknown
    /// fields are refused: serde ignores them on unit variants.)
    Status {},
    /// Put a bookmark into the stream.
    Bookmark {
        /// Default crash; `freeze` implies app.
        #[serde(default)]
        consistency: ConsistencyName,
        /// Free text (at most 256 bytes of UTF-8), stored with the recovery point.
        #[serde(default)]
        label: String,
        /// Mountpoints to `fsfreeze -f` (in order) around the bookmark, thawed in reverse.
        #[serde(default)]
        freeze: Vec<PathBuf>,
        /// Wait up to this many seconds for the appliance to acknowledge the bookmark.
        #[serde(default)]
        wait_secs: Option<u64>,
    },
    /// Planned failover: refuse new writes, drain, take a final bookmark, wait for its ack.
    Quiesce {
        /// Consistency of the final bookmark (default crash).
        #[serde(default)]
        consistency: ConsistencyName,
        /// Label of the final bookmark.
        #[serde(default)]
        label: String,
        /// How long to drain and wait for the ack (default 60).
        #[serde(default)]
        timeout_secs: Option<u64>,
    },
    /// Accept writes again after `quiesce`.
    Resume {},
}

impl Request {
    /// Parses one request line (without its newline) and checks its values.
    pub fn parse(line: &[u8]) -> Result<Request, String> {
        let value: serde_json::Value =
            serde_json::from_slice(line).map_err(|e| format!("bad request: {e}"))?;
        // Name the field whose value has the wrong type (serde's message for an internally
        // tagged enum does not).
        if let Some(fields) = value.as_object() {
            for (key, v) in fields {
                let fits = match key.as_str() {
                    "op" | "label" => v.is_string(),
                    "consistency" => matches!(v.as_str(), Some("crash" | "app")),
                    "freeze" => v
                        .as_array()
                        .is_some_and(|a| a.iter().all(serde_json::Value::is_string)),
                    "wait_secs" | "timeout_secs" => v.is_null() || v.is_u64(),
                    _ => true,
                };
                if !fits {
                    return Err(format!(
                        "bad request: field `{key}`: {v} is not {}",
                        match key.as_str() {
                            "consistency" => "\"crash\" or \"app\"",
                            "freeze" => "a list of mountpoint paths",
                            "wait_secs" | "timeout_secs" => "a whole number of seconds",
                            _ => "a string",
                        }
                    ));
                }
            }
        }
        let request: Request =
            serde_json::from_value(value).map_err(|e| format!("bad request: {e}"))?;
        request.check()?;
        Ok(request)
    }

    /// Checks label length and waits against the limits.
    pub fn check(&self) -> Result<(), String> {
        let (label, secs, key) = match self {
            Request::Status {} | Request::Resume {} => return Ok(()),
            Request::Bookmark {
                label, wait_secs, ..
            } => (label, *wait_secs, "wait_secs"),
            Request::Quiesce {
                label,
                timeout_secs,
                ..
            } => (label, *timeout_secs, "timeout_secs"),
        };
        if label.len() > MAX_LABEL_BYTES {
            return Err(format!(
                "label: {} bytes; at most {MAX_LABEL_BYTES}",
                label.len()
            ));
        }
        if let Some(s) = secs
            && s > MAX_WAIT_SECS
        {
            return Err(format!("{key}: {s} is more than {MAX_WAIT_SECS}"));
        }
        Ok(())
    }

    /// How long the server may take to answer this request (the client's read timeout is
    /// this plus a margin).
    pub fn answer_within_secs(&self) -> u64 {
        match self {
            Request::Status {} | Request::Resume {} => 0,
            Request::Bookmark {
                freeze, wait_secs, ..
            } => {
                let fsfreeze = crate::freeze::FSFREEZE_TIMEOUT.as_secs();
                wait_secs.unwrap_or(0) + 2 * fsfreeze * freeze.len() as u64
            }
            Request::Quiesce { timeout_secs, .. } => {
                timeout_secs.unwrap_or(DEFAULT_QUIESCE_TIMEOUT_SECS)
            }
        }
    }
}

/// A bookmark put into the stream (the same fields as `capture::Bookmarked`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BookmarkReply {
    /// The source timestamp in ns since the Unix epoch; the appliance's point for this
    /// bookmark has the same `bookmark_id`.
    pub bookmark_id: u64,
    /// The bookmark frame's sequence number in the stream.
    pub seq: u64,
    /// "crash" or "app".
    pub consistency: String,
}

/// One response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// True on success.
    pub ok: bool,
    /// On refusal: what was wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `status`: the capture's status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
    /// `bookmark` and `quiesce`: the bookmark taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bookmark: Option<BookmarkReply>,
}

impl Response {
    /// Success without a result (`resume`).
    pub fn ok() -> Response {
        Response {
            ok: true,
            error: None,
            status: None,
            bookmark: None,
        }
    }

    /// A refusal.
    pub fn error(message: impl Into<String>) -> Response {
        Response {
            ok: false,
            error: Some(message.into()),
            ..Response::ok()
        }
    }

    /// One line of JSON with its newline.
    pub fn to_line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).unwrap_or_else(|_| {
            br#"{"ok":false,"error":"the response could not be encoded"}"#.to_vec()
        });
        line.push(b'\n');
        line
    }
}
