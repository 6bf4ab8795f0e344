//! `disk-sim run`: a scenario against an appliance that is already running (started by
//! hand, by systemd, or by `scripts/`), through its control API and data port.
//!
//! A scenario is a VM (its disks), a seeded workload with crash- and app-consistent
//! bookmarks, and what to check at the end: a test failover at a point (its disks compared
//! byte for byte with the source VM's disks at that bookmark) and optionally a failover. The
//! source VM's disk images are kept in `--source-dir` (when given) so that an outside tool
//! (`cmp`, `qemu-img compare`) can compare them with what the appliance materializes; the
//! materialized files' paths are printed.
//!
//! Built-in scenarios: `steady` (the default) and `failover`. A file is TOML with the same
//! fields as [`Scenario`] (unknown keys refused).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use engine::delta::{Consistency, DiskGeometry};
use serde::Deserialize;
use serde_json::json;

use crate::agent::{Agent, AgentConfig};
use crate::demo::{Vm, human_bytes, now_ns, paths, same};
use crate::site::{Api, parse_item_id};

/// What a scenario does.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Its name (the item's name too).
    pub name: String,
    /// Disk sizes in MiB, OS disk first (1..=16 disks, each 1..=4096 MiB).
    pub disks_mib: Vec<u64>,
    /// Writes (4 KiB to 256 KiB each) after the initial copy.
    pub writes: u64,
    /// A crash-consistent bookmark every this many writes.
    pub bookmark_every: u64,
    /// Every this many bookmarks, the bookmark is app-consistent instead.
    pub app_every: u64,
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

