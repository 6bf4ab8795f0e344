//! Running fio next to the engine, and reading its JSON output.
//!
//! ```text
//!  ensure_fio(): PATH / /usr/bin/fio ─► found
//!                        └─ missing ─► root? ─► scripts/install-tools.sh ─► found
//!                                        └─ not root ─► error naming the script
//!  Fio::run(job) ─► fio --name=… <job args> --output-format=json --percentile_list=1:5:…:99.99
//!                      --write_bw_log=TMP/bw --log_avg_msec=100
//!                ─► parse_output(): jobs[0].{write or read} {io_bytes, bw_bytes, iops, clat_ns},
//!                                   jobs[0].sync.lat_ns (fdatasync), usr_cpu / sys_cpu
//!                ─► parse_bw_log(TMP/bw_bw.1.log): MiB/s per 100 ms window (throughput plot)
//! ```
//!
//! The direction is the one that moved bytes (write when both did). The percentiles asked
//! for are the report's four plus enough others (17 of fio's 20 allowed) to draw a latency
//! percentile curve next to the engine's.
//!
//! Only the figures the report needs are parsed; a field fio did not write (e.g. `sync` of a
//! job that never syncs) is `None`, a missing required field is an error naming it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;
use serde_json::Value;

use crate::cpu::{self, CpuTimes};
use crate::histogram::{Curve, Percentiles};
use crate::series::{INTERVAL, Intervals};

/// Percentiles asked of fio: those [`Percentiles`] holds, and more for the curve (fio takes
/// at most 20).
const PERCENTILE_LIST: &str = "1:5:10:20:30:40:50:60:70:80:90:95:99:99.5:99.9:99.95:99.99";

/// A usable fio binary.
#[derive(Debug, Clone)]
pub struct Fio {
    /// Path of the binary.
    pub path: PathBuf,
    /// `fio --version`.
    pub version: String,
}

fn probe(path: &Path) -> Option<Fio> {
    let out = Command::new(path).arg("--version").output().ok()?;
    out.status.success().then(|| Fio {
        path: path.to_path_buf(),
        version: String::from_utf8_lossy(&out.stdout).trim().to_owned(),
    })
}

/// `name` on `PATH`, else in /usr/bin.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let in_path: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join(name)).collect())
        .unwrap_or_default();
    in_path
        .into_iter()
        .chain(std::iter::once(Path::new("/usr/bin").join(name)))
        .find(|p| p.is_file())
}

fn find() -> Option<Fio> {
    find_program("fio").and_then(|p| probe(&p))
}

/// The repository's tool installer, if it can be found (next to this crate, or under the
/// current directory).
fn install_script() -> Option<PathBuf> {
    let candidates = [
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/install-tools.sh"),
        PathBuf::from("scripts/install-tools.sh"),
    ];
    candidates.into_iter().find(|p| p.is_file())
}

/// Runs `scripts/install-tools.sh` (which installs fio and qemu-img) when this process runs
/// as root; otherwise explains how to install `name` (Debian package `package`).
fn install(name: &str, package: &str) -> Result<()> {
    let script = install_script();
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    let Some(script) = script else {
        bail!(
            "{name} is not installed and scripts/install-tools.sh was not found; install {name} \
             (Debian: apt-get install {package}) and run again"
        );
    };
    if euid != 0 {
        bail!(
            "{name} is not installed; installing it needs root: run `sudo {}` (or install the \
             Debian package {package}), then run again",
            script.display()
        );
    }
    eprintln!("{name} missing: running {}", script.display());
    let status = Command::new("bash")
        .arg(&script)
        .status()
        .with_context(|| format!("running {}", script.display()))?;
    if !status.success() {
        bail!(
            "{} failed ({status}); install {name} by hand",
            script.display()
        );
    }
    Ok(())
}

/// Finds fio, installing it with `scripts/install-tools.sh` when it is missing and this
/// process runs as root.
pub fn ensure_fio() -> Result<Fio> {
    if let Some(fio) = find() {
        return Ok(fio);
    }
    install("fio", "fio")?;
    find().ok_or_else(|| anyhow!("the installer ran but fio is still not found"))
}

