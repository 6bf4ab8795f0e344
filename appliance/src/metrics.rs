//! Prometheus metrics of the appliance: the apply-latency histogram and the `GET /metrics`
//! exposition (text format 0.0.4, written by hand: no metrics crate).
//!
//! This module owns two things:
//!
//! - [`LatencyHistogram`]: a fixed-bucket histogram that an apply worker updates on its hot
//!   path, shared through an `Arc` with whoever takes snapshots. Buckets (upper bounds, in
//!   seconds, inclusive): 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
//!   0.1, 0.25, 0.5, 1, 2.5, 5, 10 and +Inf ([`LATENCY_BUCKETS_SECONDS`]).
//! - [`render`]: a [`MetricsSnapshot`] (plain data gathered by the caller) as exposition text,
//!   every family named `appliance_…` with its unit, each with one `# HELP` and one `# TYPE`
//!   line, its samples contiguous.
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

use std::collections::{BTreeMap, HashSet};
use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the finite latency buckets, in seconds (each inclusive: `le`).
pub const LATENCY_BUCKETS_SECONDS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Number of buckets including the final `+Inf` one.
pub const LATENCY_BUCKET_COUNT: usize = LATENCY_BUCKETS_SECONDS.len() + 1;

/// The same bounds in nanoseconds: the hot path compares integers only.
const BOUNDS_NS: [u64; 16] = [
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// The `le` label values, written once so the exposition does not depend on float formatting.
const LE_LABELS: [&str; LATENCY_BUCKET_COUNT] = [
    "0.0001", "0.00025", "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1",
    "0.25", "0.5", "1", "2.5", "5", "10", "+Inf",
];

/// A lock-free fixed-bucket latency histogram (see the module doc for the buckets).
///
/// Share it as `Arc<LatencyHistogram>`: the apply worker calls [`observe_ns`] and the metrics
/// endpoint calls [`snapshot`]; both take `&self`.
///
/// The sum is kept in nanoseconds in a `u64` and wraps after about 584 years of accumulated
/// latency.
///
/// [`observe_ns`]: LatencyHistogram::observe_ns
/// [`snapshot`]: LatencyHistogram::snapshot
#[derive(Debug)]
pub struct LatencyHistogram {
    /// Per-bucket (not cumulative) counts; the last is `+Inf`.
    buckets: [AtomicU64; LATENCY_BUCKET_COUNT],
    sum_ns: AtomicU64,
}

impl LatencyHistogram {
    /// An empty histogram (usable in a `static`).
    pub const fn new() -> Self {
        Self {
            buckets: [const { AtomicU64::new(0) }; LATENCY_BUCKET_COUNT],
            sum_ns: AtomicU64::new(0),
        }
    }

    /// Records one observation of `ns` nanoseconds. Wait-free: two relaxed atomic adds.
    #[inline]
    pub fn observe_ns(&self, ns: u64) {
        // The first bound >= ns: `le` is inclusive. 16 (past the end) is the +Inf bucket.
        let index = BOUNDS_NS.partition_point(|&bound| bound < ns);
        self.buckets[index].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Records one observation of `elapsed` (saturating at `u64::MAX` nanoseconds).
    #[inline]
    pub fn observe(&self, elapsed: Duration) {
        self.observe_ns(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX));
    }

    /// The current counts: cumulative buckets, sum in seconds, and the count (which is the
    /// `+Inf` bucket by construction).
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut cumulative = [0u64; LATENCY_BUCKET_COUNT];
        let mut running = 0u64;
        for (slot, bucket) in cumulative.iter_mut().zip(&self.buckets) {
            running = running.wrapping_add(bucket.load(Ordering::Relaxed));
            *slot = running;
        }
        let sum_ns = self.sum_ns.load(Ordering::Relaxed);
        HistogramSnapshot {
            cumulative,
            sum_seconds: sum_ns as f64 / 1e9,
            count: running,
        }
    }
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::new()
    }
}

/// A point-in-time copy of a [`LatencyHistogram`], in exposition terms.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HistogramSnapshot {
    /// Cumulative counts: `cumulative[i]` observations were `<= LATENCY_BUCKETS_SECONDS[i]`;
    /// the last entry is the `+Inf` bucket and equals `count`.
    pub cumulative: [u64; LATENCY_BUCKET_COUNT],
    /// Sum of all observations, in seconds.
    pub sum_seconds: f64,
    /// Number of observations.
    pub count: u64,
}

impl Default for HistogramSnapshot {
    fn default() -> Self {
        Self {
            cumulative: [0; LATENCY_BUCKET_COUNT],
            sum_seconds: 0.0,
            count: 0,
        }
    }
}

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
}

