//! The reading side of a staging log (apply's): durable frames in sequence order, each
//! checksum verified, and a look-ahead at the extents of the next frames.

use super::*;

/// Reads durable staged frames in sequence order (used by apply), verifying each checksum.
#[derive(Debug)]
pub struct StagingReader {
    pub(super) dir: Arc<dyn DurableDir>,
    pub(super) shared: Arc<Shared>,
    pub(super) disks: Vec<crate::delta::DiskGeometry>,
    /// Every segment starts with the item's stream header: same name, same disks.
    pub(super) header_len_bytes: u64,
    pub(super) next_seq: u64,
    pub(super) current: Option<(Segment, Arc<dyn DurableFile>, u64)>,
    /// The log's generation when `current` was opened.
    pub(super) generation: u64,
    /// The one frame reader (shared with the stream decoder), its buffer reused.
    pub(super) frames: FrameReader,
}

/// A segment file read in order from an offset, as a frame source.
struct SegmentAt<'a> {
    file: &'a dyn DurableFile,
    offset_bytes: u64,
}

impl FrameSource for SegmentAt<'_> {
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), DecodeErrorReason> {
        self.file
            .read_exact_at(self.offset_bytes, buf)
            .map_err(DecodeErrorReason::Io)?;
        self.offset_bytes += buf.len() as u64;
        Ok(())
    }
}

/// A frame read back from the staging log; borrows the reader's buffer.
#[derive(Debug)]
pub struct StagedFrame<'a> {
    /// Sequence number.
    pub seq: u64,
    /// The frame's stored (and verified) XXH3 checksum.
    pub checksum: u64,
    /// What the frame says.
    pub body: FrameBody<'a>,
}

impl StagingReader {
    /// The log's durable sequence number, read without the log's lock (for status reports
    /// while a session holds the log).
    pub fn durable_seq(&self) -> u64 {
        self.shared.durable_seq.load(Ordering::Acquire)
    }

    /// Bytes the log's segments take on disk, read without the log's lock (the durable
    /// length of the segment being appended to, plus the sealed ones).
    pub fn used_bytes(&self) -> u64 {
        self.shared.segments().iter().map(|s| s.len_bytes).sum()
    }

    /// Sequence number of the next frame this reader returns.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Publishes that every frame up to `seq` is applied and durable on the replicas; the log
    /// reclaims up to it at its next commit (the reader's side needs no access to the log).
    pub fn set_applied(&self, seq: u64) {
        self.shared.applied_seq.fetch_max(seq, Ordering::AcqRel);
    }

    /// The handoff of decompressed payloads from ingest (shared with the log).
    pub fn handoff(&self) -> Arc<PayloadHandoff> {
        self.shared.handoff.clone()
    }

    /// The handle that waits for this log's next commit, or wakes the waiter.
    pub fn waker(&self) -> StagingWaker {
        StagingWaker(self.shared.clone())
    }

    /// Moves the reader so that the next frame it returns is `seq`.
    pub fn seek(&mut self, seq: u64) {
        self.next_seq = seq;
        self.current = None;
    }

    /// Opens `segment` positioned at `next_seq`, skipping earlier frames by their headers.
    pub(super) fn open_at(
        &self,
        segment: Segment,
    ) -> Result<(Segment, Arc<dyn DurableFile>, u64), StagingError> {
        let file = self
            .dir
            .open(&segment.name, false)
            .map_err(io_err(format!("opening {}", segment.name)))?;
        let mut offset = self.header_len_bytes;
        for seq in segment.first_seq..self.next_seq {
            let mut raw = [0u8; FRAME_HEADER_BYTES];
            file.read_exact_at(offset, &mut raw)
                .map_err(io_err(format!("reading {}", segment.name)))?;
            let payload = check_frame_prefix(&raw).map_err(|reason| StagingError::Corrupt {
                segment: segment.name.clone(),
                seq,
                offset_bytes: offset,
                reason,
            })?;
            offset += FRAME_HEADER_BYTES as u64 + u64::from(payload);
        }
        Ok((segment, file, offset))
    }

