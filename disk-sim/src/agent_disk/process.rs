//! One `source-agent run` process: its config file, its start-up lines, its subcommands.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write as _};
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use serde::Deserialize;

use super::{command_line, run_checked};

/// How long `run` may take to print `ready`.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Lines of the agent's stderr kept for error messages.
const STDERR_LINES: usize = 40;

/// What goes into an agent's config file (the keys of `docs/design/source-agent.md`).
#[derive(Debug, Clone)]
pub struct AgentSetup {
    /// `item_name`.
    pub item_name: String,
    /// `item_id` (32 hex digits); `None` with capture off.
    pub item_id: Option<String>,
    /// `appliance`: the appliance's data port; `None` with capture off.
    pub appliance: Option<SocketAddr>,
    /// The stream token (64 hex), written to `<dir>/<item_name>.token` with mode 0600;
    /// `None` with capture off.
    pub token: Option<String>,
    /// `state_dir`.
    pub state_dir: PathBuf,
    /// `capture` (false: NBD with write-through only, nothing streamed).
    pub capture: bool,
    /// `backlog_limit_mib`, when not the default.
    pub backlog_limit_mib: Option<u64>,
    /// `change_map_limit_kib`, when not the default.
    pub change_map_limit_kib: Option<u64>,
    /// `bookmark_interval_ms`, when not the default.
    pub bookmark_interval_ms: Option<u64>,
    /// `compression` (`"zstd"` or `"none"`), when not the default.
    pub compression: Option<String>,
    /// `[[disk]]` entries: (name, path).
    pub disks: Vec<(String, PathBuf)>,
}

/// A TOML basic string.
fn quoted(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

impl AgentSetup {
    /// The config file's text; `token_file` is where the token is (when capture is on).
    pub fn config_text(&self, token_file: Option<&Path>) -> String {
        let mut t = String::new();
        let _ = writeln!(t, "item_name = {}", quoted(&self.item_name));
        if let Some(id) = &self.item_id {
            let _ = writeln!(t, "item_id = {}", quoted(id));
        }
        if let Some(addr) = self.appliance {
            let _ = writeln!(t, "appliance = {}", quoted(&addr.to_string()));
        }
        if let Some(path) = token_file {
            let _ = writeln!(t, "token_file = {}", quoted(&path.display().to_string()));
        }
        let _ = writeln!(
            t,
            "state_dir = {}",
            quoted(&self.state_dir.display().to_string())
        );
        let _ = writeln!(t, "nbd_addr = \"127.0.0.1:0\"");
        if !self.capture {
            let _ = writeln!(t, "capture = false");
        }
        for (key, value) in [
            ("backlog_limit_mib", self.backlog_limit_mib),
            ("change_map_limit_kib", self.change_map_limit_kib),
            ("bookmark_interval_ms", self.bookmark_interval_ms),
        ] {
            if let Some(v) = value {
                let _ = writeln!(t, "{key} = {v}");
            }
        }
        if let Some(compression) = &self.compression {
            let _ = writeln!(t, "compression = {}", quoted(compression));
        }
        for (name, path) in &self.disks {
            let _ = writeln!(t, "\n[[disk]]\nname = {}", quoted(name));
            let _ = writeln!(t, "path = {}", quoted(&path.display().to_string()));
        }
        t
    }

    /// Writes `<dir>/<item_name>.toml` (and the token file); the config's path.
    pub fn write(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let token_file = match &self.token {
            Some(token) if self.capture => {
                let path = dir.join(format!("{}.token", self.item_name));
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&path)
                    .with_context(|| format!("creating {}", path.display()))?;
                file.write_all(token.as_bytes())
                    .with_context(|| format!("writing {}", path.display()))?;
                Some(path)
            }
            _ => None,
        };
        let path = dir.join(format!("{}.toml", self.item_name));
        std::fs::write(&path, self.config_text(token_file.as_deref()))
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}

/// One disk as `run` announced it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedDisk {
    /// Its name (the NBD export name).
    pub name: String,
    /// `nbd://ip:port/name`.
    pub uri: String,
    /// Its size.
    pub size_bytes: u64,
}

