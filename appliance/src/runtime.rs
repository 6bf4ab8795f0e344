//! Wiring of an item's apply worker into the appliance: start it from the data directory,
//! count what it applies for `/metrics`, stop it, and show its `apply_failed` health.
//!
//! The worker itself (its thread, its loop, how staging's commits wake it) is
//! [`engine::apply::worker`]; this file only connects it to the appliance's data directory,
//! metrics and control API.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use engine::apply::{ApplyObserver, Pins, UnappliableFrame};
pub use engine::apply::{ApplyOptions, Drained, WorkerSetup};
use engine::io::ReplicaFile;
use engine::meta::MetaStore;
use engine::staging::StagingReader;

/// What an apply worker has done, readable from any thread without a lock (for status and
/// metrics); survives the worker.
#[derive(Debug, Default)]
pub struct ApplyCounters {
    /// Data bytes written or zeroed on the replicas.
    pub applied_bytes: AtomicU64,
    /// Frames applied.
    pub applied_frames: AtomicU64,
    /// Time of each apply batch that did work (staging read, preserve, replica writes).
    pub batch_latency: crate::metrics::LatencyHistogram,
}

impl ApplyObserver for ApplyCounters {
    fn batch_applied(&self, elapsed: Duration, bytes: u64, frames: u64) {
        self.batch_latency.observe(elapsed);
        self.applied_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.applied_frames.fetch_add(frames, Ordering::Relaxed);
    }
}

pub use appliance_api::model::ApplyFailure;

/// The item's health text for an apply failure: `apply_failed: …`.
pub fn apply_failed_health(failure: &ApplyFailure, frame: &UnappliableFrame) -> String {
    format!(
        "apply_failed: {frame}; applied through seq {}. {}",
        failure.applied_seq, failure.what_to_do
    )
}

/// The worker setup of an item of the data directory (no `on_unappliable` yet).
pub fn worker_setup(
    item: &crate::store::ItemDirs,
    replicas: Vec<ReplicaFile>,
    reader: StagingReader,
    meta: Arc<MetaStore>,
    pins: Pins,
) -> anyhow::Result<WorkerSetup> {
    Ok(WorkerSetup {
        item: engine::meta::item_key(&item.header.item_id),
        disks: item.header.disks.clone(),
        replicas,
        reader,
        meta,
        preserve: Arc::new(item.preserve()?),
        on_unappliable: None,
        observer: Arc::new(()),
        pins,
    })
}

/// An item's apply thread ([`engine::apply::ApplyWorker`]) and its counters.
#[derive(Debug)]
pub struct ApplyWorker {
    worker: engine::apply::ApplyWorker,
    counters: Arc<ApplyCounters>,
}

impl ApplyWorker {
    /// Starts the thread (the setup's observer is replaced by the worker's counters). Returns
    /// once its recovery is done, or with the error that kept it from starting.
    pub fn start(
        name: &str,
        mut setup: WorkerSetup,
        options: ApplyOptions,
    ) -> anyhow::Result<Self> {
        let counters = Arc::new(ApplyCounters::default());
        setup.observer = counters.clone();
        let worker = engine::apply::ApplyWorker::start(name, setup, options)
            .context("starting the apply worker")?;
        Ok(Self { worker, counters })
    }

    /// Pins of the worker's applier: a pinned point is never pruned.
    pub fn pins(&self) -> Pins {
        self.worker.pins()
    }

    /// The worker's watermark.
    pub fn applied_seq(&self) -> u64 {
        self.worker.applied_seq()
    }

    /// Whether the worker stopped on an error (it logged the error).
    pub fn failed(&self) -> bool {
        self.worker.failed()
    }

    /// A read-only view of the worker's health that outlives it (for the control API).
    pub fn status(&self) -> WorkerStatus {
        WorkerStatus {
            status: self.worker.status(),
            counters: self.counters.clone(),
        }
    }

    /// Applies everything durable up to `target_seq`, flushes (and marks a "latest" point if
    /// asked), and joins the thread.
    pub fn drain_and_stop(self, target_seq: u64, mark_latest: bool) -> anyhow::Result<Drained> {
        Ok(self.worker.drain_and_stop(target_seq, mark_latest)?)
    }
}

/// Whether an [`ApplyWorker`] stopped on an error, its watermark and counters; cheap to
/// clone, usable from any thread.
#[derive(Debug, Clone)]
pub struct WorkerStatus {
    status: engine::apply::WorkerStatus,
    counters: Arc<ApplyCounters>,
}

impl WorkerStatus {
    /// Whether the worker stopped on an error or waits before an unappliable frame.
    pub fn failed(&self) -> bool {
        self.status.failed()
    }

    /// The error the worker stopped on (it names the disk and the offset for replica I/O).
    pub fn error(&self) -> Option<String> {
        self.status.error()
    }

    /// The worker's counters.
    pub fn counters(&self) -> &ApplyCounters {
        &self.counters
    }

    /// The staged frame the worker stopped before, if it met one that can never be applied
    /// (the item's health is then `apply_failed`).
    pub fn unappliable(&self) -> Option<UnappliableFrame> {
        self.status.unappliable()
    }

    /// The worker's watermark.
    pub fn applied_seq(&self) -> u64 {
        self.status.applied_seq()
    }

    /// See [`engine::apply::WorkerStatus::discard_unapplied`].
    pub fn discard_unapplied(&self) -> anyhow::Result<u64> {
        Ok(self.status.discard_unapplied()?)
    }

    /// The `apply_failed` health, with the frame and what to do, if apply stopped before an
    /// unappliable frame.
    pub fn apply_failure(&self) -> Option<(ApplyFailure, UnappliableFrame)> {
        let frame = self.unappliable()?;
        let applied_seq = self.applied_seq();
        Some((
            ApplyFailure {
                seq: frame.seq,
                disk_index: frame.disk_index,
                offset_bytes: frame.offset_bytes,
                segment: frame.segment.clone(),
                segment_offset_bytes: frame.segment_offset_bytes,
                reason: frame.reason.clone(),
                applied_seq,
                what_to_do: format!(
                    "The item takes no frames. Test failover, failover and change point work \
                     for every point at or below seq {applied_seq} (\"latest\" is refused: use \
                     \"latest-processed\"); run resync (from protected) to discard the staged \
                     frames after seq {applied_seq} and rebuild the replicas from the source, \
                     or disable."
                ),
            },
            frame,
        ))
    }
}
