//! What the control API says during a step (RPO lag, staging use) and the wait until every item applied what it staged, through the typed client.

use super::*;

/// What the API said during a step.
#[derive(Debug, Default, Clone)]
pub(super) struct ApiSamples {
    /// `rpo_lag_ms` of every item at every sample that had a point.
    pub(super) rpo_lag_ms: Vec<f64>,
    /// Largest sum of `cache_used_bytes` over the items at one sample.
    pub(super) staging_peak_bytes: u64,
    pub(super) samples: u64,
    pub(super) errors: u64,
}

pub(super) fn sample_api(api: &Api, items: &[String], start: Instant, end: Instant) -> ApiSamples {
    let mut out = ApiSamples::default();
    let mut next = start + API_SAMPLE_EVERY;
    while next < end {
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        next += API_SAMPLE_EVERY;
        let Ok(list) = api.client().items() else {
            out.errors += 1;
            continue;
        };
        out.samples += 1;
        let mut staging = 0;
        for view in list.iter().filter(|v| items.contains(&v.id)) {
            if let Some(lag) = view.rpo_lag_ms {
                out.rpo_lag_ms.push(lag as f64);
            }
            staging += view.cache_used_bytes;
        }
        out.staging_peak_bytes = out.staging_peak_bytes.max(staging);
    }
    out
}

/// Waits until every item has applied what it staged; returns how long that took.
pub(super) fn wait_applied(api: &Api, items: &[String], timeout: Duration) -> Result<Duration> {
    let started = Instant::now();
    loop {
        let list = api.client().items()?;
        let behind: Vec<&ItemView> = list
            .iter()
            .filter(|v| items.contains(&v.id))
            .filter(|v| v.applied_seq < v.staged_seq)
            .collect();
        if behind.is_empty() {
            return Ok(started.elapsed());
        }
        // An item whose apply stopped will never catch up: say why now, not at the timeout.
        if let Some(failed) = behind.iter().find(|v| !v.is_healthy()) {
            bail!("item {} stopped applying: {}", failed.name, failed.health);
        }
        if started.elapsed() > timeout {
            bail!(
                "{} items still applying after {timeout:?}; the first: {:?}",
                behind.len(),
                behind[0]
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
