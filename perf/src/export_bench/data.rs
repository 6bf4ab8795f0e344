//! The data-path tables of the export benchmark: sequential read (nbdcopy), 4 KiB random
//! read (fio's nbd engine) and drill write (nbdcopy into a drill), each next to fio on the
//! replica file or on the overlays' filesystem.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use appliance_api::model::DiskMode;
use disk_sim::site::Appliance;

use super::{
    ExportPlan, Item, read_only_export, run_tool, start_test_failover, sync_all, test_failover_uri,
};
use crate::fio::{Fio, FioJob};
use crate::machine::{Scratch, drop_page_cache};
use crate::report::{Bench, Goal, Row, Side};

/// Random-read jobs (each one NBD connection, or one fio thread on the file) and their depth.
const RAND_JOBS: usize = 4;
const RAND_DEPTH: usize = 8;
/// Connections of the diagnostic random-read row (the NBD server lets 8 handshakes from one
/// address run at once).
const WIDE_JOBS: usize = 8;

/// What every table needs.
pub(super) struct DataCtx<'a> {
    pub(super) appliance: &'a Appliance,
    pub(super) fio: &'a Fio,
    pub(super) nbdcopy: &'a Path,
    pub(super) bin: &'a Path,
    /// The data disk's item (its replica is `file`).
    pub(super) item: &'a Item,
    pub(super) file: &'a Path,
    pub(super) scratch: &'a Scratch,
    pub(super) plan: &'a ExportPlan,
}

/// CPU seconds the appliance process used so far (0 when /proc cannot say).
fn appliance_cpu_s(appliance: &Appliance) -> f64 {
    appliance
        .pid()
        .and_then(|pid| crate::e2e_bench::process::cpu_of(pid).ok())
        .map_or(0.0, |c| c.total_s())
}

/// A row of fio run with `numjobs` > 1: its bandwidth log is one job's, so no intervals.
fn fio_row(label: &str, fio: &Fio, job: &FioJob, multi_job: bool) -> Result<Row> {
    let mut row = Row::fio(label, &fio.run(job)?);
    if multi_job {
        row.intervals = None;
    }
    Ok(row)
}

