//! Bad requests to a real `appliance serve` get a 4xx naming what was wrong and change
//! nothing: 401 without or with a wrong token, 400 for malformed bodies and fields, 403 for
//! paths outside the data directory and the disk stores, 404 for unknown items and jobs, 409
//! for the wrong state and for more disks than free slots. No request here gets a 5xx.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use common::{Server, request};
use serde_json::{Value, json};

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("")
}

#[test]
fn bad_requests_are_refused_with_a_named_reason_and_change_nothing() {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let data = tmp.path().join("data");
    let store = tmp.path().join("store");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::create_dir_all(&store).unwrap();
    let server = Server::start(
        &data,
        &["--slots", "4", "--disk-store", store.to_str().unwrap()],
    );
    let slots_before = server.expect("GET", "/v1/slots", None, 200);
    assert_eq!(slots_before["usable"], 3);

    // 401.
    for token in [None, Some("0".repeat(64))] {
        let (status, body) = request(&server.api, "GET", "/v1/items", token.as_deref(), None);
        assert_eq!((status, code(&body)), (401, "unauthorized"), "{body}");
    }
    let (status, _) = request(&server.api, "GET", "/health", None, None);
    assert_eq!(status, 200);

    // 400: malformed bodies and fields, each named.
    let cases = [
        (json!("not an object"), "bad_request", ""),
        (json!({"disks": [{"size_mib": 4}]}), "bad_request", "name"),
        (
            json!({"name": "x", "disks": [{"size_mib": 4}], "colour": 1}),
            "bad_request",
            "colour",
        ),
        (json!({"name": "x", "disks": []}), "bad_request", "disks"),
        (
            json!({"name": "", "disks": [{"size_mib": 4}]}),
            "bad_request",
            "name",
        ),
        (
            json!({"name": "x", "disks": [{"size_mib": 0}]}),
            "bad_request",
            "size_mib",
        ),
        (
            json!({"name": "x", "disks": [{"size_mib": 4, "block_size_bytes": 1024}]}),
            "bad_request",
            "block_size_bytes",
        ),
        (
            json!({"name": "x", "disks": [{}]}),
            "bad_request",
            "exactly one",
        ),
        (
            json!({"name": "x", "disks": [{"size_mib": 4}], "policy": {"keep_points": 0}}),
            "bad_request",
            "keep_points",
        ),
        (
            json!({"name": "x", "disks": [{"size_mib": -4}]}),
            "bad_request",
            "size_mib",
        ),
    ];
    for (body, expected, mentions) in cases {
        let (status, answer) = server.call("POST", "/v1/items", Some(body.clone()));
        assert_eq!(
            (status, code(&answer)),
            (400, expected),
            "{body} → {answer}"
        );
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(mentions),
            "{body}: {message:?} should name {mentions:?}"
        );
    }
    // 403: paths outside the data directory and the disk stores, or into its own files.
    let outside = tmp.path().join("elsewhere.img");
    std::fs::write(&outside, vec![0u8; 1 << 20]).unwrap();
    let inside_items = data.join("items").join("x.img");
    for path in [
        outside.display().to_string(),
        "/etc/passwd".to_owned(),
        format!("{}/../elsewhere.img", store.display()),
        "relative/disk.img".to_owned(),
        inside_items.display().to_string(),
        data.join("meta.redb").display().to_string(),
    ] {
        let (status, answer) = server.call(
            "POST",
            "/v1/items",
            Some(json!({"name": "x", "disks": [{"path": path}]})),
        );
        assert_eq!(
            (status, code(&answer)),
            (403, "path_refused"),
            "{path}: {answer}"
        );
        assert_eq!(answer["error"]["field"], "disks[0].path");
    }
    // A disk of the wrong size (not a multiple of its block size): 409 disk_mismatch.
    let odd = store.join("odd.img");
    std::fs::write(&odd, vec![0u8; 5000]).unwrap();
    let (status, answer) = server.call(
        "POST",
        "/v1/items",
        Some(json!({"name": "x", "disks": [{"path": odd}]})),
    );
    assert_eq!((status, code(&answer)), (409, "disk_mismatch"), "{answer}");

    // 409: more disks than free slots, with the counts; nothing changes.
    let (status, answer) = server.call(
        "POST",
        "/v1/items",
        Some(json!({"name": "big", "disks": [{"size_mib": 1}, {"size_mib": 1}, {"size_mib": 1}, {"size_mib": 1}]})),
    );
    assert_eq!(
        (status, code(&answer)),
        (409, "not_enough_slots"),
        "{answer}"
    );
    assert_eq!(
        (
            answer["error"]["needed"].as_u64(),
            answer["error"]["free"].as_u64()
        ),
        (Some(4), Some(3))
    );
    assert_eq!(server.expect("GET", "/v1/slots", None, 200), slots_before);
    assert_eq!(server.expect("GET", "/v1/items", None, 200), json!([]));
    assert!(
        std::fs::read_dir(data.join("items"))
            .unwrap()
            .next()
            .is_none(),
        "no item directory left"
    );

    // An item in a disk store is fine; then the state machine refuses what does not fit.
    let disk = store.join("vm-disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let enabled = server.expect(
        "POST",
        "/v1/items",
        Some(json!({"name": "vm", "disks": [{"path": disk}, {"size_mib": 1}]})),
        201,
    );
    let item = enabled["item"]["id"].as_str().unwrap().to_owned();
    // The same disk cannot be attached twice.
    let (status, answer) = server.call(
        "POST",
        "/v1/items",
        Some(json!({"name": "again", "disks": [{"path": disk}]})),
    );
    assert_eq!((status, code(&answer)), (409, "path_in_use"), "{answer}");
    for (method, path, body) in [
        ("POST", format!("/v1/items/{item}/commit"), None),
        ("POST", format!("/v1/items/{item}/failback"), None),
        (
            "POST",
            format!("/v1/items/{item}/test-failover/cleanup"),
            None,
        ),
        (
            "POST",
            format!("/v1/items/{item}/change-point"),
            Some(json!({"point": 1})),
        ),
        (
            "POST",
            format!("/v1/items/{item}/reprotect"),
            Some(json!({"disks": [disk]})),
        ),
        (
            "POST",
            format!("/v1/items/{item}/test-failover"),
            Some(json!({"point": "latest-processed", "target_dir": data.join("t")})),
        ),
    ] {
        let (status, answer) = server.call(method, &path, body);
        assert_eq!(
            (status, code(&answer)),
            (409, "wrong_state"),
            "{path}: {answer}"
        );
        assert_eq!(answer["error"]["state"], "initial_replication");
        assert_eq!(answer["error"]["allowed_operations"], json!(["disable"]));
    }
    // 400 for a malformed point even before the state is checked? No: state first, then
    // fields — but a body that does not parse is always 400.
    let (status, answer) = server.call(
        "POST",
        &format!("/v1/items/{item}/failover"),
        Some(json!({"point": [1, 2], "target_dir": "/x"})),
    );
    assert_eq!((status, code(&answer)), (400, "bad_request"), "{answer}");

    // 404 and 400 for ids.
    let unknown = "ab".repeat(16);
    for (path, status, expected) in [
        (format!("/v1/items/{unknown}"), 404, "item_not_found"),
        (format!("/v1/items/{unknown}/points"), 404, "item_not_found"),
        ("/v1/items/zz".to_owned(), 400, "bad_item_id"),
        ("/v1/jobs/999999".to_owned(), 404, "job_not_found"),
        ("/v1/jobs/abc".to_owned(), 400, "bad_job_id"),
        ("/v1/nothing".to_owned(), 404, "not_found"),
    ] {
        let (got, answer) = server.call("GET", &path, None);
        assert_eq!((got, code(&answer)), (status, expected), "{path}: {answer}");
    }
    let (status, answer) = server.call(
        "POST",
        &format!("/v1/items/{unknown}/failover"),
        Some(json!({"point": "latest", "target_dir": "/x"})),
    );
    assert_eq!((status, code(&answer)), (404, "item_not_found"), "{answer}");

    // Metrics name the item and the slots.
    let (status, metrics) = server.call("GET", "/metrics", None);
    assert_eq!(status, 200);
    let metrics = metrics.as_str().unwrap();
    assert!(metrics.contains(&format!("item=\"{item}\"")), "{metrics}");
    assert!(
        metrics.contains("appliance_slots{state=\"free\"} 1"),
        "{metrics}"
    );

    // Disable frees the slots, leaves the attached disk alone, deletes the created one.
    server.expect("DELETE", &format!("/v1/items/{item}"), None, 200);
    assert!(disk.exists(), "an attached disk is never deleted");
    let slots = server.expect("GET", "/v1/slots", None, 200);
    assert_eq!(slots["free"], 3, "{slots}");
    let (status, answer) = server.call("DELETE", &format!("/v1/items/{item}"), None);
    assert_eq!((status, code(&answer)), (409, "wrong_state"), "{answer}");
    server.stop();
}
