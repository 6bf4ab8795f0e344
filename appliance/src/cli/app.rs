//! The command line's shape: clap's top-level `Cli` and every subcommand (the daemon, the
//! offline tools, and the client commands of `args.rs` flattened in), with the help's examples.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use super::{ApiArgs, ClientCommand};
use crate::config;

/// The end of `appliance --help`: an example of every command.
pub(crate) const EXAMPLES: &str = "\
Examples:
  appliance serve --data-dir /var/lib/appliance --config /etc/appliance/appliance.toml

  Client of the control API of a running appliance:
  appliance status
  appliance slots
  appliance items
  appliance item web-01
  appliance points web-01
  appliance enable --name web-01 --disk 40960 --disk 102400:512
  appliance test-failover web-01 --point latest-app --target /srv/restore/web-01-test --wait
  appliance test-failover-cleanup web-01
  appliance failover web-01 --point latest --target /srv/restore/web-01 --source-shut-down --wait
  appliance change-point web-01 --point 1950 --wait
  appliance commit web-01
  appliance reprotect web-01 --disk /srv/site-a/web-01-os.vhd --disk /srv/site-a/web-01-data.vhd
  appliance failback web-01 --wait
  appliance resync web-01 --wait
  appliance disable web-01
  appliance jobs
  appliance jobs 12 --wait

  Offline, on a data directory no appliance is running on:
  appliance item create --data-dir /var/lib/appliance --name vm1 --disk 1024 --disk 64:512
  appliance ingest --data-dir /var/lib/appliance vm1.drs
  appliance points --data-dir /var/lib/appliance
  appliance materialize --data-dir /var/lib/appliance --item 3f2a0000000000000000000000000001 --point latest-app --out /srv/restore/vm1
  appliance stream inspect vm1.drs

