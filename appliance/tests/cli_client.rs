//! The CLI client (`appliance status`, `enable`, `failover`, …) against a real `appliance
//! serve` process: every command's exit status and output, with a source agent streaming.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::{Server, item_id};
use engine::delta::{Consistency, DiskGeometry};
use serde_json::Value;
use source_agent::sender::{Agent, AgentConfig};

fn cli(server: &Server, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_appliance"))
        .args(args)
        .env("APPLIANCE_API", &server.api)
        .env("APPLIANCE_TOKEN", &server.token)
        .env_remove("APPLIANCE_TOKEN_FILE")
        .output()
        .unwrap()
}

/// Runs and checks the exit status; returns stdout.
fn ok(server: &Server, args: &[&str]) -> String {
    let out = cli(server, args);
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    eprintln!("$ appliance {}\n{stdout}{stderr}", args.join(" "));
    assert!(out.status.success(), "{args:?}: {stdout}{stderr}");
    stdout
}

fn fails(server: &Server, args: &[&str], code: i32) -> String {
    let out = cli(server, args);
    let stderr = String::from_utf8(out.stderr).unwrap();
    eprintln!("$ appliance {}\n{stderr}", args.join(" "));
    assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
    stderr
}

fn json(server: &Server, args: &[&str]) -> Value {
    serde_json::from_str(&ok(server, args)).unwrap()
}

#[test]
fn the_cli_drives_the_lifecycle() {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let server = Server::start(&data, &["--slots", "8"]);
    let target = |name: &str| data.join(name).display().to_string();

    let status = ok(&server, &["status"]);
    assert!(status.contains("8 slots (7 usable): 7 free"), "{status}");
    assert_eq!(ok(&server, &["items"]), "no items\n");

    let enabled = json(
        &server,
        &[
            "enable",
            "--name",
            "vm1",
            "--disk",
            "8",
            "--disk",
            "4:512",
            "--keep-points",
            "100",
            "--json",
        ],
    );
    let item = enabled["item"]["id"].as_str().unwrap().to_owned();
    let token = enabled["stream_token"].as_str().unwrap().to_owned();
    let job = enabled["job"]["id"].as_u64().unwrap().to_string();

    // Wrong state: exit 2 with the state and the allowed operations.
    let refused = fails(&server, &["commit", "vm1"], 2);
    assert!(refused.contains("(HTTP 409 wrong_state)"), "{refused}");
    assert!(refused.contains("state: initial_replication"), "{refused}");
    assert!(refused.contains("allowed operations: disable"), "{refused}");

    let geometry = vec![
        DiskGeometry {
            size_bytes: 8 << 20,
            block_size_bytes: 4096,
        },
        DiskGeometry {
            size_bytes: 4 << 20,
            block_size_bytes: 512,
        },
    ];
    let mut config = AgentConfig::new(
        server.data,
        item_id(&item),
        token.as_bytes(),
        "vm1",
        geometry,
    );
    config.backoff_initial = Duration::from_millis(20);
    let agent = Agent::connect(config).unwrap();
    agent.write(0, 0, &vec![7u8; 1 << 20]).unwrap();
    let first = agent.bookmark(Consistency::App, 1, 1, "first").unwrap();
    let done = ok(&server, &["jobs", &job, "--wait"]);
    assert!(done.contains("succeeded"), "{done}");
    agent.write(1, 4096, &vec![9u8; 8192]).unwrap();
    agent.bookmark(Consistency::Crash, 2, 2, "second").unwrap();

    let items = ok(&server, &["items"]);
    assert!(
        items.contains("vm1") && items.contains("protected"),
        "{items}"
    );
    let shown = ok(&server, &["item", &item[..6]]);
    assert!(
        shown.contains("allowed operations  test-failover"),
        "{shown}"
    );
    let points = ok(&server, &["points", "vm1"]);
    assert!(points.contains(&format!("{first}  ")), "{points}");
    assert!(points.contains("first"), "{points}");
    ok(&server, &["slots"]);

    let test = ok(
        &server,
        &[
            "test-failover",
            "vm1",
            "--point",
            "latest-app",
            "--target",
            &target("t1"),
            "--wait",
        ],
    );
    assert!(test.contains("succeeded"), "{test}");
    assert!(std::fs::read_dir(data.join("t1")).unwrap().count() >= 2);
    fails(
        &server,
        &[
            "test-failover",
            "vm1",
            "--point",
            "99999",
            "--target",
            &target("t2"),
        ],
        2,
    );
    ok(&server, &["test-failover-cleanup", "vm1"]);

    let over = ok(
        &server,
        &[
            "failover",
            "vm1",
            "--point",
            "latest",
            "--target",
            &target("f1"),
            "--format",
            "vhd",
            "--source-shut-down",
            "--wait",
        ],
    );
    assert!(over.contains("succeeded"), "{over}");
    let change = ok(
        &server,
        &[
            "change-point",
            "vm1",
            "--point",
            &first.to_string(),
            "--wait",
        ],
    );
    assert!(change.contains("succeeded"), "{change}");
    let committed = ok(&server, &["commit", "vm1"]);
    assert!(committed.contains("committed"), "{committed}");
    let jobs = ok(&server, &["jobs"]);
    assert!(jobs.contains("failover"), "{jobs}");
    let disabled = ok(&server, &["disable", "vm1"]);
    assert!(disabled.contains("disabled"), "{disabled}");

    // Input errors: exit 2; a wrong token: exit 1.
    fails(&server, &["item", "nope"], 2);
    fails(&server, &["jobs", "424242"], 2);
    let out = Command::new(env!("CARGO_BIN_EXE_appliance"))
        .args(["items", "--api", &server.api, "--token", &"0".repeat(64)])
        .env_remove("APPLIANCE_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    server.stop();
}
