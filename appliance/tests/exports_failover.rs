//! Failover in export mode and promote, judged by outside tools: the VM writes to the export
//! while the copy is held mid-way (the debug pause hook `export-failover:copied-chunk`), commit
//! is refused until the copy is done, the writes reach the target files, which equal what
//! `nbdcopy` reads from the export; a promoted drill's writes are in the failover's files
//! and no second export is made; after a SIGKILL (during the copy, or with a test failover's
//! drill) the same names serve the flushed writes.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;
mod nbd_tools;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use appliance_api::model::{
    CopyState, DiskMode, DiskSpec, EnableRequest, ExportPurpose, FailoverRequest, Format,
    ItemState, MaterializeRequest, PointSpec, PromoteRequest,
};
use common::{Server, item_id};
use engine::delta::DiskGeometry;
use nbd_tools::{Vm, agent, bookmark, data_dir, have, nbd_read, nbd_write, patched, wait_for};

/// Two disks: 8 MiB of 4 KiB blocks (8 copy chunks) and 4 MiB of 512-byte blocks.
fn geometry() -> Vec<DiskGeometry> {
    vec![
        DiskGeometry {
            size_bytes: 8 << 20,
            block_size_bytes: 4096,
        },
        DiskGeometry {
            size_bytes: 4 << 20,
            block_size_bytes: 512,
        },
    ]
}

/// Enables an item, streams seeded writes and one bookmark, closes the source; returns the
/// item, the point and the source's disks at it.
fn protected_item(server: &Server, name: &str, seed: u64) -> (String, u64, Vec<Vec<u8>>) {
    let (item, mut points) = protected_item_points(server, name, seed, 1);
    let (point, disks) = points.remove(0);
    (item, point, disks)
}

/// A point and the source's disks at it.
type PointDisks = (u64, Vec<Vec<u8>>);

/// As [`protected_item`] with `count` points, each after more writes: the points and the
/// source's disks at each, oldest first.
fn protected_item_points(
    server: &Server,
    name: &str,
    seed: u64,
    count: u64,
) -> (String, Vec<PointDisks>) {
    let geometry = geometry();
    let enabled = server
        .api()
        .enable(&EnableRequest {
            name: name.into(),
            disks: vec![DiskSpec::create(8, None), DiskSpec::create(4, Some(512))],
            policy: None,
            temporary_os_disk: None,
        })
        .unwrap();
    let item = enabled.item.id.clone();
    let mut vm = Vm::new(&geometry, seed);
    let source = agent(
        server,
        item_id(&item),
        &enabled.stream_token,
        name,
        &geometry,
    );
    let mut oracle = BTreeMap::new();
    let mut points = Vec::new();
    for id in 1..=count {
        for _ in 0..40 {
            vm.write(&source);
        }
        let point = bookmark(&mut oracle, &vm, &source, id);
        points.push((point, vm.disks.clone()));
    }
    source.close(std::time::Duration::from_secs(60)).unwrap();
    server.wait_job(enabled.job.id);
    if let Some((last, _)) = points.last() {
        nbd_tools::wait_point(server, &item, *last);
    }
    (item, points)
}

fn read_files(files: &[String]) -> Vec<Vec<u8>> {
    files.iter().map(|f| std::fs::read(f).unwrap()).collect()
}