/// Sequential read: nbdcopy of a read-only export to `null:` vs fio reading the replica.
pub(super) fn seq_read(ctx: &DataCtx<'_>, lines: &mut Vec<String>) -> Result<Bench> {
    let bytes = ctx.item.size_bytes;
    let title = format!("export: sequential read, {} MiB", bytes >> 20);
    let mut bench = Bench::new("export", &title);
    super::common_params(&mut bench, ctx.bin);
    bench.param("bytes", bytes);
    let (export_id, uri) = read_only_export(ctx.appliance, ctx.item)?;
    let buffered = FioJob {
        name: "export-seq-read".into(),
        args: vec![
            format!("--filename={}", ctx.file.display()),
            "--ioengine=psync".into(),
            "--direct=0".into(),
            "--rw=read".into(),
            "--bs=256k".into(),
            format!("--size={bytes}"),
        ],
    };
    let direct = FioJob {
        name: "export-seq-read-direct".into(),
        args: vec![
            format!("--filename={}", ctx.file.display()),
            "--ioengine=io_uring".into(),
            "--direct=1".into(),
            "--rw=read".into(),
            "--bs=1M".into(),
            "--iodepth=32".into(),
            format!("--size={bytes}"),
        ],
    };
    let group = "export, nbdcopy to null:";
    let fio_run = |n: usize| -> Result<Row> {
        drop_page_cache(ctx.file)?;
        progress!("[{title}] fio #{n}");
        Ok(fio_row("fio", ctx.fio, &buffered, false)?.run(n))
    };
    bench.rows.push(fio_run(1)?);
    for run in 1..=ctx.plan.repeats {
        drop_page_cache(ctx.file)?;
        progress!("[{title}] {group} #{run}");
        let server_before = appliance_cpu_s(ctx.appliance);
        let (elapsed_s, cpu, command) = run_tool(Command::new(ctx.nbdcopy).arg(&uri).arg("null:"))?;
        let server_cpu = appliance_cpu_s(ctx.appliance) - server_before;
        bench.rows.push(
            Row::engine(group, bytes, bytes / (256 << 10), elapsed_s)
                .with_cpu(cpu)
                .with_extra("appliance_cpu_s", server_cpu)
                .with_extra("command", command.replace(&uri, "nbd://ADDR/NAME"))
                .run(run),
        );
        bench.rows.push(fio_run(run + 1)?);
    }
    drop_page_cache(ctx.file)?;
    progress!("[{title}] fio, O_DIRECT (the device's limit)");
    bench.rows.push(fio_row(
        "fio, O_DIRECT 1 MiB qd 32",
        ctx.fio,
        &direct,
        false,
    )?);
    ctx.appliance.client().remove_export(&export_id)?;
    lines.push(bench.add_ratio_vs(
        "nbdcopy vs fio buffered read",
        group,
        "fio",
        Some(Goal::AtLeast(0.8)),
    ));
    lines.push(bench.add_ratio_vs(
        "nbdcopy vs fio O_DIRECT read",
        group,
        "fio, O_DIRECT 1 MiB qd 32",
        None,
    ));
    bench.notes.push(format!(
        "export: a read-only export of the data disk's point (the replica file, written in \
         full; nothing preserved), read by `nbdcopy nbd://… null:` with its defaults (multi-conn \
         is advertised: 4 connections, 64 requests in flight, 256 KiB requests); the server \
         handles one request at a time per connection and reads with buffered pread. fio: \
         buffered 256 KiB psync reads of the same file (the kernel's readahead, like the \
         export's reads). Both start with the file's page cache dropped \
         (POSIX_FADV_DONTNEED). The O_DIRECT row (one run, 1 MiB at qd 32) is the device's \
         limit, in the second ratio (no goal). CPU of the nbdcopy rows is nbdcopy's (the \
         client); the appliance's (the server) is appliance_cpu_s. The {group} wall time \
         includes nbdcopy's start and handshake"
    ));
    Ok(bench)
}

