//! `perf run` end to end at tiny sizes (`--quick --tiny`: seconds, not a measurement).
//!
//! Asserts that the run succeeds and writes `results.json`, `report.md` and the plots it
//! links, that every benchmark is there, and that every ratio is a finite number. No figure is
//! asserted: the machine running the tests may be busy with anything. Skips (and says why)
//! when fio, qemu-img or nbdcopy is missing (`scripts/install-tools.sh` installs them).
//!
//! The `e2e` and `export` benchmarks start a real `appliance serve`: cargo does not build another
//! package's binary for this test, so the test runs `cargo build -p appliance` (a no-op when
//! it is up to date) into the perf binary's target directory and profile first, and passes
//! the binary as `APPLIANCE_BIN`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use serde_json::Value;

const BENCHMARKS: [&str; 8] = [
    "apply-seq-1m",
    "apply-rand-4k",
    "apply-rand-64k",
    "staging-append",
    "materialize",
    "resync",
    "e2e",
    "export",
];

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default()
        .into_iter()
        .chain(std::iter::once(Path::new("/usr/bin").join(name)))
        .find(|p| p.is_file())
}

/// Builds the `appliance` binary with the profile and into the target directory of the perf
/// binary under test; returns its path.
fn build_appliance() -> PathBuf {
    let perf = Path::new(env!("CARGO_BIN_EXE_perf"));
    let profile_dir = perf.parent().expect("the perf binary's directory");
    let target_dir = profile_dir.parent().expect("the target directory");
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .expect("profile directory name");
    let mut build = Command::new(env!("CARGO"));
    build
        .args(["build", "--quiet", "-p", "appliance", "--target-dir"])
        .arg(target_dir);
    match profile {
        "debug" => {}
        "release" => {
            build.arg("--release");
        }
        other => {
            build.args(["--profile", other]);
        }
    }
    let status = build
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("running cargo build -p appliance");
    assert!(
        status.success(),
        "cargo build -p appliance failed: {status}"
    );
    let bin = profile_dir.join("appliance");
    assert!(bin.is_file(), "{} was not built", bin.display());
    bin
}

fn finite(value: &Value, what: &str) -> f64 {
    let v = value
        .as_f64()
        .unwrap_or_else(|| panic!("{what} is not a number: {value}"));
    assert!(v.is_finite(), "{what} is not finite: {v}");
    v
}

#[test]
fn quick_run_writes_results_report_and_plots() {
    for tool in ["fio", "qemu-img", "nbdcopy"] {
        if on_path(tool).is_none() {
            eprintln!(
                "SKIP: {tool} is not installed (scripts/install-tools.sh installs fio, \
                 qemu-img and nbdcopy); perf run compares against it"
            );
            return;
        }
    }
    let appliance = build_appliance();
    let scratch = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("scratch dir");
    let out = scratch.path().join("out");
    let started = Instant::now();
    let run = Command::new(env!("CARGO_BIN_EXE_perf"))
        .args(["run", "--quick", "--tiny", "--out"])
        .arg(&out)
        .arg("--dir")
        .arg(scratch.path())
        .env("APPLIANCE_BIN", &appliance)
        .output()
        .expect("starting perf");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "perf run failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        run.status
    );
    eprintln!(
        "perf run --quick --tiny took {:.1} s:\n{stdout}",
        started.elapsed().as_secs_f64()
    );

    let json = std::fs::read_to_string(out.join("results.json")).expect("results.json");
    let report = std::fs::read_to_string(out.join("report.md")).expect("report.md");
    let results: Value = serde_json::from_str(&json).expect("results.json is JSON");
    assert_eq!(results["mode"], "tiny");
    let benches = results["benchmarks"].as_array().expect("benchmarks array");
    for name in BENCHMARKS {
        assert!(
            benches.iter().any(|b| b["name"] == name),
            "no {name} table in results.json"
        );
    }
    let mut ratios = 0;
    let mut plots = 0;
    for bench in benches {
        let title = bench["title"].as_str().unwrap_or("?");
        assert!(
            report.contains(&format!("## {title}")),
            "report.md lacks {title}"
        );
        for ratio in bench["ratios"].as_array().expect("ratios array") {
            let label = format!("{title}: {}", ratio["label"]);
            for field in ["value", "engine_value", "reference_value"] {
                finite(&ratio[field], &format!("{label} {field}"));
            }
            ratios += 1;
        }
        for plot in bench["plots"].as_array().expect("plots array") {
            let rel = plot.as_str().expect("plot path");
            let svg = std::fs::read_to_string(out.join(rel)).expect("plot file");
            assert!(svg.starts_with("<svg"), "{rel} is not an SVG");
            assert!(
                report.contains(&format!("]({rel})")),
                "report.md does not link {rel}"
            );
            plots += 1;
        }
    }
    assert!(ratios >= BENCHMARKS.len(), "only {ratios} ratios");
    // e2e: a table per disk count (1 and 2 disks in --tiny) with a row per churn step, each
    // with a lag distribution, and the summary with the memory ratio.
    let e2e: Vec<&Value> = benches.iter().filter(|b| b["name"] == "e2e").collect();
    assert_eq!(e2e.len(), 3, "e2e tables: {e2e:?}");
    for bench in &e2e[..2] {
        let rows = bench["rows"].as_array().expect("e2e rows");
        assert_eq!(rows.len(), 2, "two churn steps in --tiny");
        for row in rows {
            finite(&row["extra"]["achieved_mb_s"], "e2e achieved_mb_s");
            let lag = &row["latencies"][0]["percentiles"];
            assert!(
                lag["count"].as_u64().unwrap_or(0) > 0,
                "no lag samples: {row}"
            );
            finite(&lag["p99_us"], "e2e lag p99");
            assert_eq!(row["extra"]["lag_samples_dropped"], 0);
        }
    }
    assert!(
        report.contains("**Memory (benchmark 7).**") && report.contains("anchors.md"),
        "report.md lacks the e2e summary"
    );
    assert!(plots > 0, "no plots");
    // Every ratio line on stdout too.
    assert_eq!(
        stdout.lines().filter(|l| l.contains(" ratio ")).count(),
        ratios,
        "{stdout}"
    );
}