#[test]
fn failover_in_export_mode_copies_while_the_vm_writes() {
    if !have(&["nbdcopy"]) {
        return;
    }
    let (tmp, data) = data_dir();
    let scratch = tmp.path();
    let pause: PathBuf = scratch.join("copy-pause");
    let setting = format!("export-failover:copied-chunk={}", pause.display());
    let server = Server::start_with_env(
        &data,
        "127.0.0.1:0",
        &[],
        &[("APPLIANCE_TEST_PAUSE_AT", setting.as_str())],
    );
    let (item, point, disks) = protected_item(&server, "fo", 5);
    let target = data.join("failover");
    let job = server
        .api()
        .failover(
            &item,
            &FailoverRequest {
                point: PointSpec::Id(point),
                target_dir: target.display().to_string(),
                format: Format::Raw,
                source_shut_down: true,
                mode: DiskMode::Export,
            },
        )
        .unwrap();
    // The copy holds after its first chunk (1 MiB of disk 0): the item is failed over on the
    // export, the copy is under way.
    let reached = PathBuf::from(format!("{}.reached", pause.display()));
    assert!(wait_for(&reached), "the copy never reached its first chunk");
    let view = server.api().item(&item).unwrap();
    assert_eq!(view.state, ItemState::FailedOver);
    let failover = view.failover.clone().unwrap();
    assert_eq!(failover.copy, Some(CopyState::Copying));
    let export_id = failover.export_id.clone().unwrap();
    let export = server.api().export_view(&export_id).unwrap();
    assert_eq!(
        (export.purpose, export.copy, export.point_id),
        (ExportPurpose::Failover, Some(CopyState::Copying), point)
    );
    let error = server.api().commit(&item).unwrap_err();
    assert_eq!(
        (error.status(), error.code()),
        (Some(409), Some("copy_not_done")),
        "{error}"
    );
    for (index, disk) in export.disks.iter().enumerate() {
        assert!(nbd_read(&disk.uri, scratch) == disks[index], "disk {index}");
    }

    // The VM writes during the copy: into the chunk already copied (offset 4096), into chunks
    // not copied yet, and zeroes over the point's data.
    let mut expected = Vec::new();
    for (index, disk) in export.disks.iter().enumerate() {
        let mut image = patched(
            &disks[index],
            &[(4096 + 11, 30_000, 7), (3 << 20, 100_000, 8 + index as u8)],
        );
        image[(2 << 20)..(2 << 20) + 65536].fill(0);
        let out = nbd_write(&disk.uri, &image, scratch);
        assert!(out.status.success(), "{out:?}");
        expected.push(image);
    }
    std::fs::write(&pause, b"go").unwrap();
    server.wait_job(job.id);

    let view = server.api().item(&item).unwrap();
    let failover = view.failover.clone().unwrap();
    assert_eq!(failover.copy, Some(CopyState::Done));
    let files = failover.files.clone();
    assert_eq!(files.len(), 2);
    let export = server.api().export_view(&export_id).unwrap();
    assert_eq!(export.copy, Some(CopyState::Done));
    for (index, disk) in export.disks.iter().enumerate() {
        let served = nbd_read(&disk.uri, scratch);
        assert!(
            served == expected[index],
            "disk {index}: the export after the switch lacks the VM's writes"
        );
        assert!(
            std::fs::read(&files[index]).unwrap() == served,
            "disk {index}: the target file differs from what nbdcopy reads from the export"
        );
    }
    // After the switch the export writes the target files.
    let after = patched(&expected[0], &[(5 << 20, 4096, 99)]);
    let out = nbd_write(&export.disks[0].uri, &after, scratch);
    assert!(out.status.success(), "{out:?}");
    assert!(std::fs::read(&files[0]).unwrap() == after);

    let view = server.api().commit(&item).unwrap();
    assert_eq!(view.state, ItemState::Committed);
    assert!(Path::new(&files[1]).exists());
    server.stop();
}

#[test]
fn a_promoted_drill_keeps_its_writes_with_no_second_export() {
    if !have(&["nbdcopy"]) {
        return;
    }
    let (tmp, data) = data_dir();
    let scratch = tmp.path();
    let server = Server::start(&data, &[]);
    let (item, point, disks) = protected_item(&server, "promote", 9);
    let job = server
        .api()
        .test_failover(
            &item,
            &MaterializeRequest {
                point: PointSpec::Id(point),
                target_dir: String::new(),
                format: Format::Raw,
                mode: DiskMode::Export,
            },
        )
        .unwrap();
    server.wait_job(job.id);
    let view = server.api().item(&item).unwrap();
    assert_eq!(view.state, ItemState::TestFailover);
    let drill_id = view.test_failover.unwrap().export_id.unwrap();
    let drill = server.api().export_view(&drill_id).unwrap();
    assert_eq!(drill.purpose, ExportPurpose::TestFailover);
    let mut expected = Vec::new();
    for (index, disk) in drill.disks.iter().enumerate() {
        assert!(nbd_read(&disk.uri, scratch) == disks[index], "disk {index}");
        let image = patched(&disks[index], &[(0, 5000, 40), (1 << 20, 9000, 41)]);
        let out = nbd_write(&disk.uri, &image, scratch);
        assert!(out.status.success(), "{out:?}");
        expected.push(image);
    }
    assert_ne!(expected, disks);

    let target = data.join("promoted");
    let job = server
        .api()
        .promote(
            &item,
            &PromoteRequest {
                target_dir: target.display().to_string(),
                source_shut_down: true,
            },
        )
        .unwrap();
    server.wait_job(job.id);
    let view = server.api().item(&item).unwrap();
    assert_eq!(view.state, ItemState::FailedOver);
    assert!(view.test_failover.is_none());
    let failover = view.failover.unwrap();
    assert_eq!(failover.export_id.as_deref(), Some(drill_id.as_str()));
    assert_eq!(failover.copy, Some(CopyState::Done));
    assert!(
        read_files(&failover.files) == expected,
        "the failover's files hold the drill's writes"
    );
    let exports = server.api().exports().unwrap();
    assert_eq!(exports.len(), 1, "no second export: {exports:?}");
    assert_eq!(
        (exports[0].id.as_str(), exports[0].purpose),
        (drill_id.as_str(), ExportPurpose::Failover)
    );
    for (index, disk) in exports[0].disks.iter().enumerate() {
        assert_eq!(disk.uri, drill.disks[index].uri, "the same URIs");
        assert!(nbd_read(&disk.uri, scratch) == expected[index]);
    }
    let view = server.api().commit(&item).unwrap();
    assert_eq!(view.state, ItemState::Committed);
    server.stop();
}

