//! Start-up never stops on one item (issue 11, observation 8): a real `appliance serve` is
//! stopped, one thing of one item is damaged, and the restarted process must serve: the
//! damaged item quarantined (listed with the reason and what to do, its slots held) or rolled
//! back, and a healthy item replicating and failing over exactly. And `serve` killed at every
//! step of enable (`APPLIANCE_TEST_CRASH_AT`, see `appliance::testhook`) restarts with the item
//! either fully enabled or fully absent, no slot leaked or double-booked, and enable working.

// Shared with the other test binaries, which allow its unwraps crate-wide; here only it.
#[allow(clippy::unwrap_used)]
mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use appliance::db::ControlStore;
use appliance::items::ItemRecord;
use appliance_api::model::{
    DiskSpec, EnableRequest, Format, ItemState, ItemView, JobKind, JobState, JobView,
    MaterializeRequest, Op, PointSpec, SlotUse,
};
use common::{Server, item_id};
use engine::delta::{Consistency, DiskGeometry};
use source_agent::sender::{Agent, AgentConfig};

/// Longest any state is polled for.
const DEADLINE: Duration = Duration::from_secs(60);
/// Size of the healthy item's one disk.
const DISK_BYTES: u64 = 4 << 20;

/// The healthy item: its agent settings and the source disk image.
struct Healthy {
    id: String,
    token: String,
    image: Vec<u8>,
    bookmark: u64,
}

fn agent(server: &Server, healthy: &Healthy) -> Agent {
    let geometry = vec![DiskGeometry {
        size_bytes: DISK_BYTES,
        block_size_bytes: 4096,
    }];
    let mut config = AgentConfig::new(
        server.data,
        item_id(&healthy.id),
        healthy.token.as_bytes(),
        "good",
        geometry,
    );
    config.backoff_initial = Duration::from_millis(20);
    config.backoff_max = Duration::from_millis(200);
    config.max_attempts = 100;
    Agent::connect(config).expect("the agent connects")
}

/// Streams one write and a bookmark to the healthy item and waits until its point is applied.
fn replicate(server: &Server, healthy: &mut Healthy, fill: u8) {
    let agent = agent(server, healthy);
    let offset = u64::from(fill) * 65536 % (DISK_BYTES - 65536);
    let data: Vec<u8> = (0..65536u32)
        .map(|i| fill ^ (i % 251) as u8 ^ (i >> 12) as u8)
        .collect();
    agent.write(0, offset, &data).expect("a write queued");
    healthy.image[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
    healthy.bookmark += 1;
    let seq = agent
        .bookmark(Consistency::Crash, healthy.bookmark, healthy.bookmark, "b")
        .expect("a bookmark queued");
    agent
        .close(DEADLINE)
        .expect("every frame acknowledged and the session closed");
    server
        .api()
        .wait_point(&healthy.id, seq, Duration::from_millis(20), DEADLINE)
        .unwrap_or_else(|e| panic!("point {seq} never applied: {e}"));
}

/// A test failover of the healthy item at its latest processed point equals the source.
fn fails_over_exactly(server: &Server, healthy: &Healthy, target: &Path) {
    let request = MaterializeRequest {
        point: PointSpec::latest_processed(),
        target_dir: target.display().to_string(),
        format: Format::Raw,
        mode: Default::default(),
    };
    let job = server
        .api()
        .test_failover(&healthy.id, &request)
        .expect("202");
    server.wait_job(job.id);
    let disk = std::fs::read(target.join("disk-0.raw")).expect("the test-failover disk");
    assert!(
        disk == healthy.image,
        "the test-failover disk equals the source"
    );
    server
        .api()
        .test_failover_cleanup(&healthy.id)
        .expect("cleaned up");
}

/// Enable of new disks of these sizes in MiB.
fn enable_request(name: &str, sizes_mib: &[u64]) -> EnableRequest {
    EnableRequest {
        name: name.into(),
        disks: sizes_mib
            .iter()
            .map(|&m| DiskSpec::create(m, None))
            .collect(),
        policy: None,
        temporary_os_disk: None,
    }
}

/// A healthy protected item and a second item `victim` (two disks, waiting for its agent);
/// the server is stopped. Returns the healthy item and the victim's id.
fn setup(data: &Path) -> (Healthy, String) {
    let server = Server::start(data, &[]);
    let enabled = server
        .api()
        .enable(&enable_request("good", &[DISK_BYTES >> 20]))
        .expect("enabled");
    let mut healthy = Healthy {
        id: enabled.item.id.clone(),
        token: enabled.stream_token.clone(),
        image: vec![0; DISK_BYTES as usize],
        bookmark: 0,
    };
    replicate(&server, &mut healthy, 1);
    server.wait_job(enabled.job.id);
    let victim = server
        .api()
        .enable(&enable_request("victim", &[1, 1]))
        .expect("enabled")
        .item
        .id;
    server.stop();
    assert!(owner_only(&data.join("items")) > 0, "files in items");
    // Records, jobs and slots are in the control store, owner only too.
    assert_eq!(owner_only_file(&data.join("control.redb")), 1);
    (healthy, victim)
}

/// Every directory under `dir` is mode 0700 and every file 0600 (VM data: replicas,
/// staging, preserve files, records, tokens). Returns the files seen.
fn owner_only(dir: &Path) -> usize {
    use std::os::unix::fs::PermissionsExt;
    let mut files = 0;
    for entry in std::fs::read_dir(dir).expect("listing") {
        let entry = entry.expect("an entry");
        let meta = entry.metadata().expect("its metadata");
        let mode = meta.permissions().mode() & 0o777;
        if meta.is_dir() {
            assert_eq!(mode, 0o700, "{}", entry.path().display());
            files += owner_only(&entry.path());
        } else {
            assert_eq!(mode, 0o600, "{}", entry.path().display());
            files += 1;
        }
    }
    files
}

/// A file of mode 0600 (returns 1, as one file seen).
fn owner_only_file(path: &Path) -> usize {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .expect("its metadata")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "{}", path.display());
    1
}

