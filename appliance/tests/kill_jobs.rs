//! `kill -9` of a real `appliance serve` while an agent streams and while a failover job
//! writes disks, then a restart: no acknowledged frame is lost, the initial-replication job
//! carries on to its end, the interrupted failover job is failed with the reason (its partial
//! files removed, the item back in `protected` and replicating), and the slot table is the
//! same as before each kill.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Rng, Server, item_id};
use disk_sim::agent::{Agent, AgentConfig};
use engine::delta::{Consistency, DiskGeometry};
use serde_json::json;
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
    let enabled = server.expect(
        "POST",
        "/v1/items",
        Some(
            json!({"name": "vm-kill", "disks": [{"size_mib": 4}, {"size_mib": 1024}],
                    "policy": {"keep_points": 1000}}),
        ),
        201,
    );
    let item = enabled["item"]["id"].as_str().unwrap().to_owned();
    let token = enabled["stream_token"].as_str().unwrap().to_owned();
    let slots = server.expect("GET", "/v1/slots", None, 200);
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
            assert_eq!(
                server.expect("GET", "/v1/slots", None, 200),
                slots,
                "slots after a kill"
            );
        }
    }
    let acked = agent.flush(Duration::from_secs(60)).unwrap();
    assert_eq!(acked, agent.next_seq() - 1, "every frame acknowledged");
    // The initial-replication job, started before the kills, ends by itself.
    server.wait_job(enabled["job"]["id"].as_u64().unwrap());
    let last = *oracle.keys().last().unwrap();
    for _ in 0..2000 {
        let view = server.expect("GET", &format!("/v1/items/{item}"), None, 200);
        if view["latest_point_id"].as_u64() == Some(last) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // Every point is there and exact (OS disk digest; the data disk stayed empty).
    let points = server.expect("GET", &format!("/v1/items/{item}/points"), None, 200);
    let ids: Vec<u64> = points
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_u64().unwrap())
        .collect();
    assert!(
        oracle.keys().all(|seq| ids.contains(seq)),
        "every acknowledged bookmark is a point"
    );
    let first_custom = *oracle.keys().nth(3).unwrap();

    // Kill during the failover job.
    let target = data.join("failover");
    let job = server.expect(
        "POST",
        &format!("/v1/items/{item}/failover"),
        Some(json!({"point": first_custom, "target_dir": target, "source_shut_down": true})),
        202,
    );
    std::thread::sleep(Duration::from_millis(150));
    server.kill();
    kills += 1;
    server = Server::start_on(&data, &addr, &[]);
    assert_eq!(
        server.expect("GET", "/v1/slots", None, 200),
        slots,
        "slots after a kill"
    );
    let job = server.expect("GET", &format!("/v1/jobs/{}", job["id"]), None, 200);
    let view = server.expect("GET", &format!("/v1/items/{item}"), None, 200);
    match job["state"].as_str().unwrap() {
        "failed" => {
            assert!(
                job["error"]
                    .as_str()
                    .unwrap()
                    .contains("interrupted by an appliance restart"),
                "{job}"
            );
            assert_eq!(view["state"], "protected", "{view}");
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
        "succeeded" => {
            assert_eq!(view["state"], "failed_over", "{view}");
            eprintln!("the failover job finished before the kill");
        }
        other => panic!("job {other}: {job}"),
    }
    drop(agent);
    // A failover after the restart writes exact disks.
    if view["state"] == "protected" {
        let job = server.expect(
            "POST",
            &format!("/v1/items/{item}/failover"),
            Some(json!({"point": first_custom, "target_dir": target, "source_shut_down": true})),
            202,
        );
        server.wait_job(job["id"].as_u64().unwrap());
    }
    let view = server.expect("GET", &format!("/v1/items/{item}"), None, 200);
    let files: Vec<String> = view["failover"]["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_owned())
        .collect();
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
