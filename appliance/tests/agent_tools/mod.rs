//! What the source-agent tests share: the `source-agent` binary run as a product (its config
//! and token files written, `run` started and its stdout lines parsed, its CLI for bookmarks,
//! status and quiesce), an appliance item for it, and the kernel's side of a VM's disk: the
//! agent's NBD export attached through `nbdfuse` + a loop device and mounted, each piece a
//! guard that cleans up when dropped (also when a test panics).

#![allow(dead_code)] // not every test uses every helper

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use appliance_api::model::{DiskSpec, EnableRequest, PointView, PolicyRequest};

use crate::common::Server;
use crate::nbd_tools::{have, ok, run};

/// Bound on how long a broken run may hang in one wait (not a pass/fail timing).
pub const DEADLINE: Duration = Duration::from_secs(120);

/// The tests of one file share the kernel's loop devices, the 2 cores and the disk: they run
/// one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Holds the file's lock until dropped (a panicked test does not poison the others).
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Whether this machine can run the tests: root (loop devices, mount), `/dev/fuse` and every
/// tool. Prints `SKIP: <reason>` otherwise.
pub fn preflight(tools: &[&str]) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIP: not root (loop devices, mount and fsfreeze need it)");
        return false;
    }
    if !Path::new("/dev/fuse").exists() {
        println!("SKIP: no /dev/fuse (nbdfuse needs FUSE)");
        return false;
    }
    have(tools)
}

/// The `source-agent` binary: `$SOURCE_AGENT_BIN`, or beside this test's executable
/// (disk-sim's finder; `cargo test --workspace` builds it).
pub fn agent_bin() -> PathBuf {
    disk_sim::site::source_agent_bin().unwrap_or_else(|e| panic!("{e:#}"))
}

/// An enabled item: its id (32 hex), stream token and replication job.
pub struct Item {
    pub id: String,
    pub name: String,
    pub token: String,
    pub job: u64,
}

/// Enables an item of one disk of `size_bytes` (a multiple of 1 MiB), keeping every point
/// (flush bookmarks come every second; the tests' app points must not be thinned out).
pub fn enable(server: &Server, name: &str, size_bytes: u64) -> Item {
    assert_eq!(size_bytes % (1 << 20), 0);
    let enabled = server
        .api()
        .enable(&EnableRequest {
            name: name.into(),
            disks: vec![DiskSpec::create(size_bytes >> 20, None)],
            policy: Some(PolicyRequest {
                keep_points: Some(100_000),
                keep_minutes: Some(0),
                app_consistent_minutes: None,
            }),
            temporary_os_disk: None,
        })
        .unwrap();
    Item {
        id: enabled.item.id.clone(),
        name: name.into(),
        token: enabled.stream_token,
        job: enabled.job.id,
    }
}

/// The files of one agent: its config, the disk image (one disk, named `os`), its state
/// directory and its log (the daemon's stderr).
pub struct AgentFiles {
    pub config: PathBuf,
    pub image: PathBuf,
    pub state_dir: PathBuf,
    pub log: PathBuf,
    pub size_bytes: u64,
}

/// Writes a sparse disk image of `size_bytes`, the token file (mode 0600) and the config of
/// an agent protecting it as `item` on `server`, in `dir`. `extra` is more TOML keys (before
/// the `[[disk]]` table).
pub fn agent_files(
    dir: &Path,
    server: &Server,
    item: &Item,
    size_bytes: u64,
    extra: &str,
) -> AgentFiles {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir).unwrap();
    let image = dir.join("os.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(size_bytes)
        .unwrap();
    let token_file = dir.join("agent.token");
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&token_file)
        .unwrap()
        .write_all(format!("{}\n", item.token).as_bytes())
        .unwrap();
    let state_dir = dir.join("state");
    std::fs::create_dir_all(&state_dir).unwrap();
    let config = dir.join("agent.toml");
    let text = format!(
        "item_name = {name:?}\n\
         item_id = {id:?}\n\
         appliance = \"{addr}\"\n\
         token_file = {token:?}\n\
         state_dir = {state:?}\n\
         nbd_addr = \"127.0.0.1:0\"\n\
         {extra}\n\
         [[disk]]\n\
         name = \"os\"\n\
         path = {image:?}\n",
        name = item.name,
        id = item.id,
        addr = server.data,
        token = token_file.display().to_string(),
        state = state_dir.display().to_string(),
        image = image.display().to_string(),
    );
    std::fs::write(&config, text).unwrap();
    AgentFiles {
        config,
        image,
        state_dir,
        log: dir.join("agent.log"),
        size_bytes,
    }
}

