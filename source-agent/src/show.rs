//! The human form of `source-agent status` (from the status JSON, so it prints whatever
//! fields the running agent has).

use std::fmt::Write;

use bytesize::ByteSize;
use serde_json::Value;

fn u(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("?")
}

/// Lines for people: the item, link, sequence numbers, backlog, last bookmark, and a line
/// per disk.
pub fn status(status: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "item:           {}", s(status, "item_name"));
    let _ = writeln!(out, "link:           {}", s(status, "link"));
    let quiesced = status.get("quiesced").and_then(Value::as_bool) == Some(true);
    let _ = writeln!(
        out,
        "writes:         {}",
        if quiesced {
            "refused (quiesced: `source-agent resume` to accept)"
        } else {
            "accepted"
        }
    );
    let _ = writeln!(
        out,
        "seq:            acked {} of {} sent; backlog {}",
        u(status, "acked_seq"),
        u(status, "next_seq").saturating_sub(1),
        ByteSize(u(status, "backlog_bytes"))
    );
    let last = match status.get("last_bookmark") {
        Some(b) if b.is_object() => format!(
            "{} seq {} ({})",
            u(b, "bookmark_id"),
            u(b, "seq"),
            s(b, "consistency")
        ),
        _ => "none".into(),
    };
    let _ = writeln!(
        out,
        "bookmarks:      {} taken, {} flushes coalesced, {} deferred (catching up); last: {last}",
        u(status, "bookmarks"),
        u(status, "flushes_coalesced"),
        u(status, "bookmarks_deferred_catching_up")
    );
    for d in status
        .get("disks")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let _ = writeln!(
            out,
            "disk {}: {} ({}); written {}, sent {}, resent {}, recovered {}, unsent {} \
             (grain {}, {} active extents)",
            s(d, "name"),
            s(d, "path"),
            ByteSize(u(d, "size_bytes")),
            ByteSize(u(d, "written_bytes")),
            ByteSize(u(d, "sent_bytes")),
            ByteSize(u(d, "resent_bytes")),
            ByteSize(u(d, "recovered_bytes")),
            ByteSize(u(d, "unsent_bytes")),
            ByteSize(u(d, "grain_bytes")),
            u(d, "active_extents"),
        );
    }
    out
}
