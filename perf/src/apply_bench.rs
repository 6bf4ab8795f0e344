//! Apply benchmarks: staged frames applied to a replica file by the engine's [`Applier`],
//! next to fio writing the same file with io_uring and `O_DIRECT`.
//!
//! ```text
//!  not timed:  encode frames (bookmark, then writes) ─► StagingLog (StdDir, fdatasync)
//!              Applier over: TimedEngine(io_uring engine, queue depth QD, pool 2·QD × 4 MiB),
//!                            ReplicaFile (O_DIRECT), MetaStore (redb), preserve dir;
//!                            everything else ApplyConfig::default()
//!              apply_batch() once: the bookmark ─► point 1, preservation armed (when on)
//!  timed:      apply_batch() until staging is drained
//!              ─► per write: submit → reaped (TimedEngine); per call: one sample;
//!                 bytes of completed writes per 100 ms (TimedEngine, throughput plot);
//!                 bytes / wall time; getrusage delta
//!  fio:        --ioengine=io_uring --direct=1 --rw=(rand)write --bs=BS --iodepth=QD
//!              --size=<replica> --io_size=<same bytes> --end_fsync=1
//!  order:      fio #1, engine #1, fio #2, engine #2, fio #3 (…): the ratio is the median
//!              engine run over the median fio run
//! ```
//!
//! Both sides overwrite the same replica file, which was written in full once before any
//! measurement (so no side pays unwritten-extent conversion) and has no page-cache pages.
//! Random offsets are a seeded permutation of the disk's blocks (each block at most once,
//! like fio's random map), so with preservation on, every write is the first overwrite of its
//! grains since the bookmark and every grain is preserved.
//!
//! The engine checkpoints (flushes the replica and commits redb) when an `apply_batch` call
//! ends with 256 MiB or more applied since the last one; fio syncs once at the end.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use engine::apply::{Applier, ApplyConfig, default_pool_config};
use engine::delta::StreamHeader;
use engine::durable::{DurableDir, StdDir};
use engine::io::{BackendChoice, BufPool, DirectIo, IoEngine, ReplicaFile, open_os_engine};
use engine::meta::{MetaStore, item_key};
use engine::staging::StagingLog;

use crate::cpu;
use crate::diag::{self, QueueMode};
use crate::fio::{Fio, FioJob};
use crate::histogram::LatencyHistogram;
use crate::machine::Scratch;
use crate::report::{Bench, Row};
use crate::series::Intervals;
use crate::timed::{OpLatencies, TimedEngine};
use crate::workload::{
    DataKind, FrameWriter, Offsets, Stager, data_variants, item_header, offsets, open_staging,
};

/// Frames per staging commit while filling staging (not timed).
const STAGE_COMMIT_FRAMES: usize = 64;

/// What every apply benchmark shares.
#[derive(Debug)]
pub struct ApplyCtx<'a> {
    /// Scratch directory.
    pub scratch: &'a Scratch,
    /// fio.
    pub fio: &'a Fio,
    /// The replica file both sides overwrite.
    pub replica: PathBuf,
    /// Its size.
    pub disk_bytes: u64,
    /// The engine backend seen (set by the first engine run).
    pub backend: Option<BackendChoice>,
}

/// A stream staged once and applied any number of times (each apply has its own metadata
/// store, so it starts from the first frame).
#[derive(Debug)]
struct Staged {
    log: StagingLog,
    header: StreamHeader,
    writes: u64,
    data_bytes: u64,
    stored_payload_bytes: u64,
    stage_s: f64,
}

