//! The one source VM model: its disks as files, the oracle of every bookmark, the seeded
//! workload that writes to it, and the agent that carries its ops to an appliance.
//!
//! ```text
//!  Workload ──next op──► SourceModel ──apply──► SourceVm (disk files)
//!                             │  note / record_bookmark ──► Oracle (chunk log, digests)
//!                             └──write / zero_range / bookmark──► Agent ──► data port
//! ```
//!
//! `disk-sim demo`, `chaos` and `run` (and the appliance's process tests) drive a source VM
//! through this one type; what the appliance hands back is checked against its oracle
//! ([`SourceModel::verify_files`]: byte for byte at a bookmark), its digests
//! ([`SourceModel::points`]: whole digests per bookmark seq) or its disks now
//! ([`SourceModel::verify_current`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use engine::clock::now_unix_ns;
use engine::delta::{Consistency, DiskGeometry};

use super::error::{OracleError, VmError};
use super::oracle::Oracle;
use super::verify::compare_files;
use super::vm::SourceVm;
use crate::rng::Rng;
use crate::workload::{Op, Workload, WorkloadSpec};
use source_agent::sender::{Agent, AgentError};

/// Bytes written at a time when the VM's installed content is laid down.
const INSTALL_PIECE_BYTES: u64 = 1 << 20;

