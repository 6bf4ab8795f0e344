//! Apply's replica I/O: frames decoded into pool buffers, submitted with overlapping extents
//! serialised, and reaped.

use super::*;

impl<E: IoEngine> Applier<E> {
    /// Decode each frame straight into a buffer and submit it at once, keeping the queue full
    /// while the next frames are read; wait for the writes only at the end of the run (a
    /// bookmark, `max_frames`, the checkpoint interval when `checkpoint_bound`, or no more
    /// durable frames).
    pub(super) fn run_streaming(
        &mut self,
        max_frames: u64,
        checkpoint_bound: bool,
    ) -> Result<(ApplyProgress, Option<Bookmark>), ApplyError> {
        let mut progress = ApplyProgress::default();
        let mut last_seq = None;
        let mut bookmark = None;
        while progress.frames < max_frames
            && (!checkpoint_bound
                || self.bytes_since_checkpoint + progress.bytes
                    < self.config.checkpoint_every_bytes)
        {
            // A buffer first (the frame borrows the reader); when every buffer is in flight,
            // wait for one to come back. Unused, it returns to the pool on drop.
            let mut buf = self.take_buf()?;
            let Some(frame) = self.reader.next_frame()? else {
                break;
            };
            let seq = frame.seq;
            last_seq = Some(seq);
            progress.frames += 1;
            // A zstd payload ingest already decompressed for exactly this frame is taken from
            // the handoff instead of being decompressed again.
            let handed = match &frame.body {
                FrameBody::Write(extent) | FrameBody::ResyncBlock(extent)
                    if extent.encoding == Encoding::Zstd =>
                {
                    let handed = self
                        .handoff
                        .take(&PayloadKey::of(seq, frame.checksum, extent));
                    match handed {
                        Some(_) => self.stats.payloads_handed_off += 1,
                        None => self.stats.payloads_decompressed += 1,
                    }
                    handed
                }
                _ => None,
            };
            let op = match frame.body {
                FrameBody::Write(extent) | FrameBody::ResyncBlock(extent)
                    if extent.length_bytes as usize > buf.capacity_bytes() =>
                {
                    // Larger than a buffer: decode once into the spill buffer (or take the
                    // handed-off bytes as the spill buffer), then write it in buffer-sized
                    // pieces (below, once the frame's borrow has ended).
                    if let Some(bytes) = handed {
                        let spare = std::mem::replace(&mut self.spill, bytes);
                        self.handoff.recycle(spare);
                    } else {
                        self.spill.resize(extent.length_bytes as usize, 0);
                        self.payloads
                            .decode_into(&extent, &mut self.spill)
                            .map_err(|reason| ApplyError::Payload {
                                seq,
                                disk_index: extent.disk_index,
                                offset_bytes: extent.offset_bytes,
                                reason,
                            })?;
                    }
                    Next::Spilled {
                        disk_index: extent.disk_index,
                        offset_bytes: extent.offset_bytes,
                        first: buf,
                    }
                }
                FrameBody::Write(extent) | FrameBody::ResyncBlock(extent) => {
                    if let Some(bytes) = handed {
                        buf.copy_from(&bytes);
                        self.handoff.recycle(bytes);
                    } else {
                        decode_into(&mut self.payloads, &extent, &mut buf).map_err(|reason| {
                            ApplyError::Payload {
                                seq,
                                disk_index: extent.disk_index,
                                offset_bytes: extent.offset_bytes,
                                reason,
                            }
                        })?;
                    }
                    Next::Op(PendingOp::Write {
                        disk_index: extent.disk_index,
                        offset_bytes: extent.offset_bytes,
                        buf,
                    })
                }
                FrameBody::ZeroRange {
                    disk_index,
                    offset_bytes,
                    length_bytes,
                } => Next::Op(PendingOp::Zero {
                    disk_index,
                    offset_bytes,
                    len_bytes: length_bytes,
                }),
                FrameBody::Bookmark(mark) => {
                    bookmark = Some((seq, mark));
                    break;
                }
                FrameBody::End => continue,
            };
            progress.bytes += match op {
                Next::Op(op) => self.submit_pending(op)?,
                Next::Spilled {
                    disk_index,
                    offset_bytes,
                    first,
                } => self.submit_spilled(disk_index, offset_bytes, first)?,
            };
            // Hand ops to the kernel a few at a time: one syscall for several writes.
            if progress.frames % STREAM_KICK_EVERY == 0 {
                self.engine.kick().map_err(|source| ApplyError::Replica {
                    disk_index: 0,
                    op: "kick",
                    offset_bytes: 0,
                    source,
                })?;
            }
        }
        self.reap_all("write", |_| {})?;
        if let Some(seq) = last_seq {
            self.applied_seq = seq;
        }
        Ok((progress, bookmark))
    }