fn items(server: &Server) -> Vec<ItemView> {
    server.api().items().expect("the items")
}

/// Every attached LUN once, and every disk of every listed item that holds slots with one.
fn check_slots(server: &Server) {
    let slots = server.api().slots().expect("the slots");
    let mut disks = BTreeSet::new();
    let mut paths = BTreeSet::new();
    for row in &slots.slots {
        if row.state == SlotUse::Attached {
            assert!(
                disks.insert((row.item.clone(), row.disk_index)),
                "a disk holds two LUNs: {slots:?}"
            );
            assert!(paths.insert(row.path.clone()), "a path twice: {slots:?}");
        }
    }
    let mut expected = BTreeSet::new();
    for item in items(server) {
        if matches!(item.state, ItemState::Disabled | ItemState::FailedBack) {
            continue;
        }
        for disk in &item.disks {
            assert!(disk.lun.is_some(), "a disk without a slot: {item:?}");
            expected.insert((Some(item.id.clone()), Some(disk.index)));
        }
    }
    assert_eq!(
        disks, expected,
        "attached slots are exactly the items' disks: {slots:?}"
    );
}

/// Restarts after `damage`, checks the victim with `check`, the healthy item replicating and
/// failing over exactly, and slots consistent; then disables a quarantined victim.
fn after_damage(damage: impl FnOnce(&Path, &str), check: impl FnOnce(&Server, Option<ItemView>)) {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("a temporary directory");
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).expect("creating the data directory");
    let (mut healthy, victim) = setup(&data);
    damage(&data, &victim);
    let server = Server::start(&data, &[]);
    let found = items(&server).into_iter().find(|i| i.id == victim);
    check(&server, found.clone());
    check_slots(&server);
    replicate(&server, &mut healthy, 2);
    fails_over_exactly(&server, &healthy, &data.join("tf-1"));
    if found.is_some_and(|v| v.state == ItemState::Quarantined) {
        let view = server.api().disable(&victim).expect("disabled");
        assert_eq!(view.state, ItemState::Disabled, "{view:?}");
        check_slots(&server);
        assert!(!data.join("items").join(&victim).exists(), "purged");
    }
    server.stop();
    // And once more: the next start is clean (a disabled item is gone).
    let server = Server::start(&data, &[]);
    assert!(
        items(&server)
            .iter()
            .all(|i| i.id != victim || i.state != ItemState::Disabled),
        "a disabled item is purged"
    );
    replicate(&server, &mut healthy, 3);
    fails_over_exactly(&server, &healthy, &data.join("tf-2"));
    check_slots(&server);
    server.stop();
}

fn quarantined(view: Option<ItemView>, reason: &str) -> ItemView {
    let view = view.expect("the damaged item is listed");
    assert_eq!(view.state, ItemState::Quarantined, "{view:?}");
    let quarantine = view.quarantine.as_ref().expect("a quarantine");
    let why = quarantine.reason.as_str();
    assert!(why.contains(reason), "{view:?}");
    assert!(
        quarantine.action.contains("disable") && quarantine.action.contains("restart"),
        "{view:?}"
    );
    assert!(view.health.starts_with("quarantined"));
    assert_eq!(view.allowed_operations, [Op::Disable], "{view:?}");
    view
}

