//! Prometheus metrics of the appliance: what one `GET /metrics` scrape shows
//! ([`MetricsSnapshot`], plain data gathered by the item manager), the apply-latency histogram
//! the apply workers update, and the exposition of a snapshot through `prometheus-client`.
//!
//! Rooms:
//!
//! - `metrics/histogram.rs` — [`LatencyHistogram`]: a fixed-bucket histogram an apply worker
//!   updates on its hot path, shared through an `Arc` with whoever takes snapshots. Buckets
//!   (upper bounds, in seconds, inclusive): 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
//!   0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10 and +Inf ([`LATENCY_BUCKETS_SECONDS`]).
//!   It is ours, not `prometheus-client`'s `Histogram`, because that one takes a lock per
//!   observation and the apply path takes no lock per frame.
//! - `metrics/exposition.rs` — [`render`]: a snapshot as Prometheus text format 0.0.4
//!   ([`CONTENT_TYPE`]), encoded by `prometheus-client` (a registry with one collector), every
//!   family named `appliance_…` with its unit, each with one `# HELP` and one `# TYPE` line,
//!   its samples contiguous. `promtool check metrics` accepts it (`tests/promtool.rs`).
//!
//! Invariants:
//!
//! - **Observe is wait-free.** [`LatencyHistogram::observe_ns`] is a binary search over a
//!   16-entry constant array and two relaxed atomic adds (the bucket and the sum): no lock, no
//!   allocation, no retry loop, whatever other threads do. (On targets without a native
//!   atomic add, such as ARMv8.0 without LSE, the add is an LL/SC loop: lock-free, not
//!   wait-free.)
//! - **A snapshot is self-consistent where the format needs it.** The count is *derived* from
//!   the buckets, so `_count` always equals the `+Inf` bucket and the cumulative buckets never
//!   decrease. Each field is exact but the fields are not read at one instant: under concurrent
//!   observations `_sum` may include an observation that the buckets do not yet show, or the
//!   reverse.
//! - **Render is a pure function of the snapshot**: no clock, no global state, the same
//!   snapshot gives the same bytes. Families come in a fixed order; items in the snapshot's
//!   order; jobs sorted by (kind, state).
//! - **The output is always well-formed**: label values are escaped (`\\`, `\"`, `\n`), floats
//!   are printed so Prometheus parses them (`+Inf`, `-Inf`; a NaN is never printed, its sample
//!   is left out), a repeated item id is rendered once (the first), repeated (kind, state) job
//!   rows are summed, and the text ends with a line feed.

mod exposition;
mod histogram;
#[cfg(test)]
mod tests;

pub use exposition::{CONTENT_TYPE, render};
pub use histogram::{
    HistogramSnapshot, LATENCY_BUCKET_COUNT, LATENCY_BUCKETS_SECONDS, LatencyHistogram,
};

/// One protected item's numbers, gathered by the caller for one scrape.
#[derive(Debug, Clone, PartialEq)]
pub struct ItemMetrics {
    /// Item id, 32 hex digits (the `item` label).
    pub id: String,
    /// Item name (the `name` label; any text, escaped on output).
    pub name: String,
    /// Lifecycle state, e.g. `protected` (the `state` label of `appliance_item_state`).
    pub state: String,
    /// Seconds between now and the newest recovery point; `None` (or NaN) leaves the sample
    /// out.
    pub rpo_lag_seconds: Option<f64>,
    pub cache_used_bytes: u64,
    pub cache_capacity_bytes: u64,
    pub applied_bytes_total: u64,
    pub applied_frames_total: u64,
    pub applied_seq: u64,
    pub staged_seq: u64,
    pub synchronized_percent: u8,
    /// Number of recovery points kept.
    pub points: u64,
    /// Sequence number of the staged frame apply cannot apply (health `apply_failed`).
    pub apply_failed_seq: Option<u64>,
    pub apply_latency: HistogramSnapshot,
}

/// Everything one `GET /metrics` shows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MetricsSnapshot {
    /// Items, rendered in this order; an id should appear once (a repeat is skipped).
    pub items: Vec<ItemMetrics>,
    pub slots_total: u32,
    pub slots_free: u32,
    pub slots_attached: u32,
    pub slots_reserved: u32,
    /// `(kind, state, count)`; repeated `(kind, state)` rows are summed.
    pub jobs_by_state: Vec<(String, String, u64)>,
    pub data_port_sessions_total: u64,
    pub data_port_connections: u64,
    /// Live exports by purpose (`export`, `test_failover`, `failover`).
    pub exports_by_purpose: Vec<(String, u64)>,
    /// NBD sessions open on exports now.
    pub nbd_connections: u64,
}
