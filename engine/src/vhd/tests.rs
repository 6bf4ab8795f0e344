//! Unit tests of the VHD codec and writer: footer round trips, checksums, geometry,
//! timestamps, holes, conversion and the temporary OS disk.

use super::*;
use std::os::unix::fs::MetadataExt;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

fn options() -> VhdCreateOptions {
    VhdCreateOptions {
        unique_id: *b"0123456789abcdef",
        timestamp_vhd_seconds: 0x3294_d7cb,
        creator_application: CREATOR_APPLICATION,
    }
}

#[test]
fn footer_round_trips() {
    let footer = VhdFooter::new_fixed(GIB, &options());
    let bytes = footer.encode();
    assert_eq!(&bytes[..8], b"conectix");
    assert_eq!(VhdFooter::decode(&bytes).unwrap(), footer);
    // Every field at its place, big-endian.
    assert_eq!(&bytes[8..16], &[0, 0, 0, 2, 0, 1, 0, 0]);
    assert_eq!(&bytes[16..24], &[0xFF; 8]);
    assert_eq!(&bytes[24..28], &[0x32, 0x94, 0xd7, 0xcb]);
    assert_eq!(&bytes[28..40], b"win \x00\x0a\x00\x00Wi2k");
    assert_eq!(&bytes[40..48], &[0, 0, 0, 0, 0x40, 0, 0, 0]); // 1 GiB, big-endian
    assert_eq!(&bytes[48..56], &[0, 0, 0, 0, 0x40, 0, 0, 0]);
    assert_eq!(&bytes[56..60], &[0x08, 0x20, 16, 63]); // 2080 / 16 / 63
    assert_eq!(&bytes[60..64], &[0, 0, 0, 2]);
    assert_eq!(&bytes[68..84], b"0123456789abcdef");
    assert!(bytes[84..].iter().all(|&b| b == 0));
}

#[test]
fn checksum_matches_spec_definition() {
    let bytes = VhdFooter::new_fixed(10 * MIB, &options()).encode();
    let sum: u32 = bytes
        .iter()
        .enumerate()
        .filter(|(i, _)| !(64..68).contains(i))
        .map(|(_, &b)| u32::from(b))
        .sum();
    let stored = bytes[64..68]
        .iter()
        .fold(0u32, |acc, &b| (acc << 8) | u32::from(b));
    assert_eq!(stored, !sum);
}

#[test]
fn every_flipped_byte_is_detected() {
    let bytes = VhdFooter::new_fixed(GIB, &options()).encode();
    for index in 0..FOOTER_BYTES {
        let mut corrupt = bytes;
        corrupt[index] ^= 0x01;
        let err = VhdFooter::decode(&corrupt).unwrap_err();
        if index < 8 {
            assert!(
                matches!(err, FooterError::BadCookie { .. }),
                "{index}: {err}"
            );
        } else {
            assert!(
                matches!(err, FooterError::BadChecksum { .. }),
                "{index}: {err}"
            );
        }
    }
}

#[test]
fn decode_errors_are_typed() {
    assert_eq!(
        VhdFooter::decode(&[0u8; 511]),
        Err(FooterError::WrongLength { length_bytes: 511 })
    );
    assert!(matches!(
        VhdFooter::decode(&[0u8; 512]),
        Err(FooterError::BadCookie { .. })
    ));
    let mut footer = VhdFooter::new_fixed(GIB, &options());
    footer.file_format_version = 0x0002_0000;
    assert_eq!(
        VhdFooter::decode(&footer.encode()),
        Err(FooterError::UnsupportedVersion {
            version: 0x0002_0000
        })
    );
    footer.file_format_version = FILE_FORMAT_VERSION;
    footer.disk_type = VhdDiskType::Dynamic;
    assert_eq!(
        VhdFooter::decode(&footer.encode()).unwrap().disk_type,
        VhdDiskType::Dynamic
    );
}

#[test]
fn decoder_never_panics_on_arbitrary_bytes() {
    use rand_xoshiro::Xoshiro256PlusPlus;
    use rand_xoshiro::rand_core::{Rng, SeedableRng};

    let mut rng = Xoshiro256PlusPlus::seed_from_u64(0x9E37_79B9_7F4A_7C15);
    let mut state = 0u64;
    for round in 0..2000u64 {
        let mut bytes = VhdFooter::new_fixed(GIB, &options()).encode();
        for _ in 0..(round % 7) {
            state = rng.next_u64();
            bytes[(state % 512) as usize] = (state >> 32) as u8;
        }
        let length = if round.is_multiple_of(5) {
            (state % 600) as usize
        } else {
            512
        };
        let input: Vec<u8> = bytes.iter().copied().cycle().take(length).collect();
        let _ = VhdFooter::decode(&input);
    }
}