/// A SIGKILL while the copy is held mid-way: after the start the item is still failed over
/// and the same URIs serve the point with the VM's flushed writes (the VM can go on running
/// on the export); the cut copy starts again in a new job, its target files then hold the
/// point and those writes, and commit is allowed.
#[test]
fn a_sigkill_during_the_copy_keeps_the_vm_on_its_export_and_the_copy_resumes() {
    if !have(&["nbdcopy"]) {
        return;
    }
    let (tmp, data) = data_dir();
    let scratch = tmp.path();
    let pause: PathBuf = scratch.join("copy-pause");
    let setting = format!("export-failover:copied-chunk={}", pause.display());
    let server = Server::start_with_env(
        &data,
        "127.0.0.1:0",
        &[],
        &[("APPLIANCE_TEST_PAUSE_AT", setting.as_str())],
    );
    let (item, point, disks) = protected_item(&server, "fo-kill", 13);
    let job = server
        .api()
        .failover(
            &item,
            &FailoverRequest {
                point: PointSpec::Id(point),
                target_dir: data.join("failover").display().to_string(),
                format: Format::Raw,
                source_shut_down: true,
                mode: DiskMode::Export,
            },
        )
        .unwrap();
    let reached = PathBuf::from(format!("{}.reached", pause.display()));
    assert!(wait_for(&reached), "the copy never reached its first chunk");
    let export_id = server
        .api()
        .item(&item)
        .unwrap()
        .failover
        .unwrap()
        .export_id
        .unwrap();
    let before = server.api().export_view(&export_id).unwrap();
    let mut expected = disks.clone();
    expected[0] = patched(&disks[0], &[(4096 + 5, 30_000, 7), (6 << 20, 8192, 8)]);
    let out = nbd_write(&before.disks[0].uri, &expected[0], scratch);
    assert!(out.status.success(), "{out:?}");
    server.kill();

    let server = Server::start(&data, &[]);
    let view = server.api().item(&item).unwrap();
    assert_eq!(view.state, ItemState::FailedOver, "{view:?}");
    assert_ne!(
        server.api().job(job.id).unwrap().state,
        appliance_api::model::JobState::Running,
        "the killed process's job is not shown running"
    );
    // The cut copy starts again in a new job and ends; until then commit waits for it.
    let mut done = view;
    for _ in 0..3000 {
        if done.failover.as_ref().and_then(|f| f.copy) != Some(CopyState::Copying) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
        done = server.api().item(&item).unwrap();
    }
    assert_eq!(
        done.failover.as_ref().and_then(|f| f.copy),
        Some(CopyState::Done),
        "{done:?}"
    );
    assert_ne!(done.last_job, Some(job.id), "a new job copied");
    let after = server.api().export_view(&export_id).unwrap();
    assert_eq!(after.purpose, ExportPurpose::Failover);
    assert_eq!(after.copy, Some(CopyState::Done));
    let files = done.failover.as_ref().unwrap().files.clone();
    for (index, disk) in after.disks.iter().enumerate() {
        let name = |uri: &str| uri.rsplit_once('/').map(|(_, n)| n.to_owned());
        assert_eq!(
            name(&disk.uri),
            name(&before.disks[index].uri),
            "the same export names (the port is new)"
        );
        assert!(
            nbd_read(&disk.uri, scratch) == expected[index],
            "disk {index}: the point with the VM's flushed writes"
        );
        assert!(
            std::fs::read(&files[index]).unwrap() == expected[index],
            "disk {index}: the target file holds the point and the flushed writes"
        );
    }
    server.api().commit(&item).unwrap();
    server.stop();
}

