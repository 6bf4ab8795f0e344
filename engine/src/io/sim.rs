//! [`SimEngine`] over a [`SimDiskSet`]: an in-memory, seeded, fault-injecting set of disks
//! with a crash model, for tests and `disk-sim`.
//!
//! A [`SimDiskSet`] is a shared handle (`Arc<Mutex<…>>`) to named sim files. Each file has:
//!
//! ```text
//!              completed writes, in completion order (not yet durable)
//!   live    = durable + pending[0] + pending[1] + ... + pending[n-1]
//!   durable = what survives crash()
//!   Flush (watermark w = writes completed when it was submitted):
//!             pending[seq < w] are applied to durable, in order, and dropped
//! ```
//!
//! Invariants:
//! - deterministic: given the same seeds and the same calls, the same completions, errors and
//!   crash images come out (ordered maps, the workspace's seeded Xoshiro256++ generator, no clocks);
//! - a write (or write-zeroes) changes `live` when it *completes* (in `reap`), never earlier;
//!   ops submitted but not yet completed are lost by a crash;
//! - a `Flush` makes durable exactly the writes that completed before it was submitted
//!   (never more, so the model is never more optimistic than a real disk);
//! - faults are decided at submit time from per-file counters (the Nth write *submitted*
//!   fails), so they do not depend on completion order; they are delivered as completion
//!   errors that carry the op's buffer;
//! - a failed flush poisons its file: every op on it that completes afterwards fails with EIO,
//!   until a `crash()` (power cycle) clears it;
//! - `crash()` bumps a generation: ops submitted before it complete with EIO.
//!
//! With [`SimEngineConfig::reorder`], each `reap` completes a seeded random subset of the
//! kicked ops in a seeded random order, as a real device may.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use rand_xoshiro::Xoshiro256PlusPlus;
use rand_xoshiro::rand_core::{Rng, SeedableRng};

use super::{
    Completion, DEFAULT_QUEUE_DEPTH, FileId, IoEngine, IoOp, RejectReason, Rejected, check_op,
    check_queue_depth,
};

/// Shape of one sim file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimFileConfig {
    /// Size of the file; writes past it fail with ENOSPC, reads past it are short.
    pub size_bytes: u64,
    /// Alignment of offsets and lengths, and the granularity of torn writes.
    pub block_size_bytes: u32,
}

impl Default for SimFileConfig {
    fn default() -> Self {
        Self {
            size_bytes: 16 << 20,
            block_size_bytes: 4096,
        }
    }
}

/// Scripted faults of one sim file. Counts are 1-based and count ops *submitted* to the file
/// since the plan was set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimFaultPlan {
    /// The Nth write (`Write` or `WriteZeroes`) fails with EIO.
    pub fail_write_nth: Option<u64>,
    /// The Nth write (`Write` or `WriteZeroes`) fails with ENOSPC.
    pub enospc_write_nth: Option<u64>,
    /// The Nth read fails with EIO.
    pub fail_read_nth: Option<u64>,
    /// The Nth flush fails with EIO, which poisons the file.
    pub fail_flush_nth: Option<u64>,
    /// Every op after the first N fails with EIO.
    pub fail_all_after_ops: Option<u64>,
}

/// What `crash()` does to writes that are not durable.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CrashMode {
    /// Every file comes back as its durable image.
    DropUnflushed,
    /// Each block of each completed, non-durable write is applied on top of the durable image
    /// with probability `apply_probability`, in completion order (torn writes).
    Tear {
        /// Seed of the choice.
        seed: u64,
        /// Probability that one block of one write survives, in `[0, 1]`.
        apply_probability: f64,
    },
}

struct PendingWrite {
    seq: u64,
    offset_bytes: u64,
    data: Vec<u8>,
}

