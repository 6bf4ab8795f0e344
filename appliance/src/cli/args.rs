//! The client commands' arguments: where the API is and its token, points, disks and image
//! formats as the command line names them, and the clap subcommands themselves.

use std::path::PathBuf;

use appliance_api::model::{DiskSpec, Format, PointSpec as WirePoint};
use clap::{Args, Subcommand, ValueEnum};

/// Where the API is and how to authenticate; every client command takes these.
#[derive(Args, Debug, Clone)]
pub struct ApiArgs {
    /// Base URL of the control API (plain HTTP).
    #[arg(
        long,
        env = "APPLIANCE_API",
        default_value = "http://127.0.0.1:7400",
        value_name = "URL"
    )]
    pub api: String,
    /// API token (64 hex digits, in DATA_DIR/api-token on the appliance).
    #[arg(
        long,
        env = "APPLIANCE_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,
    /// File holding the API token; read when neither --token nor APPLIANCE_TOKEN is given.
    #[arg(long = "token-file", env = "APPLIANCE_TOKEN_FILE", value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// Print the API's JSON answer instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// A recovery point as a request names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PointSpec {
    /// Failover only: apply everything received, make a point of it and use it.
    Latest,
    /// The newest point already applied.
    LatestProcessed,
    /// The newest app-consistent point.
    LatestApp,
    /// A point id from `appliance points ITEM`.
    Id(u64),
}

impl PointSpec {
    /// As the API wants it: a JSON string, or a JSON integer for a point id.
    pub fn to_wire(self) -> WirePoint {
        match self {
            Self::Latest => WirePoint::latest(),
            Self::LatestProcessed => WirePoint::latest_processed(),
            Self::LatestApp => WirePoint::latest_app(),
            Self::Id(id) => WirePoint::Id(id),
        }
    }
}

/// Parses `latest`, `latest-processed`, `latest-app` or a point id.
pub fn parse_point(text: &str) -> Result<PointSpec, String> {
    match text.trim() {
        "latest" => Ok(PointSpec::Latest),
        "latest-processed" => Ok(PointSpec::LatestProcessed),
        "latest-app" => Ok(PointSpec::LatestApp),
        other => other.parse().map(PointSpec::Id).map_err(|_| {
            format!(
                "{text:?} is not a point: expected latest, latest-processed, latest-app or a \
                 point id (an integer from `appliance points ITEM`)"
            )
        }),
    }
}

/// A disk of `enable`: a new replica, or an existing disk to attach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskArg {
    /// `--disk SIZE_MIB[:BLOCK]`.
    New {
        /// Size in MiB.
        size_mib: u64,
        /// Logical block size, 512 or 4096; `None`: the appliance's default (4096).
        block_size_bytes: Option<u32>,
    },
    /// `--attach PATH`.
    Attach(PathBuf),
}

impl DiskArg {
    /// As a `DiskSpec` of the API.
    pub fn to_wire(&self) -> DiskSpec {
        match self {
            Self::New {
                size_mib,
                block_size_bytes,
            } => DiskSpec::create(*size_mib, *block_size_bytes),
            Self::Attach(path) => DiskSpec::attach(path.display().to_string()),
        }
    }
}

/// Parses `SIZE_MIB[:512|4096]`.
pub fn parse_new_disk(text: &str) -> Result<DiskArg, String> {
    let bad = |why: &str| format!("disk {text:?}: {why} (expected SIZE_MIB[:512|4096])");
    let (size, block) = match text.split_once(':') {
        Some((size, block)) => (size, Some(block)),
        None => (text, None),
    };
    let size_mib: u64 = size
        .trim()
        .parse()
        .map_err(|_| bad("size is not a number"))?;
    if size_mib == 0 {
        return Err(bad("size must be at least 1 MiB"));
    }
    let block_size_bytes = match block.map(str::trim) {
        None => None,
        Some("512") => Some(512),
        Some("4096") => Some(4096),
        Some(_) => return Err(bad("block size must be 512 or 4096")),
    };
    Ok(DiskArg::New {
        size_mib,
        block_size_bytes,
    })
}

