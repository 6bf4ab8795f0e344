//! disk-sim: the world the appliance lives in during tests, demos and stress runs.
//!
//! Rooms:
//! - [`rng`]: seeded randomness (Xoshiro256++); every run prints its seed and replays from it.
//! - [`workload`]: seeded write/trim/bookmark generators over an item's disks, the workload
//!   clock and the [`workload::Pacer`] that holds a target churn.
//! - [`source`]: the one source VM model: disks as files, the oracle of every bookmark, the
//!   verifier of what the appliance hands back, and [`source::SourceModel`] that ties them to
//!   a workload and an agent.
//! - The source agent's sender and delta resync are the `source-agent` crate's
//!   (`source_agent::sender`, `source_agent::resync`); the simulations use them as a library.
//! - [`netfault`]: a fault-injecting TCP proxy between an agent and a data port (drops,
//!   delays, flipped bytes, duplicated and swapped frames; switchable at run time, seeded).
//! - [`site`]: a site directory and a real `appliance serve` process driven through its
//!   control API.
//! - [`agent_disk`]: the `source-agent` binary as a process, and its NBD disks as kernel
//!   block devices (nbdfuse + loop), for real filesystems (the demo, perf).
//! - [`commands`]: one module per `disk-sim` subcommand: [`demo`], [`chaos`], [`scenario`]
//!   (`disk-sim run`), [`stream`], [`adversary`] (re-exported at the crate root).

pub mod agent_disk;
pub mod commands;
pub mod netfault;
pub mod rng;
pub mod site;
pub mod source;
pub mod workload;

pub use commands::{adversary, chaos, demo, run as scenario, stream};
