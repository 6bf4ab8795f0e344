//! Capture: a VM's disks served over NBD with write-through, every change streamed to the
//! appliance, and what the link cannot take kept in each disk's change map and resent from
//! the disk later. The VM never waits on the appliance.
//!
//! ```text
//!  NBD WRITE/TRIM/WRITE_ZEROES ─► [order lock] change map: activity log covers the range
//!                                 ─► write to the disk ─► sender backlog (never waits)
//!                                      └─ backlog full / link down ─► change map: unsent
//!  NBD FLUSH ─► fdatasync ─► crash bookmark (at most one per `bookmark_interval`, and only
//!               when nothing is unsent; otherwise deferred to the catch-up thread)
//!  catch-up thread: unsent range ─► read from the disk ─► sender (1 MiB pieces)
//!  link thread: connect ─► install sender ─► on a fatal error: unacked ranges → unsent,
//!               reconnect (the appliance's next_seq starts the new sender)
//!  acks: the change maps learn the acknowledged seq under the order lock; extents whose
//!        writes are all acknowledged may leave the activity log
//! ```
//!
//! Bookmarks are only put into the stream when the change maps hold nothing unsent: only
//! then does every completed write precede the bookmark in the stream, so that the replica
//! at the bookmark equals the disks at one instant.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use engine::delta::{Consistency, DiskGeometry, EncoderOptions};
use serde::{Deserialize, Serialize};

mod core;
mod disk;
mod error;
mod export;
#[cfg(test)]
mod tests;
mod threads;

pub use disk::{DiskFile, MAX_REQUEST_BYTES};
pub use error::CaptureError;

use self::core::{Core, DiskCounters, Ordered};
use crate::changemap::{self, ChangeMap};
use crate::sender::AgentConfig;

/// Most disks of one item (the data port's limit).
pub const MAX_DISKS: usize = 64;

/// One disk to protect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// Its name: the NBD export name and the change map's file name.
    pub name: String,
    /// The image file or block device.
    pub path: PathBuf,
    /// 512 or 4096.
    pub block_size_bytes: u32,
}

/// Settings of a [`Capture`].
#[derive(Debug, Clone)]
pub struct CaptureConfig {
    /// The appliance's data port.
    pub appliance: SocketAddr,
    /// The protected item.
    pub item_id: [u8; 16],
    /// The item's stream token (its 64 ASCII hex characters).
    pub token: Vec<u8>,
    /// The item's name.
    pub item_name: String,
    /// The disks, OS disk first (a disk's index is its position).
    pub disks: Vec<DiskConfig>,
    /// Where the change maps and activity logs live.
    pub state_dir: PathBuf,
    /// Least time between two flush bookmarks.
    pub bookmark_interval: Duration,
    /// Most bytes of frames waiting for the appliance's acknowledgement.
    pub backlog_limit_bytes: u64,
    /// Bounds of each disk's change map.
    pub change_map: changemap::Limits,
    /// Compression of data payloads (default zstd level 1).
    pub encoder: EncoderOptions,
}

impl CaptureConfig {
    /// Settings with defaults: 1 s bookmark interval, 64 MiB backlog, default change map
    /// limits.
    pub fn new(
        appliance: SocketAddr,
        item_id: [u8; 16],
        token: Vec<u8>,
        item_name: String,
        disks: Vec<DiskConfig>,
        state_dir: PathBuf,
    ) -> Self {
        Self {
            appliance,
            item_id,
            token,
            item_name,
            disks,
            state_dir,
            bookmark_interval: Duration::from_secs(1),
            backlog_limit_bytes: 64 << 20,
            change_map: changemap::Limits::default(),
            encoder: EncoderOptions::default(),
        }
    }
}

/// A bookmark put into the stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bookmarked {
    /// Its id: the source timestamp in ns since the Unix epoch (the appliance's point for it
    /// has this `bookmark_id`).
    pub bookmark_id: u64,
    /// Its frame's sequence number.
    pub seq: u64,
    /// `crash` or `app`.
    pub consistency: String,
}

/// The state of a capture, for people and scripts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptureStatus {
    /// The item's name.
    pub item_name: String,
    /// `connecting`, `connected`, `disconnected (…)`, `resyncing: …` or `down: <error>`.
    pub link: String,
    /// The highest seq the appliance acknowledged as durable.
    pub acked_seq: u64,
    /// The seq the next frame gets.
    pub next_seq: u64,
    /// Bytes of frames waiting for acknowledgement.
    pub backlog_bytes: u64,
    /// Writes are refused until `resume`.
    pub quiesced: bool,
    /// The last bookmark put into the stream.
    pub last_bookmark: Option<Bookmarked>,
    /// Bookmarks taken (flush and requested).
    pub bookmarks: u64,
    /// Flushes that made no bookmark of their own (within the interval of the last one).
    pub flushes_coalesced: u64,
    /// Flushes whose bookmark waited for the catch-up (or for room in the backlog).
    pub bookmarks_deferred_catching_up: u64,
    /// Per disk.
    pub disks: Vec<DiskStatus>,
}