#[test]
fn chs_geometry_follows_the_spec() {
    let chs = |size| {
        let g = ChsGeometry::for_size_bytes(size);
        (g.cylinders, g.heads, g.sectors_per_track)
    };
    // 1 GiB: 2097152 sectors → 63 sectors/track, 16 heads, 2080 cylinders (rounded down).
    assert_eq!(chs(GIB), (2080, 16, 63));
    assert_eq!(ChsGeometry::for_size_bytes(GIB).size_bytes(), 1_073_479_680);
    // What qemu-img picks for "1G" without force_size: the smallest CHS product ≥ 1 GiB,
    // 2081 × 16 × 63, which the algorithm maps to itself.
    assert_eq!(chs(2081 * 16 * 63 * 512), (2081, 16, 63));
    // Small disks: 17 sectors/track, at least 4 heads.
    assert_eq!(chs(10 * MIB), (301, 4, 17));
    assert_eq!(chs(MIB), (30, 4, 17));
    // From 65535 × 16 × 255 sectors (≈ 127.5 GiB) on: the maximum geometry.
    assert_eq!(chs(127 * GIB), (65278, 16, 255));
    assert_eq!(chs(128 * GIB), (65535, 16, 255));
    assert_eq!(chs(2 << 40), (65535, 16, 255));
    assert_eq!(chs(0), (0, 4, 17));
    // The product never exceeds the size.
    for size in [
        MIB,
        3 * MIB,
        100 * MIB,
        500 * MIB,
        4 * GIB,
        40 * GIB,
        126 * GIB,
    ] {
        assert!(
            ChsGeometry::for_size_bytes(size).size_bytes() <= size,
            "{size}"
        );
    }
}

#[test]
fn virtual_size_rounds_up_to_mib() {
    assert_eq!(fixed_vhd_virtual_size(0), 0);
    assert_eq!(fixed_vhd_virtual_size(1), MIB);
    assert_eq!(fixed_vhd_virtual_size(MIB), MIB);
    assert_eq!(fixed_vhd_virtual_size(MIB + 512), 2 * MIB);
    assert_eq!(fixed_vhd_virtual_size(GIB - 1), GIB);
    assert_eq!(fixed_vhd_virtual_size(u64::MAX) % MIB, 0);
}

#[test]
fn timestamp_counts_from_2000() {
    let at = |secs| UNIX_EPOCH + std::time::Duration::from_secs(secs);
    assert_eq!(vhd_timestamp(at(VHD_EPOCH_UNIX_SECONDS)), 0);
    assert_eq!(vhd_timestamp(at(VHD_EPOCH_UNIX_SECONDS + 86_400)), 86_400);
    assert_eq!(vhd_timestamp(at(0)), 0);
}

#[test]
fn generated_ids_differ() {
    let a = VhdCreateOptions::generate();
    let b = VhdCreateOptions::generate();
    assert_ne!(a.unique_id, b.unique_id);
    assert_eq!(a.unique_id[6] >> 4, 4);
    assert_eq!(a.creator_application, *b"win ");
}

#[test]
fn writer_keeps_zeros_as_holes_and_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.vhd");
    let mut writer = FixedVhdWriter::create(&path, 4 * MIB, &options()).unwrap();
    let mut data = vec![0u8; 2 * MIB as usize];
    data[100..5000].fill(0xAB); // granules 0 and 1 data
    data[MIB as usize + 7] = 1; // one granule in the middle
    writer.write_at(0, &data).unwrap();
    // Overwrite data with zeros: must become zeros (punched), not keep the old bytes.
    writer.write_at(0, &vec![0u8; 8192]).unwrap();
    writer.write_at(3 * MIB + 1, b"xyz").unwrap(); // unaligned
    assert!(matches!(
        writer.write_at(4 * MIB - 1, b"ab"),
        Err(VhdError::WriteOutOfRange { .. })
    ));
    let info = writer.finish().unwrap();
    assert_eq!(info.file_size_bytes, 4 * MIB + 512);
    assert_eq!(read_fixed_vhd_info(&path).unwrap(), info);

    let content = std::fs::read(&path).unwrap();
    let mut expected = vec![0u8; 4 * MIB as usize];
    expected[MIB as usize + 7] = 1;
    expected[3 * MIB as usize + 1..3 * MIB as usize + 4].copy_from_slice(b"xyz");
    assert_eq!(&content[..4 * MIB as usize], &expected[..]);
    // Three data granules at most (plus the footer's), not the 4 MiB.
    let allocated = std::fs::metadata(&path).unwrap().blocks() * 512;
    assert!(allocated <= 64 * 1024, "allocated {allocated}");
}

