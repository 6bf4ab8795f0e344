//! Defence in depth: a staged frame that can never be applied (media corruption behind the
//! decoder's back: a write frame whose checksum holds but whose zstd payload does not
//! decompress) puts the item in the named `apply_failed` health instead of blocking it for
//! good. Against a real `appliance serve` process:
//!
//! - points are written through the real data port; the process is stopped (SIGTERM) and the
//!   bad frame appended to the item's staging segment; the process is started again;
//! - the item's health is `apply_failed` with the frame's seq, disk, offset and reason (API and
//!   `/metrics`), and the data port refuses the agent with `not-replicating`;
//! - test failover of every earlier point, failover to "latest-processed" and change point to
//!   every other point give exactly what was written; "latest" is refused with 409
//!   `apply_failed`; disable answers 200 and frees the slots;
//! - or, in the second test, resync discards the bad staged frames and a delta resync makes
//!   the replicas equal the source again; replication then goes on.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use appliance_api::model::{
    ChangePointRequest, DiskSpec, EnableRequest, FailoverRequest, Format, ItemState, ItemView,
    JobState, MaterializeRequest, Materialized, PointSpec, PolicyRequest, SlotsView,
};
use common::{Rng, Server, item_id};
use engine::delta::{Consistency, DiskGeometry, Encoding, FrameHeader, FrameKind};
use engine::port::RefusalStatus;
use source_agent::sender::{Agent, AgentConfig};

fn geometry() -> Vec<DiskGeometry> {
    vec![
        DiskGeometry {
            size_bytes: 4 << 20,
            block_size_bytes: 4096,
        },
        DiskGeometry {
            size_bytes: 2 << 20,
            block_size_bytes: 512,
        },
    ]
}

/// The source VM's disks in memory, changed by seeded writes.
struct Vm {
    disks: Vec<Vec<u8>>,
    rng: Rng,
}

impl Vm {
    fn new(seed: u64) -> Self {
        Self {
            disks: geometry()
                .iter()
                .map(|d| vec![0; d.size_bytes as usize])
                .collect(),
            rng: Rng::new(seed | 1),
        }
    }

    /// A random write (compressible, so it travels as zstd); applied to the model and sent.
    fn write(&mut self, agent: &Agent) {
        let disk = self.rng.below(2) as usize;
        let block = u64::from(geometry()[disk].block_size_bytes);
        let blocks_total = self.disks[disk].len() as u64 / block;
        let blocks = 1 + self.rng.below(32);
        let offset = self.rng.below(blocks_total - blocks + 1) * block;
        let fill = self.rng.next_u64();
        let data: Vec<u8> = (0..blocks * block)
            .map(|b| (fill >> (b % 8)) as u8 ^ (b / 512) as u8)
            .collect();
        agent.write(disk as u16, offset, &data).unwrap();
        self.disks[disk][offset as usize..offset as usize + data.len()].copy_from_slice(&data);
    }

    fn save(&self, dir: &Path) -> Vec<PathBuf> {
        (0..self.disks.len())
            .map(|i| {
                let path = dir.join(format!("source-disk-{i}.img"));
                std::fs::write(&path, &self.disks[i]).unwrap();
                path
            })
            .collect()
    }
}

fn agent_config(server: &Server, item: &str, token: &str, max_attempts: u32) -> AgentConfig {
    let mut config = AgentConfig::new(
        server.data,
        item_id(item),
        token.as_bytes(),
        "vm-poison",
        geometry(),
    );
    config.backoff_initial = Duration::from_millis(20);
    config.backoff_max = Duration::from_millis(200);
    config.max_attempts = max_attempts;
    config
}

fn agent(server: &Server, item: &str, token: &str) -> Agent {
    Agent::connect(agent_config(server, item, token, 50)).unwrap()
}

fn view(server: &Server, item: &str) -> ItemView {
    server.api().item(item).unwrap()
}

