//! The control API's connection limits on a real `serve`: idle and half-sent connections
//! neither lock a client out nor grow the process's file descriptors without bound; half-sent
//! requests and slow bodies are closed after their timeouts; the file-descriptor budget is
//! checked at start.

#[allow(clippy::unwrap_used)] // the shared helpers: a failed unwrap is a failed test
mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use common::Server;

/// Open file descriptors of a process.
fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc/PID/fd")
        .count()
}

/// `count` connections that send nothing.
fn idle_connections(addr: &str, count: usize) -> Vec<TcpStream> {
    (0..count)
        .map(|_| TcpStream::connect(addr).expect("connect"))
        .collect()
}

/// `count` connections that send the start of a request head and never finish it.
fn half_sent_requests(addr: &str, count: usize) -> Vec<TcpStream> {
    (0..count)
        .map(|_| {
            let mut stream = TcpStream::connect(addr).expect("connect");
            stream
                .write_all(b"GET /v1/items HTTP/1.1\r\nHost: appliance\r\nAuthor")
                .expect("write half a head");
            stream
        })
        .collect()
}

/// Whether the server closed `stream` (EOF or reset) within `deadline`; an answer before the
/// close (hyper may say 408) is read and skipped.
fn closed_by_server(stream: &mut TcpStream, deadline: Instant) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        stream.set_read_timeout(Some(left)).expect("read timeout");
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false;
            }
            Err(e) => panic!("reading: {e}"),
        }
    }
}

/// One API client request; returns the status and how long it took.
fn timed_request(server: &Server) -> (u16, Duration) {
    let started = Instant::now();
    let (status, body) = server.call("GET", "/v1/appliance", None);
    assert!(
        status != 200 || body["version"].is_string(),
        "appliance info: {body}"
    );
    (status, started.elapsed())
}

#[test]
fn idle_and_half_sent_connections_neither_lock_out_a_client_nor_grow_the_fds() {
    let data = tempfile::tempdir().expect("tempdir");
    let server = Server::start(data.path(), &["--api-max-connections", "64"]);
    let pid = server.child.id();
    assert_eq!(timed_request(&server).0, 200);
    let before = fd_count(pid);
    let idle = idle_connections(&server.api, 200);
    let half = half_sent_requests(&server.api, 50);
    // Every one of the 250 was accepted (or closed to make room) before the client's turn:
    // the client connects after them, so it is accepted after them.
    let (status, took) = timed_request(&server);
    assert_eq!(
        status, 200,
        "an API client is served past 250 idle connections"
    );
    assert!(
        took < Duration::from_secs(10),
        "served in {took:?}: it must not wait for a timeout"
    );
    // At most the cap stays open (the connections closed to make room are dropped by their
    // tasks, soon after); without the cap all 250 would.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut during = fd_count(pid);
    while during > before + 64 + 8 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        during = fd_count(pid);
    }
    assert!(
        during <= before + 64 + 8,
        "fds grew from {before} to {during} with 250 connections held and a cap of 64"
    );
    // The data port and the rest still answer.
    assert_eq!(server.call("GET", "/v1/items", None).0, 200);
    drop((idle, half));
    server.stop();
}

#[test]
fn half_sent_requests_and_idle_connections_are_closed_after_the_header_timeout() {
    let data = tempfile::tempdir().expect("tempdir");
    let server = Server::start(data.path(), &[]);
    let mut half = half_sent_requests(&server.api, 50);
    let mut idle = idle_connections(&server.api, 200);
    // A keep-alive connection after one complete request.
    let mut kept = TcpStream::connect(&server.api).expect("connect");
    write!(kept, "GET /health HTTP/1.1\r\nHost: appliance\r\n\r\n").expect("request");
    let mut head = [0u8; 12];
    kept.read_exact(&mut head).expect("answer");
    assert_eq!(&head, b"HTTP/1.1 200");
    // Under the default cap (256) all of them are open, and a client is still served.
    assert_eq!(timed_request(&server).0, 200);
    // The header timeout is 10 s; a generous deadline for a loaded machine.
    let deadline = Instant::now() + Duration::from_secs(90);
    for (index, stream) in half.iter_mut().enumerate() {
        assert!(
            closed_by_server(stream, deadline),
            "half-sent request {index} is still open"
        );
    }
    for (index, stream) in idle.iter_mut().enumerate() {
        assert!(
            closed_by_server(stream, deadline),
            "idle connection {index} is still open"
        );
    }
    assert!(
        closed_by_server(&mut kept, deadline),
        "an idle keep-alive connection is still open"
    );
    assert_eq!(timed_request(&server).0, 200);
    server.stop();
}

#[test]
fn a_body_that_stops_arriving_gets_408_and_the_connection_closes() {
    let data = tempfile::tempdir().expect("tempdir");
    let server = Server::start(data.path(), &[]);
    let mut stream = TcpStream::connect(&server.api).expect("connect");
    write!(
        stream,
        "POST /v1/items HTTP/1.1\r\nHost: appliance\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"name\":",
        server.token
    )
    .expect("head and part of the body");
    stream
        .set_read_timeout(Some(Duration::from_secs(90)))
        .expect("read timeout");
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .expect("answer, then close");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    // Meanwhile and afterwards, the API answers.
    assert_eq!(timed_request(&server).0, 200);
    server.stop();
}

/// `serve` on `data` under RLIMIT_NOFILE (`soft`, `hard`).
fn serve_with_nofile(data: &std::path::Path, soft: u64, hard: u64) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_appliance"));
    command.arg("serve").arg("--data-dir").arg(data).args([
        "--data-addr",
        "127.0.0.1:0",
        "--nbd-addr",
        "127.0.0.1:0",
        "--api-addr",
        "127.0.0.1:0",
    ]);
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        command.pre_exec(move || {
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, soft, hard)
                .map_err(std::io::Error::from)
        });
    }
    command
}

#[test]
fn serve_refuses_to_start_when_the_hard_fd_limit_is_below_its_budget() {
    let data = tempfile::tempdir().expect("tempdir");
    let mut child = serve_with_nofile(data.path(), 64, 64)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run serve");
    // It must exit by itself; one that started serving is stopped and is a failure.
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("serve started under a hard limit of 64 open files");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().expect("output");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    for part in [
        "hard limit on open files (RLIMIT_NOFILE) is 64",
        "256 control API connections",
        "api_max_connections",
    ] {
        assert!(stderr.contains(part), "{part:?} missing: {stderr}");
    }
    // Nothing was started: no token, no listener line.
    assert!(output.stdout.is_empty(), "{:?}", output.stdout);
}

#[test]
fn serve_raises_a_low_soft_fd_limit_toward_the_hard_limit() {
    let data = tempfile::tempdir().expect("tempdir");
    let mut child = serve_with_nofile(data.path(), 64, 4096)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("serve");
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
        &mut first,
    )
    .expect("first line");
    assert!(first.starts_with("data port listening on"), "{first:?}");
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files");
    let soft: u64 = line
        .split_whitespace()
        .nth(3)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(soft > 64 && soft <= 4096, "{line}");
    child.kill().expect("kill");
    child.wait().expect("wait");
}
