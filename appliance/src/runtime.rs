//! What keeps an item replicating inside a running appliance: its apply worker thread.
//!
//! ```text
//!  data port / ingest ──commit──► StagingLog ──(durable seq)──► ApplyWorker::notify
//!                                                                    │ wakes
//!  apply thread: StagingReader ─► Applier (io_uring or pread/pwrite) ─► prune ─► watermark
//!                (one ring, one registered buffer pool per thread)     published to staging
//! ```
//!
//! The worker owns everything on the replica side; the staging log stays with whoever
//! receives frames. `drain_and_stop` applies what is durable, flushes, and joins, so a graceful
//! shutdown leaves nothing half applied (a SIGKILL is covered by replay from the watermark).
//!
//! A staged frame that can never be applied (its payload does not decode, or it is damaged in
//! the staging log) does not end the thread: the worker records it ([`WorkerStatus::
//! unappliable`], the item's health `apply_failed`), calls the setup's `on_unappliable` (the
//! appliance ends the item's sessions), and waits at its watermark. From there it can still
//! be drained without a latest point (failover to a processed point, disable, shutdown) and
//! its pins keep points readable; or [`WorkerStatus::discard_unapplied`] (the operator's
//! resync, after it made a delta resync required) skips the staged frames and resumes. Other
//! errors (replica, preserve, metadata I/O) end the thread as before; a restart resumes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use engine::apply::{Applier, ApplyConfig, Pins, Retention, UnappliableFrame};
use engine::delta::DiskGeometry;
use engine::durable::DurableDir;
use engine::io::{BufPool, IoEngine, ReplicaFile, open_os_engine};
use engine::meta::{ItemKey, MetaStore};
use engine::staging::StagingReader;

/// How often retention by age is checked when no new point triggers it.
const PRUNE_BY_AGE_EVERY: Duration = Duration::from_secs(1);

/// How long staging must have had nothing new before the worker makes what it applied durable
/// without a bookmark (an idle checkpoint): the watermark then covers every acknowledged frame,
/// so a chunk-hash request or a drain does not wait for the source's next bookmark, and
/// staging can reclaim the space. Long enough that a steady trickle of writes does not turn
/// into one replica flush per frame.
const IDLE_CHECKPOINT_AFTER: Duration = Duration::from_millis(200);

/// Settings of an apply worker.
#[derive(Debug, Clone, Copy)]
pub struct ApplyOptions {
    /// Recovery points kept.
    pub keep_points: usize,
    /// Points older than this (by processing time) are pruned; `u64::MAX` for no limit.
    pub max_age_ns: u64,
    /// Replica queue depth.
    pub queue_depth: usize,
}

/// How a worker should end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Running,
    /// Apply everything durable up to this seq, flush, optionally mark a latest point, exit.
    Drain {
        target_seq: u64,
        mark_latest: bool,
    },
}

struct Control {
    stop: Mutex<Stop>,
    wake: Condvar,
    staged_seq: AtomicU64,
    applied_seq: AtomicU64,
    counters: Arc<ApplyCounters>,
    /// Why the worker stopped, once it stopped on an error.
    error: Mutex<Option<String>>,
    /// The staged frame the worker waits before, once it met one that never applies.
    unappliable: Mutex<Option<UnappliableFrame>>,
    /// A request to discard the staged frames after an unappliable one, with where to answer.
    discard: Mutex<Option<std::sync::mpsc::SyncSender<Result<u64, String>>>>,
    failed: Arc<AtomicBool>,
}

