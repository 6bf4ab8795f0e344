//! Lock discipline of a running `serve` (ARCHITECTURE.md, "Locks"): an error path that takes a
//! lock twice hangs every later API call, so each such path is driven here and the API must
//! still answer afterwards.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use appliance_api::Method;
use appliance_api::model::{DiskSpec, EnableRequest};
use common::{Server, item_id};
use engine::delta::{Consistency, DiskGeometry};
use source_agent::sender::{Agent, AgentConfig};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long an answer may take on a loaded machine; a deadlock never answers.
const ANSWER_WAIT: Duration = Duration::from_secs(60);

/// `method path` on `server`, or a panic naming the call if it does not answer in time.
fn answers(server: &Server, method: Method, path: &str, body: Option<&EnableRequest>) -> u16 {
    let client = server.api().clone();
    let path_owned = path.to_owned();
    let body = body.map(|b| serde_json::to_string(b).unwrap());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(client.send(method, &path_owned, body));
    });
    match rx.recv_timeout(ANSWER_WAIT) {
        Ok(Ok((status, _))) => status,
        Ok(Err(error)) => panic!("{method:?} {path}: {error}"),
        Err(_) => panic!("{method:?} {path} got no answer (timed out): a lock is held"),
    }
}

/// Enable of one 1 MiB disk.
fn one_disk(name: &str) -> EnableRequest {
    EnableRequest {
        name: name.into(),
        disks: vec![DiskSpec::create(1, None)],
        policy: None,
        temporary_os_disk: None,
    }
}

/// A slot commit that fails in enable cleans up and answers; the manager's locks are free
/// afterwards (once, the clean-up took the slot table's lock that the failed commit's `if let`
/// still held, with `ops` held too: enable never answered and every later call hung).
#[test]
fn a_failed_slot_commit_in_enable_answers_and_leaves_the_api_working() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start_with_env(
        data.path(),
        "127.0.0.1:0",
        &[],
        &[("APPLIANCE_TEST_FAIL_AT", "enable:slots-commit")],
    );
    let enable = one_disk("vm");
    let status = answers(&server, Method::Post, "/v1/items", Some(&enable));
    assert_eq!(status, 500, "the failed commit is an I/O error");
    for path in [
        "/v1/appliance",
        "/v1/items",
        "/v1/slots",
        "/metrics",
        "/v1/jobs",
    ] {
        assert_eq!(answers(&server, Method::Get, path, None), 200, "GET {path}");
    }
    // The reservation was freed: no slot stays reserved or attached.
    let slots = server.api().slots().unwrap();
    assert_eq!(slots.reserved, 0, "{slots:?}");
    assert_eq!(slots.attached, 0, "{slots:?}");
    // `ops` is free: another operation runs (and fails the same way, with an answer).
    assert_eq!(
        answers(&server, Method::Post, "/v1/items", Some(&enable)),
        500
    );
    server.stop();
}

/// While the resync job writes the resync marker (under the staging log's lock, held here by
/// `APPLIANCE_TEST_PAUSE_AT`), the item's views answer: the job no longer holds the item's
/// `repl` lock (which every view takes) across that write + fsync.
#[test]
fn item_views_answer_while_the_resync_job_writes_its_marker() {
    let data = tempfile::tempdir().unwrap();
    let release = data.path().join("release-resync");
    let pause = format!("resync:marker={}", release.display());
    let server = Server::start_with_env(
        data.path(),
        "127.0.0.1:0",
        &[],
        &[("APPLIANCE_TEST_PAUSE_AT", pause.as_str())],
    );
    // An item in `protected`: the agent's first copy (one write) and a point.
    let enabled = server.api().enable(&one_disk("vm")).unwrap();
    let id = enabled.item.id.clone();
    let token = enabled.stream_token.clone();
    let geometry = vec![DiskGeometry {
        size_bytes: 1 << 20,
        block_size_bytes: 4096,
    }];
    let mut config = AgentConfig::new(server.data, item_id(&id), token.as_bytes(), "vm", geometry);
    config.max_attempts = 50;
    let agent = Agent::connect(config).unwrap();
    agent.write(0, 0, &[7u8; 4096]).unwrap();
    agent.bookmark(Consistency::Crash, 1, 1, "first").unwrap();
    agent.close(ANSWER_WAIT).unwrap();
    server.wait_job(enabled.job.id);

    let job = server.api().resync(&id).unwrap();
    let reached = data.path().join("release-resync.reached");
    let deadline = Instant::now() + ANSWER_WAIT;
    while !reached.exists() {
        assert!(
            Instant::now() < deadline,
            "the resync job never reached its marker: {job:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for path in [
        format!("/v1/items/{id}"),
        "/v1/items".to_owned(),
        "/metrics".to_owned(),
    ] {
        assert_eq!(
            answers(&server, Method::Get, &path, None),
            200,
            "GET {path}"
        );
    }
    std::fs::write(&release, b"go").unwrap();
    server.stop();
}

/// Every `Mutex` and `Condvar` of appliance/ and engine/ is in ARCHITECTURE.md's "Locks"
/// section, as `Struct.field` (a tuple struct by its name): a new lock is documented with its
/// place in the order.
#[test]
fn every_lock_of_the_code_is_in_the_architecture_document() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let doc = std::fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap();
    let start = doc.find("## Locks\n").expect("a Locks section");
    let section = &doc[start..];
    let section = &section[..section[3..]
        .find("\n## ")
        .map_or(section.len(), |end| end + 3)];
    let mut locks = Vec::new();
    for dir in ["appliance/src", "engine/src"] {
        let mut pending = vec![root.join(dir)];
        while let Some(dir) = pending.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    pending.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    locks.extend(locks_in(&std::fs::read_to_string(&path).unwrap()));
                }
            }
        }
    }
    assert!(locks.len() >= 20, "the scan finds the locks: {locks:?}");
    let missing: Vec<&String> = locks
        .iter()
        .filter(|name| !section.contains(&format!("`{name}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "not in ARCHITECTURE.md's Locks section (as `Struct.field`): {missing:?}"
    );
}

/// `Struct.field` of each `field: Mutex<…>`, `Arc<Mutex<…>>` or `Condvar` in `source`, and
/// `Struct` of a tuple struct around one.
fn locks_in(source: &str) -> Vec<String> {
    let mut found = Vec::new();
    // The struct whose braces the line is in (fields only; not a function's parameters).
    let mut owner: Option<String> = None;
    for line in source.lines() {
        let line = line.trim_start();
        if line == "}" {
            owner = None;
            continue;
        }
        // Any visibility: `pub`, `pub(crate)`, `pub(super)`, `pub(in path)`.
        let line = match line.strip_prefix("pub(") {
            Some(rest) => rest.split_once(") ").map_or(line, |(_, field)| field),
            None => line.strip_prefix("pub ").unwrap_or(line),
        };
        if let Some(rest) = line.strip_prefix("struct ") {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            let after = &rest[name.len()..];
            if after.starts_with("(Arc<Mutex<") || after.starts_with("(Mutex<") {
                found.push(name.clone());
            }
            owner = after.trim_end().ends_with('{').then_some(name);
            continue;
        }
        let Some((field, ty)) = line.split_once(": ") else {
            continue;
        };
        let is_field = !field.is_empty() && field.chars().all(|c| c.is_alphanumeric() || c == '_');
        let is_lock = ["Mutex<", "Arc<Mutex<", "Condvar,"]
            .iter()
            .any(|prefix| ty.starts_with(prefix));
        if let Some(owner) = owner.as_ref().filter(|_| is_field && is_lock) {
            found.push(format!("{owner}.{field}"));
        }
    }
    found
}
