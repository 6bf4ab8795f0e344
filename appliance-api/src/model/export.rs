//! Exports on the wire: a recovery point's disks served over NBD, read-only or as a writable
//! drill, and how test failover and failover use them.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// What a client of an export may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ExportMode {
    /// Reads only; writes are refused with EPERM.
    #[default]
    ReadOnly,
    /// Writable: the writes are kept in a sparse overlay on the appliance's disk, never in
    /// a replica or a recovery point, and dropped with the export.
    Drill,
}

impl ExportMode {
    /// Snake-case name.
    pub fn name(self) -> &'static str {
        match self {
            Self::ReadOnly => "read_only",
            Self::Drill => "drill",
        }
    }
}

/// Why an export exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ExportPurpose {
    /// Asked for by `POST /v1/items/{id}/exports`; removed by `DELETE /v1/exports/{id}`.
    Export,
    /// A test failover in export mode; removed by its clean-up.
    TestFailover,
    /// A failover in export mode: the VM runs on it; a job copies it into the target files,
    /// then it serves those files.
    Failover,
}

impl ExportPurpose {
    /// Snake-case name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Export => "export",
            Self::TestFailover => "test_failover",
            Self::Failover => "failover",
        }
    }
}

/// How test failover and failover hand out the disks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DiskMode {
    /// Copy every disk into files in the target directory (a job; the disks are usable when it
    /// ends).
    #[default]
    Copy,
    /// Serve the disks over NBD at once (writable, an overlay keeps the writes). A failover
    /// also copies them into the target directory in the background, then serves those files.
    Export,
}

/// One disk of an export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ExportDiskView {
    /// Disk index (0 = OS disk).
    pub index: u32,
    /// Size.
    pub size_bytes: u64,
    /// The NBD URI (`nbd://host:port/name`); the name is a secret of 128 random bits.
    pub uri: String,
    /// Bytes written by clients (in the overlay, or into the target files once switched).
    pub written_bytes: u64,
}

/// The copy of a failover in export mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CopyState {
    /// The job is copying the point and the overlay into the target files.
    Copying,
    /// Copied; the export serves the target files (commit is allowed).
    Done,
    /// The copy failed (see the job); the export keeps serving the point and the overlay.
    Failed,
}

/// An export as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ExportView {
    /// Export id, 32 hex digits (not the NBD name).
    pub id: String,
    /// The item.
    pub item: String,
    /// Why it exists.
    pub purpose: ExportPurpose,
    /// Read-only or drill.
    pub mode: ExportMode,
    /// The recovery point served (pinned against retention while the export exists).
    pub point_id: u64,
    /// When it was made, ns since the Unix epoch.
    pub created_ns: u64,
    /// One per disk, in disk order.
    pub disks: Vec<ExportDiskView>,
    /// NBD sessions open now on its disks (past the handshake), summed over the disks.
    pub connections: u32,
    /// A failover's copy into its target files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy: Option<CopyState>,
}
