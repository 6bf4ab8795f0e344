//! The CLI's arguments, rendering, error texts and HTTP use, without an appliance.

use std::path::PathBuf;

use appliance_api::Client;
use appliance_api::client::normalize_base;
use appliance_api::model::{ItemView, JobView, PointView, SlotsView};
use serde_json::{Value, json};

use super::args::{DiskArg, PointSpec, order_disks, parse_new_disk, parse_point};
use super::commands::match_item;
use super::render::{
    format_bytes, format_millis, format_time_ns, render_item, render_items, render_points,
    render_slots, render_table,
};
use super::*;

/// A point as JSON, the way it goes to the API.
fn point_json(point: PointSpec) -> Value {
    serde_json::to_value(point.to_wire()).expect("json")
}

/// A disk as JSON, the way it goes to the API.
fn disk_json(disk: &DiskArg) -> Value {
    serde_json::to_value(disk.to_wire()).expect("json")
}

/// An item view from the fields a test cares about; the others as a new item has them.
fn item(fields: Value) -> ItemView {
    let mut full = json!({"id": "3f000000000000000000000000000000", "name": "x",
        "state": "protected", "allowed_operations": [], "role": "forward",
        "reverse_of": null, "reversed_by": null, "disks": [],
        "policy": {"keep_points": 1, "keep_minutes": 0, "app_consistent_minutes": 60},
        "health": "healthy", "apply_failure": null, "synchronized_percent": 100,
        "rpo_lag_ms": null, "cache_used_bytes": 0, "cache_capacity_bytes": 0,
        "applied_seq": 0, "staged_seq": 0, "points": 0, "latest_point_id": null,
        "latest_app_point_id": null, "temporary_os_disk": null, "test_failover": null,
        "failover": null, "last_job": null, "last_error": null, "quarantine": null});
    if let (Some(full), Some(fields)) = (full.as_object_mut(), fields.as_object()) {
        for (key, value) in fields {
            full.insert(key.clone(), value.clone());
        }
    }
    serde_json::from_value(full).expect("item view")
}

fn items(list: Value) -> Vec<ItemView> {
    list.as_array()
        .expect("array")
        .iter()
        .cloned()
        .map(item)
        .collect()
}

#[test]
fn point_specs_become_strings_or_integers() {
    assert_eq!(parse_point("latest").map(point_json), Ok(json!("latest")));
    assert_eq!(
        parse_point("latest-processed").map(point_json),
        Ok(json!("latest-processed"))
    );
    assert_eq!(
        parse_point("latest-app").map(point_json),
        Ok(json!("latest-app"))
    );
    assert_eq!(parse_point("2000").map(point_json), Ok(json!(2000)));
    assert_eq!(
        parse_point("18446744073709551615").map(point_json),
        Ok(json!(u64::MAX))
    );
    assert!(parse_point("2000").map(point_json).expect("id").is_u64());
    for bad in [
        "",
        "newest",
        "-1",
        "1.5",
        "Latest",
        "0x10",
        "18446744073709551616",
    ] {
        let error = parse_point(bad).expect_err(bad);
        assert!(error.contains("latest-app"), "{bad}: {error}");
    }
}

#[test]
fn disk_specs_and_their_order() {
    assert_eq!(
        parse_new_disk("1024").map(|d| disk_json(&d)),
        Ok(json!({"size_mib": 1024}))
    );
    assert_eq!(
        parse_new_disk("64:512").map(|d| disk_json(&d)),
        Ok(json!({"size_mib": 64, "block_size_bytes": 512}))
    );
    for bad in ["", "0", "x", "64:1024", "64:", "-5"] {
        assert!(parse_new_disk(bad).is_err(), "{bad}");
    }
    // `--attach /a --disk 10 --attach /b --disk 20`: indices 1, 3, 5, 7.
    let new = vec![
        (3, parse_new_disk("10").expect("disk")),
        (7, parse_new_disk("20").expect("disk")),
    ];
    let attach = vec![(1, PathBuf::from("/a")), (5, PathBuf::from("/b"))];
    let ordered: Vec<Value> = order_disks(new, attach).iter().map(disk_json).collect();
    assert_eq!(
        ordered,
        vec![
            json!({"path": "/a"}),
            json!({"size_mib": 10}),
            json!({"path": "/b"}),
            json!({"size_mib": 20}),
        ]
    );
}