impl Scenario {
    /// A built-in scenario by name.
    pub fn builtin(name: &str) -> Option<Self> {
        let steady = Self {
            name: "steady".into(),
            disks_mib: vec![32, 16],
            writes: 400,
            bookmark_every: 40,
            app_every: 3,
            seed: 1,
            failover: false,
            disable: false,
        };
        match name {
            "steady" => Some(steady),
            "failover" => Some(Self {
                name: "failover".into(),
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
                "{name_or_file:?} is not a built-in scenario (steady, failover) nor a readable file"
            )
        })?;
        let scenario: Self =
            toml::from_str(&text).with_context(|| format!("scenario file {name_or_file}"))?;
        scenario.validate()?;
        Ok(scenario)
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.name.is_empty() || self.name.len() > 255 {
            bail!("name: 1..=255 bytes");
        }
        if self.disks_mib.is_empty() || self.disks_mib.len() > 16 {
            bail!("disks_mib: 1..=16 disks");
        }
        if self.disks_mib.iter().any(|&m| !(1..=4096).contains(&m)) {
            bail!("disks_mib: each disk 1..=4096 MiB");
        }
        if self.writes > 10_000_000 {
            bail!("writes: at most 10000000");
        }
        if self.bookmark_every == 0 || self.app_every == 0 {
            bail!("bookmark_every and app_every: at least 1");
        }
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
    let info = api
        .get("/v1/appliance")
        .context("asking the appliance who it is")?;
    let data_addr = info["data_addr"]
        .as_str()
        .context("the appliance did not say where its data port is")?
        .parse()
        .context("the appliance's data port address")?;
    let data_dir = PathBuf::from(info["data_dir"].as_str().unwrap_or("/"));
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
    let mut vm = Vm::create(source_dir, &geometry, scenario.seed)?;
    let enabled = api.post(
        "/v1/items",
        json!({"name": scenario.name,
               "disks": scenario.disks_mib.iter().map(|m| json!({"size_mib": m})).collect::<Vec<_>>()}),
    )?;
    let item = enabled["item"]["id"]
        .as_str()
        .context("item id")?
        .to_owned();
    let token = enabled["stream_token"]
        .as_str()
        .context("stream token")?
        .to_owned();
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
    for (index, disk) in vm.disks.iter().enumerate() {
        for (chunk, bytes) in disk.chunks(1 << 20).enumerate() {
            agent.write(index as u16, (chunk as u64) << 20, bytes)?;
        }
    }
    let mut oracle: BTreeMap<u64, Vec<Vec<u8>>> = BTreeMap::new();
    let first = agent.bookmark(Consistency::Crash, 0, now_ns(), "initial")?;
    oracle.insert(first, vm.disks.clone());
    api.wait_job(
        enabled["job"]["id"].as_u64().context("job id")?,
        timeout,
        &mut |_, _| {},
    )?;
    line(
        out,
        format!(
            "initial replication done ({})",
            human_bytes(vm.size_bytes())
        ),
    )?;
    let mut bytes = 0;
    let mut bookmarks = 0u64;
    let mut last_app = None;
    for write in 1..=scenario.writes {
        bytes += vm.write(Some(&agent))?;
        if write.is_multiple_of(scenario.bookmark_every) {
            bookmarks += 1;
            let app = bookmarks.is_multiple_of(scenario.app_every);
            let seq = agent.bookmark(
                if app {
                    Consistency::App
                } else {
                    Consistency::Crash
                },
                bookmarks,
                now_ns(),
                "scenario",
            )?;
            oracle.insert(seq, vm.disks.clone());
            if app {
                last_app = Some(seq);
            }
        }
    }
    let acked = agent.flush(timeout)?;
    let newest = *oracle.keys().next_back().context("no bookmark")?;
    api.wait_point(&item, newest, timeout)?;
    line(
        out,
        format!(
            "{} writes ({}), {bookmarks} bookmarks; acknowledged through seq {acked}",
            scenario.writes,
            human_bytes(bytes)
        ),
    )?;
    let (point, label) = match last_app {
        Some(seq) => (seq, "latest-app"),
        None => (newest, "latest-processed"),
    };
    let target = data_dir.join("restore").join(format!("{item}-test"));
    let job = api.post(
        &format!("/v1/items/{item}/test-failover"),
        json!({"point": label, "target_dir": target}),
    )?;
    api.wait_job(
        job["id"].as_u64().context("job id")?,
        timeout,
        &mut |_, _| {},
    )?;
    let view = api.get(&format!("/v1/items/{item}"))?;
    let files = paths(&view["test_failover"]["files"]);
    let exact = same(&files, &oracle[&point])?;
    line(
        out,
        format!(
            "test failover at point {point} ({label}): {} ({})",
            if exact {
                "every disk equals the source"
            } else {
                "MISMATCH"
            },
            files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    )?;
    if !exact {
        bail!("test failover disks differ from the source at point {point}");
    }
    api.post(
        &format!("/v1/items/{item}/test-failover/cleanup"),
        json!({}),
    )?;
    if scenario.failover {
        agent.close(timeout)?;
        let target = data_dir.join("restore").join(&item);
        let job = api.post(
            &format!("/v1/items/{item}/failover"),
            json!({"point": "latest", "target_dir": target, "source_shut_down": true}),
        )?;
        api.wait_job(
            job["id"].as_u64().context("job id")?,
            timeout,
            &mut |_, _| {},
        )?;
        let view = api.get(&format!("/v1/items/{item}"))?;
        let files = paths(&view["failover"]["files"]);
        let exact = same(&files, &vm.disks)?;
        line(
            out,
            format!(
                "failover to latest: {} ({})",
                if exact {
                    "every disk equals the source's final state"
                } else {
                    "MISMATCH"
                },
                files
                    .iter()
                    .map(|f| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )?;
        if !exact {
            bail!("failed-over disks differ from the source's final state");
        }
    } else {
        drop(agent);
    }
    if scenario.disable {
        api.call("DELETE", &format!("/v1/items/{item}"), None)?;
        line(out, format!("protection of {item} disabled"))?;
    }
    writeln!(out, "scenario {} passed", scenario.name)?;
    Ok(())
}
