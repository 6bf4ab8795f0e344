//! The whole protection lifecycle against a real `appliance serve` process, driven through the
//! control API (`appliance-api`'s typed client) and the data port (the disk-sim agent), with the disks checked byte for
//! byte at every step:
//!
//! enable → initial replication → protected → test failover (replication keeps running) →
//! cleanup → failover (Custom point) → change point (latest app-consistent) → commit →
//! re-protect (temporary 1 GiB OS disk; delta resync sends only the differing chunks) →
//! protected (reverse) → failback (final sync; temporary disk gone; disks handed back) →
//! disable.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use appliance_api::model::{
    ChangePointRequest, DiskSpec, EnableRequest, FailoverRequest, Format, ItemState, ItemView,
    JobKind, MaterializeRequest, Materialized, Op, PointSpec, PolicyRequest, ReprotectRequest,
    Role,
};
use common::{Rng, Server, item_id};
use engine::delta::{Consistency, DiskGeometry};
use source_agent::sender::{Agent, AgentConfig};

/// A source VM: its disks in memory, changed by seeded writes.
struct Vm {
    disks: Vec<Vec<u8>>,
    block_bytes: Vec<u64>,
    rng: Rng,
}

impl Vm {
    fn new(geometry: &[DiskGeometry], seed: u64) -> Self {
        Self {
            disks: geometry
                .iter()
                .map(|d| vec![0; d.size_bytes as usize])
                .collect(),
            block_bytes: geometry
                .iter()
                .map(|d| u64::from(d.block_size_bytes))
                .collect(),
            rng: Rng::new(seed | 1),
        }
    }

    fn next(&mut self) -> u64 {
        self.rng.next_u64()
    }

    /// A random write; applied to the model and sent by `agent`.
    fn write(&mut self, agent: &Agent) {
        let disk = (self.next() % self.disks.len() as u64) as usize;
        let block = self.block_bytes[disk];
        let blocks_total = self.disks[disk].len() as u64 / block;
        let blocks = (1 + self.next() % 16).min(blocks_total);
        let offset = (self.next() % (blocks_total - blocks + 1)) * block;
        let fill = self.next();
        let data: Vec<u8> = (0..blocks * block)
            .map(|b| (fill >> (b % 8)) as u8 ^ (b / 512) as u8)
            .collect();
        agent.write(disk as u16, offset, &data).unwrap();
        self.disks[disk][offset as usize..offset as usize + data.len()].copy_from_slice(&data);
    }

    /// The initial full copy: every disk written whole (with content), in 1 MiB writes.
    fn full_copy(&mut self, agent: &Agent) {
        let base = self.next();
        for disk in 0..self.disks.len() {
            for (index, chunk) in self.disks[disk].chunks_mut(1 << 20).enumerate() {
                let fill = base.wrapping_mul(index as u64 + 1);
                for (i, byte) in chunk.iter_mut().enumerate() {
                    *byte = (fill >> (i % 8)) as u8 ^ (i / 4096) as u8;
                }
                agent
                    .write(disk as u16, (index as u64) << 20, chunk)
                    .unwrap();
            }
        }
    }

    fn save(&self, paths: &[PathBuf]) {
        for (disk, path) in self.disks.iter().zip(paths) {
            std::fs::write(path, disk).unwrap();
        }
    }
}

fn agent(server: &Server, id: [u8; 16], token: &str, name: &str, disks: &[DiskGeometry]) -> Agent {
    let mut config = AgentConfig::new(server.data, id, token.as_bytes(), name, disks.to_vec());
    config.backoff_initial = Duration::from_millis(20);
    config.backoff_max = Duration::from_millis(200);
    config.max_attempts = 50;
    Agent::connect(config).unwrap()
}

/// Each file equals the disk image of the same index.
fn assert_files(files: &[PathBuf], disks: &[Vec<u8>], what: &str) {
    assert_eq!(files.len(), disks.len(), "{what}");
    for (index, (file, disk)) in files.iter().zip(disks).enumerate() {
        let bytes = std::fs::read(file).unwrap_or_else(|e| panic!("{what}: {file:?}: {e}"));
        assert!(bytes == *disk, "{what}: disk {index} ({file:?}) differs");
    }
}

