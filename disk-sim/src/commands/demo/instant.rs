//! The demo's instant recovery step: the copy-mode test failover's twin in export mode, at the
//! same point: the disks served over NBD at once (time from the request until `nbdinfo`
//! answers on every disk), their bytes read back with `nbdcopy` and checked against the
//! source, a write into the drill that the replica never sees, and the clean-up.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use appliance_api::model::{DiskMode, Format, MaterializeRequest, PointSpec};
use engine::delta::Consistency;

use super::{JOB_TIMEOUT, Run, human_duration, nbd_tools, why, why_differ};
use crate::agent::Agent;
use crate::site::Appliance;
use crate::source::SourceModel;

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
    // Every disk asked at once, as a VM's disks would be opened.
    let answers: Vec<anyhow::Result<u64>> = std::thread::scope(|scope| {
        let asks: Vec<_> = uris
            .iter()
            .map(|uri| scope.spawn(|| nbd_tools::wait_size(uri, Duration::from_secs(30))))
            .collect();
        asks.into_iter()
            .map(|ask| {
                ask.join()
                    .unwrap_or_else(|_| Err(anyhow!("nbdinfo's thread panicked")))
            })
            .collect()
    });
    let ready = requested.elapsed();
    if answers.len() != vm.geometry().len() {
        bail!(
            "the drill serves {} disks, the VM has {}",
            answers.len(),
            vm.geometry().len()
        );
    }
    for ((answer, uri), disk) in answers.into_iter().zip(&uris).zip(vm.geometry()) {
        let answered = answer?;
        if answered != disk.size_bytes {
            bail!(
                "nbdinfo --size {uri} answered {answered} bytes, the disk has {}",
                disk.size_bytes
            );
        }
    }

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
