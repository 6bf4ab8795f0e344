//! The adversarial source (`disk-sim adversary --seed N --duration-s S | --rounds N`): a real
//! `appliance serve`, real replication of two or more items by the real agent with bookmarks
//! (the oracle records the truth at each one), and at the same time hostile traffic from a
//! client written from the documents ([`wire`]): valid-checksum frames with broken zstd
//! payloads, frames out of sequence, resync blocks outside a RESYNC session, every hello
//! variant, hash requests for unknown disks, idle, slow and flooding connections ([`hostile`]).
//! It is aimed at items only hostile traffic uses and at the replicating items' ids.
//!
//! ```text
//!  SourceModel ─► Agent ─────────────────────────┐
//!  SourceModel ─► Agent ─────────────────────────┤
//!  hostile workers (seeded) ─► hellos, frames, ──┼──► appliance serve (data port)
//!     idle / slow / flood connections            │       │
//!  API probe (every 0.5 s) ──────────────────────┴──►    └─ control API
//!  afterwards: the API answers within --api-deadline-ms; every bookmark of every
//!  replicating item: test failover, byte-compared with the oracle; failover to latest;
//!  nothing acknowledged lost; hostile items: nothing hostile staged, apply not stuck.
//! ```
//!
//! Every hostile action's answer is judged against `docs/design/data-port.md` and
//! `delta-stream.md`: a named refusal or close is expected; an acknowledged hostile frame, a
//! missing answer or a bare close is a failure. The run prints, per kind, how many were sent
//! and how each was answered, then the failures, and exits non-zero on any.

pub mod hostile;
mod verify;
pub mod wire;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use engine::delta::Consistency;

use crate::chaos::{chaos_agent_config, enable_item, geometry};
use crate::rng::Rng;
use crate::site::{Appliance, appliance_bin, parse_item_id};
use crate::source::SourceModel;
pub use hostile::HostileKind;
use hostile::{Context, Outcome, Target};
use source_agent::sender::Agent;
use verify::*;

/// How an adversary run is sized and seeded. `Default` gives the command's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct AdversaryOptions {
    /// `--seed N`: the workloads and every hostile action.
    pub seed: u64,
    /// `--duration-s S`: hostile traffic for this long.
    pub duration_s: Option<f64>,
    /// `--rounds N`: each worker sends every selected kind (shuffled) N times. With neither
    /// this nor a duration: 30 s.
    pub rounds: Option<u64>,
    /// `--only K,…`: the hostile kinds (default all).
    pub only: Vec<HostileKind>,
    /// `--workers N`: hostile threads.
    pub workers: u32,
    /// `--replicating N`: items replicated by real agents (2+).
    pub replicating: u16,
    /// `--hostile-items N`: items only hostile traffic uses.
    pub hostile_items: u16,
    /// `--size-mib N`: each of an item's two disks.
    pub size_mib: u64,
    /// `--bookmark-every N` writes.
    pub bookmark_every: u64,
    /// `--op-interval-ms N`: pause of each agent between two ops.
    pub op_interval: Duration,
    /// `--answer-timeout-s N`: how long a hello or frame may wait for its answer.
    pub answer_timeout: Duration,
    /// `--api-deadline-ms N`: how fast the API must answer after the run.
    pub api_deadline: Duration,
    /// `--idle-max-s N`: longest idle connection.
    pub idle_max: Duration,
    /// `--flood N`: connections of an idle flood.
    pub flood_connections: usize,
    /// How long a real agent may take to be served during a flood.
    pub flood_serve_deadline: Duration,
    /// `--dir DIR`: work directory (kept); `None`: a temporary one.
    pub work_dir: Option<PathBuf>,
    /// `--keep`: keep the temporary directory after a pass.
    pub keep: bool,
    /// The `appliance` binary; `None`: [`appliance_bin`].
    pub appliance_bin: Option<PathBuf>,
}

