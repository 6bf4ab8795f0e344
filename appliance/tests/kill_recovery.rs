//! A real process killed with SIGKILL at random moments (at least 20 times): after every kill,
//! every acknowledged frame is still staged; at the end the replicas equal the source and every
//! recovery point materializes to the source content at its bookmark (checked by digest).

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::Rng;
use disk_sim::source::image_digest;
use engine::delta::{Consistency, DeltaEncoder, DiskGeometry, EncoderOptions, StreamHeader};
use engine::durable::{DurableDir, StdDir};
use engine::meta::{MetaStore, item_key};
use engine::staging::{StagingConfig, StagingLog};

fn header() -> StreamHeader {
    StreamHeader {
        item_id: *b"kill-test-item-1",
        item_name: "kill-test".into(),
        first_seq: 1,
        disks: vec![
            DiskGeometry {
                size_bytes: 4 << 20,
                block_size_bytes: 4096,
            },
            DiskGeometry {
                size_bytes: 4 << 20,
                block_size_bytes: 512,
            },
        ],
    }
}

/// Writes the stream; returns the digest of every disk at every bookmark seq, and at the end.
fn write_stream(path: &Path, seed: u64) -> (BTreeMap<u64, Vec<u64>>, Vec<u64>) {
    let header = header();
    let file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut encoder = DeltaEncoder::new(file, &header, EncoderOptions::default()).unwrap();
    let mut model: Vec<Vec<u8>> = header
        .disks
        .iter()
        .map(|d| vec![0; d.size_bytes as usize])
        .collect();
    let mut rng = Rng::new(seed);
    let mut oracle = BTreeMap::new();
    let digests = |model: &Vec<Vec<u8>>| model.iter().map(|d| image_digest(d)).collect::<Vec<_>>();
    for i in 0..2400u64 {
        if i % 60 == 59 {
            let consistency = if i % 240 == 239 {
                Consistency::App
            } else {
                Consistency::Crash
            };
            let seq = encoder.bookmark(consistency, i, i, "kill").unwrap();
            oracle.insert(seq, digests(&model));
            continue;
        }
        let disk = (rng.next_u64() % 2) as usize;
        let block = u64::from(header.disks[disk].block_size_bytes);
        let blocks_total = header.disks[disk].size_bytes / block;
        let len_blocks = (1u64 << (rng.next_u64() % 7)).max(1) * (4096 / block).max(1);
        let len_blocks = len_blocks.min(blocks_total);
        let offset = (rng.next_u64() % (blocks_total - len_blocks + 1)) * block;
        let len = (len_blocks * block) as usize;
        let mut data = vec![0u8; len];
        let fill = rng.next_u64();
        for (n, chunk) in data.chunks_mut(8).enumerate() {
            let value = if n % 3 == 0 {
                fill.wrapping_add(n as u64)
            } else {
                fill
            };
            chunk.copy_from_slice(&value.to_le_bytes()[..chunk.len()]);
        }
        encoder.write(disk as u16, offset, &data).unwrap();
        model[disk][offset as usize..offset as usize + len].copy_from_slice(&data);
    }
    encoder.finish().unwrap();
    (oracle, digests(&model))
}

fn item_dir(data: &Path) -> std::path::PathBuf {
    let hex: String = header()
        .item_id
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    data.join("items").join(hex)
}

#[test]
fn ingest_killed_with_sigkill_twenty_times_loses_no_ack_and_every_point_is_exact() {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let stream = tmp.path().join("vm.drs");
    let data = tmp.path().join("data");
    let (oracle, final_digests) = write_stream(&stream, 0x5eed);
    let mut rng = Rng::new(0xdead_beef);
    let mut kills = 0;
    let mut max_acked = 0u64;
    let mut runs = 0;
    while kills < 20 {
        runs += 1;
        assert!(
            runs < 200,
            "the ingest finished too often before being killed"
        );
        let mut child = Command::new(env!("CARGO_BIN_EXE_appliance"))
            .args([
                "ingest",
                "--keep-points",
                "1000",
                "--queue-depth",
                "8",
                "--data-dir",
            ])
            .arg(&data)
            .arg(&stream)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut acked = 0u64;
            for line in BufReader::new(stdout).lines() {
                if let Some(seq) = line.unwrap().strip_prefix("ack ") {
                    acked = acked.max(seq.parse().unwrap());
                }
            }
            acked
        });
        std::thread::sleep(Duration::from_millis(20 + rng.next_u64() % 300));
        let finished = child.try_wait().unwrap().is_some();
        if !finished {
            child.kill().unwrap(); // SIGKILL
            kills += 1;
        }
        let status = child.wait().unwrap();
        max_acked = max_acked.max(reader.join().unwrap());
        if finished {
            assert!(
                status.success(),
                "ingest failed: {:?}",
                child
                    .stderr
                    .take()
                    .map(|s| std::io::read_to_string(s).unwrap())
            );
            // Done before the kill: start over on a fresh data directory to keep killing.
            std::fs::remove_dir_all(&data).unwrap();
            max_acked = 0;
            continue;
        }
        // Every acknowledged frame is on the cache disk.
        let staging_dir = item_dir(&data).join("staging");
        if staging_dir.exists() {
            let (log, _) = StagingLog::open(
                Arc::new(StdDir::open(&staging_dir).unwrap()),
                header(),
                StagingConfig::default(),
            )
            .unwrap();
            let meta = MetaStore::open(
                StdDir::open(&data)
                    .unwrap()
                    .open("meta.redb", true)
                    .unwrap(),
            )
            .unwrap();
            let (applied, _) = meta.state(item_key(&header().item_id)).unwrap();
            assert!(
                log.durable_seq().max(applied) >= max_acked,
                "kill {kills}: acked {max_acked}, staged {}, applied {applied}",
                log.durable_seq()
            );
        } else {
            assert_eq!(max_acked, 0);
        }
    }
    // A last run to the end.
    let out = Command::new(env!("CARGO_BIN_EXE_appliance"))
        .args(["ingest", "--keep-points", "1000", "--data-dir"])
        .arg(&data)
        .arg(&stream)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let verified = common::verify_item(
        &data,
        &header().item_id,
        &header().disks,
        &oracle,
        &final_digests,
        tmp.path(),
    );
    eprintln!("{kills} SIGKILLs over {runs} runs; {verified} points verified");
}
