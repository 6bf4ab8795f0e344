//! The one source VM model of disk-sim, with its oracle and verifier.
//!
//! Rooms (each file does one job):
//! - [`digest`]: the digest definitions (chunk digest, whole-disk digest);
//! - [`error`]: what goes wrong, named;
//! - [`vm`]: a source VM's disks as real files on a site directory;
//! - [`oracle`]: the exact content of every disk at every bookmark (chunk log + digests);
//! - [`verify`]: a materialized file against the oracle (byte for byte) or a digest;
//! - [`model`]: [`SourceModel`], the VM + oracle + seeded workload + agent that `demo`,
//!   `chaos` and `run` drive;
//! - [`points`]: an item's recovery points checked through the control API against the
//!   model's digests.
//!
//! Imports go one way: `digest` ← `error` ← `vm` ← `oracle` ← `verify` ← `model` ← `points`.

pub mod digest;
pub mod error;
pub mod model;
pub mod oracle;
pub mod points;
pub mod verify;
pub mod vm;

pub use digest::{
    DEFAULT_CHUNK_BYTES, DiskDigest, chunk_digest, file_digest, image_digest, whole_digest,
};
pub use error::{DiskFormat, Mismatch, OracleError, VmError};
pub use model::{Content, SourceError, SourceModel};
pub use oracle::{BookmarkRecord, LOG_FILE_NAME, Oracle, OracleOptions, OracleStats};
pub use points::{PointCheck, PointMismatch, verify_failover_latest, verify_points};
pub use verify::{VHD_COOKIE, VHD_FOOTER_BYTES, compare_file, compare_files};
pub use vm::SourceVm;
