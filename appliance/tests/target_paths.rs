//! Target directories of the disk-writing jobs against a real `appliance serve` (running as
//! root, like the appliance): symbolic links planted at every name a job uses (the final and
//! the temporary file names, the directory itself, a parent component), before the request
//! and while the job runs; a file appearing at a final name; two jobs into one directory; a
//! job interrupted by a restart. Nothing outside may be written, no planted file replaced or
//! removed, and every job that reports success reports files that exist.
//!
//! How a job is held running and then let go on to succeed: a disk-writing job opens its
//! item's replica *by path* (`Manager::write_disks`). The test moves the replica aside, puts a
//! copy at its path and takes a write lease on the copy (`fcntl(F_SETLEASE, F_WRLCK)`): the
//! job's `open` then blocks until the lease is released. The test sees the job blocked (the
//! lease is being broken: `F_GETLEASE` no longer answers `F_WRLCK`), plants what it wants,
//! and releases the lease; the job reads the copy (equal to the replica: no write arrives
//! meanwhile) and carries on. The apply worker keeps the replica it opened at start, which is
//! moved back afterwards.

// Shared with the other test binaries, which allow its unwraps crate-wide; here only it.
#[allow(clippy::unwrap_used)]
mod common;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use appliance_api::model::{
    ChangePointRequest, DiskSpec, EnableRequest, FailoverRequest, Format, ItemState, ItemView,
    JobState, JobView, MaterializeRequest, PointSpec,
};
use common::{Server, item_id};
use engine::delta::{Consistency, DiskGeometry};
use source_agent::sender::{Agent, AgentConfig};

/// Longest any state is polled for.
const DEADLINE: Duration = Duration::from_secs(60);
/// Size of each item's one disk.
const DISK_BYTES: u64 = 4 << 20;

/// An item in `protected` with two recovery points.
struct Protected {
    id: String,
    replica: PathBuf,
    /// (point id, the disk at that point), oldest first.
    points: Vec<(u64, Vec<u8>)>,
}

impl Protected {
    fn latest(&self) -> &(u64, Vec<u8>) {
        self.points.last().expect("two points")
    }
}