/// The control store of a stopped appliance's data directory.
fn control(data: &Path) -> ControlStore {
    ControlStore::open_data_dir(data).expect("the control store")
}

/// The stored record of `item` (its JSON bytes).
fn record(data: &Path, item: &str) -> Vec<u8> {
    let id = item_id(item);
    control(data)
        .record_bytes(&id)
        .expect("reading the store")
        .expect("the record")
}

/// Replaces the stored record of `item` with `bytes` (damage from outside the appliance).
fn write_record(data: &Path, item: &str, bytes: &[u8]) {
    let id = item_id(item);
    control(data)
        .commit("damaging a record", |c| c.put_record_bytes(&id, bytes))
        .expect("rewriting it");
}

/// Replaces the stored job `job` with `bytes`.
fn write_job(data: &Path, job: u64, bytes: &[u8]) {
    control(data)
        .commit("damaging a job", |c| c.put_job_bytes(job, bytes))
        .expect("rewriting the job");
}

#[test]
fn a_truncated_record_quarantines_its_item_only() {
    after_damage(
        |data, victim| {
            let bytes = record(data, victim);
            write_record(data, victim, &bytes[..bytes.len() / 2]);
        },
        |server, view| {
            let view = quarantined(view, "not an item record");
            // Its slots stay held (the disks' paths from the slot table).
            let disks = &view.disks;
            assert_eq!(disks.len(), 2, "{view:?}");
            assert!(disks.iter().all(|d| d.lun.is_some()), "{view:?}");
            let metrics = server.api().metrics().expect("metrics text");
            assert!(metrics.contains("state=\"quarantined\""), "{metrics}");
        },
    );
}

#[test]
fn an_unknown_state_quarantines_its_item_only() {
    after_damage(
        |data, victim| {
            let text = String::from_utf8(record(data, victim)).expect("a JSON record");
            let changed = text.replace("\"initial_replication\"", "\"frozen\"");
            assert_ne!(text, changed);
            write_record(data, victim, changed.as_bytes());
        },
        |_, view| {
            quarantined(view, "unknown variant `frozen`");
        },
    );
}

#[test]
fn a_flipped_byte_in_the_header_quarantines_its_item_only() {
    after_damage(
        |data, victim| {
            let path = data.join("items").join(victim).join("header.drs");
            let mut bytes = std::fs::read(&path).expect("the header");
            let middle = bytes.len() / 2;
            bytes[middle] ^= 0x20;
            std::fs::write(&path, bytes).expect("rewriting it");
        },
        |_, view| {
            quarantined(view, "header.drs");
        },
    );
}

#[test]
fn an_empty_item_directory_is_rolled_back() {
    let empty = "00112233445566778899aabbccddeeff";
    after_damage(
        |data, _| std::fs::create_dir(data.join("items").join(empty)).expect("an empty dir"),
        |server, view| {
            assert_eq!(
                view.expect("the victim is untouched").state,
                ItemState::InitialReplication
            );
            assert!(items(server).iter().all(|i| i.id != empty));
            let data = PathBuf::from(server.api().appliance().expect("the appliance").data_dir);
            assert!(!data.join("items").join(empty).exists(), "rolled back");
        },
    );
}

#[test]
fn a_damaged_job_file_leaves_its_item_served_with_a_new_job() {
    after_damage(
        |data, victim| {
            let record: ItemRecord =
                serde_json::from_slice(&record(data, victim)).expect("a record");
            let job = record.last_job.expect("a job");
            write_job(data, job, b"{\"id\": 1");
        },
        |server, view| {
            let view = view.expect("the victim is listed");
            assert_eq!(view.state, ItemState::InitialReplication, "{view:?}");
            let job = view.last_job.expect("a new job");
            let job = server.api().job(job).expect("the job");
            assert_eq!(
                (job.state, job.kind),
                (JobState::Running, JobKind::InitialReplication),
                "{job:?}"
            );
        },
    );
}

#[test]
fn a_damaged_slot_table_is_rebuilt_from_the_records() {
    after_damage(
        |data, _| {
            // A row of the stored slot table that no longer decodes.
            control(data)
                .commit("damaging the slot table", |c| c.put_slot_bytes(1, b"\x01"))
                .expect("damaging it");
        },
        |_, view| {
            let view = view.expect("the victim is listed");
            assert_eq!(view.state, ItemState::InitialReplication, "{view:?}");
        },
    );
}

/// Sends one request and reads whatever comes back (nothing, if the process dies in it).
fn request_into_a_crash(server: &Server, request: &EnableRequest) {
    // The process dies inside the request: no answer (a transport error) is the point.
    let _ = server.api().enable(request);
}