impl Default for AdversaryOptions {
    fn default() -> Self {
        Self {
            seed: 1,
            duration_s: None,
            rounds: None,
            only: Vec::new(),
            workers: 4,
            replicating: 2,
            hostile_items: 2,
            size_mib: 8,
            bookmark_every: 25,
            op_interval: Duration::from_millis(5),
            answer_timeout: Duration::from_secs(5),
            api_deadline: Duration::from_secs(1),
            idle_max: Duration::from_secs(12),
            flood_connections: 80,
            flood_serve_deadline: Duration::from_secs(5),
            work_dir: None,
            keep: false,
            appliance_bin: None,
        }
    }
}

impl AdversaryOptions {
    /// The kinds this run sends.
    pub fn kinds(&self) -> Vec<HostileKind> {
        if self.only.is_empty() {
            HostileKind::ALL.to_vec()
        } else {
            self.only.clone()
        }
    }

    /// The command line that replays this run.
    pub fn replay_command(&self) -> String {
        let mut command = format!(
            "disk-sim adversary --seed {} --workers {} --replicating {} --hostile-items {} \
             --size-mib {}",
            self.seed, self.workers, self.replicating, self.hostile_items, self.size_mib
        );
        if let Some(rounds) = self.rounds {
            command.push_str(&format!(" --rounds {rounds}"));
        }
        if let Some(duration) = self.duration_s {
            command.push_str(&format!(" --duration-s {duration}"));
        }
        if !self.only.is_empty() {
            let names: Vec<&str> = self.only.iter().map(|k| k.name()).collect();
            command.push_str(&format!(" --only {}", names.join(",")));
        }
        command
    }

    fn check(&self) -> anyhow::Result<()> {
        if self.replicating < 1 || self.replicating > 16 {
            bail!("--replicating must be 1..=16, not {}", self.replicating);
        }
        if self.hostile_items > 16 {
            bail!(
                "--hostile-items must be at most 16, not {}",
                self.hostile_items
            );
        }
        if !(1..=64).contains(&self.workers) {
            bail!("--workers must be 1..=64, not {}", self.workers);
        }
        if !(1..=1024).contains(&self.size_mib) {
            bail!("--size-mib must be 1..=1024, not {}", self.size_mib);
        }
        if let Some(d) = self.duration_s
            && !(d > 0.0 && d <= 86_400.0)
        {
            bail!("--duration-s {d}: must be more than 0 and at most 86400");
        }
        if self.rounds == Some(0) {
            bail!("--rounds must be at least 1");
        }
        if self.bookmark_every == 0 {
            bail!("--bookmark-every must be at least 1");
        }
        Ok(())
    }
}

/// Parses `--only`: kind names separated by commas.
pub fn parse_kinds(list: &str) -> anyhow::Result<Vec<HostileKind>> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|name| {
            HostileKind::from_name(name).ok_or_else(|| {
                let all: Vec<&str> = HostileKind::ALL.iter().map(|k| k.name()).collect();
                anyhow!(
                    "unknown hostile kind {name:?}; the kinds are: {}",
                    all.join(", ")
                )
            })
        })
        .collect()
}

/// Per kind: how often it was sent and how it was answered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KindTally {
    /// Actions of this kind.
    pub sent: u64,
    /// Answer label → (count, whether that answer is a failure).
    pub answers: BTreeMap<String, (u64, bool)>,
}

impl KindTally {
    /// Actions whose answer broke the contract.
    pub fn failures(&self) -> u64 {
        self.answers
            .values()
            .filter(|(_, bad)| *bad)
            .map(|(n, _)| n)
            .sum()
    }
}

/// What an adversary run did and found.
#[derive(Debug, Clone, Default)]
pub struct AdversaryReport {
    /// The seed.
    pub seed: u64,
    /// Per kind.
    pub kinds: BTreeMap<HostileKind, KindTally>,
    /// Every failure, described (hostile answers and the checks afterwards).
    pub failures: Vec<String>,
    /// Frames acknowledged to the real agents, in all.
    pub frames_acked: u64,
    /// Acknowledged frames or bookmark points missing.
    pub frames_lost: u64,
    /// Recovery points verified equal to the oracle, and bookmarks expected.
    pub points_verified: usize,
    /// Bookmarks expected (every one of every replicating item).
    pub points_expected: usize,
    /// Slowest API answer seen by the probe during the run.
    pub api_max_during: Duration,
    /// Slowest API answer after the run (`None`: it did not answer in time).
    pub api_max_after: Option<Duration>,
    /// Wall time.
    pub elapsed: Duration,
    /// The work directory.
    pub work_dir: PathBuf,
}