#[test]
fn writer_refuses_bad_sizes_and_existing_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.vhd");
    for size in [0, MIB - 512, MIB + 512, MAX_VIRTUAL_SIZE_BYTES + MIB] {
        assert!(matches!(
            FixedVhdWriter::create(&path, size, &options()),
            Err(VhdError::InvalidVirtualSize { .. })
        ));
    }
    std::fs::write(&path, b"precious").unwrap();
    assert!(matches!(
        FixedVhdWriter::create(&path, MIB, &options()),
        Err(VhdError::Io { op: "create", .. })
    ));
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
}

#[test]
fn convert_in_place_extends_and_refuses_twice() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raw.img");
    let raw: Vec<u8> = (0..(MIB + 4096) as usize)
        .map(|i| (i % 251) as u8)
        .collect();
    std::fs::write(&path, &raw).unwrap();
    let info = convert_raw_to_fixed_vhd(&path, &options()).unwrap();
    assert_eq!(info.virtual_size_bytes, 2 * MIB);
    assert!(info.is_azure_aligned());
    let content = std::fs::read(&path).unwrap();
    assert_eq!(content.len() as u64, 2 * MIB + 512);
    assert_eq!(&content[..raw.len()], &raw[..]);
    assert!(content[raw.len()..2 * MIB as usize].iter().all(|&b| b == 0));
    assert_eq!(read_fixed_vhd_info(&path).unwrap(), info);
    assert!(matches!(
        convert_raw_to_fixed_vhd(&path, &options()),
        Err(VhdError::AlreadyVhd { .. })
    ));

    let empty = dir.path().join("empty.img");
    std::fs::write(&empty, b"").unwrap();
    assert!(matches!(
        convert_raw_to_fixed_vhd(&empty, &options()),
        Err(VhdError::EmptyImage { .. })
    ));
}

#[test]
fn reader_errors_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.vhd");

    std::fs::write(&path, [0u8; 100]).unwrap();
    assert!(matches!(
        read_fixed_vhd_info(&path),
        Err(VhdError::FileTooShort {
            file_size_bytes: 100,
            ..
        })
    ));

    std::fs::write(&path, [0u8; 4096]).unwrap();
    assert!(matches!(
        read_fixed_vhd_info(&path),
        Err(VhdError::Footer {
            source: FooterError::BadCookie { .. },
            ..
        })
    ));

    // A valid footer whose size does not match the file.
    let mut file = vec![0u8; MIB as usize];
    file.extend_from_slice(&VhdFooter::new_fixed(2 * MIB, &options()).encode());
    std::fs::write(&path, &file).unwrap();
    assert!(matches!(
        read_fixed_vhd_info(&path),
        Err(VhdError::SizeMismatch {
            current_size_bytes,
            ..
        }) if current_size_bytes == 2 * MIB
    ));

    // A dynamic disk.
    let mut footer = VhdFooter::new_fixed(MIB, &options());
    footer.disk_type = VhdDiskType::Dynamic;
    let len = file.len();
    file[len - 512..].copy_from_slice(&footer.encode());
    std::fs::write(&path, &file).unwrap();
    assert!(matches!(
        read_fixed_vhd_info(&path),
        Err(VhdError::NotFixed {
            disk_type: VhdDiskType::Dynamic,
            ..
        })
    ));

    // A flipped byte in the footer of a real file.
    let mut footer_bytes = VhdFooter::new_fixed(MIB, &options()).encode();
    footer_bytes[300] = 1;
    file[len - 512..].copy_from_slice(&footer_bytes);
    std::fs::write(&path, &file).unwrap();
    let err = read_fixed_vhd_info(&path).unwrap_err();
    assert!(
        matches!(
            err,
            VhdError::Footer {
                source: FooterError::BadChecksum { .. },
                ..
            }
        ),
        "{err}"
    );
    let text = crate::error::report(&err);
    assert!(text.contains("checksum"), "{text}");
}

#[test]
fn temporary_os_disk_is_one_gib_and_sparse() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tmp-os.vhd");
    let info = create_temporary_os_disk(&path).unwrap();
    assert_eq!(info.virtual_size_bytes, GIB);
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), GIB + 512);
    assert!(
        meta.blocks() * 512 < MIB,
        "allocated {}",
        meta.blocks() * 512
    );
    assert_eq!(read_fixed_vhd_info(&path).unwrap(), info);
}