fn stage(
    dir: &Path,
    header: &StreamHeader,
    block_bytes: usize,
    offsets: &[u64],
    data: DataKind,
    zstd_level: Option<i32>,
) -> Result<Staged> {
    let started = Instant::now();
    let estimate = offsets.len() as u64 * (block_bytes as u64 + 64);
    let mut log = open_staging(&dir.join("staging"), header, estimate)?;
    let variants = data_variants(data, block_bytes, 0xda7a);
    let mut writer = FrameWriter::new(header, zstd_level)?;
    let mut block = vec![0u8; block_bytes];
    {
        let mut stager = Stager::new(&mut log, STAGE_COMMIT_FRAMES);
        let mut sink = |seq: u64, bytes: &[u8]| stager.append(seq, bytes);
        writer.bookmark(1, &mut sink)?;
        for (i, &offset) in offsets.iter().enumerate() {
            block.copy_from_slice(&variants[i % variants.len()]);
            block[..8].copy_from_slice(&(i as u64).to_le_bytes());
            writer.write(offset, &block, &mut sink)?;
        }
        stager.finish()?;
    }
    Ok(Staged {
        log,
        header: header.clone(),
        writes: offsets.len() as u64,
        data_bytes: offsets.len() as u64 * block_bytes as u64,
        stored_payload_bytes: writer.stored_payload_bytes,
        stage_s: started.elapsed().as_secs_f64(),
    })
}

/// What one timed apply measured.
#[derive(Debug)]
struct ApplyFigures {
    elapsed_s: f64,
    frames: u64,
    bytes: u64,
    batches: LatencyHistogram,
    cpu: cpu::CpuTimes,
    grains_preserved: u64,
    flushes: u64,
    backend: BackendChoice,
    /// Per-op latencies seen by the [`TimedEngine`] under the applier.
    ops: OpLatencies,
    /// Completed write bytes per 100 ms.
    intervals: Intervals,
}

fn lock(latencies: &Mutex<OpLatencies>) -> MutexGuard<'_, OpLatencies> {
    latencies.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Applies `staged` once to the replica with a fresh metadata store and preserve directory.
fn apply_once(
    ctx: &ApplyCtx<'_>,
    staged: &Staged,
    work: &Path,
    queue_depth: usize,
    preserve: bool,
) -> Result<ApplyFigures> {
    // The appliance's pool, so the figures are the appliance's.
    let pool = BufPool::new(engine::apply::default_pool_config(queue_depth))?;
    let (engine, backend) = open_os_engine(&pool, queue_depth)?;
    let (mut engine, op_latencies) = TimedEngine::new(engine);
    let file = ReplicaFile::open(&ctx.replica, DirectIo::Require)?;
    let file_id = engine.add_file(file)?;
    let meta_dir = StdDir::open(&work.join("meta"))?;
    let meta = Arc::new(MetaStore::open(meta_dir.open("meta.redb", true)?)?);
    let preserve_dir: Arc<dyn DurableDir> = Arc::new(StdDir::open(&work.join("preserve"))?);
    let header = &staged.header;
    let mut applier = Applier::new(
        item_key(&header.item_id),
        header.disks.clone(),
        ApplyConfig {
            preserve,
            ..ApplyConfig::default()
        },
        engine,
        vec![file_id],
        pool,
        meta,
        preserve_dir,
        staged.log.reader(header.first_seq),
    )?;
    // Not timed: the bookmark that opens the interval whose first overwrites are preserved.
    let first = applier.apply_batch()?;
    if first.point.is_none() || first.frames != 1 {
        bail!("the first apply batch should be the bookmark alone, got {first:?}");
    }
    let flushes_before = applier.stats().flushes;
    *lock(&op_latencies) = OpLatencies::default();
    let mut batches = LatencyHistogram::new();
    let (mut frames, mut bytes, mut grains) = (0u64, 0u64, 0u64);
    let cpu_before = cpu::process()?;
    let started = Instant::now();
    loop {
        let t = Instant::now();
        let progress = applier.apply_batch()?;
        if progress.frames == 0 {
            break;
        }
        batches.observe(t.elapsed());
        frames += progress.frames;
        bytes += progress.bytes;
        grains += progress.grains_preserved;
    }
    let ended = Instant::now();
    let elapsed_s = ended.duration_since(started).as_secs_f64();
    let cpu = cpu::process()?.since(&cpu_before);
    if frames != staged.writes || bytes != staged.data_bytes {
        bail!(
            "applied {frames} frames / {bytes} bytes, staged {} / {}",
            staged.writes,
            staged.data_bytes
        );
    }
    let flushes = applier.stats().flushes - flushes_before;
    drop(applier); // on this thread: the ring is bound to it
    let ops = std::mem::take(&mut *lock(&op_latencies));
    let intervals = ops.written.finish(ended);
    Ok(ApplyFigures {
        elapsed_s,
        frames,
        bytes,
        batches,
        cpu,
        grains_preserved: grains,
        flushes,
        backend,
        ops,
        intervals,
    })
}

