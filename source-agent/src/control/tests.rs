use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::time::Instant;

use super::client::{ClientError, call};
use super::protocol::ConsistencyName;
use super::*;

/// A fake capture: records calls; `quiesced` refuses bookmarks like the real one.
#[derive(Default)]
struct Fake {
    calls: Mutex<Vec<String>>,
    quiesced: AtomicBool,
}

impl Fake {
    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
    fn record(&self, call: String) -> u64 {
        let mut calls = self.calls.lock().unwrap();
        calls.push(call);
        calls.len() as u64
    }
}

impl ControlTarget for Fake {
    fn status(&self) -> Result<serde_json::Value, String> {
        self.record("status".into());
        Ok(
            serde_json::json!({"link": "connected", "quiesced": self.quiesced.load(Ordering::SeqCst)}),
        )
    }
    fn bookmark(&self, consistency: Consistency, label: &str) -> Result<BookmarkReply, String> {
        if self.quiesced.load(Ordering::SeqCst) {
            return Err("the agent is quiesced: `resume` first".into());
        }
        let seq = self.record(format!("bookmark {} {label}", consistency.name()));
        Ok(BookmarkReply {
            bookmark_id: 1000 + seq,
            seq,
            consistency: consistency.name().into(),
        })
    }
    fn wait_acked(&self, seq: u64, timeout: Duration) -> Result<(), String> {
        self.record(format!("wait {seq} {}", timeout.as_secs()));
        if timeout.is_zero() {
            return Err(format!("seq {seq} not acknowledged within 0 ms"));
        }
        Ok(())
    }
    fn quiesce(
        &self,
        consistency: Consistency,
        label: &str,
        timeout: Duration,
    ) -> Result<BookmarkReply, String> {
        let seq = self.record(format!(
            "quiesce {} {label} {}",
            consistency.name(),
            timeout.as_secs()
        ));
        self.quiesced.store(true, Ordering::SeqCst);
        Ok(BookmarkReply {
            bookmark_id: 1000 + seq,
            seq,
            consistency: consistency.name().into(),
        })
    }
    fn resume(&self) -> Result<(), String> {
        self.record("resume".into());
        self.quiesced.store(false, Ordering::SeqCst);
        Ok(())
    }
}

fn server() -> (tempfile::TempDir, Arc<Fake>, ControlServer) {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(Fake::default());
    let server = ControlServer::start(&dir.path().join("c.sock"), fake.clone()).unwrap();
    (dir, fake, server)
}

/// Sends raw bytes on a fresh connection and returns the first answer line.
fn raw(path: &Path, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(path).unwrap();
    s.write_all(bytes).unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    line
}

fn bookmark_request(label: &str, wait_secs: Option<u64>) -> Request {
    Request::Bookmark {
        consistency: ConsistencyName::Crash,
        label: label.into(),
        freeze: vec![],
        wait_secs,
    }
}

#[test]
fn every_op_works_over_the_socket() {
    let (_dir, fake, server) = server();
    let path = server.path().to_path_buf();
    let status = call(&path, &Request::Status {}).unwrap().status.unwrap();
    assert_eq!(status["link"], "connected");
    let b = call(&path, &bookmark_request("nightly", Some(5)))
        .unwrap()
        .bookmark
        .unwrap();
    assert_eq!(b.consistency, "crash");
    let q = Request::Quiesce {
        consistency: ConsistencyName::App,
        label: "failover".into(),
        timeout_secs: Some(7),
    };
    let q = call(&path, &q).unwrap().bookmark.unwrap();
    assert_eq!(q.consistency, "app");
    // Quiesced: the fake (like the capture) refuses bookmarks; the refusal reaches the client.
    let refused = call(&path, &bookmark_request("x", None)).unwrap_err();
    assert!(
        matches!(refused, ClientError::Refused(ref m) if m.contains("quiesced")),
        "{refused}"
    );
    call(&path, &Request::Resume {}).unwrap();
    assert_eq!(
        fake.calls(),
        vec![
            "status".to_string(),
            "bookmark crash nightly".into(),
            format!("wait {} 5", b.seq),
            "quiesce app failover 7".into(),
            "resume".into(),
        ]
    );
}

#[test]
fn a_failed_wait_names_the_bookmark_taken() {
    let (_dir, _fake, server) = server();
    let error = call(server.path(), &bookmark_request("", Some(0))).unwrap_err();
    let message = error.to_string();
    assert!(message.contains("was taken"), "{message}");
    assert!(message.contains("not acknowledged"), "{message}");
}

#[test]
fn several_requests_share_one_connection() {
    let (_dir, _fake, server) = server();
    let mut s = UnixStream::connect(server.path()).unwrap();
    s.write_all(b"{\"op\":\"status\"}\n{\"op\":\"resume\"}\n")
        .unwrap();
    let mut r = BufReader::new(s);
    for _ in 0..2 {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert!(line.starts_with("{\"ok\":true"), "{line}");
    }
}

