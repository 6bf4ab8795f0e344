//! The command-line client of the control API (`docs/design/control-api.md`): `appliance
//! status`, `items`, `enable`, `failover`, … in the same binary as the daemon.
//!
//! Three layers, each usable alone:
//! - HTTP: [`Client`] sends one request and returns the answer as JSON, or a [`Failure`]
//!   that already says what to print and which exit status to use;
//! - rendering: pure functions from the API's JSON to aligned text ([`render_items`], …),
//!   tolerant of missing or unexpected fields (an odd answer never panics);
//! - commands: [`run`] ties the two together for each subcommand.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{Args, Subcommand, ValueEnum};
use serde_json::{Map, Value, json};

/// Exit status when the input is at fault (a bad argument, 400/403/404/409 from the API).
pub const EXIT_BAD_INPUT: u8 = 2;
/// Exit status for everything else (unreachable API, 401, 5xx, a failed job).
pub const EXIT_FAILURE: u8 = 1;

/// How often `--wait` polls a job.
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// How long `--wait` keeps polling through transport errors (an appliance restart) before it
/// gives up; the job itself is not affected.
const POLL_OUTAGE: Duration = Duration::from_secs(30);
/// Largest answer read.
const MAX_ANSWER_BYTES: u64 = 64 << 20;

/// A failed command: what to print after `error: ` and the exit status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// [`EXIT_BAD_INPUT`] or [`EXIT_FAILURE`].
    pub exit: u8,
    /// One or more lines, without the `error: ` prefix.
    pub message: String,
    /// The HTTP status when the API answered (`None`: it could not be reached, or the
    /// command line was at fault).
    pub status: Option<u16>,
}

impl Failure {
    fn bad_input(message: impl Into<String>) -> Self {
        Self {
            exit: EXIT_BAD_INPUT,
            message: message.into(),
            status: None,
        }
    }

