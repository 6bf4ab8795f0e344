//! The model's JSON: names and values as the API has always written them.

use serde_json::json;

use super::*;

#[test]
fn requests_serialize_without_absent_fields() {
    let request = EnableRequest {
        name: "web-01".into(),
        disks: vec![DiskSpec::attach("/a"), DiskSpec::create(64, Some(512))],
        policy: None,
        temporary_os_disk: None,
    };
    assert_eq!(
        serde_json::to_value(&request).expect("json"),
        json!({"name": "web-01", "disks": [{"path": "/a"},
            {"size_mib": 64, "block_size_bytes": 512}]})
    );
    assert_eq!(
        serde_json::to_value(PointSpec::Id(2000)).expect("json"),
        json!(2000)
    );
    assert_eq!(
        serde_json::to_value(PointSpec::latest_app()).expect("json"),
        json!("latest-app")
    );
    // Integral floats are integers, as JSON Schema counts them.
    let parsed: PolicyRequest =
        serde_json::from_value(json!({"keep_points": 3.0})).expect("policy");
    assert_eq!(parsed.keep_points, Some(3));
    assert!(serde_json::from_value::<PolicyRequest>(json!({"odd": 1})).is_err());
}

#[test]
fn answers_round_trip_with_their_names() {
    let job = json!({"id": 7, "kind": "change_point", "item": "ab", "state": "running",
        "percent": 5, "message": "writing", "created_ns": 1});
    let view: JobView = serde_json::from_value(job.clone()).expect("job");
    assert_eq!(view.kind, JobKind::ChangePoint);
    assert!(!view.is_finished());
    assert_eq!(serde_json::to_value(&view).expect("json"), job);
    let ops = serde_json::to_value([Op::TestFailoverCleanup, Op::ChangePoint]).expect("ops");
    assert_eq!(ops, json!(["test-failover-cleanup", "change-point"]));
    for op in [Op::TestFailover, Op::Commit, Op::Disable, Op::Resync] {
        assert_eq!(serde_json::to_value(op).expect("op"), json!(op.name()));
    }
    for state in [
        ItemState::InitialReplication,
        ItemState::FailedBack,
        ItemState::Quarantined,
    ] {
        assert_eq!(
            serde_json::to_value(state).expect("state"),
            json!(state.name())
        );
    }
    let slot: SlotView = serde_json::from_value(
        json!({"lun": 0, "state": "appliance", "item": null, "disk_index": null, "path": null}),
    )
    .expect("slot");
    assert_eq!(slot.state, SlotUse::Appliance);
    let point: PointView = serde_json::from_value(json!({"id": 2, "consistency": "app",
        "origin": "bookmark", "bookmark_id": 1, "source_timestamp_ns": 3,
        "processed_at_ns": 4, "label": ""}))
    .expect("point");
    assert_eq!(point.consistency, PointConsistency::App);
    let error: ErrorBody = serde_json::from_value(json!({"error": {"code": "wrong_state",
        "message": "m", "state": "failed_over", "allowed_operations": ["commit"]}}))
    .expect("error");
    assert_eq!(error.error.state, Some(ItemState::FailedOver));
    assert_eq!(
        serde_json::to_value(ErrorDetail {
            code: "x".into(),
            ..ErrorDetail::default()
        })
        .expect("json"),
        json!({"code": "x", "message": ""})
    );
}