/// Finds another outside program (qemu-img), installing it like [`ensure_fio`].
pub fn ensure_program(name: &str, package: &str) -> Result<PathBuf> {
    if let Some(path) = find_program(name) {
        return Ok(path);
    }
    install(name, package)?;
    find_program(name).ok_or_else(|| anyhow!("the installer ran but {name} is still not found"))
}

/// What fio measured for one job (the direction that moved bytes).
#[derive(Debug, Clone, Serialize)]
pub struct FioResult {
    /// The command line, for the report.
    pub command: String,
    /// `read` or `write`.
    pub direction: &'static str,
    /// Bytes moved.
    pub io_bytes: u64,
    /// Operations.
    pub total_ios: u64,
    /// Job runtime, seconds.
    pub runtime_s: f64,
    /// Bandwidth, bytes per second.
    pub bw_bytes_per_s: f64,
    /// Write IOPS.
    pub iops: f64,
    /// Completion latency per I/O (clat), µs.
    pub clat: Percentiles,
    /// Every clat percentile fio reported: `(percentile, µs)`, ascending.
    pub clat_curve: Curve,
    /// fdatasync latency, µs, when the job synced.
    pub sync: Option<Percentiles>,
    /// Every fdatasync percentile fio reported.
    pub sync_curve: Curve,
    /// Bandwidth per 100 ms window, from fio's bandwidth log (`None` when fio wrote none,
    /// e.g. a run shorter than one window).
    pub intervals: Option<Intervals>,
    /// CPU of the job as fio reports it (usr/sys % of the job runtime).
    pub job_cpu: CpuTimes,
    /// CPU of the whole fio process (getrusage of the child), setup included.
    pub process_cpu: CpuTimes,
}

/// A fio job: its name and the options besides output format and percentiles.
#[derive(Debug, Clone)]
pub struct FioJob {
    /// `--name`.
    pub name: String,
    /// Every other option, e.g. `--rw=write`.
    pub args: Vec<String>,
}

impl Fio {
    /// Runs one job and parses its result.
    pub fn run(&self, job: &FioJob) -> Result<FioResult> {
        let logs = tempfile::tempdir().context("creating a directory for fio's bandwidth log")?;
        let log_prefix = logs.path().join("bw");
        let mut cmd = Command::new(&self.path);
        cmd.arg(format!("--name={}", job.name))
            .args(&job.args)
            .arg("--output-format=json")
            .arg(format!("--percentile_list={PERCENTILE_LIST}"))
            .arg(format!("--write_bw_log={}", log_prefix.display()))
            .arg(format!("--log_avg_msec={}", INTERVAL.as_millis()));
        let command = std::iter::once(self.path.display().to_string())
            .chain(cmd.get_args().map(|a| a.to_string_lossy().into_owned()))
            .collect::<Vec<_>>()
            .join(" ");
        let before = cpu::children()?;
        let out = cmd
            .output()
            .with_context(|| format!("starting {command}"))?;
        let after = cpu::children()?;
        if !out.status.success() {
            bail!(
                "{command} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let mut result =
            parse_output(&stdout).with_context(|| format!("parsing the output of {command}"))?;
        result.command = command;
        result.process_cpu = after.since(&before);
        let log = logs.path().join("bw_bw.1.log");
        result.intervals = std::fs::read_to_string(&log)
            .ok()
            .and_then(|text| parse_bw_log(&text, result.direction));
        Ok(result)
    }
}

fn field<'a>(value: &'a Value, path: &[&str]) -> Result<&'a Value> {
    let mut at = value;
    for key in path {
        at = at
            .get(key)
            .ok_or_else(|| anyhow!("fio JSON has no field {}", path.join(".")))?;
    }
    Ok(at)
}

fn number(value: &Value, path: &[&str]) -> Result<f64> {
    field(value, path)?
        .as_f64()
        .ok_or_else(|| anyhow!("fio JSON field {} is not a number", path.join(".")))
}

/// Reads fio's bandwidth log (`msec, KiB/s, direction, bs, offset[, prio]` per line, direction
/// 0 = read, 1 = write) into MiB/s samples of `direction`; `None` when it has none.
pub fn parse_bw_log(text: &str, direction: &str) -> Option<Intervals> {
    let want = if direction == "read" { 0 } else { 1 };
    let samples: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|line| {
            let mut cols = line.split(',').map(str::trim);
            let ms: f64 = cols.next()?.parse().ok()?;
            let kib_s: f64 = cols.next()?.parse().ok()?;
            let dir: u32 = cols.next()?.parse().ok()?;
            (dir == want).then_some((ms / 1000.0, kib_s / 1024.0))
        })
        .collect();
    (!samples.is_empty()).then(|| Intervals {
        interval_s: INTERVAL.as_secs_f64(),
        samples,
    })
}

