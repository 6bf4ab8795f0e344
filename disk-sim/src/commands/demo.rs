//! `disk-sim demo`: the product's main job, end to end, on local files. Two real `appliance
//! serve` processes (site A and site B) on loopback, one VM with an OS disk and two data disks
//! on site A, and the seeds' whole cycle driven through the appliances' control APIs and data
//! ports:
//!
//! ```text
//!  enable (B) → initial replication → steady replication under a workload → test failover
//!  (verify, clean up, replication still moving) → the same test failover in export mode (NBD
//!  at once: time to first answer, bytes, a drill write the replica never sees, clean up) →
//!  failover to a Custom point → change point to
//!  the latest app-consistent point → commit → the VM runs on site B → re-protect to site A
//!  (original disks become replicas, temporary 1 GiB OS disk, delta resync) → reverse
//!  replication → failback (planned failover; temporary disk removed; VM back on site A) →
//!  protect A→B again → failover in export mode (the VM runs on the export at once and
//!  writes; the copy job runs; commit after)
//! ```
//!
//! Every step prints one line (what it did, how long it took, bytes moved, the check), every
//! disk the appliances hand back is compared byte for byte with the source VM's own disks at
//! that instant (the source model, [`SourceModel`]: its oracle rebuilds every disk at every
//! bookmark), and the run ends with a summary table. It fails (non-zero exit) if any check
//! fails. The export-mode step reads the exports with `nbdinfo`, `nbdcopy` and `qemu-io`
//! ([`nbd_tools`]; `scripts/install-tools.sh` installs them); the demo installs nothing.
//!
//! Then the real-filesystem part ([`realfs`], root only, [`RealFs`]): ext4 on a disk image
//! protected by the `source-agent` binary, through test failover, a quiesced failover and
//! failback, every step checked by mounting what the appliance handed back.

mod instant;
mod nbd_tools;
mod realfs;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::bail;
use appliance_api::model::{
    ChangePointRequest, DiskSpec, EnableRequest, FailoverRequest, Format, ItemState, JobView,
    MaterializeRequest, PointSpec, PolicyRequest,
};
use engine::delta::{Consistency, DiskGeometry};

use super::{human_bytes, human_duration, paths};
use crate::site::{Appliance, parse_item_id};
use crate::source::{Content, SourceModel};
use crate::workload::{Pattern, WorkloadSpec};
use source_agent::sender::{Agent, AgentConfig};

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
    /// Whether to run the real-filesystem part ([`realfs`]).
    pub real_fs: RealFs,
    /// The `source-agent` binary (default: beside this program, or `$SOURCE_AGENT_BIN`).
    pub source_agent_bin: Option<PathBuf>,
}

/// Which parts of the demo run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum RealFs {
    /// The simulated VM's cycle, then the real-filesystem part when it can run here (root,
    /// FUSE, loop devices, the `source-agent` binary); it prints why it skips otherwise.
    #[default]
    Auto,
    /// Only the real-filesystem part.
    Only,
    /// Only the simulated VM's cycle.
    Skip,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            dir: None,
            keep: false,
            os_disk_mib: 64,
            seed: 1,
            appliance_bin: None,
            real_fs: RealFs::Auto,
            source_agent_bin: None,
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
    /// For a step that hands out disks: how long from the request until they were usable.
    pub ready: Option<Duration>,
    /// Bytes that crossed a data port (or were written by the appliance).
    pub bytes: u64,
    /// The check and its result.
    pub check: String,
    /// Whether the check passed.
    pub ok: bool,
}

/// The demo VM's writes: 512 B to 256 KiB of incompressible data at uniform offsets, no
/// trims; its bookmarks are the demo's own.
fn demo_workload() -> WorkloadSpec {
    WorkloadSpec {
        pattern: Pattern::Uniform,
        write_max_bytes: 256 << 10,
        zero_range_per_mille: 0,
        compressible_percent: 0,
        crash_bookmark_every_ops: 0,
        app_bookmark_every_ops: 0,
        ..WorkloadSpec::default()
    }
}