impl AdversaryReport {
    /// Hostile actions whose answer broke the contract.
    pub fn hostile_failures(&self) -> u64 {
        self.kinds.values().map(KindTally::failures).sum()
    }
}

/// Runs the adversary and prints what happens to `out`. An error (exit non-zero) on any
/// failure: a hostile frame acknowledged, an answer missing or not the documented one, the
/// API slower than the deadline, a point that differs from the oracle, a lost frame.
pub fn run(options: &AdversaryOptions, out: &mut dyn Write) -> anyhow::Result<AdversaryReport> {
    options.check()?;
    let (work, temporary) = match &options.work_dir {
        Some(dir) => (dir.clone(), false),
        None => (
            std::env::temp_dir().join(format!(
                "disk-sim-adversary-{}-{}-{:x}",
                options.seed,
                std::process::id(),
                engine::clock::now_unix_ns()
            )),
            true,
        ),
    };
    std::fs::create_dir_all(work.join("restore"))
        .with_context(|| format!("creating {}", work.display()))?;
    let started = Instant::now();
    let mut report = AdversaryReport {
        seed: options.seed,
        work_dir: work.clone(),
        ..AdversaryReport::default()
    };
    let result = run_in(options, &work, &mut report, out);
    report.elapsed = started.elapsed();
    print_summary(options, &report, out)?;
    match result {
        Ok(()) if report.failures.is_empty() => {
            writeln!(
                out,
                "adversary seed {}: PASS in {:.1} s",
                options.seed,
                report.elapsed.as_secs_f64()
            )?;
            if temporary && !options.keep {
                let _ = std::fs::remove_dir_all(&work);
            } else {
                writeln!(out, "files kept in {}", work.display())?;
            }
            Ok(report)
        }
        Ok(()) => {
            writeln!(
                out,
                "adversary seed {}: FAIL ({} failures) after {:.1} s; files kept in {}",
                options.seed,
                report.failures.len(),
                report.elapsed.as_secs_f64(),
                work.display()
            )?;
            bail!(
                "adversary run failed: {} (replay: {})",
                report.failures.first().map_or("", String::as_str),
                options.replay_command()
            )
        }
        Err(error) => {
            writeln!(
                out,
                "adversary seed {}: ERROR after {:.1} s; files kept in {}",
                options.seed,
                report.elapsed.as_secs_f64(),
                work.display()
            )?;
            Err(error.context(format!("replay: {}", options.replay_command())))
        }
    }
}

/// Answers per kind, and the failures described.
type Tally = (BTreeMap<HostileKind, KindTally>, Vec<String>);

/// One replicating item's side: the agent and the thread driving its workload.
struct Replicator {
    hex: String,
    agent: Arc<Agent>,
    bookmarks: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<(SourceModel, Result<u64, String>)>,
}

