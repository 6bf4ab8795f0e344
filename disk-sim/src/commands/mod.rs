//! One module per `disk-sim` subcommand; `main.rs` parses the flags and calls `run`.
//!
//! - [`demo`]: the product's main job end to end: two appliances, one VM, the whole cycle.
//! - [`chaos`]: a real appliance, SIGKILLs and network faults at seeded moments, then every
//!   retained recovery point verified through the API.
//! - [`run`]: `disk-sim run`, a scenario against an appliance already running.
//! - [`stream`]: a workload written out as a delta stream.
//! - [`adversary`]: hostile traffic written from the docs mixed with real replication, then
//!   every bookmark verified.

pub mod adversary;
pub mod chaos;
pub mod demo;
pub mod run;
pub mod stream;

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

/// A size for people, in IEC units (`1.5 MiB`).
pub(crate) fn human_bytes(bytes: u64) -> String {
    bytesize::ByteSize(bytes).display().iec().to_string()
}

/// A duration for people, to the 10 ms (`1s 230ms`).
pub(crate) fn human_duration(duration: Duration) -> String {
    let ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
    humantime::format_duration(Duration::from_millis(ms / 10 * 10)).to_string()
}

/// The file paths in an API answer's list of strings (empty when it is not one).
pub(crate) fn paths(value: &Value) -> Vec<PathBuf> {
    value
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(PathBuf::from)
                .collect()
        })
        .unwrap_or_default()
}
