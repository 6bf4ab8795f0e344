//! `GET /metrics` of a real `appliance serve` with an item, recovery points and jobs present,
//! checked by Prometheus' own `promtool check metrics` (parser and linter).
//!
//! `promtool` is a required tool of this project (Debian package `prometheus`;
//! `scripts/install-tools.sh` installs it, CI runs that script). When it is missing the test
//! fails with a loud message in CI (`CI` set) and skips with the same message elsewhere.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Server, item_id};
use engine::delta::{Consistency, DiskGeometry};
use source_agent::sender::{Agent, AgentConfig};

/// Runs `promtool check metrics` on `text`; `None` when promtool is not installed outside CI.
fn promtool_check(text: &str) -> Option<std::process::Output> {
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(err) => {
            eprintln!();
            eprintln!("################################################################");
            eprintln!("# promtool NOT FOUND ({err}).");
            eprintln!(
                "# This test checks /metrics with Prometheus' promtool (Debian: prometheus)."
            );
            eprintln!("# Install it with scripts/install-tools.sh, then re-run.");
            eprintln!("################################################################");
            if std::env::var_os("CI").is_some() {
                panic!("promtool is required by appliance/tests/promtool.rs in CI: {err}");
            }
            eprintln!("# SKIPPED: not in CI (CI unset).");
            return None;
        }
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    Some(child.wait_with_output().unwrap())
}

/// The value of the one sample whose line starts with `prefix` (name and labels).
fn sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(prefix)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn metrics_with_items_points_and_jobs_pass_promtool() {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let server = Server::start(&data, &["--slots", "8"]);

    let geometry = vec![DiskGeometry {
        size_bytes: 4 << 20,
        block_size_bytes: 4096,
    }];
    let enabled = server
        .api()
        .enable(&appliance_api::model::EnableRequest {
            name: "vm-metrics".into(),
            disks: vec![appliance_api::model::DiskSpec::create(4, None)],
            policy: None,
            temporary_os_disk: None,
        })
        .unwrap();
    let item = enabled.item.id.clone();
    let token = enabled.stream_token.clone();

    // Initial replication (a full copy and a first point), then two more points.
    let mut config = AgentConfig::new(
        server.data,
        item_id(&item),
        token.as_bytes(),
        "vm-metrics",
        geometry,
    );
    config.backoff_initial = Duration::from_millis(20);
    let agent = Agent::connect(config).unwrap();
    for mib in 0..4u64 {
        agent
            .write(0, mib << 20, &[mib as u8 + 1; 1 << 20])
            .unwrap();
    }
    let now_ns = engine::clock::now_unix_ns;
    agent
        .bookmark(Consistency::Crash, 1, now_ns(), "initial")
        .unwrap();
    server.wait_job(enabled.job.id);
    for round in 2..4u64 {
        agent.write(0, round * 4096, &[0xa5; 4096]).unwrap();
        agent
            .bookmark(Consistency::Crash, round, now_ns(), "steady")
            .unwrap();
    }
    agent.flush(Duration::from_secs(60)).unwrap();

    // Wait until /metrics itself shows the three points applied.
    let labels = format!("{{item=\"{item}\",name=\"vm-metrics\"}}");
    let points = format!("appliance_item_recovery_points{labels}");
    let mut text = String::new();
    for _ in 0..2400 {
        let (status, body) = server.call("GET", "/metrics", None);
        assert_eq!(status, 200, "{body}");
        text = body.as_str().unwrap().to_owned();
        if sample(&text, &points).is_some_and(|n| n >= 3.0) {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    assert!(sample(&text, &points).is_some_and(|n| n >= 3.0), "{text}");
    assert_eq!(
        sample(
            &text,
            "appliance_jobs{kind=\"initial_replication\",state=\"succeeded\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            &format!(
                "appliance_item_state{{item=\"{item}\",name=\"vm-metrics\",state=\"protected\"}}"
            )
        ),
        Some(1.0),
        "{text}"
    );
    assert!(
        sample(
            &text,
            &format!("appliance_item_applied_frames_total{labels}")
        )
        .is_some_and(|n| n > 0.0),
        "{text}"
    );
    assert!(
        sample(
            &text,
            &format!("appliance_apply_latency_seconds_count{labels}")
        )
        .is_some_and(|n| n > 0.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "appliance_data_port_sessions_total"),
        Some(1.0)
    );
    drop(agent);

    let Some(output) = promtool_check(&text) else {
        return;
    };
    assert!(
        output.status.success(),
        "promtool check metrics: {}\nstdout: {}\nstderr: {}\n{text}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.stdout.is_empty() && output.stderr.is_empty(),
        "promtool found problems:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    server.stop();
}

/// The edge cases the unit tests render (escaped names, infinite and NaN values, repeated ids,
/// summed job rows, an empty snapshot) pass promtool too.
#[test]
fn rendered_edge_cases_pass_promtool() {
    use appliance::metrics::{ItemMetrics, LatencyHistogram, MetricsSnapshot, render};
    let item = |id: &str, name: &str, rpo: Option<f64>| {
        let h = LatencyHistogram::new();
        for ns in [80_000, 400_000, 3_000_000, 60_000_000_000] {
            h.observe_ns(ns);
        }
        ItemMetrics {
            id: id.to_owned(),
            name: name.to_owned(),
            state: "protected".to_owned(),
            rpo_lag_seconds: rpo,
            cache_used_bytes: 1 << 20,
            cache_capacity_bytes: 1 << 30,
            applied_bytes_total: u64::MAX,
            applied_frames_total: 2100,
            applied_seq: 2099,
            staged_seq: 2100,
            synchronized_percent: 100,
            points: 7,
            apply_failed_seq: Some(2101),
            apply_latency: h.snapshot(),
        }
    };
    let mut nan_sum = item("ffffffffffffffffffffffffffffffff", "", Some(f64::NAN));
    nan_sum.apply_latency.sum_seconds = f64::NAN;
    let full = MetricsSnapshot {
        items: vec![
            item("3f2a9c0b1d4e5f60718293a4b5c6d7e8", "web-01", Some(1e-7)),
            item(
                "0123456789abcdef0123456789abcdef",
                "db \"primary\"\nline2 C:\\vm",
                Some(f64::INFINITY),
            ),
            item("3f2a9c0b1d4e5f60718293a4b5c6d7e8", "repeated", None),
            nan_sum,
        ],
        slots_total: 32,
        slots_free: 27,
        slots_attached: 3,
        slots_reserved: 1,
        jobs_by_state: vec![
            ("resync".to_owned(), "done".to_owned(), 2),
            ("resync".to_owned(), "done".to_owned(), 3),
            ("x\ny".to_owned(), "\"".to_owned(), u64::MAX),
        ],
        data_port_sessions_total: 12,
        data_port_connections: 2,
        exports_by_purpose: vec![("export".to_owned(), 1), ("failover\n".to_owned(), 2)],
        nbd_connections: 1,
    };
    for snapshot in [full, MetricsSnapshot::default()] {
        let text = render(&snapshot).unwrap();
        let Some(output) = promtool_check(&text) else {
            return;
        };
        assert!(
            output.status.success() && output.stdout.is_empty() && output.stderr.is_empty(),
            "promtool check metrics: {}\n{}{}\n{text}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