/// What went wrong driving the source model.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The oracle (or the VM's files under it).
    #[error(transparent)]
    Oracle(#[from] OracleError),
    /// The VM's files.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The agent refused or stopped.
    #[error("sending to the appliance: {0}")]
    Agent(#[from] AgentError),
    /// Making the model's temporary directory.
    #[error("creating {}: {source}", path.display())]
    TempDir {
        /// The directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// How a model's VM starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    /// Zeroed sparse disks, as new replicas are.
    Empty,
    /// The first `percent` of each disk holds seeded random bytes (an installed system).
    Installed {
        /// Share of each disk that holds data.
        percent: u64,
    },
}

/// The source VM, its oracle and its workload (module doc).
#[derive(Debug)]
pub struct SourceModel {
    vm: SourceVm,
    oracle: Oracle,
    workload: Workload,
    data: Vec<u8>,
    label: String,
    last_bookmark_id: u64,
    /// Bookmark seq (the appliance's point id) → whole digest of every disk at it.
    pub points: BTreeMap<u64, Vec<u64>>,
    /// A directory the model made for itself, removed when it is dropped.
    owned_dir: Option<PathBuf>,
}

impl SourceModel {
    /// The chaos model: zeroed disks of `geometry` in a new temporary directory (removed on
    /// drop), ops from `seed` with [`WorkloadSpec::chaos`] (a bookmark after every
    /// `bookmark_every` writes, every fourth one app-consistent).
    pub fn new(
        geometry: &[DiskGeometry],
        seed: u64,
        bookmark_every: u64,
    ) -> Result<Self, SourceError> {
        Ok(
            Self::temporary(geometry, seed, WorkloadSpec::chaos(bookmark_every))?
                .with_label("chaos"),
        )
    }

    /// Zeroed disks of `geometry` in a new temporary directory (removed on drop), ops from
    /// `seed` and `spec`.
    pub fn temporary(
        geometry: &[DiskGeometry],
        seed: u64,
        spec: WorkloadSpec,
    ) -> Result<Self, SourceError> {
        static MADE: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "disk-sim-source-{}-{}-{:x}",
            std::process::id(),
            MADE.fetch_add(1, Ordering::Relaxed),
            now_unix_ns()
        ));
        std::fs::create_dir_all(&dir).map_err(|source| SourceError::TempDir {
            path: dir.clone(),
            source,
        })?;
        match Self::create(&dir, "vm", geometry, seed, spec, Content::Empty) {
            Ok(mut model) => {
                model.owned_dir = Some(dir);
                Ok(model)
            }
            Err(error) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(error)
            }
        }
    }

    /// A new VM `name` with its disks in `vm_dir` (`<vm_dir>/disk-<i>.img`, refused if
    /// present) holding `content`, its oracle's log in `<vm_dir>/.oracle`, ops from `seed` and
    /// `spec`.
    pub fn create(
        vm_dir: &Path,
        name: &str,
        geometry: &[DiskGeometry],
        seed: u64,
        spec: WorkloadSpec,
        content: Content,
    ) -> Result<Self, SourceError> {
        let mut vm = SourceVm::create_at(vm_dir, name, geometry)?;
        if let Content::Installed { percent } = content {
            install(&mut vm, seed, percent.min(100))?;
        }
        let oracle = Oracle::new(&vm.dir().join(".oracle"), &vm)?;
        Ok(Self::with(vm, oracle, seed, spec))
    }

    /// The VM now runs on the existing disk files `paths` (after a failover or a failback):
    /// its oracle's log goes in `scratch_dir`, its ops come from `seed` and `spec`.
    pub fn open_paths(
        name: &str,
        paths: &[PathBuf],
        geometry: &[DiskGeometry],
        scratch_dir: &Path,
        seed: u64,
        spec: WorkloadSpec,
    ) -> Result<Self, SourceError> {
        let vm = SourceVm::open_paths(name, paths, geometry)?;
        let oracle = Oracle::new(scratch_dir, &vm)?;
        Ok(Self::with(vm, oracle, seed, spec))
    }

    fn with(vm: SourceVm, oracle: Oracle, seed: u64, spec: WorkloadSpec) -> Self {
        Self {
            workload: Workload::new(seed, spec, vm.geometries().to_vec()),
            label: vm.name().to_owned(),
            vm,
            oracle,
            data: Vec::new(),
            last_bookmark_id: 0,
            points: BTreeMap::new(),
            owned_dir: None,
        }
    }

    /// The label of the bookmarks the workload makes (the VM's name unless set).
    pub fn with_label(mut self, label: &str) -> Self {
        label.clone_into(&mut self.label);
        self
    }

    /// The disks' geometry, OS disk first.
    pub fn geometry(&self) -> &[DiskGeometry] {
        self.vm.geometries()
    }

    /// The disk files, OS disk first.
    pub fn files(&self) -> &[PathBuf] {
        self.vm.paths()
    }

    /// The VM's files.
    pub fn vm(&self) -> &SourceVm {
        &self.vm
    }

    /// The oracle.
    pub fn oracle(&self) -> &Oracle {
        &self.oracle
    }

    /// The workload.
    pub fn workload(&self) -> &Workload {
        &self.workload
    }

    /// Size of all disks.
    pub fn size_bytes(&self) -> u64 {
        self.geometry().iter().map(|d| d.size_bytes).sum()
    }

    /// The data of the write [`SourceModel::next_op`] returned last.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// The workload's next op, applied to the disks and noted by the oracle (a bookmark is
    /// recorded when it is sent: [`SourceModel::send`]). A write's bytes are
    /// [`SourceModel::data`].
    pub fn next_op(&mut self) -> Result<Op, SourceError> {
        let op = self.workload.next_op(&mut self.data);
        self.oracle.apply(&mut self.vm, &op, &self.data)?;
        Ok(op)
    }

    /// Sends `op` (the last one [`SourceModel::next_op`] returned) through `agent`; a
    /// bookmark is recorded under its seq. Returns the frame's seq.
    pub fn send(&mut self, agent: &Agent, op: &Op) -> Result<u64, SourceError> {
        Ok(match *op {
            Op::Write {
                disk_index,
                offset_bytes,
                ..
            } => agent.write(disk_index, offset_bytes, &self.data)?,
            Op::ZeroRange {
                disk_index,
                offset_bytes,
                length_bytes,
            } => agent.zero_range(disk_index, offset_bytes, length_bytes)?,
            Op::Bookmark { consistency, .. } => self.bookmark(agent, consistency)?,
        })
    }

    /// The next op, sent. Returns whether it was a bookmark, and the frame's seq.
    pub fn step(&mut self, agent: &Agent) -> Result<(bool, u64), SourceError> {
        let op = self.next_op()?;
        let seq = self.send(agent, &op)?;
        Ok((matches!(op, Op::Bookmark { .. }), seq))
    }

    /// The next write or trim (bookmarks of the workload are skipped), sent through `agent`
    /// when given. Returns the bytes written (0 for a trim).
    pub fn write(&mut self, agent: Option<&Agent>) -> Result<u64, SourceError> {
        loop {
            let op = self.next_op()?;
            if matches!(op, Op::Bookmark { .. }) {
                continue;
            }
            if let Some(agent) = agent {
                self.send(agent, &op)?;
            }
            return Ok(op.churn_bytes());
        }
    }

    /// A bookmark now with the model's label, sent through `agent` and recorded under its
    /// seq. Returns its seq.
    pub fn bookmark(
        &mut self,
        agent: &Agent,
        consistency: Consistency,
    ) -> Result<u64, SourceError> {
        let label = std::mem::take(&mut self.label);
        let seq = self.bookmark_labeled(agent, consistency, &label);
        self.label = label;
        seq
    }

    /// A bookmark now, sent through `agent` and recorded under its seq (ids increase by one
    /// from 1 over every bookmark the model sends). Returns its seq.
    pub fn bookmark_labeled(
        &mut self,
        agent: &Agent,
        consistency: Consistency,
        label: &str,
    ) -> Result<u64, SourceError> {
        let id = self.last_bookmark_id + 1;
        let seq = agent.bookmark(consistency, id, now_unix_ns(), label)?;
        self.last_bookmark_id = id;
        self.record_bookmark(seq, consistency)?;
        Ok(seq)
    }

    /// Records a bookmark that went out as frame `seq` by another way than an agent (a
    /// stream file, say).
    pub fn record_bookmark(
        &mut self,
        seq: u64,
        consistency: Consistency,
    ) -> Result<(), SourceError> {
        let record = self.oracle.record_bookmark(&self.vm, seq, consistency)?;
        self.points.insert(seq, record.whole_digests.clone());
        Ok(())
    }

    /// The whole digest of every disk now (reads every disk).
    pub fn digests(&self) -> Result<Vec<u64>, SourceError> {
        Ok(self
            .vm
            .snapshot_digests(self.oracle.chunk_bytes())?
            .into_iter()
            .map(|disk| disk.whole)
            .collect())
    }

    /// Checks that `files[i]` holds disk `i` as it was at bookmark `seq`, byte for byte
    /// (raw or fixed VHD).
    pub fn verify_files(&self, seq: u64, files: &[PathBuf]) -> Result<(), OracleError> {
        self.oracle.verify_files(seq, files)
    }

    /// Where `files` (raw images, `files[i]` disk `i`) differ from the disks now: empty when
    /// every one is equal.
    pub fn verify_current(&self, files: &[PathBuf]) -> Result<Vec<(usize, String)>, SourceError> {
        Ok(compare_files(files, &self.digests()?))
    }
}

impl Drop for SourceModel {
    fn drop(&mut self) {
        if let Some(dir) = &self.owned_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Lays down installed content: the first `percent` of each disk, seeded random bytes.
fn install(vm: &mut SourceVm, seed: u64, percent: u64) -> Result<(), VmError> {
    let mut rng = Rng::new(seed ^ 0x1a57_a11e_d000);
    let mut piece = vec![0u8; INSTALL_PIECE_BYTES as usize];
    for disk_index in 0..vm.geometries().len() {
        let geometry = vm.geometries()[disk_index];
        let block = u64::from(geometry.block_size_bytes);
        let used = geometry.size_bytes / 100 * percent / block * block;
        let mut at = 0;
        while at < used {
            let len = (used - at).min(INSTALL_PIECE_BYTES) as usize;
            rng.fill(&mut piece[..len]);
            vm.write(disk_index, at, &piece[..len])?;
            at += len as u64;
        }
    }
    Ok(())
}
