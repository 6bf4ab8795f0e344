//! The item manager: every protected item's record and state machine, its replication (staging
//! log + apply worker), the slot table, and the jobs that move items between states. The
//! control API (`crate::api`) and the data port (`crate::dataport`, through [`ItemRegistry`])
//! both go through it; `docs/design/control-api.md` is the user-facing description.
//!
//! ```text
//!  DATA_DIR/items/<id>/item.json   the item's record (state, disks, policy, failover result)
//!  DATA_DIR/slots/                 the slot table (crate::slots)
//!  DATA_DIR/jobs/<n>.json          jobs (crate::jobs)
//! ```
//!
//! Invariants:
//! - **The record is the truth about ownership.** A state change is written (write-temp,
//!   fsync, rename, fsync-dir) before anything that depends on it happens, and at start the
//!   slot table is reconciled with the records: slots attached to an item whose record does
//!   not hold slots are released, and a disk of a slot-holding record without a slot gets one.
//!   So no crash between a slot commit and a record write can leak or double-book a slot.
//! - **One lifecycle operation at a time.** The synchronous part of every operation (checks,
//!   state change, job start) runs under one lock (`ops`); jobs do their long work outside it
//!   and take it again for their final state change.
//! - **Only replicating states accept streams.** The state is changed before sessions are
//!   ended, so an agent's reconnect is refused (`not-replicating`) instead of racing the
//!   drain.
//! - **Transient states never survive a restart.** An item found in `failing_over`,
//!   `failing_back` or a `test_failover` without a result is returned to the state before,
//!   its partial files removed, and its job failed with the reason.
//! - **Start-up never stops on one item.** An item directory a crash during enable left (the
//!   `enabling` marker, or no header, and no record) is rolled back; an item whose record or
//!   header is damaged, or whose recovery fails, is quarantined (state `quarantined` in
//!   memory only, never written; its slots kept; only disable allowed); see
//!   `docs/design/control-api.md`, "Restart and quarantine".

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileTypeExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use engine::apply::{ApplyConfig, Pins};
use engine::delta::{Consistency, DiskGeometry, StreamHeader};
use engine::dirfd::Dir;
use engine::durable::StdDir;
use engine::io::{DirectIo, ReplicaFile};
use engine::materialize::{OutputFormat, PointChoice, Source, materialize_new_file, resolve_point};
use engine::meta::{MetaStore, item_key};
use engine::port::{Refusal, Status};
use engine::replica::open_replica;
use engine::staging::{StagingConfig, StagingLog, StagingReader};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::daemon::ServeOptions;
use crate::dataport::{
    ItemRegistry, PortHandle, ReplicaAccess, SessionLease, StreamSession, tokens_equal,
};
use crate::jobs::{Job, JobKind, JobView, Jobs};
use crate::runtime::{ApplyOptions, ApplyWorker, WorkerStatus};
use crate::slots::{DiskRequest, ItemId, SlotError, SlotState, SlotTable};
use crate::store::{DataDir, ItemDirs, item_hex, now_ns, parse_item_hex, write_atomic};
use crate::target::{
    FileIdentity, Target, Temp, WrittenFile, check_absent, dir_refusal, disk_names, partial_name,
};

/// Name of an item's record file.
const RECORD_FILE: &str = "item.json";
/// Name of an item's stream-token file (mode 0600).
const TOKEN_FILE: &str = "token";
/// Longest wait for an item's streaming session to end after it was told to.
const SESSION_END_WAIT: Duration = Duration::from_secs(40);
/// Longest wait for apply to catch up with staging (before hashing, before a resync).
const CATCH_UP_WAIT: Duration = Duration::from_secs(60);
/// Most disks per item (the stream format allows more; one VM rarely has more than 64).
const MAX_ITEM_DISKS: usize = 64;
/// Longest item name, in characters (at most 4 bytes each: within the stream header's 255).
pub const MAX_NAME_CHARS: usize = 63;
/// Longest a graceful shutdown waits for running jobs that write files.
const JOB_STOP_WAIT: Duration = Duration::from_secs(120);
/// The supervisor's period.
const TICK: Duration = Duration::from_millis(100);

// ───────────────────────────── records ─────────────────────────────

/// Where an item is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ItemState {
    /// Enabled; the first full copy is on its way (until the first recovery point).
    InitialReplication,
    /// A re-protect's delta resync is on its way (until its first recovery point).
    Reprotecting,
    /// Replicating, with recovery points.
    Protected,
    /// Protected, and disks at a point were (or are being) written for a test.
    TestFailover,
    /// A delta resync asked for by the operator is on its way.
    Resyncing,
    /// Failover or change point running.
    FailingOver,
    /// Failed over: the disks at the chosen point are in the target directory.
    FailedOver,
    /// The failover is final.
    Committed,
    /// A reverse item protects the failed-over VM now.
    Reprotected,
    /// Failback running.
    FailingBack,
    /// Failed back: the disks were handed back to the original VM.
    FailedBack,
    /// Protection disabled.
    Disabled,
    /// Found damaged at start (its record, header or files): not served, its slots kept;
    /// see the item's `quarantine` for why and what to do. Never written to a record.
    Quarantined,
}

impl ItemState {
    /// Snake-case name.
    pub fn name(self) -> &'static str {
        match self {
            Self::InitialReplication => "initial_replication",
            Self::Reprotecting => "reprotecting",
            Self::Protected => "protected",
            Self::TestFailover => "test_failover",
            Self::Resyncing => "resyncing",
            Self::FailingOver => "failing_over",
            Self::FailedOver => "failed_over",
            Self::Committed => "committed",
            Self::Reprotected => "reprotected",
            Self::FailingBack => "failing_back",
            Self::FailedBack => "failed_back",
            Self::Disabled => "disabled",
            Self::Quarantined => "quarantined",
        }
    }

    /// Whether the item takes frames from its agent.
    pub fn replicating(self) -> bool {
        matches!(
            self,
            Self::InitialReplication
                | Self::Reprotecting
                | Self::Protected
                | Self::TestFailover
                | Self::Resyncing
        )
    }

    /// Whether the item's disks occupy slots.
    pub fn holds_slots(self) -> bool {
        !matches!(self, Self::FailedBack | Self::Disabled)
    }

    /// The replication job that ends this state (initial sync, re-protect, resync), if any.
    pub fn sync_job_kind(self) -> Option<JobKind> {
        match self {
            Self::InitialReplication => Some(JobKind::InitialReplication),
            Self::Reprotecting => Some(JobKind::Reprotect),
            Self::Resyncing => Some(JobKind::Resync),
            _ => None,
        }
    }
}

impl std::fmt::Display for ItemState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A lifecycle operation, as the API names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Disks at a point for a test.
    TestFailover,
    /// Remove the test disks.
    TestFailoverCleanup,
    /// Fail over.
    Failover,
    /// Another point for the failed-over disks.
    ChangePoint,
    /// Make the failover final.
    Commit,
    /// Protect the failed-over VM back to the original disks.
    Reprotect,
    /// Planned failover back to the original VM.
    Failback,
    /// Delta resync.
    Resync,
    /// Disable protection.
    Disable,
}

impl Op {
    /// The API's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::TestFailover => "test-failover",
            Self::TestFailoverCleanup => "test-failover-cleanup",
            Self::Failover => "failover",
            Self::ChangePoint => "change-point",
            Self::Commit => "commit",
            Self::Reprotect => "reprotect",
            Self::Failback => "failback",
            Self::Resync => "resync",
            Self::Disable => "disable",
        }
    }
}

/// Where a replica disk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DiskOrigin {
    /// Created by the appliance in the item's directory (deleted on disable).
    Created,
    /// An existing disk attached by path (never deleted by the appliance).
    Attached,
}

/// One replica disk of an item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DiskRecord {
    /// Disk index (0 = OS disk).
    pub index: u32,
    /// Size.
    pub size_bytes: u64,
    /// Logical block size.
    pub block_size_bytes: u32,
    /// The replica file or block device.
    pub path: String,
    /// Created or attached.
    pub origin: DiskOrigin,
}

/// Retention and consistency policy of an item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Policy {
    /// Recovery points kept (oldest pruned first).
    pub keep_points: u64,
    /// Points older than this many minutes are pruned; 0 for no age limit.
    pub keep_minutes: u64,
    /// How often the source is asked for an app-consistent point, in minutes (shown to the
    /// agent's operator; the agent decides when to send bookmarks).
    pub app_consistent_minutes: u64,
}

/// Replication direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Protects a VM's disks to this appliance.
    Forward,
    /// Re-protect: the failed-over VM replicates back into the original VM's disks.
    Reverse,
}

/// Image format of written disks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// Raw, sparse.
    #[default]
    Raw,
    /// Fixed VHD (Hyper-V, Azure).
    Vhd,
}

impl Format {
    fn output(self) -> OutputFormat {
        match self {
            Self::Raw => OutputFormat::Raw,
            Self::Vhd => OutputFormat::FixedVhd,
        }
    }
}

/// Disks written at a point (test failover, failover).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Materialized {
    /// The recovery point.
    pub point_id: u64,
    /// Where the files are.
    pub target_dir: String,
    /// Their format.
    pub format: Format,
    /// The files, by disk index.
    pub files: Vec<String>,
    /// Whether the job created the target directory (removed on clean-up if it is then
    /// empty).
    pub created_dir: bool,
    /// The target directory's identity when the job opened it: clean-up acts only on that
    /// directory (absent in records of older versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_dir_id: Option<FileIdentity>,
    /// The files the job created in the directory, by name and identity: clean-up removes
    /// only these, change point replaces only these. A running job lists its temporary
    /// (`.partial`) files here.
    #[serde(default)]
    pub written: Vec<WrittenFile>,
}

/// Why an item was quarantined at start, and what the operator can do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Quarantine {
    /// What is damaged, naming the file.
    pub reason: String,
    /// What the operator should do.
    pub action: String,
    /// The state its record held, when the record could be read.
    pub recorded_state: Option<ItemState>,
}

/// An item's durable record (`item.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ItemRecord {
    /// Format version of this record (1).
    pub version: u32,
    /// Item id, 32 hex digits.
    pub id: String,
    /// Name.
    pub name: String,
    /// Lifecycle state.
    pub state: ItemState,
    /// Direction.
    pub role: Role,
    /// The item this one re-protects.
    pub reverse_of: Option<String>,
    /// The item that re-protects this one.
    pub reversed_by: Option<String>,
    /// Replica disks.
    pub disks: Vec<DiskRecord>,
    /// Policy.
    pub policy: Policy,
    /// The temporary OS disk made for the original VM by a re-protect.
    pub temporary_os_disk: Option<String>,
    /// The test failover's disks.
    pub test_failover: Option<Materialized>,
    /// The failover's disks.
    pub failover: Option<Materialized>,
    /// Disks a running job is writing (removed if the job is interrupted).
    pub pending: Option<Materialized>,
    /// The sync in progress ends with the first point whose id is at least this.
    pub sync_from_seq: u64,
    /// The newest job on this item.
    pub last_job: Option<u64>,
    /// The last job's error, if it failed.
    pub last_error: Option<String>,
    /// Created, ns since the Unix epoch.
    pub created_ns: u64,
    /// Last changed, ns since the Unix epoch.
    pub updated_ns: u64,
}

impl ItemRecord {
    /// The operations allowed now.
    pub fn allowed(&self) -> Vec<Op> {
        use ItemState as S;
        match self.state {
            S::InitialReplication | S::Reprotecting | S::Resyncing => vec![Op::Disable],
            S::Protected => {
                let mut ops = vec![Op::TestFailover, Op::Failover, Op::Resync];
                if self.disks.iter().all(|d| d.origin == DiskOrigin::Attached) {
                    ops.push(Op::Failback);
                }
                ops.push(Op::Disable);
                ops
            }
            S::TestFailover if self.test_failover.is_some() => {
                vec![Op::TestFailoverCleanup, Op::Disable]
            }
            S::TestFailover | S::FailingOver | S::FailingBack | S::Disabled => vec![],
            S::FailedOver => vec![Op::ChangePoint, Op::Commit, Op::Disable],
            S::Committed => vec![Op::Reprotect, Op::Disable],
            S::Reprotected | S::FailedBack | S::Quarantined => vec![Op::Disable],
        }
    }

    fn geometries(&self) -> Vec<DiskGeometry> {
        self.disks
            .iter()
            .map(|d| DiskGeometry {
                size_bytes: d.size_bytes,
                block_size_bytes: d.block_size_bytes,
            })
            .collect()
    }
}

// ───────────────────────────── errors ─────────────────────────────

/// Why an operation was refused or failed; the API maps each to a status.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// 400: the request is malformed.
    #[error("{message}")]
    BadRequest {
        /// `bad_request`, or `bad_item_id` for a malformed id in the path.
        code: &'static str,
        /// The field at fault.
        field: Option<String>,
        /// What is wrong.
        message: String,
    },
    /// 403: a path outside the allowed directories.
    #[error("{message}")]
    PathRefused {
        /// The field.
        field: String,
        /// Why.
        message: String,
    },
    /// 404.
    #[error("{message}")]
    NotFound {
        /// `item_not_found`, `job_not_found`, `point_not_found`.
        code: &'static str,
        /// What was not found.
        message: String,
    },
    /// 409: the item's state does not allow the operation.
    #[error("item {item} is {state}; {op} is not allowed (allowed: {})", allowed_list(.allowed))]
    WrongState {
        /// Item id.
        item: String,
        /// Its state.
        state: ItemState,
        /// The operation asked for.
        op: &'static str,
        /// What is allowed.
        allowed: Vec<&'static str>,
    },
    /// 409: not enough free slots.
    #[error("needs {needed} free data-disk slots, {free} are free; nothing was changed")]
    NotEnoughSlots {
        /// Slots needed.
        needed: usize,
        /// Slots free.
        free: usize,
    },
    /// 409: another conflict.
    #[error("{message}")]
    Conflict {
        /// `path_in_use`, `target_dir_busy`, `target_changed`, `job_running`,
        /// `too_many_jobs`, `disk_mismatch`.
        code: &'static str,
        /// What conflicts.
        message: String,
    },
    /// 500: a real I/O failure.
    #[error("{0}")]
    Io(String),
}

