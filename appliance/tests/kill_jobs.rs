//! `kill -9` of a real `appliance serve` while an agent streams and while a failover job
//! writes disks, then a restart: no acknowledged frame is lost, the initial-replication job
//! carries on to its end, the interrupted failover job is failed with the reason (its partial
//! files removed, the item back in `protected` and replicating), and the slot table is the
//! same as before each kill.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use appliance_api::model::{
    DiskSpec, EnableRequest, FailoverRequest, Format, ItemState, JobState, PointSpec, PolicyRequest,
};
use common::{Rng, Server, item_id};
use engine::delta::{Consistency, DiskGeometry};
use source_agent::sender::{Agent, AgentConfig};
use xxhash_rust::xxh3::xxh3_64;

fn free_port() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

#[test]
fn kill_9_during_streaming_and_during_a_job_loses_nothing_and_leaks_nothing() {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let addr = free_port();
    let mut server = Server::start_on(&data, &addr, &[]);
    // A small OS disk the workload writes, and a large data disk that stays sparse: it makes
    // the failover job long enough to be killed in the middle.
    let geometry = vec![
        DiskGeometry {
            size_bytes: 4 << 20,
            block_size_bytes: 4096,
        },
        DiskGeometry {
            size_bytes: 1 << 30,
            block_size_bytes: 4096,
        },
    ];
    let enabled = server
        .api()
        .enable(&EnableRequest {
            name: "vm-kill".into(),
            disks: vec![DiskSpec::create(4, None), DiskSpec::create(1024, None)],
            policy: Some(PolicyRequest {
                keep_points: Some(1000),
                ..PolicyRequest::default()
            }),
            temporary_os_disk: None,
        })
        .unwrap();
    let item = enabled.item.id.clone();
    let token = enabled.stream_token.clone();
    let slots = server.api().slots().unwrap();
    let mut config = AgentConfig::new(
        addr.parse().unwrap(),
        item_id(&item),
        token.as_bytes(),
        "vm-kill",
        geometry.clone(),
    );
    config.backoff_initial = Duration::from_millis(20);
    config.backoff_max = Duration::from_millis(100);
    config.max_attempts = 300;
    let agent = Agent::connect(config).unwrap();
    let mut model = vec![0u8; 4 << 20]; // the OS disk (the data disk stays empty)
    let mut oracle = BTreeMap::new();
    let mut rng = Rng::new(0x2545_f491_4f6c_dd1du64);
    let mut next = move || rng.next_u64();
    let mut kills = 0;
    for i in 0..900u64 {
        if i % 30 == 29 {
            let seq = agent.bookmark(Consistency::Crash, i, i, "kill").unwrap();
            oracle.insert(seq, xxh3_64(&model));
        } else {
            let blocks = 1 + next() % 16;
            let offset = (next() % (1024 - blocks)) * 4096;
            let fill = next() as u8;
            let data = vec![fill; (blocks * 4096) as usize];
            agent.write(0, offset, &data).unwrap();
            model[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        }
        if i % 300 == 150 {
            server.kill();
            kills += 1;
            server = Server::start_on(&data, &addr, &[]);
            assert_eq!(server.api().slots().unwrap(), slots, "slots after a kill");
        }
    }
    let acked = agent.flush(Duration::from_secs(60)).unwrap();
    assert_eq!(acked, agent.next_seq() - 1, "every frame acknowledged");
    // The initial-replication job, started before the kills, ends by itself.
    server.wait_job(enabled.job.id);
    let last = *oracle.keys().last().unwrap();
    for _ in 0..2000 {
        if server.api().item(&item).unwrap().latest_point_id == Some(last) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // Every point is there and exact (OS disk digest; the data disk stayed empty).
    let points = server.api().points(&item).unwrap();
    let ids: Vec<u64> = points.iter().map(|p| p.id).collect();
    assert!(
        oracle.keys().all(|seq| ids.contains(seq)),
        "every acknowledged bookmark is a point"
    );
    let first_custom = *oracle.keys().nth(3).unwrap();

    // Kill during the failover job.
    let target = data.join("failover");
    let failover = FailoverRequest {
        point: PointSpec::Id(first_custom),
        target_dir: target.display().to_string(),
        format: Format::Raw,
        source_shut_down: true,
        mode: Default::default(),
    };
    let job = server.api().failover(&item, &failover).unwrap();
    std::thread::sleep(Duration::from_millis(150));
    server.kill();
    kills += 1;
    server = Server::start_on(&data, &addr, &[]);
    assert_eq!(server.api().slots().unwrap(), slots, "slots after a kill");
    let job = server.api().job(job.id).unwrap();
    let view = server.api().item(&item).unwrap();
    match job.state {
        JobState::Failed => {
            assert!(
                job.error
                    .as_deref()
                    .unwrap()
                    .contains("interrupted by an appliance restart"),
                "{job:?}"
            );
            assert_eq!(view.state, ItemState::Protected, "{view:?}");
            let left: Vec<_> = std::fs::read_dir(&target)
                .map(|d| d.map(|e| e.unwrap().file_name()).collect())
                .unwrap_or_default();
            assert!(left.is_empty(), "partial files removed: {left:?}");
            // Replication works again: one more frame and a point.
            agent.write(0, 0, &[7; 4096]).unwrap();
            model[..4096].copy_from_slice(&[7; 4096]);
            let seq = agent
                .bookmark(Consistency::Crash, 9999, 9999, "after")
                .unwrap();
            oracle.insert(seq, xxh3_64(&model));
            agent.flush(Duration::from_secs(60)).unwrap();
            eprintln!("the failover job was interrupted and undone");
        }
        JobState::Succeeded => {
            assert_eq!(view.state, ItemState::FailedOver, "{view:?}");
            eprintln!("the failover job finished before the kill");
        }
        other => panic!("job {other}: {job:?}"),
    }
    drop(agent);
    // A failover after the restart writes exact disks.
    if view.state == ItemState::Protected {
        let job = server.api().failover(&item, &failover).unwrap();
        server.wait_job(job.id);
    }
    let view = server.api().item(&item).unwrap();
    let files: Vec<String> = view.failover.unwrap().files;
    assert_eq!(
        xxh3_64(&std::fs::read(&files[0]).unwrap()),
        oracle[&first_custom]
    );
    let data_disk = std::fs::read(&files[1]).unwrap();
    assert!(data_disk.len() == 1 << 30 && data_disk.iter().all(|b| *b == 0));
    // Every retained point of the OS disk is exact.
    let key = engine::meta::item_key(&item_id(&item));
    server.stop();
    let meta = engine::meta::MetaStore::open(
        engine::durable::DurableDir::open(
            &engine::durable::StdDir::open(&data).unwrap(),
            "meta.redb",
            false,
        )
        .unwrap(),
    )
    .unwrap();
    let item_dir = data.join("items").join(&item);
    let source = engine::materialize::Source {
        meta: &meta,
        item: key,
        disks: &geometry,
        preserve_dir: std::sync::Arc::new(
            engine::durable::StdDir::open(&item_dir.join("preserve")).unwrap(),
        ),
        grain_bytes: 4096,
        pins: engine::apply::Pins::default(),
    };
    let scratch = tmp.path().join("point.raw");
    let mut verified = 0;
    for (seq, digest) in &oracle {
        let replica = std::fs::File::open(item_dir.join("replicas/disk-0.img")).unwrap();
        let out = std::fs::File::create(&scratch).unwrap();
        engine::materialize::materialize_disk(&source, *seq, 0, &replica, &out, &mut |_| {})
            .unwrap();
        assert_eq!(
            xxh3_64(&std::fs::read(&scratch).unwrap()),
            *digest,
            "point {seq}"
        );
        verified += 1;
    }
    eprintln!("{kills} SIGKILLs; {acked} frames acknowledged; {verified} points verified");
}
