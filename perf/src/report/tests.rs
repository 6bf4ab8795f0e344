//! The report's rows, ratios, goals and markdown on fixed inputs.

use super::*;

fn p(v: f64) -> Percentiles {
    Percentiles {
        count: 10,
        mean_us: v,
        p50_us: v,
        p90_us: v,
        p99_us: v,
        p99_9_us: v,
        max_us: v,
    }
}

#[test]
fn median_of_odd_even_and_empty() {
    assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
    assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), Some(2.5));
    assert_eq!(median(&mut []), None);
}

#[test]
fn ratio_is_median_engine_over_median_fio() {
    let mut bench = Bench::new("x", "x");
    let fio = |mib: u64, n| {
        let mut row = Row::engine("fio", mib << 20, mib, 1.0).run(n);
        row.side = Side::Fio;
        row
    };
    bench.rows = vec![
        fio(100, 1),
        Row::engine("ours", 180 << 20, 180, 1.0).run(1),
        fio(200, 2),
        Row::engine("ours", 170 << 20, 170, 1.0).run(2),
        fio(900, 3),
        Row::engine("other", 10 << 20, 10, 1.0),
    ];
    let line = bench.add_ratio("throughput", "ours", Some(0.8));
    assert!(
        (bench.ratios[0].value - 175.0 / 200.0).abs() < 1e-9,
        "{line}"
    );
    assert_eq!(bench.ratios[0].runs, (2, 3));
    assert_eq!(bench.ratios[0].goal_met, Some(true));
    let md = markdown(&Results {
        schema_version: SCHEMA_VERSION,
        mode: "quick".into(),
        started_unix_s: 0,
        duration_s: 1.0,
        machine: MachineInfo {
            git_revision: None,
            kernel: "k".into(),
            cpu_model: "c".into(),
            cpu_count: 2,
            memory_bytes: None,
            scratch_dir: "/s".into(),
            scratch_fs_type: "ext4".into(),
            scratch_fs_source: "/dev/x".into(),
            scratch_free_bytes: 0,
            fio_version: "fio".into(),
            io_backend: "uring".into(),
            loadavg_start: "0 0 0".into(),
            loadavg_end: "0 0 0".into(),
        },
        benchmarks: vec![{
            let mut b = bench.clone();
            b.rows[3] = b.rows[3].clone().with_latency("batch", p(12.0));
            b
        }],
    });
    assert!(
        md.contains("| ours #2 | 170.0 | 170 | batch | 12.0 |"),
        "{md}"
    );
    assert!(md.contains("**0.875**"), "{md}");
    assert!(md.contains("goal ≥ 0.80: **met**"), "{md}");
}

#[test]
fn ratios_against_tools_and_counts() {
    let mut bench = Bench::new("m", "m");
    bench.rows = vec![
        Row::tool("qemu-img", 100 << 20, 1, 1.0, CpuTimes::default()).run(1),
        Row::engine("ours", 150 << 20, 1, 1.0).run(1),
        Row::tool("qemu-img", 300 << 20, 1, 1.0, CpuTimes::default()).run(2),
        Row::tool("cp", 1000 << 20, 1, 1.0, CpuTimes::default()),
    ];
    bench.add_ratio_vs("vs qemu-img", "ours", "qemu-img", Some(Goal::AtLeast(1.0)));
    assert!((bench.ratios[0].value - 0.75).abs() < 1e-9);
    assert_eq!(bench.ratios[0].runs, (1, 2));
    assert_eq!(bench.ratios[0].goal_met, Some(false));
    let line = bench.add_value_ratio(
        "sent / differing",
        ("sent", 10.5),
        ("differing", 10.0),
        Some(Goal::AtMost(1.1)),
    );
    assert!(line.contains("met"), "{line}");
    assert_eq!(bench.ratios[1].goal_met, Some(true));
    bench.add_value_ratio("zero", ("a", 1.0), ("b", 0.0), None);
    assert_eq!(bench.ratios[2].value, 0.0);
}
