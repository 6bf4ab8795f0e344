//! `materialize`: a recovery point's disk written out by `engine::materialize` as a raw image
//! and as a fixed VHD, next to `qemu-img convert` (raw → fixed VHD) and `cp --sparse=always`
//! of a raw image of the same size (the replica itself: the latest state), in the same run.
//!
//! ```text
//!  not timed:  stream: 1 MiB writes over the whole disk, bookmark A,
//!                      64 KiB writes at distinct random offsets over 10 % of it, bookmark B
//!              ─► StagingLog ─► Applier (io_uring, O_DIRECT, preservation on) ─► replica
//!              point A: the replica + 10 % of its grains in the preserve store (tag A)
//!  timed:      engine, raw        materialize_to_path(A, Raw): per 1 MiB chunk read the
//!                                 replica, overlay preserved grains, write (holes for zeros);
//!                                 fsync, rename, fsync of the directory
//!              engine, fixed VHD  the same, then the 512-byte footer (and padding), fdatasync
//!              qemu-img           qemu-img convert -f raw -O vpc -o subformat=fixed replica out
//!                                 then fdatasync(out) (qemu-img's own default cache mode)
//!              cp                 cp --sparse=always replica out, then fdatasync(out)
//!  before each run: the replica's page-cache pages are dropped (every side reads the disk);
//!  the output is removed after each run
//!  order:      qemu-img #1, cp #1, raw #1, vhd #1, qemu-img #2, …, qemu-img #n+1, cp #n+1
//!  diag:       raw of point B (the latest: nothing preserved to overlay), once — what the
//!              overlay of point A costs is the difference to the `engine, raw` rows
//! ```
//!
//! Throughput is disk bytes over wall time for every side. The engine's CPU time is
//! `getrusage(RUSAGE_SELF)` around the call; a tool's is `RUSAGE_CHILDREN` around its process.
//! The engine rows also carry the latency of each 1 MiB chunk (between two progress calls:
//! read, overlay, write) and throughput per 100 ms from the same calls.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use engine::apply::{Applier, ApplyConfig};
use engine::durable::{DurableDir, StdDir};
use engine::io::{BufPool, BufPoolConfig, DirectIo, IoEngine, ReplicaFile, open_os_engine};
use engine::materialize::{CHUNK_BYTES, OutputFormat, Source, materialize_to_path};
use engine::meta::{MetaStore, item_key};

use crate::cpu;
use crate::histogram::LatencyHistogram;
use crate::machine::{Scratch, drop_page_cache};
use crate::report::{Bench, Goal, Row, Side};
use crate::series::IntervalBytes;
use crate::workload::{
    DataKind, FrameWriter, Offsets, Stager, data_variants, item_header, offsets, open_staging,
};

/// Share of the disk overwritten after point A (so preserved for it).
const OVERWRITE_PERCENT: u64 = 10;
/// Size of the overwrites.
const OVERWRITE_BYTES: usize = 64 << 10;
/// Size of the writes that fill the disk first.
const FILL_BYTES: usize = 1 << 20;
/// Queue depth of the applier that builds the replica.
const QUEUE_DEPTH: usize = 32;

/// The group names of the rows.
const RAW: &str = "engine, raw";
const VHD: &str = "engine, fixed VHD";
const QEMU: &str = "qemu-img";
const CP: &str = "cp";

