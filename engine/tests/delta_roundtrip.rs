//! Round-trip properties of the delta-stream codec: whatever legal stream the encoder writes,
//! the decoder gives back exactly, frame by frame and byte by byte.
//!
//! ```text
//! (header, ops) ──► DeltaEncoder{raw | zstd 1} ──► bytes ──► DeltaDecoder ──► frames
//!       │                                            │            │ PayloadDecoder::decode_into
//!       │                                            │            ▼ (one reused 4 MiB buffer)
//!       └──────────── expected frames ══════════════ │ ═════ decoded frames
//!                                                    └═════ header bytes ++ frame.wire_bytes
//! ```
//!
//! Each property checks: every frame's index, byte offset, sequence number, kind, disk,
//! offset, length, data and bookmark fields; that the end frame is followed by `Ok(None)`;
//! that the wire bytes rebuild the stream exactly; and which payloads were compressed (zeros
//! and short repeating patterns must be stored as zstd at level 1, random data must be stored
//! raw, and nothing is compressed when `zstd_level` is `None`).

use engine::delta::{
    Bookmark, Consistency, DataExtent, DeltaDecoder, DeltaEncoder, DiskGeometry, EncoderOptions,
    Encoding, FRAME_HEADER_BYTES, FrameBody, FrameKind, MAX_LABEL_BYTES, MAX_PAYLOAD_BYTES,
    PayloadDecoder, StreamHeader,
};
use proptest::prelude::*;
use rand_xoshiro::Xoshiro256PlusPlus;
use rand_xoshiro::rand_core::{Rng, SeedableRng};

/// Largest write the property tests generate; the 4 MiB limit has its own plain test.
const MAX_TEST_WRITE_BYTES: u64 = 256 * 1024;
/// Written over the output buffer before each payload decode, so that a decoder which leaves
/// part of the output untouched cannot pass on stale bytes from an earlier frame.
const POISON: u8 = 0xA5;

const RAW: EncoderOptions = EncoderOptions { zstd_level: None };
const ZSTD_1: EncoderOptions = EncoderOptions {
    zstd_level: Some(1),
};

/// How the bytes of a data frame are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DataKind {
    /// All zeros: must compress.
    Zeros,
    /// A random pattern of `period` bytes, repeated: must compress.
    Pattern { period: usize },
    /// Words from a small vocabulary: usually compresses.
    Text,
    /// Half zeros, half random.
    HalfZeros,
    /// Random bytes: must not compress.
    Random,
}

/// The bytes of a data frame, described compactly so that failures print small.
#[derive(Debug, Clone, Copy)]
struct DataSpec {
    kind: DataKind,
    seed: u64,
    length_bytes: usize,
}

impl DataSpec {
    fn bytes(&self) -> Vec<u8> {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(self.seed);
        let mut out = vec![0u8; self.length_bytes];
        match self.kind {
            DataKind::Zeros => {}
            DataKind::Pattern { period } => {
                let mut pattern = vec![0u8; period];
                rng.fill_bytes(&mut pattern);
                for (byte, value) in out.iter_mut().zip(pattern.iter().cycle()) {
                    *byte = *value;
                }
            }
            DataKind::Text => {
                const WORDS: [&[u8]; 8] = [
                    b"replica ",
                    b"disk ",
                    b"block ",
                    b"write ",
                    b"the ",
                    b"recovery ",
                    b"point ",
                    b"journal\n",
                ];
                let mut at = 0;
                while at < out.len() {
                    let word = WORDS[(rng.next_u64() % WORDS.len() as u64) as usize];
                    let n = word.len().min(out.len() - at);
                    out[at..at + n].copy_from_slice(&word[..n]);
                    at += n;
                }
            }
            DataKind::HalfZeros => {
                let half = out.len() / 2;
                rng.fill_bytes(&mut out[half..]);
            }
            DataKind::Random => rng.fill_bytes(&mut out),
        }
        out
    }

