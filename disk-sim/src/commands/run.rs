//! `disk-sim run`: a scenario against an appliance that is already running (started by
//! hand, by systemd, or by `scripts/`), through its control API and data port.
//!
//! A scenario is the source model ([`SourceModel`]: a VM's disks as files, a seeded workload
//! with a pattern, churn, crash- and app-consistent bookmarks by workload time, and the oracle
//! that records its truth), and what to check at the end: a test failover at a point (its disks compared
//! byte for byte with the source VM's disks at that bookmark) and optionally a failover. The
//! source VM's disk images are kept in `--source-dir` (when given) so that an outside tool
//! (`cmp`, `qemu-img compare`) can compare them with what the appliance materializes; the
//! materialized files' paths are printed.
//!
//! Built-in scenarios: `steady` (database-like, the default) and `failover` (Zipf hot spot).
//! A file is TOML with the same fields as [`Scenario`] (unknown keys refused).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use appliance_api::model::{
    DiskSpec, EnableRequest, FailoverRequest, Format, MaterializeRequest, PointSpec,
};
use engine::delta::{Consistency, DiskGeometry};
use serde::Deserialize;

use super::{human_bytes, paths};
use crate::site::{Api, parse_item_id};
use crate::source::{Content, SourceModel};
use crate::workload::{Op, Pacer, Pattern, SystemClock, WorkloadSpec};
use source_agent::sender::{Agent, AgentConfig};

/// What a scenario does.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Its name (the item's and the VM's name too).
    pub name: String,
    /// Disk sizes in MiB, OS disk first (1..=16 disks, each 1..=4096 MiB).
    pub disks_mib: Vec<u64>,
    /// Where writes land: `uniform`, `sequential`, `hotspot` (Zipf), `bursty`, `database`.
    #[serde(default = "uniform")]
    pub pattern: String,
    /// Operations of the workload (writes of 512 B to 1 MiB, trims, bookmarks).
    pub ops: u64,
    /// Target churn in MB/s (0: as fast as the appliance takes it).
    #[serde(default)]
    pub churn_mb_s: f64,
    /// A crash-consistent bookmark every this many ms of workload time.
    #[serde(default = "crash_ms")]
    pub crash_bookmark_ms: u64,
    /// An app-consistent bookmark every this many ms of workload time (longer).
    #[serde(default = "app_ms")]
    pub app_bookmark_ms: u64,
    /// Workload seed.
    #[serde(default = "one")]
    pub seed: u64,
    /// Fail over (to "latest") at the end, after the test failover. Replication of the item
    /// stops for good.
    #[serde(default)]
    pub failover: bool,
    /// Disable protection at the end (removes the item's replicas, staging and points).
    #[serde(default)]
    pub disable: bool,
}

fn one() -> u64 {
    1
}

fn uniform() -> String {
    "uniform".into()
}

fn crash_ms() -> u64 {
    100
}

fn app_ms() -> u64 {
    500
}

impl Scenario {
    /// A built-in scenario by name.
    pub fn builtin(name: &str) -> Option<Self> {
        let steady = Self {
            name: "steady".into(),
            disks_mib: vec![32, 16],
            pattern: "database".into(),
            ops: 2000,
            churn_mb_s: 0.0,
            // Small writes: 2000 of them are about 0.3 s of workload time at full speed.
            crash_bookmark_ms: 20,
            app_bookmark_ms: 100,
            seed: 1,
            failover: false,
            disable: false,
        };
        match name {
            "steady" => Some(steady),
            "failover" => Some(Self {
                name: "failover".into(),
                pattern: "hotspot".into(),
                failover: true,
                ..steady
            }),
            _ => None,
        }
    }

    /// A built-in name, or a TOML file.
    pub fn load(name_or_file: &str) -> anyhow::Result<Self> {
        if let Some(builtin) = Self::builtin(name_or_file) {
            return Ok(builtin);
        }
        let text = std::fs::read_to_string(name_or_file).with_context(|| {
            format!(
                "{name_or_file:?} is not a built-in scenario (steady, failover) nor a readable \
                 file"
            )
        })?;
        let scenario: Self =
            toml::from_str(&text).with_context(|| format!("scenario file {name_or_file}"))?;
        scenario.validate()?;
        Ok(scenario)
    }