fn engine_row(label: &str, f: &ApplyFigures) -> Row {
    let calls = f.batches.count().max(1);
    let mut row = Row::engine(label, f.bytes, f.frames, f.elapsed_s)
        .with_cpu(f.cpu)
        .with_histogram("write (submit → reaped)", &f.ops.writes)
        .with_histogram(
            format!(
                "apply_batch call (mean {:.0} frames)",
                f.frames as f64 / calls as f64
            ),
            &f.batches,
        )
        .with_intervals(Some(f.intervals.clone()));
    if f.ops.reads.count() > 0 {
        row = row.with_histogram("preserve read (submit → reaped)", &f.ops.reads);
    }
    if f.ops.flushes.count() > 0 {
        row = row.with_histogram("replica flush", &f.ops.flushes);
    }
    row.with_extra("apply_batch_calls", f.batches.count())
        .with_extra("replica_flushes", f.flushes)
        .with_extra("grains_preserved", f.grains_preserved)
}

fn fio_job(
    ctx: &ApplyCtx<'_>,
    name: &str,
    random: bool,
    bs: usize,
    qd: usize,
    io_bytes: u64,
) -> FioJob {
    FioJob {
        name: name.to_owned(),
        args: vec![
            format!("--filename={}", ctx.replica.display()),
            "--ioengine=io_uring".into(),
            "--direct=1".into(),
            format!("--rw={}", if random { "randwrite" } else { "write" }),
            format!("--bs={bs}"),
            format!("--iodepth={qd}"),
            format!("--size={}", ctx.disk_bytes),
            format!("--io_size={io_bytes}"),
            "--fallocate=none".into(),
            "--end_fsync=1".into(),
        ],
    }
}

fn remove_dir(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", dir.display())),
    }
}

fn note_backend(ctx: &mut ApplyCtx<'_>, f: &ApplyFigures) {
    if ctx.backend.is_none() {
        if let BackendChoice::SyncFile { reason } = &f.backend {
            eprintln!("warning: io_uring unavailable ({reason}); the engine uses pread/pwrite");
        }
        ctx.backend = Some(f.backend.clone());
    }
}

/// Runs fio, then `repeats` × (engine, fio), alternating on the same file so that drift
/// during the run hits both sides alike. Returns the rows in run order.
#[expect(
    clippy::too_many_arguments,
    reason = "one call site per benchmark; a struct would only rename them"
)]
fn interleaved(
    ctx: &mut ApplyCtx<'_>,
    title: &str,
    job: &FioJob,
    staged: &Staged,
    work: &Path,
    queue_depth: usize,
    group: &str,
    repeats: usize,
) -> Result<Vec<Row>> {
    let mut rows = Vec::with_capacity(2 * repeats + 1);
    progress!("[{title}] fio #1");
    rows.push(Row::fio("fio", &ctx.fio.run(job)?).run(1));
    for run in 1..=repeats {
        progress!("[{title}] {group} #{run}");
        let dir = work.join(format!("apply-{run}"));
        let ours = apply_once(ctx, staged, &dir, queue_depth, false)?;
        remove_dir(&dir)?;
        note_backend(ctx, &ours);
        rows.push(engine_row(group, &ours).run(run));
        progress!("[{title}] fio #{}", run + 1);
        rows.push(Row::fio("fio", &ctx.fio.run(job)?).run(run + 1));
    }
    Ok(rows)
}

