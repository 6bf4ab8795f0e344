//! Copy on first write: the old content of the grains a batch overwrites, preserved durably
//! under the current tag before any write is submitted.

use super::*;

/// Name of the preserve file of a tag.
pub fn preserve_file_name(tag: u64) -> String {
    format!("pres-{tag:020}.dat")
}

impl<E: IoEngine> Applier<E> {
    /// Preserves the old content of every grain the batch overwrites that was not preserved
    /// yet in this interval. Returns the number of grains preserved.
    pub(super) fn preserve(&mut self, extents: &[(u16, u64, u64)]) -> Result<u64, ApplyError> {
        if !self.preserving {
            return Ok(0);
        }
        let grain = u64::from(self.config.grain_bytes);
        let run_max_grains = (self.pool.buf_size_bytes() as u64 / grain).max(1);
        // Runs of contiguous grains to read: (disk, first grain, grain count).
        let mut runs: Vec<(u16, u64, u64)> = Vec::new();
        let mut in_batch: HashSet<(u16, u64)> = HashSet::new();
        for &(disk_index, offset_bytes, len_bytes) in extents {
            // Planned from unverified headers: an extent that fits no disk is skipped here and
            // refused with a named error when its frame is read.
            let fits = self
                .disks
                .get(usize::from(disk_index))
                .is_some_and(|d| d.check_extent(offset_bytes, len_bytes).is_ok());
            if !fits {
                continue;
            }
            let first = offset_bytes / grain;
            let last = (offset_bytes + len_bytes - 1) / grain;
            for g in first..=last {
                if self.preserved_now.contains(&(disk_index, g))
                    || !in_batch.insert((disk_index, g))
                {
                    continue;
                }
                match runs.last_mut() {
                    Some((d, start, count))
                        if *d == disk_index && *start + *count == g && *count < run_max_grains =>
                    {
                        *count += 1
                    }
                    _ => runs.push((disk_index, g, 1)),
                }
            }
        }
        if runs.is_empty() {
            return Ok(0);
        }
        let tag = self.current_tag;
        let (file, mut file_len) = self.preserve_file_for(tag)?;
        let mut entries: Vec<PreservedEntry> = Vec::with_capacity(in_batch.len());
        let mut pending = runs.as_slice();
        while !pending.is_empty() {
            // One round: as many reads as there are free buffers.
            let round = pending
                .len()
                .min(self.pool.available())
                .min(self.engine.queue_depth())
                .max(1);
            let (now, later) = pending.split_at(round);
            pending = later;
            for (index, &(disk_index, first, count)) in now.iter().enumerate() {
                let size = self.disks[usize::from(disk_index)].size_bytes;
                let offset_bytes = first * grain;
                let len_bytes = (count * grain).min(size - offset_bytes);
                let Some(mut buf) = self.pool.take() else {
                    return Err(ApplyError::Invalid("buffer pool exhausted".into()));
                };
                buf.set_len_bytes(len_bytes as usize);
                let op = IoOp::Read {
                    file: self.files[usize::from(disk_index)],
                    offset_bytes,
                    buf,
                };
                self.submit(op, index as u64, disk_index, offset_bytes, len_bytes)?;
            }
            self.engine.kick().map_err(|source| ApplyError::Replica {
                disk_index: now[0].0,
                op: "kick",
                offset_bytes: 0,
                source,
            })?;
            let mut results: Vec<Option<IoBuf>> = (0..round).map(|_| None).collect();
            self.reap_all("read (preserve)", |completion| {
                if let Some(slot) = results.get_mut(completion.tag as usize) {
                    *slot = completion.buf.take();
                }
            })?;
            for (&(disk_index, first, _), buf) in now.iter().zip(results) {
                let Some(buf) = buf else {
                    return Err(ApplyError::Invalid(
                        "a preserve read returned no buffer".into(),
                    ));
                };
                let data = buf.as_slice();
                file.write_all_at(file_len, data)
                    .map_err(|source| ApplyError::Preserve {
                        what: format!("appending to {}", preserve_file_name(tag)),
                        source,
                    })?;
                for (i, _) in data.chunks(grain as usize).enumerate() {
                    entries.push(PreservedEntry {
                        disk_index,
                        grain: first + i as u64,
                        file_offset_bytes: file_len + i as u64 * grain,
                    });
                }
                file_len += data.len() as u64;
            }
        }
        file.sync_data().map_err(|source| ApplyError::Preserve {
            what: format!("flushing {}", preserve_file_name(tag)),
            source,
        })?;
        self.preserve_file = Some((tag, file, file_len));
        self.meta.add_preserved(self.item, tag, &entries)?;
        self.preserved_now.extend(in_batch);
        Ok(entries.len() as u64)
    }

    /// The preserve file of `tag` and its length, opened (and created durably) on first use.
    pub(super) fn preserve_file_for(
        &mut self,
        tag: u64,
    ) -> Result<(Arc<dyn DurableFile>, u64), ApplyError> {
        if let Some((open_tag, file, len)) = &self.preserve_file
            && *open_tag == tag
        {
            return Ok((file.clone(), *len));
        }
        let name = preserve_file_name(tag);
        let err = |what: &str| {
            let what = format!("{what} {name}");
            move |source| ApplyError::Preserve { what, source }
        };
        let file = self
            .preserve_dir
            .open(&name, true)
            .map_err(err("opening"))?;
        let len = file.len_bytes().map_err(err("sizing"))?;
        if len == 0 {
            // A new file: its name must be durable before entries point into it.
            file.sync_data().map_err(err("flushing"))?;
            self.preserve_dir.sync().map_err(err("creating"))?;
        }
        Ok((file, len))
    }
}