fn allowed_list(allowed: &[&'static str]) -> String {
    if allowed.is_empty() {
        "none while its job runs".into()
    } else {
        allowed.join(", ")
    }
}

impl From<anyhow::Error> for OpError {
    fn from(error: anyhow::Error) -> Self {
        Self::Io(crate::store::describe(&error))
    }
}

fn bad(field: impl Into<String>, message: impl Into<String>) -> OpError {
    let field = field.into();
    OpError::BadRequest {
        code: "bad_request",
        message: format!("{field}: {}", message.into()),
        field: Some(field),
    }
}

// ───────────────────────────── requests ─────────────────────────────

/// A disk of an enable request: `size_mib` to create one, or `path` to attach one. Its
/// OpenAPI schema (`oneOf` the two forms) is written by hand in `crate::api::schema`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// Create a new replica disk of this size.
    #[serde(default, deserialize_with = "crate::api::number::opt_u64_integral")]
    pub size_mib: Option<u64>,
    /// Attach this existing disk (file or block device).
    pub path: Option<String>,
    /// 512 or 4096 (default 4096).
    pub block_size_bytes: Option<u32>,
}

/// Policy fields of a request (defaults from the appliance's settings).
#[derive(Debug, Clone, Copy, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyRequest {
    /// Recovery points kept, 1..=100000.
    #[schema(minimum = 1, maximum = 100_000)]
    #[serde(default, deserialize_with = "crate::api::number::opt_u64_integral")]
    pub keep_points: Option<u64>,
    /// Age limit of points in minutes (0 = none), at most a year (527040).
    #[schema(minimum = 0, maximum = 527_040)]
    #[serde(default, deserialize_with = "crate::api::number::opt_u64_integral")]
    pub keep_minutes: Option<u64>,
    /// App-consistent point frequency in minutes (informational), 1..=1440.
    #[schema(minimum = 1, maximum = 1440)]
    #[serde(default, deserialize_with = "crate::api::number::opt_u64_integral")]
    pub app_consistent_minutes: Option<u64>,
}

/// Enable protection.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnableRequest {
    /// A name for people: 1..=63 characters, no control characters, not only white space
    /// (stored trimmed).
    #[schema(
        min_length = 1,
        max_length = 63,
        pattern = r"^[^\u0000-\u001f\u007f-\u009f]*[^\u0000-\u0020\u007f-\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000][^\u0000-\u001f\u007f-\u009f]*$"
    )]
    pub name: String,
    /// OS disk first.
    #[schema(min_items = 1, max_items = 64)]
    pub disks: Vec<DiskSpec>,
    /// Retention policy.
    #[serde(default)]
    pub policy: Option<PolicyRequest>,
    /// Re-protect style: create a temporary 1 GiB fixed VHD here for the original VM.
    #[serde(default)]
    #[schema(schema_with = crate::api::schema::optional_path)]
    pub temporary_os_disk: Option<String>,
}

/// A recovery point choice: `"latest"`, `"latest-processed"`, `"latest-app"` or a point id.
/// Its OpenAPI schemas (with and without `"latest"`) are in `crate::api::schema`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PointSpec {
    /// A point id.
    Id(#[serde(deserialize_with = "crate::api::number::u64_integral")] u64),
    /// A named choice.
    Named(String),
}

impl PointSpec {
    fn choice(&self, latest_allowed: bool) -> Result<PointChoice, OpError> {
        match self {
            Self::Id(id) => Ok(PointChoice::Custom(*id)),
            Self::Named(name) => match name.as_str() {
                "latest" if latest_allowed => Ok(PointChoice::Latest),
                "latest" => Err(bad(
                    "point",
                    "\"latest\" applies everything received and makes a point of it; it is \
                     for failover only (use \"latest-processed\")",
                )),
                "latest-processed" => Ok(PointChoice::LatestProcessed),
                "latest-app" | "latest-app-consistent" => Ok(PointChoice::LatestAppConsistent),
                other => other.parse().map(PointChoice::Custom).map_err(|_| {
                    bad(
                        "point",
                        format!(
                            "{other:?} is not \"latest\", \"latest-processed\", \"latest-app\" \
                             or a point id"
                        ),
                    )
                }),
            },
        }
    }
}

/// Test failover.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MaterializeRequest {
    /// The point.
    #[schema(schema_with = crate::api::schema::point_processed)]
    pub point: PointSpec,
    /// Directory for the disks (created if missing).
    #[schema(schema_with = crate::api::schema::path)]
    pub target_dir: String,
    /// Image format.
    #[serde(default)]
    pub format: Format,
}

/// Failover.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FailoverRequest {
    /// The point.
    #[schema(schema_with = crate::api::schema::point_or_latest)]
    pub point: PointSpec,
    /// Directory for the disks (created if missing).
    #[schema(schema_with = crate::api::schema::path)]
    pub target_dir: String,
    /// Image format.
    #[serde(default)]
    pub format: Format,
    /// The operator says the source VM is already shut down (nothing more will arrive).
    #[serde(default)]
    pub source_shut_down: bool,
}

/// Change the failover's point.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangePointRequest {
    /// The point.
    #[schema(schema_with = crate::api::schema::point_processed)]
    pub point: PointSpec,
}

/// Re-protect.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReprotectRequest {
    /// The original VM's OS + data disks, in the item's disk order (absolute paths).
    #[schema(schema_with = crate::api::schema::reprotect_disks)]
    pub disks: Vec<String>,
    /// Where to create the temporary 1 GiB OS disk (default beside `disks[0]`).
    #[serde(default)]
    #[schema(schema_with = crate::api::schema::optional_path)]
    pub temporary_os_disk: Option<String>,
    /// Name of the reverse item (default `<name>-reverse`), as `EnableRequest.name`.
    #[serde(default)]
    #[schema(schema_with = crate::api::schema::optional_name)]
    pub name: Option<String>,
}

// ───────────────────────────── views ─────────────────────────────

/// A replica disk as the API shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DiskView {
    /// Disk index (0 = OS disk).
    pub index: u32,
    /// Size.
    pub size_bytes: u64,
    /// Logical block size.
    pub block_size_bytes: u32,
    /// The replica file or block device.
    pub path: String,
    /// Its slot, while attached.
    pub lun: Option<u32>,
    /// Created or attached.
    pub origin: DiskOrigin,
}

/// An item as the API shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ItemView {
    /// Item id, 32 hex digits.
    pub id: String,
    /// Name.
    pub name: String,
    /// Lifecycle state.
    pub state: ItemState,
    /// Operations allowed now.
    pub allowed_operations: Vec<&'static str>,
    /// Direction.
    pub role: Role,
    /// The item this one re-protects.
    pub reverse_of: Option<String>,
    /// The item that re-protects this one.
    pub reversed_by: Option<String>,
    /// Replica disks.
    pub disks: Vec<DiskView>,
    /// Policy.
    pub policy: Policy,
    /// `healthy`, or why not (`apply_failed: …` when a staged frame cannot be applied).
    pub health: String,
    /// Set while the health is `apply_failed`: the frame, where apply stopped, what to do.
    pub apply_failure: Option<crate::runtime::ApplyFailure>,
    /// Share of the initial copy or resync done (100 once protected).
    pub synchronized_percent: u8,
    /// Age of the newest recovery point (by the source's clock), in ms.
    pub rpo_lag_ms: Option<u64>,
    /// Staging bytes in use.
    pub cache_used_bytes: u64,
    /// Staging capacity.
    pub cache_capacity_bytes: u64,
    /// Frames up to it are in the replicas.
    pub applied_seq: u64,
    /// Frames up to it are durable in staging (acknowledged).
    pub staged_seq: u64,
    /// Recovery points kept.
    pub points: u64,
    /// Newest point.
    pub latest_point_id: Option<u64>,
    /// Newest app-consistent point.
    pub latest_app_point_id: Option<u64>,
    /// The temporary OS disk (re-protect).
    pub temporary_os_disk: Option<String>,
    /// Test failover disks.
    pub test_failover: Option<Materialized>,
    /// Failover disks.
    pub failover: Option<Materialized>,
    /// Newest job.
    pub last_job: Option<u64>,
    /// The last job's error.
    pub last_error: Option<String>,
    /// Why the item is quarantined (state `quarantined`) and what to do.
    pub quarantine: Option<Quarantine>,
}

/// What enable and re-protect return.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Enabled {
    /// The new item.
    pub item: ItemView,
    /// Its stream token (64 hex digits; shown only here).
    pub stream_token: String,
    /// Its replication job.
    pub job: JobView,
}

/// One row of the slot table.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SlotView {
    /// The LUN.
    pub lun: u32,
    /// `appliance`, `free`, `reserved` or `attached`.
    pub state: &'static str,
    /// The item of the disk.
    pub item: Option<String>,
    /// The disk's index in its item.
    pub disk_index: Option<u32>,
    /// The disk.
    pub path: Option<String>,
}

/// The slot table.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SlotsView {
    /// LUNs in all (LUN 0 is the appliance's own).
    pub slot_count: u32,
    /// LUNs for replica disks.
    pub usable: u32,
    /// Free.
    pub free: u32,
    /// Reserved by operations in flight.
    pub reserved: u32,
    /// Holding replica disks.
    pub attached: u32,
    /// Every LUN.
    pub slots: Vec<SlotView>,
}

// ───────────────────────────── the manager ─────────────────────────────

struct Replication {
    log: Arc<Mutex<StagingLog>>,
    reader: StagingReader,
    worker: ApplyWorker,
}

struct Item {
    id: [u8; 16],
    hex: String,
    dirs: ItemDirs,
    token: Vec<u8>,
    record: Mutex<ItemRecord>,
    repl: Mutex<Option<Replication>>,
    /// The last worker's status (kept after it stops, for counters).
    status: Mutex<Option<WorkerStatus>>,
    /// A streaming session holds it.
    busy: Arc<AtomicBool>,
    /// New sessions are refused while set (a resync is pausing the item).
    pausing: AtomicBool,
    /// The supervisor's last failure on this item (logged once until it changes).
    tick_error: Mutex<Option<String>>,
    /// Set when the item was found damaged at start (its record's state is then
    /// `Quarantined` in memory).
    quarantine: Mutex<Option<Quarantine>>,
}

impl Item {
    fn new(id: [u8; 16], dirs: ItemDirs, token: Vec<u8>, record: ItemRecord) -> Self {
        Self {
            id,
            hex: item_hex(&id),
            dirs,
            token,
            record: Mutex::new(record),
            repl: Mutex::new(None),
            status: Mutex::new(None),
            busy: Arc::new(AtomicBool::new(false)),
            pausing: AtomicBool::new(false),
            tick_error: Mutex::new(None),
            quarantine: Mutex::new(None),
        }
    }

    fn quarantine(&self) -> Option<Quarantine> {
        lock(&self.quarantine).clone()
    }

    /// Quarantines the item (memory only: the record keeps what it says).
    fn quarantine_now(&self, reason: String, action: &str) {
        let mut record = self.record();
        let recorded_state = match lock(&self.quarantine).as_ref() {
            Some(earlier) => earlier.recorded_state,
            None => Some(record.state),
        };
        tracing::error!(item = %self.hex, %reason, "item quarantined: not served");
        record.state = ItemState::Quarantined;
        *lock(&self.quarantine) = Some(Quarantine {
            reason,
            action: action.replace("{id}", &self.hex),
            recorded_state,
        });
    }

    fn record(&self) -> MutexGuard<'_, ItemRecord> {
        self.record.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn repl(&self) -> MutexGuard<'_, Option<Replication>> {
        self.repl.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn status(&self) -> Option<WorkerStatus> {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Persists `record` and makes it current.
    fn save(&self, mut record: ItemRecord) -> anyhow::Result<()> {
        record.updated_ns = now_ns();
        let bytes = serde_json::to_vec_pretty(&record).context("encoding an item record")?;
        write_atomic(&self.dirs.root, RECORD_FILE, &bytes)?;
        *self.record() = record;
        Ok(())
    }

    /// Changes the record with `change` and persists it.
    fn update(&self, change: impl FnOnce(&mut ItemRecord)) -> anyhow::Result<()> {
        let mut record = self.record().clone();
        change(&mut record);
        self.save(record)
    }
}

/// The item manager. Shared as `Arc<Manager>` by the API, the data port and the daemon.
pub struct Manager {
    data: DataDir,
    /// The data directory, canonical.
    root: PathBuf,
    /// The data directory and the disk stores, canonical.
    roots: Vec<PathBuf>,
    meta: Arc<MetaStore>,
    options: ServeOptions,
    slots: Mutex<SlotTable>,
    items: Mutex<BTreeMap<[u8; 16], Arc<Item>>>,
    jobs: Jobs,
    ops: Mutex<()>,
    port: OnceLock<PortHandle>,
    next_op: AtomicU64,
    stopping: AtomicBool,
    supervisor: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Names under the data directory that requests may not touch.
const RESERVED_NAMES: [&str; 7] = [
    "items",
    "slots",
    "jobs",
    "meta.redb",
    "api-token",
    "lock",
    "api-token.tmp",
];

impl Manager {
    /// Opens the data directory: the slot table, the jobs, every item's record; finishes or
    /// undoes what a crash interrupted, and reconciles slots with records. Starts nothing
    /// (see [`Manager::start`]).
    pub fn open(data_dir: &Path, options: ServeOptions) -> anyhow::Result<Arc<Self>> {
        let data = DataDir::open(data_dir)?;
        let root = std::fs::canonicalize(data_dir)
            .with_context(|| format!("resolving {}", data_dir.display()))?;
        let mut roots = vec![root.clone()];
        for store in &options.disk_stores {
            let canonical = std::fs::canonicalize(store)
                .with_context(|| format!("disk store {}", store.display()))?;
            roots.push(canonical);
        }
        let meta = data.meta()?;
        let slot_dir = root.join("slots");
        crate::store::create_private_dir(&slot_dir)?;
        let slot_store = Arc::new(StdDir::open(&slot_dir)?);
        let slots = match SlotTable::open(slot_store.clone(), options.slot_count) {
            Err(SlotError::Corrupt { reason }) => {
                // Neither page can be trusted: keep them for the operator and rebuild the table
                // from the item records (reconcile_slots gives every disk a slot), rather than
                // refusing to start.
                let suffix = format!("damaged-{}", now_ns());
                for name in crate::slots::PAGE_FILE_NAMES {
                    let from = slot_dir.join(name);
                    let to = slot_dir.join(format!("{name}.{suffix}"));
                    if let Err(error) = std::fs::rename(&from, &to) {
                        tracing::warn!(path = %from.display(), %error, "could not move aside");
                    }
                }
                crate::store::sync_dir(&slot_dir)?;
                tracing::error!(%reason, kept = %format!("{}/*.{suffix}", slot_dir.display()),
                    "slot table damaged: rebuilt from the item records (LUNs may change)");
                SlotTable::open(slot_store, options.slot_count)
            }
            other => other,
        }
        .context("opening the slot table")?;
        let jobs = Jobs::open(&root.join("jobs"))?;
        let manager = Arc::new(Self {
            data,
            root,
            roots,
            meta,
            options,
            slots: Mutex::new(slots),
            items: Mutex::new(BTreeMap::new()),
            jobs,
            ops: Mutex::new(()),
            port: OnceLock::new(),
            next_op: AtomicU64::new(1),
            stopping: AtomicBool::new(false),
            supervisor: Mutex::new(None),
        });
        manager.load_items()?;
        manager.recover()?;
        manager.reconcile_slots()?;
        Ok(manager)
    }

