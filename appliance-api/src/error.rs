//! What a call of the control API can end in besides its answer: a URL that is not usable,
//! an API that cannot be reached, an error answer (its code and message), an answer not in
//! the model's shape, or a wait that ran out of time.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

/// A failed call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API's base URL is not usable (empty, https, another scheme).
    #[error("{0}")]
    BadUrl(String),
    /// The API could not be reached, or did not answer in time.
    #[error("{method} {url}: {kind}: {detail}")]
    Transport {
        /// `GET`, `POST`, `DELETE`.
        method: &'static str,
        /// The API's base URL (`http://host:port`).
        base: String,
        /// The whole URL.
        url: String,
        /// What kind of failure.
        kind: TransportKind,
        /// The transport's own words.
        detail: String,
    },
    /// The API answered with an error status.
    #[error("{0}")]
    Api(Box<ApiRefusal>),
    /// A 2xx answer that is not the model's shape.
    #[error(
        "{method} {path}: the API answered HTTP {status} with a body that is not the \
         expected {expected} ({reason}): {excerpt}"
    )]
    Decode {
        /// `GET`, `POST`, `DELETE`.
        method: &'static str,
        /// The path asked for.
        path: String,
        /// The status it answered with.
        status: u16,
        /// The type expected.
        expected: String,
        /// What serde said.
        reason: String,
        /// The start of the body.
        excerpt: String,
    },
    /// [`crate::poll_until`] gave up.
    #[error("{what} after {waited:?}")]
    TimedOut {
        /// What was awaited, and the last thing seen.
        what: String,
        /// How long it waited.
        waited: Duration,
    },
}

impl Error {
    /// The API's refusal, when it answered with an error status.
    pub fn refusal(&self) -> Option<&ApiRefusal> {
        match self {
            Self::Api(refusal) => Some(refusal),
            _ => None,
        }
    }

    /// The API's error code (`wrong_state`, `item_not_found`, …), when it answered with one.
    pub fn code(&self) -> Option<&str> {
        self.refusal().map(|r| r.code.as_str())
    }

    /// The HTTP status, when the API answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Api(refusal) => Some(refusal.status),
            Self::Decode { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Why the API could not be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    /// Nothing listens there.
    Refused,
    /// It did not answer in time.
    Timeout,
    /// The host name does not resolve.
    HostNotFound,
    /// The connection failed otherwise (reset, unreadable answer).
    Connection,
    /// Anything else the HTTP library reports.
    Other,
}

impl std::fmt::Display for TransportKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Refused => "connection refused",
            Self::Timeout => "no answer in time",
            Self::HostNotFound => "host not found",
            Self::Connection => "connection failed",
            Self::Other => "request failed",
        })
    }
}

/// An error answer of the API: `{"error": {"code", "message", …}}`, read leniently so that
/// an odd answer (a proxy's page, an older server) still gives a useful line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiRefusal {
    /// The HTTP status.
    pub status: u16,
    /// The stable error code (empty when the answer had none).
    pub code: String,
    /// The message for people (the status's reason when the answer had none).
    pub message: String,
    /// The item's state (`wrong_state`).
    pub state: Option<String>,
    /// What the item allows now (`wrong_state`).
    pub allowed_operations: Option<Vec<String>>,
    /// Slots needed (`not_enough_slots`).
    pub needed: Option<String>,
    /// Slots free (`not_enough_slots`).
    pub free: Option<String>,
    /// The request field at fault.
    pub field: Option<String>,
    /// Whether the body had the API's error shape; if not, `message` is an excerpt of it.
    pub shaped: bool,
}

/// The error shape with every field optional and of any JSON type.
#[derive(Debug, Deserialize)]
struct LooseBody {
    error: LooseDetail,
}

#[derive(Debug, Deserialize)]
struct LooseDetail {
    #[serde(default)]
    code: Value,
    #[serde(default)]
    message: Value,
    #[serde(default)]
    state: Value,
    #[serde(default)]
    allowed_operations: Value,
    #[serde(default)]
    needed: Value,
    #[serde(default)]
    free: Value,
    #[serde(default)]
    field: Value,
}

/// A JSON scalar for people: strings bare, other JSON compact; `None` for null or absent.
fn scalar(value: Value) -> Option<String> {
    match value {
        Value::Null => None,
        Value::String(s) => Some(s),
        other => Some(other.to_string()),
    }
}

impl ApiRefusal {
    /// Reads an error answer.
    pub fn parse(status: u16, body: &str) -> Self {
        let mut refusal = Self {
            status,
            code: String::new(),
            message: String::new(),
            state: None,
            allowed_operations: None,
            needed: None,
            free: None,
            field: None,
            shaped: false,
        };
        let Ok(LooseBody { error }) = serde_json::from_str::<LooseBody>(body) else {
            refusal.message = excerpt(body);
            return refusal;
        };
        refusal.shaped = true;
        refusal.code = match error.code {
            Value::String(code) => code,
            _ => String::new(),
        };
        refusal.message = match error.message {
            Value::String(message) if !message.trim().is_empty() => message.trim().to_owned(),
            _ => status_reason(status).to_owned(),
        };
        refusal.state = scalar(error.state);
        refusal.allowed_operations = match error.allowed_operations {
            Value::Null => None,
            Value::Array(items) => Some(
                items
                    .into_iter()
                    .map(|v| scalar(v).unwrap_or_else(|| "-".into()))
                    .collect(),
            ),
            _ => Some(Vec::new()),
        };
        refusal.needed = scalar(error.needed);
        refusal.free = scalar(error.free);
        refusal.field = scalar(error.field);
        refusal
    }
}

impl std::fmt::Display for ApiRefusal {
    /// `<message> (HTTP <status> <code>)`, then the details the error carries, one per line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let status = self.status;
        if !self.shaped {
            return if self.message.is_empty() {
                write!(
                    f,
                    "the API answered HTTP {status} ({})",
                    status_reason(status)
                )
            } else {
                write!(f, "{} (HTTP {status})", self.message)
            };
        }
        let mut out = if self.code.is_empty() {
            format!("{} (HTTP {status})", self.message)
        } else {
            format!("{} (HTTP {status} {})", self.message, self.code)
        };
        if let Some(state) = &self.state {
            let _ = write!(out, "\n  state: {state}");
        }
        if let Some(allowed) = &self.allowed_operations {
            let list = if allowed.is_empty() {
                "none".to_owned()
            } else {
                allowed.join(", ")
            };
            let _ = write!(out, "\n  allowed operations: {list}");
        }
        for (label, value) in [
            ("slots needed", &self.needed),
            ("slots free", &self.free),
            ("field", &self.field),
        ] {
            if let Some(value) = value {
                let _ = write!(out, "\n  {label}: {value}");
            }
        }
        f.write_str(&out)
    }
}

/// The first 300 characters of `text`, on one line.
pub fn excerpt(text: &str) -> String {
    let flat: String = text.trim().replace(['\n', '\r'], " ");
    match flat.char_indices().nth(300) {
        Some((cut, _)) => format!("{}…", &flat[..cut]),
        None => flat,
    }
}

/// The reason phrase of the statuses the API uses.
pub fn status_reason(status: u16) -> &'static str {
    match status {
        400 => "bad request",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not found",
        405 => "method not allowed",
        409 => "conflict",
        413 => "payload too large",
        500 => "internal server error",
        502 => "bad gateway",
        503 => "service unavailable",
        _ => "unexpected status",
    }
}