struct SimFile {
    config: SimFileConfig,
    live: Vec<u8>,
    durable: Vec<u8>,
    /// Completed, non-durable writes, in completion order (`seq` increasing).
    pending: VecDeque<PendingWrite>,
    completed_writes: u64,
    faults: SimFaultPlan,
    ops_submitted: u64,
    writes_submitted: u64,
    reads_submitted: u64,
    flushes_submitted: u64,
    poisoned: bool,
}

#[derive(Default)]
struct SimState {
    files: BTreeMap<String, SimFile>,
    generation: u64,
}

/// A shared set of named sim files. Clone it to hand the same disks to several engines and to
/// the test that inspects them.
#[derive(Clone, Default)]
pub struct SimDiskSet {
    state: Arc<Mutex<SimState>>,
}

impl std::fmt::Debug for SimDiskSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock();
        f.debug_struct("SimDiskSet")
            .field("files", &state.files.keys().collect::<Vec<_>>())
            .field("generation", &state.generation)
            .finish()
    }
}

fn not_found(name: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("no sim file named {name:?}"),
    )
}

impl SimDiskSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, SimState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Creates a zero-filled file.
    pub fn create_file(&self, name: &str, config: SimFileConfig) -> io::Result<()> {
        if config.block_size_bytes == 0 || !config.block_size_bytes.is_power_of_two() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "block_size_bytes must be a power of two",
            ));
        }
        let len = usize::try_from(config.size_bytes)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "size_bytes too large"))?;
        let mut state = self.lock();
        if state.files.contains_key(name) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("sim file {name:?} exists"),
            ));
        }
        state.files.insert(
            name.to_owned(),
            SimFile {
                config,
                live: vec![0; len],
                durable: vec![0; len],
                pending: VecDeque::new(),
                completed_writes: 0,
                faults: SimFaultPlan::default(),
                ops_submitted: 0,
                writes_submitted: 0,
                reads_submitted: 0,
                flushes_submitted: 0,
                poisoned: false,
            },
        );
        Ok(())
    }

    /// Sets a file's fault plan and restarts its op counters.
    pub fn set_faults(&self, name: &str, plan: SimFaultPlan) -> io::Result<()> {
        let mut state = self.lock();
        let file = state.files.get_mut(name).ok_or_else(|| not_found(name))?;
        file.faults = plan;
        file.ops_submitted = 0;
        file.writes_submitted = 0;
        file.reads_submitted = 0;
        file.flushes_submitted = 0;
        Ok(())
    }

    /// A copy of the file's live image (what reads return now).
    pub fn live_image(&self, name: &str) -> Option<Vec<u8>> {
        self.lock().files.get(name).map(|f| f.live.clone())
    }

    /// A copy of the file's durable image (what survives a crash).
    pub fn durable_image(&self, name: &str) -> Option<Vec<u8>> {
        self.lock().files.get(name).map(|f| f.durable.clone())
    }

    /// Whether a failed flush has poisoned the file.
    pub fn is_poisoned(&self, name: &str) -> Option<bool> {
        self.lock().files.get(name).map(|f| f.poisoned)
    }

    /// Number of completed writes that are not durable yet.
    pub fn pending_write_count(&self, name: &str) -> Option<usize> {
        self.lock().files.get(name).map(|f| f.pending.len())
    }

    /// Names of the files, sorted.
    pub fn file_names(&self) -> Vec<String> {
        self.lock().files.keys().cloned().collect()
    }

    /// Power loss: every file becomes its crash image (its durable image, plus torn pieces of
    /// non-durable writes under [`CrashMode::Tear`]); live and durable both equal it after,
    /// poisoning is cleared, fault plans and counters stay, and ops submitted before the crash
    /// complete with EIO. Returns the images by name.
    pub fn crash(&self, mode: CrashMode) -> BTreeMap<String, Vec<u8>> {
        let mut state = self.lock();
        state.generation += 1;
        let mut rng = match mode {
            CrashMode::DropUnflushed => None,
            CrashMode::Tear {
                seed,
                apply_probability,
            } => Some((SimRng::new(seed), apply_probability)),
        };
        let mut images = BTreeMap::new();
        for (name, file) in &mut state.files {
            let mut image = std::mem::take(&mut file.durable);
            if let Some((rng, p)) = rng.as_mut() {
                let block = file.config.block_size_bytes as usize;
                for w in &file.pending {
                    let base = w.offset_bytes as usize;
                    for (i, chunk) in w.data.chunks(block).enumerate() {
                        if rng.next_f64() < *p {
                            let at = base + i * block;
                            image[at..at + chunk.len()].copy_from_slice(chunk);
                        }
                    }
                }
            }
            file.pending.clear();
            file.poisoned = false;
            file.live.clone_from(&image);
            file.durable.clone_from(&image);
            images.insert(name.clone(), image);
        }
        images
    }
}