    /// Loads every item directory. A directory that a crash during enable left (the
    /// `enabling` marker or no header, and no record) is rolled back; one whose record or
    /// header cannot be read or disagree is quarantined; only an error listing `items/` itself
    /// stops the start.
    fn load_items(&self) -> anyhow::Result<()> {
        let attached: Vec<(ItemId, u32, PathBuf)> = lock(&self.slots)
            .table()
            .into_iter()
            .filter_map(|row| match row.state {
                SlotState::Attached {
                    item,
                    disk_index,
                    path,
                } => Some((item, disk_index, path)),
                _ => None,
            })
            .collect();
        // Read into a local table; `items` is taken once, to publish it (no lock across the
        // reads and clean-ups below).
        let mut items = BTreeMap::new();
        for found in self.data.found_items()? {
            let hex = item_hex(&found.id);
            let path = found.root.join(RECORD_FILE);
            let bytes = match std::fs::read(&path) {
                Ok(bytes) => Some(Ok(bytes)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => Some(Err(format!("{}: cannot read: {e}", path.display()))),
            };
            if bytes.is_none() && (found.enabling || matches!(found.header, Ok(None))) {
                // Enable never wrote the record: nothing refers to what it made.
                if let Some(created) = &found.enabling_creates {
                    match std::fs::remove_file(created) {
                        Ok(()) => tracing::warn!(item = %hex, path = %created.display(),
                            "removed the temporary OS disk of an interrupted enable"),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(error) => tracing::error!(item = %hex, path = %created.display(),
                            %error, "could not remove an interrupted enable's file"),
                    }
                }
                match self.data.purge_item(&found.root) {
                    Ok(()) => tracing::warn!(item = %hex,
                        "rolled back an enable that a crash interrupted (no record)"),
                    Err(error) => tracing::error!(item = %hex,
                        error = %crate::store::describe(&error),
                        "could not roll back an interrupted enable (retried at the next start)"),
                }
                continue;
            }
            let header = found.header.clone();
            let Some(bytes) = bytes else {
                match header {
                    Ok(_) => {
                        tracing::info!(item = %hex, "no item.json (an `ingest` item): not served")
                    }
                    Err(reason) => tracing::error!(item = %hex, %reason,
                        "a damaged item directory without a record: not served"),
                }
                continue;
            };
            if found.enabling
                && let Err(error) = self.data.end_enabling(&found.root)
            {
                tracing::warn!(item = %hex, error = %crate::store::describe(&error),
                    "removing the enable marker");
            }
            let record = bytes.and_then(|bytes| {
                serde_json::from_slice::<ItemRecord>(&bytes)
                    .map_err(|e| format!("{}: not an item record: {e}", path.display()))
            });
            let token = match std::fs::read(found.root.join(TOKEN_FILE)) {
                Ok(token) => Ok(token),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
                Err(e) => Err(format!("{}/{TOKEN_FILE}: cannot read: {e}", hex)),
            };
            let problem = match (&record, &header, &token) {
                (Err(why), _, _) | (_, Err(why), _) | (_, _, Err(why)) => Some(why.clone()),
                (Ok(record), Ok(header), _) => check_record(&hex, record, header.as_ref()).err(),
            };
            let placeholder = StreamHeader {
                item_id: found.id,
                item_name: String::new(),
                first_seq: 1,
                disks: Vec::new(),
            };
            let dirs = ItemDirs {
                root: found.root.clone(),
                header: header.clone().ok().flatten().unwrap_or(placeholder),
            };
            let Some(reason) = problem else {
                let (Ok(record), Ok(token)) = (record, token) else {
                    continue;
                };
                items.insert(found.id, Arc::new(Item::new(found.id, dirs, token, record)));
                continue;
            };
            let record = record.unwrap_or_else(|_| {
                stand_in_record(&hex, &found.root, header.ok().flatten().as_ref(), &attached)
            });
            let item = Item::new(found.id, dirs, Vec::new(), record);
            item.quarantine_now(reason, QUARANTINE_ACTION);
            items.insert(found.id, Arc::new(item));
        }
        lock(&self.items).extend(items);
        Ok(())
    }

    /// Undoes what a crash interrupted (see the module's invariants). A failure on one item
    /// quarantines that item; the others are recovered.
    fn recover(&self) -> anyhow::Result<()> {
        const INTERRUPTED: &str = "interrupted by an appliance restart";
        for item in self.all_items() {
            let record = item.record().clone();
            if record.state == ItemState::Quarantined {
                continue;
            }
            let back_to = match record.state {
                ItemState::TestFailover if record.test_failover.is_none() => {
                    Some(ItemState::Protected)
                }
                ItemState::FailingOver if record.failover.is_some() => Some(ItemState::FailedOver),
                ItemState::FailingOver | ItemState::FailingBack => Some(ItemState::Protected),
                _ => None,
            };
            if let Some(state) = back_to {
                if let Some(pending) = &record.pending {
                    remove_materialized(pending);
                }
                tracing::warn!(item = %item.hex, from = record.state.name(), to = state.name(),
                    "an interrupted job's state undone");
                if let Err(error) = item.update(|r| {
                    r.state = state;
                    r.pending = None;
                    r.last_error = Some(format!("{} job {INTERRUPTED}", record.state.name()));
                }) {
                    item.quarantine_now(
                        format!(
                            "undoing its interrupted {} job failed: {}",
                            record.state.name(),
                            crate::store::describe(&error)
                        ),
                        QUARANTINE_ACTION,
                    );
                    continue;
                }
            }
            if matches!(record.state, ItemState::Disabled | ItemState::FailedBack) {
                let cleaned = self.remove_item_data(&item).and_then(|()| {
                    if record.state == ItemState::Disabled {
                        self.data.purge_item(&item.dirs.root)?;
                        lock(&self.items).remove(&item.id);
                    }
                    Ok(())
                });
                if let Err(error) = cleaned {
                    tracing::error!(item = %item.hex, error = %crate::store::describe(&error),
                        "clean-up of a {} item failed (retried at the next start)",
                        record.state.name());
                }
            }
        }
        for job in self.jobs.running() {
            let view = job.view();
            let owner = parse_item_hex(&view.item)
                .ok()
                .and_then(|id| self.item(&id));
            let state = owner.as_ref().map(|item| item.record().state);
            // The supervisor records `protected` and then ends the sync's job: a crash between
            // the two writes leaves the job running with its item protected. The sync is done.
            let synced = view.kind.is_replication()
                && state == Some(ItemState::Protected)
                && owner.is_some_and(|item| item.record().last_job == Some(view.id));
            if synced {
                if let Err(error) = job.succeed("synchronized; protected (recorded at restart)") {
                    tracing::error!(job = view.id, error = %crate::store::describe(&error),
                        "recording a finished sync");
                }
                continue;
            }
            let continues = view.kind.is_replication()
                && matches!(
                    (view.kind, state),
                    (
                        JobKind::InitialReplication,
                        Some(ItemState::InitialReplication)
                    ) | (JobKind::Reprotect, Some(ItemState::Reprotecting))
                        | (JobKind::Resync, Some(ItemState::Resyncing))
                );
            if !continues
                && let Err(error) = job.fail(format!(
                    "{INTERRUPTED} (item then {})",
                    state.map_or("gone", ItemState::name)
                ))
            {
                tracing::error!(job = view.id, error = %crate::store::describe(&error),
                    "recording an interrupted job");
            }
        }
        // A replicating item whose job file was damaged (or lost) gets a new job: the
        // supervisor ends the sync through it.
        for item in self.all_items() {
            let record = item.record().clone();
            let Some(kind) = record.state.sync_job_kind() else {
                continue;
            };
            if record.last_job.and_then(|id| self.jobs.get(id)).is_some() {
                continue;
            }
            let replaced = self
                .jobs
                .create(
                    kind,
                    &item.hex,
                    "its job's record was unreadable at start: this job replaces it",
                )
                .and_then(|job| item.update(|r| r.last_job = Some(job.id())));
            if let Err(error) = replaced {
                tracing::error!(item = %item.hex, error = %crate::store::describe(&error),
                    "could not replace the item's lost job");
            }
        }
        Ok(())
    }

    /// Makes the slot table agree with the records. A quarantined item keeps the slots the
    /// table gives it (never handed to another item) and gets none; a failure to attach one
    /// item's disks is recorded on that item.
    fn reconcile_slots(&self) -> anyhow::Result<()> {
        let items = self.all_items();
        let mut slots = lock(&self.slots);
        let owners: Vec<ItemId> = slots
            .table()
            .into_iter()
            .filter_map(|row| match row.state {
                SlotState::Attached { item, .. } => Some(item),
                _ => None,
            })
            .collect::<std::collections::BTreeSet<ItemId>>()
            .into_iter()
            .collect();
        for owner in owners {
            let keep = items
                .iter()
                .any(|item| item.id == owner.0 && item.record().state.holds_slots());
            if !keep {
                match slots.release_item(owner) {
                    Ok(luns) => tracing::warn!(item = %owner, ?luns,
                        "released slots of an item that holds none"),
                    Err(error) => tracing::error!(item = %owner, %error,
                        "could not release the slots of an item that holds none"),
                }
            }
        }
        for item in &items {
            let record = item.record().clone();
            if !record.state.holds_slots() || record.state == ItemState::Quarantined {
                continue;
            }
            let missing: Vec<&DiskRecord> = record
                .disks
                .iter()
                .filter(|d| slots.lun_of(ItemId(item.id), d.index).is_none())
                .collect();
            if missing.is_empty() {
                continue;
            }
            let requests: Vec<DiskRequest> = missing
                .iter()
                .map(|d| DiskRequest {
                    item: ItemId(item.id),
                    disk_index: d.index,
                })
                .collect();
            let op = self.next_op.fetch_add(1, Ordering::Relaxed);
            let result = slots.reserve(op, &requests).and_then(|reservation| {
                slots.commit(
                    reservation,
                    missing.iter().map(|d| PathBuf::from(&d.path)).collect(),
                )
            });
            match result {
                Ok(()) => tracing::warn!(item = %item.hex, disks = missing.len(),
                    "slots re-attached for disks whose attach a crash interrupted"),
                Err(error) => {
                    tracing::error!(item = %item.hex, %error, "cannot give the item's disks slots");
                    if let Err(e) = item.update(|r| r.last_error = Some(format!("slots: {error}")))
                    {
                        tracing::error!(item = %item.hex, error = %crate::store::describe(&e),
                            "recording the slot failure");
                    }
                }
            }
        }
        Ok(())
    }

    /// Starts replication of every replicating item and the supervisor thread. An item whose
    /// replication cannot start keeps the reason in `last_error`; the others start.
    pub fn start(self: &Arc<Self>, port: PortHandle) -> anyhow::Result<()> {
        let _ = self.port.set(port);
        for item in self.all_items() {
            if item.record().state.replicating()
                && let Err(error) = self.start_replication(&item)
            {
                let message = crate::store::describe(&error);
                tracing::error!(item = %item.hex, error = %message, "cannot start replication");
                if let Err(e) = item.update(|r| r.last_error = Some(message.clone())) {
                    tracing::error!(item = %item.hex, error = %crate::store::describe(&e),
                        "recording why replication did not start");
                }
            }
        }
        let manager = Arc::downgrade(self);
        let handle = std::thread::Builder::new()
            .name("supervisor".into())
            .spawn(move || {
                while let Some(manager) = manager.upgrade() {
                    if manager.stopping.load(Ordering::Acquire) {
                        break;
                    }
                    manager.tick();
                    drop(manager);
                    std::thread::sleep(TICK);
                }
            })
            .context("starting the supervisor thread")?;
        *lock(&self.supervisor) = Some(handle);
        Ok(())
    }

    /// Stops the supervisor and every item's replication (applying what is staged, flushing).
    /// Returns the items that could not be stopped cleanly.
    pub fn shutdown(&self) -> Vec<String> {
        self.stopping.store(true, Ordering::Release);
        // Bound first: in `if let` the guard would be held across the join.
        let supervisor = lock(&self.supervisor).take();
        if let Some(handle) = supervisor {
            let _ = handle.join();
        }
        // Let jobs that write files finish (bounded): a restart would undo their work.
        let deadline = Instant::now() + JOB_STOP_WAIT;
        while self.jobs.running_work() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut failures = Vec::new();
        for item in self.all_items() {
            let Some(repl) = item.repl().take() else {
                continue;
            };
            let failed = repl.worker.failed();
            let target = repl.reader.durable_seq();
            match repl.worker.drain_and_stop(target, false) {
                Ok(drained) => {
                    tracing::info!(item = %item.hex, applied_seq = drained.applied_seq, "stopped")
                }
                Err(_) if failed => failures.push(format!(
                    "item {}: apply had stopped on an error (logged above)",
                    item.hex
                )),
                Err(e) => {
                    failures.push(format!("item {}: {}", item.hex, crate::store::describe(&e)))
                }
            }
        }
        failures
    }

    fn all_items(&self) -> Vec<Arc<Item>> {
        lock(&self.items).values().cloned().collect()
    }

    fn item(&self, id: &[u8; 16]) -> Option<Arc<Item>> {
        lock(&self.items).get(id).cloned()
    }

    fn find(&self, hex: &str) -> Result<Arc<Item>, OpError> {
        let id = parse_item_hex(hex).map_err(|e| OpError::BadRequest {
            code: "bad_item_id",
            field: None,
            message: crate::store::describe(&e),
        })?;
        self.item(&id).ok_or_else(|| OpError::NotFound {
            code: "item_not_found",
            message: format!("no item {hex} on this appliance"),
        })
    }

    fn check_allowed(&self, item: &Item, op: Op) -> Result<ItemRecord, OpError> {
        let record = item.record().clone();
        let allowed = record.allowed();
        if allowed.contains(&op) {
            Ok(record)
        } else {
            Err(OpError::WrongState {
                item: item.hex.clone(),
                state: record.state,
                op: op.name(),
                allowed: allowed.into_iter().map(Op::name).collect(),
            })
        }
    }

    fn check_job_room(&self) -> Result<(), OpError> {
        let running = self.jobs.running_work();
        if running >= self.options.max_jobs {
            return Err(OpError::Conflict {
                code: "too_many_jobs",
                message: format!(
                    "{running} jobs are running, the limit is {}; retry when one ends",
                    self.options.max_jobs
                ),
            });
        }
        Ok(())
    }

    // ─────────────── paths ───────────────

    /// Resolves a request path: absolute, no `..`, inside the data directory (but not its
    /// own files) or a disk store, following symlinks of the part that exists.
    fn check_path(&self, raw: &str, field: &str) -> Result<PathBuf, OpError> {
        let refused = |why: String| OpError::PathRefused {
            field: field.to_owned(),
            message: format!("{field} {raw:?}: {why}"),
        };
        let path = Path::new(raw);
        if raw.is_empty() || !path.is_absolute() {
            return Err(refused("must be an absolute path".into()));
        }
        if raw.contains('\0') {
            return Err(bad(field, "contains a NUL byte, which no path can"));
        }
        check_path_lengths(raw).map_err(refused)?;
        if path.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(refused("must not contain \"..\"".into()));
        }
        // Canonicalize the longest existing prefix, then append the rest.
        let mut existing = path.to_path_buf();
        let mut rest = Vec::new();
        let canonical = loop {
            match std::fs::canonicalize(&existing) {
                Ok(canonical) => break canonical,
                Err(_) => match (existing.file_name(), existing.parent()) {
                    (Some(name), Some(parent)) => {
                        rest.push(name.to_owned());
                        existing = parent.to_path_buf();
                    }
                    _ => return Err(refused("cannot be resolved".into())),
                },
            }
        };
        let resolved = rest
            .iter()
            .rev()
            .fold(canonical, |acc, part| acc.join(part));
        // Symlinks in the existing part may have made it longer.
        check_path_lengths(&resolved.display().to_string())
            .map_err(|why| refused(format!("resolves to {}: {why}", resolved.display())))?;
        let inside_data = resolved.strip_prefix(&self.root).ok().map(|relative| {
            relative
                .components()
                .next()
                .and_then(|c| c.as_os_str().to_str())
                .is_none_or(|first| !RESERVED_NAMES.contains(&first))
        });
        let allowed = match inside_data {
            Some(true) => resolved != self.root,
            Some(false) => false,
            None => self.roots[1..]
                .iter()
                .any(|store| resolved.starts_with(store)),
        };
        if !allowed {
            let stores: Vec<String> = self.roots.iter().map(|r| r.display().to_string()).collect();
            return Err(refused(format!(
                "resolves to {}, which is not inside the data directory or a disk store ({}), \
                 or is one of the appliance's own files",
                resolved.display(),
                stores.join(", ")
            )));
        }
        Ok(resolved)
    }

