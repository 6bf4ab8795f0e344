//! The appending side of a staging log: batch, group commit (which wakes the reader), back-
//! pressure, reclaim, and the resync marker.

use super::*;

impl StagingLog {
    pub(super) fn start_segment(&mut self, first_seq: u64) -> Result<(), StagingError> {
        let (file, segment) = create_segment(self.dir.as_ref(), &self.header, first_seq)?;
        self.used_bytes += segment.len_bytes;
        self.unsynced.push(file.clone());
        self.dir_dirty = true;
        self.active = file;
        self.shared.segments().push(segment);
        Ok(())
    }

    /// The item and disks this log stages.
    pub fn header(&self) -> &StreamHeader {
        &self.header
    }

    /// Sequence number of the next frame to append.
    pub fn next_seq(&self) -> u64 {
        self.appended_seq.wrapping_add(1)
    }

    /// Highest sequence number that is durable (and may be acknowledged).
    pub fn durable_seq(&self) -> u64 {
        self.shared.durable_seq.load(Ordering::Acquire)
    }

    /// Bytes the segments hold, including frames appended but not yet committed.
    pub fn used_bytes(&self) -> u64 {
        self.used_bytes + self.batch.len() as u64
    }

    /// The configured capacity.
    pub fn capacity_bytes(&self) -> u64 {
        self.config.capacity_bytes
    }

    /// Why the item needs a delta resync, if it does.
    pub fn resync_required(&self) -> Option<&str> {
        self.resync_reason.as_deref()
    }

    /// Appends one frame, exactly as received (header + payload, checksum already verified by
    /// the decoder). It is durable only after the next [`commit`](Self::commit).
    pub fn append(
        &mut self,
        seq: u64,
        wire_bytes: &[u8],
        now: Instant,
    ) -> Result<(), StagingError> {
        if self.failed {
            return Err(StagingError::Failed);
        }
        if let Some(reason) = &self.resync_reason {
            return Err(StagingError::ResyncRequired {
                reason: reason.clone(),
            });
        }
        if seq != self.next_seq() {
            return Err(StagingError::OutOfOrder {
                expected: self.next_seq(),
                found: seq,
            });
        }
        let frame_bytes = wire_bytes.len() as u64;
        if self.used_bytes() + frame_bytes > self.config.capacity_bytes {
            let since = *self.full_since.get_or_insert(now);
            if now.duration_since(since) >= self.config.full_timeout {
                let reason = format!(
                    "staging stayed full for {} s (capacity {} bytes); frames from seq {seq} \
                     were not staged",
                    self.config.full_timeout.as_secs(),
                    self.config.capacity_bytes
                );
                self.require_resync(&reason)?;
                return Err(StagingError::ResyncRequired { reason });
            }
            return Err(StagingError::Full {
                used_bytes: self.used_bytes(),
                capacity_bytes: self.config.capacity_bytes,
                frame_bytes,
            });
        }
        self.full_since = None;
        let active_len = self.shared.segments().last().map_or(0, |s| s.len_bytes);
        if active_len + self.batch.len() as u64 >= self.config.segment_target_bytes {
            self.write_batch()?;
            self.unsynced.push(self.active.clone());
            self.start_segment(seq)?;
        }
        // Bound the in-memory batch: past `batch_write_bytes` it goes to the file now (not yet
        // durable; `commit` still makes it so), so a session whose sender keeps data in flight
        // holds at most that plus one frame, not a whole group of frames.
        if !self.batch.is_empty()
            && self.batch.len() + wire_bytes.len() > self.config.batch_write_bytes
        {
            self.write_batch()?;
        }
        self.batch.extend_from_slice(wire_bytes);
        self.appended_seq = seq;
        Ok(())
    }

