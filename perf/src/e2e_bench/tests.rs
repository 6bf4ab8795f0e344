//! The e2e benchmark's pure parts: tracking, pacing, percentiles, the anchors paragraph.

use super::*;

#[test]
fn tracker_lags_cover_acks_before_and_after_the_push() {
    let start = Instant::now();
    let end = start + Duration::from_secs(60);
    let mut t = Tracker::new(start, end);
    t.submitted(5, start, 100);
    t.submitted(6, start, 0);
    t.submitted(7, start, 50);
    t.acked(6, start + Duration::from_millis(10));
    assert_eq!(t.pending.len(), 1);
    assert_eq!(t.acked_frames, 2);
    assert_eq!(t.acked_bytes_in_window, 100);
    // An ack that beats the writer's push: recorded at once.
    t.acked(8, start + Duration::from_millis(20));
    t.submitted(8, start + Duration::from_millis(15), 10);
    assert!(t.pending.is_empty());
    assert_eq!(t.acked_frames, 4);
    assert_eq!(t.acked_bytes_in_window, 160);
    let s = t.lag.summary();
    assert!((9_000.0..=11_000.0).contains(&s.p50_us), "{s:?}");
    // Acks after the window count for lag, not for achieved churn.
    t.reset(start, start);
    t.submitted(9, start, 1000);
    t.acked(9, start + Duration::from_millis(1));
    assert_eq!(t.acked_bytes_in_window, 0);
    assert_eq!(t.lag.count(), 1);
}

#[test]
fn a_full_ring_drops_the_oldest_and_counts_it() {
    let start = Instant::now();
    let mut t = Tracker::new(start, start);
    for seq in 0..RING_FRAMES as u64 + 3 {
        t.submitted(seq, start, 1);
    }
    assert_eq!(t.dropped, 3);
    assert_eq!(t.pending.front().map(|p| p.seq), Some(3));
}

fn step(offered: f64, achieved: f64, lag_ms: u64) -> Step {
    let mut lag = LatencyHistogram::new();
    for _ in 0..100 {
        lag.observe(Duration::from_millis(lag_ms));
    }
    Step {
        offered_mb_s: offered,
        achieved_mb_s: achieved,
        submitted_mb_s: achieved,
        lag,
        row: Row::engine("x", 0, 0, 1.0),
    }
}

#[test]
fn headline_is_the_highest_sustained_step_and_names_misses_below() {
    let run = DiskCountRun {
        disks: 8,
        steps: vec![
            step(8.0, 8.0, 10),
            step(96.0, 80.0, 700),
            step(384.0, 383.0, 50),
            step(768.0, 760.0, 1_200),
        ],
        memory: Memory::default(),
        peak_reset: true,
        skipped_steps: Vec::new(),
    };
    assert_eq!(run.headline().map(|s| s.offered_mb_s), Some(384.0));
    let missed: Vec<f64> = run
        .missed_below_headline()
        .iter()
        .map(|s| s.offered_mb_s)
        .collect();
    assert_eq!(missed, vec![96.0]);
    let none = DiskCountRun {
        steps: vec![step(8.0, 7.0, 10)],
        ..run
    };
    assert!(none.headline().is_none());
    assert!(none.missed_below_headline().is_empty());
}

#[test]
fn plans_and_scratch() {
    let quick = E2ePlan::new(true, false);
    assert_eq!(quick.disk_counts, vec![1, 8, 31]);
    // 3 steps × 3 s per disk count, well under the minute the quick run allows.
    assert!(quick.steps_mb_s.len() as f64 * quick.step.as_secs_f64() <= 15.0);
    assert!(quick.scratch_bytes() < 6 << 30);
    let tiny = E2ePlan::new(false, true);
    assert_eq!(tiny.disk_counts, vec![1, 2]);
    assert_eq!(tiny.steps_mb_s.len(), 2);
    let full = E2ePlan::new(false, false);
    assert!(full.steps_mb_s.len() > quick.steps_mb_s.len() && full.step > quick.step);
    assert!(full.scratch_bytes() <= 24 << 30);
}

#[test]
fn proc_readers_work_on_this_process() {
    let pid = std::process::id();
    let m = memory_of(pid).unwrap();
    assert!(m.hwm_kib > 0 && m.rss_kib > 0);
    let cpu = cpu_of(pid).unwrap();
    assert!(cpu.total_s() >= 0.0);
    assert_eq!(percentile(&mut [3.0, 1.0, 2.0], 50.0), Some(2.0));
    assert_eq!(percentile(&mut [3.0, 1.0, 2.0], 100.0), Some(3.0));
    assert_eq!(percentile(&mut [], 50.0), None);
}