/// One disk as `run` announced it.
#[derive(Debug, Clone)]
pub struct DiskLine {
    pub name: String,
    pub uri: String,
    pub size_bytes: u64,
    pub path: String,
}

/// Parses `disk <name>: nbd://<ip:port>/<name> (<size_bytes> bytes, <path>)`.
pub fn parse_disk_line(line: &str) -> Option<DiskLine> {
    let rest = line.strip_prefix("disk ")?;
    let (name, rest) = rest.split_once(": ")?;
    let (uri, rest) = rest.split_once(" (")?;
    let (size, rest) = rest.split_once(" bytes, ")?;
    let path = rest.strip_suffix(')')?;
    uri.starts_with("nbd://").then_some(())?;
    Some(DiskLine {
        name: name.into(),
        uri: uri.into(),
        size_bytes: size.parse().ok()?,
        path: path.into(),
    })
}

/// A running `source-agent run`; SIGKILLed when dropped (a test that panics leaves no agent
/// behind; its log's tail is printed then).
pub struct AgentProc {
    pub child: Child,
    pub disks: Vec<DiskLine>,
    pub control_socket: String,
    /// Every stdout line up to `ready`.
    pub banner: Vec<String>,
    log: PathBuf,
    done: bool,
}

impl AgentProc {
    /// Starts `source-agent run --config` (stderr appended to `files.log`) and waits for its
    /// `ready` line.
    pub fn start(files: &AgentFiles) -> Self {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&files.log)
            .unwrap();
        let mut child = Command::new(agent_bin())
            .arg("run")
            .arg("--config")
            .arg(&files.config)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", agent_bin().display()));
        let stdout = child.stdout.take().unwrap();
        // Lines go through a channel so that a hung agent fails the wait instead of hanging it;
        // the thread keeps draining stdout after `ready`.
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // Once nobody listens any more, the lines are drained and dropped.
                let _ = tx.send(line);
            }
        });
        let mut proc = Self {
            child,
            disks: Vec::new(),
            control_socket: String::new(),
            banner: Vec::new(),
            log: files.log.clone(),
            done: false,
        };
        let until = Instant::now() + DEADLINE;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let line = match rx.recv_timeout(left) {
                Ok(line) => line,
                Err(e) => panic!(
                    "source-agent run never said ready ({e}); stdout so far: {:?}; log:\n{}",
                    proc.banner,
                    proc.log_tail()
                ),
            };
            proc.banner.push(line.clone());
            if line == "ready" {
                break;
            }
            if let Some(disk) = parse_disk_line(&line) {
                proc.disks.push(disk);
            } else if let Some(path) = line.strip_prefix("control socket: ") {
                proc.control_socket = path.into();
            }
        }
        assert!(
            proc.banner[0].starts_with("source-agent "),
            "first line: {:?}",
            proc.banner
        );
        assert!(
            !proc.disks.is_empty(),
            "no disk line before ready: {:?}",
            proc.banner
        );
        proc
    }

    /// The NBD URI of disk `name`.
    pub fn uri(&self, name: &str) -> &str {
        &self
            .disks
            .iter()
            .find(|d| d.name == name)
            .unwrap_or_else(|| panic!("no disk {name}: {:?}", self.disks))
            .uri
    }

    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.id() as i32)
    }

    /// The last part of its log (stderr).
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let start = text.len().saturating_sub(4000);
        let start = (start..text.len())
            .find(|i| text.is_char_boundary(*i))
            .unwrap_or(text.len());
        text[start..].to_owned()
    }

    /// SIGTERM (graceful: flush, deliver, checkpoint); the exit status must be 0.
    pub fn stop(mut self) {
        self.done = true;
        nix::sys::signal::kill(self.pid(), nix::sys::signal::Signal::SIGTERM).unwrap();
        let status = wait_child(&mut self.child, DEADLINE).unwrap_or_else(|| {
            panic!("source-agent did not exit on SIGTERM:\n{}", self.log_tail())
        });
        assert!(
            status.success(),
            "source-agent exits 0 on SIGTERM, got {status}; log:\n{}",
            self.log_tail()
        );
    }

    /// SIGKILL: the agent dies mid-flight, as with its host.
    pub fn kill(mut self) {
        self.done = true;
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.child.kill();
            let _ = self.child.wait();
            if std::thread::panicking() {
                eprintln!("source-agent log (tail):\n{}", self.log_tail());
            }
        }
    }
}

