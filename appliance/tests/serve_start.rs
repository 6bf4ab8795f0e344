//! What `serve` says at start: the API token never goes to stderr (the journal), only where
//! its file is; a port in use is named once.

use std::io::BufRead;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};

fn serve(data: &std::path::Path, data_addr: &str, api_addr: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_appliance"));
    command.arg("serve").arg("--data-dir").arg(data).args([
        "--data-addr",
        data_addr,
        "--nbd-addr",
        "127.0.0.1:0",
        "--api-addr",
        api_addr,
    ]);
    command
}

#[test]
fn the_api_token_is_not_printed_at_first_start_only_its_file() {
    let data = tempfile::tempdir().expect("tempdir");
    let mut child = serve(data.path(), "127.0.0.1:0", "127.0.0.1:0")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("serve");
    // Both listeners are up once the second line is out; the token was created before them.
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut lines = String::new();
    for _ in 0..2 {
        stdout.read_line(&mut lines).expect("a line");
    }
    assert!(lines.contains("control API listening on"), "{lines}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let output = child.wait_with_output().expect("wait");
    assert!(output.status.success());
    let token_file = data.path().join("api-token");
    let token = std::fs::read_to_string(&token_file).expect("token file");
    let token = token.trim();
    assert_eq!(token.len(), 64);
    let mode = std::fs::metadata(&token_file)
        .expect("metadata")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let everything = format!("{lines}{stderr}");
    assert!(
        !everything.contains(token),
        "the token was printed: {everything}"
    );
    assert!(
        stderr.contains(&token_file.display().to_string()),
        "the operator is told where the token is: {stderr}"
    );
}

#[test]
fn a_port_in_use_is_named_once() {
    let data = tempfile::tempdir().expect("tempdir");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    for (data_addr, api_addr, what) in [
        (addr.as_str(), "127.0.0.1:0", "data port"),
        ("127.0.0.1:0", addr.as_str(), "control API"),
    ] {
        let output = serve(data.path(), data_addr, api_addr)
            .output()
            .expect("serve");
        assert_eq!(output.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&output.stderr);
        let error = stderr
            .lines()
            .find(|l| l.starts_with("error: "))
            .unwrap_or_else(|| panic!("no error line: {stderr}"));
        assert!(
            error.contains(&format!("binding the {what} to {addr}")),
            "{error}"
        );
        assert_eq!(
            error.matches(&addr).count(),
            1,
            "the address is named once: {error}"
        );
        assert_eq!(
            error.matches("Address already in use").count(),
            1,
            "{error}"
        );
    }
}
