//! `disk-sim demo`: the product's main job, end to end, on local files. Two real `appliance
//! serve` processes (site A and site B) on loopback, one VM with an OS disk and two data disks
//! on site A, and the seeds' whole cycle driven through the appliances' control APIs and data
//! ports:
//!
//! ```text
//!  enable (B) → initial replication → steady replication under a workload → test failover
//!  (verify, clean up, replication still moving) → failover to a Custom point → change point to
//!  the latest app-consistent point → commit → the VM runs on site B → re-protect to site A
//!  (original disks become replicas, temporary 1 GiB OS disk, delta resync) → reverse
//!  replication → failback (planned failover; temporary disk removed; VM back on site A) →
//!  protect A→B again
//! ```
//!
//! Every step prints one line (what it did, how long it took, bytes moved, the check), every
//! disk the appliances hand back is compared byte for byte with the source VM's own disks at
//! that instant (the oracle: the demo keeps every disk's exact content at every bookmark it
//! verifies), and the run ends with a summary table. It fails (non-zero exit) if any check
//! fails.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use engine::delta::{Consistency, DiskGeometry};
use serde_json::{Value, json};

use crate::agent::{Agent, AgentConfig};
use crate::rng::Rng;
use crate::site::{Appliance, parse_item_id};

/// Settings of the demo.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Where the two sites go (a new temporary directory if `None`).
    pub dir: Option<PathBuf>,
    /// Keep the files afterwards.
    pub keep: bool,
    /// Size of the OS disk in MiB (the data disks are half of it).
    pub os_disk_mib: u64,
    /// Workload seed.
    pub seed: u64,
    /// The `appliance` binary (default: beside this program, or `$APPLIANCE_BIN`).
    pub appliance_bin: Option<PathBuf>,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            dir: None,
            keep: false,
            os_disk_mib: 64,
            seed: 1,
            appliance_bin: None,
        }
    }
}

/// One step's line.
#[derive(Debug, Clone)]
pub struct StepReport {
    /// What it did.
    pub name: String,
    /// How long.
    pub duration: Duration,
    /// Bytes that crossed a data port (or were written by the appliance).
    pub bytes: u64,
    /// The check and its result.
    pub check: String,
    /// Whether the check passed.
    pub ok: bool,
}

/// A VM: its disks' current content in memory, mirrored to files on its site.
pub(crate) struct Vm {
    pub(crate) disks: Vec<Vec<u8>>,
    pub(crate) geometry: Vec<DiskGeometry>,
    pub(crate) files: Vec<PathBuf>,
    rng: Rng,
}

impl Vm {
    pub(crate) fn create(dir: &Path, geometry: &[DiskGeometry], seed: u64) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut rng = Rng::new(seed);
        let mut disks = Vec::new();
        let mut files = Vec::new();
        for (index, disk) in geometry.iter().enumerate() {
            let mut bytes = vec![0u8; disk.size_bytes as usize];
            // Installed content: three quarters of each disk hold data, the rest is empty.
            let used = bytes.len() / 4 * 3;
            rng.fill(&mut bytes[..used]);
            let path = dir.join(format!("disk-{index}.img"));
            std::fs::write(&path, &bytes).with_context(|| format!("writing {}", path.display()))?;
            disks.push(bytes);
            files.push(path);
        }
        Ok(Self {
            disks,
            geometry: geometry.to_vec(),
            files,
            rng,
        })
    }

    /// The VM now runs on other disk files (after a failover or a failback).
    fn run_on(files: &[PathBuf], geometry: &[DiskGeometry], seed: u64) -> anyhow::Result<Self> {
        let disks = files
            .iter()
            .map(|f| std::fs::read(f).with_context(|| format!("reading {}", f.display())))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self {
            disks,
            geometry: geometry.to_vec(),
            files: files.to_vec(),
            rng: Rng::new(seed),
        })
    }

    /// One write of 4 KiB to 256 KiB, to the disk file and the model, sent by `agent`.
    pub(crate) fn write(&mut self, agent: Option<&Agent>) -> anyhow::Result<u64> {
        use std::os::unix::fs::FileExt;
        let disk = self.rng.below(self.disks.len() as u64) as usize;
        let block = u64::from(self.geometry[disk].block_size_bytes);
        let len = (1 + self.rng.below(64)) * 4096;
        let offset = self
            .rng
            .below((self.disks[disk].len() as u64 - len) / block)
            * block;
        let range = offset as usize..(offset + len) as usize;
        self.rng.fill(&mut self.disks[disk][range.clone()]);
        let data = &self.disks[disk][range];
        std::fs::OpenOptions::new()
            .write(true)
            .open(&self.files[disk])
            .and_then(|f| f.write_all_at(data, offset))
            .with_context(|| format!("writing {}", self.files[disk].display()))?;
        if let Some(agent) = agent {
            agent.write(disk as u16, offset, data)?;
        }
        Ok(len)
    }

    pub(crate) fn size_bytes(&self) -> u64 {
        self.geometry.iter().map(|d| d.size_bytes).sum()
    }
}