/// The state of one disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskStatus {
    /// Its name.
    pub name: String,
    /// Its path.
    pub path: String,
    /// Its size.
    pub size_bytes: u64,
    /// Bytes the VM changed since the start (writes, trims, zeroes).
    pub written_bytes: u64,
    /// Bytes of writes streamed directly.
    pub sent_bytes: u64,
    /// Bytes read back from the disk and sent by the catch-up.
    pub resent_bytes: u64,
    /// Bytes marked unsent when the change map was opened (a fresh state: the whole disk,
    /// before the initial sync narrows it to what differs; after a crash: what may differ).
    pub recovered_bytes: u64,
    /// Bytes the change map holds now.
    pub unsent_bytes: u64,
    /// The change map's current resolution.
    pub grain_bytes: u64,
    /// Activity-log extents active now.
    pub active_extents: u32,
    /// Times the change map was saved (a crash resends at most what it held then, plus the
    /// activity log's extents).
    pub map_saves: u64,
}

pub(crate) fn consistency_name(consistency: Consistency) -> &'static str {
    match consistency {
        Consistency::Crash => "crash",
        Consistency::App => "app",
    }
}

/// A VM's disks under capture. Dropping it stops its threads without the graceful
/// delivery of [`Capture::shutdown`].
pub struct Capture {
    core: Arc<Core>,
    item_name: String,
    names: Vec<String>,
    recovered: Vec<u64>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capture")
            .field("item_name", &self.item_name)
            .field("disks", &self.names)
            .finish_non_exhaustive()
    }
}