    /// Writes the spill buffer at `offset_bytes` of disk `disk_index` in buffer-sized pieces,
    /// the first one in `first`. Returns its bytes.
    pub(super) fn submit_spilled(
        &mut self,
        disk_index: u16,
        offset_bytes: u64,
        first: IoBuf,
    ) -> Result<u64, ApplyError> {
        let spill = std::mem::take(&mut self.spill);
        let result = (|| {
            let mut next = Some(first);
            for (index, piece) in spill.chunks(self.pool.buf_size_bytes()).enumerate() {
                let mut buf = match next.take() {
                    Some(buf) => buf,
                    None => self.take_buf()?,
                };
                buf.copy_from(piece);
                self.submit_pending(PendingOp::Write {
                    disk_index,
                    offset_bytes: offset_bytes + (index * self.pool.buf_size_bytes()) as u64,
                    buf,
                })?;
            }
            Ok(spill.len() as u64)
        })();
        self.spill = spill;
        result
    }

    /// A buffer from the pool; when every buffer is in flight, waits for one to come back.
    pub(super) fn take_buf(&mut self) -> Result<IoBuf, ApplyError> {
        if let Some(buf) = self.pool.take() {
            return Ok(buf);
        }
        self.reap_some(1, "write")?;
        self.pool
            .take()
            .ok_or_else(|| ApplyError::Invalid("buffer pool exhausted".into()))
    }

    /// Submits one write or zero range once no write in flight overlaps it. Returns its bytes.
    pub(super) fn submit_pending(&mut self, op: PendingOp) -> Result<u64, ApplyError> {
        let (disk_index, offset_bytes, len_bytes) = op.extent();
        let end = offset_bytes + len_bytes;
        while self
            .in_flight
            .iter()
            .any(|&(_, d, s, e)| d == disk_index && s < end && offset_bytes < e)
        {
            self.reap_some(1, "write")?;
        }
        let file = self.files[usize::from(disk_index)];
        let io_op = match op {
            PendingOp::Write { buf, .. } => IoOp::Write {
                file,
                offset_bytes,
                buf,
            },
            PendingOp::Zero { .. } => IoOp::WriteZeroes {
                file,
                offset_bytes,
                len_bytes,
            },
        };
        let tag = self.next_tag;
        self.next_tag += 1;
        self.submit(io_op, tag, disk_index, offset_bytes, len_bytes)?;
        Ok(len_bytes)
    }

    /// Submits one op, reaping while the queue is full.
    pub(super) fn submit(
        &mut self,
        mut op: IoOp,
        tag: u64,
        disk_index: u16,
        offset_bytes: u64,
        len_bytes: u64,
    ) -> Result<(), ApplyError> {
        let kind = op.kind_name();
        loop {
            match self.engine.submit(op, tag) {
                Ok(()) => {
                    self.in_flight
                        .push((tag, disk_index, offset_bytes, offset_bytes + len_bytes));
                    return Ok(());
                }
                Err(rejected) if rejected.reason == RejectReason::QueueFull => {
                    op = rejected.op;
                    self.reap_some(1, kind)?;
                }
                Err(rejected) => {
                    return Err(ApplyError::Replica {
                        disk_index,
                        op: kind,
                        offset_bytes,
                        source: io::Error::new(io::ErrorKind::InvalidInput, rejected.to_string()),
                    });
                }
            }
        }
    }

    /// Reaps at least `min` completions; a failed op fails the batch.
    pub(super) fn reap_some(&mut self, min: usize, op: &'static str) -> Result<(), ApplyError> {
        self.reap_with(min, op, &mut |_| {})
    }

    /// Reaps everything in flight; `on` sees each successful completion. The first error is
    /// returned after every op has come back.
    pub(super) fn reap_all(
        &mut self,
        op: &'static str,
        mut on: impl FnMut(&mut Completion),
    ) -> Result<(), ApplyError> {
        let mut first_error = None;
        while self.engine.in_flight_count() > 0 {
            if let Err(e) = self.reap_with(1, op, &mut on) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    pub(super) fn reap_with(
        &mut self,
        min: usize,
        op: &'static str,
        on: &mut dyn FnMut(&mut Completion),
    ) -> Result<(), ApplyError> {
        self.completions.clear();
        self.engine
            .reap(&mut self.completions, min)
            .map_err(|source| ApplyError::Replica {
                disk_index: 0,
                op: "reap",
                offset_bytes: 0,
                source,
            })?;
        let mut completions = std::mem::take(&mut self.completions);
        let mut first_error = None;
        for completion in completions.iter_mut() {
            let (disk_index, offset_bytes) =
                match self.in_flight.iter().position(|f| f.0 == completion.tag) {
                    Some(index) => {
                        let (_, disk_index, offset_bytes, _) = self.in_flight.swap_remove(index);
                        (disk_index, offset_bytes)
                    }
                    None => (0, 0),
                };
            match &completion.result {
                Ok(_) => on(completion),
                Err(e) => {
                    first_error.get_or_insert(ApplyError::Replica {
                        disk_index,
                        op,
                        offset_bytes,
                        source: io::Error::new(e.kind(), e.to_string()),
                    });
                }
            }
        }
        completions.clear(); // buffers go back to the pool here
        self.completions = completions;
        first_error.map_or(Ok(()), Err)
    }
}

/// Decompresses (or copies) an extent's payload straight into `buf`.
fn decode_into(
    payloads: &mut PayloadDecoder,
    extent: &DataExtent<'_>,
    buf: &mut IoBuf,
) -> Result<(), DecodeErrorReason> {
    let len = extent.length_bytes as usize;
    buf.set_len_bytes(len);
    payloads.decode_into(extent, buf.as_mut_slice())
}
