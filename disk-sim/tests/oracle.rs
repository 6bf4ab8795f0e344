//! The source VM and the oracle, through the public API: a workload written to real disk
//! files with bookmarks; at random bookmarks the rebuilt disk is byte for byte what an
//! independent in-memory model held, its digests are the recorded ones, and a flipped byte is
//! named by chunk and offset, in a raw image and in a fixed VHD.

use std::collections::BTreeMap;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use disk_sim::source::{
    DEFAULT_CHUNK_BYTES, DiskDigest, DiskFormat, Oracle, OracleError, OracleOptions, chunk_digest,
};
use disk_sim::source::{SourceVm, VmError};
use disk_sim::workload::{Op, Pattern, Workload, WorkloadSpec};
use engine::delta::{Consistency, DiskGeometry};
use proptest::prelude::*;

fn disks() -> Vec<DiskGeometry> {
    vec![
        // OS disk: 4096-byte blocks, a size that is not a multiple of the chunk.
        DiskGeometry {
            size_bytes: (3 << 20) + 3 * 4096,
            block_size_bytes: 4096,
        },
        DiskGeometry {
            size_bytes: 2 << 20,
            block_size_bytes: 512,
        },
    ]
}

/// The digests of bytes in memory, computed here (not by the oracle).
fn digest_of(bytes: &[u8]) -> DiskDigest {
    DiskDigest::from_chunks(
        bytes.len() as u64,
        DEFAULT_CHUNK_BYTES,
        bytes
            .chunks(DEFAULT_CHUNK_BYTES as usize)
            .map(chunk_digest)
            .collect(),
    )
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).expect("read")
}

/// A fixed VHD of `raw`, made by the engine's writer (zero padding to a multiple of 1 MiB,
/// then the footer).
fn as_fixed_vhd(raw: &Path, out: &Path) {
    std::fs::copy(raw, out).expect("copy");
    engine::vhd::convert_raw_to_fixed_vhd(out, &engine::vhd::VhdCreateOptions::generate())
        .expect("convert");
}

fn flip(path: &Path, offset: u64) {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open");
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, offset).expect("read byte");
    byte[0] ^= 0x5a;
    file.write_all_at(&byte, offset).expect("write byte");
}

/// A run: the workload applied to a SourceVm and to an in-memory model; bookmarks recorded
/// with the stream seq an agent would give (one seq per frame); model digests per bookmark
/// and full model copies of the bookmarks in `keep`.
struct Run {
    _dir: tempfile::TempDir,
    scratch: PathBuf,
    vm: SourceVm,
    oracle: Oracle,
    /// seq → per-disk digests of the model at the bookmark.
    model_digests: BTreeMap<u64, Vec<DiskDigest>>,
    /// seq → per-disk bytes of the model at the bookmark, for some bookmarks.
    model_copies: BTreeMap<u64, Vec<Vec<u8>>>,
}

