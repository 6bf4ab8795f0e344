//! Settings of `appliance serve`: defaults, an optional TOML file, and command-line flags.
//!
//! Precedence: a flag overrides the file, the file overrides the default. Every value is
//! checked against its range here, once, whichever of the three it came from; an error names
//! the key (or the flag) and the range. Unknown keys in the file are refused.
//!
//! ```toml
//! data_addr = "0.0.0.0:7401"
//! api_addr = "127.0.0.1:7400"
//! nbd_addr = "127.0.0.1:10809"
//! keep_points = 128
//! cache_mib = 4096
//! queue_depth = 32
//! slots = 64
//! disk_stores = ["/srv/replicas", "/mnt/restore"]
//! max_jobs = 8
//! api_max_connections = 256
//! ```

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use appliance::daemon::ServeOptions;
use appliance::offline::BadInput;

/// The end of `appliance serve --help`: the file format, with an example. The example (the
/// indented block) is parsed by a test, so it stays valid.
pub const SERVE_HELP: &str = "\
The --config file is TOML. Every key is optional; a flag overrides its key, a key overrides the
default. An unknown key, a wrong type or a value out of range is an error naming the key.

    # /etc/appliance/appliance.toml
    data_addr = \"0.0.0.0:7401\"       # data port, where source agents connect
    api_addr = \"127.0.0.1:7400\"      # control API (HTTP/JSON, bearer token)
    nbd_addr = \"127.0.0.1:10809\"     # NBD server of exports (export names are secrets)
    keep_points = 64                 # recovery points per item: 1..=100000
    cache_mib = 2048                 # staging capacity per item, MiB: 16..=1048576
    queue_depth = 32                 # replica I/O queue depth: 1..=1024
    slots = 32                       # disk slots (LUNs), LUN 0 (the cache disk) included: 1..=256
    disk_stores = [\"/srv/replicas\"]  # absolute paths the API may use besides the data directory
    max_jobs = 8                     # disk-writing jobs running at once: 1..=64
    api_max_connections = 256        # control API connections open at once: 16..=16384

Defaults: data_addr 127.0.0.1:7401, api_addr 127.0.0.1:7400, nbd_addr 127.0.0.1:10809,
keep_points 64, cache_mib 2048, queue_depth 32, slots 32, disk_stores none, max_jobs 8, api_max_connections 256.

Examples:
  appliance serve --data-dir /var/lib/appliance
  appliance serve --data-dir /var/lib/appliance --config /etc/appliance/appliance.toml \\
      --api-addr 127.0.0.1:7500 --disk-store /srv/replicas --disk-store /srv/restore";

/// Default address of the data port.
pub const DEFAULT_DATA_ADDR: &str = "127.0.0.1:7401";
/// Default address of the control API.
pub const DEFAULT_API_ADDR: &str = "127.0.0.1:7400";
/// Default address of the NBD server (IANA's NBD port, loopback).
pub const DEFAULT_NBD_ADDR: &str = "127.0.0.1:10809";
/// Recovery points kept per item unless its policy says otherwise.
pub const DEFAULT_KEEP_POINTS: u64 = 64;
/// Staging capacity per item, MiB.
pub const DEFAULT_CACHE_MIB: u64 = 2048;
/// Replica I/O queue depth.
pub const DEFAULT_QUEUE_DEPTH: u64 = 32;
/// Data-disk slots (LUNs) of the appliance VM, LUN 0 (its own cache disk) included.
pub const DEFAULT_SLOTS: u64 = 32;
/// Jobs running at once.
pub const DEFAULT_MAX_JOBS: u64 = 8;
/// Control API connections open at once.
pub const DEFAULT_API_MAX_CONNECTIONS: u64 = 256;

const KEEP_POINTS: RangeInclusive<i64> = 1..=100_000;
const CACHE_MIB: RangeInclusive<i64> = 16..=1_048_576;
const QUEUE_DEPTH: RangeInclusive<i64> = 1..=1024;
const SLOTS: RangeInclusive<i64> = 1..=256;
const MAX_JOBS: RangeInclusive<i64> = 1..=64;
const API_MAX_CONNECTIONS: RangeInclusive<i64> = 16..=16_384;

/// The TOML file, as written. Integers are read signed so that a negative value gets the same
/// range error as any other out-of-range value.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_addr: Option<String>,
    api_addr: Option<String>,
    nbd_addr: Option<String>,
    keep_points: Option<i64>,
    cache_mib: Option<i64>,
    queue_depth: Option<i64>,
    slots: Option<i64>,
    disk_stores: Option<Vec<PathBuf>>,
    max_jobs: Option<i64>,
    api_max_connections: Option<i64>,
}

