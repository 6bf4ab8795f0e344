//! The source agent SIGKILLed mid-workload, like a VM host that crashes.
//!
//! An ext4 on the agent's disk (through `nbdfuse` + a loop device) takes fsync'd records
//! while the appliance is frozen (SIGSTOP: the link stays up, nothing is acknowledged, so
//! writes are in flight); the agent is SIGKILLed and the VM's side torn down (its NBD
//! connection died with the host). The appliance resumes, the agent restarts on the same
//! state: it reports the bytes its change map recovered, its catch-up drains, a bookmark
//! after it lands on a replica equal to the agent's disk byte for byte (`qemu-img compare`
//! judges), the ext4 there is clean after journal replay and holds every record the writer
//! was told was durable; and the agent resent far less than the disk (both printed).
//!
//! Needs root, `/dev/fuse` and the tools (`scripts/install-tools.sh`); skips otherwise,
//! saying why.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod agent_tools;
mod common;
mod nbd_tools;

use std::path::PathBuf;
use std::process::Command;

use agent_tools::{
    AgentProc, Attached, Mount, RecordWriter, agent_files, assert_records, assert_same_sums,
    bookmark, copy_tree, e2fsck_after_replay, enable, mkfs_ext4, point_of, preflight, repo, serial,
    signal_server, status, tree_sums, wait_caught_up, wait_protected,
};
use appliance_api::model::{DiskMode, Format, ItemState, MaterializeRequest, PointSpec};
use common::Server;
use nbd_tools::{data_dir, ok, run};
use nix::sys::signal::Signal;

const TOOLS: &[&str] = &[
    "nbdfuse",
    "fusermount3",
    "losetup",
    "mkfs.ext4",
    "mount",
    "umount",
    "e2fsck",
    "dumpe2fs",
    "sha256sum",
    "qemu-img",
];

const DISK_BYTES: u64 = 512 << 20;

#[test]
fn a_sigkilled_agent_resends_only_its_change_map_and_loses_nothing_acknowledged() {
    let _serial = serial();
    if !preflight(TOOLS) {
        return;
    }
    let (tmp, data) = data_dir();
    let scratch = tmp.path();
    let server = Server::start(&data, &[]);
    let item = enable(&server, "fs-crash", DISK_BYTES);
    // A small activity log (64 extents of 1 MiB): what a crash can leave in doubt is bounded
    // by it and the saved map.
    let files = agent_files(
        &scratch.join("agent"),
        &server,
        &item,
        DISK_BYTES,
        "activity_log_extent_mib = 1\nactivity_log_extents = 64",
    );
    let config = files.config.as_path();
    let agent = AgentProc::start(&files);
    let mut vm = Attached::attach(&scratch.join("fuse"), agent.uri("os"));
    mkfs_ext4(vm.dev());
    wait_protected(&server, &item, config);
    let fs = vm.mount(&scratch.join("fs"), "");
    copy_tree(&repo().join("engine/src"), &fs.join("engine"));
    ok(&mut Command::new("sync"));
    let synced = tree_sums(&fs.join("engine"));

    // Records fsync'd one by one; then the appliance freezes and the writer goes on.
    let writer = RecordWriter::start(&fs.join("records.bin"));
    writer.wait_acked(50);
    let before = status(config);
    signal_server(&server, Signal::SIGSTOP);
    let at_stop = writer.acked();
    writer.wait_acked(at_stop + 200);
    // More in flight: a tree copied (page cache, written back as the kernel likes).
    copy_tree(&repo().join("appliance/src"), &fs.join("appliance"));
    writer.wait_acked(writer.acked() + 50);
    let last = status(config);
    println!(
        "before the kill: link {}, acked seq {}, next seq {}, backlog {} bytes",
        last.link(),
        last.0["acked_seq"],
        last.0["next_seq"],
        last.0["backlog_bytes"]
    );

    // The host crashes: the agent dies, and the VM's NBD connection with it.
    agent.kill();
    vm.crash();
    let (acked, ended) = writer.finish();
    println!("the writer had {acked} records acknowledged; it ended with {ended:?}");
    let changed_in_outage = last.sum("written_bytes") - before.sum("written_bytes");
    let written = last.sum("written_bytes");
    signal_server(&server, Signal::SIGCONT);

    // The agent restarts on its state: it recovers the regions in doubt and resends them.
    let agent = AgentProc::start(&files);
    let recovered = status(config).sum("recovered_bytes");
    assert!(
        recovered > 0,
        "nothing recovered after a SIGKILL with writes in flight"
    );
    let caught_up = wait_caught_up(config);
    let point = bookmark(config, false, &[], "after the crash", 60);
    let resent = status(config).sum("resent_bytes");
    println!(
        "SIGKILL: disk {DISK_BYTES} bytes; written through the agent before the kill \
         {written} bytes ({changed_in_outage} while the appliance was frozen); recovered \
         (marked unsent at restart) {recovered} bytes; resent by the catch-up {resent} bytes \
         (grain {} bytes)",
        caught_up.0["disks"][0]["grain_bytes"]
    );
    assert!(
        recovered <= DISK_BYTES / 4 && resent <= DISK_BYTES / 4,
        "recovered {recovered} and resent {resent} bytes of a {DISK_BYTES}-byte disk after a \
         crash"
    );

    // The replica at the bookmark after the catch-up is the agent's disk, byte for byte.
    let view = point_of(&server, &item.id, point.bookmark_id);
    let job = server
        .api()
        .test_failover(
            &item.id,
            &MaterializeRequest {
                point: PointSpec::Id(view.id),
                target_dir: data.join("tf").display().to_string(),
                format: Format::Raw,
                mode: DiskMode::Copy,
            },
        )
        .unwrap();
    server.wait_job(job.id);
    let replica = PathBuf::from(
        &server
            .api()
            .item(&item.id)
            .unwrap()
            .test_failover
            .unwrap()
            .files[0],
    );
    let out = run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&files.image)
        .arg(&replica));
    assert_eq!(
        out.status.code(),
        Some(0),
        "qemu-img compare agent-disk replica-point: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // A clean ext4 after journal replay, with every acknowledged record.
    let replayed = e2fsck_after_replay(&replica, &scratch.join("replayed.img"), "after the crash");
    let view = server.api().test_failover_cleanup(&item.id).unwrap();
    assert_eq!(view.state, ItemState::Protected, "{view:?}");
    let mounted = Mount::at(
        &replayed.display().to_string(),
        &scratch.join("replayed-fs"),
        "ro,loop",
    );
    assert_records(&mounted.dir.join("records.bin"), acked, "after the crash");
    assert_same_sums(
        &synced,
        &tree_sums(&mounted.dir.join("engine")),
        "the tree synced before the crash",
    );
    mounted.unmount();
    println!("after the crash: e2fsck clean after journal replay; {acked} records all there");

    agent.stop();
    server.stop();
}
