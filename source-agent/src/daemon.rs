//! `source-agent run`: the daemon. Loads the config, takes the state directory's lock, starts
//! capture (or write-through only with `capture = false`), the NBD server and the control
//! socket, prints the stdout lines scripts wait for, and serves until SIGTERM or SIGINT; then
//! stops the NBD server and the control socket and shuts capture down (flush the disks, let
//! the sender deliver for up to [`SHUTDOWN_TIMEOUT`], checkpoint the change maps).

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use engine::delta::Consistency;
use nbd_server::{Catalog, Export, Server, ServerConfig};
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{SigSet, Signal};

use crate::capture::{Capture, CaptureConfig, CaptureStatus, DiskConfig, DiskFile, DiskStatus};
use crate::changemap;
use crate::config::Config;
use crate::control::protocol::BookmarkReply;
use crate::control::{ControlServer, ControlTarget};

/// How long shutdown lets the sender deliver what it holds.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// The lock file in the state directory: two agents never share one.
pub const LOCK_FILE: &str = "agent.lock";

/// The disks served by name (the catalog of the NBD server). Names are not secrets here:
/// `NBD_OPT_LIST` lists them.
struct Exports(HashMap<String, Arc<dyn Export>>);

impl Catalog for Exports {
    fn lookup(&self, name: &str) -> Option<Arc<dyn Export>> {
        self.0.get(name).cloned()
    }
    fn list(&self) -> Option<Vec<String>> {
        let mut names: Vec<String> = self.0.keys().cloned().collect();
        names.sort();
        Some(names)
    }
}

/// Runs the agent with the config at `config_path` until SIGTERM or SIGINT.
pub fn run(config_path: &Path) -> anyhow::Result<()> {
    // Blocked before any thread starts, so every thread inherits the mask and the signals
    // wait for `sigwait` below.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals
        .thread_block()
        .context("blocking SIGTERM and SIGINT")?;

    let config = Config::load(config_path)?;
    config.check_files()?;
    let _lock = lock_state_dir(&config.state_dir)?;
    let (target, exports, stop): (Arc<dyn ControlTarget>, _, Box<dyn FnOnce()>) =
        match &config.capture {
            Some(_) => {
                let capture = Capture::start(capture_config(&config)?)
                    .with_context(|| format!("starting capture of item {}", config.item_name))?;
                let exports = capture.exports();
                let stopping = Arc::clone(&capture);
                let stop = Box::new(move || {
                    if let Err(e) = stopping.shutdown(SHUTDOWN_TIMEOUT) {
                        tracing::error!(error = %e, "capture shutdown incomplete");
                    }
                });
                (Arc::new(CaptureTarget(capture)), exports, stop)
            }
            None => {
                let plain = Plain::open(&config)?;
                let exports = plain.exports();
                let stopping = Arc::clone(&plain);
                let stop = Box::new(move || stopping.sync_all());
                (plain as Arc<dyn ControlTarget>, exports, stop)
            }
        };
    let mut sizes = Vec::with_capacity(exports.len());
    for (name, export) in &exports {
        sizes.push((name.clone(), export.size_bytes()));
    }
    let server = Server::start(
        ServerConfig {
            listen: config.nbd_addr,
            ..ServerConfig::default()
        },
        Arc::new(Exports(exports.into_iter().collect())),
    )
    .with_context(|| format!("config {}: key `nbd_addr`", config.path.display()))?;
    let control = ControlServer::start(&config.control_socket, Arc::clone(&target))?;

    let addr = server.local_addr();
    let mut out = std::io::stdout().lock();
    match &config.capture {
        Some(c) => writeln!(
            out,
            "source-agent {}: item {} ({}), appliance {}",
            env!("CARGO_PKG_VERSION"),
            config.item_name,
            hex::encode(c.item_id),
            c.appliance
        )?,
        None => writeln!(
            out,
            "source-agent {}: item {} (capture off: write-through only)",
            env!("CARGO_PKG_VERSION"),
            config.item_name
        )?,
    }
    writeln!(out, "NBD server listening on {addr}")?;
    for (disk, (name, size_bytes)) in config.disks.iter().zip(&sizes) {
        writeln!(
            out,
            "disk {name}: nbd://{addr}/{name} ({size_bytes} bytes, {})",
            disk.path.display()
        )?;
    }
    writeln!(out, "control socket: {}", control.path().display())?;
    writeln!(out, "ready")?;
    out.flush()?;
    drop(out);

    let signal = signals.wait().context("waiting for SIGTERM or SIGINT")?;
    tracing::info!(%signal, "shutting down");
    server.stop();
    control.stop();
    stop();
    tracing::info!("stopped");
    Ok(())
}

/// Creates the state directory (mode 0700) if needed and takes `agent.lock` in it.
fn lock_state_dir(state_dir: &Path) -> anyhow::Result<Flock<File>> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .with_context(|| format!("creating state_dir {}", state_dir.display()))?;
    let path = state_dir.join(LOCK_FILE);
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("opening lock file {}", path.display()))?;
    let mut lock = Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        anyhow::anyhow!(
            "lock file {}: {errno}: another source-agent uses this state_dir",
            path.display()
        )
    })?;
    lock.set_len(0)?;
    writeln!(lock, "{}", std::process::id())?;
    Ok(lock)
}