/// Values given as flags on the command line (`None`/empty: not given).
#[derive(Debug, Default, Clone)]
pub struct Flags {
    /// `--data-addr`.
    pub data_addr: Option<String>,
    /// `--api-addr`.
    pub api_addr: Option<String>,
    /// `--nbd-addr`.
    pub nbd_addr: Option<String>,
    /// `--keep-points`.
    pub keep_points: Option<u64>,
    /// `--cache-mib`.
    pub cache_mib: Option<u64>,
    /// `--queue-depth`.
    pub queue_depth: Option<u64>,
    /// `--slots`.
    pub slots: Option<u64>,
    /// `--disk-store` (repeatable; when given, replaces the file's list).
    pub disk_stores: Vec<PathBuf>,
    /// `--max-jobs`.
    pub max_jobs: Option<u64>,
    /// `--api-max-connections`.
    pub api_max_connections: Option<u64>,
}

/// Reads `config` (when given), applies `flags` over it and checks every value.
pub fn load(config: Option<&Path>, flags: &Flags) -> Result<ServeOptions, BadInput> {
    match config {
        None => resolve(None, flags),
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                BadInput(format!("config file {}: cannot read: {e}", path.display()))
            })?;
            resolve(Some((path, &text)), flags)
        }
    }
}

/// [`load`] on a file already read: `file` is its path (for messages) and text.
pub fn resolve(file: Option<(&Path, &str)>, flags: &Flags) -> Result<ServeOptions, BadInput> {
    let (origin, parsed) = match file {
        None => (String::new(), FileConfig::default()),
        Some((path, text)) => {
            let origin = format!("config file {}", path.display());
            let parsed: FileConfig = toml::from_str(text)
                .map_err(|e| BadInput(format!("{origin}: {}", e.to_string().trim_end())))?;
            (origin, parsed)
        }
    };
    let number = |key: &str, flag: Option<u64>, file: Option<i64>, default: u64, range| {
        pick_number(key, &origin, flag, file, default, range)
    };
    let keep_points = number(
        "keep_points",
        flags.keep_points,
        parsed.keep_points,
        DEFAULT_KEEP_POINTS,
        KEEP_POINTS,
    )?;
    let cache_mib = number(
        "cache_mib",
        flags.cache_mib,
        parsed.cache_mib,
        DEFAULT_CACHE_MIB,
        CACHE_MIB,
    )?;
    let queue_depth = number(
        "queue_depth",
        flags.queue_depth,
        parsed.queue_depth,
        DEFAULT_QUEUE_DEPTH,
        QUEUE_DEPTH,
    )?;
    let slots = number("slots", flags.slots, parsed.slots, DEFAULT_SLOTS, SLOTS)?;
    let max_jobs = number(
        "max_jobs",
        flags.max_jobs,
        parsed.max_jobs,
        DEFAULT_MAX_JOBS,
        MAX_JOBS,
    )?;
    let api_max_connections = number(
        "api_max_connections",
        flags.api_max_connections,
        parsed.api_max_connections,
        DEFAULT_API_MAX_CONNECTIONS,
        API_MAX_CONNECTIONS,
    )?;
    let data_addr = pick_addr(
        "data_addr",
        &origin,
        &flags.data_addr,
        &parsed.data_addr,
        DEFAULT_DATA_ADDR,
    )?;
    let api_addr = pick_addr(
        "api_addr",
        &origin,
        &flags.api_addr,
        &parsed.api_addr,
        DEFAULT_API_ADDR,
    )?;
    let nbd_addr = pick_addr(
        "nbd_addr",
        &origin,
        &flags.nbd_addr,
        &parsed.nbd_addr,
        DEFAULT_NBD_ADDR,
    )?;
    let disk_stores = if !flags.disk_stores.is_empty() {
        check_stores(&flags.disk_stores, |path| {
            format!("--disk-store {}: must be an absolute path", path.display())
        })?
    } else if let Some(stores) = parsed.disk_stores {
        check_stores(&stores, |path| {
            format!(
                "{origin}: disk_stores: {:?} must be an absolute path",
                path.display().to_string()
            )
        })?
    } else {
        Vec::new()
    };
    // Port 0 (a port the system picks, as tests use) may be given to both.
    for (a, b, what) in [
        (data_addr, api_addr, "data_addr and api_addr"),
        (data_addr, nbd_addr, "data_addr and nbd_addr"),
        (api_addr, nbd_addr, "api_addr and nbd_addr"),
    ] {
        if a == b && a.port() != 0 {
            return Err(BadInput(format!(
                "{what} are both {a}: the data port, the control API and the NBD server need \
                 different addresses"
            )));
        }
    }
    Ok(ServeOptions {
        data_addr,
        api_addr,
        nbd_addr,
        keep_points: usize::try_from(keep_points).unwrap_or(usize::MAX),
        cache_bytes: cache_mib << 20,
        queue_depth: usize::try_from(queue_depth).unwrap_or(usize::MAX),
        slot_count: u32::try_from(slots).unwrap_or(u32::MAX),
        disk_stores,
        max_jobs: usize::try_from(max_jobs).unwrap_or(usize::MAX),
        api_max_connections: usize::try_from(api_max_connections).unwrap_or(usize::MAX),
    })
}

