//! `export`: recovery points served over NBD by a real `appliance serve`, each figure next to
//! the physical limit measured in the same run (fio on the replica file, or on the filesystem
//! that holds the overlays).
//!
//! ```text
//!  appliance serve (defaults, data dir in the scratch dir, NBD on 127.0.0.1:0)
//!   items: sparse disks of 1 GiB, 16 GiB, 256 GiB, 1 TiB (created by the appliance, sparse;
//!          a disk-sim agent writes 4 MiB at 0 and 64 KiB in the middle and at the end, then
//!          a bookmark: the point) and one data disk (a file in the data dir written in
//!          full with O_DIRECT, attached as the replica; the agent overwrites 1 MiB, then a
//!          bookmark)
//!     │
//!     ├─ first byte   per repetition, per disk size (interleaved): POST test-failover
//!     │               {mode: export} → GET item (export id) → GET export (URI) → NBD connect,
//!     │               handshake, read 4 KiB at 0 (own client, checked against the agent's
//!     │               bytes) → clean-up; next to copy-mode test failover (POST → job done) of
//!     │               the 1 GiB disks (sparse, and written in full)
//!     ├─ seq read     nbdcopy nbd://…(read-only export of the data disk) null:   vs  fio
//!     │               --rw=read --bs=256k psync, buffered; both with the file's page cache
//!     │               dropped first                                             goal ≥ 0.8
//!     ├─ rand read    fio --ioengine=nbd 4 KiB randread, 4 jobs (connections) × iodepth 8
//!     │               vs  fio io_uring 4 KiB randread, 4 jobs × iodepth 8, buffered; page
//!     │               cache dropped first; time based                           goal ≥ 0.7
//!     │               diag: the same 32 in flight over 8 connections × qd 4 (scaling)
//!     └─ drill write  nbdcopy --flush SRC nbd://…(a fresh test-failover drill of the data
//!                     disk)   vs  fio --rw=write --bs=256k psync buffered --end_fsync=1 on a
//!                     fresh file of the same filesystem (the overlays' one)     no goal
//! ```
//!
//! Runs alternate as in the other benchmarks (fio, export, fio, export, fio) and ratios are
//! of medians. O_DIRECT fio rows (one run each) show the device's own limit next to the
//! buffered ones the goals use (a second ratio, no goal): the export reads and writes through
//! the page cache, so the comparable fio job is a buffered one with the same cache state.
//! The appliance refuses paths outside its data directory, so the attached data disk and the
//! copy-mode targets live inside it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use appliance_api::model::{
    DiskMode, DiskSpec, EnableRequest, ExportMode, ExportRequest, Format, ItemState, JobState,
    MaterializeRequest, PointSpec,
};
use disk_sim::site::{Appliance, parse_item_id};
use engine::delta::{Consistency, DiskGeometry, EncoderOptions};
use source_agent::sender::{Agent, AgentConfig};

use crate::fio::Fio;
use crate::machine::Scratch;
use crate::report::Bench;
use crate::workload::Rng;

mod data;
mod first_byte;
mod nbd_client;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
/// Longest wait for a point to be applied, a job to end, a tool to finish.
const WAIT: Duration = Duration::from_secs(600);

/// Sizes of the export benchmark.
#[derive(Debug, Clone)]
pub struct ExportPlan {
    /// Sparse disk sizes of the first-byte table, GiB.
    pub sparse_gib: Vec<u64>,
    /// First-byte repetitions per disk size.
    pub first_byte_repeats: usize,
    /// Copy-mode test failovers per 1 GiB disk.
    pub copy_repeats: usize,
    /// Size of the data disk (read benchmarks; the copy-mode reference).
    pub data_bytes: u64,
    /// Bytes nbdcopy writes into a drill (and fio into a file).
    pub write_bytes: u64,
    /// Length of one random-read run, seconds.
    pub rand_runtime_s: u64,
    /// Export runs per table (fio: one more).
    pub repeats: usize,
}

impl ExportPlan {
    /// The plan of a mode.
    pub fn new(quick: bool, tiny: bool) -> Self {
        if tiny {
            Self {
                sparse_gib: vec![1, 1024],
                first_byte_repeats: 2,
                copy_repeats: 1,
                data_bytes: 64 * MIB,
                write_bytes: 32 * MIB,
                rand_runtime_s: 1,
                repeats: 1,
            }
        } else if quick {
            Self {
                sparse_gib: vec![1, 16, 256, 1024],
                first_byte_repeats: 5,
                copy_repeats: 3,
                data_bytes: GIB,
                write_bytes: 512 * MIB,
                rand_runtime_s: 2,
                repeats: 3,
            }
        } else {
            Self {
                sparse_gib: vec![1, 16, 256, 1024],
                first_byte_repeats: 10,
                copy_repeats: 5,
                data_bytes: GIB,
                write_bytes: GIB,
                rand_runtime_s: 10,
                repeats: 3,
            }
        }
    }

