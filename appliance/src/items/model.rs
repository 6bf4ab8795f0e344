//! The control API's wire types, as the item manager uses them: defined once in the
//! `appliance-api` crate (serde + OpenAPI schema) and re-exported here; plus the record's own
//! disk entry, which is not on the wire.

use serde::{Deserialize, Serialize};

pub use appliance_api::model::{
    ChangePointRequest, CopyState, DiskMode, DiskOrigin, DiskSpec, DiskView, EnableRequest,
    Enabled, ExportMode, ExportPurpose, ExportRequest, ExportView, FailoverRequest, FileIdentity,
    Format, ItemState, ItemView, MAX_NAME_CHARS, MaterializeRequest, Materialized, PointSpec,
    Policy, PolicyRequest, PromoteRequest, Quarantine, ReprotectRequest, Role, SlotUse, SlotView,
    SlotsView, WrittenFile,
};

/// One replica disk of an item, as its record (`item.json`) keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