    // ─────────────── enable ───────────────

    /// Enable protection: slots, replica disks, token, record, replication, job.
    pub fn enable(&self, request: EnableRequest) -> Result<Enabled, OpError> {
        let _ops = lock(&self.ops);
        self.enable_locked(request, Role::Forward, None)
    }

    fn policy(&self, request: Option<PolicyRequest>) -> Result<Policy, OpError> {
        let request = request.unwrap_or_default();
        let keep_points = request
            .keep_points
            .unwrap_or(self.options.keep_points as u64);
        if !(1..=100_000).contains(&keep_points) {
            return Err(bad("policy.keep_points", "must be 1..=100000"));
        }
        let keep_minutes = request.keep_minutes.unwrap_or(0);
        if keep_minutes > 60 * 24 * 366 {
            return Err(bad(
                "policy.keep_minutes",
                "must be at most a year (527040)",
            ));
        }
        let app_consistent_minutes = request.app_consistent_minutes.unwrap_or(60);
        if !(1..=60 * 24).contains(&app_consistent_minutes) {
            return Err(bad("policy.app_consistent_minutes", "must be 1..=1440"));
        }
        Ok(Policy {
            keep_points,
            keep_minutes,
            app_consistent_minutes,
        })
    }

    fn enable_locked(
        &self,
        request: EnableRequest,
        role: Role,
        reverse_of: Option<String>,
    ) -> Result<Enabled, OpError> {
        // Characters, not bytes, so that the OpenAPI schema can state it (maxLength); 63
        // characters of UTF-8 always fit the stream header's 255 bytes.
        let name = request.name.trim().to_owned();
        if name.is_empty()
            || request.name.chars().count() > MAX_NAME_CHARS
            || request.name.chars().any(char::is_control)
        {
            return Err(bad(
                "name",
                format!(
                    "must be 1..={MAX_NAME_CHARS} characters without control characters, not \
                     only white space"
                ),
            ));
        }
        if request.disks.is_empty() || request.disks.len() > MAX_ITEM_DISKS {
            return Err(bad(
                "disks",
                format!("needs 1..={MAX_ITEM_DISKS} disks, OS disk first"),
            ));
        }
        let policy = self.policy(request.policy)?;
        // Every check before the first change.
        let attached_paths: Vec<PathBuf> = lock(&self.slots)
            .table()
            .into_iter()
            .filter_map(|row| match row.state {
                SlotState::Attached { path, .. } => Some(path),
                _ => None,
            })
            .collect();
        let mut planned: Vec<(DiskGeometry, Option<PathBuf>)> = Vec::new();
        for (index, disk) in request.disks.iter().enumerate() {
            let field = format!("disks[{index}]");
            let block_size_bytes = disk.block_size_bytes.unwrap_or(4096);
            if !engine::delta::BLOCK_SIZES.contains(&block_size_bytes) {
                return Err(bad(
                    format!("{field}.block_size_bytes"),
                    "must be 512 or 4096",
                ));
            }
            match (disk.size_mib, &disk.path) {
                (Some(size_mib), None) => {
                    if size_mib == 0 || size_mib > 64 << 20 {
                        return Err(bad(format!("{field}.size_mib"), "must be 1..=67108864"));
                    }
                    planned.push((
                        DiskGeometry {
                            size_bytes: size_mib << 20,
                            block_size_bytes,
                        },
                        None,
                    ));
                }
                (None, Some(raw)) => {
                    let path = self.check_path(raw, &format!("{field}.path"))?;
                    let size_bytes = disk_size(&path).map_err(|why| OpError::Conflict {
                        code: "disk_mismatch",
                        message: format!("{field}.path {}: {why}", path.display()),
                    })?;
                    if size_bytes == 0 || size_bytes % u64::from(block_size_bytes) != 0 {
                        return Err(OpError::Conflict {
                            code: "disk_mismatch",
                            message: format!(
                                "{field}.path {}: {size_bytes} bytes is not a non-zero multiple \
                                 of the {block_size_bytes}-byte block size",
                                path.display()
                            ),
                        });
                    }
                    if attached_paths.contains(&path)
                        || planned.iter().any(|(_, p)| p.as_ref() == Some(&path))
                    {
                        return Err(OpError::Conflict {
                            code: "path_in_use",
                            message: format!(
                                "{field}.path {} is already attached as a replica disk",
                                path.display()
                            ),
                        });
                    }
                    planned.push((
                        DiskGeometry {
                            size_bytes,
                            block_size_bytes,
                        },
                        Some(path),
                    ));
                }
                _ => {
                    return Err(bad(
                        field,
                        "give exactly one of size_mib (create a disk) or path (attach one)",
                    ));
                }
            }
        }
        let temporary = match &request.temporary_os_disk {
            Some(raw) => {
                let path = self.check_path(raw, "temporary_os_disk")?;
                if path.exists() {
                    return Err(OpError::Conflict {
                        code: "path_in_use",
                        message: format!("temporary_os_disk {} already exists", path.display()),
                    });
                }
                if !path.parent().is_some_and(Path::is_dir) {
                    return Err(bad(
                        "temporary_os_disk",
                        format!("{}: its directory does not exist", path.display()),
                    ));
                }
                Some(path)
            }
            None => None,
        };
        let item_id: [u8; 16] = crate::daemon::random_bytes()?;
        let hex = item_hex(&item_id);
        let header = StreamHeader {
            item_id,
            item_name: name.clone(),
            first_seq: 1,
            disks: planned.iter().map(|(g, _)| *g).collect(),
        };
        header
            .validate()
            .map_err(|e| bad("disks", format!("{e}")))?;
        let requests: Vec<DiskRequest> = (0..planned.len() as u32)
            .map(|disk_index| DiskRequest {
                item: ItemId(item_id),
                disk_index,
            })
            .collect();
        let op = self.next_op.fetch_add(1, Ordering::Relaxed);
        let reservation = lock(&self.slots)
            .reserve(op, &requests)
            .map_err(|e| match e {
                SlotError::NotEnoughSlots { needed, free } => {
                    OpError::NotEnoughSlots { needed, free }
                }
                other => OpError::Io(format!("slot table: {other}")),
            })?;
        crate::testhook::crash_point("enable:reserved");
        // From here on a failure undoes what was made. A crash before the record is written
        // leaves the `enabling` marker: the next start rolls the item back.
        let mut made: Vec<PathBuf> = Vec::new();
        let built = (|| -> anyhow::Result<(Arc<Item>, String, Arc<Job>)> {
            made.push(self.data.begin_item(&item_id)?);
            crate::testhook::crash_point("enable:item-dir");
            let dirs = self.data.item_for(&header)?;
            crate::testhook::crash_point("enable:header");
            let mut disks = Vec::new();
            for (index, (geometry, attach)) in planned.iter().enumerate() {
                let (path, origin) = match attach {
                    Some(path) => (path.clone(), DiskOrigin::Attached),
                    None => {
                        let path = dirs.replica_path(index);
                        let file = crate::store::create_private_file(&path)?;
                        file.set_len(geometry.size_bytes).map_err(|source| {
                            if source.raw_os_error() == Some(nix::libc::EFBIG) {
                                anyhow::Error::new(DiskTooLarge {
                                    field: format!("disks[{index}].size_mib"),
                                    size_bytes: geometry.size_bytes,
                                    path: path.display().to_string(),
                                    source,
                                })
                            } else {
                                anyhow::Error::new(source)
                                    .context(format!("sizing {}", path.display()))
                            }
                        })?;
                        file.sync_all()?;
                        (path, DiskOrigin::Created)
                    }
                };
                disks.push(DiskRecord {
                    index: index as u32,
                    size_bytes: geometry.size_bytes,
                    block_size_bytes: geometry.block_size_bytes,
                    path: path.display().to_string(),
                    origin,
                });
            }
            if let Some(path) = &temporary {
                self.data.note_enabling(&dirs.root, path)?;
                engine::vhd::create_temporary_os_disk(path)
                    .with_context(|| format!("creating {}", path.display()))?;
                made.push(path.clone());
                if let Some(parent) = path.parent() {
                    crate::store::sync_dir(parent)?;
                }
            }
            crate::store::sync_dir(&dirs.root.join("replicas"))?;
            crate::testhook::crash_point("enable:replicas");
            let token = crate::daemon::hex(&crate::daemon::random_bytes::<32>()?);
            crate::store::write_secret(&dirs.root, TOKEN_FILE, token.as_bytes())?;
            crate::testhook::crash_point("enable:token");
            let reverse = role == Role::Reverse || temporary.is_some();
            let (state, kind) = if reverse {
                (ItemState::Reprotecting, JobKind::Reprotect)
            } else {
                (ItemState::InitialReplication, JobKind::InitialReplication)
            };
            let job = self.jobs.create(
                kind,
                &hex,
                "waiting for the agent's first full copy and first recovery point",
            )?;
            crate::testhook::crash_point("enable:job");
            let now = now_ns();
            let record = ItemRecord {
                version: 1,
                id: hex.clone(),
                name: name.clone(),
                state,
                role: if reverse {
                    Role::Reverse
                } else {
                    Role::Forward
                },
                reverse_of: reverse_of.clone(),
                reversed_by: None,
                disks,
                policy,
                temporary_os_disk: temporary.as_ref().map(|p| p.display().to_string()),
                test_failover: None,
                failover: None,
                pending: None,
                sync_from_seq: 1,
                last_job: Some(job.id()),
                last_error: None,
                created_ns: now,
                updated_ns: now,
            };
            let item = Arc::new(Item::new(
                item_id,
                dirs,
                token.clone().into_bytes(),
                record.clone(),
            ));
            // The record first: a crash after it and before the slot commit is repaired at
            // start (reconcile gives the disks their slots); the other order could leak.
            if let Err(error) = item.save(record) {
                let _ = job.fail(crate::store::describe(&error));
                return Err(error);
            }
            crate::testhook::crash_point("enable:record");
            if let Err(error) = self.data.end_enabling(&item.dirs.root) {
                // Harmless: the next start removes a marker beside a record.
                tracing::warn!(item = %hex, error = %crate::store::describe(&error),
                    "removing the enable marker");
            }
            Ok((item, token, job))
        })();
        let (item, token, job) = match built {
            Ok(built) => built,
            Err(error) => {
                let _ = lock(&self.slots).release_reservation(reservation);
                for path in made.iter().rev() {
                    let _ = if path.is_dir() {
                        std::fs::remove_dir_all(path)
                    } else {
                        std::fs::remove_file(path)
                    };
                }
                if let Some(too_large) = error.downcast_ref::<DiskTooLarge>() {
                    return Err(OpError::Conflict {
                        code: "disk_too_large",
                        message: too_large.to_string(),
                    });
                }
                return Err(error.into());
            }
        };
        let paths = item
            .record()
            .disks
            .iter()
            .map(|d| PathBuf::from(&d.path))
            .collect();
        // Bound first: the guard of an `if let` scrutinee lives through its block, and the
        // clean-up below takes `slots` again (`remove_item_data`).
        let committed = if crate::testhook::fail_point("enable:slots-commit") {
            Err("APPLIANCE_TEST_FAIL_AT=enable:slots-commit".to_owned())
        } else {
            lock(&self.slots)
                .commit(reservation, paths)
                .map_err(|e| e.to_string())
        };
        if let Err(error) = committed {
            // A commit that failed may leave the reservation (it is consumed): free it, or
            // `release_item` below refuses the item as busy.
            let _ = lock(&self.slots).release_op(op);
            // The record exists: disable it so that nothing is left half made.
            let message = format!("attaching the disks to slots failed: {error}");
            let _ = job.fail(message.clone());
            let _ = item.update(|r| {
                r.state = ItemState::Disabled;
                r.last_error = Some(message.clone());
            });
            let _ = self.remove_item_data(&item);
            return Err(OpError::Io(message));
        }
        crate::testhook::crash_point("enable:slots");
        lock(&self.items).insert(item_id, item.clone());
        if let Err(error) = self.start_replication(&item) {
            let message = crate::store::describe(&error);
            let _ = item.update(|r| r.last_error = Some(message.clone()));
            return Err(OpError::Io(format!(
                "item {hex} was created but its replication did not start: {message}"
            )));
        }
        crate::testhook::crash_point("enable:started");
        tracing::info!(item = %hex, %name, disks = planned.len(), "protection enabled");
        Ok(Enabled {
            item: self.view(&item),
            stream_token: token,
            job: job.view(),
        })
    }