fn run(seed: u64, pattern: Pattern, ops: usize, keep_every: u64) -> Run {
    let dir = tempfile::tempdir().expect("tempdir");
    let site = dir.path().join("site-a");
    let scratch = dir.path().join("scratch");
    let mut vm = SourceVm::create(&site, "vm-1", &disks()).expect("create vm");
    let mut oracle = Oracle::new(&scratch, &vm).expect("oracle");
    let mut model: Vec<Vec<u8>> = disks()
        .iter()
        .map(|d| vec![0u8; d.size_bytes as usize])
        .collect();
    let spec = WorkloadSpec {
        pattern,
        write_max_bytes: 256 << 10,
        zero_range_per_mille: 100,
        crash_bookmark_every_ops: 7,
        app_bookmark_every_ops: 30,
        ..WorkloadSpec::default()
    };
    let mut workload = Workload::new(seed, spec, disks());
    let mut data = Vec::new();
    let (mut model_digests, mut model_copies) = (BTreeMap::new(), BTreeMap::new());
    let mut seq = 100u64;
    for _ in 0..ops {
        seq += 1;
        let op = workload.next_op(&mut data);
        match op {
            Op::Write {
                disk_index,
                offset_bytes,
                ..
            } => {
                let at = offset_bytes as usize;
                model[usize::from(disk_index)][at..at + data.len()].copy_from_slice(&data);
            }
            Op::ZeroRange {
                disk_index,
                offset_bytes,
                length_bytes,
            } => {
                let at = offset_bytes as usize;
                model[usize::from(disk_index)][at..at + length_bytes as usize].fill(0);
            }
            Op::Bookmark {
                consistency,
                bookmark_id,
            } => {
                let record = oracle
                    .record_bookmark(&vm, seq, consistency)
                    .expect("record");
                let digests: Vec<DiskDigest> = model.iter().map(|d| digest_of(d)).collect();
                let wholes: Vec<u64> = digests.iter().map(|d| d.whole).collect();
                assert_eq!(record.whole_digests, wholes, "bookmark {seq}");
                model_digests.insert(seq, digests);
                if bookmark_id % keep_every == 0 {
                    model_copies.insert(seq, model.clone());
                }
                continue;
            }
        }
        oracle.apply(&mut vm, &op, &data).expect("apply");
    }
    Run {
        _dir: dir,
        scratch,
        vm,
        oracle,
        model_digests,
        model_copies,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(6))]

    #[test]
    fn rebuilt_disks_match_the_recorded_digests_and_a_flipped_byte_is_named(
        seed in any::<u64>(),
        pattern in prop::sample::select(Pattern::ALL.to_vec()),
        picks in prop::collection::vec((any::<prop::sample::Index>(), 0usize..2, any::<u64>()), 4),
    ) {
        let run = run(seed, pattern, 300, 3);
        let seqs: Vec<u64> = run.model_digests.keys().copied().collect();
        prop_assert!(!seqs.is_empty());
        // The SourceVm's files are the model's content now (the last op may be after the last
        // bookmark, so compare with the files directly).
        let out = run.scratch.join("rebuilt");
        std::fs::create_dir_all(&out).expect("mkdir");
        for (n, (pick, disk_index, at)) in picks.iter().enumerate() {
            let seq = seqs[pick.index(seqs.len())];
            let path = out.join(format!("{n}-disk-{disk_index}-at-{seq}.img"));
            run.oracle.write_disk_at(seq, *disk_index, &path).expect("rebuild");
            let bytes = read(&path);
            let expected = &run.model_digests[&seq][*disk_index];
            // The rebuilt disk has the recorded digests, which are the model's.
            prop_assert_eq!(&digest_of(&bytes), expected);
            prop_assert_eq!(&run.oracle.digests_at(seq, *disk_index).expect("digests"), expected);
            if let Some(copy) = run.model_copies.get(&seq) {
                prop_assert!(bytes == copy[*disk_index], "bytes differ at bookmark {}", seq);
            }
            run.oracle.verify_file(seq, *disk_index, &path).expect("verify raw");

            // As a fixed VHD: accepted, in auto and explicit formats.
            let vhd = out.join(format!("{n}.vhd"));
            as_fixed_vhd(&path, &vhd);
            run.oracle.verify_file(seq, *disk_index, &vhd).expect("verify vhd");
            run.oracle
                .verify_file_as(seq, *disk_index, &vhd, DiskFormat::FixedVhd)
                .expect("verify vhd as vhd");

            // A flipped byte, named by chunk and offset, in both.
            let offset = at % bytes.len() as u64;
            for file in [&path, &vhd] {
                flip(file, offset);
                let error = run
                    .oracle
                    .verify_file(seq, *disk_index, file)
                    .expect_err("a flipped byte is caught");
                let mismatch = *error.mismatch().expect("a mismatch");
                let chunk = u64::from(DEFAULT_CHUNK_BYTES);
                prop_assert_eq!(mismatch.disk_index, *disk_index);
                prop_assert_eq!(mismatch.chunk_index, offset / chunk);
                prop_assert_eq!(mismatch.chunk_offset_bytes, offset / chunk * chunk);
                prop_assert_eq!(mismatch.offset_bytes, offset);
                prop_assert_eq!(mismatch.expected, expected.chunks[(offset / chunk) as usize]);
                prop_assert_ne!(mismatch.expected, mismatch.got);
                let message = error.to_string();
                prop_assert!(message.contains(&format!("offset {offset}")), "{}", message);
                prop_assert!(message.contains(&file.display().to_string()), "{}", message);
            }
        }
        // The oracle's notes are complete.
        run.oracle.audit(&run.vm).expect("audit");
    }
}

