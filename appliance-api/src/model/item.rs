//! Items on the wire: their lifecycle state, the operations it allows, disks, policy, the
//! disks written at a point, and the item view the API answers with.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::job::JobView;

/// Where an item is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
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
}

impl std::fmt::Display for ItemState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A lifecycle operation, as the API names it (the last segment of its path).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Op {
    /// Disks at a point for a test.
    TestFailover,
    /// Remove the test disks.
    TestFailoverCleanup,
    /// The test failover's drill becomes the failover (export mode).
    TestFailoverPromote,
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
            Self::TestFailoverPromote => "test-failover-promote",
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

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
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

/// A file's identity: device, inode number and birth time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FileIdentity {
    /// Device number.
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
    /// Birth time, ns since the Unix epoch (0 where the filesystem reports none).
    #[serde(default)]
    pub birth_ns: u64,
}

/// A file a job created: its name in the target directory and its identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct WrittenFile {
    /// The file's name in the target directory.
    pub name: String,
    /// Device number.
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
    /// Birth time, ns since the Unix epoch (0 where the filesystem reports none).
    #[serde(default)]
    pub birth_ns: u64,
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
    /// Export mode: the export serving these disks over NBD (`GET /v1/exports/{id}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export_id: Option<String>,
    /// A failover in export mode: its copy into the target files (commit waits for `done`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy: Option<super::export::CopyState>,
    /// The files the job created in the directory, by name and identity: clean-up removes
    /// only these, change point replaces only these. A running job lists its temporary
    /// (`.partial`) files here.
    #[serde(default)]
    pub written: Vec<WrittenFile>,
}

/// Why an item was quarantined at start, and what the operator can do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Quarantine {
    /// What is damaged, naming the file.
    pub reason: String,
    /// What the operator should do.
    pub action: String,
    /// The state its record held, when the record could be read.
    pub recorded_state: Option<ItemState>,
}

/// An item's `apply_failed` health as the control API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ApplyFailure {
    /// Sequence number of the staged frame that cannot be applied.
    pub seq: u64,
    /// The disk it writes, when its header could be read.
    pub disk_index: Option<u16>,
    /// Where on that disk, in bytes.
    pub offset_bytes: Option<u64>,
    /// The staging segment holding it, for a frame damaged in the staging log.
    pub segment: Option<String>,
    /// Its byte offset in that segment.
    pub segment_offset_bytes: Option<u64>,
    /// What is wrong with it.
    pub reason: String,
    /// Apply stopped here: every frame up to it is in the replicas, and every recovery point
    /// at or below it restores exactly.
    pub applied_seq: u64,
    /// What the operator can do.
    pub what_to_do: String,
}

/// A replica disk as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ItemView {
    /// Item id, 32 hex digits.
    pub id: String,
    /// Name.
    pub name: String,
    /// Lifecycle state.
    pub state: ItemState,
    /// Operations allowed now.
    pub allowed_operations: Vec<Op>,
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
    pub apply_failure: Option<ApplyFailure>,
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

impl ItemView {
    /// Whether its health is `healthy`.
    pub fn is_healthy(&self) -> bool {
        self.health == "healthy"
    }
}

/// What enable and re-protect return.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Enabled {
    /// The new item.
    pub item: ItemView,
    /// Its stream token (64 hex digits; shown only here).
    pub stream_token: String,
    /// Its replication job.
    pub job: JobView,
}
