//! The chaos run (`disk-sim chaos --seed N --kills N --minutes N`): a real `appliance serve`
//! process, a seeded workload streamed through a [`Proxy`] that injects network faults, the
//! appliance killed with SIGKILL and restarted at seeded moments, and at the end every
//! retained recovery point and the final state checked through the control API against the
//! source model ([`SourceModel`]: the VM's disks as files in the work directory, the oracle's
//! whole digests per bookmark).
//!
//! ```text
//!  SourceModel (disk files, oracle: digest per bookmark)
//!    │ seeded ops: writes, trims, bookmarks
//!    ▼
//!  Agent ──► netfault::Proxy ──► appliance serve (data port)      ◄── SIGKILL + restart
//!            drops, delays, flips,      │                               at seeded ops
//!            duplicates, reorders       ▼
//!                                 staging ─► apply ─► replicas + recovery points
//!  end: flush ─► every retained point: POST test-failover ─► digest == model ─► cleanup
//!       ─► POST failover point=latest ─► digest == final model
//! ```
//!
//! **Replay.** The workload (every op and its bytes) and the fault schedule (which op each
//! kill and each network fault follows) come from the seed only: the same seed gives the same
//! writes and the same schedule, placed by op count, not by the clock. What varies between
//! two runs of one seed is timing: how many frames are in flight when a kill or a fault hits,
//! and so which frame a one-shot fault lands on. The run prints a digest of the workload so
//! two runs can be compared.
//!
//! **What counts as a loss.** A frame the appliance acknowledged and later does not have:
//! after each restart the item's `staged_seq` must be at least the agent's acknowledged seq
//! before the kill; at the end, after a flush, `staged_seq` and `applied_seq` must cover every
//! frame; the agent itself stops with `AcknowledgedFramesLost` if a reply's `next_seq` goes
//! below what was acknowledged. A bookmark whose point is missing from the retained points
//! (the newest `keep_points` bookmarks) counts as a loss too. A point or final disk whose
//! digest differs from the model is a mismatch. Either fails the run with an error that names
//! the seed and the command line that replays it.
//!
//! Flags of the `disk-sim chaos` subcommand (fields of [`ChaosOptions`]): `--seed N`
//! (default 1), `--kills N` SIGKILLs per round (default 20), `--minutes N` (optional: repeat
//! rounds until N minutes have passed; default one round), `--writes N` per round (default
//! 2000), `--disks N` (default 2), `--size-mib N` per disk (default 16), `--faults N` network
//! faults per round (default 30), `--bookmark-every N` (default 40 ops), `--keep-points N`
//! (default 1000), `--dir DIR` (default a new temporary directory), `--keep` (keep the
//! temporary directory; it is always kept after a failure).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use appliance_api::model::{DiskSpec, EnableRequest, ItemView, PolicyRequest};
use engine::clock::now_unix_ns;
use engine::delta::{Consistency, DiskGeometry};

use crate::netfault::{Delay, FaultKind, FaultPlan, NetFault, Proxy, ProxyStats};
use crate::rng::Rng;
use crate::site::{Api, Appliance, appliance_bin, parse_item_id};
use crate::source::{Content, chunk_digest};
use crate::workload::WorkloadSpec;
use source_agent::sender::{Agent, AgentConfig, AgentError, CloseReason};

pub use crate::source::{
    PointCheck, PointMismatch, SourceModel, verify_failover_latest, verify_points,
};

/// How a chaos run is sized and seeded. `Default` gives the `disk-sim chaos` defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct ChaosOptions {
    /// `--seed N`: the workload and the fault schedule.
    pub seed: u64,
    /// `--kills N`: SIGKILL + restart of the appliance, per round, at seeded ops.
    pub kills: u32,
    /// `--minutes N`: keep running rounds (round r seeded from the seed and r) until this
    /// much time has passed since the start; `None`: one round.
    pub minutes: Option<f64>,
    /// `--writes N`: writes and trims per round (bookmarks come on top).
    pub writes: u64,
    /// `--disks N`: disks of the simulated VM (1..=64); disk 0 has 4096-byte blocks, the
    /// odd ones 512-byte blocks.
    pub disks: u16,
    /// `--size-mib N`: size of each disk.
    pub size_mib: u64,
    /// `--faults N`: network faults per round, at seeded ops.
    pub net_faults: u32,
    /// `--bookmark-every N`: a bookmark after every N writes (every fourth one
    /// app-consistent).
    pub bookmark_every: u64,
    /// `--keep-points N`: the item's retention (every retained point is verified).
    pub keep_points: u64,
    /// `--dir DIR`: where the appliance's data directory and the restores go (created if
    /// missing, never removed); `None`: a new temporary directory.
    pub work_dir: Option<PathBuf>,
    /// `--keep`: keep the temporary directory after a successful run.
    pub keep: bool,
    /// The `appliance` binary; `None`: [`appliance_bin`] (`$APPLIANCE_BIN`, or beside this
    /// program).
    pub appliance_bin: Option<PathBuf>,
}

