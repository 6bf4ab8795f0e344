//! The [`Pacer`]: how long to wait before each op so that the churn holds a target rate.

use std::time::Duration;

use super::clock::Clock;
use super::spec::{MAX_WRITE_BYTES, NS_PER_S, WorkloadSpec};

/// Paces ops to a target churn: a token bucket of `target` bytes per second holding at most
/// `burst` bytes (it starts full); and, for a pacer made by [`Pacer::for_workload`], the
/// workload clock's schedule: an op never goes before its workload time ([`Workload::op_at`],
/// counted from the real time of the first op), so idle gaps become real idle time and bursts
/// run at the burst rate as long as the bucket lasts.
///
/// A target of 0 is unlimited: every delay is zero and nothing ever sleeps.
///
/// Over any interval the bytes let through are at most `burst + target × interval`, so the
/// average rate of a long run converges to at most the target; a caller that keeps up (sleeps
/// the delays, and ops take no longer than the delays) gets the target within
/// `burst / (target × run time)`. A caller that falls behind is given at most `burst` bytes
/// of catch-up; one that falls behind the schedule by more than the bucket's time
/// (`burst / target`) has the schedule moved: lost time is not made up.
#[derive(Debug, Clone)]
pub struct Pacer {
    target_bytes_per_s: u64,
    burst_bytes: u64,
    /// Tokens, in bytes × 10⁹ (so that a nanosecond refills `target` units).
    tokens: u128,
    /// Time the tokens were last brought up to date (and no op may go before).
    last: Option<Duration>,
    /// Whether ops follow the workload clock's schedule.
    schedule: bool,
    /// Real time of workload time zero.
    origin: Option<Duration>,
}

impl Pacer {
    /// A pacer for `target_bytes_per_s` (0 = unlimited) with a bucket of 100 ms of the
    /// target, at least [`MAX_WRITE_BYTES`].
    pub fn new(target_bytes_per_s: u64) -> Self {
        let burst_bytes = (target_bytes_per_s / 10).max(u64::from(MAX_WRITE_BYTES));
        Self {
            target_bytes_per_s,
            burst_bytes,
            tokens: u128::from(burst_bytes) * NS_PER_S,
            last: None,
            schedule: false,
            origin: None,
        }
    }

    /// A pacer that never waits.
    pub fn unlimited() -> Self {
        Self::new(0)
    }

    /// A pacer for a workload: its churn as the target, following its clock's schedule,
    /// with a bucket that holds a whole burst of the bursty pattern (the churn of one
    /// burst-and-idle cycle), so that bursts run at the burst rate.
    pub fn for_workload(spec: &WorkloadSpec) -> Self {
        let mut pacer = Self::new(spec.churn_bytes_per_s);
        pacer.schedule = true;
        match spec.bursts() {
            Some(burst) => {
                let cycle_ms = u128::from(burst.burst_ms) + u128::from(burst.idle_ms);
                let cycle_bytes = u128::from(spec.churn_bytes_per_s) * cycle_ms / 1000;
                let burst_bytes = u64::try_from(cycle_bytes).unwrap_or(u64::MAX);
                let at_least = pacer.burst_bytes;
                pacer.with_burst_bytes(burst_bytes.max(at_least))
            }
            None => pacer,
        }
    }

    /// This pacer with a bucket of `burst_bytes` (at least 1), full.
    pub fn with_burst_bytes(mut self, burst_bytes: u64) -> Self {
        self.burst_bytes = burst_bytes.max(1);
        self.tokens = u128::from(self.burst_bytes) * NS_PER_S;
        self
    }

    /// The target, bytes per second (0 = unlimited).
    pub fn target_bytes_per_s(&self) -> u64 {
        self.target_bytes_per_s
    }

    /// The bucket's size, bytes.
    pub fn burst_bytes(&self) -> u64 {
        self.burst_bytes
    }

    /// Whether this pacer never waits.
    pub fn is_unlimited(&self) -> bool {
        self.target_bytes_per_s == 0
    }

    /// Whether this pacer follows the workload clock's schedule.
    pub fn follows_schedule(&self) -> bool {
        self.schedule
    }

    /// How long to wait, from `now`, before an op of `bytes` (token bucket only). The op is
    /// charged as if issued at `now` + the delay.
    pub fn delay(&mut self, now: Duration, bytes: u64) -> Duration {
        self.delay_at(now, Duration::ZERO, bytes)
    }

    /// How long to wait, from `now`, before an op of `bytes` whose workload time is `op_at`
    /// ([`Workload::op_at`]): the token bucket's wait and, if this pacer follows the schedule,
    /// not before `op_at` after the real time of workload time zero (the real time of the
    /// first call minus its `op_at`).
    pub fn delay_at(&mut self, now: Duration, op_at: Duration, bytes: u64) -> Duration {
        if self.is_unlimited() {
            return Duration::ZERO;
        }
        let rate = u128::from(self.target_bytes_per_s);
        let capacity = u128::from(self.burst_bytes) * NS_PER_S;
        // A caller that did not wait out the last delay is measured from where it should be.
        let base = self.last.map_or(now, |last| last.max(now));
        let op_at = if self.schedule { op_at } else { Duration::ZERO };
        let origin = *self.origin.get_or_insert(base.saturating_sub(op_at));
        let slack = Duration::from_nanos(u64::try_from(capacity / rate).unwrap_or(u64::MAX));
        let origin = if origin.saturating_add(op_at).saturating_add(slack) < base {
            // Behind the schedule by more than the bucket: move the schedule.
            *self.origin.insert(base.saturating_sub(op_at))
        } else {
            origin
        };
        if let Some(last) = self.last {
            let refill = (base - last).as_nanos().saturating_mul(rate);
            self.tokens = self.tokens.saturating_add(refill).min(capacity);
        }
        let need = u128::from(bytes) * NS_PER_S;
        let bucket_wait_ns = need.saturating_sub(self.tokens).div_ceil(rate);
        let schedule_wait_ns = origin.saturating_add(op_at).saturating_sub(base).as_nanos();
        let wait_ns = bucket_wait_ns.max(schedule_wait_ns);
        let wait = Duration::from_nanos(u64::try_from(wait_ns).unwrap_or(u64::MAX));
        // Refilled up to the op's time (never past the bucket, unless one op needs more),
        // then charged.
        self.tokens = self
            .tokens
            .saturating_add(wait_ns.saturating_mul(rate))
            .min(capacity.max(need))
            - need;
        self.last = Some(base + wait);
        (base - now) + wait
    }

    /// Waits on `clock` as [`Pacer::delay_at`] says (never calls `sleep` for a zero delay);
    /// returns the wait.
    pub fn pace(&mut self, clock: &mut impl Clock, op_at: Duration, bytes: u64) -> Duration {
        let wait = self.delay_at(clock.now(), op_at, bytes);
        if !wait.is_zero() {
            clock.sleep(wait);
        }
        wait
    }
}
