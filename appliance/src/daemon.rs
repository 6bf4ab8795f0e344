//! `appliance serve`: the running appliance, and `appliance item create`, which registers a
//! protected item and issues its stream token.
//!
//! ```text
//!  serve ─► DataDir (locked) ─► for each item: StagingLog (recovered) + ApplyWorker thread
//!        ─► DataPort (TCP, loopback by default): agents stream frames, get durable acks
//!        ─► control API (HTTP/JSON, crate::api) on its own thread and tokio runtime
//!        ─► SIGTERM / SIGINT: stop the API and the data port (sessions end after their
//!           commit), apply what is staged, flush, exit 0.
//!           SIGKILL: nothing acknowledged is lost (replay on start).
//! ```
//!
//! Signals are blocked in every thread and taken with `sigwait` by the main thread, so no
//! handler ever runs in the middle of I/O.
//!
//! `item create` is the bootstrap until the control API (issue 4) enables protection: it writes
//! the item's header, creates its replica disks and a 32-byte random token stored with mode
//! 0600 in the item's directory, and prints the item id and the token once.

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{Context, bail};
use engine::delta::{DiskGeometry, StreamHeader};
use engine::staging::{StagingConfig, StagingLog};
use nix::sys::signal::{SigSet, Signal};

use crate::api::{ApiConfig, ApiServer, ServedItem};
use crate::dataport::{DataPort, DataPortConfig, MemoryRegistry};
use crate::offline::{BadInput, replicas};
use crate::runtime::{ApplyOptions, ApplyWorker, WorkerSetup};
use crate::store::{DataDir, ItemDirs, item_hex};

/// Name of the token file in an item's directory.
const TOKEN_FILE: &str = "token";

pub(crate) fn random_bytes<const N: usize>() -> anyhow::Result<[u8; N]> {
    let mut out = [0u8; N];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut out))
        .context("reading /dev/urandom")?;
    Ok(out)
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses `SIZE_MIB[:LOGICAL_BLOCK_BYTES]`, e.g. `1024` or `64:512`.
pub fn parse_disk(text: &str) -> Result<DiskGeometry, BadInput> {
    let bad = |why: &str| {
        BadInput(format!(
            "disk {text:?}: {why} (expected SIZE_MIB[:512|4096])"
        ))
    };
    let (size, block) = match text.split_once(':') {
        Some((size, block)) => (size, block),
        None => (text, "4096"),
    };
    let size_mib: u64 = size.parse().map_err(|_| bad("size is not a number"))?;
    let block_size_bytes: u32 = block
        .parse()
        .map_err(|_| bad("block size is not a number"))?;
    if !engine::delta::BLOCK_SIZES.contains(&block_size_bytes) {
        return Err(bad("block size must be 512 or 4096"));
    }
    if size_mib == 0 || size_mib > 64 << 20 {
        return Err(bad("size must be 1 MiB to 64 TiB"));
    }
    Ok(DiskGeometry {
        size_bytes: size_mib << 20,
        block_size_bytes,
    })
}

/// Registers a new item with `disks`; returns its id and stream token (hex).
pub fn create_item(
    data_dir: &Path,
    name: &str,
    disks: &[DiskGeometry],
) -> anyhow::Result<(String, String)> {
    let header = StreamHeader {
        item_id: random_bytes()?,
        item_name: name.to_owned(),
        first_seq: 1,
        disks: disks.to_vec(),
    };
    header
        .validate()
        .map_err(|e| BadInput(format!("item {name:?}: {e}")))?;
    let data = DataDir::open(data_dir)?;
    let item = data.item_for(&header)?;
    let meta = data.meta()?;
    replicas(&item, &meta)?;
    let token = hex(&random_bytes::<32>()?);
    let path = item.root.join(TOKEN_FILE);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(token.as_bytes())?;
    file.sync_all()?;
    Ok((item_hex(&header.item_id), token))
}