#[test]
fn source_vm_lays_out_sparse_disk_files_and_refuses_bad_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let site = dir.path().join("site");
    let mut vm = SourceVm::create(&site, "web-1", &disks()).expect("create");
    assert_eq!(
        vm.paths(),
        &[
            site.join("web-1").join("disk-0.img"),
            site.join("web-1").join("disk-1.img"),
        ]
    );
    assert_eq!(vm.dir(), site.join("web-1"));
    for (path, disk) in vm.paths().iter().zip(disks()) {
        let meta = std::fs::metadata(path).expect("stat");
        assert_eq!(meta.len(), disk.size_bytes);
        assert!(
            meta.blocks() * 512 < 64 << 10,
            "{} is not sparse",
            path.display()
        );
    }
    // Written through to the file.
    vm.write(1, 4096, &[7u8; 1024]).expect("write");
    let mut buf = [0u8; 1024];
    std::fs::File::open(&vm.paths()[1])
        .expect("open")
        .read_exact_at(&mut buf, 4096)
        .expect("read");
    assert_eq!(buf, [7u8; 1024]);
    vm.zero_range(1, 4096, 512).expect("trim");
    vm.read_at(1, 4096, &mut buf).expect("read");
    assert_eq!(&buf[..512], &[0u8; 512]);
    assert_eq!(&buf[512..], &[7u8; 512]);
    // Refusals.
    assert!(matches!(
        vm.write(0, 512, &[1u8; 4096]),
        Err(VmError::BadExtent { .. })
    ));
    assert!(matches!(
        vm.write(1, 2 << 20, &[1u8; 512]),
        Err(VmError::BadExtent { .. })
    ));
    assert!(matches!(
        vm.write(2, 0, &[1u8; 512]),
        Err(VmError::NoSuchDisk { .. })
    ));
    let op = Op::Write {
        disk_index: 1,
        offset_bytes: 0,
        length_bytes: 1024,
    };
    assert!(matches!(
        vm.apply(&op, &[0u8; 512]),
        Err(VmError::DataLength { .. })
    ));
    // Not twice; opened again with its content.
    let error = SourceVm::create(&site, "web-1", &disks()).expect_err("exists");
    assert!(error.to_string().contains("disk-0.img"), "{error}");
    let again = SourceVm::open(&site, "web-1", &disks()).expect("open");
    again.read_at(1, 4096, &mut buf).expect("read");
    assert_eq!(&buf[512..], &[7u8; 512]);
    assert!(matches!(
        SourceVm::open(
            &site,
            "web-1",
            &disks()[..1]
                .iter()
                .map(|d| DiskGeometry {
                    size_bytes: d.size_bytes * 2,
                    ..*d
                })
                .collect::<Vec<_>>()
        ),
        Err(VmError::SizeMismatch { .. })
    ));
    assert!(matches!(
        SourceVm::create(&site, "../x", &disks()),
        Err(VmError::InvalidName { .. })
    ));
    // Snapshot digests are the files' content.
    let snapshot = vm.snapshot_digests(DEFAULT_CHUNK_BYTES).expect("snapshot");
    for (digest, path) in snapshot.iter().zip(vm.paths()) {
        assert_eq!(digest, &digest_of(&read(path)));
    }
}