fn agent(
    appliance: &Appliance,
    item: &str,
    token: &str,
    name: &str,
    geometry: &[DiskGeometry],
) -> anyhow::Result<Agent> {
    let mut config = AgentConfig::new(
        appliance.data_addr,
        parse_item_id(item)?,
        token.as_bytes(),
        name,
        geometry.to_vec(),
    );
    config.backoff_initial = Duration::from_millis(20);
    config.backoff_max = Duration::from_millis(500);
    Ok(Agent::connect(config)?)
}

struct Run<'a> {
    out: &'a mut dyn Write,
    steps: Vec<StepReport>,
    started: Instant,
    /// The next step's [`StepReport::ready`].
    ready: Option<Duration>,
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
        let ready = self.ready.take();
        writeln!(
            self.out,
            "{:<4} {name:<64} {:>9}  {:>11}  {:>10}  {check}",
            if ok { "ok" } else { "FAIL" },
            human_duration(duration),
            ready.map(human_duration).unwrap_or_default(),
            human_bytes(bytes),
        )?;
        self.steps.push(StepReport {
            name: name.to_owned(),
            duration,
            ready,
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

/// What to add to a step's check when a byte-for-byte check failed: nothing when it passed.
fn why<E: std::fmt::Display>(result: &Result<(), E>) -> String {
    match result {
        Ok(()) => String::new(),
        Err(error) => format!(" — FAILED: {error}"),
    }
}

/// [`why`] for a comparison with the disks now: each differing disk.
fn why_differ(differ: &[(usize, String)]) -> String {
    differ
        .iter()
        .map(|(disk, what)| format!(" — disk {disk} differs: {what}"))
        .collect()
}

/// How long job `job` ran, by the appliance's clock (created until finished).
fn job_duration(job: &JobView) -> Duration {
    Duration::from_nanos(
        job.finished_ns
            .unwrap_or(job.created_ns)
            .saturating_sub(job.created_ns),
    )
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
    if options.real_fs != RealFs::Only {
        nbd_tools::check_tools()?;
    }
    writeln!(
        out,
        "{:<4} {:<64} {:>9}  {:>11}  {:>10}  check",
        "", "step", "time", "disks ready", "bytes"
    )?;
    let mut run = Run {
        out,
        steps: Vec::new(),
        started: Instant::now(),
        ready: None,
    };
    if options.real_fs != RealFs::Only {
        cycle(&mut run, root, options)?;
    }
    if options.real_fs != RealFs::Skip {
        run.started = Instant::now();
        realfs::run(&mut run, &root.join("real-fs"), options)?;
    }
    let steps = std::mem::take(&mut run.steps);
    let out = run.out;
    writeln!(out)?;
    writeln!(out, "summary")?;
    writeln!(out, "| step | time | disks ready | bytes | check |")?;
    writeln!(out, "|---|---:|---:|---:|---|")?;
    for step in &steps {
        writeln!(
            out,
            "| {} | {} | {} | {} | {} {} |",
            step.name,
            human_duration(step.duration),
            step.ready.map(human_duration).unwrap_or_default(),
            human_bytes(step.bytes),
            if step.ok { "ok" } else { "FAIL" },
            step.check
        )?;
    }
    let total: Duration = steps.iter().map(|s| s.duration).sum();
    let moved: u64 = steps.iter().map(|s| s.bytes).sum();
    writeln!(
        out,
        "{} steps in {}, {} moved: all checks passed",
        steps.len(),
        human_duration(total),
        human_bytes(moved)
    )?;
    Ok(steps)
}

/// The simulated VM's whole cycle on two sites.
fn cycle(run: &mut Run<'_>, root: &Path, options: &DemoOptions) -> anyhow::Result<()> {
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
        run.out,
        "site A: {}   site B: {}",
        site_a.display(),
        site_b.display()
    )?;
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
    let mut vm = SourceModel::create(
        &site_a.join("vms/vm1"),
        "vm1",
        &geometry,
        options.seed,
        demo_workload(),
        Content::Installed { percent: 75 },
    )?;
    run.step(
        "two appliances started; VM vm1 (OS + 2 data disks) on site A",
        0,
        true,
        format!("A api {}, B api {}", a.api, b.api),
    )?;

    // ── enable protection A → B ──
    let enabled = b.enable(&EnableRequest {
        name: "vm1".into(),
        disks: new_disks(&geometry),
        policy: Some(PolicyRequest {
            keep_points: Some(500),
            keep_minutes: None,
            app_consistent_minutes: Some(5),
        }),
        temporary_os_disk: None,
    })?;
    let (item, token) = (enabled.item.id.clone(), enabled.stream_token.clone());
    let slots = b.slots()?;
    run.step(
        "enable protection on B (3 replica disks, 3 slots)",
        0,
        slots.attached == 3,
        format!(
            "item {}…, slots free {}",
            item.get(..8).unwrap_or(&item),
            slots.free
        ),
    )?;

    // ── initial replication ──
    let source = agent(&b, &item, &token, "vm1", &geometry)?;
    let mut piece = vec![0u8; 1 << 20];
    for (index, disk) in geometry.iter().enumerate() {
        let mut at = 0;
        while at < disk.size_bytes {
            let len = (disk.size_bytes - at).min(piece.len() as u64) as usize;
            vm.vm().read_at(index, at, &mut piece[..len])?;
            source.write(index as u16, at, &piece[..len])?;
            at += len as u64;
        }
    }
    vm.bookmark_labeled(&source, Consistency::Crash, "initial")?;
    let mut shown = progress("initial replication");
    b.wait_job(enabled.job.id, JOB_TIMEOUT, &mut shown)?;
    let view = b.wait_state(&item, ItemState::Protected, JOB_TIMEOUT)?;
    run.step(
        "initial replication (full copy, zstd over the data port)",
        vm.size_bytes(),
        view.synchronized_percent == 100,
        "protected, 100 % synchronized",
    )?;

    // ── steady replication under a workload ──
    let mut bytes = 0;
    let mut custom = 0;
    let mut last_app = 0;
    let mut newest = 0;
    for round in 0..12u64 {
        for _ in 0..40 {
            bytes += vm.write(Some(&source))?;
        }
        let app = round % 4 == 3;
        let seq = vm.bookmark_labeled(
            &source,
            if app {
                Consistency::App
            } else {
                Consistency::Crash
            },
            if app {
                "app-consistent"
            } else {
                "crash-consistent"
            },
        )?;
        newest = seq;
        if round == 5 {
            custom = seq;
        }
        if app {
            last_app = seq;
        }
    }
    source.flush(Duration::from_secs(120))?;
    b.wait_point(&item, newest, JOB_TIMEOUT)?;
    let view = b.item(&item)?;
    run.step(
        "steady replication: 480 writes, 12 bookmarks (3 app-consistent)",
        bytes,
        view.points == 13,
        format!(
            "{} points, RPO lag {} ms",
            view.points,
            view.rpo_lag_ms.unwrap_or(0)
        ),
    )?;

    // ── test failover, cleanup, replication still moving ──
    let test_dir = site_b.join("restore/vm1-test");
    let job = b.test_failover(
        &item,
        &MaterializeRequest {
            point: PointSpec::latest_app(),
            target_dir: test_dir.display().to_string(),
            format: Format::Vhd,
            mode: Default::default(),
        },
    )?;
    let mut during = 0;
    for _ in 0..40 {
        during += vm.write(Some(&source))?;
    }
    let moving = vm.bookmark_labeled(&source, Consistency::Crash, "during test")?;
    let mut shown = progress("test failover");
    let copy_ready = job_duration(&b.wait_job(job.id, JOB_TIMEOUT, &mut shown)?);
    let test_files = paths(b.item(&item)?.test_failover.as_ref());
    let exact = vm.verify_files(last_app, &test_files);
    b.test_failover_cleanup(&item)?;
    source.flush(Duration::from_secs(120))?;
    b.wait_point(&item, moving, JOB_TIMEOUT)?;
    run.ready = Some(copy_ready);
    run.step(
        "test failover at the latest app-consistent point (fixed VHD)",
        during,
        exact.is_ok() && test_files.iter().all(|f| !f.exists()),
        format!(
            "3 VHDs equal the source at point {last_app}; cleaned up; replication moved on to \
             point {moving}{}",
            why(&exact)
        ),
    )?;

    // ── the same test failover in export mode: NBD at once ──
    let twin = instant::TwinOf {
        appliance: &b,
        item: &item,
        point: last_app,
        copy_ready,
        scratch: site_b.join("restore/vm1-drill-read-back"),
    };
    instant::test_failover_export(run, &twin, &mut vm, &source)?;

    // The source VM shuts down (its agent drains first).
    let mut tail = 0;
    for _ in 0..20 {
        tail += vm.write(Some(&source))?;
    }
    let last = vm.bookmark_labeled(&source, Consistency::Crash, "shutdown")?;
    source.close(Duration::from_secs(120))?;
    b.wait_point(&item, last, JOB_TIMEOUT)?;

    // ── failover to a Custom point ──
    let restore = site_b.join("restore/vm1");
    let job = b.failover(
        &item,
        &FailoverRequest {
            point: PointSpec::Id(custom),
            target_dir: restore.display().to_string(),
            format: Format::Raw,
            source_shut_down: true,
            mode: Default::default(),
        },
    )?;
    let mut shown = progress("failover");
    let failover_ready = job_duration(&b.wait_job(job.id, JOB_TIMEOUT, &mut shown)?);
    let failed_over = paths(b.item(&item)?.failover.as_ref());
    let exact = vm.verify_files(custom, &failed_over);
    run.ready = Some(failover_ready);
    run.step(
        &format!("failover to Custom point {custom} (raw)"),
        tail,
        exact.is_ok(),
        format!("3 disks equal the source at point {custom}{}", why(&exact)),
    )?;

    // ── change point ──
    let job = b.change_point(
        &item,
        &ChangePointRequest {
            point: PointSpec::latest_app(),
        },
    )?;
    let mut shown = progress("change point");
    b.wait_job(job.id, JOB_TIMEOUT, &mut shown)?;
    let view = b.item(&item)?;
    let exact = vm.verify_files(last_app, &failed_over);
    run.step(
        "change recovery point to the latest app-consistent",
        0,
        view.failover.as_ref().map(|f| f.point_id) == Some(last_app) && exact.is_ok(),
        format!(
            "disks now equal the source at point {last_app}{}",
            why(&exact)
        ),
    )?;

    // ── commit ──
    let view = b.commit(&item)?;
    run.step(
        "commit",
        0,
        view.state == ItemState::Committed,
        "state committed; allowed: reprotect, disable",
    )?;

    // ── the VM runs on site B ──
    let original = vm.files().to_vec();
    let original_digests = vm.digests()?;
    drop(vm);
    let mut vm_b = SourceModel::open_paths(
        "vm1",
        &failed_over,
        &geometry,
        &site_b.join("vm1-oracle"),
        options.seed + 1,
        demo_workload(),
    )?;
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
    let reverse = a.enable(&EnableRequest {
        name: "vm1-reverse".into(),
        disks: original
            .iter()
            .zip(&geometry)
            .map(|(p, g)| DiskSpec {
                size_mib: None,
                path: Some(p.display().to_string()),
                block_size_bytes: Some(g.block_size_bytes),
            })
            .collect(),
        policy: None,
        temporary_os_disk: Some(temporary.display().to_string()),
    })?;
    let (reverse_item, reverse_token) = (reverse.item.id.clone(), reverse.stream_token.clone());
    let report = source_agent::resync::delta_resync(
        a.data_addr,
        parse_item_id(&reverse_item)?,
        reverse_token.as_bytes(),
        "vm1-reverse",
        &geometry,
        vm_b.files(),
        64 << 10,
        Duration::from_secs(120),
    )?;
    let mut shown = progress("re-protect");
    a.wait_job(reverse.job.id, JOB_TIMEOUT, &mut shown)?;
    a.wait_state(&reverse_item, ItemState::Protected, JOB_TIMEOUT)?;
    let temp_ok = engine::vhd::read_fixed_vhd_info(&temporary)
        .is_ok_and(|info| info.virtual_size_bytes == 1 << 30);
    let differing: u64 = report.disks.iter().map(|d| d.chunks_differing).sum();
    let differ = vm_b.verify_current(&original)?;
    run.step(
        "re-protect to site A: original disks are replicas, delta resync",
        report.total_bytes_sent,
        temp_ok && differ.is_empty() && original_digests != vm_b.digests()?,
        format!(
            "sent {} of {} ({differing} differing 64 KiB chunks); temporary 1 GiB OS disk made{}",
            human_bytes(report.total_bytes_sent),
            human_bytes(report.total_disk_bytes),
            why_differ(&differ)
        ),
    )?;

    // ── reverse replication ──
    let back = agent(&a, &reverse_item, &reverse_token, "vm1-reverse", &geometry)?;
    let mut bytes = 0;
    for _ in 0..60 {
        bytes += vm_b.write(Some(&back))?;
    }
    let point = vm_b.bookmark_labeled(&back, Consistency::App, "before failback")?;
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
    let job = a.failback(&reverse_item)?;
    let mut shown = progress("failback");
    a.wait_job(job.id, JOB_TIMEOUT, &mut shown)?;
    let view = a.item(&reverse_item)?;
    let slots = a.slots()?;
    let differ = vm_b.verify_current(&original)?;
    run.step(
        "failback (planned failover): VM back on site A",
        0,
        view.state == ItemState::FailedBack
            && !temporary.exists()
            && differ.is_empty()
            && slots.attached == 0,
        format!(
            "original disks equal the site-B VM; temporary disk deleted; A's slots free; since \
             re-protect {} of {} travelled back{}",
            human_bytes(report.total_bytes_sent + reverse_bytes),
            human_bytes(vm_b.size_bytes()),
            why_differ(&differ)
        ),
    )?;

    // ── protect A → B again ──
    drop(vm_b);
    let mut vm = SourceModel::open_paths(
        "vm1",
        &original,
        &geometry,
        &site_a.join("vm1-oracle"),
        options.seed + 2,
        demo_workload(),
    )?;
    b.disable(&item)?;
    let enabled = b.enable(&EnableRequest {
        name: "vm1".into(),
        disks: new_disks(&geometry),
        policy: None,
        temporary_os_disk: None,
    })?;
    let (again, again_token) = (enabled.item.id.clone(), enabled.stream_token.clone());
    let report = source_agent::resync::delta_resync(
        b.data_addr,
        parse_item_id(&again)?,
        again_token.as_bytes(),
        "vm1",
        &geometry,
        vm.files(),
        64 << 10,
        Duration::from_secs(120),
    )?;
    let mut shown = progress("protect again");
    b.wait_job(enabled.job.id, JOB_TIMEOUT, &mut shown)?;
    let source = agent(&b, &again, &again_token, "vm1", &geometry)?;
    for _ in 0..20 {
        vm.write(Some(&source))?;
    }
    let point = vm.bookmark_labeled(&source, Consistency::Crash, "protected again")?;
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
    let differ = vm.verify_current(&replicas)?;
    run.step(
        "protect A → B again (initial sync sends only non-empty chunks)",
        report.total_bytes_sent,
        differ.is_empty(),
        format!("B's replicas equal the VM on site A{}", why_differ(&differ)),
    )?;

    // ── failover in export mode: the VM runs on the export at once ──
    let failover = instant::FailoverOf {
        appliance: &b,
        item: &again,
        point,
        copy_ready: failover_ready,
        target_dir: site_b.join("restore/vm1-instant"),
    };
    instant::failover_export(run, &failover, &vm)?;
    a.stop()?;
    b.stop()?;
    Ok(())
}

/// New replica disks of `geometry`'s sizes and block sizes.
fn new_disks(geometry: &[DiskGeometry]) -> Vec<DiskSpec> {
    geometry
        .iter()
        .map(|d| DiskSpec::create(d.size_bytes >> 20, Some(d.block_size_bytes)))
        .collect()
}