    fn machine(message: impl Into<String>) -> Self {
        Self {
            exit: EXIT_FAILURE,
            message: message.into(),
            status: None,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

// ---------------------------------------------------------------------------------------------
// Arguments

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
    pub fn to_json(self) -> Value {
        match self {
            Self::Latest => json!("latest"),
            Self::LatestProcessed => json!("latest-processed"),
            Self::LatestApp => json!("latest-app"),
            Self::Id(id) => json!(id),
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
    pub fn to_json(&self) -> Value {
        match self {
            Self::New {
                size_mib,
                block_size_bytes: None,
            } => json!({ "size_mib": size_mib }),
            Self::New {
                size_mib,
                block_size_bytes: Some(block),
            } => json!({ "size_mib": size_mib, "block_size_bytes": block }),
            Self::Attach(path) => json!({ "path": path.display().to_string() }),
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
    fn as_str(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Vhd => "vhd",
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
    /// Test failover: write the disks at a point while replication keeps running.
    ///
    /// The item's disks at the recovery point are written into a new directory; replication
    /// goes on. Undo with `test-failover-cleanup`.
    #[command(after_long_help = "Examples:\n  \
        appliance test-failover web-01 --point latest-app --target /srv/restore/web-01-test --wait\n  \
        appliance test-failover 3f2a --point 2000 --target /srv/restore/t1 --format vhd")]
    TestFailover {
        #[arg(help = ITEM_HELP)]
        item: String,
        /// latest-processed, latest-app, or a point id from `appliance points ITEM`.
        #[arg(long, value_parser = parse_point, value_name = "POINT")]
        point: PointSpec,
        /// New directory for the disk images.
        #[arg(long = "target", value_name = "DIR")]
        target: PathBuf,
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
        /// Wait for the job, with a progress bar on stderr.
        #[arg(long)]
        wait: bool,
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

// ---------------------------------------------------------------------------------------------
// HTTP

/// HTTP methods the API uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// GET.
    Get,
    /// POST.
    Post,
    /// DELETE.
    Delete,
}

/// A blocking client of the control API.
#[derive(Debug, Clone)]
pub struct Client {
    agent: ureq::Agent,
    base: String,
    token: Option<String>,
}

impl Client {
    /// A client of the API at `base` (`http://host:port`, a trailing `/` allowed; a bare
    /// `host:port` means http), authenticating with `token` when given.
    pub fn new(base: &str, token: Option<String>) -> Result<Self, Failure> {
        let base = normalize_base(base)?;
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            // The API is local: never route it through a proxy from the environment.
            .proxy(None)
            .max_redirects(0)
            .timeout_connect(Some(Duration::from_secs(5)))
            .timeout_global(Some(Duration::from_secs(120)))
            .user_agent(concat!("appliance-cli/", env!("CARGO_PKG_VERSION")))
            .build();
        Ok(Self {
            agent: config.into(),
            base,
            token,
        })
    }

    /// A client from the command line's `--api`, `--token`, `--token-file` (or environment).
    pub fn from_args(args: &ApiArgs) -> Result<Self, Failure> {
        Self::new(&args.api, resolve_token(args)?)
    }

    /// Sends one request; returns the status and body whatever the status. Only a transport
    /// failure (no connection, timeout, unreadable answer) is an error.
    pub fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, String), Failure> {
        let url = format!("{}{path}", self.base);
        let auth = self.token.as_ref().map(|token| format!("Bearer {token}"));
        let result = match method {
            Method::Get => {
                let mut request = self.agent.get(&url).header("Accept", "application/json");
                if let Some(auth) = &auth {
                    request = request.header("Authorization", auth);
                }
                request.call()
            }
            Method::Delete => {
                let mut request = self.agent.delete(&url).header("Accept", "application/json");
                if let Some(auth) = &auth {
                    request = request.header("Authorization", auth);
                }
                request.call()
            }
            Method::Post => {
                let mut request = self.agent.post(&url).header("Accept", "application/json");
                if let Some(auth) = &auth {
                    request = request.header("Authorization", auth);
                }
                match body {
                    Some(body) => request
                        .content_type("application/json")
                        .send(body.to_string()),
                    None => request.send_empty(),
                }
            }
        };
        let mut response = result.map_err(|e| self.transport_failure(&url, e))?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .with_config()
            .limit(MAX_ANSWER_BYTES)
            .read_to_string()
            .map_err(|e| self.transport_failure(&url, e))?;
        Ok((status, text))
    }

    /// Sends one request; a 2xx answer is returned as JSON, anything else becomes a
    /// [`Failure`] carrying the API's error.
    pub fn call(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Value, Failure> {
        let (status, text) = self.send(method, path, body)?;
        if !(200..300).contains(&status) {
            return Err(api_failure(status, &text));
        }
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text).map_err(|e| {
            Failure::machine(format!(
                "{method:?} {path}: the API answered HTTP {status} with a body that is not \
                 JSON ({e}): {}",
                excerpt(&text)
            ))
        })
    }

    /// GET `path` (`/v1/…`).
    pub fn get(&self, path: &str) -> Result<Value, Failure> {
        self.call(Method::Get, path, None)
    }

    /// POST `path` with an optional JSON body.
    pub fn post(&self, path: &str, body: Option<&Value>) -> Result<Value, Failure> {
        self.call(Method::Post, path, body)
    }

    /// DELETE `path`.
    pub fn delete(&self, path: &str) -> Result<Value, Failure> {
        self.call(Method::Delete, path, None)
    }

    fn transport_failure(&self, url: &str, error: ureq::Error) -> Failure {
        let base = &self.base;
        let hint = "is `appliance serve` running there? (--api URL or APPLIANCE_API)";
        let message = match &error {
            ureq::Error::Io(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                format!("cannot connect to the control API at {base}: connection refused; {hint}")
            }
            ureq::Error::Timeout(_) => {
                format!("the control API at {base} did not answer in time ({url})")
            }
            ureq::Error::HostNotFound => {
                format!("cannot resolve the host of the control API URL {base}")
            }
            ureq::Error::ConnectionFailed | ureq::Error::Io(_) => {
                format!("cannot talk to the control API at {base}: {error}; {hint}")
            }
            _ => format!("request to {url} failed: {error}"),
        };
        Failure::machine(message)
    }
}

/// `http://host:port` without a trailing `/`; a bare `host:port` gets `http://`.
fn normalize_base(base: &str) -> Result<String, Failure> {
    let base = base.trim().trim_end_matches('/');
    if base.is_empty() {
        return Err(Failure::bad_input("--api: empty URL"));
    }
    if base.starts_with("https://") {
        return Err(Failure::bad_input(format!(
            "--api {base}: the control API is plain HTTP (on loopback or a trusted network); \
             use http://"
        )));
    }
    if base.starts_with("http://") {
        Ok(base.to_string())
    } else if base.contains("://") {
        Err(Failure::bad_input(format!(
            "--api {base}: expected an http:// URL"
        )))
    } else {
        Ok(format!("http://{base}"))
    }
}

/// The token: `--token`/`APPLIANCE_TOKEN`, else the file of `--token-file`/
/// `APPLIANCE_TOKEN_FILE`, else none (the API will answer 401, with a hint).
fn resolve_token(args: &ApiArgs) -> Result<Option<String>, Failure> {
    if let Some(token) = args.token.as_deref().map(str::trim)
        && !token.is_empty()
    {
        return Ok(Some(token.to_string()));
    }
    let Some(path) = &args.token_file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path).map_err(|e| {
        Failure::machine(format!("token file {}: cannot read: {e}", path.display()))
    })?;
    let token = text.trim();
    if token.is_empty() || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(Failure::bad_input(format!(
            "token file {}: expected one token (64 hex digits)",
            path.display()
        )));
    }
    Ok(Some(token.to_string()))
}

/// The first 300 characters of `text`, on one line.
fn excerpt(text: &str) -> String {
    let flat: String = text.trim().replace(['\n', '\r'], " ");
    match flat.char_indices().nth(300) {
        Some((cut, _)) => format!("{}…", &flat[..cut]),
        None => flat,
    }
}

/// Exit status for an API error status: input errors get [`EXIT_BAD_INPUT`].
pub fn exit_for_status(status: u16) -> u8 {
    match status {
        400 | 403 | 404 | 409 => EXIT_BAD_INPUT,
        _ => EXIT_FAILURE,
    }
}

/// A non-2xx answer as a [`Failure`]: `<message> (HTTP <status> <code>)`, then the details
/// the error carries (state and allowed operations, needed and free slots, the field).
pub fn api_failure(status: u16, body: &str) -> Failure {
    Failure {
        exit: exit_for_status(status),
        message: describe_api_error(status, body),
        status: Some(status),
    }
}

/// The text of [`api_failure`].
pub fn describe_api_error(status: u16, body: &str) -> String {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    let detail = parsed
        .as_ref()
        .and_then(|v| v.get("error"))
        .filter(|v| v.is_object());
    let Some(detail) = detail else {
        // Not the API's error shape (a proxy, an older server): show what there is.
        let text = excerpt(body);
        return if text.is_empty() {
            format!("the API answered HTTP {status} ({})", status_reason(status))
        } else {
            format!("{text} (HTTP {status})")
        };
    };
    let code = detail.get("code").and_then(Value::as_str).unwrap_or("");
    let message = match detail.get("message") {
        Some(Value::String(message)) if !message.trim().is_empty() => message.trim().to_string(),
        _ => status_reason(status).to_string(),
    };
    let mut out = if code.is_empty() {
        format!("{message} (HTTP {status})")
    } else {
        format!("{message} (HTTP {status} {code})")
    };
    if let Some(state) = detail.get("state").filter(|v| !v.is_null()) {
        let _ = write!(out, "\n  state: {}", scalar(state));
    }
    if let Some(allowed) = detail.get("allowed_operations").filter(|v| !v.is_null()) {
        let list = string_list(allowed);
        let _ = write!(
            out,
            "\n  allowed operations: {}",
            if list.is_empty() {
                "none".to_string()
            } else {
                list.join(", ")
            }
        );
    }
    for (key, label) in [
        ("needed", "slots needed"),
        ("free", "slots free"),
        ("field", "field"),
    ] {
        if let Some(value) = detail.get(key).filter(|v| !v.is_null()) {
            let _ = write!(out, "\n  {label}: {}", scalar(value));
        }
    }
    if status == 401 {
        out.push_str(
            "\n  hint: give the token with --token, APPLIANCE_TOKEN, --token-file or \
             APPLIANCE_TOKEN_FILE (it is in DATA_DIR/api-token on the appliance)",
        );
    }
    out
}

fn status_reason(status: u16) -> &'static str {
    match status {
        400 => "bad request",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not found",
        405 => "method not allowed",
        409 => "conflict",
        413 => "payload too large",
        500 => "internal server error",
        502 => "bad gateway",
        503 => "service unavailable",
        _ => "unexpected status",
    }
}

// ---------------------------------------------------------------------------------------------
// Rendering

/// Plain text columns: each column as wide as its widest cell, two spaces between columns,
/// no trailing blanks. Every row is cut or padded to the header's width.
pub fn render_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (i, width) in widths.iter().enumerate() {
            let cell = cells.next().unwrap_or("");
            if i > 0 {
                text.push_str("  ");
            }
            text.push_str(cell);
            let pad = width.saturating_sub(cell.chars().count());
            text.extend(std::iter::repeat_n(' ', pad));
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut headers.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

/// `label  value` lines with the values aligned.
fn render_pairs(pairs: &[(String, String)]) -> String {
    let width = pairs
        .iter()
        .map(|(l, _)| l.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for (label, value) in pairs {
        let pad = width - label.chars().count();
        let line = format!("{label}{}  {value}", " ".repeat(pad));
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// A scalar for people: strings bare, `-` for null or missing, other JSON compact.
fn scalar(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `value[key]` for people (`-` when missing).
fn field(value: &Value, key: &str) -> String {
    value.get(key).map_or_else(|| "-".into(), scalar)
}

fn number(value: &Value, key: &str) -> Option<u64> {
    value.get(key).and_then(Value::as_u64)
}

fn string_list(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|items| items.iter().map(scalar).collect())
        .unwrap_or_default()
}

/// `items` of an array answer (an odd answer counts as empty).
fn array(value: &Value) -> &[Value] {
    value.as_array().map(Vec::as_slice).unwrap_or(&[])
}

/// Bytes in binary units: `512 B`, `1.5 KiB`, `2.0 GiB`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// A duration in milliseconds for people: `850 ms`, `12.3 s`, `4 min 05 s`, `2 h 03 min`,
/// `3 d 04 h`.
pub fn format_millis(ms: u64) -> String {
    let secs = ms / 1000;
    if ms < 1000 {
        format!("{ms} ms")
    } else if secs < 60 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else if secs < 3600 {
        format!("{} min {:02} s", secs / 60, secs % 60)
    } else if secs < 86_400 {
        format!("{} h {:02} min", secs / 3600, secs % 3600 / 60)
    } else {
        format!("{} d {:02} h", secs / 86_400, secs % 86_400 / 3600)
    }
}

/// Nanoseconds since the Unix epoch as UTC: `2026-11-22 00:38:53Z` (`-` for 0).
pub fn format_time_ns(ns: u64) -> String {
    if ns == 0 {
        return "-".into();
    }
    let secs = ns / 1_000_000_000;
    let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX / 2);
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// `GET /v1/appliance` (+ `GET /v1/slots`, or why it could not be read) for people.
pub fn render_status(info: &Value, slots: Result<&Value, &str>) -> String {
    let mut pairs = Vec::new();
    let known = [
        ("version", "version"),
        ("data_dir", "data directory"),
        ("data_addr", "data port"),
        ("api_addr", "control API"),
        ("items", "items"),
    ];
    for (key, label) in known {
        if let Some(value) = info.get(key) {
            pairs.push((label.to_string(), scalar(value)));
        }
    }
    // The slot counts the answer may carry are in the summary line when it could be read.
    let skip_slots = slots.is_ok();
    if let Some(map) = info.as_object() {
        for (key, value) in map {
            let shown = known.iter().any(|(k, _)| k == key);
            let in_summary = skip_slots && key.starts_with("slot");
            if !shown && !in_summary {
                pairs.push((key.replace('_', " "), scalar(value)));
            }
        }
    }
    let slots = match slots {
        Ok(view) => slot_summary(view),
        Err(why) => format!("unavailable ({why})"),
    };
    pairs.push(("slots".into(), slots));
    render_pairs(&pairs)
}

/// `32 slots (31 usable): 20 free, 1 reserved, 10 attached`.
fn slot_summary(view: &Value) -> String {
    format!(
        "{} slots ({} usable): {} free, {} reserved, {} attached",
        field(view, "slot_count"),
        field(view, "usable"),
        field(view, "free"),
        field(view, "reserved"),
        field(view, "attached"),
    )
}

/// `GET /v1/slots` for people: a summary line, then LUN/STATE/ITEM/DISK/PATH.
pub fn render_slots(view: &Value) -> String {
    let rows: Vec<Vec<String>> = view
        .get("slots")
        .map(array)
        .unwrap_or(&[])
        .iter()
        .map(|slot| {
            vec![
                field(slot, "lun"),
                field(slot, "state"),
                field(slot, "item"),
                field(slot, "disk_index"),
                field(slot, "path"),
            ]
        })
        .collect();
    format!(
        "{}\n{}",
        slot_summary(view),
        render_table(&["LUN", "STATE", "ITEM", "DISK", "PATH"], &rows)
    )
}

fn cache_cell(item: &Value) -> String {
    match (
        number(item, "cache_used_bytes"),
        number(item, "cache_capacity_bytes"),
    ) {
        (Some(used), Some(capacity)) if capacity > 0 => format!(
            "{}/{} ({}%)",
            format_bytes(used),
            format_bytes(capacity),
            used.saturating_mul(100) / capacity
        ),
        (Some(used), _) => format_bytes(used),
        _ => "-".into(),
    }
}

fn percent_cell(value: &Value, key: &str) -> String {
    number(value, key).map_or_else(|| "-".into(), |p| format!("{p}%"))
}

fn lag_cell(item: &Value) -> String {
    number(item, "rpo_lag_ms").map_or_else(|| "-".into(), format_millis)
}

/// `GET /v1/items` for people: ID/NAME/STATE/SYNC%/RPO LAG/CACHE/POINTS/HEALTH.
pub fn render_items(items: &Value) -> String {
    let rows: Vec<Vec<String>> = array(items)
        .iter()
        .map(|item| {
            vec![
                field(item, "id"),
                field(item, "name"),
                field(item, "state"),
                percent_cell(item, "synchronized_percent"),
                lag_cell(item),
                cache_cell(item),
                field(item, "points"),
                field(item, "health"),
            ]
        })
        .collect();
    if rows.is_empty() {
        return "no items\n".into();
    }
    render_table(
        &[
            "ID", "NAME", "STATE", "SYNC%", "RPO LAG", "CACHE", "POINTS", "HEALTH",
        ],
        &rows,
    )
}

fn materialized(value: &Value) -> String {
    let files = string_list(value.get("files").unwrap_or(&Value::Null));
    let mut text = format!(
        "point {}, {}, in {}",
        field(value, "point_id"),
        field(value, "format"),
        field(value, "target_dir")
    );
    for file in files {
        let _ = write!(text, "\n    {file}");
    }
    text
}

/// `GET /v1/items/{id}` for people: every field, then the disks as a table.
pub fn render_item(item: &Value) -> String {
    let mut pairs: Vec<(String, String)> = Vec::new();
    let mut push = |label: &str, value: String| pairs.push((label.to_string(), value));
    push("item", field(item, "id"));
    push("name", field(item, "name"));
    push("state", field(item, "state"));
    let allowed = string_list(item.get("allowed_operations").unwrap_or(&Value::Null));
    push(
        "allowed operations",
        if allowed.is_empty() {
            "none".into()
        } else {
            allowed.join(", ")
        },
    );
    push("role", field(item, "role"));
    for (key, label) in [("reverse_of", "reverse of"), ("reversed_by", "reversed by")] {
        if item.get(key).is_some_and(|v| !v.is_null()) {
            push(label, field(item, key));
        }
    }
    push("health", field(item, "health"));
    push("synchronized", percent_cell(item, "synchronized_percent"));
    push("RPO lag", lag_cell(item));
    push("cache", cache_cell(item));
    push(
        "sequence",
        format!(
            "applied {}, staged {}",
            field(item, "applied_seq"),
            field(item, "staged_seq")
        ),
    );
    push(
        "points",
        format!(
            "{} (latest {}, latest app-consistent {})",
            field(item, "points"),
            field(item, "latest_point_id"),
            field(item, "latest_app_point_id")
        ),
    );
    if let Some(policy) = item.get("policy").filter(|p| p.is_object()) {
        let age = match number(policy, "keep_minutes") {
            None | Some(0) => "no age limit".to_string(),
            Some(m) => format!("at most {m} min old"),
        };
        let app = match number(policy, "app_consistent_minutes") {
            Some(m) => format!("app-consistent every {m} min"),
            None => "app-consistent as the source sends them".to_string(),
        };
        push(
            "policy",
            format!("keep {} points, {age}, {app}", field(policy, "keep_points")),
        );
    }
    for (key, label) in [
        ("temporary_os_disk", "temporary OS disk"),
        ("last_job", "last job"),
        ("last_error", "last error"),
    ] {
        if item.get(key).is_some_and(|v| !v.is_null()) {
            push(label, field(item, key));
        }
    }
    for (key, label) in [("test_failover", "test failover"), ("failover", "failover")] {
        if let Some(value) = item.get(key).filter(|v| v.is_object()) {
            push(label, materialized(value));
        }
    }
    let mut out = render_pairs(&pairs);
    let disks: Vec<Vec<String>> = item
        .get("disks")
        .map(array)
        .unwrap_or(&[])
        .iter()
        .map(|disk| {
            vec![
                field(disk, "index"),
                number(disk, "size_bytes").map_or_else(|| "-".into(), format_bytes),
                field(disk, "block_size_bytes"),
                field(disk, "lun"),
                field(disk, "origin"),
                field(disk, "path"),
            ]
        })
        .collect();
    if !disks.is_empty() {
        out.push('\n');
        out.push_str(&render_table(
            &["DISK", "SIZE", "BLOCK", "LUN", "ORIGIN", "PATH"],
            &disks,
        ));
    }
    out
}

/// `GET /v1/items/{id}/points` for people: ID/CONSISTENCY/ORIGIN/SOURCE TIME/LABEL.
pub fn render_points(points: &Value) -> String {
    let rows: Vec<Vec<String>> = array(points)
        .iter()
        .map(|point| {
            vec![
                field(point, "id"),
                field(point, "consistency"),
                field(point, "origin"),
                number(point, "source_timestamp_ns").map_or_else(|| "-".into(), format_time_ns),
                field(point, "label"),
            ]
        })
        .collect();
    if rows.is_empty() {
        return "no recovery points yet\n".into();
    }
    render_table(
        &["ID", "CONSISTENCY", "ORIGIN", "SOURCE TIME", "LABEL"],
        &rows,
    )
}

/// One job for people.
pub fn render_job(job: &Value) -> String {
    let mut pairs = vec![
        ("job".to_string(), field(job, "id")),
        ("kind".to_string(), field(job, "kind")),
        ("item".to_string(), field(job, "item")),
        ("state".to_string(), field(job, "state")),
        ("done".to_string(), percent_cell(job, "percent")),
        ("message".to_string(), field(job, "message")),
    ];
    if job.get("error").is_some_and(|v| !v.is_null()) {
        pairs.push(("error".into(), field(job, "error")));
    }
    pairs.push((
        "created".into(),
        number(job, "created_ns").map_or_else(|| "-".into(), format_time_ns),
    ));
    if let Some(finished) = number(job, "finished_ns") {
        pairs.push(("finished".into(), format_time_ns(finished)));
        if let Some(created) = number(job, "created_ns")
            && finished >= created
        {
            pairs.push((
                "took".into(),
                format_millis((finished - created) / 1_000_000),
            ));
        }
    }
    render_pairs(&pairs)
}

/// `GET /v1/jobs` for people: ID/KIND/ITEM/STATE/DONE/CREATED/MESSAGE (the error when failed).
pub fn render_jobs(jobs: &Value) -> String {
    let rows: Vec<Vec<String>> = array(jobs)
        .iter()
        .map(|job| {
            let message = match job.get("error") {
                Some(Value::String(error)) => error.clone(),
                _ => field(job, "message"),
            };
            vec![
                field(job, "id"),
                field(job, "kind"),
                field(job, "item"),
                field(job, "state"),
                percent_cell(job, "percent"),
                number(job, "created_ns").map_or_else(|| "-".into(), format_time_ns),
                message,
            ]
        })
        .collect();
    if rows.is_empty() {
        return "no jobs\n".into();
    }
    render_table(
        &["ID", "KIND", "ITEM", "STATE", "DONE", "CREATED", "MESSAGE"],
        &rows,
    )
}

/// An `Enabled` answer (enable, reprotect) for people: the item, its stream token (shown
/// once), and the job.
pub fn render_enabled(enabled: &Value) -> String {
    let null = Value::Null;
    let item = enabled.get("item").unwrap_or(&null);
    let job = enabled.get("job").unwrap_or(&null);
    let pairs = vec![
        ("item".to_string(), field(item, "id")),
        ("name".to_string(), field(item, "name")),
        ("state".to_string(), field(item, "state")),
        (
            "stream token".to_string(),
            format!(
                "{} (shown only this once: give it to the source agent)",
                field(enabled, "stream_token")
            ),
        ),
        (
            "job".to_string(),
            format!(
                "{} ({}, {})",
                field(job, "id"),
                field(job, "kind"),
                field(job, "state")
            ),
        ),
    ];
    render_pairs(&pairs)
}

// ---------------------------------------------------------------------------------------------
// Commands

/// Finds the item `text` names: an id (32 hex digits) as is; else, among `items` (the answer
/// of `GET /v1/items`), the one whose name is `text` or whose id starts with it (4 digits at
/// least).
pub fn match_item(items: &Value, text: &str) -> Result<String, String> {
    let text = text.trim();
    if text.len() == 32 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(text.to_ascii_lowercase());
    }
    let lower = text.to_ascii_lowercase();
    let prefix = text.len() >= 4 && text.bytes().all(|b| b.is_ascii_hexdigit());
    let id_of = |item: &Value| item.get("id").and_then(Value::as_str).map(str::to_string);
    let by_name: Vec<&Value> = array(items)
        .iter()
        .filter(|item| item.get("name").and_then(Value::as_str) == Some(text))
        .collect();
    let candidates: Vec<&Value> = if by_name.is_empty() && prefix {
        array(items)
            .iter()
            .filter(|item| {
                id_of(item).is_some_and(|id| id.to_ascii_lowercase().starts_with(&lower))
            })
            .collect()
    } else {
        by_name
    };
    match candidates.as_slice() {
        [] => Err(format!(
            "no item {text:?}: give an item id (32 hex digits), a unique prefix of one, or an \
             item name (`appliance items` lists them)"
        )),
        [one] => id_of(one).ok_or_else(|| format!("item {text:?} has no id in the answer")),
        many => Err(format!(
            "{text:?} names {} items: {}; give the id",
            many.len(),
            many.iter()
                .map(|item| format!(
                    "{} ({}, {})",
                    field(item, "id"),
                    field(item, "name"),
                    field(item, "state")
                ))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// The id of the item `text` names (asks the API for the list unless `text` is an id).
fn item_id(client: &Client, text: &str) -> Result<String, Failure> {
    match match_item(&Value::Null, text) {
        Ok(id) => Ok(id),
        Err(_) => {
            let items = client.get("/v1/items")?;
            match_item(&items, text).map_err(Failure::bad_input)
        }
    }
}

fn absolute(path: &Path) -> Result<String, Failure> {
    std::path::absolute(path)
        .map(|p| p.display().to_string())
        .map_err(|e| Failure::bad_input(format!("{}: {e}", path.display())))
}

fn print_json(value: &Value) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => println!("{text}"),
        Err(_) => println!("{value}"),
    }
}

/// Prints `value` as JSON with `--json`, else as `render` makes it.
fn show(json: bool, value: &Value, render: fn(&Value) -> String) {
    if json {
        print_json(value);
    } else {
        print!("{}", render(value));
    }
}

/// Polls `GET /v1/jobs/{id}` every 200 ms until the job is no longer running, drawing a
/// progress bar on stderr; returns the final job.
pub fn wait_for_job(client: &Client, job: Value) -> Result<Value, Failure> {
    let Some(id) = number(&job, "id") else {
        return Err(Failure::machine(format!(
            "the API's answer names no job id to wait for: {}",
            excerpt(&job.to_string())
        )));
    };
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(100),
        indicatif::ProgressDrawTarget::stderr(),
    );
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} job {prefix} [{bar:30}] {pos:>3}% {wide_msg}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(format!("{id} ({})", field(&job, "kind")));
    bar.enable_steady_tick(Duration::from_millis(100));
    let mut job = job;
    let mut outage: Option<Instant> = None;
    let result = loop {
        if job.get("state").and_then(Value::as_str) != Some("running") {
            break Ok(job);
        }
        bar.set_position(number(&job, "percent").unwrap_or(0).min(100));
        bar.set_message(field(&job, "message"));
        std::thread::sleep(POLL_INTERVAL);
        match client.get(&format!("/v1/jobs/{id}")) {
            Ok(next) => {
                outage = None;
                job = next;
            }
            // The API itself said no (the job vanished, the token changed): stop.
            Err(failure) if failure.status.is_some() => {
                break Err(failure);
            }
            // Unreachable (a restart?): keep trying for a while.
            Err(failure) => {
                let since = *outage.get_or_insert_with(Instant::now);
                if since.elapsed() > POLL_OUTAGE {
                    break Err(failure);
                }
                bar.set_message(format!("(API unreachable, retrying) {}", failure.message));
            }
        }
    };
    bar.finish_and_clear();
    result.map_err(|mut failure| {
        let _ = write!(
            failure.message,
            "\n  job {id} may still be running on the appliance: `appliance jobs {id} --wait` \
             follows it"
        );
        failure
    })
}

/// Prints a job (JSON or for people); a failed job becomes a [`Failure`] with its error.
fn finish_job(job: &Value, json: bool) -> Result<(), Failure> {
    show(json, job, render_job);
    if job.get("state").and_then(Value::as_str) == Some("failed") {
        return Err(Failure::machine(format!(
            "job {} ({}) failed: {}",
            field(job, "id"),
            field(job, "kind"),
            field(job, "error")
        )));
    }
    Ok(())
}

/// A `202 JobView` answer: shown, or followed to its end with `--wait`.
fn job_answer(client: &Client, job: Value, wait: bool, json: bool) -> Result<(), Failure> {
    if !wait {
        show(json, &job, render_job);
        return Ok(());
    }
    let job = wait_for_job(client, job)?;
    finish_job(&job, json)
}

/// A `201 Enabled` answer: the item and its token at once (the token is shown only here),
/// then with `--wait` the job followed to its end.
fn enabled_answer(client: &Client, enabled: Value, wait: bool, json: bool) -> Result<(), Failure> {
    show(json, &enabled, render_enabled);
    if !wait {
        return Ok(());
    }
    let job = enabled.get("job").cloned().unwrap_or(Value::Null);
    if !json {
        println!();
    }
    let job = wait_for_job(client, job)?;
    finish_job(&job, json)
}

fn item_path(client: &Client, item: &str, rest: &str) -> Result<String, Failure> {
    Ok(format!("/v1/items/{}{rest}", item_id(client, item)?))
}

/// `appliance item ITEM`.
pub fn show_item(api: &ApiArgs, item: &str) -> Result<(), Failure> {
    let client = Client::from_args(api)?;
    let path = item_path(&client, item, "")?;
    show(api.json, &client.get(&path)?, render_item);
    Ok(())
}

/// `appliance points ITEM`.
pub fn show_points(api: &ApiArgs, item: &str) -> Result<(), Failure> {
    let client = Client::from_args(api)?;
    let path = item_path(&client, item, "/points")?;
    show(api.json, &client.get(&path)?, render_points);
    Ok(())
}

/// Runs a client command. `enable` needs `matches` (the subcommand's own) to keep the order
/// of `--disk` and `--attach`.
pub fn run(command: ClientCommand, matches: Option<&clap::ArgMatches>) -> Result<(), Failure> {
    match command {
        ClientCommand::Status { api } => {
            let client = Client::from_args(&api)?;
            let info = client.get("/v1/appliance")?;
            if api.json {
                print_json(&info);
                return Ok(());
            }
            let slots = client.get("/v1/slots");
            let slots_shown = match &slots {
                Ok(view) => Ok(view),
                Err(failure) => Err(failure.message.lines().next().unwrap_or("")),
            };
            print!("{}", render_status(&info, slots_shown));
            Ok(())
        }
        ClientCommand::Slots { api } => {
            let client = Client::from_args(&api)?;
            show(api.json, &client.get("/v1/slots")?, render_slots);
            Ok(())
        }
        ClientCommand::Items { api } => {
            let client = Client::from_args(&api)?;
            show(api.json, &client.get("/v1/items")?, render_items);
            Ok(())
        }
        ClientCommand::Enable {
            name,
            disks,
            attach,
            keep_points,
            keep_minutes,
            app_minutes,
            temporary_os_disk,
            wait,
            api,
        } => {
            let client = Client::from_args(&api)?;
            let indices = |id: &str| -> Vec<usize> {
                matches
                    .and_then(|m| m.indices_of(id))
                    .map(Iterator::collect)
                    .unwrap_or_default()
            };
            let (new_at, attach_at) = (indices("disks"), indices("attach"));
            // Without indices (a caller without matches), new disks come first.
            let new_at = if new_at.len() == disks.len() {
                new_at
            } else {
                (0..disks.len()).collect()
            };
            let attach_at = if attach_at.len() == attach.len() {
                attach_at
            } else {
                (disks.len()..disks.len() + attach.len()).collect()
            };
            let attach = attach
                .iter()
                .map(|path| absolute(path).map(PathBuf::from))
                .collect::<Result<Vec<_>, _>>()?;
            let ordered = order_disks(
                new_at.into_iter().zip(disks),
                attach_at.into_iter().zip(attach),
            );
            let mut body = Map::new();
            body.insert("name".into(), json!(name));
            body.insert(
                "disks".into(),
                Value::Array(ordered.iter().map(DiskArg::to_json).collect()),
            );
            let mut policy = Map::new();
            for (key, value) in [
                ("keep_points", keep_points),
                ("keep_minutes", keep_minutes),
                ("app_consistent_minutes", app_minutes),
            ] {
                if let Some(value) = value {
                    policy.insert(key.into(), json!(value));
                }
            }
            if !policy.is_empty() {
                body.insert("policy".into(), Value::Object(policy));
            }
            if let Some(path) = temporary_os_disk {
                body.insert("temporary_os_disk".into(), json!(absolute(&path)?));
            }
            let enabled = client.post("/v1/items", Some(&Value::Object(body)))?;
            enabled_answer(&client, enabled, wait, api.json)
        }
        ClientCommand::TestFailover {
            item,
            point,
            target,
            format,
            wait,
            api,
        } => {
            let client = Client::from_args(&api)?;
            let mut body = json!({ "point": point.to_json(), "target_dir": absolute(&target)? });
            if let Some(format) = format {
                body["format"] = json!(format.as_str());
            }
            let path = item_path(&client, &item, "/test-failover")?;
            let job = client.post(&path, Some(&body))?;
            job_answer(&client, job, wait, api.json)
        }
        ClientCommand::TestFailoverCleanup { item, api } => {
            let client = Client::from_args(&api)?;
            let path = item_path(&client, &item, "/test-failover/cleanup")?;
            show(api.json, &client.post(&path, None)?, render_item);
            Ok(())
        }
        ClientCommand::Failover {
            item,
            point,
            target,
            format,
            source_shut_down,
            wait,
            api,
        } => {
            let client = Client::from_args(&api)?;
            let mut body = json!({
                "point": point.to_json(),
                "target_dir": absolute(&target)?,
                "source_shut_down": source_shut_down,
            });
            if let Some(format) = format {
                body["format"] = json!(format.as_str());
            }
            let path = item_path(&client, &item, "/failover")?;
            let job = client.post(&path, Some(&body))?;
            job_answer(&client, job, wait, api.json)
        }
        ClientCommand::ChangePoint {
            item,
            point,
            wait,
            api,
        } => {
            let client = Client::from_args(&api)?;
            let path = item_path(&client, &item, "/change-point")?;
            let job = client.post(&path, Some(&json!({ "point": point.to_json() })))?;
            job_answer(&client, job, wait, api.json)
        }
        ClientCommand::Commit { item, api } => {
            let client = Client::from_args(&api)?;
            let path = item_path(&client, &item, "/commit")?;
            show(api.json, &client.post(&path, None)?, render_item);
            Ok(())
        }
        ClientCommand::Reprotect {
            item,
            disks,
            temporary_os_disk,
            name,
            wait,
            api,
        } => {
            let client = Client::from_args(&api)?;
            let disks = disks
                .iter()
                .map(|path| absolute(path))
                .collect::<Result<Vec<_>, _>>()?;
            let mut body = json!({ "disks": disks });
            if let Some(path) = temporary_os_disk {
                body["temporary_os_disk"] = json!(absolute(&path)?);
            }
            if let Some(name) = name {
                body["name"] = json!(name);
            }
            let path = item_path(&client, &item, "/reprotect")?;
            let enabled = client.post(&path, Some(&body))?;
            enabled_answer(&client, enabled, wait, api.json)
        }
        ClientCommand::Failback { item, wait, api } => {
            let client = Client::from_args(&api)?;
            let path = item_path(&client, &item, "/failback")?;
            let job = client.post(&path, None)?;
            job_answer(&client, job, wait, api.json)
        }
        ClientCommand::Resync { item, wait, api } => {
            let client = Client::from_args(&api)?;
            let path = item_path(&client, &item, "/resync")?;
            let job = client.post(&path, None)?;
            job_answer(&client, job, wait, api.json)
        }
        ClientCommand::Disable { item, api } => {
            let client = Client::from_args(&api)?;
            let path = item_path(&client, &item, "")?;
            show(api.json, &client.delete(&path)?, render_item);
            Ok(())
        }
        ClientCommand::Jobs { job, wait, api } => {
            let client = Client::from_args(&api)?;
            match job {
                None => {
                    show(api.json, &client.get("/v1/jobs")?, render_jobs);
                    Ok(())
                }
                Some(id) => {
                    let job = client.get(&format!("/v1/jobs/{id}"))?;
                    job_answer(&client, job, wait, api.json)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn point_specs_become_strings_or_integers() {
        assert_eq!(
            parse_point("latest").map(PointSpec::to_json),
            Ok(json!("latest"))
        );
        assert_eq!(
            parse_point("latest-processed").map(PointSpec::to_json),
            Ok(json!("latest-processed"))
        );
        assert_eq!(
            parse_point("latest-app").map(PointSpec::to_json),
            Ok(json!("latest-app"))
        );
        assert_eq!(parse_point("2000").map(PointSpec::to_json), Ok(json!(2000)));
        assert_eq!(
            parse_point("18446744073709551615").map(PointSpec::to_json),
            Ok(json!(u64::MAX))
        );
        assert!(
            parse_point("2000")
                .map(PointSpec::to_json)
                .expect("id")
                .is_u64()
        );
        for bad in [
            "",
            "newest",
            "-1",
            "1.5",
            "Latest",
            "0x10",
            "18446744073709551616",
        ] {
            let error = parse_point(bad).expect_err(bad);
            assert!(error.contains("latest-app"), "{bad}: {error}");
        }
    }

    #[test]
    fn disk_specs_and_their_order() {
        assert_eq!(
            parse_new_disk("1024").map(|d| d.to_json()),
            Ok(json!({"size_mib": 1024}))
        );
        assert_eq!(
            parse_new_disk("64:512").map(|d| d.to_json()),
            Ok(json!({"size_mib": 64, "block_size_bytes": 512}))
        );
        for bad in ["", "0", "x", "64:1024", "64:", "-5"] {
            assert!(parse_new_disk(bad).is_err(), "{bad}");
        }
        // `--attach /a --disk 10 --attach /b --disk 20`: indices 1, 3, 5, 7.
        let new = vec![
            (3, parse_new_disk("10").expect("disk")),
            (7, parse_new_disk("20").expect("disk")),
        ];
        let attach = vec![(1, PathBuf::from("/a")), (5, PathBuf::from("/b"))];
        let ordered: Vec<Value> = order_disks(new, attach)
            .iter()
            .map(DiskArg::to_json)
            .collect();
        assert_eq!(
            ordered,
            vec![
                json!({"path": "/a"}),
                json!({"size_mib": 10}),
                json!({"path": "/b"}),
                json!({"size_mib": 20}),
            ]
        );
    }

    #[test]
    fn tables_are_aligned_without_trailing_blanks() {
        let table = render_table(
            &["ID", "NAME", "STATE"],
            &[
                vec!["1".into(), "web-01".into(), "protected".into()],
                vec!["22".into(), "db".into(), "".into()],
                vec!["333".into()],
            ],
        );
        assert_eq!(
            table,
            "ID   NAME    STATE\n\
             1    web-01  protected\n\
             22   db\n\
             333\n"
        );
        // Width counts characters, not bytes.
        let table = render_table(&["A", "B"], &[vec!["é…".into(), "x".into()]]);
        assert_eq!(table, "A   B\né…  x\n");
    }

    #[test]
    fn items_table_from_item_views() {
        let items = json!([
            {"id": "3f000000000000000000000000000001", "name": "web-01", "state": "protected",
             "synchronized_percent": 100, "rpo_lag_ms": 1500, "cache_used_bytes": 1048576,
             "cache_capacity_bytes": 2147483648u64, "points": 42, "health": "healthy",
             "unexpected": {"nested": true}},
            {"id": "3f000000000000000000000000000002", "name": "db", "state": "initial_replication",
             "synchronized_percent": 7, "points": 0, "health": "healthy"},
            "not an object",
        ]);
        let table = render_items(&items);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert!(lines[0].starts_with("ID "), "{table}");
        for header in [
            "NAME", "STATE", "SYNC%", "RPO LAG", "CACHE", "POINTS", "HEALTH",
        ] {
            assert!(lines[0].contains(header), "{table}");
        }
        assert!(lines[1].contains("1.5 s"), "{table}");
        assert!(lines[1].contains("1.0 MiB/2.0 GiB (0%)"), "{table}");
        assert!(lines[2].contains("7%"), "{table}");
        // Columns line up: NAME starts at the same offset on every line.
        let at = lines[0].find("NAME").expect("NAME");
        assert_eq!(&lines[1][at..at + 6], "web-01");
        assert_eq!(&lines[2][at..at + 2], "db");
        assert_eq!(render_items(&json!([])), "no items\n");
        assert_eq!(render_items(&json!({"odd": 1})), "no items\n");
    }

    #[test]
    fn other_views_tolerate_odd_json() {
        for odd in [
            json!(null),
            json!(1),
            json!("x"),
            json!([]),
            json!({}),
            json!([1, null]),
        ] {
            let _ = render_slots(&odd);
            let _ = render_item(&odd);
            let _ = render_points(&odd);
            let _ = render_job(&odd);
            let _ = render_jobs(&odd);
            let _ = render_enabled(&odd);
            let _ = render_status(&odd, Ok(&odd));
        }
    }

    #[test]
    fn points_and_slots_tables() {
        let points = json!([
            {"id": 2000, "consistency": "app", "origin": "bookmark", "bookmark_id": 40,
             "source_timestamp_ns": 1_700_000_000_000_000_000u64, "processed_at_ns": 1, "label": "nightly"},
            {"id": 2100, "consistency": "crash", "origin": "latest", "source_timestamp_ns": 0, "label": ""},
        ]);
        let table = render_points(&points);
        assert!(
            table.starts_with("ID    CONSISTENCY  ORIGIN    SOURCE TIME           LABEL\n"),
            "{table}"
        );
        assert!(
            table.contains("2000  app          bookmark  2023-11-14 22:13:20Z  nightly\n"),
            "{table}"
        );
        assert!(
            table.contains("2100  crash        latest    -\n"),
            "{table}"
        );
        let slots = json!({"slot_count": 4, "usable": 3, "free": 1, "reserved": 1, "attached": 1,
        "slots": [
            {"lun": 0, "state": "appliance"},
            {"lun": 1, "state": "attached", "item": "ab", "disk_index": 0, "path": "/srv/a.raw"},
        ]});
        let text = render_slots(&slots);
        assert!(
            text.starts_with("4 slots (3 usable): 1 free, 1 reserved, 1 attached\n"),
            "{text}"
        );
        assert!(text.contains("0    appliance  -     -     -\n"), "{text}");
        assert!(
            text.contains("1    attached   ab    0     /srv/a.raw\n"),
            "{text}"
        );
    }

    #[test]
    fn wrong_state_errors_show_state_and_operations() {
        let body = r#"{"error": {"code": "wrong_state",
            "message": "item 3f is failed_over; test-failover needs protected",
            "state": "failed_over", "allowed_operations": ["change-point", "commit", "disable"]}}"#;
        let failure = api_failure(409, body);
        assert_eq!(failure.exit, EXIT_BAD_INPUT);
        assert_eq!(
            failure.message,
            "item 3f is failed_over; test-failover needs protected (HTTP 409 wrong_state)\n  \
             state: failed_over\n  allowed operations: change-point, commit, disable"
        );
        let none = r#"{"error": {"code": "wrong_state", "message": "busy", "state": "failing_over",
            "allowed_operations": []}}"#;
        assert!(describe_api_error(409, none).ends_with("allowed operations: none"));
    }

    #[test]
    fn other_errors_and_exit_statuses() {
        let slots = r#"{"error": {"code": "not_enough_slots", "message": "3 slots needed, 2 free",
            "needed": 3, "free": 2}}"#;
        assert_eq!(
            describe_api_error(409, slots),
            "3 slots needed, 2 free (HTTP 409 not_enough_slots)\n  slots needed: 3\n  slots free: 2"
        );
        let field =
            r#"{"error": {"code": "bad_request", "message": "name is empty", "field": "name"}}"#;
        assert_eq!(
            describe_api_error(400, field),
            "name is empty (HTTP 400 bad_request)\n  field: name"
        );
        let unauthorized = api_failure(
            401,
            r#"{"error":{"code":"unauthorized","message":"wrong API token"}}"#,
        );
        assert_eq!(unauthorized.exit, EXIT_FAILURE);
        assert!(
            unauthorized
                .message
                .starts_with("wrong API token (HTTP 401 unauthorized)\n  hint:")
        );
        assert_eq!(
            api_failure(500, r#"{"error":{"code":"io_error","message":"disk"}}"#).exit,
            EXIT_FAILURE
        );
        for status in [400, 403, 404, 409] {
            assert_eq!(exit_for_status(status), EXIT_BAD_INPUT, "{status}");
        }
        for status in [401, 405, 413, 500, 502, 503] {
            assert_eq!(exit_for_status(status), EXIT_FAILURE, "{status}");
        }
        // Not the API's shape: never a panic, still a useful line.
        assert_eq!(
            describe_api_error(502, "Bad Gateway\n"),
            "Bad Gateway (HTTP 502)"
        );
        assert_eq!(
            describe_api_error(503, ""),
            "the API answered HTTP 503 (service unavailable)"
        );
        assert_eq!(
            describe_api_error(404, r#"{"error": "nope"}"#),
            r#"{"error": "nope"} (HTTP 404)"#
        );
        assert_eq!(
            describe_api_error(404, r#"{"error": {"message": 5}}"#),
            "not found (HTTP 404)"
        );
        let many = describe_api_error(
            409,
            r#"{"error": {"code": "x", "message": "m", "state": 3, "allowed_operations": "odd"}}"#,
        );
        assert_eq!(
            many,
            "m (HTTP 409 x)\n  state: 3\n  allowed operations: none"
        );
    }

    #[test]
    fn items_are_found_by_id_prefix_or_name() {
        let items = json!([
            {"id": "3f2a0000000000000000000000000001", "name": "web-01", "state": "protected"},
            {"id": "3f2b0000000000000000000000000002", "name": "db", "state": "protected"},
            {"id": "77000000000000000000000000000003", "name": "db", "state": "disabled"},
        ]);
        let full = "3F2A0000000000000000000000000001";
        assert_eq!(
            match_item(&Value::Null, full),
            Ok(full.to_ascii_lowercase())
        );
        assert_eq!(
            match_item(&items, "web-01"),
            Ok("3f2a0000000000000000000000000001".into())
        );
        assert_eq!(
            match_item(&items, "3f2b"),
            Ok("3f2b0000000000000000000000000002".into())
        );
        assert!(match_item(&items, "3f2").is_err(), "too short a prefix");
        assert!(match_item(&items, "3f2").is_err());
        let ambiguous = match_item(&items, "db").expect_err("two items named db");
        assert!(ambiguous.contains("2 items"), "{ambiguous}");
        assert!(match_item(&items, "nope").is_err());
        assert!(match_item(&json!({"odd": true}), "web-01").is_err());
    }

    #[test]
    fn durations_bytes_and_times() {
        assert_eq!(format_millis(850), "850 ms");
        assert_eq!(format_millis(12_345), "12.3 s");
        assert_eq!(format_millis(245_000), "4 min 05 s");
        assert_eq!(format_millis(7_380_000), "2 h 03 min");
        assert_eq!(format_millis(273_600_000), "3 d 04 h");
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(2 << 30), "2.0 GiB");
        assert_eq!(format_bytes(u64::MAX), "16.0 EiB");
        assert_eq!(format_time_ns(0), "-");
        assert_eq!(format_time_ns(1_000_000_000), "1970-01-01 00:00:01Z");
        assert_eq!(
            format_time_ns(951_782_400_000_000_000),
            "2000-02-29 00:00:00Z"
        );
        assert_eq!(
            format_time_ns(1_795_307_933_000_000_000),
            "2026-11-22 00:38:53Z"
        );
        let _ = format_time_ns(u64::MAX);
    }

    #[test]
    fn base_urls() {
        assert_eq!(
            normalize_base("http://127.0.0.1:7400/"),
            Ok("http://127.0.0.1:7400".into())
        );
        assert_eq!(
            normalize_base("10.0.0.5:7400"),
            Ok("http://10.0.0.5:7400".into())
        );
        assert!(normalize_base("https://x:1").is_err());
        assert!(normalize_base("ftp://x").is_err());
        assert!(normalize_base(" ").is_err());
    }

    #[test]
    fn connection_refused_names_the_url() {
        // A port nothing listens on: bind one, then close it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        let client = Client::new(&format!("http://127.0.0.1:{port}"), None).expect("client");
        let failure = client.get("/v1/appliance").expect_err("nothing listens");
        assert_eq!(failure.exit, EXIT_FAILURE);
        assert!(
            failure
                .message
                .contains(&format!("http://127.0.0.1:{port}")),
            "{}",
            failure.message
        );
        assert!(
            failure.message.contains("connection refused"),
            "{}",
            failure.message
        );
    }

    #[test]
    fn the_http_layer_against_a_canned_server() {
        use std::io::{BufRead as _, BufReader, Read as _, Write as _};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for (status, body) in [
                (
                    "202 Accepted",
                    r#"{"id":7,"kind":"failover","state":"running"}"#,
                ),
                (
                    "409 Conflict",
                    r#"{"error":{"code":"job_running","message":"job 7 running"}}"#,
                ),
            ] {
                let answer = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let (stream, _) = listener.accept().expect("accept");
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let mut head = String::new();
                let mut length = 0usize;
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line).expect("line");
                    if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = value.trim().parse().expect("length");
                    }
                    head.push_str(&line);
                    if line == "\r\n" || line.is_empty() {
                        break;
                    }
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).expect("body");
                seen.push((head, String::from_utf8(body).expect("utf8")));
                let mut stream = stream;
                stream.write_all(answer.as_bytes()).expect("answer");
            }
            seen
        });
        let client = Client::new(&format!("{addr}"), Some("ab".repeat(32))).expect("client");
        let body = json!({"point": PointSpec::Id(5).to_json(), "target_dir": "/srv/t"});
        let job = client
            .post(
                "/v1/items/3f2a0000000000000000000000000001/failover",
                Some(&body),
            )
            .expect("202");
        assert_eq!(job["id"], json!(7));
        let failure = client
            .post(
                "/v1/items/3f2a0000000000000000000000000001/failover",
                Some(&body),
            )
            .expect_err("409");
        assert_eq!(failure.exit, EXIT_BAD_INPUT);
        assert_eq!(failure.message, "job 7 running (HTTP 409 job_running)");
        let seen = server.join().expect("server");
        let (head, sent) = &seen[0];
        assert!(
            head.starts_with(
                "POST /v1/items/3f2a0000000000000000000000000001/failover HTTP/1.1\r\n"
            ),
            "{head}"
        );
        assert!(
            head.to_ascii_lowercase()
                .contains(&format!("authorization: bearer {}", "ab".repeat(32))),
            "{head}"
        );
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: application/json"),
            "{head}"
        );
        assert_eq!(serde_json::from_str::<Value>(sent).expect("json"), body);
    }
}