/// Runs `materialize` on a disk of `disk_bytes`: `repeats` runs of each engine format,
/// `repeats + 1` of each tool, interleaved.
pub fn materialize(
    scratch: &Scratch,
    qemu_img: &Path,
    disk_bytes: u64,
    repeats: usize,
    lines: &mut Vec<String>,
) -> Result<Bench> {
    let title = format!("materialize, {} MiB disk", disk_bytes >> 20);
    let mut bench = Bench::new("materialize", &title);
    let work = scratch.join("materialize");
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let replica = work.join("replica.img");
    let header = item_header("perf-materialize", disk_bytes);
    let fills = disk_bytes / FILL_BYTES as u64;
    if fills == 0 || !disk_bytes.is_multiple_of(FILL_BYTES as u64) {
        bail!("the materialize disk must be a whole number of MiB, not {disk_bytes} bytes");
    }
    let overwrites = disk_bytes / OVERWRITE_BYTES as u64 * OVERWRITE_PERCENT / 100;
    let over_offsets = offsets(
        Offsets::Random { seed: 0x3a7e },
        OVERWRITE_BYTES as u64,
        disk_bytes,
        overwrites,
    )?;
    bench.param("disk_bytes", disk_bytes);
    bench.param("overwrite_bytes", overwrites * OVERWRITE_BYTES as u64);
    bench.param("grain_bytes", ApplyConfig::default().grain_bytes);
    bench.param("chunk_bytes", CHUNK_BYTES);

    // Not timed: build the replica and the point through the engine's own apply path.
    progress!("[{title}] staging and applying {fills} fills + {overwrites} overwrites");
    let setup = Instant::now();
    let staging_dir = work.join("staging");
    let mut log = open_staging(
        &staging_dir,
        &header,
        disk_bytes + overwrites * OVERWRITE_BYTES as u64,
    )?;
    {
        let mut writer = FrameWriter::new(&header, None)?;
        let mut stager = Stager::new(&mut log, 64);
        let mut sink = |seq: u64, bytes: &[u8]| stager.append(seq, bytes);
        let fill_data = data_variants(DataKind::Incompressible, FILL_BYTES, 0xf111);
        let mut block = vec![0u8; FILL_BYTES];
        for i in 0..fills {
            block.copy_from_slice(&fill_data[i as usize % fill_data.len()]);
            block[..8].copy_from_slice(&i.to_le_bytes());
            writer.write(i * FILL_BYTES as u64, &block, &mut sink)?;
        }
        writer.bookmark(1, &mut sink)?;
        let over_data = data_variants(DataKind::Incompressible, OVERWRITE_BYTES, 0x0fe2);
        let mut block = vec![0u8; OVERWRITE_BYTES];
        for (i, &offset) in over_offsets.iter().enumerate() {
            block.copy_from_slice(&over_data[i % over_data.len()]);
            block[..8].copy_from_slice(&(i as u64).to_le_bytes());
            writer.write(offset, &block, &mut sink)?;
        }
        writer.bookmark(2, &mut sink)?;
        stager.finish()?;
    }
    drop(ReplicaFile::create(
        &replica,
        disk_bytes,
        DirectIo::Require,
    )?);
    let pool = BufPool::new(BufPoolConfig {
        buf_size_bytes: 4 << 20,
        buf_count: 2 * QUEUE_DEPTH,
        ..BufPoolConfig::default()
    })?;
    let (mut engine, _) = open_os_engine(&pool, QUEUE_DEPTH)?;
    let file_id = engine.add_file(ReplicaFile::open(&replica, DirectIo::Require)?)?;
    let meta_dir = StdDir::open(&work.join("meta"))?;
    let meta = Arc::new(MetaStore::open(meta_dir.open("meta.redb", true)?)?);
    let preserve_dir: Arc<dyn DurableDir> = Arc::new(StdDir::open(&work.join("preserve"))?);
    let item = item_key(&header.item_id);
    let mut applier = Applier::new(
        item,
        header.disks.clone(),
        ApplyConfig::default(),
        engine,
        vec![file_id],
        pool,
        meta.clone(),
        preserve_dir.clone(),
        log.reader(header.first_seq),
    )?;
    let applied = applier.apply_available()?;
    let points = meta.points(item)?;
    let grain_bytes = ApplyConfig::default().grain_bytes;
    let expected_grains = overwrites * OVERWRITE_BYTES as u64 / u64::from(grain_bytes);
    if points.len() != 2 || applied.grains_preserved != expected_grains {
        bail!(
            "setup: expected 2 points and {expected_grains} preserved grains, got {} points and \
             {applied:?}",
            points.len()
        );
    }
    let point = points[0].point_id;
    let latest = points[1].point_id;
    bench.param("setup_s", setup.elapsed().as_secs_f64());
    bench.param("point_id", point);
    bench.param("grains_preserved_for_point", expected_grains);
    drop(log);
    remove_dir(&staging_dir)?;

    let source = Source {
        meta: &meta,
        item,
        disks: &header.disks,
        preserve_dir,
        grain_bytes,
        pins: applier.pins(),
    };
    // One engine run of `point`, which must overlay `grains` preserved grains.
    let run_point = |format: OutputFormat, group: &str, point: u64, grains: u64| -> Result<Row> {
        let out = work.join(format!("out-engine.{}", format.extension()));
        drop_page_cache(&replica)?;
        let input =
            File::open(&replica).with_context(|| format!("opening {}", replica.display()))?;
        let mut chunks = LatencyHistogram::new();
        let mut series = IntervalBytes::starting_now();
        let cpu_before = cpu::process()?;
        let started = Instant::now();
        let mut last = started;
        let stats = materialize_to_path(&source, point, 0, &input, &out, format, &mut |done| {
            let now = Instant::now();
            chunks.observe(now.duration_since(last));
            series.add_total(now, done);
            last = now;
        })?;
        let ended = Instant::now();
        let elapsed_s = ended.duration_since(started).as_secs_f64();
        let cpu = cpu::process()?.since(&cpu_before);
        if stats.grains_preserved != grains || stats.size_bytes != disk_bytes {
            bail!("{group}: expected {grains} preserved grains, got {stats:?}");
        }
        let out_bytes = file_len(&out)?;
        remove_file(&out)?;
        Ok(Row::engine(
            group,
            disk_bytes,
            disk_bytes / CHUNK_BYTES as u64,
            elapsed_s,
        )
        .with_cpu(cpu)
        .with_histogram("1 MiB chunk: read, overlay, write", &chunks)
        .with_intervals(Some(series.finish(ended)))
        .with_extra("bytes_written", stats.bytes_written)
        .with_extra("grains_preserved", stats.grains_preserved)
        .with_extra("output_bytes", out_bytes))
    };
    let run_ours = |format: OutputFormat, run: usize| -> Result<Row> {
        let group = if format == OutputFormat::Raw {
            RAW
        } else {
            VHD
        };
        progress!("[{title}] {group} #{run}");
        Ok(run_point(format, group, point, expected_grains)?.run(run))
    };
    let run_tool = |group: &str, run: usize| -> Result<Row> {
        progress!("[{title}] {group} #{run}");
        let (out, mut cmd) = if group == QEMU {
            let out = work.join("out-qemu.vhd");
            let mut cmd = Command::new(qemu_img);
            cmd.args(["convert", "-f", "raw", "-O", "vpc", "-o", "subformat=fixed"])
                .arg(&replica)
                .arg(&out);
            (out, cmd)
        } else {
            let out = work.join("out-cp.raw");
            let mut cmd = Command::new("cp");
            cmd.arg("--sparse=always").arg(&replica).arg(&out);
            (out, cmd)
        };
        drop_page_cache(&replica)?;
        timed_tool(group, &mut cmd, &out, disk_bytes).map(|row| row.run(run))
    };

    for run in 1..=repeats {
        bench.rows.push(run_tool(QEMU, run)?);
        bench.rows.push(run_tool(CP, run)?);
        bench.rows.push(run_ours(OutputFormat::Raw, run)?);
        bench.rows.push(run_ours(OutputFormat::FixedVhd, run)?);
    }
    bench.rows.push(run_tool(QEMU, repeats + 1)?);
    bench.rows.push(run_tool(CP, repeats + 1)?);
    let diag = "diag: engine, raw, latest point (nothing to overlay)";
    progress!("[{title}] {diag}");
    let mut row = run_point(OutputFormat::Raw, diag, latest, 0)?;
    row.side = Side::Diag;
    bench.rows.push(row);
    drop(source);
    drop(applier); // on this thread: the ring is bound to it
    drop(meta);
    remove_dir(&work)?;

    lines.push(bench.add_ratio_vs("fixed VHD vs qemu-img", VHD, QEMU, Some(Goal::AtLeast(1.0))));
    lines.push(bench.add_ratio_vs("raw vs cp", RAW, CP, None));
    bench.notes.push(format!(
        "the point materialized has {OVERWRITE_PERCENT} % of its disk ({expected_grains} \
         grains of {grain_bytes} bytes) in the preserve store, overlaid on the replica; the \
         disk holds random data, so no chunk is a hole and every side writes the whole disk"
    ));
    bench.notes.push(
        "every side starts with the input out of the page cache and ends with its output \
         durable (the engine fsyncs itself; a tool's output is fdatasynced after it exits, \
         inside the timed span); qemu-img and cp read the latest raw image, the engine reads \
         the same file plus the preserve store"
            .into(),
    );
    Ok(bench)
}