/// The `Content-Type` of [`render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A sample value.
#[derive(Clone, Copy)]
enum Value {
    Int(u64),
    Float(f64),
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Value::Int(v) => write!(f, "{v}"),
            Value::Float(v) if v == f64::INFINITY => f.write_str("+Inf"),
            Value::Float(v) if v == f64::NEG_INFINITY => f.write_str("-Inf"),
            // Rust's Display never uses an exponent and round-trips: Go's ParseFloat reads it.
            Value::Float(v) => write!(f, "{v}"),
        }
    }
}

type ItemValue = fn(&ItemMetrics) -> Option<Value>;

/// The per-item scalar families, in output order: (name, type, help, value).
const ITEM_FAMILIES: [(&str, &str, &str, ItemValue); 11] = [
    (
        "appliance_item_rpo_lag_seconds",
        "gauge",
        "Age of the item's newest recovery point, in seconds.",
        |i| match i.rpo_lag_seconds {
            Some(v) if !v.is_nan() => Some(Value::Float(v)),
            _ => None,
        },
    ),
    (
        "appliance_item_cache_used_bytes",
        "gauge",
        "Bytes of the item's staging log (cache) in use.",
        |i| Some(Value::Int(i.cache_used_bytes)),
    ),
    (
        "appliance_item_cache_capacity_bytes",
        "gauge",
        "Capacity of the item's staging log (cache), in bytes.",
        |i| Some(Value::Int(i.cache_capacity_bytes)),
    ),
    (
        "appliance_item_applied_bytes_total",
        "counter",
        "Bytes applied to the item's replica disks.",
        |i| Some(Value::Int(i.applied_bytes_total)),
    ),
    (
        "appliance_item_applied_frames_total",
        "counter",
        "Delta-stream frames applied to the item's replica disks.",
        |i| Some(Value::Int(i.applied_frames_total)),
    ),
    (
        "appliance_item_applied_seq",
        "gauge",
        "Sequence number of the last frame applied to the replicas.",
        |i| Some(Value::Int(i.applied_seq)),
    ),
    (
        "appliance_item_staged_seq",
        "gauge",
        "Sequence number of the last frame durably staged (acknowledged).",
        |i| Some(Value::Int(i.staged_seq)),
    ),
    (
        "appliance_item_synchronized_percent",
        "gauge",
        "Initial or resynchronization progress of the item, in percent.",
        |i| Some(Value::Int(u64::from(i.synchronized_percent))),
    ),
    (
        "appliance_item_recovery_points",
        "gauge",
        "Recovery points kept for the item.",
        |i| Some(Value::Int(i.points)),
    ),
    (
        "appliance_item_apply_failed",
        "gauge",
        "1 while a staged frame of the item cannot be applied (health apply_failed: the item \
         takes no frames until a resync or disable), else 0.",
        |i| Some(Value::Int(u64::from(i.apply_failed_seq.is_some()))),
    ),
    (
        "appliance_item_apply_failed_seq",
        "gauge",
        "Sequence number of the staged frame that cannot be applied (only while apply_failed).",
        |i| i.apply_failed_seq.map(Value::Int),
    ),
];