    /// The encoding zstd level 1 must choose, where the data leaves no doubt.
    fn required_zstd_encoding(&self) -> Option<Encoding> {
        match self.kind {
            DataKind::Zeros | DataKind::Pattern { .. } => Some(Encoding::Zstd),
            DataKind::Random => Some(Encoding::Raw),
            DataKind::Text | DataKind::HalfZeros => None,
        }
    }
}

/// One operation given to the encoder.
#[derive(Debug, Clone)]
enum Op {
    Write {
        disk: u16,
        offset_bytes: u64,
        data: DataSpec,
    },
    Zero {
        disk: u16,
        offset_bytes: u64,
        length_bytes: u64,
    },
    Bookmark(Bookmark),
    Resync {
        disk: u16,
        offset_bytes: u64,
        data: DataSpec,
    },
}

/// Data bytes that print as their length and first bytes, not as a megabyte of numbers.
#[derive(Clone, PartialEq, Eq)]
struct Bytes(Vec<u8>);

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let head = &self.0[..self.0.len().min(16)];
        write!(f, "{} bytes starting {head:02x?}", self.0.len())
    }
}

/// A frame as the test expects it, or as it was decoded, owning its data.
#[derive(Debug, Clone, PartialEq, Eq)]
enum OwnedFrame {
    Write {
        disk: u16,
        offset_bytes: u64,
        data: Bytes,
    },
    Zero {
        disk: u16,
        offset_bytes: u64,
        length_bytes: u64,
    },
    Bookmark(Bookmark),
    Resync {
        disk: u16,
        offset_bytes: u64,
        data: Bytes,
    },
    End,
}

impl OwnedFrame {
    fn kind(&self) -> FrameKind {
        match self {
            Self::Write { .. } => FrameKind::Write,
            Self::Zero { .. } => FrameKind::ZeroRange,
            Self::Bookmark(_) => FrameKind::Bookmark,
            Self::Resync { .. } => FrameKind::ResyncBlock,
            Self::End => FrameKind::End,
        }
    }
}

/// What one decoded frame said, plus how its payload was stored.
#[derive(Debug)]
struct Decoded {
    seq: u64,
    frame: OwnedFrame,
    encoding: Option<Encoding>,
}

/// Encodes `ops` and the end frame; returns the stream and the frames the decoder must yield.
fn encode(
    header: &StreamHeader,
    ops: &[Op],
    options: EncoderOptions,
) -> (Vec<u8>, Vec<OwnedFrame>) {
    let mut encoder = DeltaEncoder::new(Vec::new(), header, options).expect("legal header");
    let mut expected = Vec::with_capacity(ops.len() + 1);
    for (index, op) in ops.iter().enumerate() {
        let seq = encoder.next_seq();
        let (result, frame) = match op {
            Op::Write {
                disk,
                offset_bytes,
                data,
            } => {
                let bytes = data.bytes();
                let result = encoder.write(*disk, *offset_bytes, &bytes);
                let frame = OwnedFrame::Write {
                    disk: *disk,
                    offset_bytes: *offset_bytes,
                    data: Bytes(bytes),
                };
                (result, frame)
            }
            Op::Zero {
                disk,
                offset_bytes,
                length_bytes,
            } => {
                let result = encoder.zero_range(*disk, *offset_bytes, *length_bytes);
                let frame = OwnedFrame::Zero {
                    disk: *disk,
                    offset_bytes: *offset_bytes,
                    length_bytes: *length_bytes,
                };
                (result, frame)
            }
            Op::Bookmark(bookmark) => {
                let result = encoder.bookmark(
                    bookmark.consistency,
                    bookmark.bookmark_id,
                    bookmark.source_timestamp_ns,
                    &bookmark.label,
                );
                (result, OwnedFrame::Bookmark(bookmark.clone()))
            }
            Op::Resync {
                disk,
                offset_bytes,
                data,
            } => {
                let bytes = data.bytes();
                let result = encoder.resync_block(*disk, *offset_bytes, &bytes);
                let frame = OwnedFrame::Resync {
                    disk: *disk,
                    offset_bytes: *offset_bytes,
                    data: Bytes(bytes),
                };
                (result, frame)
            }
        };
        let returned_seq = result.unwrap_or_else(|e| panic!("op {index} ({op:?}) refused: {e}"));
        assert_eq!(returned_seq, seq, "op {index}: returned sequence number");
        assert_eq!(returned_seq, header.first_seq + index as u64);
        expected.push(frame);
    }
    expected.push(OwnedFrame::End);
    let before_end = encoder.bytes_written();
    let stream = encoder.finish().expect("finish into a Vec");
    assert_eq!(stream.len() as u64, before_end + FRAME_HEADER_BYTES as u64);
    (stream, expected)
}