/// Settings of a [`SimEngine`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimEngineConfig {
    /// Maximum ops in flight.
    pub queue_depth: usize,
    /// Seed of the completion order.
    pub seed: u64,
    /// Complete ops in a seeded random order and a random number per `reap`, instead of all,
    /// in submission order.
    pub reorder: bool,
}

impl Default for SimEngineConfig {
    fn default() -> Self {
        Self {
            queue_depth: DEFAULT_QUEUE_DEPTH,
            seed: 0,
            reorder: false,
        }
    }
}

struct SimOp {
    tag: u64,
    op: IoOp,
    /// Scripted failure decided at submit: errno, and whether it poisons the file.
    fault: Option<(i32, bool)>,
    /// For a flush: the file's completed-write count when it was submitted.
    flush_watermark: u64,
    generation: u64,
}

/// Engine over a [`SimDiskSet`]; files are added by name.
pub struct SimEngine {
    disks: SimDiskSet,
    /// (name, block size) by `FileId`.
    files: Vec<(String, u32)>,
    queued: VecDeque<SimOp>,
    kicked: VecDeque<SimOp>,
    queue_depth: usize,
    reorder: bool,
    rng: SimRng,
}

impl std::fmt::Debug for SimEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimEngine")
            .field("files", &self.files)
            .field("queued", &self.queued.len())
            .field("kicked", &self.kicked.len())
            .field("queue_depth", &self.queue_depth)
            .field("reorder", &self.reorder)
            .finish()
    }
}

impl SimEngine {
    /// An engine over `disks`.
    pub fn new(disks: &SimDiskSet, config: SimEngineConfig) -> io::Result<Self> {
        check_queue_depth(config.queue_depth)?;
        Ok(Self {
            disks: disks.clone(),
            files: Vec::new(),
            queued: VecDeque::with_capacity(config.queue_depth),
            kicked: VecDeque::with_capacity(config.queue_depth),
            queue_depth: config.queue_depth,
            reorder: config.reorder,
            rng: SimRng::new(config.seed),
        })
    }

    /// The disk set this engine works on.
    pub fn disks(&self) -> &SimDiskSet {
        &self.disks
    }