/// Renders `snapshot` in the Prometheus text exposition format 0.0.4 ([`CONTENT_TYPE`]).
///
/// A pure function of the snapshot: the same snapshot always gives the same text.
pub fn render(snapshot: &MetricsSnapshot) -> String {
    let mut out = String::with_capacity(2048 + snapshot.items.len() * 4096);

    // Each item once, with its label text (`item="…",name="…"`) built once.
    let mut seen = HashSet::new();
    let items: Vec<(&ItemMetrics, String)> = snapshot
        .items
        .iter()
        .filter(|item| seen.insert(item.id.as_str()))
        .map(|item| {
            let mut labels = String::new();
            push_label(&mut labels, "item", &item.id);
            labels.push(',');
            push_label(&mut labels, "name", &item.name);
            (item, labels)
        })
        .collect();

    header(
        &mut out,
        "appliance_item_state",
        "gauge",
        "Lifecycle state of the item: 1 for its current state.",
    );
    for (item, labels) in &items {
        let mut with_state = labels.clone();
        with_state.push(',');
        push_label(&mut with_state, "state", &item.state);
        sample(&mut out, "appliance_item_state", &with_state, Value::Int(1));
    }

    for (name, kind, help, value) in ITEM_FAMILIES {
        header(&mut out, name, kind, help);
        for (item, labels) in &items {
            if let Some(v) = value(item) {
                sample(&mut out, name, labels, v);
            }
        }
    }

    header(
        &mut out,
        "appliance_apply_latency_seconds",
        "histogram",
        "Time to apply one staged frame to the replica disks, in seconds.",
    );
    for (item, labels) in &items {
        let h = &item.apply_latency;
        for (le, count) in LE_LABELS.iter().zip(h.cumulative) {
            let mut with_le = labels.clone();
            with_le.push(',');
            push_label(&mut with_le, "le", le);
            sample(
                &mut out,
                "appliance_apply_latency_seconds_bucket",
                &with_le,
                Value::Int(count),
            );
        }
        let sum = if h.sum_seconds.is_nan() {
            0.0
        } else {
            h.sum_seconds
        };
        sample(
            &mut out,
            "appliance_apply_latency_seconds_sum",
            labels,
            Value::Float(sum),
        );
        sample(
            &mut out,
            "appliance_apply_latency_seconds_count",
            labels,
            Value::Int(h.count),
        );
    }

    header(
        &mut out,
        "appliance_slots",
        "gauge",
        "Data-disk slots of the appliance VM by state.",
    );
    for (state, count) in [
        ("free", snapshot.slots_free),
        ("attached", snapshot.slots_attached),
        ("reserved", snapshot.slots_reserved),
    ] {
        let mut labels = String::new();
        push_label(&mut labels, "state", state);
        sample(
            &mut out,
            "appliance_slots",
            &labels,
            Value::Int(u64::from(count)),
        );
    }
    scalar(
        &mut out,
        "appliance_slots_total",
        "gauge",
        "Data-disk slots of the appliance VM.",
        u64::from(snapshot.slots_total),
    );

    header(
        &mut out,
        "appliance_jobs",
        "gauge",
        "Jobs known to the appliance by kind and state.",
    );
    let mut jobs: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    for (kind, state, count) in &snapshot.jobs_by_state {
        let total = jobs.entry((kind.as_str(), state.as_str())).or_insert(0);
        *total = total.saturating_add(*count);
    }
    for ((kind, state), count) in jobs {
        let mut labels = String::new();
        push_label(&mut labels, "kind", kind);
        labels.push(',');
        push_label(&mut labels, "state", state);
        sample(&mut out, "appliance_jobs", &labels, Value::Int(count));
    }

    scalar(
        &mut out,
        "appliance_data_port_sessions_total",
        "counter",
        "Data-port sessions accepted since the appliance started.",
        snapshot.data_port_sessions_total,
    );
    scalar(
        &mut out,
        "appliance_data_port_connections",
        "gauge",
        "Data-port connections open now.",
        snapshot.data_port_connections,
    );

    out
}

/// `# HELP` and `# TYPE` lines. The help texts are constants without `\` or line feeds, so
/// they need no escaping.
fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    debug_assert!(!help.contains(['\\', '\n']));
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A family of one unlabelled integer sample.
fn scalar(out: &mut String, name: &str, kind: &str, help: &str, value: u64) {
    header(out, name, kind, help);
    sample(out, name, "", Value::Int(value));
}

/// One sample line; `labels` is the text between the braces (empty: no braces).
fn sample(out: &mut String, name: &str, labels: &str, value: Value) {
    if labels.is_empty() {
        let _ = writeln!(out, "{name} {value}");
    } else {
        let _ = writeln!(out, "{name}{{{labels}}} {value}");
    }
}

