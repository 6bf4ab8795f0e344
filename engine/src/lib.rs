//! The data-path engine of the DR appliance.
//!
//! It turns a delta stream from a source agent into replica disks with recoverable points in
//! time. Modules, in the order a write travels through them:
//!
//! - [`delta`]: the versioned, checksummed wire and file format of the stream (encoder and
//!   decoder). Specified in `docs/design/delta-stream.md`.
//! - [`port`]: the data port's wire codec (hello, reply, records); see `data-port.md`.
//! - [`ingest`]: one stream from a source agent into the staging log, acknowledged by group
//!   commit.
//! - [`durable`]: small synchronous durable files (real directory, or a crash-model sim).
//! - [`staging`]: the durable, bounded, per-item log of received frames (group commit,
//!   recovery by scan, back-pressure, resync required).
//! - [`io`]: the replica-disk I/O seam: buffer pool, engine trait, uring/sync/sim backends.
//! - [`apply`]: staged frames to replicas, with copy-on-first-write recovery points, and the
//!   per-item apply worker thread that staging's commits wake.
//! - [`meta`]: the redb store: point catalogue, watermark, preserved-block index, replicas.
//! - [`replica`]: replica disks opened only after size and identity checks.
//! - [`materialize`]: the disks at a recovery point as new raw images.
//! - [`export`]: a recovery point as an exported disk: point views read in place, a drill's
//!   overlay, the copy to a failover target (no NBD here).
//! - [`dirfd`]: files created through a directory handle, never through a symbolic link,
//!   never over a name they did not create (materialize's outputs).
//! - [`resync`]: delta resync by per-chunk hash comparison (hash lists, their wire encoding,
//!   diff, local resync).
//! - [`vhd`]: fixed VHD (Hyper-V / Azure) footer codec, writer, in-place conversion, the
//!   temporary 1 GiB OS disk.
//!
//! - [`clock`]: the workspace's one wall clock (ns since the Unix epoch).
//! - [`error`]: the engine's one error type (a kind, a context, a source).
//!
//! The engine depends on no other crate of the workspace; `appliance`, `disk-sim` and `perf`
//! are built on it. See `ARCHITECTURE.md` for the whole picture and
//! `docs/design/recovery-points.md` for the apply and recovery-point design.

pub mod apply;
pub mod clock;
pub mod delta;
pub mod dirfd;
pub mod durable;
pub mod error;
pub mod export;
pub mod handoff;
pub mod ingest;
pub mod io;
pub mod materialize;
pub mod meta;
pub mod port;
pub mod replica;
pub mod resync;
pub mod staging;
pub mod vhd;
