//! [`UringEngine`]: the io_uring backend, on the `io-uring` crate directly.
//!
//! One ring per engine (per worker thread). The engine owns the ring, the registered
//! [`ReplicaFile`]s, a handle on the registered [`BufPool`], and a fixed table of slots, one
//! per op in flight; a slot's index is the SQE `user_data`.
//!
//! ```text
//!  submit ─► slot (op + owned IoBuf) ─► SQE{user_data = slot} ─► kick: io_uring_enter
//!                 ▲                                                   │
//!                 │ short write / EINTR / EAGAIN / ZERO_RANGE refused │
//!                 └──────────── next SQE for the same slot ◄── CQE ◄──┘
//!                                                             │ done
//!  reap ◄── Completion{tag, buf, result} ◄── slot freed ◄─────┘
//! ```
//!
//! Invariants:
//! - a slot has at most one SQE outstanding, and the ring has at least `queue_depth`
//!   SQ entries and twice that CQ entries, so the SQ never overflows and the CQ never drops;
//! - an op's `IoBuf` stays in its slot until its last CQE has been seen: the kernel may write
//!   into it until then. Dropping the engine waits for every SQE in the kernel; if it cannot
//!   (wrong thread, kernel error, no progress for [`DROP_WAIT_MAX`]), it leaks those buffers
//!   (and the zero buffer) instead of letting the pool hand them out again;
//! - pool arenas are registered (one iovec each) when possible; ops on a registered pool's
//!   buffers use `ReadFixed`/`WriteFixed` with `buf_index` = arena index. Buffers of another
//!   pool, or any buffer when registration failed (ENOMEM under a memlock limit, for instance),
//!   use plain `Read`/`Write`; registration failure is logged once per process;
//! - files are registered in a sparse table sized `max_files` when possible (`Fixed(index)`),
//!   else used by raw fd;
//! - `Flush` is `IORING_OP_FSYNC` with `IORING_FSYNC_DATASYNC`. `WriteZeroes` is
//!   `IORING_OP_FALLOCATE(FALLOC_FL_ZERO_RANGE)`; on EOPNOTSUPP that file switches for good to
//!   writing zeros from a zeroed, page-aligned buffer, in 1 MiB pieces;
//! - short reads/writes are resubmitted for the remainder; EINTR and EAGAIN results are
//!   resubmitted up to [`MAX_RETRIES`] times in a row; nothing here panics on a kernel result.
//!
//! Threads: with `IORING_SETUP_SINGLE_ISSUER` (and `DEFER_TASKRUN`), only one thread may drive
//! the ring. The ring is created disabled (`IORING_SETUP_R_DISABLED`) and enabled by the first
//! `kick`/`reap`, which binds it to the calling thread, so an engine can be built on one
//! thread and moved to its worker. After that, `kick`/`reap`/`add_file` from another thread
//! return an error. Drop the engine on its worker thread.

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use io_uring::{EnterFlags, IoUring, opcode, squeue, types};
use memmap2::MmapRaw;

use super::sync_file::map_zero_buf;
use super::{
    BufPool, Completion, DEFAULT_QUEUE_DEPTH, FileId, IoBuf, IoEngine, IoOp, RejectReason,
    Rejected, ReplicaFile, check_op, check_queue_depth,
};

mod cqe;
mod sqe;

/// How many times in a row an op is resubmitted after EINTR/EAGAIN before failing.
pub const MAX_RETRIES: u32 = 16;
/// How long `Drop` waits without any progress before leaking in-flight buffers.
pub const DROP_WAIT_MAX: Duration = Duration::from_secs(30);
/// Default size of the registered-file table.
pub const DEFAULT_MAX_FILES: u32 = 64;

/// Logged once per process when buffer registration fails.
static WARNED_UNREGISTERED_BUFFERS: AtomicBool = AtomicBool::new(false);

/// Settings of a [`UringEngine`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UringConfig {
    /// Maximum ops in flight.
    pub queue_depth: usize,
    /// Maximum files this engine can register.
    pub max_files: u32,
    /// Register the pool's arenas with the ring (falls back to unregistered I/O on failure).
    pub register_buffers: bool,
    /// Register files with the ring (falls back to raw fds on failure).
    pub register_files: bool,
}