/// Appends `key="value"` with the value escaped as the text format requires.
fn push_label(out: &mut String, key: &str, value: &str) {
    out.push_str(key);
    out.push_str("=\"");
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Arc;

    const ALL_FAMILIES: [(&str, &str); 18] = [
        ("appliance_item_state", "gauge"),
        ("appliance_item_rpo_lag_seconds", "gauge"),
        ("appliance_item_cache_used_bytes", "gauge"),
        ("appliance_item_cache_capacity_bytes", "gauge"),
        ("appliance_item_applied_bytes_total", "counter"),
        ("appliance_item_applied_frames_total", "counter"),
        ("appliance_item_applied_seq", "gauge"),
        ("appliance_item_staged_seq", "gauge"),
        ("appliance_item_synchronized_percent", "gauge"),
        ("appliance_item_recovery_points", "gauge"),
        ("appliance_item_apply_failed", "gauge"),
        ("appliance_item_apply_failed_seq", "gauge"),
        ("appliance_apply_latency_seconds", "histogram"),
        ("appliance_slots", "gauge"),
        ("appliance_slots_total", "gauge"),
        ("appliance_jobs", "gauge"),
        ("appliance_data_port_sessions_total", "counter"),
        ("appliance_data_port_connections", "gauge"),
    ];

    fn bucket_of(ns: u64) -> usize {
        let h = LatencyHistogram::new();
        h.observe_ns(ns);
        let s = h.snapshot();
        assert_eq!(s.count, 1);
        s.cumulative
            .iter()
            .position(|&c| c == 1)
            .expect("one bucket holds it")
    }

    #[test]
    fn bounds_tables_agree() {
        for (i, (&ns, &secs)) in BOUNDS_NS.iter().zip(&LATENCY_BUCKETS_SECONDS).enumerate() {
            assert_eq!(ns as f64 / 1e9, secs, "bound {i}");
            assert_eq!(
                LE_LABELS[i].parse::<f64>().expect("le parses"),
                secs,
                "le {i}"
            );
        }
        assert_eq!(LE_LABELS[LATENCY_BUCKET_COUNT - 1], "+Inf");
        assert!(BOUNDS_NS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn le_is_inclusive_at_every_boundary() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(1), 0);
        for (i, &bound) in BOUNDS_NS.iter().enumerate() {
            assert_eq!(bucket_of(bound), i, "exactly on bound {bound} ns");
            assert_eq!(bucket_of(bound - 1), i, "just under bound {bound} ns");
            assert_eq!(bucket_of(bound + 1), i + 1, "just over bound {bound} ns");
        }
        assert_eq!(bucket_of(10_000_000_001), 16);
        assert_eq!(bucket_of(u64::MAX), 16);
        let h = LatencyHistogram::new();
        h.observe(Duration::from_secs(u64::MAX));
        assert_eq!(h.snapshot().cumulative[16], 1);
        assert_eq!(h.snapshot().cumulative[15], 0);
    }

    #[test]
    fn cumulative_counts_sum_and_count() {
        let h = LatencyHistogram::default();
        assert_eq!(h.snapshot(), HistogramSnapshot::default());
        // 50 µs, 100 µs (on the first bound), 300 µs, 1 ms, 7 s, 20 s.
        let observations = [
            50_000,
            100_000,
            300_000,
            1_000_000,
            7_000_000_000,
            20_000_000_000,
        ];
        for ns in observations {
            h.observe_ns(ns);
        }
        let s = h.snapshot();
        assert_eq!(s.count, 6);
        assert_eq!(
            s.cumulative,
            [2, 2, 3, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 5, 6],
            "cumulative per le"
        );
        assert_eq!(s.cumulative[LATENCY_BUCKET_COUNT - 1], s.count);
        let expected: u64 = observations.iter().sum();
        assert!((s.sum_seconds - expected as f64 / 1e9).abs() < 1e-9);
    }

    #[test]
    fn concurrent_observers_lose_nothing() {
        const THREADS: u64 = 8;
        const PER_THREAD: u64 = 50_000;
        let h = Arc::new(LatencyHistogram::new());
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let h = Arc::clone(&h);
                std::thread::spawn(move || {
                    for i in 0..PER_THREAD {
                        // Spread over every bucket, +Inf included.
                        h.observe_ns((i * 7919 + t * 104_729) % 12_000_000_000);
                    }
                })
            })
            .collect();
        // A reader running meanwhile always sees a well-formed snapshot.
        for _ in 0..100 {
            let s = h.snapshot();
            assert!(s.cumulative.windows(2).all(|w| w[0] <= w[1]));
            assert_eq!(s.cumulative[LATENCY_BUCKET_COUNT - 1], s.count);
        }
        for handle in handles {
            handle.join().expect("observer thread");
        }
        let s = h.snapshot();
        assert_eq!(s.count, THREADS * PER_THREAD);
        let mut expected_sum = 0u64;
        let expected = LatencyHistogram::new();
        for t in 0..THREADS {
            for i in 0..PER_THREAD {
                let ns = (i * 7919 + t * 104_729) % 12_000_000_000;
                expected_sum += ns;
                expected.observe_ns(ns);
            }
        }
        assert_eq!(s.cumulative, expected.snapshot().cumulative);
        assert_eq!(s.sum_seconds, expected_sum as f64 / 1e9);
    }

    fn item(id: &str, name: &str) -> ItemMetrics {
        let h = LatencyHistogram::new();
        for ns in [80_000, 400_000, 3_000_000, 60_000_000_000] {
            h.observe_ns(ns);
        }
        ItemMetrics {
            id: id.to_owned(),
            name: name.to_owned(),
            state: "protected".to_owned(),
            rpo_lag_seconds: Some(4.25),
            cache_used_bytes: 1 << 20,
            cache_capacity_bytes: 1 << 30,
            applied_bytes_total: 123_456_789,
            applied_frames_total: 2100,
            applied_seq: 2099,
            staged_seq: 2100,
            synchronized_percent: 100,
            points: 7,
            apply_failed_seq: None,
            apply_latency: h.snapshot(),
        }
    }

    fn sample_snapshot() -> MetricsSnapshot {
        let mut second = item(
            "0123456789abcdef0123456789abcdef",
            "db \"primary\"\nline2 C:\\vm",
        );
        second.rpo_lag_seconds = None;
        second.state = "failed_over".to_owned();
        second.apply_failed_seq = Some(2101);
        MetricsSnapshot {
            items: vec![item("3f2a9c0b1d4e5f60718293a4b5c6d7e8", "web-01"), second],
            slots_total: 32,
            slots_free: 27,
            slots_attached: 3,
            slots_reserved: 1,
            jobs_by_state: vec![
                ("test-failover".to_owned(), "running".to_owned(), 1),
                ("resync".to_owned(), "done".to_owned(), 2),
                ("resync".to_owned(), "done".to_owned(), 3),
            ],
            data_port_sessions_total: 12,
            data_port_connections: 2,
        }
    }

    /// Label pairs of a parsed sample, values unescaped.
    type Labels = Vec<(String, String)>;

    /// A parsed sample line: metric name, labels, value.
    type Sample = (String, Labels, f64);

    /// A small validator for text format 0.0.4 as this module writes it: every line is a
    /// `# HELP`, a `# TYPE` or `name{labels} value` with valid names, escapes and a value
    /// Prometheus parses (NaN refused: we never write it). It also checks the structure
    /// Prometheus relies on: one HELP and one TYPE per family, before its samples; samples of
    /// a family contiguous; no repeated series; histogram buckets non-decreasing, ending at
    /// `+Inf` equal to `_count`. Returns the samples.
    fn validate(text: &str) -> Result<Vec<Sample>, String> {
        fn is_name(s: &str, colon: bool) -> bool {
            let mut chars = s.chars();
            let ok_first = |c: char| c.is_ascii_alphabetic() || c == '_' || (colon && c == ':');
            matches!(chars.next(), Some(c) if ok_first(c))
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || (colon && c == ':'))
        }
        fn parse_value(s: &str) -> Result<f64, String> {
            match s {
                "+Inf" => Ok(f64::INFINITY),
                "-Inf" => Ok(f64::NEG_INFINITY),
                _ if s.chars().all(|c| c.is_ascii_digit() || "+-.eE".contains(c)) => {
                    s.parse::<f64>().map_err(|e| format!("value {s:?}: {e}"))
                }
                _ => Err(format!("value {s:?} is not a number Prometheus reads")),
            }
        }
        fn parse_labels(mut rest: &str) -> Result<(Labels, &str), String> {
            let mut labels = Vec::new();
            loop {
                if let Some(after) = rest.strip_prefix('}') {
                    return Ok((labels, after));
                }
                let eq = rest.find('=').ok_or("label without =")?;
                let key = &rest[..eq];
                if !is_name(key, false) {
                    return Err(format!("bad label name {key:?}"));
                }
                rest = rest[eq + 1..]
                    .strip_prefix('"')
                    .ok_or("label value without quote")?;
                let mut value = String::new();
                let mut chars = rest.char_indices();
                let end = loop {
                    match chars.next().ok_or("unterminated label value")? {
                        (i, '"') => break i,
                        (_, '\\') => match chars.next().ok_or("dangling backslash")?.1 {
                            '\\' => value.push('\\'),
                            '"' => value.push('"'),
                            'n' => value.push('\n'),
                            c => return Err(format!("bad escape \\{c}")),
                        },
                        (_, '\n') => return Err("raw line feed in label value".into()),
                        (_, c) => value.push(c),
                    }
                };
                rest = &rest[end + 1..];
                if labels.iter().any(|(k, _)| k == key) {
                    return Err(format!("label {key} repeated"));
                }
                labels.push((key.to_owned(), value));
                if let Some(after) = rest.strip_prefix(',') {
                    rest = after;
                } else if !rest.starts_with('}') {
                    return Err("expected , or } after a label".into());
                }
            }
        }

        if !text.ends_with('\n') {
            return Err("output does not end with a line feed".into());
        }
        let mut helped: HashSet<String> = HashSet::new();
        let mut types: HashMap<String, String> = HashMap::new();
        let mut finished: HashSet<String> = HashSet::new();
        let mut current: Option<String> = None;
        let mut series: HashSet<String> = HashSet::new();
        let mut samples = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let at = |e: String| format!("line {}: {e}: {line:?}", n + 1);
            if let Some(comment) = line.strip_prefix("# ") {
                let mut parts = comment.splitn(3, ' ');
                let (word, name) = (parts.next(), parts.next().unwrap_or(""));
                let rest = parts.next().unwrap_or("");
                if !is_name(name, true) {
                    return Err(at(format!("bad family name {name:?}")));
                }
                if current.as_deref() != Some(name) {
                    if let Some(prev) = current.take() {
                        finished.insert(prev);
                    }
                    if finished.contains(name) {
                        return Err(at(format!("family {name} is not contiguous")));
                    }
                    current = Some(name.to_owned());
                }
                match word {
                    Some("HELP") if helped.insert(name.to_owned()) && !types.contains_key(name) => {
                    }
                    Some("TYPE")
                        if ["counter", "gauge", "histogram", "summary", "untyped"]
                            .contains(&rest)
                            && !types.contains_key(name) =>
                    {
                        types.insert(name.to_owned(), rest.to_owned());
                    }
                    _ => return Err(at("bad or repeated HELP/TYPE".into())),
                }
                continue;
            }
            let name_end = line.find(['{', ' ']).ok_or_else(|| at("no value".into()))?;
            let name = &line[..name_end];
            if !is_name(name, true) {
                return Err(at(format!("bad metric name {name:?}")));
            }
            let (labels, rest) = match line[name_end..].strip_prefix('{') {
                Some(after) => parse_labels(after).map_err(at)?,
                None => (Vec::new(), &line[name_end..]),
            };
            let value = rest
                .strip_prefix(' ')
                .ok_or_else(|| at("expected one space".into()))?;
            if value.contains(' ') {
                return Err(at("trailing text after the value".into()));
            }
            let value = parse_value(value).map_err(at)?;
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    let base = name.strip_suffix(s)?;
                    (types.get(base).map(String::as_str) == Some("histogram")).then_some(base)
                })
                .unwrap_or(name);
            if !types.contains_key(family) || !helped.contains(family) {
                return Err(at(format!("sample before HELP and TYPE of {family}")));
            }
            if current.as_deref() != Some(family) {
                return Err(at(format!("sample of {family} outside its family's block")));
            }
            if types[family] == "histogram"
                && (name.ends_with("_bucket") != labels.iter().any(|(k, _)| k == "le"))
            {
                return Err(at("le label only on _bucket".into()));
            }
            let mut key = name.to_owned();
            for (k, v) in &labels {
                key.push_str(&format!("|{k}={v:?}"));
            }
            if !series.insert(key) {
                return Err(at("repeated series".into()));
            }
            samples.push((name.to_owned(), labels, value));
        }

        // Histograms: per series (labels without le) buckets rise and end at +Inf = _count.
        for (family, _) in types.iter().filter(|(_, t)| *t == "histogram") {
            let mut buckets: BTreeMap<Labels, Vec<(f64, f64)>> = BTreeMap::new();
            let mut counts: HashMap<Labels, f64> = HashMap::new();
            for (name, labels, value) in &samples {
                let base: Vec<_> = labels.iter().filter(|(k, _)| k != "le").cloned().collect();
                if *name == format!("{family}_bucket") {
                    let le = &labels.iter().find(|(k, _)| k == "le").expect("le").1;
                    buckets
                        .entry(base)
                        .or_default()
                        .push((parse_value(le)?, *value));
                } else if *name == format!("{family}_count") {
                    counts.insert(base, *value);
                }
            }
            if buckets.len() != counts.len() {
                return Err(format!("{family}: buckets and _count series differ"));
            }
            for (base, list) in buckets {
                if !list.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1) {
                    return Err(format!("{family} {base:?}: buckets not increasing"));
                }
                let last = list.last().expect("a bucket");
                if last.0 != f64::INFINITY || Some(&last.1) != counts.get(&base) {
                    return Err(format!(
                        "{family} {base:?}: +Inf bucket missing or != _count"
                    ));
                }
            }
        }
        Ok(samples)
    }

    fn find<'a>(samples: &'a [Sample], name: &str, want: &[(&str, &str)]) -> Vec<&'a Sample> {
        samples
            .iter()
            .filter(|(n, labels, _)| {
                n == name
                    && want
                        .iter()
                        .all(|(k, v)| labels.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .collect()
    }

    #[test]
    fn render_is_well_formed_with_each_family_once() {
        let text = render(&sample_snapshot());
        let samples = validate(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        for (family, kind) in ALL_FAMILIES {
            let help = format!("# HELP {family} ");
            let type_line = format!("# TYPE {family} {kind}\n");
            assert_eq!(text.matches(&help).count(), 1, "HELP of {family}");
            assert_eq!(text.matches(&type_line).count(), 1, "TYPE of {family}");
            assert!(
                text.find(&help) < text.find(&type_line),
                "HELP before TYPE: {family}"
            );
        }
        assert_eq!(
            text.matches("# TYPE ").count(),
            ALL_FAMILIES.len(),
            "no other family"
        );
        for (name, labels, _) in &samples {
            assert!(name.starts_with("appliance_"), "{name}");
            if name.starts_with("appliance_item_") || name.starts_with("appliance_apply_") {
                assert_eq!(&labels[0].0, "item");
                assert_eq!(&labels[1].0, "name");
            }
        }
        // Rendering is deterministic.
        assert_eq!(text, render(&sample_snapshot()));
    }

    #[test]
    fn render_values() {
        let text = render(&sample_snapshot());
        let samples = validate(&text).expect("valid");
        let web = [
            ("item", "3f2a9c0b1d4e5f60718293a4b5c6d7e8"),
            ("name", "web-01"),
        ];
        let value = |name: &str, labels: &[(&str, &str)]| {
            let found = find(&samples, name, labels);
            assert_eq!(found.len(), 1, "{name} {labels:?}");
            found[0].2
        };
        assert_eq!(value("appliance_item_rpo_lag_seconds", &web), 4.25);
        assert_eq!(
            find(&samples, "appliance_item_rpo_lag_seconds", &[]).len(),
            1,
            "None omitted"
        );
        assert_eq!(
            value("appliance_item_applied_bytes_total", &web),
            123_456_789.0
        );
        assert_eq!(value("appliance_item_staged_seq", &web), 2100.0);
        assert_eq!(value("appliance_item_recovery_points", &web), 7.0);
        assert_eq!(value("appliance_item_apply_failed", &web), 0.0);
        assert_eq!(
            find(&samples, "appliance_item_apply_failed", &[]).len(),
            2,
            "one sample per item"
        );
        let failing = [("item", "0123456789abcdef0123456789abcdef")];
        assert_eq!(value("appliance_item_apply_failed", &failing), 1.0);
        assert_eq!(
            find(&samples, "appliance_item_apply_failed_seq", &[]).len(),
            1,
            "only while apply_failed"
        );
        assert_eq!(value("appliance_item_apply_failed_seq", &failing), 2101.0);
        assert_eq!(value("appliance_item_synchronized_percent", &web), 100.0);
        assert_eq!(
            value("appliance_item_state", &[("state", "protected")]),
            1.0
        );
        assert_eq!(
            value("appliance_item_state", &[("state", "failed_over")]),
            1.0
        );
        assert_eq!(
            value(
                "appliance_apply_latency_seconds_bucket",
                &[web[0], ("le", "0.0001")]
            ),
            1.0
        );
        assert_eq!(
            value(
                "appliance_apply_latency_seconds_bucket",
                &[web[0], ("le", "10")]
            ),
            3.0
        );
        assert_eq!(
            value(
                "appliance_apply_latency_seconds_bucket",
                &[web[0], ("le", "+Inf")]
            ),
            4.0
        );
        assert_eq!(value("appliance_apply_latency_seconds_count", &web), 4.0);
        assert!((value("appliance_apply_latency_seconds_sum", &web) - 60.00348).abs() < 1e-9);
        assert_eq!(value("appliance_slots", &[("state", "free")]), 27.0);
        assert_eq!(value("appliance_slots", &[("state", "attached")]), 3.0);
        assert_eq!(value("appliance_slots", &[("state", "reserved")]), 1.0);
        assert_eq!(value("appliance_slots_total", &[]), 32.0);
        assert_eq!(
            value("appliance_jobs", &[("kind", "resync"), ("state", "done")]),
            5.0
        );
        assert_eq!(
            value(
                "appliance_jobs",
                &[("kind", "test-failover"), ("state", "running")]
            ),
            1.0
        );
        assert_eq!(value("appliance_data_port_sessions_total", &[]), 12.0);
        assert_eq!(value("appliance_data_port_connections", &[]), 2.0);
        assert!(text.contains("appliance_slots_total 32\n"));
        assert!(text.contains(",le=\"+Inf\"} 4\n"));
    }

    #[test]
    fn label_values_are_escaped() {
        let name = "db \"primary\"\nline2 C:\\vm";
        let text = render(&sample_snapshot());
        assert!(
            text.contains(r#"name="db \"primary\"\nline2 C:\\vm""#),
            "escaped name missing:\n{text}"
        );
        // Every sample is one line and the validator's unescaping gives the name back.
        let samples = validate(&text).expect("valid");
        let theirs = find(&samples, "appliance_item_applied_seq", &[("name", name)]);
        assert_eq!(theirs.len(), 1);
        assert_eq!(&theirs[0].1[0].1, "0123456789abcdef0123456789abcdef");
        let mut labels = String::new();
        push_label(&mut labels, "x", "\\\"\n");
        assert_eq!(labels, r#"x="\\\"\n""#);
    }

    #[test]
    fn floats_print_so_prometheus_parses_them() {
        assert_eq!(Value::Float(f64::INFINITY).to_string(), "+Inf");
        assert_eq!(Value::Float(f64::NEG_INFINITY).to_string(), "-Inf");
        assert_eq!(Value::Float(1e-7).to_string(), "0.0000001");
        assert_eq!(Value::Float(0.25).to_string(), "0.25");
        assert_eq!(Value::Int(u64::MAX).to_string(), "18446744073709551615");

        let mut snapshot = sample_snapshot();
        snapshot.items[0].rpo_lag_seconds = Some(f64::NAN);
        snapshot.items[1].rpo_lag_seconds = Some(f64::INFINITY);
        snapshot.items[1].apply_latency.sum_seconds = f64::NAN;
        let text = render(&snapshot);
        assert!(!text.contains("NaN"), "{text}");
        let samples = validate(&text).expect("valid");
        let rpo = find(&samples, "appliance_item_rpo_lag_seconds", &[]);
        assert_eq!(rpo.len(), 1, "NaN omitted");
        assert_eq!(rpo[0].2, f64::INFINITY);
    }

    #[test]
    fn empty_and_degenerate_snapshots_are_well_formed() {
        let text = render(&MetricsSnapshot::default());
        validate(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(text.matches("# TYPE ").count(), ALL_FAMILIES.len());

        // A repeated item id is rendered once; odd names and states stay valid.
        let mut snapshot = sample_snapshot();
        let mut dup = item("3f2a9c0b1d4e5f60718293a4b5c6d7e8", "other");
        dup.state = "weird \"state\"\\".to_owned();
        snapshot.items.push(dup);
        snapshot
            .items
            .push(item("ffffffffffffffffffffffffffffffff", ""));
        snapshot
            .jobs_by_state
            .push(("x\ny".to_owned(), "\"".to_owned(), u64::MAX));
        let text = render(&snapshot);
        let samples = validate(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(find(&samples, "appliance_item_state", &[]).len(), 3);
        assert!(!text.contains("other"));
    }

    #[test]
    fn validator_rejects_malformed_text() {
        let good = "# HELP a_b x\n# TYPE a_b gauge\na_b{l=\"v\"} 1\n";
        assert!(validate(good).is_ok());
        for bad in [
            "a_b 1\n",                                                       // no HELP/TYPE
            "# HELP a_b x\n# TYPE a_b gauge\na_b{l=\"v\"} 1",                // no final line feed
            "# HELP a_b x\n# TYPE a_b gauge\na_b{l=\"v\"} NaN\n",            // NaN
            "# HELP a_b x\n# TYPE a_b gauge\na_b{l=\"v\"} inf\n",            // Go spelling only
            "# HELP a_b x\n# TYPE a_b gauge\na_b{l=\"v\\x\"} 1\n",           // bad escape
            "# HELP a_b x\n# TYPE a_b gauge\na_b{l=\"v} 1\n",                // unterminated
            "# HELP a_b x\n# TYPE a_b gauge\na_b{l=\"v\"}  1\n",             // two spaces
            "# HELP a_b x\n# TYPE a_b gauge\na_b 1\na_b 2\n",                // repeated series
            "# HELP a_b x\n# TYPE a_b gauge\n# TYPE a_b gauge\na_b 1\n",     // TYPE twice
            "# HELP a x\n# TYPE a gauge\n# HELP b x\n# TYPE b gauge\na 1\n", // not contiguous
            "# HELP h x\n# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\nh_sum 0\n",
            "# HELP h x\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_count 1\nh_sum 0\n",
        ] {
            assert!(validate(bad).is_err(), "accepted: {bad:?}");
        }
    }
}
