//! The control API of a real `appliance serve` process, over raw HTTP/1.1 on loopback (the
//! answers' contents through the typed client): the health probe needs no token, everything
//! else a bearer token read from `DATA_DIR/api-token`; errors are JSON with a code;
//! `/openapi.json` documents the paths; SIGTERM stops it all with exit status 0.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use appliance_api::model::ItemState;
use serde_json::Value;

fn appliance(args: &[&str], data: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_appliance"));
    command.args(args).arg("--data-dir").arg(data);
    command
}

/// One request on a fresh connection; returns the status and the body parsed as JSON.
fn get(addr: &str, path: &str, token: Option<&str>) -> (u16, Value) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let body = serde_json::from_str(body).unwrap_or_else(|e| panic!("{path}: {e}: {body:?}"));
    (status, body)
}

fn error_code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap()
}

#[test]
fn api_needs_the_token_lists_items_and_names_errors() {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let data = tmp.path().join("data");
    let out = appliance(
        &[
            "item", "create", "--name", "vm-api", "--disk", "4", "--disk", "2:512",
        ],
        &data,
    )
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let item = stdout
        .lines()
        .find_map(|l| l.strip_prefix("item "))
        .unwrap();

    let mut server = appliance(
        &[
            "serve",
            "--data-addr",
            "127.0.0.1:0",
            "--nbd-addr",
            "127.0.0.1:0",
            "--api-addr",
            "127.0.0.1:0",
        ],
        &data,
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let stderr = server.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        BufReader::new(stderr).read_to_string(&mut text).unwrap();
        text
    });
    let mut lines = BufReader::new(server.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.starts_with("data port listening on "), "{first:?}");
    let second = lines.next().unwrap().unwrap();
    let addr = second
        .strip_prefix("control API listening on ")
        .unwrap_or_else(|| panic!("{second:?}"))
        .to_owned();
    let token = std::fs::read_to_string(data.join("api-token")).unwrap();
    let token = token.trim();
    assert_eq!(token.len(), 64);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(data.join("api-token"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    assert_eq!(
        get(&addr, "/health", None),
        (200, serde_json::json!({"status": "ok"}))
    );

    let (status, body) = get(&addr, "/v1/items", None);
    assert_eq!((status, error_code(&body)), (401, "unauthorized"));
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("missing")
    );
    let (status, body) = get(&addr, "/v1/items", Some(&"0".repeat(64)));
    assert_eq!((status, error_code(&body)), (401, "unauthorized"));
    assert!(body["error"]["message"].as_str().unwrap().contains("wrong"));

    // The answers themselves are read through the typed client (appliance-api).
    let client = appliance_api::Client::new(&addr, Some(token.to_owned())).unwrap();
    let items = client.items().unwrap();
    assert_eq!(items.len(), 1, "{items:?}");
    assert_eq!(items[0].id, item);

    // While a source agent streams (its session holds the item's staging log), the API still
    // answers, and reports what is durable.
    let stream_token = stdout
        .lines()
        .find_map(|l| l.strip_prefix("token "))
        .unwrap();
    let data_addr = first.strip_prefix("data port listening on ").unwrap();
    let mut item_id = [0u8; 16];
    for (i, byte) in item_id.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&item[2 * i..2 * i + 2], 16).unwrap();
    }
    let disks = vec![
        engine::delta::DiskGeometry {
            size_bytes: 4 << 20,
            block_size_bytes: 4096,
        },
        engine::delta::DiskGeometry {
            size_bytes: 2 << 20,
            block_size_bytes: 512,
        },
    ];
    let agent = source_agent::sender::Agent::connect(source_agent::sender::AgentConfig::new(
        data_addr.parse().unwrap(),
        item_id,
        stream_token.as_bytes(),
        "vm-api",
        disks,
    ))
    .unwrap();
    for i in 0..8u64 {
        agent.write(0, i * 4096, &[i as u8 + 1; 4096]).unwrap();
    }
    let acked = agent.flush(Duration::from_secs(30)).unwrap();
    let now = client.items().unwrap();
    assert_eq!(now[0].staged_seq, acked, "{now:?}");
    drop(agent);
    assert_eq!(items[0].name, "vm-api");
    assert_eq!(items[0].health, "healthy");
    assert_eq!(items[0].points, 0);
    let disks = &items[0].disks;
    assert_eq!(disks.len(), 2, "{items:?}");
    assert_eq!(
        (disks[0].size_bytes, disks[0].block_size_bytes),
        (4 << 20, 4096)
    );
    assert_eq!(
        (disks[1].size_bytes, disks[1].block_size_bytes),
        (2 << 20, 512)
    );
    assert_eq!((disks[0].lun, disks[1].lun), (Some(1), Some(2)));
    assert_eq!(items[0].state, ItemState::InitialReplication);

    let info = client.appliance().unwrap();
    assert_eq!(info.items, 1);
    assert_eq!(info.api_addr, addr.as_str());

    assert_eq!(client.points(item).unwrap(), []);
    let unknown = "0".repeat(32);
    let (status, body) = get(&addr, &format!("/v1/items/{unknown}/points"), Some(token));
    assert_eq!((status, error_code(&body)), (404, "item_not_found"));
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&unknown)
    );
    let (status, body) = get(&addr, "/v1/items/not-an-id/points", Some(token));
    assert_eq!((status, error_code(&body)), (400, "bad_item_id"));
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not-an-id")
    );
    // Bad input never gets a 5xx, with or without a token.
    let (status, body) = get(&addr, "/v1/items/%FF%FE/points", Some(token));
    assert_eq!((status, error_code(&body)), (400, "bad_item_id"));
    let (status, body) = get(&addr, "/v1/items/%FF%FE/points", None);
    assert_eq!((status, error_code(&body)), (401, "unauthorized"));
    let (status, body) = get(&addr, "/v2/nothing", Some(token));
    assert_eq!((status, error_code(&body)), (404, "not_found"));

    let (status, body) = get(&addr, "/openapi.json", None);
    assert_eq!(status, 200);
    for path in [
        "/health",
        "/v1/appliance",
        "/v1/items",
        "/v1/items/{id}/points",
    ] {
        assert!(body["paths"].get(path).is_some(), "{path} missing: {body}");
    }

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(server.wait().unwrap().success(), "serve exits 0 on SIGTERM");
    let stderr = stderr.join().unwrap();
    // The token never goes to stderr (the journal); where its file is does.
    assert!(!stderr.contains(token), "{stderr}");
    assert!(stderr.contains("api-token"), "{stderr}");
}
