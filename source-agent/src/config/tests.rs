use std::os::unix::fs::PermissionsExt;

use super::*;

const GOOD: &str = r#"
item_name = "web-1"
item_id = "0123456789abcdef0123456789abcdef"
appliance = "127.0.0.1:7401"
token_file = "/etc/source-agent/web-1.token"
state_dir = "/var/lib/source-agent/web-1"
[[disk]]
name = "os"
path = "/var/lib/images/web-1-os.img"
[[disk]]
name = "data"
path = "/dev/vdb"
block_size_bytes = 512
"#;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("/etc/source-agent/web-1.toml"))
}

/// The refusal's message, which must name the file and `key`.
fn refused(text: &str, key: &str) -> String {
    let message = parse(text).expect_err("must be refused").to_string();
    assert!(
        message.contains("/etc/source-agent/web-1.toml"),
        "{message}"
    );
    assert!(message.contains(key), "{key} not in {message}");
    message
}

fn replace(from: &str, to: &str) -> String {
    assert!(GOOD.contains(from), "{from}");
    GOOD.replacen(from, to, 1)
}

#[test]
fn a_full_config_parses_with_defaults() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.item_name, "web-1");
    assert_eq!(c.nbd_addr, DEFAULT_NBD_ADDR.parse().unwrap());
    assert_eq!(
        c.control_socket,
        Path::new("/var/lib/source-agent/web-1/control.sock")
    );
    assert_eq!(c.disks.len(), 2);
    assert_eq!(c.disks[0].block_size_bytes, 4096);
    assert_eq!(c.disks[1].block_size_bytes, 512);
    let s = c.capture.unwrap();
    assert_eq!(s.item_id[0], 0x01);
    assert_eq!(s.item_id[15], 0xef);
    assert_eq!(s.bookmark_interval, Duration::from_secs(1));
    assert_eq!(s.backlog_limit_bytes, 64 << 20);
    assert_eq!(s.change_map_limit_bytes, 256 << 10);
    assert_eq!(s.activity_log_extents, 1024);
    assert_eq!(s.activity_log_extent_bytes, 4 << 20);
}

#[test]
fn optional_keys_are_read() {
    let text = format!(
        "nbd_addr = \"0.0.0.0:0\"\ncontrol_socket = \"/run/a.sock\"\nbookmark_interval_ms = 0\n\
         backlog_limit_mib = 8\nchange_map_limit_kib = 64\nactivity_log_extents = 33\n\
         activity_log_extent_mib = 1\n{GOOD}"
    );
    let c = parse(&text).unwrap();
    assert_eq!(c.nbd_addr.port(), 0);
    assert_eq!(c.control_socket, Path::new("/run/a.sock"));
    let s = c.capture.unwrap();
    assert_eq!(s.bookmark_interval, Duration::ZERO);
    assert_eq!(s.backlog_limit_bytes, 8 << 20);
    assert_eq!(s.change_map_limit_bytes, 64 << 10);
    assert_eq!(s.activity_log_extents, 33);
    assert_eq!(s.activity_log_extent_bytes, 1 << 20);
}

#[test]
fn capture_off_needs_no_appliance() {
    let text = "item_name = \"bench\"\nstate_dir = \"/tmp/s\"\ncapture = false\n\
                [[disk]]\nname = \"os\"\npath = \"/tmp/os.img\"\n";
    let c = parse(text).unwrap();
    assert!(c.capture.is_none());
    let message = c.read_token().unwrap_err().to_string();
    assert!(message.contains("capture"), "{message}");
}

#[test]
fn unknown_keys_are_refused_by_name() {
    refused(
        &format!("bookmark_interval = 5\n{GOOD}"),
        "bookmark_interval",
    );
    refused(
        &replace("block_size_bytes = 512", "blocksize = 512"),
        "blocksize",
    );
}

#[test]
fn wrong_types_and_bad_toml_are_refused() {
    refused(&replace("\"web-1\"", "7"), "item_name");
    refused("item_name = \n", "");
}

