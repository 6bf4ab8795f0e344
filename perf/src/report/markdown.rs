//! The results as markdown: the machine, then one table per benchmark (the e2e ladder in its own shape), the ratios and the goals.

use super::*;

fn fmt_us(us: f64) -> String {
    if us >= 100.0 {
        format!("{us:.0}")
    } else {
        format!("{us:.1}")
    }
}

/// Renders the Markdown report: machine, then one table per benchmark.
pub fn markdown(results: &Results) -> String {
    let m = &results.machine;
    let mut out = String::new();
    let _ = writeln!(out, "# perf run ({})\n", results.mode);
    let _ = writeln!(out, "| | |\n|---|---|");
    let rows = [
        (
            "git revision",
            m.git_revision.clone().unwrap_or_else(|| "-".into()),
        ),
        ("kernel", m.kernel.clone()),
        ("CPU", format!("{} × {}", m.cpu_count, m.cpu_model)),
        (
            "memory",
            m.memory_bytes
                .map_or("-".into(), |b| format!("{:.1} GiB", b as f64 / GIB)),
        ),
        (
            "scratch",
            format!(
                "{} ({} on {})",
                m.scratch_dir, m.scratch_fs_type, m.scratch_fs_source
            ),
        ),
        ("fio", m.fio_version.clone()),
        ("engine I/O backend", m.io_backend.clone()),
        ("duration", format!("{:.1} s", results.duration_s)),
        (
            "load average (start → end)",
            format!("{} → {}", m.loadavg_start, m.loadavg_end),
        ),
    ];
    for (k, v) in rows {
        let _ = writeln!(out, "| {k} | {v} |");
    }
    for bench in &results.benchmarks {
        let _ = writeln!(out, "\n## {}\n", bench.title);
        let params: Vec<String> = bench
            .params
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => format!("{k}={s}"),
                other => format!("{k}={other}"),
            })
            .collect();
        let _ = writeln!(out, "{}\n", params.join(", "));
        let e2e = bench.name == "e2e";
        if !bench.rows.is_empty() {
            if e2e {
                e2e_table(&mut out, bench);
            } else {
                table(&mut out, bench);
            }
            out.push('\n');
        }
        for ratio in &bench.ratios {
            let goal = match (ratio.goal, ratio.goal_met) {
                (Some(g), Some(true)) => format!(" — goal {}: **met**", g.text()),
                (Some(g), _) => format!(" — goal {}: **missed**", g.text()),
                _ => " — no goal".into(),
            };
            let (ours, theirs) = if ratio.unit == "MiB/s" {
                (
                    format!(
                        "median `{}` {:.1} MiB/s ({} runs)",
                        ratio.engine_group, ratio.engine_value, ratio.runs.0
                    ),
                    format!(
                        "median `{}` {:.1} MiB/s ({} runs)",
                        ratio.reference_group, ratio.reference_value, ratio.runs.1
                    ),
                )
            } else {
                (
                    format!(
                        "{} {:.2} {}",
                        ratio.engine_group, ratio.engine_value, ratio.unit
                    ),
                    format!(
                        "{} {:.2} {}",
                        ratio.reference_group, ratio.reference_value, ratio.unit
                    ),
                )
            };
            let _ = writeln!(
                out,
                "- ratio {}: {ours} / {theirs} = **{:.3}**{goal}",
                ratio.label, ratio.value
            );
        }
        for row in bench.rows.iter().filter(|_| !e2e) {
            let extras: Vec<String> = row
                .extra
                .iter()
                .filter(|(k, _)| k.as_str() != "command")
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            if !extras.is_empty() {
                let _ = writeln!(out, "- {}: {}", row.label, extras.join(", "));
            }
        }
        for note in &bench.notes {
            let _ = writeln!(out, "- {note}");
        }
        for paragraph in &bench.prose {
            let _ = writeln!(out, "\n{paragraph}");
        }
        if !bench.plots.is_empty() {
            out.push('\n');
            for plot in &bench.plots {
                let name = plot.rsplit('/').next().unwrap_or(plot);
                let _ = writeln!(out, "- plot: [{name}]({plot})");
            }
        }
    }
    out
}

