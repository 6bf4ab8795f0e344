//! The `GET /metrics` exposition: a [`MetricsSnapshot`] as Prometheus text format 0.0.4,
//! encoded by `prometheus-client` (one registry per scrape, one collector over the snapshot).
//!
//! A collector rather than live `Family` metrics: a scrape shows a snapshot the item manager
//! gathered, the order must be fixed (a `Family` iterates a hash map), and the histogram
//! counts come from our wait-free [`LatencyHistogram`](super::LatencyHistogram).
//!
//! Names: a counter is registered without its `_total` suffix, which `prometheus-client`
//! appends to the `# HELP`, `# TYPE` and sample lines alike, so the exposed names are the
//! ones documented in `docs/design/control-api.md`. One name changed with the move, because
//! `promtool check metrics` refuses a gauge named `…_total`: `appliance_slots_total` is now
//! `appliance_slots_capacity`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet, prometheus_text,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::exemplar::Exemplar;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use super::{ItemMetrics, LATENCY_BUCKETS_SECONDS, MetricsSnapshot};

/// The `Content-Type` of [`render`]'s output.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Renders `snapshot` in the Prometheus text exposition format 0.0.4 ([`CONTENT_TYPE`]).
///
/// A pure function of the snapshot: the same snapshot always gives the same text. An error
/// is the encoder's refusal (writing into a `String` itself cannot fail); the caller answers
/// it as a server error instead of a partial page.
pub fn render(snapshot: &MetricsSnapshot) -> Result<String, fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape::of(snapshot)));
    let mut out = String::with_capacity(2048 + snapshot.items.len() * 4096);
    prometheus_text::encode(&mut out, &registry)?;
    Ok(out)
}

/// A sample value: an integer, or a float that is never NaN.
#[derive(Clone, Copy)]
enum Value {
    Int(u64),
    Float(f64),
}

type ItemValue = fn(&ItemMetrics) -> Option<Value>;

/// The per-item scalar families, in output order: (name, type, help, value). A counter's name
/// is given without `_total` (the encoder appends it).
const ITEM_FAMILIES: [(&str, MetricType, &str, ItemValue); 11] = [
    (
        "appliance_item_rpo_lag_seconds",
        MetricType::Gauge,
        "Age of the item's newest recovery point, in seconds.",
        |i| match i.rpo_lag_seconds {
            Some(v) if !v.is_nan() => Some(Value::Float(v)),
            _ => None,
        },
    ),
    (
        "appliance_item_cache_used_bytes",
        MetricType::Gauge,
        "Bytes of the item's staging log (cache) in use.",
        |i| Some(Value::Int(i.cache_used_bytes)),
    ),
    (
        "appliance_item_cache_capacity_bytes",
        MetricType::Gauge,
        "Capacity of the item's staging log (cache), in bytes.",
        |i| Some(Value::Int(i.cache_capacity_bytes)),
    ),
    (
        "appliance_item_applied_bytes",
        MetricType::Counter,
        "Bytes applied to the item's replica disks.",
        |i| Some(Value::Int(i.applied_bytes_total)),
    ),
    (
        "appliance_item_applied_frames",
        MetricType::Counter,
        "Delta-stream frames applied to the item's replica disks.",
        |i| Some(Value::Int(i.applied_frames_total)),
    ),
    (
        "appliance_item_applied_seq",
        MetricType::Gauge,
        "Sequence number of the last frame applied to the replicas.",
        |i| Some(Value::Int(i.applied_seq)),
    ),
    (
        "appliance_item_staged_seq",
        MetricType::Gauge,
        "Sequence number of the last frame durably staged (acknowledged).",
        |i| Some(Value::Int(i.staged_seq)),
    ),
    (
        "appliance_item_synchronized_percent",
        MetricType::Gauge,
        "Initial or resynchronization progress of the item, in percent.",
        |i| Some(Value::Int(u64::from(i.synchronized_percent))),
    ),
    (
        "appliance_item_recovery_points",
        MetricType::Gauge,
        "Recovery points kept for the item.",
        |i| Some(Value::Int(i.points)),
    ),
    (
        "appliance_item_apply_failed",
        MetricType::Gauge,
        "1 while a staged frame of the item cannot be applied (health apply_failed: the item \
         takes no frames until a resync or disable), else 0.",
        |i| Some(Value::Int(u64::from(i.apply_failed_seq.is_some()))),
    ),
    (
        "appliance_item_apply_failed_seq",
        MetricType::Gauge,
        "Sequence number of the staged frame that cannot be applied (only while apply_failed).",
        |i| i.apply_failed_seq.map(Value::Int),
    ),
];