fn read_token(item: &ItemDirs) -> anyhow::Result<Option<Vec<u8>>> {
    let path = item.root.join(TOKEN_FILE);
    match std::fs::read(&path) {
        Ok(token) => Ok(Some(token)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Settings of `serve` (command-line flags, or the TOML config file).
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Address of the data port.
    pub data_addr: SocketAddr,
    /// Address of the control API.
    pub api_addr: SocketAddr,
    /// Recovery points kept per item unless its policy says otherwise.
    pub keep_points: usize,
    /// Staging capacity per item.
    pub cache_bytes: u64,
    /// Replica queue depth.
    pub queue_depth: usize,
    /// Data-disk slots (LUNs) of the appliance VM, LUN 0 included (1..=256; default 32).
    pub slot_count: u32,
    /// Directories besides the data directory where the API may attach disks, write
    /// materialized disks and create temporary OS disks.
    pub disk_stores: Vec<std::path::PathBuf>,
    /// Jobs running at once (1..=64; default 8).
    pub max_jobs: usize,
}

struct Running {
    hex: String,
    log: Arc<Mutex<StagingLog>>,
    worker: ApplyWorker,
    worker_failed: bool,
}

/// Runs the appliance until SIGTERM or SIGINT.
pub fn serve(data_dir: &Path, options: ServeOptions) -> anyhow::Result<()> {
    // Before any thread starts: every thread inherits the mask, only sigwait sees the signals.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals
        .thread_block()
        .context("blocking SIGTERM and SIGINT")?;
    let data = DataDir::open(data_dir)?;
    let meta = data.meta()?;
    let (api_token, created) = crate::api::load_or_create_token(data_dir)?;
    if created {
        eprintln!("API token: {api_token}");
    }
    let registry = Arc::new(MemoryRegistry::new());
    let mut running = Vec::new();
    let mut served = Vec::new();
    for item in data.items()? {
        let hex = item_hex(&item.header.item_id);
        let Some(token) = read_token(&item)? else {
            tracing::warn!(item = %hex, "no stream token (made by `ingest`?): not served");
            continue;
        };
        let files = replicas(&item, &meta)?;
        let paths = (0..item.header.disks.len())
            .map(|i| item.replica_path(i))
            .collect();
        let (log, recovery) = StagingLog::open(
            Arc::new(item.staging()?),
            item.header.clone(),
            StagingConfig {
                capacity_bytes: options.cache_bytes,
                ..StagingConfig::default()
            },
        )
        .with_context(|| format!("item {hex}: opening its staging log"))?;
        if let Some(corruption) = &recovery.corruption {
            tracing::error!(item = %hex, %corruption, "staging damaged: item needs a resync");
        }
        let worker = ApplyWorker::start(
            &hex,
            WorkerSetup::for_item(
                &item,
                files,
                log.reader(item.header.first_seq),
                meta.clone(),
            )?,
            ApplyOptions {
                keep_points: options.keep_points,
                queue_depth: options.queue_depth,
            },
        )?;
        worker.notify(log.durable_seq());
        let log = Arc::new(Mutex::new(log));
        registry.insert(item.header.item_id, &token, log.clone(), paths);
        let notifier = worker.notifier();
        registry.set_on_durable(
            &item.header.item_id,
            Arc::new(move |seq| notifier.notify(seq)),
        );
        served.push(ServedItem {
            id: item.header.item_id,
            name: item.header.item_name.clone(),
            disks: item.header.disks.clone(),
            staging: log
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .reader(item.header.first_seq),
            worker: worker.status(),
        });
        tracing::info!(item = %hex, name = %item.header.item_name, "serving");
        running.push(Running {
            hex,
            log,
            worker,
            worker_failed: false,
        });
    }
    let mut port = DataPort::bind(options.data_addr, registry, DataPortConfig::default())
        .with_context(|| format!("binding the data port to {}", options.data_addr))?;
    let api = ApiServer::start(
        options.api_addr,
        ApiConfig {
            data_dir: std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf()),
            data_addr: port.local_addr(),
            token: api_token,
            meta: meta.clone(),
            items: served,
        },
    )?;
    println!("data port listening on {}", port.local_addr());
    // Whoever started us may stop reading after the first line: not an error.
    let _ = writeln!(
        std::io::stdout(),
        "control API listening on {}",
        api.local_addr()
    );
    let _ = std::io::stdout().flush();
    let signal = signals.wait().context("waiting for a signal")?;
    tracing::info!(%signal, "shutting down: no new sessions, applying what is staged");
    if let Err(e) = api.shutdown() {
        tracing::warn!(error = %format!("{e:#}"), "control API did not stop cleanly");
    }
    port.shutdown();
    let mut failures = Vec::new();
    for mut item in running {
        item.worker_failed = item.worker.failed();
        let target = item
            .log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .durable_seq();
        match item.worker.drain_and_stop(target, false) {
            Ok(drained) => {
                tracing::info!(item = %item.hex, applied_seq = drained.applied_seq, "stopped")
            }
            Err(_) if item.worker_failed => failures.push(format!(
                "item {}: apply had stopped on an error (logged above)",
                item.hex
            )),
            Err(e) => failures.push(format!("item {}: {e:#}", item.hex)),
        }
    }
    if !failures.is_empty() {
        bail!("shutdown left items unapplied: {}", failures.join("; "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_disk_accepts_sizes_and_block_sizes_and_names_errors() {
        assert_eq!(
            parse_disk("64:512").unwrap(),
            DiskGeometry {
                size_bytes: 64 << 20,
                block_size_bytes: 512
            }
        );
        assert_eq!(parse_disk("8").unwrap().block_size_bytes, 4096);
        for bad in ["", "x", "0", "8:1024", "8:x"] {
            let err = parse_disk(bad).unwrap_err();
            assert!(err.0.contains("expected SIZE_MIB"), "{bad}: {}", err.0);
        }
    }
}
