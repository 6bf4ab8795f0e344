//! A site: a directory holding VM disk images and, when an appliance runs there, that
//! appliance's data directory, and the `appliance serve` process itself, driven through its
//! control API (`appliance-api`'s typed client) like an operator or an orchestrator would.
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
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use appliance_api::model::{ItemState, ItemView, JobState, JobView};

/// Where the `appliance` binary is: `$APPLIANCE_BIN`, else beside the running program (cargo
/// puts both binaries of the workspace in one target directory).
pub fn appliance_bin() -> anyhow::Result<PathBuf> {
    workspace_bin("appliance", "APPLIANCE_BIN")
}

/// Where the `source-agent` binary is: `$SOURCE_AGENT_BIN`, else beside the running program.
pub fn source_agent_bin() -> anyhow::Result<PathBuf> {
    workspace_bin("source-agent", "SOURCE_AGENT_BIN")
}

/// A binary of the workspace: `$env`, else beside the running program (or one directory up:
/// test binaries live in `target/<profile>/deps`).
fn workspace_bin(name: &str, env: &str) -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os(env) {
        return Ok(PathBuf::from(path));
    }
    let me = std::env::current_exe().context("locating this program")?;
    let mut dir = me.parent().map(Path::to_path_buf);
    for _ in 0..2 {
        if let Some(d) = &dir {
            let candidate = d.join(name);
            if candidate.is_file() {
                return Ok(candidate);
            }
            dir = d.parent().map(Path::to_path_buf);
        }
    }
    bail!(
        "cannot find the `{name}` binary beside {} (build it with `cargo build -p {name}`, or \
         set {env})",
        me.display()
    )
}

/// An error answer of the control API: its status, code and message (the typed client's).
pub type ApiError = appliance_api::ApiRefusal;

/// How often the waits below ask the API.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// A client of an appliance's control API: `appliance-api`'s typed client (it derefs to
/// it: `api.item(id)`, `api.points(id)`, …), plus waits that name what they waited for.
#[derive(Debug, Clone)]
pub struct Api {
    client: appliance_api::Client,
}

impl std::ops::Deref for Api {
    type Target = appliance_api::Client;

    fn deref(&self) -> &appliance_api::Client {
        &self.client
    }
}

impl Api {
    /// A client of the API at `base` (`http://host:port`; a bare `host:port` means http).
    /// A base that is not an http URL gives a client whose every call is refused (at
    /// `http://127.0.0.1:0`), so the first call names the problem.
    pub fn new(base: &str, token: &str) -> Self {
        let client = appliance_api::Client::new(base, Some(token.to_owned()))
            .unwrap_or_else(|_| appliance_api::Client::placeholder());
        Self { client }
    }

    /// The typed client.
    pub fn client(&self) -> &appliance_api::Client {
        &self.client
    }

    /// Waits for job `id` to end, calling `progress(percent, message)` on every change;
    /// an error if it failed or takes longer than `timeout`.
    pub fn wait_job(
        &self,
        id: u64,
        timeout: Duration,
        progress: &mut dyn FnMut(u64, &str),
    ) -> anyhow::Result<JobView> {
        let mut last = (u64::MAX, String::new());
        let job = self
            .client
            .wait_job(id, POLL_INTERVAL, timeout, &mut |job: &JobView| {
                let percent = u64::from(job.percent);
                if (percent, &job.message) != (last.0, &last.1) {
                    progress(percent, &job.message);
                    last = (percent, job.message.clone());
                }
            })
            .with_context(|| format!("waiting for job {id}"))?;
        if job.state == JobState::Failed {
            bail!(
                "job {id} ({}) failed: {}",
                job.kind,
                job.error.as_deref().unwrap_or("no reason given")
            );
        }
        Ok(job)
    }

    /// Waits until item `id` is in `state`; the item.
    pub fn wait_state(
        &self,
        id: &str,
        state: ItemState,
        timeout: Duration,
    ) -> anyhow::Result<ItemView> {
        Ok(self.client.wait_state(id, state, POLL_INTERVAL, timeout)?)
    }

    /// Waits until point `seq` of item `id` is applied (listed).
    pub fn wait_point(&self, id: &str, seq: u64, timeout: Duration) -> anyhow::Result<()> {
        self.client
            .wait_point(id, seq, Duration::from_millis(20), timeout)?;
        Ok(())
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
            .args(["--api-addr", "127.0.0.1:0", "--nbd-addr", "127.0.0.1:0"])
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
