//! An item's replication: start (replicas, staging, apply worker), stop, end sessions, catch up.

/// Longest wait for an item's streaming session to end after it was told to.
const SESSION_END_WAIT: Duration = Duration::from_secs(40);
/// Longest wait for apply to catch up with staging (before hashing, before a resync).
const CATCH_UP_WAIT: Duration = Duration::from_secs(60);

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use engine::apply::Pins;
use engine::delta::DiskGeometry;
use engine::io::{DirectIo, ReplicaFile};
use engine::meta::item_key;
use engine::replica::open_replica;
use engine::staging::{StagingConfig, StagingLog};

use crate::runtime::{ApplyOptions, ApplyWorker};

use super::item::{Item, Replication, lock};
use super::manager::Manager;

impl Manager {
    pub(super) fn start_replication(&self, item: &Item) -> anyhow::Result<()> {
        let record = item.record().clone();
        let key = item_key(&item.id);
        let mut files: Vec<ReplicaFile> = Vec::new();
        for disk in &record.disks {
            files.push(open_replica(
                &self.meta,
                key,
                disk.index as u16,
                Path::new(&disk.path),
                DiskGeometry {
                    size_bytes: disk.size_bytes,
                    block_size_bytes: disk.block_size_bytes,
                },
                DirectIo::Prefer,
            )?);
        }
        let (log, recovery) = StagingLog::open(
            Arc::new(item.dirs.staging()?),
            item.dirs.header.clone(),
            StagingConfig {
                capacity_bytes: self.options.cache_bytes,
                ..StagingConfig::default()
            },
        )
        .with_context(|| format!("item {}: opening its staging log", item.hex))?;
        if let Some(corruption) = &recovery.corruption {
            tracing::error!(item = %item.hex, %corruption, "staging damaged: item needs a resync");
        }
        let first_seq = item.dirs.header.first_seq;
        let mut setup = crate::runtime::worker_setup(
            &item.dirs,
            files,
            log.reader(first_seq),
            self.meta.clone(),
            item.pins.clone(),
        )?;
        // A frame that never applies: the item takes no more frames (`session_item` refuses
        // new sessions); the running one is ended here.
        let (port, id) = (self.port.get().cloned(), item.id);
        setup.on_unappliable = Some(Box::new(move |_| {
            if let Some(port) = &port {
                port.end_item(&id);
            }
        }));
        let worker = ApplyWorker::start(
            &item.hex,
            setup,
            ApplyOptions {
                keep_points: record.policy.keep_points as usize,
                max_age_ns: match record.policy.keep_minutes {
                    0 => u64::MAX,
                    minutes => minutes.saturating_mul(60_000_000_000),
                },
                queue_depth: self.options.queue_depth,
            },
        )?;
        *lock(&item.status) = Some(worker.status());
        let reader = log.reader(first_seq);
        *item.repl() = Some(Replication {
            log: Arc::new(Mutex::new(log)),
            reader,
            worker,
        });
        Ok(())
    }

    /// Ends the item's sessions and waits until none holds the item.
    pub(super) fn end_sessions(&self, item: &Item) -> anyhow::Result<()> {
        if let Some(port) = self.port.get() {
            port.end_item(&item.id);
        }
        let deadline = Instant::now() + SESSION_END_WAIT;
        while item.busy.load(Ordering::Acquire) {
            if Instant::now() > deadline {
                anyhow::bail!(
                    "the item's streaming session did not end within {SESSION_END_WAIT:?}"
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Stops the item's replication: ends sessions (the caller already moved the state out
    /// of the replicating ones), applies what is staged, flushes, and (if `latest`) makes a
    /// point of it. Returns the final watermark, or `None` if it was not running.
    pub(super) fn stop_replication(
        &self,
        item: &Item,
        latest: bool,
    ) -> anyhow::Result<Option<u64>> {
        self.end_sessions(item)?;
        let Some(repl) = item.repl().take() else {
            return Ok(None);
        };
        let target = repl.reader.durable_seq();
        let drained = repl
            .worker
            .drain_and_stop(target, latest)
            .with_context(|| format!("item {}: applying what was staged", item.hex))?;
        Ok(Some(drained.applied_seq))
    }

    pub(super) fn pins(&self, item: &Item) -> Pins {
        item.pins.clone()
    }

    /// Waits until apply has applied every durable frame.
    pub(super) fn wait_caught_up(&self, item: &Item) -> anyhow::Result<()> {
        let deadline = Instant::now() + CATCH_UP_WAIT;
        loop {
            let (durable, applied, failed) = match item.repl().as_ref() {
                Some(repl) => (
                    repl.reader.durable_seq(),
                    repl.worker.applied_seq(),
                    repl.worker.failed(),
                ),
                None => anyhow::bail!("the item is not replicating"),
            };
            if failed {
                let error = item.status().and_then(|s| s.error());
                anyhow::bail!(
                    "apply stopped on an error: {}",
                    error.as_deref().unwrap_or("see the appliance log")
                );
            }
            if applied >= durable {
                return Ok(());
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "apply did not catch up with staging within {CATCH_UP_WAIT:?} (applied \
                     {applied}, staged {durable})"
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
