//! The workspace's one wall-clock helper: now, in nanoseconds since the Unix epoch.
//!
//! Recovery-point times, job times and the API's timestamps all use this scale. Elapsed-time
//! measurements use `std::time::Instant` instead; this clock can step.

use std::time::{SystemTime, UNIX_EPOCH};

/// Now, in ns since the Unix epoch (0 if the clock is set before it; saturates in 2554).
pub fn now_unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn now_is_after_2020_and_moves_forward() {
        let a = now_unix_ns();
        assert!(a > 1_577_836_800_000_000_000, "clock reads {a}");
        assert!(now_unix_ns() >= a);
    }
}