impl Capture {
    /// Opens the disks and their change maps, starts the link (connecting in the background:
    /// the disks are served even while the appliance is unreachable) and the catch-up.
    pub fn start(config: CaptureConfig) -> Result<Arc<Self>, CaptureError> {
        if config.disks.is_empty() || config.disks.len() > MAX_DISKS {
            return Err(CaptureError::Config(format!(
                "{} disks (1..={MAX_DISKS})",
                config.disks.len()
            )));
        }
        for (k, disk) in config.disks.iter().enumerate() {
            if config.disks[..k].iter().any(|d| d.name == disk.name) {
                return Err(CaptureError::Config(format!(
                    "disk name {:?} appears twice",
                    disk.name
                )));
            }
        }
        std::fs::create_dir_all(&config.state_dir).map_err(|source| CaptureError::Disk {
            path: config.state_dir.clone(),
            what: "creating the state directory",
            source,
        })?;
        let mut disks = Vec::new();
        let mut maps = Vec::new();
        let mut recovered = Vec::new();
        let mut fresh = Vec::new();
        for disk in &config.disks {
            let file = DiskFile::open(disk)?;
            let (map, found) = ChangeMap::open(
                &config.state_dir,
                &disk.name,
                config.item_id,
                file.size_bytes(),
                config.change_map,
            )?;
            tracing::info!(
                disk = %disk.name,
                fresh = found.fresh,
                from_map_bytes = found.from_map_bytes,
                from_activity_log_bytes = found.from_activity_log_bytes,
                unsent_bytes = found.unsent_bytes,
                "change map opened"
            );
            recovered.push(found.unsent_bytes);
            fresh.push(found.fresh);
            disks.push(file);
            maps.push(map);
        }
        let geometry = disks
            .iter()
            .map(|d| DiskGeometry {
                size_bytes: d.size_bytes(),
                block_size_bytes: d.block_size_bytes(),
            })
            .collect();
        let mut sender = AgentConfig::new(
            config.appliance,
            config.item_id,
            &config.token,
            &config.item_name,
            geometry,
        );
        sender.backlog_limit_bytes = config.backlog_limit_bytes;
        sender.encoder = config.encoder;
        sender.send_timeout = Duration::ZERO; // the VM never waits: a full backlog → change map
        sender.connect_timeout = Duration::from_secs(2);
        sender.max_attempts = 3;
        let core = Arc::new(Core {
            counters: disks.iter().map(|_| DiskCounters::default()).collect(),
            disks,
            bookmark_interval: config.bookmark_interval,
            backlog_limit_bytes: config.backlog_limit_bytes,
            ordered: Mutex::new(Ordered::new(maps)),
            wake: Condvar::new(),
            quiesced: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            bookmarks: AtomicU64::new(0),
            flushes_coalesced: AtomicU64::new(0),
            bookmarks_deferred: AtomicU64::new(0),
        });
        let spawn = |name: &str, run: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.to_owned())
                .spawn(run)
                .map_err(|e| CaptureError::Config(format!("cannot start thread {name}: {e}")))
        };
        let link = {
            let core = core.clone();
            spawn(
                "capture-link",
                Box::new(move || threads::run_link(&core, &sender, &fresh)),
            )?
        };
        let catch_up = {
            let core = core.clone();
            spawn(
                "capture-catch-up",
                Box::new(move || threads::run_catch_up(&core)),
            )?
        };
        Ok(Arc::new(Self {
            core,
            item_name: config.item_name,
            names: config.disks.iter().map(|d| d.name.clone()).collect(),
            recovered,
            threads: Mutex::new(vec![link, catch_up]),
        }))
    }

    /// One NBD export per disk, named by the disk's name.
    pub fn exports(&self) -> Vec<(String, Arc<dyn nbd_server::Export>)> {
        self.names
            .iter()
            .zip(&self.core.disks)
            .enumerate()
            .map(|(index, (name, disk))| {
                let export: Arc<dyn nbd_server::Export> = Arc::new(export::CapturedDisk {
                    index: index as u16, // at most MAX_DISKS
                    disk: disk.clone(),
                    core: self.core.clone(),
                });
                (name.clone(), export)
            })
            .collect()
    }

    /// Puts a bookmark into the stream after every write completed so far, waiting up to
    /// 30 s for the change maps to drain, the link to be up and room in the backlog
    /// ([`Capture::bookmark_within`]).
    pub fn bookmark(
        &self,
        consistency: Consistency,
        label: &str,
    ) -> Result<Bookmarked, CaptureError> {
        self.bookmark_within(consistency, label, Duration::from_secs(30))
    }

    /// Puts a bookmark into the stream after every write completed so far. While a change
    /// map holds unsent data (the replica would match no instant of the disks), while no
    /// sender is connected, or while the backlog is full, it waits up to `timeout`, then
    /// fails with [`CaptureError::Timeout`] naming why. Refused at once while quiesced.
    pub fn bookmark_within(
        &self,
        consistency: Consistency,
        label: &str,
        timeout: Duration,
    ) -> Result<Bookmarked, CaptureError> {
        if self.core.quiesced.load(Ordering::Acquire) {
            return Err(CaptureError::Quiesced);
        }
        self.bookmark_when_drained(consistency, label, timeout)
    }

    fn bookmark_when_drained(
        &self,
        consistency: Consistency,
        label: &str,
        timeout: Duration,
    ) -> Result<Bookmarked, CaptureError> {
        let started = Instant::now();
        let mut o = self.core.lock();
        loop {
            if self.core.is_stopping() {
                return Err(CaptureError::Stopping);
            }
            Core::note_acks(&mut o);
            let unsent_bytes = o.unsent_bytes();
            let error = if unsent_bytes > 0 {
                CaptureError::CatchingUp { unsent_bytes }
            } else {
                match self.core.take_bookmark(&mut o, consistency, label) {
                    Ok(bookmarked) => return Ok(bookmarked),
                    Err(error) => error,
                }
            };
            // A full backlog drains; a sender that just stopped is replaced by the link
            // thread: both are waited out like a catch-up.
            let retry = matches!(
                error,
                CaptureError::CatchingUp { .. }
                    | CaptureError::NotConnected { .. }
                    | CaptureError::Sender(_)
            );
            if !retry {
                return Err(error);
            }
            if started.elapsed() >= timeout {
                return Err(CaptureError::Timeout {
                    what: format!("a consistent moment for a bookmark: {error}"),
                    waited_ms: started.elapsed().as_millis() as u64,
                });
            }
            o = self
                .core
                .wake
                .wait_timeout(o, Duration::from_millis(20))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits until the appliance acknowledged `seq` as durable.
    pub fn wait_acked(&self, seq: u64, timeout: Duration) -> Result<(), CaptureError> {
        self.core.wait_acked(seq, timeout)
    }

    /// Planned failover: refuses new writes (NBD error ESHUTDOWN), flushes the disks, waits
    /// until the change maps are drained, bookmarks, and waits for the bookmark's
    /// acknowledgement. The disks stay quiesced (also on error) until [`Capture::resume`].
    pub fn quiesce(
        &self,
        consistency: Consistency,
        label: &str,
        timeout: Duration,
    ) -> Result<Bookmarked, CaptureError> {
        let started = Instant::now();
        self.core.quiesced.store(true, Ordering::Release);
        // A write that passed the check before the flag holds the order lock: wait it out.
        drop(self.core.lock());
        for disk in &self.core.disks {
            disk.sync().map_err(|source| CaptureError::Disk {
                path: disk.path().to_owned(),
                what: "flushing before the quiesce bookmark",
                source,
            })?;
        }
        let bookmarked = self.bookmark_when_drained(consistency, label, timeout)?;
        let left = timeout.saturating_sub(started.elapsed());
        self.core.wait_acked(bookmarked.seq, left)?;
        tracing::info!(
            bookmark_id = bookmarked.bookmark_id,
            seq = bookmarked.seq,
            "quiesced"
        );
        Ok(bookmarked)
    }

    /// Accepts writes again after [`Capture::quiesce`].
    pub fn resume(&self) {
        self.core.quiesced.store(false, Ordering::Release);
    }

    /// The state of the capture and its disks.
    pub fn status(&self) -> CaptureStatus {
        let mut o = self.core.lock();
        Core::note_acks(&mut o);
        let (acked_seq, next_seq, backlog_bytes) = match &o.sender {
            Some(sender) => (sender.acked_seq(), sender.next_seq(), sender.backlog().1),
            None => (0, 0, 0),
        };
        let disks = (0..self.names.len())
            .map(|i| {
                let stats = o.maps[i].stats();
                let counters = &self.core.counters[i];
                let disk = &self.core.disks[i];
                DiskStatus {
                    name: self.names[i].clone(),
                    path: disk.path().display().to_string(),
                    size_bytes: disk.size_bytes(),
                    written_bytes: counters.written_bytes.load(Ordering::Relaxed),
                    sent_bytes: counters.sent_bytes.load(Ordering::Relaxed),
                    resent_bytes: counters.resent_bytes.load(Ordering::Relaxed),
                    recovered_bytes: self.recovered[i],
                    unsent_bytes: stats.unsent_bytes,
                    grain_bytes: stats.grain_bytes,
                    active_extents: stats.active_extents,
                    map_saves: stats.map_saves,
                }
            })
            .collect();
        let link = match &o.sender {
            Some(sender) if !sender.is_connected() => {
                "disconnected (reconnects when there is something to send)".to_owned()
            }
            _ => o.link.clone(),
        };
        CaptureStatus {
            item_name: self.item_name.clone(),
            link,
            acked_seq,
            next_seq,
            backlog_bytes,
            quiesced: self.core.quiesced.load(Ordering::Acquire),
            last_bookmark: o.last_bookmark.as_ref().map(|(b, _)| b.clone()),
            bookmarks: self.core.bookmarks.load(Ordering::Relaxed),
            flushes_coalesced: self.core.flushes_coalesced.load(Ordering::Relaxed),
            bookmarks_deferred_catching_up: self.core.bookmarks_deferred.load(Ordering::Relaxed),
            disks,
        }
    }

    /// Stops: flushes the disks, lets the sender deliver what it holds (up to `timeout`),
    /// saves the change maps (after the final acknowledgements, so a clean stop with
    /// everything delivered recovers nothing at the next start), and ends the session. The
    /// exports refuse writes from here on. Calling it twice is harmless.
    pub fn shutdown(&self, timeout: Duration) -> Result<(), CaptureError> {
        let core = &self.core;
        if core.stopping.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        core.wake.notify_all();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for thread in threads {
            let _ = thread.join();
        }
        // The disks are synced by the checkpoints below (before the maps are saved).
        let mut first_error = None;
        let sender = core.lock().sender.clone();
        if let Some(sender) = &sender
            && let Err(error) = sender.flush(timeout)
        {
            tracing::warn!(%error, "not everything was acknowledged before the shutdown");
        }
        let mut o = core.lock();
        Core::note_acks(&mut o);
        for (i, map) in o.maps.iter_mut().enumerate() {
            let disk = &core.disks[i];
            if let Err(error) = map.checkpoint(&mut || disk.sync()) {
                first_error.get_or_insert(error.into());
            }
        }
        let sender = o.sender.take();
        drop(o);
        // The last handle: end the session cleanly (the appliance's final records are read).
        if let Some(sender) = sender.and_then(Arc::into_inner)
            && let Err(error) = sender.close(Duration::from_secs(5))
        {
            tracing::warn!(%error, "closing the session");
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.core.stopping.store(true, Ordering::Release);
        self.core.wake.notify_all();
        for thread in std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner())) {
            let _ = thread.join();
        }
    }
}
