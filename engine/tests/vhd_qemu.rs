//! `engine::vhd` against the real `qemu-img`: what we write, qemu reads as the disk we meant;
//! what qemu writes, we accept.
//!
//! `qemu-img` is a required tool of this project (`scripts/install-tools.sh` installs it, CI
//! runs that script). When it is missing these tests fail with a loud message: they never skip
//! silently, because a VHD nobody checked is exactly what Azure refuses at upload time.
//!
//! Run with `--nocapture` to see the JSON `qemu-img info` reports for our files.

// Test helpers outside #[test] functions unwrap too: a failure here is a test failure.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::{Command, Output};

use engine::vhd::{
    ChsGeometry, FixedVhdWriter, TEMPORARY_OS_DISK_SIZE_BYTES, VhdCreateOptions, VhdDiskType,
    VhdError, convert_raw_to_fixed_vhd, create_temporary_os_disk, fixed_vhd_virtual_size,
    read_fixed_vhd_info,
};

const MIB: u64 = 1 << 20;
/// Raw image size: whole sectors, not whole MiB, so conversion has to extend it.
const RAW_BYTES: u64 = 10 * MIB + 300 * 1024;

fn qemu_img(args: &[&str]) -> Output {
    match Command::new("qemu-img").args(args).output() {
        Ok(output) => output,
        Err(err) => {
            eprintln!();
            eprintln!("################################################################");
            eprintln!("# qemu-img NOT FOUND ({err}).");
            eprintln!("# The VHD tests need the real qemu-img (Debian: qemu-utils).");
            eprintln!("# Install it with scripts/install-tools.sh, then re-run.");
            eprintln!("################################################################");
            panic!("qemu-img is required by engine/tests/vhd_qemu.rs: {err}");
        }
    }
}