fn files(disks: Option<&Materialized>) -> Vec<PathBuf> {
    disks.unwrap().files.iter().map(PathBuf::from).collect()
}

fn state(server: &Server, item: &str) -> ItemView {
    server.api().item(item).unwrap()
}

fn wait_state(server: &Server, item: &str, wanted: ItemState) -> ItemView {
    server
        .api()
        .wait_state(
            item,
            wanted,
            Duration::from_millis(50),
            Duration::from_secs(120),
        )
        .unwrap_or_else(|e| panic!("item {item} never reached {wanted}: {e}"))
}

/// A test-failover request at `point` into `target_dir`.
fn materialize(point: PointSpec, target_dir: &Path) -> MaterializeRequest {
    MaterializeRequest {
        point,
        target_dir: target_dir.display().to_string(),
        format: Format::Raw,
        mode: Default::default(),
    }
}

#[test]
fn the_whole_lifecycle_over_the_api_and_the_data_port() {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let site = data.join("vms");
    std::fs::create_dir_all(&site).unwrap();
    let server = Server::start(&data, &[]);
    let geometry = vec![
        DiskGeometry {
            size_bytes: 8 << 20,
            block_size_bytes: 4096,
        },
        DiskGeometry {
            size_bytes: 4 << 20,
            block_size_bytes: 512,
        },
    ];

    // ── enable ──
    let enabled = server
        .api()
        .enable(&EnableRequest {
            name: "vm1".into(),
            disks: vec![DiskSpec::create(8, None), DiskSpec::create(4, Some(512))],
            policy: Some(PolicyRequest {
                keep_points: Some(1000),
                keep_minutes: None,
                app_consistent_minutes: Some(5),
            }),
            temporary_os_disk: None,
        })
        .unwrap();
    let item = enabled.item.id.clone();
    let token = enabled.stream_token.clone();
    assert_eq!(enabled.item.state, ItemState::InitialReplication);
    assert_eq!(enabled.job.kind, JobKind::InitialReplication);
    let slots = server.api().slots().unwrap();
    assert_eq!((slots.free, slots.attached), (29, 2));
    // A request in the wrong state: 409 with the state and what is allowed.
    let error = server.api().commit(&item).unwrap_err();
    let refusal = error.refusal().unwrap();
    assert_eq!(refusal.status, 409, "{error}");
    assert_eq!(refusal.code, "wrong_state");
    assert_eq!(refusal.state.as_deref(), Some("initial_replication"));
    assert_eq!(refusal.allowed_operations, Some(vec!["disable".to_owned()]));

    // ── initial replication ──
    let mut vm = Vm::new(&geometry, 7);
    let source = agent(&server, item_id(&item), &token, "vm1", &geometry);
    vm.full_copy(&source);
    let mut oracle: BTreeMap<u64, Vec<Vec<u8>>> = BTreeMap::new();
    let first = source
        .bookmark(Consistency::Crash, 1, 1, "initial")
        .unwrap();
    oracle.insert(first, vm.disks.clone());
    server.wait_job(enabled.job.id);
    let view = wait_state(&server, &item, ItemState::Protected);
    assert_eq!(view.synchronized_percent, 100);

    // ── steady replication with crash- and app-consistent points ──
    let mut custom = 0;
    for round in 0..6u64 {
        for _ in 0..25 {
            vm.write(&source);
        }
        let consistency = if round == 3 {
            Consistency::App
        } else {
            Consistency::Crash
        };
        let seq = bookmark(&mut oracle, &vm, &source, 10 + round, consistency);
        if round == 1 {
            custom = seq;
        }
    }
    source.flush(Duration::from_secs(60)).unwrap();
    wait_for_point(&server, &item, *oracle.keys().last().unwrap());

    // Refused up front, with the field named: a target that is a file, a path outside the
    // data directory, an unknown point, "latest" (failover only).
    let file = data.join("a-file");
    std::fs::write(&file, b"x").unwrap();
    for (request, status, code) in [
        (
            materialize(PointSpec::Id(custom), &file),
            400,
            "bad_request",
        ),
        (
            materialize(PointSpec::Id(custom), &file.join("sub")),
            400,
            "bad_request",
        ),
        (
            materialize(PointSpec::Id(custom), Path::new("/tmp/elsewhere")),
            403,
            "path_refused",
        ),
        (
            materialize(PointSpec::Id(999_999), &data.join("t")),
            404,
            "point_not_found",
        ),
        (
            materialize(PointSpec::latest(), &data.join("t")),
            400,
            "bad_request",
        ),
    ] {
        let error = server.api().test_failover(&item, &request).unwrap_err();
        assert_eq!(
            (error.status(), error.code()),
            (Some(status), Some(code)),
            "{request:?}: {error}"
        );
    }
    assert_eq!(
        state(&server, &item).state,
        ItemState::Protected,
        "refusals change nothing"
    );

    // ── test failover at the custom point; replication keeps running ──
    let test_dir = data.join("test-failover");
    let job = server
        .api()
        .test_failover(&item, &materialize(PointSpec::Id(custom), &test_dir))
        .unwrap();
    for _ in 0..30 {
        vm.write(&source);
    }
    let during = bookmark(&mut oracle, &vm, &source, 20, Consistency::Crash);
    server.wait_job(job.id);
    let view = state(&server, &item);
    assert_eq!(view.state, ItemState::TestFailover);
    let test_files = files(view.test_failover.as_ref());
    assert_files(&test_files, &oracle[&custom], "test failover disks");
    source.flush(Duration::from_secs(60)).unwrap();
    wait_for_point(&server, &item, during);

    // ── cleanup ──
    let view = server.api().test_failover_cleanup(&item).unwrap();
    assert_eq!(view.state, ItemState::Protected);
    assert!(test_files.iter().all(|f| !f.exists()), "test disks removed");

    // More writes; one more app-consistent point; then the source shuts down.
    for _ in 0..40 {
        vm.write(&source);
    }
    let app = bookmark(&mut oracle, &vm, &source, 30, Consistency::App);
    for _ in 0..10 {
        vm.write(&source);
    }
    let last = bookmark(&mut oracle, &vm, &source, 31, Consistency::Crash);
    source.close(Duration::from_secs(60)).unwrap();
    wait_for_point(&server, &item, last);
    // The original VM's disks as it left them (used again by re-protect).
    let original: Vec<PathBuf> = (0..2)
        .map(|i| site.join(format!("vm1-disk-{i}.img")))
        .collect();
    vm.save(&original);

    // ── failover to the custom point ──
    let failover_dir = data.join("failover");
    let job = server
        .api()
        .failover(
            &item,
            &FailoverRequest {
                point: PointSpec::Id(custom),
                target_dir: failover_dir.display().to_string(),
                format: Format::Raw,
                source_shut_down: true,
                mode: Default::default(),
            },
        )
        .unwrap();
    server.wait_job(job.id);
    let view = state(&server, &item);
    assert_eq!(view.state, ItemState::FailedOver);
    assert_eq!(view.failover.as_ref().map(|f| f.point_id), Some(custom));
    let failed_over = files(view.failover.as_ref());
    assert_files(
        &failed_over,
        &oracle[&custom],
        "failover disks at the custom point",
    );
    // The source's agent is refused now: the item takes no frames.
    let refused = Agent::connect({
        let mut config = AgentConfig::new(
            server.data,
            item_id(&item),
            token.as_bytes(),
            "vm1",
            geometry.clone(),
        );
        config.max_attempts = 1;
        config
    })
    .and_then(|agent| {
        agent.write(0, 0, &[1; 4096])?;
        agent.flush(Duration::from_secs(10))
    });
    assert!(refused.is_err(), "a failed-over item takes no frames");

    // ── change point to the latest app-consistent point ──
    let job = server
        .api()
        .change_point(
            &item,
            &ChangePointRequest {
                point: PointSpec::latest_app(),
            },
        )
        .unwrap();
    server.wait_job(job.id);
    let view = state(&server, &item);
    assert_eq!(
        (view.state, view.failover.as_ref().map(|f| f.point_id)),
        (ItemState::FailedOver, Some(app))
    );
    assert_files(
        &files(view.failover.as_ref()),
        &oracle[&app],
        "failover disks after change point",
    );

    // ── commit ──
    let view = server.api().commit(&item).unwrap();
    assert_eq!(view.state, ItemState::Committed);
    assert_eq!(view.allowed_operations, [Op::Reprotect, Op::Disable]);

    // The failed-over VM runs on the failover disks and writes.
    let mut reverse_vm = Vm::new(&geometry, 99);
    reverse_vm.disks = failed_over
        .iter()
        .map(|f| std::fs::read(f).unwrap())
        .collect();
    let differing_before: usize = (0..2)
        .map(|d| differing_chunks(&reverse_vm.disks[d], &vm.disks[d]))
        .sum();

    // ── re-protect: the original disks become replicas; a temporary OS disk is made ──
    let reprotected = server
        .api()
        .reprotect(
            &item,
            &ReprotectRequest {
                disks: original.iter().map(|p| p.display().to_string()).collect(),
                temporary_os_disk: None,
                name: None,
            },
        )
        .unwrap();
    let reverse = reprotected.item.id.clone();
    let reverse_token = reprotected.stream_token.clone();
    assert_eq!(reprotected.item.state, ItemState::Reprotecting);
    assert_eq!(reprotected.item.role, Role::Reverse);
    let temporary = PathBuf::from(reprotected.item.temporary_os_disk.as_ref().unwrap());
    let info = engine::vhd::read_fixed_vhd_info(&temporary).unwrap();
    assert_eq!(
        info.virtual_size_bytes,
        1 << 30,
        "a 1 GiB temporary OS disk"
    );
    assert_eq!(state(&server, &item).state, ItemState::Reprotected);
    let slots = server.api().slots().unwrap();
    assert_eq!(slots.attached, 4, "{slots:?}");

    // The delta resync from the failed-over VM: only the differing chunks travel.
    let report = source_agent::resync::delta_resync(
        server.data,
        item_id(&reverse),
        reverse_token.as_bytes(),
        "vm1-reverse",
        &geometry,
        &failed_over,
        64 << 10,
        Duration::from_secs(60),
    )
    .unwrap();
    let chunks_differing: u64 = report.disks.iter().map(|d| d.chunks_differing).sum();
    assert_eq!(chunks_differing as usize, differing_before, "{report:?}");
    assert!(
        report.total_bytes_sent <= (differing_before as u64) * (64 << 10),
        "{report:?}"
    );
    assert!(
        report.total_bytes_sent < report.total_disk_bytes / 2,
        "{report:?}"
    );
    server.wait_job(reprotected.job.id);
    wait_state(&server, &reverse, ItemState::Protected);
    assert_files(
        &original,
        &reverse_vm.disks,
        "original disks after the delta resync",
    );

    // Reverse replication of the failed-over VM's writes.
    let back = agent(
        &server,
        item_id(&reverse),
        &reverse_token,
        "vm1-reverse",
        &geometry,
    );
    for _ in 0..60 {
        reverse_vm.write(&back);
    }
    let reverse_last = back.bookmark(Consistency::App, 40, 40, "reverse").unwrap();
    back.close(Duration::from_secs(60)).unwrap();
    wait_for_point(&server, &reverse, reverse_last);

    // ── failback: final sync, disks handed back, temporary OS disk deleted ──
    let job = server.api().failback(&reverse).unwrap();
    let job = server.wait_job(job.id);
    let view = state(&server, &reverse);
    assert_eq!(view.state, ItemState::FailedBack, "{job:?}");
    assert!(!temporary.exists(), "temporary OS disk deleted");
    assert_files(
        &original,
        &reverse_vm.disks,
        "original disks after failback",
    );
    assert!(view.disks.iter().all(|d| d.lun.is_none()));
    let slots = server.api().slots().unwrap();
    assert_eq!(
        slots.attached, 2,
        "only the first item's replicas hold slots: {slots:?}"
    );

    // ── disable the first item: every slot free again ──
    let view = server.api().disable(&item).unwrap();
    assert_eq!(view.state, ItemState::Disabled);
    let slots = server.api().slots().unwrap();
    assert_eq!((slots.free, slots.attached), (31, 0));
    // The failed-over disks belong to the VM now: disable leaves them alone.
    assert!(failed_over.iter().all(|f| f.exists()));
    server.stop();
}

