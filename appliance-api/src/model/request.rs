//! Request bodies of the control API: enable, the lifecycle operations and their point
//! choices. The server refuses unknown fields; integers are taken in either JSON notation.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::export::{DiskMode, ExportMode};
use super::item::Format;

mod schema;

/// Longest item name, in characters (at most 4 bytes each: within the stream header's 255).
pub const MAX_NAME_CHARS: usize = 63;

/// A disk of an enable request: `size_mib` to create one, or `path` to attach one. Its
/// OpenAPI schema (`oneOf` the two forms) is written by hand in `crate::schema`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// Create a new replica disk of this size.
    #[serde(
        default,
        deserialize_with = "crate::number::opt_u64_integral",
        skip_serializing_if = "Option::is_none"
    )]
    pub size_mib: Option<u64>,
    /// Attach this existing disk (file or block device).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// 512 or 4096 (default 4096).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size_bytes: Option<u32>,
}

impl DiskSpec {
    /// A new replica disk of `size_mib` MiB (block size: the appliance's default when `None`).
    pub fn create(size_mib: u64, block_size_bytes: Option<u32>) -> Self {
        Self {
            size_mib: Some(size_mib),
            path: None,
            block_size_bytes,
        }
    }

    /// An existing disk attached by path.
    pub fn attach(path: impl Into<String>) -> Self {
        Self {
            size_mib: None,
            path: Some(path.into()),
            block_size_bytes: None,
        }
    }
}

/// Policy fields of a request (defaults from the appliance's settings).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyRequest {
    /// Recovery points kept, 1..=100000.
    #[schema(minimum = 1, maximum = 100_000)]
    #[serde(
        default,
        deserialize_with = "crate::number::opt_u64_integral",
        skip_serializing_if = "Option::is_none"
    )]
    pub keep_points: Option<u64>,
    /// Age limit of points in minutes (0 = none), at most a year (527040).
    #[schema(minimum = 0, maximum = 527_040)]
    #[serde(
        default,
        deserialize_with = "crate::number::opt_u64_integral",
        skip_serializing_if = "Option::is_none"
    )]
    pub keep_minutes: Option<u64>,
    /// App-consistent point frequency in minutes (informational), 1..=1440.
    #[schema(minimum = 1, maximum = 1440)]
    #[serde(
        default,
        deserialize_with = "crate::number::opt_u64_integral",
        skip_serializing_if = "Option::is_none"
    )]
    pub app_consistent_minutes: Option<u64>,
}

/// Enable protection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyRequest>,
    /// Re-protect style: create a temporary 1 GiB fixed VHD here for the original VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = schema::optional_path)]
    pub temporary_os_disk: Option<String>,
}

/// A recovery point choice: `"latest"`, `"latest-processed"`, `"latest-app"` or a point id.
/// Its OpenAPI schemas (with and without `"latest"`) are in `crate::schema`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PointSpec {
    /// A point id.
    Id(#[serde(deserialize_with = "crate::number::u64_integral")] u64),
    /// A named choice.
    Named(String),
}

impl PointSpec {
    /// Failover only: apply everything received, make a point of it and use it.
    pub fn latest() -> Self {
        Self::Named("latest".into())
    }

    /// The newest point already applied.
    pub fn latest_processed() -> Self {
        Self::Named("latest-processed".into())
    }

    /// The newest app-consistent point.
    pub fn latest_app() -> Self {
        Self::Named("latest-app".into())
    }
}

/// Test failover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MaterializeRequest {
    /// The point.
    #[schema(schema_with = schema::point_processed)]
    pub point: PointSpec,
    /// Directory for the disks (created if missing); copy mode only (export mode writes no
    /// files: leave it out or empty).
    #[serde(default)]
    #[schema(schema_with = schema::path_unless_export)]
    pub target_dir: String,
    /// Image format (copy mode).
    #[serde(default)]
    pub format: Format,
    /// Copy the disks into files (default), or serve them over NBD at once as a writable
    /// drill (`GET /v1/exports/{export_id}` has the URIs).
    #[serde(default)]
    pub mode: DiskMode,
}

/// Failover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FailoverRequest {
    /// The point.
    #[schema(schema_with = schema::point_or_latest)]
    pub point: PointSpec,
    /// Directory for the disks (created if missing).
    #[schema(schema_with = schema::path)]
    pub target_dir: String,
    /// Image format.
    #[serde(default)]
    pub format: Format,
    /// The operator says the source VM is already shut down (nothing more will arrive).
    #[serde(default)]
    pub source_shut_down: bool,
    /// Copy the disks into the target directory first (default), or serve them over NBD at
    /// once (raw only): the VM runs on the export while a job copies it into the target
    /// files, then the export serves those files.
    #[serde(default)]
    pub mode: DiskMode,
}

/// Export a recovery point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExportRequest {
    /// The point (`latest-processed`, `latest-app` or a point id).
    #[schema(schema_with = schema::point_processed)]
    pub point: PointSpec,
    /// Read-only (default) or a writable drill.
    #[serde(default)]
    pub mode: ExportMode,
}

/// Promote a test failover's drill to the failover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PromoteRequest {
    /// Directory for the failover's disk files (created if missing; raw): a job copies the
    /// drill's point and its writes into them while the VM keeps running on the export.
    #[schema(schema_with = schema::path)]
    pub target_dir: String,
    /// The operator says the source VM is already shut down (nothing more will arrive).
    #[serde(default)]
    pub source_shut_down: bool,
}

/// Change the failover's point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangePointRequest {
    /// The point.
    #[schema(schema_with = schema::point_processed)]
    pub point: PointSpec,
}

/// Re-protect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReprotectRequest {
    /// The original VM's OS + data disks, in the item's disk order (absolute paths).
    #[schema(schema_with = schema::reprotect_disks)]
    pub disks: Vec<String>,
    /// Where to create the temporary 1 GiB OS disk (default beside `disks[0]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = schema::optional_path)]
    pub temporary_os_disk: Option<String>,
    /// Name of the reverse item (default `<name>-reverse`), as `EnableRequest.name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = schema::optional_name)]
    pub name: Option<String>,
}