/// 4 KiB random reads: fio's nbd engine on a read-only export vs fio on the replica.
pub(super) fn rand_read(ctx: &DataCtx<'_>, lines: &mut Vec<String>) -> Result<Bench> {
    let bytes = ctx.item.size_bytes;
    let runtime = ctx.plan.rand_runtime_s;
    let title = format!(
        "export: 4 KiB random read, {RAND_JOBS} × qd {RAND_DEPTH}, {} MiB disk",
        bytes >> 20
    );
    let mut bench = Bench::new("export", &title);
    super::common_params(&mut bench, ctx.bin);
    bench.param("disk_bytes", bytes);
    bench.param("runtime_s", runtime);
    let (export_id, uri) = read_only_export(ctx.appliance, ctx.item)?;
    let common_of = |jobs: usize, depth: usize| -> Vec<String> {
        vec![
            "--rw=randread".into(),
            "--bs=4k".into(),
            format!("--iodepth={depth}"),
            format!("--numjobs={jobs}"),
            "--group_reporting".into(),
            "--time_based".into(),
            format!("--runtime={runtime}"),
            "--randrepeat=0".into(),
        ]
    };
    let common = || common_of(RAND_JOBS, RAND_DEPTH);
    let file_job = |direct: bool| {
        let mut args = vec![
            format!("--filename={}", ctx.file.display()),
            "--ioengine=io_uring".into(),
            format!("--direct={}", u8::from(direct)),
            format!("--size={bytes}"),
        ];
        args.extend(common());
        FioJob {
            name: "export-rand-read-file".into(),
            args,
        }
    };
    let mut nbd_args = vec!["--ioengine=nbd".to_owned(), format!("--uri={uri}")];
    nbd_args.extend(common());
    let nbd_job = FioJob {
        name: "export-rand-read-nbd".into(),
        args: nbd_args,
    };
    let group = "export, fio nbd engine";
    let fio_run = |n: usize| -> Result<Row> {
        drop_page_cache(ctx.file)?;
        progress!("[{title}] fio #{n}");
        Ok(fio_row("fio", ctx.fio, &file_job(false), true)?.run(n))
    };
    bench.rows.push(fio_run(1)?);
    for run in 1..=ctx.plan.repeats {
        drop_page_cache(ctx.file)?;
        progress!("[{title}] {group} #{run}");
        let server_before = appliance_cpu_s(ctx.appliance);
        let mut row = fio_row(group, ctx.fio, &nbd_job, true)?.run(run);
        let server_cpu = appliance_cpu_s(ctx.appliance) - server_before;
        row.side = Side::Engine;
        row = row.with_extra("appliance_cpu_s", server_cpu);
        if let Some(command) = row.extra.get_mut("command") {
            *command = command
                .as_str()
                .unwrap_or("")
                .replace(&uri, "nbd://ADDR/NAME")
                .into();
        }
        bench.rows.push(row);
        bench.rows.push(fio_run(run + 1)?);
    }
    drop_page_cache(ctx.file)?;
    progress!("[{title}] fio, O_DIRECT (the device's limit)");
    bench
        .rows
        .push(fio_row("fio, O_DIRECT", ctx.fio, &file_job(true), true)?);
    // The same 32 reads in flight over more connections (the server's handshakes per peer
    // address are limited to 8 at once): does the server scale with connections, i.e. is its
    // one request at a time per connection the limit?
    drop_page_cache(ctx.file)?;
    let wide_jobs = WIDE_JOBS;
    let wide_depth = RAND_JOBS * RAND_DEPTH / WIDE_JOBS;
    let wide_label =
        format!("diag: export, fio nbd engine, {wide_jobs} connections × qd {wide_depth}");
    progress!("[{title}] {wide_label}");
    let mut wide_args = vec!["--ioengine=nbd".to_owned(), format!("--uri={uri}")];
    wide_args.extend(common_of(wide_jobs, wide_depth));
    let wide = FioJob {
        name: "export-rand-read-nbd-wide".into(),
        args: wide_args,
    };
    match fio_row(&wide_label, ctx.fio, &wide, true) {
        Ok(mut row) => {
            row.side = Side::Diag;
            row.extra.remove("command");
            bench.rows.push(row);
        }
        Err(e) => bench
            .notes
            .push(format!("the {wide_label} run failed: {e:#}").replace(&uri, "nbd://ADDR/NAME")),
    }
    drop_page_cache(ctx.file)?;
    ctx.appliance.client().remove_export(&export_id)?;
    lines.push(bench.add_ratio_vs(
        "fio nbd vs fio on the file",
        group,
        "fio",
        Some(Goal::AtLeast(0.7)),
    ));
    lines.push(bench.add_ratio_vs("fio nbd vs fio O_DIRECT", group, "fio, O_DIRECT", None));
    bench.notes.push(format!(
        "export: fio's nbd engine (libnbd) on a read-only export of the data disk's point, \
         {RAND_JOBS} jobs = {RAND_JOBS} NBD connections, qd {RAND_DEPTH} each; the server \
         answers one request at a time per connection (so at most {RAND_JOBS} reads are in \
         the kernel at once) with buffered pread. fio: io_uring on the replica file, \
         {RAND_JOBS} jobs × qd {RAND_DEPTH}, buffered (direct=0: the same page-cache path; \
         cache misses are handed to io_uring's workers). Every run starts with the file's \
         page cache dropped and runs {runtime} s (time based, so the cache warms alike). The \
         O_DIRECT row (one run) is the device's limit, in the second ratio (no goal); fio's \
         latency is per read as the client sees it (loopback TCP and the server's queue \
         included). appliance_cpu_s: the server's CPU during the run (/proc/PID/stat)"
    ));
    Ok(bench)
}

