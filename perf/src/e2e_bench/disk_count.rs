//! One disk count: enable D items, climb the churn ladder, read the memory, disable them.

use super::*;

/// The outcome of one D.
#[derive(Debug, Clone)]
pub(super) struct DiskCountRun {
    pub(super) disks: usize,
    pub(super) steps: Vec<Step>,
    /// The appliance's memory at the end of the run (peak since the run started, when the
    /// peak could be reset).
    pub(super) memory: Memory,
    pub(super) peak_reset: bool,
    pub(super) skipped_steps: Vec<u64>,
}

impl DiskCountRun {
    /// The highest step sustained (lag p99 < 1 s, achieved ≥ 95 % of offered).
    pub(super) fn headline(&self) -> Option<&Step> {
        self.steps
            .iter()
            .filter(|s| s.sustained())
            .max_by(|a, b| a.offered_mb_s.total_cmp(&b.offered_mb_s))
    }

    /// Steps below the headline that were not sustained (the ladder is not monotonic).
    pub(super) fn missed_below_headline(&self) -> Vec<&Step> {
        let Some(best) = self.headline() else {
            return Vec::new();
        };
        self.steps
            .iter()
            .filter(|s| s.offered_mb_s < best.offered_mb_s && !s.sustained())
            .collect()
    }
}

pub(super) fn run_disk_count(
    appliance: &Appliance,
    pid: u32,
    disks_wanted: usize,
    plan: &E2ePlan,
) -> Result<DiskCountRun> {
    let peak_reset = reset_peak_rss(pid);
    progress!(
        "e2e: {}: enabling the items and connecting their agents",
        disks_text(disks_wanted)
    );
    let mut disks = Vec::with_capacity(disks_wanted);
    for i in 0..disks_wanted {
        let name = format!("e2e-{disks_wanted}-{i:02}");
        let seed = 0xe2e0_0000 + (disks_wanted as u64) * 100 + i as u64;
        disks.push(Disk::enable(
            appliance,
            appliance.data_addr,
            &name,
            plan.disk_mib,
            seed,
        )?);
    }
    let mut steps: Vec<Step> = Vec::new();
    let mut skipped_steps = Vec::new();
    for &offered in &plan.steps_mb_s {
        if plan.stop_when_saturated
            && steps
                .last()
                .is_some_and(|s| s.share() < GIVE_UP_SHARE || s.p99() > GIVE_UP_P99)
        {
            skipped_steps.push(offered);
            continue;
        }
        let step = run_step(&mut disks, appliance, pid, offered, plan.step)
            .with_context(|| format!("e2e, {disks_wanted} disks, {offered} MB/s"))?;
        let p = step.lag.summary();
        progress!(
            "e2e: {}, offered {offered} MB/s: achieved {:.1} MB/s (submitted \
             {:.1}), lag p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            disks_text(disks_wanted),
            step.achieved_mb_s,
            step.submitted_mb_s,
            p.p50_us / 1e3,
            p.p99_us / 1e3,
            p.max_us / 1e3
        );
        steps.push(step);
    }
    let memory = memory_of(pid)?;
    progress!(
        "e2e: {}: appliance VmHWM {} MiB, VmRSS {} MiB, VmPin {} MiB; disabling the items",
        disks_text(disks_wanted),
        memory.hwm_kib >> 10,
        memory.rss_kib >> 10,
        memory.pin_kib >> 10
    );
    // Agents closed, then the items disabled, each in its own thread (the API serves them at
    // once; disabling applies what is staged and removes the replica, staging and points).
    let items: Vec<String> = disks.iter().map(|d| d.item.clone()).collect();
    std::thread::scope(|scope| -> Result<()> {
        let closing: Vec<_> = disks
            .into_iter()
            .map(|disk| {
                scope.spawn(move || {
                    disk.agent
                        .close(Duration::from_secs(60))
                        .with_context(|| format!("closing the agent of item {}", disk.item))
                })
            })
            .collect();
        for handle in closing {
            handle
                .join()
                .map_err(|_| anyhow!("closing an agent panicked"))??;
        }
        Ok(())
    })?;
    std::thread::scope(|scope| -> Result<()> {
        let api: &Api = appliance;
        let deleting: Vec<_> = items
            .iter()
            .map(|item| {
                scope.spawn(move || {
                    api.client()
                        .disable(item)
                        .with_context(|| format!("disabling item {item}"))
                })
            })
            .collect();
        for handle in deleting {
            handle
                .join()
                .map_err(|_| anyhow!("disabling an item panicked"))??;
        }
        Ok(())
    })?;
    Ok(DiskCountRun {
        disks: disks_wanted,
        steps,
        memory,
        peak_reset,
        skipped_steps,
    })
}
