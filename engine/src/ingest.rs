//! Ingest: one delta stream from a source agent into an item's staging log.
//!
//! ```text
//!  Read (TCP socket / file) ─► BufReader ─► DeltaDecoder (every frame checked)
//!        ─► frames already staged (seq < next_seq): skipped (a resend after reconnect)
//!        ─► PayloadCheck: a zstd payload is decompressed into a buffer lent by the log's
//!           payload handoff (crate::handoff) or, when it has none free, into one scratch
//!           buffer per stream (≤ MAX_PAYLOAD_BYTES); it must give exactly the declared length
//!        ─► StagingLog::append(wire bytes) ... commit() when the input has nothing buffered,
//!           `group_max_frames` are pending, or apply caught up with the handoff and the
//!           pending frames hold half its budget ─► publish the committed frames' decompressed
//!           payloads to apply ─► on_ack(durable seq)
//! ```
//!
//! A stream may end with an end frame or simply stop between two frames (the agent
//! disconnected); it resumes on a new stream. A stream cut inside a frame is an error.
//!
//! Invariants: a frame is acknowledged only after [`StagingLog::commit`] returned, and staged
//! only after everything apply needs of it was checked (the decoder's checks, and for a zstd
//! payload its decompression to exactly the declared length: the same
//! [`PayloadDecoder::decode_into`] apply runs); the first bad frame ends the stream with the
//! decoder's error (frame index, byte offset, reason) after committing and acknowledging the
//! valid frames before it, and nothing of the bad frame is stored. A stream for another item or disk layout, or one that starts past the next
//! expected sequence number (frames missing), is refused before anything is staged.

use std::io::{BufReader, Read};
use std::sync::Arc;
use std::time::Instant;

use crate::delta::{
    DataExtent, DecodeError, DecodeErrorReason, DeltaDecoder, Encoding, FrameBody,
    MAX_PAYLOAD_BYTES, PayloadDecoder,
};
use crate::handoff::{LentBuffer, PayloadHandoff, PayloadKey};
use crate::staging::{Pressure, StagingError, StagingLog};

/// Checks that a data payload decodes as apply will decode it, without keeping the result:
/// one zstd context and one scratch buffer, created at the first zstd payload, grown to the
/// largest extent seen (at most [`MAX_PAYLOAD_BYTES`]) and reused for every later frame.
#[derive(Debug)]
pub struct PayloadCheck {
    payloads: Option<PayloadDecoder>,
    scratch: Vec<u8>,
}

impl Default for PayloadCheck {
    fn default() -> Self {
        Self::new()
    }
}

impl PayloadCheck {
    /// A check with nothing allocated yet.
    pub fn new() -> Self {
        Self {
            payloads: None,
            scratch: Vec::new(),
        }
    }

    /// Checks a decoded frame's body: a zstd data payload must decompress to exactly its
    /// declared length (raw payloads and the other kinds were fully checked by the decoder).
    pub fn check(&mut self, body: &FrameBody<'_>) -> Result<(), DecodeErrorReason> {
        self.check_into(body, None).map(|_| ())
    }

    /// [`PayloadCheck::check`], decompressing a zstd payload into a buffer lent by `handoff`
    /// when it has one (returned, to publish once the frame is durable), else into the scratch
    /// buffer.
    pub fn check_into(
        &mut self,
        body: &FrameBody<'_>,
        handoff: Option<&Arc<PayloadHandoff>>,
    ) -> Result<Option<LentBuffer>, DecodeErrorReason> {
        match body {
            FrameBody::Write(extent) | FrameBody::ResyncBlock(extent) => {
                self.check_extent(extent, handoff)
            }
            FrameBody::ZeroRange { .. } | FrameBody::Bookmark(_) | FrameBody::End => Ok(None),
        }
    }

