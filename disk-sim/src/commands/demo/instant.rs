//! The demo's instant recovery steps (export mode), each timed from the request until `nbdinfo`
//! answers on every disk: the copy-mode test failover's twin at the same point (bytes read
//! back with `nbdcopy` and checked against the source, a write into the drill that the
//! replica never sees, the clean-up), and a failover the VM runs on at once (it writes through
//! NBD while the job copies; commit; the files hold the point plus the write).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use appliance_api::model::{
    CopyState, DiskMode, FailoverRequest, Format, ItemState, MaterializeRequest, PointSpec,
};
use engine::delta::Consistency;

use super::{JOB_TIMEOUT, Run, human_duration, nbd_tools, paths, why, why_differ};
use crate::site::Appliance;
use crate::source::SourceModel;
use source_agent::sender::Agent;

/// Where the drill's write goes on the OS disk, and its length.
const DRILL_WRITE_OFFSET_BYTES: u64 = 1 << 20;
const DRILL_WRITE_BYTES: u64 = 64 << 10;
/// The drill write's byte (not a byte the demo's workload writes in runs).
const DRILL_WRITE_BYTE: u8 = 0x5a;

/// What the caller knows when the step starts.
pub(super) struct TwinOf<'a> {
    /// Site B (the recovery site).
    pub appliance: &'a Appliance,
    /// The item, 32 hex digits.
    pub item: &'a str,
    /// The point the copy-mode test failover used.
    pub point: u64,
    /// How long the copy-mode test failover took from request until its disks were usable.
    pub copy_ready: Duration,
    /// Scratch directory for the disks read back (removed afterwards).
    pub scratch: PathBuf,
}

/// Test failover in export mode at `twin.point`, replication running meanwhile; one step line.
pub(super) fn test_failover_export(
    run: &mut Run<'_>,
    twin: &TwinOf<'_>,
    vm: &mut SourceModel,
    source: &Agent,
) -> anyhow::Result<()> {
    let b = twin.appliance;
    let requested = Instant::now();
    b.test_failover(
        twin.item,
        &MaterializeRequest {
            point: PointSpec::Id(twin.point),
            target_dir: String::new(),
            format: Format::Raw,
            mode: DiskMode::Export,
        },
    )?;
    let drill = b
        .item(twin.item)?
        .test_failover
        .context("the test failover in export mode left no record on the item")?;
    let export_id = drill
        .export_id
        .clone()
        .context("the test failover in export mode names no export")?;
    let uris = drill.files.clone();
    let sizes: Vec<u64> = vm.geometry().iter().map(|g| g.size_bytes).collect();
    nbd_tools::wait_all(&uris, &sizes, Duration::from_secs(30))?;
    let ready = requested.elapsed();

    // The VM keeps writing on site A while the drill runs on site B.
    let mut during = 0;
    for _ in 0..40 {
        during += vm.write(Some(source))?;
    }
    let moving = vm.bookmark_labeled(source, Consistency::Crash, "during drill")?;

    std::fs::create_dir_all(&twin.scratch)?;
    let copies: Vec<PathBuf> = (0..uris.len())
        .map(|i| twin.scratch.join(format!("disk-{i}.raw")))
        .collect();
    for (uri, copy) in uris.iter().zip(&copies) {
        nbd_tools::copy_out(uri, copy)?;
    }
    let exact = vm.verify_files(twin.point, &copies);

    // A write into the drill: read back through NBD; the replica must never see it.
    let os_uri = uris.first().context("the export has no disks")?;
    nbd_tools::write_pattern(
        os_uri,
        DRILL_WRITE_OFFSET_BYTES,
        DRILL_WRITE_BYTES,
        DRILL_WRITE_BYTE,
    )?;
    let after = twin.scratch.join("disk-0-after-write.raw");
    nbd_tools::copy_out(os_uri, &after)?;
    let read_back = only_the_write_changed(&copies[0], &after);
    let written_bytes = b
        .export_view(&export_id)?
        .disks
        .first()
        .map_or(0, |d| d.written_bytes);

    // Clean-up: the export is gone, its URIs answer no more.
    b.test_failover_cleanup(twin.item)?;
    let gone = b.export_view(&export_id).is_err()
        && b.item(twin.item)?.test_failover.is_none()
        && nbd_tools::wait_size(os_uri, Duration::ZERO).is_err();
    std::fs::remove_dir_all(&twin.scratch)?;

    // Replication moved on, and the replicas equal the source: the drill's write is not there.
    source.flush(Duration::from_secs(120))?;
    b.wait_point(twin.item, moving, JOB_TIMEOUT)?;
    let replicas: Vec<PathBuf> = (0..uris.len())
        .map(|i| {
            b.data_dir()
                .join("items")
                .join(twin.item)
                .join(format!("replicas/disk-{i}.img"))
        })
        .collect();
    let differ = vm.verify_current(&replicas)?;
    run.ready = Some(ready);
    run.step(
        "test failover in export mode at the same point (NBD drill)",
        during,
        exact.is_ok()
            && read_back.is_ok()
            && written_bytes >= DRILL_WRITE_BYTES
            && gone
            && differ.is_empty(),
        format!(
            "disks ready in {} vs {} copying; 3 exports equal the source at point {} \
             (nbdcopy); drill wrote {} KiB, read back, replica untouched; cleaned up, URIs \
             dead; replication moved on to point {moving}{}{}{}",
            human_duration(ready),
            human_duration(twin.copy_ready),
            twin.point,
            DRILL_WRITE_BYTES >> 10,
            why(&exact),
            why(&read_back),
            why_differ(&differ),
        ),
    )
}