/// Polls the item until `done` holds (generous deadline: the machine may be loaded).
fn wait_item(
    server: &Server,
    item: &str,
    what: &str,
    done: impl Fn(&ItemView) -> bool,
) -> ItemView {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let view = view(server, item);
        if done(&view) {
            return view;
        }
        assert!(Instant::now() < deadline, "item never {what}: {view:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn files(materialized: Option<&Materialized>) -> Vec<PathBuf> {
    materialized
        .unwrap()
        .files
        .iter()
        .map(PathBuf::from)
        .collect()
}

/// Test failover of `item` at `point` into `dir`; waits for the job.
fn test_failover(server: &Server, item: &str, point: u64, dir: &Path) {
    let request = MaterializeRequest {
        point: PointSpec::Id(point),
        target_dir: dir.display().to_string(),
        format: Format::Raw,
        mode: Default::default(),
    };
    let job = server.api().test_failover(item, &request).unwrap();
    server.wait_job(job.id);
}

fn failover(point: PointSpec, dir: &Path) -> FailoverRequest {
    FailoverRequest {
        point,
        target_dir: dir.display().to_string(),
        format: Format::Raw,
        source_shut_down: false,
        mode: Default::default(),
    }
}

fn assert_files(files: &[PathBuf], disks: &[Vec<u8>], what: &str) {
    assert_eq!(files.len(), disks.len(), "{what}");
    for (index, (file, disk)) in files.iter().zip(disks).enumerate() {
        let bytes = std::fs::read(file).unwrap_or_else(|e| panic!("{what}: {file:?}: {e}"));
        assert!(bytes == *disk, "{what}: disk {index} ({file:?}) differs");
    }
}

/// An item protected by [`protected_item`], its process stopped.
struct Protected {
    item: String,
    token: String,
    /// The source as it was at the last point.
    vm: Vm,
    /// Each point's disks.
    points: BTreeMap<u64, Vec<Vec<u8>>>,
    /// `GET /v1/slots` before the item was enabled.
    slots_before: SlotsView,
}

/// Enables an item, streams three rounds of writes with a bookmark each (the second
/// app-consistent), waits until every point is processed, and stops the process.
fn protected_item(data: &Path) -> Protected {
    let server = Server::start(data, &[]);
    let slots_before = server.api().slots().unwrap();
    let enabled = server
        .api()
        .enable(&EnableRequest {
            name: "vm-poison".into(),
            disks: vec![DiskSpec::create(4, None), DiskSpec::create(2, Some(512))],
            policy: Some(PolicyRequest {
                keep_points: Some(100),
                ..PolicyRequest::default()
            }),
            temporary_os_disk: None,
        })
        .unwrap();
    let item = enabled.item.id.clone();
    let token = enabled.stream_token.clone();
    let source = agent(&server, &item, &token);
    let mut vm = Vm::new(11);
    let mut points = BTreeMap::new();
    for round in 0..3u64 {
        for _ in 0..20 {
            vm.write(&source);
        }
        let consistency = if round == 1 {
            Consistency::App
        } else {
            Consistency::Crash
        };
        let seq = source
            .bookmark(consistency, round + 1, round + 1, "round")
            .unwrap();
        points.insert(seq, vm.disks.clone());
    }
    source.close(Duration::from_secs(60)).unwrap();
    let last = *points.keys().last().unwrap();
    wait_item(&server, &item, "protected at the last point", |v| {
        v.state == ItemState::Protected && v.latest_point_id == Some(last)
    });
    server.stop();
    Protected {
        item,
        token,
        vm,
        points,
        slots_before,
    }
}

/// Appends to the item's newest staging segment, behind the decoder's back, a write frame for
/// disk 0 at byte 8192 whose checksum holds but whose zstd payload does not decompress, then
/// a valid raw write after it. Returns the bad frame's seq.
fn stage_poison_frame(data: &Path, item: &str) -> u64 {
    let staging = data.join("items").join(item).join("staging");
    let segment = std::fs::read_dir(&staging)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "drs"))
        .max()
        .unwrap();
    // The last frame staged: the segment's frames, decoded by the one decoder.
    let bytes = std::fs::read(&segment).unwrap();
    let mut decoder = engine::delta::DeltaDecoder::new(bytes.as_slice()).unwrap();
    let mut last_seq = decoder.header().first_seq - 1;
    while let Ok(Some(frame)) = decoder.next_frame() {
        last_seq = frame.seq;
    }
    let frame = |seq: u64, encoding: Encoding, length: u64, payload: &[u8]| {
        let mut header = FrameHeader {
            kind: FrameKind::Write,
            encoding,
            disk_index: 0,
            seq,
            offset_bytes: 8192,
            length_bytes: length,
            payload_len_bytes: payload.len() as u32,
            checksum: 0,
        };
        header.checksum = FrameHeader::compute_checksum(&header.encode()[..40], payload);
        [header.encode().as_slice(), payload].concat()
    };
    let poison = last_seq + 1;
    // A zstd frame magic, then garbage: the checksum covers it, zstd refuses it.
    let mut garbage = vec![0x28, 0xB5, 0x2F, 0xFD];
    garbage.extend((0..200u32).map(|i| (i * 37 % 251) as u8));
    let mut out = frame(poison, Encoding::Zstd, 4096, &garbage);
    out.extend(frame(poison + 1, Encoding::Raw, 4096, &[0x77; 4096]));
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&segment)
        .unwrap();
    file.write_all(&out).unwrap();
    file.sync_all().unwrap();
    poison
}

