//! Fixed-bound latency histograms and the percentile summary every report row carries.
//!
//! ```text
//!  observe(Duration) ──► µs, clamped to [1 µs, 60 s] ──► hdrhistogram (3 significant digits)
//!                                                              │
//!                       Percentiles { count, mean, p50, p90, p99, p99.9, max } ◄── summary()
//! ```
//!
//! The bounds are fixed when the histogram is made, so it never resizes in the middle of a
//! run (resizing would allocate on the hot path and skew what is measured). A value above the
//! upper bound is recorded as the upper bound (`saturating_record`), never dropped.
//! Fio's own percentiles are converted into the same [`Percentiles`] shape (in µs) so the
//! report can put both on one table.
//!
//! For the plots, [`LatencyHistogram::curve`] samples the distribution at [`CURVE_POINTS`]
//! percentiles spread evenly on a "nines" scale (`x = −log10(1 − p/100)`: 0 → p0, 1 → p90,
//! 2 → p99, 3 → p99.9, 4 → p99.99), so the tail gets as many points as the body.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Lowest value tracked, in µs.
pub const LOWEST_US: u64 = 1;
/// Highest value tracked, in µs (60 s).
pub const HIGHEST_US: u64 = 60_000_000;
/// Significant decimal digits kept.
pub const SIGNIFICANT_DIGITS: u8 = 3;
/// Points of a latency curve: nines 0, 0.05, …, 4 (p0 … p99.99).
pub const CURVE_POINTS: usize = 81;
/// Highest "nines" value of a curve (4 = p99.99).
pub const CURVE_MAX_NINES: f64 = 4.0;

/// A latency curve: `(percentile, µs)` points, percentiles ascending.
pub type Curve = Vec<(f64, f64)>;

/// The "nines" of a percentile: `−log10(1 − p/100)`, capped at [`CURVE_MAX_NINES`].
pub fn nines(percentile: f64) -> f64 {
    let rest = (1.0 - percentile / 100.0).max(10f64.powf(-CURVE_MAX_NINES));
    (-rest.log10()).clamp(0.0, CURVE_MAX_NINES)
}

/// The percentile of a "nines" value (inverse of [`nines`]).
pub fn percentile_of_nines(nines: f64) -> f64 {
    100.0 * (1.0 - 10f64.powf(-nines))
}

/// A latency histogram in µs with fixed bounds [`LOWEST_US`] ..= [`HIGHEST_US`].
#[derive(Debug, Clone)]
pub struct LatencyHistogram {
    hist: Histogram<u64>,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyHistogram {
    /// An empty histogram.
    pub fn new() -> Self {
        Self {
            hist: Histogram::new_with_bounds(LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS)
                .expect("the constant histogram bounds are valid"),
        }
    }

    /// Records one latency (clamped into the bounds).
    pub fn observe(&mut self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.hist.saturating_record(us.clamp(LOWEST_US, HIGHEST_US));
    }

    /// Number of values recorded.
    pub fn count(&self) -> u64 {
        self.hist.len()
    }

    /// Adds every value of `other` (same fixed bounds, so nothing is lost or resized).
    pub fn merge(&mut self, other: &Self) {
        // Both histograms have the same bounds: `add` cannot fail; if it ever did, the
        // values would be recorded one by one (saturating) instead.
        if self.hist.add(&other.hist).is_err() {
            for v in other.hist.iter_recorded() {
                let _ = self
                    .hist
                    .record_n(v.value_iterated_to(), v.count_at_value());
            }
        }
    }

    /// The distribution at [`CURVE_POINTS`] percentiles, evenly spread in nines (empty when
    /// nothing was recorded).
    pub fn curve(&self) -> Curve {
        if self.hist.is_empty() {
            return Vec::new();
        }
        (0..CURVE_POINTS)
            .map(|i| {
                let n = CURVE_MAX_NINES * i as f64 / (CURVE_POINTS - 1) as f64;
                let p = percentile_of_nines(n);
                (p, self.hist.value_at_quantile(p / 100.0) as f64)
            })
            .collect()
    }

    /// The percentiles the report shows.
    pub fn summary(&self) -> Percentiles {
        let at = |q: f64| self.hist.value_at_quantile(q) as f64;
        Percentiles {
            count: self.hist.len(),
            mean_us: self.hist.mean(),
            p50_us: at(0.50),
            p90_us: at(0.90),
            p99_us: at(0.99),
            p99_9_us: at(0.999),
            max_us: self.hist.max() as f64,
        }
    }
}

/// Latency percentiles in µs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Percentiles {
    /// Number of samples.
    pub count: u64,
    /// Mean.
    pub mean_us: f64,
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p99_9_us: f64,
    /// Largest sample.
    pub max_us: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_known_values() {
        let mut h = LatencyHistogram::new();
        for us in 1..=1000u64 {
            h.observe(Duration::from_micros(us));
        }
        let s = h.summary();
        assert_eq!(s.count, 1000);
        assert!((s.p50_us - 500.0).abs() <= 1.0, "{s:?}");
        assert!((s.p99_us - 990.0).abs() <= 1.0, "{s:?}");
        assert!((s.max_us - 1000.0).abs() <= 1.0, "{s:?}");
    }

    #[test]
    fn curve_spans_p0_to_p99_99_and_rises() {
        let mut h = LatencyHistogram::new();
        assert!(h.curve().is_empty());
        for us in 1..=100_000u64 {
            h.observe(Duration::from_micros(us));
        }
        let c = h.curve();
        assert_eq!(c.len(), CURVE_POINTS);
        assert!(c[0].0.abs() < 1e-9, "{:?}", c[0]);
        assert!((c[CURVE_POINTS - 1].0 - 99.99).abs() < 1e-9);
        assert!(c.windows(2).all(|w| w[0].1 <= w[1].1 && w[0].0 < w[1].0));
        assert!((c[20].0 - 90.0).abs() < 1e-9 && (c[20].1 - 90_000.0).abs() < 100.0);
        assert!((nines(99.9) - 3.0).abs() < 1e-9);
        assert!((nines(100.0) - CURVE_MAX_NINES).abs() < 1e-9);
        assert!((percentile_of_nines(2.0) - 99.0).abs() < 1e-9);
    }

    #[test]
    fn merge_adds_the_counts() {
        let mut a = LatencyHistogram::new();
        let mut b = LatencyHistogram::new();
        for us in 1..=100u64 {
            a.observe(Duration::from_micros(us));
            b.observe(Duration::from_millis(us));
        }
        a.merge(&b);
        let s = a.summary();
        assert_eq!(s.count, 200);
        assert!((s.max_us - 100_000.0).abs() <= 100.0, "{s:?}");
        assert!(s.p50_us <= 101.0, "{s:?}");
    }

    #[test]
    fn out_of_bounds_values_are_clamped_not_dropped() {
        let mut h = LatencyHistogram::new();
        h.observe(Duration::from_nanos(10));
        h.observe(Duration::from_secs(3600));
        assert_eq!(h.count(), 2);
        let s = h.summary();
        assert!(s.max_us >= HIGHEST_US as f64 * 0.999, "{s:?}");
    }
}
