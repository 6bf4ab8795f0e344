//! The encoder refuses what the decoder would refuse.

#![allow(clippy::unwrap_used)]

use super::*;

// ---- Encoder refusals: the encoder never writes what the decoder would refuse. ----

/// An encoder call that must be refused.
type Refusal = Box<dyn FnOnce(&mut DeltaEncoder<Vec<u8>>) -> Result<u64, EncodeError>>;

/// Runs `refuse` on a fresh encoder, checks that it wrote nothing and used no sequence
/// number, and that the stream it then finishes still decodes. Returns the error.
fn refused(
    refuse: impl FnOnce(&mut DeltaEncoder<Vec<u8>>) -> Result<u64, EncodeError>,
) -> EncodeError {
    let options = EncoderOptions {
        zstd_level: Some(1),
    };
    let mut enc = DeltaEncoder::new(Vec::new(), &header(), options).expect("header");
    enc.write(0, 0, &[1u8; 512]).expect("a legal write first");
    let (seq, written) = (enc.next_seq(), enc.bytes_written());
    let error = refuse(&mut enc).expect_err("must be refused");
    assert_eq!(
        (enc.next_seq(), enc.bytes_written()),
        (seq, written),
        "{error}"
    );
    let stream = enc.finish().expect("finish");
    assert_eq!(stream.len() as u64, written + FRAME_HEADER_BYTES as u64);
    let mut out = vec![0u8; 4096];
    let (frames, failure) = decode_all(&stream, &mut out);
    assert!(failure.is_none(), "{failure:?}");
    assert_eq!(frames.len(), 2);
    error
}

#[test]
fn encoder_unknown_disk_is_refused() {
    for disk in [2u16, ALL_DISKS] {
        let error = refused(|enc| enc.write(disk, 0, &[0u8; 512]));
        assert!(
            matches!(error, EncodeError::UnknownDisk { disk_index, disk_count: 2 } if disk_index == disk),
            "{error}"
        );
        let error = refused(|enc| enc.zero_range(disk, 0, 512));
        assert!(matches!(error, EncodeError::UnknownDisk { .. }), "{error}");
    }
}

#[test]
fn encoder_misaligned_extent_is_refused() {
    let cases: [(&str, Refusal); 4] = [
        (
            "offset on 512",
            Box::new(|enc| enc.write(0, 100, &[0u8; 512])),
        ),
        (
            "length on 512",
            Box::new(|enc| enc.resync_block(0, 0, &[0u8; 700])),
        ),
        (
            "512 on 4096",
            Box::new(|enc| enc.write(1, 512, &[0u8; 4096])),
        ),
        ("zero on 4096", Box::new(|enc| enc.zero_range(1, 0, 512))),
    ];
    for (what, refuse) in cases {
        let error = refused(refuse);
        assert!(
            matches!(
                error,
                EncodeError::Extent {
                    why: ExtentError::Misaligned { .. },
                    ..
                }
            ),
            "{what}: {error}"
        );
    }
}

#[test]
fn encoder_out_of_range_and_empty_extents_are_refused() {
    let error = refused(|enc| enc.write(0, DISK0_BYTES - 512, &[0u8; 1024]));
    assert!(
        matches!(
            error,
            EncodeError::Extent {
                disk_index: 0,
                why: ExtentError::OutOfRange {
                    disk_size_bytes: DISK0_BYTES
                },
                ..
            }
        ),
        "{error}"
    );
    let error = refused(|enc| enc.zero_range(1, u64::MAX - 4095, 4096));
    assert!(
        matches!(
            error,
            EncodeError::Extent {
                why: ExtentError::OutOfRange { .. },
                ..
            }
        ),
        "{error}"
    );
    let error = refused(|enc| enc.zero_range(0, 0, 0));
    assert!(
        matches!(
            error,
            EncodeError::Extent {
                why: ExtentError::Empty,
                ..
            }
        ),
        "{error}"
    );
    let error = refused(|enc| enc.write(1, 0, &[]));
    assert!(
        matches!(
            error,
            EncodeError::Extent {
                why: ExtentError::Empty,
                ..
            }
        ),
        "{error}"
    );
}

#[test]
fn encoder_data_over_max_payload_is_refused() {
    let too_long = vec![0u8; MAX_PAYLOAD_BYTES as usize + 4096];
    let error = refused(|enc| enc.write(1, 0, &too_long));
    assert!(
        matches!(error, EncodeError::TooLong { length_bytes } if length_bytes == too_long.len()),
        "{error}"
    );
    let error = refused(|enc| enc.resync_block(1, 0, &too_long));
    assert!(matches!(error, EncodeError::TooLong { .. }), "{error}");
}

#[test]
fn encoder_label_over_max_is_refused() {
    let label = "x".repeat(MAX_LABEL_BYTES + 1);
    let error = refused(|enc| enc.bookmark(Consistency::App, 1, 2, &label));
    assert!(
        matches!(error, EncodeError::LabelTooLong { length_bytes } if length_bytes == MAX_LABEL_BYTES + 1),
        "{error}"
    );
}

#[test]
fn encoder_invalid_header_is_refused() {
    let mut bad_block = header();
    bad_block.disks[1].block_size_bytes = 1024;
    let mut no_disks = header();
    no_disks.disks.clear();
    let options = EncoderOptions { zstd_level: None };
    let error = DeltaEncoder::new(Vec::new(), &bad_block, options).expect_err("block size");
    assert!(
        matches!(
            error,
            EncodeError::Header(HeaderFieldError::BlockSize {
                disk_index: 1,
                block_size_bytes: 1024
            })
        ),
        "{error}"
    );
    let error = DeltaEncoder::new(Vec::new(), &no_disks, options).expect_err("no disks");
    assert!(
        matches!(
            error,
            EncodeError::Header(HeaderFieldError::DiskCount { count: 0 })
        ),
        "{error}"
    );
}
