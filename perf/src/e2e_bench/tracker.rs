//! The lag tracker: submit instants of every frame in a bounded ring, and an ack observer that turns acknowledgements into lag samples.

use super::*;

/// A frame waiting for its acknowledgement.
#[derive(Debug, Clone, Copy)]
pub(super) struct Pending {
    pub(super) seq: u64,
    pub(super) submitted: Instant,
    /// Data bytes (0 for a bookmark).
    pub(super) bytes: u64,
}

/// One agent's frames of the current step: submit instants by seq, and what the acks made of
/// them. Shared between the writer thread and the agent's ack observer.
#[derive(Debug)]
pub(super) struct Tracker {
    pub(super) pending: VecDeque<Pending>,
    pub(super) acked: Option<u64>,
    /// Lag of every acknowledged frame of the step (writes and bookmarks).
    pub(super) lag: LatencyHistogram,
    /// The step's window: acks inside it count towards achieved churn.
    pub(super) window: (Instant, Instant),
    pub(super) acked_bytes_in_window: u64,
    pub(super) acked_frames: u64,
    pub(super) series: IntervalBytes,
    /// Submit instants pushed out of a full ring (their lag is lost); 0 in every run so far.
    pub(super) dropped: u64,
}

impl Tracker {
    pub(super) fn new(start: Instant, end: Instant) -> Self {
        Self {
            pending: VecDeque::with_capacity(RING_FRAMES),
            acked: None,
            lag: LatencyHistogram::new(),
            window: (start, end),
            acked_bytes_in_window: 0,
            acked_frames: 0,
            series: IntervalBytes::starting_at(start),
            dropped: 0,
        }
    }

    /// Starts a new step (nothing may be outstanding: the previous step was drained).
    pub(super) fn reset(&mut self, start: Instant, end: Instant) {
        self.pending.clear();
        self.lag = LatencyHistogram::new();
        self.window = (start, end);
        self.acked_bytes_in_window = 0;
        self.acked_frames = 0;
        self.series = IntervalBytes::starting_at(start);
        self.dropped = 0;
    }

    /// Frame `seq` was submitted at `submitted`. Its ack may already have come (the ack
    /// thread can beat the writer to this lock): then its lag ends now.
    pub(super) fn submitted(&mut self, seq: u64, submitted: Instant, bytes: u64) {
        if self.acked.is_some_and(|acked| seq <= acked) {
            self.record(Instant::now(), submitted, bytes);
            return;
        }
        if self.pending.len() == RING_FRAMES {
            self.pending.pop_front();
            self.dropped += 1;
        }
        self.pending.push_back(Pending {
            seq,
            submitted,
            bytes,
        });
    }

    /// The appliance acknowledged every frame through `seq` at `at`.
    pub(super) fn acked(&mut self, seq: u64, at: Instant) {
        self.acked = Some(self.acked.map_or(seq, |a| a.max(seq)));
        while let Some(front) = self.pending.front().copied() {
            if front.seq > seq {
                break;
            }
            self.pending.pop_front();
            self.record(at, front.submitted, front.bytes);
        }
    }

    pub(super) fn record(&mut self, at: Instant, submitted: Instant, bytes: u64) {
        self.lag.observe(at.saturating_duration_since(submitted));
        self.acked_frames += 1;
        let (start, end) = self.window;
        if bytes > 0 && at >= start && at < end {
            self.acked_bytes_in_window += bytes;
            self.series.add(at, bytes);
        }
    }
}

pub(super) fn lock(tracker: &Mutex<Tracker>) -> MutexGuard<'_, Tracker> {
    tracker.lock().unwrap_or_else(|e| e.into_inner())
}
