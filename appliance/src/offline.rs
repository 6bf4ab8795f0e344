//! Offline commands on a data directory: `ingest` a stream file (stage + apply, as the daemon
//! does for a live stream), list `points`, `materialize` a point.
//!
//! `ingest` runs the daemon's data path on two threads:
//!
//! ```text
//!  main thread:   file ─► engine::ingest (decode, stage, group commit) ─► "ack <seq>" on stdout
//!  apply thread:  crate::runtime::ApplyWorker (the same worker `serve` runs per item)
//! ```
//!
//! It may be killed at any moment (the SIGKILL tests do exactly that); the next run recovers
//! the staging log, replays from the watermark and skips frames already staged.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use engine::apply::ApplyConfig;
use engine::delta::DeltaDecoder;
use engine::error::report;
use engine::ingest::{IngestConfig, IngestError, ingest_stream};
use engine::io::{DirectIo, ReplicaFile};
use engine::materialize::{OutputFormat, PointChoice, Source, materialize_to_path, resolve_point};
use engine::meta::item_key;
use engine::replica::open_replica;
use engine::staging::{StagingConfig, StagingLog};

use crate::runtime::{ApplyOptions, ApplyWorker};
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

/// Opens (creating) the item's replica files, checking size and identity.
pub fn replicas(
    item: &ItemDirs,
    meta: &engine::meta::MetaStore,
) -> anyhow::Result<Vec<ReplicaFile>> {
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
    let worker = ApplyWorker::start(
        &item_hex(&item.header.item_id),
        crate::runtime::worker_setup(&item, files, reader, meta.clone(), Default::default())?,
        ApplyOptions {
            keep_points: options.keep_points,
            max_age_ns: u64::MAX,
            queue_depth: options.queue_depth,
        },
    )?;
    let mut stdout = std::io::stdout().lock();
    let result = ingest_stream(
        std::io::BufReader::new(open_stream()?),
        &mut staging,
        IngestConfig::default(),
        &mut |seq, _pressure| {
            let _ = writeln!(stdout, "ack {seq}");
            let _ = stdout.flush();
        },
    );
    let drained = worker.drain_and_stop(staging.durable_seq(), true);
    let report = match result {
        Ok(report) => report,
        Err(IngestError::Decode(e)) => {
            return Err(BadInput(format!("{}: {e}", stream.display())).into());
        }
        Err(e) => return Err(e.into()),
    };
    let drained = drained?;
    let (backend, applied_seq) = (drained.backend, drained.applied_seq);
    staging.reclaim(applied_seq)?;
    Ok(IngestSummary {
        item: item_hex(&item.header.item_id),
        frames_staged: report.frames_staged,
        frames_skipped: report.frames_skipped,
        applied_seq,
        points: meta.points(item_key(&item.header.item_id))?.len(),
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
    let point = resolve_point(&meta, key, choice).map_err(|e| BadInput(report(&e)))?;
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