impl Default for UringConfig {
    fn default() -> Self {
        Self {
            queue_depth: DEFAULT_QUEUE_DEPTH,
            max_files: DEFAULT_MAX_FILES,
            register_buffers: true,
            register_files: true,
        }
    }
}

/// Which ring setup flags the kernel accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingSetup {
    /// `SINGLE_ISSUER | DEFER_TASKRUN | R_DISABLED`.
    SingleIssuerDeferTaskrun,
    /// `SINGLE_ISSUER | COOP_TASKRUN | R_DISABLED`.
    SingleIssuerCoopTaskrun,
    /// `COOP_TASKRUN`.
    CoopTaskrun,
    /// No optional flags.
    Plain,
}

impl RingSetup {
    fn single_issuer(self) -> bool {
        matches!(
            self,
            RingSetup::SingleIssuerDeferTaskrun | RingSetup::SingleIssuerCoopTaskrun
        )
    }
}

struct UringFile {
    file: ReplicaFile,
    fixed_index: Option<u32>,
    zero_range_unsupported: bool,
}

enum SlotOp {
    Idle,
    Read {
        file: u32,
        offset_bytes: u64,
        buf: IoBuf,
    },
    Write {
        file: u32,
        offset_bytes: u64,
        buf: IoBuf,
    },
    ZeroRange {
        file: u32,
        offset_bytes: u64,
        len_bytes: u64,
    },
    ZeroWrite {
        file: u32,
        offset_bytes: u64,
        len_bytes: u64,
    },
    Flush {
        file: u32,
    },
}

struct Slot {
    tag: u64,
    op: SlotOp,
    /// Bytes already transferred by earlier SQEs of this op.
    done_bytes: u64,
    /// EINTR/EAGAIN resubmissions in a row.
    retries: u32,
}

/// A file descriptor as the SQE names it.
#[derive(Clone, Copy)]
enum Target {
    Fixed(u32),
    Raw(i32),
}

/// io_uring backend. See the module docs for its invariants.
pub struct UringEngine {
    ring: IoUring,
    setup: RingSetup,
    /// Created with R_DISABLED and not yet enabled.
    needs_enable: bool,
    /// The thread the ring is bound to (single-issuer rings, once enabled).
    owner: Option<ThreadId>,
    /// The registered pool (kept alive so the registered arenas stay mapped).
    registered_pool: Option<BufPool>,
    /// Address of the registered pool's shared state, for a cheap "is it ours" test.
    registered_pool_addr: usize,
    files: Vec<UringFile>,
    fixed_files: bool,
    max_files: u32,
    slots: Box<[Slot]>,
    free_slots: Vec<u32>,
    /// Slots whose next SQE could not be pushed yet (defensive; the SQ is sized not to fill).
    backlog: VecDeque<u32>,
    /// SQEs in the backlog, in the SQ, or in the kernel.
    sqes_outstanding: usize,
    /// Ops submitted and not yet returned by `reap`.
    in_flight: usize,
    queue_depth: usize,
    /// Zeroed buffer for `WriteZeroes` where ZERO_RANGE is refused; mapped on first need.
    zero_buf: Option<MmapRaw>,
    /// Finished ops not yet handed out by `reap` (at most `in_flight` entries).
    ready: VecDeque<Completion>,
    cqe_scratch: Vec<(u64, i32)>,
    /// Set by Drop: finish ops instead of resubmitting.
    draining: bool,
}

impl std::fmt::Debug for UringEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringEngine")
            .field("setup", &self.setup)
            .field("buffers_registered", &self.registered_pool.is_some())
            .field("fixed_files", &self.fixed_files)
            .field("files", &self.files.len())
            .field("in_flight", &self.in_flight)
            .field("queue_depth", &self.queue_depth)
            .finish()
    }
}

/// Runs a NOP through a small ring (for [`super::probe`]). Never panics.
pub(crate) fn probe_nop() -> Result<(), String> {
    let mut ring = IoUring::new(2).map_err(|e| format!("io_uring_setup failed: {e}"))?;
    let nop = opcode::Nop::new().build().user_data(0x6e6f70);
    // SAFETY: a NOP references no memory.
    unsafe { ring.submission().push(&nop) }
        .map_err(|_| "io_uring submission queue unexpectedly full".to_owned())?;
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("io_uring_enter failed: {e}")),
        }
    }
    match ring.completion().next() {
        Some(cqe) if cqe.result() >= 0 => Ok(()),
        Some(cqe) => Err(format!(
            "io_uring NOP failed: {}",
            io::Error::from_raw_os_error(-cqe.result())
        )),
        None => Err("io_uring NOP produced no completion".to_owned()),
    }
}