impl Control {
    fn set_unappliable(&self, frame: Option<UnappliableFrame>) {
        *lock(&self.error) = frame.as_ref().map(|f| format!("apply_failed: {f}"));
        self.failed.store(frame.is_some(), Ordering::Release);
        *lock(&self.unappliable) = frame;
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Longest [`WorkerStatus::discard_unapplied`] waits for the worker (it flushes the replicas).
const DISCARD_WAIT: Duration = Duration::from_secs(120);

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

/// What a drained worker reports.
#[derive(Debug, Clone)]
pub struct Drained {
    /// The replica I/O backend it used.
    pub backend: &'static str,
    /// Its final watermark.
    pub applied_seq: u64,
    /// The staged frame it stopped before, if one could not be applied: then the watermark
    /// is short of the target (every point at or below it is intact).
    pub unappliable: Option<UnappliableFrame>,
}

pub use appliance_api::model::ApplyFailure;

/// The item's health text for an apply failure: `apply_failed: …`.
pub fn apply_failed_health(failure: &ApplyFailure, frame: &UnappliableFrame) -> String {
    format!(
        "apply_failed: {frame}; applied through seq {}. {}",
        failure.applied_seq, failure.what_to_do
    )
}

/// Wakes an [`ApplyWorker`]; cheap to clone, usable from any thread.
#[derive(Clone, Debug)]
pub struct Notifier(Arc<Control>);

impl Notifier {
    /// Frames up to `seq` are durable in staging.
    pub fn notify(&self, seq: u64) {
        self.0.staged_seq.fetch_max(seq, Ordering::AcqRel);
        self.0.wake.notify_one();
    }
}

/// Whether an [`ApplyWorker`] stopped on an error, and its watermark and counters; cheap to
/// clone, usable from any thread.
#[derive(Debug, Clone)]
pub struct WorkerStatus {
    failed: Arc<AtomicBool>,
    control: Arc<Control>,
}

impl WorkerStatus {
    /// Same as [`ApplyWorker::failed`].
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// The error the worker stopped on (it names the disk and the offset for replica I/O).
    pub fn error(&self) -> Option<String> {
        self.control
            .error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The worker's counters.
    pub fn counters(&self) -> &ApplyCounters {
        &self.control.counters
    }

    /// The staged frame the worker stopped before, if it met one that can never be applied
    /// (the item's health is then `apply_failed`).
    pub fn unappliable(&self) -> Option<UnappliableFrame> {
        lock(&self.control.unappliable).clone()
    }

    /// The worker's watermark.
    pub fn applied_seq(&self) -> u64 {
        self.control.applied_seq.load(Ordering::Acquire)
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

    /// After an unappliable frame: asks the worker to discard every staged frame after its
    /// watermark ([`Applier::discard_unapplied`]: replicas flushed, watermark moved to the
    /// staging log's durable seq) and to resume; waits for it. Returns the new watermark. The
    /// caller must have made a delta resync required first (the replicas miss the discarded
    /// frames until the resync's bookmark).
    pub fn discard_unapplied(&self) -> anyhow::Result<u64> {
        if self.unappliable().is_none() {
            anyhow::bail!("apply is not stopped before an unappliable frame: nothing to discard");
        }
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        *lock(&self.control.discard) = Some(reply);
        self.control.wake.notify_one();
        match answer.recv_timeout(DISCARD_WAIT) {
            Ok(Ok(seq)) => Ok(seq),
            Ok(Err(error)) => anyhow::bail!("discarding the staged frames: {error}"),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                anyhow::bail!("the apply worker did not discard within {DISCARD_WAIT:?}")
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => anyhow::bail!(
                "the apply worker stopped before discarding: {}",
                self.error().unwrap_or_else(|| "it was drained".into())
            ),
        }
    }
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("applied_seq", &self.applied_seq.load(Ordering::Acquire))
            .finish_non_exhaustive()
    }
}

/// An item's apply thread.
pub struct ApplyWorker {
    control: Arc<Control>,
    handle: Option<JoinHandle<anyhow::Result<Drained>>>,
    failed: Arc<AtomicBool>,
    pins: Pins,
}

impl std::fmt::Debug for ApplyWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApplyWorker")
            .field("applied_seq", &self.applied_seq())
            .finish_non_exhaustive()
    }
}

use crate::store::now_ns;

/// Everything the worker needs for one item.
pub struct WorkerSetup {
    /// Item key.
    pub item: ItemKey,
    /// The item's disks.
    pub disks: Vec<DiskGeometry>,
    /// Replica files, checked, by disk index.
    pub replicas: Vec<ReplicaFile>,
    /// Reader of the item's staging log.
    pub reader: StagingReader,
    /// The metadata store.
    pub meta: Arc<MetaStore>,
    /// The item's preserve directory.
    pub preserve: Arc<dyn DurableDir>,
    /// Called (on the apply thread) when apply stops before a frame that can never be
    /// applied; it must not block (the appliance ends the item's sessions).
    pub on_unappliable: Option<OnUnappliable>,
}

/// What a worker calls when apply stops before a frame that can never be applied.
pub type OnUnappliable = Box<dyn Fn(&UnappliableFrame) + Send>;

impl std::fmt::Debug for WorkerSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerSetup")
            .field("disks", &self.disks)
            .finish_non_exhaustive()
    }
}