/// A test failover's drill (export mode) after a SIGKILL: served again under the same names
/// with its flushed writes, the item still in test failover; the clean-up then drops it and
/// its overlay, and the item is protected.
#[test]
fn a_test_failover_drill_survives_sigkill_and_cleans_up() {
    if !have(&["nbdcopy"]) {
        return;
    }
    let (tmp, data) = data_dir();
    let scratch = tmp.path();
    let server = Server::start(&data, &[]);
    let (item, point, disks) = protected_item(&server, "tf-kill", 17);
    let job = server
        .api()
        .test_failover(
            &item,
            &MaterializeRequest {
                point: PointSpec::Id(point),
                target_dir: String::new(),
                format: Format::Raw,
                mode: DiskMode::Export,
            },
        )
        .unwrap();
    server.wait_job(job.id);
    let drill_id = server
        .api()
        .item(&item)
        .unwrap()
        .test_failover
        .unwrap()
        .export_id
        .unwrap();
    let before = server.api().export_view(&drill_id).unwrap();
    let mut expected = disks.clone();
    expected[1] = patched(&disks[1], &[(512 * 3, 70_000, 21)]);
    let out = nbd_write(&before.disks[1].uri, &expected[1], scratch);
    assert!(out.status.success(), "{out:?}");
    server.kill();

    let server = Server::start(&data, &[]);
    let view = server.api().item(&item).unwrap();
    assert_eq!(view.state, ItemState::TestFailover);
    let after = server.api().export_view(&drill_id).unwrap();
    let name = |uri: &str| uri.rsplit_once('/').map(|(_, n)| n.to_owned());
    for (index, disk) in after.disks.iter().enumerate() {
        assert_eq!(name(&disk.uri), name(&before.disks[index].uri));
        assert!(
            nbd_read(&disk.uri, scratch) == expected[index],
            "disk {index} after SIGKILL"
        );
    }
    let overlay = data
        .join("items")
        .join(&item)
        .join("exports")
        .join(&drill_id);
    assert!(overlay.is_dir(), "{overlay:?}");
    let view = server.api().test_failover_cleanup(&item).unwrap();
    assert_eq!(view.state, ItemState::Protected);
    assert!(server.api().exports().unwrap().is_empty());
    assert!(!overlay.exists(), "the clean-up removes the overlay");
    server.stop();
}

