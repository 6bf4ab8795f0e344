//! The data-path engine of the DR appliance.
//!
//! It turns a delta stream from a source agent into replica disks with recoverable points in
//! time. Modules:
//!
//! - [`delta`]: the versioned, checksummed wire and file format of the stream (encoder and
//!   decoder). Specified in `docs/design/delta-stream.md`.
//!
//! The engine depends on no other crate of the workspace; `appliance`, `disk-sim` and `perf`
//! are built on it. See `ARCHITECTURE.md` for the whole picture.

pub mod delta;