impl WorkerSetup {
    /// The setup of an item of the data directory.
    pub fn for_item(
        item: &crate::store::ItemDirs,
        replicas: Vec<ReplicaFile>,
        reader: StagingReader,
        meta: Arc<MetaStore>,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            item: engine::meta::item_key(&item.header.item_id),
            disks: item.header.disks.clone(),
            replicas,
            reader,
            meta,
            preserve: Arc::new(item.preserve()?),
            on_unappliable: None,
        })
    }
}

impl ApplyWorker {
    /// Starts the thread; it builds its own ring and buffer pool. Returns once the applier is
    /// built (its recovery done), or with the error that kept it from starting.
    pub fn start(name: &str, setup: WorkerSetup, options: ApplyOptions) -> anyhow::Result<Self> {
        let failed = Arc::new(AtomicBool::new(false));
        let control = Arc::new(Control {
            stop: Mutex::new(Stop::Running),
            wake: Condvar::new(),
            staged_seq: AtomicU64::new(0),
            applied_seq: AtomicU64::new(0),
            counters: Arc::new(ApplyCounters::default()),
            error: Mutex::new(None),
            unappliable: Mutex::new(None),
            discard: Mutex::new(None),
            failed: failed.clone(),
        });
        let (thread_control, thread_failed) = (control.clone(), failed.clone());
        let (started_tx, started_rx) = std::sync::mpsc::sync_channel::<Pins>(1);
        let handle = std::thread::Builder::new()
            .name(format!("apply-{name}"))
            .spawn(move || {
                let result = run(setup, options, &thread_control, started_tx);
                if let Err(e) = &result {
                    let error = crate::store::describe(e);
                    tracing::error!(%error, "apply stopped");
                    *thread_control
                        .error
                        .lock()
                        .unwrap_or_else(|e| e.into_inner()) = Some(error);
                    thread_failed.store(true, Ordering::Release);
                }
                result
            })
            .context("starting the apply thread")?;
        match started_rx.recv() {
            Ok(pins) => Ok(Self {
                control,
                handle: Some(handle),
                failed,
                pins,
            }),
            // The thread ended before the applier was built: its result says why.
            Err(_) => match handle.join() {
                Ok(Err(e)) => Err(e),
                Ok(Ok(_)) => anyhow::bail!("the apply thread ended before it started"),
                Err(_) => anyhow::bail!("the apply thread panicked while starting"),
            },
        }
    }

    /// Pins of the worker's applier: a pinned point is never pruned (for a materialize that
    /// runs while replication goes on).
    pub fn pins(&self) -> Pins {
        self.pins.clone()
    }

    /// Tells the worker that frames up to `seq` are durable in staging.
    pub fn notify(&self, seq: u64) {
        self.notifier().notify(seq);
    }

    /// A handle that wakes this worker (for the data port's commit callback).
    pub fn notifier(&self) -> Notifier {
        Notifier(self.control.clone())
    }

    /// The worker's watermark.
    pub fn applied_seq(&self) -> u64 {
        self.control.applied_seq.load(Ordering::Acquire)
    }

    /// Whether the worker stopped on an error (it logged the error).
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// A read-only view of the worker's health that outlives it (for the control API).
    pub fn status(&self) -> WorkerStatus {
        WorkerStatus {
            failed: self.failed.clone(),
            control: self.control.clone(),
        }
    }

    /// Applies everything durable up to `target_seq`, flushes (and marks a "latest" point if
    /// asked), and joins the thread.
    pub fn drain_and_stop(mut self, target_seq: u64, mark_latest: bool) -> anyhow::Result<Drained> {
        *self.control.stop.lock().unwrap_or_else(|e| e.into_inner()) = Stop::Drain {
            target_seq,
            mark_latest,
        };
        self.control.wake.notify_one();
        match self.handle.take() {
            Some(handle) => handle
                .join()
                .map_err(|_| anyhow::anyhow!("the apply thread panicked"))?,
            None => anyhow::bail!("the apply thread was already joined"),
        }
    }
}

