//! Opening a staging log: scan every segment with the one delta decoder, keep the frames whose
//! checksums hold, cut a torn tail, and mark damage before the tail as resync required.

use super::*;

/// Adapts a durable file to `Read` from a starting offset (for the decoder).
pub(super) struct FileReader<'a> {
    file: &'a dyn DurableFile,
    offset_bytes: u64,
    len_bytes: u64,
}

impl Read for FileReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.len_bytes.saturating_sub(self.offset_bytes);
        let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        if n == 0 {
            return Ok(0);
        }
        self.file.read_exact_at(self.offset_bytes, &mut buf[..n])?;
        self.offset_bytes += n as u64;
        Ok(n)
    }
}

impl StagingLog {
    /// Opens the item's staging log and recovers it. `header` names the item and its disks;
    /// its `first_seq` is where a brand-new log starts.
    pub fn open(
        dir: Arc<dyn DurableDir>,
        header: StreamHeader,
        config: StagingConfig,
    ) -> Result<(Self, RecoveryReport), StagingError> {
        let names = dir
            .list()
            .map_err(io_err("listing the staging directory"))?;
        let resync_reason = if names.iter().any(|n| n == RESYNC_MARKER) {
            let file = dir
                .open(RESYNC_MARKER, false)
                .map_err(io_err("opening the resync marker"))?;
            let len = file
                .len_bytes()
                .map_err(io_err("reading the resync marker"))?;
            let mut text = vec![0u8; usize::try_from(len.min(4096)).unwrap_or(0)];
            file.read_exact_at(0, &mut text)
                .map_err(io_err("reading the resync marker"))?;
            Some(String::from_utf8_lossy(&text).into_owned())
        } else {
            None
        };
        let mut firsts: Vec<u64> = names.iter().filter_map(|n| parse_segment_name(n)).collect();
        firsts.sort_unstable();
        let mut report = RecoveryReport::default();
        let mut segments: Vec<Segment> = Vec::new();
        let mut corruption: Option<String> = None;
        let mut discard: Vec<String> = Vec::new();
        for (position, first_seq) in firsts.iter().copied().enumerate() {
            let name = segment_name(first_seq);
            if corruption.is_some() {
                discard.push(name);
                continue;
            }
            let is_last = position + 1 == firsts.len();
            let expected_first = segments.last().map(|s| s.last_seq.wrapping_add(1));
            if expected_first.is_some_and(|e| e != first_seq) {
                corruption = Some(format!(
                    "segment {name} starts at seq {first_seq}, expected {}",
                    expected_first.unwrap_or_default()
                ));
                discard.push(name);
                continue;
            }
            let file = dir
                .open(&name, false)
                .map_err(io_err(format!("opening {name}")))?;
            let scan = scan_segment(file.as_ref(), &name, &header, first_seq)?;
            report.segments += 1;
            report.frames += scan.frames;
            match scan.defect {
                None => {}
                Some(_) if is_last || scan.header_torn => {
                    // A torn tail: bytes after the last complete frame, never acknowledged.
                    report.torn_tail_bytes += scan.file_len - scan.good_len;
                }
                Some(defect) => {
                    corruption = Some(format!("{name}: {defect}"));
                    report.torn_tail_bytes += scan.file_len - scan.good_len;
                }
            }
            if scan.header_torn {
                // Created but its header never made it: nothing in it was acknowledged.
                discard.push(name);
                continue;
            }
            if scan.good_len != scan.file_len {
                file.set_len(scan.good_len)
                    .map_err(io_err(format!("cutting {name}")))?;
                file.sync_data()
                    .map_err(io_err(format!("syncing {name}")))?;
            }
            segments.push(Segment {
                name,
                first_seq,
                last_seq: first_seq.wrapping_add(scan.frames).wrapping_sub(1),
                len_bytes: scan.good_len,
            });
        }
        for name in &discard {
            dir.remove(name)
                .map_err(io_err(format!("removing {name}")))?;
        }
        if !discard.is_empty() {
            dir.sync()
                .map_err(io_err("syncing the staging directory"))?;
        }
        report.corruption = corruption.clone();
        let fresh = segments.is_empty();
        let (active, appended_seq) = match segments.last() {
            Some(last) => (
                dir.open(&last.name, false)
                    .map_err(io_err(format!("opening {}", last.name)))?,
                last.last_seq,
            ),
            None => {
                let (file, segment) = create_segment(dir.as_ref(), &header, header.first_seq)?;
                segments.push(segment);
                (file, header.first_seq.wrapping_sub(1))
            }
        };
        let mut log = Self {
            dir: dir.clone(),
            config,
            shared: Arc::new(Shared {
                segments: Mutex::new(Vec::new()),
                durable_seq: AtomicU64::new(appended_seq),
                generation: AtomicU64::new(0),
                applied_seq: AtomicU64::new(0),
                handoff: Arc::default(),
                wakes: Mutex::new(0),
                wake: Condvar::new(),
            }),
            unsynced: if fresh {
                vec![active.clone()]
            } else {
                Vec::new()
            },
            dir_dirty: fresh,
            active,
            batch: Vec::new(),
            appended_seq,
            used_bytes: segments.iter().map(|s| s.len_bytes).sum(),
            full_since: None,
            resync_reason,
            failed: false,
            header,
        };
        *log.shared.segments() = segments;
        if fresh {
            log.commit()?;
        }
        if let Some(reason) = corruption {
            log.require_resync(&reason)?;
        }
        Ok((log, report))
    }
}