/// Waits for `apply_failed` and checks what the API, `/metrics` and the data port say.
fn assert_apply_failed(server: &Server, item: &str, token: &str, poison: u64, last_point: u64) {
    let view = wait_item(server, item, "apply_failed", |v| {
        v.health.starts_with("apply_failed")
    });
    let failure = view.apply_failure.as_ref().unwrap();
    assert_eq!(failure.seq, poison, "{view:?}");
    assert_eq!(failure.disk_index, Some(0), "{view:?}");
    assert_eq!(failure.offset_bytes, Some(8192), "{view:?}");
    assert_eq!(failure.applied_seq, last_point, "{view:?}");
    assert!(failure.reason.contains("zstd"), "{view:?}");
    let health = view.health.as_str();
    for needle in [
        &format!("seq {poison}") as &str,
        "disk 0, byte 8192",
        "resync",
        "disable",
    ] {
        assert!(health.contains(needle), "{needle:?} in {health:?}");
    }
    assert_eq!(view.applied_seq, last_point);
    assert_eq!(view.staged_seq, poison + 1);

    let (status, metrics) = server.call("GET", "/metrics", None);
    assert_eq!(status, 200);
    let metrics = metrics.as_str().unwrap();
    let line = |name: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(&format!("{name}{{item=\"{item}\"")))
            .unwrap_or_else(|| panic!("{name} in {metrics}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .to_owned()
    };
    assert_eq!(line("appliance_item_apply_failed"), "1");
    assert_eq!(line("appliance_item_apply_failed_seq"), poison.to_string());

    // The agent is refused by name: the item takes no frames.
    let error = Agent::connect(agent_config(server, item, token, 1))
        .and_then(|agent| {
            agent.write(0, 0, &[1; 4096])?;
            agent.flush(Duration::from_secs(30))
        })
        .unwrap_err();
    assert_eq!(
        error.refusal_status(),
        Some(RefusalStatus::NotReplicating),
        "{error}"
    );
    assert!(error.to_string().contains("apply_failed"), "{error}");
}

#[test]
fn a_poison_frame_in_staging_fails_apply_by_name_and_every_earlier_point_still_fails_over() {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let Protected {
        item,
        token,
        points,
        slots_before,
        ..
    } = protected_item(&data);
    let last_point = *points.keys().last().unwrap();
    let app_point = *points.keys().nth(1).unwrap();
    let poison = stage_poison_frame(&data, &item);

    let server = Server::start(&data, &[]);
    assert_apply_failed(&server, &item, &token, poison, last_point);

    // Test failover of every point, each exact.
    for (&point, disks) in &points {
        let dir = data.join(format!("test-{point}"));
        test_failover(&server, &item, point, &dir);
        let view = view(&server, &item);
        assert_files(
            &files(view.test_failover.as_ref()),
            disks,
            &format!("test failover at {point}"),
        );
        server.api().test_failover_cleanup(&item).unwrap();
    }

    // "latest" needs the frame that never applies: refused by name, nothing changes.
    let failover_dir = data.join("failover");
    let error = server
        .api()
        .failover(&item, &failover(PointSpec::latest(), &failover_dir))
        .unwrap_err();
    assert_eq!(
        (error.status(), error.code()),
        (Some(409), Some("apply_failed")),
        "{error}"
    );
    let message = &error.refusal().unwrap().message;
    assert!(message.contains("latest-processed"), "{message}");
    assert_eq!(view(&server, &item).state, ItemState::Protected);

    // Failover to the latest processed point, then change point to every other one.
    let job = server
        .api()
        .failover(
            &item,
            &failover(PointSpec::latest_processed(), &failover_dir),
        )
        .unwrap();
    server.wait_job(job.id);
    let view_now = view(&server, &item);
    assert_eq!(view_now.state, ItemState::FailedOver);
    assert_eq!(
        view_now.failover.as_ref().map(|f| f.point_id),
        Some(last_point)
    );
    let failed_over = files(view_now.failover.as_ref());
    assert_files(
        &failed_over,
        &points[&last_point],
        "failover at latest-processed",
    );
    for (choice, point) in points
        .keys()
        .map(|&p| (PointSpec::Id(p), p))
        .chain([(PointSpec::latest_app(), app_point)])
    {
        let request = ChangePointRequest {
            point: choice.clone(),
        };
        let job = server.api().change_point(&item, &request).unwrap();
        server.wait_job(job.id);
        let view = view(&server, &item);
        assert_eq!(
            view.failover.as_ref().map(|f| f.point_id),
            Some(point),
            "{choice:?}"
        );
        assert_files(
            &failed_over,
            &points[&point],
            &format!("change point to {choice:?}"),
        );
    }

    // Disable: 200, and every slot the item held is free again.
    let view = server.api().disable(&item).unwrap();
    assert_eq!(view.state, ItemState::Disabled);
    let slots = server.api().slots().unwrap();
    assert_eq!(
        (slots.free, slots.attached),
        (slots_before.free, slots_before.attached),
        "{slots:?}"
    );
    server.stop();
}

