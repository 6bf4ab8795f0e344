//! Unit tests of the `/metrics` exposition: a small text-format validator and the rendered
//! families, values, escapes and degenerate snapshots.

use super::*;
use std::collections::{BTreeMap, HashMap, HashSet};

const ALL_FAMILIES: [(&str, &str); 20] = [
    ("appliance_item_state", "gauge"),
    ("appliance_item_rpo_lag_seconds", "gauge"),
    ("appliance_item_cache_used_bytes", "gauge"),
    ("appliance_item_cache_capacity_bytes", "gauge"),
    ("appliance_item_applied_bytes_total", "counter"),
    ("appliance_item_applied_frames_total", "counter"),
    ("appliance_item_applied_seq", "gauge"),
    ("appliance_item_staged_seq", "gauge"),
    ("appliance_item_synchronized_percent", "gauge"),
    ("appliance_item_recovery_points", "gauge"),
    ("appliance_item_apply_failed", "gauge"),
    ("appliance_item_apply_failed_seq", "gauge"),
    ("appliance_apply_latency_seconds", "histogram"),
    ("appliance_slots", "gauge"),
    ("appliance_slots_capacity", "gauge"),
    ("appliance_jobs", "gauge"),
    ("appliance_data_port_sessions_total", "counter"),
    ("appliance_data_port_connections", "gauge"),
    ("appliance_exports", "gauge"),
    ("appliance_nbd_connections", "gauge"),
];

fn item(id: &str, name: &str) -> ItemMetrics {
    let h = LatencyHistogram::new();
    for ns in [80_000, 400_000, 3_000_000, 60_000_000_000] {
        h.observe_ns(ns);
    }
    ItemMetrics {
        id: id.to_owned(),
        name: name.to_owned(),
        state: "protected".to_owned(),
        rpo_lag_seconds: Some(4.25),
        cache_used_bytes: 1 << 20,
        cache_capacity_bytes: 1 << 30,
        applied_bytes_total: 123_456_789,
        applied_frames_total: 2100,
        applied_seq: 2099,
        staged_seq: 2100,
        synchronized_percent: 100,
        points: 7,
        apply_failed_seq: None,
        apply_latency: h.snapshot(),
    }
}

fn sample_snapshot() -> MetricsSnapshot {
    let mut second = item(
        "0123456789abcdef0123456789abcdef",
        "db \"primary\"\nline2 C:\\vm",
    );
    second.rpo_lag_seconds = None;
    second.state = "failed_over".to_owned();
    second.apply_failed_seq = Some(2101);
    MetricsSnapshot {
        items: vec![item("3f2a9c0b1d4e5f60718293a4b5c6d7e8", "web-01"), second],
        slots_total: 32,
        slots_free: 27,
        slots_attached: 3,
        slots_reserved: 1,
        jobs_by_state: vec![
            ("test-failover".to_owned(), "running".to_owned(), 1),
            ("resync".to_owned(), "done".to_owned(), 2),
            ("resync".to_owned(), "done".to_owned(), 3),
        ],
        data_port_sessions_total: 12,
        data_port_connections: 2,
        exports_by_purpose: vec![("drill".to_owned(), 1), ("export".to_owned(), 2)],
        nbd_connections: 3,
    }
}

/// Label pairs of a parsed sample, values unescaped.
type Labels = Vec<(String, String)>;

/// A parsed sample line: metric name, labels, value.
type Sample = (String, Labels, f64);

