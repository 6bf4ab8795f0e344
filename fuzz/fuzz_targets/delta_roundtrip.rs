//! Fuzz input → stream header and operations → `DeltaEncoder` → `DeltaDecoder` → same frames.
//!
//! The operations are not pre-cleaned: extents may be misaligned, empty, past the end or on a
//! disk that does not exist, and labels may be too long. A small model independent of the
//! codec decides which operations are legal; the encoder must accept exactly those and refuse
//! the rest, and the decoder must return exactly the accepted ones, in order, with the same
//! data, then the end frame, then `Ok(None)`.

#![no_main]

use arbitrary::Arbitrary;
use engine::delta::{
    Bookmark, Consistency, DataExtent, DeltaDecoder, DeltaEncoder, DiskGeometry, EncodeError,
    EncoderOptions, FrameBody, MAX_LABEL_BYTES, PayloadDecoder, StreamHeader,
};
use libfuzzer_sys::fuzz_target;

/// Upper bound of one fuzzed write, to keep executions fast.
const MAX_FUZZ_WRITE_BYTES: usize = 64 * 1024;

#[derive(Debug, Arbitrary)]
struct Input {
    compress: bool,
    item_id: [u8; 16],
    item_name: String,
    first_seq: u64,
    disks: Vec<DiskSpec>,
    ops: Vec<Op>,
}

#[derive(Debug, Arbitrary)]
struct DiskSpec {
    block_4k: bool,
    /// Size in blocks, minus one.
    blocks: u16,
}

#[derive(Debug, Arbitrary)]
enum Op {
    Write {
        disk: u16,
        offset: u32,
        data: Data,
    },
    Resync {
        disk: u16,
        offset: u32,
        data: Data,
    },
    Zero {
        disk: u16,
        offset: u32,
        length: u32,
    },
    Bookmark {
        app: bool,
        id: u64,
        timestamp_ns: u64,
        label: String,
    },
}

#[derive(Debug, Arbitrary)]
enum Data {
    /// A byte repeated (compressible).
    Fill { byte: u8, length: u16 },
    /// A short pattern repeated (compressible).
    Pattern { pattern: Vec<u8>, length: u16 },
    /// Pseudo-random bytes from a seed (incompressible).
    Noise { seed: u64, length: u16 },
}

impl Data {
    fn bytes(&self) -> Vec<u8> {
        // Lengths are scaled by 512 so that many of them are block-aligned.
        let scaled = |length: u16| (usize::from(length) * 512 / 64).min(MAX_FUZZ_WRITE_BYTES);
        match self {
            Self::Fill { byte, length } => vec![*byte; scaled(*length)],
            Self::Pattern { pattern, length } => {
                if pattern.is_empty() {
                    vec![0; scaled(*length)]
                } else {
                    pattern
                        .iter()
                        .copied()
                        .cycle()
                        .take(scaled(*length))
                        .collect()
                }
            }
            Self::Noise { seed, length } => {
                let mut state = *seed | 1;
                (0..scaled(*length))
                    .map(|_| {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        state.to_le_bytes()[0]
                    })
                    .collect()
            }
        }
    }
}

/// What the decoder must return, owned.
#[derive(Debug, PartialEq, Eq)]
enum Expected {
    Write {
        disk: u16,
        offset: u64,
        data: Vec<u8>,
    },
    Resync {
        disk: u16,
        offset: u64,
        data: Vec<u8>,
    },
    Zero {
        disk: u16,
        offset: u64,
        length: u64,
    },
    Bookmark(Bookmark),
    End,
}

/// The model's verdict on an extent, independent of `DiskGeometry::check_extent`.
fn extent_is_legal(disks: &[DiskGeometry], disk: u16, offset: u64, length: u64) -> bool {
    let Some(geometry) = disks.get(usize::from(disk)) else {
        return false;
    };
    let block = u64::from(geometry.block_size_bytes);
    length > 0
        && offset.is_multiple_of(block)
        && length.is_multiple_of(block)
        && offset + length <= geometry.size_bytes
}