#[test]
fn tables_are_aligned_without_trailing_blanks() {
    let table = render_table(
        &["ID", "NAME", "STATE"],
        &[
            vec!["1".into(), "web-01".into(), "protected".into()],
            vec!["22".into(), "db".into(), "".into()],
            vec!["333".into()],
        ],
    );
    assert_eq!(
        table,
        "ID   NAME    STATE\n\
         1    web-01  protected\n\
         22   db\n\
         333\n"
    );
    // Width counts characters, not bytes.
    let table = render_table(&["A", "B"], &[vec!["é…".into(), "x".into()]]);
    assert_eq!(table, "A   B\né…  x\n");
}

#[test]
fn items_table_from_item_views() {
    let list = items(json!([
        {"id": "3f000000000000000000000000000001", "name": "web-01", "state": "protected",
         "synchronized_percent": 100, "rpo_lag_ms": 1500, "cache_used_bytes": 1048576,
         "cache_capacity_bytes": 2147483648u64, "points": 42, "health": "healthy",
         "unexpected": {"nested": true}},
        {"id": "3f000000000000000000000000000002", "name": "db", "state": "initial_replication",
         "synchronized_percent": 7, "points": 0, "health": "healthy"},
        // Once "not an object": an answer of another shape is now a decode error (below).
        {"id": "3f000000000000000000000000000003", "name": "odd", "state": "disabled"},
    ]));
    let table = render_items(&list);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "{table}");
    assert!(lines[0].starts_with("ID "), "{table}");
    for header in [
        "NAME", "STATE", "SYNC%", "RPO LAG", "CACHE", "POINTS", "HEALTH",
    ] {
        assert!(lines[0].contains(header), "{table}");
    }
    assert!(lines[1].contains("1.5 s"), "{table}");
    assert!(lines[1].contains("1.0 MiB/2.0 GiB (0%)"), "{table}");
    assert!(lines[2].contains("7%"), "{table}");
    // Columns line up: NAME starts at the same offset on every line.
    let at = lines[0].find("NAME").expect("NAME");
    assert_eq!(&lines[1][at..at + 6], "web-01");
    assert_eq!(&lines[2][at..at + 2], "db");
    assert_eq!(render_items(&[]), "no items\n");
    assert!(serde_json::from_value::<Vec<ItemView>>(json!({"odd": 1})).is_err());
}

#[test]
fn odd_answers_are_decode_errors_not_panics() {
    // The typed client reads answers into the model: an odd answer is refused by name (see
    // `appliance_api::Error::Decode`), so the renderers only ever see well-formed views.
    for odd in [
        json!(null),
        json!(1),
        json!("x"),
        json!({}),
        json!([1, null]),
    ] {
        assert!(
            serde_json::from_value::<SlotsView>(odd.clone()).is_err(),
            "{odd}"
        );
        assert!(
            serde_json::from_value::<ItemView>(odd.clone()).is_err(),
            "{odd}"
        );
        assert!(
            serde_json::from_value::<Vec<PointView>>(odd.clone()).is_err(),
            "{odd}"
        );
        assert!(
            serde_json::from_value::<JobView>(odd.clone()).is_err(),
            "{odd}"
        );
    }
    let _ = render_item(&item(json!({})));
    let _ = render_points(&[]);
}

#[test]
fn points_and_slots_tables() {
    let points: Vec<PointView> = serde_json::from_value(json!([
        {"id": 2000, "consistency": "app", "origin": "bookmark", "bookmark_id": 40,
         "source_timestamp_ns": 1_700_000_000_000_000_000u64, "processed_at_ns": 1, "label": "nightly"},
        {"id": 2100, "consistency": "crash", "origin": "latest", "bookmark_id": 0,
         "source_timestamp_ns": 0, "processed_at_ns": 2, "label": ""},
    ]))
    .expect("points");
    let table = render_points(&points);
    assert!(
        table.starts_with("ID    CONSISTENCY  ORIGIN    SOURCE TIME           LABEL\n"),
        "{table}"
    );
    assert!(
        table.contains("2000  app          bookmark  2023-11-14 22:13:20Z  nightly\n"),
        "{table}"
    );
    assert!(
        table.contains("2100  crash        latest    -\n"),
        "{table}"
    );
    let slots: SlotsView = serde_json::from_value(json!({"slot_count": 4, "usable": 3,
    "free": 1, "reserved": 1, "attached": 1,
    "slots": [
        {"lun": 0, "state": "appliance"},
        {"lun": 1, "state": "attached", "item": "ab", "disk_index": 0, "path": "/srv/a.raw"},
    ]}))
    .expect("slots");
    let text = render_slots(&slots);
    assert!(
        text.starts_with("4 slots (3 usable): 1 free, 1 reserved, 1 attached\n"),
        "{text}"
    );
    assert!(text.contains("0    appliance  -     -     -\n"), "{text}");
    assert!(
        text.contains("1    attached   ab    0     /srv/a.raw\n"),
        "{text}"
    );
}