/// `key` as a flag: `keep_points` → `--keep-points`.
fn flag_name(key: &str) -> String {
    format!("--{}", key.replace('_', "-"))
}

fn pick_number(
    key: &str,
    origin: &str,
    flag: Option<u64>,
    file: Option<i64>,
    default: u64,
    range: RangeInclusive<i64>,
) -> Result<u64, BadInput> {
    let out_of_range = |shown: String| {
        BadInput(format!(
            "{shown} is out of range: {key} must be {}..={}",
            range.start(),
            range.end()
        ))
    };
    if let Some(value) = flag {
        return match i64::try_from(value) {
            Ok(signed) if range.contains(&signed) => Ok(value),
            _ => Err(out_of_range(format!("{} {value}", flag_name(key)))),
        };
    }
    if let Some(value) = file {
        return match u64::try_from(value) {
            Ok(unsigned) if range.contains(&value) => Ok(unsigned),
            _ => Err(out_of_range(format!("{origin}: {key} = {value}"))),
        };
    }
    Ok(default)
}

fn pick_addr(
    key: &str,
    origin: &str,
    flag: &Option<String>,
    file: &Option<String>,
    default: &str,
) -> Result<SocketAddr, BadInput> {
    let (text, shown) = match (flag, file) {
        (Some(text), _) => (text.as_str(), format!("{} {text}", flag_name(key))),
        (None, Some(text)) => (text.as_str(), format!("{origin}: {key} = {text:?}")),
        (None, None) => (default, format!("{key} (default) {default}")),
    };
    text.trim().parse().map_err(|e| {
        BadInput(format!(
            "{shown}: {e}: {key} must be an IP address and port, e.g. {default}"
        ))
    })
}

