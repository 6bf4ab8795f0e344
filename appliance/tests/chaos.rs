//! The chaos run (`disk_sim::chaos`) against the real `appliance` binary: a seeded workload
//! through the fault-injecting proxy, SIGKILLs of `appliance serve` at seeded moments, then
//! every retained recovery point and the final state verified through the control API.
//!
//! `chaos_seed_1_three_kills` is the CI chaos run (small: a few seconds). The longer runs are
//! `#[ignore]`d: `cargo test -p appliance --test chaos -- --ignored --nocapture`.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::path::PathBuf;

use disk_sim::chaos::{ChaosOptions, ChaosReport, run};

fn options(seed: u64, kills: u32) -> ChaosOptions {
    ChaosOptions {
        seed,
        kills,
        appliance_bin: Some(PathBuf::from(env!("CARGO_BIN_EXE_appliance"))),
        ..ChaosOptions::default()
    }
}

/// Runs one chaos run in a temporary directory under the target directory; prints its
/// output; panics (with the output and the replay command) unless it passed.
fn chaos(mut options: ChaosOptions) -> ChaosReport {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    options.work_dir = Some(tmp.path().to_path_buf());
    let mut out = Vec::new();
    let result = run(&options, &mut out);
    let text = String::from_utf8_lossy(&out);
    eprint!("{text}");
    let report = result.unwrap_or_else(|e| panic!("{e:#}\n{text}"));
    assert_eq!(report.frames_lost, 0, "{text}");
    assert_eq!(report.kills, options.kills, "{text}");
    assert!(report.points_verified >= report.points_expected, "{text}");
    report
}

#[test]
fn chaos_seed_1_three_kills() {
    let report = chaos(ChaosOptions {
        writes: 1000,
        size_mib: 8,
        net_faults: 20,
        bookmark_every: 25,
        ..options(1, 3)
    });
    assert!(report.points_verified >= 40, "{report:?}");
    assert!(
        report.sessions > 3,
        "the kills and faults forced reconnects"
    );
}

#[test]
fn same_seed_same_workload() {
    let small = |seed| ChaosOptions {
        writes: 150,
        size_mib: 4,
        net_faults: 4,
        bookmark_every: 30,
        ..options(seed, 1)
    };
    let a = chaos(small(5));
    let b = chaos(small(5));
    assert_eq!(a.workload_digest, b.workload_digest);
    assert_eq!(a.faults_scheduled, b.faults_scheduled);
    assert_eq!(a.frames_acked, b.frames_acked);
}

/// The full-size runs: seeds 1..=6, 20 kills each (the `disk-sim chaos` defaults).
#[test]
#[ignore = "long: about 15 s per seed; run with --ignored"]
fn chaos_seeds_1_to_6_with_20_kills() {
    let mut lines = Vec::new();
    for seed in 1..=6 {
        let report = chaos(options(seed, 20));
        lines.push(format!(
            "seed {seed}: kills {}, faults injected: drop {} flip {} duplicate {} reorder {} \
             delayed chunks {}, frames acked {}, frames lost {}, points verified {}/{}, {:.1} s",
            report.kills,
            report.proxy.drops,
            report.proxy.flips,
            report.proxy.duplicates,
            report.proxy.reorders,
            report.proxy.delays,
            report.frames_acked,
            report.frames_lost,
            report.points_verified,
            report.points_expected,
            report.elapsed.as_secs_f64()
        ));
    }
    for line in lines {
        eprintln!("{line}");
    }
}