#[test]
fn missing_required_keys_are_refused() {
    refused(
        &replace("item_id = \"0123456789abcdef0123456789abcdef\"", ""),
        "item_id",
    );
    refused(&replace("appliance = \"127.0.0.1:7401\"", ""), "appliance");
    refused(
        &replace("token_file = \"/etc/source-agent/web-1.token\"", ""),
        "token_file",
    );
    refused(
        &replace("state_dir = \"/var/lib/source-agent/web-1\"", ""),
        "state_dir",
    );
    let no_disks = GOOD.split("[[disk]]").next().unwrap();
    refused(no_disks, "disk");
}

#[test]
fn bad_values_are_refused_by_key() {
    refused(&replace("\"web-1\"", "\"\""), "item_name");
    refused(&replace("\"web-1\"", "\"a\\u0007b\""), "item_name");
    refused(
        &replace("0123456789abcdef0123456789abcdef", "0123"),
        "item_id",
    );
    refused(
        &replace(
            "0123456789abcdef0123456789abcdef",
            "0123456789abcdef0123456789abcdeg",
        ),
        "item_id",
    );
    refused(
        &replace("127.0.0.1:7401", "appliance.example:7401"),
        "appliance",
    );
    refused(&replace("127.0.0.1:7401", "127.0.0.1:0"), "appliance");
    refused(
        &replace("\"/etc/source-agent/web-1.token\"", "\"web-1.token\""),
        "token_file",
    );
    refused(
        &replace("\"/var/lib/source-agent/web-1\"", "\"state\""),
        "state_dir",
    );
    refused(&format!("nbd_addr = \"localhost\"\n{GOOD}"), "nbd_addr");
    refused(
        &format!("control_socket = \"c.sock\"\n{GOOD}"),
        "control_socket",
    );
    let long = format!("/{}", "s".repeat(120));
    refused(
        &format!("control_socket = \"{long}\"\n{GOOD}"),
        "control_socket",
    );
}

#[test]
fn out_of_range_limits_are_refused() {
    refused(
        &format!("bookmark_interval_ms = 3600001\n{GOOD}"),
        "bookmark_interval_ms",
    );
    refused(
        &format!("backlog_limit_mib = 0\n{GOOD}"),
        "backlog_limit_mib",
    );
    refused(
        &format!("change_map_limit_kib = 2\n{GOOD}"),
        "change_map_limit_kib",
    );
    refused(
        &format!("activity_log_extents = 0\n{GOOD}"),
        "activity_log_extents",
    );
    // 1 MiB extents: a 32 MiB request spans up to 33 of them.
    refused(
        &format!("activity_log_extents = 32\nactivity_log_extent_mib = 1\n{GOOD}"),
        "activity_log_extents",
    );
    refused(
        &format!("change_map_limit_kib = 65537\n{GOOD}"),
        "change_map_limit_kib",
    );
    refused(&format!("compression = \"lz4\"\n{GOOD}"), "compression");
    assert_eq!(
        parse(&format!("compression = \"none\"\n{GOOD}"))
            .unwrap()
            .capture
            .unwrap()
            .zstd_level,
        None
    );
    assert_eq!(parse(GOOD).unwrap().capture.unwrap().zstd_level, Some(1));
    refused(
        &format!("activity_log_extent_mib = 3\n{GOOD}"),
        "activity_log_extent_mib",
    );
    refused(
        &format!("activity_log_extent_mib = 2048\n{GOOD}"),
        "activity_log_extent_mib",
    );
}

#[test]
fn disk_rules_are_enforced() {
    refused(&replace("name = \"os\"", "name = \"\""), "disk[0].name");
    refused(&replace("name = \"os\"", "name = \"o s\""), "disk[0].name");
    refused(&replace("name = \"os\"", "name = \"a/b\""), "disk[0].name");
    refused(&replace("name = \"os\"", "name = \"..\""), "disk[0].name");
    let long = "n".repeat(65);
    refused(
        &replace("name = \"os\"", &format!("name = \"{long}\"")),
        "disk[0].name",
    );
    refused(&replace("name = \"data\"", "name = \"os\""), "disk[1].name");
    refused(
        &replace("\"/dev/vdb\"", "\"/var/lib/images/web-1-os.img\""),
        "disk[1].path",
    );
    refused(&replace("\"/dev/vdb\"", "\"vdb\""), "disk[1].path");
    refused(
        &replace("block_size_bytes = 512", "block_size_bytes = 1024"),
        "disk[1].block_size_bytes",
    );
    let mut many = GOOD.split("[[disk]]").next().unwrap().to_string();
    for i in 0..65 {
        many.push_str(&format!("[[disk]]\nname = \"d{i}\"\npath = \"/d{i}\"\n"));
    }
    refused(&many, "disk");
    assert!(check_disk_name("os.1_A-b").is_ok());
    assert!(check_disk_name(&"n".repeat(64)).is_ok());
}