/// Waits for a child to exit, at most `timeout`.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let until = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() >= until {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `source-agent <args…>` run to its end.
pub fn cli(args: &[&str]) -> Output {
    run(Command::new(agent_bin()).args(args))
}

/// `source-agent <command> --config <config> <args…>`, which must exit 0; its stdout.
pub fn cli_ok(command: &str, config: &Path, args: &[&str]) -> String {
    let config = config.display().to_string();
    let mut all = vec![command, "--config", &config];
    all.extend_from_slice(args);
    let out = cli(&all);
    assert!(
        out.status.success(),
        "source-agent {all:?} exited {}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A bookmark the agent put into the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bookmarked {
    pub bookmark_id: u64,
    pub seq: u64,
    pub consistency: String,
}

/// Parses `bookmark <bookmark_id> seq <seq> (<consistency>)`.
pub fn parse_bookmarked(line: &str) -> Option<Bookmarked> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    match fields[..] {
        ["bookmark", id, "seq", seq, consistency] => Some(Bookmarked {
            bookmark_id: id.parse().ok()?,
            seq: seq.parse().ok()?,
            consistency: consistency.strip_prefix('(')?.strip_suffix(')')?.to_owned(),
        }),
        _ => None,
    }
}

fn bookmarked_of(command: &str, stdout: &str) -> Bookmarked {
    let line = stdout.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    parse_bookmarked(line)
        .unwrap_or_else(|| panic!("source-agent {command} printed {stdout:?}, not a bookmark line"))
}

/// `source-agent bookmark` (app consistency when `app` or any `freeze` mount point; waits
/// for the appliance's ack up to `wait_secs`).
pub fn bookmark(
    config: &Path,
    app: bool,
    freeze: &[&Path],
    label: &str,
    wait_secs: u64,
) -> Bookmarked {
    let wait = wait_secs.to_string();
    let freeze: Vec<String> = freeze.iter().map(|p| p.display().to_string()).collect();
    let mut args = vec!["--label", label, "--wait-secs", &wait];
    if app {
        args.push("--app");
    }
    for mount in &freeze {
        args.push("--freeze");
        args.push(mount);
    }
    bookmarked_of("bookmark", &cli_ok("bookmark", config, &args))
}

/// `source-agent quiesce --timeout-secs`.
pub fn quiesce(config: &Path, label: &str, timeout_secs: u64) -> Bookmarked {
    let timeout = timeout_secs.to_string();
    bookmarked_of(
        "quiesce",
        &cli_ok(
            "quiesce",
            config,
            &["--label", label, "--timeout-secs", &timeout],
        ),
    )
}

/// `source-agent status --json`, parsed.
#[derive(Debug, Clone)]
pub struct Status(pub serde_json::Value);