    // ─────────────── replication ───────────────

    fn start_replication(&self, item: &Item) -> anyhow::Result<()> {
        let record = item.record().clone();
        let key = item_key(&item.id);
        let mut files: Vec<ReplicaFile> = Vec::new();
        for disk in &record.disks {
            files.push(open_replica(
                &self.meta,
                key,
                disk.index as u16,
                Path::new(&disk.path),
                DiskGeometry {
                    size_bytes: disk.size_bytes,
                    block_size_bytes: disk.block_size_bytes,
                },
                DirectIo::Prefer,
            )?);
        }
        let (log, recovery) = StagingLog::open(
            Arc::new(item.dirs.staging()?),
            item.dirs.header.clone(),
            StagingConfig {
                capacity_bytes: self.options.cache_bytes,
                ..StagingConfig::default()
            },
        )
        .with_context(|| format!("item {}: opening its staging log", item.hex))?;
        if let Some(corruption) = &recovery.corruption {
            tracing::error!(item = %item.hex, %corruption, "staging damaged: item needs a resync");
        }
        let first_seq = item.dirs.header.first_seq;
        let mut setup = crate::runtime::worker_setup(
            &item.dirs,
            files,
            log.reader(first_seq),
            self.meta.clone(),
        )?;
        // A frame that never applies: the item takes no more frames (`session_item` refuses
        // new sessions); the running one is ended here.
        let (port, id) = (self.port.get().cloned(), item.id);
        setup.on_unappliable = Some(Box::new(move |_| {
            if let Some(port) = &port {
                port.end_item(&id);
            }
        }));
        let worker = ApplyWorker::start(
            &item.hex,
            setup,
            ApplyOptions {
                keep_points: record.policy.keep_points as usize,
                max_age_ns: match record.policy.keep_minutes {
                    0 => u64::MAX,
                    minutes => minutes.saturating_mul(60_000_000_000),
                },
                queue_depth: self.options.queue_depth,
            },
        )?;
        *lock(&item.status) = Some(worker.status());
        let reader = log.reader(first_seq);
        *item.repl() = Some(Replication {
            log: Arc::new(Mutex::new(log)),
            reader,
            worker,
        });
        Ok(())
    }

