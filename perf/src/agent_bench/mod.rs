//! `agent`: what capture costs. The same fio job on four paths to one image file, side by
//! side in one run, then the agent's memory through an outage and its catch-up.
//!
//! ```text
//!  image file (written once with O_DIRECT) on the scratch filesystem
//!   (a) disk       fio --filename=IMAGE (libaio, O_DIRECT)                  the physical limit
//!   (b) NBD, off   source-agent (capture = false) ─ nbdfuse ─ loop (direct I/O) ─ fio
//!   (c) NBD, on    source-agent (capture on, streaming to an appliance item) ─ nbdfuse ─ loop
//!                  ─ fio; before each run the agent has sent and had acknowledged everything
//!   (d) NBD, raw   as (c) with `compression = "none"`, streaming to a second item
//!   jobs: 4 KiB random write and 1 MiB sequential write, iodepth 16, time based
//!   rounds: (a, b, c, d) × job, repeated; ratios of medians: (c)/(b) and (d)/(b) goal ≥ 0.8,
//!   (c)/(a), (b)/(a)
//!
//!  outage: appliance SIGSTOPped ─ fio 4 KiB random writes to (c) for N s ─ the agent's VmRSS
//!          every 100 ms ─ peak vs its bound ─ status (unsent_bytes, grain_bytes) ─ SIGCONT ─
//!          catch-up timed until nothing is unsent or in the backlog: bytes resent vs changed
//! ```
//!
//! Skips (and says why) unless root, FUSE, loop devices, nbdfuse and the `source-agent`
//! binary are there. The appliance and `source-agent` binaries are found beside this program
//! (or at `$APPLIANCE_BIN`, `$SOURCE_AGENT_BIN`).

mod outage;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use appliance_api::model::{DiskSpec, EnableRequest};
use disk_sim::agent_disk::{AgentProcess, AgentSetup, KernelDisk};
use disk_sim::site::Appliance;

use crate::fio::{Fio, FioJob};
use crate::machine::Scratch;
use crate::report::{Bench, Goal, Row, Side, median};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
/// I/Os in flight of every job.
const IODEPTH: usize = 16;
/// The capture agent's backlog limit (the config key `backlog_limit_mib`).
const BACKLOG_LIMIT_MIB: u64 = 64;
/// The capture agent's change-map limit (`change_map_limit_kib`, per disk).
const CHANGE_MAP_LIMIT_KIB: u64 = 256;
/// Longest wait for the capture agent to send what it holds (initial sync, drain, catch-up).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(900);

/// Sizes of the agent benchmark.
#[derive(Debug, Clone)]
pub struct AgentPlan {
    /// Size of the image file (the disk).
    pub disk_bytes: u64,
    /// Length of one fio run, seconds.
    pub runtime_s: u64,
    /// Rounds of (disk, capture off, capture on) per job.
    pub rounds: usize,
    /// Length of the outage (fio writing, appliance stopped), seconds.
    pub outage_s: u64,
}

impl AgentPlan {
    /// The plan of a mode.
    pub fn new(quick: bool, tiny: bool) -> Self {
        if tiny {
            Self {
                disk_bytes: 64 * MIB,
                runtime_s: 1,
                rounds: 1,
                outage_s: 2,
            }
        } else if quick {
            Self {
                disk_bytes: GIB,
                runtime_s: 3,
                rounds: 2,
                outage_s: 20,
            }
        } else {
            Self {
                disk_bytes: GIB,
                runtime_s: 10,
                rounds: 3,
                outage_s: 600,
            }
        }
    }

    /// Scratch space: the image, the appliance's replica, and room for what the appliance
    /// stages while it applies.
    pub fn scratch_bytes(&self) -> u64 {
        2 * self.disk_bytes + 2 * GIB
    }
}

/// Why the agent benchmark cannot run here (it then prints this and is left out).
pub fn why_skip() -> Option<String> {
    if let Some(why) = disk_sim::agent_disk::why_not_runnable() {
        return Some(why);
    }
    if let Err(e) = disk_sim::site::source_agent_bin() {
        let build = if cfg!(debug_assertions) {
            "cargo build -p source-agent"
        } else {
            "cargo build --release -p source-agent"
        };
        return Some(format!("{e:#}; build it: {build}"));
    }
    None
}

