//! The job limit and the graceful stop of a real `appliance serve`, with jobs held running
//! deterministically.
//!
//! How a job is held: a test-failover job opens its item's replica *by path*
//! (`Manager::write_disks`), while the apply worker keeps the file it opened at start. The
//! test moves the replica aside and puts a symlink to a FIFO at its path: the job's `open`
//! blocks until the test opens the FIFO for writing, so the job stays `running` for as long as
//! the test wants. Released, the job reads the FIFO, gets `ESPIPE` and fails on its own (the
//! item back in `protected`, its partial files removed) — the job's own end, which is what a
//! graceful stop must wait for.
//!
//! What the code counts (`Jobs::running_work`): only jobs that change files (test failover,
//! failover, change point, failback). Replication jobs (initial replication, re-protect,
//! resync) are "monitors": they do not count towards `--max-jobs`, enable and resync are
//! never refused `too_many_jobs`, and a graceful stop does not wait for them (they carry on
//! after the restart). Both tests check that too.

// Shared with the other test binaries, which allow its unwraps crate-wide; here only it.
#[allow(clippy::unwrap_used)]
mod common;

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use appliance_api::model::{
    DiskSpec, EnableRequest, FailoverRequest, Format, ItemState, ItemView, JobKind, JobState,
    JobView, MaterializeRequest, PointSpec,
};
use common::{Server, item_id};
use engine::delta::{Consistency, DiskGeometry};
use source_agent::sender::{Agent, AgentConfig};

/// Longest any state is polled for.
const DEADLINE: Duration = Duration::from_secs(30);
/// Size of each item's one disk.
const DISK_BYTES: u64 = 4 << 20;

/// An item in `protected` with one recovery point, and the disk image at that point.
struct Protected {
    id: String,
    image: Vec<u8>,
    replica: PathBuf,
}

/// Enables an item, streams a write and a bookmark with the disk-sim agent, closes the
/// session and waits until the initial-replication job succeeded (the item is `protected`).
fn protect(server: &Server, name: &str, fill: u8) -> Protected {
    let enabled = server
        .api()
        .enable(&one_disk(name, DISK_BYTES >> 20))
        .expect("enabled");
    let id = enabled.item.id.clone();
    let token = enabled.stream_token.clone();
    let replica = PathBuf::from(&enabled.item.disks[0].path);
    let geometry = vec![DiskGeometry {
        size_bytes: DISK_BYTES,
        block_size_bytes: 4096,
    }];
    let mut config = AgentConfig::new(server.data, item_id(&id), token.as_bytes(), name, geometry);
    config.backoff_initial = Duration::from_millis(20);
    config.backoff_max = Duration::from_millis(200);
    config.max_attempts = 50;
    let agent = Agent::connect(config).expect("the agent connects");
    let mut image = vec![0u8; DISK_BYTES as usize];
    let data: Vec<u8> = (0..64 * 1024u32)
        .map(|i| fill ^ (i / 4096) as u8 ^ (i % 251) as u8)
        .collect();
    agent
        .write(0, 8192, &data)
        .expect("the agent queues a write");
    image[8192..8192 + data.len()].copy_from_slice(&data);
    agent
        .bookmark(Consistency::Crash, 1, 1, "first")
        .expect("the agent queues a bookmark");
    agent
        .close(DEADLINE)
        .expect("every frame acknowledged and the session closed");
    server.wait_job(enabled.job.id);
    let view = item(server, &id);
    assert_eq!(view.state, ItemState::Protected, "{view:?}");
    assert!(view.latest_point_id.is_some(), "a recovery point: {view:?}");
    Protected { id, image, replica }
}

/// Enable of one new disk of `size_mib`.
fn one_disk(name: &str, size_mib: u64) -> EnableRequest {
    EnableRequest {
        name: name.into(),
        disks: vec![DiskSpec::create(size_mib, None)],
        policy: None,
        temporary_os_disk: None,
    }
}

fn item(server: &Server, id: &str) -> ItemView {
    server.api().item(id).expect("the item")
}

fn jobs(server: &Server) -> Vec<JobView> {
    server.api().jobs().expect("the jobs")
}

/// The item list without `rpo_lag_ms` (the age of the newest point: it grows by itself).
fn items_without_lag(server: &Server) -> Vec<ItemView> {
    let mut list = server.api().items().expect("the items");
    for view in &mut list {
        view.rpo_lag_ms = None;
    }
    list
}

fn running_jobs(list: &[JobView]) -> Vec<(u64, JobKind)> {
    list.iter()
        .filter(|job| job.state == JobState::Running)
        .map(|job| (job.id, job.kind))
        .collect()
}

