//! Throughput over time: the bytes a timed section moved, counted into fixed intervals.
//!
//! ```text
//!  IntervalBytes::starting_now() ── add(at, bytes) / add_total(at, total) … ──► finish(end)
//!      bins[(at − start) / 100 ms] += bytes                                       │
//!                                                     Intervals { interval_s, mib_s[] } ◄┘
//! ```
//!
//! Counting is one subtraction, one division and one add per event, so it can sit on the
//! engine's completion path. A last interval shorter than a quarter of [`INTERVAL`] is merged
//! into the one before (a few ms of tail would otherwise plot as a spike or a dip).

use std::time::{Duration, Instant};

use serde::Serialize;

/// Length of one interval.
pub const INTERVAL: Duration = Duration::from_millis(100);

const MIB: f64 = 1024.0 * 1024.0;

/// Throughput per interval of a run, for the throughput-over-time plots.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Intervals {
    /// Nominal interval length, seconds.
    pub interval_s: f64,
    /// `(end of the interval, s since the start; MiB/s in it)`, in time order. fio's averaging
    /// windows are not always regular, hence the explicit times.
    pub samples: Vec<(f64, f64)>,
}

/// Bytes counted per [`INTERVAL`] since a start instant.
#[derive(Debug, Clone)]
pub struct IntervalBytes {
    start: Instant,
    bins: Vec<u64>,
    total: u64,
}

impl Default for IntervalBytes {
    fn default() -> Self {
        Self::starting_now()
    }
}

impl IntervalBytes {
    /// Counting from now.
    pub fn starting_now() -> Self {
        Self {
            start: Instant::now(),
            bins: Vec::new(),
            total: 0,
        }
    }

    /// Counting from `start`.
    pub fn starting_at(start: Instant) -> Self {
        Self {
            start,
            bins: Vec::new(),
            total: 0,
        }
    }

    /// Adds the bins of `other`, which counted from the same start.
    pub fn merge(&mut self, other: &Self) {
        if other.bins.len() > self.bins.len() {
            self.bins.resize(other.bins.len(), 0);
        }
        for (mine, theirs) in self.bins.iter_mut().zip(&other.bins) {
            *mine += theirs;
        }
        self.total += other.total;
    }

    /// Counts `bytes` done at `at`.
    pub fn add(&mut self, at: Instant, bytes: u64) {
        let index =
            (at.saturating_duration_since(self.start).as_nanos() / INTERVAL.as_nanos()) as usize;
        if index >= self.bins.len() {
            self.bins.resize(index + 1, 0);
        }
        self.bins[index] += bytes;
        self.total += bytes;
    }

    /// Counts progress given as a running total (e.g. a progress callback's "bytes done").
    pub fn add_total(&mut self, at: Instant, total_bytes: u64) {
        let delta = total_bytes.saturating_sub(self.total);
        self.add(at, delta);
    }

    /// MiB/s per interval from the start to `end`.
    pub fn finish(&self, end: Instant) -> Intervals {
        let interval_s = INTERVAL.as_secs_f64();
        let span_s = end.saturating_duration_since(self.start).as_secs_f64();
        let count = ((span_s / interval_s).ceil() as usize).max(self.bins.len());
        let mut samples: Vec<(f64, f64)> = Vec::with_capacity(count);
        let mut prev: Option<(u64, f64)> = None;
        for i in 0..count {
            let bytes = self.bins.get(i).copied().unwrap_or(0);
            let from_s = i as f64 * interval_s;
            let secs = (span_s - from_s).clamp(0.0, interval_s);
            let last = i + 1 == count;
            if last && i > 0 && secs < interval_s / 4.0 {
                let (prev_bytes, prev_secs) = prev.unwrap_or((0, interval_s));
                samples.pop();
                let rate = (prev_bytes + bytes) as f64 / MIB / (prev_secs + secs).max(1e-9);
                samples.push((from_s + secs, rate));
                break;
            }
            samples.push((from_s + secs, bytes as f64 / MIB / secs.max(1e-9)));
            prev = Some((bytes, secs));
        }
        Intervals {
            interval_s,
            samples,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_by_interval_and_merges_a_short_tail() {
        let start = Instant::now();
        let mut s = IntervalBytes {
            start,
            bins: Vec::new(),
            total: 0,
        };
        s.add(start + Duration::from_millis(10), 1 << 20);
        s.add(start + Duration::from_millis(150), 1 << 20);
        s.add_total(start + Duration::from_millis(190), 3 << 20);
        // 0.21 s: two full intervals and a 10 ms tail merged into the second.
        let i = s.finish(start + Duration::from_millis(210));
        let rates: Vec<f64> = i.samples.iter().map(|s| s.1).collect();
        assert_eq!(rates.len(), 2, "{i:?}");
        assert!((rates[0] - 10.0).abs() < 1e-6, "{i:?}");
        assert!((rates[1] - 2.0 / 0.11).abs() < 1e-6, "{i:?}");
        assert!((i.samples[1].0 - 0.21).abs() < 1e-9, "{i:?}");
        // 0.25 s: the 50 ms tail stands on its own.
        let i = s.finish(start + Duration::from_millis(250));
        assert_eq!(i.samples.len(), 3, "{i:?}");
        assert!((i.samples[1].1 - 20.0).abs() < 1e-6, "{i:?}");
        assert!(i.samples[2].1.abs() < 1e-9, "{i:?}");
    }
}