    fn pattern(&self) -> anyhow::Result<Pattern> {
        Ok(match self.pattern.as_str() {
            "uniform" => Pattern::Uniform,
            "sequential" => Pattern::Sequential,
            "hotspot" | "zipf" => Pattern::HotSpot,
            "bursty" => Pattern::Bursty,
            "database" => Pattern::Database,
            other => {
                bail!("pattern {other:?}: one of uniform, sequential, hotspot, bursty, database")
            }
        })
    }

    fn validate(&self) -> anyhow::Result<()> {
        // The appliance's rule for item names (control-api.md): 1..=63 characters.
        if self.name.is_empty() || self.name.chars().count() > 63 {
            bail!("name: 1..=63 characters");
        }
        if self.disks_mib.is_empty() || self.disks_mib.len() > 16 {
            bail!("disks_mib: 1..=16 disks");
        }
        if self.disks_mib.iter().any(|&m| !(1..=4096).contains(&m)) {
            bail!("disks_mib: each disk 1..=4096 MiB");
        }
        if self.ops > 10_000_000 {
            bail!("ops: at most 10000000");
        }
        if !(self.churn_mb_s >= 0.0 && self.churn_mb_s <= 100_000.0) {
            bail!("churn_mb_s: 0..=100000");
        }
        if self.crash_bookmark_ms == 0 || self.app_bookmark_ms < self.crash_bookmark_ms {
            bail!("crash_bookmark_ms ≥ 1 and app_bookmark_ms ≥ crash_bookmark_ms");
        }
        self.pattern()?;
        Ok(())
    }
}

/// Settings of `disk-sim run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The appliance's control API (`http://host:port`).
    pub api: String,
    /// Its API token.
    pub token: String,
    /// Keep the source VM's disk images here (default: a temporary directory, removed).
    pub source_dir: Option<PathBuf>,
}

/// Runs `scenario` against the appliance; prints one line per step to `out`.
pub fn run(scenario: &Scenario, options: &RunOptions, out: &mut dyn Write) -> anyhow::Result<()> {
    scenario.validate()?;
    let api = Api::new(&options.api, &options.token);
    let info = api.appliance().context("asking the appliance who it is")?;
    let data_addr = info
        .data_addr
        .parse()
        .context("the appliance's data port address")?;
    let data_dir = PathBuf::from(&info.data_dir);
    let (source_dir, temporary) = match &options.source_dir {
        Some(dir) => (dir.clone(), false),
        None => (
            std::env::temp_dir().join(format!("disk-sim-run-{}", std::process::id())),
            true,
        ),
    };
    let result = run_with(scenario, &api, data_addr, &data_dir, &source_dir, out);
    if temporary {
        let _ = std::fs::remove_dir_all(&source_dir);
    } else {
        writeln!(out, "source VM disks kept in {}", source_dir.display())?;
    }
    result
}

