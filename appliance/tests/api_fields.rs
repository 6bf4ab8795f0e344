//! Request fields the filesystem cannot take get a named 4xx from a real `serve`, never a 500:
//! a disk larger than the filesystem allows for one file, a NUL byte in a path, a path
//! component over 255 bytes; item names as the OpenAPI document states them (characters).

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::time::Duration;

use common::{Server, item_id};
use engine::delta::{Consistency, DiskGeometry};
use serde_json::{Value, json};
use source_agent::sender::{Agent, AgentConfig};

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("")
}

/// Enables a 4 MiB item and streams one write and a bookmark: `protected`, with a point.
fn protected_item(server: &Server) -> String {
    let enabled = server.expect(
        "POST",
        "/v1/items",
        Some(json!({"name": "fields", "disks": [{"size_mib": 4}]})),
        201,
    );
    let id = enabled["item"]["id"].as_str().unwrap().to_owned();
    let token = enabled["stream_token"].as_str().unwrap().to_owned();
    let geometry = vec![DiskGeometry {
        size_bytes: 4 << 20,
        block_size_bytes: 4096,
    }];
    let mut config = AgentConfig::new(
        server.data,
        item_id(&id),
        token.as_bytes(),
        "fields",
        geometry,
    );
    config.backoff_initial = Duration::from_millis(20);
    config.max_attempts = 50;
    let agent = Agent::connect(config).unwrap();
    agent.write(0, 0, &[7u8; 4096]).unwrap();
    agent.bookmark(Consistency::Crash, 1, 1, "one").unwrap();
    agent.close(Duration::from_secs(60)).unwrap();
    server.wait_job(enabled["job"]["id"].as_u64().unwrap());
    id
}

#[test]
fn paths_and_sizes_the_filesystem_cannot_take_get_a_named_4xx() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let server = Server::start(&data, &[]);
    let free_before = server.expect("GET", "/v1/slots", None, 200)["free"].clone();
    let long = "n".repeat(300);
    let inside = |rest: &str| format!("{}/{rest}", data.display());

    // size_mib within the API's range (64 TiB) but beyond ext4's largest file (16 TiB).
    let ext4 = nix::sys::statfs::statfs(&data).unwrap().filesystem_type()
        == nix::sys::statfs::EXT4_SUPER_MAGIC;
    let (status, body) = server.call(
        "POST",
        "/v1/items",
        Some(json!({"name": "huge", "disks": [{"size_mib": 64u64 << 20}]})),
    );
    assert_ne!(status, 500, "{body}");
    if ext4 {
        assert_eq!((status, code(&body)), (409, "disk_too_large"), "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("disks[0].size_mib"), "{message}");
        // Nothing was left: slots and items as before.
        assert_eq!(
            server.expect("GET", "/v1/slots", None, 200)["free"],
            free_before
        );
        assert_eq!(server.expect("GET", "/v1/items", None, 200), json!([]));
    }

    // Enable's paths: a NUL byte is malformed (400); a component over 255 bytes is a path
    // the filesystem refuses (403), whether the rest exists or not.
    for (body, status, expected, field) in [
        (
            json!({"name": "x", "disks": [{"size_mib": 4}], "temporary_os_disk": inside("t\u{0}.vhd")}),
            400,
            "bad_request",
            "temporary_os_disk",
        ),
        (
            json!({"name": "x", "disks": [{"path": inside("d\u{0}isk")}]}),
            400,
            "bad_request",
            "disks[0].path",
        ),
        (
            json!({"name": "x", "disks": [{"size_mib": 4}], "temporary_os_disk": inside(&format!("{long}.vhd"))}),
            403,
            "path_refused",
            "temporary_os_disk",
        ),
        (
            json!({"name": "x", "disks": [{"path": inside(&format!("{long}/disk"))}]}),
            403,
            "path_refused",
            "disks[0].path",
        ),
    ] {
        let (got, answer) = server.call("POST", "/v1/items", Some(body.clone()));
        assert_eq!((got, code(&answer)), (status, expected), "{body}: {answer}");
        assert_eq!(answer["error"]["field"], field, "{answer}");
    }

    // Names: characters, as the document states (maxLength 63).
    let (status, body) = server.call(
        "POST",
        "/v1/items",
        Some(json!({"name": "a".repeat(64), "disks": [{"size_mib": 4}]})),
    );
    assert_eq!((status, code(&body)), (400, "bad_request"), "{body}");
    assert_eq!(body["error"]["field"], "name");
    let wide = "\u{1F600}".repeat(63); // 252 bytes: within the stream header's 255
    let enabled = server.expect(
        "POST",
        "/v1/items",
        Some(json!({"name": wide, "disks": [{"size_mib": 4}], "policy": {"keep_points": 5.0}})),
        201,
    );
    assert_eq!(enabled["item"]["name"], wide);
    assert_eq!(enabled["item"]["policy"]["keep_points"], 5);
    let id = enabled["item"]["id"].as_str().unwrap();
    server.expect("DELETE", &format!("/v1/items/{id}"), None, 200);

    // target_dir of test failover and failover.
    let id = protected_item(&server);
    for operation in ["test-failover", "failover"] {
        let path = format!("/v1/items/{id}/{operation}");
        for (target, status, expected) in [
            (inside("restore\u{0}"), 400, "bad_request"),
            (inside(&format!("restore/{long}")), 403, "path_refused"),
        ] {
            let (got, answer) = server.call(
                "POST",
                &path,
                Some(json!({"point": "latest-processed", "target_dir": target})),
            );
            assert_eq!(
                (got, code(&answer)),
                (status, expected),
                "{operation}: {answer}"
            );
            assert_eq!(answer["error"]["field"], "target_dir", "{answer}");
        }
    }
    // Nothing of those requests changed the item.
    let view = server.expect("GET", &format!("/v1/items/{id}"), None, 200);
    assert_eq!(view["state"], "protected", "{view}");
    server.stop();
}