impl Default for ChaosOptions {
    fn default() -> Self {
        Self {
            seed: 1,
            kills: 20,
            minutes: None,
            writes: 2000,
            disks: 2,
            size_mib: 16,
            net_faults: 30,
            bookmark_every: 40,
            keep_points: 1000,
            work_dir: None,
            keep: false,
            appliance_bin: None,
        }
    }
}

impl ChaosOptions {
    /// The command line that replays this run.
    pub fn replay_command(&self) -> String {
        let mut command = format!(
            "disk-sim chaos --seed {} --kills {} --writes {} --disks {} --size-mib {} --faults \
             {} --bookmark-every {} --keep-points {}",
            self.seed,
            self.kills,
            self.writes,
            self.disks,
            self.size_mib,
            self.net_faults,
            self.bookmark_every,
            self.keep_points
        );
        if let Some(minutes) = self.minutes {
            command.push_str(&format!(" --minutes {minutes}"));
        }
        command
    }

    fn check(&self) -> anyhow::Result<()> {
        if !(1..=64).contains(&self.disks) {
            bail!("--disks must be 1..=64, not {}", self.disks);
        }
        if !(1..=65_536).contains(&self.size_mib) {
            bail!("--size-mib must be 1..=65536, not {}", self.size_mib);
        }
        if self.writes == 0 || self.bookmark_every == 0 {
            bail!("--writes and --bookmark-every must be at least 1");
        }
        if !(1..=100_000).contains(&self.keep_points) {
            bail!("--keep-points must be 1..=100000, not {}", self.keep_points);
        }
        Ok(())
    }

    /// The simulated VM's disks.
    pub fn geometry(&self) -> Vec<DiskGeometry> {
        geometry(self.disks, self.size_mib)
    }
}

/// `disks` disks of `size_mib` each: disk 0 with 4096-byte blocks, odd disks with 512.
pub fn geometry(disks: u16, size_mib: u64) -> Vec<DiskGeometry> {
    (0..disks)
        .map(|i| DiskGeometry {
            size_bytes: size_mib << 20,
            block_size_bytes: if i % 2 == 1 { 512 } else { 4096 },
        })
        .collect()
}

/// What a chaos run did.
#[derive(Debug, Clone, Default)]
pub struct ChaosReport {
    /// The seed.
    pub seed: u64,
    /// Rounds run.
    pub rounds: u32,
    /// SIGKILLs of the appliance.
    pub kills: u32,
    /// Network faults scheduled, by kind.
    pub faults_scheduled: BTreeMap<FaultKind, u64>,
    /// What the proxy did.
    pub proxy: ProxyStats,
    /// `corrupt-frame` closes the agent received (among the last 64 closes it keeps).
    pub corrupt_closes: u64,
    /// Agent sessions (handshakes).
    pub sessions: u64,
    /// Frames the agent sent again after a reconnect.
    pub frames_retransmitted: u64,
    /// Frames acknowledged (the last acknowledged seq; frames start at seq 1).
    pub frames_acked: u64,
    /// Acknowledged frames or bookmark points missing.
    pub frames_lost: u64,
    /// Recovery points verified through the API, and how many were expected.
    pub points_verified: usize,
    /// Bookmarks whose points are expected to be retained.
    pub points_expected: usize,
    /// Digest of the workload (every disk at the end): equal for equal seeds.
    pub workload_digest: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// The work directory (kept or removed).
    pub work_dir: PathBuf,
}

// ─────────────── checks through the API ───────────────