fn run_with(
    scenario: &Scenario,
    api: &Api,
    data_addr: std::net::SocketAddr,
    data_dir: &Path,
    source_dir: &Path,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let timeout = Duration::from_secs(600);
    let geometry: Vec<DiskGeometry> = scenario
        .disks_mib
        .iter()
        .map(|&mib| DiskGeometry {
            size_bytes: mib << 20,
            block_size_bytes: 4096,
        })
        .collect();
    let mut clock = Instant::now();
    let mut line = |out: &mut dyn Write, what: String| -> std::io::Result<()> {
        writeln!(out, "{:>7.2} s  {what}", clock.elapsed().as_secs_f64())?;
        clock = Instant::now();
        Ok(())
    };
    let spec = WorkloadSpec {
        pattern: scenario.pattern()?,
        churn_bytes_per_s: (scenario.churn_mb_s * 1e6) as u64,
        ..WorkloadSpec::default()
    }
    .with_timed_bookmarks(scenario.crash_bookmark_ms, scenario.app_bookmark_ms);
    let mut model = SourceModel::create(
        &source_dir.join(&scenario.name),
        &scenario.name,
        &geometry,
        scenario.seed,
        spec.clone(),
        Content::Empty,
    )?
    .with_label("scenario");
    let enabled = api.client().enable(&EnableRequest {
        name: scenario.name.clone(),
        disks: scenario
            .disks_mib
            .iter()
            .map(|&m| DiskSpec::create(m, None))
            .collect(),
        policy: None,
        temporary_os_disk: None,
    })?;
    let (item, token) = (enabled.item.id.clone(), enabled.stream_token.clone());
    line(out, format!("enabled protection: item {item}"))?;
    let mut config = AgentConfig::new(
        data_addr,
        parse_item_id(&item)?,
        token.as_bytes(),
        &scenario.name,
        geometry.clone(),
    );
    config.backoff_max = Duration::from_millis(500);
    let agent = Agent::connect(config)?;
    let mut pacer = Pacer::for_workload(&spec);
    let mut wall = SystemClock::new();
    let (mut bytes, mut bookmarks, mut last_app) = (0u64, 0u64, None);
    let mut first_point_waited = false;
    for _ in 0..scenario.ops {
        let op = model.next_op()?;
        pacer.pace(&mut wall, model.workload().op_at(), op.churn_bytes());
        let seq = model.send(&agent, &op)?;
        bytes += op.churn_bytes();
        if let Op::Bookmark { consistency, .. } = op {
            bookmarks += 1;
            if consistency == Consistency::App {
                last_app = Some(seq);
            }
            if !first_point_waited {
                // The first point ends the initial replication.
                api.wait_job(enabled.job.id, timeout, &mut |_, _| {})?;
                first_point_waited = true;
            }
        }
    }
    // A closing crash-consistent bookmark: the final state is a point too.
    let newest = model.bookmark_labeled(&agent, Consistency::Crash, "end of scenario")?;
    let acked = agent.flush(timeout)?;
    api.wait_point(&item, newest, timeout)?;
    line(
        out,
        format!(
            "{} ops ({} pattern, {} written), {} bookmarks; acknowledged through seq {acked}",
            scenario.ops,
            scenario.pattern,
            human_bytes(bytes),
            bookmarks + 1
        ),
    )?;
    let (point, label, choice) = match last_app {
        Some(seq) => (seq, "latest-app", PointSpec::latest_app()),
        None => (newest, "latest-processed", PointSpec::latest_processed()),
    };
    let target = data_dir.join("restore").join(format!("{item}-test"));
    let request = MaterializeRequest {
        point: choice,
        target_dir: target.display().to_string(),
        format: Format::Raw,
        mode: Default::default(),
    };
    let job = api.test_failover(&item, &request)?;
    api.wait_job(job.id, timeout, &mut |_, _| {})?;
    let files = paths(api.item(&item)?.test_failover.as_ref());
    model
        .verify_files(point, &files)
        .with_context(|| format!("test failover at point {point}"))?;
    line(
        out,
        format!(
            "test failover at point {point} ({label}): every disk equals the source there ({})",
            list(&files)
        ),
    )?;
    api.test_failover_cleanup(&item)?;
    if scenario.failover {
        agent.close(timeout)?;
        let target = data_dir.join("restore").join(&item);
        let request = FailoverRequest {
            point: PointSpec::latest(),
            target_dir: target.display().to_string(),
            format: Format::Raw,
            source_shut_down: true,
            mode: Default::default(),
        };
        let job = api.failover(&item, &request)?;
        api.wait_job(job.id, timeout, &mut |_, _| {})?;
        let files = paths(api.item(&item)?.failover.as_ref());
        model
            .verify_files(newest, &files)
            .context("failover to latest")?;
        line(
            out,
            format!(
                "failover to latest: every disk equals the source's final state ({})",
                list(&files)
            ),
        )?;
    } else {
        drop(agent);
    }
    if scenario.disable {
        api.disable(&item)?;
        line(out, format!("protection of {item} disabled"))?;
    }
    writeln!(out, "scenario {} passed", scenario.name)?;
    Ok(())
}

fn list(files: &[PathBuf]) -> String {
    files
        .iter()
        .map(|f| f.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
