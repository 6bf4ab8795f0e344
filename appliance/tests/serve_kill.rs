//! The running appliance (`appliance serve`, a real process) receives a VM's writes from the
//! source agent over the data port and is killed with SIGKILL mid-stream, several times. The
//! agent reconnects and resends from its last acknowledgement. After a graceful SIGTERM, the
//! replicas equal the source and every recovery point restores exactly (checked by digest).

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::Rng;
use disk_sim::source::image_digest;
use engine::delta::{Consistency, DiskGeometry};
use source_agent::sender::{Agent, AgentConfig};

fn appliance(args: &[&str], data: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_appliance"));
    command.args(args).arg("--data-dir").arg(data);
    command
}

fn start_serve(data: &Path, addr: &str) -> Child {
    let mut child = appliance(
        &[
            "serve",
            "--data-addr",
            addr,
            "--nbd-addr",
            "127.0.0.1:0",
            "--api-addr",
            "127.0.0.1:0",
            "--keep-points",
            "1000",
        ],
        data,
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    // Wait until it listens.
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("data port listening on"), "{line:?}");
    child
}

fn free_port() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

#[test]
fn serve_killed_mid_stream_loses_nothing_and_every_point_is_exact() {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let data = tmp.path().join("data");
    let disks = vec![
        DiskGeometry {
            size_bytes: 4 << 20,
            block_size_bytes: 4096,
        },
        DiskGeometry {
            size_bytes: 2 << 20,
            block_size_bytes: 512,
        },
    ];
    let out = appliance(
        &[
            "item", "create", "--name", "vm-serve", "--disk", "4", "--disk", "2:512",
        ],
        &data,
    )
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let field = |name: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap()
            .trim()
            .to_owned()
    };
    let (item_hex, token) = (field("item "), field("token "));
    let mut item_id = [0u8; 16];
    for (i, byte) in item_id.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&item_hex[2 * i..2 * i + 2], 16).unwrap();
    }
    let addr = free_port();
    let mut server = start_serve(&data, &addr);
    let mut config = AgentConfig::new(
        addr.parse().unwrap(),
        item_id,
        token.as_bytes(),
        "vm-serve",
        disks.clone(),
    );
    config.backoff_initial = Duration::from_millis(20);
    config.backoff_max = Duration::from_millis(100);
    config.max_attempts = 200;
    let agent = Agent::connect(config).unwrap();
    // The source disks and their digests at every bookmark.
    let mut model: Vec<Vec<u8>> = disks
        .iter()
        .map(|d| vec![0; d.size_bytes as usize])
        .collect();
    let mut oracle = BTreeMap::new();
    let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15u64);
    let mut next = move || rng.next_u64();
    let mut kills = 0;
    for i in 0..1200u64 {
        if i % 40 == 39 {
            let consistency = if i % 200 == 199 {
                Consistency::App
            } else {
                Consistency::Crash
            };
            let seq = agent.bookmark(consistency, i, i, "serve").unwrap();
            oracle.insert(
                seq,
                model.iter().map(|d| image_digest(d)).collect::<Vec<_>>(),
            );
        } else {
            let disk = (next() % 2) as usize;
            let block = u64::from(disks[disk].block_size_bytes);
            let blocks_total = disks[disk].size_bytes / block;
            let blocks = (1 + next() % 32).min(blocks_total);
            let offset = (next() % (blocks_total - blocks + 1)) * block;
            let fill = next();
            let data: Vec<u8> = (0..blocks * block)
                .map(|b| (fill >> (b % 8)) as u8 ^ (b / 512) as u8)
                .collect();
            agent.write(disk as u16, offset, &data).unwrap();
            model[disk][offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        }
        if i % 200 == 100 {
            // SIGKILL the appliance mid-stream and bring it back.
            server.kill().unwrap();
            server.wait().unwrap();
            kills += 1;
            server = start_serve(&data, &addr);
        }
    }
    let acked = agent.flush(Duration::from_secs(60)).unwrap();
    assert_eq!(acked, agent.next_seq() - 1, "every frame acknowledged");
    // Graceful stop: applies what is staged.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(server.wait().unwrap().success(), "serve exits 0 on SIGTERM");
    drop(agent);

    let final_digests: Vec<u64> = model.iter().map(|d| image_digest(d)).collect();
    let verified =
        common::verify_item(&data, &item_id, &disks, &oracle, &final_digests, tmp.path());
    assert_eq!(
        verified,
        oracle.len(),
        "every bookmark became a point, nothing else"
    );
    eprintln!("{kills} SIGKILLs of serve; {acked} frames acknowledged; {verified} points verified");
}
