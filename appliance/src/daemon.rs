//! `appliance serve`: the running appliance, and `appliance item create`, which registers a
//! protected item and issues its stream token.
//!
//! ```text
//!  serve ─► DataDir (locked) ─► for each item: StagingLog (recovered) + ApplyWorker thread
//!        ─► DataPort (TCP, loopback by default): agents stream frames, get durable acks
//!        ─► NBD server (loopback by default): exports of recovery points (crate::exports)
//!        ─► control API (HTTP/JSON, crate::http) on its own thread and tokio runtime
//!        ─► SIGTERM / SIGINT: stop the API and the data port (sessions end after their
//!           commit), wait up to 120 s for jobs that write disks, apply what is staged,
//!           flush, exit 0 (a job still running then is undone at the next start).
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
use std::path::Path;

use anyhow::{Context, bail};
use engine::delta::DiskGeometry;
use nix::sys::signal::{SigSet, Signal};

use crate::dataport::{DataPort, DataPortConfig};
use crate::http::{ApiConfig, ApiLimits, ApiServer};
use crate::items::{DiskSpec, EnableRequest, Manager, OpError};
use crate::offline::BadInput;

/// Where the settings live (a library module of their own, so the item manager and the
/// control API do not import the process entry file); re-exported for the command line.
pub use crate::options::ServeOptions;

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

/// Registers a new item with `disks` (offline: the same path as the control API's enable);
/// returns its id and stream token (hex).
pub fn create_item(
    data_dir: &Path,
    name: &str,
    disks: &[DiskGeometry],
    options: ServeOptions,
) -> anyhow::Result<(String, String)> {
    let manager = Manager::open(data_dir, options)?;
    let enabled = manager
        .enable(EnableRequest {
            name: name.to_owned(),
            disks: disks
                .iter()
                .map(|d| DiskSpec {
                    size_mib: Some(d.size_bytes >> 20),
                    path: None,
                    block_size_bytes: Some(d.block_size_bytes),
                })
                .collect(),
            policy: None,
            temporary_os_disk: None,
        })
        .map_err(|e| match e {
            OpError::Io(message) => anyhow::anyhow!(message),
            refused => BadInput(refused.to_string()).into(),
        })?;
    let failures = manager.shutdown();
    if !failures.is_empty() {
        bail!("{}", failures.join("; "));
    }
    Ok((enabled.item.id, enabled.stream_token))
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
    let (data_addr, api_addr, nbd_addr) = (options.data_addr, options.api_addr, options.nbd_addr);
    let port_config = DataPortConfig::default();
    let api_limits = ApiLimits {
        max_connections: options.api_max_connections,
        ..ApiLimits::default()
    };
    // Before anything is opened: enough file descriptors for every configured limit.
    let needs = crate::fdbudget::FdNeeds {
        api_connections: api_limits.max_connections,
        data_connections: port_config.max_sessions + port_config.max_handshakes,
        disk_slots: options.slot_count as usize,
        jobs: options.max_jobs,
    };
    let fds = crate::fdbudget::ensure(&needs).map_err(|e| anyhow::anyhow!(e))?;
    tracing::debug!(
        needed = fds.needed,
        soft = fds.soft,
        hard = fds.hard,
        "file descriptors"
    );
    let manager = Manager::open(data_dir, options)?;
    let (api_token, created) = crate::secrets::load_or_create_api_token(manager.root())?;
    if created {
        // The token itself never goes to a log: only where it is.
        tracing::info!(
            path = %manager.root().join(crate::secrets::API_TOKEN_FILE).display(),
            "created the control API's bearer token (mode 0600); clients read it from this file"
        );
    }
    // The port's error names the address.
    let mut port = DataPort::bind(data_addr, manager.clone(), port_config)?;
    manager.start(port.handle())?;
    let nbd = nbd_server::Server::start(
        nbd_server::ServerConfig {
            listen: nbd_addr,
            max_request_bytes: crate::exports::MAX_REQUEST_BYTES,
            ..nbd_server::ServerConfig::default()
        },
        manager.nbd_catalog(),
    )
    .with_context(|| format!("starting the NBD server on {nbd_addr}"))?;
    manager.set_nbd_server(&nbd);
    let api = ApiServer::start(
        api_addr,
        ApiConfig {
            data_addr: port.local_addr(),
            token: api_token,
            manager: manager.clone(),
            limits: api_limits,
        },
    )?;
    println!("data port listening on {}", port.local_addr());
    // Whoever started us may stop reading after the first line: not an error.
    let _ = writeln!(
        std::io::stdout(),
        "control API listening on {}",
        api.local_addr()
    );
    let _ = writeln!(
        std::io::stdout(),
        "NBD server listening on {}",
        nbd.local_addr()
    );
    let _ = std::io::stdout().flush();
    let signal = signals.wait().context("waiting for a signal")?;
    tracing::info!(%signal, "shutting down: no new sessions, applying what is staged");
    if let Err(e) = api.shutdown() {
        tracing::warn!(error = %crate::store::describe(&e), "control API did not stop cleanly");
    }
    port.shutdown();
    nbd.stop();
    let failures = manager.shutdown();
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
