//! The first-byte table: `POST test-failover {mode: export}` → the first 4 KiB read over NBD,
//! per disk size, next to copy-mode test failover of the 1 GiB disks.

use std::path::Path;
use std::time::Instant;

use anyhow::{Result, bail};
use appliance_api::model::DiskMode;
use disk_sim::site::Appliance;

use super::nbd_client::NbdClient;
use super::{ExportPlan, Item, start_test_failover, test_failover_uri};
use crate::histogram::LatencyHistogram;
use crate::report::{Bench, Chart, ChartLine, Row};

/// One item's samples.
#[derive(Default)]
struct Samples {
    /// POST → first 4 KiB read.
    total: LatencyHistogram,
    /// POST answered.
    post: LatencyHistogram,
    /// GET item + GET export.
    lookup: LatencyHistogram,
    /// NBD connect + handshake + read.
    nbd: LatencyHistogram,
    total_s: f64,
}

/// One export-mode test failover: POST, URI, first read (checked), clean-up.
fn once(appliance: &Appliance, item: &Item, s: &mut Samples) -> Result<()> {
    let t0 = Instant::now();
    start_test_failover(appliance, item, DiskMode::Export, None)?;
    let t1 = Instant::now();
    let uri = test_failover_uri(appliance, &item.id)?;
    let t2 = Instant::now();
    let mut client = NbdClient::connect(&uri)?;
    let mut block = [0u8; 4096];
    client.read_at(0, &mut block)?;
    let t3 = Instant::now();
    if client.size_bytes() != item.size_bytes {
        bail!(
            "the export of {} says {} bytes, the disk has {}",
            item.label,
            client.size_bytes(),
            item.size_bytes
        );
    }
    if block[..] != item.first_block[..] {
        bail!(
            "the first 4 KiB read from the export of {} are not the point's",
            item.label
        );
    }
    client.disconnect()?;
    appliance.client().test_failover_cleanup(&item.id)?;
    s.total.observe(t3 - t0);
    s.post.observe(t1 - t0);
    s.lookup.observe(t2 - t1);
    s.nbd.observe(t3 - t2);
    s.total_s += (t3 - t0).as_secs_f64();
    Ok(())
}

/// One copy-mode test failover into `dir`: POST → job done (files durable); then clean-up.
fn copy_once(appliance: &Appliance, item: &Item, dir: &Path) -> Result<f64> {
    let t0 = Instant::now();
    start_test_failover(appliance, item, DiskMode::Copy, Some(dir))?;
    let elapsed_s = t0.elapsed().as_secs_f64();
    appliance.client().test_failover_cleanup(&item.id)?;
    Ok(elapsed_s)
}

fn ms(us: f64) -> f64 {
    us / 1e3
}