/// What the failover step knows when it starts.
pub(super) struct FailoverOf<'a> {
    /// The recovery site.
    pub appliance: &'a Appliance,
    /// The item, 32 hex digits; the source VM is shut down and its last point applied.
    pub item: &'a str,
    /// That last point: the source's disks now.
    pub point: u64,
    /// How long the copy-mode failover took from request until its disks were usable.
    pub copy_ready: Duration,
    /// Where the failover's disk files go.
    pub target_dir: PathBuf,
}

/// Failover in export mode: the VM runs on the export at once (it writes through NBD while the
/// job copies the point and its writes into the target files); commit once the copy is done;
/// the files hold the point plus the VM's write, and the export serves them. One step line.
pub(super) fn failover_export(
    run: &mut Run<'_>,
    failover: &FailoverOf<'_>,
    vm: &SourceModel,
) -> anyhow::Result<()> {
    let b = failover.appliance;
    let requested = Instant::now();
    let job = b.failover(
        failover.item,
        &FailoverRequest {
            point: PointSpec::Id(failover.point),
            target_dir: failover.target_dir.display().to_string(),
            format: Format::Raw,
            source_shut_down: true,
            mode: DiskMode::Export,
        },
    )?;
    // The item is failed over as soon as the export serves the point.
    let export_id = loop {
        let view = b.item(failover.item)?;
        if view.state == ItemState::FailedOver
            && let Some(id) = view.failover.and_then(|f| f.export_id)
        {
            break id;
        }
        if requested.elapsed() > JOB_TIMEOUT {
            bail!(
                "the failover in export mode did not hand the item over within {JOB_TIMEOUT:?} \
                 (state {})",
                view.state
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let export = b.export_view(&export_id)?;
    let uris: Vec<String> = export.disks.iter().map(|d| d.uri.clone()).collect();
    let sizes: Vec<u64> = vm.geometry().iter().map(|g| g.size_bytes).collect();
    nbd_tools::wait_all(&uris, &sizes, Duration::from_secs(30))?;
    let ready = requested.elapsed();

    // The VM runs on the export: its first write, while the job copies.
    let os_uri = uris.first().context("the export has no disks")?;
    let copy_at_write = b.export_view(&export_id)?.copy;
    nbd_tools::write_pattern(
        os_uri,
        DRILL_WRITE_OFFSET_BYTES,
        DRILL_WRITE_BYTES,
        DRILL_WRITE_BYTE,
    )?;
    let mut shown = super::progress("failover (export mode)");
    let done = b.wait_job(job.id, JOB_TIMEOUT, &mut shown)?;
    let copied = super::job_duration(&done);
    let view = b.commit(failover.item)?;
    let committed = view.state == ItemState::Committed;
    let files = paths(view.failover.as_ref());

    // The files: the point, plus the VM's write on the OS disk; the export serves them now.
    let files_ok = (|| -> anyhow::Result<()> {
        let os_file = files
            .first()
            .context("the committed failover lists no files")?;
        let os_source = vm.files().first().context("the VM has no disks")?;
        only_the_write_changed(os_source, os_file)?;
        // Disk 0 differs by the write (checked above); every other disk equals the source.
        let differ: Vec<(usize, String)> = vm
            .verify_current(&files)?
            .into_iter()
            .filter(|(disk, _)| *disk != 0)
            .collect();
        if files.len() != vm.files().len() || !differ.is_empty() {
            bail!("{} files{}", files.len(), why_differ(&differ));
        }
        // Beside the target directory, which belongs to the appliance.
        let served = failover.target_dir.with_extension("served-disk-0.raw");
        nbd_tools::copy_out(os_uri, &served)?;
        let same = std::fs::read(&served)? == std::fs::read(os_file)?;
        std::fs::remove_file(&served)?;
        if !same {
            bail!("the export does not serve {}", os_file.display());
        }
        Ok(())
    })();
    run.ready = Some(ready);
    run.step(
        "failover in export mode: the VM runs on the export at once",
        DRILL_WRITE_BYTES,
        committed && files_ok.is_ok(),
        format!(
            "VM could start after {} vs {} copying; it wrote {} KiB through NBD (copy {}); \
             copy done after {}; committed; 3 files equal the source at point {} plus the \
             VM's write, and the export serves them{}",
            human_duration(ready),
            human_duration(failover.copy_ready),
            DRILL_WRITE_BYTES >> 10,
            copy_at_write.map_or("state unknown", |c| match c {
                CopyState::Copying => "still copying",
                CopyState::Done => "already done",
                CopyState::Failed => "failed",
            }),
            human_duration(copied),
            failover.point,
            why(&files_ok),
        ),
    )
}

/// Checks that `after` equals `before` except the drill's write, which reads as its pattern.
fn only_the_write_changed(before: &Path, after: &Path) -> anyhow::Result<()> {
    let before_bytes = std::fs::read(before)?;
    let mut after_bytes = std::fs::read(after)?;
    if before_bytes.len() != after_bytes.len() {
        bail!(
            "the disk read back after the write has {} bytes, before it {}",
            after_bytes.len(),
            before_bytes.len()
        );
    }
    let start = DRILL_WRITE_OFFSET_BYTES as usize;
    let end = start + DRILL_WRITE_BYTES as usize;
    let Some(written) = after_bytes.get_mut(start..end) else {
        bail!("the disk is smaller than the drill's write at {start}..{end}");
    };
    if let Some(at) = written.iter().position(|&b| b != DRILL_WRITE_BYTE) {
        bail!(
            "the drill's write does not read back: byte {} differs",
            start + at
        );
    }
    written.copy_from_slice(&before_bytes[start..end]);
    if let Some(at) = before_bytes
        .iter()
        .zip(&after_bytes)
        .position(|(x, y)| x != y)
    {
        bail!("the drill's write changed byte {at}, outside what it wrote");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

    use super::*;

    fn images(dir: &Path, patch: impl Fn(&mut [u8])) -> (PathBuf, PathBuf) {
        let before: Vec<u8> = (0..(2u32 << 20)).map(|i| (i % 251) as u8).collect();
        let mut after = before.clone();
        patch(&mut after);
        let (b, a) = (dir.join("before"), dir.join("after"));
        std::fs::write(&b, before).unwrap();
        std::fs::write(&a, after).unwrap();
        (b, a)
    }

    const WRITE: std::ops::Range<usize> =
        DRILL_WRITE_OFFSET_BYTES as usize..(DRILL_WRITE_OFFSET_BYTES + DRILL_WRITE_BYTES) as usize;

    #[test]
    fn the_write_alone_passes_anything_else_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let (b, a) = images(dir.path(), |d| d[WRITE].fill(DRILL_WRITE_BYTE));
        only_the_write_changed(&b, &a).unwrap();

        let (b, a) = images(dir.path(), |_| {});
        let error = only_the_write_changed(&b, &a).unwrap_err().to_string();
        assert!(error.contains("does not read back"), "{error}");

        let (b, a) = images(dir.path(), |d| {
            d[WRITE].fill(DRILL_WRITE_BYTE);
            d[7] ^= 1;
        });
        let error = only_the_write_changed(&b, &a).unwrap_err().to_string();
        assert!(error.contains("changed byte 7,"), "{error}");

        let (b, a) = images(dir.path(), |d| d[WRITE].fill(DRILL_WRITE_BYTE));
        std::fs::File::options()
            .write(true)
            .open(&a)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let error = only_the_write_changed(&b, &a).unwrap_err().to_string();
        assert!(error.contains("has 1048576 bytes"), "{error}");
    }
}
