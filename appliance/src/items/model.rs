//! The control API's wire model: every request and answer type (serde + OpenAPI schema).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::jobs::JobView;

/// Longest item name, in characters (at most 4 bytes each: within the stream header's 255).
pub const MAX_NAME_CHARS: usize = 63;

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
}

impl std::fmt::Display for ItemState {
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
