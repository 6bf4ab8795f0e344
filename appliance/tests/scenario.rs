//! `disk-sim run` against a real `appliance serve` started beforehand: a built-in scenario
//! passes (its test failover and failover disks equal the source VM's), the kept source
//! images equal what the appliance materialized, and a scenario file with an unknown key is
//! refused.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use common::Server;
use disk_sim::scenario::{RunOptions, Scenario};

#[test]
fn a_scenario_runs_against_a_running_appliance_and_checks_its_disks() {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let server = Server::start(&data, &[]);
    let mut scenario = Scenario::builtin("failover").unwrap();
    scenario.disks_mib = vec![8, 4];
    scenario.ops = 300;
    let source = tmp.path().join("vm");
    let mut out = Vec::new();
    disk_sim::scenario::run(
        &scenario,
        &RunOptions {
            api: server.api.clone(),
            token: server.token.clone(),
            source_dir: Some(source.clone()),
        },
        &mut out,
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", String::from_utf8_lossy(&out)));
    let out = String::from_utf8(out).unwrap();
    assert!(out.contains("scenario failover passed"), "{out}");
    // The kept source images equal the failed-over disks (what an outside tool would check).
    let items = server.api().items().unwrap();
    let files = &items[0].failover.as_ref().unwrap().files;
    for (index, file) in files.iter().enumerate() {
        let materialized = std::fs::read(file).unwrap();
        let original =
            std::fs::read(source.join("failover").join(format!("disk-{index}.img"))).unwrap();
        assert!(materialized == original, "disk {index}");
    }
    server.stop();

    let file = tmp.path().join("bad.toml");
    std::fs::write(
        &file,
        "name = \"x\"\ndisks_mib = [4]\nops = 1\ncolour = 2\n",
    )
    .unwrap();
    let error = Scenario::load(file.to_str().unwrap()).unwrap_err();
    assert!(format!("{error:#}").contains("colour"), "{error:#}");
    assert!(Scenario::load("no-such-scenario").is_err());
}