/// A bookmark the agent put into the stream (`bookmark --json`, `quiesce --json`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Bookmarked {
    /// The source timestamp (ns since the Unix epoch).
    pub bookmark_id: u64,
    /// Its frame's sequence number: the appliance's point id.
    pub seq: u64,
    /// "crash" or "app".
    pub consistency: String,
}

/// A running `source-agent run`; killed when dropped (use [`AgentProcess::stop`] for the
/// graceful SIGTERM).
#[derive(Debug)]
pub struct AgentProcess {
    bin: PathBuf,
    config: PathBuf,
    child: Option<Child>,
    /// Where its NBD server listens.
    pub nbd_addr: SocketAddr,
    /// Its disks, in config order.
    pub disks: Vec<ServedDisk>,
    /// Its control socket.
    pub control_socket: PathBuf,
    stderr: Arc<Mutex<VecDeque<String>>>,
}

/// Parses `disk <name>: nbd://<ip:port>/<name> (<size_bytes> bytes, <path>)`.
pub(super) fn parse_disk_line(line: &str) -> Option<ServedDisk> {
    let rest = line.strip_prefix("disk ")?;
    let (name, rest) = rest.split_once(": ")?;
    let (uri, rest) = rest.split_once(" (")?;
    let size = rest.split_whitespace().next()?.parse().ok()?;
    Some(ServedDisk {
        name: name.to_owned(),
        uri: uri.to_owned(),
        size_bytes: size,
    })
}