    fn complete(state: &mut SimState, name: &str, sim_op: SimOp) -> Completion {
        let SimOp {
            tag,
            op,
            fault,
            flush_watermark,
            generation,
        } = sim_op;
        let current_generation = state.generation;
        let Some(file) = state.files.get_mut(name) else {
            return Completion {
                tag,
                buf: op.into_buf(),
                result: Err(not_found(name)),
            };
        };
        let failure = if generation != current_generation {
            Some(io::Error::other(
                "simulated power loss before this op completed",
            ))
        } else if file.poisoned {
            Some(io::Error::from_raw_os_error(libc::EIO))
        } else if let Some((errno, poisons)) = fault {
            if poisons {
                file.poisoned = true;
            }
            Some(io::Error::from_raw_os_error(errno))
        } else {
            None
        };
        if let Some(e) = failure {
            return Completion {
                tag,
                buf: op.into_buf(),
                result: Err(e),
            };
        }
        match op {
            IoOp::Read {
                offset_bytes,
                mut buf,
                ..
            } => {
                let size = file.live.len() as u64;
                let n = if offset_bytes >= size {
                    0
                } else {
                    (size - offset_bytes).min(buf.len_bytes() as u64) as usize
                };
                let at = offset_bytes as usize;
                buf.set_len_bytes(n);
                buf.as_mut_slice()
                    .copy_from_slice(&file.live[at.min(file.live.len())..][..n]);
                Completion {
                    tag,
                    buf: Some(buf),
                    result: Ok(n as u32),
                }
            }
            IoOp::Write {
                offset_bytes, buf, ..
            } => {
                let result = file.apply_write(offset_bytes, buf.as_slice().to_vec());
                Completion {
                    tag,
                    result: result.map(|()| buf.len_bytes() as u32),
                    buf: Some(buf),
                }
            }
            IoOp::WriteZeroes {
                offset_bytes,
                len_bytes,
                ..
            } => {
                let result = match usize::try_from(len_bytes) {
                    Ok(len) if offset_bytes.saturating_add(len_bytes) <= file.live.len() as u64 => {
                        file.apply_write(offset_bytes, vec![0; len])
                    }
                    _ => Err(io::Error::from_raw_os_error(libc::ENOSPC)),
                };
                Completion {
                    tag,
                    buf: None,
                    result: result.map(|()| 0),
                }
            }
            IoOp::Flush { .. } => {
                while let Some(w) = file.pending.front() {
                    if w.seq >= flush_watermark {
                        break;
                    }
                    if let Some(w) = file.pending.pop_front() {
                        let at = w.offset_bytes as usize;
                        file.durable[at..at + w.data.len()].copy_from_slice(&w.data);
                    }
                }
                Completion {
                    tag,
                    buf: None,
                    result: Ok(0),
                }
            }
        }
    }
}

impl SimFile {
    fn apply_write(&mut self, offset_bytes: u64, data: Vec<u8>) -> io::Result<()> {
        let end = offset_bytes.saturating_add(data.len() as u64);
        if end > self.live.len() as u64 {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        let at = offset_bytes as usize;
        self.live[at..at + data.len()].copy_from_slice(&data);
        self.pending.push_back(PendingWrite {
            seq: self.completed_writes,
            offset_bytes,
            data,
        });
        self.completed_writes += 1;
        Ok(())
    }

    /// Counts a submitted op and decides its scripted fault.
    fn on_submit(&mut self, op: &IoOp) -> Option<(i32, bool)> {
        self.ops_submitted += 1;
        let nth = |plan: Option<u64>, count: u64| plan == Some(count);
        let scripted = match op {
            IoOp::Read { .. } => {
                self.reads_submitted += 1;
                nth(self.faults.fail_read_nth, self.reads_submitted).then_some((libc::EIO, false))
            }
            IoOp::Write { .. } | IoOp::WriteZeroes { .. } => {
                self.writes_submitted += 1;
                if nth(self.faults.fail_write_nth, self.writes_submitted) {
                    Some((libc::EIO, false))
                } else if nth(self.faults.enospc_write_nth, self.writes_submitted) {
                    Some((libc::ENOSPC, false))
                } else {
                    None
                }
            }
            IoOp::Flush { .. } => {
                self.flushes_submitted += 1;
                nth(self.faults.fail_flush_nth, self.flushes_submitted).then_some((libc::EIO, true))
            }
        };
        let after_limit = match self.faults.fail_all_after_ops {
            Some(n) if self.ops_submitted > n => Some((libc::EIO, false)),
            _ => None,
        };
        scripted.or(after_limit)
    }
}

impl IoEngine for SimEngine {
    type File = String;

    fn backend_name(&self) -> &'static str {
        "sim"
    }