/// Reads fio's `{min, max, mean, N, percentile: {"50.000000": ns, …}}` block into µs: the
/// report's percentiles and every percentile as a curve.
fn latency_block(block: &Value) -> Result<Option<(Percentiles, Curve)>> {
    let count = number(block, &["N"])?;
    if count < 1.0 {
        return Ok(None);
    }
    let percentiles = field(block, &["percentile"])?
        .as_object()
        .ok_or_else(|| anyhow!("fio JSON percentile block is not an object"))?;
    let mut curve: Curve = percentiles
        .iter()
        .filter_map(|(key, v)| Some((key.parse::<f64>().ok()?, v.as_f64()? / 1000.0)))
        .collect();
    curve.sort_by(|a, b| a.0.total_cmp(&b.0));
    let at = |q: f64| -> Result<f64> {
        percentiles
            .iter()
            .find(|(key, _)| key.parse::<f64>().is_ok_and(|k| (k - q).abs() < 1e-6))
            .and_then(|(_, v)| v.as_f64())
            .map(|ns| ns / 1000.0)
            .ok_or_else(|| anyhow!("fio JSON has no {q} percentile"))
    };
    let summary = Percentiles {
        count: count as u64,
        mean_us: number(block, &["mean"])? / 1000.0,
        p50_us: at(50.0)?,
        p90_us: at(90.0)?,
        p99_us: at(99.0)?,
        p99_9_us: at(99.9)?,
        max_us: number(block, &["max"])? / 1000.0,
    };
    Ok(Some((summary, curve)))
}