/// The table.
pub(super) fn first_byte(
    appliance: &Appliance,
    sparse: &[Item],
    data: &Item,
    copy_dir: &Path,
    plan: &ExportPlan,
    bin: &Path,
    lines: &mut Vec<String>,
) -> Result<Bench> {
    let title = "export: time to first byte by disk size";
    let mut bench = Bench::new("export", title);
    super::common_params(&mut bench, bin);
    bench.param("repeats", plan.first_byte_repeats as u64);
    bench.param("copy_repeats", plan.copy_repeats as u64);
    let items: Vec<&Item> = sparse.iter().chain(std::iter::once(data)).collect();
    let mut samples: Vec<Samples> = items.iter().map(|_| Samples::default()).collect();
    // Interleaved: every size in each repetition, so drift hits every size alike.
    for rep in 1..=plan.first_byte_repeats {
        progress!("[{title}] repetition {rep}");
        for (item, s) in items.iter().zip(samples.iter_mut()) {
            once(appliance, item, s)?;
        }
    }
    // Copy mode where copying is feasible: the 1 GiB disks (and the data disk).
    let mut copies: Vec<(&Item, LatencyHistogram, f64)> = Vec::new();
    for item in items.iter().filter(|i| i.size_bytes <= 1 << 30) {
        let mut h = LatencyHistogram::new();
        let mut total_s = 0.0;
        for rep in 1..=plan.copy_repeats {
            progress!("[{title}] copy mode, {} #{rep}", item.label);
            let dir = copy_dir.join(format!("{}-{rep}", item.id));
            let s = copy_once(appliance, item, &dir)?;
            h.observe(std::time::Duration::from_secs_f64(s));
            total_s += s;
        }
        copies.push((item, h, total_s));
    }

    let mut table = String::from(
        "| disk | written before the point | export mode: POST → first 4 KiB, p50 / min / max ms \
         | of which POST answered / URI looked up / NBD connect + read, p50 ms \
         | copy mode: POST → job done, p50 ms |\n|---|---:|---:|---:|---:|\n",
    );
    for (item, s) in items.iter().zip(&samples) {
        let n = s.total.count();
        let t = s.total.summary();
        let min_us = t
            .p50_us
            .min(s.total.curve().first().map_or(t.p50_us, |p| p.1));
        bench.rows.push(
            Row::engine(format!("export mode, {}", item.label), 0, n, s.total_s)
                .with_histogram("POST test-failover → first 4 KiB read", &s.total)
                .with_histogram("… POST answered", &s.post)
                .with_histogram("… GET item + GET export (URI)", &s.lookup)
                .with_histogram("… NBD connect + handshake + 4 KiB read", &s.nbd)
                .with_extra("disk_bytes", item.size_bytes)
                .with_extra("written_bytes", item.written_bytes),
        );
        let copy = copies
            .iter()
            .find(|(c, _, _)| c.id == item.id)
            .map_or("-".into(), |(_, h, _)| {
                format!("{:.1}", ms(h.summary().p50_us))
            });
        table.push_str(&format!(
            "| {} | {} MiB | {:.2} / {:.2} / {:.2} | {:.2} / {:.2} / {:.2} | {copy} |\n",
            item.label,
            item.written_bytes >> 20,
            ms(t.p50_us),
            ms(min_us),
            ms(t.max_us),
            ms(s.post.summary().p50_us),
            ms(s.lookup.summary().p50_us),
            ms(s.nbd.summary().p50_us),
        ));
    }
    for (item, h, total_s) in &copies {
        let n = h.count();
        bench.rows.push(
            Row::tool(
                format!("copy mode, {}", item.label),
                item.size_bytes * n,
                n,
                *total_s,
                crate::cpu::CpuTimes::default(),
            )
            .with_histogram("POST test-failover → job done", h)
            .with_extra("disk_bytes", item.size_bytes)
            .with_extra("written_bytes", item.written_bytes),
        );
    }
    bench.prose.push(table);

    // Ratios: export over copy for the 1 GiB disks; the largest sparse disk over the smallest.
    let p50_ms = |item: &Item| {
        items
            .iter()
            .position(|i| i.id == item.id)
            .map_or(0.0, |at| ms(samples[at].total.summary().p50_us))
    };
    for (item, h, _) in &copies {
        lines.push(bench.add_value_ratio_in(
            &format!("first byte, export / copy, {}", item.label),
            ("export p50", p50_ms(item)),
            ("copy p50", ms(h.summary().p50_us)),
            "ms",
            None,
        ));
    }
    if let (Some(small), Some(large)) = (sparse.first(), sparse.last())
        && sparse.len() > 1
    {
        lines.push(bench.add_value_ratio_in(
            &format!("first byte, {} / {}", large.label, small.label),
            ("largest p50", p50_ms(large)),
            ("smallest p50", p50_ms(small)),
            "ms",
            None,
        ));
    }

    // Chart: first byte against disk size (x: log2 of MiB), copy mode as single points.
    let x = |item: &Item| ((item.size_bytes >> 20).max(1) as f64).log2();
    let line = |label: &str, pick: fn(&crate::histogram::Percentiles) -> f64| ChartLine {
        label: label.into(),
        points: sparse
            .iter()
            .zip(&samples)
            .map(|(item, s)| (x(item), ms(pick(&s.total.summary()))))
            .collect(),
        reference: false,
    };
    let mut chart = Chart {
        name: "first byte vs disk size".into(),
        x_desc: "disk size, log2 MiB (10 = 1 GiB, 20 = 1 TiB)".into(),
        y_desc: "ms (log)".into(),
        log_y: true,
        lines: vec![
            line("export mode, sparse disk, p50", |p| p.p50_us),
            line("export mode, sparse disk, max", |p| p.max_us),
        ],
    };
    if let Some(s) = samples.last() {
        chart.lines.push(ChartLine {
            label: format!("export mode, {}, p50", data.label),
            points: vec![(x(data), ms(s.total.summary().p50_us))],
            reference: false,
        });
    }
    for (item, h, _) in &copies {
        chart.lines.push(ChartLine {
            label: format!("copy mode, {}, p50", item.label),
            points: vec![(x(item), ms(h.summary().p50_us))],
            reference: false,
        });
    }
    bench.charts.push(chart);
    bench.notes.push(
        "export mode: POST /v1/items/{id}/test-failover {point, mode: export} (answers a \
         finished job), GET the item (test_failover.export_id), GET /v1/exports/{id} (the \
         URI), then this program's own NBD client (no process start: connect, fixed newstyle \
         handshake with NBD_OPT_EXPORT_NAME, one 4 KiB NBD_CMD_READ at offset 0, checked \
         against the bytes the agent wrote); then POST test-failover/cleanup (not timed). \
         Repetitions interleave the sizes. MiB/s and ops/s of the export-mode rows mean \
         nothing: read the latency columns (µs) and the table below. copy mode: POST \
         test-failover {mode: copy, raw} → the job ended (files written and synced), polled \
         every 2 ms; its MiB/s is disk size / time (sparse: holes are not copied)"
            .into(),
    );
    Ok(bench)
}