impl AgentProcess {
    /// Starts `bin run --config config` and waits (at most a minute) for its `ready` line.
    pub fn start(bin: &Path, config: &Path) -> anyhow::Result<Self> {
        let mut cmd = Command::new(bin);
        cmd.arg("run")
            .arg("--config")
            .arg(config)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let line = command_line(&cmd);
        let mut child = cmd.spawn().with_context(|| format!("starting {line}"))?;
        let stderr = Arc::new(Mutex::new(VecDeque::new()));
        if let Some(pipe) = child.stderr.take() {
            let keep = Arc::clone(&stderr);
            std::thread::spawn(move || {
                for text in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if let Ok(mut lines) = keep.lock() {
                        if lines.len() == STDERR_LINES {
                            lines.pop_front();
                        }
                        lines.push_back(text);
                    }
                }
            });
        }
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().context("the agent's stdout")?;
        std::thread::spawn(move || {
            // Keeps reading after `ready` so the agent never blocks on a full pipe.
            for text in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(text);
            }
        });
        let mut agent = Self {
            bin: bin.to_path_buf(),
            config: config.to_path_buf(),
            child: Some(child),
            nbd_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            disks: Vec::new(),
            control_socket: PathBuf::new(),
            stderr,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let text = match rx.recv_timeout(left) {
                Ok(text) => text,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    bail!(
                        "{line}: no `ready` line within {START_TIMEOUT:?}; its stderr:\n{}",
                        agent.stderr_tail()
                    )
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = agent.child.as_mut().and_then(|c| c.wait().ok());
                    // Give the stderr reader a moment to collect the last lines.
                    std::thread::sleep(Duration::from_millis(50));
                    bail!(
                        "{line} exited ({}) before `ready`; its stderr:\n{}",
                        status.map_or_else(|| "unknown status".into(), |s| s.to_string()),
                        agent.stderr_tail()
                    )
                }
            };
            if text == "ready" {
                break;
            } else if let Some(addr) = text.strip_prefix("NBD server listening on ") {
                agent.nbd_addr = addr
                    .trim()
                    .parse()
                    .with_context(|| format!("{line}: NBD address in {text:?}"))?;
            } else if let Some(path) = text.strip_prefix("control socket: ") {
                agent.control_socket = PathBuf::from(path.trim());
            } else if text.starts_with("disk ") {
                agent.disks.push(
                    parse_disk_line(&text)
                        .ok_or_else(|| anyhow!("{line}: cannot read disk line {text:?}"))?,
                );
            }
        }
        if agent.disks.is_empty() {
            bail!("{line} printed `ready` without any `disk …` line");
        }
        Ok(agent)
    }

    /// The last lines the agent wrote to stderr.
    pub fn stderr_tail(&self) -> String {
        self.stderr
            .lock()
            .map(|lines| lines.iter().cloned().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    }

    /// Its process id (0 once stopped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The URI of disk `name`.
    pub fn uri(&self, name: &str) -> anyhow::Result<&str> {
        self.disks
            .iter()
            .find(|d| d.name == name)
            .map(|d| d.uri.as_str())
            .ok_or_else(|| anyhow!("the agent serves no disk named {name:?}"))
    }

    fn subcommand(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = Command::new(&self.bin);
        cmd.arg(args[0]).arg("--config").arg(&self.config);
        cmd.args(&args[1..]);
        let out = run_checked(&mut cmd)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `source-agent status --json`, parsed.
    pub fn status(&self) -> anyhow::Result<serde_json::Value> {
        let text = self.subcommand(&["status", "--json"])?;
        serde_json::from_str(&text).with_context(|| format!("status --json printed {text:?}"))
    }

    fn bookmarked(text: &str, what: &str) -> anyhow::Result<Bookmarked> {
        serde_json::from_str(text.trim()).with_context(|| format!("{what} --json printed {text:?}"))
    }

    /// `source-agent bookmark [--app] --label L [--freeze M]… --wait-secs N --json`.
    pub fn bookmark(
        &self,
        app: bool,
        label: &str,
        freeze: &[&Path],
        wait_secs: u64,
    ) -> anyhow::Result<Bookmarked> {
        let wait = wait_secs.to_string();
        let mut args = vec!["bookmark", "--json", "--label", label, "--wait-secs", &wait];
        if app {
            args.push("--app");
        }
        let mounts: Vec<String> = freeze.iter().map(|m| m.display().to_string()).collect();
        for mount in &mounts {
            args.extend(["--freeze", mount.as_str()]);
        }
        Self::bookmarked(&self.subcommand(&args)?, "bookmark")
    }

    /// `source-agent quiesce [--app] --label L --timeout-secs N --json`.
    pub fn quiesce(&self, app: bool, label: &str, timeout_secs: u64) -> anyhow::Result<Bookmarked> {
        let timeout = timeout_secs.to_string();
        let mut args = vec![
            "quiesce",
            "--json",
            "--label",
            label,
            "--timeout-secs",
            &timeout,
        ];
        if app {
            args.push("--app");
        }
        Self::bookmarked(&self.subcommand(&args)?, "quiesce")
    }

    /// `source-agent resume`.
    pub fn resume(&self) -> anyhow::Result<()> {
        self.subcommand(&["resume"]).map(drop)
    }

    /// Polls `status --json` until `done(status)` holds (at most `timeout`); the last status.
    pub fn wait_status(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> anyhow::Result<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status()?;
            if done(&status) {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!("waited {timeout:?} for the agent: {what}; its last status: {status}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, and wait (at most `timeout`) for a clean exit; an error otherwise.
    pub fn stop(mut self, timeout: Duration) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id())?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)
            .context("sending SIGTERM to the agent")?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                if !status.success() {
                    bail!(
                        "the agent exited with {status} after SIGTERM; its stderr:\n{}",
                        self.stderr_tail()
                    );
                }
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "the agent did not exit within {timeout:?} of SIGTERM (killed); its stderr:\n{}",
                    self.stderr_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL and reap.
    pub fn kill(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
