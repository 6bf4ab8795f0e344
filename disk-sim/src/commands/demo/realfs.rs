//! The demo's real-filesystem part: a disk image protected by the `source-agent` binary, used
//! by the kernel through the agent's NBD server (nbdfuse + a loop device), ext4 on it, files
//! written, and every recovery the appliance hands back checked by mounting it.
//!
//! ```text
//!  appliance (disk store = the site) · item enabled for a 256 MiB disk · source-agent on
//!  vm/os.img ─► nbdfuse + loop + mkfs.ext4 + mount ─► initial sync drained
//!  tree 1 ─► bookmark --freeze (app) ─► test failover at it ─► loop-mount ro: tree 1 equal
//!  tree 2 ─► umount ─► source-agent quiesce ─► agent stopped ─► failover at the quiesced
//!  point ─► mount: trees 1+2 equal ─► commit
//!  reprotect (vm/os.img becomes the reverse item's replica) ─► a source-agent on the
//!  failed-over disk (the VM on site B) ─► mount, tree 3, umount, quiesce ─► failback
//!  ─► vm/os.img mounted: trees 1+2+3 equal
//! ```
//!
//! Root only (loop devices, mounts, FUSE): otherwise it prints why it skips.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use appliance_api::model::{
    DiskSpec, EnableRequest, FailoverRequest, Format, ItemState, MaterializeRequest,
    PointConsistency, PointSpec, ReprotectRequest,
};

use super::{DemoOptions, JOB_TIMEOUT, Run};
use crate::agent_disk::{AgentProcess, AgentSetup, KernelDisk, Mounted, mkfs_ext4, tree_digests};
use crate::rng::Rng;
use crate::site::{Appliance, source_agent_bin};

/// Size of the VM's disk.
const DISK_MIB: u64 = 256;
/// How long an agent may take to send what it has not sent (the initial sync).
const SYNC_TIMEOUT: Duration = Duration::from_secs(120);

/// Expected file digests, by path relative to the filesystem's root.
type Tree = BTreeMap<PathBuf, u128>;

/// Why the part cannot run here, printed instead of its steps.
fn why_skip(options: &DemoOptions) -> Option<String> {
    if let Some(why) = crate::agent_disk::why_not_runnable() {
        return Some(why);
    }
    if options.source_agent_bin.is_none()
        && let Err(e) = source_agent_bin()
    {
        return Some(format!("{e:#}"));
    }
    None
}