/// The disks of `enable` in command-line order across `--disk` and `--attach`: each value
/// comes with its index among all arguments (clap's `indices_of`).
pub fn order_disks(
    new: impl IntoIterator<Item = (usize, DiskArg)>,
    attach: impl IntoIterator<Item = (usize, PathBuf)>,
) -> Vec<DiskArg> {
    let mut all: Vec<(usize, DiskArg)> = new
        .into_iter()
        .chain(
            attach
                .into_iter()
                .map(|(index, path)| (index, DiskArg::Attach(path))),
        )
        .collect();
    all.sort_by_key(|(index, _)| *index);
    all.into_iter().map(|(_, disk)| disk).collect()
}

/// Image formats of test failover and failover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ImageFormat {
    /// Raw image, sparse where the disk is zero.
    Raw,
    /// Fixed VHD (virtual size rounded up to a 1 MiB multiple).
    Vhd,
}

impl ImageFormat {
    /// The API's format.
    pub fn to_wire(self) -> Format {
        match self {
            Self::Raw => Format::Raw,
            Self::Vhd => Format::Vhd,
        }
    }
}

const ITEM_HELP: &str = "The item: its id (32 hex digits), a unique prefix of the id, or its name";

/// The client commands (flattened into `appliance`'s own; `item ITEM` and `points ITEM` are
/// dispatched from `main.rs` because they share their names with offline commands).
#[derive(Subcommand, Debug)]
pub enum ClientCommand {
    /// Show the appliance and a summary of its slots.
    ///
    /// Version, data directory, addresses, items, and the slots in use. With --json, prints the
    /// answer of GET /v1/appliance.
    #[command(after_long_help = "Example:\n  appliance status\n  \
        APPLIANCE_TOKEN_FILE=/var/lib/appliance/api-token appliance status --json")]
    Status {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List the appliance's disk slots (LUNs).
    ///
    /// LUN 0 is the appliance's own cache disk; the others hold the replica disks of
    /// protected items.
    #[command(after_long_help = "Example:\n  appliance slots")]
    Slots {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List the protected items.
    ///
    /// State, synchronization, RPO lag, cache use, recovery points and health of each.
    #[command(after_long_help = "Example:\n  appliance items\n  appliance items --json")]
    Items {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Enable protection of a VM; prints its item id and stream token (shown once).
    ///
    /// Creates (`--disk`) or attaches (`--attach`) its replica disks, OS disk first, in the
    /// order given across both flags. The stream token is shown only this once: give it to the
    /// source agent. Starts the initial-replication job; the item becomes `protected` at its first recovery
    /// point. Paths must be inside the data directory or a configured disk store; relative
    /// paths are made absolute here.
    #[command(group = clap::ArgGroup::new("disk_specs").args(["disks", "attach"]).required(true).multiple(true))]
    #[command(after_long_help = "Examples:\n  \
        appliance enable --name web-01 --disk 40960 --disk 102400:512\n  \
        appliance enable --name db-01 --attach /srv/replicas/db-01-os.vhd --disk 204800 \
        --keep-points 96 --app-minutes 60")]
    Enable {
        /// A name for people (1 to 255 bytes).
        #[arg(long)]
        name: String,
        /// A new replica disk as SIZE_MIB[:LOGICAL_BLOCK_BYTES] (512 or 4096, default 4096).
        /// Repeat per disk.
        #[arg(long = "disk", value_name = "SIZE_MIB[:BLOCK]", value_parser = parse_new_disk)]
        disks: Vec<DiskArg>,
        /// An existing disk to attach as a replica. Repeat per disk.
        #[arg(long = "attach", value_name = "PATH")]
        attach: Vec<PathBuf>,
        /// Recovery points to keep (default: the appliance's --keep-points).
        #[arg(long = "keep-points", value_name = "N",
              value_parser = clap::value_parser!(u64).range(1..=100_000))]
        keep_points: Option<u64>,
        /// Drop points older than this many minutes (0: no age limit).
        #[arg(long = "keep-minutes", value_name = "N")]
        keep_minutes: Option<u64>,
        /// Ask the source for an app-consistent point this often, in minutes.
        #[arg(long = "app-minutes", value_name = "N")]
        app_minutes: Option<u64>,
        /// Also create a temporary 1 GiB fixed-VHD OS disk at this path.
        #[arg(long = "temporary-os-disk", value_name = "PATH")]
        temporary_os_disk: Option<PathBuf>,
        /// Wait for the initial replication to finish (its first recovery point), with a
        /// progress bar on stderr.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Test failover: the disks at a point, copied or served over NBD, while replication
    /// keeps running.
    ///
    /// With --target, the item's disks at the recovery point are written into a new
    /// directory. With --export, they are served over NBD at once as a writable drill (its
    /// writes kept in an overlay on the appliance; the URIs are printed). Replication goes on.
    /// Undo with `test-failover-cleanup`.
    #[command(after_long_help = "Examples:\n  \
        appliance test-failover web-01 --point latest-app --target /srv/restore/web-01-test --wait\n  \
        appliance test-failover web-01 --point latest-processed --export\n  \
        appliance test-failover 3f2a --point 2000 --target /srv/restore/t1 --format vhd")]
    TestFailover {
        #[arg(help = ITEM_HELP)]
        item: String,
        /// latest-processed, latest-app, or a point id from `appliance points ITEM`.
        #[arg(long, value_parser = parse_point, value_name = "POINT")]
        point: PointSpec,
        /// New directory for the disk images.
        #[arg(
            long = "target",
            value_name = "DIR",
            required_unless_present = "export",
            conflicts_with = "export"
        )]
        target: Option<PathBuf>,
        /// Serve the disks over NBD at once (a writable drill) instead of copying them.
        #[arg(long)]
        export: bool,
        /// Image format (default raw).
        #[arg(long, value_enum)]
        format: Option<ImageFormat>,
        /// Wait for the job, with a progress bar on stderr.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// End a test failover: delete its disk images.
    ///
    /// The item goes back to `protected`.
    #[command(after_long_help = "Example:\n  appliance test-failover-cleanup web-01")]
    TestFailoverCleanup {
        #[arg(help = ITEM_HELP)]
        item: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Fail over: stop replication and write the disks at a point.
    ///
    /// The item's disks at the recovery point are written into a new directory. Then
    /// `change-point` to pick another point, or `commit`.
    #[command(after_long_help = "Examples:\n  \
        appliance failover web-01 --point latest --target /srv/restore/web-01 --source-shut-down --wait\n  \
        appliance failover web-01 --point latest-app --target /srv/restore/web-01 --format vhd")]
    Failover {
        #[arg(help = ITEM_HELP)]
        item: String,
        /// latest (apply everything received and make a point of it), latest-processed,
        /// latest-app, or a point id from `appliance points ITEM`.
        #[arg(long, value_parser = parse_point, value_name = "POINT")]
        point: PointSpec,
        /// New directory for the disk images.
        #[arg(long = "target", value_name = "DIR")]
        target: PathBuf,
        /// Image format (default raw).
        #[arg(long, value_enum)]
        format: Option<ImageFormat>,
        /// The source VM has been shut down (its last writes are in).
        #[arg(long = "source-shut-down")]
        source_shut_down: bool,
        /// Serve the disks over NBD at once (the VM can run on them) while a job copies them
        /// into --target; the export then serves the copied files (raw only).
        #[arg(long)]
        export: bool,
        /// Wait for the job, with a progress bar on stderr.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Promote a test failover's drill (export mode) to the failover, keeping its writes.
    ///
    /// Replication stops; the drill's export goes on serving the VM without a break while a
    /// job copies its point and its writes into --target; then `commit`.
    #[command(
        after_long_help = "Example:\n  appliance promote web-01 --target /srv/restore/web-01 --source-shut-down --wait"
    )]
    Promote {
        #[arg(help = ITEM_HELP)]
        item: String,
        /// New directory for the failover's raw disk files.
        #[arg(long = "target", value_name = "DIR")]
        target: PathBuf,
        /// The source VM has been shut down (its last writes are in).
        #[arg(long = "source-shut-down")]
        source_shut_down: bool,
        /// Wait for the copy, with a progress bar on stderr.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Export a recovery point over NBD, read-only or as a writable drill.
    ///
    /// Prints one NBD URI per disk (`nbd://host:port/secret-name`) for qemu, nbdcopy,
    /// nbdinfo or nbdfuse. The point is kept (pinned) while the export exists; replication
    /// goes on. A drill's writes are kept in an overlay and dropped with the export.
    #[command(after_long_help = "Examples:\n  \
        appliance export web-01 --point latest-app\n  \
        appliance export web-01 --point 2000 --drill\n  \
        nbdinfo --map nbd://127.0.0.1:10809/<name>")]
    Export {
        #[arg(help = ITEM_HELP)]
        item: String,
        /// latest-processed, latest-app, or a point id from `appliance points ITEM`.
        #[arg(long, value_parser = parse_point, value_name = "POINT")]
        point: PointSpec,
        /// Writable: writes go to an overlay, never to a replica or a point.
        #[arg(long)]
        drill: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List exports, or show one.
    #[command(after_long_help = "Examples:\n  appliance exports\n  appliance exports 9c1e…")]
    Exports {
        /// An export id.
        export: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Remove an export: its NBD clients are disconnected, a drill's writes dropped, the
    /// point unpinned.
    #[command(after_long_help = "Example:\n  appliance export-remove 9c1e…")]
    ExportRemove {
        /// The export id (from `appliance exports`).
        export: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// After a failover: use another recovery point instead.
    ///
    /// The failover's disks are written again at the new point.
    #[command(after_long_help = "Example:\n  appliance change-point web-01 --point 1950 --wait")]
    ChangePoint {
        #[arg(help = ITEM_HELP)]
        item: String,
        /// latest-processed, latest-app, or a point id from `appliance points ITEM`.
        #[arg(long, value_parser = parse_point, value_name = "POINT")]
        point: PointSpec,
        /// Wait for the job, with a progress bar on stderr.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// After a failover: make it final.
    ///
    /// The item becomes `committed`; next, `reprotect`.
    #[command(after_long_help = "Example:\n  appliance commit web-01")]
    Commit {
        #[arg(help = ITEM_HELP)]
        item: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// After a commit: protect in the other direction (a new, reverse item).
    ///
    /// The original VM's disks (OS disk first, in the item's order) become the replicas of a
    /// new, reverse item, brought up to date by a delta resync. Prints the reverse item's id
    /// and stream token (shown only this once).
    #[command(after_long_help = "Example:\n  \
        appliance reprotect web-01 --disk /srv/site-a/web-01-os.vhd --disk /srv/site-a/web-01-data.vhd --wait")]
    Reprotect {
        #[arg(help = ITEM_HELP)]
        item: String,
        /// A disk of the original VM; repeat per disk, OS disk first.
        #[arg(long = "disk", value_name = "PATH", required = true)]
        disks: Vec<PathBuf>,
        /// Where to create the temporary 1 GiB OS disk (default: beside the first disk).
        #[arg(long = "temporary-os-disk", value_name = "PATH")]
        temporary_os_disk: Option<PathBuf>,
        /// Name of the reverse item (default: chosen by the appliance).
        #[arg(long)]
        name: Option<String>,
        /// Wait for the delta resync to finish, with a progress bar on stderr.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Fail back: write the replicas back to the item's attached disks.
    ///
    /// Only for items whose disks were attached; releases the item's slots.
    #[command(after_long_help = "Example:\n  appliance failback web-01 --wait")]
    Failback {
        #[arg(help = ITEM_HELP)]
        item: String,
        /// Wait for the job, with a progress bar on stderr.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Resynchronize an item with its source (delta resync).
    ///
    /// The source agent compares its disks with the replicas chunk by chunk and sends what
    /// differs: after a cache overflow or a suspected divergence.
    #[command(after_long_help = "Example:\n  appliance resync web-01 --wait")]
    Resync {
        #[arg(help = ITEM_HELP)]
        item: String,
        /// Wait for the job, with a progress bar on stderr.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Disable protection: stop replication and release the item's slots.
    ///
    /// Cannot be undone: a disabled item allows no further operation.
    #[command(after_long_help = "Example:\n  appliance disable web-01")]
    Disable {
        #[arg(help = ITEM_HELP)]
        item: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List jobs, newest first, or show one job.
    ///
    /// With a job id and --wait, follows the job to its end.
    #[command(after_long_help = "Examples:\n  appliance jobs\n  appliance jobs 12 --wait")]
    Jobs {
        /// A job id.
        job: Option<u64>,
        /// Follow the job until it ends, with a progress bar on stderr.
        #[arg(long, requires = "job")]
        wait: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
}
