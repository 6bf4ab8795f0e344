//! The apply worker: one thread per item that applies durable staged frames as they arrive.
//!
//! ```text
//!  session: ingest ─► StagingLog::commit ─► durable_seq ─► wakes the reader's waiter
//!                                                              │ (staging's own Condvar)
//!  apply thread: StagingReader ─► Applier (io_uring or pread/pwrite) ─► prune ─► watermark
//!                (one ring, one registered buffer pool per thread)     published to staging
//! ```
//!
//! The worker owns everything on the replica side; the staging log stays with whoever
//! receives frames, and its commit wakes the worker itself ([`crate::staging::StagingWaker`]):
//! nobody relays sequence numbers. [`ApplyWorker::drain_and_stop`] applies what is durable,
//! flushes, and joins, so a graceful shutdown leaves nothing half applied (a SIGKILL is
//! covered by replay from the watermark).
//!
//! A staged frame that can never be applied (its payload does not decode, or it is damaged in
//! the staging log) does not end the thread: the worker records it
//! ([`WorkerStatus::unappliable`]), calls the setup's `on_unappliable` (the appliance ends
//! the item's sessions), and waits at its watermark. From there it can still be drained
//! without a latest point (failover to a processed point, disable, shutdown) and its pins
//! keep points readable; or [`WorkerStatus::discard_unapplied`] (the operator's resync, after
//! it made a delta resync required) skips the staged frames and resumes. Other errors
//! (replica, preserve, metadata I/O) end the thread; a restart resumes.
//!
//! When staging has had nothing new for [`IDLE_CHECKPOINT_AFTER`], the worker makes what it
//! applied durable without a bookmark (an idle checkpoint).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{Applier, ApplyConfig, Pins, Retention, UnappliableFrame};
use crate::clock::now_unix_ns;
use crate::delta::DiskGeometry;
use crate::durable::DurableDir;
use crate::error::{Error, ErrorKind, ResultExt, report};
use crate::io::{BackendChoice, BufPool, IoEngine, ReplicaFile, open_os_engine};
use crate::meta::{ItemKey, MetaStore};
use crate::staging::{StagingReader, StagingWaker};

/// How often retention by age is checked when no new point triggers it.
const PRUNE_BY_AGE_EVERY: Duration = Duration::from_secs(1);

/// How long staging must have had nothing new before the worker makes what it applied durable
/// without a bookmark (an idle checkpoint): the watermark then covers every acknowledged frame,
/// so a chunk-hash request or a drain does not wait for the source's next bookmark, and
/// staging can reclaim the space. Long enough that a steady trickle of writes does not turn
/// into one replica flush per frame.
pub const IDLE_CHECKPOINT_AFTER: Duration = Duration::from_millis(200);

/// Longest an idle worker sleeps before it looks at the clock (idle checkpoint, pruning by
/// age); a commit or a stop request wakes it sooner.
const IDLE_TICK: Duration = Duration::from_millis(50);

/// Longest [`WorkerStatus::discard_unapplied`] waits for the worker (it flushes the replicas).
const DISCARD_WAIT: Duration = Duration::from_secs(120);

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

/// What a worker reports after each batch that did work, on its thread (for metrics). It must
/// not block: no lock, no I/O.
pub trait ApplyObserver: Send + Sync + 'static {
    /// A batch applied `frames` frames carrying `bytes` data bytes in `elapsed` (staging read,
    /// preserve, replica writes).
    fn batch_applied(&self, elapsed: Duration, bytes: u64, frames: u64);
}

/// Observes nothing.
impl ApplyObserver for () {
    fn batch_applied(&self, _: Duration, _: u64, _: u64) {}
}

/// What a worker calls when apply stops before a frame that can never be applied.
pub type OnUnappliable = Box<dyn Fn(&UnappliableFrame) + Send>;

/// Everything the worker needs for one item.
pub struct WorkerSetup {
    /// Item key.
    pub item: ItemKey,
    /// The item's disks.
    pub disks: Vec<DiskGeometry>,
    /// Replica files, checked, by disk index.
    pub replicas: Vec<ReplicaFile>,
    /// Reader of the item's staging log; the log's commits wake the worker through it.
    pub reader: StagingReader,
    /// The metadata store.
    pub meta: Arc<MetaStore>,
    /// The item's preserve directory.
    pub preserve: Arc<dyn DurableDir>,
    /// Called (on the apply thread) when apply stops before a frame that can never be
    /// applied; it must not block (the appliance ends the item's sessions).
    pub on_unappliable: Option<OnUnappliable>,
    /// Told about every batch that did work.
    pub observer: Arc<dyn ApplyObserver>,
    /// The item's pins: points its readers (materialize, exports) hold, never pruned. Owned
    /// by the caller so they outlive this worker (a restarted replication keeps them).
    pub pins: Pins,
}

