//! `appliance`: the DR appliance daemon and its command-line tools.
//!
//! Exit status: 0 on success, 2 when the input is at fault (a corrupt stream, an unknown point,
//! a bad argument), 1 when the machine is (I/O errors and the like).

use std::fs::File;
use std::io::BufReader;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use appliance::{daemon, inspect, offline};

#[derive(Parser, Debug)]
#[command(
    name = "appliance",
    version,
    about = "DR appliance: replica disks, recovery points, failover"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the appliance: serve every item with a stream token on the data port, apply what
    /// arrives, keep recovery points. Stops cleanly on SIGTERM or SIGINT.
    Serve {
        /// The appliance's data directory.
        #[arg(long = "data-dir")]
        data_dir: PathBuf,
        /// Address of the data port (loopback by default).
        #[arg(long = "data-addr", default_value = "127.0.0.1:7401")]
        data_addr: std::net::SocketAddr,
        /// Address of the control API (HTTP/JSON; bearer token in DATA_DIR/api-token, created
        /// at first start and printed once on stderr).
        #[arg(long = "api-addr", default_value = "127.0.0.1:7400")]
        api_addr: std::net::SocketAddr,
        /// Recovery points to keep per item (oldest pruned first).
        #[arg(long = "keep-points", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=100_000))]
        keep_points: u64,
        /// Staging (cache) capacity per item in MiB.
        #[arg(long = "cache-mib", default_value_t = 2048, value_parser = clap::value_parser!(u64).range(16..=1_048_576))]
        cache_mib: u64,
        /// Replica I/O queue depth.
        #[arg(long = "queue-depth", default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=1024))]
        queue_depth: u64,
    },
    /// Protected items.
    Item {
        #[command(subcommand)]
        command: ItemCommand,
    },
    /// Delta-stream files.
    Stream {
        #[command(subcommand)]
        command: StreamCommand,
    },
    /// Stage and apply a delta-stream file into its item's replicas (offline seeding, and the
    /// daemon's data path without the network). Prints `ack <seq>` for each durable batch.
    ///
    /// Safe to kill at any moment: the next run recovers and resumes, skipping what is staged.
    Ingest {
        /// The appliance's data directory.
        #[arg(long = "data-dir")]
        data_dir: PathBuf,
        /// The stream file.
        stream: PathBuf,
        /// Recovery points to keep (oldest pruned first).
        #[arg(long = "keep-points", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=100_000))]
        keep_points: u64,
        /// Staging (cache) capacity in MiB.
        #[arg(long = "cache-mib", default_value_t = 2048, value_parser = clap::value_parser!(u64).range(16..=1_048_576))]
        cache_mib: u64,
        /// Replica I/O queue depth.
        #[arg(long = "queue-depth", default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=1024))]
        queue_depth: u64,
    },
    /// List items and their recovery points.
    Points {
        /// The appliance's data directory.
        #[arg(long = "data-dir")]
        data_dir: PathBuf,
        /// Only this item (32 hex digits).
        #[arg(long)]
        item: Option<String>,
    },
    /// Write an item's disks at a recovery point as new images: `disk-<i>.raw` (sparse) or
    /// `disk-<i>.vhd` (fixed VHD, as Hyper-V and Azure use). Never overwrites a file.
    Materialize {
        /// The appliance's data directory.
        #[arg(long = "data-dir")]
        data_dir: PathBuf,
        /// The item (32 hex digits).
        #[arg(long)]
        item: String,
        /// `latest-processed`, `latest-app`, or a point id from `appliance points`.
        #[arg(long)]
        point: String,
        /// Directory for the images.
        #[arg(long)]
        out: PathBuf,
        /// Image format.
        #[arg(long, value_enum, default_value_t = Format::Raw)]
        format: Format,
    },
}

/// Image formats of `materialize`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Format {
    /// Raw image, sparse where the disk is zero.
    Raw,
    /// Fixed VHD (virtual size rounded up to a 1 MiB multiple).
    Vhd,
}