/// `apply-seq-1m`: 1 MiB sequential writes over `io_bytes` of the replica, one table per
/// queue depth (the stream is staged once). With `zstd_row`, the last table gets a row
/// applying zstd-1 compressed frames of compressible data.
pub fn seq_1m(
    ctx: &mut ApplyCtx<'_>,
    queue_depths: &[usize],
    io_bytes: u64,
    repeats: usize,
    zstd_row: bool,
    lines: &mut Vec<String>,
) -> Result<Vec<Bench>> {
    const BS: usize = 1 << 20;
    let count = io_bytes / BS as u64;
    let offs = offsets(Offsets::Sequential, BS as u64, ctx.disk_bytes, count)?;
    let work = ctx.scratch.join("apply-seq-1m");
    progress!("[apply-seq-1m] staging {count} frames");
    let header = item_header("perf-seq", ctx.disk_bytes);
    let staged = stage(&work, &header, BS, &offs, DataKind::Incompressible, None)?;
    let mut benches = Vec::new();
    for (index, &queue_depth) in queue_depths.iter().enumerate() {
        let title = format!("apply-seq-1m, qd {queue_depth}");
        let mut bench = Bench::new("apply-seq-1m", &title);
        bench.param("block_bytes", BS);
        bench.param("queue_depth", queue_depth);
        bench.param("bytes", io_bytes);
        bench.param("replica_bytes", ctx.disk_bytes);
        bench.param("stage_s", staged.stage_s);
        let name = format!("seq1m-qd{queue_depth}");
        let job = fio_job(ctx, &name, false, BS, queue_depth, io_bytes);
        bench.rows = interleaved(
            ctx,
            &title,
            &job,
            &staged,
            &work,
            queue_depth,
            "engine",
            repeats,
        )?;
        lines.push(bench.add_ratio("throughput", "engine", Some(0.9)));
        if zstd_row && index + 1 == queue_depths.len() {
            zstd_rows(ctx, &mut bench, &header, &offs, queue_depth, lines)?;
        }
        progress!("[{title}] diagnostics");
        let diag = diagnostics(ctx, &staged, &offs, BS, queue_depth, &[BS])?;
        bench.rows.extend(diag);
        bench.notes.push(
            "engine write latency: submit → reaped, timed by a decorator around the engine's \
             IoEngine, comparable with fio's clat; an apply_batch call is one streaming run \
             (≤ stream_max_frames frames, default 1024) when nothing is preserved"
                .into(),
        );
        benches.push(bench);
    }
    drop(staged);
    remove_dir(&work)?;
    Ok(benches)
}

/// Adds the zstd-1 row to a sequential table.
fn zstd_rows(
    ctx: &mut ApplyCtx<'_>,
    bench: &mut Bench,
    header: &StreamHeader,
    offs: &[u64],
    queue_depth: usize,
    lines: &mut Vec<String>,
) -> Result<()> {
    const BS: usize = 1 << 20;
    let title = bench.title.clone();
    progress!(
        "[{title}] staging {} zstd-1 frames (compressible data)",
        offs.len()
    );
    let work = ctx.scratch.join("apply-seq-1m-zstd");
    let staged = stage(&work, header, BS, offs, DataKind::Compressible, Some(1))?;
    progress!("[{title}] engine, zstd level 1");
    let z = apply_once(ctx, &staged, &work.join("apply"), queue_depth, false)?;
    let stored = staged.stored_payload_bytes as f64 / staged.data_bytes as f64;
    drop(staged);
    remove_dir(&work)?;
    let group = "engine, zstd-1 frames";
    bench
        .rows
        .push(engine_row(group, &z).with_extra("stored_over_data", stored));
    lines.push(bench.add_ratio("throughput, zstd-1 frames", group, None));
    bench.notes.push(format!(
        "zstd row: compressible data stored at {:.0} % of its size; apply decompresses every \
         payload into the write buffer on the ring thread; no goal",
        stored * 100.0
    ));
    Ok(())
}