/// Decodes a whole stream, checking the framing invariants on the way.
///
/// `out` is the one output buffer every payload is decoded into.
fn decode(stream: &[u8], header: &StreamHeader, out: &mut [u8]) -> Vec<Decoded> {
    let mut decoder = DeltaDecoder::new(stream).expect("own stream header decodes");
    assert_eq!(decoder.header(), header);
    let mut payload_decoder = PayloadDecoder::new().expect("zstd context");
    let mut rebuilt = Vec::with_capacity(stream.len());
    header.encode_into(&mut rebuilt);
    assert_eq!(decoder.offset_bytes(), rebuilt.len() as u64);
    let mut decoded = Vec::new();
    loop {
        let index = decoded.len() as u64;
        let Some(frame) = decoder
            .next_frame()
            .unwrap_or_else(|e| panic!("own stream fails to decode: {e}"))
        else {
            break;
        };
        assert_eq!(frame.index, index);
        assert_eq!(
            frame.offset_bytes,
            rebuilt.len() as u64,
            "frame {index} offset"
        );
        assert_eq!(frame.seq, header.first_seq + index);
        rebuilt.extend_from_slice(frame.wire_bytes);
        let kind = frame.kind();
        let mut data = |extent: &DataExtent<'_>| {
            let length = extent.length_bytes as usize;
            out[..length].fill(POISON);
            payload_decoder
                .decode_into(extent, out)
                .unwrap_or_else(|e| panic!("frame {index} payload: {e}"));
            Bytes(out[..length].to_vec())
        };
        let (owned, encoding) = match &frame.body {
            FrameBody::Write(extent) => (
                OwnedFrame::Write {
                    disk: extent.disk_index,
                    offset_bytes: extent.offset_bytes,
                    data: data(extent),
                },
                Some(extent.encoding),
            ),
            FrameBody::ZeroRange {
                disk_index,
                offset_bytes,
                length_bytes,
            } => (
                OwnedFrame::Zero {
                    disk: *disk_index,
                    offset_bytes: *offset_bytes,
                    length_bytes: *length_bytes,
                },
                None,
            ),
            FrameBody::Bookmark(bookmark) => (OwnedFrame::Bookmark(bookmark.clone()), None),
            FrameBody::ResyncBlock(extent) => (
                OwnedFrame::Resync {
                    disk: extent.disk_index,
                    offset_bytes: extent.offset_bytes,
                    data: data(extent),
                },
                Some(extent.encoding),
            ),
            FrameBody::End => (OwnedFrame::End, None),
        };
        assert_eq!(owned.kind(), kind, "frame {index}: Frame::kind");
        decoded.push(Decoded {
            seq: frame.seq,
            frame: owned,
            encoding,
        });
        assert_eq!(decoder.ended(), kind == FrameKind::End);
    }
    assert!(decoder.ended(), "Ok(None) before the end frame");
    assert!(
        decoder
            .next_frame()
            .expect("still nothing after end")
            .is_none(),
        "Ok(None) is not sticky"
    );
    assert_eq!(decoder.offset_bytes(), stream.len() as u64);
    assert!(
        rebuilt == stream,
        "header ++ wire_bytes differs from the encoded stream"
    );
    decoded
}