#[test]
fn bad_requests_are_refused_by_name() {
    let (_dir, fake, server) = server();
    let p = server.path();
    let check = |line: &str, what: &str| {
        let answer = raw(p, format!("{line}\n").as_bytes());
        let r: Response = serde_json::from_str(&answer).unwrap();
        assert!(!r.ok, "{answer}");
        let e = r.error.unwrap();
        assert!(e.contains(what), "{what} not in {e}");
    };
    check(r#"{"op":"reboot"}"#, "reboot");
    check(r#"{"op":"status","verbose":true}"#, "verbose");
    check(r#"{"op":"bookmark","labell":"x"}"#, "labell");
    check(r#"{"op":"bookmark","consistency":"file"}"#, "file");
    check(r#"{"op":"bookmark","wait_secs":-1}"#, "`wait_secs`");
    check(r#"{"op":"quiesce","label":7}"#, "`label`");
    check(r#"{"op":"bookmark","freeze":"/mnt"}"#, "`freeze`");
    check(r#"{"op":"bookmark","wait_secs":3601}"#, "wait_secs");
    check(r#"{"op":"quiesce","timeout_secs":99999}"#, "timeout_secs");
    check(
        &format!(r#"{{"op":"bookmark","label":"{}"}}"#, "l".repeat(257)),
        "label",
    );
    check(r#"{"label":"x"}"#, "op");
    check("not json", "bad request");
    check(
        r#"{"op":"bookmark","freeze":["relative/dir"]}"#,
        "relative/dir",
    );
    // Nothing reached the target.
    assert!(fake.calls().is_empty(), "{:?}", fake.calls());
}

#[test]
fn an_oversized_line_is_refused_and_the_connection_closed() {
    let (_dir, _fake, server) = server();
    let mut s = UnixStream::connect(server.path()).unwrap();
    // Without a newline: the server stops reading after the limit.
    let _ = s.write_all(&vec![b' '; MAX_REQUEST_BYTES + 100]);
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.contains("longer than 4096"), "{line}");
    line.clear();
    assert_eq!(
        r.read_line(&mut line).unwrap(),
        0,
        "connection must be closed"
    );
    // A line of exactly the limit (newline included) is read.
    let mut exact = vec![b' '; MAX_REQUEST_BYTES - 1 - 15];
    exact.extend_from_slice(b"{\"op\":\"status\"}\n");
    assert_eq!(exact.len(), MAX_REQUEST_BYTES);
    assert!(raw(server.path(), &exact).starts_with("{\"ok\":true"));
}

#[test]
fn idle_clients_do_not_block_others_and_the_limit_holds() {
    let (_dir, _fake, server) = server();
    let p = server.path();
    // MAX_CONNECTIONS idle clients; wait until the server counts them all.
    let idle: Vec<UnixStream> = (0..MAX_CONNECTIONS)
        .map(|_| UnixStream::connect(p).unwrap())
        .collect();
    // One more is refused at once with a named error.
    let answer = raw(p, b"");
    assert!(answer.contains("too many control connections"), "{answer}");
    // Idle clients that stop answering do not stop the others: free one, and a request works.
    drop(idle);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match call(p, &Request::Status {}) {
            Ok(_) => break,
            Err(e) => {
                assert!(Instant::now() < deadline, "never freed: {e}");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
    // A half-sent request on one connection does not block a full one on another.
    let mut slow = UnixStream::connect(p).unwrap();
    slow.write_all(b"{\"op\":").unwrap();
    call(p, &Request::Status {}).unwrap();
}

#[test]
fn the_socket_is_private_and_removed_on_stop() {
    let (_dir, _fake, server) = server();
    let path = server.path().to_path_buf();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    server.stop();
    assert!(!path.exists());
}

#[test]
fn a_live_socket_is_refused_and_a_stale_one_replaced() {
    let (dir, _fake, server) = server();
    let error = ControlServer::start(server.path(), Arc::new(Fake::default())).unwrap_err();
    assert!(matches!(error, ControlError::InUse { .. }), "{error}");
    // A stale socket: bound once, nobody listening any more.
    let stale = dir.path().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    let replaced = ControlServer::start(&stale, Arc::new(Fake::default())).unwrap();
    call(replaced.path(), &Request::Status {}).unwrap();
    // Not a socket: refused, left alone.
    let file = dir.path().join("file.sock");
    std::fs::write(&file, b"keep").unwrap();
    let error = ControlServer::start(&file, Arc::new(Fake::default())).unwrap_err();
    assert!(matches!(error, ControlError::NotASocket { .. }), "{error}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep");
}

#[test]
fn no_agent_is_a_named_connect_error() {
    let dir = tempfile::tempdir().unwrap();
    let error = call(&dir.path().join("none.sock"), &Request::Status {}).unwrap_err();
    assert!(matches!(error, ClientError::Connect { .. }));
    assert!(error.to_string().contains("none.sock"), "{error}");
}