    /// Writes the batch to the active segment (not yet durable).
    pub(super) fn write_batch(&mut self) -> Result<(), StagingError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let mut segments = self.shared.segments();
        let Some(active) = segments.last_mut() else {
            return Err(StagingError::Failed);
        };
        let (offset, name) = (active.len_bytes, active.name.clone());
        drop(segments);
        if let Err(e) = self.active.write_all_at(offset, &self.batch) {
            self.failed = true;
            return Err(io_err(format!("appending to {name}"))(e));
        }
        let mut segments = self.shared.segments();
        if let Some(active) = segments.last_mut() {
            active.len_bytes += self.batch.len() as u64;
            active.last_seq = self.appended_seq;
        }
        self.used_bytes += self.batch.len() as u64;
        self.batch.clear();
        Ok(())
    }

    /// Makes every appended frame durable with one flush per file touched (group commit) and
    /// returns the durable sequence number, which may now be acknowledged.
    pub fn commit(&mut self) -> Result<u64, StagingError> {
        if self.failed {
            return Err(StagingError::Failed);
        }
        self.write_batch()?;
        let mut files = std::mem::take(&mut self.unsynced);
        if !files.iter().any(|f| Arc::ptr_eq(f, &self.active)) {
            files.push(self.active.clone());
        }
        for file in &files {
            if let Err(e) = file.sync_data() {
                self.failed = true;
                return Err(io_err("flushing the staging log")(e));
            }
        }
        if self.dir_dirty {
            if let Err(e) = self.dir.sync() {
                self.failed = true;
                return Err(io_err("syncing the staging directory")(e));
            }
            self.dir_dirty = false;
        }
        let newly_durable = self
            .shared
            .durable_seq
            .swap(self.appended_seq, Ordering::AcqRel)
            != self.appended_seq;
        if newly_durable {
            // The reader's thread (apply) waits for exactly this: wake it here, so nobody
            // has to relay the durable seq to it.
            self.shared.wake_reader();
        }
        // Free what apply has made durable elsewhere, so a long session never fills the
        // cache with applied frames.
        let applied = self.shared.applied_seq.load(Ordering::Acquire);
        if applied > 0 {
            self.reclaim(applied)?;
        }
        Ok(self.appended_seq)
    }

    /// How long to hold the next acknowledgement (grows with the fill above the threshold).
    pub fn pressure(&self) -> Pressure {
        let threshold =
            self.config.capacity_bytes / 1000 * u64::from(self.config.backpressure_per_mille);
        let used = self.used_bytes();
        if used <= threshold || self.config.capacity_bytes <= threshold {
            return Pressure::None;
        }
        let over = (used - threshold) as f64 / (self.config.capacity_bytes - threshold) as f64;
        Pressure::Slow(self.config.backpressure_max_delay.mul_f64(over.min(1.0)))
    }

    /// Deletes sealed segments whose every frame is at or below `applied_seq` (applied to the
    /// replicas and durable there). Returns the bytes freed.
    pub fn reclaim(&mut self, applied_seq: u64) -> Result<u64, StagingError> {
        let victims: Vec<Segment> = {
            let mut segments = self.shared.segments();
            let keep_from = segments
                .iter()
                .position(|s| s.last_seq > applied_seq || s.last_seq < s.first_seq)
                .unwrap_or(segments.len())
                .min(segments.len().saturating_sub(1)); // never the active segment
            segments.drain(..keep_from).collect()
        };
        let mut freed = 0;
        for victim in &victims {
            self.dir
                .remove(&victim.name)
                .map_err(io_err(format!("removing {}", victim.name)))?;
            freed += victim.len_bytes;
        }
        if !victims.is_empty() {
            self.dir
                .sync()
                .map_err(io_err("syncing the staging directory"))?;
        }
        self.used_bytes -= freed;
        Ok(freed)
    }

    /// Marks the item as needing a delta resync (durably). Staged frames stay until
    /// [`StagingLog::resync_done`], which drops them: after the resync the replica is exact
    /// and the old frames would be stale.
    pub fn require_resync(&mut self, reason: &str) -> Result<(), StagingError> {
        let marker = self
            .dir
            .open(RESYNC_MARKER, true)
            .map_err(io_err("creating the resync marker"))?;
        marker
            .set_len(0)
            .map_err(io_err("writing the resync marker"))?;
        marker
            .write_all_at(0, reason.as_bytes())
            .map_err(io_err("writing the resync marker"))?;
        marker
            .sync_data()
            .map_err(io_err("syncing the resync marker"))?;
        self.dir
            .sync()
            .map_err(io_err("syncing the staging directory"))?;
        self.resync_reason = Some(reason.to_owned());
        Ok(())
    }

    /// After a completed delta resync: drops all staged frames, starts a fresh segment at
    /// `next_seq`, and clears the resync marker.
    pub fn resync_done(&mut self, next_seq: u64) -> Result<(), StagingError> {
        self.batch.clear();
        self.shared.handoff.clear();
        self.shared.generation.fetch_add(1, Ordering::AcqRel);
        let old: Vec<Segment> = std::mem::take(&mut *self.shared.segments());
        for segment in &old {
            self.dir
                .remove(&segment.name)
                .map_err(io_err(format!("removing {}", segment.name)))?;
        }
        self.used_bytes = 0;
        self.unsynced.clear();
        self.appended_seq = next_seq.wrapping_sub(1);
        self.start_segment(next_seq)?;
        self.commit()?;
        self.dir
            .remove(RESYNC_MARKER)
            .map_err(io_err("removing the resync marker"))?;
        self.dir
            .sync()
            .map_err(io_err("syncing the staging directory"))?;
        self.resync_reason = None;
        self.full_since = None;
        Ok(())
    }

    /// The handoff of decompressed payloads from ingest to this log's readers.
    pub fn handoff(&self) -> Arc<PayloadHandoff> {
        self.shared.handoff.clone()
    }

    /// A reader of durable frames from `from_seq` on.
    pub fn reader(&self, from_seq: u64) -> StagingReader {
        StagingReader {
            dir: self.dir.clone(),
            shared: self.shared.clone(),
            disks: self.header.disks.clone(),
            header_len_bytes: self.header.encoded_len_bytes() as u64,
            next_seq: from_seq,
            current: None,
            generation: self.shared.generation.load(Ordering::Acquire),
            frames: FrameReader::default(),
        }
    }
}