fn qemu_img_ok(args: &[&str]) -> String {
    let output = qemu_img(args);
    assert!(
        output.status.success(),
        "qemu-img {args:?} failed: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// `qemu-img info -f vpc --output=json`, printed for the record.
fn qemu_info_vpc(path: &Path) -> String {
    let json = qemu_img_ok(&["info", "-f", "vpc", "--output=json", path.to_str().unwrap()]);
    eprintln!(
        "qemu-img info -f vpc --output=json {}:\n{json}",
        path.display()
    );
    json
}

/// The raw text of a field of the top-level JSON object (not of nested "children"): a number,
/// or a string without its quotes. Enough JSON for qemu-img's output, without a JSON crate.
fn top_level_field(json: &str, key: &str) -> Option<String> {
    let bytes = json.as_bytes();
    let mut depth = 0usize;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'{' | b'[' => depth += 1,
            b'}' | b']' => depth = depth.saturating_sub(1),
            b'"' => {
                let start = i + 1;
                let mut end = start;
                while end < bytes.len() && bytes[end] != b'"' {
                    end += if bytes[end] == b'\\' { 2 } else { 1 };
                }
                let string = &json[start..end.min(json.len())];
                i = end;
                let rest = json[i + 1..].trim_start();
                if depth == 1 && string == key && rest.starts_with(':') {
                    let value = rest[1..].trim_start();
                    if let Some(quoted) = value.strip_prefix('"') {
                        return quoted.split('"').next().map(str::to_owned);
                    }
                    let end = value
                        .find(|c: char| c == ',' || c == '}' || c.is_whitespace())
                        .unwrap_or(value.len());
                    return Some(value[..end].to_owned());
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

fn qemu_virtual_size(json: &str) -> u64 {
    top_level_field(json, "virtual-size")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no top-level virtual-size in {json}"))
}

fn allocated_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// A seeded pattern with zero regions: whole zero MiBs, zero 4 KiB blocks, unaligned zero
/// runs, and a zero tail.
fn raw_pattern(size_bytes: u64, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut data: Vec<u8> = (0..size_bytes).map(|_| next() as u8).collect();
    let mut zero = |from: u64, to: u64| data[from as usize..to as usize].fill(0);
    zero(MIB, 3 * MIB); // two whole MiB
    zero(4 * MIB + 8192, 4 * MIB + 3 * 4096); // one aligned block
    zero(5 * MIB + 100, 5 * MIB + 20_000); // unaligned run covering whole blocks
    zero(7 * MIB + 4096 * 9, 8 * MIB); // aligned run to a MiB boundary
    zero(size_bytes - 100 * 1024, size_bytes); // tail
    data
}

#[test]
fn raw_image_becomes_a_fixed_vhd_qemu_reads_identically() {
    let dir = tempfile::tempdir().unwrap();
    let raw_path = dir.path().join("raw.img");
    let raw = raw_pattern(RAW_BYTES, 0x5EED_0001);
    std::fs::write(&raw_path, &raw).unwrap();
    let virtual_size_bytes = fixed_vhd_virtual_size(RAW_BYTES);
    assert_eq!(virtual_size_bytes, 11 * MIB);

    // Path 1: the streaming writer, fed in uneven pieces.
    let written = dir.path().join("written.vhd");
    let mut writer =
        FixedVhdWriter::create(&written, virtual_size_bytes, &VhdCreateOptions::generate())
            .unwrap();
    let mut offset = 0usize;
    for piece in [777 * 1024, 4096, 3 * MIB as usize, 1, 12_345]
        .iter()
        .cycle()
    {
        if offset >= raw.len() {
            break;
        }
        let end = (offset + piece).min(raw.len());
        writer.write_at(offset as u64, &raw[offset..end]).unwrap();
        offset = end;
    }
    let info = writer.finish().unwrap();
    assert_eq!(info.virtual_size_bytes, virtual_size_bytes);

    // Path 2: in-place conversion of a copy of the raw image.
    let converted = dir.path().join("converted.vhd");
    std::fs::copy(&raw_path, &converted).unwrap();
    let converted_info =
        convert_raw_to_fixed_vhd(&converted, &VhdCreateOptions::generate()).unwrap();
    assert_eq!(converted_info.virtual_size_bytes, virtual_size_bytes);

    for vhd in [&written, &converted] {
        let json = qemu_info_vpc(vhd);
        assert_eq!(top_level_field(&json, "format").as_deref(), Some("vpc"));
        assert_eq!(qemu_virtual_size(&json), virtual_size_bytes);
        let info = read_fixed_vhd_info(vhd).unwrap();
        assert_eq!(info.virtual_size_bytes, virtual_size_bytes);
        assert!(info.is_azure_aligned());
        let compare = qemu_img(&[
            "compare",
            "-f",
            "raw",
            "-F",
            "vpc",
            raw_path.to_str().unwrap(),
            vhd.to_str().unwrap(),
        ]);
        assert_eq!(
            compare.status.code(),
            Some(0),
            "qemu-img compare {}: {}{}",
            vhd.display(),
            String::from_utf8_lossy(&compare.stdout),
            String::from_utf8_lossy(&compare.stderr)
        );
    }

    // The writer left zero regions as holes: the file holds fewer blocks than the raw data.
    let zero_bytes = raw.iter().filter(|&&b| b == 0).count() as u64;
    let nonzero_bytes = RAW_BYTES - zero_bytes;
    let allocated = allocated_bytes(&written);
    assert!(
        allocated < nonzero_bytes + 256 * 1024,
        "writer allocated {allocated} bytes for {nonzero_bytes} non-zero bytes"
    );
    assert!(allocated < RAW_BYTES - 2 * MIB, "allocated {allocated}");

    // The comparison is meaningful: one changed byte in the VHD's data is a difference.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&written)
        .unwrap();
    file.write_all_at(&[0x42], 2 * MIB + 17).unwrap();
    drop(file);
    let compare = qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "vpc",
        raw_path.to_str().unwrap(),
        written.to_str().unwrap(),
    ]);
    assert_eq!(compare.status.code(), Some(1));
}

#[test]
fn temporary_os_disk_is_exactly_one_gib_for_qemu_and_sparse() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("temp-os.vhd");
    let info = create_temporary_os_disk(&path).unwrap();
    assert_eq!(info.virtual_size_bytes, 1_073_741_824);
    assert_eq!(TEMPORARY_OS_DISK_SIZE_BYTES, 1_073_741_824);

    let json = qemu_info_vpc(&path);
    assert_eq!(top_level_field(&json, "format").as_deref(), Some("vpc"));
    assert_eq!(qemu_virtual_size(&json), 1_073_741_824);
    let allocated = allocated_bytes(&path);
    assert!(
        allocated < MIB,
        "temporary OS disk allocates {allocated} bytes"
    );
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 1_073_741_824 + 512);
    assert_eq!(read_fixed_vhd_info(&path).unwrap(), info);
    // Creating it again over the existing file is refused, not an overwrite.
    assert!(matches!(
        create_temporary_os_disk(&path),
        Err(VhdError::Io { op: "create", .. })
    ));
}

#[test]
fn fixed_vhds_written_by_qemu_img_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let raw_path = dir.path().join("raw.img");
    std::fs::write(&raw_path, raw_pattern(RAW_BYTES, 0x5EED_0002)).unwrap();
    let raw = raw_path.to_str().unwrap();

    // Default qemu: creator "qemu", size rounded *up* to a CHS product, stored as current size.
    let plain = dir.path().join("qemu.vhd");
    let plain_str = plain.to_str().unwrap();
    qemu_img_ok(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vpc",
        "-o",
        "subformat=fixed",
        raw,
        plain_str,
    ]);
    let info = read_fixed_vhd_info(&plain).unwrap();
    assert_eq!(&info.footer.creator_application, b"qemu");
    assert_eq!(
        qemu_virtual_size(&qemu_info_vpc(&plain)),
        info.virtual_size_bytes
    );
    assert!(info.virtual_size_bytes >= RAW_BYTES);
    assert_eq!(info.footer.geometry.size_bytes(), info.virtual_size_bytes);
    assert_eq!(
        ChsGeometry::for_size_bytes(info.virtual_size_bytes),
        info.footer.geometry,
        "our CHS algorithm disagrees with qemu's"
    );
    assert!(!info.is_azure_aligned());

    // force_size: creator "qem2", exact current size, maximum geometry.
    let forced = dir.path().join("qem2.vhd");
    let forced_str = forced.to_str().unwrap();
    qemu_img_ok(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vpc",
        "-o",
        "subformat=fixed,force_size=on",
        raw,
        forced_str,
    ]);
    let info = read_fixed_vhd_info(&forced).unwrap();
    assert_eq!(&info.footer.creator_application, b"qem2");
    assert_eq!(info.virtual_size_bytes, RAW_BYTES);
    assert_eq!(qemu_virtual_size(&qemu_info_vpc(&forced)), RAW_BYTES);

    // qemu's CHS choice for "1G" is the smallest product ≥ 1 GiB; ours agrees with the spec.
    let gib = dir.path().join("gib.vhd");
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "vpc",
        "-o",
        "subformat=fixed",
        gib.to_str().unwrap(),
        "1G",
    ]);
    let info = read_fixed_vhd_info(&gib).unwrap();
    let geometry = info.footer.geometry;
    assert_eq!(
        (
            geometry.cylinders,
            geometry.heads,
            geometry.sectors_per_track
        ),
        (2081, 16, 63)
    );
    assert_eq!(
        ChsGeometry::for_size_bytes(info.virtual_size_bytes),
        geometry
    );
    let spec_1g = ChsGeometry::for_size_bytes(1 << 30);
    assert_eq!(
        (spec_1g.cylinders, spec_1g.heads, spec_1g.sectors_per_track),
        (2080, 16, 63)
    );

    // A dynamic VHD has a valid footer too, but is not fixed.
    let dynamic = dir.path().join("dynamic.vhd");
    let dynamic_str = dynamic.to_str().unwrap();
    qemu_img_ok(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vpc",
        "-o",
        "subformat=dynamic",
        raw,
        dynamic_str,
    ]);
    assert!(matches!(
        read_fixed_vhd_info(&dynamic),
        Err(VhdError::NotFixed {
            disk_type: VhdDiskType::Dynamic,
            ..
        })
    ));
}

