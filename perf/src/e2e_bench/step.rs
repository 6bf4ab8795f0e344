//! One churn step: D writers at a rate for a while, then the drain, measured into a row.

use super::*;

/// The figures of one churn step.
#[derive(Debug, Clone)]
pub(super) struct Step {
    pub(super) offered_mb_s: f64,
    pub(super) achieved_mb_s: f64,
    pub(super) submitted_mb_s: f64,
    pub(super) lag: LatencyHistogram,
    pub(super) row: Row,
}

impl Step {
    pub(super) fn share(&self) -> f64 {
        if self.offered_mb_s > 0.0 {
            self.achieved_mb_s / self.offered_mb_s
        } else {
            0.0
        }
    }

    pub(super) fn p99(&self) -> Duration {
        Duration::from_micros(self.lag.summary().p99_us as u64)
    }

    /// Lag p99 under a second and achieved at least 95 % of offered.
    pub(super) fn sustained(&self) -> bool {
        self.lag.count() > 0 && self.p99() < LAG_GOAL && self.share() >= ACHIEVED_SHARE_GOAL
    }
}

pub(super) fn percentile(values: &mut [f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let index = ((p / 100.0) * (values.len() - 1) as f64).round() as usize;
    values.get(index).copied()
}

pub(super) fn run_step(
    disks: &mut [Disk],
    api: &Api,
    pid: u32,
    offered_mb_s: u64,
    step: Duration,
) -> Result<Step> {
    let count = disks.len();
    let rate = offered_mb_s as f64 * MB / count as f64;
    let start = Instant::now() + Duration::from_millis(20);
    let end = start + step;
    for disk in disks.iter() {
        lock(&disk.tracker).reset(start, end);
    }
    let items: Vec<String> = disks.iter().map(|d| d.item.clone()).collect();
    let appliance_cpu_before = cpu_of(pid)?;
    let agents_cpu_before = cpu::process()?;
    let (written, api_samples) = std::thread::scope(|scope| -> Result<_> {
        let sampler = scope.spawn(|| sample_api(api, &items, start, end));
        let writers: Vec<_> = disks
            .iter_mut()
            .map(|disk| scope.spawn(move || disk.write_step(rate, start, end)))
            .collect();
        let mut total = Written::default();
        for writer in writers {
            let w = writer
                .join()
                .map_err(|_| anyhow!("a writer thread panicked"))??;
            total.bytes += w.bytes;
            total.writes += w.writes;
            total.bookmarks += w.bookmarks;
        }
        let samples = sampler
            .join()
            .map_err(|_| anyhow!("the API sampler panicked"))?;
        Ok((total, samples))
    })?;
    let writers_done = Instant::now();
    for disk in disks.iter() {
        disk.drain(DRAIN_TIMEOUT)?;
    }
    let drained = Instant::now();
    let applied_after = wait_applied(api, &items, DRAIN_TIMEOUT)?;
    let appliance_cpu = cpu_of(pid)?.since(&appliance_cpu_before);
    let agents_cpu = cpu::process()?.since(&agents_cpu_before);

    let mut lag = LatencyHistogram::new();
    let mut series = IntervalBytes::starting_at(start);
    let (mut acked_bytes, mut frames, mut dropped) = (0u64, 0u64, 0u64);
    let mut retransmitted = 0;
    for disk in disks.iter() {
        let t = lock(&disk.tracker);
        if !t.pending.is_empty() {
            bail!(
                "item {}: {} frames still unacknowledged after the drain",
                disk.item,
                t.pending.len()
            );
        }
        lag.merge(&t.lag);
        series.merge(&t.series);
        acked_bytes += t.acked_bytes_in_window;
        frames += t.acked_frames;
        dropped += t.dropped;
        retransmitted += disk.agent.stats().frames_retransmitted;
    }
    let step_s = step.as_secs_f64();
    let achieved_mb_s = acked_bytes as f64 / MB / step_s;
    let submitted_mb_s = written.bytes as f64 / MB / step_s;
    let mut api_lag = api_samples.rpo_lag_ms.clone();
    let label = format!("{}, {offered_mb_s} MB/s", disks_text(count));
    let summary = lag.summary();
    let mut row = Row::engine(&label, acked_bytes, frames, step_s)
        .with_cpu(appliance_cpu)
        .with_histogram("frame lag: agent write() → durable ack", &lag)
        .with_intervals(Some(series.finish(end)))
        .with_extra("offered_mb_s", offered_mb_s as f64)
        .with_extra("achieved_mb_s", achieved_mb_s)
        .with_extra("submitted_mb_s", submitted_mb_s)
        .with_extra(
            "achieved_share",
            if offered_mb_s > 0 {
                achieved_mb_s / offered_mb_s as f64
            } else {
                0.0
            },
        )
        .with_extra(
            "lag_p99_under_1s",
            summary.count > 0 && summary.p99_us < 1e6,
        )
        .with_extra("writes", written.writes)
        .with_extra("bookmarks", written.bookmarks)
        .with_extra("frames_acked", frames)
        .with_extra("frames_retransmitted_total", retransmitted)
        .with_extra("lag_samples_dropped", dropped)
        .with_extra(
            "drain_s",
            drained
                .saturating_duration_since(writers_done)
                .as_secs_f64(),
        )
        .with_extra(
            "writers_overran_s",
            writers_done.saturating_duration_since(end).as_secs_f64(),
        )
        .with_extra("apply_caught_up_s", applied_after.as_secs_f64())
        .with_extra("agents_cpu_s", agents_cpu.total_s())
        .with_extra(
            "staging_peak_mb",
            api_samples.staging_peak_bytes as f64 / MB,
        )
        .with_extra("api_samples", api_samples.samples)
        .with_extra("api_errors", api_samples.errors);
    if let Some(p50) = percentile(&mut api_lag, 50.0) {
        row = row.with_extra("api_rpo_lag_ms_p50", p50);
    }
    if let Some(max) = percentile(&mut api_lag, 100.0) {
        row = row.with_extra("api_rpo_lag_ms_max", max);
    }
    Ok(Step {
        offered_mb_s: offered_mb_s as f64,
        achieved_mb_s,
        submitted_mb_s,
        lag,
        row,
    })
}
