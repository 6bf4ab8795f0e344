//! The API's answers for people: aligned tables (comfy-table), `label  value` pairs, sizes
//! (bytesize), times (humantime) and durations. Pure functions of the model's types.

use std::fmt::Write as _;
use std::time::{Duration, UNIX_EPOCH};

use appliance_api::model::{
    ApplianceInfo, Enabled, ExportView, ItemView, JobView, Materialized, PointView, SlotsView,
};

/// Plain text columns: each column as wide as its widest cell, two spaces between columns,
/// no trailing blanks. Every row is cut or padded to the header's width.
pub fn render_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut table = comfy_table::Table::new();
    table.load_style(comfy_table::presets::NOTHING);
    table.set_header(headers.iter().copied());
    for row in rows {
        let mut cells: Vec<&str> = row.iter().map(String::as_str).take(headers.len()).collect();
        cells.resize(headers.len(), "");
        table.add_row(cells);
    }
    for column in table.column_iter_mut() {
        column.set_padding((0, 2));
    }
    let mut out = table.trim_fmt();
    out.push('\n');
    out
}

/// `label  value` lines with the values aligned.
pub fn render_pairs(pairs: &[(String, String)]) -> String {
    let width = pairs
        .iter()
        .map(|(l, _)| l.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for (label, value) in pairs {
        let pad = width - label.chars().count();
        let line = format!("{label}{}  {value}", " ".repeat(pad));
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// An optional value for people (`-` when absent).
fn opt(value: Option<impl ToString>) -> String {
    value.map_or_else(|| "-".into(), |v| v.to_string())
}

/// Bytes in binary units: `512 B`, `1.5 KiB`, `2.0 GiB`.
pub fn format_bytes(bytes: u64) -> String {
    bytesize::ByteSize::b(bytes).display().iec().to_string()
}

/// A duration in milliseconds for people: `850 ms`, `12.3 s`, `4 min 05 s`, `2 h 03 min`,
/// `3 d 04 h` (two units at most: an RPO lag or a job's time at a glance; humantime's
/// `format_duration` gives every unit down to nanoseconds).
pub fn format_millis(ms: u64) -> String {
    let secs = ms / 1000;
    if ms < 1000 {
        format!("{ms} ms")
    } else if secs < 60 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else if secs < 3600 {
        format!("{} min {:02} s", secs / 60, secs % 60)
    } else if secs < 86_400 {
        format!("{} h {:02} min", secs / 3600, secs % 3600 / 60)
    } else {
        format!("{} d {:02} h", secs / 86_400, secs % 86_400 / 3600)
    }
}

/// Nanoseconds since the Unix epoch as UTC: `2026-11-22 00:38:53Z` (`-` for 0).
pub fn format_time_ns(ns: u64) -> String {
    if ns == 0 {
        return "-".into();
    }
    let time = UNIX_EPOCH + Duration::from_nanos(ns);
    humantime::format_rfc3339_seconds(time)
        .to_string()
        .replacen('T', " ", 1)
}

/// `GET /v1/appliance` (+ `GET /v1/slots`, or why it could not be read) for people.
pub fn render_status(info: &ApplianceInfo, slots: Result<&SlotsView, &str>) -> String {
    let mut pairs: Vec<(String, String)> = [
        ("version", info.version.clone()),
        ("data directory", info.data_dir.clone()),
        ("data port", info.data_addr.clone()),
        ("control API", info.api_addr.clone()),
        ("items", info.items.to_string()),
    ]
    .into_iter()
    .map(|(label, value)| (label.to_owned(), value))
    .collect();
    pairs.push(("jobs running".into(), info.jobs_running.to_string()));
    // The slot counts the answer carries are in the summary line when it could be read.
    if slots.is_err() {
        pairs.push(("slot count".into(), info.slot_count.to_string()));
        pairs.push(("slots free".into(), info.slots_free.to_string()));
        pairs.push(("slots usable".into(), info.slots_usable.to_string()));
    }
    let slots = match slots {
        Ok(view) => slot_summary(view),
        Err(why) => format!("unavailable ({why})"),
    };
    pairs.push(("slots".into(), slots));
    render_pairs(&pairs)
}

/// `32 slots (31 usable): 20 free, 1 reserved, 10 attached`.
fn slot_summary(view: &SlotsView) -> String {
    format!(
        "{} slots ({} usable): {} free, {} reserved, {} attached",
        view.slot_count, view.usable, view.free, view.reserved, view.attached,
    )
}

/// `GET /v1/slots` for people: a summary line, then LUN/STATE/ITEM/DISK/PATH.
pub fn render_slots(view: &SlotsView) -> String {
    let rows: Vec<Vec<String>> = view
        .slots
        .iter()
        .map(|slot| {
            vec![
                slot.lun.to_string(),
                slot.state.to_string(),
                opt(slot.item.as_ref()),
                opt(slot.disk_index),
                opt(slot.path.as_ref()),
            ]
        })
        .collect();
    format!(
        "{}\n{}",
        slot_summary(view),
        render_table(&["LUN", "STATE", "ITEM", "DISK", "PATH"], &rows)
    )
}

fn cache_cell(item: &ItemView) -> String {
    let (used, capacity) = (item.cache_used_bytes, item.cache_capacity_bytes);
    if capacity > 0 {
        format!(
            "{}/{} ({}%)",
            format_bytes(used),
            format_bytes(capacity),
            used.saturating_mul(100) / capacity
        )
    } else {
        format_bytes(used)
    }
}

fn lag_cell(item: &ItemView) -> String {
    item.rpo_lag_ms.map_or_else(|| "-".into(), format_millis)
}

/// `GET /v1/items` for people: ID/NAME/STATE/SYNC%/RPO LAG/CACHE/POINTS/HEALTH.
pub fn render_items(items: &[ItemView]) -> String {
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|item| {
            vec![
                item.id.clone(),
                item.name.clone(),
                item.state.to_string(),
                format!("{}%", item.synchronized_percent),
                lag_cell(item),
                cache_cell(item),
                item.points.to_string(),
                item.health.clone(),
            ]
        })
        .collect();
    if rows.is_empty() {
        return "no items\n".into();
    }
    render_table(
        &[
            "ID", "NAME", "STATE", "SYNC%", "RPO LAG", "CACHE", "POINTS", "HEALTH",
        ],
        &rows,
    )
}

fn materialized(value: &Materialized) -> String {
    if let Some(export) = &value.export_id {
        let mut text = format!(
            "point {}, served over NBD (export {export})",
            value.point_id
        );
        for uri in &value.files {
            let _ = write!(text, "\n    {uri}");
        }
        return text;
    }
    let format = wire_name(value.format);
    let mut text = format!(
        "point {}, {format}, in {}",
        value.point_id, value.target_dir
    );
    for file in &value.files {
        let _ = write!(text, "\n    {file}");
    }
    text
}

/// `GET /v1/items/{id}` for people: every field, then the disks as a table.
pub fn render_item(item: &ItemView) -> String {
    let mut pairs: Vec<(String, String)> = Vec::new();
    let mut push = |label: &str, value: String| pairs.push((label.to_string(), value));
    push("item", item.id.clone());
    push("name", item.name.clone());
    push("state", item.state.to_string());
    let allowed: Vec<&str> = item.allowed_operations.iter().map(|op| op.name()).collect();
    push(
        "allowed operations",
        if allowed.is_empty() {
            "none".into()
        } else {
            allowed.join(", ")
        },
    );
    push("role", wire_name(item.role));
    if let Some(of) = &item.reverse_of {
        push("reverse of", of.clone());
    }
    if let Some(by) = &item.reversed_by {
        push("reversed by", by.clone());
    }
    push("health", item.health.clone());
    push("synchronized", format!("{}%", item.synchronized_percent));
    push("RPO lag", lag_cell(item));
    push("cache", cache_cell(item));
    push(
        "sequence",
        format!("applied {}, staged {}", item.applied_seq, item.staged_seq),
    );
    push(
        "points",
        format!(
            "{} (latest {}, latest app-consistent {})",
            item.points,
            opt(item.latest_point_id),
            opt(item.latest_app_point_id)
        ),
    );
    let policy = &item.policy;
    let age = match policy.keep_minutes {
        0 => "no age limit".to_string(),
        m => format!("at most {m} min old"),
    };
    let app = format!("app-consistent every {} min", policy.app_consistent_minutes);
    push(
        "policy",
        format!("keep {} points, {age}, {app}", policy.keep_points),
    );
    if let Some(disk) = &item.temporary_os_disk {
        push("temporary OS disk", disk.clone());
    }
    if let Some(job) = item.last_job {
        push("last job", job.to_string());
    }
    if let Some(error) = &item.last_error {
        push("last error", error.clone());
    }
    if let Some(test) = &item.test_failover {
        push("test failover", materialized(test));
    }
    if let Some(failover) = &item.failover {
        push("failover", materialized(failover));
    }
    let mut out = render_pairs(&pairs);
    let disks: Vec<Vec<String>> = item
        .disks
        .iter()
        .map(|disk| {
            vec![
                disk.index.to_string(),
                format_bytes(disk.size_bytes),
                disk.block_size_bytes.to_string(),
                opt(disk.lun),
                wire_name(disk.origin),
                disk.path.clone(),
            ]
        })
        .collect();
    if !disks.is_empty() {
        out.push('\n');
        out.push_str(&render_table(
            &["DISK", "SIZE", "BLOCK", "LUN", "ORIGIN", "PATH"],
            &disks,
        ));
    }
    out
}

/// `GET /v1/items/{id}/points` for people: ID/CONSISTENCY/ORIGIN/SOURCE TIME/LABEL.
pub fn render_points(points: &[PointView]) -> String {
    let rows: Vec<Vec<String>> = points
        .iter()
        .map(|point| {
            vec![
                point.id.to_string(),
                wire_name(point.consistency),
                wire_name(point.origin),
                format_time_ns(point.source_timestamp_ns),
                point.label.clone(),
            ]
        })
        .collect();
    if rows.is_empty() {
        return "no recovery points yet\n".into();
    }
    render_table(
        &["ID", "CONSISTENCY", "ORIGIN", "SOURCE TIME", "LABEL"],
        &rows,
    )
}

/// A unit enum's name as the API writes it.
fn wire_name(value: impl serde::Serialize) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// One job for people.
pub fn render_job(job: &JobView) -> String {
    let mut pairs = vec![
        ("job".to_string(), job.id.to_string()),
        ("kind".to_string(), job.kind.to_string()),
        ("item".to_string(), job.item.clone()),
        ("state".to_string(), job.state.to_string()),
        ("done".to_string(), format!("{}%", job.percent)),
        ("message".to_string(), job.message.clone()),
    ];
    if let Some(error) = &job.error {
        pairs.push(("error".into(), error.clone()));
    }
    pairs.push(("created".into(), format_time_ns(job.created_ns)));
    if let Some(finished) = job.finished_ns {
        pairs.push(("finished".into(), format_time_ns(finished)));
        if finished >= job.created_ns {
            pairs.push((
                "took".into(),
                format_millis((finished - job.created_ns) / 1_000_000),
            ));
        }
    }
    render_pairs(&pairs)
}

/// `GET /v1/jobs` for people: ID/KIND/ITEM/STATE/DONE/CREATED/MESSAGE (the error when failed).
pub fn render_jobs(jobs: &[JobView]) -> String {
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|job| {
            vec![
                job.id.to_string(),
                job.kind.to_string(),
                job.item.clone(),
                job.state.to_string(),
                format!("{}%", job.percent),
                format_time_ns(job.created_ns),
                job.error.clone().unwrap_or_else(|| job.message.clone()),
            ]
        })
        .collect();
    if rows.is_empty() {
        return "no jobs\n".into();
    }
    render_table(
        &["ID", "KIND", "ITEM", "STATE", "DONE", "CREATED", "MESSAGE"],
        &rows,
    )
}

/// An export for people: what it serves, then one NBD URI per disk.
pub fn render_export(export: &ExportView) -> String {
    let mut pairs = vec![
        ("export".to_owned(), export.id.clone()),
        ("item".to_owned(), export.item.clone()),
        ("purpose".to_owned(), wire_name(export.purpose)),
        ("mode".to_owned(), wire_name(export.mode)),
        ("point".to_owned(), export.point_id.to_string()),
        ("created".to_owned(), format_time_ns(export.created_ns)),
        ("connections".to_owned(), export.connections.to_string()),
    ];
    if let Some(copy) = export.copy {
        pairs.push(("copy".to_owned(), wire_name(copy)));
    }
    let mut text = render_pairs(&pairs);
    let rows: Vec<Vec<String>> = export
        .disks
        .iter()
        .map(|d| {
            vec![
                d.index.to_string(),
                format_bytes(d.size_bytes),
                format_bytes(d.written_bytes),
                d.uri.clone(),
            ]
        })
        .collect();
    text.push_str(&render_table(
        &["DISK", "SIZE", "WRITTEN", "NBD URI"],
        &rows,
    ));
    text
}

/// `GET /v1/exports` for people.
pub fn render_exports(exports: &[ExportView]) -> String {
    if exports.is_empty() {
        return "no exports\n".into();
    }
    let rows: Vec<Vec<String>> = exports
        .iter()
        .map(|e| {
            vec![
                e.id.clone(),
                e.item.clone(),
                wire_name(e.purpose),
                wire_name(e.mode),
                e.point_id.to_string(),
                e.disks.len().to_string(),
                e.connections.to_string(),
                e.copy.map(wire_name).unwrap_or_default(),
            ]
        })
        .collect();
    render_table(
        &[
            "ID", "ITEM", "PURPOSE", "MODE", "POINT", "DISKS", "CONNS", "COPY",
        ],
        &rows,
    )
}

/// An `Enabled` answer (enable, reprotect) for people: the item, its stream token (shown
/// once), and the job.
pub fn render_enabled(enabled: &Enabled) -> String {
    let (item, job) = (&enabled.item, &enabled.job);
    let pairs = vec![
        ("item".to_string(), item.id.clone()),
        ("name".to_string(), item.name.clone()),
        ("state".to_string(), item.state.to_string()),
        (
            "stream token".to_string(),
            format!(
                "{} (shown only this once: give it to the source agent)",
                enabled.stream_token
            ),
        ),
        (
            "job".to_string(),
            format!("{} ({}, {})", job.id, job.kind, job.state),
        ),
    ];
    render_pairs(&pairs)
}
