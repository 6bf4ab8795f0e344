//! `perf`: the engine's data path measured next to fio, on the same file, in the same run.
//!
//! ```text
//!  perf run [--quick] [--out DIR] [--dir SCRATCH] [--only NAME,…]
//!
//!  ensure fio (and qemu-img for materialize) ─► scratch dir (real disk, O_DIRECT, free
//!  space) ─► replica file written once
//!     │
//!     ├─ apply-seq-1m     per queue depth (+ zstd-1 row)                      goal ≥ 0.9
//!     ├─ apply-rand-4k    qd 32, preservation off (goal ≥ 0.8) and on (no goal)
//!     ├─ apply-rand-64k   qd 32, preservation off (goal ≥ 0.8) and on (no goal)
//!     ├─ staging-append   per batch size (1, 16, 64 × 64 KiB)
//!     │  each: fio, (engine, fio) × repeats on the same file; then diagnostic rows
//!     ├─ materialize      a point (10 % preserved) to raw and fixed VHD, next to qemu-img
//!     │                   convert and cp --sparse=always           goal ≥ 1.0 vs qemu-img
//!     ├─ resync           hash_path next to an O_DIRECT fio read of the replica file;
//!     │                   diff bytes sent / differing chunks at 1 % and 10 %   goal ≤ 1.1
//!     ├─ e2e              a real appliance, 1 / 8 / 31 disk-sim agents, rising churn: frame
//!     │                   lag write() → durable ack (goal p99 < 1 s), appliance peak RSS
//!     │                   (goal < 512 MiB); no fio side
//!     ├─ export           a real appliance serving points over NBD: time to first byte by
//!     │                   disk size (1 GiB … 1 TiB) next to copy-mode test failover; nbdcopy
//!     │                   read (goal ≥ 0.8) and fio-nbd 4 KiB random read (goal ≥ 0.7) next
//!     │                   to fio on the replica file; nbdcopy into a drill next to fio write
//!     └─ agent            the source-agent binary's NBD disk (nbdfuse + loop): fio 4 KiB
//!                         random / 1 MiB sequential writes with capture on vs capture off
//!                         (goal ≥ 0.8) vs the image file itself; the agent's peak RSS during
//!                         an outage vs its bound (goal ≤ 1.0), bytes resent by the catch-up
//!                         (root, FUSE, nbdfuse and the source-agent binary; skipped otherwise)
//!     │
//!     ▼
//!  DIR/results.json (machine, every figure and ratio)   DIR/report.md (one table per bench)
//!  DIR/plots/*.svg (latency percentile curves, throughput per 100 ms; linked from report.md)
//!  stdout: one line per ratio, then the run's duration
//! ```
//!
//! Every ratio is the median engine run over the median fio run, the runs alternating on the
//! same file (fio, engine, fio, engine, fio, …), so drift during the run shows up as spread
//! between rows of one table instead of as a bias for one side. Preservation-on rows run
//! once (they are slow, and have no goal). Diagnostic rows (`diag: …`) take the engine's
//! path apart: see `diag.rs`.
//!
//! Sizes (`--quick` takes 2–4 minutes on 2 cores, depending on what else runs there; the
//! full run takes several minutes more, the e2e ladder alone about ten, prints its duration
//! like the quick one, and checks for about 28 GiB of free scratch space, 11 GiB without
//! e2e). The hidden `--tiny` (or `PERF_TINY=1`) shrinks everything so that the whole run
//! takes seconds: it checks that the run works (`tests/quick.rs`), its figures mean nothing.
//!
//! | | `--quick` | full | `--tiny` |
//! |---|---|---|---|
//! | replica file | 1 GiB | 4 GiB | 64 MiB |
//! | apply-seq-1m | 1 GiB at qd 32, + zstd row | 4 GiB at qd 1, 8, 32, + zstd row | 64 MiB at qd 32 |
//! | apply-rand-4k | 65,536 writes (256 MiB), qd 32; preserve on: the first 16,384 | 262,144 writes (1 GiB), qd 32; preserve on: all | 4,096; 1,024 |
//! | apply-rand-64k | 8,192 writes (512 MiB), qd 32; preserve on: the first 2,048 | 32,768 writes (2 GiB), qd 32; preserve on: all | 512; 128 |
//! | staging-append | 256 / 2,048 / 4,096 frames at batch 1 / 16 / 64 | 1,024 / 8,192 / 16,384 | 32 / 128 / 256 |
//! | materialize | 256 MiB disk | 2 GiB disk | 16 MiB |
//! | resync | hash: the replica file; diff: 256 MiB images | 4 GiB; 1 GiB | 64 MiB; 16 MiB |
//! | e2e | 1, 8, 31 disks × 8, 96, 384 MB/s, 3 s per step | 1, 8, 31 disks × 8 … 1024 MB/s (10 steps), 15 s per step | 1, 2 disks × 4, 8 MB/s, 1 s per step |
//! | export | first byte: 1, 16, 256, 1024 GiB sparse × 5, copy mode × 3; 1 GiB data disk; 512 MiB drill write; random reads 2 s per run | × 10, × 5; 1 GiB; 1 GiB; 10 s | 1 GiB, 1 TiB × 2, × 1; 64 MiB; 32 MiB; 1 s |
//! | agent | 1 GiB image, 3 s per fio run × 2 rounds, 20 s outage | 1 GiB, 10 s × 3, 600 s outage | 64 MiB, 1 s × 1, 2 s |
//! | runs per configuration | engine × 3, fio (or tool) × 4 (preserve on, zstd: engine × 1) | same | engine × 1, fio × 2 |