/// Change point of a failover in export mode: before the VM's first write it is allowed while
/// the copy runs (held at the gate, cancelled, the disks rebased, the copy started again: the
/// target files then hold the new point); after a write it is refused naming why.
#[test]
fn change_point_in_export_mode_before_the_first_write_then_refused() {
    if !have(&["nbdcopy"]) {
        return;
    }
    let (tmp, data) = data_dir();
    let scratch = tmp.path();
    let copy_pause: PathBuf = scratch.join("copy-pause");
    let held_pause: PathBuf = scratch.join("held-pause");
    let setting = format!(
        "export-failover:copied-chunk={};export-change-point:held={}",
        copy_pause.display(),
        held_pause.display()
    );
    let server = Server::start_with_env(
        &data,
        "127.0.0.1:0",
        &[],
        &[("APPLIANCE_TEST_PAUSE_AT", setting.as_str())],
    );
    let (item, points) = protected_item_points(&server, "fo-change", 17, 2);
    let (old_point, old_disks) = points[0].clone();
    let (new_point, new_disks) = points[1].clone();
    assert_ne!(old_disks, new_disks);
    let job = server
        .api()
        .failover(
            &item,
            &FailoverRequest {
                point: PointSpec::Id(new_point),
                target_dir: data.join("failover").display().to_string(),
                format: Format::Raw,
                source_shut_down: true,
                mode: DiskMode::Export,
            },
        )
        .unwrap();
    let reached = |path: &Path| PathBuf::from(format!("{}.reached", path.display()));
    assert!(wait_for(&reached(&copy_pause)), "the copy never started");
    // The change point holds the copy; then the copy goes on to its next chunk and stops.
    let api = server.api().clone();
    let change = {
        let item = item.clone();
        std::thread::spawn(move || {
            api.change_point(
                &item,
                &appliance_api::model::ChangePointRequest {
                    point: PointSpec::Id(old_point),
                },
            )
        })
    };
    assert!(
        wait_for(&reached(&held_pause)),
        "the change point never held the copy"
    );
    std::fs::write(&held_pause, b"").unwrap();
    std::fs::write(&copy_pause, b"").unwrap();
    let changed = change.join().unwrap().unwrap();
    assert_eq!(
        changed.state,
        appliance_api::model::JobState::Succeeded,
        "{changed:?}"
    );
    server.wait_job(job.id);
    let view = server.api().item(&item).unwrap();
    let failover = view.failover.unwrap();
    assert_eq!(failover.point_id, old_point);
    assert_eq!(failover.copy, Some(CopyState::Done));
    assert!(
        read_files(&failover.files) == old_disks,
        "the target files hold the new choice, the older point"
    );
    let export = server
        .api()
        .export_view(failover.export_id.as_deref().unwrap())
        .unwrap();
    assert_eq!(export.point_id, old_point);
    for (index, disk) in export.disks.iter().enumerate() {
        assert!(
            nbd_read(&disk.uri, scratch) == old_disks[index],
            "disk {index}"
        );
    }
    // The VM writes: another point would lose that, so change point is refused.
    let written = patched(&old_disks[0], &[(8192, 4096, 9)]);
    let out = nbd_write(&export.disks[0].uri, &written, scratch);
    assert!(out.status.success(), "{out:?}");
    let error = server
        .api()
        .change_point(
            &item,
            &appliance_api::model::ChangePointRequest {
                point: PointSpec::Id(new_point),
            },
        )
        .unwrap_err();
    assert_eq!(error.status(), Some(409), "{error}");
    assert!(
        matches!(error.code(), Some("written_since_failover" | "copy_done")),
        "{error}"
    );
    assert_eq!(
        server.api().item(&item).unwrap().failover.unwrap().point_id,
        old_point
    );
    server.stop();
}

/// After its copy, a failover's export serves the published files; after a restart it opens
/// them again through their directory and by the identities recorded, so a link planted at a
/// file's name meanwhile is refused (the export is not served) and what it points at is
/// never written.
#[test]
fn a_switched_failover_export_reopens_its_files_by_identity_only() {
    if !have(&["nbdcopy"]) {
        return;
    }
    let (tmp, data) = data_dir();
    let scratch = tmp.path();
    let server = Server::start(&data, &[]);
    let (item, point, disks) = protected_item(&server, "fo-reopen", 21);
    let job = server
        .api()
        .failover(
            &item,
            &FailoverRequest {
                point: PointSpec::Id(point),
                target_dir: data.join("failover").display().to_string(),
                format: Format::Raw,
                source_shut_down: true,
                mode: DiskMode::Export,
            },
        )
        .unwrap();
    server.wait_job(job.id);
    let failover = server.api().item(&item).unwrap().failover.unwrap();
    assert_eq!(failover.copy, Some(CopyState::Done));
    let export_id = failover.export_id.clone().unwrap();
    server.stop();

    let server = Server::start(&data, &[]);
    let export = server.api().export_view(&export_id).unwrap();
    for (index, disk) in export.disks.iter().enumerate() {
        assert!(nbd_read(&disk.uri, scratch) == disks[index], "disk {index}");
    }
    server.stop();

    // A link in the place of disk 0's file: the export is not served, the victim untouched.
    let victim = scratch.join("victim");
    std::fs::write(&victim, b"outside").unwrap();
    let file = PathBuf::from(&failover.files[0]);
    std::fs::rename(&file, scratch.join("moved")).unwrap();
    std::os::unix::fs::symlink(&victim, &file).unwrap();
    let server = Server::start(&data, &[]);
    let error = server.api().export_view(&export_id).unwrap_err();
    assert_eq!(error.status(), Some(404), "{error}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"outside");
    assert!(file.is_symlink(), "the planted link is left alone");
    server.stop();
}
