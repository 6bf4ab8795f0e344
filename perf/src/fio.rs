//! Running fio next to the engine, and reading its JSON output.
//!
//! ```text
//!  ensure_fio(): PATH / /usr/bin/fio ─► found
//!                        └─ missing ─► root? ─► scripts/install-tools.sh ─► found
//!                                        └─ not root ─► error naming the script
//!  Fio::run(job) ─► fio --name=… <job args> --output-format=json --percentile_list=50:90:99:99.9
//!                ─► parse_output(): jobs[0].write {io_bytes, bw_bytes, iops, clat_ns},
//!                                   jobs[0].sync.lat_ns (fdatasync), usr_cpu / sys_cpu
//! ```
//!
//! Only the figures the report needs are parsed; a field fio did not write (e.g. `sync` of a
//! job that never syncs) is `None`, a missing required field is an error naming it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;
use serde_json::Value;

use crate::cpu::{self, CpuTimes};
use crate::histogram::Percentiles;

/// Percentiles asked of fio (must match what [`Percentiles`] holds).
const PERCENTILE_LIST: &str = "50:90:99:99.9";

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

fn find() -> Option<Fio> {
    let in_path: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("fio")).collect())
        .unwrap_or_default();
    in_path
        .iter()
        .chain(std::iter::once(&PathBuf::from("/usr/bin/fio")))
        .filter(|p| p.is_file())
        .find_map(|p| probe(p))
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

/// Finds fio, installing it with `scripts/install-tools.sh` when it is missing and this
/// process runs as root.
pub fn ensure_fio() -> Result<Fio> {
    if let Some(fio) = find() {
        return Ok(fio);
    }
    let script = install_script();
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    let Some(script) = script else {
        bail!(
            "fio is not installed and scripts/install-tools.sh was not found; install fio \
             (Debian: apt-get install fio) and run again"
        );
    };
    if euid != 0 {
        bail!(
            "fio is not installed; installing it needs root: run `sudo {}` (or install the \
             Debian package fio), then run again",
            script.display()
        );
    }
    eprintln!("fio missing: running {}", script.display());
    let status = Command::new("bash")
        .arg(&script)
        .status()
        .with_context(|| format!("running {}", script.display()))?;
    if !status.success() {
        bail!(
            "{} failed ({status}); install fio by hand",
            script.display()
        );
    }
    find().ok_or_else(|| anyhow!("{} ran but fio is still not found", script.display()))
}

/// What fio measured for one job (the write direction).
#[derive(Debug, Clone, Serialize)]
pub struct FioResult {
    /// The command line, for the report.
    pub command: String,
    /// Bytes written.
    pub io_bytes: u64,
    /// Write operations.
    pub total_ios: u64,
    /// Job runtime, seconds.
    pub runtime_s: f64,
    /// Bandwidth, bytes per second.
    pub bw_bytes_per_s: f64,
    /// Write IOPS.
    pub iops: f64,
    /// Completion latency per write (clat), µs.
    pub clat: Percentiles,
    /// fdatasync latency, µs, when the job synced.
    pub sync: Option<Percentiles>,
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
        let mut cmd = Command::new(&self.path);
        cmd.arg(format!("--name={}", job.name))
            .args(&job.args)
            .arg("--output-format=json")
            .arg(format!("--percentile_list={PERCENTILE_LIST}"));
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

/// Reads fio's `{min, max, mean, N, percentile: {"50.000000": ns, …}}` block into µs.
fn latency_block(block: &Value) -> Result<Option<Percentiles>> {
    let count = number(block, &["N"])?;
    if count < 1.0 {
        return Ok(None);
    }
    let percentiles = field(block, &["percentile"])?
        .as_object()
        .ok_or_else(|| anyhow!("fio JSON percentile block is not an object"))?;
    let at = |q: f64| -> Result<f64> {
        percentiles
            .iter()
            .find(|(key, _)| key.parse::<f64>().is_ok_and(|k| (k - q).abs() < 1e-6))
            .and_then(|(_, v)| v.as_f64())
            .map(|ns| ns / 1000.0)
            .ok_or_else(|| anyhow!("fio JSON has no {q} percentile"))
    };
    Ok(Some(Percentiles {
        count: count as u64,
        mean_us: number(block, &["mean"])? / 1000.0,
        p50_us: at(50.0)?,
        p90_us: at(90.0)?,
        p99_us: at(99.0)?,
        p99_9_us: at(99.9)?,
        max_us: number(block, &["max"])? / 1000.0,
    }))
}

/// Parses fio's `--output-format=json` output (one job, write direction). Text fio prints
/// before the JSON object (warnings) is skipped.
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
    let write = field(job, &["write"])?;
    let runtime_s = number(job, &["job_runtime"])? / 1000.0;
    let cpu_share = |key: &str| -> Result<f64> { Ok(number(job, &[key])? / 100.0 * runtime_s) };
    let clat = latency_block(field(write, &["clat_ns"])?)?
        .ok_or_else(|| anyhow!("fio JSON has no write completion latencies"))?;
    let sync = match job.get("sync").and_then(|s| s.get("lat_ns")) {
        Some(block) => latency_block(block)?,
        None => None,
    };
    Ok(FioResult {
        command: String::new(),
        io_bytes: number(write, &["io_bytes"])? as u64,
        total_ios: number(write, &["total_ios"])? as u64,
        runtime_s: number(write, &["runtime"])? / 1000.0,
        bw_bytes_per_s: number(write, &["bw_bytes"])?,
        iops: number(write, &["iops"])?,
        clat,
        sync,
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

    #[test]
    fn parses_io_uring_randwrite() {
        let r = parse_output(RANDWRITE).unwrap();
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
    fn skips_text_before_the_json_and_reports_missing_fields() {
        let noisy = format!("fio: some warning\n{RANDWRITE}");
        assert!(parse_output(&noisy).is_ok());
        let err = parse_output("{\"jobs\": [{\"error\": 0}]}").unwrap_err();
        assert!(err.to_string().contains("write"), "{err}");
        assert!(parse_output("no json here").is_err());
    }
}
