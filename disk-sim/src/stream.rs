//! Writes a seeded workload as a delta stream, through the engine's one encoder.

use std::io::Write;

use engine::delta::{DeltaEncoder, DiskGeometry, EncoderOptions, StreamHeader};

use crate::workload::{Op, Workload, WorkloadSpec};

/// What `disk-sim stream` writes.
#[derive(Debug, Clone)]
pub struct StreamSpec {
    /// Workload seed.
    pub seed: u64,
    /// Number of disks of the item.
    pub disks: u16,
    /// Size of each disk, MiB.
    pub size_mib: u64,
    /// Number of frames before the end frame.
    pub frames: u64,
    /// zstd level, or `None` for raw payloads.
    pub zstd_level: Option<i32>,
}

/// Counts of what was written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamSummary {
    /// Write frames.
    pub writes: u64,
    /// Zero-range frames.
    pub zero_ranges: u64,
    /// Bookmark frames.
    pub bookmarks: u64,
    /// Data bytes carried by writes (before compression).
    pub data_bytes: u64,
    /// Bytes of the stream, header and end frame included.
    pub stream_bytes: u64,
}

/// The stream header for `spec`: disk 0 has 4096-byte blocks, the others alternate 512/4096.
pub fn header_for(spec: &StreamSpec) -> StreamHeader {
    let disks = (0..spec.disks)
        .map(|index| DiskGeometry {
            size_bytes: spec.size_mib * 1024 * 1024,
            block_size_bytes: if index % 2 == 0 { 4096 } else { 512 },
        })
        .collect();
    let mut item_id = [0u8; 16];
    item_id[..8].copy_from_slice(&spec.seed.to_le_bytes());
    item_id[8..].copy_from_slice(b"disk-sim");
    StreamHeader {
        item_id,
        item_name: format!("sim-vm-seed-{}", spec.seed),
        first_seq: 1,
        disks,
    }
}

/// Writes `spec.frames` frames of a seeded workload and an end frame to `out`.
pub fn write_stream(spec: &StreamSpec, out: impl Write) -> anyhow::Result<StreamSummary> {
    let header = header_for(spec);
    let mut encoder = DeltaEncoder::new(
        out,
        &header,
        EncoderOptions {
            zstd_level: spec.zstd_level,
        },
    )?;
    let mut workload = Workload::new(spec.seed, WorkloadSpec::default(), header.disks.clone());
    let mut summary = StreamSummary::default();
    let mut data = Vec::new();
    for _ in 0..spec.frames {
        match workload.next_op(&mut data) {
            Op::Write {
                disk_index,
                offset_bytes,
                ..
            } => {
                encoder.write(disk_index, offset_bytes, &data)?;
                summary.writes += 1;
                summary.data_bytes += data.len() as u64;
            }
            Op::ZeroRange {
                disk_index,
                offset_bytes,
                length_bytes,
            } => {
                encoder.zero_range(disk_index, offset_bytes, length_bytes)?;
                summary.zero_ranges += 1;
            }
            Op::Bookmark {
                consistency,
                bookmark_id,
            } => {
                let label = format!("{}-{bookmark_id}", consistency.name());
                encoder.bookmark(
                    consistency,
                    bookmark_id,
                    bookmark_id * 1_000_000_000,
                    &label,
                )?;
                summary.bookmarks += 1;
            }
        }
    }
    let before_end = encoder.bytes_written();
    let mut out = encoder.finish()?;
    out.flush()?;
    summary.stream_bytes = before_end + engine::delta::FRAME_HEADER_BYTES as u64;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine::delta::{DeltaDecoder, FrameBody, PayloadDecoder};

    #[test]
    fn stream_written_from_workload_decodes_with_counts() {
        let spec = StreamSpec {
            seed: 5,
            disks: 3,
            size_mib: 4,
            frames: 300,
            zstd_level: Some(1),
        };
        let mut bytes = Vec::new();
        let summary = write_stream(&spec, &mut bytes).unwrap();
        assert_eq!(summary.stream_bytes, bytes.len() as u64);
        assert_eq!(
            summary.writes + summary.zero_ranges + summary.bookmarks,
            300
        );
        let mut decoder = DeltaDecoder::new(bytes.as_slice()).unwrap();
        let mut payloads = PayloadDecoder::new().unwrap();
        let mut out = vec![0u8; engine::delta::MAX_PAYLOAD_BYTES as usize];
        let (mut writes, mut frames) = (0, 0);
        while let Some(frame) = decoder.next_frame().unwrap() {
            frames += 1;
            if let FrameBody::Write(extent) = &frame.body {
                payloads.decode_into(extent, &mut out).unwrap();
                writes += 1;
            }
        }
        assert_eq!(frames, 301);
        assert_eq!(writes, summary.writes);
    }
}