/// Builds a ring with the best flags the kernel accepts.
fn build_ring(entries: u32) -> io::Result<(IoUring, RingSetup)> {
    let cq_entries = entries.saturating_mul(2);
    let attempts = [
        RingSetup::SingleIssuerDeferTaskrun,
        RingSetup::SingleIssuerCoopTaskrun,
        RingSetup::CoopTaskrun,
        RingSetup::Plain,
    ];
    let mut last_err = None;
    for setup in attempts {
        let mut builder = IoUring::builder();
        builder.dontfork().setup_cqsize(cq_entries);
        match setup {
            RingSetup::SingleIssuerDeferTaskrun => {
                builder
                    .setup_single_issuer()
                    .setup_defer_taskrun()
                    .setup_r_disabled();
            }
            RingSetup::SingleIssuerCoopTaskrun => {
                builder
                    .setup_single_issuer()
                    .setup_coop_taskrun()
                    .setup_r_disabled();
            }
            RingSetup::CoopTaskrun => {
                builder.setup_coop_taskrun();
            }
            RingSetup::Plain => {}
        }
        match builder.build(entries) {
            Ok(ring) => return Ok((ring, setup)),
            // EINVAL: a flag this kernel does not know. Anything else (ENOSYS, EPERM from
            // seccomp, ENOMEM) will not get better with fewer flags, but trying is cheap.
            Err(e) => last_err = Some(e),
        }
    }
    Err(last_err.unwrap_or_else(|| io::Error::other("io_uring setup failed")))
}

