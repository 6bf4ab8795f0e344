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

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Lowest value tracked, in µs.
pub const LOWEST_US: u64 = 1;
/// Highest value tracked, in µs (60 s).
pub const HIGHEST_US: u64 = 60_000_000;
/// Significant decimal digits kept.
pub const SIGNIFICANT_DIGITS: u8 = 3;

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
    fn out_of_bounds_values_are_clamped_not_dropped() {
        let mut h = LatencyHistogram::new();
        h.observe(Duration::from_nanos(10));
        h.observe(Duration::from_secs(3600));
        assert_eq!(h.count(), 2);
        let s = h.summary();
        assert!(s.max_us >= HIGHEST_US as f64 * 0.999, "{s:?}");
    }
}
