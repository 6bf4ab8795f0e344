//! Diagnostic rows: the engine's apply path taken apart, so a table shows where the time of
//! the `engine` row goes, without a profiler.
//!
//! ```text
//!  engine row  =  [read frames from staging + checksum + copy into pool buffers]   (CPU)
//!              +  [submit QD writes ─ wait for ALL of them]                        (I/O)
//!                 … repeated per batch, the two phases never overlap
//!
//!  diag: frame read + copy      the CPU phase alone: StagingReader + PayloadDecoder into an
//!                               IoBuf, no replica I/O
//!  diag: io engine, batch wait  the I/O phase alone: the engine's IoEngine, QD writes from
//!                               pre-filled buffers, then wait for all, repeat
//!  diag: io engine, window      the IoEngine kept QD-deep (a new write as soon as one
//!                               completes), as fio does; per-write latency like fio's clat
//! ```
//!
//! If `window` ≈ fio, the I/O backend is not the gap; if `batch wait` ≈ the engine row minus
//! the CPU phase, the per-batch barrier and the serial CPU phase are.

use std::path::Path;
use std::time::Instant;

use anyhow::{Result, anyhow, bail};
use engine::delta::{FrameBody, PayloadDecoder};
use engine::io::{
    BufPool, BufPoolConfig, Completion, DirectIo, IoBuf, IoEngine, IoOp, ReplicaFile,
    open_os_engine,
};
use engine::staging::StagingReader;

use crate::cpu;
use crate::histogram::LatencyHistogram;
use crate::report::{Row, Side};
use crate::workload::Rng;

fn diag_row(label: &str, bytes: u64, ops: u64, elapsed_s: f64) -> Row {
    let mut row = Row::engine(label, bytes, ops, elapsed_s);
    row.side = Side::Diag;
    row
}

/// The CPU phase alone: reads every staged frame and copies (or decompresses) its payload
/// into a pool buffer, as `Applier::collect_batch` does, without writing anything.
pub fn frame_read_copy(mut reader: StagingReader, label: &str) -> Result<Row> {
    let pool = BufPool::new(BufPoolConfig {
        buf_size_bytes: 4 << 20,
        buf_count: 1,
        ..BufPoolConfig::default()
    })?;
    let Some(mut buf) = pool.take() else {
        bail!("a one-buffer pool gave no buffer");
    };
    let mut payloads = PayloadDecoder::new()?;
    let (mut frames, mut bytes) = (0u64, 0u64);
    let cpu_before = cpu::process()?;
    let started = Instant::now();
    while let Some(frame) = reader.next_frame()? {
        if let FrameBody::Write(extent) = frame.body {
            let len = extent.length_bytes as usize;
            buf.set_len_bytes(len);
            payloads
                .decode_into(&extent, buf.as_mut_slice())
                .map_err(|e| anyhow!("frame {}: {e}", frame.seq))?;
            frames += 1;
            bytes += len as u64;
        }
    }
    let elapsed_s = started.elapsed().as_secs_f64();
    let cpu = cpu::process()?.since(&cpu_before);
    Ok(diag_row(label, bytes, frames, elapsed_s).with_cpu(cpu))
}

/// How the I/O-only diagnostic keeps the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueMode {
    /// Submit up to QD writes, wait for all of them, repeat (the apply pipeline's shape).
    BatchWait,
    /// Keep QD writes in flight: a new one as soon as one completes (fio's shape).
    Window,
}

fn check(completions: &mut Vec<Completion>, free: &mut Vec<IoBuf>) -> Result<()> {
    for c in completions.drain(..) {
        if let Err(e) = &c.result {
            bail!("diagnostic write (tag {}) failed: {e}", c.tag);
        }
        if let Some(buf) = c.buf {
            free.push(buf);
        }
    }
    Ok(())
}

/// The I/O phase alone: the engine's `IoEngine` writing `offsets` with `block_bytes` writes at
/// `queue_depth`, from buffers of `buf_bytes` filled once, then one flush (as fio's
/// `--end_fsync=1`).
pub fn io_engine(
    replica: &Path,
    offsets: &[u64],
    block_bytes: usize,
    queue_depth: usize,
    buf_bytes: usize,
    mode: QueueMode,
    label: &str,
) -> Result<Row> {
    let setup_started = Instant::now();
    let pool = BufPool::new(BufPoolConfig {
        buf_size_bytes: buf_bytes,
        buf_count: queue_depth,
        ..BufPoolConfig::default()
    })?;
    // Pool mapping and ring setup with buffer registration (pins the pool's pages).
    let (mut engine, _) = open_os_engine(&pool, queue_depth)?;
    let setup_ms = setup_started.elapsed().as_secs_f64() * 1000.0;
    let file = engine.add_file(ReplicaFile::open(replica, DirectIo::Require)?)?;
    let mut rng = Rng::new(0xd1a9);
    let mut free: Vec<IoBuf> = Vec::with_capacity(queue_depth);
    while let Some(mut buf) = pool.take() {
        buf.set_len_bytes(block_bytes);
        rng.fill(buf.as_mut_slice());
        free.push(buf);
    }
    let mut submitted_at = vec![Instant::now(); offsets.len()];
    let mut lat = LatencyHistogram::new();
    let mut completions: Vec<Completion> = Vec::with_capacity(queue_depth);
    let mut next = 0usize;
    let cpu_before = cpu::process()?;
    let started = Instant::now();
    while next < offsets.len() || engine.in_flight_count() > 0 {
        let batch_start = Instant::now();
        while next < offsets.len() {
            let Some(buf) = free.pop() else { break };
            let op = IoOp::Write {
                file,
                offset_bytes: offsets[next],
                buf,
            };
            submitted_at[next] = Instant::now();
            engine
                .submit(op, next as u64)
                .map_err(|r| anyhow!("diagnostic submit: {}", r.reason))?;
            next += 1;
        }
        engine.kick()?;
        match mode {
            QueueMode::Window => {
                engine.reap(&mut completions, 1)?;
                for c in &completions {
                    if let Some(at) = submitted_at.get(c.tag as usize) {
                        lat.observe(at.elapsed());
                    }
                }
            }
            QueueMode::BatchWait => {
                while engine.in_flight_count() > 0 {
                    let n = engine.in_flight_count();
                    engine.reap(&mut completions, n)?;
                }
                lat.observe(batch_start.elapsed());
            }
        }
        check(&mut completions, &mut free)?;
    }
    engine
        .submit(IoOp::Flush { file }, u64::MAX)
        .map_err(|r| anyhow!("diagnostic flush: {}", r.reason))?;
    engine.kick()?;
    engine.reap(&mut completions, 1)?;
    check(&mut completions, &mut free)?;
    let elapsed_s = started.elapsed().as_secs_f64();
    let cpu = cpu::process()?.since(&cpu_before);
    drop(engine); // on this thread: the ring is bound to it
    let bytes = offsets.len() as u64 * block_bytes as u64;
    let kind = match mode {
        QueueMode::Window => "write (submit → reap)".to_owned(),
        QueueMode::BatchWait => format!("batch of ≤ {queue_depth} writes"),
    };
    Ok(diag_row(label, bytes, offsets.len() as u64, elapsed_s)
        .with_cpu(cpu)
        .with_histogram(kind, &lat)
        .with_extra("buf_bytes", buf_bytes as u64)
        .with_extra("pool_and_ring_setup_ms", setup_ms))
}
