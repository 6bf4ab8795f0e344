//! disk-sim: the world the appliance lives in during tests, demos and stress runs.
//!
//! Modules:
//! - [`rng`]: seeded randomness; every run prints its seed and replays from it.
//! - [`workload`]: seeded write/trim/bookmark generators over an item's disks.
//!   Also the workload clock and the [`workload::Pacer`] that holds a target churn.
//! - [`vm`]: a source VM's disks as real files on a site directory.
//! - [`oracle`]: the exact truth: chunk digests of every disk at every bookmark, a chunk log
//!   to rebuild any disk at any bookmark, and checks of materialized disks against them.
//! - [`agent`]: the source agent's sender: bounded backlog, data-port handshake, resend
//!   from the last acknowledgement, fault hooks.
//! - [`stream`]: a workload written out as a delta stream (the `disk-sim stream` command).
//! - [`resync`]: the agent's delta resync over the data port (hash lists, diff, resync-block
//!   frames in a RESYNC session, closing bookmark).
//! - [`demo`]: the product's main job end to end: two appliances, one VM, the whole cycle.
//! - [`netfault`]: a fault-injecting TCP proxy between an agent and a data port (drops,
//!   delays, flipped bytes, duplicated and swapped frames; switchable at run time, seeded).
//! - [`chaos`]: the chaos run: a real appliance, SIGKILLs and network faults at seeded
//!   moments, then every retained recovery point verified through the API.
//! - [`scenario`]: `disk-sim run`, a scenario against an appliance already running.
//! - [`adversary`]: `disk-sim adversary`, hostile traffic written from the docs (broken
//!   payloads, every hello variant, idle/slow/flooding connections) mixed with real replication,
//!   then every bookmark verified.
//! - [`site`]: a site directory and a real `appliance serve` process driven through its
//!   control API.

pub mod adversary;
pub mod agent;
pub mod chaos;
pub mod demo;
pub mod netfault;
pub mod oracle;
pub mod resync;
pub mod rng;
pub mod scenario;
pub mod site;
pub mod stream;
pub mod vm;
pub mod workload;