/// Runs the part's steps in `dir` (created), or prints why it skips.
pub(super) fn run(run: &mut Run<'_>, dir: &Path, options: &DemoOptions) -> anyhow::Result<()> {
    if let Some(why) = why_skip(options) {
        writeln!(run.out, "real-filesystem part skipped: {why}")?;
        return Ok(());
    }
    let bin = match &options.source_agent_bin {
        Some(bin) => bin.clone(),
        None => source_agent_bin()?,
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let store = dir.display().to_string();
    let appliance = match &options.appliance_bin {
        Some(b) => Appliance::start_with_bin(b, &dir.join("appliance"), &["--disk-store", &store]),
        None => Appliance::start(&dir.join("appliance"), &["--disk-store", &store]),
    }?;
    let result = steps(run, dir, &bin, &appliance);
    appliance.stop()?;
    result
}

/// Writes a small tree under `root/<name>` (seeded: 3 directories × 5 files of 1 KiB to
/// 768 KiB) and returns the digests of what is there now under `root`.
fn write_tree(root: &Path, name: &str, seed: u64) -> anyhow::Result<Tree> {
    let mut rng = Rng::new(seed);
    for d in 0..3 {
        let dir = root.join(name).join(format!("dir-{d}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for f in 0..5u64 {
            let mut data = vec![0u8; (1024 << (2 * f)) as usize * if f == 4 { 3 } else { 1 }];
            rng.fill(&mut data);
            let path = dir.join(format!("file-{f}.bin"));
            std::fs::write(&path, &data).with_context(|| format!("writing {}", path.display()))?;
        }
    }
    tree_digests(root)
}

/// What differs between the expected tree and what is under `root`: empty when equal.
fn differences(expected: &Tree, root: &Path) -> anyhow::Result<String> {
    let found = tree_digests(root)?;
    if &found == expected {
        return Ok(String::new());
    }
    let missing = expected.keys().filter(|k| !found.contains_key(*k)).count();
    let extra = found.keys().filter(|k| !expected.contains_key(*k)).count();
    let changed = expected
        .iter()
        .filter(|(k, v)| found.get(*k).is_some_and(|f| f != *v))
        .count();
    Ok(format!(
        " — FAILED: {missing} files missing, {extra} unexpected, {changed} with other contents"
    ))
}

/// Starts a source-agent on `image` for `item` and attaches its disk as a block device.
fn start_agent(
    bin: &Path,
    dir: &Path,
    name: &str,
    appliance: &Appliance,
    item: &str,
    token: &str,
    image: &Path,
) -> anyhow::Result<(AgentProcess, KernelDisk)> {
    let setup = AgentSetup {
        item_name: name.to_owned(),
        item_id: Some(item.to_owned()),
        appliance: Some(appliance.data_addr),
        token: Some(token.to_owned()),
        state_dir: dir.join(format!("{name}-state")),
        capture: true,
        backlog_limit_mib: None,
        change_map_limit_kib: None,
        bookmark_interval_ms: None,
        compression: None,
        disks: vec![("os".into(), image.to_path_buf())],
    };
    let config = setup.write(&dir.join("etc"))?;
    let agent = AgentProcess::start(bin, &config)?;
    let disk = KernelDisk::attach(agent.uri("os")?, &dir.join(format!("{name}-fuse")))?;
    Ok((agent, disk))
}

/// Waits until the agent has sent everything (its initial sync or catch-up).
fn wait_sent(agent: &AgentProcess) -> anyhow::Result<u64> {
    let status = agent.wait_status("every disk's unsent_bytes 0", SYNC_TIMEOUT, |s| {
        s["disks"]
            .as_array()
            .is_some_and(|d| d.iter().all(|d| d["unsent_bytes"].as_u64() == Some(0)))
    })?;
    Ok(status["disks"].as_array().map_or(0, |d| {
        d.iter().filter_map(|d| d["resent_bytes"].as_u64()).sum()
    }))
}

/// The single file of a materialized disk set.
fn only_file(files: &[PathBuf], what: &str) -> anyhow::Result<PathBuf> {
    match files {
        [one] => Ok(one.clone()),
        _ => bail!("{what} wrote {} files, expected 1", files.len()),
    }
}

fn steps(run: &mut Run<'_>, dir: &Path, bin: &Path, b: &Appliance) -> anyhow::Result<()> {
    let image = dir.join("vm/os.img");
    std::fs::create_dir_all(dir.join("vm"))?;
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(DISK_MIB << 20))
        .with_context(|| format!("creating {}", image.display()))?;
    let enabled = b.enable(&EnableRequest {
        name: "realfs".into(),
        disks: vec![DiskSpec::create(DISK_MIB, Some(4096))],
        policy: None,
        temporary_os_disk: None,
    })?;
    let (item, token) = (enabled.item.id.clone(), enabled.stream_token.clone());
    let (agent, disk) = start_agent(bin, dir, "realfs", b, &item, &token, &image)?;
    mkfs_ext4(&disk.device)?;
    let mnt = dir.join("mnt/vm");
    let vm = Mounted::mount(&disk.device, &mnt, "")?;
    let synced = wait_sent(&agent)?;
    run.step(
        "real fs: source-agent on a 256 MiB image, NBD → nbdfuse → loop, ext4",
        synced,
        true,
        format!(
            "{} mounted at {}; initial sync sent",
            disk.device.display(),
            mnt.display()
        ),
    )?;

    // ── files, app-consistent bookmark with the filesystem frozen ──
    let tree1 = write_tree(&mnt, "tree-1", 11)?;
    let point1 = agent.bookmark(true, "realfs tree 1", &[&mnt], 60)?;
    b.wait_point(&item, point1.seq, JOB_TIMEOUT)?;
    // The supervisor marks the item protected at its next tick after the first point.
    b.wait_state(&item, ItemState::Protected, JOB_TIMEOUT)?;
    let app = b
        .points(&item)?
        .iter()
        .any(|p| p.id == point1.seq && p.consistency == PointConsistency::App);
    run.step(
        "real fs: 15 files written; bookmark --app --freeze (fsfreeze -f/-u)",
        0,
        app && point1.consistency == "app",
        format!("app-consistent point {} applied", point1.seq),
    )?;

    // ── test failover at that point, mounted read-only ──
    let target = dir.join("restore/test");
    let job = b.test_failover(
        &item,
        &MaterializeRequest {
            point: PointSpec::Id(point1.seq),
            target_dir: target.display().to_string(),
            format: Format::Raw,
            mode: Default::default(),
        },
    )?;
    b.wait_job(job.id, JOB_TIMEOUT, &mut |_, _| {})?;
    let copy = only_file(
        &super::paths(b.item(&item)?.test_failover.as_ref()),
        "test failover",
    )?;
    let mounted = Mounted::mount(&copy, &dir.join("mnt/test"), "ro,loop")?;
    let why = differences(&tree1, &mounted.mountpoint)?;
    mounted.unmount()?;
    b.test_failover_cleanup(&item)?;
    run.step(
        "real fs: test failover at the app point, loop-mounted read-only",
        DISK_MIB << 20,
        why.is_empty() && !copy.exists(),
        format!("{} files equal; cleaned up{why}", tree1.len()),
    )?;

    // ── more writes, unmount, quiesce: the planned failover's point ──
    let tree2 = write_tree(&mnt, "tree-2", 12)?;
    vm.unmount()?;
    let last = agent.quiesce(true, "realfs shutdown", 60)?;
    let quiesced = agent.status()?["quiesced"].as_bool() == Some(true);
    b.wait_point(&item, last.seq, JOB_TIMEOUT)?;
    disk.detach()?;
    agent.stop(Duration::from_secs(30))?;
    run.step(
        "real fs: 15 more files; umount; source-agent quiesce; agent stopped",
        0,
        quiesced,
        format!("quiesced at point {} (acknowledged, applied)", last.seq),
    )?;

    // ── failover at the quiesced point ──
    let restore = dir.join("restore/failover");
    let job = b.failover(
        &item,
        &FailoverRequest {
            point: PointSpec::Id(last.seq),
            target_dir: restore.display().to_string(),
            format: Format::Raw,
            source_shut_down: true,
            mode: Default::default(),
        },
    )?;
    b.wait_job(job.id, JOB_TIMEOUT, &mut |_, _| {})?;
    let failed_over = only_file(&super::paths(b.item(&item)?.failover.as_ref()), "failover")?;
    let mounted = Mounted::mount(&failed_over, &dir.join("mnt/failover"), "loop")?;
    let why = differences(&tree2, &mounted.mountpoint)?;
    mounted.unmount()?;
    let view = b.commit(&item)?;
    run.step(
        "real fs: failover at the quiesced point, mounted; commit",
        DISK_MIB << 20,
        why.is_empty() && view.state == ItemState::Committed,
        format!("all {} files equal; committed{why}", tree2.len()),
    )?;

    // ── the VM on site B: reprotect, an agent on the failed-over disk, more files ──
    let reverse = b.reprotect(
        &item,
        &ReprotectRequest {
            disks: vec![image.display().to_string()],
            temporary_os_disk: None,
            name: None,
        },
    )?;
    let (rev, rev_token) = (reverse.item.id.clone(), reverse.stream_token.clone());
    let (agent, disk) = start_agent(bin, dir, "realfs-b", b, &rev, &rev_token, &failed_over)?;
    let resent = wait_sent(&agent)?;
    let vm = Mounted::mount(&disk.device, &dir.join("mnt/vm-b"), "")?;
    let tree3 = write_tree(&vm.mountpoint, "tree-3", 13)?;
    vm.unmount()?;
    let back = agent.quiesce(true, "realfs before failback", 60)?;
    b.wait_point(&rev, back.seq, JOB_TIMEOUT)?;
    b.wait_state(&rev, ItemState::Protected, JOB_TIMEOUT)?;
    disk.detach()?;
    agent.stop(Duration::from_secs(30))?;
    run.step(
        "real fs: reprotect; source-agent on the failed-over disk; 15 files; quiesce",
        resent,
        true,
        format!(
            "reverse item protected at point {}; the new agent compared chunk hashes with the \
             reverse replica and sent {} of the {} disk",
            back.seq,
            bytesize::ByteSize::b(resent),
            bytesize::ByteSize::mib(DISK_MIB),
        ),
    )?;

    // ── failback: the original image gets site B's state ──
    let job = b.failback(&rev)?;
    b.wait_job(job.id, JOB_TIMEOUT, &mut |_, _| {})?;
    let state = b.item(&rev)?.state;
    let mounted = Mounted::mount(&image, &dir.join("mnt/failback"), "loop")?;
    let why = differences(&tree3, &mounted.mountpoint)?;
    mounted.unmount()?;
    run.step(
        "real fs: failback; the original image mounted",
        0,
        why.is_empty() && state == ItemState::FailedBack,
        format!(
            "all {} files (trees 1–3) equal on {}{why}",
            tree3.len(),
            image.display()
        ),
    )
}