/// Progress on stderr, stamped with the seconds since the run started.
macro_rules! progress {
    ($($arg:tt)*) => {
        eprintln!("[{:7.1} s] {}", $crate::run_elapsed_s(), format_args!($($arg)*))
    };
}

mod agent_bench;
mod apply_bench;
mod cpu;
mod diag;
mod e2e_bench;
mod export_bench;
mod fio;
mod histogram;
mod machine;
mod materialize_bench;
mod plot;
mod report;
mod resync_bench;
mod series;
mod staging_bench;
mod timed;
mod workload;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::builder::BoolishValueParser;
use clap::{Parser, Subcommand};

use crate::apply_bench::ApplyCtx;
use crate::report::{Results, SCHEMA_VERSION};

/// Benchmarks of the data path, each next to fio.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Runs the benchmarks and writes results.json and report.md.
    Run(RunArgs),
}

/// Benchmark names accepted by `--only`.
const BENCHMARKS: [&str; 9] = [
    "apply-seq-1m",
    "apply-rand-4k",
    "apply-rand-64k",
    "staging-append",
    "materialize",
    "resync",
    "e2e",
    "export",
    "agent",
];

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Small sizes: finishes in two to four minutes on 2 cores.
    #[arg(long)]
    quick: bool,
    /// Tiny sizes, one engine run each: a check that the run works end to end (seconds), not
    /// a measurement.
    #[arg(long, hide = true, env = "PERF_TINY", value_parser = BoolishValueParser::new())]
    tiny: bool,
    /// Where results.json and report.md go.
    #[arg(long, default_value = "target/perf")]
    out: PathBuf,
    /// Parent of the scratch directory (default: ./target if it exists, else the current
    /// directory). Must be on a real disk with O_DIRECT, not tmpfs.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Run only these benchmarks (comma-separated names).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// e2e: these disk counts instead of the mode's (comma-separated, 1 to 31).
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u64).range(1..=31))]
    e2e_disks: Vec<u64>,
    /// e2e: these churn steps instead of the mode's (total MB/s, comma-separated, rising,
    /// 1 to 4096).
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u64).range(1..=4096))]
    e2e_churn: Vec<u64>,
}

/// Sizes of one run.
#[derive(Debug, Clone)]
struct Plan {
    mode: &'static str,
    replica_bytes: u64,
    seq_queue_depths: Vec<usize>,
    seq_bytes: u64,
    rand_queue_depth: usize,
    rand_4k_writes: u64,
    rand_64k_writes: u64,
    /// Writes of the preservation-on runs (the first ones of the same sequence), 4k and 64k.
    rand_preserve_writes: (u64, u64),
    /// Engine runs per configuration, interleaved with `repeats + 1` fio runs.
    repeats: usize,
    /// (frames per commit, frames).
    staging: Vec<(usize, u64)>,
    /// Disk size of the materialize benchmark.
    materialize_bytes: u64,
    /// Size of the two images of the resync bytes-sent table.
    resync_image_bytes: u64,
    /// The e2e benchmark.
    e2e: e2e_bench::E2ePlan,
    /// The export benchmark.
    export: export_bench::ExportPlan,
    /// The agent benchmark.
    agent: agent_bench::AgentPlan,
}