fn run_in(
    options: &AdversaryOptions,
    work: &Path,
    report: &mut AdversaryReport,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let bin = match &options.appliance_bin {
        Some(bin) => bin.clone(),
        None => appliance_bin()?,
    };
    let restore = work.join("restore");
    let restore_arg = restore.display().to_string();
    let appliance = Appliance::start_with_bin(
        &bin,
        &work.join("appliance"),
        &["--disk-store", &restore_arg, "--cache-mib", "256"],
    )?;
    let kinds = options.kinds();
    writeln!(
        out,
        "adversary: seed {}, appliance pid {} (data port {}), {} replicating and {} hostile \
         items ({} disks × {} MiB), {} workers, {} kinds, {}",
        options.seed,
        appliance.pid().unwrap_or(0),
        appliance.data_addr,
        options.replicating,
        options.hostile_items,
        2,
        options.size_mib,
        options.workers,
        kinds.len(),
        match (options.rounds, options.duration_s) {
            (Some(r), Some(d)) => format!("{r} rounds or {d} s"),
            (Some(r), None) => format!("{r} rounds"),
            (None, Some(d)) => format!("{d} s"),
            (None, None) => "30 s".into(),
        }
    )?;
    let geometry = geometry(2, options.size_mib);

    // Items and agents.
    let stop = Arc::new(AtomicBool::new(false));
    let mut replicators = Vec::new();
    let mut targets = Vec::new();
    for i in 0..options.replicating {
        let name = format!("adv-replicating-{i}");
        let (hex, token) = enable_item(&appliance, &name, &geometry, 100_000)?;
        let id = parse_item_id(&hex)?;
        let mut config = chaos_agent_config(appliance.data_addr, id, &token, &name, &geometry);
        config.send_timeout = Duration::from_secs(20);
        let agent = Arc::new(Agent::connect(config).map_err(|e| anyhow!("agent for {name}: {e}"))?);
        let bookmarks = Arc::new(AtomicU64::new(0));
        let model = SourceModel::new(
            &geometry,
            options.seed ^ (u64::from(i) << 32),
            options.bookmark_every,
        )?;
        let thread = {
            let (agent, stop, bookmarks) = (agent.clone(), stop.clone(), bookmarks.clone());
            let pace = options.op_interval;
            std::thread::spawn(move || replicate(model, &agent, &stop, &bookmarks, pace))
        };
        targets.push(Target {
            id,
            name,
            token: token.into_bytes(),
            disks: geometry.clone(),
            agent: Some(agent.clone()),
        });
        replicators.push(Replicator {
            hex,
            agent,
            bookmarks,
            thread,
        });
    }
    let mut hostile_hex = Vec::new();
    for i in 0..options.hostile_items {
        let name = format!("adv-hostile-{i}");
        let (hex, token) = enable_item(&appliance, &name, &geometry, 8)?;
        targets.push(Target {
            id: parse_item_id(&hex)?,
            name,
            token: token.into_bytes(),
            disks: geometry.clone(),
            agent: None,
        });
        hostile_hex.push(hex);
    }
    let ctx = Arc::new(Context {
        data_addr: appliance.data_addr,
        targets,
        answer_timeout: options.answer_timeout,
        idle_max: options.idle_max.max(Duration::from_secs(1)),
        flood_connections: options.flood_connections,
        flood_serve_deadline: options.flood_serve_deadline,
        flooding: AtomicBool::new(false),
        controls: Mutex::new(BTreeMap::new()),
    });

    // The API probe during the run.
    let probe_stop = Arc::new(AtomicBool::new(false));
    let probe = {
        let (base, token) = (appliance.api.clone(), api_token(&appliance)?);
        let deadline = options.api_deadline;
        let probe_stop = probe_stop.clone();
        std::thread::spawn(move || {
            let mut slowest = Duration::ZERO;
            let mut failures = Vec::new();
            while !probe_stop.load(Ordering::Acquire) {
                match timed_get(&base, &token, "/v1/items", deadline) {
                    Ok(took) => slowest = slowest.max(took),
                    Err(error) => {
                        if failures.len() < 3 {
                            failures.push(error);
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            (slowest, failures)
        })
    };

    // Hostile workers.
    let tally: Arc<Mutex<Tally>> = Arc::default();
    let duration = match (options.rounds, options.duration_s) {
        (None, None) => Some(30.0),
        (_, d) => d,
    };
    let deadline = duration.map(|d| Instant::now() + Duration::from_secs_f64(d));
    let workers: Vec<_> = (0..options.workers)
        .map(|w| {
            let (ctx, tally, kinds) = (ctx.clone(), tally.clone(), kinds.clone());
            let seed = options.seed ^ (u64::from(w) + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let rounds = options.rounds;
            std::thread::spawn(move || {
                hostile_worker(&ctx, &tally, &kinds, seed, rounds, deadline);
            })
        })
        .collect();
    for worker in workers {
        if worker.join().is_err() {
            report.failures.push("a hostile worker panicked".into());
        }
    }
    {
        let mut tally = tally.lock().unwrap_or_else(|p| p.into_inner());
        report.kinds = std::mem::take(&mut tally.0);
        report.failures.append(&mut tally.1);
    }

    // Replication: at least two bookmarks per item, then a final app-consistent one.
    let wait_until = Instant::now() + Duration::from_secs(60);
    while replicators
        .iter()
        .any(|r| r.bookmarks.load(Ordering::Acquire) < 2 && !r.thread.is_finished())
        && Instant::now() < wait_until
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Release);
    let mut models = Vec::new();
    for r in replicators {
        let (mut model, result) = r
            .thread
            .join()
            .map_err(|_| anyhow!("the replication thread of {} panicked", r.hex))?;
        let last = match result.and_then(|last| {
            model
                .bookmark(&r.agent, Consistency::App)
                .map(|seq| seq.max(last))
                .map_err(|e| format!("final bookmark: {e:#}"))
        }) {
            Ok(last) => Some(last),
            Err(error) => {
                report
                    .failures
                    .push(format!("replicating item {}: {error}", r.hex));
                None
            }
        };
        models.push((r.hex, r.agent, model, last));
    }
    probe_stop.store(true, Ordering::Release);
    let (slowest, probe_failures) = probe
        .join()
        .map_err(|_| anyhow!("the API probe thread panicked"))?;
    report.api_max_during = slowest;
    for failure in probe_failures {
        report
            .failures
            .push(format!("API during the run: {failure}"));
    }

    // The API answers, fast.
    let token = api_token(&appliance)?;
    let mut paths = vec!["/v1/appliance".to_owned(), "/v1/items".to_owned()];
    paths.extend(models.iter().map(|m| format!("/v1/items/{}", m.0)));
    paths.extend(hostile_hex.iter().map(|h| format!("/v1/items/{h}")));
    let mut api_ok = true;
    let mut slowest = Duration::ZERO;
    for path in &paths {
        match timed_get(&appliance.api, &token, path, options.api_deadline) {
            Ok(took) => slowest = slowest.max(took),
            Err(error) => {
                api_ok = false;
                report.failures.push(format!("API after the run: {error}"));
            }
        }
    }
    report.api_max_after = api_ok.then_some(slowest);
    writeln!(
        out,
        "API: slowest answer {:.0} ms during the run; after it {}",
        report.api_max_during.as_secs_f64() * 1000.0,
        match report.api_max_after {
            Some(took) => format!(
                "every call answered, slowest {:.0} ms (deadline {} ms)",
                took.as_secs_f64() * 1000.0,
                options.api_deadline.as_millis()
            ),
            None => "NOT ANSWERING within the deadline".into(),
        }
    )?;
    if !api_ok {
        writeln!(
            out,
            "verification skipped: the API does not answer; the appliance is killed"
        )?;
        stop_appliance(appliance, report, out)?;
        return Ok(());
    }

    // The agents are shared with the hostile side until here.
    let controls = ctx.controls.lock().map(|c| c.clone()).unwrap_or_default();
    drop(ctx);
    // Every bookmark of every replicating item, and nothing acknowledged lost.
    for (i, (hex, agent, model, last)) in models.into_iter().enumerate() {
        let agent = Arc::try_unwrap(agent).ok();
        verify_replicating(
            &appliance, i, &hex, agent, &model, last, &restore, report, out,
        );
    }
    // Hostile items: nothing hostile staged, apply not stuck.
    for (j, hex) in hostile_hex.iter().enumerate() {
        let valid = controls
            .get(&(usize::from(options.replicating) + j))
            .copied()
            .unwrap_or(0);
        check_hostile_item(&appliance, hex, valid, report, out)?;
    }
    stop_appliance(appliance, report, out)?;
    Ok(())
}

/// The real workload of one item until `stop`; returns the model and the last seq sent.
fn replicate(
    mut model: SourceModel,
    agent: &Agent,
    stop: &AtomicBool,
    bookmarks: &AtomicU64,
    pace: Duration,
) -> (SourceModel, Result<u64, String>) {
    let mut last = 0;
    while !stop.load(Ordering::Acquire) {
        match model.step(agent) {
            Ok((is_bookmark, seq)) => {
                last = seq;
                if is_bookmark {
                    bookmarks.fetch_add(1, Ordering::AcqRel);
                }
            }
            Err(error) => return (model, Err(format!("sending: {error:#}"))),
        }
        if let Some(error) = agent.error() {
            return (model, Err(format!("the agent stopped: {error}")));
        }
        if !pace.is_zero() {
            std::thread::sleep(pace);
        }
    }
    (model, Ok(last))
}

fn hostile_worker(
    ctx: &Context,
    tally: &Mutex<Tally>,
    kinds: &[HostileKind],
    seed: u64,
    rounds: Option<u64>,
    deadline: Option<Instant>,
) {
    let mut rng = Rng::new(seed);
    let mut round = 0u64;
    loop {
        if rounds.is_some_and(|r| round >= r) {
            return;
        }
        let mut order = kinds.to_vec();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
        for kind in order {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return;
            }
            let Outcome { answer, failure } = hostile::act(kind, ctx, &mut rng);
            let mut tally = tally.lock().unwrap_or_else(|p| p.into_inner());
            let entry = tally.0.entry(kind).or_default();
            entry.sent += 1;
            let slot = entry.answers.entry(answer).or_insert((0, false));
            slot.0 += 1;
            slot.1 |= failure.is_some();
            if let Some(why) = failure {
                tally.1.push(why);
            }
        }
        round += 1;
    }
}

fn print_summary(
    options: &AdversaryOptions,
    report: &AdversaryReport,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    writeln!(
        out,
        "{:<24} {:>6}  answers (BAD = not the documented answer)",
        "kind", "sent"
    )?;
    for kind in options.kinds() {
        let Some(tally) = report.kinds.get(&kind) else {
            writeln!(out, "{:<24} {:>6}", kind.name(), 0)?;
            continue;
        };
        let answers: Vec<String> = tally
            .answers
            .iter()
            .map(|(label, (n, bad))| format!("{}{label} {n}", if *bad { "BAD " } else { "" }))
            .collect();
        writeln!(
            out,
            "{:<24} {:>6}  {}",
            kind.name(),
            tally.sent,
            answers.join(", ")
        )?;
    }
    writeln!(
        out,
        "frames acknowledged to the agents {}, lost {}; points verified {} of {}",
        report.frames_acked, report.frames_lost, report.points_verified, report.points_expected
    )?;
    if !report.failures.is_empty() {
        writeln!(out, "failures ({}):", report.failures.len())?;
        let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
        for failure in &report.failures {
            *seen.entry(failure.as_str()).or_default() += 1;
        }
        for (i, (failure, n)) in seen.iter().enumerate() {
            if i == 30 {
                writeln!(out, "  … {} more distinct failures", seen.len() - 30)?;
                break;
            }
            let times = if *n > 1 {
                format!(" (×{n})")
            } else {
                String::new()
            };
            writeln!(out, "  - {failure}{times}")?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn kinds_parse_by_name_and_unknown_names_are_listed() {
        assert_eq!(
            parse_kinds("zstd-garbage, hash-unknown-disk").unwrap(),
            vec![HostileKind::ZstdGarbage, HostileKind::HashUnknownDisk]
        );
        for kind in HostileKind::ALL {
            assert_eq!(HostileKind::from_name(kind.name()), Some(*kind));
        }
        let error = parse_kinds("zstd-garbage,nope").unwrap_err().to_string();
        assert!(
            error.contains("\"nope\"") && error.contains("idle-flood"),
            "{error}"
        );
    }
}
