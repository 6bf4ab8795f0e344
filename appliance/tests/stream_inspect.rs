//! `appliance stream inspect` as an operator runs it: exit status and output.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::process::Command;

use engine::delta::{Consistency, DeltaEncoder, DiskGeometry, EncoderOptions, StreamHeader};

fn valid_stream() -> Vec<u8> {
    let header = StreamHeader {
        item_id: [7; 16],
        item_name: "vm-inspect".into(),
        first_seq: 100,
        disks: vec![
            DiskGeometry {
                size_bytes: 1 << 20,
                block_size_bytes: 4096,
            },
            DiskGeometry {
                size_bytes: 1 << 20,
                block_size_bytes: 512,
            },
        ],
    };
    let mut encoder = DeltaEncoder::new(Vec::new(), &header, EncoderOptions::default()).unwrap();
    encoder.write(0, 8192, &[0xab; 16384]).unwrap();
    encoder.write(1, 512, &[1, 2, 3, 4].repeat(128)).unwrap();
    encoder.zero_range(1, 4096, 65536).unwrap();
    encoder.bookmark(Consistency::Crash, 1, 10, "c1").unwrap();
    encoder.resync_block(0, 0, &[9; 4096]).unwrap();
    encoder.bookmark(Consistency::App, 2, 20, "a2").unwrap();
    encoder.finish().unwrap()
}

fn inspect(bytes: &[u8]) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.drs");
    std::fs::write(&path, bytes).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_appliance"))
        .args(["stream", "inspect"])
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn inspect_valid_stream_prints_counts_per_kind_and_exits_zero() {
    let (code, stdout, stderr) = inspect(&valid_stream());
    assert_eq!(code, 0, "stderr: {stderr}");
    assert!(stdout.contains("vm-inspect"), "{stdout}");
    assert!(stdout.contains("seq       100..=106"), "{stdout}");
    let line = |kind: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(kind))
            .unwrap_or_else(|| panic!("no {kind} line in {stdout}"))
            .split_whitespace()
            .nth(1)
            .unwrap()
            .to_owned()
    };
    assert_eq!(line("write "), "2");
    assert_eq!(line("zero-range"), "1");
    assert_eq!(line("resync-block"), "1");
    assert_eq!(line("bookmark "), "2");
    assert!(
        stdout.contains("1 crash-consistent, 1 app-consistent"),
        "{stdout}"
    );
}

#[test]
fn inspect_corrupt_stream_exits_two_with_one_line_naming_frame_offset_reason() {
    let mut bytes = valid_stream();
    let last = bytes.len() - 10; // inside the end frame's header
    bytes[last] ^= 0x40;
    let (code, stdout, stderr) = inspect(&bytes);
    assert_eq!(code, 2);
    assert!(stdout.is_empty(), "{stdout}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("frame 6, byte offset"), "{stderr}");
    assert!(stderr.contains("checksum mismatch"), "{stderr}");
}

#[test]
fn inspect_truncated_and_garbage_files_exit_two_without_panic() {
    let valid = valid_stream();
    for cut in [0, 5, 60, valid.len() / 2, valid.len() - 1] {
        let (code, _, stderr) = inspect(&valid[..cut]);
        assert_eq!(code, 2, "cut at {cut}: {stderr}");
        assert!(stderr.contains("truncated"), "cut at {cut}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let (code, _, stderr) = inspect(b"not a stream at all, just some text that is long enough....");
    assert_eq!(code, 2);
    assert!(
        stderr.contains("stream header, byte offset 0: bad magic"),
        "{stderr}"
    );
}
