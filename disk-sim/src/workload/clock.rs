//! Time for the [`super::Pacer`]: real ([`SystemClock`]) or simulated ([`ManualClock`]).

use std::time::{Duration, Instant};

/// Time for a [`Pacer`]: what time it is, and a way to wait.
pub trait Clock {
    /// Time since the clock's own origin.
    fn now(&self) -> Duration;
    /// Waits `duration`.
    fn sleep(&mut self, duration: Duration);
}

/// Real time: [`Instant`] since creation, [`std::thread::sleep`].
#[derive(Debug, Clone, Copy)]
pub struct SystemClock {
    origin: Instant,
}

impl SystemClock {
    /// A clock whose origin is now.
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    fn sleep(&mut self, duration: Duration) {
        std::thread::sleep(duration);
    }
}

/// A simulated clock for tests: sleeping advances it at once, and is counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ManualClock {
    now: Duration,
    sleeps: u64,
}

impl ManualClock {
    /// A clock at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves time forward (work that took time, without a sleep).
    pub fn advance(&mut self, duration: Duration) {
        self.now = self.now.saturating_add(duration);
    }

    /// How many times [`Clock::sleep`] was called.
    pub fn sleeps(&self) -> u64 {
        self.sleeps
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        self.now
    }

    fn sleep(&mut self, duration: Duration) {
        self.sleeps += 1;
        self.advance(duration);
    }
}
