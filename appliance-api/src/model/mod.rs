//! Every request and answer type of the control API, defined once: serde gives the JSON,
//! utoipa's `ToSchema` on the same type gives the OpenAPI document the appliance serves.

mod appliance;
mod export;
mod item;
mod job;
mod request;

pub use appliance::{
    ApplianceInfo, ErrorBody, ErrorDetail, Health, PointConsistency, PointOrigin, PointView,
    SlotUse, SlotView, SlotsView,
};
pub use export::{CopyState, DiskMode, ExportDiskView, ExportMode, ExportPurpose, ExportView};
pub use item::{
    ApplyFailure, DiskOrigin, DiskView, Enabled, FileIdentity, Format, ItemState, ItemView,
    Materialized, Op, Policy, Quarantine, Role, WrittenFile,
};
pub use job::{JobKind, JobState, JobView};
pub use request::{
    ChangePointRequest, DiskSpec, EnableRequest, ExportRequest, FailoverRequest, MAX_NAME_CHARS,
    MaterializeRequest, PointSpec, PolicyRequest, PromoteRequest, ReprotectRequest,
};

#[cfg(test)]
mod tests;