/// The capture's settings from the config (reads the token file).
fn capture_config(config: &Config) -> anyhow::Result<CaptureConfig> {
    let settings = config
        .capture
        .as_ref()
        .context("capture settings missing")?;
    let token = config.read_token()?;
    let mut c = CaptureConfig::new(
        settings.appliance,
        settings.item_id,
        token,
        config.item_name.clone(),
        disk_configs(config),
        config.state_dir.clone(),
    );
    c.bookmark_interval = settings.bookmark_interval;
    c.backlog_limit_bytes = settings.backlog_limit_bytes;
    c.encoder.zstd_level = settings.zstd_level;
    c.change_map = changemap::Limits {
        max_map_bytes: settings.change_map_limit_bytes,
        al_extent_bytes: settings.activity_log_extent_bytes,
        al_extents: settings.activity_log_extents,
        ..changemap::Limits::default()
    };
    c.change_map
        .validate()
        .with_context(|| format!("config {}", config.path.display()))?;
    Ok(c)
}

fn disk_configs(config: &Config) -> Vec<DiskConfig> {
    config
        .disks
        .iter()
        .map(|d| DiskConfig {
            name: d.name.clone(),
            path: d.path.clone(),
            block_size_bytes: d.block_size_bytes,
        })
        .collect()
}

/// The control socket's view of a running capture.
struct CaptureTarget(Arc<Capture>);

fn reply(b: crate::capture::Bookmarked) -> BookmarkReply {
    BookmarkReply {
        bookmark_id: b.bookmark_id,
        seq: b.seq,
        consistency: b.consistency,
    }
}

impl ControlTarget for CaptureTarget {
    fn status(&self) -> Result<serde_json::Value, String> {
        serde_json::to_value(self.0.status()).map_err(|e| e.to_string())
    }
    fn bookmark(&self, consistency: Consistency, label: &str) -> Result<BookmarkReply, String> {
        self.0
            .bookmark(consistency, label)
            .map(reply)
            .map_err(|e| e.to_string())
    }
    fn wait_acked(&self, seq: u64, timeout: Duration) -> Result<(), String> {
        self.0.wait_acked(seq, timeout).map_err(|e| e.to_string())
    }
    fn quiesce(
        &self,
        consistency: Consistency,
        label: &str,
        timeout: Duration,
    ) -> Result<BookmarkReply, String> {
        self.0
            .quiesce(consistency, label, timeout)
            .map(reply)
            .map_err(|e| e.to_string())
    }
    fn resume(&self) -> Result<(), String> {
        self.0.resume();
        Ok(())
    }
}

/// `capture = false`: the disks with write-through only.
struct Plain {
    item_name: String,
    disks: Vec<(String, PathBuf, Arc<DiskFile>)>,
}

const CAPTURE_OFF: &str = "capture is off (`capture = false` in the config): no bookmarks";

impl Plain {
    fn open(config: &Config) -> anyhow::Result<Arc<Plain>> {
        let mut disks = Vec::with_capacity(config.disks.len());
        for d in disk_configs(config) {
            let file = DiskFile::open(&d)?;
            disks.push((d.name, d.path, file));
        }
        Ok(Arc::new(Plain {
            item_name: config.item_name.clone(),
            disks,
        }))
    }

    fn exports(&self) -> Vec<(String, Arc<dyn Export>)> {
        self.disks
            .iter()
            .map(|(name, _, file)| (name.clone(), Arc::clone(file) as Arc<dyn Export>))
            .collect()
    }

    fn sync_all(&self) {
        for (_, path, file) in &self.disks {
            if let Err(e) = file.sync() {
                tracing::error!(path = %path.display(), error = %e, "flushing the disk at shutdown");
            }
        }
    }
}

impl ControlTarget for Plain {
    fn status(&self) -> Result<serde_json::Value, String> {
        let status = CaptureStatus {
            item_name: self.item_name.clone(),
            link: "capture off".into(),
            acked_seq: 0,
            next_seq: 0,
            backlog_bytes: 0,
            quiesced: false,
            last_bookmark: None,
            bookmarks: 0,
            flushes_coalesced: 0,
            bookmarks_deferred_catching_up: 0,
            disks: self
                .disks
                .iter()
                .map(|(name, path, file)| DiskStatus {
                    name: name.clone(),
                    path: path.display().to_string(),
                    size_bytes: file.size_bytes(),
                    written_bytes: 0,
                    sent_bytes: 0,
                    resent_bytes: 0,
                    recovered_bytes: 0,
                    unsent_bytes: 0,
                    grain_bytes: 0,
                    active_extents: 0,
                    map_saves: 0,
                })
                .collect(),
        };
        serde_json::to_value(status).map_err(|e| e.to_string())
    }
    fn bookmark(&self, _: Consistency, _: &str) -> Result<BookmarkReply, String> {
        Err(CAPTURE_OFF.into())
    }
    fn wait_acked(&self, _: u64, _: Duration) -> Result<(), String> {
        Err(CAPTURE_OFF.into())
    }
    fn quiesce(&self, _: Consistency, _: &str, _: Duration) -> Result<BookmarkReply, String> {
        Err(CAPTURE_OFF.into())
    }
    fn resume(&self) -> Result<(), String> {
        Err(CAPTURE_OFF.into())
    }
}