/// A bookmark; the model at it goes into the oracle.
fn bookmark(
    oracle: &mut BTreeMap<u64, Vec<Vec<u8>>>,
    vm: &Vm,
    agent: &Agent,
    id: u64,
    consistency: Consistency,
) -> u64 {
    let seq = agent.bookmark(consistency, id, id, "steady").unwrap();
    oracle.insert(seq, vm.disks.clone());
    seq
}

fn wait_for_point(server: &Server, item: &str, point: u64) {
    server
        .api()
        .wait_point(
            item,
            point,
            Duration::from_millis(25),
            Duration::from_secs(60),
        )
        .unwrap_or_else(|e| panic!("point {point} of {item} never applied: {e}"));
}

/// 64 KiB chunks that differ between two images of one disk.
fn differing_chunks(a: &[u8], b: &[u8]) -> usize {
    a.chunks(64 << 10)
        .zip(b.chunks(64 << 10))
        .filter(|(x, y)| x != y)
        .count()
}

/// Resync on demand: the item pauses, applies what is staged, and refuses the agent's
/// ordinary stream until the agent has run the hash exchange; only the differing chunks
/// travel; the item is protected again at the resync's point, and ordinary streaming resumes.
#[test]
fn resync_on_demand_sends_only_what_differs() {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let server = Server::start(&data, &[]);
    let geometry = vec![DiskGeometry {
        size_bytes: 8 << 20,
        block_size_bytes: 4096,
    }];
    let enabled = server
        .api()
        .enable(&EnableRequest {
            name: "vm-resync".into(),
            disks: vec![DiskSpec::create(8, None)],
            policy: None,
            temporary_os_disk: None,
        })
        .unwrap();
    let item = enabled.item.id.clone();
    let token = enabled.stream_token.clone();
    let mut vm = Vm::new(&geometry, 3);
    let source = agent(&server, item_id(&item), &token, "vm-resync", &geometry);
    vm.full_copy(&source);
    source
        .bookmark(Consistency::Crash, 1, 1, "initial")
        .unwrap();
    source.close(Duration::from_secs(60)).unwrap();
    server.wait_job(enabled.job.id);

    // The source changes while nothing is sent (as after a lost agent backlog).
    for _ in 0..5 {
        let block = (vm.next() % 2048) * 4096;
        vm.disks[0][block as usize..block as usize + 4096].fill(0xEE);
    }
    let sources = vec![tmp.path().join("source-0.img")];
    vm.save(&sources);
    let differing = differing_chunks(
        &vm.disks[0],
        &std::fs::read(data.join("items").join(&item).join("replicas/disk-0.img")).unwrap(),
    );
    assert!((1..=5).contains(&differing));

    let job = server.api().resync(&item).unwrap();
    assert_eq!(job.kind, JobKind::Resync);
    // An ordinary stream is refused until the hash exchange ran.
    let refused = {
        let mut config = AgentConfig::new(
            server.data,
            item_id(&item),
            token.as_bytes(),
            "vm-resync",
            geometry.clone(),
        );
        config.max_attempts = 20;
        config.backoff_initial = Duration::from_millis(50);
        Agent::connect(config)
            .and_then(|agent| {
                agent.write(0, 0, &[1; 4096])?;
                agent.flush(Duration::from_secs(30))
            })
            .unwrap_err()
    };
    assert!(refused.needs_resync(), "{refused}");
    let report = source_agent::resync::delta_resync(
        server.data,
        item_id(&item),
        token.as_bytes(),
        "vm-resync",
        &geometry,
        &sources,
        64 << 10,
        Duration::from_secs(60),
    )
    .unwrap();
    assert_eq!(
        report.disks[0].chunks_differing as usize, differing,
        "{report:?}"
    );
    assert_eq!(
        report.total_bytes_sent,
        differing as u64 * (64 << 10),
        "{report:?}"
    );
    server.wait_job(job.id);
    let view = wait_state(&server, &item, ItemState::Protected);
    assert_eq!(view.latest_point_id, Some(report.bookmark_seq));
    assert_files(
        &[data.join("items").join(&item).join("replicas/disk-0.img")],
        &vm.disks,
        "replica after the resync",
    );
    // Ordinary streaming resumes after the resync's frames.
    let source = agent(&server, item_id(&item), &token, "vm-resync", &geometry);
    assert!(source.next_seq() > report.bookmark_seq);
    vm.write(&source);
    let seq = source.bookmark(Consistency::Crash, 2, 2, "after").unwrap();
    source.close(Duration::from_secs(60)).unwrap();
    wait_for_point(&server, &item, seq);
    server.stop();
}