impl UringEngine {
    /// Sets up a ring for `config.queue_depth` ops in flight and registers `pool`'s arenas
    /// (if given and `config.register_buffers`) and a sparse file table.
    ///
    /// Fails only if the ring itself cannot be set up (io_uring unavailable: see
    /// [`super::probe`]); registration failures fall back as the module docs describe.
    pub fn new(pool: Option<&BufPool>, config: UringConfig) -> io::Result<Self> {
        check_queue_depth(config.queue_depth)?;
        let entries = u32::try_from(config.queue_depth)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let (ring, setup) = build_ring(entries)?;
        let sq_capacity = ring.params().sq_entries() as usize;
        if sq_capacity < config.queue_depth {
            return Err(io::Error::other(format!(
                "io_uring gave {sq_capacity} SQ entries, fewer than queue depth {}",
                config.queue_depth
            )));
        }

        let mut registered_pool = None;
        if let (Some(pool), true) = (pool, config.register_buffers) {
            let iovecs: Vec<libc::iovec> = pool
                .arena_iovecs()
                .map(|(ptr, len)| libc::iovec {
                    iov_base: ptr.cast(),
                    iov_len: len,
                })
                .collect();
            // SAFETY: each iovec covers one whole arena of `pool`, mapped read-write; the
            // engine keeps a clone of the pool, so the arenas stay mapped until after the ring
            // (and with it the registration) is gone, or forever if Drop has to leak.
            match unsafe { ring.submitter().register_buffers(&iovecs) } {
                Ok(()) => registered_pool = Some(pool.clone()),
                Err(e) => {
                    if !WARNED_UNREGISTERED_BUFFERS.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            error = %e,
                            arenas = iovecs.len(),
                            "io_uring buffer registration failed (raise the memlock limit, e.g. \
                             LimitMEMLOCK, or run with CAP_IPC_LOCK); using unregistered I/O"
                        );
                    } else {
                        tracing::debug!(error = %e, "io_uring buffer registration failed");
                    }
                }
            }
        }

        let fixed_files = config.register_files
            && config.max_files > 0
            && match ring.submitter().register_files_sparse(config.max_files) {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(error = %e, "io_uring file registration failed; using raw fds");
                    false
                }
            };

        let slots = (0..config.queue_depth)
            .map(|_| Slot {
                tag: 0,
                op: SlotOp::Idle,
                done_bytes: 0,
                retries: 0,
            })
            .collect();
        let cq_capacity = ring.params().cq_entries() as usize;
        Ok(Self {
            needs_enable: setup.single_issuer(),
            owner: None,
            registered_pool_addr: registered_pool
                .as_ref()
                .map_or(0, |p: &BufPool| p.pool_ptr() as usize),
            registered_pool,
            ring,
            setup,
            files: Vec::new(),
            fixed_files,
            max_files: config.max_files,
            slots,
            free_slots: (0..config.queue_depth as u32).rev().collect(),
            backlog: VecDeque::with_capacity(config.queue_depth),
            sqes_outstanding: 0,
            in_flight: 0,
            queue_depth: config.queue_depth,
            zero_buf: None,
            ready: VecDeque::with_capacity(config.queue_depth),
            cqe_scratch: Vec::with_capacity(cq_capacity),
            draining: false,
        })
    }

    /// The ring setup flags the kernel accepted.
    pub fn ring_setup(&self) -> RingSetup {
        self.setup
    }

    /// Whether the pool's arenas are registered (ops on them use `ReadFixed`/`WriteFixed`).
    pub fn buffers_registered(&self) -> bool {
        self.registered_pool.is_some()
    }

    /// Whether the engine has a registered file table.
    pub fn files_registered(&self) -> bool {
        self.fixed_files
    }

    /// Whether ops on `file` use a registered (`Fixed`) file index; `None` for an unknown id.
    pub fn file_is_fixed(&self, file: FileId) -> Option<bool> {
        self.files
            .get(file.index() as usize)
            .map(|f| f.fixed_index.is_some())
    }

    /// Errors if a single-issuer ring is bound to another thread; enables a disabled ring and
    /// binds it to this thread.
    fn bind_thread(&mut self) -> io::Result<()> {
        if !self.setup.single_issuer() {
            return Ok(());
        }
        let me = std::thread::current().id();
        match self.owner {
            Some(owner) if owner == me => Ok(()),
            Some(owner) => Err(io::Error::other(format!(
                "io_uring engine is bound to thread {owner:?}; called from {me:?}"
            ))),
            None => {
                if self.needs_enable {
                    self.ring.submitter().register_enable_rings()?;
                    self.needs_enable = false;
                }
                self.owner = Some(me);
                Ok(())
            }
        }
    }

    fn target(&self, file: u32) -> Option<Target> {
        let f = self.files.get(file as usize)?;
        Some(match f.fixed_index {
            Some(i) => Target::Fixed(i),
            None => Target::Raw(f.file.as_file().as_raw_fd()),
        })
    }

    /// Frees a slot and queues its completion for `reap`.
    fn finish(&mut self, slot_index: u32, result: io::Result<u32>) {
        let Some(slot) = self.slots.get_mut(slot_index as usize) else {
            return;
        };
        let buf = match std::mem::replace(&mut slot.op, SlotOp::Idle) {
            SlotOp::Read { buf, .. } | SlotOp::Write { buf, .. } => Some(buf),
            _ => None,
        };
        let tag = slot.tag;
        slot.done_bytes = 0;
        slot.retries = 0;
        self.free_slots.push(slot_index);
        // `ready` holds at most `in_flight <= queue_depth` entries: no reallocation.
        self.ready.push_back(Completion { tag, buf, result });
    }
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY | libc::ETIME)
    )
}

fn unknown_file() -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, "unknown file id")
}

impl IoEngine for UringEngine {
    type File = ReplicaFile;

