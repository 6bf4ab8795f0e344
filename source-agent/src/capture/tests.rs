//! Unit tests of the capture without an appliance (the link never comes up): the disk is
//! written through, what is not streamed stays in the change map, bookmarks are refused
//! while anything is unsent, quiesce refuses writes, bad disks are refused by name. The
//! tests with a real appliance are `appliance/tests/source_agent_capture.rs`.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;

use super::*;

/// An address where nothing listens.
fn dead_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

fn image(dir: &Path, name: &str, size_bytes: u64) -> DiskConfig {
    let path = dir.join(format!("{name}.img"));
    std::fs::File::create(&path)
        .unwrap()
        .set_len(size_bytes)
        .unwrap();
    DiskConfig {
        name: name.to_owned(),
        path,
        block_size_bytes: 4096,
    }
}

fn start(dir: &Path, disks: Vec<DiskConfig>) -> Arc<Capture> {
    let config = CaptureConfig::new(
        dead_addr(),
        [7; 16],
        vec![b'a'; 64],
        "vm".to_owned(),
        disks,
        dir.join("state"),
    );
    Capture::start(config).unwrap()
}

#[test]
fn writes_reach_the_disk_and_the_change_map_while_the_appliance_is_away() {
    let dir = tempfile::tempdir().unwrap();
    let disk = image(dir.path(), "os", 8 << 20);
    let capture = start(dir.path(), vec![disk.clone()]);
    let (name, export) = capture.exports().remove(0);
    assert_eq!(name, "os");
    assert_eq!(export.size_bytes(), 8 << 20);
    assert_eq!(export.block_sizes().minimum_bytes, 4096);
    export.write_at(4096, &[0xab; 8192], false).unwrap();
    export.write_at(100, &[0xcd; 10], true).unwrap(); // unaligned: streamed as whole blocks
    export.flush().unwrap();
    let bytes = std::fs::read(&disk.path).unwrap();
    assert!(bytes[4096..12288].iter().all(|&b| b == 0xab));
    assert!(bytes[100..110].iter().all(|&b| b == 0xcd));
    let mut read = vec![0; 8192];
    export.read_at(4096, &mut read).unwrap();
    assert!(read.iter().all(|&b| b == 0xab));

    let status = capture.status();
    assert_ne!(status.link, "connected");
    let disk_status = &status.disks[0];
    // A fresh state: the whole disk is the initial copy, still unsent.
    assert_eq!(disk_status.recovered_bytes, 8 << 20);
    assert_eq!(disk_status.unsent_bytes, 8 << 20);
    assert_eq!(disk_status.written_bytes, 8192 + 10);
    assert_eq!(disk_status.sent_bytes, 0);
    let error = capture
        .bookmark_within(Consistency::App, "x", Duration::from_millis(100))
        .unwrap_err();
    assert!(matches!(error, CaptureError::Timeout { .. }), "{error}");
    assert!(
        error.to_string().contains("8388608 bytes not yet streamed"),
        "{error}"
    );
    capture.shutdown(Duration::from_secs(1)).unwrap();
    capture.shutdown(Duration::from_secs(1)).unwrap(); // twice is harmless
    let refused = export.write_at(0, &[1; 4096], false).unwrap_err();
    assert_eq!(refused.raw_os_error(), Some(libc::ESHUTDOWN));
    assert!(export.is_closed());
}

#[test]
fn zeroes_and_trims_read_back_as_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let disk = image(dir.path(), "data", 4 << 20);
    std::fs::write(&disk.path, vec![0x5a; 4 << 20]).unwrap();
    let capture = start(dir.path(), vec![disk.clone()]);
    let (_, export) = capture.exports().remove(0);
    export.write_zeroes(8192, 65536, false).unwrap();
    export.trim(1 << 20, 1 << 20, true).unwrap();
    let bytes = std::fs::read(&disk.path).unwrap();
    assert!(bytes[8192..8192 + 65536].iter().all(|&b| b == 0));
    assert!(bytes[1 << 20..2 << 20].iter().all(|&b| b == 0));
    assert!(bytes[..8192].iter().all(|&b| b == 0x5a));
    assert!(bytes[2 << 20..].iter().all(|&b| b == 0x5a));
    assert_eq!(capture.status().disks[0].written_bytes, 65536 + (1 << 20));
    // Out of range: refused, nothing written.
    assert!(
        export
            .write_at((4 << 20) - 4096, &[1; 8192], false)
            .is_err()
    );
}

#[test]
fn quiesce_refuses_writes_until_resume() {
    let dir = tempfile::tempdir().unwrap();
    let disk = image(dir.path(), "os", 1 << 20);
    let capture = start(dir.path(), vec![disk]);
    let (_, export) = capture.exports().remove(0);
    // Without an appliance the drain cannot finish: a named timeout, and writes stay refused.
    let error = capture
        .quiesce(Consistency::Crash, "final", Duration::from_millis(200))
        .unwrap_err();
    assert!(matches!(error, CaptureError::Timeout { .. }), "{error}");
    assert!(capture.status().quiesced);
    let refused = export.write_at(0, &[1; 4096], false).unwrap_err();
    assert_eq!(refused.raw_os_error(), Some(libc::ESHUTDOWN));
    assert!(matches!(
        capture.bookmark(Consistency::Crash, "x"),
        Err(CaptureError::Quiesced)
    ));
    capture.resume();
    export.write_at(0, &[1; 4096], false).unwrap();
    assert!(!capture.status().quiesced);
}

#[test]
fn bad_disks_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let missing = DiskConfig {
        name: "gone".to_owned(),
        path: dir.path().join("nope.img"),
        block_size_bytes: 4096,
    };
    let odd = image(dir.path(), "odd", 4096 + 512);
    let empty = image(dir.path(), "empty", 0);
    let folder = DiskConfig {
        name: "folder".to_owned(),
        path: dir.path().to_owned(),
        block_size_bytes: 4096,
    };
    let mut weird_block = image(dir.path(), "weird", 8192);
    weird_block.block_size_bytes = 1024;
    for (disk, expect) in [
        (missing, "opening"),
        (odd, "not a non-zero multiple"),
        (empty, "not a non-zero multiple"),
        (folder, "Is a directory"),
        (weird_block, "must be 512 or 4096"),
    ] {
        let error = DiskFile::open(&disk).unwrap_err().to_string();
        assert!(error.contains(expect), "{error}");
    }
    let a = image(dir.path(), "a", 4096);
    let config = CaptureConfig::new(
        dead_addr(),
        [1; 16],
        vec![b'a'; 64],
        "vm".to_owned(),
        vec![a.clone(), a],
        dir.path().join("state"),
    );
    let error = Capture::start(config).unwrap_err().to_string();
    assert!(error.contains("appears twice"), "{error}");
}
