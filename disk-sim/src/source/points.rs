//! An item's recovery points checked through the control API against the source model's
//! digests: a test failover at every retained point, a failover to the latest.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use appliance_api::model::{
    FailoverRequest, Format, ItemState, MaterializeRequest, Materialized, PointSpec,
};

use super::verify;
use crate::site::Api;

/// A point (or the final state) whose disk differs from the model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("point {point}, disk {disk}: {why}")]
pub struct PointMismatch {
    /// The point id.
    pub point: u64,
    /// The disk.
    pub disk: usize,
    /// What differs.
    pub why: String,
}

/// What [`verify_points`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PointCheck {
    /// Points retained by the appliance.
    pub retained: Vec<u64>,
    /// Bookmarks expected among them (the newest `keep_points`).
    pub expected: usize,
    /// Expected bookmarks without a point.
    pub missing: Vec<u64>,
    /// Points verified equal to the model.
    pub verified: usize,
    /// Listed points older than the expected ones that retention pruned before their test
    /// failover could pin them (retention prunes lazily, so a listing can hold more than
    /// `keep_points` points for a while).
    pub pruned: Vec<u64>,
    /// Disks of points that differ from the model.
    pub mismatches: Vec<PointMismatch>,
}

/// Verifies every retained point of `item` through the API: a test failover at the point
/// (raw) into `restore/point-<id>`, each disk's digest compared with the model's at that
/// bookmark, then cleanup (the files are deleted). Points not made from a bookmark of the
/// model are compared with `final_digests` when given, else reported as mismatches.
pub fn verify_points(
    api: &Api,
    item: &str,
    points: &BTreeMap<u64, Vec<u64>>,
    final_digests: Option<&[u64]>,
    keep_points: usize,
    restore: &Path,
    out: &mut dyn Write,
) -> anyhow::Result<PointCheck> {
    // Test failover needs `protected`, which the item reaches once its first point is
    // applied (the manager notices shortly after).
    if api.item(item)?.state == ItemState::InitialReplication {
        api.wait_state(item, ItemState::Protected, Duration::from_secs(120))?;
    }
    let retained: Vec<u64> = api.points(item)?.iter().map(|p| p.id).collect();
    let expected: Vec<u64> = points.keys().rev().take(keep_points).copied().collect();
    let missing: Vec<u64> = expected
        .iter()
        .filter(|seq| !retained.contains(seq))
        .copied()
        .collect();
    let mut check = PointCheck {
        retained: retained.clone(),
        expected: expected.len(),
        missing,
        ..PointCheck::default()
    };
    for &point in &retained {
        let Some(digests) = points.get(&point).map(Vec::as_slice).or(final_digests) else {
            check.mismatches.push(PointMismatch {
                point,
                disk: 0,
                why: "a point the source never bookmarked".into(),
            });
            continue;
        };
        let target = restore.join(format!("point-{point}"));
        let materialized = (|| -> anyhow::Result<()> {
            let request = MaterializeRequest {
                point: PointSpec::Id(point),
                target_dir: target.display().to_string(),
                format: Format::Raw,
                mode: Default::default(),
            };
            let job = api.test_failover(item, &request)?;
            api.wait_job(job.id, Duration::from_secs(300), &mut |_, _| {})?;
            Ok(())
        })();
        if let Err(error) = materialized {
            let oldest_expected = expected.last().copied().unwrap_or(u64::MAX);
            if point < oldest_expected && points.contains_key(&point) {
                // Retention removed it after the listing: not one the item must keep.
                let _ = writeln!(out, "  point {point}: pruned by retention meanwhile");
                check.pruned.push(point);
                continue;
            }
            return Err(error.context(format!("test failover at point {point}")));
        }
        let files = materialized_files(api.item(item)?.test_failover.as_ref());
        let before = check.mismatches.len();
        compare_files(&files, digests, point, &mut check.mismatches);
        if check.mismatches.len() == before {
            check.verified += 1;
        } else {
            let _ = writeln!(out, "  point {point}: MISMATCH");
        }
        api.test_failover_cleanup(item)
            .with_context(|| format!("test-failover cleanup after point {point}"))?;
    }
    Ok(check)
}

fn materialized_files(disks: Option<&Materialized>) -> Vec<PathBuf> {
    disks
        .map(|d| d.files.iter().map(PathBuf::from).collect())
        .unwrap_or_default()
}

fn compare_files(
    files: &[PathBuf],
    digests: &[u64],
    point: u64,
    mismatches: &mut Vec<PointMismatch>,
) {
    mismatches.extend(
        verify::compare_files(files, digests)
            .into_iter()
            .map(|(disk, why)| PointMismatch { point, disk, why }),
    );
}

/// Fails `item` over to point "latest" (raw) into `target`, and compares each disk with
/// `digests`. Returns the point id and the mismatches.
pub fn verify_failover_latest(
    api: &Api,
    item: &str,
    digests: &[u64],
    target: &Path,
) -> anyhow::Result<(u64, Vec<PointMismatch>)> {
    let request = FailoverRequest {
        point: PointSpec::latest(),
        target_dir: target.display().to_string(),
        format: Format::Raw,
        source_shut_down: false,
        mode: Default::default(),
    };
    let job = api.failover(item, &request)?;
    api.wait_job(job.id, Duration::from_secs(300), &mut |_, _| {})
        .context("failover to latest")?;
    let failover = api.item(item)?.failover;
    let point = failover.as_ref().map_or(0, |f| f.point_id);
    let files = materialized_files(failover.as_ref());
    let mut mismatches = Vec::new();
    compare_files(&files, digests, point, &mut mismatches);
    Ok((point, mismatches))
}
