//! Makes the fixture of `appliance/tests/migrate_v1.rs`: a data directory written by the first
//! release (item records as `item.json`, jobs as `jobs/<id>.json`, the slot pages), packed as
//! `appliance/tests/fixtures/datadir-v1.tar.gz`.
//!
//! The first release is commit 49e16ed; build its binary and run this with it:
//!
//! ```text
//! git worktree add /tmp/oldrel 49e16ed
//! (cd /tmp/oldrel && CARGO_TARGET_DIR=/tmp/oldrel-target cargo build -p appliance)
//! cargo run -p appliance --example make_v1_fixture -- \
//!     /tmp/oldrel-target/debug/appliance appliance/tests/fixtures/datadir-v1.tar.gz
//! git worktree remove /tmp/oldrel
//! ```
//!
//! It serves a data directory at the fixed path [`ROOT`]`/data` (records hold absolute paths,
//! so the test unpacks it at the same place) with tiny disks and makes: `alpha` (1 disk,
//! protected, two recovery points, its initial-replication job succeeded), `beta` (2 disks,
//! still in initial replication, its job running) and `gamma` (1 disk, failed over at its
//! point, the failover job succeeded); four slots attached. `expected.json` beside the data
//! directory holds what the first release's API answered for items, points, jobs and slots.

use std::io::{BufRead, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use engine::delta::{Consistency, DiskGeometry};
use serde_json::{Value, json};
use source_agent::sender::{Agent, AgentConfig};

/// Where the fixture's data directory lives (when made, and when the test unpacks it).
const ROOT: &str = "/tmp/appliance-v1-fixture";
const DISK_BYTES: u64 = 1 << 20;

type Result<T> = std::result::Result<T, String>;

struct Serve {
    child: Child,
    api: String,
    data: SocketAddr,
    token: String,
}

impl Serve {
    fn start(binary: &Path, data_dir: &Path) -> Result<Self> {
        let mut child = Command::new(binary)
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--data-addr", "127.0.0.1:0", "--api-addr", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting {}: {e}", binary.display()))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut lines = std::io::BufReader::new(stdout).lines();
        let mut line = |prefix: &str| -> Result<String> {
            let text = lines
                .next()
                .ok_or("serve printed nothing")?
                .map_err(|e| e.to_string())?;
            text.strip_prefix(prefix)
                .map(str::to_owned)
                .ok_or_else(|| format!("unexpected line {text:?}"))
        };
        let data = line("data port listening on ")?
            .parse()
            .map_err(|e| format!("data port: {e}"))?;
        let api = line("control API listening on ")?;
        let token = std::fs::read_to_string(data_dir.join("api-token"))
            .map_err(|e| format!("api-token: {e}"))?
            .trim()
            .to_owned();
        Ok(Self {
            child,
            api,
            data,
            token,
        })
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<(u16, Value)> {
        let mut stream = std::net::TcpStream::connect(&self.api).map_err(|e| e.to_string())?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer \
             {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.token,
            body.len()
        )
        .map_err(|e| e.to_string())?;
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .map_err(|e| e.to_string())?;
        let (head, body) = response.split_once("\r\n\r\n").ok_or("no HTTP head")?;
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or("no status")?;
        let body = serde_json::from_str(body).unwrap_or(Value::Null);
        Ok((status, body))
    }

    fn expect(&self, method: &str, path: &str, body: Option<Value>, status: u16) -> Result<Value> {
        let (got, answer) = self.call(method, path, body)?;
        if got != status {
            return Err(format!("{method} {path}: {got} {answer}"));
        }
        Ok(answer)
    }

    fn wait_job(&self, id: &Value) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let job = self.expect("GET", &format!("/v1/jobs/{id}"), None, 200)?;
            match job["state"].as_str() {
                Some("succeeded") => return Ok(()),
                Some("running") if Instant::now() < deadline => {}
                _ => return Err(format!("job {id}: {job}")),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(mut self) -> Result<()> {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .map_err(|e| e.to_string())?;
        let status = self.child.wait().map_err(|e| e.to_string())?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("serve exited {status:?}"))
        }
    }
}

fn hex_id(text: &str) -> Result<[u8; 16]> {
    let mut id = [0u8; 16];
    for (index, byte) in id.iter_mut().enumerate() {
        *byte = text
            .get(index * 2..index * 2 + 2)
            .and_then(|pair| u8::from_str_radix(pair, 16).ok())
            .ok_or_else(|| format!("item id {text:?}"))?;
    }
    Ok(id)
}

