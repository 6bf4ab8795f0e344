//! `disk-sim`: simulated sites, VMs, source agents and workloads.

use std::fs::File;
use std::io::BufWriter;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use disk_sim::stream::{StreamSpec, write_stream};

#[derive(Parser, Debug)]
#[command(
    name = "disk-sim",
    version,
    about = "Simulated sites, VMs, source agents and workloads"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The product's main job, end to end: two `appliance serve` processes (site A and site
    /// B) on loopback, a VM with an OS disk and two data disks on site A, and the whole cycle
    /// through the control APIs and data ports: enable → initial replication → steady
    /// replication → test failover → failover (Custom point) → change point → commit → the VM
    /// on site B → re-protect to A (temporary 1 GiB OS disk, delta resync) → failback →
    /// protect A→B again. Then, as root, a real filesystem: ext4 on a disk protected by the
    /// `source-agent` binary, through test failover, quiesced failover and failback, each
    /// checked by mounting (see --real-fs). One line per step (time, bytes moved, check),
    /// then a summary table. Exit 0 only if every check passed.
    ///
    /// Example: `disk-sim demo --keep`, `disk-sim demo --real-fs only`
    Demo {
        /// Directory for the two sites (default: a new temporary directory, removed at the
        /// end unless --keep).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Keep the files.
        #[arg(long)]
        keep: bool,
        /// OS disk size in MiB (each data disk is half of it).
        #[arg(long = "os-disk-mib", default_value_t = 64, value_parser = clap::value_parser!(u64).range(2..=4096))]
        os_disk_mib: u64,
        /// Workload seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// The real-filesystem part (the `source-agent` binary, ext4 through nbdfuse + loop,
        /// checked by mounting; root only): `auto` runs it after the cycle when it can,
        /// saying why not otherwise; `only` runs just it; `skip` leaves it out.
        #[arg(long = "real-fs", value_enum, default_value_t = disk_sim::demo::RealFs::Auto)]
        real_fs: disk_sim::demo::RealFs,
    },
    /// Chaos: replication of a seeded workload through a fault-injecting proxy (dropped
    /// connections, delays, flipped bytes, duplicated and swapped frames) while the appliance
    /// is SIGKILLed and restarted at seeded moments; then every retained recovery point and
    /// the final state are verified against the oracle through the API. Prints the seed, the
    /// kills, the faults, frames acknowledged, frames lost (must be 0) and points verified;
    /// exits non-zero on any loss or mismatch, with the command line that replays the run.
    ///
    /// Example: `disk-sim chaos --seed 1 --kills 20`
    Chaos {
        /// Seed of the workload and the fault schedule.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// SIGKILLs (with restarts) of the appliance per round.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(0..=10_000))]
        kills: u32,
        /// Keep running rounds (each seeded from the seed and its number) for this long.
        #[arg(long)]
        minutes: Option<f64>,
        /// Writes per round.
        #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
        writes: u64,
        /// Disks of the simulated VM.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
        disks: u16,
        /// Size of each disk in MiB.
        #[arg(long = "size-mib", default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=4096))]
        size_mib: u64,
        /// Network faults per round.
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(0..=100_000))]
        faults: u32,
        /// A bookmark after every N writes (every fourth app-consistent).
        #[arg(long = "bookmark-every", default_value_t = 40, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
        bookmark_every: u64,
        /// Recovery points kept (every retained point is verified).
        #[arg(long = "keep-points", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=100_000))]
        keep_points: u64,
        /// Directory for the appliance's data and the restores (kept).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Keep the temporary directory after a successful run.
        #[arg(long)]
        keep: bool,
    },
    /// Adversary: a real appliance, real replication of 2+ items by the real agent with
    /// bookmarks, and at the same time hostile traffic from a client written from the docs:
    /// valid-checksum frames with broken zstd payloads, frames out of sequence, resync blocks
    /// outside a RESYNC session, every hello variant, hash requests for unknown disks, idle,
    /// slow and flooding connections, aimed at other items and at the replicating ones.
    /// Afterwards: the API answers within the deadline, every bookmark of every replicating
    /// item fails over exactly, nothing acknowledged is lost. Prints per kind what was sent and
    /// how it was answered; exits non-zero on any failure or acknowledged hostile frame.
    ///
    /// Example: `disk-sim adversary --seed 1 --duration-s 60`;
    /// `disk-sim adversary --only hash-unknown-disk --rounds 1`
    Adversary {
        /// Seed of the workloads and of every hostile action.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Send hostile traffic for this long (default 30 s unless --rounds is given).
        #[arg(long = "duration-s")]
        duration_s: Option<f64>,
        /// Each worker sends every selected kind this many times (shuffled).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
        rounds: Option<u64>,
        /// Only these hostile kinds, comma-separated (e.g. zstd-garbage,hash-unknown-disk).
        #[arg(long)]
        only: Option<String>,
        /// Hostile worker threads.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
        workers: u32,
        /// Items replicated by real agents.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=16))]
        replicating: u16,
        /// Items only hostile traffic uses.
        #[arg(long = "hostile-items", default_value_t = 2, value_parser = clap::value_parser!(u16).range(0..=16))]
        hostile_items: u16,
        /// Size of each of an item's two disks, MiB.
        #[arg(long = "size-mib", default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=1024))]
        size_mib: u64,
        /// A bookmark after every N writes of an agent.
        #[arg(long = "bookmark-every", default_value_t = 25, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
        bookmark_every: u64,
        /// How long a hello or a frame may wait for its answer, seconds.
        #[arg(long = "answer-timeout-s", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=600))]
        answer_timeout_s: u64,
        /// How fast the API must answer after the run, ms.
        #[arg(long = "api-deadline-ms", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
        api_deadline_ms: u64,
        /// Longest idle connection, seconds (over the handshake timeout, 10 s, to see it).
        #[arg(long = "idle-max-s", default_value_t = 12, value_parser = clap::value_parser!(u64).range(1..=600))]
        idle_max_s: u64,
        /// Connections of an idle flood.
        #[arg(long, default_value_t = 80, value_parser = clap::value_parser!(u64).range(1..=10_000))]
        flood: u64,
        /// Directory for the appliance's data and the restores (kept).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Keep the temporary directory after a successful run.
        #[arg(long)]
        keep: bool,
    },
    /// Run a scenario against an appliance that is already running: enable protection of a
    /// simulated VM, stream a seeded workload with bookmarks over the data port, then check a
    /// test failover (and optionally a failover) byte for byte against the source's disks.
    /// Built-in scenarios: `steady`, `failover`; or a TOML file with the fields name,
    /// disks_mib, writes, bookmark_every, app_every, seed, failover, disable.
    ///
    /// Example: `disk-sim run --scenario steady --appliance http://127.0.0.1:7400
    /// --token-file /var/lib/appliance/api-token --source-dir /tmp/vm1`
    Run {
        /// A built-in scenario name or a TOML file.
        #[arg(long, default_value = "steady")]
        scenario: String,
        /// The appliance's control API.
        #[arg(long, env = "APPLIANCE_API", default_value = "http://127.0.0.1:7400")]
        appliance: String,
        /// The API token.
        #[arg(long, env = "APPLIANCE_TOKEN", conflicts_with = "token_file")]
        token: Option<String>,
        /// A file holding the API token (DATA_DIR/api-token on the appliance).
        #[arg(long = "token-file", env = "APPLIANCE_TOKEN_FILE")]
        token_file: Option<PathBuf>,
        /// Keep the source VM's disk images here, for outside tools to compare.
        #[arg(long = "source-dir")]
        source_dir: Option<PathBuf>,
    },
    /// Write a delta-stream file from a seeded workload.
    Stream {
        /// File to write.
        #[arg(long)]
        out: PathBuf,
        /// Workload seed; the same seed gives the same bytes.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Number of disks of the simulated VM (1..=64).
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
        disks: u16,
        /// Size of each disk in MiB.
        #[arg(long = "size-mib", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
        size_mib: u64,
        /// Number of frames before the end frame.
        #[arg(long, default_value_t = 1000)]
        frames: u64,
        /// Store payloads raw instead of zstd-compressed.
        #[arg(long)]
        raw: bool,
        /// Also write the source VM's disks here (the oracle to compare materialized disks
        /// with): `disk-<i>.img` at the end, `disk-<i>.app.img` at the last app-consistent
        /// bookmark.
        #[arg(long = "source-out")]
        source_out: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // Each cause once, in order (an error that prints its cause is not repeated).
            eprintln!("error: {}", engine::error::report(error.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Demo {
            dir,
            keep,
            os_disk_mib,
            seed,
            real_fs,
        } => {
            let options = disk_sim::demo::DemoOptions {
                dir,
                keep,
                os_disk_mib,
                seed,
                appliance_bin: None,
                real_fs,
                source_agent_bin: None,
            };
            disk_sim::demo::run(&options, &mut std::io::stdout().lock())?;
            Ok(())
        }
        Command::Chaos {
            seed,
            kills,
            minutes,
            writes,
            disks,
            size_mib,
            faults,
            bookmark_every,
            keep_points,
            dir,
            keep,
        } => {
            if let Some(minutes) = minutes
                && !(minutes > 0.0 && minutes <= 10_000.0)
            {
                anyhow::bail!("--minutes {minutes}: must be more than 0 and at most 10000");
            }
            let options = disk_sim::chaos::ChaosOptions {
                seed,
                kills,
                minutes,
                writes,
                disks,
                size_mib,
                net_faults: faults,
                bookmark_every,
                keep_points,
                work_dir: dir,
                keep,
                appliance_bin: None,
            };
            disk_sim::chaos::run(&options, &mut std::io::stdout().lock())?;
            Ok(())
        }
        Command::Adversary {
            seed,
            duration_s,
            rounds,
            only,
            workers,
            replicating,
            hostile_items,
            size_mib,
            bookmark_every,
            answer_timeout_s,
            api_deadline_ms,
            idle_max_s,
            flood,
            dir,
            keep,
        } => {
            let options = disk_sim::adversary::AdversaryOptions {
                seed,
                duration_s,
                rounds,
                only: match only {
                    Some(list) => disk_sim::adversary::parse_kinds(&list)?,
                    None => Vec::new(),
                },
                workers,
                replicating,
                hostile_items,
                size_mib,
                bookmark_every,
                answer_timeout: std::time::Duration::from_secs(answer_timeout_s),
                api_deadline: std::time::Duration::from_millis(api_deadline_ms),
                idle_max: std::time::Duration::from_secs(idle_max_s),
                flood_connections: flood as usize,
                work_dir: dir,
                keep,
                ..disk_sim::adversary::AdversaryOptions::default()
            };
            disk_sim::adversary::run(&options, &mut std::io::stdout().lock())?;
            Ok(())
        }
        Command::Run {
            scenario,
            appliance,
            token,
            token_file,
            source_dir,
        } => {
            let token = match (token, token_file) {
                (Some(token), _) => token,
                (None, Some(file)) => std::fs::read_to_string(&file)
                    .with_context(|| format!("reading the API token from {}", file.display()))?,
                (None, None) => anyhow::bail!(
                    "no API token: give --token or --token-file (or APPLIANCE_TOKEN / \
                     APPLIANCE_TOKEN_FILE)"
                ),
            };
            let scenario = disk_sim::scenario::Scenario::load(&scenario)?;
            let options = disk_sim::scenario::RunOptions {
                api: appliance,
                token,
                source_dir,
            };
            disk_sim::scenario::run(&scenario, &options, &mut std::io::stdout().lock())
        }
        Command::Stream {
            out,
            seed,
            disks,
            size_mib,
            frames,
            raw,
            source_out,
        } => {
            let spec = StreamSpec {
                seed,
                disks,
                size_mib,
                frames,
                zstd_level: if raw { None } else { Some(1) },
                source_out: source_out.clone(),
            };
            let file = File::create(&out).with_context(|| format!("creating {}", out.display()))?;
            let summary = write_stream(&spec, BufWriter::new(file))
                .with_context(|| format!("writing {}", out.display()))?;
            println!(
                "wrote {}: seed {seed}, {disks} disks of {size_mib} MiB, {} frames \
                 ({} writes, {} zero ranges, {} bookmarks, end), {} data bytes in {} stream bytes",
                out.display(),
                frames + 1,
                summary.writes,
                summary.zero_ranges,
                summary.bookmarks,
                summary.data_bytes,
                summary.stream_bytes,
            );
            if let Some(dir) = source_out {
                println!(
                    "source disks in {}: disk-<i>.img (end of stream), disk-<i>.app.img (last \
                     app-consistent bookmark, point {})",
                    dir.display(),
                    summary
                        .last_app_point
                        .map_or_else(|| "none".to_owned(), |p| p.to_string())
                );
            }
            Ok(())
        }
    }
}