/// A small validator for text format 0.0.4 as this module writes it: every line is a
/// `# HELP`, a `# TYPE` or `name{labels} value` with valid names, escapes and a value
/// Prometheus parses (NaN refused: we never write it). It also checks the structure
/// Prometheus relies on: one HELP and one TYPE per family, before its samples; samples of
/// a family contiguous; no repeated series; histogram buckets non-decreasing, ending at
/// `+Inf` equal to `_count`. Returns the samples.
fn validate(text: &str) -> Result<Vec<Sample>, String> {
    fn is_name(s: &str, colon: bool) -> bool {
        let mut chars = s.chars();
        let ok_first = |c: char| c.is_ascii_alphabetic() || c == '_' || (colon && c == ':');
        matches!(chars.next(), Some(c) if ok_first(c))
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || (colon && c == ':'))
    }
    fn parse_value(s: &str) -> Result<f64, String> {
        match s {
            "+Inf" => Ok(f64::INFINITY),
            "-Inf" => Ok(f64::NEG_INFINITY),
            _ if s.chars().all(|c| c.is_ascii_digit() || "+-.eE".contains(c)) => {
                s.parse::<f64>().map_err(|e| format!("value {s:?}: {e}"))
            }
            _ => Err(format!("value {s:?} is not a number Prometheus reads")),
        }
    }
    fn parse_labels(mut rest: &str) -> Result<(Labels, &str), String> {
        let mut labels = Vec::new();
        loop {
            if let Some(after) = rest.strip_prefix('}') {
                return Ok((labels, after));
            }
            let eq = rest.find('=').ok_or("label without =")?;
            let key = &rest[..eq];
            if !is_name(key, false) {
                return Err(format!("bad label name {key:?}"));
            }
            rest = rest[eq + 1..]
                .strip_prefix('"')
                .ok_or("label value without quote")?;
            let mut value = String::new();
            let mut chars = rest.char_indices();
            let end = loop {
                match chars.next().ok_or("unterminated label value")? {
                    (i, '"') => break i,
                    (_, '\\') => match chars.next().ok_or("dangling backslash")?.1 {
                        '\\' => value.push('\\'),
                        '"' => value.push('"'),
                        'n' => value.push('\n'),
                        c => return Err(format!("bad escape \\{c}")),
                    },
                    (_, '\n') => return Err("raw line feed in label value".into()),
                    (_, c) => value.push(c),
                }
            };
            rest = &rest[end + 1..];
            if labels.iter().any(|(k, _)| k == key) {
                return Err(format!("label {key} repeated"));
            }
            labels.push((key.to_owned(), value));
            if let Some(after) = rest.strip_prefix(',') {
                rest = after;
            } else if !rest.starts_with('}') {
                return Err("expected , or } after a label".into());
            }
        }
    }

    if !text.ends_with('\n') {
        return Err("output does not end with a line feed".into());
    }
    let mut helped: HashSet<String> = HashSet::new();
    let mut types: HashMap<String, String> = HashMap::new();
    let mut finished: HashSet<String> = HashSet::new();
    let mut current: Option<String> = None;
    let mut series: HashSet<String> = HashSet::new();
    let mut samples = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let at = |e: String| format!("line {}: {e}: {line:?}", n + 1);
        if let Some(comment) = line.strip_prefix("# ") {
            let mut parts = comment.splitn(3, ' ');
            let (word, name) = (parts.next(), parts.next().unwrap_or(""));
            let rest = parts.next().unwrap_or("");
            if !is_name(name, true) {
                return Err(at(format!("bad family name {name:?}")));
            }
            if current.as_deref() != Some(name) {
                if let Some(prev) = current.take() {
                    finished.insert(prev);
                }
                if finished.contains(name) {
                    return Err(at(format!("family {name} is not contiguous")));
                }
                current = Some(name.to_owned());
            }
            match word {
                Some("HELP") if helped.insert(name.to_owned()) && !types.contains_key(name) => {}
                Some("TYPE")
                    if ["counter", "gauge", "histogram", "summary", "untyped"].contains(&rest)
                        && !types.contains_key(name) =>
                {
                    types.insert(name.to_owned(), rest.to_owned());
                }
                _ => return Err(at("bad or repeated HELP/TYPE".into())),
            }
            continue;
        }
        let name_end = line.find(['{', ' ']).ok_or_else(|| at("no value".into()))?;
        let name = &line[..name_end];
        if !is_name(name, true) {
            return Err(at(format!("bad metric name {name:?}")));
        }
        let (labels, rest) = match line[name_end..].strip_prefix('{') {
            Some(after) => parse_labels(after).map_err(at)?,
            None => (Vec::new(), &line[name_end..]),
        };
        let value = rest
            .strip_prefix(' ')
            .ok_or_else(|| at("expected one space".into()))?;
        if value.contains(' ') {
            return Err(at("trailing text after the value".into()));
        }
        let value = parse_value(value).map_err(at)?;
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                let base = name.strip_suffix(s)?;
                (types.get(base).map(String::as_str) == Some("histogram")).then_some(base)
            })
            .unwrap_or(name);
        if !types.contains_key(family) || !helped.contains(family) {
            return Err(at(format!("sample before HELP and TYPE of {family}")));
        }
        if current.as_deref() != Some(family) {
            return Err(at(format!("sample of {family} outside its family's block")));
        }
        if types[family] == "histogram"
            && (name.ends_with("_bucket") != labels.iter().any(|(k, _)| k == "le"))
        {
            return Err(at("le label only on _bucket".into()));
        }
        let mut key = name.to_owned();
        for (k, v) in &labels {
            key.push_str(&format!("|{k}={v:?}"));
        }
        if !series.insert(key) {
            return Err(at("repeated series".into()));
        }
        samples.push((name.to_owned(), labels, value));
    }

    // Histograms: per series (labels without le) buckets rise and end at +Inf = _count.
    for (family, _) in types.iter().filter(|(_, t)| *t == "histogram") {
        let mut buckets: BTreeMap<Labels, Vec<(f64, f64)>> = BTreeMap::new();
        let mut counts: HashMap<Labels, f64> = HashMap::new();
        for (name, labels, value) in &samples {
            let base: Vec<_> = labels.iter().filter(|(k, _)| k != "le").cloned().collect();
            if *name == format!("{family}_bucket") {
                let le = &labels.iter().find(|(k, _)| k == "le").expect("le").1;
                buckets
                    .entry(base)
                    .or_default()
                    .push((parse_value(le)?, *value));
            } else if *name == format!("{family}_count") {
                counts.insert(base, *value);
            }
        }
        if buckets.len() != counts.len() {
            return Err(format!("{family}: buckets and _count series differ"));
        }
        for (base, list) in buckets {
            if !list.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1) {
                return Err(format!("{family} {base:?}: buckets not increasing"));
            }
            let last = list.last().expect("a bucket");
            if last.0 != f64::INFINITY || Some(&last.1) != counts.get(&base) {
                return Err(format!(
                    "{family} {base:?}: +Inf bucket missing or != _count"
                ));
            }
        }
    }
    Ok(samples)
}