fn with_token(contents: &[u8], mode: u32) -> (tempfile::TempDir, Config) {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("t.token");
    std::fs::write(&token, contents).unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(mode)).unwrap();
    let text = replace(
        "\"/etc/source-agent/web-1.token\"",
        &format!("{:?}", token.display().to_string()),
    );
    (dir, parse(&text).unwrap())
}

#[test]
fn a_good_token_file_is_read() {
    let token = "ab".repeat(32);
    let (_dir, c) = with_token(format!("{token}\n").as_bytes(), 0o600);
    assert_eq!(c.read_token().unwrap(), token.as_bytes());
    let (_dir, c) = with_token(token.as_bytes(), 0o400);
    assert_eq!(c.read_token().unwrap(), token.as_bytes());
}

#[test]
fn bad_token_files_are_refused() {
    let token = "ab".repeat(32);
    let check = |contents: &[u8], mode: u32, what: &str| {
        let (_dir, c) = with_token(contents, mode);
        let message = c.read_token().unwrap_err().to_string();
        assert!(message.contains("token_file"), "{message}");
        assert!(message.contains(what), "{what} not in {message}");
    };
    check(token.as_bytes(), 0o644, "chmod 600");
    check(token.as_bytes(), 0o620, "chmod 600");
    check(b"", 0o600, "empty");
    check(b"\n", 0o600, "empty");
    check(&token.as_bytes()[..63], 0o600, "64 hex");
    check(format!("{token}0").as_bytes(), 0o600, "64 hex");
    check("zz".repeat(32).as_bytes(), 0o600, "64 hex");
    check(&[b'a'; 4096], 0o600, "bytes");
    let (dir, c) = with_token(token.as_bytes(), 0o600);
    std::fs::remove_file(dir.path().join("t.token")).unwrap();
    let message = c.read_token().unwrap_err().to_string();
    assert!(message.contains("t.token"), "{message}");
    std::fs::create_dir(dir.path().join("t.token")).unwrap();
    let message = c.read_token().unwrap_err().to_string();
    assert!(message.contains("regular file"), "{message}");
}

#[test]
fn check_files_refuses_missing_disks_and_a_file_as_state_dir() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("os.img");
    let state = dir.path().join("state");
    let text = format!(
        "item_name = \"x\"\nstate_dir = {:?}\ncapture = false\n[[disk]]\nname = \"os\"\npath = {:?}\n",
        state.display().to_string(),
        image.display().to_string()
    );
    let c = parse(&text).unwrap();
    let message = c.check_files().unwrap_err().to_string();
    assert!(message.contains("disk[0].path"), "{message}");
    std::fs::write(&image, [0u8; 4096]).unwrap();
    c.check_files().unwrap();
    std::fs::write(&state, b"").unwrap();
    let message = c.check_files().unwrap_err().to_string();
    assert!(message.contains("state_dir"), "{message}");
    std::fs::remove_file(&state).unwrap();
    std::fs::remove_file(&image).unwrap();
    std::fs::create_dir(&image).unwrap();
    let message = c.check_files().unwrap_err().to_string();
    assert!(message.contains("neither"), "{message}");
}

#[test]
fn load_refuses_a_missing_file_by_name() {
    let message = Config::load(Path::new("/nonexistent/agent.toml"))
        .unwrap_err()
        .to_string();
    assert!(message.contains("/nonexistent/agent.toml"), "{message}");
}