#[derive(Subcommand, Debug)]
enum ItemCommand {
    /// Register an item: its replica disks are created in the data directory and its stream
    /// token is printed once (stored with mode 0600). Example:
    /// `appliance item create --data-dir /var/lib/appliance --name vm1 --disk 1024 --disk 64:512`
    Create {
        /// The appliance's data directory.
        #[arg(long = "data-dir")]
        data_dir: PathBuf,
        /// A name for people.
        #[arg(long)]
        name: String,
        /// A disk as SIZE_MIB[:LOGICAL_BLOCK_BYTES] (512 or 4096, default 4096); repeat per disk,
        /// OS disk first.
        #[arg(long = "disk", required = true)]
        disks: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
enum StreamCommand {
    /// Validate a delta-stream file and print a summary per frame kind.
    ///
    /// Exit status: 0 when valid, 2 when the stream is corrupt or unreadable (one error line
    /// naming the frame index, byte offset and reason).
    Inspect {
        /// The stream file.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    // Logs go to stderr; RUST_LOG overrides the default level (info).
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            if error.downcast_ref::<offline::BadInput>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Stream {
            command: StreamCommand::Inspect { file },
        } => {
            let opened = File::open(&file)
                .map_err(|e| offline::BadInput(format!("{}: cannot open: {e}", file.display())))?;
            let report = inspect::inspect(BufReader::with_capacity(1 << 20, opened))
                .map_err(|e| offline::BadInput(format!("{}: {e}", file.display())))?;
            println!("{}", inspect::render(&report));
            Ok(())
        }
        Command::Ingest {
            data_dir,
            stream,
            keep_points,
            cache_mib,
            queue_depth,
        } => {
            let summary = offline::ingest(
                &data_dir,
                &stream,
                offline::IngestOptions {
                    keep_points: keep_points as usize,
                    cache_bytes: cache_mib << 20,
                    queue_depth: queue_depth as usize,
                },
            )?;
            println!(
                "item {}: {} frames staged ({} already staged), applied through seq {}, {} \
                 recovery points kept, replica I/O backend {}",
                summary.item,
                summary.frames_staged,
                summary.frames_skipped,
                summary.applied_seq,
                summary.points,
                summary.backend
            );
            Ok(())
        }
        Command::Serve {
            data_dir,
            data_addr,
            api_addr,
            keep_points,
            cache_mib,
            queue_depth,
        } => daemon::serve(
            &data_dir,
            daemon::ServeOptions {
                data_addr,
                api_addr,
                keep_points: keep_points as usize,
                cache_bytes: cache_mib << 20,
                queue_depth: queue_depth as usize,
                slot_count: 32,
                disk_stores: Vec::new(),
                max_jobs: 8,
            },
        ),
        Command::Item {
            command:
                ItemCommand::Create {
                    data_dir,
                    name,
                    disks,
                },
        } => {
            let disks = disks
                .iter()
                .map(|d| daemon::parse_disk(d))
                .collect::<Result<Vec<_>, _>>()?;
            let (item, token) = daemon::create_item(
                &data_dir,
                &name,
                &disks,
                daemon::ServeOptions::offline_default(),
            )?;
            println!("item {item}");
            println!("token {token}");
            Ok(())
        }
        Command::Points { data_dir, item } => {
            print!("{}", offline::points(&data_dir, item.as_deref())?);
            Ok(())
        }
        Command::Materialize {
            data_dir,
            item,
            point,
            out,
            format,
        } => {
            let choice = offline::parse_point(&point)?;
            let format = match format {
                Format::Raw => engine::materialize::OutputFormat::Raw,
                Format::Vhd => engine::materialize::OutputFormat::FixedVhd,
            };
            let (point_id, paths) = offline::materialize(&data_dir, &item, choice, &out, format)?;
            for path in paths {
                println!("point {point_id}: {}", path.display());
            }
            Ok(())
        }
    }
}
