//! An export's durable record (JSON in `control.redb`'s `exports` table): enough to serve it
//! again after a restart under the same names.

use appliance_api::model::{CopyState, ExportMode, ExportPurpose};
use serde::{Deserialize, Serialize};

/// What is stored of an export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ExportRecord {
    /// Export id, 32 hex digits.
    pub(crate) id: String,
    /// The item, 32 hex digits.
    pub(crate) item: String,
    /// Why it exists.
    pub(crate) purpose: ExportPurpose,
    /// Read-only or drill.
    pub(crate) mode: ExportMode,
    /// The point served.
    pub(crate) point_id: u64,
    /// When it was made, ns since the Unix epoch.
    pub(crate) created_ns: u64,
    /// The NBD name of each disk (secrets: 32 hex digits of random bits).
    pub(crate) names: Vec<String>,
    /// A failover's copy into its target files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) copy: Option<CopyState>,
    /// A failover whose copy is done serves these files (by disk), no longer the point.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) targets: Vec<String>,
}

impl ExportRecord {
    /// The stem of disk `index`'s overlay files in the export's directory.
    pub(crate) fn overlay_stem(index: usize) -> String {
        format!("disk-{index}")
    }

    /// Whether it is served from its target files (a failover whose copy is done).
    pub(crate) fn switched(&self) -> bool {
        self.copy == Some(CopyState::Done) && !self.targets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_and_refuses_unknown_fields() {
        let record = ExportRecord {
            id: "00".repeat(16),
            item: "11".repeat(16),
            purpose: ExportPurpose::Failover,
            mode: ExportMode::Drill,
            point_id: 7,
            created_ns: 1,
            names: vec!["ab".repeat(16)],
            copy: Some(CopyState::Done),
            targets: vec!["/data/out/disk-0.raw".into()],
        };
        let json = serde_json::to_vec(&record).expect("encodes");
        let back: ExportRecord = serde_json::from_slice(&json).expect("decodes");
        assert_eq!(back, record);
        assert!(back.switched());
        let mut value: serde_json::Value = serde_json::from_slice(&json).expect("json");
        value["surprise"] = serde_json::json!(1);
        let error = serde_json::from_value::<ExportRecord>(value).expect_err("refused");
        assert!(error.to_string().contains("surprise"), "{error}");
    }
}
