//! Offline commands on a data directory: `ingest` a stream file (stage + apply, as the daemon
//! does for a live stream), list `points`, `materialize` a point.
//!
//! `ingest` runs the daemon's data path on two threads:
//!
//! ```text
//!  main thread:   file ─► engine::ingest (decode, stage, group commit) ─► "ack <seq>" on stdout
//!  apply thread:  staging reader ─► Applier (io_uring or pread/pwrite) ─► prune ─► watermark
//! ```
//!
//! It may be killed at any moment (the SIGKILL tests do exactly that); the next run recovers
//! the staging log, replays from the watermark and skips frames already staged.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use engine::apply::{Applier, ApplyConfig, Retention};
use engine::delta::DeltaDecoder;
use engine::durable::DurableDir;
use engine::ingest::{IngestConfig, IngestError, ingest_stream};
use engine::io::{BufPool, BufPoolConfig, DirectIo, IoEngine, ReplicaFile, open_os_engine};
use engine::materialize::{OutputFormat, PointChoice, Source, materialize_to_path, resolve_point};
use engine::meta::item_key;
use engine::replica::open_replica;
use engine::staging::{StagingConfig, StagingLog};

use crate::store::{DataDir, ItemDirs, item_hex};

/// Settings of `ingest`.
#[derive(Debug, Clone, Copy)]
pub struct IngestOptions {
    /// Recovery points kept.
    pub keep_points: usize,
    /// Staging capacity.
    pub cache_bytes: u64,
    /// Replica queue depth.
    pub queue_depth: usize,
}

/// What `ingest` did.
#[derive(Debug, Clone)]
pub struct IngestSummary {
    /// The item.
    pub item: String,
    /// Frames staged by this run.
    pub frames_staged: u64,
    /// Frames already staged before (a resumed run).
    pub frames_skipped: u64,
    /// The watermark at the end.
    pub applied_seq: u64,
    /// Points kept.
    pub points: usize,
    /// The I/O backend.
    pub backend: &'static str,
}

/// A failure that is the input's fault (exit status 2), not the machine's.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadInput(pub String);

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Opens (creating) the item's replica files, checking size and identity.
fn replicas(item: &ItemDirs, meta: &engine::meta::MetaStore) -> anyhow::Result<Vec<ReplicaFile>> {
    let key = item_key(&item.header.item_id);
    let mut files = Vec::new();
    for (index, disk) in item.header.disks.iter().enumerate() {
        let path = item.replica_path(index);
        if !path.exists() {
            let file =
                File::create(&path).with_context(|| format!("creating {}", path.display()))?;
            file.set_len(disk.size_bytes)?;
            file.sync_all()?;
        }
        files.push(open_replica(
            meta,
            key,
            index as u16,
            &path,
            *disk,
            DirectIo::Prefer,
        )?);
    }
    Ok(files)
}