impl std::fmt::Debug for WorkerSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerSetup")
            .field("disks", &self.disks)
            .finish_non_exhaustive()
    }
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

/// A discard request: where the worker answers with its new watermark or why it failed.
type DiscardReply = SyncSender<Result<u64, String>>;

/// What the worker's thread and its handles share.
struct Control {
    stop: Mutex<Stop>,
    /// Wakes the worker for a stop or discard request (staging's commits wake it too).
    waker: StagingWaker,
    applied_seq: AtomicU64,
    /// Why the worker stopped, once it stopped on an error.
    error: Mutex<Option<String>>,
    /// The staged frame the worker waits before, once it met one that never applies.
    unappliable: Mutex<Option<UnappliableFrame>>,
    /// A request to discard the staged frames after an unappliable one, with where to answer.
    discard: Mutex<Option<DiscardReply>>,
    failed: AtomicBool,
}

impl Control {
    fn set_unappliable(&self, frame: Option<UnappliableFrame>) {
        *lock(&self.error) = frame.as_ref().map(|f| format!("apply_failed: {f}"));
        self.failed.store(frame.is_some(), Ordering::Release);
        *lock(&self.unappliable) = frame;
    }

    fn publish(&self, applied_seq: u64) {
        self.applied_seq.store(applied_seq, Ordering::Release);
    }
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("applied_seq", &self.applied_seq.load(Ordering::Acquire))
            .finish_non_exhaustive()
    }
}

/// The state these locks guard is consistent between statements: a poisoned one is taken over.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
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

/// Whether an [`ApplyWorker`] stopped on an error, and its watermark; cheap to clone, usable
/// from any thread, survives the worker.
#[derive(Debug, Clone)]
pub struct WorkerStatus {
    control: Arc<Control>,
}

impl WorkerStatus {
    /// Whether the worker stopped on an error or waits before an unappliable frame.
    pub fn failed(&self) -> bool {
        self.control.failed.load(Ordering::Acquire)
    }

    /// The error the worker stopped on (it names the disk and the offset for replica I/O).
    pub fn error(&self) -> Option<String> {
        lock(&self.control.error).clone()
    }

    /// The staged frame the worker stopped before, if it met one that can never be applied.
    pub fn unappliable(&self) -> Option<UnappliableFrame> {
        lock(&self.control.unappliable).clone()
    }

    /// The worker's watermark.
    pub fn applied_seq(&self) -> u64 {
        self.control.applied_seq.load(Ordering::Acquire)
    }

    /// After an unappliable frame: asks the worker to discard every staged frame after its
    /// watermark ([`Applier::discard_unapplied`]: replicas flushed, watermark moved to the
    /// staging log's durable seq) and to resume; waits for it. Returns the new watermark. The
    /// caller must have made a delta resync required first (the replicas miss the discarded
    /// frames until the resync's bookmark).
    pub fn discard_unapplied(&self) -> Result<u64, Error> {
        if self.unappliable().is_none() {
            return Err(Error::new(
                ErrorKind::Invalid,
                "apply is not stopped before an unappliable frame: nothing to discard",
            ));
        }
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        *lock(&self.control.discard) = Some(reply);
        self.control.waker.wake();
        match answer.recv_timeout(DISCARD_WAIT) {
            Ok(Ok(seq)) => Ok(seq),
            Ok(Err(error)) => Err(Error::new(
                ErrorKind::Io,
                format!("discarding the staged frames: {error}"),
            )),
            Err(RecvTimeoutError::Timeout) => Err(Error::new(
                ErrorKind::TimedOut,
                format!("the apply worker did not discard within {DISCARD_WAIT:?}"),
            )),
            Err(RecvTimeoutError::Disconnected) => Err(Error::new(
                ErrorKind::Stopped,
                format!(
                    "the apply worker stopped before discarding: {}",
                    self.error().unwrap_or_else(|| "it was drained".into())
                ),
            )),
        }
    }
}

/// An item's apply thread.
pub struct ApplyWorker {
    control: Arc<Control>,
    handle: Option<JoinHandle<Result<Drained, Error>>>,
    pins: Pins,
}

impl std::fmt::Debug for ApplyWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApplyWorker")
            .field("applied_seq", &self.applied_seq())
            .finish_non_exhaustive()
    }
}