/// Enables an item, streams two writes with a bookmark after each, closes the session and
/// waits until both points are processed and the item is `protected`.
fn protect(server: &Server, name: &str, fill: u8) -> Protected {
    let enabled = server
        .api()
        .enable(&EnableRequest {
            name: name.into(),
            disks: vec![DiskSpec::create(DISK_BYTES >> 20, None)],
            policy: None,
            temporary_os_disk: None,
        })
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
    let mut points = Vec::new();
    for round in 0..2u8 {
        let data: Vec<u8> = (0..64 * 1024u32)
            .map(|i| fill ^ round ^ (i / 4096) as u8 ^ (i % 251) as u8)
            .collect();
        let offset = 8192 + u64::from(round) * 4096;
        agent
            .write(0, offset, &data)
            .expect("the agent queues a write");
        image[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        let seq = agent
            .bookmark(Consistency::Crash, u64::from(round) + 1, 1, "p")
            .expect("the agent queues a bookmark");
        points.push((seq, image.clone()));
    }
    agent.close(DEADLINE).expect("every frame acknowledged");
    server.wait_job(enabled.job.id);
    let last = points.last().expect("two points").0;
    let deadline = Instant::now() + DEADLINE;
    loop {
        let view = item(server, &id);
        if view.state == ItemState::Protected && view.latest_point_id == Some(last) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never protected at {last}: {view:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Protected {
        id,
        replica,
        points,
    }
}

fn item(server: &Server, id: &str) -> ItemView {
    server.api().item(id).expect("the item")
}

fn wait_state(server: &Server, id: &str, state: ItemState) -> ItemView {
    server
        .api()
        .wait_state(id, state, Duration::from_millis(20), DEADLINE)
        .unwrap_or_else(|e| panic!("never {state}: {e}"))
}

/// Polls a job until it is no longer running; returns its view.
fn wait_job_end(server: &Server, id: u64) -> JobView {
    server
        .api()
        .wait_job(id, Duration::from_millis(20), DEADLINE, &mut |_| {})
        .unwrap_or_else(|e| panic!("job {id}: {e}"))
}

/// A job that must fail with `words` in its error.
fn assert_failed_with(server: &Server, job: u64, words: &str) {
    let ended = wait_job_end(server, job);
    assert_eq!(ended.state, JobState::Failed, "{ended:?}");
    let error = ended.error.as_deref().expect("an error");
    assert!(error.contains(words), "expected {words:?} in: {error}");
}

/// A job's answer: the job, or the API's refusal.
type Answer = Result<JobView, appliance_api::Error>;

/// A test failover at `point` into `target` in `format`.
fn materialize(
    server: &Server,
    id: &str,
    point: PointSpec,
    target: &Path,
    format: Format,
) -> Answer {
    let request = MaterializeRequest {
        point,
        target_dir: target.display().to_string(),
        format,
        mode: Default::default(),
    };
    server.api().test_failover(id, &request)
}

fn test_failover(server: &Server, id: &str, target: &Path) -> Answer {
    materialize(
        server,
        id,
        PointSpec::latest_processed(),
        target,
        Format::Raw,
    )
}

fn failover_as(server: &Server, id: &str, target: &Path, format: Format) -> Answer {
    let request = FailoverRequest {
        point: PointSpec::latest_processed(),
        target_dir: target.display().to_string(),
        format,
        source_shut_down: true,
        mode: Default::default(),
    };
    server.api().failover(id, &request)
}

fn failover(server: &Server, id: &str, target: &Path) -> Answer {
    failover_as(server, id, target, Format::Raw)
}

fn change_point(server: &Server, id: &str, point: u64) -> Answer {
    let request = ChangePointRequest {
        point: PointSpec::Id(point),
    };
    server.api().change_point(id, &request)
}

fn assert_refused(answer: Answer, status: u16, code: &str) {
    let error = answer.expect_err("a refusal");
    assert_eq!(
        (error.status(), error.code()),
        (Some(status), Some(code)),
        "{error}"
    );
}

fn accepted(answer: Answer) -> u64 {
    answer.expect("202 and a job").id
}

/// Names in a directory, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        .map(|e| {
            e.expect("an entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

fn assert_link(path: &Path, to: &Path) {
    let target = std::fs::read_link(path)
        .unwrap_or_else(|e| panic!("{} is no longer the planted link: {e}", path.display()));
    assert_eq!(target, to, "{}", path.display());
}

/// Replaces `path` by a copy (same bytes, another inode: the copy is made before the original
/// goes, so its inode number cannot be the original's, reused).
fn replace_with_copy(path: &Path) {
    let copy = path.with_extension("copy");
    std::fs::copy(path, &copy).expect("copying");
    std::fs::rename(&copy, path).expect("replacing with the copy");
}

/// Everything outside the data directory the tests watch: a file and an empty directory.
struct Outside {
    victim: PathBuf,
    dir: PathBuf,
}

impl Outside {
    const CONTENT: &'static [u8] = b"outside the appliance's directories";

    fn new(root: &Path) -> Self {
        let dir = root.join("outside");
        std::fs::create_dir_all(dir.join("pb")).expect("creating the outside directory");
        let victim = root.join("victim");
        std::fs::write(&victim, Self::CONTENT).expect("writing the victim");
        Self { victim, dir }
    }

    /// Nothing outside was written: the victim is as it was and the directory holds only its
    /// empty `pb`.
    fn assert_untouched(&self) {
        let victim = std::fs::read(&self.victim).expect("the victim");
        assert!(
            victim == Self::CONTENT,
            "a file outside was overwritten ({} bytes now)",
            victim.len()
        );
        assert_eq!(listing(&self.dir), vec!["pb"], "files made outside");
        assert!(
            listing(&self.dir.join("pb")).is_empty(),
            "files made outside"
        );
    }
}

/// A job held in its `open` of the replica by a write lease on a copy (module comment).
struct LeaseHold {
    replica: PathBuf,
    aside: PathBuf,
    lease: Option<File>,
    restored: bool,
}

impl LeaseHold {
    fn new(replica: &Path, scratch: &Path, name: &str) -> Self {
        // The kernel signals a lease's holder with SIGIO when an open waits on it; its
        // default action would end the test process.
        // SAFETY: setting a signal's disposition to "ignore"; no handler runs.
        unsafe { libc::signal(libc::SIGIO, libc::SIG_IGN) };
        let aside = scratch.join(format!("{name}.replica"));
        std::fs::rename(replica, &aside).expect("moving the replica aside");
        std::fs::copy(&aside, replica).expect("copying the replica");
        let lease = File::open(replica).expect("opening the copy");
        // SAFETY: fcntl on a descriptor we own; no memory is passed.
        let set = unsafe { libc::fcntl(lease.as_raw_fd(), libc::F_SETLEASE, libc::F_WRLCK) };
        assert_eq!(set, 0, "F_SETLEASE: {}", std::io::Error::last_os_error());
        Self {
            replica: replica.to_path_buf(),
            aside,
            lease: Some(lease),
            restored: false,
        }
    }

    /// Waits until a job is blocked opening the replica.
    fn wait_blocked(&self) {
        let fd = self.lease.as_ref().expect("held").as_raw_fd();
        let deadline = Instant::now() + DEADLINE;
        // SAFETY: fcntl on a descriptor we own; no memory is passed.
        while unsafe { libc::fcntl(fd, libc::F_GETLEASE) } == libc::F_WRLCK {
            assert!(Instant::now() < deadline, "no job opened the replica");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Lets the blocked job open the copy.
    fn release(&mut self) {
        self.lease = None;
    }

    /// Puts the replica back (after the job ended).
    fn restore(&mut self) {
        self.release();
        self.restored = true;
        std::fs::rename(&self.aside, &self.replica).expect("putting the replica back");
    }
}

impl Drop for LeaseHold {
    fn drop(&mut self) {
        if !self.restored {
            self.lease = None;
            let _ = std::fs::rename(&self.aside, &self.replica);
        }
    }
}

struct Rig {
    _tmp: tempfile::TempDir,
    data: PathBuf,
    scratch: PathBuf,
    outside: Outside,
    server: Server,
}

fn rig() -> Rig {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("a temporary directory");
    let root = tmp.path().canonicalize().expect("canonical");
    let data = root.join("data");
    let scratch = root.join("scratch");
    std::fs::create_dir_all(&data).expect("creating the data directory");
    std::fs::create_dir_all(&scratch).expect("creating the scratch directory");
    let outside = Outside::new(&root);
    let server = Server::start(&data, &[]);
    Rig {
        _tmp: tmp,
        data,
        scratch,
        outside,
        server,
    }
}

#[test]
fn links_planted_at_every_name_before_a_request_are_refused_and_left_alone() {
    let rig = rig();
    let (server, data, outside) = (&rig.server, &rig.data, &rig.outside);
    let a = protect(server, "vm-a", 0x11);
    let made_outside = outside.dir.join("made-through-a-link");
    // The recorded identities are part of the documented answers.
    let doc = server.api().openapi().expect("the document");
    for schema in ["Materialized", "WrittenFile", "FileIdentity"] {
        assert!(
            doc["components"]["schemas"].get(schema).is_some(),
            "{schema} is not in /openapi.json"
        );
    }

    // name planted in the target directory → what it points to
    let cases: Vec<(&str, &Path)> = vec![
        ("disk-0.raw", &outside.victim),
        ("disk-0.raw", &made_outside),
        ("disk-0.raw.partial", &outside.victim),
        ("disk-0.raw.partial", &made_outside),
    ];
    let mut planted = Vec::new();
    for (n, (name, to)) in cases.iter().enumerate() {
        for op in ["test-failover", "failover"] {
            let dir = data.join(format!("{op}-{n}"));
            std::fs::create_dir(&dir).expect("creating a target directory");
            symlink(to, dir.join(name)).expect("planting a link");
            let answer = match op {
                "test-failover" => test_failover(server, &a.id, &dir),
                _ => failover(server, &a.id, &dir),
            };
            assert_refused(answer, 409, "path_in_use");
            assert_eq!(
                listing(&dir),
                vec![name.to_string()],
                "nothing made in {dir:?}"
            );
            planted.push((dir.join(name), to.to_path_buf()));
        }
    }
    // The directory itself, and a parent component, links to a directory outside.
    symlink(&outside.dir, data.join("dir-link")).expect("planting a link");
    symlink(&outside.dir, data.join("parent-link")).expect("planting a link");
    planted.push((data.join("dir-link"), outside.dir.clone()));
    planted.push((data.join("parent-link"), outside.dir.clone()));
    for target in [data.join("dir-link"), data.join("parent-link/pb")] {
        assert_refused(test_failover(server, &a.id, &target), 403, "path_refused");
        assert_refused(failover(server, &a.id, &target), 403, "path_refused");
    }
    // A NUL byte (400 bad_request), an over-long component (403 path_refused, as for every
    // path the filesystem cannot take): named 4xx, not 500s.
    let long = data.join("x".repeat(300));
    for (target, status, code) in [
        (format!("{}/a\u{0}b", data.display()), 400, "bad_request"),
        (long.display().to_string(), 403, "path_refused"),
    ] {
        let answer = test_failover(server, &a.id, Path::new(&target));
        assert_refused(answer, status, code);
    }
    assert_eq!(
        item(server, &a.id).state,
        ItemState::Protected,
        "refusals change nothing"
    );
    outside.assert_untouched();
    for (link, to) in &planted {
        assert_link(link, to);
    }

    // ── change point ──
    let fo = data.join("fo");
    let job = accepted(failover(server, &a.id, &fo));
    server.wait_job(job);
    let view = wait_state(server, &a.id, ItemState::FailedOver);
    assert_eq!(
        view.failover.as_ref().map(|f| f.point_id),
        Some(a.latest().0)
    );
    let disk = fo.join("disk-0.raw");
    assert!(std::fs::read(&disk).expect("the failed-over disk") == a.latest().1);
    let first = a.points[0].0;
    let change = |point: u64| change_point(server, &a.id, point);

    // A link at the temporary name: refused, nothing changed.
    symlink(&outside.victim, fo.join("disk-0.raw.partial")).expect("planting a link");
    assert_refused(change(first), 409, "path_in_use");
    assert_link(&fo.join("disk-0.raw.partial"), &outside.victim);
    std::fs::remove_file(fo.join("disk-0.raw.partial")).expect("removing the link");

    // A link where the old code made its staging directory (`.change-<job id>`): unused now.
    let jobs = server.api().jobs().expect("the jobs");
    let next_job = jobs[0].id + 1;
    let staging_link = fo.join(format!(".change-{next_job}"));
    symlink(&outside.dir, &staging_link).expect("planting a link");
    let job = accepted(change(first));
    assert_eq!(job, next_job);
    server.wait_job(job);
    let view = wait_state(server, &a.id, ItemState::FailedOver);
    assert_eq!(view.failover.as_ref().map(|f| f.point_id), Some(first));
    assert!(
        std::fs::read(&disk).expect("the disk") == a.points[0].1,
        "disk at the new point"
    );
    assert_link(&staging_link, &outside.dir);
    assert_eq!(
        listing(&fo),
        vec![format!(".change-{next_job}"), "disk-0.raw".into()]
    );

    // The failed-over disk replaced by another file (same bytes, another inode): change point
    // does not replace what the failover did not write.
    let foreign = std::fs::read(&disk).expect("the disk");
    replace_with_copy(&disk);
    assert_refused(change(a.latest().0), 409, "target_changed");
    assert!(std::fs::read(&disk).expect("the foreign file") == foreign);
    assert_eq!(item(server, &a.id).state, ItemState::FailedOver);
    outside.assert_untouched();
    for (link, to) in &planted {
        assert_link(link, to);
    }
}

#[test]
fn links_and_files_planted_while_a_job_runs_are_not_followed_or_replaced() {
    let rig = rig();
    let (server, data, outside) = (&rig.server, &rig.data, &rig.outside);
    let a = protect(server, "vm-a", 0x22);
    let made_outside = outside.dir.join("made-through-a-link");

    // Runs a test failover of A into `target`, held until `plant` has run; the job must fail
    // with `words`; A is back in protected.
    let held = |target: &Path, plant: &dyn Fn(), words: &str| {
        let mut hold = LeaseHold::new(&a.replica, &rig.scratch, "a");
        let job = accepted(test_failover(server, &a.id, target));
        hold.wait_blocked();
        plant();
        hold.release();
        assert_failed_with(server, job, words);
        hold.restore();
        wait_state(server, &a.id, ItemState::Protected);
    };

    // A dangling link at the final name, pointing outside.
    let t1 = data.join("t1");
    held(
        &t1,
        &|| symlink(&made_outside, t1.join("disk-0.raw")).expect("planting a link"),
        "already exists",
    );
    assert_link(&t1.join("disk-0.raw"), &made_outside);
    assert_eq!(
        listing(&t1),
        vec!["disk-0.raw"],
        "the job's temporary file removed"
    );

    // A file appearing at the final name.
    let t2 = data.join("t2");
    held(
        &t2,
        &|| std::fs::write(t2.join("disk-0.raw"), b"theirs").expect("planting a file"),
        "already exists",
    );
    assert!(
        std::fs::read(t2.join("disk-0.raw")).expect("their file") == b"theirs",
        "their file replaced"
    );
    assert_eq!(listing(&t2), vec!["disk-0.raw"]);

    // The job's temporary file swapped for a link to a file outside.
    let t3 = data.join("t3");
    held(
        &t3,
        &|| {
            symlink(&outside.victim, t3.join("swap")).expect("planting a link");
            std::fs::rename(t3.join("swap"), t3.join("disk-0.raw.partial"))
                .expect("replacing the temporary");
        },
        "is not the file that was recorded",
    );
    assert_link(&t3.join("disk-0.raw.partial"), &outside.victim);
    assert_eq!(listing(&t3), vec!["disk-0.raw.partial"]);

    // The target directory itself moved away and replaced by a link to a directory outside.
    let t4 = data.join("t4");
    let t4_aside = data.join("t4-aside");
    held(
        &t4,
        &|| {
            std::fs::rename(&t4, &t4_aside).expect("moving the directory");
            symlink(&outside.dir, &t4).expect("planting a link");
        },
        "no directory there now",
    );
    assert_link(&t4, &outside.dir);
    assert!(
        listing(&t4_aside).is_empty(),
        "the job's files removed: {:?}",
        listing(&t4_aside)
    );

    // A parent component replaced by a link to a directory outside (which has the same child).
    let t5 = data.join("pa").join("pb");
    let pa_aside = data.join("pa-aside");
    held(
        &t5,
        &|| {
            std::fs::rename(data.join("pa"), &pa_aside).expect("moving the parent");
            symlink(&outside.dir, data.join("pa")).expect("planting a link");
        },
        "no directory there now",
    );
    assert_link(&data.join("pa"), &outside.dir);
    assert!(listing(&pa_aside.join("pb")).is_empty());

    // ── change point: the failed-over disk replaced while the job writes ──
    let fo = data.join("fo");
    server.wait_job(accepted(failover(server, &a.id, &fo)));
    wait_state(server, &a.id, ItemState::FailedOver);
    let disk = fo.join("disk-0.raw");
    let mut hold = LeaseHold::new(&a.replica, &rig.scratch, "a");
    let job = accepted(change_point(server, &a.id, a.points[0].0));
    hold.wait_blocked();
    let foreign = std::fs::read(&disk).expect("the disk");
    replace_with_copy(&disk);
    hold.release();
    assert_failed_with(server, job, "is not the file that was recorded");
    hold.restore();
    let view = wait_state(server, &a.id, ItemState::FailedOver);
    assert_eq!(
        view.failover.as_ref().map(|f| f.point_id),
        Some(a.latest().0),
        "{view:?}"
    );
    assert!(
        std::fs::read(&disk).expect("the foreign file") == foreign,
        "not replaced"
    );
    assert_eq!(
        listing(&fo),
        vec!["disk-0.raw"],
        "the job's temporary file removed"
    );
    outside.assert_untouched();
}

#[test]
fn a_second_job_into_a_directory_a_running_job_owns_is_refused_and_the_first_is_intact() {
    let rig = rig();
    let (server, data) = (&rig.server, &rig.data);
    let a = protect(server, "vm-a", 0x33);
    let b = protect(server, "vm-b", 0x44);
    let shared = data.join("shared");
    symlink(&shared, data.join("alias")).expect("an alias of the directory");

    let mut hold = LeaseHold::new(&a.replica, &rig.scratch, "a");
    let job_a = accepted(test_failover(server, &a.id, &shared));
    hold.wait_blocked();
    let before = listing(&shared);
    // B's failover in VHD format (other file names) and B's test failover through another
    // path to the same directory: both refused, naming A's job.
    let answers = [
        failover_as(server, &b.id, &shared, Format::Vhd),
        test_failover(server, &b.id, &data.join("alias")),
    ];
    for answer in answers {
        let message = answer
            .as_ref()
            .err()
            .and_then(|e| e.refusal())
            .map(|r| r.message.clone())
            .unwrap_or_default();
        assert_refused(answer, 409, "target_dir_busy");
        assert!(message.contains(&format!("job {job_a}")), "{message}");
    }
    assert_eq!(listing(&shared), before, "the refusals made nothing");
    assert_eq!(item(server, &b.id).state, ItemState::Protected);

    hold.release();
    let ended = server.wait_job(job_a);
    hold.restore();
    let view = item(server, &a.id);
    assert_eq!(view.state, ItemState::TestFailover, "{ended:?} {view:?}");
    let files: Vec<PathBuf> = view
        .test_failover
        .as_ref()
        .expect("a file list")
        .files
        .iter()
        .map(PathBuf::from)
        .collect();
    assert_eq!(files, vec![shared.join("disk-0.raw")]);
    assert!(
        std::fs::read(&files[0]).expect("A's disk") == a.latest().1,
        "A's disk is true"
    );

    // Once A's job ended, B may write into the directory (other names). Each clean-up removes
    // only its own files; the directory A's job made goes with A's clean-up once it is empty.
    let job_b = accepted(materialize(
        server,
        &b.id,
        PointSpec::latest_processed(),
        &shared,
        Format::Vhd,
    ));
    server.wait_job(job_b);
    assert_eq!(listing(&shared), vec!["disk-0.raw", "disk-0.vhd"]);
    server
        .api()
        .test_failover_cleanup(&b.id)
        .expect("cleaned up");
    assert_eq!(
        listing(&shared),
        vec!["disk-0.raw"],
        "B's clean-up left A's disk"
    );
    assert!(std::fs::read(&files[0]).expect("A's disk") == a.latest().1);
    server
        .api()
        .test_failover_cleanup(&a.id)
        .expect("cleaned up");
    assert!(
        !shared.exists(),
        "the directory A's job made, empty now, is removed"
    );
}

#[test]
fn a_restart_removes_only_what_the_interrupted_job_recorded() {
    let rig = rig();
    let data = &rig.data;
    let a = protect(&rig.server, "vm-a", 0x55);
    let target = data.join("interrupted");
    let mut hold = LeaseHold::new(&a.replica, &rig.scratch, "a");
    let job = accepted(test_failover(&rig.server, &a.id, &target));
    hold.wait_blocked();
    rig.server.kill();
    hold.restore();
    // Someone else's file at the final name the job would have written.
    std::fs::write(target.join("disk-0.raw"), b"theirs").expect("planting a file");
    let server = Server::start(data, &[]);
    let ended = server.api().job(job).expect("the job");
    assert_eq!(ended.state, JobState::Failed, "{ended:?}");
    assert_eq!(item(&server, &a.id).state, ItemState::Protected);
    assert_eq!(
        listing(&target),
        vec!["disk-0.raw"],
        "the job's temporary file removed, the other file kept"
    );
    assert!(
        std::fs::read(target.join("disk-0.raw")).expect("their file") == b"theirs",
        "their file replaced"
    );
    rig.outside.assert_untouched();
    server.stop();
}