fn run(
    mut setup: WorkerSetup,
    options: ApplyOptions,
    control: &Control,
    started: std::sync::mpsc::SyncSender<Pins>,
) -> anyhow::Result<Drained> {
    let pool = BufPool::new(engine::apply::default_pool_config(options.queue_depth))?;
    let (mut io, choice) = open_os_engine(&pool, options.queue_depth)?;
    match &choice {
        engine::io::BackendChoice::Uring => {
            tracing::info!("replica I/O backend: io_uring (probe succeeded)")
        }
        engine::io::BackendChoice::SyncFile { reason } => tracing::warn!(
            %reason,
            "replica I/O backend: pread/pwrite (io_uring unavailable)"
        ),
    }
    let ids = setup
        .replicas
        .into_iter()
        .map(|f| io.add_file(f))
        .collect::<std::io::Result<Vec<_>>>()?;
    let config = ApplyConfig::default();
    let on_unappliable = setup.on_unappliable.take();
    let mut applier = Applier::new(
        setup.item,
        setup.disks,
        config,
        io,
        ids,
        pool,
        setup.meta,
        setup.preserve,
        setup.reader,
    )?;
    let backend = applier.backend_name();
    // The receiver waits in `start`; if it is gone nobody needs the pins.
    let _ = started.send(applier.pins());
    drop(started);
    let retention = Retention {
        max_count: options.keep_points,
        max_age_ns: options.max_age_ns,
    };
    let counters = &control.counters;
    let mut last_prune = std::time::Instant::now();
    let mut last_progress = std::time::Instant::now();
    control
        .applied_seq
        .store(applier.durable_seq(), Ordering::Release);
    loop {
        let stop = *control.stop.lock().unwrap_or_else(|e| e.into_inner());
        let started_at = std::time::Instant::now();
        // One batch per turn (a bookmark ends a batch, so a batch adds at most one point), and
        // retention after every new point even while a backlog is being worked off: the
        // preserve store stays within `keep_points` intervals instead of growing with the
        // backlog. Without a new point only age can prune, so that is checked once a second.
        let progress = match applier.apply_batch() {
            Ok(progress) => progress,
            Err(error) => {
                let Some(frame) = error.unappliable() else {
                    return Err(error.into());
                };
                tracing::error!(%frame, applied_seq = applier.durable_seq(),
                    "apply_failed: apply waits at its watermark until a resync or disable");
                control
                    .applied_seq
                    .store(applier.durable_seq(), Ordering::Release);
                control.set_unappliable(Some(frame.clone()));
                if let Some(callback) = &on_unappliable {
                    callback(&frame);
                }
                match wait_after_unappliable(&mut applier, control, &frame)? {
                    AfterUnappliable::Resumed => continue,
                    AfterUnappliable::Drained => {
                        return Ok(Drained {
                            backend,
                            applied_seq: applier.durable_seq(),
                            unappliable: Some(frame),
                        });
                    }
                }
            }
        };
        if progress.frames > 0 {
            counters.batch_latency.observe(started_at.elapsed());
            counters
                .applied_bytes
                .fetch_add(progress.bytes, Ordering::Relaxed);
            counters
                .applied_frames
                .fetch_add(progress.frames, Ordering::Relaxed);
        }
        if progress.point.is_some() || last_prune.elapsed() >= PRUNE_BY_AGE_EVERY {
            applier.prune(retention, now_ns())?;
            last_prune = std::time::Instant::now();
        }
        if let Stop::Drain {
            target_seq,
            mark_latest,
        } = stop
        {
            if applier.applied_seq() >= target_seq {
                applier.flush()?;
                if mark_latest {
                    applier.mark_latest_point()?;
                    applier.prune(retention, now_ns())?;
                }
                control
                    .applied_seq
                    .store(applier.durable_seq(), Ordering::Release);
                return Ok(Drained {
                    backend,
                    applied_seq: applier.durable_seq(),
                    unappliable: None,
                });
            }
            if progress.frames == 0 {
                anyhow::bail!(
                    "asked to apply through seq {target_seq}, but staging holds frames only \
                     through {}",
                    applier.applied_seq()
                );
            }
        }
        if progress.frames > 0 {
            last_progress = std::time::Instant::now();
        } else if applier.applied_seq() > applier.durable_seq()
            && last_progress.elapsed() >= IDLE_CHECKPOINT_AFTER
        {
            applier.flush()?;
        }
        control
            .applied_seq
            .store(applier.durable_seq(), Ordering::Release);
        if progress.frames == 0 {
            // Nothing durable to apply: sleep until notified (or a short timeout, so a missed
            // wake-up costs at most that).
            let guard = control.stop.lock().unwrap_or_else(|e| e.into_inner());
            if control.staged_seq.load(Ordering::Acquire) <= applier.applied_seq()
                && *guard == Stop::Running
            {
                let _ = control
                    .wake
                    .wait_timeout(guard, Duration::from_millis(50))
                    .map_err(|_| anyhow::anyhow!("apply control lock poisoned"))?;
            }
        }
    }
}