impl ApplyWorker {
    /// Starts the thread; it builds its own ring and buffer pool. Returns once the applier is
    /// built (its recovery done), or with the error that kept it from starting. From then on
    /// every commit of the staging log `setup.reader` reads wakes it.
    pub fn start(name: &str, setup: WorkerSetup, options: ApplyOptions) -> Result<Self, Error> {
        let control = Arc::new(Control {
            stop: Mutex::new(Stop::Running),
            waker: setup.reader.waker(),
            applied_seq: AtomicU64::new(0),
            error: Mutex::new(None),
            unappliable: Mutex::new(None),
            discard: Mutex::new(None),
            failed: AtomicBool::new(false),
        });
        let thread_control = control.clone();
        let (started_tx, started_rx) = std::sync::mpsc::sync_channel::<Pins>(1);
        let handle = std::thread::Builder::new()
            .name(format!("apply-{name}"))
            .spawn(move || {
                let result = run(setup, options, &thread_control, started_tx);
                if let Err(e) = &result {
                    let error = report(e);
                    tracing::error!(%error, "apply stopped");
                    *lock(&thread_control.error) = Some(error);
                    thread_control.failed.store(true, Ordering::Release);
                }
                result
            })
            .map_err(|e| Error::io("starting the apply thread", e))?;
        match started_rx.recv() {
            Ok(pins) => Ok(Self {
                control,
                handle: Some(handle),
                pins,
            }),
            // The thread ended before the applier was built: its result says why.
            Err(_) => match handle.join() {
                Ok(Err(e)) => Err(e),
                Ok(Ok(_)) => Err(Error::new(
                    ErrorKind::Stopped,
                    "the apply thread ended before it started",
                )),
                Err(_) => Err(Error::new(
                    ErrorKind::Stopped,
                    "the apply thread panicked while starting",
                )),
            },
        }
    }

    /// Pins of the worker's applier: a pinned point is never pruned (for a materialize that
    /// runs while replication goes on).
    pub fn pins(&self) -> Pins {
        self.pins.clone()
    }

    /// The worker's watermark.
    pub fn applied_seq(&self) -> u64 {
        self.control.applied_seq.load(Ordering::Acquire)
    }

    /// Whether the worker stopped on an error (it logged the error).
    pub fn failed(&self) -> bool {
        self.control.failed.load(Ordering::Acquire)
    }

    /// A read-only view of the worker's health that outlives it.
    pub fn status(&self) -> WorkerStatus {
        WorkerStatus {
            control: self.control.clone(),
        }
    }

    /// Applies everything durable up to `target_seq`, flushes (and marks a "latest" point if
    /// asked), and joins the thread.
    pub fn drain_and_stop(mut self, target_seq: u64, mark_latest: bool) -> Result<Drained, Error> {
        *lock(&self.control.stop) = Stop::Drain {
            target_seq,
            mark_latest,
        };
        self.control.waker.wake();
        match self.handle.take() {
            Some(handle) => handle
                .join()
                .map_err(|_| Error::new(ErrorKind::Stopped, "the apply thread panicked"))?,
            None => Err(Error::new(
                ErrorKind::Stopped,
                "the apply thread was already joined",
            )),
        }
    }
}

/// The thread's body: build the applier, then apply until drained.
fn run(
    setup: WorkerSetup,
    options: ApplyOptions,
    control: &Control,
    started: SyncSender<Pins>,
) -> Result<Drained, Error> {
    let pool = BufPool::new(super::default_pool_config(options.queue_depth))
        .context(ErrorKind::Io, "allocating the apply buffer pool")?;
    let (mut io, choice) = open_os_engine(&pool, options.queue_depth)
        .map_err(|e| Error::io("opening the replica I/O backend", e))?;
    match &choice {
        BackendChoice::Uring => tracing::info!("replica I/O backend: io_uring (probe succeeded)"),
        BackendChoice::SyncFile { reason } => tracing::warn!(
            %reason,
            "replica I/O backend: pread/pwrite (io_uring unavailable)"
        ),
    }
    let ids = setup
        .replicas
        .into_iter()
        .map(|f| io.add_file(f))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|e| Error::io("registering the replica files", e))?;
    let pins = setup.pins;
    let mut applier = Applier::new(
        setup.item,
        setup.disks,
        ApplyConfig::default(),
        io,
        ids,
        pool,
        setup.meta,
        setup.preserve,
        setup.reader,
    )?;
    applier.use_pins(pins);
    // The receiver waits in `start`; if it is gone nobody needs the pins.
    let _ = started.send(applier.pins());
    drop(started);
    Loop {
        control,
        observer: setup.observer,
        on_unappliable: setup.on_unappliable,
        retention: Retention {
            max_count: options.keep_points,
            max_age_ns: options.max_age_ns,
        },
    }
    .run(&mut applier)
}

