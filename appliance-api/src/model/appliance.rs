//! The appliance-wide answers: liveness, appliance information, the slot table, recovery
//! points, and the one error shape every non-2xx answer has.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::item::ItemState;

/// Liveness.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// Always `ok`.
    pub status: String,
}

/// The appliance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ApplianceInfo {
    /// Version of the appliance binary.
    pub version: String,
    /// Its data directory.
    pub data_dir: String,
    /// Items (every state).
    pub items: usize,
    /// Address of the data port (source agents).
    pub data_addr: String,
    /// Address of this API.
    pub api_addr: String,
    /// Slots: total, usable, free.
    pub slot_count: u32,
    /// Usable slots (LUN 0 is the appliance's).
    pub slots_usable: u32,
    /// Free slots.
    pub slots_free: u32,
    /// Jobs running now.
    pub jobs_running: usize,
}

/// What a LUN holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SlotUse {
    /// LUN 0: the appliance's own disk.
    Appliance,
    /// Free for a replica disk.
    Free,
    /// Reserved by an operation in flight.
    Reserved,
    /// Holding a replica disk.
    Attached,
}

impl SlotUse {
    /// Snake-case name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Appliance => "appliance",
            Self::Free => "free",
            Self::Reserved => "reserved",
            Self::Attached => "attached",
        }
    }
}

impl std::fmt::Display for SlotUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One row of the slot table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SlotView {
    /// The LUN.
    pub lun: u32,
    /// `appliance`, `free`, `reserved` or `attached`.
    pub state: SlotUse,
    /// The item of the disk.
    pub item: Option<String>,
    /// The disk's index in its item.
    pub disk_index: Option<u32>,
    /// The disk.
    pub path: Option<String>,
}

/// The slot table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
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

/// How consistent a recovery point is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PointConsistency {
    /// Crash-consistent.
    Crash,
    /// Application-consistent (the source quiesced its applications).
    App,
}

/// Who made a recovery point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PointOrigin {
    /// A bookmark from the source.
    Bookmark,
    /// Made by the appliance (`latest`).
    Latest,
}

/// A recovery point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PointView {
    /// Point id: the sequence number of the frame that made it.
    pub id: u64,
    /// `crash` or `app`.
    pub consistency: PointConsistency,
    /// `bookmark` (from the source) or `latest` (made by the appliance).
    pub origin: PointOrigin,
    /// The source's bookmark id (0 for a latest point).
    pub bookmark_id: u64,
    /// The source's time of the instant, ns since the Unix epoch.
    pub source_timestamp_ns: u64,
    /// When the appliance made it processed, ns since the Unix epoch.
    pub processed_at_ns: u64,
    /// The source's label of the bookmark (empty for none).
    pub label: String,
}

/// The one error shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable code (see docs/design/control-api.md): `unauthorized`, `bad_request`,
    /// `bad_item_id`, `bad_job_id`, `path_refused`, `item_not_found`, `job_not_found`,
    /// `point_not_found`, `not_found`, `method_not_allowed`, `wrong_state`,
    /// `not_enough_slots`, `path_in_use`, `job_running`, `too_many_jobs`, `disk_mismatch`,
    /// `io_error`.
    pub code: String,
    /// For people.
    pub message: String,
    /// The request field at fault (`bad_request`, `path_refused`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// The item's state (`wrong_state`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<ItemState>,
    /// What the item allows now (`wrong_state`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_operations: Option<Vec<String>>,
    /// Slots needed (`not_enough_slots`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub needed: Option<usize>,
    /// Slots free (`not_enough_slots`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free: Option<usize>,
}
