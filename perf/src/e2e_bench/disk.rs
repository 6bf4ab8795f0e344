//! One protected disk: enable its item, run its agent, pace its writes and bookmarks.

use super::*;

/// One protected item with one disk, its agent and its workload.
pub(super) struct Disk {
    pub(super) item: String,
    pub(super) agent: Agent,
    pub(super) tracker: Arc<Mutex<Tracker>>,
    pub(super) workload: Workload,
    pub(super) data: Vec<u8>,
    /// A write generated but not yet issued (its data in `data`): offset.
    pub(super) pending_offset: Option<u64>,
    pub(super) bookmark_id: u64,
}

/// What one writer did in a step.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Written {
    pub(super) bytes: u64,
    pub(super) writes: u64,
    pub(super) bookmarks: u64,
}

impl Disk {
    pub(super) fn enable(
        api: &Api,
        data_addr: std::net::SocketAddr,
        name: &str,
        disk_mib: u64,
        seed: u64,
    ) -> Result<Self> {
        let geometry = DiskGeometry {
            size_bytes: disk_mib << 20,
            block_size_bytes: 4096,
        };
        let request = EnableRequest {
            name: name.to_owned(),
            disks: vec![DiskSpec::create(disk_mib, Some(4096))],
            policy: None,
            temporary_os_disk: None,
        };
        let enabled = api
            .client()
            .enable(&request)
            .with_context(|| format!("enabling protection of {name}"))?;
        let (item, token) = (enabled.item.id, enabled.stream_token);
        let now = Instant::now();
        let tracker = Arc::new(Mutex::new(Tracker::new(now, now)));
        let mut config = AgentConfig::new(
            data_addr,
            parse_item_id(&item)?,
            token.as_bytes(),
            name,
            vec![geometry],
        );
        config.encoder = EncoderOptions {
            zstd_level: Some(1),
        };
        // A writer blocked on a full backlog waits for the appliance, however long a step's
        // overload takes to clear.
        config.send_timeout = Duration::from_secs(300);
        let observed = tracker.clone();
        config.ack_observer = Some(Arc::new(move |seq| {
            let at = Instant::now();
            lock(&observed).acked(seq, at);
        }));
        let agent =
            Agent::connect(config).with_context(|| format!("connecting the agent of {name}"))?;
        let spec = WorkloadSpec {
            pattern: Pattern::Uniform,
            zero_range_per_mille: 0,
            compressible_percent: 50,
            ..WorkloadSpec::default()
        }
        .with_timed_bookmarks(0, 0);
        Ok(Self {
            item,
            agent,
            tracker,
            workload: Workload::new(seed, spec, vec![geometry]),
            data: Vec::with_capacity(1 << 20),
            pending_offset: None,
            bookmark_id: 0,
        })
    }

    /// The next write of at least [`MIN_WRITE_BYTES`] (generated once, kept until issued):
    /// its offset and length.
    pub(super) fn next_write(&mut self) -> (u64, usize) {
        loop {
            if let Some(offset) = self.pending_offset {
                return (offset, self.data.len());
            }
            if let Op::Write {
                offset_bytes,
                length_bytes,
                ..
            } = self.workload.next_op(&mut self.data)
                && length_bytes >= MIN_WRITE_BYTES
            {
                self.pending_offset = Some(offset_bytes);
            }
        }
    }

    /// A crash-consistent bookmark, stamped with the source's clock.
    pub(super) fn bookmark(&mut self) -> Result<()> {
        self.bookmark_id += 1;
        let at = Instant::now();
        let seq = self
            .agent
            .bookmark(
                Consistency::Crash,
                self.bookmark_id,
                engine::clock::now_unix_ns(),
                "",
            )
            .with_context(|| format!("bookmark of item {}", self.item))?;
        lock(&self.tracker).submitted(seq, at, 0);
        Ok(())
    }

    /// Writes at `rate` bytes/s from `start` to `end` (see the module docs), with a
    /// bookmark every [`BOOKMARK_EVERY`].
    pub(super) fn write_step(
        &mut self,
        rate: f64,
        start: Instant,
        end: Instant,
    ) -> Result<Written> {
        let mut done = Written::default();
        let mut next_bookmark = start + BOOKMARK_EVERY;
        if let Some(wait) = start.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        loop {
            let now = Instant::now();
            if now >= end {
                // A last bookmark, so that the step's writes end in a recovery point (the
                // appliance's applied watermark moves by points).
                self.bookmark()?;
                done.bookmarks += 1;
                return Ok(done);
            }
            if now >= next_bookmark {
                self.bookmark()?;
                done.bookmarks += 1;
                next_bookmark += BOOKMARK_EVERY;
                if next_bookmark <= now {
                    next_bookmark = now + BOOKMARK_EVERY;
                }
                continue;
            }
            let (offset, len) = self.next_write();
            let due = start
                + Duration::from_secs_f64((done.bytes as f64 + len as f64 / 2.0) / rate.max(1.0));
            if due >= end || now < due {
                let wake = if due >= end { end } else { due };
                std::thread::sleep(wake.min(next_bookmark).saturating_duration_since(now));
                continue;
            }
            let at = Instant::now();
            let seq = self
                .agent
                .write(0, offset, &self.data)
                .with_context(|| format!("write of item {}", self.item))?;
            lock(&self.tracker).submitted(seq, at, len as u64);
            self.pending_offset = None;
            done.bytes += len as u64;
            done.writes += 1;
        }
    }

    /// Waits until every frame made is acknowledged and the tracker has seen the ack.
    pub(super) fn drain(&self, timeout: Duration) -> Result<()> {
        let acked = self
            .agent
            .flush(timeout)
            .with_context(|| format!("draining the agent of item {}", self.item))?;
        let deadline = Instant::now() + Duration::from_secs(5);
        // flush can return before the ack thread has told the observer.
        while lock(&self.tracker).acked.is_none_or(|a| a < acked) {
            if Instant::now() > deadline {
                bail!(
                    "the ack observer of item {} never saw seq {acked}",
                    self.item
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }
}