    fn backend_name(&self) -> &'static str {
        "uring"
    }

    fn add_file(&mut self, file: ReplicaFile) -> io::Result<FileId> {
        let index = self.files.len();
        if self.fixed_files && index >= self.max_files as usize {
            return Err(io::Error::other(format!(
                "io_uring engine file table full ({} files)",
                self.max_files
            )));
        }
        let mut fixed_index = None;
        if self.fixed_files {
            if self.owner.is_some() {
                self.bind_thread()?;
            }
            let slot = index as u32;
            match self
                .ring
                .submitter()
                .register_files_update(slot, &[file.as_file().as_raw_fd()])
            {
                Ok(_) => fixed_index = Some(slot),
                Err(e) => {
                    tracing::warn!(
                        error = %e,
                        path = %file.path().display(),
                        "io_uring file registration failed; using the raw fd"
                    );
                }
            }
        }
        self.files.push(UringFile {
            file,
            fixed_index,
            zero_range_unsupported: false,
        });
        Ok(FileId::from_usize(index))
    }

    fn alignment_bytes(&self, file: FileId) -> Option<u32> {
        self.files
            .get(file.index() as usize)
            .map(|f| f.file.alignment_bytes())
    }

    fn queue_depth(&self) -> usize {
        self.queue_depth
    }

    fn submit(&mut self, op: IoOp, tag: u64) -> Result<(), Rejected> {
        if self.in_flight >= self.queue_depth {
            return Err(Rejected {
                op,
                reason: RejectReason::QueueFull,
            });
        }
        let file_index = op.file().index();
        let Some(f) = self.files.get(file_index as usize) else {
            return Err(Rejected {
                op,
                reason: RejectReason::UnknownFile,
            });
        };
        if let Err(reason) = check_op(&op, f.file.alignment_bytes()) {
            return Err(Rejected { op, reason });
        }
        let zero_write = f.zero_range_unsupported && self.zero_buf.is_some();
        let Some(slot_index) = self.free_slots.pop() else {
            return Err(Rejected {
                op,
                reason: RejectReason::QueueFull,
            });
        };
        let slot_op = match op {
            IoOp::Read {
                offset_bytes, buf, ..
            } => SlotOp::Read {
                file: file_index,
                offset_bytes,
                buf,
            },
            IoOp::Write {
                offset_bytes, buf, ..
            } => SlotOp::Write {
                file: file_index,
                offset_bytes,
                buf,
            },
            IoOp::WriteZeroes {
                offset_bytes,
                len_bytes,
                ..
            } if zero_write => SlotOp::ZeroWrite {
                file: file_index,
                offset_bytes,
                len_bytes,
            },
            IoOp::WriteZeroes {
                offset_bytes,
                len_bytes,
                ..
            } => SlotOp::ZeroRange {
                file: file_index,
                offset_bytes,
                len_bytes,
            },
            IoOp::Flush { .. } => SlotOp::Flush { file: file_index },
        };
        let slot = &mut self.slots[slot_index as usize];
        slot.tag = tag;
        slot.op = slot_op;
        slot.done_bytes = 0;
        slot.retries = 0;
        self.in_flight += 1;
        // A build failure (impossible for a checked op) finishes the op with the error, so
        // the caller still gets exactly one completion for this tag.
        self.queue_sqe(slot_index);
        Ok(())
    }

    fn kick(&mut self) -> io::Result<usize> {
        self.bind_thread()?;
        self.push_backlog();
        let pending = self.ring.submission().len();
        if pending == 0 {
            return Ok(0);
        }
        loop {
            match self.ring.submit() {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_transient(&e) => return Ok(0),
                Err(e) => return Err(e),
            }
        }
    }

    fn reap(&mut self, out: &mut Vec<Completion>, min_count: usize) -> io::Result<usize> {
        self.bind_thread()?;
        self.push_backlog();
        let target = min_count.min(self.in_flight);
        if self.in_flight > self.ready.len() && self.ring.completion().is_empty() {
            // Submit anything queued and, under DEFER_TASKRUN, let the kernel post CQEs.
            self.enter(0)?;
        }
        loop {
            self.drain_cq();
            self.push_backlog();
            if self.ready.len() >= target || self.sqes_outstanding == 0 {
                break;
            }
            self.enter(1)?;
        }
        let got = self.ready.len();
        out.extend(self.ready.drain(..));
        self.in_flight -= got;
        Ok(got)
    }

    fn in_flight_count(&self) -> usize {
        self.in_flight
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        if self.drain_for_drop() {
            return;
        }
        // The kernel may still write into these buffers: never give them back to the pool.
        let mut leaked = 0usize;
        for slot in self.slots.iter_mut() {
            match std::mem::replace(&mut slot.op, SlotOp::Idle) {
                SlotOp::Read { buf, .. } | SlotOp::Write { buf, .. } => {
                    std::mem::forget(buf);
                    leaked += 1;
                }
                _ => {}
            }
        }
        if let Some(zero) = self.zero_buf.take() {
            std::mem::forget(zero);
        }
        if let Some(pool) = self.registered_pool.take() {
            std::mem::forget(pool);
        }
        tracing::error!(
            leaked_buffers = leaked,
            sqes_outstanding = self.sqes_outstanding,
            "io_uring engine dropped with I/O in flight that could not be waited for; leaking \
             its buffers so the kernel cannot write into reused memory"
        );
    }
}
