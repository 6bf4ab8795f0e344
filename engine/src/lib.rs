//! The data-path engine of the DR appliance.
//!
//! It turns a delta stream from a source agent into replica disks with recoverable points in
//! time. Modules:
//!
//! - [`delta`]: the versioned, checksummed wire and file format of the stream (encoder and
//!   decoder). Specified in `docs/design/delta-stream.md`.
//! - [`durable`]: small synchronous durable files (real directory, or a crash-model sim).
//! - [`staging`]: the durable, bounded, per-item log of received frames (group commit,
//!   recovery by scan, back-pressure, resync required).
//! - [`io`]: the replica-disk I/O seam: buffer pool, engine trait, uring/sync/sim backends.
//!
//! The engine depends on no other crate of the workspace; `appliance`, `disk-sim` and `perf`
//! are built on it. See `ARCHITECTURE.md` for the whole picture.

pub mod delta;
pub mod durable;
pub mod staging;