Client commands find the API with --api URL (or APPLIANCE_API; default http://127.0.0.1:7400)
and authenticate with --token TOKEN (or APPLIANCE_TOKEN), else --token-file PATH (or
APPLIANCE_TOKEN_FILE); the token is DATA_DIR/api-token on the appliance. --json prints the
API's answer instead of a table. ITEM is an item id (32 hex digits), a unique prefix of one, or
an item name.

Exit status: 0 success; 2 bad input (a bad argument, a corrupt stream, an unknown point, an API
answer 400/403/404/409); 1 anything else (I/O, an unreachable API, 401, 5xx, a failed job).";

#[derive(Parser, Debug)]
#[command(
    name = "appliance",
    version,
    about = "DR appliance: replica disks, recovery points, failover",
    after_long_help = EXAMPLES
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Run the appliance: data port, apply workers, recovery points, control API.
    ///
    /// Serves every item with a stream token on the data port, applies what arrives, keeps
    /// recovery points and answers the control API. Stops cleanly on SIGTERM or SIGINT.
    /// Settings come from the flags, else the --config file, else the defaults.
    #[command(after_long_help = config::SERVE_HELP)]
    Serve {
        /// The appliance's data directory.
        #[arg(long = "data-dir", value_name = "DIR")]
        data_dir: PathBuf,
        /// A TOML file with settings (below); the flags override it.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Address of the data port, where source agents connect (default 127.0.0.1:7401).
        #[arg(long = "data-addr", value_name = "ADDR")]
        data_addr: Option<String>,
        /// Address of the control API, HTTP/JSON (default 127.0.0.1:7400). Its bearer token is
        /// DATA_DIR/api-token (mode 0600), created at first start.
        #[arg(long = "api-addr", value_name = "ADDR")]
        api_addr: Option<String>,
        /// Address of the NBD server that serves exports of recovery points (default
        /// 127.0.0.1:10809; export names are 128-bit secrets the control API hands out).
        #[arg(long = "nbd-addr", value_name = "ADDR")]
        nbd_addr: Option<String>,
        /// Recovery points to keep per item unless its policy says otherwise, oldest pruned
        /// first (1..=100000, default 64).
        #[arg(long = "keep-points", value_name = "N")]
        keep_points: Option<u64>,
        /// Staging (cache) capacity per item in MiB (16..=1048576, default 2048).
        #[arg(long = "cache-mib", value_name = "N")]
        cache_mib: Option<u64>,
        /// Replica I/O queue depth (1..=1024, default 32).
        #[arg(long = "queue-depth", value_name = "N")]
        queue_depth: Option<u64>,
        /// Disk slots (LUNs) of the appliance VM, LUN 0 (its own cache disk) included
        /// (1..=256, default 32: 31 for replica disks).
        #[arg(long, value_name = "N")]
        slots: Option<u64>,
        /// A directory, besides the data directory, where the API may attach disks, write
        /// failover disks and create temporary OS disks (absolute path; repeatable; replaces
        /// the file's disk_stores).
        #[arg(long = "disk-store", value_name = "DIR")]
        disk_stores: Vec<PathBuf>,
        /// Jobs that write disks (test failover, failover, change point, failback) running at
        /// once (1..=64, default 8); replication jobs are one per item and do not count.
        #[arg(long = "max-jobs", value_name = "N")]
        max_jobs: Option<u64>,
        /// Control API connections open at once (16..=16384, default 256). At the cap the
        /// connection idle longest makes room for a new one.
        #[arg(long = "api-max-connections", value_name = "N")]
        api_max_connections: Option<u64>,
    },
    /// Show a protected item (API), or register one offline (`item create`).
    ///
    /// `item ITEM` shows the item's state, allowed operations, synchronization, RPO lag,
    /// policy and disks, from the control API.
    #[command(
        args_conflicts_with_subcommands = true,
        subcommand_negates_reqs = true,
        after_long_help = "Examples:\n  appliance item web-01\n  appliance item 3f2a --json\n  \
            appliance item create --data-dir /var/lib/appliance --name vm1 --disk 1024"
    )]
    Item {
        #[command(subcommand)]
        command: Option<ItemCommand>,
        /// The item: its id (32 hex digits), a unique prefix of the id, or its name.
        #[arg(value_name = "ITEM", required = true)]
        item: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Delta-stream files.
    #[command(after_long_help = "Example:\n  appliance stream inspect vm1.drs")]
    Stream {
        #[command(subcommand)]
        command: StreamCommand,
    },
    /// Stage and apply a delta-stream file into its item's replicas (offline).
    ///
    /// Offline seeding, and the daemon's data path without the network. Prints `ack <seq>` for
    /// each durable batch. Safe to kill at any moment: the next run recovers and resumes, skipping what is staged.
    #[command(
        after_long_help = "Example:\n  appliance ingest --data-dir /var/lib/appliance vm1.drs"
    )]
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
    /// List an item's recovery points (API), or a data directory's items and points (offline).
    ///
    /// `points ITEM` asks the control API, oldest point first; `points --data-dir DIR` reads
    /// the data directory itself.
    #[command(after_long_help = "Examples:\n  appliance points web-01\n  \
        appliance points --data-dir /var/lib/appliance --item 3f2a0000000000000000000000000001")]
    Points {
        /// The item (API): its id (32 hex digits), a unique prefix of the id, or its name.
        #[arg(
            value_name = "ITEM",
            required_unless_present = "data_dir",
            conflicts_with = "data_dir"
        )]
        target: Option<String>,
        /// Offline: read this data directory directly (no appliance may be running on it).
        #[arg(long = "data-dir", value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// Offline: only this item (32 hex digits).
        #[arg(long, requires = "data_dir", value_name = "ID")]
        item: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Write an item's disks at a recovery point as new images (offline).
    ///
    /// `disk-<i>.raw` (sparse) or `disk-<i>.vhd` (fixed VHD, as Hyper-V and Azure use). Never
    /// overwrites a file. No appliance may be running on the data directory (`test-failover`
    /// does the same through the API).
    #[command(
        after_long_help = "Example:\n  appliance materialize --data-dir /var/lib/appliance \
        --item 3f2a0000000000000000000000000001 --point latest-app --out /srv/restore/vm1 --format vhd"
    )]
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
    #[command(flatten)]
    Client(ClientCommand),
}

/// Image formats of `materialize`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(crate) enum Format {
    /// Raw image, sparse where the disk is zero.
    Raw,
    /// Fixed VHD (virtual size rounded up to a 1 MiB multiple).
    Vhd,
}

#[derive(Subcommand, Debug)]
pub(crate) enum ItemCommand {
    /// Register an item offline (with a running appliance, use `appliance enable`).
    ///
    /// Its replica disks are created in the data directory and its stream token is printed
    /// once (stored with mode 0600).
    #[command(after_long_help = "Example:\n  \
        appliance item create --data-dir /var/lib/appliance --name vm1 --disk 1024 --disk 64:512")]
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
pub(crate) enum StreamCommand {
    /// Validate a delta-stream file and print a summary per frame kind.
    ///
    /// Exit status: 0 when valid, 2 when the stream is corrupt or unreadable (one error line
    /// naming the frame index, byte offset and reason).
    #[command(after_long_help = "Example:\n  appliance stream inspect vm1.drs")]
    Inspect {
        /// The stream file.
        file: PathBuf,
    },
}