/// What one scrape encodes: the snapshot with each item once and the job rows summed.
#[derive(Debug)]
struct Scrape {
    items: Vec<ItemMetrics>,
    slots: [(&'static str, u32); 3],
    slots_total: u32,
    jobs: BTreeMap<(String, String), u64>,
    data_port_sessions_total: u64,
    data_port_connections: u64,
    exports: BTreeMap<String, u64>,
    nbd_connections: u64,
}

impl Scrape {
    fn of(snapshot: &MetricsSnapshot) -> Self {
        let mut seen = HashSet::new();
        let items = snapshot
            .items
            .iter()
            .filter(|item| seen.insert(item.id.as_str()))
            .cloned()
            .collect();
        let mut jobs: BTreeMap<(String, String), u64> = BTreeMap::new();
        for (kind, state, count) in &snapshot.jobs_by_state {
            let total = jobs.entry((kind.clone(), state.clone())).or_insert(0);
            *total = total.saturating_add(*count);
        }
        Self {
            items,
            slots: [
                ("free", snapshot.slots_free),
                ("attached", snapshot.slots_attached),
                ("reserved", snapshot.slots_reserved),
            ],
            slots_total: snapshot.slots_total,
            jobs,
            data_port_sessions_total: snapshot.data_port_sessions_total,
            data_port_connections: snapshot.data_port_connections,
            exports: snapshot.exports_by_purpose.iter().fold(
                BTreeMap::new(),
                |mut exports, (purpose, count)| {
                    let total = exports.entry(purpose.clone()).or_insert(0u64);
                    *total = total.saturating_add(*count);
                    exports
                },
            ),
            nbd_connections: snapshot.nbd_connections,
        }
    }
}

/// Encodes one sample of `value` as a `kind` metric.
fn sample(encoder: MetricEncoder<'_>, kind: MetricType, value: Value) -> fmt::Result {
    match (kind, value) {
        (MetricType::Counter, Value::Int(v)) => ConstCounter::new(v).encode(encoder),
        (MetricType::Counter, Value::Float(v)) => ConstCounter::new(v).encode(encoder),
        (_, Value::Int(v)) => ConstGauge::new(v).encode(encoder),
        (_, Value::Float(v)) => ConstGauge::new(v).encode(encoder),
    }
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let labels: Vec<[(&str, &str); 2]> = self
            .items
            .iter()
            .map(|item| [("item", item.id.as_str()), ("name", item.name.as_str())])
            .collect();

        let mut family = encoder.encode_descriptor(
            "appliance_item_state",
            "Lifecycle state of the item: 1 for its current state.",
            None,
            MetricType::Gauge,
        )?;
        for (item, [id, name]) in self.items.iter().zip(&labels) {
            let with_state = [*id, *name, ("state", item.state.as_str())];
            ConstGauge::new(1u64).encode(family.encode_family(&with_state)?)?;
        }

        for (name, kind, help, value) in ITEM_FAMILIES {
            let mut family = encoder.encode_descriptor(name, help, None, kind)?;
            for (item, labels) in self.items.iter().zip(&labels) {
                if let Some(v) = value(item) {
                    sample(family.encode_family(labels)?, kind, v)?;
                }
            }
        }

        let mut family = encoder.encode_descriptor(
            "appliance_apply_latency_seconds",
            "Time to apply one staged frame to the replica disks, in seconds.",
            None,
            MetricType::Histogram,
        )?;
        for (item, labels) in self.items.iter().zip(&labels) {
            let h = &item.apply_latency;
            // The encoder takes per-bucket counts and accumulates them itself.
            let mut buckets = [(f64::INFINITY, 0u64); LATENCY_BUCKETS_SECONDS.len() + 1];
            let mut below = 0u64;
            for ((slot, &bound), &cumulative) in buckets
                .iter_mut()
                .zip(LATENCY_BUCKETS_SECONDS.iter().chain([&f64::INFINITY]))
                .zip(&h.cumulative)
            {
                *slot = (bound, cumulative.wrapping_sub(below));
                below = cumulative;
            }
            let sum = if h.sum_seconds.is_nan() {
                0.0
            } else {
                h.sum_seconds
            };
            family.encode_family(labels)?.encode_histogram(
                sum,
                h.count,
                &buckets,
                None::<&HashMap<usize, Exemplar<NoLabelSet, f64>>>,
            )?;
        }

        let mut family = encoder.encode_descriptor(
            "appliance_slots",
            "Data-disk slots of the appliance VM by state.",
            None,
            MetricType::Gauge,
        )?;
        for (state, count) in self.slots {
            ConstGauge::new(count).encode(family.encode_family(&[("state", state)])?)?;
        }
        ConstGauge::new(self.slots_total).encode(encoder.encode_descriptor(
            "appliance_slots_capacity",
            "Data-disk slots of the appliance VM, LUN 0 included.",
            None,
            MetricType::Gauge,
        )?)?;

        let mut family = encoder.encode_descriptor(
            "appliance_jobs",
            "Jobs known to the appliance by kind and state.",
            None,
            MetricType::Gauge,
        )?;
        for ((kind, state), count) in &self.jobs {
            let labels = [("kind", kind.as_str()), ("state", state.as_str())];
            ConstGauge::new(*count).encode(family.encode_family(&labels)?)?;
        }

        ConstCounter::new(self.data_port_sessions_total).encode(encoder.encode_descriptor(
            "appliance_data_port_sessions",
            "Data-port sessions accepted since the appliance started.",
            None,
            MetricType::Counter,
        )?)?;
        ConstGauge::new(self.data_port_connections).encode(encoder.encode_descriptor(
            "appliance_data_port_connections",
            "Data-port connections open now.",
            None,
            MetricType::Gauge,
        )?)?;

        let mut family = encoder.encode_descriptor(
            "appliance_exports",
            "Live exports of recovery points over NBD by purpose.",
            None,
            MetricType::Gauge,
        )?;
        for (purpose, count) in &self.exports {
            ConstGauge::new(*count)
                .encode(family.encode_family(&[("purpose", purpose.as_str())])?)?;
        }
        ConstGauge::new(self.nbd_connections).encode(encoder.encode_descriptor(
            "appliance_nbd_connections",
            "NBD sessions open on exports now.",
            None,
            MetricType::Gauge,
        )?)
    }
}