/// Drill write: nbdcopy of a file into a fresh drill vs fio writing a fresh file.
pub(super) fn drill_write(ctx: &DataCtx<'_>, lines: &mut Vec<String>) -> Result<Bench> {
    let bytes = ctx.plan.write_bytes.min(ctx.item.size_bytes);
    let title = format!("export: drill write, {} MiB", bytes >> 20);
    let mut bench = Bench::new("export", &title);
    super::common_params(&mut bench, ctx.bin);
    bench.param("bytes", bytes);
    let source = ctx.scratch.join("export-write-source.img");
    {
        let file = std::fs::File::create(&source)
            .with_context(|| format!("creating {}", source.display()))?;
        let mut rng = crate::workload::Rng::new(0xd211);
        let mut buf = vec![0u8; 4 << 20];
        let mut offset = 0u64;
        while offset < bytes {
            let n = (bytes - offset).min(buf.len() as u64) as usize;
            rng.fill(&mut buf[..n]);
            std::os::unix::fs::FileExt::write_all_at(&file, &buf[..n], offset)?;
            offset += n as u64;
        }
        file.sync_all()?;
    }
    let fio_file = ctx.scratch.join("export-write-fio.img");
    let job = FioJob {
        name: "export-drill-write".into(),
        args: vec![
            format!("--filename={}", fio_file.display()),
            "--ioengine=psync".into(),
            "--direct=0".into(),
            "--rw=write".into(),
            "--bs=256k".into(),
            format!("--size={bytes}"),
            "--end_fsync=1".into(),
        ],
    };
    let group = "export, nbdcopy --flush into a drill";
    let fio_run = |n: usize| -> Result<Row> {
        let _ = std::fs::remove_file(&fio_file);
        sync_all();
        progress!("[{title}] fio #{n}");
        let row = fio_row("fio", ctx.fio, &job, false)?.run(n);
        let _ = std::fs::remove_file(&fio_file);
        Ok(row)
    };
    bench.rows.push(fio_run(1)?);
    for run in 1..=ctx.plan.repeats {
        start_test_failover(ctx.appliance, ctx.item, DiskMode::Export, None)?;
        let uri = test_failover_uri(ctx.appliance, &ctx.item.id)?;
        sync_all();
        progress!("[{title}] {group} #{run}");
        let server_before = appliance_cpu_s(ctx.appliance);
        let (elapsed_s, cpu, command) = run_tool(
            Command::new(ctx.nbdcopy)
                .arg("--flush")
                .arg(&source)
                .arg(&uri),
        )?;
        let server_cpu = appliance_cpu_s(ctx.appliance) - server_before;
        let written = ctx
            .appliance
            .client()
            .item(&ctx.item.id)?
            .test_failover
            .and_then(|t| t.export_id)
            .map(|id| ctx.appliance.client().export_view(&id))
            .transpose()?
            .and_then(|e| e.disks.first().map(|d| d.written_bytes))
            .unwrap_or(0);
        ctx.appliance.client().test_failover_cleanup(&ctx.item.id)?;
        bench.rows.push(
            Row::engine(group, bytes, bytes / (256 << 10), elapsed_s)
                .with_cpu(cpu)
                .with_extra("command", command.replace(&uri, "nbd://ADDR/NAME"))
                .with_extra("export_written_bytes", written)
                .with_extra("appliance_cpu_s", server_cpu)
                .run(run),
        );
        bench.rows.push(fio_run(run + 1)?);
    }
    let _ = std::fs::remove_file(&source);
    lines.push(bench.add_ratio_vs("nbdcopy into a drill vs fio write", group, "fio", None));
    bench.notes.push(
        "export: each run a fresh test-failover drill (POST test-failover {mode: export}; \
         not timed) of the data disk, then `nbdcopy --flush SOURCE nbd://…` (4 connections, \
         256 KiB writes; the source is in the page cache; --flush ends with NBD_CMD_FLUSH: \
         the overlay's data and map synced); the drill keeps every write in its overlay on \
         the appliance's filesystem. fio: buffered 256 KiB psync writes of a fresh file on \
         the same filesystem, --end_fsync=1. Both start after sync(2). No goal"
            .into(),
    );
    Ok(bench)
}
