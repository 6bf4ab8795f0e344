//! Unit tests of the config text and the start-up line parser.

use super::process::{AgentSetup, parse_disk_line};

#[test]
fn disk_lines_and_config_text() {
    let d =
        parse_disk_line("disk os: nbd://127.0.0.1:4000/os (268435456 bytes, /x/os.img)").unwrap();
    assert_eq!(d.uri, "nbd://127.0.0.1:4000/os");
    assert_eq!(d.size_bytes, 268435456);
    assert!(parse_disk_line("disk os nbd://x").is_none());
    let setup = AgentSetup {
        item_name: "b\"x".into(),
        item_id: None,
        appliance: None,
        token: None,
        state_dir: "/s".into(),
        capture: false,
        backlog_limit_mib: Some(8),
        change_map_limit_kib: None,
        bookmark_interval_ms: None,
        compression: None,
        disks: vec![("os".into(), "/d/os.img".into())],
    };
    let text = setup.config_text(None);
    assert!(text.contains("item_name = \"b\\\"x\""), "{text}");
    assert!(
        text.contains("capture = false\nbacklog_limit_mib = 8\n"),
        "{text}"
    );
    assert!(
        text.ends_with("[[disk]]\nname = \"os\"\npath = \"/d/os.img\"\n"),
        "{text}"
    );
}