impl Plan {
    fn new(quick: bool, tiny: bool) -> Self {
        if tiny {
            Self {
                mode: "tiny",
                replica_bytes: 64 << 20,
                seq_queue_depths: vec![32],
                seq_bytes: 64 << 20,
                rand_queue_depth: 32,
                rand_4k_writes: 4_096,
                rand_64k_writes: 512,
                rand_preserve_writes: (1_024, 128),
                repeats: 1,
                staging: vec![(1, 32), (16, 128), (64, 256)],
                materialize_bytes: 16 << 20,
                resync_image_bytes: 16 << 20,
                e2e: e2e_bench::E2ePlan::new(quick, tiny),
                export: export_bench::ExportPlan::new(quick, tiny),
                agent: agent_bench::AgentPlan::new(quick, tiny),
            }
        } else if quick {
            Self {
                mode: "quick",
                replica_bytes: 1 << 30,
                seq_queue_depths: vec![32],
                seq_bytes: 1 << 30,
                rand_queue_depth: 32,
                rand_4k_writes: 65_536,
                rand_64k_writes: 8_192,
                rand_preserve_writes: (16_384, 2_048),
                repeats: 3,
                staging: vec![(1, 256), (16, 2_048), (64, 4_096)],
                materialize_bytes: 256 << 20,
                resync_image_bytes: 256 << 20,
                e2e: e2e_bench::E2ePlan::new(quick, tiny),
                export: export_bench::ExportPlan::new(quick, tiny),
                agent: agent_bench::AgentPlan::new(quick, tiny),
            }
        } else {
            Self {
                mode: "full",
                replica_bytes: 4 << 30,
                seq_queue_depths: vec![1, 8, 32],
                seq_bytes: 4 << 30,
                rand_queue_depth: 32,
                rand_4k_writes: 262_144,
                rand_64k_writes: 32_768,
                rand_preserve_writes: (262_144, 32_768),
                repeats: 3,
                staging: vec![(1, 1_024), (16, 8_192), (64, 16_384)],
                materialize_bytes: 2 << 30,
                resync_image_bytes: 1 << 30,
                e2e: e2e_bench::E2ePlan::new(quick, tiny),
                export: export_bench::ExportPlan::new(quick, tiny),
                agent: agent_bench::AgentPlan::new(quick, tiny),
            }
        }
    }

    /// Scratch space needed at the peak: the replica, and the largest of: a staged copy of
    /// the largest apply stream with a preserve store as large as the largest random stream;
    /// materialize's replica, staged stream, preserve store and output; resync's two images.
    /// Plus slack.
    fn scratch_bytes(&self) -> u64 {
        let rand_max = (self.rand_4k_writes * 4096).max(self.rand_64k_writes * 65536);
        let apply = self.seq_bytes.max(rand_max) + rand_max;
        let materialize = self.materialize_bytes * 3 + self.materialize_bytes / 5;
        let resync = 2 * self.resync_image_bytes;
        let slack = if self.mode == "tiny" {
            64 << 20
        } else {
            1 << 30
        };
        let e2e = self.e2e.scratch_bytes();
        let export = self.export.scratch_bytes();
        let agent = self.agent.scratch_bytes();
        self.replica_bytes
            + apply
                .max(materialize)
                .max(resync)
                .max(e2e)
                .max(export)
                .max(agent)
            + slack
    }
}

static RUN_STARTED: OnceLock<Instant> = OnceLock::new();