/// Parses fio's `--output-format=json` output (one job; the write direction, or the read
/// direction when only it moved bytes). Text fio prints before the JSON object (warnings) is
/// skipped.
pub fn parse_output(text: &str) -> Result<FioResult> {
    let start = text
        .find("{\n")
        .or_else(|| text.find('{'))
        .ok_or_else(|| anyhow!("no JSON object in fio's output"))?;
    let doc: Value = serde_json::from_str(&text[start..]).context("fio output is not JSON")?;
    let job = field(&doc, &["jobs"])?
        .get(0)
        .ok_or_else(|| anyhow!("fio JSON has no jobs"))?;
    let error = number(job, &["error"])?;
    if error != 0.0 {
        bail!("fio job reported error {error}");
    }
    let read_bytes = job
        .get("read")
        .and_then(|r| r.get("io_bytes"))
        .and_then(Value::as_f64)
        .unwrap_or(0.0);
    let write_bytes = job
        .get("write")
        .and_then(|w| w.get("io_bytes"))
        .and_then(Value::as_f64)
        .unwrap_or(0.0);
    let direction = if read_bytes > 0.0 && write_bytes <= 0.0 {
        "read"
    } else {
        "write"
    };
    let io = field(job, &[direction])?;
    let runtime_s = number(job, &["job_runtime"])? / 1000.0;
    let cpu_share = |key: &str| -> Result<f64> { Ok(number(job, &[key])? / 100.0 * runtime_s) };
    let (clat, clat_curve) = latency_block(field(io, &["clat_ns"])?)?
        .ok_or_else(|| anyhow!("fio JSON has no {direction} completion latencies"))?;
    let (sync, sync_curve) = match job.get("sync").and_then(|s| s.get("lat_ns")) {
        Some(block) => latency_block(block)?.unzip(),
        None => (None, None),
    };
    Ok(FioResult {
        command: String::new(),
        direction,
        io_bytes: number(io, &["io_bytes"])? as u64,
        total_ios: number(io, &["total_ios"])? as u64,
        runtime_s: number(io, &["runtime"])? / 1000.0,
        bw_bytes_per_s: number(io, &["bw_bytes"])?,
        iops: number(io, &["iops"])?,
        clat,
        clat_curve,
        sync,
        sync_curve: sync_curve.unwrap_or_default(),
        intervals: None,
        job_cpu: CpuTimes {
            user_s: cpu_share("usr_cpu")?,
            system_s: cpu_share("sys_cpu")?,
        },
        process_cpu: CpuTimes::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captured from `fio-3.33 --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k
    /// --iodepth=32 --io_size=4M --end_fsync=1` on the development machine.
    const RANDWRITE: &str = include_str!("../testdata/fio-randwrite-io_uring.json");
    /// Captured from `fio-3.33 --ioengine=psync --rw=write --bs=64k --size=4M --fdatasync=16`.
    const FDATASYNC: &str = include_str!("../testdata/fio-write-fdatasync.json");
    /// Captured from `fio-3.33 --ioengine=io_uring --direct=1 --rw=read --bs=1M --iodepth=1
    /// --size=8M` with this module's percentile list.
    const READ: &str = include_str!("../testdata/fio-read-io_uring.json");

    #[test]
    fn parses_io_uring_randwrite() {
        let r = parse_output(RANDWRITE).unwrap();
        assert_eq!(r.direction, "write");
        assert_eq!(r.clat_curve.len(), 4);
        assert!(r.clat_curve.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(r.io_bytes, 4 << 20);
        assert_eq!(r.total_ios, 1024);
        assert!((r.iops - 10039.215686).abs() < 1e-6);
        assert!((r.bw_bytes_per_s - 41120627.0).abs() < 1e-6);
        assert!((r.runtime_s - 0.102).abs() < 1e-9);
        assert!((r.clat.p50_us - 2408.448).abs() < 1e-6);
        assert!((r.clat.p99_9_us - 9240.576).abs() < 1e-6);
        assert_eq!(r.clat.count, 1024);
        // end_fsync is not counted in fio's sync block: no samples, no percentiles.
        assert!(r.sync.is_none());
        assert!((r.job_cpu.user_s - 0.02970297 * 0.101).abs() < 1e-6);
    }

    #[test]
    fn parses_sync_latencies() {
        let r = parse_output(FDATASYNC).unwrap();
        assert_eq!(r.io_bytes, 4 << 20);
        assert_eq!(r.total_ios, 64);
        let sync = r.sync.unwrap();
        assert_eq!(sync.count, 3);
        assert!((sync.p50_us - 7110.656).abs() < 1e-6, "{sync:?}");
        assert!((sync.p99_9_us - 13434.880).abs() < 1e-6, "{sync:?}");
        // fio's percentiles are bucket bounds: they may exceed the exact max.
        assert!((sync.max_us - 13373.444).abs() < 1e-6, "{sync:?}");
    }

    #[test]
    fn parses_a_read_job_and_the_bandwidth_log() {
        let r = parse_output(READ).unwrap();
        assert_eq!(r.direction, "read");
        assert_eq!(r.io_bytes, 8 << 20);
        assert_eq!(r.total_ios, 8);
        assert!((r.bw_bytes_per_s - 524288000.0).abs() < 1e-6);
        assert!((r.clat.p50_us - 946.176).abs() < 1e-6, "{:?}", r.clat);
        assert_eq!(r.clat_curve.len(), 17);
        assert!((r.clat_curve[0].0 - 1.0).abs() < 1e-9);
        assert!((r.clat_curve[16].0 - 99.99).abs() < 1e-9);
        let log = "102, 1244862, 1, 0, 0\n300, 1241212, 1, 0, 0\n400, 1024, 0, 0, 0\n";
        let w = parse_bw_log(log, "write").unwrap();
        assert_eq!(w.samples.len(), 2);
        assert!((w.samples[0].0 - 0.102).abs() < 1e-9);
        assert!((w.samples[1].1 - 1241212.0 / 1024.0).abs() < 1e-9);
        let r = parse_bw_log(log, "read").unwrap();
        assert_eq!(r.samples, vec![(0.4, 1.0)]);
        assert!(parse_bw_log("", "read").is_none());
    }

    #[test]
    fn skips_text_before_the_json_and_reports_missing_fields() {
        let noisy = format!("fio: some warning\n{RANDWRITE}");
        assert!(parse_output(&noisy).is_ok());
        let err = parse_output("{\"jobs\": [{\"error\": 0}]}").unwrap_err();
        assert!(err.to_string().contains("write"), "{err}");
        assert!(parse_output("no json here").is_err());
    }
}