/// The major version of the installed qemu-img ("qemu-img version 10.0.2 (...)").
fn qemu_major_version() -> u32 {
    let text = qemu_img_ok(&["--version"]);
    text.split_whitespace()
        .nth(2)
        .and_then(|v| v.split('.').next())
        .and_then(|major| major.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse qemu-img version from {text:?}"))
}

/// Why we write creator application "win ": qemu sizes a VHD by its CHS geometry (which rounds
/// down) for some creator applications and by the current size for others. Up to qemu 9.2 the
/// current size is used only for an allow-list ("win " among them); from 10.0 on, only "vpc "
/// and "qemu" are sized by CHS. "win " gets the current size from every version.
#[test]
fn creator_application_decides_the_size_qemu_sees() {
    let dir = tempfile::tempdir().unwrap();
    let major = qemu_major_version();
    let size_bytes = 10 * MIB;
    let chs_bytes = ChsGeometry::for_size_bytes(size_bytes).size_bytes();
    assert_eq!(chs_bytes, 301 * 4 * 17 * 512); // 10 479 616: 6 KiB short
    let private_name_bytes = if major >= 10 { size_bytes } else { chs_bytes };
    for (creator, expected) in [
        (*b"win ", size_bytes),
        (*b"drap", private_name_bytes),
        (*b"qemu", chs_bytes),
        (*b"vpc ", chs_bytes),
    ] {
        let name = String::from_utf8_lossy(&creator).trim().to_owned();
        let path = dir.path().join(format!("{name}.vhd"));
        let options = VhdCreateOptions {
            creator_application: creator,
            ..VhdCreateOptions::generate()
        };
        FixedVhdWriter::create(&path, size_bytes, &options)
            .unwrap()
            .finish()
            .unwrap();
        let seen = qemu_virtual_size(&qemu_info_vpc(&path));
        eprintln!(
            "qemu-img {major}.x, creator {name:?}: virtual size {seen} (intended {size_bytes})"
        );
        assert_eq!(seen, expected, "creator {name:?}, qemu-img {major}.x");
        // We read the current size whatever the creator.
        assert_eq!(
            read_fixed_vhd_info(&path).unwrap().virtual_size_bytes,
            size_bytes
        );
    }
}

#[test]
fn top_level_field_ignores_children() {
    let json = r#"{"children": [{"info": {"virtual-size": 1, "format": "file"}}],
        "virtual-size": 2, "format": "vpc", "dirty-flag": false}"#;
    assert_eq!(top_level_field(json, "virtual-size").as_deref(), Some("2"));
    assert_eq!(top_level_field(json, "format").as_deref(), Some("vpc"));
    assert_eq!(top_level_field(json, "missing"), None);
}
