//! Checkpoints, the "latest" point, pins and pruning: which recovery points exist and when
//! the watermark moves.

use super::*;

/// Points a materialize is reading: never pruned while pinned.
#[derive(Debug, Clone, Default)]
pub struct Pins(Arc<Mutex<BTreeMap<u64, u32>>>);

impl Pins {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, u32>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Pins `point_id` until the guard drops.
    pub fn pin(&self, point_id: u64) -> PinGuard {
        *self.lock().entry(point_id).or_default() += 1;
        PinGuard {
            pins: self.clone(),
            point_id,
        }
    }

    fn is_pinned(&self, point_id: u64) -> bool {
        self.lock().contains_key(&point_id)
    }
}

/// Keeps a point pinned.
#[derive(Debug)]
pub struct PinGuard {
    pins: Pins,
    point_id: u64,
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        let mut pins = self.pins.lock();
        if let Some(count) = pins.get_mut(&self.point_id) {
            *count -= 1;
            if *count == 0 {
                pins.remove(&self.point_id);
            }
        }
    }
}

impl<E: IoEngine> Applier<E> {
    /// Flushes every replica, then commits the watermark (and `point`, which opens a new
    /// interval).
    pub(super) fn checkpoint(&mut self, point: Option<PointRecord>) -> Result<(), ApplyError> {
        for (disk_index, &file) in self.files.clone().iter().enumerate() {
            let tag = self.next_tag;
            self.next_tag += 1;
            self.submit(IoOp::Flush { file }, tag, disk_index as u16, 0, 0)?;
        }
        self.engine.kick().map_err(|source| ApplyError::Replica {
            disk_index: 0,
            op: "kick",
            offset_bytes: 0,
            source,
        })?;
        self.reap_all("flush", |_| {})?;
        self.stats.flushes += 1;
        let tag = point.as_ref().map_or(self.current_tag, |p| p.point_id);
        self.meta
            .checkpoint(self.item, self.applied_seq, tag, point.as_ref())?;
        self.durable_seq = self.applied_seq;
        self.reader.set_applied(self.durable_seq);
        self.bytes_since_checkpoint = 0;
        if point.is_some() {
            self.discarded_since_point = false;
            self.current_tag = tag;
            self.preserving = self.config.preserve;
            self.preserved_now.clear();
        }
        Ok(())
    }

    /// Flushes the replicas and commits the watermark at the last applied frame (so staging
    /// can reclaim up to it), without making a point.
    pub fn flush(&mut self) -> Result<(), ApplyError> {
        self.ensure_healthy()?;
        if self.applied_seq == self.durable_seq {
            return Ok(());
        }
        let result = self.checkpoint(None);
        result.map_err(|e| self.fail(e))
    }

    /// Makes everything applied so far durable and, if anything was applied since the last
    /// point, records a "latest" point at the last applied frame. Returns the newest point id.
    pub fn mark_latest_point(&mut self) -> Result<Option<u64>, ApplyError> {
        self.ensure_healthy()?;
        if self.discarded_since_point {
            return Err(ApplyError::Invalid(format!(
                "no latest point: staged frames through seq {} were discarded and the replicas \
                 miss them until the delta resync's bookmark",
                self.applied_seq
            )));
        }
        if self.applied_seq == self.current_tag && self.current_tag != 0 {
            return Ok(Some(self.current_tag));
        }
        if self.applied_seq == 0 {
            return Ok(None);
        }
        let point = PointRecord {
            point_id: self.applied_seq,
            consistency: Consistency::Crash,
            origin: PointOrigin::Latest,
            bookmark_id: 0,
            source_timestamp_ns: 0,
            processed_at_ns: now_ns(),
            label: "latest".into(),
        };
        let result = self.checkpoint(Some(point));
        result.map_err(|e| self.fail(e))?;
        Ok(Some(self.applied_seq))
    }

    /// Prunes the oldest points beyond `retention` (never a pinned one, never skipping one).
    /// Returns the ids removed.
    pub fn prune(&mut self, retention: Retention, now_ns: u64) -> Result<Vec<u64>, ApplyError> {
        let points = self.meta.points(self.item)?;
        let mut removed = Vec::new();
        let mut left = points.len();
        for point in &points {
            let too_many = left > retention.max_count;
            let too_old = now_ns.saturating_sub(point.processed_at_ns) > retention.max_age_ns;
            if !(too_many || too_old) || self.pins.is_pinned(point.point_id) {
                break;
            }
            self.meta.remove_point(self.item, point.point_id)?;
            let name = preserve_file_name(point.point_id);
            match self.preserve_dir.remove(&name) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(ApplyError::Preserve {
                        what: format!("removing {name}"),
                        source,
                    });
                }
            }
            if self
                .preserve_file
                .as_ref()
                .is_some_and(|f| f.0 == point.point_id)
            {
                self.preserve_file = None;
            }
            if point.point_id == self.current_tag {
                // Every point is gone: nothing needs old content any more.
                self.preserving = false;
                self.preserved_now.clear();
            }
            removed.push(point.point_id);
            left -= 1;
        }
        if !removed.is_empty() {
            self.preserve_dir
                .sync()
                .map_err(|source| ApplyError::Preserve {
                    what: "syncing the preserve directory".into(),
                    source,
                })?;
        }
        Ok(removed)
    }
}