/// An agent for `item` with settings for faulty networks and restarts: an 8 MiB backlog,
/// quick backoff (20 ms to 200 ms), 1,000 attempts in a row, a 10 s ack timeout.
pub fn chaos_agent_config(
    addr: std::net::SocketAddr,
    item_id: [u8; 16],
    token: &str,
    name: &str,
    geometry: &[DiskGeometry],
) -> AgentConfig {
    let mut config = AgentConfig::new(addr, item_id, token.as_bytes(), name, geometry.to_vec());
    config.backlog_limit_bytes = 8 << 20;
    config.send_timeout = Duration::from_secs(120);
    config.io_timeout = Duration::from_secs(10);
    config.ack_timeout = Duration::from_secs(10);
    config.backoff_initial = Duration::from_millis(20);
    config.backoff_max = Duration::from_millis(200);
    config.max_attempts = 1000;
    config
}

/// Enables protection of a VM with `geometry` through the API. Returns the item id (hex)
/// and its stream token.
pub fn enable_item(
    api: &Api,
    name: &str,
    geometry: &[DiskGeometry],
    keep_points: u64,
) -> anyhow::Result<(String, String)> {
    let request = EnableRequest {
        name: name.to_owned(),
        disks: geometry
            .iter()
            .map(|d| DiskSpec::create(d.size_bytes >> 20, Some(d.block_size_bytes)))
            .collect(),
        policy: Some(PolicyRequest {
            keep_points: Some(keep_points),
            ..PolicyRequest::default()
        }),
        temporary_os_disk: None,
    };
    let enabled = api.client().enable(&request)?;
    Ok((enabled.item.id, enabled.stream_token))
}

/// Waits until the item has applied every frame through `seq`; returns its view.
pub fn wait_applied(
    api: &Api,
    item: &str,
    seq: u64,
    timeout: Duration,
) -> anyhow::Result<ItemView> {
    let mut last = None;
    appliance_api::poll_until(Duration::from_millis(20), timeout, || {
        let view = api.item(item)?;
        let applied = view.applied_seq;
        last = Some(applied);
        Ok((applied >= seq).then_some(view))
    })
    .with_context(|| format!("item {item} has not applied through seq {seq} (applied {last:?})"))
}

// ─────────────── the schedule ───────────────

/// A scheduled event, after op number `at` of a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    Kill,
    /// Drop the live connection now.
    DropNow,
    Net(NetFault),
}

impl Event {
    fn kind(&self) -> Option<FaultKind> {
        match self {
            Self::Kill => None,
            Self::DropNow => Some(FaultKind::Drop),
            Self::Net(fault) => Some(fault.kind()),
        }
    }
}

/// The events of one round, by op number; from the round's seed only.
fn schedule(seed: u64, ops: u64, kills: u32, faults: u32) -> BTreeMap<u64, Vec<Event>> {
    let mut rng = Rng::new(seed ^ 0xc4a0_5c4e_d01e);
    let mut events: BTreeMap<u64, Vec<Event>> = BTreeMap::new();
    let span = ops.max(2) - 1;
    for _ in 0..kills {
        events
            .entry(1 + rng.below(span))
            .or_default()
            .push(Event::Kill);
    }
    for _ in 0..faults {
        let at = 1 + rng.below(span);
        let event = match rng.below(6) {
            0 => Event::DropNow,
            1 => Event::Net(NetFault::DropAfterBytes(rng.below(512 << 10))),
            2 => {
                let delay = Delay::jittered(
                    Duration::from_millis(2 + rng.below(20)),
                    Duration::from_millis(rng.below(20)),
                );
                let chunks = 5 + rng.below(30) as u32;
                if rng.chance(1, 2) {
                    Event::Net(NetFault::DelayUp { delay, chunks })
                } else {
                    Event::Net(NetFault::DelayDown { delay, chunks })
                }
            }
            3 => Event::Net(NetFault::Flip),
            4 => Event::Net(NetFault::Duplicate),
            _ => Event::Net(NetFault::Reorder),
        };
        events.entry(at).or_default().push(event);
    }
    events
}

fn round_seed(seed: u64, round: u32) -> u64 {
    if round == 0 {
        seed
    } else {
        seed ^ u64::from(round).wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }
}

// ─────────────── the run ───────────────

/// The work directory: given, or a new temporary one.
struct WorkDir {
    path: PathBuf,
    temporary: bool,
}

