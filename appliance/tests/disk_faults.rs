//! Disk faults under a real `appliance serve` process: the cache/data disk running out of
//! space, replica writes failing with I/O errors, and replica latency spikes. Each test needs
//! root and a kernel feature (tmpfs mounts, loop devices, the cgroup-v1 blkio throttle); when
//! one is missing it prints why and returns without failing. Mounts, loop devices and cgroups
//! are undone by guards, also when a test fails.
//!
//! | fault | how it is made | what the test shows |
//! |---|---|---|
//! | no space | the data directory on a 40 MiB tmpfs, filled up with a file | acks stop; the agent is told `staging-failed` with the OS error; after space is freed and the appliance restarted, every acknowledged frame is there and every point is exact |
//! | I/O errors | a replica attached as a loop device, switched read-only (`blockdev --setro`): every write to it fails | acks go on (staging is fine); apply stops and the item's health says so; the log names the replica; after `--setrw` and a restart apply resumes, nothing lost |
//! | latency spike | the blkio cgroup throttle on the replica's loop device (64 KiB/s) | acks go on, apply falls behind (`applied_seq` < `staged_seq`); once lifted, it catches up; nothing lost |
//!
//! The engine's fault tests through its I/O seam are in `engine/tests/apply_faults.rs`.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use appliance_api::model::{DiskSpec, EnableRequest, ItemView, PolicyRequest};
use disk_sim::chaos::{
    SourceModel, chaos_agent_config, enable_item, verify_failover_latest, verify_points,
    wait_applied,
};
use disk_sim::site::{Api, parse_item_id};
use engine::delta::{Consistency, DiskGeometry};
use source_agent::sender::{Agent, AgentStats};

// ─────────────── environment and guards ───────────────

/// Runs a command; its stdout, or why it failed.
fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "{program} {}: {}: {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Why the test cannot run here, if it cannot.
fn needs_root(test: &str) -> bool {
    // /proc/self belongs to the effective user.
    if std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0) {
        return true;
    }
    eprintln!("{test}: skipped: needs root (mounts, loop devices, cgroups)");
    false
}

/// A mount, unmounted (lazily, so a leftover open file cannot keep it) on drop.
struct Mount(PathBuf);

impl Mount {
    fn tmpfs(at: &Path, size: &str) -> Result<Self, String> {
        std::fs::create_dir_all(at).map_err(|e| e.to_string())?;
        run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tmpfs",
                at.to_str().unwrap(),
            ],
        )?;
        Ok(Self(at.to_path_buf()))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = run("umount", &["-l", self.0.to_str().unwrap()]);
    }
}

/// A loop device over a file; made writable again and detached on drop.
struct Loop {
    dev: String,
}

impl Loop {
    fn attach(file: &Path) -> Result<Self, String> {
        let dev = run(
            "losetup",
            &["--find", "--show", "--direct-io=on", file.to_str().unwrap()],
        )
        .or_else(|_| run("losetup", &["--find", "--show", file.to_str().unwrap()]))?;
        Ok(Self { dev })
    }

    fn rdev(&self) -> u64 {
        std::fs::metadata(&self.dev).unwrap().rdev()
    }

    /// `major:minor`.
    fn numbers(&self) -> String {
        let rdev = self.rdev();
        format!(
            "{}:{}",
            nix::sys::stat::major(rdev),
            nix::sys::stat::minor(rdev)
        )
    }

    fn set_read_only(&self, read_only: bool) {
        let flag = if read_only { "--setro" } else { "--setrw" };
        run("blockdev", &[flag, &self.dev]).unwrap();
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = run("blockdev", &["--setrw", &self.dev]);
        let _ = run("losetup", &["-d", &self.dev]);
    }
}

/// A cgroup-v1 blkio group; its processes are moved back to the root and it is removed on
/// drop.
struct Blkio(PathBuf);

impl Blkio {
    const ROOT: &str = "/sys/fs/cgroup/blkio";

