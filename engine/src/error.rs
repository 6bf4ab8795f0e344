//! The engine's one error type: what kind of failure, what was being done, and its cause.
//!
//! Modelled on cloud-hypervisor's `block/src/error.rs`: an [`Error`] carries an [`ErrorKind`]
//! (what a caller branches on), a context (what the engine was doing, naming the file, disk,
//! offset or sequence number) and an optional source (the underlying error). Its `Display`
//! prints the context only; the cause is reached through [`std::error::Error::source`], so a
//! message never repeats its cause and a report ([`report`]) prints each link once:
//!
//! ```text
//! apply stopped: replica disk 0: write at byte 8192: Input/output error (os error 5)
//! └ context ──┘  └ source (ApplyError) ───────────┘  └ its source (io::Error) ─────┘
//! ```
//!
//! The module-specific error enums (`ApplyError`, `StagingError`, `MetaError`, …) remain
//! where callers match on their variants; they convert into [`Error`] with their kind.

use std::fmt;

/// What kind of failure an [`Error`] is: what a caller may branch on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A file, disk or socket operation failed (the source is the `io::Error`).
    Io,
    /// Stored or received bytes are damaged or malformed (a checksum, a header, a sequence).
    Corrupt,
    /// The metadata store failed.
    Meta,
    /// A staged frame can never be applied (its payload does not decode, or it is damaged in
    /// the staging log).
    Unappliable,
    /// A bad argument, configuration or request in the current state.
    Invalid,
    /// The component had already failed or stopped (a thread ended, a log failed).
    Stopped,
    /// Waiting for another thread took longer than allowed.
    TimedOut,
    /// A bounded store (the staging log) has no room; retry after it drains.
    Full,
    /// The item needs a delta resync before it takes more frames.
    ResyncRequired,
    /// An operation was cancelled on request.
    Cancelled,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Io => "I/O error",
            Self::Corrupt => "corrupt data",
            Self::Meta => "metadata store error",
            Self::Unappliable => "unappliable frame",
            Self::Invalid => "invalid request",
            Self::Stopped => "stopped",
            Self::TimedOut => "timed out",
            Self::Full => "full",
            Self::ResyncRequired => "resync required",
            Self::Cancelled => "cancelled",
        })
    }
}

/// The source of an [`Error`].
type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An engine error: a kind, a context and an optional source.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    context: String,
    source: Option<Source>,
}

