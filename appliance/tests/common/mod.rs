//! Checks shared by the process-level tests: an item's replicas and every recovery point
//! against an oracle of per-disk digests (disk-sim's digest and verifier).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use disk_sim::source::{compare_file, compare_files};
use engine::delta::DiskGeometry;
use engine::durable::{DurableDir, StdDir};
use engine::materialize::{Source, materialize_disk};
use engine::meta::{MetaStore, item_key};

/// The tests' seeded pseudo-random numbers: disk-sim's generator (Xoshiro256++, seeded with
/// `seed_from_u64`), so that every seeded test in the workspace draws from the one RNG.
#[allow(unused_imports)] // not every test draws numbers
pub use disk_sim::rng::Rng;

/// Checks the item's replicas against `final_digests` and every retained point against
/// `oracle` (point id → whole digest per disk, [`disk_sim::source::image_digest`]; a point
/// not in it, such as a "latest" point, must equal the final state), each file through
/// disk-sim's verifier ([`disk_sim::source::compare_file`]). Returns the number of points
/// verified.
pub fn verify_item(
    data: &Path,
    item_id: &[u8; 16],
    disks: &[DiskGeometry],
    oracle: &BTreeMap<u64, Vec<u64>>,
    final_digests: &[u64],
    scratch: &Path,
) -> usize {
    let hex: String = item_id.iter().map(|b| format!("{b:02x}")).collect();
    let item = data.join("items").join(hex);
    let replica = |index: usize| item.join("replicas").join(format!("disk-{index}.img"));
    let replicas: Vec<PathBuf> = (0..final_digests.len()).map(replica).collect();
    let differ = compare_files(&replicas, final_digests);
    assert!(
        differ.is_empty(),
        "replicas differ from the source: {differ:?}"
    );
    let meta =
        MetaStore::open(StdDir::open(data).unwrap().open("meta.redb", true).unwrap()).unwrap();
    let key = item_key(item_id);
    let points = meta.points(key).unwrap();
    assert!(
        oracle
            .keys()
            .all(|seq| points.iter().any(|p| p.point_id == *seq)),
        "every bookmark became a point"
    );
    let source = Source {
        meta: &meta,
        item: key,
        disks,
        preserve_dir: Arc::new(StdDir::open(&item.join("preserve")).unwrap()),
        grain_bytes: 4096,
        pins: engine::apply::Pins::default(),
    };
    let path = scratch.join("verify-point.raw");
    for point in &points {
        let expected = oracle
            .get(&point.point_id)
            .map_or(final_digests, Vec::as_slice);
        for (index, digest) in expected.iter().enumerate() {
            let replica = std::fs::File::open(replica(index)).unwrap();
            let out = std::fs::File::create(&path).unwrap();
            materialize_disk(
                &source,
                point.point_id,
                index as u16,
                &replica,
                &out,
                &mut |_| {},
            )
            .unwrap();
            assert_eq!(
                compare_file(&path, *digest).unwrap(),
                None,
                "point {} disk {index}",
                point.point_id
            );
        }
    }
    points.len()
}

/// A running `appliance serve` process on loopback ports of its own choosing.
pub struct Server {
    /// The process.
    pub child: std::process::Child,
    /// Control API address.
    pub api: String,
    /// Data port address.
    pub data: std::net::SocketAddr,
    /// API token.
    pub token: String,
    /// The typed client of its control API (`appliance-api`), with the token.
    pub client: appliance_api::Client,
    stopped: bool,
}