/// How a worker stopped before an unappliable frame goes on.
enum AfterUnappliable {
    /// The staged frames were discarded; apply resumes.
    Resumed,
    /// Asked to drain (without a latest point): it stops at its watermark.
    Drained,
}

/// Waits at the watermark after `frame` could not be applied, until a drain or a discard.
fn wait_after_unappliable<E: IoEngine>(
    applier: &mut Applier<E>,
    control: &Control,
    frame: &UnappliableFrame,
) -> anyhow::Result<AfterUnappliable> {
    loop {
        let guard = lock(&control.stop);
        if let Stop::Drain { mark_latest, .. } = *guard {
            if mark_latest {
                anyhow::bail!(
                    "apply_failed: {frame}; a latest point needs every staged frame applied \
                     (applied through seq {}): choose a processed point, or resync",
                    applier.durable_seq()
                );
            }
            return Ok(AfterUnappliable::Drained);
        }
        // Taken into a local: the discard lock is not held across the flush below.
        let request = lock(&control.discard).take();
        if let Some(reply) = request {
            drop(guard);
            control.set_unappliable(None);
            return match applier.discard_unapplied() {
                Ok(seq) => {
                    tracing::warn!(%frame, through_seq = seq,
                        "staged frames discarded; apply resumes (the delta resync rewrites what \
                         they carried)");
                    control.applied_seq.store(seq, Ordering::Release);
                    let _ = reply.send(Ok(seq));
                    Ok(AfterUnappliable::Resumed)
                }
                Err(error) => {
                    let _ = reply.send(Err(error.to_string()));
                    Err(error.into())
                }
            };
        }
        let _ = control
            .wake
            .wait_timeout(guard, Duration::from_millis(50))
            .map_err(|_| anyhow::anyhow!("apply control lock poisoned"))?;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

    use super::*;
    use engine::delta::{Consistency, DeltaEncoder, EncoderOptions, StreamHeader};
    use engine::durable::StdDir;
    use engine::ingest::{IngestConfig, ingest_stream};
    use engine::io::DirectIo;
    use engine::staging::{StagingConfig, StagingLog};

    #[test]
    fn a_backlog_of_points_never_holds_more_than_keep_points_plus_the_newest() {
        const KEEP: usize = 4;
        const POINTS: u64 = 200;
        let tmp = tempfile::tempdir().unwrap();
        let header = StreamHeader {
            item_id: [7; 16],
            item_name: "backlog".into(),
            first_seq: 1,
            disks: vec![DiskGeometry {
                size_bytes: 1 << 20,
                block_size_bytes: 4096,
            }],
        };
        // A whole backlog staged before the worker starts: a write and a bookmark, 200 times.
        let mut encoder =
            DeltaEncoder::new(Vec::new(), &header, EncoderOptions::default()).unwrap();
        for i in 0..POINTS {
            encoder
                .write(0, (i % 256) * 4096, &[i as u8 | 1; 4096])
                .unwrap();
            encoder.bookmark(Consistency::Crash, i, i, "b").unwrap();
        }
        let dir = |name: &str| {
            std::fs::create_dir_all(tmp.path().join(name)).unwrap();
            StdDir::open(&tmp.path().join(name)).unwrap()
        };
        let (mut staging, _) = StagingLog::open(
            Arc::new(dir("staging")),
            header.clone(),
            StagingConfig::default(),
        )
        .unwrap();
        ingest_stream(
            encoder.into_inner().as_slice(),
            &mut staging,
            IngestConfig::default(),
            &mut |_, _| {},
        )
        .unwrap();
        let staged_seq = staging.durable_seq();
        assert_eq!(staged_seq, 2 * POINTS);
        let meta = Arc::new(MetaStore::open(dir("meta").open("meta.redb", true).unwrap()).unwrap());
        let replica =
            ReplicaFile::create(tmp.path().join("replica"), 1 << 20, DirectIo::Prefer).unwrap();
        let key = engine::meta::item_key(&header.item_id);
        let worker = ApplyWorker::start(
            "backlog",
            WorkerSetup {
                item: key,
                disks: header.disks.clone(),
                replicas: vec![replica],
                reader: staging.reader(1),
                meta: meta.clone(),
                preserve: Arc::new(dir("preserve")),
                on_unappliable: None,
            },
            ApplyOptions {
                keep_points: KEEP,
                max_age_ns: u64::MAX,
                queue_depth: 8,
            },
        )
        .unwrap();
        worker.notify(staged_seq);
        // Watch the point count while the backlog is applied: a batch adds at most one point
        // and retention follows it at once, so never more than KEEP + 1 are there.
        let mut most = 0;
        while worker.applied_seq() < staged_seq && !worker.failed() {
            most = most.max(meta.points(key).unwrap().len());
        }
        assert!(!worker.failed(), "{:?}", worker.status().error());
        worker.drain_and_stop(staged_seq, false).unwrap();
        most = most.max(meta.points(key).unwrap().len());
        assert!(
            most <= KEEP + 1,
            "{most} points at once, keep_points {KEEP}"
        );
        assert_eq!(meta.points(key).unwrap().len(), KEEP);
    }

    /// A worker over a fresh item whose staging holds `write, bookmark, write, <a write whose
    /// checksum holds but whose zstd payload does not decompress>, write`; `on_unappliable`
    /// counts its calls.
    fn poisoned_worker(
        tmp: &std::path::Path,
    ) -> (
        ApplyWorker,
        Arc<AtomicU64>,
        Arc<MetaStore>,
        engine::meta::ItemKey,
        StagingLog,
    ) {
        use engine::delta::{Encoding, FrameHeader, FrameKind};
        let header = StreamHeader {
            item_id: [9; 16],
            item_name: "poison".into(),
            first_seq: 1,
            disks: vec![DiskGeometry {
                size_bytes: 1 << 20,
                block_size_bytes: 4096,
            }],
        };
        let mut encoder =
            DeltaEncoder::new(Vec::new(), &header, EncoderOptions::default()).unwrap();
        encoder.write(0, 0, &[1; 4096]).unwrap();
        encoder.bookmark(Consistency::Crash, 1, 1, "p2").unwrap();
        encoder.write(0, 4096, &[2; 4096]).unwrap();
        let mut stream = encoder.into_inner();
        let payload = [0x28, 0xB5, 0x2F, 0xFD, 1, 2, 3, 4, 5, 6, 7, 8];
        let mut bad = FrameHeader {
            kind: FrameKind::Write,
            encoding: Encoding::Zstd,
            disk_index: 0,
            seq: 4,
            offset_bytes: 8192,
            length_bytes: 4096,
            payload_len_bytes: payload.len() as u32,
            checksum: 0,
        };
        bad.checksum = FrameHeader::compute_checksum(&bad.encode()[..40], &payload);
        stream.extend_from_slice(&bad.encode());
        stream.extend_from_slice(&payload);
        let mut rest_header = header.clone();
        rest_header.first_seq = 5;
        let mut rest =
            DeltaEncoder::new(Vec::new(), &rest_header, EncoderOptions::default()).unwrap();
        rest.write(0, 12288, &[3; 4096]).unwrap();
        let rest = rest.into_inner();
        stream.extend_from_slice(&rest[rest_header.encoded_len_bytes()..]);
        let dir = |name: &str| {
            std::fs::create_dir_all(tmp.join(name)).unwrap();
            StdDir::open(&tmp.join(name)).unwrap()
        };
        let (mut staging, _) = StagingLog::open(
            Arc::new(dir("staging")),
            header.clone(),
            StagingConfig::default(),
        )
        .unwrap();
        // Staged behind the decoder's back: straight into the log, as media corruption would.
        let mut offset = header.encoded_len_bytes();
        let mut seq = 1;
        while offset < stream.len() {
            let len = engine::delta::FRAME_HEADER_BYTES
                + u32::from_le_bytes(stream[offset + 32..offset + 36].try_into().unwrap()) as usize;
            staging
                .append(
                    seq,
                    &stream[offset..offset + len],
                    std::time::Instant::now(),
                )
                .unwrap();
            offset += len;
            seq += 1;
        }
        assert_eq!(staging.commit().unwrap(), 5);
        let meta = Arc::new(MetaStore::open(dir("meta").open("meta.redb", true).unwrap()).unwrap());
        let replica = ReplicaFile::create(tmp.join("replica"), 1 << 20, DirectIo::Prefer).unwrap();
        let key = engine::meta::item_key(&header.item_id);
        let calls = Arc::new(AtomicU64::new(0));
        let counted = calls.clone();
        let worker = ApplyWorker::start(
            "poison",
            WorkerSetup {
                item: key,
                disks: header.disks.clone(),
                replicas: vec![replica],
                reader: staging.reader(1),
                meta: meta.clone(),
                preserve: Arc::new(dir("preserve")),
                on_unappliable: Some(Box::new(move |frame| {
                    assert_eq!(frame.seq, 4);
                    counted.fetch_add(1, Ordering::AcqRel);
                })),
            },
            ApplyOptions {
                keep_points: 10,
                max_age_ns: u64::MAX,
                queue_depth: 4,
            },
        )
        .unwrap();
        worker.notify(5);
        (worker, calls, meta, key, staging)
    }

    fn wait_unappliable(worker: &ApplyWorker) -> UnappliableFrame {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(frame) = worker.status().unappliable() {
                return frame;
            }
            assert!(std::time::Instant::now() < deadline, "apply never stopped");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn an_unappliable_frame_keeps_the_worker_waiting_drainable_without_latest_and_discardable() {
        let tmp = tempfile::tempdir().unwrap();
        // Drained without a latest point: stops at its watermark, names the frame.
        let (worker, calls, meta, key, _staging) = poisoned_worker(&tmp.path().join("a"));
        let frame = wait_unappliable(&worker);
        assert_eq!(
            (frame.seq, frame.disk_index, frame.offset_bytes),
            (4, Some(0), Some(8192))
        );
        assert_eq!(
            calls.load(Ordering::Acquire),
            1,
            "on_unappliable called once"
        );
        let status = worker.status();
        assert!(status.failed());
        assert!(
            status
                .error()
                .unwrap()
                .starts_with("apply_failed: staged frame seq 4")
        );
        let (failure, _) = status.apply_failure().unwrap();
        assert_eq!((failure.seq, failure.applied_seq), (4, 2));
        let drained = worker.drain_and_stop(5, false).unwrap();
        assert_eq!(drained.applied_seq, 2);
        assert_eq!(drained.unappliable.map(|f| f.seq), Some(4));
        assert_eq!(meta.state(key).unwrap().0, 2);

        // Asked for a latest point: refused by name.
        let (worker, _, _, _, _staging) = poisoned_worker(&tmp.path().join("b"));
        wait_unappliable(&worker);
        let error = worker.drain_and_stop(5, true).unwrap_err();
        assert!(format!("{error:#}").contains("apply_failed"), "{error:#}");

        // Discarded: the watermark moves past every staged frame, apply goes on after them.
        let (worker, _, meta, key, mut staging) = poisoned_worker(&tmp.path().join("c"));
        wait_unappliable(&worker);
        staging.require_resync("test").unwrap();
        assert_eq!(worker.status().discard_unapplied().unwrap(), 5);
        assert!(!worker.failed());
        assert!(worker.status().unappliable().is_none());
        assert_eq!(meta.state(key).unwrap().0, 5);
        let next = staging.next_seq();
        staging.resync_done(next).unwrap();
        let mut encoder = DeltaEncoder::new(
            Vec::new(),
            &StreamHeader {
                first_seq: 6,
                ..staging.header().clone()
            },
            EncoderOptions::default(),
        )
        .unwrap();
        encoder.bookmark(Consistency::Crash, 2, 2, "p6").unwrap();
        let bytes = encoder.into_inner();
        ingest_stream(
            bytes.as_slice(),
            &mut staging,
            IngestConfig::default(),
            &mut |_, _| {},
        )
        .unwrap();
        worker.notify(6);
        let drained = worker.drain_and_stop(6, true).unwrap();
        assert_eq!((drained.applied_seq, drained.unappliable), (6, None));
        let points: Vec<u64> = meta
            .points(key)
            .unwrap()
            .iter()
            .map(|p| p.point_id)
            .collect();
        assert_eq!(points, [2, 6]);
    }
}