fuzz_target!(|input: Input| {
    let disks: Vec<DiskGeometry> = input
        .disks
        .iter()
        .take(4)
        .map(|spec| {
            let block_size_bytes = if spec.block_4k { 4096 } else { 512 };
            DiskGeometry {
                size_bytes: (u64::from(spec.blocks) + 1) * u64::from(block_size_bytes),
                block_size_bytes,
            }
        })
        .collect();
    let mut item_name = input.item_name.clone();
    while item_name.len() > engine::delta::MAX_ITEM_NAME_BYTES {
        item_name.pop();
    }
    let header = StreamHeader {
        item_id: input.item_id,
        item_name,
        first_seq: input.first_seq >> 1,
        disks: disks.clone(),
    };
    let options = EncoderOptions {
        zstd_level: input.compress.then_some(1),
    };
    let mut encoder = match DeltaEncoder::new(Vec::new(), &header, options) {
        Ok(encoder) => encoder,
        Err(EncodeError::Header(_)) => {
            assert!(disks.is_empty(), "a legal header was refused");
            return;
        }
        Err(other) => panic!("unexpected header error: {other}"),
    };
    assert!(!disks.is_empty(), "a header without disks was accepted");

    let mut expected = Vec::new();
    for op in input.ops.iter().take(64) {
        let (result, legal, frame) = match op {
            Op::Write { disk, offset, data } | Op::Resync { disk, offset, data } => {
                let bytes = data.bytes();
                let offset = u64::from(*offset) * 512;
                let legal = extent_is_legal(&disks, *disk, offset, bytes.len() as u64);
                let (result, frame) = if matches!(op, Op::Write { .. }) {
                    let result = encoder.write(*disk, offset, &bytes);
                    (
                        result,
                        Expected::Write {
                            disk: *disk,
                            offset,
                            data: bytes,
                        },
                    )
                } else {
                    let result = encoder.resync_block(*disk, offset, &bytes);
                    (
                        result,
                        Expected::Resync {
                            disk: *disk,
                            offset,
                            data: bytes,
                        },
                    )
                };
                (result, legal, frame)
            }
            Op::Zero {
                disk,
                offset,
                length,
            } => {
                let offset = u64::from(*offset) * 512;
                let length = u64::from(*length);
                let legal = extent_is_legal(&disks, *disk, offset, length);
                let result = encoder.zero_range(*disk, offset, length);
                (
                    result,
                    legal,
                    Expected::Zero {
                        disk: *disk,
                        offset,
                        length,
                    },
                )
            }
            Op::Bookmark {
                app,
                id,
                timestamp_ns,
                label,
            } => {
                let consistency = if *app {
                    Consistency::App
                } else {
                    Consistency::Crash
                };
                let legal = label.len() <= MAX_LABEL_BYTES;
                let result = encoder.bookmark(consistency, *id, *timestamp_ns, label);
                let frame = Expected::Bookmark(Bookmark {
                    consistency,
                    bookmark_id: *id,
                    source_timestamp_ns: *timestamp_ns,
                    label: label.clone(),
                });
                (result, legal, frame)
            }
        };
        match result {
            Ok(seq) => {
                assert!(legal, "encoder accepted an illegal {frame:?}");
                assert_eq!(seq, header.first_seq + expected.len() as u64);
                expected.push(frame);
            }
            Err(error) => assert!(!legal, "encoder refused a legal {frame:?}: {error}"),
        }
    }
    expected.push(Expected::End);
    let stream = encoder.finish().expect("finish into a Vec");

    let mut decoder = DeltaDecoder::new(stream.as_slice()).expect("own header decodes");
    assert_eq!(decoder.header(), &header);
    let mut payload = PayloadDecoder::new().expect("zstd context");
    let mut out = vec![0u8; MAX_FUZZ_WRITE_BYTES];
    let mut rebuilt = Vec::with_capacity(stream.len());
    header.encode_into(&mut rebuilt);
    for (index, want) in expected.iter().enumerate() {
        let frame = decoder
            .next_frame()
            .unwrap_or_else(|e| panic!("own stream fails at frame {index}: {e}"))
            .unwrap_or_else(|| panic!("own stream ends before frame {index}"));
        assert_eq!(frame.index, index as u64);
        assert_eq!(frame.seq, header.first_seq + index as u64);
        rebuilt.extend_from_slice(frame.wire_bytes);
        let mut data = |extent: &DataExtent<'_>| {
            payload
                .decode_into(extent, &mut out)
                .expect("own payload decodes");
            out[..extent.length_bytes as usize].to_vec()
        };
        let got = match &frame.body {
            FrameBody::Write(extent) => Expected::Write {
                disk: extent.disk_index,
                offset: extent.offset_bytes,
                data: data(extent),
            },
            FrameBody::ResyncBlock(extent) => Expected::Resync {
                disk: extent.disk_index,
                offset: extent.offset_bytes,
                data: data(extent),
            },
            FrameBody::ZeroRange {
                disk_index,
                offset_bytes,
                length_bytes,
            } => Expected::Zero {
                disk: *disk_index,
                offset: *offset_bytes,
                length: *length_bytes,
            },
            FrameBody::Bookmark(bookmark) => Expected::Bookmark(bookmark.clone()),
            FrameBody::End => Expected::End,
        };
        assert_eq!(&got, want, "frame {index} differs");
    }
    assert!(decoder.next_frame().expect("nothing after end").is_none());
    assert_eq!(rebuilt, stream, "wire bytes do not rebuild the stream");
});