fn check_stores(
    stores: &[PathBuf],
    refuse: impl Fn(&Path) -> String,
) -> Result<Vec<PathBuf>, BadInput> {
    stores
        .iter()
        .map(|path| {
            if path.is_absolute() {
                Ok(path.clone())
            } else {
                Err(BadInput(refuse(path)))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str, flags: &Flags) -> Result<ServeOptions, BadInput> {
        resolve(Some((Path::new("/etc/appliance.toml"), text)), flags)
    }

    fn error(result: Result<ServeOptions, BadInput>) -> String {
        match result {
            Ok(options) => panic!("accepted: {options:?}"),
            Err(BadInput(message)) => message,
        }
    }

    #[test]
    fn defaults_without_file_or_flags() {
        let options = resolve(None, &Flags::default()).expect("defaults");
        assert_eq!(options.data_addr.to_string(), "127.0.0.1:7401");
        assert_eq!(options.api_addr.to_string(), "127.0.0.1:7400");
        assert_eq!(options.keep_points, 64);
        assert_eq!(options.cache_bytes, 2048 << 20);
        assert_eq!(options.queue_depth, 32);
        assert_eq!(options.slot_count, 32);
        assert_eq!(options.max_jobs, 8);
        assert_eq!(options.api_max_connections, 256);
        assert!(options.disk_stores.is_empty());
    }

    #[test]
    fn an_empty_file_gives_the_defaults() {
        let options = file("# nothing here\n", &Flags::default()).expect("empty file");
        assert_eq!(options.keep_points, 64);
        assert_eq!(options.slot_count, 32);
    }

    const FULL: &str = r#"
data_addr = "0.0.0.0:9401"
api_addr = "127.0.0.1:9400"
keep_points = 128
cache_mib = 4096
queue_depth = 16
slots = 64
disk_stores = ["/srv/replicas", "/mnt/restore"]
max_jobs = 4
api_max_connections = 1024
"#;

    #[test]
    fn the_file_overrides_the_defaults() {
        let options = file(FULL, &Flags::default()).expect("full file");
        assert_eq!(options.data_addr.to_string(), "0.0.0.0:9401");
        assert_eq!(options.api_addr.to_string(), "127.0.0.1:9400");
        assert_eq!(options.keep_points, 128);
        assert_eq!(options.cache_bytes, 4096 << 20);
        assert_eq!(options.queue_depth, 16);
        assert_eq!(options.slot_count, 64);
        assert_eq!(options.max_jobs, 4);
        assert_eq!(options.api_max_connections, 1024);
        assert_eq!(
            options.disk_stores,
            vec![
                PathBuf::from("/srv/replicas"),
                PathBuf::from("/mnt/restore")
            ]
        );
    }

    #[test]
    fn flags_override_the_file() {
        let flags = Flags {
            api_addr: Some("127.0.0.1:7500".into()),
            keep_points: Some(7),
            slots: Some(256),
            disk_stores: vec![PathBuf::from("/data/other")],
            ..Flags::default()
        };
        let options = file(FULL, &flags).expect("file and flags");
        assert_eq!(options.api_addr.to_string(), "127.0.0.1:7500");
        assert_eq!(options.keep_points, 7);
        assert_eq!(options.slot_count, 256);
        assert_eq!(options.disk_stores, vec![PathBuf::from("/data/other")]);
        // Keys without a flag keep the file's value.
        assert_eq!(options.data_addr.to_string(), "0.0.0.0:9401");
        assert_eq!(options.cache_bytes, 4096 << 20);
        assert_eq!(options.max_jobs, 4);
    }

    #[test]
    fn flags_alone_override_the_defaults() {
        let flags = Flags {
            max_jobs: Some(64),
            cache_mib: Some(16),
            ..Flags::default()
        };
        let options = resolve(None, &flags).expect("flags");
        assert_eq!(options.max_jobs, 64);
        assert_eq!(options.cache_bytes, 16 << 20);
    }

    #[test]
    fn an_unknown_key_is_named() {
        let message = error(file("keep_points = 3\nslot_count = 8\n", &Flags::default()));
        assert!(message.contains("slot_count"), "{message}");
        assert!(message.contains("/etc/appliance.toml"), "{message}");
    }

    #[test]
    fn out_of_range_values_name_the_key_and_the_range() {
        for (text, key, range) in [
            ("keep_points = 0", "keep_points", "1..=100000"),
            ("cache_mib = 8", "cache_mib", "16..=1048576"),
            ("queue_depth = 4096", "queue_depth", "1..=1024"),
            ("slots = 0", "slots", "1..=256"),
            ("slots = 257", "slots", "1..=256"),
            ("max_jobs = 65", "max_jobs", "1..=64"),
            ("max_jobs = -1", "max_jobs", "1..=64"),
            (
                "api_max_connections = 8",
                "api_max_connections",
                "16..=16384",
            ),
        ] {
            let message = error(file(text, &Flags::default()));
            assert!(message.contains(key), "{text}: {message}");
            assert!(message.contains(range), "{text}: {message}");
        }
        let flags = Flags {
            slots: Some(1000),
            ..Flags::default()
        };
        let message = error(resolve(None, &flags));
        assert!(message.contains("--slots 1000"), "{message}");
        assert!(message.contains("1..=256"), "{message}");
    }

    #[test]
    fn a_wrong_type_names_the_key() {
        let message = error(file("keep_points = \"many\"\n", &Flags::default()));
        assert!(message.contains("keep_points"), "{message}");
    }

    #[test]
    fn disk_stores_must_be_absolute() {
        let message = error(file("disk_stores = [\"relative/dir\"]", &Flags::default()));
        assert!(message.contains("disk_stores"), "{message}");
        assert!(message.contains("relative/dir"), "{message}");
        let flags = Flags {
            disk_stores: vec![PathBuf::from("/ok"), PathBuf::from("rel")],
            ..Flags::default()
        };
        let message = error(resolve(None, &flags));
        assert!(message.contains("--disk-store rel"), "{message}");
    }

    #[test]
    fn bad_addresses_are_named() {
        let message = error(file("api_addr = \"localhost\"", &Flags::default()));
        assert!(message.contains("api_addr"), "{message}");
        let flags = Flags {
            data_addr: Some("127.0.0.1:7400".into()),
            ..Flags::default()
        };
        let message = error(resolve(None, &flags));
        assert!(message.contains("different addresses"), "{message}");
        let flags = Flags {
            data_addr: Some("127.0.0.1:0".into()),
            api_addr: Some("127.0.0.1:0".into()),
            ..Flags::default()
        };
        resolve(None, &flags).expect("port 0 twice: two ports the system picks");
    }

    #[test]
    fn the_example_in_the_help_is_valid() {
        // The indented block that starts with the file's name.
        let example: String = SERVE_HELP
            .lines()
            .skip_while(|line| !line.starts_with("    # "))
            .take_while(|line| !line.trim().is_empty())
            .map(|line| format!("{}\n", line.trim_start()))
            .collect();
        assert!(example.contains("max_jobs = 8"), "{example}");
        let options = file(&example, &Flags::default()).expect("the help's example");
        assert_eq!(options.data_addr.to_string(), "0.0.0.0:7401");
        assert_eq!(options.disk_stores, vec![PathBuf::from("/srv/replicas")]);
        assert_eq!(options.slot_count, 32);
    }

    #[test]
    fn a_missing_file_is_named() {
        let message = match load(
            Some(Path::new("/nonexistent/appliance.toml")),
            &Flags::default(),
        ) {
            Ok(options) => panic!("accepted: {options:?}"),
            Err(BadInput(message)) => message,
        };
        assert!(message.contains("/nonexistent/appliance.toml"), "{message}");
    }
}