    fn add_file(&mut self, name: String) -> io::Result<FileId> {
        let block = {
            let state = self.disks.lock();
            let file = state.files.get(&name).ok_or_else(|| not_found(&name))?;
            file.config.block_size_bytes
        };
        let id = FileId::from_usize(self.files.len());
        self.files.push((name, block));
        Ok(id)
    }

    fn alignment_bytes(&self, file: FileId) -> Option<u32> {
        self.files.get(file.index() as usize).map(|(_, b)| *b)
    }

    fn queue_depth(&self) -> usize {
        self.queue_depth
    }

    fn submit(&mut self, op: IoOp, tag: u64) -> Result<(), Rejected> {
        if self.in_flight_count() >= self.queue_depth {
            return Err(Rejected {
                op,
                reason: RejectReason::QueueFull,
            });
        }
        let Some((name, block)) = self.files.get(op.file().index() as usize) else {
            return Err(Rejected {
                op,
                reason: RejectReason::UnknownFile,
            });
        };
        if let Err(reason) = check_op(&op, *block) {
            return Err(Rejected { op, reason });
        }
        let mut state = self.disks.lock();
        let generation = state.generation;
        let (fault, flush_watermark) = match state.files.get_mut(name) {
            Some(file) => (file.on_submit(&op), file.completed_writes),
            // The set never removes files; keep the op, it completes with NotFound.
            None => (None, 0),
        };
        drop(state);
        self.queued.push_back(SimOp {
            tag,
            op,
            fault,
            flush_watermark,
            generation,
        });
        Ok(())
    }

    fn kick(&mut self) -> io::Result<usize> {
        let n = self.queued.len();
        self.kicked.extend(self.queued.drain(..));
        Ok(n)
    }

    fn reap(&mut self, out: &mut Vec<Completion>, min_count: usize) -> io::Result<usize> {
        self.kick()?;
        let available = self.kicked.len();
        if available == 0 {
            return Ok(0);
        }
        let count = if self.reorder {
            let low = min_count.clamp(1, available);
            low + self.rng.below((available - low + 1) as u64) as usize
        } else {
            available
        };
        let mut state = self.disks.lock();
        for _ in 0..count {
            let next = if self.reorder {
                let i = self.rng.below(self.kicked.len() as u64) as usize;
                self.kicked.swap_remove_back(i)
            } else {
                self.kicked.pop_front()
            };
            let Some(sim_op) = next else { break };
            let name = self
                .files
                .get(sim_op.op.file().index() as usize)
                .map(|(n, _)| n.as_str())
                .unwrap_or("");
            out.push(Self::complete(&mut state, name, sim_op));
        }
        Ok(count)
    }

    fn in_flight_count(&self) -> usize {
        self.queued.len() + self.kicked.len()
    }
}

/// The simulator's fault and order choices, from the workspace's one seeded RNG
/// (Xoshiro256++ via `seed_from_u64`: the same seed gives the same run).
#[derive(Debug, Clone)]
struct SimRng(Xoshiro256PlusPlus);

impl SimRng {
    fn new(seed: u64) -> Self {
        Self(Xoshiro256PlusPlus::seed_from_u64(seed))
    }

    fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform-ish in `[0, n)`; `n` must be non-zero.
    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Uniform in `[0, 1)`.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sim_rng_is_deterministic() {
        let mut a = SimRng::new(7);
        let mut b = SimRng::new(7);
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
            let f = a.next_f64();
            assert!((0.0..1.0).contains(&f));
            b.next_f64();
        }
    }

    #[test]
    fn duplicate_and_missing_files() {
        let disks = SimDiskSet::new();
        disks.create_file("a", SimFileConfig::default()).unwrap();
        assert!(disks.create_file("a", SimFileConfig::default()).is_err());
        let mut engine = SimEngine::new(&disks, SimEngineConfig::default()).unwrap();
        assert!(engine.add_file("b".to_owned()).is_err());
        assert_eq!(engine.add_file("a".to_owned()).unwrap().index(), 0);
    }
}
