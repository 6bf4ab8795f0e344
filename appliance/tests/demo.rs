//! `disk-sim demo` (the README's main job) at small sizes, in CI: two real appliances, the
//! whole cycle, every disk checked byte for byte by the demo itself.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

#[test]
fn the_demo_completes_the_whole_cycle_with_every_check_passing() {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let options = disk_sim::demo::DemoOptions {
        dir: Some(tmp.path().join("demo")),
        keep: true,
        os_disk_mib: 8,
        seed: 7,
        appliance_bin: Some(env!("CARGO_BIN_EXE_appliance").into()),
        // The real-filesystem part needs the source-agent binary and root: not here.
        real_fs: disk_sim::demo::RealFs::Skip,
        source_agent_bin: None,
    };
    let mut out = Vec::new();
    let steps = disk_sim::demo::run(&options, &mut out)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", String::from_utf8_lossy(&out)));
    let out = String::from_utf8(out).unwrap();
    assert!(steps.iter().all(|s| s.ok), "{out}");
    assert_eq!(steps.len(), 15, "{out}");
    assert!(out.contains("all checks passed"), "{out}");
}