    fn create() -> Result<Self, String> {
        let root = Path::new(Self::ROOT);
        if !root.join("blkio.throttle.write_bps_device").exists() {
            return Err(format!("no cgroup-v1 blkio throttle at {}", root.display()));
        }
        let dir = root.join(format!("disk-faults-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(Self(dir))
    }

    fn write(&self, file: &str, value: &str) -> Result<(), String> {
        std::fs::write(self.0.join(file), value)
            .map_err(|e| format!("{}/{file} <- {value:?}: {e}", self.0.display()))
    }
}

impl Drop for Blkio {
    fn drop(&mut self) {
        if let Ok(pids) = std::fs::read_to_string(self.0.join("cgroup.procs")) {
            for pid in pids.lines() {
                let _ = std::fs::write(Path::new(Self::ROOT).join("cgroup.procs"), pid);
            }
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

// ─────────────── a serve process whose log we keep ───────────────

/// `appliance serve` with its stderr in a log file (to check what it logged).
struct Serve {
    child: Option<Child>,
    data: PathBuf,
    extra: Vec<String>,
    log: PathBuf,
    data_addr: SocketAddr,
    api: Api,
}

impl Serve {
    fn start(data: &Path, log: &Path, extra: &[&str]) -> Self {
        let mut serve = Self {
            child: None,
            data: data.to_path_buf(),
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
            log: log.to_path_buf(),
            data_addr: "127.0.0.1:0".parse().unwrap(),
            api: Api::new("127.0.0.1:0", ""),
        };
        serve.spawn();
        serve
    }

    fn spawn(&mut self) {
        std::fs::create_dir_all(&self.data).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_appliance"))
            .arg("serve")
            .arg("--data-dir")
            .arg(&self.data)
            .args(["--data-addr", &self.data_addr.to_string()])
            .args(["--api-addr", "127.0.0.1:0", "--nbd-addr", "127.0.0.1:0"])
            .args(&self.extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next().unwrap().unwrap();
        self.data_addr = first
            .strip_prefix("data port listening on ")
            .unwrap_or_else(|| panic!("{first:?}"))
            .parse()
            .unwrap();
        let second = lines.next().unwrap().unwrap();
        let api = second
            .strip_prefix("control API listening on ")
            .unwrap_or_else(|| panic!("{second:?}"))
            .to_owned();
        let token = std::fs::read_to_string(self.data.join("api-token")).unwrap();
        self.api = Api::new(&api, &token);
        self.child = Some(child);
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    fn kill_and_restart(&mut self) {
        self.kill();
        self.spawn();
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn item(&self, item: &str) -> ItemView {
        self.api.item(item).unwrap()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        self.kill();
    }
}

// ─────────────── the source side ───────────────

/// The item's disks as the appliance knows them (attached disks bring their own geometry).
fn item_geometry(view: &ItemView) -> Vec<DiskGeometry> {
    view.disks
        .iter()
        .map(|d| DiskGeometry {
            size_bytes: d.size_bytes,
            block_size_bytes: d.block_size_bytes,
        })
        .collect()
}

struct Source {
    agent: Option<Agent>,
    model: SourceModel,
    last_seq: u64,
}

impl Source {
    fn connect(serve: &Serve, item: &str, token: &str, disks: &[DiskGeometry], seed: u64) -> Self {
        let mut config = chaos_agent_config(
            serve.data_addr,
            parse_item_id(item).unwrap(),
            token,
            "vm",
            disks,
        );
        config.send_timeout = Duration::from_secs(30);
        Self {
            agent: Some(Agent::connect(config).unwrap()),
            model: SourceModel::new(disks, seed, 10).unwrap(),
            last_seq: 0,
        }
    }

    fn agent(&self) -> &Agent {
        self.agent.as_ref().unwrap()
    }

    fn ops(&mut self, n: usize) {
        let agent = self.agent.as_ref().unwrap();
        for _ in 0..n {
            self.last_seq = self.model.step(agent).unwrap().1;
        }
    }

    fn flush(&self, timeout: Duration) -> u64 {
        let acked = self
            .agent()
            .flush(timeout)
            .unwrap_or_else(|e| panic!("flush: {e}"));
        assert_eq!(acked, self.last_seq);
        acked
    }

    /// A bookmark, then every frame acknowledged and applied (the API's `applied_seq` moves
    /// at recovery points). Returns the bookmark's seq.
    fn checkpoint(&mut self, serve: &Serve, item: &str) -> u64 {
        self.bookmark();
        let acked = self.flush(Duration::from_secs(60));
        wait_applied(&serve.api, item, acked, Duration::from_secs(60)).unwrap();
        acked
    }

    fn bookmark(&mut self) -> u64 {
        let agent = self.agent.as_ref().unwrap();
        self.last_seq = self.model.bookmark(agent, Consistency::Crash).unwrap();
        self.last_seq
    }

    /// Waits until the acks stop advancing for `quiet` (or everything is acked); returns the
    /// acked seq.
    fn wait_acks_settle(&self, quiet: Duration, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        let mut last = (self.agent().acked_seq(), Instant::now());
        loop {
            std::thread::sleep(Duration::from_millis(100));
            let acked = self.agent().acked_seq();
            if acked == self.last_seq {
                return acked;
            }
            if acked != last.0 {
                last = (acked, Instant::now());
            } else if last.1.elapsed() >= quiet || Instant::now() > deadline {
                return acked;
            }
        }
    }

    /// Final bookmark, flush, close; then every point and the final state checked through
    /// the API.
    fn finish(mut self, serve: &Serve, item: &str, restore: &Path) -> AgentStats {
        let seq = self
            .model
            .bookmark(self.agent.as_ref().unwrap(), Consistency::App)
            .unwrap();
        self.last_seq = seq;
        let acked = self.flush(Duration::from_secs(120));
        let agent = self.agent.take().unwrap();
        let stats = agent.stats();
        agent.close(Duration::from_secs(30)).unwrap();
        let view = wait_applied(&serve.api, item, acked, Duration::from_secs(120)).unwrap();
        assert!(view.staged_seq >= acked, "{view:?}");
        let mut out = Vec::new();
        let check = verify_points(
            &serve.api,
            item,
            &self.model.points,
            None,
            1000,
            restore,
            &mut out,
        )
        .unwrap();
        assert!(check.missing.is_empty(), "{check:?}");
        assert!(check.mismatches.is_empty(), "{check:?}");
        assert_eq!(check.verified, self.model.points.len());
        let (_, mismatches) = verify_failover_latest(
            &serve.api,
            item,
            &self.model.digests().unwrap(),
            &restore.join("latest"),
        )
        .unwrap();
        assert!(mismatches.is_empty(), "{mismatches:?}");
        eprintln!(
            "  nothing lost: {acked} frames acknowledged and applied, {} points verified, final \
             state equal",
            check.verified
        );
        stats
    }
}

/// Fills the filesystem of `path` with a file until it is full; returns the bytes written.
fn fill(path: &Path) -> u64 {
    let mut file = std::fs::File::create(path).unwrap();
    let chunk = vec![0xa5u8; 256 << 10];
    let mut written = 0u64;
    loop {
        match file.write(&chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => written += n as u64,
        }
    }
    let _ = file.sync_all();
    written
}

// ─────────────── the tests ───────────────

#[test]
fn no_space_on_the_data_disk_stops_acks_names_the_problem_and_loses_nothing() {
    let test = "no_space";
    if !needs_root(test) {
        return;
    }
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mnt = tmp.path().join("mnt");
    let mount = match Mount::tmpfs(&mnt, "40m") {
        Ok(mount) => mount,
        Err(why) => {
            eprintln!("{test}: skipped: cannot mount a tmpfs: {why}");
            return;
        }
    };
    let restore = mnt.join("restore");
    std::fs::create_dir_all(&restore).unwrap();
    let mut serve = Serve::start(
        &mnt.join("data"),
        &tmp.path().join("serve.log"),
        &[
            "--disk-store",
            restore.to_str().unwrap(),
            "--cache-mib",
            "64",
        ],
    );
    // 4096-byte blocks: a tmpfs cannot take O_DIRECT I/O of 512 bytes.
    let disks = vec![
        DiskGeometry {
            size_bytes: 4 << 20,
            block_size_bytes: 4096,
        };
        2
    ];
    let (item, token) = enable_item(&serve.api, "vm", &disks, 1000).unwrap();
    let mut source = Source::connect(&serve, &item, &token, &disks, 11);
    source.ops(30);
    let acked_before = source.checkpoint(&serve, &item);

    // The disk fills up.
    let filler = mnt.join("filler");
    let filled = fill(&filler);
    source.ops(40);
    let acked = source.wait_acks_settle(Duration::from_secs(3), Duration::from_secs(30));
    let view = serve.item(&item);
    let stats = source.agent().stats();
    let closes: Vec<String> = stats
        .closes
        .iter()
        .map(|c| format!("{}: {}", c.reason, c.message))
        .collect();
    eprintln!(
        "{test}: filled {} MiB; acks stopped at seq {acked} of {} (were {acked_before} before); \
         item health {:?}, last_error {:?}; agent closes {closes:?}",
        filled >> 20,
        source.last_seq,
        view.health,
        view.last_error
    );
    let log = serve.log();
    let logged: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    eprintln!(
        "{test}: the appliance logged {} errors, the first ones: {:?}",
        logged.len(),
        &logged[..logged.len().min(2)]
    );
    assert!(acked < source.last_seq, "acks stop while the disk is full");
    let says_no_space = |text: &str| text.contains("No space left") || text.contains("os error 28");
    assert!(
        closes.iter().any(|c| says_no_space(c))
            || says_no_space(&view.health)
            || says_no_space(view.last_error.as_deref().unwrap_or("")),
        "the agent or the API names the problem"
    );

    // Space freed, the appliance restarted: the agent resends, nothing acknowledged is lost.
    std::fs::remove_file(&filler).unwrap();
    serve.kill_and_restart();
    let view = serve.item(&item);
    assert!(
        view.staged_seq >= acked,
        "every acknowledged frame survived: {view:?}"
    );
    source.finish(&serve, &item, &restore);
    drop(serve);
    drop(mount);
}

/// An appliance serving from a temporary directory, protecting an item whose replica 0 is a
/// 4 MiB loop device (a block-device node inside the disk store) and whose disk 1 is a 4 MiB
/// created file. Fields drop in order: the appliance, then the device, then the directory.
struct LoopItem {
    serve: Serve,
    device: Loop,
    item: String,
    token: String,
    disks: Vec<DiskGeometry>,
    store: PathBuf,
    _tmp: tempfile::TempDir,
}

impl LoopItem {
    /// `None` (with a line saying why the test is skipped) where this machine has no loop
    /// device or cannot make the node.
    fn start(test: &str) -> Option<Self> {
        let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let store = tmp.path().join("store");
        std::fs::create_dir_all(store.join("restore")).unwrap();
        let backing = tmp.path().join("replica-0.backing");
        std::fs::File::create(&backing)
            .unwrap()
            .set_len(4 << 20)
            .unwrap();
        let device = match Loop::attach(&backing) {
            Ok(device) => device,
            Err(why) => {
                eprintln!("{test}: skipped: no loop device: {why}");
                return None;
            }
        };
        let node = store.join("replica-0.dev");
        if let Err(e) = nix::sys::stat::mknod(
            &node,
            nix::sys::stat::SFlag::S_IFBLK,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
            device.rdev() as nix::libc::dev_t,
        ) {
            eprintln!("{test}: skipped: mknod: {e}");
            return None;
        }
        let serve = Serve::start(
            &tmp.path().join("data"),
            &tmp.path().join("serve.log"),
            &["--disk-store", store.to_str().unwrap()],
        );
        let enabled = serve
            .api
            .client()
            .enable(&EnableRequest {
                name: "vm".into(),
                disks: vec![
                    DiskSpec::attach(node.display().to_string()),
                    DiskSpec::create(4, None),
                ],
                policy: Some(PolicyRequest {
                    keep_points: Some(1000),
                    ..PolicyRequest::default()
                }),
                temporary_os_disk: None,
            })
            .unwrap();
        Some(Self {
            item: enabled.item.id.clone(),
            token: enabled.stream_token.clone(),
            disks: item_geometry(&enabled.item),
            serve,
            device,
            store,
            _tmp: tmp,
        })
    }

    /// The item id, its stream token, its disks and the disk store.
    fn ids(&self) -> (String, String, Vec<DiskGeometry>, PathBuf) {
        (
            self.item.clone(),
            self.token.clone(),
            self.disks.clone(),
            self.store.clone(),
        )
    }
}

#[test]
fn replica_write_errors_stop_apply_not_acks_and_lose_nothing() {
    let test = "replica_io_errors";
    if !needs_root(test) {
        return;
    }
    let Some(mut on_loop) = LoopItem::start(test) else {
        return;
    };
    let (item, token, disks, store) = on_loop.ids();
    let (serve, device) = (&mut on_loop.serve, &on_loop.device);
    let mut source = Source::connect(serve, &item, &token, &disks, 12);
    source.ops(30);
    source.checkpoint(serve, &item);
    assert_eq!(serve.item(&item).health, "healthy");

    // Every write to replica 0 now fails (EPERM from the read-only block device).
    device.set_read_only(true);
    source.ops(30);
    source.bookmark();
    let acked = source.flush(Duration::from_secs(30));
    let deadline = Instant::now() + Duration::from_secs(30);
    let view = loop {
        let view = serve.item(&item);
        if view.health != "healthy" || Instant::now() > deadline {
            break view;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = serve.log();
    let stopped: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("apply stopped"))
        .collect();
    eprintln!(
        "{test}: acks went on through seq {acked}; applied_seq {}, staged_seq {}; health {:?}; \
         log: {stopped:?}",
        view.applied_seq, view.staged_seq, view.health
    );
    let health = view.health.as_str();
    assert!(
        health.contains("replica disk 0"),
        "the item's health names the failing disk: {health:?}"
    );
    assert!(view.applied_seq < acked, "{view:?}");
    assert!(view.staged_seq >= acked, "{view:?}");
    assert!(
        stopped
            .iter()
            .any(|l| l.contains("disk 0") || l.contains("replica-0")),
        "the log names the failing replica: {stopped:?}"
    );

    // The fault cleared and the appliance restarted: apply resumes, nothing lost.
    device.set_read_only(false);
    serve.kill_and_restart();
    source.ops(10);
    source.finish(serve, &item, &store.join("restore"));
    assert_eq!(serve.item(&item).health, "healthy");
    drop(on_loop);
}

#[test]
fn replica_latency_spike_lets_apply_fall_behind_not_acks_and_loses_nothing() {
    let test = "replica_latency";
    if !needs_root(test) {
        return;
    }
    let cgroup = match Blkio::create() {
        Ok(cgroup) => cgroup,
        Err(why) => {
            eprintln!("{test}: skipped: {why}");
            return;
        }
    };
    let Some(on_loop) = LoopItem::start(test) else {
        return;
    };
    let (item, token, disks, store) = on_loop.ids();
    let (serve, device) = (&on_loop.serve, &on_loop.device);
    let mut source = Source::connect(serve, &item, &token, &disks, 13);
    source.ops(20);
    source.checkpoint(serve, &item);

    // The spike: replica 0's device throttled to 64 KiB/s of writes for the appliance.
    let throttle = |bps: u64| {
        cgroup.write(
            "blkio.throttle.write_bps_device",
            &format!("{} {bps}", device.numbers()),
        )
    };
    if let Err(why) =
        throttle(64 << 10).and_then(|()| cgroup.write("cgroup.procs", &serve.pid().to_string()))
    {
        eprintln!("{test}: skipped: cannot throttle: {why}");
        return;
    }
    let started = Instant::now();
    source.ops(30);
    source.bookmark();
    let acked = source.flush(Duration::from_secs(30));
    let ack_time = started.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let view = serve.item(&item);
    let applied = view.applied_seq;
    eprintln!(
        "{test}: during the spike: acked through {acked} in {ack_time:?}; applied_seq {applied}, \
         staged_seq {}, rpo_lag_ms {}",
        view.staged_seq,
        view.rpo_lag_ms
            .map_or_else(|| "-".to_owned(), |ms| ms.to_string())
    );
    assert!(view.staged_seq >= acked, "{view:?}");
    assert!(
        applied < acked,
        "apply falls behind while the replica is slow: {view:?}"
    );
    assert_eq!(view.health, "healthy", "slow is not failed");

    // The spike ends: apply catches up.
    throttle(0).unwrap();
    let started = Instant::now();
    wait_applied(&serve.api, &item, acked, Duration::from_secs(60)).unwrap();
    eprintln!(
        "{test}: caught up {:?} after the spike ended",
        started.elapsed()
    );
    source.ops(10);
    source.finish(serve, &item, &store.join("restore"));
    drop(on_loop); // the appliance first (it leaves the cgroup), then the loop device
    drop(cgroup);
}