#[test]
fn serve_killed_at_every_step_of_enable_restarts_with_the_item_whole_or_absent() {
    killed_in_enable(false);
}

/// The same with a temporary OS disk (re-protect style): a rollback removes it too.
#[test]
fn serve_killed_in_an_enable_with_a_temporary_os_disk_leaves_no_disk_behind() {
    killed_in_enable(true);
}

fn killed_in_enable(temporary_os_disk: bool) {
    for (step, point) in appliance::testhook::ENABLE_POINTS.iter().enumerate() {
        let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("a temporary dir");
        let data = tmp.path().join("data");
        std::fs::create_dir_all(&data).expect("creating the data directory");
        let temporary = data.join("os-temporary.vhd");
        let mut enable = enable_request("vm", &[1, 2]);
        if temporary_os_disk {
            enable.temporary_os_disk = Some(temporary.display().to_string());
        }
        let state = if temporary_os_disk {
            ItemState::Reprotecting
        } else {
            ItemState::InitialReplication
        };
        let mut server = Server::start_with_env(
            &data,
            "127.0.0.1:0",
            &[],
            &[("APPLIANCE_TEST_CRASH_AT", point)],
        );
        request_into_a_crash(&server, &enable);
        let status = server.child.wait().expect("waiting for the process");
        assert!(
            !status.success(),
            "{point}: the process died there ({status:?})"
        );
        let server = Server::start(&data, &[]);
        let listed = items(&server);
        let committed = step
            >= appliance::testhook::ENABLE_POINTS
                .iter()
                .position(|p| *p == "enable:record")
                .expect("the record point");
        if committed {
            assert_eq!(listed.len(), 1, "{point}: the item is there: {listed:?}");
            let item = &listed[0];
            assert_eq!(item.state, state, "{point}: {item:?}");
            assert_eq!(item.health, "healthy", "{point}: {item:?}");
            let job = item.last_job.expect("a job");
            let job = server.api().job(job).expect("the job");
            assert_eq!(job.state, JobState::Running, "{point}: {job:?}");
            assert!(
                !data.join("items").join(&item.id).join("enabling").exists(),
                "{point}: the enable marker is gone"
            );
        } else {
            assert!(listed.is_empty(), "{point}: the item is gone: {listed:?}");
            let dirs: Vec<_> = std::fs::read_dir(data.join("items"))
                .expect("items/")
                .map(|e| e.expect("an entry").file_name())
                .collect();
            assert!(dirs.is_empty(), "{point}: nothing left in items/: {dirs:?}");
            let jobs = server.api().jobs().expect("the jobs");
            assert!(
                jobs.iter().all(|j| j.state != JobState::Running),
                "{point}: no job left running: {jobs:?}"
            );
        }
        if temporary_os_disk {
            assert_eq!(
                temporary.exists(),
                committed,
                "{point}: the temporary OS disk exists exactly when the item does"
            );
        }
        check_slots(&server);
        let slots = server.api().slots().expect("the slots");
        assert_eq!(
            slots.attached,
            if committed { 2 } else { 0 },
            "{point}: {slots:?}"
        );
        // Enabling again works.
        if committed && temporary_os_disk {
            enable.temporary_os_disk = Some(data.join("os-again.vhd").display().to_string());
        }
        server.api().enable(&enable).expect("enabled again");
        check_slots(&server);
        server.stop();
    }
}

/// The supervisor records `protected`, then ends the sync's job: a kill between the two writes
/// left the job `running`, and the restart failed it as interrupted although the sync was done
/// (seen once in kill_jobs). The state that kill leaves is made here exactly.
#[test]
fn a_sync_job_left_running_beside_a_protected_item_succeeds_at_restart() {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("a temporary directory");
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).expect("creating the data directory");
    let (mut healthy, _) = setup(&data);
    let job = serde_json::from_slice::<ItemRecord>(&record(&data, &healthy.id))
        .expect("a record")
        .last_job
        .expect("its job");
    let stored = control(&data).jobs().expect("the jobs");
    let mut view: JobView =
        serde_json::from_slice(stored.get(&job).expect("the job")).expect("a job");
    assert_eq!(view.state, JobState::Succeeded, "{view:?}");
    view.state = JobState::Running;
    view.percent = 99;
    view.finished_ns = None;
    let bytes = serde_json::to_vec(&view).expect("a job record");
    write_job(&data, job, &bytes);
    let server = Server::start(&data, &[]);
    let after = server.api().job(job).expect("the job");
    assert_eq!(after.state, JobState::Succeeded, "{after:?}");
    replicate(&server, &mut healthy, 4);
    fails_over_exactly(&server, &healthy, &data.join("tf"));
    server.stop();
}
