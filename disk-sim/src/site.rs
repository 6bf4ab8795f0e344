//! A site: a directory holding VM disk images and, when an appliance runs there, that
//! appliance's data directory, and the `appliance serve` process itself, driven through its
//! control API (HTTP/JSON) like an operator or an orchestrator would.
//!
//! ```text
//!  <site dir>/
//!  ├── vms/<vm>/disk-<i>.img     the VMs' disks (crate::vm)
//!  ├── appliance/                the appliance's data directory (when one runs here)
//!  └── restore/                  disks written by failover and test failover
//! ```
//!
//! The appliance is a real process started from the `appliance` binary (found beside this
//! program, or at `$APPLIANCE_BIN`); it can be stopped with SIGTERM, killed with SIGKILL and
//! restarted on the same ports. Nothing here pretends to be an appliance.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use serde_json::Value;

/// Where the `appliance` binary is: `$APPLIANCE_BIN`, else beside the running program (cargo
/// puts both binaries of the workspace in one target directory).
pub fn appliance_bin() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("APPLIANCE_BIN") {
        return Ok(PathBuf::from(path));
    }
    let me = std::env::current_exe().context("locating this program")?;
    let mut dir = me.parent().map(Path::to_path_buf);
    // Test binaries live one level down, in target/<profile>/deps.
    for _ in 0..2 {
        if let Some(d) = &dir {
            let candidate = d.join("appliance");
            if candidate.is_file() {
                return Ok(candidate);
            }
            dir = d.parent().map(Path::to_path_buf);
        }
    }
    bail!(
        "cannot find the `appliance` binary beside {} (build it with `cargo build -p \
         appliance`, or set APPLIANCE_BIN)",
        me.display()
    )
}

/// An HTTP error answer of the control API.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// The API's error code (`wrong_state`, …).
    pub code: String,
    /// Its message.
    pub message: String,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HTTP {} {}: {}", self.status, self.code, self.message)
    }
}

impl std::error::Error for ApiError {}

/// A newly protected item.
#[derive(Debug, Clone)]
pub struct EnabledItem {
    /// Item id, 32 hex digits.
    pub id: String,
    /// Its stream token.
    pub token: String,
    /// Its replication job.
    pub job: u64,
}

/// A client of an appliance's control API (HTTP/JSON, bearer token).
#[derive(Debug, Clone)]
pub struct Api {
    base: String,
    token: String,
    http: ureq::Agent,
}

impl Api {
    /// A client of the API at `base` (`http://host:port`; a bare `host:port` means http).
    pub fn new(base: &str, token: &str) -> Self {
        let base = base.trim().trim_end_matches('/');
        let base = if base.starts_with("http://") {
            base.to_owned()
        } else {
            format!("http://{base}")
        };
        let http = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .proxy(None)
            .timeout_connect(Some(Duration::from_secs(5)))
            .timeout_global(Some(Duration::from_secs(120)))
            .build()
            .into();
        Self {
            base,
            token: token.trim().to_owned(),
            http,
        }
    }