/// Enables an item of `disks` 1 MiB disks: (id, stream token, job id).
fn enable(serve: &Serve, name: &str, disks: usize) -> Result<(String, String, Value)> {
    let disks: Vec<Value> = (0..disks).map(|_| json!({"size_mib": 1})).collect();
    let enabled = serve.expect(
        "POST",
        "/v1/items",
        Some(json!({"name": name, "disks": disks})),
        201,
    )?;
    let id = enabled["item"]["id"].as_str().ok_or("no id")?.to_owned();
    let token = enabled["stream_token"]
        .as_str()
        .ok_or("no token")?
        .to_owned();
    Ok((id, token, enabled["job"]["id"].clone()))
}

/// Streams one 64 KiB write and a bookmark per label to item `id`; returns the point ids.
fn stream(serve: &Serve, id: &str, token: &str, name: &str, labels: &[&str]) -> Result<Vec<u64>> {
    let geometry = vec![DiskGeometry {
        size_bytes: DISK_BYTES,
        block_size_bytes: 4096,
    }];
    let config = AgentConfig::new(serve.data, hex_id(id)?, token.as_bytes(), name, geometry);
    let agent = Agent::connect(config).map_err(|e| e.to_string())?;
    let mut points = Vec::new();
    for (n, label) in labels.iter().enumerate() {
        let fill = n as u8 + 1;
        let data: Vec<u8> = (0..65536u32).map(|i| fill ^ (i % 251) as u8).collect();
        agent
            .write(0, u64::from(fill) * 65536, &data)
            .map_err(|e| e.to_string())?;
        let bookmark = n as u64 + 1;
        points.push(
            agent
                .bookmark(Consistency::Crash, bookmark, bookmark, label)
                .map_err(|e| e.to_string())?,
        );
    }
    agent
        .close(Duration::from_secs(60))
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let last = points.last().copied().unwrap_or(0);
    loop {
        let listed = serve.expect("GET", &format!("/v1/items/{id}/points"), None, 200)?;
        if listed
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["id"].as_u64() == Some(last)))
        {
            return Ok(points);
        }
        if Instant::now() > deadline {
            return Err(format!("point {last} of {id} never appeared"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn run(binary: &Path, out: &Path) -> Result<()> {
    let root = PathBuf::from(ROOT);
    if root.exists() {
        std::fs::remove_dir_all(&root).map_err(|e| format!("clearing {ROOT}: {e}"))?;
    }
    let data = root.join("data");
    std::fs::create_dir_all(&data).map_err(|e| e.to_string())?;
    let serve = Serve::start(binary, &data)?;

    let (alpha, alpha_token, alpha_job) = enable(&serve, "alpha", 1)?;
    stream(&serve, &alpha, &alpha_token, "alpha", &["first", "second"])?;
    serve.wait_job(&alpha_job)?;

    let (beta, _, _) = enable(&serve, "beta", 2)?;

    let (gamma, gamma_token, gamma_job) = enable(&serve, "gamma", 1)?;
    let points = stream(&serve, &gamma, &gamma_token, "gamma", &["before-failover"])?;
    serve.wait_job(&gamma_job)?;
    let failover = serve.expect(
        "POST",
        &format!("/v1/items/{gamma}/failover"),
        Some(json!({
            "point": points[0],
            "target_dir": data.join("failover-gamma"),
            "source_shut_down": true,
        })),
        202,
    )?;
    serve.wait_job(&failover["id"])?;

    let mut expected = json!({
        "items": serve.expect("GET", "/v1/items", None, 200)?,
        "jobs": serve.expect("GET", "/v1/jobs", None, 200)?,
        "slots": serve.expect("GET", "/v1/slots", None, 200)?,
        "points": {},
    });
    for id in [&alpha, &beta, &gamma] {
        expected["points"][id.as_str()] =
            serve.expect("GET", &format!("/v1/items/{id}/points"), None, 200)?;
    }
    serve.stop()?;
    std::fs::write(
        root.join("expected.json"),
        serde_json::to_vec_pretty(&expected).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;

    let out = std::path::absolute(out).map_err(|e| e.to_string())?;
    let status = Command::new("tar")
        .args(["--sparse", "-czf"])
        .arg(&out)
        .args(["-C", "/tmp", "appliance-v1-fixture"])
        .status()
        .map_err(|e| format!("tar: {e}"))?;
    if !status.success() {
        return Err(format!("tar exited {status:?}"));
    }
    std::fs::remove_dir_all(&root).map_err(|e| e.to_string())?;
    println!("wrote {}", out.display());
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let [_, binary, out] = args.as_slice() else {
        eprintln!("usage: make_v1_fixture <appliance v1 binary> <out.tar.gz>");
        return std::process::ExitCode::from(2);
    };
    match run(Path::new(binary), Path::new(out)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("make_v1_fixture: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}