/// The fio jobs: (table title part, fio args).
fn jobs() -> [(&'static str, &'static str, &'static str); 2] {
    [
        ("4 KiB random write", "randwrite", "4k"),
        ("1 MiB sequential write", "write", "1M"),
    ]
}

/// A fio job on `target` (a file or a block device).
pub(super) fn fio_job(name: &str, target: &Path, rw: &str, bs: &str, size: u64, s: u64) -> FioJob {
    FioJob {
        name: name.to_owned(),
        args: vec![
            format!("--filename={}", target.display()),
            "--ioengine=libaio".into(),
            "--direct=1".into(),
            format!("--rw={rw}"),
            format!("--bs={bs}"),
            format!("--iodepth={IODEPTH}"),
            format!("--size={size}"),
            "--time_based".into(),
            format!("--runtime={s}"),
            "--randrepeat=0".into(),
            "--norandommap".into(),
        ],
    }
}

/// Sum of a numeric field over the status's disks.
pub(super) fn disks_sum(status: &serde_json::Value, field: &str) -> u64 {
    status["disks"]
        .as_array()
        .map_or(0, |d| d.iter().filter_map(|d| d[field].as_u64()).sum())
}

/// Waits until the capture agent has nothing unsent and nothing in its backlog; how long
/// that took.
pub(super) fn drain(agent: &AgentProcess, what: &str) -> Result<Duration> {
    let started = Instant::now();
    agent.wait_status(
        &format!("{what}: nothing unsent, empty backlog"),
        DRAIN_TIMEOUT,
        |s| disks_sum(s, "unsent_bytes") == 0 && s["backlog_bytes"].as_u64() == Some(0),
    )?;
    Ok(started.elapsed())
}

/// The running pieces: the appliance, the two agents and their block devices.
pub(super) struct Paths {
    pub(super) appliance: Appliance,
    pub(super) image: PathBuf,
    pub(super) off: (AgentProcess, KernelDisk),
    pub(super) on: (AgentProcess, KernelDisk),
    /// The capture agent with `compression = "none"` (its own item).
    pub(super) raw: (AgentProcess, KernelDisk),
    /// The capture agent's VmRSS right after it printed `ready`, KiB.
    pub(super) on_start_rss_kib: u64,
}

fn start_paths(scratch: &Scratch, bin: &Path, agent_bin: &Path, plan: &AgentPlan) -> Result<Paths> {
    let image = scratch.join("agent-disk.img");
    progress!(
        "agent: writing the image ({} MiB, O_DIRECT)",
        plan.disk_bytes >> 20
    );
    crate::workload::prepare_replica(&image, plan.disk_bytes)?;
    let appliance = Appliance::start_with_bin(bin, &scratch.join("agent-appliance"), &[])?;
    let enabled = appliance
        .client()
        .enable(&EnableRequest {
            name: "agent-bench".into(),
            disks: vec![DiskSpec::create(plan.disk_bytes >> 20, Some(4096))],
            policy: None,
            temporary_os_disk: None,
        })
        .context("enabling protection of the benchmark's disk")?;
    // A second item for the agent that streams raw payloads (one session per item).
    let enabled_raw = appliance
        .client()
        .enable(&EnableRequest {
            name: "agent-bench-raw".into(),
            disks: vec![DiskSpec::create(plan.disk_bytes >> 20, Some(4096))],
            policy: None,
            temporary_os_disk: None,
        })
        .context("enabling protection of the benchmark's disk (raw payloads)")?;
    let setup = |name: &str, capture: bool, raw: bool| AgentSetup {
        item_name: name.to_owned(),
        item_id: capture.then(|| if raw { &enabled_raw } else { &enabled }.item.id.clone()),
        appliance: capture.then_some(appliance.data_addr),
        token: capture.then(|| {
            if raw { &enabled_raw } else { &enabled }
                .stream_token
                .clone()
        }),
        compression: raw.then(|| "none".to_owned()),
        state_dir: scratch.join(&format!("{name}-state")),
        capture,
        backlog_limit_mib: capture.then_some(BACKLOG_LIMIT_MIB),
        change_map_limit_kib: capture.then_some(CHANGE_MAP_LIMIT_KIB),
        bookmark_interval_ms: None,
        disks: vec![("disk".into(), image.clone())],
    };
    let start = |name: &str, capture: bool, raw: bool| -> Result<(AgentProcess, KernelDisk)> {
        let config = setup(name, capture, raw).write(&scratch.join("agent-etc"))?;
        let agent = AgentProcess::start(agent_bin, &config)?;
        let disk = KernelDisk::attach(agent.uri("disk")?, &scratch.join(&format!("{name}-fuse")))?;
        Ok((agent, disk))
    };
    let off = start("agent-off", false, false)?;
    let on = start("agent-on", true, false)?;
    let on_start_rss_kib = outage::status_kib(on.0.pid(), "VmRSS:")?;
    let raw = start("agent-raw", true, true)?;
    progress!("agent: capture agents started; initial sync");
    let took = drain(&on.0, "initial sync")?;
    drain(&raw.0, "initial sync (raw payloads)")?;
    progress!("agent: initial sync done in {:.1} s", took.as_secs_f64());
    Ok(Paths {
        appliance,
        image,
        off,
        on,
        raw,
        on_start_rss_kib,
    })
}

/// CPU seconds (user + system) process `pid` used so far; 0 when /proc cannot say.
fn cpu_s(pid: Option<u32>) -> f64 {
    pid.and_then(|pid| crate::e2e_bench::process::cpu_of(pid).ok())
        .map_or(0.0, |c| c.total_s())
}

const DISK: &str = "disk (image file)";
const OFF: &str = "agent NBD, capture off";
const ON: &str = "agent NBD, capture on";
const RAW: &str = "agent NBD, capture on, raw payloads";

/// One table: the job on the three paths, `plan.rounds` times.
fn side_by_side(
    paths: &Paths,
    fio: &Fio,
    plan: &AgentPlan,
    (what, rw, bs): (&str, &str, &str),
    lines: &mut Vec<String>,
) -> Result<Bench> {
    let title = format!("agent: {what}, qd {IODEPTH}");
    let mut bench = Bench::new("agent", &title);
    bench.param("disk_bytes", plan.disk_bytes);
    bench.param("runtime_s", plan.runtime_s);
    bench.param("iodepth", IODEPTH as u64);
    bench.param("backlog_limit_mib", BACKLOG_LIMIT_MIB);
    let size = plan.disk_bytes;
    for round in 1..=plan.rounds {
        for (group, target, side, agent) in [
            (DISK, paths.image.as_path(), Side::Fio, &paths.on.0),
            (OFF, paths.off.1.device.as_path(), Side::Tool, &paths.off.0),
            (ON, paths.on.1.device.as_path(), Side::Engine, &paths.on.0),
            (
                RAW,
                paths.raw.1.device.as_path(),
                Side::Engine,
                &paths.raw.0,
            ),
        ] {
            progress!("[{title}] {group} #{round}");
            let before = agent.status().ok();
            let agent_pid = agent.pid();
            let cpu_before = (cpu_s(Some(agent_pid)), cpu_s(paths.appliance.pid()));
            let job = fio_job("agent", target, rw, bs, size, plan.runtime_s);
            let mut row = Row::fio(group, &fio.run(&job)?).run(round);
            row.side = side;
            if side != Side::Fio {
                // CPU during fio's run (the capture agent's drain comes after).
                row = row
                    .with_extra("agent_cpu_s", cpu_s(Some(agent_pid)) - cpu_before.0)
                    .with_extra(
                        "appliance_cpu_s",
                        cpu_s(paths.appliance.pid()) - cpu_before.1,
                    );
            }
            if side == Side::Engine {
                // The capture path: what the agent streamed, and how long it then took to
                // have everything acknowledged (not part of fio's time).
                let drained = drain(agent, "after a run")?;
                let after = agent.status()?;
                let delta = |field: &str| {
                    disks_sum(&after, field)
                        .saturating_sub(before.as_ref().map_or(0, |b| disks_sum(b, field)))
                };
                row = row
                    .with_extra("sent_bytes", delta("sent_bytes"))
                    .with_extra("resent_bytes", delta("resent_bytes"))
                    .with_extra("drain_after_s", drained.as_secs_f64());
            }
            bench.rows.push(row);
        }
    }
    lines.push(bench.add_ratio_vs("capture on vs off", ON, OFF, Some(Goal::AtLeast(0.8))));
    lines.push(bench.add_ratio_vs("capture on vs disk", ON, DISK, None));
    lines.push(bench.add_ratio_vs(
        "capture on (raw payloads) vs off",
        RAW,
        OFF,
        Some(Goal::AtLeast(0.8)),
    ));
    let med = |group: &str| {
        let mut v: Vec<f64> = bench
            .rows
            .iter()
            .filter(|r| r.group == group)
            .map(|r| r.throughput_mib_s)
            .collect();
        median(&mut v).unwrap_or(0.0)
    };
    let (off, disk) = (med(OFF), med(DISK));
    lines.push(bench.add_value_ratio_in(
        "capture off vs disk",
        (OFF, off),
        (DISK, disk),
        "MiB/s",
        None,
    ));
    bench.notes.push(format!(
        "fio --ioengine=libaio --direct=1 --rw={rw} --bs={bs} --iodepth={IODEPTH} time based \
         {}s on: {DISK} (the image file itself, on the scratch filesystem); {OFF} (source-agent \
         with `capture = false`: NBD with write-through only, served to the kernel by nbdfuse \
         (several connections: the agent advertises multi-conn) and a loop device with direct \
         I/O on and 4096-byte sectors); {ON} (the \
         same path, the agent capturing every write and streaming it to a real appliance on \
         loopback, payloads zstd level 1; backlog_limit_mib {BACKLOG_LIMIT_MIB}); {RAW} (the \
         same with `compression = \"none\"`, streaming to a second item). The paths alternate \
         in each round, on the same image file. Before each capture-on run the agent has sent \
         everything and the appliance acknowledged it; drain_after_s is how long that took \
         after the run (outside fio's time). agent_cpu_s and appliance_cpu_s are the two \
         processes' CPU seconds during fio's run (nbdfuse's are in neither). The appliance \
         applies on the same cores.",
        plan.runtime_s
    ));
    Ok(bench)
}

/// Runs the agent benchmark: one table per job, then the outage table. Pushes one stdout
/// line per ratio. Empty (with a printed reason) when it cannot run here.
pub fn agent(
    scratch: &Scratch,
    bin: &Path,
    fio: &Fio,
    plan: &AgentPlan,
    lines: &mut Vec<String>,
) -> Result<Vec<Bench>> {
    if let Some(why) = why_skip() {
        progress!("agent: skipped: {why}");
        lines.push(format!("agent: skipped: {why}"));
        return Ok(Vec::new());
    }
    let agent_bin = disk_sim::site::source_agent_bin()?;
    let paths = start_paths(scratch, bin, &agent_bin, plan)?;
    let mut benches = Vec::new();
    for job in jobs() {
        let mut bench = side_by_side(&paths, fio, plan, job, lines)?;
        bench.param("source_agent", agent_bin.display().to_string());
        benches.push(bench);
    }
    let mut bench = outage::outage(&paths, fio, plan, lines)?;
    bench.param("source_agent", agent_bin.display().to_string());
    benches.push(bench);
    let Paths {
        appliance,
        off,
        on,
        raw,
        ..
    } = paths;
    for (agent, disk) in [off, on, raw] {
        disk.detach()?;
        agent.stop(Duration::from_secs(120))?;
    }
    appliance.stop().context("stopping the appliance")?;
    Ok(benches)
}