impl WorkDir {
    fn new(options: &ChaosOptions) -> anyhow::Result<Self> {
        let (path, temporary) = match &options.work_dir {
            Some(dir) => (dir.clone(), false),
            None => {
                let nanos = now_unix_ns();
                let dir = std::env::temp_dir().join(format!(
                    "disk-sim-chaos-{}-{}-{nanos:x}",
                    options.seed,
                    std::process::id()
                ));
                (dir, true)
            }
        };
        std::fs::create_dir_all(path.join("restore"))
            .with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path, temporary })
    }
}

/// Runs a chaos run and prints what happens to `out`: the seed, each kill, the network
/// faults by kind, frames acknowledged and lost, points verified. An error (exit non-zero)
/// on any loss or mismatch, naming the seed and the command line that replays it.
pub fn run(options: &ChaosOptions, out: &mut dyn Write) -> anyhow::Result<ChaosReport> {
    options.check()?;
    let work = WorkDir::new(options)?;
    let started = Instant::now();
    let mut report = ChaosReport {
        seed: options.seed,
        work_dir: work.path.clone(),
        ..ChaosReport::default()
    };
    let result = run_in(options, &work.path, started, &mut report, out);
    report.elapsed = started.elapsed();
    match result {
        Ok(()) => {
            writeln!(
                out,
                "chaos seed {}: PASS in {:.1} s",
                options.seed,
                report.elapsed.as_secs_f64()
            )?;
            if work.temporary && !options.keep {
                let _ = std::fs::remove_dir_all(&work.path);
            } else {
                writeln!(out, "files kept in {}", work.path.display())?;
            }
            Ok(report)
        }
        Err(error) => {
            let _ = writeln!(
                out,
                "chaos seed {}: FAIL after {:.1} s; files kept in {}",
                options.seed,
                report.elapsed.as_secs_f64(),
                work.path.display()
            );
            Err(error.context(format!(
                "chaos run with seed {} failed (replay: {})",
                options.seed,
                options.replay_command()
            )))
        }
    }
}

