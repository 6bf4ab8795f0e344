//! The source agent's capture against a real appliance, in process (the library, no NBD in
//! between): the initial copy, a crash of the agent with frames in flight, and a long
//! outage with a change map too small for what changed. Each ends with the replica equal to
//! the source disk byte for byte at a bookmark, and reports bytes resent against bytes
//! changed. The binary with real filesystems: `source_agent_fs.rs`.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use appliance_api::model::{DiskSpec, EnableRequest};
use common::{Rng, Server, item_id};
use engine::delta::Consistency;
use nbd_server::Export;
use source_agent::capture::{
    Bookmarked, Capture, CaptureConfig, CaptureError, CaptureStatus, DiskConfig,
};
use source_agent::changemap::Limits;

const DISK_BYTES: u64 = 64 << 20;

struct Setup {
    _tmp: tempfile::TempDir,
    data: PathBuf,
    disk: DiskConfig,
    state: PathBuf,
    item: String,
    token: String,
}

fn setup(server_extra: &[&str]) -> (Setup, Server) {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let server = Server::start(&data, server_extra);
    let enabled = server
        .api()
        .enable(&EnableRequest {
            name: "capture".into(),
            disks: vec![DiskSpec::create(DISK_BYTES >> 20, None)],
            policy: None,
            temporary_os_disk: None,
        })
        .unwrap();
    // (The enable job ends at the first recovery point: the first bookmark below.)
    // The source disk: some content already (the initial copy must carry it).
    let path = tmp.path().join("source.img");
    let mut content = vec![0u8; DISK_BYTES as usize];
    Rng::new(11).fill(&mut content[..8 << 20]);
    std::fs::write(&path, &content).unwrap();
    let setup = Setup {
        state: tmp.path().join("agent-state"),
        disk: DiskConfig {
            name: "os".into(),
            path,
            block_size_bytes: 4096,
        },
        data,
        _tmp: tmp,
        item: enabled.item.id.clone(),
        token: enabled.stream_token.clone(),
    };
    (setup, server)
}

fn start(setup: &Setup, server: &Server, limits: Limits) -> (Arc<Capture>, Arc<dyn Export>) {
    let mut config = CaptureConfig::new(
        server.data,
        item_id(&setup.item),
        setup.token.as_bytes().to_vec(),
        "capture".into(),
        vec![setup.disk.clone()],
        setup.state.clone(),
    );
    config.change_map = limits;
    config.backlog_limit_bytes = 8 << 20;
    let capture = Capture::start(config).unwrap();
    let export = capture.exports().remove(0).1;
    (capture, export)
}

/// Random writes (4 KiB..64 KiB, aligned) inside `[0, span)`; returns bytes written.
fn scribble(export: &dyn Export, rng: &mut Rng, span: u64, count: usize) -> u64 {
    let mut written = 0;
    let mut buf = vec![0u8; 64 << 10];
    for _ in 0..count {
        let blocks = 1 + rng.below(16);
        let length = (blocks * 4096) as usize;
        let offset = rng.below((span - length as u64) / 4096) * 4096;
        rng.fill(&mut buf[..length]);
        export.write_at(offset, &buf[..length], false).unwrap();
        written += length as u64;
    }
    export.flush().unwrap();
    written
}

/// A bookmark once the catch-up has drained (the capture waits for it), acknowledged by the
/// appliance. A link that restarts before the ack loses the bookmark (a named error): take
/// another, as an operator would.
fn bookmark_when_caught_up(capture: &Capture) -> Bookmarked {
    for _ in 0..10 {
        let bookmarked = capture
            .bookmark_within(Consistency::Crash, "test", Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("bookmark: {e} (status {:?})", capture.status()));
        match capture.wait_acked(bookmarked.seq, Duration::from_secs(60)) {
            Ok(()) => return bookmarked,
            Err(CaptureError::BookmarkLost { .. }) => continue,
            Err(error) => panic!("bookmark {bookmarked:?}: {error}"),
        }
    }
    panic!("ten bookmarks lost in a row: {:?}", capture.status());
}