/// Encodes with `options`, decodes, compares; returns the encodings of the data frames.
fn roundtrip(
    header: &StreamHeader,
    ops: &[Op],
    options: EncoderOptions,
    out: &mut [u8],
) -> Vec<Option<Encoding>> {
    let (stream, expected) = encode(header, ops, options);
    let decoded = decode(&stream, header, out);
    assert_eq!(decoded.len(), expected.len(), "frame count");
    for (index, (got, want)) in decoded.iter().zip(&expected).enumerate() {
        assert_eq!(got.seq, header.first_seq + index as u64);
        assert_eq!(&got.frame, want, "frame {index} with {options:?}");
    }
    decoded.iter().map(|d| d.encoding).collect()
}

/// Runs both encoder settings and checks which payloads each one compressed.
fn roundtrip_raw_and_zstd(header: &StreamHeader, ops: &[Op]) {
    let mut out = vec![0u8; MAX_PAYLOAD_BYTES as usize];
    let raw = roundtrip(header, ops, RAW, &mut out);
    let zstd = roundtrip(header, ops, ZSTD_1, &mut out);
    for (index, op) in ops.iter().enumerate() {
        let spec = match op {
            Op::Write { data, .. } | Op::Resync { data, .. } => data,
            Op::Zero { .. } | Op::Bookmark(_) => {
                assert_eq!((raw[index], zstd[index]), (None, None));
                continue;
            }
        };
        assert_eq!(raw[index], Some(Encoding::Raw), "op {index} without zstd");
        if let Some(required) = spec.required_zstd_encoding() {
            assert_eq!(
                zstd[index],
                Some(required),
                "op {index} ({spec:?}) with zstd 1"
            );
        }
    }
}

fn disk_strategy() -> impl Strategy<Value = DiskGeometry> {
    prop_oneof![Just(512u32), Just(4096u32)].prop_flat_map(|block_size_bytes| {
        // 1 to 6 MiB, in whole blocks (512-byte disks need not be 4 KiB multiples).
        let min_blocks = (1 << 20) / u64::from(block_size_bytes);
        (min_blocks..=6 * min_blocks).prop_map(move |blocks| DiskGeometry {
            size_bytes: blocks * u64::from(block_size_bytes),
            block_size_bytes,
        })
    })
}

/// Up to `max_bytes` of UTF-8, cut at a character boundary.
fn utf8_strategy(max_chars: usize, max_bytes: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!("\\PC{{0,{max_chars}}}"))
        .expect("valid regex")
        .prop_map(move |mut text| {
            while text.len() > max_bytes {
                text.pop();
            }
            text
        })
}

fn header_strategy() -> impl Strategy<Value = StreamHeader> {
    (
        any::<[u8; 16]>(),
        utf8_strategy(96, 255),
        0..(1u64 << 63),
        proptest::collection::vec(disk_strategy(), 1..=4),
    )
        .prop_map(|(item_id, item_name, first_seq, disks)| StreamHeader {
            item_id,
            item_name,
            first_seq,
            disks,
        })
}

fn data_kind_strategy() -> impl Strategy<Value = DataKind> {
    prop_oneof![
        Just(DataKind::Zeros),
        (1usize..=64).prop_map(|period| DataKind::Pattern { period }),
        Just(DataKind::Text),
        Just(DataKind::HalfZeros),
        Just(DataKind::Random),
    ]
}

