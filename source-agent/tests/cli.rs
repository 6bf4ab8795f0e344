//! The `source-agent` binary as operators and scripts see it: exit codes and messages of
//! config refusals and usage errors, and `capture = false` serving a disk over NBD.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_source-agent");

fn agent(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("agent.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs `run --config` on `text` and expects exit 1 with `what` on stderr.
fn refused(text: &str, what: &str) {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), text);
    let out = agent(&["run", "--config", config.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(what), "{what} not in {stderr}");
    assert!(
        stderr.contains("agent.toml"),
        "the file is not named: {stderr}"
    );
    assert!(out.stdout.is_empty(), "printed before refusing");
}

fn plain_config(dir: &Path, disk: &Path, extra: &str) -> String {
    format!(
        "item_name = \"bench\"\nstate_dir = {:?}\nnbd_addr = \"127.0.0.1:0\"\ncapture = false\n{extra}\
         [[disk]]\nname = \"os\"\npath = {:?}\n",
        dir.join("state").display().to_string(),
        disk.display().to_string()
    )
}

#[test]
fn config_refusals_exit_1_and_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("os.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    refused(
        &plain_config(dir.path(), &disk, "colour = \"blue\"\n"),
        "colour",
    );
    refused(
        &plain_config(dir.path(), &dir.path().join("missing.img"), ""),
        "disk[0].path",
    );
    refused(
        &plain_config(dir.path(), &disk, "").replace("name = \"os\"", "name = \"o/s\""),
        "disk[0].name",
    );
    refused(
        &plain_config(dir.path(), &disk, "").replace("capture = false\n", ""),
        "item_id",
    );
    // A capture config whose token file is readable by others.
    let token = dir.path().join("t.token");
    std::fs::write(&token, "ab".repeat(32)).unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let text = plain_config(dir.path(), &disk, "").replace(
        "capture = false\n",
        &format!(
            "item_id = \"{}\"\nappliance = \"127.0.0.1:9\"\ntoken_file = {:?}\n",
            "0".repeat(32),
            token.display().to_string()
        ),
    );
    refused(&text, "chmod 600");
    let out = agent(&["run", "--config", "/nonexistent/agent.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/agent.toml"));
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(agent(&["status"]).status.code(), Some(2));
    assert_eq!(
        agent(&["status", "--config", "a", "--socket", "b"])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(agent(&["frobnicate"]).status.code(), Some(2));
    assert_eq!(
        agent(&["bookmark", "--socket", "s", "--wait-secs", "x"])
            .status
            .code(),
        Some(2)
    );
    let help = agent(&["bookmark", "--help"]);
    assert_eq!(help.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&help.stdout).contains("fsfreeze"));
}

#[test]
fn no_running_agent_is_exit_1_naming_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("none.sock");
    let out = agent(&["status", "--socket", socket.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("none.sock"));
}

/// A running agent, SIGTERMed and waited for on drop.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.0.id() as i32, libc::SIGTERM);
        }
        let _ = self.0.wait();
    }
}

#[test]
fn capture_off_serves_the_disk_over_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("os.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let config = write_config(dir.path(), &plain_config(dir.path(), &disk, ""));
    let config = config.to_str().unwrap();
    let mut child = Command::new(BIN)
        .args(["run", "--config", config])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let running = Running(child);
    let lines: Vec<String> = BufReader::new(stdout)
        .lines()
        .map(Result::unwrap)
        .take_while(|l| l != "ready")
        .collect();
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert!(lines[0].starts_with("source-agent "), "{lines:?}");
    let addr = lines[1].strip_prefix("NBD server listening on ").unwrap();
    let uri = format!("nbd://{addr}/os");
    assert_eq!(
        lines[2],
        format!("disk os: {uri} ({} bytes, {})", 8 << 20, disk.display())
    );
    let socket = dir.path().join("state").join("control.sock");
    assert_eq!(lines[3], format!("control socket: {}", socket.display()));

    // A second agent on the same state directory is refused.
    let out = agent(&["run", "--config", config]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("agent.lock"));

    // status reports capture off; bookmarks are refused by name.
    let out = agent(&["status", "--config", config, "--json"]);
    assert_eq!(out.status.code(), Some(0));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["link"], "capture off");
    assert_eq!(status["disks"][0]["size_bytes"], 8 << 20);
    let out = agent(&["bookmark", "--config", config]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("capture = false"));

    match Command::new("nbdinfo").args(["--size", &uri]).output() {
        Ok(out) => {
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(
                String::from_utf8_lossy(&out.stdout).trim(),
                (8 << 20).to_string()
            );
        }
        Err(e) => eprintln!("skipped the nbdinfo check: nbdinfo cannot run ({e})"),
    }
    drop(running);
    assert!(
        !socket.exists(),
        "the control socket must be removed at shutdown"
    );
}