/// Each file equals the disk of the same index (raw: the whole file; VHD: all but the
/// 512-byte footer).
pub(crate) fn same(files: &[PathBuf], disks: &[Vec<u8>]) -> anyhow::Result<bool> {
    if files.len() != disks.len() {
        return Ok(false);
    }
    for (file, disk) in files.iter().zip(disks) {
        let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
        if bytes.get(..disk.len()) != Some(disk.as_slice()) {
            return Ok(false);
        }
    }
    Ok(true)
}

pub(crate) fn paths(value: &Value) -> Vec<PathBuf> {
    value
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(PathBuf::from)
                .collect()
        })
        .unwrap_or_default()
}

fn agent(
    appliance: &Appliance,
    item: &str,
    token: &str,
    name: &str,
    vm: &Vm,
) -> anyhow::Result<Agent> {
    let mut config = AgentConfig::new(
        appliance.data_addr,
        parse_item_id(item)?,
        token.as_bytes(),
        name,
        vm.geometry.clone(),
    );
    config.backoff_initial = Duration::from_millis(20);
    config.backoff_max = Duration::from_millis(500);
    Ok(Agent::connect(config)?)
}

pub(crate) fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

struct Run<'a> {
    out: &'a mut dyn Write,
    steps: Vec<StepReport>,
    started: Instant,
}

impl Run<'_> {
    fn step(
        &mut self,
        name: &str,
        bytes: u64,
        ok: bool,
        check: impl Into<String>,
    ) -> anyhow::Result<()> {
        let duration = self.started.elapsed();
        let check = check.into();
        writeln!(
            self.out,
            "{:<4} {name:<64} {:>7.2} s  {:>10}  {check}",
            if ok { "ok" } else { "FAIL" },
            duration.as_secs_f64(),
            human_bytes(bytes),
        )?;
        self.steps.push(StepReport {
            name: name.to_owned(),
            duration,
            bytes,
            check,
            ok,
        });
        self.started = Instant::now();
        if ok {
            Ok(())
        } else {
            bail!("step failed: {name}")
        }
    }
}

/// A progress display for a long step (on stderr, when it is a terminal).
fn progress(what: &str) -> impl FnMut(u64, &str) + 'static {
    {
        let what = what.to_owned();
        let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
        move |percent, message| {
            if tty {
                eprint!("\r     {what}: {percent:>3} % {message:<60.60}\r");
            }
        }
    }
}