/// Waits for the bookmark's point; the replica then equals the source disk (nothing was
/// written after the bookmark).
fn assert_replica_equals_source(setup: &Setup, server: &Server, b: &Bookmarked) {
    server
        .api()
        .wait_point(
            &setup.item,
            b.seq,
            Duration::from_millis(20),
            Duration::from_secs(60),
        )
        .unwrap();
    let points = server.api().points(&setup.item).unwrap();
    let point = points.iter().find(|p| p.id == b.seq).unwrap();
    assert_eq!(point.bookmark_id, b.bookmark_id);
    let replica = replica_path(&setup.data, &setup.item);
    let source = std::fs::read(&setup.disk.path).unwrap();
    let copy = std::fs::read(&replica).unwrap();
    let first_difference = source.iter().zip(&copy).position(|(a, b)| a != b);
    assert_eq!(first_difference, None, "replica differs from the source");
    assert_eq!(source.len(), copy.len());
}

fn replica_path(data: &Path, item: &str) -> PathBuf {
    data.join("items")
        .join(item)
        .join("replicas")
        .join("disk-0.img")
}

fn wait_until(capture: &Capture, what: &str, done: impl Fn(&CaptureStatus) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = capture.status();
        if done(&status) {
            return;
        }
        assert!(Instant::now() < deadline, "never: {what}: {status:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn resent(capture: &Capture) -> (u64, u64, u64) {
    let status = capture.status();
    let disk = &status.disks[0];
    (disk.written_bytes, disk.resent_bytes, disk.recovered_bytes)
}

#[test]
fn initial_copy_then_a_crash_with_frames_in_flight_resends_only_the_activity_log() {
    let (setup, server) = setup(&[]);
    let (capture, export) = start(&setup, &server, Limits::default());
    let mut rng = Rng::new(5);
    // The initial sync: chunk hashes compared with the (new, zero) replica; only the chunks
    // that differ are read back and sent by the catch-up.
    scribble(&*export, &mut rng, 16 << 20, 200);
    // Unaligned writes (a 512-byte-sector client): streamed as the blocks around them.
    export.write_at(1000, &[9; 3000], false).unwrap();
    export
        .write_at((5 << 20) + 4000, &[8; 5000], false)
        .unwrap();
    export.write_zeroes((6 << 20) + 512, 1024, false).unwrap();
    let first = bookmark_when_caught_up(&capture);
    assert_replica_equals_source(&setup, &server, &first);
    let (_, resent_initial, recovered) = resent(&capture);
    assert_eq!(
        recovered, DISK_BYTES,
        "a fresh state starts from the whole disk"
    );
    assert!(
        (8 << 20..DISK_BYTES / 2).contains(&resent_initial),
        "the initial sync sends the differing chunks (8 MiB of content, then the writes): \
         {resent_initial}"
    );
    // Once delivered, the catch-up saves the drained map (else a crash would copy it all).
    wait_until(&capture, "the drained map saved", |s| {
        s.disks[0].map_saves >= 2
    });

    // Frames in flight: the appliance stopped (SIGSTOP), writes in the backlog, then the
    // agent dies without a goodbye (its threads end; nothing is checkpointed).
    let pid = nix::unistd::Pid::from_raw(server.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let changed = scribble(&*export, &mut rng, 12 << 20, 150);
    drop(export);
    drop(capture);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();

    let (capture, export) = start(&setup, &server, Limits::default());
    let (_, _, recovered) = resent(&capture);
    // The activity log covered the 12 MiB written: three 4 MiB extents (plus the catch-up's
    // last ones at most), never the whole disk.
    assert!(recovered >= 12 << 20, "recovered {recovered}");
    assert!(recovered <= 24 << 20, "recovered {recovered}");
    let second = bookmark_when_caught_up(&capture);
    assert_replica_equals_source(&setup, &server, &second);
    let (_, resent_after, _) = resent(&capture);
    println!(
        "crash with frames in flight: changed {changed} bytes, resent {resent_after} bytes \
         (disk {DISK_BYTES} bytes)"
    );
    assert_eq!(resent_after, recovered);
    capture.shutdown(Duration::from_secs(30)).unwrap();
    drop(export);

    // A clean stop with everything acknowledged recovers nothing.
    let (capture, _export) = start(&setup, &server, Limits::default());
    assert_eq!(resent(&capture).2, 0);
    capture.shutdown(Duration::from_secs(30)).unwrap();
}

#[test]
fn an_outage_never_blocks_writes_and_a_small_map_coarsens_instead_of_overflowing() {
    let (setup, server) = setup(&[]);
    let data_addr = server.data.to_string();
    let limits = Limits {
        max_map_bytes: 2048,
        ..Limits::default()
    };
    let (capture, export) = start(&setup, &server, limits);
    let mut rng = Rng::new(9);
    let first = bookmark_when_caught_up(&capture);
    assert_replica_equals_source(&setup, &server, &first);
    let (_, resent_initial, _) = resent(&capture);

    // The appliance goes away; the VM keeps writing at disk speed, scattered over the disk.
    // The sender notices at its next write: let one write find out, so that the scattered
    // writes below all go to the change map.
    server.kill();
    export.write_at(0, &[7; 4096], false).unwrap();
    wait_until(&capture, "the link down", |s| s.link.starts_with("down"));
    let started = Instant::now();
    let changed = scribble(&*export, &mut rng, DISK_BYTES / 2, 300);
    let elapsed = started.elapsed();
    let status = capture.status();
    assert!(status.disks[0].unsent_bytes > 0);
    assert!(
        status.disks[0].grain_bytes > 4096,
        "300 scattered writes do not fit 2 KiB at 4 KiB grains: {status:?}"
    );
    assert!(status.disks[0].unsent_bytes <= DISK_BYTES / 2);
    println!("outage: {changed} bytes written in {elapsed:?}; {status:?}");

    let server = Server::start_on(&setup.data, &data_addr, &[]);
    let second = bookmark_when_caught_up(&capture);
    assert_replica_equals_source(&setup, &server, &second);
    let (_, resent_total, _) = resent(&capture);
    assert!(resent_total - resent_initial <= DISK_BYTES / 2);
    println!(
        "outage: changed {changed} bytes, resent {} bytes at grain {} (disk {DISK_BYTES})",
        resent_total - resent_initial,
        status.disks[0].grain_bytes
    );
    capture.shutdown(Duration::from_secs(30)).unwrap();
    drop(export);
}

#[test]
fn a_resync_asked_by_the_appliance_compares_hashes_and_sends_only_the_differences() {
    let (setup, server) = setup(&[]);
    let (capture, export) = start(&setup, &server, Limits::default());
    let mut rng = Rng::new(21);
    let first = bookmark_when_caught_up(&capture);
    assert_replica_equals_source(&setup, &server, &first);
    server.wait_job(1); // the enable job ends at the first point
    let (_, resent_before, _) = resent(&capture);

    // The operator asks for a resync: the appliance ends the session and refuses ordinary
    // hellos with resync-required; the agent compares chunk hashes and sends what differs,
    // while the VM keeps writing.
    let job = server.api().resync(&setup.item).unwrap();
    let changed = scribble(&*export, &mut rng, 8 << 20, 100);
    let second = bookmark_when_caught_up(&capture);
    assert_replica_equals_source(&setup, &server, &second);
    server.wait_job(job.id);
    let (_, resent_after, _) = resent(&capture);
    println!(
        "resync: changed {changed} bytes meanwhile, resent {} bytes (disk {DISK_BYTES})",
        resent_after - resent_before
    );
    assert!(resent_after - resent_before < DISK_BYTES / 2);
    capture.shutdown(Duration::from_secs(30)).unwrap();
    drop(export);
}