#[test]
fn resync_discards_the_poison_frame_and_a_delta_resync_makes_the_replicas_whole() {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let Protected {
        item,
        token,
        mut vm,
        points,
        ..
    } = protected_item(&data);
    let last_point = *points.keys().last().unwrap();
    let poison = stage_poison_frame(&data, &item);
    let server = Server::start(&data, &[]);
    assert_apply_failed(&server, &item, &token, poison, last_point);

    // The operator's way back: resync. The job discards the staged frames and waits for the
    // agent's delta resync.
    let job_id = server.api().resync(&item).unwrap().id;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let job = server.api().job(job_id).unwrap();
        assert_eq!(job.state, JobState::Running, "{job:?}");
        // Past the discard: the job waits for the agent (the supervisor then reports
        // "receiving and applying").
        let m = &job.message;
        if m.contains("waiting for the agent") || m.contains("receiving and applying") {
            break;
        }
        assert!(Instant::now() < deadline, "{job:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let view_now = view(&server, &item);
    assert_eq!(view_now.health, "healthy", "{view_now:?}");
    assert!(view_now.apply_failure.is_none(), "{view_now:?}");

    // The source has moved on meanwhile (its writes after the poison never arrived).
    let sources_dir = tmp.path().join("source");
    std::fs::create_dir_all(&sources_dir).unwrap();
    let mut rng = Rng::new(5);
    for disk in &mut vm.disks {
        for _ in 0..8 {
            let at = (rng.below(disk.len() as u64 / 4096) * 4096) as usize;
            disk[at..at + 4096].fill(rng.next_u64() as u8 | 1);
        }
    }
    let sources = vm.save(&sources_dir);
    // Retried while the item is still pausing (`busy`, for an instant after the discard).
    let deadline = Instant::now() + Duration::from_secs(120);
    let report = loop {
        match source_agent::resync::delta_resync(
            server.data,
            item_id(&item),
            token.as_bytes(),
            "vm-poison",
            &geometry(),
            &sources,
            64 << 10,
            Duration::from_secs(60),
        ) {
            Ok(report) => break report,
            Err(error) if Instant::now() < deadline && error.to_string().contains("busy") => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(error) => panic!("delta resync: {error}"),
        }
    };
    server.wait_job(job_id);
    let view_now = wait_item(&server, &item, "protected after the resync", |v| {
        v.state == ItemState::Protected && v.latest_point_id == Some(report.bookmark_seq)
    });
    assert_eq!(view_now.health, "healthy");

    // The resync's point equals the source; the points before the poison are still exact.
    let mut expected = points.clone();
    expected.insert(report.bookmark_seq, vm.disks.clone());
    for (&point, disks) in &expected {
        let dir = data.join(format!("test-{point}"));
        test_failover(&server, &item, point, &dir);
        assert_files(
            &files(view(&server, &item).test_failover.as_ref()),
            disks,
            &format!("test failover at {point} after the resync"),
        );
        server.api().test_failover_cleanup(&item).unwrap();
    }

    // Replication goes on.
    let source = agent(&server, &item, &token);
    for _ in 0..10 {
        vm.write(&source);
    }
    let seq = source.bookmark(Consistency::Crash, 9, 9, "after").unwrap();
    source.close(Duration::from_secs(60)).unwrap();
    wait_item(&server, &item, "a point after the resync", |v| {
        v.latest_point_id == Some(seq)
    });
    let job = server
        .api()
        .failover(
            &item,
            &failover(PointSpec::latest(), &data.join("failover")),
        )
        .unwrap();
    server.wait_job(job.id);
    assert_files(
        &files(view(&server, &item).failover.as_ref()),
        &vm.disks,
        "failover to latest after the resync",
    );
    server.stop();
}