/// Polls a job until it is no longer running; returns its view.
fn wait_job_end(server: &Server, id: u64) -> JobView {
    server
        .api()
        .wait_job(id, Duration::from_millis(20), DEADLINE, &mut |_| {})
        .unwrap_or_else(|e| panic!("job {id}: {e}"))
}

fn test_failover(
    server: &Server,
    id: &str,
    target: &Path,
) -> Result<JobView, appliance_api::Error> {
    let request = MaterializeRequest {
        point: PointSpec::latest_processed(),
        target_dir: target.display().to_string(),
        format: Format::Raw,
        mode: Default::default(),
    };
    server.api().test_failover(id, &request)
}

/// An item's replica path replaced by a symlink to a FIFO (see the module comment).
struct Hold {
    replica: PathBuf,
    aside: PathBuf,
    fifo: PathBuf,
    released: bool,
}

impl Hold {
    fn new(replica: &Path, scratch: &Path, name: &str) -> Self {
        let fifo = scratch.join(format!("{name}.fifo"));
        let aside = scratch.join(format!("{name}.replica"));
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .expect("creating the FIFO");
        std::fs::rename(replica, &aside).expect("moving the replica aside");
        std::os::unix::fs::symlink(&fifo, replica).expect("linking the replica path to the FIFO");
        Self {
            replica: replica.to_path_buf(),
            aside,
            fifo,
            released: false,
        }
    }