/// Runs a tool writing `out`, then fdatasyncs `out`; times both, and removes `out`.
fn timed_tool(group: &str, cmd: &mut Command, out: &Path, disk_bytes: u64) -> Result<Row> {
    let command = std::iter::once(cmd.get_program().to_string_lossy().into_owned())
        .chain(cmd.get_args().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ");
    let cpu_before = cpu::children()?;
    let started = Instant::now();
    let output = cmd
        .output()
        .with_context(|| format!("starting {command}"))?;
    let exited_s = started.elapsed().as_secs_f64();
    if !output.status.success() {
        bail!(
            "{command} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    File::open(out)
        .and_then(|f| f.sync_data())
        .with_context(|| format!("syncing {}", out.display()))?;
    let elapsed_s = started.elapsed().as_secs_f64();
    let cpu = cpu::children()?.since(&cpu_before);
    let out_bytes = file_len(out)?;
    remove_file(out)?;
    // ops: MiB of disk, so that ops/s reads like the engine rows' 1 MiB chunks per second.
    Ok(
        Row::tool(group, disk_bytes, disk_bytes >> 20, elapsed_s, cpu)
            .with_extra("command", command)
            .with_extra("exited_s", exited_s)
            .with_extra("output_bytes", out_bytes),
    )
}

fn file_len(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path)
        .with_context(|| format!("reading the size of {}", path.display()))?
        .len())
}

fn remove_file(path: &Path) -> Result<()> {
    std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))
}

fn remove_dir(dir: &PathBuf) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", dir.display())),
    }
}