    /// Ends the item's sessions and waits until none holds the item.
    fn end_sessions(&self, item: &Item) -> anyhow::Result<()> {
        if let Some(port) = self.port.get() {
            port.end_item(&item.id);
        }
        let deadline = Instant::now() + SESSION_END_WAIT;
        while item.busy.load(Ordering::Acquire) {
            if Instant::now() > deadline {
                anyhow::bail!(
                    "the item's streaming session did not end within {SESSION_END_WAIT:?}"
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Stops the item's replication: ends sessions (the caller already moved the state out
    /// of the replicating ones), applies what is staged, flushes, and (if `latest`) makes a
    /// point of it. Returns the final watermark, or `None` if it was not running.
    fn stop_replication(&self, item: &Item, latest: bool) -> anyhow::Result<Option<u64>> {
        self.end_sessions(item)?;
        let Some(repl) = item.repl().take() else {
            return Ok(None);
        };
        let target = repl.reader.durable_seq();
        let drained = repl
            .worker
            .drain_and_stop(target, latest)
            .with_context(|| format!("item {}: applying what was staged", item.hex))?;
        Ok(Some(drained.applied_seq))
    }

    fn pins(&self, item: &Item) -> Pins {
        item.repl()
            .as_ref()
            .map_or_else(Pins::default, |r| r.worker.pins())
    }

    // ─────────────── materialize ───────────────

    /// Writes every disk of `item` at `point_id` into the job's temporary files (`temps`, in
    /// disk order, in `dir`), each whole and durable. Names nothing: the caller publishes.
    #[allow(clippy::too_many_arguments)]
    fn write_disks(
        &self,
        item: &Item,
        point_id: u64,
        dir: &Dir,
        temps: &[Temp],
        format: Format,
        job: &Job,
        percent: (u64, u64),
    ) -> anyhow::Result<()> {
        let record = item.record().clone();
        if temps.len() != record.disks.len() {
            anyhow::bail!(
                "{} temporary files for {} disks",
                temps.len(),
                record.disks.len()
            );
        }
        let key = item_key(&item.id);
        let pins = self.pins(item);
        let _pin = pins.pin(point_id);
        if self.meta.point(key, point_id)?.is_none() {
            anyhow::bail!("recovery point {point_id} was pruned before it could be pinned");
        }
        let geometries = record.geometries();
        let source = Source {
            meta: &self.meta,
            item: key,
            disks: &geometries,
            preserve_dir: Arc::new(item.dirs.preserve()?),
            grain_bytes: ApplyConfig::default().grain_bytes,
            pins: pins.clone(),
        };
        let total: u64 = record
            .disks
            .iter()
            .map(|d| d.size_bytes)
            .sum::<u64>()
            .max(1);
        let mut done_before = 0u64;
        for (disk, temp) in record.disks.iter().zip(temps) {
            let replica =
                File::open(&disk.path).with_context(|| format!("opening replica {}", disk.path))?;
            let out = dir.path().join(&temp.name);
            let (low, high) = percent;
            materialize_new_file(
                &source,
                point_id,
                disk.index as u16,
                &replica,
                &temp.file,
                &out,
                format.output(),
                &mut |done| {
                    let share = (done_before + done) * (high - low) / total;
                    job.progress(
                        low + share,
                        format!("writing disk {} at point {point_id}", disk.index),
                    );
                },
            )
            .with_context(|| format!("materializing disk {} to {}", disk.index, out.display()))?;
            done_before += disk.size_bytes;
        }
        Ok(())
    }

    fn resolve(&self, item: &Item, choice: PointChoice) -> Result<u64, OpError> {
        resolve_point(&self.meta, item_key(&item.id), choice)
            .map(|p| p.point_id)
            .map_err(|e| OpError::NotFound {
                code: "point_not_found",
                message: format!("item {}: {e}", item.hex),
            })
    }

    /// Opens a job's target directory without following symbolic links (creating what is
    /// missing), refuses it if a running job owns it (`target_dir_busy`) or if any name the
    /// job uses exists (`path_in_use`), and creates the job's temporary files there (see
    /// `crate::target`). Nothing is created when refused.
    fn target_dir(
        &self,
        raw: &str,
        disks: &[DiskRecord],
        format: Format,
    ) -> Result<Target, OpError> {
        let path = self.check_path(raw, "target_dir")?;
        let (dir, created) = match Dir::open_nofollow(&path, false) {
            Ok((dir, _)) => {
                self.check_target_free(&dir)?;
                (dir, false)
            }
            Err(error) if error.is_not_found() => {
                Dir::open_nofollow(&path, true).map_err(|e| dir_refusal("target_dir", e))?
            }
            Err(error) => return Err(dir_refusal("target_dir", error)),
        };
        let names = disk_names(disks, format.output().extension());
        check_absent(&dir, &names).map_err(|e| dir_refusal("target_dir", e))?;
        Target::create_temps(Arc::new(dir), created, &names)
            .map_err(|e| dir_refusal("target_dir", e))
    }

    /// Opens the failed-over disks' directory for a change point: it must still be the
    /// directory the failover wrote and hold the files it recorded (else `target_changed`), no
    /// running job may own it, and the temporary names must be free; creates the temporary
    /// files.
    fn change_target(&self, current: &Materialized, disks: usize) -> Result<Target, OpError> {
        let changed = |why: String| OpError::Conflict {
            code: "target_changed",
            message: format!(
                "the failed-over disks in {}: {why}; change point replaces only the files the \
                 failover wrote",
                current.target_dir
            ),
        };
        let Some(dir_id) = current
            .target_dir_id
            .filter(|_| current.written.len() == disks)
        else {
            return Err(changed(
                "recorded without file identities (by an older version)".into(),
            ));
        };
        let (dir, _) = Dir::open_nofollow(Path::new(&current.target_dir), false)
            .map_err(|e| changed(e.to_string()))?;
        if FileIdentity::from(dir.id()) != dir_id {
            return Err(changed("the directory was moved or replaced".into()));
        }
        self.check_target_free(&dir)?;
        for file in &current.written {
            dir.check_ours(std::ffi::OsStr::new(&file.name), file.id())
                .map_err(|e| changed(e.to_string()))?;
        }
        let names: Vec<String> = current.written.iter().map(|w| w.name.clone()).collect();
        Target::create_temps(Arc::new(dir), false, &names).map_err(|e| dir_refusal("target_dir", e))
    }

    /// Creates the job of a request that made `target`, makes the job own the directory and
    /// applies `change` (given the job id) to the item's record; on an error removes what the
    /// request made.
    fn start_target_job(
        &self,
        item: &Item,
        target: &Target,
        kind: JobKind,
        message: String,
        change: impl FnOnce(&mut ItemRecord, u64),
    ) -> Result<Arc<Job>, OpError> {
        let job = self
            .jobs
            .create(kind, &item.hex, message)
            .inspect_err(|_| {
                target.abandon();
            })?;
        job.hold_target_dir(target.dir.id().dev, target.dir.id().ino);
        let id = job.id();
        if let Err(error) = item.update(|r| change(r, id)) {
            target.abandon();
            let _ = job.fail(crate::store::describe(&error));
            return Err(error.into());
        }
        Ok(job)
    }

    /// Refuses a directory a running job owns (compared by device and inode).
    fn check_target_free(&self, dir: &Dir) -> Result<(), OpError> {
        match self.jobs.target_dir_holder(dir.id().dev, dir.id().ino) {
            Some(holder) => Err(OpError::Conflict {
                code: "target_dir_busy",
                message: format!(
                    "target_dir {} is the target directory of job {} ({} of item {}), which \
                     is running; one job writes into a directory at a time",
                    dir.path().display(),
                    holder.id,
                    holder.kind.name(),
                    holder.item
                ),
            }),
            None => Ok(()),
        }
    }

    fn spawn_job(
        self: &Arc<Self>,
        item: Arc<Item>,
        job: Arc<Job>,
        work: impl FnOnce(&Arc<Self>, &Arc<Item>, &Job) -> anyhow::Result<Option<String>>
        + Send
        + 'static,
        undo: impl FnOnce(&Arc<Self>, &Arc<Item>, &str) + Send + 'static,
    ) -> Result<JobView, OpError> {
        let view = job.view();
        let manager = self.clone();
        std::thread::Builder::new()
            .name(format!("job-{}", view.id))
            .spawn(move || match work(&manager, &item, &job) {
                // The supervisor ends the job (a replication job).
                Ok(None) => {}
                Ok(Some(message)) => {
                    if let Err(error) = job.succeed(message) {
                        tracing::error!(error = %crate::store::describe(&error), "recording a job's end");
                    }
                }
                Err(error) => {
                    let message = crate::store::describe(&error);
                    tracing::error!(item = %item.hex, job = job.id(), error = %message, "job failed");
                    {
                        let _ops = lock(&manager.ops);
                        undo(&manager, &item, &message);
                    }
                    if let Err(error) = job.fail(message) {
                        tracing::error!(error = %crate::store::describe(&error), "recording a job's end");
                    }
                }
            })
            .map_err(|e| OpError::Io(format!("starting a job thread: {e}")))?;
        Ok(view)
    }

    // ─────────────── test failover ───────────────

    /// Test failover: disks at a point into a directory; replication keeps running.
    pub fn test_failover(
        self: &Arc<Self>,
        hex: &str,
        request: MaterializeRequest,
    ) -> Result<JobView, OpError> {
        let _ops = lock(&self.ops);
        let item = self.find(hex)?;
        let record = self.check_allowed(&item, Op::TestFailover)?;
        let choice = request.point.choice(false)?;
        self.check_job_room()?;
        let point_id = self.resolve(&item, choice)?;
        let format = request.format;
        let target = self.target_dir(&request.target_dir, &record.disks, format)?;
        let names = disk_names(&record.disks, format.output().extension());
        let pending = planned(&target, &names, point_id, format);
        let job = self.start_target_job(
            &item,
            &target,
            JobKind::TestFailover,
            format!("writing the disks at point {point_id}"),
            |r, job| {
                r.state = ItemState::TestFailover;
                r.pending = Some(pending);
                r.last_job = Some(job);
                r.last_error = None;
            },
        )?;
        self.spawn_job(
            item,
            job,
            move |manager, item, job| {
                let dir = &target.dir;
                let published = manager
                    .write_disks(item, point_id, dir, &target.temps, format, job, (0, 100))
                    .and_then(|()| Ok(target.publish_new(&names)?))
                    .inspect_err(|_| target.discard(&names))?;
                let _ops = lock(&manager.ops);
                item.update(|r| {
                    r.test_failover = r.pending.take().map(|pending| Materialized {
                        written: published,
                        ..pending
                    });
                })
                .inspect_err(|_| target.discard(&names))?;
                Ok(Some(format!(
                    "test failover disks at point {point_id} in {}",
                    dir.path().display()
                )))
            },
            |_, item, error| undo_pending(item, ItemState::Protected, error),
        )
    }

    /// Removes the test failover's disks; back to protected.
    pub fn test_failover_cleanup(&self, hex: &str) -> Result<ItemView, OpError> {
        let _ops = lock(&self.ops);
        let item = self.find(hex)?;
        let record = self.check_allowed(&item, Op::TestFailoverCleanup)?;
        if let Some(test) = &record.test_failover {
            remove_materialized(test);
        }
        item.update(|r| {
            r.state = ItemState::Protected;
            r.test_failover = None;
        })?;
        Ok(self.view(&item))
    }

    // ─────────────── failover ───────────────

    /// Failover: stop replication, pick the point, write the disks.
    pub fn failover(
        self: &Arc<Self>,
        hex: &str,
        request: FailoverRequest,
    ) -> Result<JobView, OpError> {
        let _ops = lock(&self.ops);
        let item = self.find(hex)?;
        let record = self.check_allowed(&item, Op::Failover)?;
        let choice = request.point.choice(true)?;
        if choice == PointChoice::Latest {
            refuse_if_apply_failed(&item, "failover to \"latest\"")?;
        }
        self.check_job_room()?;
        if choice != PointChoice::Latest {
            // Refuse an unknown point now, not in the job.
            self.resolve(&item, choice)?;
        }
        let format = request.format;
        let target = self.target_dir(&request.target_dir, &record.disks, format)?;
        let names = disk_names(&record.disks, format.output().extension());
        let pending = planned(&target, &names, 0, format);
        let job = self.start_target_job(
            &item,
            &target,
            JobKind::Failover,
            "stopping replication".to_owned(),
            |r, job| {
                r.state = ItemState::FailingOver;
                r.pending = Some(pending);
                r.last_job = Some(job);
                r.last_error = None;
            },
        )?;
        let shut_down = request.source_shut_down;
        self.spawn_job(
            item,
            job,
            move |manager, item, job| {
                let dir = &target.dir;
                let published = (|| {
                    manager.stop_replication(item, choice == PointChoice::Latest)?;
                    job.progress(5, "resolving the recovery point");
                    let point_id = manager
                        .resolve(
                            item,
                            match choice {
                                PointChoice::Latest => PointChoice::LatestProcessed,
                                other => other,
                            },
                        )
                        .map_err(|e| anyhow!("{e}"))?;
                    manager.write_disks(
                        item,
                        point_id,
                        dir,
                        &target.temps,
                        format,
                        job,
                        (5, 100),
                    )?;
                    Ok::<_, anyhow::Error>((point_id, target.publish_new(&names)?))
                })();
                let (point_id, published) = published.inspect_err(|_| target.discard(&names))?;
                let _ops = lock(&manager.ops);
                item.update(|r| {
                    r.state = ItemState::FailedOver;
                    r.failover = r.pending.take().map(|pending| Materialized {
                        point_id,
                        written: published,
                        ..pending
                    });
                })
                .inspect_err(|_| target.discard(&names))?;
                Ok(Some(format!(
                    "failed over to point {point_id}; disks in {}{}",
                    dir.path().display(),
                    if shut_down {
                        ""
                    } else {
                        " (the source was not declared shut down: writes it made after the \
                         last acknowledged frame are not in this point)"
                    }
                )))
            },
            |manager, item, error| {
                undo_pending(item, ItemState::Protected, error);
                if item.repl().is_none()
                    && let Err(e) = manager.start_replication(item)
                {
                    tracing::error!(item = %item.hex, error = %crate::store::describe(&e),
                        "replication did not restart after a failed failover");
                }
            },
        )
    }

    /// Change the failed-over disks to another point.
    pub fn change_point(
        self: &Arc<Self>,
        hex: &str,
        request: ChangePointRequest,
    ) -> Result<JobView, OpError> {
        let _ops = lock(&self.ops);
        let item = self.find(hex)?;
        let record = self.check_allowed(&item, Op::ChangePoint)?;
        let choice = request.point.choice(false)?;
        self.check_job_room()?;
        let point_id = self.resolve(&item, choice)?;
        let current = record
            .failover
            .clone()
            .ok_or_else(|| OpError::Io("failed over without a failover record".into()))?;
        let target = self.change_target(&current, record.disks.len())?;
        let temp_names: Vec<String> = target.temps.iter().map(|t| t.name.clone()).collect();
        let pending = planned(&target, &temp_names, point_id, current.format);
        let job = self.start_target_job(
            &item,
            &target,
            JobKind::ChangePoint,
            format!("writing the disks at point {point_id}"),
            |r, job| {
                r.state = ItemState::FailingOver;
                r.pending = Some(pending);
                r.last_job = Some(job);
                r.last_error = None;
            },
        )?;
        self.spawn_job(
            item,
            job,
            move |manager, item, job| {
                let dir = &target.dir;
                manager
                    .write_disks(
                        item,
                        point_id,
                        dir,
                        &target.temps,
                        current.format,
                        job,
                        (0, 95),
                    )
                    .inspect_err(|_| target.discard(&[]))?;
                // Each new file in the place of the one the failover wrote (and only that one).
                let mut replaced: Vec<WrittenFile> = Vec::new();
                let mut failure = None;
                for (temp, old) in target.temps.iter().zip(&current.written) {
                    let (from, to) = (
                        std::ffi::OsStr::new(&temp.name),
                        std::ffi::OsStr::new(&old.name),
                    );
                    match dir.replace_ours(from, temp.id, to, old.id()) {
                        Ok(()) => replaced.push(WrittenFile {
                            name: old.name.clone(),
                            ..temp.written()
                        }),
                        Err(error) => {
                            failure = Some(error);
                            break;
                        }
                    }
                }
                let synced = dir.sync();
                let _ops = lock(&manager.ops);
                if let Some(error) = failure {
                    target.discard(&[]);
                    if replaced.is_empty() {
                        return Err(anyhow!("{error}; no disk was replaced"));
                    }
                    // The record keeps naming what is there (for later change points and
                    // clean-ups): the disks already replaced are at the new point.
                    let count = replaced.len();
                    item.update(|r| {
                        if let Some(failover) = &mut r.failover {
                            failover.written.splice(..count, replaced);
                        }
                    })?;
                    return Err(anyhow!(
                        "{error}; disks 0..{count} were already replaced with point {point_id}, \
                         the others are still at point {}",
                        current.point_id
                    ));
                }
                synced?;
                item.update(|r| {
                    r.state = ItemState::FailedOver;
                    if let Some(failover) = &mut r.failover {
                        failover.point_id = point_id;
                        failover.written = replaced;
                    }
                    r.pending = None;
                })?;
                Ok(Some(format!("failed-over disks now at point {point_id}")))
            },
            |_, item, error| undo_pending(item, ItemState::FailedOver, error),
        )
    }

    /// Makes the failover final.
    pub fn commit(&self, hex: &str) -> Result<ItemView, OpError> {
        let _ops = lock(&self.ops);
        let item = self.find(hex)?;
        self.check_allowed(&item, Op::Commit)?;
        item.update(|r| r.state = ItemState::Committed)?;
        Ok(self.view(&item))
    }

    // ─────────────── re-protect, failback ───────────────

    /// Re-protect: the original VM's disks become the replicas of a new reverse item, a
    /// temporary OS disk is made for the original VM, and the agent of the failed-over VM
    /// runs a delta resync into them.
    pub fn reprotect(&self, hex: &str, request: ReprotectRequest) -> Result<Enabled, OpError> {
        let _ops = lock(&self.ops);
        let item = self.find(hex)?;
        let record = self.check_allowed(&item, Op::Reprotect)?;
        if request.disks.len() != record.disks.len() {
            // The request is well formed; it does not fit this item.
            return Err(OpError::Conflict {
                code: "disk_mismatch",
                message: format!(
                    "disks: the item has {} disks, {} were given; give the original VM's disk \
                     for each, OS disk first",
                    record.disks.len(),
                    request.disks.len()
                ),
            });
        }
        let mut disks = Vec::new();
        for (index, (raw, disk)) in request.disks.iter().zip(&record.disks).enumerate() {
            let path = self.check_path(raw, &format!("disks[{index}]"))?;
            let size_bytes = disk_size(&path).map_err(|why| OpError::Conflict {
                code: "disk_mismatch",
                message: format!("disks[{index}] {}: {why}", path.display()),
            })?;
            if size_bytes != disk.size_bytes {
                return Err(OpError::Conflict {
                    code: "disk_mismatch",
                    message: format!(
                        "disks[{index}] {} is {size_bytes} bytes; disk {index} of the item is {}",
                        path.display(),
                        disk.size_bytes
                    ),
                });
            }
            disks.push(DiskSpec {
                size_mib: None,
                path: Some(path.display().to_string()),
                block_size_bytes: Some(disk.block_size_bytes),
            });
        }
        let temporary = match request.temporary_os_disk {
            Some(path) => path,
            None => {
                let os = Path::new(&request.disks[0]);
                let parent = os.parent().unwrap_or(Path::new("/"));
                parent
                    .join(format!("{}-temporary-os.vhd", sanitize(&record.name)))
                    .display()
                    .to_string()
            }
        };
        let enabled = self.enable_locked(
            EnableRequest {
                name: request.name.unwrap_or_else(|| {
                    // Within the name limit however long the item's name is.
                    let keep = MAX_NAME_CHARS - "-reverse".len();
                    let stem: String = record.name.chars().take(keep).collect();
                    format!("{stem}-reverse")
                }),
                disks,
                policy: Some(PolicyRequest {
                    keep_points: Some(record.policy.keep_points),
                    keep_minutes: Some(record.policy.keep_minutes),
                    app_consistent_minutes: Some(record.policy.app_consistent_minutes),
                }),
                temporary_os_disk: Some(temporary),
            },
            Role::Reverse,
            Some(item.hex.clone()),
        )?;
        item.update(|r| {
            r.state = ItemState::Reprotected;
            r.reversed_by = Some(enabled.item.id.clone());
        })?;
        Ok(enabled)
    }

    /// Failback: final sync, disks handed back (slots released), temporary OS disk deleted.
    pub fn failback(self: &Arc<Self>, hex: &str) -> Result<JobView, OpError> {
        let _ops = lock(&self.ops);
        let item = self.find(hex)?;
        self.check_allowed(&item, Op::Failback)?;
        refuse_if_apply_failed(
            &item,
            "failback (its final sync applies every staged frame)",
        )?;
        self.check_job_room()?;
        let job = self.jobs.create(JobKind::Failback, hex, "final sync")?;
        item.update(|r| {
            r.state = ItemState::FailingBack;
            r.last_job = Some(job.id());
            r.last_error = None;
        })?;
        self.spawn_job(
            item,
            job,
            move |manager, item, job| {
                let applied = manager.stop_replication(item, true)?;
                job.progress(60, "handing the disks back");
                let _ops = lock(&manager.ops);
                let record = item.record().clone();
                let luns = lock(&manager.slots).release_item(ItemId(item.id))?;
                let mut deleted = String::new();
                if let Some(path) = &record.temporary_os_disk {
                    match std::fs::remove_file(path) {
                        Ok(()) => deleted = format!("; temporary OS disk {path} deleted"),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(anyhow!("deleting {path}: {e}")),
                    }
                }
                let point = manager
                    .meta
                    .points(item_key(&item.id))?
                    .last()
                    .map(|p| p.point_id);
                item.update(|r| {
                    r.state = ItemState::FailedBack;
                    r.temporary_os_disk = None;
                })?;
                manager.remove_item_data(item)?;
                Ok(Some(format!(
                    "final sync through seq {}, last point {}; {} disks handed back (LUNs {:?} \
                     released){deleted}",
                    applied.unwrap_or(0),
                    point.map_or("none".into(), |p| p.to_string()),
                    record.disks.len(),
                    luns.iter().map(|l| l.0).collect::<Vec<_>>()
                )))
            },
            |manager, item, error| {
                let _ = item.update(|r| {
                    r.state = ItemState::Protected;
                    r.last_error = Some(error.to_owned());
                });
                if item.repl().is_none()
                    && let Err(e) = manager.start_replication(item)
                {
                    tracing::error!(item = %item.hex, error = %crate::store::describe(&e),
                        "replication did not restart after a failed failback");
                }
            },
        )
    }

    // ─────────────── resync ───────────────

    /// Resync on demand: pause, apply what is staged, mark the log as needing a resync; the
    /// agent then runs the hash exchange and the job ends at the first point after it.
    pub fn resync(self: &Arc<Self>, hex: &str) -> Result<JobView, OpError> {
        let _ops = lock(&self.ops);
        let item = self.find(hex)?;
        self.check_allowed(&item, Op::Resync)?;
        let job = self
            .jobs
            .create(JobKind::Resync, hex, "pausing replication")?;
        item.pausing.store(true, Ordering::Release);
        item.update(|r| {
            r.state = ItemState::Resyncing;
            r.sync_from_seq = u64::MAX;
            r.last_job = Some(job.id());
            r.last_error = None;
        })?;
        self.spawn_job(
            item,
            job,
            move |manager, item, job| {
                manager.end_sessions(item)?;
                manager.discard_unappliable(item, job)?;
                job.progress(2, "applying what is staged");
                manager.wait_caught_up(item)?;
                // The log's handle out of `repl`, whose guard is dropped before the marker's
                // write + fsync (views take `repl`). The log's own mutex covers that I/O: it
                // is the log's only writer, and the item's sessions have ended.
                let log = item
                    .repl()
                    .as_ref()
                    .map(|repl| repl.log.clone())
                    .ok_or_else(|| anyhow!("the item is not replicating"))?;
                let next_seq = {
                    let mut log = lock(&log);
                    crate::testhook::pause_point("resync:marker");
                    log.require_resync("the operator asked for a delta resync")?;
                    log.next_seq()
                };
                item.update(|r| r.sync_from_seq = next_seq)?;
                item.pausing.store(false, Ordering::Release);
                job.progress(
                    5,
                    "waiting for the agent's delta resync (hash exchange, differing chunks, \
                     bookmark)",
                );
                // The supervisor ends the job at the first point after `next_seq`.
                Ok(None)
            },
            |_, item, error| {
                item.pausing.store(false, Ordering::Release);
                let _ = item.update(|r| {
                    r.state = ItemState::Protected;
                    r.sync_from_seq = 1;
                    r.last_error = Some(error.to_owned());
                });
            },
        )
    }

    /// For a resync of an `apply_failed` item: makes the delta resync required (durably,
    /// first: the replicas will miss the discarded frames), then has the worker discard the
    /// staged frames after its watermark and resume. Nothing to do for a healthy item.
    fn discard_unappliable(&self, item: &Item, job: &Job) -> anyhow::Result<()> {
        let Some((failure, frame)) = item.status().and_then(|s| s.apply_failure()) else {
            return Ok(());
        };
        job.progress(
            2,
            format!(
                "discarding the staged frames after seq {} ({frame})",
                failure.applied_seq
            ),
        );
        let (log, status) = {
            let repl = item.repl();
            let repl = repl
                .as_ref()
                .ok_or_else(|| anyhow!("the item is not replicating"))?;
            (repl.log.clone(), repl.worker.status())
        };
        lock(&log).require_resync(&format!(
            "apply_failed: {frame}; the operator asked for a delta resync"
        ))?;
        let through = status.discard_unapplied()?;
        tracing::warn!(item = %item.hex, %frame, through_seq = through,
            "staged frames discarded for the operator's resync");
        Ok(())
    }

    /// Waits until apply has applied every durable frame.
    fn wait_caught_up(&self, item: &Item) -> anyhow::Result<()> {
        let deadline = Instant::now() + CATCH_UP_WAIT;
        loop {
            let (durable, applied, failed) = match item.repl().as_ref() {
                Some(repl) => (
                    repl.reader.durable_seq(),
                    repl.worker.applied_seq(),
                    repl.worker.failed(),
                ),
                None => anyhow::bail!("the item is not replicating"),
            };
            if failed {
                let error = item.status().and_then(|s| s.error());
                anyhow::bail!(
                    "apply stopped on an error: {}",
                    error.as_deref().unwrap_or("see the appliance log")
                );
            }
            if applied >= durable {
                return Ok(());
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "apply did not catch up with staging within {CATCH_UP_WAIT:?} (applied \
                     {applied}, staged {durable})"
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    // ─────────────── disable ───────────────

    /// Disable protection: replication stopped, slots released, staging, points and created
    /// replica disks removed; attached disks and failed-over disks are left alone.
    pub fn disable(&self, hex: &str) -> Result<ItemView, OpError> {
        let (item, record) = {
            let _ops = lock(&self.ops);
            let item = self.find(hex)?;
            let record = self.check_allowed(&item, Op::Disable)?;
            item.update(|r| r.state = ItemState::Disabled)?;
            (item, record)
        };
        // Durably disabled: no operation is allowed on the item any more, and a restart
        // finishes the clean-up. The slow part (ending its sessions, draining its apply worker,
        // removing its data) runs without the ops lock, so operations on other items (a
        // failover in a disaster) never wait behind it.
        if let Err(error) = self.stop_replication(&item, false) {
            // The worker was joined (its thread ended on an error, logged): nothing of the
            // item runs any more, so its data can go. Only sessions that did not end stop it.
            if item.repl().is_some() {
                return Err(error.into());
            }
            tracing::warn!(item = %item.hex, error = %crate::store::describe(&error),
                "apply had stopped on an error; its staged frames go with the item");
        }
        if let Some(test) = &record.test_failover {
            remove_materialized(test);
        }
        if let Some(job) = record.last_job.and_then(|id| self.jobs.get(id)) {
            job.fail("protection was disabled")?;
        }
        self.remove_item_data(&item)?;
        // Clean-up complete: the record goes too (the item stays listed as disabled until the
        // appliance restarts; a crash before this purges it at the next start).
        self.data.purge_item(&item.dirs.root)?;
        tracing::info!(item = %item.hex, "protection disabled");
        Ok(self.view(&item))
    }

    /// Releases the item's slots and removes its staging, preserve files, points, created
    /// replicas and token. Idempotent (run again at start for disabled items).
    fn remove_item_data(&self, item: &Item) -> anyhow::Result<()> {
        lock(&self.slots).release_item(ItemId(item.id))?;
        for sub in ["staging", "preserve", "replicas"] {
            let path = item.dirs.root.join(sub);
            match std::fs::remove_dir_all(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
            }
        }
        match std::fs::remove_file(item.dirs.root.join(TOKEN_FILE)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).context("removing the stream token"),
        }
        self.meta.remove_item(item_key(&item.id))?;
        Ok(())
    }

    // ─────────────── supervisor ───────────────

    fn tick(&self) {
        for item in self.all_items() {
            let record = item.record().clone();
            let Some(kind) = record.state.sync_job_kind() else {
                continue;
            };
            let Some(job) = record.last_job.and_then(|id| self.jobs.get(id)) else {
                continue;
            };
            if job.view().kind != kind {
                continue;
            }
            let newest = match self.meta.latest_point(item_key(&item.id)) {
                Ok(point) => point.map(|p| p.point_id),
                Err(error) => {
                    tracing::warn!(item = %item.hex, %error, "reading points");
                    continue;
                }
            };
            match newest {
                Some(point) if point >= record.sync_from_seq => {
                    let _ops = lock(&self.ops);
                    if item.record().state != record.state {
                        continue;
                    }
                    if let Err(error) = item.update(|r| r.state = ItemState::Protected) {
                        // Retried every tick: say it once, not ten times a second.
                        let error = crate::store::describe(&error);
                        let mut last = lock(&item.tick_error);
                        if last.as_deref() != Some(error.as_str()) {
                            tracing::error!(item = %item.hex, %error,
                                "recording protected (retried until it works)");
                            *last = Some(error);
                        }
                        continue;
                    }
                    *lock(&item.tick_error) = None;
                    let _ = job.succeed(format!(
                        "synchronized; first recovery point {point} applied; protected"
                    ));
                    tracing::info!(item = %item.hex, point, "protected");
                }
                _ => {
                    let percent = self.sync_percent(&item, &record);
                    if record.sync_from_seq != u64::MAX {
                        job.progress(
                            u64::from(percent),
                            "receiving and applying; protected at the first recovery point",
                        );
                    }
                }
            }
        }
    }

    fn sync_percent(&self, item: &Item, record: &ItemRecord) -> u8 {
        if !matches!(
            record.state,
            ItemState::InitialReplication | ItemState::Reprotecting | ItemState::Resyncing
        ) {
            return 100;
        }
        let total: u64 = record
            .disks
            .iter()
            .map(|d| d.size_bytes)
            .sum::<u64>()
            .max(1);
        let applied = item
            .status()
            .map_or(0, |s| s.counters().applied_bytes.load(Ordering::Relaxed));
        (applied.saturating_mul(100) / total).min(99) as u8
    }

    // ─────────────── views ───────────────

    /// The API's view of an item.
    fn view(&self, item: &Item) -> ItemView {
        let record = item.record().clone();
        let key = item_key(&item.id);
        let points = self.meta.points(key).unwrap_or_default();
        let (staged_seq, cache_used_bytes) = item
            .repl()
            .as_ref()
            .map_or((0, 0), |r| (r.reader.durable_seq(), r.reader.used_bytes()));
        let status = item.status();
        let applied_seq = self.meta.state(key).map_or(0, |(applied, _)| applied);
        // Only while the worker waits before the frame (a replicating item); once drained by
        // a failover or disable the failure is history.
        let apply_failure = status
            .as_ref()
            .and_then(WorkerStatus::apply_failure)
            .filter(|_| record.state.replicating() && item.repl().is_some());
        let quarantine = item.quarantine();
        let health = if let Some(quarantine) = &quarantine {
            format!("quarantined: {}", quarantine.reason)
        } else if let Some((failure, frame)) = &apply_failure {
            failure.health(frame)
        } else if let Some(error) = &record.last_error {
            format!("error: {error}")
        } else if let Some(error) = status.as_ref().and_then(WorkerStatus::error) {
            format!("apply stopped: {error}")
        } else if status.as_ref().is_some_and(WorkerStatus::failed) {
            "apply stopped on an error (see the appliance log)".into()
        } else if record.state.replicating() && item.repl().is_none() {
            "not replicating (see last_error and the appliance log)".into()
        } else {
            "healthy".into()
        };
        let slots = lock(&self.slots);
        let now = now_ns();
        ItemView {
            id: item.hex.clone(),
            name: record.name.clone(),
            state: record.state,
            allowed_operations: record.allowed().into_iter().map(Op::name).collect(),
            role: record.role,
            reverse_of: record.reverse_of.clone(),
            reversed_by: record.reversed_by.clone(),
            disks: record
                .disks
                .iter()
                .map(|d| DiskView {
                    index: d.index,
                    size_bytes: d.size_bytes,
                    block_size_bytes: d.block_size_bytes,
                    path: d.path.clone(),
                    lun: slots.lun_of(ItemId(item.id), d.index).map(|l| l.0),
                    origin: d.origin,
                })
                .collect(),
            policy: record.policy,
            health,
            apply_failure: apply_failure.map(|(failure, _)| failure),
            synchronized_percent: self.sync_percent(item, &record),
            rpo_lag_ms: points
                .last()
                .filter(|_| record.state.replicating())
                .map(|p| now.saturating_sub(p.source_timestamp_ns) / 1_000_000),
            cache_used_bytes,
            cache_capacity_bytes: self.options.cache_bytes,
            applied_seq,
            staged_seq: staged_seq.max(applied_seq),
            points: points.len() as u64,
            latest_point_id: points.last().map(|p| p.point_id),
            latest_app_point_id: points
                .iter()
                .rev()
                .find(|p| p.consistency == Consistency::App)
                .map(|p| p.point_id),
            temporary_os_disk: record.temporary_os_disk.clone(),
            test_failover: record.test_failover.clone(),
            failover: record.failover.clone(),
            last_job: record.last_job,
            last_error: record.last_error,
            quarantine,
        }
    }

    /// Every item.
    pub fn items(&self) -> Vec<ItemView> {
        self.all_items().iter().map(|i| self.view(i)).collect()
    }

    /// One item.
    pub fn item_view(&self, hex: &str) -> Result<ItemView, OpError> {
        let item = self.find(hex)?;
        Ok(self.view(&item))
    }

    /// The recovery points of an item, oldest first.
    pub fn points(&self, hex: &str) -> Result<Vec<engine::meta::PointRecord>, OpError> {
        let item = self.find(hex)?;
        self.meta
            .points(item_key(&item.id))
            .map_err(|e| OpError::Io(format!("item {hex}: {e}")))
    }

    /// The slot table.
    pub fn slots(&self) -> SlotsView {
        let slots = lock(&self.slots);
        let counts = slots.counts();
        let slot_count = slots.slot_count();
        SlotsView {
            slot_count,
            usable: slot_count.saturating_sub(1),
            free: counts.free as u32,
            reserved: counts.reserved as u32,
            attached: counts.attached as u32,
            slots: slots
                .table()
                .into_iter()
                .map(|row| {
                    let (state, item, disk_index, path) = match row.state {
                        SlotState::Free => ("free", None, None, None),
                        SlotState::Appliance => ("appliance", None, None, None),
                        SlotState::Reserved {
                            item, disk_index, ..
                        } => ("reserved", Some(item.to_string()), Some(disk_index), None),
                        SlotState::Attached {
                            item,
                            disk_index,
                            path,
                        } => (
                            "attached",
                            Some(item.to_string()),
                            Some(disk_index),
                            Some(path.display().to_string()),
                        ),
                    };
                    SlotView {
                        lun: row.lun.0,
                        state,
                        item,
                        disk_index,
                        path,
                    }
                })
                .collect(),
        }
    }

    /// Jobs, newest first.
    pub fn jobs(&self) -> Vec<JobView> {
        self.jobs.list()
    }

    /// One job.
    pub fn job(&self, id: u64) -> Result<JobView, OpError> {
        self.jobs
            .get(id)
            .map(|j| j.view())
            .ok_or_else(|| OpError::NotFound {
                code: "job_not_found",
                message: format!("no job {id}"),
            })
    }

    /// The data directory (canonical).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Metrics of every item, the slots and the jobs.
    pub fn metrics(&self) -> crate::metrics::MetricsSnapshot {
        let mut items = Vec::new();
        for item in self.all_items() {
            let view = self.view(&item);
            let counters = item.status();
            items.push(crate::metrics::ItemMetrics {
                id: view.id.clone(),
                name: view.name.clone(),
                state: view.state.name().to_owned(),
                rpo_lag_seconds: view.rpo_lag_ms.map(|ms| ms as f64 / 1000.0),
                cache_used_bytes: view.cache_used_bytes,
                cache_capacity_bytes: view.cache_capacity_bytes,
                applied_bytes_total: counters
                    .as_ref()
                    .map_or(0, |s| s.counters().applied_bytes.load(Ordering::Relaxed)),
                applied_frames_total: counters
                    .as_ref()
                    .map_or(0, |s| s.counters().applied_frames.load(Ordering::Relaxed)),
                applied_seq: view.applied_seq,
                staged_seq: view.staged_seq,
                synchronized_percent: view.synchronized_percent,
                points: view.points,
                apply_failed_seq: view.apply_failure.as_ref().map(|f| f.seq),
                apply_latency: counters
                    .as_ref()
                    .map(|s| s.counters().batch_latency.snapshot())
                    .unwrap_or_default(),
            });
        }
        let slots = self.slots();
        let port = self.port.get().map(PortHandle::stats).unwrap_or_default();
        let mut jobs_by_state: BTreeMap<(String, String), u64> = BTreeMap::new();
        for job in self.jobs.list() {
            *jobs_by_state
                .entry((job.kind.name().to_owned(), job.state.name().to_owned()))
                .or_default() += 1;
        }
        crate::metrics::MetricsSnapshot {
            items,
            slots_total: slots.slot_count,
            slots_free: slots.free,
            slots_attached: slots.attached,
            slots_reserved: slots.reserved,
            jobs_by_state: jobs_by_state
                .into_iter()
                .map(|((kind, state), n)| (kind, state, n))
                .collect(),
            data_port_sessions_total: port.sessions,
            data_port_connections: port.active as u64,
        }
    }
}

/// 409 `apply_failed` when the item's apply waits before a staged frame that can never be
/// applied: `what` needs every staged frame applied.
fn refuse_if_apply_failed(item: &Item, what: &str) -> Result<(), OpError> {
    match item.status().and_then(|s| s.apply_failure()) {
        Some((failure, frame)) => Err(OpError::Conflict {
            code: "apply_failed",
            message: format!(
                "item {}: {what} needs every staged frame applied, but {frame}; applied \
                 through seq {}. {}",
                item.hex, failure.applied_seq, failure.what_to_do
            ),
        }),
        None => Ok(()),
    }
}

/// What an operator can do about a quarantined item (shown with the reason).
const QUARANTINE_ACTION: &str = "the item is not served and its slots stay held. Repair or \
     restore the named file (e.g. from a backup) and restart the appliance to serve the item \
     again, or disable it (DELETE /v1/items/{id}, `appliance disable`) to remove it: that \
     releases its slots and deletes its staging, recovery points and created replica disks \
     (attached and failed-over disks are left alone)";

/// Checks a record read from disk against its directory and header.
fn check_record(
    hex: &str,
    record: &ItemRecord,
    header: Option<&StreamHeader>,
) -> Result<(), String> {
    let Some(header) = header else {
        return Err(format!(
            "item {hex}: header.drs is missing but item.json exists"
        ));
    };
    if record.version != 1 {
        return Err(format!(
            "item {hex}: item.json has format version {}; this build reads version 1",
            record.version
        ));
    }
    if record.id != hex {
        return Err(format!(
            "item {hex}: item.json records item id {:?}",
            record.id
        ));
    }
    if record.state == ItemState::Quarantined {
        return Err(format!(
            "item {hex}: item.json records the state quarantined"
        ));
    }
    let indexed = record
        .disks
        .iter()
        .enumerate()
        .all(|(i, d)| d.index as usize == i);
    if !indexed || record.geometries() != header.disks {
        return Err(format!(
            "item {hex}: item.json's disks ({:?}) do not match header.drs ({:?})",
            record.geometries(),
            header.disks
        ));
    }
    Ok(())
}

/// A record for a quarantined item whose `item.json` cannot be read: its disks from the
/// header, with the paths the slot table holds for them.
fn stand_in_record(
    hex: &str,
    root: &Path,
    header: Option<&StreamHeader>,
    attached: &[(ItemId, u32, PathBuf)],
) -> ItemRecord {
    let now = now_ns();
    let id = parse_item_hex(hex).unwrap_or_default();
    let disks = header.map_or_else(Vec::new, |header| {
        header
            .disks
            .iter()
            .enumerate()
            .map(|(index, geometry)| {
                let path = attached
                    .iter()
                    .find(|(item, disk, _)| item.0 == id && *disk as usize == index)
                    .map(|(_, _, path)| path.clone());
                let origin = match &path {
                    Some(path) if !path.starts_with(root) => DiskOrigin::Attached,
                    _ => DiskOrigin::Created,
                };
                DiskRecord {
                    index: index as u32,
                    size_bytes: geometry.size_bytes,
                    block_size_bytes: geometry.block_size_bytes,
                    path: path.map_or_else(String::new, |p| p.display().to_string()),
                    origin,
                }
            })
            .collect()
    });
    ItemRecord {
        version: 1,
        id: hex.to_owned(),
        name: header.map_or_else(String::new, |h| h.item_name.clone()),
        state: ItemState::Quarantined,
        role: Role::Forward,
        reverse_of: None,
        reversed_by: None,
        disks,
        policy: Policy {
            keep_points: 1,
            keep_minutes: 0,
            app_consistent_minutes: 60,
        },
        temporary_os_disk: None,
        test_failover: None,
        failover: None,
        pending: None,
        sync_from_seq: 1,
        last_job: None,
        last_error: None,
        created_ns: now,
        updated_ns: now,
    }
}

/// Undoes a failed job that was writing disks: removes what it wrote, returns the item to
/// `state` and records the error.
fn undo_pending(item: &Item, state: ItemState, error: &str) {
    // Bound first: in `if let` the record's guard would live through the removals.
    let pending = item.record().pending.clone();
    if let Some(pending) = pending {
        remove_materialized(&pending);
    }
    if let Err(e) = item.update(|r| {
        r.state = state;
        r.pending = None;
        r.last_error = Some(error.to_owned());
    }) {
        tracing::error!(item = %item.hex, error = %crate::store::describe(&e), "recording a failed job");
    }
}

/// The record of a job that writes `names` into `target`: its temporary files are what it
/// wrote so far.
fn planned(target: &Target, names: &[String], point_id: u64, format: Format) -> Materialized {
    let dir = target.dir.path();
    Materialized {
        point_id,
        target_dir: dir.display().to_string(),
        format,
        files: names
            .iter()
            .map(|name| dir.join(name).display().to_string())
            .collect(),
        created_dir: target.created_dir,
        target_dir_id: Some(target.dir.id().into()),
        written: target.written(),
    }
}

/// Removes what a job recorded it wrote (see `crate::target::remove_recorded`): files at the
/// recorded names, the listed names and their `.partial` names, only where the identity is a
/// recorded one; then the directory if the job created it and it is empty.
fn remove_materialized(materialized: &Materialized) {
    let names: Vec<String> = materialized
        .files
        .iter()
        .filter_map(|file| Path::new(file).file_name()?.to_str())
        .flat_map(|name| [name.to_owned(), partial_name(name)])
        .collect();
    for left in crate::target::remove_recorded(
        &materialized.target_dir,
        materialized.target_dir_id,
        &materialized.written,
        &names,
        materialized.created_dir,
    ) {
        tracing::warn!(target_dir = %materialized.target_dir, %left, "clean-up left something");
    }
}

/// Size of a disk file or block device, or why it is not a disk.
fn disk_size(path: &Path) -> Result<u64, String> {
    let metadata = std::fs::metadata(path).map_err(|e| format!("cannot stat: {e}"))?;
    let kind = metadata.file_type();
    if kind.is_file() {
        Ok(metadata.len())
    } else if kind.is_block_device() {
        use std::io::Seek;
        File::open(path)
            .and_then(|mut f| f.seek(std::io::SeekFrom::End(0)))
            .map_err(|e| format!("cannot read its size: {e}"))
    } else {
        Err("not a regular file or block device".into())
    }
}

/// A name usable in a file name.
/// Longest path component (NAME_MAX) and whole path (PATH_MAX without its NUL), in bytes.
const MAX_COMPONENT_BYTES: usize = 255;
const MAX_PATH_BYTES: usize = 4095;

/// The lengths the kernel refuses with ENAMETOOLONG, checked before any file is touched.
fn check_path_lengths(path: &str) -> Result<(), String> {
    if path.len() > MAX_PATH_BYTES {
        return Err(format!(
            "is {} bytes long; a path has at most {MAX_PATH_BYTES}",
            path.len()
        ));
    }
    match path.split('/').find(|c| c.len() > MAX_COMPONENT_BYTES) {
        Some(component) => Err(format!(
            "has a component of {} bytes; a file name has at most {MAX_COMPONENT_BYTES}",
            component.len()
        )),
        None => Ok(()),
    }
}

/// A disk larger than the filesystem allows for one file (EFBIG at its creation).
#[derive(Debug, thiserror::Error)]
#[error(
    "{field}: {size_bytes} bytes is larger than the filesystem of {path} allows for one file ({source})"
)]
struct DiskTooLarge {
    field: String,
    size_bytes: u64,
    path: String,
    source: std::io::Error,
}

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

// ───────────────────────────── data port ─────────────────────────────

fn refusal(status: Status, message: impl Into<String>) -> Refusal {
    Refusal::new(status, message.into())
}

impl Manager {
    fn session_item(&self, item_id: &[u8; 16], token: &[u8]) -> Result<Arc<Item>, Refusal> {
        let item = self.item(item_id).ok_or_else(|| {
            refusal(
                Status::UnknownItem,
                format!("no protected item {}", item_hex(item_id)),
            )
        })?;
        if item.token.is_empty() || !tokens_equal(&item.token, token) {
            return Err(refusal(
                Status::BadToken,
                format!("the token does not match item {}'s stream token", item.hex),
            ));
        }
        let state = item.record().state;
        if !state.replicating() {
            return Err(refusal(
                Status::NotReplicating,
                format!(
                    "item {} is {}: it takes no frames in that state",
                    item.hex,
                    state.name()
                ),
            ));
        }
        if let Some(frame) = item.status().and_then(|s| s.unappliable()) {
            return Err(refusal(
                Status::NotReplicating,
                format!(
                    "item {} is apply_failed: {frame}; it takes no frames until an operator \
                     runs resync (or disable)",
                    item.hex
                ),
            ));
        }
        if item.pausing.load(Ordering::Acquire) {
            return Err(refusal(
                Status::Busy,
                format!("item {} is pausing for a resync; retry shortly", item.hex),
            ));
        }
        Ok(item)
    }
}

impl ItemRegistry for Manager {
    fn open_stream(
        &self,
        item_id: &[u8; 16],
        token: &[u8],
        resync: bool,
    ) -> Result<StreamSession, Refusal> {
        let item = self.session_item(item_id, token)?;
        if !resync && item.record().state == ItemState::Resyncing {
            // Until the resync's bookmark is applied the replica may be half old, half new:
            // only the agent's resync session may stream.
            return Err(refusal(
                Status::ResyncRequired,
                format!(
                    "item {} is resyncing: fetch the chunk hashes and reconnect with the \
                     RESYNC flag",
                    item.hex
                ),
            ));
        }
        if resync {
            self.wait_caught_up(&item).map_err(|e| {
                refusal(
                    Status::StagingFailed,
                    format!("item {}: {}", item.hex, crate::store::describe(&e)),
                )
            })?;
        }
        let repl = item.repl();
        let repl = repl.as_ref().ok_or_else(|| {
            refusal(
                Status::StagingFailed,
                format!(
                    "item {}'s replication is not running (see the appliance log)",
                    item.hex
                ),
            )
        })?;
        let lease = SessionLease::try_acquire(&item.busy).ok_or_else(|| {
            refusal(
                Status::Busy,
                format!(
                    "another session is streaming item {}; retry after it ends",
                    item.hex
                ),
            )
        })?;
        Ok(StreamSession {
            log: repl.log.clone(),
            lease,
        })
    }

    fn replica(
        &self,
        item_id: &[u8; 16],
        token: &[u8],
        disk_index: u16,
    ) -> Result<ReplicaAccess, Refusal> {
        let item = self.session_item(item_id, token)?;
        // One lock of the record, released before anything waits.
        let (path, disk_count) = {
            let record = item.record();
            let path = record
                .disks
                .get(usize::from(disk_index))
                .map(|d| PathBuf::from(&d.path));
            (path, record.disks.len())
        };
        let path = path.ok_or_else(|| {
            refusal(
                Status::UnknownDisk,
                format!(
                    "item {} has {disk_count} disks, no disk {disk_index}",
                    item.hex
                ),
            )
        })?;
        let caught_up = |item: &Item| {
            self.wait_caught_up(item).map_err(|e| {
                refusal(
                    Status::ReplicaReadFailed,
                    format!("item {}: {}", item.hex, crate::store::describe(&e)),
                )
            })
        };
        // The hashes must reflect every acknowledged frame, and the replica must not be
        // written while it is hashed: apply what is staged, then take the item's streaming
        // lease (no session can stage frames while the guard lives), then apply what a session
        // staged in between. Apply then has nothing left to write.
        let busy = || {
            refusal(
                Status::Busy,
                format!(
                    "a session is streaming item {}; its replica cannot be hashed while it \
                     changes; retry after the session ends",
                    item.hex
                ),
            )
        };
        if item.busy.load(Ordering::Acquire) {
            return Err(busy());
        }
        caught_up(&item)?;
        let lease = SessionLease::try_acquire(&item.busy).ok_or_else(busy)?;
        caught_up(&item)?;
        Ok(ReplicaAccess {
            path,
            guard: Some(Box::new(lease)),
        })
    }
}
