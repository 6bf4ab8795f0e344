//! [`TimedEngine`]: an [`IoEngine`] decorator that times every op from `submit` to the `reap`
//! that returns it, so the engine's rows get a per-write latency comparable to fio's clat
//! (fio, too, stamps an I/O at submission and completes it when it reaps the event).
//!
//! ```text
//!  Applier ──submit(op, tag)──► TimedEngine ──► inner engine (io_uring)
//!              started[tag] = (now, kind, bytes)
//!  Applier ◄──reap(out)──────── TimedEngine ◄── inner engine
//!              for each completion: histogram[kind].observe(now − started[tag]);
//!                                   a write's bytes into its 100 ms interval (throughput plot)
//! ```
//!
//! The histograms live behind an `Arc<Mutex<…>>` because the `Applier` owns its engine and
//! gives no way back to it; the benchmark keeps the other handle. Cost per op: two clock reads,
//! one hash-map insert and remove, and an uncontended lock (tens of ns).

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use engine::io::{Completion, FileId, IoEngine, IoOp, Rejected};

use crate::histogram::LatencyHistogram;
use crate::series::IntervalBytes;

/// Per-kind latency histograms of the ops a [`TimedEngine`] saw complete.
#[derive(Debug, Default)]
pub struct OpLatencies {
    /// Writes (and write-zeroes).
    pub writes: LatencyHistogram,
    /// Reads (the preserve path reads old content).
    pub reads: LatencyHistogram,
    /// Flushes (fdatasync of a replica).
    pub flushes: LatencyHistogram,
    /// Bytes of completed writes per 100 ms since this value was made.
    pub written: IntervalBytes,
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Write,
    Read,
    Flush,
}

/// Times every op of `inner`. See the module docs.
#[derive(Debug)]
pub struct TimedEngine<E> {
    inner: E,
    started: HashMap<u64, (Instant, Kind, u64)>,
    latencies: Arc<Mutex<OpLatencies>>,
}

impl<E: IoEngine> TimedEngine<E> {
    /// Wraps `inner`; the returned handle reads the histograms.
    pub fn new(inner: E) -> (Self, Arc<Mutex<OpLatencies>>) {
        let latencies = Arc::new(Mutex::new(OpLatencies::default()));
        let engine = Self {
            started: HashMap::with_capacity(inner.queue_depth() * 2),
            inner,
            latencies: latencies.clone(),
        };
        (engine, latencies)
    }
}

impl<E: IoEngine> IoEngine for TimedEngine<E> {
    type File = E::File;

    fn backend_name(&self) -> &'static str {
        self.inner.backend_name()
    }

    fn add_file(&mut self, file: Self::File) -> io::Result<FileId> {
        self.inner.add_file(file)
    }

    fn alignment_bytes(&self, file: FileId) -> Option<u32> {
        self.inner.alignment_bytes(file)
    }

    fn queue_depth(&self) -> usize {
        self.inner.queue_depth()
    }

    fn submit(&mut self, op: IoOp, tag: u64) -> Result<(), Rejected> {
        let (kind, bytes) = match &op {
            IoOp::Write { buf, .. } => (Kind::Write, buf.len_bytes() as u64),
            IoOp::WriteZeroes { len_bytes, .. } => (Kind::Write, *len_bytes),
            IoOp::Read { buf, .. } => (Kind::Read, buf.len_bytes() as u64),
            IoOp::Flush { .. } => (Kind::Flush, 0),
        };
        let now = Instant::now();
        self.inner.submit(op, tag)?;
        self.started.insert(tag, (now, kind, bytes));
        Ok(())
    }

    fn kick(&mut self) -> io::Result<usize> {
        self.inner.kick()
    }

    fn reap(&mut self, out: &mut Vec<Completion>, min_count: usize) -> io::Result<usize> {
        let from = out.len();
        let n = self.inner.reap(out, min_count)?;
        let now = Instant::now();
        let mut latencies = self
            .latencies
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for completion in &out[from..] {
            if let Some((at, kind, bytes)) = self.started.remove(&completion.tag) {
                if matches!(kind, Kind::Write) && completion.result.is_ok() {
                    latencies.written.add(now, bytes);
                }
                let histogram = match kind {
                    Kind::Write => &mut latencies.writes,
                    Kind::Read => &mut latencies.reads,
                    Kind::Flush => &mut latencies.flushes,
                };
                histogram.observe(now.duration_since(at));
            }
        }
        Ok(n)
    }

    fn in_flight_count(&self) -> usize {
        self.inner.in_flight_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine::io::{
        BufPool, BufPoolConfig, SimDiskSet, SimEngine, SimEngineConfig, SimFileConfig,
    };

    #[test]
    fn times_each_op_by_kind() {
        let disks = SimDiskSet::new();
        disks
            .create_file(
                "d",
                SimFileConfig {
                    size_bytes: 1 << 20,
                    block_size_bytes: 4096,
                },
            )
            .unwrap();
        let sim = SimEngine::new(
            &disks,
            SimEngineConfig {
                queue_depth: 8,
                seed: 1,
                reorder: true,
            },
        )
        .unwrap();
        let (mut engine, latencies) = TimedEngine::new(sim);
        let file = engine.add_file("d".to_owned()).unwrap();
        let pool = BufPool::new(BufPoolConfig {
            buf_size_bytes: 4096,
            buf_count: 4,
            ..BufPoolConfig::default()
        })
        .unwrap();
        for tag in 0..3u64 {
            let buf = pool.take().unwrap();
            let op = IoOp::Write {
                file,
                offset_bytes: tag * 4096,
                buf,
            };
            engine.submit(op, tag).unwrap();
        }
        let buf = pool.take().unwrap();
        engine
            .submit(
                IoOp::Read {
                    file,
                    offset_bytes: 0,
                    buf,
                },
                10,
            )
            .unwrap();
        engine.submit(IoOp::Flush { file }, 11).unwrap();
        engine.kick().unwrap();
        let mut out = Vec::new();
        while engine.in_flight_count() > 0 {
            engine.reap(&mut out, 1).unwrap();
        }
        let l = latencies.lock().unwrap();
        assert_eq!(l.writes.count(), 3);
        assert_eq!(l.reads.count(), 1);
        assert_eq!(l.flushes.count(), 1);
        let written = l.written.finish(Instant::now());
        assert!(!written.samples.is_empty());
        assert!(engine.started.is_empty());
    }
}