/// Seconds since the run started (for progress lines).
fn run_elapsed_s() -> f64 {
    RUN_STARTED
        .get_or_init(Instant::now)
        .elapsed()
        .as_secs_f64()
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Run(args) => run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: RunArgs) -> Result<()> {
    for name in &args.only {
        if !BENCHMARKS.contains(&name.as_str()) {
            bail!(
                "unknown benchmark {name:?}; known: {}",
                BENCHMARKS.join(", ")
            );
        }
    }
    let selected = |name: &str| args.only.is_empty() || args.only.iter().any(|n| n == name);
    let started = *RUN_STARTED.get_or_init(Instant::now);
    let started_unix_s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut plan = Plan::new(args.quick, args.tiny);
    if !args.e2e_disks.is_empty() {
        plan.e2e.disk_counts = args.e2e_disks.iter().map(|&d| d as usize).collect();
    }
    if !args.e2e_churn.is_empty() {
        if args.e2e_churn.windows(2).any(|w| w[0] >= w[1]) {
            bail!("--e2e-churn must rise: {:?}", args.e2e_churn);
        }
        plan.e2e.steps_mb_s = args.e2e_churn.clone();
    }
    let loadavg_start = machine::loadavg();

    // The e2e benchmark drives a real appliance process: fail before measuring anything if
    // its binary is not there.
    let appliance_bin = if selected("e2e") || selected("export") || selected("agent") {
        Some(e2e_bench::appliance_binary()?)
    } else {
        None
    };
    let fio = fio::ensure_fio()?;
    if selected("export") {
        export_bench::nbdcopy()?;
    }
    let qemu_img = if selected("materialize") {
        Some(fio::ensure_program("qemu-img", "qemu-utils")?)
    } else {
        None
    };
    let scratch = machine::Scratch::create(args.dir.as_deref(), plan.scratch_bytes())?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    progress!(
        "perf run ({}): scratch {} ({}), {}",
        plan.mode,
        scratch.path().display(),
        scratch.fs_type,
        fio.version
    );

    let replica = scratch.join("replica.img");
    let needs_replica = ["apply-seq-1m", "apply-rand-4k", "apply-rand-64k", "resync"]
        .iter()
        .any(|name| selected(name));
    if needs_replica {
        progress!(
            "preparing the replica file: {} MiB written once with O_DIRECT",
            plan.replica_bytes >> 20
        );
        workload::prepare_replica(&replica, plan.replica_bytes)?;
    }

    let mut lines: Vec<String> = Vec::new();
    let mut benchmarks = Vec::new();
    let mut ctx = ApplyCtx {
        scratch: &scratch,
        fio: &fio,
        replica,
        disk_bytes: plan.replica_bytes,
        backend: None,
    };
    let flush = |lines: &mut Vec<String>| {
        for line in lines.drain(..) {
            println!("{line}");
        }
    };
    if selected("apply-seq-1m") {
        benchmarks.extend(apply_bench::seq_1m(
            &mut ctx,
            &plan.seq_queue_depths,
            plan.seq_bytes,
            plan.repeats,
            true,
            &mut lines,
        )?);
        flush(&mut lines);
    }
    for (name, block_bytes, writes, preserve_writes) in [
        (
            "apply-rand-4k",
            4096,
            plan.rand_4k_writes,
            plan.rand_preserve_writes.0,
        ),
        (
            "apply-rand-64k",
            65536,
            plan.rand_64k_writes,
            plan.rand_preserve_writes.1,
        ),
    ] {
        if selected(name) {
            benchmarks.push(apply_bench::rand(
                &mut ctx,
                block_bytes,
                writes,
                preserve_writes,
                plan.rand_queue_depth,
                plan.repeats,
                &mut lines,
            )?);
            flush(&mut lines);
        }
    }
    if selected("staging-append") {
        for &(batch, frames) in &plan.staging {
            benchmarks.push(staging_bench::staging_append(
                &scratch,
                &fio,
                batch,
                frames,
                plan.repeats,
                &mut lines,
            )?);
            flush(&mut lines);
        }
    }
    if let Some(qemu_img) = &qemu_img {
        benchmarks.push(materialize_bench::materialize(
            &scratch,
            qemu_img,
            plan.materialize_bytes,
            plan.repeats,
            &mut lines,
        )?);
        flush(&mut lines);
    }
    if selected("resync") {
        benchmarks.push(resync_bench::hash_rate(
            &fio,
            &ctx.replica,
            plan.replica_bytes,
            plan.repeats,
            &mut lines,
        )?);
        flush(&mut lines);
        benchmarks.push(resync_bench::bytes_sent(
            &scratch,
            plan.resync_image_bytes,
            &mut lines,
        )?);
        flush(&mut lines);
    }
    if let Some(bin) = appliance_bin.as_ref().filter(|_| selected("e2e")) {
        benchmarks.extend(e2e_bench::e2e(&scratch, bin, &plan.e2e, &mut lines)?);
        flush(&mut lines);
    }
    if let Some(bin) = appliance_bin.as_ref().filter(|_| selected("export")) {
        benchmarks.extend(export_bench::export(
            &scratch,
            bin,
            &fio,
            &plan.export,
            &mut lines,
        )?);
        flush(&mut lines);
    }
    if let Some(bin) = appliance_bin.as_ref().filter(|_| selected("agent")) {
        benchmarks.extend(agent_bench::agent(
            &scratch,
            bin,
            &fio,
            &plan.agent,
            &mut lines,
        )?);
        flush(&mut lines);
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let plots = plot::write_plots(&args.out, &mut benchmarks)?;

    let io_backend = match &ctx.backend {
        Some(engine::io::BackendChoice::Uring) => "uring".to_owned(),
        Some(engine::io::BackendChoice::SyncFile { reason }) => format!("sync_file ({reason})"),
        None => "not used".to_owned(),
    };
    let machine = machine::machine_info(&scratch, &fio.version, io_backend, loadavg_start);
    let results = Results {
        schema_version: SCHEMA_VERSION,
        mode: plan.mode.to_owned(),
        started_unix_s,
        duration_s: started.elapsed().as_secs_f64(),
        machine,
        benchmarks,
    };
    let json_path = args.out.join("results.json");
    let md_path = args.out.join("report.md");
    std::fs::write(&json_path, serde_json::to_string_pretty(&results)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    std::fs::write(&md_path, report::markdown(&results))
        .with_context(|| format!("writing {}", md_path.display()))?;
    println!(
        "perf run ({}) took {:.1} s; wrote {}, {} and {plots} plots in {}; load average {} → {}",
        plan.mode,
        results.duration_s,
        json_path.display(),
        md_path.display(),
        args.out.join("plots").display(),
        results.machine.loadavg_start,
        results.machine.loadavg_end,
    );
    Ok(())
}