impl Status {
    /// A per-disk counter summed over the disks.
    pub fn sum(&self, field: &str) -> u64 {
        self.0["disks"]
            .as_array()
            .unwrap_or_else(|| panic!("status has no disks: {}", self.0))
            .iter()
            .map(|d| {
                d[field]
                    .as_u64()
                    .unwrap_or_else(|| panic!("disk status has no {field}: {d}"))
            })
            .sum()
    }

    pub fn link(&self) -> String {
        self.0["link"].as_str().unwrap_or("").to_owned()
    }

    pub fn quiesced(&self) -> bool {
        self.0["quiesced"].as_bool().unwrap_or(false)
    }

    pub fn last_bookmark(&self) -> Option<Bookmarked> {
        let b = &self.0["last_bookmark"];
        Some(Bookmarked {
            bookmark_id: b["bookmark_id"].as_u64()?,
            seq: b["seq"].as_u64()?,
            consistency: b["consistency"].as_str()?.to_owned(),
        })
    }
}

/// `source-agent status --json`.
pub fn status(config: &Path) -> Status {
    let out = cli_ok("status", config, &["--json"]);
    Status(
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("status --json printed {out:?}, not JSON: {e}")),
    )
}

/// Polls `status` until `done` holds (bounded by [`DEADLINE`]); returns that status.
pub fn wait_status(config: &Path, what: &str, mut done: impl FnMut(&Status) -> bool) -> Status {
    let until = Instant::now() + DEADLINE;
    loop {
        let now = status(config);
        if done(&now) {
            return now;
        }
        assert!(
            Instant::now() < until,
            "waited {DEADLINE:?} for {what}; status: {}",
            now.0
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the catch-up has sent everything (no unsent byte on any disk) on a
/// connected link.
pub fn wait_caught_up(config: &Path) -> Status {
    wait_status(config, "the catch-up to drain", |s| {
        s.sum("unsent_bytes") == 0 && s.link().starts_with("connected")
    })
}

/// Waits until the appliance has the point of `bookmark_id` applied; returns it.
pub fn point_of(server: &Server, item: &str, bookmark_id: u64) -> PointView {
    appliance_api::poll_until(Duration::from_millis(50), DEADLINE, || {
        Ok(server
            .api()
            .points(item)?
            .into_iter()
            .find(|p| p.bookmark_id == bookmark_id))
    })
    .unwrap_or_else(|e| panic!("no point of bookmark {bookmark_id} in item {item}: {e}"))
}

/// Takes the first bookmark once the initial sync has drained; waits for the item to be
/// protected (its replication job done).
pub fn wait_protected(server: &Server, item: &Item, config: &Path) -> Bookmarked {
    wait_caught_up(config);
    let first = bookmark(config, false, &[], "initial sync", 60);
    point_of(server, &item.id, first.bookmark_id);
    server.wait_job(item.job);
    first
}

/// nbdfuse serving one NBD export as a file; unmounted (lazily when busy) and reaped when
/// dropped.
pub struct Fuse {
    child: Child,
    pub dir: PathBuf,
    pub file: PathBuf,
    done: bool,
}

impl Fuse {
    /// `nbdfuse <dir>/disk <uri>`, waiting until it serves.
    pub fn start(dir: &Path, uri: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let pidfile = dir.with_extension("pid");
        let _ = std::fs::remove_file(&pidfile);
        let file = dir.join("disk");
        let child = Command::new("nbdfuse")
            .arg("-P")
            .arg(&pidfile)
            .arg(&file)
            .arg(uri)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let fuse = Self {
            child,
            dir: dir.to_path_buf(),
            file,
            done: false,
        };
        assert!(
            crate::nbd_tools::wait_for(&pidfile),
            "nbdfuse did not become ready"
        );
        fuse
    }

    /// Unmounts (lazily: a dead NBD connection or a busy loop device must not hang a test)
    /// and reaps nbdfuse.
    pub fn stop(mut self) {
        self.teardown();
    }

    /// SIGKILL first (the host is gone: every request in flight fails at once), then a lazy
    /// unmount.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.teardown();
    }

    fn teardown(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        let clean = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.dir)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !clean {
            let _ = Command::new("fusermount3")
                .args(["-u", "-z"])
                .arg(&self.dir)
                .stderr(Stdio::null())
                .status();
        }
        if wait_child(&mut self.child, Duration::from_secs(10)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drop for Fuse {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// A loop device; detached when dropped (waiting until the kernel let go of its file).
pub struct Loop {
    pub dev: String,
    done: bool,
}

impl Loop {
    /// `losetup -f --show [-r] <file>`.
    pub fn attach(file: &Path, read_only: bool) -> Self {
        let mut cmd = Command::new("losetup");
        cmd.args(["-f", "--show"]);
        if read_only {
            cmd.arg("-r");
        }
        let dev = ok(cmd.arg(file)).trim().to_owned();
        assert!(dev.starts_with("/dev/loop"), "losetup said {dev:?}");
        Self { dev, done: false }
    }

    pub fn detach(mut self) {
        self.teardown();
    }

    fn teardown(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        let _ = Command::new("losetup")
            .args(["-d", &self.dev])
            .stderr(Stdio::null())
            .status();
        // A busy device is detached when its last user closes it (autoclear): wait a while
        // so that the file under it is free for the next step.
        let backing = format!(
            "/sys/block/{}/loop/backing_file",
            self.dev.trim_start_matches("/dev/")
        );
        let until = Instant::now() + Duration::from_secs(10);
        while Path::new(&backing).exists() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// A mounted filesystem; unmounted when dropped (lazily when busy).
pub struct Mount {
    pub dir: PathBuf,
    done: bool,
}

impl Mount {
    /// `mount [-o <options>] <dev> <dir>`.
    pub fn at(dev: &str, dir: &Path, options: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let mut cmd = Command::new("mount");
        if !options.is_empty() {
            cmd.args(["-o", options]);
        }
        ok(cmd.arg(dev).arg(dir));
        Self {
            dir: dir.to_path_buf(),
            done: false,
        }
    }

    /// A clean unmount (which writes everything back); must succeed.
    pub fn unmount(mut self) {
        self.done = true;
        ok(Command::new("umount").arg(&self.dir));
    }

    /// `umount -l`: the device is gone (the host crashed); let the kernel drop it.
    pub fn lazy(mut self) {
        self.done = true;
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let clean = Command::new("umount")
            .arg(&self.dir)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !clean {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

/// The VM's view of an agent disk: nbdfuse, a loop device on its file, and (once mounted)
/// the filesystem. Dropped in that order reversed: mount, loop, nbdfuse.
pub struct Attached {
    pub mount: Option<Mount>,
    pub lo: Option<Loop>,
    pub fuse: Option<Fuse>,
}

impl Attached {
    /// nbdfuse under `dir` and a loop device on its file.
    pub fn attach(dir: &Path, uri: &str) -> Self {
        let fuse = Fuse::start(dir, uri);
        let lo = Loop::attach(&fuse.file, false);
        Self {
            mount: None,
            lo: Some(lo),
            fuse: Some(fuse),
        }
    }

    pub fn dev(&self) -> &str {
        &self.lo.as_ref().unwrap().dev
    }

    /// Mounts the loop device at `dir`.
    pub fn mount(&mut self, dir: &Path, options: &str) -> PathBuf {
        let mount = Mount::at(self.dev(), dir, options);
        self.mount = Some(mount);
        dir.to_path_buf()
    }

    /// The mount point.
    pub fn dir(&self) -> &Path {
        &self.mount.as_ref().unwrap().dir
    }

    /// The VM shuts down: a clean unmount, the loop device detached, nbdfuse gone.
    pub fn shut_down(mut self) {
        if let Some(mount) = self.mount.take() {
            mount.unmount();
        }
        if let Some(lo) = self.lo.take() {
            lo.detach();
        }
        if let Some(fuse) = self.fuse.take() {
            fuse.stop();
        }
    }

    /// The VM's host crashed: lazy unmount, detach, nbdfuse gone; nothing is written back.
    pub fn crash(mut self) {
        if let Some(fuse) = self.fuse.take() {
            // First nbdfuse (its connection is dead anyway): every I/O in flight fails now
            // instead of waiting on it.
            fuse.kill();
        }
        if let Some(mount) = self.mount.take() {
            mount.lazy();
        }
        if let Some(lo) = self.lo.take() {
            lo.detach();
        }
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        drop(self.mount.take());
        drop(self.lo.take());
        drop(self.fuse.take());
    }
}

/// A child process killed and reaped when dropped.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `mkfs.ext4` for the tests: 4 KiB blocks, no discard, inode tables and journal written now
/// (no lazy init thread writing in the background later).
pub fn mkfs_ext4(dev: &str) {
    ok(Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-b",
            "4096",
            "-E",
            "nodiscard,lazy_itable_init=0,lazy_journal_init=0",
        ])
        .arg(dev));
}

/// The sha256 of every regular file under `root` (`lost+found` aside), one `sha256sum`
/// line per file, sorted by path.
pub fn tree_sums(root: &Path) -> String {
    ok(Command::new("sh").current_dir(root).args([
        "-c",
        "find . -path ./lost+found -prune -o -type f -print0 | LC_ALL=C sort -z \
         | xargs -0 -r sha256sum",
    ]))
}

/// Compares two [`tree_sums`] outputs; on a difference names the first files that differ.
pub fn assert_same_sums(expected: &str, got: &str, what: &str) {
    if expected == got {
        return;
    }
    let want: std::collections::BTreeSet<&str> = expected.lines().collect();
    let have: std::collections::BTreeSet<&str> = got.lines().collect();
    let missing: Vec<&&str> = want.difference(&have).take(10).collect();
    let extra: Vec<&&str> = have.difference(&want).take(10).collect();
    panic!(
        "{what}: the files differ ({} expected, {} found); expected but not found: \
         {missing:#?}; found but not expected: {extra:#?}",
        want.len(),
        have.len()
    );
}

/// `e2fsck -fn` must be clean (exit 0).
pub fn e2fsck_clean(image: &Path, what: &str) {
    let out = run(Command::new("e2fsck").arg("-fn").arg(image));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{what}: e2fsck -fn {} is not clean:\n{}\n{}",
        image.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A crash point: replays the journal on a copy (`e2fsck -E journal_only -y`, nothing else
/// repaired), then `e2fsck -fn` on it must be clean. Returns the copy.
pub fn e2fsck_after_replay(image: &Path, copy: &Path, what: &str) -> PathBuf {
    ok(Command::new("cp")
        .arg("--sparse=always")
        .arg(image)
        .arg(copy));
    let header = ok(Command::new("dumpe2fs").arg("-h").arg(copy));
    let needed = header
        .lines()
        .any(|l| l.starts_with("Filesystem features:") && l.contains("needs_recovery"));
    println!(
        "{what}: the journal {}",
        if needed {
            "needed recovery (replayed)"
        } else {
            "was clean"
        }
    );
    let out = run(Command::new("e2fsck")
        .args(["-E", "journal_only", "-y"])
        .arg(copy));
    assert!(
        matches!(out.status.code(), Some(0 | 1)),
        "{what}: journal replay failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    e2fsck_clean(copy, what);
    copy.to_path_buf()
}

/// A file of records appended and fsync'd one by one in a thread; counts the records whose
/// fsync returned (acknowledged: the VM was told they are durable). Stops on `stop()` or at
/// the first error (the disk went away).
pub struct RecordWriter {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    acked: std::sync::Arc<std::sync::atomic::AtomicU64>,
    done: std::sync::mpsc::Receiver<Result<u64, String>>,
    pub path: PathBuf,
}

/// Bytes per record.
pub const RECORD_BYTES: usize = 4096;

/// Record `n`: its number in the first 8 bytes, then a pattern of it.
pub fn record(n: u64) -> Vec<u8> {
    let mut out = vec![0u8; RECORD_BYTES];
    out[..8].copy_from_slice(&n.to_le_bytes());
    for (i, byte) in out[8..].iter_mut().enumerate() {
        *byte = (n as u8).wrapping_mul(31).wrapping_add((i / 7) as u8) | 1;
    }
    out
}

impl RecordWriter {
    pub fn start(path: &Path) -> Self {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let acked = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (tx, done) = std::sync::mpsc::channel();
        let (s, a, p) = (stop.clone(), acked.clone(), path.to_path_buf());
        std::thread::spawn(move || {
            let result = (|| -> Result<u64, String> {
                use std::io::Write;
                let mut file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&p)
                    .map_err(|e| format!("open: {e}"))?;
                let mut n = 0;
                while !s.load(Ordering::Relaxed) {
                    file.write_all(&record(n))
                        .map_err(|e| format!("write {n}: {e}"))?;
                    file.sync_data().map_err(|e| format!("fsync {n}: {e}"))?;
                    n += 1;
                    a.store(n, Ordering::SeqCst);
                }
                Ok(n)
            })();
            let _ = tx.send(result);
        });
        Self {
            stop,
            acked,
            done,
            path: path.to_path_buf(),
        }
    }

    /// Records acknowledged so far.
    pub fn acked(&self) -> u64 {
        self.acked.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits until at least `n` records are acknowledged (bounded by [`DEADLINE`]).
    pub fn wait_acked(&self, n: u64) {
        let until = Instant::now() + DEADLINE;
        while self.acked() < n {
            assert!(
                Instant::now() < until,
                "the writer acknowledged only {} of {n} records",
                self.acked()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops it; returns the records acknowledged and how it ended (`Err` when the disk
    /// failed under it). Bounded by [`DEADLINE`].
    pub fn finish(self) -> (u64, Result<u64, String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let result = self
            .done
            .recv_timeout(DEADLINE)
            .unwrap_or_else(|e| panic!("the record writer did not end: {e}"));
        (self.acked(), result)
    }
}

impl Drop for RecordWriter {
    /// A test that panics stops its writer (so that the filesystem can be unmounted).
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = self.done.recv_timeout(Duration::from_secs(10));
    }
}

/// Checks that the first `acked` records of `file` are all there, each exact.
pub fn assert_records(file: &Path, acked: u64, what: &str) {
    let bytes = std::fs::read(file).unwrap_or_else(|e| panic!("{what}: {}: {e}", file.display()));
    assert!(
        bytes.len() as u64 >= acked * RECORD_BYTES as u64,
        "{what}: {acked} records acknowledged, {} bytes on the disk",
        bytes.len()
    );
    for n in 0..acked {
        let at = (n as usize) * RECORD_BYTES;
        assert!(
            bytes[at..at + RECORD_BYTES] == record(n)[..],
            "{what}: acknowledged record {n} of {acked} differs"
        );
    }
}

/// An sqlite3 database under a write loop: a shell loop of `sqlite3` processes, each one
/// committed transaction (an insert; every tenth an update of a third of the rows), until a
/// stop file exists.
pub struct SqliteLoop {
    child: ChildGuard,
    stop_file: PathBuf,
}

/// The database's table and index.
pub const SQLITE_SCHEMA: &str = "create table t(id integer primary key, v blob, h text); \
                                 create index th on t(h);";

impl SqliteLoop {
    /// Creates the table when `db` is new, then starts the loop (`stop_file` must not exist).
    pub fn start(db: &Path, stop_file: &Path) -> Self {
        if !db.exists() {
            ok(Command::new("sqlite3").arg(db).arg(SQLITE_SCHEMA));
        }
        let _ = std::fs::remove_file(stop_file);
        let script = r#"n=0
while [ ! -e "$1" ]; do
  sqlite3 "$2" "insert into t(v, h) values(randomblob(3000), hex(randomblob(8)));" || exit 1
  if [ $((n % 10)) -eq 9 ]; then
    sqlite3 "$2" "update t set h = hex(randomblob(8)) where id % 3 = 0;" || exit 1
  fi
  n=$((n + 1))
done
echo $n"#;
        let child = Command::new("sh")
            .args(["-c", script, "sh"])
            .arg(stop_file)
            .arg(db)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        Self {
            child: ChildGuard(child),
            stop_file: stop_file.to_path_buf(),
        }
    }

    /// Stops the loop after its current transaction; returns how many inserts it made.
    pub fn stop(mut self) -> u64 {
        use std::io::Read;
        std::fs::write(&self.stop_file, b"stop").unwrap();
        let status = wait_child(&mut self.child.0, DEADLINE).expect("the sqlite loop did not stop");
        let mut out = String::new();
        self.child
            .0
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        assert!(status.success(), "the sqlite loop failed: {status} {out}");
        out.trim().parse().unwrap()
    }
}

/// `sqlite3 <db> <sql>`, trimmed output.
pub fn sqlite(db: &Path, sql: &str) -> String {
    ok(Command::new("sqlite3").arg(db).arg(sql))
        .trim()
        .to_owned()
}

/// Copies the database (and its rollback journal, when there is one: a crash point may have
/// a hot journal, rolled back when opened) from `dir` into `into`; returns
/// `PRAGMA integrity_check` and the row count of the copy.
pub fn sqlite_check(dir: &Path, name: &str, into: &Path) -> (String, u64) {
    std::fs::create_dir_all(into).unwrap();
    for suffix in ["", "-journal"] {
        let from = dir.join(format!("{name}{suffix}"));
        if from.exists() {
            std::fs::copy(&from, into.join(format!("{name}{suffix}"))).unwrap();
        }
    }
    let db = into.join(name);
    let check = sqlite(&db, "PRAGMA integrity_check;");
    let rows = sqlite(&db, "select count(*) from t;").parse().unwrap();
    (check, rows)
}

/// fio's job for the tests' verified file: 32 MiB written sequentially in 64 KiB blocks with
/// crc32c verify headers (seeded by `seed`).
pub fn fio_args(file: &Path, seed: u64) -> Vec<String> {
    vec![
        "--name=verified".into(),
        format!("--filename={}", file.display()),
        "--size=32M".into(),
        "--bs=64k".into(),
        "--rw=write".into(),
        "--ioengine=psync".into(),
        "--verify=crc32c".into(),
        // No `<job>-verify.state` file left in the working directory.
        "--verify_state_save=0".into(),
        format!("--randseed={seed}"),
    ]
}

/// Writes the verified file (buffered, an fsync every 32 blocks and at the end; fio reads it
/// back and verifies it).
pub fn fio_write(file: &Path, seed: u64) {
    ok(Command::new("fio").args(fio_args(file, seed)).args([
        "--direct=0",
        "--fsync=32",
        "--end_fsync=1",
    ]));
}

/// `fio --verify_only` with the same job: the file must be exactly what the job wrote.
pub fn fio_verify(file: &Path, seed: u64) {
    ok(Command::new("fio")
        .args(fio_args(file, seed))
        .args(["--verify_only", "--verify_fatal=1"]));
}

/// Copies `from` to `to` (a directory tree; `cp -a`).
pub fn copy_tree(from: &Path, to: &Path) {
    ok(Command::new("cp").arg("-a").arg(from).arg(to));
}

/// The workspace's root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Sends `signal` to the appliance (SIGSTOP freezes it: the link stays up and nothing is
/// acknowledged).
pub fn signal_server(server: &Server, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(server.child.id() as i32), signal).unwrap();
}
