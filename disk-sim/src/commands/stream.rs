//! Writes a seeded workload as a delta stream, through the engine's one encoder; the source
//! model keeps the source disks (the oracle images of `--source-out`).

use std::io::Write;

use engine::delta::{DeltaEncoder, DiskGeometry, EncoderOptions, StreamHeader};

use crate::source::{Content, SourceModel};
use crate::workload::{Op, WorkloadSpec};

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
    // The source VM: its disks are the oracle images when they are wanted, else a
    // temporary directory's.
    let mut model = match &spec.source_out {
        Some(dir) => {
            for index in 0..header.disks.len() {
                for name in [format!("disk-{index}.img"), format!("disk-{index}.app.img")] {
                    remove_if_present(&dir.join(name))?;
                }
            }
            SourceModel::create(
                dir,
                &header.item_name,
                &header.disks,
                spec.seed,
                WorkloadSpec::default(),
                Content::Empty,
            )?
        }
        None => SourceModel::temporary(&header.disks, spec.seed, WorkloadSpec::default())?,
    };
    let mut summary = StreamSummary::default();
    for _ in 0..spec.frames {
        match model.next_op()? {
            Op::Write {
                disk_index,
                offset_bytes,
                ..
            } => {
                encoder.write(disk_index, offset_bytes, model.data())?;
                summary.writes += 1;
                summary.data_bytes += model.data().len() as u64;
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
                let seq = encoder.bookmark(
                    consistency,
                    bookmark_id,
                    bookmark_id * 1_000_000_000,
                    &label,
                )?;
                model.record_bookmark(seq, consistency)?;
                if consistency == engine::delta::Consistency::App {
                    summary.last_app_point = Some(seq);
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
        model.vm().sync()?;
        if let Some(seq) = summary.last_app_point {
            for index in 0..header.disks.len() {
                let path = dir.join(format!("disk-{index}.app.img"));
                model.oracle().write_disk_at(seq, index, &path)?;
            }
        }
        drop(model);
        // The oracle's scratch directory (its log is gone with it).
        let _ = std::fs::remove_dir(dir.join(".oracle"));
    }
    Ok(summary)
}

/// Removes a file left by an earlier run (the output images are overwritten).
fn remove_if_present(path: &std::path::Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
            Err(anyhow::Error::new(error).context(format!("removing {}", path.display())))
        }
        _ => Ok(()),
    }
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

    #[test]
    fn source_out_images_are_written_again_and_replay() {
        let dir = tempfile::tempdir().unwrap();
        let spec = StreamSpec {
            seed: 9,
            disks: 2,
            size_mib: 2,
            frames: 400,
            zstd_level: None,
            source_out: Some(dir.path().to_path_buf()),
        };
        let digests = || {
            let mut bytes = Vec::new();
            let summary = write_stream(&spec, &mut bytes).unwrap();
            assert!(summary.last_app_point.is_some());
            (0..2)
                .flat_map(|i| [format!("disk-{i}.img"), format!("disk-{i}.app.img")])
                .map(|name| {
                    let (digest, length) =
                        crate::source::file_digest(&dir.path().join(name)).unwrap();
                    assert_eq!(length, 2 << 20);
                    digest
                })
                .collect::<Vec<u64>>()
        };
        let first = digests();
        assert_eq!(
            first,
            digests(),
            "a second run overwrites with the same images"
        );
        assert!(!dir.path().join(".oracle").exists());
    }
}