fn run_in(
    options: &ChaosOptions,
    work: &Path,
    started: Instant,
    report: &mut ChaosReport,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let geometry = options.geometry();
    let bin = match &options.appliance_bin {
        Some(bin) => bin.clone(),
        None => appliance_bin()?,
    };
    let restore = work.join("restore");
    let data_dir = work.join("appliance");
    let restore_arg = restore.display().to_string();
    let mut appliance = Appliance::start_with_bin(
        &bin,
        &data_dir,
        &["--disk-store", &restore_arg, "--cache-mib", "512"],
    )?;
    let ops_per_round = options.writes + options.writes / options.bookmark_every;
    writeln!(
        out,
        "chaos: seed {}, {} disks × {} MiB, {} writes and {} bookmarks per round, {} kills and \
         {} network faults per round{}",
        options.seed,
        options.disks,
        options.size_mib,
        options.writes,
        options.writes / options.bookmark_every,
        options.kills,
        options.net_faults,
        options
            .minutes
            .map(|m| format!(", rounds for {m} minutes"))
            .unwrap_or_default()
    )?;
    writeln!(
        out,
        "appliance pid {} in {} (data port {})",
        appliance.pid().unwrap_or(0),
        data_dir.display(),
        appliance.data_addr
    )?;
    let (item, token) = enable_item(&appliance, "chaos-vm", &geometry, options.keep_points)?;
    let item_id = parse_item_id(&item)?;
    let proxy = Proxy::start(
        appliance.data_addr,
        FaultPlan {
            seed: options.seed,
            ..FaultPlan::default()
        },
    )?;
    let acked_max = Arc::new(AtomicU64::new(0));
    let mut config = chaos_agent_config(proxy.local_addr(), item_id, &token, "chaos-vm", &geometry);
    {
        let acked_max = acked_max.clone();
        config.ack_observer = Some(Arc::new(move |seq| {
            acked_max.fetch_max(seq, Ordering::AcqRel);
        }));
    }
    let agent = Agent::connect(config)?;
    let mut model = SourceModel::create(
        &work.join("chaos-vm"),
        "chaos-vm",
        &geometry,
        options.seed,
        WorkloadSpec::chaos(options.bookmark_every),
        Content::Empty,
    )?
    .with_label("chaos");
    let mut lost = 0u64;
    let deadline = options
        .minutes
        .map(|m| started + Duration::from_secs_f64(m.max(0.0) * 60.0));
    let mut round = 0u32;
    let mut last_seq = 0;
    loop {
        let seed = round_seed(options.seed, round);
        let events = schedule(seed, ops_per_round, options.kills, options.net_faults);
        for kind in events.values().flatten().filter_map(Event::kind) {
            *report.faults_scheduled.entry(kind).or_default() += 1;
        }
        for op in 0..ops_per_round {
            let (_, seq) = model
                .step(&agent)
                .with_context(|| format!("round {round}, op {op}: sending"))?;
            last_seq = seq;
            for event in events.get(&op).into_iter().flatten() {
                match *event {
                    Event::Kill => {
                        let acked_before = agent.acked_seq();
                        appliance.kill_and_restart().with_context(|| {
                            format!("restarting the appliance after kill {}", report.kills + 1)
                        })?;
                        report.kills += 1;
                        let staged = appliance.item(&item)?.staged_seq;
                        let missing = acked_before.saturating_sub(staged);
                        lost += missing;
                        writeln!(
                            out,
                            "kill {:>3} (round {round}, op {op}, seq {seq}): acked {acked_before} \
                             before, staged {staged} after restart{}",
                            report.kills,
                            if missing > 0 {
                                format!(" — {missing} ACKNOWLEDGED FRAMES MISSING")
                            } else {
                                String::new()
                            }
                        )?;
                    }
                    Event::DropNow => {
                        proxy.drop_connections();
                    }
                    Event::Net(fault) => proxy.arm(fault),
                }
            }
            if let Some(error) = agent.error() {
                if let AgentError::AcknowledgedFramesLost {
                    server_next_seq,
                    acked_seq,
                } = error
                {
                    writeln!(
                        out,
                        "frames lost: {} (the appliance wants seq {server_next_seq} after                          acknowledging {acked_seq})",
                        acked_seq + 1 - server_next_seq
                    )?;
                }
                bail!("the agent stopped: {error}");
            }
        }
        round += 1;
        if deadline.is_none_or(|d| Instant::now() >= d) {
            break;
        }
    }
    report.rounds = round;
    // A final bookmark, so the end state is a point too.
    last_seq = model.bookmark(&agent, Consistency::App)?.max(last_seq);
    proxy.disarm();
    proxy.set(FaultPlan::default());
    let acked = agent
        .flush(Duration::from_secs(300))
        .map_err(|e| anyhow!("flushing the agent: {e}"))?;
    if acked != last_seq {
        bail!("after the flush the agent has seq {acked} acknowledged, not {last_seq}");
    }
    let stats = agent.stats();
    agent
        .close(Duration::from_secs(30))
        .map_err(|e| anyhow!("closing the agent: {e}"))?;
    report.frames_acked = acked;
    report.sessions = stats.sessions;
    report.frames_retransmitted = stats.frames_retransmitted;
    report.corrupt_closes = stats
        .closes
        .iter()
        .filter(|c| c.reason == CloseReason::CorruptFrame)
        .count() as u64;
    report.proxy = proxy.stats();
    drop(proxy);

    let view = wait_applied(&appliance, &item, acked, Duration::from_secs(300))?;
    let (staged, applied) = (view.staged_seq, view.applied_seq);
    lost += acked.saturating_sub(staged.min(applied));
    let final_digests = model.digests()?;
    report.workload_digest = chunk_digest(
        &final_digests
            .iter()
            .flat_map(|d| d.to_le_bytes())
            .collect::<Vec<u8>>(),
    );

    let faults: Vec<String> = FaultKind::ALL
        .iter()
        .map(|&kind| {
            let scheduled = report.faults_scheduled.get(&kind).copied().unwrap_or(0);
            match kind {
                FaultKind::Delay => format!(
                    "delay {scheduled} ({} chunks, {} ms in all)",
                    report.proxy.delays, report.proxy.delay_ms
                ),
                _ => format!("{} {}/{scheduled}", kind.name(), report.proxy.count(kind)),
            }
        })
        .collect();
    writeln!(
        out,
        "network faults injected/scheduled: {} (corrupt-frame closes {}, frames swapped back \
         unswapped {}, proxy connections {})",
        faults.join(", "),
        report.corrupt_closes,
        report.proxy.reorders_released,
        report.proxy.connections
    )?;
    writeln!(
        out,
        "kills: {} in {} round(s); agent sessions {}, frames retransmitted {}",
        report.kills, report.rounds, report.sessions, report.frames_retransmitted
    )?;
    writeln!(
        out,
        "frames acknowledged: {acked} (staged {staged}, applied {applied}); workload digest \
         {:#018x}",
        report.workload_digest
    )?;

    let check = verify_points(
        &appliance,
        &item,
        &model.points,
        None,
        options.keep_points as usize,
        &restore,
        out,
    )?;
    lost += check.missing.len() as u64;
    report.frames_lost = lost;
    report.points_verified = check.verified;
    report.points_expected = check.expected;
    writeln!(out, "frames lost: {lost}")?;
    if !check.missing.is_empty() {
        writeln!(out, "bookmark points missing: {:?}", check.missing)?;
    }
    writeln!(
        out,
        "points verified: {} of {} retained ({} bookmarks expected{})",
        check.verified,
        check.retained.len(),
        check.expected,
        if check.pruned.is_empty() {
            String::new()
        } else {
            format!("; {} older ones pruned meanwhile", check.pruned.len())
        }
    )?;
    let (latest, final_mismatches) =
        verify_failover_latest(&appliance, &item, &final_digests, &restore.join("failover"))?;
    writeln!(
        out,
        "final state (failover to latest, point {latest}): {}",
        if final_mismatches.is_empty() {
            "equal to the model"
        } else {
            "DIFFERS from the model"
        }
    )?;
    let mut mismatches = check.mismatches;
    mismatches.extend(final_mismatches);
    for mismatch in &mismatches {
        writeln!(out, "  mismatch: {mismatch}")?;
    }
    appliance.stop().context("stopping the appliance")?;
    if lost > 0 || !mismatches.is_empty() {
        bail!(
            "{lost} acknowledged frames or points lost, {} disks differ from the model",
            mismatches.len()
        );
    }
    if check.verified + check.pruned.len() != check.retained.len() {
        bail!(
            "only {} of {} retained points verified",
            check.verified,
            check.retained.len()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::workload::Op;

    #[test]
    fn same_seed_same_workload_and_schedule() {
        let geometry = geometry(2, 4);
        let ops = |seed| {
            let mut model = SourceModel::new(&geometry, seed, 10).unwrap();
            let ops: Vec<(Op, Vec<u8>)> = (0..200)
                .map(|_| {
                    let op = model.next_op().unwrap();
                    (op, model.data().to_vec())
                })
                .collect();
            (ops, model.digests().unwrap())
        };
        assert_eq!(ops(3), ops(3));
        assert_ne!(ops(3).1, ops(4).1);
        assert_eq!(schedule(3, 500, 5, 10), schedule(3, 500, 5, 10));
        assert_ne!(schedule(3, 500, 5, 10), schedule(4, 500, 5, 10));
        let events = schedule(9, 100, 20, 30);
        assert_eq!(events.values().flatten().count(), 50);
        assert!(events.keys().all(|op| (1..100).contains(op)));
    }

    #[test]
    fn ops_stay_inside_the_disks_and_aligned() {
        let geometry = geometry(3, 1);
        let mut model = SourceModel::new(&geometry, 11, 7).unwrap();
        let mut bookmarks = 0;
        for _ in 0..2000 {
            let op = model.next_op().unwrap();
            match op {
                Op::Write {
                    disk_index,
                    offset_bytes,
                    length_bytes,
                } => {
                    let d = geometry[usize::from(disk_index)];
                    let block = u64::from(d.block_size_bytes);
                    assert_eq!(offset_bytes % block, 0);
                    assert_eq!(u64::from(length_bytes) % block, 0);
                    assert_eq!(model.data().len() as u64, u64::from(length_bytes));
                    assert!(offset_bytes + u64::from(length_bytes) <= d.size_bytes);
                }
                Op::ZeroRange {
                    disk_index,
                    offset_bytes,
                    length_bytes,
                } => {
                    let d = geometry[usize::from(disk_index)];
                    assert!(offset_bytes + length_bytes <= d.size_bytes && length_bytes > 0);
                }
                Op::Bookmark { .. } => bookmarks += 1,
            }
        }
        assert_eq!(bookmarks, 2000 / 8);
    }
}