    /// One API call; a 2xx answer as JSON, anything else an [`ApiError`] (inside the
    /// `anyhow::Error`, so callers can downcast).
    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        let auth = format!("Bearer {}", self.token);
        let result = match method {
            "GET" => self.http.get(&url).header("Authorization", &auth).call(),
            "DELETE" => self.http.delete(&url).header("Authorization", &auth).call(),
            "POST" => {
                let request = self.http.post(&url).header("Authorization", &auth);
                match body {
                    Some(body) => request
                        .content_type("application/json")
                        .send(body.to_string()),
                    None => request.send_empty(),
                }
            }
            other => bail!("unsupported method {other}"),
        };
        let mut response = result.with_context(|| format!("{method} {url}"))?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .with_config()
            .limit(16 << 20)
            .read_to_string()
            .with_context(|| format!("{method} {url}: reading the answer"))?;
        let value: Value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        if (200..300).contains(&status) {
            return Ok(value);
        }
        Err(ApiError {
            status,
            code: value["error"]["code"].as_str().unwrap_or("").to_owned(),
            message: value["error"]["message"]
                .as_str()
                .map_or_else(|| value.to_string(), str::to_owned),
        }
        .into())
    }

    /// GET.
    pub fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.call("GET", path, None)
    }

    /// POST.
    pub fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        self.call("POST", path, Some(&body))
    }

    /// Enables protection (`POST /v1/items` with `body`); the new item's id, stream token and
    /// replication job.
    pub fn enable(&self, body: Value) -> anyhow::Result<EnabledItem> {
        let enabled = self.post("/v1/items", body)?;
        let field = |value: &Value, what: &str| -> anyhow::Result<String> {
            value
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| anyhow!("the enable answer has no {what}: {enabled}"))
        };
        Ok(EnabledItem {
            id: field(&enabled["item"]["id"], "item id")?,
            token: field(&enabled["stream_token"], "stream token")?,
            job: enabled["job"]["id"]
                .as_u64()
                .ok_or_else(|| anyhow!("the enable answer has no job: {enabled}"))?,
        })
    }

    /// Waits for job `id` to end, calling `progress(percent, message)` on every change;
    /// an error if it failed or takes longer than `timeout`.
    pub fn wait_job(
        &self,
        id: u64,
        timeout: Duration,
        progress: &mut dyn FnMut(u64, &str),
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        let mut last = (u64::MAX, String::new());
        loop {
            let job = self.get(&format!("/v1/jobs/{id}"))?;
            let percent = job["percent"].as_u64().unwrap_or(0);
            let message = job["message"].as_str().unwrap_or("").to_owned();
            if (percent, &message) != (last.0, &last.1) {
                progress(percent, &message);
                last = (percent, message);
            }
            match job["state"].as_str() {
                Some("succeeded") => return Ok(job),
                Some("failed") => bail!(
                    "job {id} ({}) failed: {}",
                    job["kind"].as_str().unwrap_or("?"),
                    job["error"].as_str().unwrap_or("no reason given")
                ),
                _ => {}
            }
            if Instant::now() > deadline {
                bail!("job {id} still running after {timeout:?}: {job}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until item `id` is in `state`.
    pub fn wait_state(&self, id: &str, state: &str, timeout: Duration) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let item = self.get(&format!("/v1/items/{id}"))?;
            if item["state"] == state {
                return Ok(item);
            }
            if Instant::now() > deadline {
                bail!("item {id} not {state} after {timeout:?}: {item}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until point `seq` of item `id` is applied (listed).
    pub fn wait_point(&self, id: &str, seq: u64, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let points = self.get(&format!("/v1/items/{id}/points"))?;
            if points
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p["id"].as_u64() == Some(seq)))
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("point {seq} of item {id} not applied after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A running `appliance serve` on loopback; derefs to its [`Api`].
#[derive(Debug)]
pub struct Appliance {
    child: Option<Child>,
    bin: PathBuf,
    data_dir: PathBuf,
    extra: Vec<String>,
    /// Address of its data port (kept across restarts).
    pub data_addr: SocketAddr,
    /// Base URL of its control API (changes on restart).
    pub api: String,
    client: Api,
}

impl std::ops::Deref for Appliance {
    type Target = Api;

    fn deref(&self) -> &Api {
        &self.client
    }
}

impl Appliance {
    /// Starts `appliance serve --data-dir DATA_DIR` with `extra` flags on loopback ports it
    /// picks; returns once both ports listen.
    pub fn start(data_dir: &Path, extra: &[&str]) -> anyhow::Result<Self> {
        Self::start_with_bin(&appliance_bin()?, data_dir, extra)
    }

    /// [`Appliance::start`] with a given `appliance` binary.
    pub fn start_with_bin(bin: &Path, data_dir: &Path, extra: &[&str]) -> anyhow::Result<Self> {
        let bin = bin.to_path_buf();
        let mut appliance = Self {
            child: None,
            bin,
            data_dir: data_dir.to_path_buf(),
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
            data_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            api: String::new(),
            client: Api::new("http://127.0.0.1:0", ""),
        };
        appliance.spawn()?;
        Ok(appliance)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.data_dir)
            .with_context(|| format!("creating {}", self.data_dir.display()))?;
        let mut child = Command::new(&self.bin)
            .arg("serve")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--data-addr", &self.data_addr.to_string()])
            .args(["--api-addr", "127.0.0.1:0"])
            .args(&self.extra)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        let stdout = child.stdout.take().context("the appliance's stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let mut next_line = |what: &str| -> anyhow::Result<String> {
            match lines.next() {
                Some(Ok(line)) => Ok(line),
                _ => Err(anyhow!("the appliance exited before printing {what}")),
            }
        };
        let started = (|| -> anyhow::Result<(SocketAddr, String)> {
            let first = next_line("its data port")?;
            let data = first
                .strip_prefix("data port listening on ")
                .ok_or_else(|| anyhow!("unexpected first line {first:?}"))?
                .parse()?;
            let second = next_line("its control API address")?;
            let api = second
                .strip_prefix("control API listening on ")
                .ok_or_else(|| anyhow!("unexpected second line {second:?}"))?
                .to_owned();
            Ok((data, api))
        })();
        let (data, api) = match started {
            Ok(addresses) => addresses,
            Err(error) => {
                let _ = child.kill();
                let mut stderr = String::new();
                if let Some(mut pipe) = child.stderr.take() {
                    let _ = pipe.read_to_string(&mut stderr);
                }
                let _ = child.wait();
                bail!("{error:#}; its stderr:\n{stderr}");
            }
        };
        // Keep draining stderr so the appliance never blocks on a full pipe.
        if let Some(pipe) = child.stderr.take() {
            std::thread::spawn(move || {
                let mut sink = Vec::new();
                let _ = BufReader::new(pipe).read_to_end(&mut sink);
            });
        }
        self.data_addr = data;
        self.api = format!("http://{api}");
        let token = std::fs::read_to_string(self.data_dir.join("api-token"))
            .context("reading the API token")?;
        self.client = Api::new(&self.api, &token);
        self.child = Some(child);
        Ok(())
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, then start again on the same data port.
    pub fn kill_and_restart(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().context("SIGKILL of the appliance")?;
            child.wait()?;
        }
        self.spawn()
    }

    /// SIGTERM and wait; an error unless it exits 0.
    pub fn stop(mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .context("sending SIGTERM to the appliance")?;
        let exit = child.wait()?;
        if !exit.success() {
            bail!("the appliance exited with {exit} after SIGTERM");
        }
        Ok(())
    }
}

impl Drop for Appliance {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Parses 32 hex digits into an item id.
pub fn parse_item_id(hex: &str) -> anyhow::Result<[u8; 16]> {
    // ASCII first: slicing below must never fall inside a multi-byte character.
    if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("item id {hex:?} is not 32 hex digits");
    }
    let mut id = [0u8; 16];
    for (i, byte) in id.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
            .with_context(|| format!("item id {hex:?}"))?;
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn item_ids_parse_and_garbage_is_refused_without_panicking() {
        let id = parse_item_id(&"ab".repeat(16)).unwrap();
        assert_eq!(id, [0xab; 16]);
        for bad in ["", "ab", &"g".repeat(32), &"é".repeat(16), &"a".repeat(33)] {
            assert!(parse_item_id(bad).is_err(), "{bad:?}");
        }
    }
}