/// A `Result` with the engine's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error of `kind` saying what was being done, without a source.
    pub fn new(kind: ErrorKind, context: impl Into<String>) -> Self {
        Self {
            kind,
            context: context.into(),
            source: None,
        }
    }

    /// The same error caused by `source`.
    pub fn with_source(mut self, source: impl Into<Source>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// An error of `kind` that is `source` itself: it prints as `source` and has its causes
    /// (for an error that already says what was being done).
    pub fn transparent(kind: ErrorKind, source: impl Into<Source>) -> Self {
        Self::new(kind, "").with_source(source)
    }

    /// An I/O error while doing `context`.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::new(ErrorKind::Io, context).with_source(source)
    }

    /// Its kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// What was being done.
    pub fn context(&self) -> &str {
        &self.context
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.source, self.context.is_empty()) {
            (Some(source), true) => source.fmt(f),
            (None, true) => write!(f, "{}", self.kind),
            (_, false) => f.write_str(&self.context),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        let source = self.source.as_deref()?;
        if self.context.is_empty() {
            // Transparent: the source printed itself; its cause comes next.
            return source.source();
        }
        Some(source as &(dyn std::error::Error + 'static))
    }
}

/// The module errors below convert into [`Error`] transparently (same text, same causes), with
/// the kind a caller branches on.
macro_rules! into_error {
    ($($error:ty => |$e:ident| $kind:expr;)*) => {$(
        impl From<$error> for Error {
            fn from($e: $error) -> Self {
                let kind = $kind;
                Error::transparent(kind, $e)
            }
        }
    )*};
}

into_error! {
    crate::staging::StagingError => |e| Error::kind_of_staging(&e);
    crate::meta::MetaError => |e| ErrorKind::Meta;
    crate::delta::DecodeError => |e| match &e.reason {
        crate::delta::DecodeErrorReason::Io(_) => ErrorKind::Io,
        _ => ErrorKind::Corrupt,
    };
    crate::ingest::IngestError => |e| {
        use crate::ingest::IngestError as I;
        match &e {
            I::Decode(decode) if matches!(decode.reason, crate::delta::DecodeErrorReason::Io(_)) => {
                ErrorKind::Io
            }
            I::Staging { source, .. } => Error::kind_of_staging(source),
            I::Decode(_) | I::Gap { .. } => ErrorKind::Corrupt,
            _ => ErrorKind::Invalid,
        }
    };
    crate::resync::ResyncError => |e| {
        use crate::resync::ResyncError as R;
        match &e {
            R::Io { .. } => ErrorKind::Io,
            R::Cancelled => ErrorKind::Cancelled,
            _ => ErrorKind::Invalid,
        }
    };
    crate::replica::ReplicaError => |e| {
        use crate::replica::ReplicaError as R;
        match &e {
            R::Open { .. } => ErrorKind::Io,
            _ => ErrorKind::Invalid,
        }
    };
    crate::vhd::VhdError => |e| {
        use crate::vhd::VhdError as V;
        match &e {
            V::Io { .. } => ErrorKind::Io,
            _ => ErrorKind::Invalid,
        }
    };
    crate::io::BufPoolError => |e| ErrorKind::Io;
}

impl Error {
    /// The kind of a staging error (also inside an ingest error).
    pub(crate) fn kind_of_staging(error: &crate::staging::StagingError) -> ErrorKind {
        use crate::staging::StagingError as S;
        match error {
            S::Io { .. } => ErrorKind::Io,
            S::Corrupt { .. } | S::WrongItem { .. } => ErrorKind::Corrupt,
            S::Full { .. } => ErrorKind::Full,
            S::ResyncRequired { .. } => ErrorKind::ResyncRequired,
            S::Failed => ErrorKind::Stopped,
            _ => ErrorKind::Invalid,
        }
    }
}

/// Adds a kind and a context to the error of a `Result`.
pub trait ResultExt<T> {
    /// On error: an [`Error`] of `kind` saying what was being done, caused by the error.
    fn context(self, kind: ErrorKind, context: impl Into<String>) -> Result<T>;
}

impl<T, E: Into<Source>> ResultExt<T> for std::result::Result<T, E> {
    fn context(self, kind: ErrorKind, context: impl Into<String>) -> Result<T> {
        self.map_err(|e| Error::new(kind, context).with_source(e))
    }
}

/// The whole chain of `error` on one line, `context: cause: cause`, each link once: a link
/// whose text the previous one already ends with (an error that prints its source itself) is
/// left out.
pub fn report(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = String::new();
    let mut next = Some(error);
    while let Some(link) = next {
        let text = link.to_string();
        if !out.ends_with(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
        next = link.source();
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

    use super::*;

    #[test]
    fn display_is_the_context_and_report_prints_each_cause_once() {
        let io = std::io::Error::other("disk gone");
        let error = Error::io("flushing seg-1.drs", io);
        assert_eq!(error.kind(), ErrorKind::Io);
        assert_eq!(error.to_string(), "flushing seg-1.drs");
        assert_eq!(report(&error), "flushing seg-1.drs: disk gone");
        let outer = Error::new(ErrorKind::Stopped, "apply stopped").with_source(error);
        assert_eq!(
            report(&outer),
            "apply stopped: flushing seg-1.drs: disk gone"
        );
        let bare = Error::new(ErrorKind::TimedOut, "");
        assert_eq!(bare.to_string(), "timed out");
        let transparent = Error::transparent(ErrorKind::Stopped, outer);
        assert_eq!(transparent.to_string(), "apply stopped");
        assert_eq!(
            report(&transparent),
            "apply stopped: flushing seg-1.drs: disk gone"
        );
    }

    #[test]
    fn report_skips_a_cause_its_parent_already_printed() {
        #[derive(Debug)]
        struct Repeats(std::io::Error);
        impl fmt::Display for Repeats {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "reading: {}", self.0)
            }
        }
        impl std::error::Error for Repeats {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let error =
            Error::new(ErrorKind::Io, "staging").with_source(Repeats(std::io::Error::other("EIO")));
        assert_eq!(report(&error), "staging: reading: EIO");
        let failed: Result<()> =
            Err(std::io::Error::other("x")).context(ErrorKind::Io, "opening y");
        assert_eq!(report(&failed.unwrap_err()), "opening y: x");
    }

    #[test]
    fn report_of_a_nested_engine_error_names_each_cause_once() {
        let staging = crate::staging::StagingError::Io {
            what: "flushing seg-1.drs".into(),
            source: std::io::Error::other("disk gone"),
        };
        let ingest = crate::ingest::IngestError::Staging {
            seq: 7,
            source: staging,
        };
        // Each link's own text states its context only.
        assert_eq!(ingest.to_string(), "frame seq 7");
        let error = Error::new(ErrorKind::Io, "receiving item ab").with_source(Error::from(ingest));
        assert_eq!(error.kind(), ErrorKind::Io);
        let text = report(&error);
        assert_eq!(
            text,
            "receiving item ab: frame seq 7: staging I/O on flushing seg-1.drs: disk gone"
        );
        for cause in [
            "receiving item ab",
            "frame seq 7",
            "staging I/O on flushing seg-1.drs",
            "disk gone",
        ] {
            assert_eq!(text.matches(cause).count(), 1, "{cause} in {text}");
        }
        // The same for an error the engine builds from an I/O error of a named file.
        let resync = crate::resync::ResyncError::Io {
            op: "read",
            path: "/images/disk0.img".into(),
            offset_bytes: 4096,
            source: std::io::Error::other("EIO"),
        };
        let error = Error::from(resync);
        assert_eq!(error.kind(), ErrorKind::Io);
        assert_eq!(report(&error), "read /images/disk0.img at offset 4096: EIO");
    }

    #[test]
    fn module_errors_convert_with_their_kind_and_keep_their_text() {
        let staging = crate::staging::StagingError::Failed;
        let text = staging.to_string();
        let error = Error::from(staging);
        assert_eq!(
            (error.kind(), error.to_string()),
            (ErrorKind::Stopped, text)
        );
        let apply = crate::apply::ApplyError::Invalid("x".into());
        let text = apply.to_string();
        let error = Error::from(apply);
        assert_eq!((error.kind(), report(&error)), (ErrorKind::Invalid, text));
        let resync = Error::from(crate::resync::ResyncError::Cancelled);
        assert_eq!(resync.kind(), ErrorKind::Cancelled);
    }
}
