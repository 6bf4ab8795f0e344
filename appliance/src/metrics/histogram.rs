//! The apply-latency histogram: fixed buckets, observed wait-free on the apply path, read as a
//! self-consistent snapshot by the metrics endpoint (see `metrics.rs` for the invariants).

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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

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
        }
        // The `le` labels of these bounds: metrics/tests.rs `le_labels_are_the_bounds`.
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
}