    fn check_extent(
        &mut self,
        extent: &DataExtent<'_>,
        handoff: Option<&Arc<PayloadHandoff>>,
    ) -> Result<Option<LentBuffer>, DecodeErrorReason> {
        if extent.encoding == Encoding::Raw {
            return Ok(None);
        }
        let payloads = match &mut self.payloads {
            Some(payloads) => payloads,
            None => self.payloads.insert(PayloadDecoder::new().map_err(|e| {
                DecodeErrorReason::Decompress {
                    message: format!("creating the zstd context: {e}"),
                }
            })?),
        };
        let length = extent.length_bytes as usize;
        if let Some(mut lent) = handoff.and_then(|handoff| handoff.lend(length)) {
            payloads.decode_into(extent, lent.as_mut_slice())?;
            return Ok(Some(lent));
        }
        // Grown to the largest extent seen (≤ MAX_PAYLOAD_BYTES, checked by the decoder), so
        // a stream of 64 KiB writes holds 64 KiB, and no frame after the largest allocates.
        if self.scratch.len() < length {
            self.scratch
                .resize(length.min(MAX_PAYLOAD_BYTES as usize), 0);
        }
        payloads.decode_into(extent, &mut self.scratch)?;
        Ok(None)
    }
}

/// Why a stream was refused or ended early.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IngestError {
    /// The bytes are not a valid stream (or the reader failed).
    #[error(transparent)]
    Decode(#[from] Box<DecodeError>),
    /// The stream is for another item.
    #[error("stream is for item {found}, this log stages item {expected}")]
    WrongItem {
        /// Expected item id (hex).
        expected: String,
        /// Item id of the stream (hex).
        found: String,
    },
    /// The stream's disks differ from the item's.
    #[error("stream declares disks {found}, the item has {expected}")]
    WrongDisks {
        /// The item's disks.
        expected: String,
        /// The stream's.
        found: String,
    },
    /// The stream starts after the next expected frame: frames are missing.
    #[error("stream starts at seq {first_seq}, but the next frame expected is {next_seq}")]
    Gap {
        /// The stream's first sequence number.
        first_seq: u64,
        /// The next sequence number the log expects.
        next_seq: u64,
    },
    /// Staging refused a frame (full, resync required, failed).
    #[error("frame seq {seq}")]
    Staging {
        /// Sequence number.
        seq: u64,
        /// Why.
        #[source]
        source: StagingError,
    },
}

/// What a stream brought.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IngestReport {
    /// Frames staged.
    pub frames_staged: u64,
    /// Frames skipped because they were staged already.
    pub frames_skipped: u64,
    /// Bytes staged.
    pub bytes_staged: u64,
    /// Commits (flushes) made.
    pub commits: u64,
    /// The last acknowledged sequence number.
    pub acked_seq: u64,
    /// Whether the stream ended with an end frame.
    pub ended: bool,
}

/// Ingest settings.
#[derive(Debug, Clone, Copy)]
pub struct IngestConfig {
    /// Commit at the latest after this many frames.
    pub group_max_frames: usize,
    /// Size of the read buffer.
    pub read_buffer_bytes: usize,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            group_max_frames: 256,
            read_buffer_bytes: 1 << 20,
        }
    }
}