/// An aligned, in-range extent on one of `disks`, of at most `max_bytes`.
fn extent_strategy(
    disks: Vec<DiskGeometry>,
    max_bytes: u64,
) -> impl Strategy<Value = (u16, u64, u64)> {
    (0..disks.len()).prop_flat_map(move |index| {
        let disk = disks[index];
        let block = u64::from(disk.block_size_bytes);
        let disk_blocks = disk.size_bytes / block;
        let max_blocks = (max_bytes / block).clamp(1, disk_blocks);
        // Mostly short extents, sometimes up to the maximum, to keep debug runs quick.
        let blocks = prop_oneof![3 => 1..=max_blocks.min(8), 1 => 1..=max_blocks];
        blocks.prop_flat_map(move |blocks| {
            (0..=disk_blocks - blocks)
                .prop_map(move |first_block| (index as u16, first_block * block, blocks * block))
        })
    })
}

fn data_strategy(disks: Vec<DiskGeometry>) -> impl Strategy<Value = (u16, u64, DataSpec)> {
    (
        extent_strategy(disks, MAX_TEST_WRITE_BYTES),
        data_kind_strategy(),
        any::<u64>(),
    )
        .prop_map(|((disk, offset_bytes, length_bytes), kind, seed)| {
            let data = DataSpec {
                kind,
                seed,
                length_bytes: length_bytes as usize,
            };
            (disk, offset_bytes, data)
        })
}

fn bookmark_strategy() -> impl Strategy<Value = Bookmark> {
    (
        prop_oneof![Just(Consistency::Crash), Just(Consistency::App)],
        any::<u64>(),
        any::<u64>(),
        utf8_strategy(100, MAX_LABEL_BYTES),
    )
        .prop_map(
            |(consistency, bookmark_id, source_timestamp_ns, label)| Bookmark {
                consistency,
                bookmark_id,
                source_timestamp_ns,
                label,
            },
        )
}

fn op_strategy(disks: Vec<DiskGeometry>) -> impl Strategy<Value = Op> {
    let whole_disk = disks.iter().map(|d| d.size_bytes).max().unwrap_or(0);
    prop_oneof![
        4 => data_strategy(disks.clone()).prop_map(|(disk, offset_bytes, data)| Op::Write {
            disk,
            offset_bytes,
            data,
        }),
        2 => extent_strategy(disks.clone(), whole_disk).prop_map(
            |(disk, offset_bytes, length_bytes)| Op::Zero {
                disk,
                offset_bytes,
                length_bytes,
            }
        ),
        1 => bookmark_strategy().prop_map(Op::Bookmark),
        2 => data_strategy(disks).prop_map(|(disk, offset_bytes, data)| Op::Resync {
            disk,
            offset_bytes,
            data,
        }),
    ]
}

