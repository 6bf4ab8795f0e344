//! What goes wrong in a capture, named.

use std::path::PathBuf;

use crate::changemap::ChangeMapError;
use crate::sender::AgentError;

/// What went wrong, named.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaptureError {
    /// A setting outside its range.
    #[error("capture config: {0}")]
    Config(String),
    /// A disk could not be opened, read, written or synced.
    #[error("disk {path}: {what}: {source}")]
    Disk {
        /// The disk's path.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The cause.
        source: std::io::Error,
    },
    /// A change map could not be opened or kept.
    #[error(transparent)]
    ChangeMap(#[from] ChangeMapError),
    /// The sender refused (its backlog is full, or it stopped with an error).
    #[error("sender: {0}")]
    Sender(#[from] AgentError),
    /// A bookmark was asked for while the change map holds data the stream does not have
    /// yet: the replica would not match any instant of the disks.
    #[error(
        "the disks are catching up ({unsent_bytes} bytes not yet streamed): a bookmark now \
         would not match any instant of the disks; retry when `unsent_bytes` is 0"
    )]
    CatchingUp {
        /// Bytes the change maps still hold.
        unsent_bytes: u64,
    },
    /// No sender is connected to the appliance.
    #[error("not connected to the appliance ({link})")]
    NotConnected {
        /// The link's state.
        link: String,
    },
    /// The disks are quiesced: writes and new bookmarks are refused until `resume`.
    #[error("the disks are quiesced (resume first)")]
    Quiesced,
    /// The link was re-established after the bookmark went out and before the appliance
    /// acknowledged it: the frame is lost with the old connection's backlog.
    #[error("the link restarted before bookmark seq {seq} was acknowledged: take it again")]
    BookmarkLost {
        /// The bookmark's seq.
        seq: u64,
    },
    /// A wait ran out.
    #[error("timed out after {waited_ms} ms waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        waited_ms: u64,
    },
    /// The capture is stopping.
    #[error("the capture is shutting down")]
    Stopping,
}