/// `apply-rand-{4k,64k}`: `count` random writes of `block_bytes` at `queue_depth`, with
/// preservation off (`repeats` runs interleaved with fio) and on (one run over the first
/// `on_count` of the same writes).
pub fn rand(
    ctx: &mut ApplyCtx<'_>,
    block_bytes: usize,
    count: u64,
    on_count: u64,
    queue_depth: usize,
    repeats: usize,
    lines: &mut Vec<String>,
) -> Result<Bench> {
    let name = format!("apply-rand-{}k", block_bytes / 1024);
    let title = format!("{name}, qd {queue_depth}");
    let mut bench = Bench::new(&name, &title);
    let io_bytes = count * block_bytes as u64;
    bench.param("block_bytes", block_bytes);
    bench.param("queue_depth", queue_depth);
    bench.param("writes", count);
    bench.param("bytes", io_bytes);
    bench.param("replica_bytes", ctx.disk_bytes);
    let seed = 0x5eed_0000 + block_bytes as u64;
    let offs = offsets(
        Offsets::Random { seed },
        block_bytes as u64,
        ctx.disk_bytes,
        count,
    )?;
    let job_name = format!("rand{}k-qd{queue_depth}", block_bytes / 1024);
    let job = fio_job(ctx, &job_name, true, block_bytes, queue_depth, io_bytes);
    let work = ctx.scratch.join(&name);

    progress!("[{title}] staging {count} frames");
    let header = item_header("perf-rand", ctx.disk_bytes);
    let data = DataKind::Incompressible;
    let staged = stage(&work, &header, block_bytes, &offs, data, None)?;
    bench.param("stage_s", staged.stage_s);

    let off = "engine, preserve off";
    bench.rows = interleaved(ctx, &title, &job, &staged, &work, queue_depth, off, repeats)?;
    let on_work = work.join("apply-on");
    let on = if on_count >= count {
        progress!("[{title}] engine, preserve on");
        apply_once(ctx, &staged, &on_work, queue_depth, true)?
    } else {
        // A shorter stream (the first writes of the same sequence): preservation is slow.
        progress!("[{title}] staging {on_count} frames; engine, preserve on");
        let on_offs = &offs[..on_count as usize];
        let short = stage(&on_work, &header, block_bytes, on_offs, data, None)?;
        apply_once(ctx, &short, &on_work, queue_depth, true)?
    };
    bench.param("preserve_on_writes", on_count.min(count));
    let preserved_bytes = dir_bytes(&on_work.join("preserve"));
    let on_group = "engine, preserve on";
    bench
        .rows
        .push(engine_row(on_group, &on).with_extra("preserve_file_bytes", preserved_bytes));
    lines.push(bench.add_ratio("throughput, preserve off", off, Some(0.8)));
    lines.push(bench.add_ratio("throughput, preserve on", on_group, None));
    progress!("[{title}] diagnostics");
    let buf_sizes = [default_pool_config(queue_depth).buf_size_bytes, block_bytes];
    let diag = diagnostics(ctx, &staged, &offs, block_bytes, queue_depth, &buf_sizes)?;
    bench.rows.extend(diag);
    bench.notes.push(format!(
        "preserve on: a bookmark precedes the writes, every write is the first overwrite of \
         its grains, so all {} grains of 4 KiB are preserved (read old content, append to the \
         preserve file, fdatasync, redb commit, before the batch's writes)",
        on.grains_preserved
    ));
    bench.notes.push(
        "engine write latency: submit → reaped (comparable with fio's clat); an apply_batch \
         call is one streaming run (≤ 1024 frames) with preservation off, one batch of \
         up to 1,024 frames per run with preservation on (one preserve flush and one index commit per run)"
            .into(),
    );
    drop(staged);
    remove_dir(&work)?;
    Ok(bench)
}

/// The diagnostic rows of a table (see [`crate::diag`]): the CPU phase alone, then the
/// I/O phase alone with a window (per buffer size in `buf_sizes`) and with batch waits.
fn diagnostics(
    ctx: &ApplyCtx<'_>,
    staged: &Staged,
    offs: &[u64],
    block_bytes: usize,
    queue_depth: usize,
    buf_sizes: &[usize],
) -> Result<Vec<Row>> {
    let mut rows = vec![diag::frame_read_copy(
        staged.log.reader(staged.header.first_seq),
        "diag: frame read + copy (no I/O)",
    )?];
    for &buf_bytes in buf_sizes {
        rows.push(diag::io_engine(
            &ctx.replica,
            offs,
            block_bytes,
            queue_depth,
            buf_bytes,
            QueueMode::Window,
            &format!("diag: io engine, window, {} KiB bufs", buf_bytes / 1024),
        )?);
    }
    rows.push(diag::io_engine(
        &ctx.replica,
        offs,
        block_bytes,
        queue_depth,
        default_pool_config(queue_depth)
            .buf_size_bytes
            .max(block_bytes),
        QueueMode::BatchWait,
        "diag: io engine, batch wait",
    )?);
    Ok(rows)
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}