fn stream_strategy() -> impl Strategy<Value = (StreamHeader, Vec<Op>)> {
    header_strategy().prop_flat_map(|header| {
        let ops = proptest::collection::vec(op_strategy(header.disks.clone()), 0..16);
        (Just(header), ops)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn roundtrip_random_streams_decode_to_identical_frames((header, ops) in stream_strategy()) {
        roundtrip_raw_and_zstd(&header, &ops);
    }

    #[test]
    fn roundtrip_compressible_writes_are_stored_as_zstd_and_decode_exactly(
        header in header_strategy(),
        period in 1usize..=64,
        seed in any::<u64>(),
    ) {
        // Every data frame compressible, so the zstd path is exercised in every case.
        let disk = header.disks[0];
        let block = u64::from(disk.block_size_bytes);
        let ops: Vec<Op> = [DataKind::Zeros, DataKind::Pattern { period }, DataKind::Text]
            .into_iter()
            .enumerate()
            .map(|(i, kind)| Op::Write {
                disk: 0,
                offset_bytes: i as u64 * block,
                data: DataSpec { kind, seed, length_bytes: 64 * 1024 },
            })
            .collect();
        // 64 KiB at offsets 0..3 blocks: every generated disk is at least 1 MiB.
        prop_assert!(disk.size_bytes >= 3 * block + 64 * 1024);
        let mut out = vec![0u8; MAX_PAYLOAD_BYTES as usize];
        let zstd = roundtrip(&header, &ops, ZSTD_1, &mut out);
        prop_assert_eq!(&zstd[..3], &[Some(Encoding::Zstd); 3]);
        let raw = roundtrip(&header, &ops, RAW, &mut out);
        prop_assert_eq!(&raw[..3], &[Some(Encoding::Raw); 3]);
    }
}

fn two_disk_header(first_seq: u64) -> StreamHeader {
    StreamHeader {
        item_id: *b"roundtrip-item-1",
        item_name: "sql-01 (prod)".to_owned(),
        first_seq,
        disks: vec![
            DiskGeometry {
                size_bytes: 8 << 20,
                block_size_bytes: 512,
            },
            DiskGeometry {
                size_bytes: 16 << 20,
                block_size_bytes: 4096,
            },
        ],
    }
}

fn data(kind: DataKind, seed: u64, length_bytes: usize) -> DataSpec {
    DataSpec {
        kind,
        seed,
        length_bytes,
    }
}

#[test]
fn roundtrip_writes_at_max_payload_bytes_decode_exactly() {
    let max = MAX_PAYLOAD_BYTES as usize;
    let header = two_disk_header(7);
    let ops = [
        // Random: stored raw even with zstd, so the payload is exactly at the limit.
        Op::Write {
            disk: 1,
            offset_bytes: 4 << 20,
            data: data(DataKind::Random, 1, max),
        },
        Op::Resync {
            disk: 0,
            offset_bytes: 512,
            data: data(DataKind::Zeros, 2, max),
        },
        Op::Write {
            disk: 0,
            offset_bytes: (8 << 20) - max as u64,
            data: data(DataKind::Pattern { period: 13 }, 3, max),
        },
    ];
    roundtrip_raw_and_zstd(&header, &ops);

    let (stream, _) = encode(&header, &ops[..1], ZSTD_1);
    let header_len = header.encoded_len_bytes();
    assert_eq!(
        stream.len(),
        header_len + FRAME_HEADER_BYTES + max + FRAME_HEADER_BYTES
    );
}

#[test]
fn roundtrip_stream_without_frames_yields_only_end() {
    let header = two_disk_header(0);
    let mut out = vec![0u8; 4096];
    for options in [RAW, ZSTD_1] {
        let (stream, expected) = encode(&header, &[], options);
        assert_eq!(expected, [OwnedFrame::End]);
        let decoded = decode(&stream, &header, &mut out);
        assert_eq!(decoded.len(), 1);
        assert_eq!(decoded[0].frame, OwnedFrame::End);
        assert_eq!(decoded[0].seq, 0);
    }
}

#[test]
fn roundtrip_limits_of_name_label_and_extent_decode_exactly() {
    // Longest item name and label, multi-byte UTF-8, extents touching the end of each disk,
    // a zero range over a whole disk and the largest first_seq the tests use.
    let mut header = two_disk_header((1 << 63) - 4);
    header.item_name = "é".repeat(127) + "x";
    assert_eq!(header.item_name.len(), engine::delta::MAX_ITEM_NAME_BYTES);
    let label = "✓".repeat(85) + "a";
    assert_eq!(label.len(), MAX_LABEL_BYTES);
    let ops = [
        Op::Bookmark(Bookmark {
            consistency: Consistency::App,
            bookmark_id: u64::MAX,
            source_timestamp_ns: u64::MAX,
            label,
        }),
        Op::Zero {
            disk: 1,
            offset_bytes: 0,
            length_bytes: 16 << 20,
        },
        Op::Write {
            disk: 0,
            offset_bytes: (8 << 20) - 512,
            data: data(DataKind::Text, 4, 512),
        },
        Op::Bookmark(Bookmark {
            consistency: Consistency::Crash,
            bookmark_id: 0,
            source_timestamp_ns: 0,
            label: String::new(),
        }),
        Op::Resync {
            disk: 1,
            offset_bytes: (16 << 20) - 4096,
            data: data(DataKind::HalfZeros, 5, 4096),
        },
    ];
    roundtrip_raw_and_zstd(&header, &ops);
}