    /// Looks ahead without moving the reader: the extents (disk, offset, length) written by the
    /// next durable frames, from their headers only, up to `max_frames` frames or a bookmark
    /// (included in the count). Returns the number of frames covered and whether the last one
    /// is a bookmark. Checksums are verified when the frames are read with
    /// [`next_frame`](Self::next_frame); a defect found here just ends the look-ahead early.
    pub fn peek_extents(
        &mut self,
        max_frames: usize,
        out: &mut Vec<(u16, u64, u64)>,
    ) -> Result<(u64, bool), StagingError> {
        out.clear();
        let durable = self.shared.durable_seq.load(Ordering::Acquire);
        let mut seq = self.next_seq;
        let mut frames = 0u64;
        let mut cursor: Option<(Segment, Arc<dyn DurableFile>, u64)> = None;
        while seq <= durable && (frames as usize) < max_frames {
            let holding = self
                .shared
                .segments()
                .iter()
                .find(|s| s.first_seq <= seq && seq <= s.last_seq)
                .cloned();
            let Some(holding) = holding else {
                break;
            };
            if cursor.as_ref().is_none_or(|c| c.0.name != holding.name) {
                let saved = self.next_seq;
                self.next_seq = seq;
                let opened = self.open_at(holding);
                self.next_seq = saved;
                cursor = Some(opened?);
            }
            let Some((segment, file, offset)) = cursor.as_mut() else {
                break;
            };
            let mut raw = [0u8; FRAME_HEADER_BYTES];
            file.read_exact_at(*offset, &mut raw)
                .map_err(io_err(format!("reading {}", segment.name)))?;
            let Ok(header) = decode_frame_header(&raw) else {
                break;
            };
            if header.seq != seq {
                break;
            }
            *offset += FRAME_HEADER_BYTES as u64 + u64::from(header.payload_len_bytes);
            seq += 1;
            frames += 1;
            match header.kind {
                FrameKind::Write | FrameKind::ResyncBlock | FrameKind::ZeroRange => {
                    out.push((header.disk_index, header.offset_bytes, header.length_bytes));
                }
                FrameKind::Bookmark => return Ok((frames, true)),
                FrameKind::End => {}
            }
        }
        Ok((frames, false))
    }

    /// The next durable frame, or `None` when every durable frame has been read.
    pub fn next_frame(&mut self) -> Result<Option<StagedFrame<'_>>, StagingError> {
        let durable = self.shared.durable_seq.load(Ordering::Acquire);
        if self.next_seq > durable {
            return Ok(None);
        }
        // Stay on the current segment while it holds next_seq; else open the one that does.
        let next_seq = self.next_seq;
        let holding = self
            .shared
            .segments()
            .iter()
            .find(|s| s.first_seq <= next_seq && next_seq <= s.last_seq)
            .cloned();
        let Some(holding) = holding else {
            return Ok(None);
        };
        let generation = self.shared.generation.load(Ordering::Acquire);
        if generation != self.generation
            || self
                .current
                .as_ref()
                .is_none_or(|c| c.0.name != holding.name)
        {
            self.current = Some(self.open_at(holding)?);
            self.generation = generation;
        }
        let Some((segment, file, offset)) = self.current.as_mut() else {
            return Ok(None);
        };
        let corrupt = |offset_bytes, reason| StagingError::Corrupt {
            segment: segment.name.clone(),
            seq: self.next_seq,
            offset_bytes,
            reason,
        };
        let mut source = SegmentAt {
            file: file.as_ref(),
            offset_bytes: *offset,
        };
        let header = self
            .frames
            .read(&mut source)
            .map_err(|reason| match reason {
                DecodeErrorReason::Io(e) => io_err(format!("reading {}", segment.name))(e),
                reason => corrupt(*offset, reason),
            })?;
        if header.seq != self.next_seq {
            return Err(corrupt(
                *offset,
                DecodeErrorReason::SequenceGap {
                    expected: self.next_seq,
                    found: header.seq,
                },
            ));
        }
        let at = *offset;
        *offset = source.offset_bytes;
        let seq = self.next_seq;
        self.next_seq += 1;
        let body =
            validate_frame(&header, self.frames.payload(), &self.disks).map_err(|reason| {
                StagingError::Corrupt {
                    segment: segment.name.clone(),
                    seq,
                    offset_bytes: at,
                    reason,
                }
            })?;
        Ok(Some(StagedFrame {
            seq,
            checksum: header.checksum,
            body,
        }))
    }
}