/// Stages and applies a stream file; prints `ack <seq>` for every acknowledgement.
pub fn ingest(
    data_dir: &Path,
    stream: &Path,
    options: IngestOptions,
) -> anyhow::Result<IngestSummary> {
    let data = DataDir::open(data_dir)?;
    let open_stream =
        || File::open(stream).with_context(|| format!("opening {}", stream.display()));
    let header = DeltaDecoder::new(std::io::BufReader::new(open_stream()?))
        .map_err(|e| BadInput(format!("{}: {e}", stream.display())))?
        .header()
        .clone();
    let item = data.item_for(&header)?;
    let meta = data.meta()?;
    let files = replicas(&item, &meta)?;
    let mut staging_header = item.header.clone();
    staging_header.first_seq = header.first_seq;
    let (mut staging, recovery) = StagingLog::open(
        Arc::new(item.staging()?),
        staging_header,
        StagingConfig {
            capacity_bytes: options.cache_bytes,
            ..StagingConfig::default()
        },
    )?;
    if let Some(corruption) = &recovery.corruption {
        eprintln!("warning: staging damaged, item needs a resync: {corruption}");
    }
    let reader = staging.reader(header.first_seq);
    let applied = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let staged = Arc::new(AtomicU64::new(staging.durable_seq()));
    let key = item_key(&item.header.item_id);
    let disks = item.header.disks.clone();
    let preserve: Arc<dyn DurableDir> = Arc::new(item.preserve()?);
    let apply_thread = {
        let (applied, done, staged, meta) =
            (applied.clone(), done.clone(), staged.clone(), meta.clone());
        let keep = options.keep_points;
        let queue_depth = options.queue_depth;
        std::thread::Builder::new().name("apply".into()).spawn(
            move || -> anyhow::Result<(&'static str, u64)> {
                let pool = BufPool::new(BufPoolConfig {
                    buf_size_bytes: engine::delta::MAX_PAYLOAD_BYTES as usize,
                    buf_count: (2 * queue_depth).max(8),
                    ..BufPoolConfig::default()
                })?;
                let (mut io, choice) = open_os_engine(&pool, queue_depth)?;
                match &choice {
                    engine::io::BackendChoice::Uring => {
                        tracing::info!("replica I/O backend: io_uring (probe succeeded)")
                    }
                    engine::io::BackendChoice::SyncFile { reason } => tracing::warn!(
                        %reason,
                        "replica I/O backend: pread/pwrite (io_uring unavailable)"
                    ),
                }
                let ids = files
                    .into_iter()
                    .map(|f| io.add_file(f))
                    .collect::<std::io::Result<Vec<_>>>()?;
                let config = ApplyConfig {
                    batch_max_frames: queue_depth,
                    ..ApplyConfig::default()
                };
                let mut applier =
                    Applier::new(key, disks, config, io, ids, pool, meta, preserve, reader)?;
                let backend = applier.backend_name();
                let retention = Retention {
                    max_count: keep,
                    max_age_ns: u64::MAX,
                };
                loop {
                    let finished = done.load(Ordering::Acquire);
                    let progress = applier.apply_available()?;
                    applier.prune(retention, now_ns())?;
                    applied.store(applier.durable_seq(), Ordering::Release);
                    if finished && applier.applied_seq() >= staged.load(Ordering::Acquire) {
                        applier.mark_latest_point()?;
                        applier.prune(retention, now_ns())?;
                        applied.store(applier.durable_seq(), Ordering::Release);
                        return Ok((backend, applier.durable_seq()));
                    }
                    if progress.frames == 0 {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            },
        )?
    };
    let mut stdout = std::io::stdout().lock();
    let result = ingest_stream(
        std::io::BufReader::new(open_stream()?),
        &mut staging,
        IngestConfig::default(),
        &mut |seq, _pressure| {
            staged.store(seq, Ordering::Release);
            let _ = writeln!(stdout, "ack {seq}");
            let _ = stdout.flush();
        },
    );
    done.store(true, Ordering::Release);
    let joined = apply_thread
        .join()
        .map_err(|_| anyhow::anyhow!("the apply thread panicked"))?;
    let report = match result {
        Ok(report) => report,
        Err(IngestError::Decode(e)) => {
            return Err(BadInput(format!("{}: {e}", stream.display())).into());
        }
        Err(e) => return Err(e.into()),
    };
    let (backend, applied_seq) = joined?;
    staging.reclaim(applied_seq)?;
    Ok(IngestSummary {
        item: item_hex(&item.header.item_id),
        frames_staged: report.frames_staged,
        frames_skipped: report.frames_skipped,
        applied_seq,
        points: meta.points(key)?.len(),
        backend,
    })
}

/// Renders the items and their points.
pub fn points(data_dir: &Path, item: Option<&str>) -> anyhow::Result<String> {
    use std::fmt::Write as _;
    let data = DataDir::open(data_dir)?;
    let meta = data.meta()?;
    let items = match item {
        Some(hex) => vec![data.item(hex)?],
        None => data.items()?,
    };
    let mut out = String::new();
    for item in items {
        let key = item_key(&item.header.item_id);
        let (applied_seq, _) = meta.state(key)?;
        let _ = writeln!(
            out,
            "item {} ({}), {} disks, applied through seq {applied_seq}",
            item_hex(&item.header.item_id),
            item.header.item_name,
            item.header.disks.len()
        );
        let _ = writeln!(
            out,
            "  {:>12} {:<6} {:<8} {:>10}  label",
            "point", "kind", "origin", "bookmark"
        );
        for point in meta.points(key)? {
            let _ = writeln!(
                out,
                "  {:>12} {:<6} {:<8} {:>10}  {}",
                point.point_id,
                point.consistency.name(),
                format!("{:?}", point.origin).to_lowercase(),
                point.bookmark_id,
                point.label
            );
        }
    }
    Ok(out)
}

/// Parses a point choice: `latest-processed`, `latest-app`, or a point id.
pub fn parse_point(text: &str) -> anyhow::Result<PointChoice> {
    Ok(match text {
        "latest-processed" => PointChoice::LatestProcessed,
        "latest-app" | "latest-app-consistent" => PointChoice::LatestAppConsistent,
        "latest" => bail!(
            "\"latest\" needs a running appliance (it applies what is staged first); offline, \
             use latest-processed"
        ),
        id => PointChoice::Custom(id.parse().map_err(|_| {
            BadInput(format!(
                "point {id:?} is not latest-processed, latest-app or a point id"
            ))
        })?),
    })
}

/// Writes every disk of an item at a point into `out_dir` as `disk-<i>.raw` or `.vhd`;
/// returns the point id and the paths. Existing files are never overwritten.
pub fn materialize(
    data_dir: &Path,
    item: &str,
    choice: PointChoice,
    out_dir: &Path,
    format: OutputFormat,
) -> anyhow::Result<(u64, Vec<PathBuf>)> {
    let data = DataDir::open(data_dir)?;
    let item = data.item(item)?;
    let meta = data.meta()?;
    let key = item_key(&item.header.item_id);
    let point = resolve_point(&meta, key, choice).map_err(|e| BadInput(e.to_string()))?;
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let source = Source {
        meta: &meta,
        item: key,
        disks: &item.header.disks,
        preserve_dir: Arc::new(item.preserve()?),
        grain_bytes: ApplyConfig::default().grain_bytes,
        pins: engine::apply::Pins::default(),
    };
    let mut paths = Vec::new();
    for index in 0..item.header.disks.len() {
        let replica_path = item.replica_path(index);
        let replica = File::open(&replica_path)
            .with_context(|| format!("opening {}", replica_path.display()))?;
        let path = out_dir.join(format!("disk-{index}.{}", format.extension()));
        materialize_to_path(
            &source,
            point.point_id,
            index as u16,
            &replica,
            &path,
            format,
            &mut |_| {},
        )
        .with_context(|| format!("materializing disk {index} to {}", path.display()))?;
        paths.push(path);
    }
    Ok((point.point_id, paths))
}