/// Reads one stream into `log`, calling `on_ack` with each newly durable sequence number and
/// the back-pressure advice (the data port sleeps on `Pressure::Slow` before acknowledging).
pub fn ingest_stream(
    reader: impl Read,
    log: &mut StagingLog,
    config: IngestConfig,
    on_ack: &mut dyn FnMut(u64, Pressure),
) -> Result<IngestReport, IngestError> {
    let mut decoder = DeltaDecoder::new(BufReader::with_capacity(config.read_buffer_bytes, reader))
        .map_err(Box::new)?;
    let header = decoder.header().clone();
    if header.item_id != log.header().item_id {
        return Err(IngestError::WrongItem {
            expected: hex::encode(log.header().item_id),
            found: hex::encode(header.item_id),
        });
    }
    if header.disks != log.header().disks {
        return Err(IngestError::WrongDisks {
            expected: format!("{:?}", log.header().disks),
            found: format!("{:?}", header.disks),
        });
    }
    if header.first_seq > log.next_seq() {
        return Err(IngestError::Gap {
            first_seq: header.first_seq,
            next_seq: log.next_seq(),
        });
    }
    let mut report = IngestReport {
        acked_seq: log.durable_seq(),
        ..IngestReport::default()
    };
    let mut pending = 0usize;
    let mut payload_check = PayloadCheck::new();
    // Payloads decompressed into the handoff's buffers for frames appended since the last
    // commit: published to apply once durable (dropped unpublished, they return to it).
    let handoff = log.handoff();
    let mut handed: Vec<(PayloadKey, LentBuffer)> = Vec::new();
    let commit = |log: &mut StagingLog,
                  report: &mut IngestReport,
                  on_ack: &mut dyn FnMut(u64, Pressure),
                  handed: &mut Vec<(PayloadKey, LentBuffer)>,
                  seq: u64|
     -> Result<(), IngestError> {
        let acked = log
            .commit()
            .map_err(|source| IngestError::Staging { seq, source })?;
        for (key, lent) in handed.drain(..) {
            lent.publish(key);
        }
        report.commits += 1;
        report.acked_seq = acked;
        on_ack(acked, log.pressure());
        Ok(())
    };
    loop {
        let frame = match decoder.next_frame() {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            // The sender closed the connection between two frames: a disconnect, not damage.
            Err(error)
                if matches!(
                    error.reason,
                    DecodeErrorReason::Truncated {
                        available_bytes: 0,
                        ..
                    }
                ) =>
            {
                break;
            }
            Err(error) => {
                // Keep (and acknowledge) the valid frames before the bad one.
                if pending > 0 {
                    commit(log, &mut report, on_ack, &mut handed, decoder.next_seq())?;
                }
                return Err(IngestError::Decode(Box::new(error)));
            }
        };
        let seq = frame.seq;
        if matches!(frame.body, FrameBody::End) {
            report.ended = true;
            // Nothing may follow an end frame. The stream ends here, without waiting for the
            // sender to close its side; bytes that already arrived behind it are refused.
            let next_index = frame.index + 1;
            if !decoder_buffer_empty(&mut decoder) {
                if pending > 0 {
                    commit(log, &mut report, on_ack, &mut handed, seq)?;
                }
                return Err(IngestError::Decode(Box::new(DecodeError {
                    frame_index: Some(next_index),
                    offset_bytes: decoder.offset_bytes(),
                    reason: DecodeErrorReason::TrailingData,
                })));
            }
            break;
        }
        if seq < log.next_seq() {
            report.frames_skipped += 1;
            continue;
        }
        let lent = match payload_check.check_into(&frame.body, Some(&handoff)) {
            Ok(lent) => lent,
            Err(reason) => {
                let error = DecodeError {
                    frame_index: Some(frame.index),
                    offset_bytes: frame.offset_bytes,
                    reason,
                };
                if pending > 0 {
                    commit(log, &mut report, on_ack, &mut handed, seq)?;
                }
                return Err(IngestError::Decode(Box::new(error)));
            }
        };
        let wire_len = frame.wire_bytes.len() as u64;
        if let Err(source) = log.append(seq, frame.wire_bytes, Instant::now()) {
            drop(lent); // not staged: never handed off
            if pending > 0 {
                commit(log, &mut report, on_ack, &mut handed, seq)?;
            }
            return Err(IngestError::Staging { seq, source });
        }
        if let (Some(lent), FrameBody::Write(extent) | FrameBody::ResyncBlock(extent)) =
            (lent, &frame.body)
        {
            // The checksum is the frame's stored one (bytes 40..48 of its header), which the
            // staging reader verifies and reports for the same frame.
            let checksum = frame
                .wire_bytes
                .get(40..48)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_le_bytes);
            if let Some(checksum) = checksum {
                handed.push((PayloadKey::of(seq, checksum, extent), lent));
            }
        }
        report.frames_staged += 1;
        report.bytes_staged += wire_len;
        pending += 1;
        // Group commit: flush when the sender has nothing more in flight for us right now.
        let idle = decoder_buffer_empty(&mut decoder);
        // Or when apply took every payload handed off before and the frames pending hold half
        // the handoff's budget: apply waits for them, and their payloads reach it while still
        // in the handoff (not after a group of up to `group_max_frames`).
        let handed_bytes: usize = handed
            .iter()
            .map(|(key, _)| key.length_bytes as usize)
            .sum();
        let handoff_due = handed_bytes * 2 >= handoff.max_bytes() && !handoff.has_published();
        if pending >= config.group_max_frames || idle || handoff_due {
            commit(log, &mut report, on_ack, &mut handed, seq)?;
            pending = 0;
        }
    }
    if pending > 0 {
        commit(log, &mut report, on_ack, &mut handed, log.next_seq())?;
    }
    Ok(report)
}

/// Whether the read buffer under the decoder is empty (the next frame needs a read).
fn decoder_buffer_empty<R: Read>(decoder: &mut DeltaDecoder<BufReader<R>>) -> bool {
    decoder.reader_mut().buffer().is_empty()
}