/// The worker loop's fixed parts.
struct Loop<'a> {
    control: &'a Control,
    observer: Arc<dyn ApplyObserver>,
    on_unappliable: Option<OnUnappliable>,
    retention: Retention,
}

impl Loop<'_> {
    fn run<E: IoEngine>(&self, applier: &mut Applier<E>) -> Result<Drained, Error> {
        let control = self.control;
        let backend = applier.backend_name();
        let mut last_prune = Instant::now();
        let mut last_progress = Instant::now();
        control.publish(applier.durable_seq());
        loop {
            // Taken before anything is checked: a commit or a stop request from here on ends
            // the idle wait below at once.
            let ticket = control.waker.ticket();
            let stop = *lock(&control.stop);
            let started_at = Instant::now();
            // One batch per turn (a bookmark ends a batch, so a batch adds at most one point),
            // and retention after every new point even while a backlog is being worked off:
            // the preserve store stays within `keep_points` intervals instead of growing with
            // the backlog. Without a new point only age can prune, so that is checked once a
            // second.
            let progress = match applier.apply_batch() {
                Ok(progress) => progress,
                Err(error) => {
                    let Some(frame) = error.unappliable() else {
                        return Err(error.into());
                    };
                    tracing::error!(%frame, applied_seq = applier.durable_seq(),
                        "apply_failed: apply waits at its watermark until a resync or disable");
                    control.publish(applier.durable_seq());
                    control.set_unappliable(Some(frame.clone()));
                    if let Some(callback) = &self.on_unappliable {
                        callback(&frame);
                    }
                    match self.wait_after_unappliable(applier, &frame)? {
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
                self.observer
                    .batch_applied(started_at.elapsed(), progress.bytes, progress.frames);
            }
            if progress.point.is_some() || last_prune.elapsed() >= PRUNE_BY_AGE_EVERY {
                applier.prune(self.retention, now_unix_ns())?;
                last_prune = Instant::now();
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
                        applier.prune(self.retention, now_unix_ns())?;
                    }
                    control.publish(applier.durable_seq());
                    return Ok(Drained {
                        backend,
                        applied_seq: applier.durable_seq(),
                        unappliable: None,
                    });
                }
                if progress.frames == 0 {
                    return Err(Error::new(
                        ErrorKind::Invalid,
                        format!(
                            "asked to apply through seq {target_seq}, but staging holds frames \
                             only through {}",
                            applier.applied_seq()
                        ),
                    ));
                }
            }
            if progress.frames > 0 {
                last_progress = Instant::now();
            } else if applier.applied_seq() > applier.durable_seq()
                && last_progress.elapsed() >= IDLE_CHECKPOINT_AFTER
            {
                applier.flush()?;
            }
            control.publish(applier.durable_seq());
            if progress.frames == 0 {
                // Nothing durable to apply: sleep until staging commits more, a stop request,
                // or the idle tick (idle checkpoint, pruning by age).
                control.waker.wait(ticket, applier.applied_seq(), IDLE_TICK);
            }
        }
    }

    /// Waits at the watermark after `frame` could not be applied, until a drain or a discard.
    fn wait_after_unappliable<E: IoEngine>(
        &self,
        applier: &mut Applier<E>,
        frame: &UnappliableFrame,
    ) -> Result<AfterUnappliable, Error> {
        let control = self.control;
        loop {
            let ticket = control.waker.ticket();
            let guard = lock(&control.stop);
            if let Stop::Drain { mark_latest, .. } = *guard {
                if mark_latest {
                    return Err(Error::new(
                        ErrorKind::Unappliable,
                        format!(
                            "apply_failed: {frame}; a latest point needs every staged frame \
                             applied (applied through seq {}): choose a processed point, or \
                             resync",
                            applier.durable_seq()
                        ),
                    ));
                }
                return Ok(AfterUnappliable::Drained);
            }
            // Taken into a local: the discard lock is not held across the flush below.
            let request = lock(&control.discard).take();
            drop(guard);
            if let Some(reply) = request {
                control.set_unappliable(None);
                return match applier.discard_unapplied() {
                    Ok(seq) => {
                        tracing::warn!(%frame, through_seq = seq,
                            "staged frames discarded; apply resumes (the delta resync rewrites \
                             what they carried)");
                        control.publish(seq);
                        let _ = reply.send(Ok(seq));
                        Ok(AfterUnappliable::Resumed)
                    }
                    Err(error) => {
                        let _ = reply.send(Err(report(&error)));
                        Err(error.into())
                    }
                };
            }
            // Only a request ends this wait (new frames stay behind the unappliable one).
            control.waker.wait(ticket, u64::MAX, IDLE_TICK);
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

#[cfg(test)]
mod tests;