/// A figure of a row's extras, when it is a number.
fn extra_f64(row: &Row, key: &str) -> Option<f64> {
    row.extra.get(key).and_then(Value::as_f64)
}

/// Milliseconds from µs, with three significant digits or so.
fn fmt_ms(us: f64) -> String {
    let ms = us / 1000.0;
    if ms >= 100.0 {
        format!("{ms:.0}")
    } else if ms >= 10.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.2}")
    }
}

/// The table of an `e2e` benchmark: one row per churn step (see `crate::e2e_bench`).
fn e2e_table(out: &mut String, bench: &Bench) {
    let _ = writeln!(
        out,
        "| offered MB/s | achieved MB/s | achieved / offered | lag p50 ms | p90 ms | p99 ms \
         | p99.9 ms | max ms | frames | p99 < 1 s | API rpo_lag_ms p50 / max | staging peak MB \
         | drain s | applied s | appliance CPU s | agents CPU s |"
    );
    let _ = writeln!(
        out,
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"
    );
    let num = |row: &Row, key: &str, decimals: usize| {
        extra_f64(row, key).map_or_else(|| "-".into(), |v| format!("{v:.decimals$}"))
    };
    for row in &bench.rows {
        let lag = row.latencies.first().map(|l| l.percentiles);
        let lag_cols = match lag {
            Some(p) if p.count > 0 => format!(
                "{} | {} | {} | {} | {} | {}",
                fmt_ms(p.p50_us),
                fmt_ms(p.p90_us),
                fmt_ms(p.p99_us),
                fmt_ms(p.p99_9_us),
                fmt_ms(p.max_us),
                p.count
            ),
            _ => "- | - | - | - | - | 0".into(),
        };
        let under = match row.extra.get("lag_p99_under_1s").and_then(Value::as_bool) {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "-",
        };
        let api = match (
            extra_f64(row, "api_rpo_lag_ms_p50"),
            extra_f64(row, "api_rpo_lag_ms_max"),
        ) {
            (Some(p50), Some(max)) => format!("{p50:.0} / {max:.0}"),
            _ => "-".into(),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {lag_cols} | {under} | {api} | {} | {} | {} | {:.2} | {} |",
            num(row, "offered_mb_s", 1),
            num(row, "achieved_mb_s", 1),
            num(row, "achieved_share", 3),
            num(row, "staging_peak_mb", 1),
            num(row, "drain_s", 2),
            num(row, "apply_caught_up_s", 2),
            row.cpu.total_s(),
            num(row, "agents_cpu_s", 2),
        );
    }
}

/// The table of a benchmark's rows.
fn table(out: &mut String, bench: &Bench) {
    let _ = writeln!(
        out,
        "| row | MiB/s | ops/s | latency of | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs \
         | CPU s | CPU s/GiB |"
    );
    let _ = writeln!(
        out,
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"
    );
    for row in &bench.rows {
        let mut first = true;
        let lats: Vec<Option<&Latency>> = if row.latencies.is_empty() {
            vec![None]
        } else {
            row.latencies.iter().map(Some).collect()
        };
        for lat in lats {
            let (head, mib, ops, cpu, cpu_gib) = if first {
                (
                    row.label.clone(),
                    format!("{:.1}", row.throughput_mib_s),
                    format!("{:.0}", row.ops_per_s),
                    format!("{:.2}", row.cpu.total_s()),
                    format!("{:.2}", row.cpu_s_per_gib),
                )
            } else {
                Default::default()
            };
            first = false;
            let lat_cols = match lat {
                Some(l) => {
                    let p = &l.percentiles;
                    format!(
                        "{} | {} | {} | {} | {} | {}",
                        l.kind,
                        fmt_us(p.p50_us),
                        fmt_us(p.p90_us),
                        fmt_us(p.p99_us),
                        fmt_us(p.p99_9_us),
                        fmt_us(p.max_us)
                    )
                }
                None => "- | | | | | ".into(),
            };
            let _ = writeln!(
                out,
                "| {head} | {mib} | {ops} | {lat_cols} | {cpu} | {cpu_gib} |"
            );
        }
    }
}