fn find<'a>(samples: &'a [Sample], name: &str, want: &[(&str, &str)]) -> Vec<&'a Sample> {
    samples
        .iter()
        .filter(|(n, labels, _)| {
            n == name
                && want
                    .iter()
                    .all(|(k, v)| labels.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .collect()
}

#[test]
fn render_is_well_formed_with_each_family_once() {
    let text = render(&sample_snapshot()).unwrap();
    let samples = validate(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    for (family, kind) in ALL_FAMILIES {
        let help = format!("# HELP {family} ");
        let type_line = format!("# TYPE {family} {kind}\n");
        assert_eq!(text.matches(&help).count(), 1, "HELP of {family}");
        assert_eq!(text.matches(&type_line).count(), 1, "TYPE of {family}");
        assert!(
            text.find(&help) < text.find(&type_line),
            "HELP before TYPE: {family}"
        );
    }
    assert_eq!(
        text.matches("# TYPE ").count(),
        ALL_FAMILIES.len(),
        "no other family"
    );
    for (name, labels, _) in &samples {
        assert!(name.starts_with("appliance_"), "{name}");
        if name.starts_with("appliance_item_") || name.starts_with("appliance_apply_") {
            assert_eq!(&labels[0].0, "item");
            assert_eq!(&labels[1].0, "name");
        }
    }
    // Rendering is deterministic.
    assert_eq!(text, render(&sample_snapshot()).unwrap());
}

#[test]
fn render_values() {
    let text = render(&sample_snapshot()).unwrap();
    let samples = validate(&text).expect("valid");
    let web = [
        ("item", "3f2a9c0b1d4e5f60718293a4b5c6d7e8"),
        ("name", "web-01"),
    ];
    let value = |name: &str, labels: &[(&str, &str)]| {
        let found = find(&samples, name, labels);
        assert_eq!(found.len(), 1, "{name} {labels:?}");
        found[0].2
    };
    assert_eq!(value("appliance_item_rpo_lag_seconds", &web), 4.25);
    assert_eq!(
        find(&samples, "appliance_item_rpo_lag_seconds", &[]).len(),
        1,
        "None omitted"
    );
    assert_eq!(
        value("appliance_item_applied_bytes_total", &web),
        123_456_789.0
    );
    assert_eq!(value("appliance_item_staged_seq", &web), 2100.0);
    assert_eq!(value("appliance_item_recovery_points", &web), 7.0);
    assert_eq!(value("appliance_item_apply_failed", &web), 0.0);
    assert_eq!(
        find(&samples, "appliance_item_apply_failed", &[]).len(),
        2,
        "one sample per item"
    );
    let failing = [("item", "0123456789abcdef0123456789abcdef")];
    assert_eq!(value("appliance_item_apply_failed", &failing), 1.0);
    assert_eq!(
        find(&samples, "appliance_item_apply_failed_seq", &[]).len(),
        1,
        "only while apply_failed"
    );
    assert_eq!(value("appliance_item_apply_failed_seq", &failing), 2101.0);
    assert_eq!(value("appliance_item_synchronized_percent", &web), 100.0);
    assert_eq!(
        value("appliance_item_state", &[("state", "protected")]),
        1.0
    );
    assert_eq!(
        value("appliance_item_state", &[("state", "failed_over")]),
        1.0
    );
    assert_eq!(
        value(
            "appliance_apply_latency_seconds_bucket",
            &[web[0], ("le", "0.0001")]
        ),
        1.0
    );
    assert_eq!(
        value(
            "appliance_apply_latency_seconds_bucket",
            &[web[0], ("le", "10")]
        ),
        3.0
    );
    assert_eq!(
        value(
            "appliance_apply_latency_seconds_bucket",
            &[web[0], ("le", "+Inf")]
        ),
        4.0
    );
    assert_eq!(value("appliance_apply_latency_seconds_count", &web), 4.0);
    assert!((value("appliance_apply_latency_seconds_sum", &web) - 60.00348).abs() < 1e-9);
    assert_eq!(value("appliance_slots", &[("state", "free")]), 27.0);
    assert_eq!(value("appliance_slots", &[("state", "attached")]), 3.0);
    assert_eq!(value("appliance_slots", &[("state", "reserved")]), 1.0);
    assert_eq!(value("appliance_slots_capacity", &[]), 32.0);
    assert_eq!(
        value("appliance_jobs", &[("kind", "resync"), ("state", "done")]),
        5.0
    );
    assert_eq!(
        value(
            "appliance_jobs",
            &[("kind", "test-failover"), ("state", "running")]
        ),
        1.0
    );
    assert_eq!(value("appliance_data_port_sessions_total", &[]), 12.0);
    assert_eq!(value("appliance_data_port_connections", &[]), 2.0);
    assert_eq!(value("appliance_exports", &[("purpose", "export")]), 2.0);
    assert_eq!(value("appliance_nbd_connections", &[]), 3.0);
    assert!(text.contains("appliance_slots_capacity 32\n"));
    assert!(text.contains(",le=\"+Inf\"} 4\n"));
}

#[test]
fn label_values_are_escaped() {
    let name = "db \"primary\"\nline2 C:\\vm";
    let text = render(&sample_snapshot()).unwrap();
    assert!(
        text.contains(r#"name="db \"primary\"\nline2 C:\\vm""#),
        "escaped name missing:\n{text}"
    );
    // Every sample is one line and the validator's unescaping gives the name back.
    let samples = validate(&text).expect("valid");
    let theirs = find(&samples, "appliance_item_applied_seq", &[("name", name)]);
    assert_eq!(theirs.len(), 1);
    assert_eq!(&theirs[0].1[0].1, "0123456789abcdef0123456789abcdef");
    let mut snapshot = sample_snapshot();
    snapshot.items[0].name = "\\\"\n".to_owned();
    let text = render(&snapshot).unwrap();
    assert!(text.contains(r#"name="\\\"\n""#), "{text}");
}

#[test]
fn floats_print_so_prometheus_parses_them() {
    // Each float (and the largest integer) as the encoder prints it, read back exactly.
    for (rpo, printed) in [
        (f64::INFINITY, "+Inf"),
        (f64::NEG_INFINITY, "-Inf"),
        (1e-7, "1e-7"),
        (0.25, "0.25"),
    ] {
        let mut snapshot = sample_snapshot();
        snapshot.items[0].rpo_lag_seconds = Some(rpo);
        snapshot.items[0].applied_bytes_total = u64::MAX;
        let text = render(&snapshot).unwrap();
        let line = format!(
            "appliance_item_rpo_lag_seconds{{item=\"3f2a9c0b1d4e5f60718293a4b5c6d7e8\",\
             name=\"web-01\"}} {printed}\n"
        );
        assert!(text.contains(&line), "{line:?} missing:\n{text}");
        assert!(text.contains("name=\"web-01\"} 18446744073709551615\n"));
        let samples = validate(&text).expect("valid");
        let web = [("name", "web-01")];
        assert_eq!(
            find(&samples, "appliance_item_rpo_lag_seconds", &web)[0].2,
            rpo
        );
    }

    let mut snapshot = sample_snapshot();
    snapshot.items[0].rpo_lag_seconds = Some(f64::NAN);
    snapshot.items[1].rpo_lag_seconds = Some(f64::INFINITY);
    snapshot.items[1].apply_latency.sum_seconds = f64::NAN;
    let text = render(&snapshot).unwrap();
    assert!(!text.contains("NaN"), "{text}");
    let samples = validate(&text).expect("valid");
    let rpo = find(&samples, "appliance_item_rpo_lag_seconds", &[]);
    assert_eq!(rpo.len(), 1, "NaN omitted");
    assert_eq!(rpo[0].2, f64::INFINITY);
}

/// The `le` labels the exposition has always had (Go's shortest float form).
const LE_LABELS: [&str; LATENCY_BUCKET_COUNT] = [
    "0.0001", "0.00025", "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1",
    "0.25", "0.5", "1", "2.5", "5", "10", "+Inf",
];

#[test]
fn le_labels_are_the_bounds() {
    for (i, &secs) in LATENCY_BUCKETS_SECONDS.iter().enumerate() {
        assert_eq!(
            LE_LABELS[i].parse::<f64>().expect("le parses"),
            secs,
            "le {i}"
        );
    }
    assert_eq!(LE_LABELS[LATENCY_BUCKET_COUNT - 1], "+Inf");
    // The rendered buckets of one item carry exactly these labels, in this order.
    let text = render(&sample_snapshot()).unwrap();
    let rendered: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("appliance_apply_latency_seconds_bucket{item=\"3f2a"))
        .map(|l| {
            let le = &l[l.find("le=\"").expect("le") + 4..];
            &le[..le.find('"').expect("closing quote")]
        })
        .collect();
    assert_eq!(rendered, LE_LABELS);
}

#[test]
fn empty_and_degenerate_snapshots_are_well_formed() {
    let text = render(&MetricsSnapshot::default()).unwrap();
    validate(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(text.matches("# TYPE ").count(), ALL_FAMILIES.len());

    // A repeated item id is rendered once; odd names and states stay valid.
    let mut snapshot = sample_snapshot();
    let mut dup = item("3f2a9c0b1d4e5f60718293a4b5c6d7e8", "other");
    dup.state = "weird \"state\"\\".to_owned();
    snapshot.items.push(dup);
    snapshot
        .items
        .push(item("ffffffffffffffffffffffffffffffff", ""));
    snapshot
        .jobs_by_state
        .push(("x\ny".to_owned(), "\"".to_owned(), u64::MAX));
    let text = render(&snapshot).unwrap();
    let samples = validate(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(find(&samples, "appliance_item_state", &[]).len(), 3);
    assert!(!text.contains("other"));
}

#[test]
fn validator_rejects_malformed_text() {
    let good = "# HELP a_b x\n# TYPE a_b gauge\na_b{l=\"v\"} 1\n";
    assert!(validate(good).is_ok());
    for bad in [
        "a_b 1\n",                                                       // no HELP/TYPE
        "# HELP a_b x\n# TYPE a_b gauge\na_b{l=\"v\"} 1",                // no final line feed
        "# HELP a_b x\n# TYPE a_b gauge\na_b{l=\"v\"} NaN\n",            // NaN
        "# HELP a_b x\n# TYPE a_b gauge\na_b{l=\"v\"} inf\n",            // Go spelling only
        "# HELP a_b x\n# TYPE a_b gauge\na_b{l=\"v\\x\"} 1\n",           // bad escape
        "# HELP a_b x\n# TYPE a_b gauge\na_b{l=\"v} 1\n",                // unterminated
        "# HELP a_b x\n# TYPE a_b gauge\na_b{l=\"v\"}  1\n",             // two spaces
        "# HELP a_b x\n# TYPE a_b gauge\na_b 1\na_b 2\n",                // repeated series
        "# HELP a_b x\n# TYPE a_b gauge\n# TYPE a_b gauge\na_b 1\n",     // TYPE twice
        "# HELP a x\n# TYPE a gauge\n# HELP b x\n# TYPE b gauge\na 1\n", // not contiguous
        "# HELP h x\n# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\nh_sum 0\n",
        "# HELP h x\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_count 1\nh_sum 0\n",
    ] {
        assert!(validate(bad).is_err(), "accepted: {bad:?}");
    }
}
