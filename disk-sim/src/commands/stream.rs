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
    /// Where to write the source VM's disks (the oracle): `disk-<i>.img` as they are at the
    /// end of the stream, and `disk-<i>.app.img` at the last app-consistent bookmark.
    pub source_out: Option<std::path::PathBuf>,
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
    /// Sequence number of the last app-consistent bookmark (its recovery point id).
    pub last_app_point: Option<u64>,
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
    // The source disks, kept only when the oracle images are wanted.
    let mut model: Vec<Vec<u8>> = match &spec.source_out {
        Some(_) => header
            .disks
            .iter()
            .map(|d| vec![0u8; d.size_bytes as usize])
            .collect(),
        None => Vec::new(),
    };
    let mut app_model: Option<Vec<Vec<u8>>> = None;
    for _ in 0..spec.frames {
        match workload.next_op(&mut data) {
            Op::Write {
                disk_index,
                offset_bytes,
                ..
            } => {
                encoder.write(disk_index, offset_bytes, &data)?;
                if let Some(disk) = model.get_mut(usize::from(disk_index)) {
                    let at = offset_bytes as usize;
                    disk[at..at + data.len()].copy_from_slice(&data);
                }
                summary.writes += 1;
                summary.data_bytes += data.len() as u64;
            }
            Op::ZeroRange {
                disk_index,
                offset_bytes,
                length_bytes,
            } => {
                encoder.zero_range(disk_index, offset_bytes, length_bytes)?;
                if let Some(disk) = model.get_mut(usize::from(disk_index)) {
                    let at = offset_bytes as usize;
                    disk[at..at + length_bytes as usize].fill(0);
                }
                summary.zero_ranges += 1;
            }
            Op::Bookmark {
                consistency,
                bookmark_id,
            } => {
                let label = format!("{}-{bookmark_id}", consistency.name());
                let seq = encoder.bookmark(
                    consistency,
                    bookmark_id,
                    bookmark_id * 1_000_000_000,
                    &label,
                )?;
                if consistency == engine::delta::Consistency::App {
                    summary.last_app_point = Some(seq);
                    if !model.is_empty() {
                        app_model = Some(model.clone());
                    }
                }
                summary.bookmarks += 1;
            }
        }
    }
    let before_end = encoder.bytes_written();
    let mut out = encoder.finish()?;
    out.flush()?;
    summary.stream_bytes = before_end + engine::delta::FRAME_HEADER_BYTES as u64;
    if let Some(dir) = &spec.source_out {
        std::fs::create_dir_all(dir)?;
        for (index, disk) in model.iter().enumerate() {
            write_sparse(&dir.join(format!("disk-{index}.img")), disk)?;
            if let Some(app) = &app_model {
                write_sparse(&dir.join(format!("disk-{index}.app.img")), &app[index])?;
            }
        }
    }
    Ok(summary)
}

/// Writes an image, leaving 64 KiB runs of zeros as holes.
fn write_sparse(path: &std::path::Path, content: &[u8]) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::create(path)?;
    file.set_len(content.len() as u64)?;
    for (index, chunk) in content.chunks(64 << 10).enumerate() {
        if chunk.iter().any(|&b| b != 0) {
            file.write_all_at(chunk, (index * (64 << 10)) as u64)?;
        }
    }
    file.sync_all()?;
    Ok(())
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
            source_out: None,
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