#[test]
fn wrong_state_errors_show_state_and_operations() {
    let body = r#"{"error": {"code": "wrong_state",
        "message": "item 3f is failed_over; test-failover needs protected",
        "state": "failed_over", "allowed_operations": ["change-point", "commit", "disable"]}}"#;
    let failure = api_failure(409, body);
    assert_eq!(failure.exit, EXIT_BAD_INPUT);
    assert_eq!(
        failure.message,
        "item 3f is failed_over; test-failover needs protected (HTTP 409 wrong_state)\n  \
         state: failed_over\n  allowed operations: change-point, commit, disable"
    );
    let none = r#"{"error": {"code": "wrong_state", "message": "busy", "state": "failing_over",
        "allowed_operations": []}}"#;
    assert!(describe_api_error(409, none).ends_with("allowed operations: none"));
}

#[test]
fn other_errors_and_exit_statuses() {
    let slots = r#"{"error": {"code": "not_enough_slots", "message": "3 slots needed, 2 free",
        "needed": 3, "free": 2}}"#;
    assert_eq!(
        describe_api_error(409, slots),
        "3 slots needed, 2 free (HTTP 409 not_enough_slots)\n  slots needed: 3\n  slots free: 2"
    );
    let field =
        r#"{"error": {"code": "bad_request", "message": "name is empty", "field": "name"}}"#;
    assert_eq!(
        describe_api_error(400, field),
        "name is empty (HTTP 400 bad_request)\n  field: name"
    );
    let unauthorized = api_failure(
        401,
        r#"{"error":{"code":"unauthorized","message":"wrong API token"}}"#,
    );
    assert_eq!(unauthorized.exit, EXIT_FAILURE);
    assert!(
        unauthorized
            .message
            .starts_with("wrong API token (HTTP 401 unauthorized)\n  hint:")
    );
    assert_eq!(
        api_failure(500, r#"{"error":{"code":"io_error","message":"disk"}}"#).exit,
        EXIT_FAILURE
    );
    for status in [400, 403, 404, 409] {
        assert_eq!(exit_for_status(status), EXIT_BAD_INPUT, "{status}");
    }
    for status in [401, 405, 413, 500, 502, 503] {
        assert_eq!(exit_for_status(status), EXIT_FAILURE, "{status}");
    }
    // Not the API's shape: never a panic, still a useful line.
    assert_eq!(
        describe_api_error(502, "Bad Gateway\n"),
        "Bad Gateway (HTTP 502)"
    );
    assert_eq!(
        describe_api_error(503, ""),
        "the API answered HTTP 503 (service unavailable)"
    );
    assert_eq!(
        describe_api_error(404, r#"{"error": "nope"}"#),
        r#"{"error": "nope"} (HTTP 404)"#
    );
    assert_eq!(
        describe_api_error(404, r#"{"error": {"message": 5}}"#),
        "not found (HTTP 404)"
    );
    let many = describe_api_error(
        409,
        r#"{"error": {"code": "x", "message": "m", "state": 3, "allowed_operations": "odd"}}"#,
    );
    assert_eq!(
        many,
        "m (HTTP 409 x)\n  state: 3\n  allowed operations: none"
    );
}

#[test]
fn items_are_found_by_id_prefix_or_name() {
    let items = items(json!([
        {"id": "3f2a0000000000000000000000000001", "name": "web-01", "state": "protected"},
        {"id": "3f2b0000000000000000000000000002", "name": "db", "state": "protected"},
        {"id": "77000000000000000000000000000003", "name": "db", "state": "disabled"},
    ]));
    let full = "3F2A0000000000000000000000000001";
    assert_eq!(match_item(&[], full), Ok(full.to_ascii_lowercase()));
    assert_eq!(
        match_item(&items, "web-01"),
        Ok("3f2a0000000000000000000000000001".into())
    );
    assert_eq!(
        match_item(&items, "3f2b"),
        Ok("3f2b0000000000000000000000000002".into())
    );
    assert!(match_item(&items, "3f2").is_err(), "too short a prefix");
    assert!(match_item(&items, "3f2").is_err());
    let ambiguous = match_item(&items, "db").expect_err("two items named db");
    assert!(ambiguous.contains("2 items"), "{ambiguous}");
    assert!(match_item(&items, "nope").is_err());
    assert!(match_item(&[], "web-01").is_err());
}

#[test]
fn durations_bytes_and_times() {
    assert_eq!(format_millis(850), "850 ms");
    assert_eq!(format_millis(12_345), "12.3 s");
    assert_eq!(format_millis(245_000), "4 min 05 s");
    assert_eq!(format_millis(7_380_000), "2 h 03 min");
    assert_eq!(format_millis(273_600_000), "3 d 04 h");
    assert_eq!(format_bytes(512), "512 B");
    assert_eq!(format_bytes(1536), "1.5 KiB");
    assert_eq!(format_bytes(2 << 30), "2.0 GiB");
    assert_eq!(format_bytes(u64::MAX), "16.0 EiB");
    assert_eq!(format_time_ns(0), "-");
    assert_eq!(format_time_ns(1_000_000_000), "1970-01-01 00:00:01Z");
    assert_eq!(
        format_time_ns(951_782_400_000_000_000),
        "2000-02-29 00:00:00Z"
    );
    assert_eq!(
        format_time_ns(1_795_307_933_000_000_000),
        "2026-11-22 00:38:53Z"
    );
    let _ = format_time_ns(u64::MAX);
}

#[test]
fn base_urls() {
    assert_eq!(
        normalize_base("http://127.0.0.1:7400/").ok(),
        Some("http://127.0.0.1:7400".into())
    );
    assert_eq!(
        normalize_base("10.0.0.5:7400").ok(),
        Some("http://10.0.0.5:7400".into())
    );
    assert!(normalize_base("https://x:1").is_err());
    assert!(normalize_base("ftp://x").is_err());
    assert!(normalize_base(" ").is_err());
}

#[test]
fn connection_refused_names_the_url() {
    // A port nothing listens on: bind one, then close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let client = Client::new(&format!("http://127.0.0.1:{port}"), None).expect("client");
    let failure = Failure::from(client.appliance().expect_err("nothing listens"));
    assert_eq!(failure.exit, EXIT_FAILURE);
    assert!(
        failure
            .message
            .contains(&format!("http://127.0.0.1:{port}")),
        "{}",
        failure.message
    );
    assert!(
        failure.message.contains("connection refused"),
        "{}",
        failure.message
    );
}

#[test]
fn the_http_layer_against_a_canned_server() {
    use std::io::{BufRead as _, BufReader, Read as _, Write as _};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for (status, body) in [
            (
                "202 Accepted",
                r#"{"id":7,"kind":"failover","item":"3f2a0000000000000000000000000001","state":"running","percent":0,"message":"","created_ns":1}"#,
            ),
            (
                "409 Conflict",
                r#"{"error":{"code":"job_running","message":"job 7 running"}}"#,
            ),
        ] {
            let answer = format!(
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let (stream, _) = listener.accept().expect("accept");
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut head = String::new();
            let mut length = 0usize;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).expect("line");
                if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = value.trim().parse().expect("length");
                }
                head.push_str(&line);
                if line == "\r\n" || line.is_empty() {
                    break;
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).expect("body");
            seen.push((head, String::from_utf8(body).expect("utf8")));
            let mut stream = stream;
            stream.write_all(answer.as_bytes()).expect("answer");
        }
        seen
    });
    let client = Client::new(&format!("{addr}"), Some("ab".repeat(32))).expect("client");
    let request = appliance_api::model::FailoverRequest {
        point: PointSpec::Id(5).to_wire(),
        target_dir: "/srv/t".into(),
        format: appliance_api::model::Format::Raw,
        source_shut_down: false,
        mode: Default::default(),
    };
    let body = serde_json::to_value(&request).expect("json");
    let job = client
        .failover("3f2a0000000000000000000000000001", &request)
        .expect("202");
    assert_eq!(json!(job.id), json!(7));
    let failure = Failure::from(
        client
            .failover("3f2a0000000000000000000000000001", &request)
            .expect_err("409"),
    );
    assert_eq!(failure.exit, EXIT_BAD_INPUT);
    assert_eq!(failure.message, "job 7 running (HTTP 409 job_running)");
    let seen = server.join().expect("server");
    let (head, sent) = &seen[0];
    assert!(
        head.starts_with("POST /v1/items/3f2a0000000000000000000000000001/failover HTTP/1.1\r\n"),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase()
            .contains(&format!("authorization: bearer {}", "ab".repeat(32))),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{head}"
    );
    assert_eq!(serde_json::from_str::<Value>(sent).expect("json"), body);
}