pub(crate) fn human_bytes(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

const JOB_TIMEOUT: Duration = Duration::from_secs(300);

/// Runs the demo; writes its lines to `out`. Returns the steps (all ok) or the first error.
pub fn run(options: &DemoOptions, out: &mut dyn Write) -> anyhow::Result<Vec<StepReport>> {
    let temp;
    let root = match &options.dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            dir.clone()
        }
        None => {
            temp = tempdir()?;
            temp.clone()
        }
    };
    let result = run_in(&root, options, out);
    if options.keep || options.dir.is_some() {
        writeln!(out, "files kept in {}", root.display())?;
    } else {
        let _ = std::fs::remove_dir_all(&root);
    }
    result
}

fn tempdir() -> anyhow::Result<PathBuf> {
    let base = std::env::temp_dir();
    for attempt in 0..100u32 {
        let dir = base.join(format!("dr-demo-{}-{attempt}", std::process::id()));
        if std::fs::create_dir(&dir).is_ok() {
            return Ok(dir);
        }
    }
    bail!("cannot create a directory in {}", base.display())
}

fn run_in(
    root: &Path,
    options: &DemoOptions,
    out: &mut dyn Write,
) -> anyhow::Result<Vec<StepReport>> {
    let site_a = root.join("site-a");
    let site_b = root.join("site-b");
    for dir in [&site_a, &site_b] {
        std::fs::create_dir_all(dir)?;
    }
    let start = |site: &Path| -> anyhow::Result<Appliance> {
        let store = site.display().to_string();
        let data = site.join("appliance");
        match &options.appliance_bin {
            Some(bin) => Appliance::start_with_bin(bin, &data, &["--disk-store", &store]),
            None => Appliance::start(&data, &["--disk-store", &store]),
        }
    };
    writeln!(
        out,
        "site A: {}   site B: {}",
        site_a.display(),
        site_b.display()
    )?;
    writeln!(
        out,
        "{:<4} {:<64} {:>9}  {:>10}  check",
        "", "step", "time", "bytes"
    )?;
    let mut run = Run {
        out,
        steps: Vec::new(),
        started: Instant::now(),
    };
    let a = start(&site_a)?;
    let b = start(&site_b)?;
    let os = options.os_disk_mib << 20;
    let geometry = vec![
        DiskGeometry {
            size_bytes: os,
            block_size_bytes: 4096,
        },
        DiskGeometry {
            size_bytes: os / 2,
            block_size_bytes: 4096,
        },
        DiskGeometry {
            size_bytes: os / 2,
            block_size_bytes: 512,
        },
    ];
    let mut vm = Vm::create(&site_a.join("vms/vm1"), &geometry, options.seed)?;
    run.step(
        "two appliances started; VM vm1 (OS + 2 data disks) on site A",
        0,
        true,
        format!("A api {}, B api {}", a.api, b.api),
    )?;

    // ── enable protection A → B ──
    let disks_json: Vec<Value> = geometry
        .iter()
        .map(|d| json!({"size_mib": d.size_bytes >> 20, "block_size_bytes": d.block_size_bytes}))
        .collect();
    let enabled = b.enable(json!({"name": "vm1", "disks": disks_json,
        "policy": {"keep_points": 500, "app_consistent_minutes": 5}}))?;
    let (item, token) = (enabled.id.clone(), enabled.token.clone());
    let slots = b.get("/v1/slots")?;
    run.step(
        "enable protection on B (3 replica disks, 3 slots)",
        0,
        slots["attached"] == 3,
        format!(
            "item {}…, slots free {}",
            item.get(..8).unwrap_or(&item),
            slots["free"]
        ),
    )?;

    // ── initial replication ──
    let source = agent(&b, &item, &token, "vm1", &vm)?;
    for (index, disk) in vm.disks.iter().enumerate() {
        for (chunk_index, chunk) in disk.chunks(1 << 20).enumerate() {
            source.write(index as u16, (chunk_index as u64) << 20, chunk)?;
        }
    }
    let mut oracle: BTreeMap<u64, Vec<Vec<u8>>> = BTreeMap::new();
    let first = source.bookmark(Consistency::Crash, 1, now_ns(), "initial")?;
    oracle.insert(first, vm.disks.clone());
    let mut shown = progress("initial replication");
    b.wait_job(enabled.job, JOB_TIMEOUT, &mut shown)?;
    let view = b.wait_state(&item, "protected", JOB_TIMEOUT)?;
    run.step(
        "initial replication (full copy, zstd over the data port)",
        vm.size_bytes(),
        view["synchronized_percent"] == 100,
        "protected, 100 % synchronized",
    )?;

    // ── steady replication under a workload ──
    let mut bytes = 0;
    let mut custom = 0;
    let mut last_app = 0;
    for round in 0..12u64 {
        for _ in 0..40 {
            bytes += vm.write(Some(&source))?;
        }
        let app = round % 4 == 3;
        let seq = source.bookmark(
            if app {
                Consistency::App
            } else {
                Consistency::Crash
            },
            10 + round,
            now_ns(),
            if app {
                "app-consistent"
            } else {
                "crash-consistent"
            },
        )?;
        oracle.insert(seq, vm.disks.clone());
        if round == 5 {
            custom = seq;
        }
        if app {
            last_app = seq;
        }
    }
    source.flush(Duration::from_secs(120))?;
    let newest = *oracle.keys().next_back().context("points")?;
    b.wait_point(&item, newest, JOB_TIMEOUT)?;
    let view = b.get(&format!("/v1/items/{item}"))?;
    run.step(
        "steady replication: 480 writes, 12 bookmarks (3 app-consistent)",
        bytes,
        view["points"].as_u64() == Some(13),
        format!(
            "{} points, RPO lag {} ms",
            view["points"],
            view["rpo_lag_ms"].as_u64().unwrap_or(0)
        ),
    )?;

    // ── test failover, cleanup, replication still moving ──
    let test_dir = site_b.join("restore/vm1-test");
    let job = b.post(
        &format!("/v1/items/{item}/test-failover"),
        json!({"point": "latest-app", "target_dir": test_dir, "format": "vhd"}),
    )?;
    let mut during = 0;
    for _ in 0..40 {
        during += vm.write(Some(&source))?;
    }
    let moving = source.bookmark(Consistency::Crash, 30, now_ns(), "during test")?;
    oracle.insert(moving, vm.disks.clone());
    let mut shown = progress("test failover");
    b.wait_job(
        job["id"].as_u64().context("job id")?,
        JOB_TIMEOUT,
        &mut shown,
    )?;
    let view = b.get(&format!("/v1/items/{item}"))?;
    let test_files = paths(&view["test_failover"]["files"]);
    let exact = same(&test_files, &oracle[&last_app])?;
    b.post(
        &format!("/v1/items/{item}/test-failover/cleanup"),
        json!({}),
    )?;
    source.flush(Duration::from_secs(120))?;
    b.wait_point(&item, moving, JOB_TIMEOUT)?;
    run.step(
        "test failover at the latest app-consistent point (fixed VHD)",
        during,
        exact && test_files.iter().all(|f| !f.exists()),
        format!(
            "3 VHDs equal the source at point {last_app}; cleaned up; replication moved on to \
             point {moving}"
        ),
    )?;

    // The source VM shuts down (its agent drains first).
    let mut tail = 0;
    for _ in 0..20 {
        tail += vm.write(Some(&source))?;
    }
    let last = source.bookmark(Consistency::Crash, 40, now_ns(), "shutdown")?;
    oracle.insert(last, vm.disks.clone());
    source.close(Duration::from_secs(120))?;
    b.wait_point(&item, last, JOB_TIMEOUT)?;

    // ── failover to a Custom point ──
    let restore = site_b.join("restore/vm1");
    let job = b.post(
        &format!("/v1/items/{item}/failover"),
        json!({"point": custom, "target_dir": restore, "format": "raw", "source_shut_down": true}),
    )?;
    let mut shown = progress("failover");
    b.wait_job(
        job["id"].as_u64().context("job id")?,
        JOB_TIMEOUT,
        &mut shown,
    )?;
    let view = b.get(&format!("/v1/items/{item}"))?;
    let failed_over = paths(&view["failover"]["files"]);
    run.step(
        &format!("failover to Custom point {custom} (raw)"),
        tail,
        same(&failed_over, &oracle[&custom])?,
        format!("3 disks equal the source at point {custom}"),
    )?;

    // ── change point ──
    let job = b.post(
        &format!("/v1/items/{item}/change-point"),
        json!({"point": "latest-app"}),
    )?;
    let mut shown = progress("change point");
    b.wait_job(
        job["id"].as_u64().context("job id")?,
        JOB_TIMEOUT,
        &mut shown,
    )?;
    let view = b.get(&format!("/v1/items/{item}"))?;
    run.step(
        "change recovery point to the latest app-consistent",
        0,
        view["failover"]["point_id"].as_u64() == Some(last_app)
            && same(&failed_over, &oracle[&last_app])?,
        format!("disks now equal the source at point {last_app}"),
    )?;

    // ── commit ──
    let view = b.post(&format!("/v1/items/{item}/commit"), json!({}))?;
    run.step(
        "commit",
        0,
        view["state"] == "committed",
        "state committed; allowed: reprotect, disable",
    )?;

    // ── the VM runs on site B ──
    let original = vm.files.clone();
    let original_disks = vm.disks.clone();
    drop(vm);
    let mut vm_b = Vm::run_on(&failed_over, &geometry, options.seed + 1)?;
    let mut written = 0;
    for _ in 0..30 {
        written += vm_b.write(None)?;
    }
    run.step(
        "the VM runs on site B (on the failed-over disks) and writes",
        written,
        true,
        "30 writes on site B",
    )?;

    // ── re-protect to site A ──
    let temporary = site_a.join("vms/vm1/vm1-temporary-os.vhd");
    let reverse = a.enable(json!({"name": "vm1-reverse",
        "disks": original.iter().zip(&geometry)
            .map(|(p, g)| json!({"path": p, "block_size_bytes": g.block_size_bytes}))
            .collect::<Vec<_>>(),
        "temporary_os_disk": temporary}))?;
    let (reverse_item, reverse_token) = (reverse.id.clone(), reverse.token.clone());
    let report = crate::resync::delta_resync(
        a.data_addr,
        parse_item_id(&reverse_item)?,
        reverse_token.as_bytes(),
        "vm1-reverse",
        &geometry,
        &vm_b.files,
        64 << 10,
        Duration::from_secs(120),
    )?;
    let mut shown = progress("re-protect");
    a.wait_job(reverse.job, JOB_TIMEOUT, &mut shown)?;
    a.wait_state(&reverse_item, "protected", JOB_TIMEOUT)?;
    let temp_ok = engine::vhd::read_fixed_vhd_info(&temporary)
        .is_ok_and(|info| info.virtual_size_bytes == 1 << 30);
    let differing: u64 = report.disks.iter().map(|d| d.chunks_differing).sum();
    run.step(
        "re-protect to site A: original disks are replicas, delta resync",
        report.total_bytes_sent,
        temp_ok && same(&original, &vm_b.disks)? && original_disks != vm_b.disks,
        format!(
            "sent {} of {} ({differing} differing 64 KiB chunks); temporary 1 GiB OS disk made",
            human_bytes(report.total_bytes_sent),
            human_bytes(report.total_disk_bytes)
        ),
    )?;

    // ── reverse replication ──
    let back = agent(&a, &reverse_item, &reverse_token, "vm1-reverse", &vm_b)?;
    let mut bytes = 0;
    for _ in 0..60 {
        bytes += vm_b.write(Some(&back))?;
    }
    let point = back.bookmark(Consistency::App, 50, now_ns(), "before failback")?;
    back.close(Duration::from_secs(120))?;
    a.wait_point(&reverse_item, point, JOB_TIMEOUT)?;
    let reverse_bytes = bytes;
    run.step(
        "reverse replication B → A under a workload",
        bytes,
        true,
        format!("point {point} applied on A"),
    )?;

    // ── failback ──
    let job = a.post(&format!("/v1/items/{reverse_item}/failback"), json!({}))?;
    let mut shown = progress("failback");
    a.wait_job(
        job["id"].as_u64().context("job id")?,
        JOB_TIMEOUT,
        &mut shown,
    )?;
    let view = a.get(&format!("/v1/items/{reverse_item}"))?;
    let slots = a.get("/v1/slots")?;
    run.step(
        "failback (planned failover): VM back on site A",
        0,
        view["state"] == "failed_back"
            && !temporary.exists()
            && same(&original, &vm_b.disks)?
            && slots["attached"] == 0,
        format!(
            "original disks equal the site-B VM; temporary disk deleted; A's slots free; since \
             re-protect {} of {} travelled back",
            human_bytes(report.total_bytes_sent + reverse_bytes),
            human_bytes(vm_b.size_bytes())
        ),
    )?;

    // ── protect A → B again ──
    let final_disks = vm_b.disks.clone();
    drop(vm_b);
    let mut vm = Vm::run_on(&original, &geometry, options.seed + 2)?;
    vm.disks = final_disks;
    b.call("DELETE", &format!("/v1/items/{item}"), None)?;
    let enabled = b.enable(json!({"name": "vm1", "disks": geometry.iter()
        .map(|d| json!({"size_mib": d.size_bytes >> 20, "block_size_bytes": d.block_size_bytes}))
        .collect::<Vec<_>>()}))?;
    let (again, again_token) = (enabled.id.clone(), enabled.token.clone());
    let report = crate::resync::delta_resync(
        b.data_addr,
        parse_item_id(&again)?,
        again_token.as_bytes(),
        "vm1",
        &geometry,
        &vm.files,
        64 << 10,
        Duration::from_secs(120),
    )?;
    let mut shown = progress("protect again");
    b.wait_job(enabled.job, JOB_TIMEOUT, &mut shown)?;
    let source = agent(&b, &again, &again_token, "vm1", &vm)?;
    for _ in 0..20 {
        vm.write(Some(&source))?;
    }
    let point = source.bookmark(Consistency::Crash, 60, now_ns(), "protected again")?;
    source.close(Duration::from_secs(120))?;
    b.wait_point(&again, point, JOB_TIMEOUT)?;
    let replicas: Vec<PathBuf> = (0..geometry.len())
        .map(|i| {
            b.data_dir()
                .join("items")
                .join(&again)
                .join(format!("replicas/disk-{i}.img"))
        })
        .collect();
    run.step(
        "protect A → B again (initial sync sends only non-empty chunks)",
        report.total_bytes_sent,
        same(&replicas, &vm.disks)?,
        "B's replicas equal the VM on site A",
    )?;
    a.stop()?;
    b.stop()?;
    let steps = std::mem::take(&mut run.steps);
    let out = run.out;
    writeln!(out)?;
    writeln!(out, "summary")?;
    writeln!(out, "| step | time | bytes | check |")?;
    writeln!(out, "|---|---:|---:|---|")?;
    for step in &steps {
        writeln!(
            out,
            "| {} | {:.2} s | {} | {} {} |",
            step.name,
            step.duration.as_secs_f64(),
            human_bytes(step.bytes),
            if step.ok { "ok" } else { "FAIL" },
            step.check
        )?;
    }
    let total: Duration = steps.iter().map(|s| s.duration).sum();
    let moved: u64 = steps.iter().map(|s| s.bytes).sum();
    writeln!(
        out,
        "{} steps in {:.1} s, {} moved: all checks passed",
        steps.len(),
        total.as_secs_f64(),
        human_bytes(moved)
    )?;
    Ok(steps)
}