    /// Puts the replica back, then lets the job's blocked `open` return (waits until the job
    /// is in it: a non-blocking open for writing fails with ENXIO while no reader waits).
    fn release(&mut self) {
        self.released = true;
        std::fs::rename(&self.aside, &self.replica).expect("putting the replica back");
        let deadline = Instant::now() + DEADLINE;
        loop {
            match std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&self.fifo)
            {
                Ok(_writer) => return,
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {}
                Err(e) => panic!("opening {} for writing: {e}", self.fifo.display()),
            }
            assert!(
                Instant::now() < deadline,
                "the job never opened its replica path"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Hold {
    /// A failed test: put the replica back, release a waiting job if there is one.
    fn drop(&mut self) {
        if !self.released {
            let _ = std::fs::rename(&self.aside, &self.replica);
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&self.fifo);
        }
    }
}

/// The error a held job ends on once released: its replica "file" cannot be read at an
/// offset (ESPIPE on the FIFO).
fn assert_held_job_failed_on_its_own(job: &JobView) {
    assert_eq!(job.state, JobState::Failed, "{job:?}");
    let error = job.error.as_deref().expect("a failed job has an error");
    assert!(error.contains("reading replica disk 0"), "{job:?}");
    assert!(!error.contains("interrupted"), "{job:?}");
}

/// What is durable in the control store of `data` now, as a crash would leave it: a copy of
/// `control.redb` opened (and repaired, as a restart would) in a directory of its own, so the
/// store of a running appliance is never opened twice.
fn stored(data: &Path) -> appliance::db::ControlStore {
    let copy = tempfile::tempdir().expect("a temporary directory");
    std::fs::copy(
        data.join(appliance::db::CONTROL_FILE),
        copy.path().join(appliance::db::CONTROL_FILE),
    )
    .expect("copying control.redb");
    let store = appliance::db::ControlStore::open_data_dir(copy.path()).expect("the copy opens");
    // The copy's directory may go: the store holds its file open.
    drop(copy);
    store
}

#[test]
fn max_jobs_refuses_one_job_more_with_too_many_jobs_and_changes_nothing() {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("a temporary directory");
    let data = tmp.path().join("data");
    let scratch = tmp.path().join("scratch");
    std::fs::create_dir_all(&data).expect("creating the data directory");
    std::fs::create_dir_all(&scratch).expect("creating the scratch directory");
    let server = Server::start(&data, &["--max-jobs", "2"]);
    let a = protect(&server, "vm-a", 0x11);
    let b = protect(&server, "vm-b", 0x22);
    let c = protect(&server, "vm-c", 0x33);

    // Two test-failover jobs held running: the limit of 2 is reached.
    let mut hold_a = Hold::new(&a.replica, &scratch, "a");
    let mut hold_b = Hold::new(&b.replica, &scratch, "b");
    let job_a = test_failover(&server, &a.id, &data.join("tf-a"))
        .expect("202")
        .id;
    let job_b = test_failover(&server, &b.id, &data.join("tf-b"))
        .expect("202")
        .id;
    let before_jobs = jobs(&server);
    assert_eq!(
        running_jobs(&before_jobs),
        vec![
            (job_b, JobKind::TestFailover),
            (job_a, JobKind::TestFailover)
        ],
        "the two held jobs run: {before_jobs:?}"
    );
    let before_items = items_without_lag(&server);
    let before_slots = server.api().slots().expect("the slots");
    let job_files = || stored(&data).jobs().expect("the stored jobs").len();
    let before_job_files = job_files();

    // One job more, of either kind that counts: 409 too_many_jobs, nothing created.
    let target_c = data.join("tf-c");
    let error = test_failover(&server, &c.id, &target_c).expect_err("a refusal");
    assert_eq!(
        (error.status(), error.code()),
        (Some(409), Some("too_many_jobs")),
        "{error}"
    );
    let message = &error.refusal().expect("the API's refusal").message;
    assert!(
        message.contains("2 jobs are running, the limit is 2"),
        "{message}"
    );
    let failover_c = data.join("fo-c");
    let failover = FailoverRequest {
        point: PointSpec::latest(),
        target_dir: failover_c.display().to_string(),
        format: Format::Raw,
        source_shut_down: true,
        mode: Default::default(),
    };
    let error = server
        .api()
        .failover(&c.id, &failover)
        .expect_err("a refusal");
    assert_eq!(
        (error.status(), error.code()),
        (Some(409), Some("too_many_jobs")),
        "{error}"
    );
    // The refusals changed nothing: items (C still protected, no pending disks), jobs, slots,
    // job files, and neither target directory was created.
    assert_eq!(
        items_without_lag(&server),
        before_items,
        "items after the refusals"
    );
    assert_eq!(jobs(&server), before_jobs, "jobs after the refusals");
    assert_eq!(
        server.api().slots().expect("the slots"),
        before_slots,
        "slots after the refusals"
    );
    assert_eq!(job_files(), before_job_files, "no job was stored");
    assert!(
        !target_c.exists(),
        "the refused test failover made no directory"
    );
    assert!(
        !failover_c.exists(),
        "the refused failover made no directory"
    );
    assert_eq!(item(&server, &c.id).state, ItemState::Protected);

    // What the code does (`Jobs::running_work`): replication jobs do not count and enable is
    // not limited. At the limit, a new item is still enabled and its initial-replication job
    // runs: three jobs run at once with --max-jobs 2.
    let enabled = server
        .api()
        .enable(&one_disk("vm-d", 4))
        .unwrap_or_else(|e| panic!("enable is not limited by --max-jobs: {e}"));
    assert_eq!(enabled.job.kind, JobKind::InitialReplication, "{enabled:?}");
    assert_eq!(enabled.job.state, JobState::Running, "{enabled:?}");
    assert_eq!(
        running_jobs(&jobs(&server)).len(),
        3,
        "two held test failovers and one initial replication run at once"
    );

    // One held job ends (on its own error): room for one, so C's test failover now runs,
    // and writes the disk at its point.
    hold_a.release();
    let ended = wait_job_end(&server, job_a);
    assert_held_job_failed_on_its_own(&ended);
    assert_eq!(item(&server, &a.id).state, ItemState::Protected);
    let job_c = test_failover(&server, &c.id, &target_c)
        .unwrap_or_else(|e| panic!("room for one job again: {e}"));
    let job_c = server.wait_job(job_c.id);
    assert_eq!(job_c.kind, JobKind::TestFailover, "{job_c:?}");
    let view = item(&server, &c.id);
    assert_eq!(view.state, ItemState::TestFailover, "{view:?}");
    let written = std::fs::read(target_c.join("disk-0.raw")).expect("the test failover's disk");
    assert!(
        written == c.image,
        "the test failover's disk is the disk at the point"
    );

    hold_b.release();
    assert_held_job_failed_on_its_own(&wait_job_end(&server, job_b));
    assert_eq!(item(&server, &b.id).state, ItemState::Protected);
    server.stop();
}

#[test]
fn sigterm_waits_for_a_running_file_job_and_exits_0_after_it_ended() {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("a temporary directory");
    let data = tmp.path().join("data");
    let scratch = tmp.path().join("scratch");
    std::fs::create_dir_all(&data).expect("creating the data directory");
    std::fs::create_dir_all(&scratch).expect("creating the scratch directory");
    // The job's end is held between its decision and its record write (the race window of
    // observation 9: the stop used to see the job ended in memory and exit before the write).
    let finish = scratch.join("finish");
    let pause = format!("job:finish:test_failover={}", finish.display());
    let mut server = Server::start_with_env(
        &data,
        "127.0.0.1:0",
        &[],
        &[("APPLIANCE_TEST_PAUSE_AT", pause.as_str())],
    );
    let a = protect(&server, "vm-a", 0x44);
    // An item whose agent never connects: its initial-replication job stays running.
    let waiting = server
        .api()
        .enable(&one_disk("vm-waiting", 4))
        .expect("enabled");
    let waiting_id = waiting.item.id.clone();
    let waiting_job = waiting.job.id;

    let mut hold = Hold::new(&a.replica, &scratch, "a");
    let target = data.join("tf-a");
    let job = test_failover(&server, &a.id, &target).expect("202").id;
    assert_eq!(
        server.api().job(job).expect("the job").state,
        JobState::Running
    );
    let read_job = |job: u64| -> JobView {
        let jobs = stored(&data).jobs().expect("the stored jobs");
        let bytes = jobs
            .get(&job)
            .unwrap_or_else(|| panic!("job {job} is not stored"));
        serde_json::from_slice(bytes).unwrap_or_else(|e| panic!("job {job}: {e}"))
    };

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("sending SIGTERM");
    // The code stops the control API and the data port first, then waits for the job.
    let deadline = Instant::now() + DEADLINE;
    for addr in [server.api.clone(), server.data.to_string()] {
        while std::net::TcpStream::connect(&addr).is_ok() {
            assert!(
                Instant::now() < deadline,
                "{addr} still accepts after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // The job cannot end while held, so the process must not exit: watch it for a while.
    let watch_until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < watch_until {
        let exited = server.child.try_wait().expect("polling the process");
        assert!(
            exited.is_none(),
            "serve exited ({exited:?}) while a test-failover job was still running"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(read_job(job).state, JobState::Running, "still under way");

    hold.release();
    // The job has ended its work and decided its end; its record is not written yet. The
    // process must still wait for it.
    let reached = PathBuf::from(format!("{}.reached", finish.display()));
    let deadline = Instant::now() + DEADLINE;
    while !reached.exists() {
        assert!(Instant::now() < deadline, "the job never reached its end");
        std::thread::sleep(Duration::from_millis(10));
    }
    let watch_until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < watch_until {
        let exited = server.child.try_wait().expect("polling the process");
        assert!(
            exited.is_none(),
            "serve exited ({exited:?}) before the job's end was recorded"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::write(&finish, b"go").expect("releasing the job's record write");
    let deadline = Instant::now() + DEADLINE;
    let status = loop {
        if let Some(status) = server.child.try_wait().expect("polling the process") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "serve did not exit after the job ended"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "serve exits 0 after SIGTERM: {status:?}");

    // The job's own end was recorded before the exit (not left running for the restart to
    // fail as "interrupted"), and the job's undo ran: the item back in protected, no files.
    let recorded = read_job(job);
    assert_held_job_failed_on_its_own(&recorded);
    let record: appliance::items::ItemRecord = {
        let id = common::item_id(&a.id);
        let bytes = stored(&data)
            .record_bytes(&id)
            .expect("reading the store")
            .expect("the record");
        serde_json::from_slice(&bytes).expect("a record")
    };
    assert_eq!(record.state, ItemState::Protected, "{record:?}");
    assert!(record.pending.is_none(), "{record:?}");
    assert_eq!(
        record.last_error.as_deref(),
        recorded.error.as_deref(),
        "{record:?}"
    );
    assert!(!target.join("disk-0.raw").exists(), "no materialized disk");
    assert!(
        !target.join("disk-0.raw.partial").exists(),
        "no partial file"
    );
    // The replication job was not waited for: still running in its file.
    let waiting_file = read_job(waiting_job);
    assert_eq!(waiting_file.state, JobState::Running, "{waiting_file:?}");

    // After a restart: the job stays as recorded, the replication job carries on, and the item
    // works (a test failover writes the disk at its point).
    let server = Server::start(&data, &[]);
    let after = server.api().job(job).expect("the job");
    assert_eq!(after, recorded, "the job as it was recorded at the stop");
    assert_eq!(
        server.api().job(waiting_job).expect("the job").state,
        JobState::Running
    );
    assert_eq!(
        item(&server, &waiting_id).state,
        ItemState::InitialReplication
    );
    let retry = test_failover(&server, &a.id, &target).expect("202");
    server.wait_job(retry.id);
    let written = std::fs::read(target.join("disk-0.raw")).expect("the test failover's disk");
    assert!(
        written == a.image,
        "the test failover's disk is the disk at the point"
    );
    server.stop();
}