/// Creates a segment file holding only its stream header (not yet durable).
pub(super) fn create_segment(
    dir: &dyn DurableDir,
    header: &StreamHeader,
    first_seq: u64,
) -> Result<(Arc<dyn DurableFile>, Segment), StagingError> {
    let name = segment_name(first_seq);
    let file = dir
        .open(&name, true)
        .map_err(io_err(format!("creating {name}")))?;
    let mut header = header.clone();
    header.first_seq = first_seq;
    let mut bytes = Vec::with_capacity(header.encoded_len_bytes());
    header.encode_into(&mut bytes);
    file.set_len(0)
        .map_err(io_err(format!("creating {name}")))?;
    file.write_all_at(0, &bytes)
        .map_err(io_err(format!("writing {name}")))?;
    let segment = Segment {
        name,
        first_seq,
        last_seq: first_seq.wrapping_sub(1),
        len_bytes: bytes.len() as u64,
    };
    Ok((file, segment))
}

pub(super) struct SegmentScan {
    frames: u64,
    good_len: u64,
    file_len: u64,
    defect: Option<String>,
    header_torn: bool,
}

pub(super) fn scan_segment(
    file: &dyn DurableFile,
    name: &str,
    header: &StreamHeader,
    first_seq: u64,
) -> Result<SegmentScan, StagingError> {
    let file_len = file.len_bytes().map_err(io_err(format!("sizing {name}")))?;
    let reader = FileReader {
        file,
        offset_bytes: 0,
        len_bytes: file_len,
    };
    let mut decoder = match DeltaDecoder::new(io::BufReader::with_capacity(1 << 20, reader)) {
        Ok(decoder) => decoder,
        Err(e) => {
            return Ok(SegmentScan {
                frames: 0,
                good_len: 0,
                file_len,
                defect: Some(e.to_string()),
                header_torn: true,
            });
        }
    };
    let stored = decoder.header();
    if stored.item_id != header.item_id
        || stored.disks != header.disks
        || stored.first_seq != first_seq
    {
        return Err(StagingError::WrongItem {
            segment: name.to_owned(),
        });
    }
    let mut frames = 0;
    let mut good_len = decoder.offset_bytes();
    let defect = loop {
        match decoder.next_frame() {
            Ok(Some(_)) => {
                frames += 1;
                good_len = decoder.offset_bytes();
            }
            Ok(None) => break None,
            // End of the bytes exactly at a frame boundary is the normal end of a segment.
            Err(e)
                if matches!(
                    e.reason,
                    DecodeErrorReason::Truncated {
                        available_bytes: 0,
                        ..
                    }
                ) =>
            {
                break None;
            }
            Err(e) => break Some(e.to_string()),
        }
    };
    Ok(SegmentScan {
        frames,
        good_len,
        file_len,
        defect,
        header_torn: false,
    })
}
