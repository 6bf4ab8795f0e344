//! `staging-append`: durable append with acknowledgement through the engine's
//! [`StagingLog`], next to fio's buffered sequential write with `--fdatasync=N`.
//!
//! ```text
//!  not timed:  encode every 64 KiB write frame into memory; open a fresh StagingLog
//!  timed:      per batch of N frames:
//!                 t0 ─► append × N (copy into the batch) ─► commit() (pwrite, fdatasync)
//!                 ack latency = commit returned − t0          (one sample per commit)
//!              frames/s and MiB/s over the whole loop, getrusage delta
//!  fio:        --ioengine=psync --rw=write --bs=64k --fdatasync=N --fallocate=none on a
//!              fresh file; fio reports per-write clat and per-fdatasync latency, not a
//!              per-batch figure
//!  order:      fio #1, engine #1, fio #2, … (the ratio is median engine / median fio)
//! ```
//!
//! Both sides write a new file that grows as it is written (the staging log appends to
//! fresh segments; fio's file is removed before each run and not preallocated), so both pay
//! block allocation and a journal commit per flush.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::cpu;
use crate::fio::{Fio, FioJob};
use crate::histogram::LatencyHistogram;
use crate::machine::Scratch;
use crate::report::{Bench, Row};
use crate::series::IntervalBytes;
use crate::workload::{DataKind, FrameWriter, data_variants, item_header, open_staging};

/// Payload of every frame.
pub const FRAME_DATA_BYTES: usize = 64 << 10;

/// Frames encoded in memory: one buffer, and each frame's (seq, start, end) in it.
struct EncodedFrames {
    bytes: Vec<u8>,
    spans: Vec<(u64, usize, usize)>,
}

fn encode(frames: u64, disk_bytes: u64) -> Result<EncodedFrames> {
    let header = item_header("perf-staging", disk_bytes);
    let mut writer = FrameWriter::new(&header, None)?;
    let variants = data_variants(DataKind::Incompressible, FRAME_DATA_BYTES, 0x57a6);
    let mut block = vec![0u8; FRAME_DATA_BYTES];
    let mut out = EncodedFrames {
        bytes: Vec::with_capacity(frames as usize * (FRAME_DATA_BYTES + 48)),
        spans: Vec::with_capacity(frames as usize),
    };
    let mut sink = |seq: u64, wire: &[u8]| {
        let start = out.bytes.len();
        out.bytes.extend_from_slice(wire);
        out.spans.push((seq, start, out.bytes.len()));
        Ok(())
    };
    for i in 0..frames {
        block.copy_from_slice(&variants[i as usize % variants.len()]);
        block[..8].copy_from_slice(&i.to_le_bytes());
        writer.write(i * FRAME_DATA_BYTES as u64, &block, &mut sink)?;
    }
    Ok(out)
}

/// One timed engine run: a fresh staging log, `batch` frames per commit.
fn engine_run(dir: &Path, frames: &EncodedFrames, batch: usize, data_bytes: u64) -> Result<Row> {
    let header = item_header("perf-staging", data_bytes);
    let mut log = open_staging(dir, &header, frames.bytes.len() as u64)?;
    let mut acks = LatencyHistogram::new();
    let cpu_before = cpu::process()?;
    let mut series = IntervalBytes::starting_now();
    let started = Instant::now();
    for chunk in frames.spans.chunks(batch) {
        let t0 = Instant::now();
        for &(seq, start, end) in chunk {
            log.append(seq, &frames.bytes[start..end], t0)?;
        }
        log.commit()?;
        let acked = Instant::now();
        acks.observe(acked.duration_since(t0));
        series.add(acked, (chunk.len() * FRAME_DATA_BYTES) as u64);
    }
    let ended = Instant::now();
    let elapsed_s = ended.duration_since(started).as_secs_f64();
    let cpu = cpu::process()?.since(&cpu_before);
    drop(log);
    std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    Ok(
        Row::engine("engine", data_bytes, frames.spans.len() as u64, elapsed_s)
            .with_cpu(cpu)
            .with_histogram(
                format!("ack: first append → commit ({batch} frames)"),
                &acks,
            )
            .with_intervals(Some(series.finish(ended)))
            .with_extra("commits", acks.count())
            .with_extra("wire_bytes", frames.bytes.len() as u64),
    )
}

/// Runs staging-append for one batch size: `frames` frames of 64 KiB committed `batch` at a
/// time; fio #1, then `repeats` × (engine, fio).
pub fn staging_append(
    scratch: &Scratch,
    fio: &Fio,
    batch: usize,
    frames: u64,
    repeats: usize,
    lines: &mut Vec<String>,
) -> Result<Bench> {
    let frames = frames.div_ceil(batch as u64) * batch as u64;
    let title = format!("staging-append, {batch} × 64 KiB per commit");
    let mut bench = Bench::new("staging-append", &title);
    let data_bytes = frames * FRAME_DATA_BYTES as u64;
    bench.param("frame_data_bytes", FRAME_DATA_BYTES);
    bench.param("frames_per_commit", batch);
    bench.param("frames", frames);
    bench.param("bytes", data_bytes);

    let fio_file = scratch.join(&format!("fio-staging-b{batch}.dat"));
    let job = FioJob {
        name: format!("staging-b{batch}"),
        args: vec![
            format!("--filename={}", fio_file.display()),
            "--ioengine=psync".into(),
            "--rw=write".into(),
            format!("--bs={FRAME_DATA_BYTES}"),
            format!("--size={data_bytes}"),
            format!("--fdatasync={batch}"),
            "--fallocate=none".into(),
        ],
    };
    let run_fio = |run: usize| -> Result<Row> {
        remove_file(&fio_file)?;
        progress!("[{title}] fio #{run}");
        let result = fio.run(&job)?;
        remove_file(&fio_file)?;
        Ok(Row::fio("fio", &result).run(run))
    };

    progress!("[{title}] encoding {frames} frames");
    let encoded = encode(frames, data_bytes)?;
    bench.rows.push(run_fio(1)?);
    for run in 1..=repeats {
        progress!("[{title}] engine #{run}");
        let dir = scratch.join(&format!("staging-b{batch}-{run}"));
        bench
            .rows
            .push(engine_run(&dir, &encoded, batch, data_bytes)?.run(run));
        bench.rows.push(run_fio(run + 1)?);
    }
    drop(encoded);
    lines.push(bench.add_ratio("throughput", "engine", None));
    bench.notes.push(
        "the engine writes each batch with one pwrite of N frames (64 KiB + 48-byte header \
         each) then fdatasync; fio writes N 64 KiB pwrites then fdatasync. fio has no per-batch \
         figure: compare the engine's ack latency with fio's fdatasync latency plus N × its \
         write clat"
            .into(),
    );
    Ok(bench)
}

fn remove_file(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}