    /// Scratch space: the data disk, a copy-mode copy of it, the drill write's source, its
    /// overlay and fio's file, and 1 GiB for the appliance (the sparse disks hold a few MiB).
    pub fn scratch_bytes(&self) -> u64 {
        2 * self.data_bytes + 3 * self.write_bytes + GIB
    }
}

/// nbdcopy, or an error that says how to install it (Debian: libnbd-bin).
pub fn nbdcopy() -> Result<PathBuf> {
    crate::fio::ensure_program("nbdcopy", "libnbd-bin")
}

/// Whether this fio has the NBD engine (`fio --enghelp=nbd` lists its `uri` option).
fn fio_has_nbd(fio: &Fio) -> bool {
    std::process::Command::new(&fio.path)
        .arg("--enghelp=nbd")
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("uri"))
}

/// One protected item with one disk and a recovery point.
pub(crate) struct Item {
    pub(crate) id: String,
    /// What the table calls it, e.g. "1 TiB sparse".
    pub(crate) label: String,
    pub(crate) size_bytes: u64,
    /// Bytes the agent wrote before the point.
    pub(crate) written_bytes: u64,
    pub(crate) point: u64,
    /// The point's first 4 KiB (what a first read must return).
    pub(crate) first_block: Vec<u8>,
    /// Kept connected for the whole benchmark.
    _agent: Agent,
}

fn size_text(bytes: u64) -> String {
    if bytes >= 1 << 40 && bytes.is_multiple_of(1 << 40) {
        format!("{} TiB", bytes >> 40)
    } else if bytes >= GIB && bytes.is_multiple_of(GIB) {
        format!("{} GiB", bytes >> 30)
    } else {
        format!("{} MiB", bytes >> 20)
    }
}

/// Enables protection of one disk (`spec`, `size_bytes`), connects an agent, writes `writes`
/// (offset, length) of seeded random data, makes a bookmark and waits until it is applied.
fn protect(
    appliance: &Appliance,
    name: &str,
    label: String,
    spec: DiskSpec,
    size_bytes: u64,
    writes: &[(u64, usize)],
) -> Result<Item> {
    let request = EnableRequest {
        name: name.to_owned(),
        disks: vec![spec],
        policy: None,
        temporary_os_disk: None,
    };
    let enabled = appliance
        .client()
        .enable(&request)
        .with_context(|| format!("enabling protection of {name}"))?;
    let geometry = DiskGeometry {
        size_bytes,
        block_size_bytes: 4096,
    };
    let mut config = AgentConfig::new(
        appliance.data_addr,
        parse_item_id(&enabled.item.id)?,
        enabled.stream_token.as_bytes(),
        name,
        vec![geometry],
    );
    config.encoder = EncoderOptions { zstd_level: None };
    let agent =
        Agent::connect(config).with_context(|| format!("connecting the agent of {name}"))?;
    let mut rng = Rng::new(0xe4b0 ^ size_bytes);
    let mut first_block = Vec::new();
    let mut written_bytes = 0u64;
    let mut buf = vec![0u8; MIB as usize];
    for &(offset, len) in writes {
        let mut at = 0usize;
        while at < len {
            let n = (len - at).min(buf.len());
            rng.fill(&mut buf[..n]);
            let offset = offset + at as u64;
            if offset == 0 {
                first_block = buf[..4096.min(n)].to_vec();
            }
            agent
                .write(0, offset, &buf[..n])
                .with_context(|| format!("writing to {name}"))?;
            at += n;
            written_bytes += n as u64;
        }
    }
    let point = agent
        .bookmark(Consistency::Crash, 1, engine::clock::now_unix_ns(), "")
        .with_context(|| format!("bookmark of {name}"))?;
    agent
        .flush(WAIT)
        .with_context(|| format!("draining the agent of {name}"))?;
    appliance.wait_point(&enabled.item.id, point, WAIT)?;
    // The supervisor marks the item protected at its next tick after the first point.
    appliance.wait_state(&enabled.item.id, ItemState::Protected, WAIT)?;
    if first_block.len() != 4096 {
        bail!("{name}: the agent's writes must start with 4 KiB at offset 0");
    }
    Ok(Item {
        id: enabled.item.id,
        label,
        size_bytes,
        written_bytes,
        point,
        first_block,
        _agent: agent,
    })
}

/// The NBD URI of an item's test-failover export (after `POST test-failover {mode: export}`).
fn test_failover_uri(appliance: &Appliance, item: &str) -> Result<String> {
    let view = appliance.client().item(item)?;
    let export_id = view
        .test_failover
        .and_then(|t| t.export_id)
        .ok_or_else(|| anyhow!("item {item} has no test-failover export"))?;
    let export = appliance.client().export_view(&export_id)?;
    Ok(export
        .disks
        .first()
        .ok_or_else(|| anyhow!("export {export_id} has no disk"))?
        .uri
        .clone())
}