impl Server {
    /// Starts `serve` on `data_dir` with `extra` flags; waits until both ports listen.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Self {
        Self::start_on(data_dir, "127.0.0.1:0", extra)
    }

    /// Same, with a given data-port address (to keep it across restarts).
    pub fn start_on(data_dir: &Path, data_addr: &str, extra: &[&str]) -> Self {
        Self::start_with_env(data_dir, data_addr, extra, &[])
    }

    /// Same, with environment variables (e.g. the test hooks of `appliance::testhook`).
    pub fn start_with_env(
        data_dir: &Path,
        data_addr: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        use std::io::BufRead;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_appliance"))
            .envs(env.iter().copied())
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--data-addr", data_addr, "--api-addr", "127.0.0.1:0"])
            // A test that keeps its NBD address across restarts passes its own.
            .args(if extra.contains(&"--nbd-addr") {
                &[][..]
            } else {
                &["--nbd-addr", "127.0.0.1:0"][..]
            })
            .args(extra)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next().unwrap().unwrap();
        let data = first
            .strip_prefix("data port listening on ")
            .unwrap_or_else(|| panic!("{first:?}"))
            .parse()
            .unwrap();
        let second = lines.next().unwrap().unwrap();
        let api = second
            .strip_prefix("control API listening on ")
            .unwrap_or_else(|| panic!("{second:?}"))
            .to_owned();
        let token = std::fs::read_to_string(data_dir.join("api-token"))
            .unwrap()
            .trim()
            .to_owned();
        let client = appliance_api::Client::new(&api, Some(token.clone())).unwrap();
        Self {
            child,
            api,
            data,
            token,
            client,
            stopped: false,
        }
    }

    /// The typed client of its control API.
    pub fn api(&self) -> &appliance_api::Client {
        &self.client
    }

    /// One request with the token, for tests of the HTTP answers themselves (statuses and
    /// body shapes); returns the status and the body as JSON (`Value::Null` for an empty
    /// body, a string for a non-JSON body). Everything else uses [`Server::api`].
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let method = match method {
            "GET" => appliance_api::Method::Get,
            "POST" => appliance_api::Method::Post,
            "DELETE" => appliance_api::Method::Delete,
            other => panic!("no {other} in the control API; use common::request"),
        };
        let (status, text) = self
            .client
            .send(method, path, body.map(|b| b.to_string()))
            .unwrap();
        (status, body_json(&text))
    }

    /// A request that must answer `status`; returns the body.
    pub fn expect(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
        status: u16,
    ) -> serde_json::Value {
        let (got, answer) = self.call(method, path, body);
        assert_eq!(got, status, "{method} {path}: {answer}");
        answer
    }

    /// Polls a job until it ends; panics unless it succeeded. Returns its view.
    pub fn wait_job(&self, id: u64) -> appliance_api::model::JobView {
        let job = self
            .client
            .wait_job(
                id,
                std::time::Duration::from_millis(50),
                std::time::Duration::from_secs(120),
                &mut |_| {},
            )
            .unwrap_or_else(|e| panic!("job {id}: {e}"));
        assert_eq!(
            job.state,
            appliance_api::model::JobState::Succeeded,
            "job {id} failed: {job:?}"
        );
        job
    }

    /// SIGTERM, and the exit status must be 0.
    pub fn stop(mut self) {
        self.stopped = true;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        assert!(
            self.child.wait().unwrap().success(),
            "serve exits 0 on SIGTERM"
        );
    }

    /// SIGKILL.
    pub fn kill(mut self) {
        self.stopped = true;
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Server {
    /// A test that panics must not leave a server running.
    fn drop(&mut self) {
        if !self.stopped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A body as JSON: `Value::Null` when empty, a string when not JSON.
fn body_json(body: &str) -> serde_json::Value {
    if body.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(body).unwrap_or_else(|_| serde_json::Value::String(body.to_owned()))
    }
}

/// One raw HTTP/1.1 request on a fresh connection, for the tests of HTTP itself (odd tokens,
/// no token, connection limits); returns the status and the body as JSON
/// (`Value::Null` for an empty body, a string for a non-JSON body).
pub fn request(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let content = if body.is_empty() {
        String::new()
    } else {
        "Content-Type: application/json\r\n".to_owned()
    };
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}{content}\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body_json(body))
}

/// Parses 32 hex digits.
pub fn item_id(hex: &str) -> [u8; 16] {
    let mut id = [0u8; 16];
    for (i, byte) in id.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
    }
    id
}