#[test]
fn oracle_baseline_is_an_existing_vm_content_and_records_need_notes_or_a_full_scan() {
    let dir = tempfile::tempdir().expect("tempdir");
    let site = dir.path().join("site");
    let mut vm = SourceVm::create(&site, "db-1", &disks()).expect("create");
    // Content before the oracle exists: the baseline.
    vm.write(0, 0, &[1u8; 8192]).expect("write");
    let mut oracle = Oracle::new(&dir.path().join("scratch"), &vm).expect("oracle");
    oracle
        .record_bookmark(&vm, 10, Consistency::Crash)
        .expect("bookmark");
    // A write the oracle is not told about: the audit names it.
    vm.write(1, 70_000 / 512 * 512, &[2u8; 512]).expect("write");
    match oracle.audit(&vm) {
        Err(OracleError::NotNoted {
            disk_index: 1,
            chunk_index: 1,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    // Out of order and unknown bookmarks are refused.
    assert!(matches!(
        oracle.record_bookmark(&vm, 10, Consistency::App),
        Err(OracleError::BookmarkOutOfOrder {
            seq: 10,
            last_seq: 10
        })
    ));
    let out = dir.path().join("at-11.img");
    assert!(matches!(
        oracle.write_disk_at(11, 0, &out),
        Err(OracleError::UnknownBookmark { seq: 11 })
    ));
    // At bookmark 10, disk 0 is the baseline's content.
    let at_10 = dir.path().join("at-10.img");
    oracle.write_disk_at(10, 0, &at_10).expect("rebuild");
    let bytes = read(&at_10);
    assert!(bytes[..8192].iter().all(|&b| b == 1));
    assert!(bytes[8192..].iter().all(|&b| b == 0));
    // A file of the wrong size is named as such.
    std::fs::write(dir.path().join("short.img"), [0u8; 4096]).expect("write");
    assert!(matches!(
        oracle.verify_file(10, 0, &dir.path().join("short.img")),
        Err(OracleError::Length { .. })
    ));
    assert!(matches!(
        oracle.verify_file_as(10, 0, &at_10, DiskFormat::FixedVhd),
        Err(OracleError::Length { .. } | OracleError::VhdFooter { .. })
    ));
    drop(oracle);

    // With a full scan, un-noted writes are recorded anyway.
    let vm2_scratch = dir.path().join("scratch-2");
    let mut oracle = Oracle::with_options(
        &vm2_scratch,
        &vm,
        OracleOptions {
            full_scan: true,
            ..OracleOptions::default()
        },
    )
    .expect("oracle");
    vm.write(0, 1 << 20, &[3u8; 4096]).expect("write");
    let record = oracle
        .record_bookmark(&vm, 20, Consistency::App)
        .expect("bookmark")
        .clone();
    assert_eq!(record.changed_chunks, 1);
    assert_eq!(record.logged_bytes, u64::from(DEFAULT_CHUNK_BYTES));
    let snapshot = vm.snapshot_digests(DEFAULT_CHUNK_BYTES).expect("snapshot");
    for (disk_index, digest) in snapshot.iter().enumerate() {
        assert_eq!(&oracle.digests_at(20, disk_index).expect("digests"), digest);
        oracle
            .verify_file(20, disk_index, &vm.paths()[disk_index])
            .expect("the VM's own file");
    }
    // The log is the oracle's: gone with it.
    let log = oracle.log_path().to_path_buf();
    assert!(log.exists());
    drop(oracle);
    assert!(!log.exists());
}

#[test]
fn oracle_verifies_a_vhd_made_by_the_engine() {
    let run = run(42, Pattern::HotSpot, 200, 1);
    let seq = *run.model_digests.keys().nth(2).expect("bookmarks");
    let path = run.scratch.join("engine.vhd");
    run.oracle.write_disk_at(seq, 0, &path).expect("rebuild");
    engine::vhd::convert_raw_to_fixed_vhd(&path, &engine::vhd::VhdCreateOptions::generate())
        .expect("convert");
    run.oracle.verify_file(seq, 0, &path).expect("verify");
    run.oracle
        .verify_file_as(seq, 0, &path, DiskFormat::FixedVhd)
        .expect("verify as vhd");
    // Padding between the disk's end and the footer must be zeros.
    let disk_bytes = disks()[0].size_bytes;
    flip(&path, disk_bytes + 100);
    match run.oracle.verify_file(seq, 0, &path) {
        Err(OracleError::VhdPadding { offset_bytes, .. }) => {
            assert_eq!(offset_bytes, disk_bytes + 100)
        }
        other => panic!("{other:?}"),
    }
    flip(&path, disk_bytes + 100);
    // A damaged footer is named.
    let len = std::fs::metadata(&path).expect("stat").len();
    flip(&path, len - 512 + 64);
    assert!(matches!(
        run.oracle.verify_file(seq, 0, &path),
        Err(OracleError::VhdFooter { .. })
    ));
    // Every bookmark of the run, every disk, from the model copies.
    for (seq, copy) in &run.model_copies {
        for (disk_index, bytes) in copy.iter().enumerate() {
            let out = run.scratch.join(format!("copy-{seq}-{disk_index}.img"));
            run.oracle
                .write_disk_at(*seq, disk_index, &out)
                .expect("rebuild");
            assert!(read(&out) == *bytes, "bookmark {seq} disk {disk_index}");
        }
    }
    let stats = run.oracle.stats();
    assert_eq!(stats.bookmarks, run.model_digests.len() as u64);
    assert!(stats.log_bytes > 0);
}