/// Starts a test failover of `item` at its point; `target_dir` only for copy mode.
fn start_test_failover(
    appliance: &Appliance,
    item: &Item,
    mode: DiskMode,
    target_dir: Option<&Path>,
) -> Result<()> {
    let request = MaterializeRequest {
        point: PointSpec::Id(item.point),
        target_dir: target_dir.map_or_else(String::new, |d| d.display().to_string()),
        format: Format::Raw,
        mode,
    };
    let job = appliance
        .client()
        .test_failover(&item.id, &request)
        .with_context(|| format!("test failover of {}", item.label))?;
    let job = if job.is_finished() {
        job
    } else {
        appliance
            .client()
            .wait_job(job.id, Duration::from_millis(2), WAIT, &mut |_| {})?
    };
    if job.state == JobState::Failed {
        bail!(
            "test failover of {} failed: {}",
            item.label,
            job.error.as_deref().unwrap_or("no reason given")
        );
    }
    Ok(())
}

/// Runs `cmd`, returning its wall time and CPU (user + system of the child); an error with
/// its stderr when it fails.
fn run_tool(cmd: &mut std::process::Command) -> Result<(f64, crate::cpu::CpuTimes, String)> {
    let command = std::iter::once(cmd.get_program().to_string_lossy().into_owned())
        .chain(cmd.get_args().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ");
    let before = crate::cpu::children()?;
    let started = Instant::now();
    let out = cmd
        .output()
        .with_context(|| format!("starting {command}"))?;
    let elapsed_s = started.elapsed().as_secs_f64();
    let cpu = crate::cpu::children()?.since(&before);
    if !out.status.success() {
        bail!(
            "{command} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok((elapsed_s, cpu, command))
}

/// Flushes every dirty page of every filesystem, so that one run's writeback does not land
/// in the next one's time.
fn sync_all() {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
}

/// Runs the export benchmark: four tables (first byte, sequential read, random read, drill
/// write). Pushes one stdout line per ratio.
pub fn export(
    scratch: &Scratch,
    bin: &Path,
    fio: &Fio,
    plan: &ExportPlan,
    lines: &mut Vec<String>,
) -> Result<Vec<Bench>> {
    let nbdcopy = nbdcopy()?;
    let data_dir = scratch.join("export-appliance");
    progress!(
        "export: starting {} serve in {}",
        bin.display(),
        data_dir.display()
    );
    let appliance = Appliance::start_with_bin(bin, &data_dir, &[])?;

    // An attached disk must be inside the data directory (or a disk store).
    let attached = data_dir.join("attached");
    std::fs::create_dir_all(&attached)
        .with_context(|| format!("creating {}", attached.display()))?;
    let data_file = attached.join("export-data.img");
    progress!(
        "export: writing the data disk ({} MiB, O_DIRECT) and protecting it",
        plan.data_bytes >> 20
    );
    crate::workload::prepare_replica(&data_file, plan.data_bytes)?;
    let data = protect(
        &appliance,
        "export-data",
        format!("{} written in full", size_text(plan.data_bytes)),
        DiskSpec::attach(data_file.display().to_string()),
        plan.data_bytes,
        &[(0, MIB as usize)],
    )?;
    let mut sparse = Vec::new();
    for &gib in &plan.sparse_gib {
        let size_bytes = gib * GIB;
        progress!("export: protecting a sparse {} disk", size_text(size_bytes));
        let mid = (size_bytes / 2) & !(MIB - 1);
        sparse.push(protect(
            &appliance,
            &format!("export-sparse-{gib}g"),
            format!("{} sparse", size_text(size_bytes)),
            DiskSpec::create(gib << 10, Some(4096)),
            size_bytes,
            &[
                (0, 4 * MIB as usize),
                (mid, 64 << 10),
                (size_bytes - MIB, 64 << 10),
            ],
        )?);
    }

    let mut benches = vec![first_byte::first_byte(
        &appliance,
        &sparse,
        &data,
        &data_dir.join("copies"),
        plan,
        bin,
        lines,
    )?];
    let ctx = data::DataCtx {
        appliance: &appliance,
        fio,
        nbdcopy: &nbdcopy,
        bin,
        item: &data,
        file: &data_file,
        scratch,
        plan,
    };
    benches.push(data::seq_read(&ctx, lines)?);
    if fio_has_nbd(fio) {
        benches.push(data::rand_read(&ctx, lines)?);
    } else {
        progress!("export: this fio has no nbd engine: the random-read table is left out");
    }
    benches.push(data::drill_write(&ctx, lines)?);
    appliance.stop().context("stopping the appliance")?;
    Ok(benches)
}

/// Parameters every table of this benchmark carries.
fn common_params(bench: &mut Bench, bin: &Path) {
    bench.param("appliance", bin.display().to_string());
    bench.param(
        "appliance_settings",
        "defaults; NBD server on 127.0.0.1 (loopback)",
    );
}

/// A read-only export of `item`'s point: (export id, URI).
fn read_only_export(appliance: &Appliance, item: &Item) -> Result<(String, String)> {
    let export = appliance.client().export(
        &item.id,
        &ExportRequest {
            point: PointSpec::Id(item.point),
            mode: ExportMode::ReadOnly,
        },
    )?;
    let uri = export
        .disks
        .first()
        .ok_or_else(|| anyhow!("export {} has no disk", export.id))?
        .uri
        .clone();
    Ok((export.id, uri))
}
