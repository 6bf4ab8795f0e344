//! The agent's configuration file (TOML): parsing, validation and the stream token.
//!
//! Every refusal names the file and the key (`disk[1].name`, `token_file`, ...). Unknown keys
//! are refused, never ignored: a misspelt optional key would otherwise silently fall back to
//! its default. Paths must be absolute (the daemon runs from `/` under systemd).
//!
//! [`Config::load`] reads and validates the file without touching anything it names (the CLI
//! client only needs the control socket's path); the daemon then calls
//! [`Config::check_files`] (disks exist) and [`Config::read_token`] (the token file's
//! permissions and contents).

use std::fmt;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::changemap;
use serde::Deserialize;

#[cfg(test)]
mod tests;

/// Default NBD listen address (one port above the NBD standard 10809, which the appliance's
/// own exports use on a shared test host).
pub const DEFAULT_NBD_ADDR: &str = "127.0.0.1:10810";
/// Default minimum interval between flush bookmarks.
pub const DEFAULT_BOOKMARK_INTERVAL_MS: u64 = 1000;
/// Default sender backlog.
pub const DEFAULT_BACKLOG_LIMIT_MIB: u64 = 64;
/// Default bound of one disk's change map.
pub const DEFAULT_CHANGE_MAP_LIMIT_KIB: u64 = 256;
/// Default number of activity-log extents per disk.
pub const DEFAULT_ACTIVITY_LOG_EXTENTS: u32 = 1024;
/// Default size of one activity-log extent.
pub const DEFAULT_ACTIVITY_LOG_EXTENT_MIB: u64 = 4;
/// Most disks of one item.
pub const MAX_DISKS: usize = 64;
/// Longest disk (export) name.
pub const MAX_DISK_NAME_CHARS: usize = 64;
/// Longest item name, in bytes of UTF-8 (the stream header's limit).
pub const MAX_ITEM_NAME_BYTES: usize = engine::delta::MAX_ITEM_NAME_BYTES;
/// Longest config file read (a config is a few hundred bytes; this bounds a wrong path).
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// Length of a stream token: 64 ASCII hex characters.
pub const TOKEN_HEX_CHARS: usize = 64;
/// Longest Unix socket path Linux accepts (`sun_path` is 108 bytes with the NUL).
pub const MAX_SOCKET_PATH_BYTES: usize = 107;

/// A refused configuration: every variant names the file, and the key where one is at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("config {path}: cannot read: {source}")]
    Read {
        /// The config file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key, or a value of the wrong type.
    #[error("config {path}: {message}")]
    Parse {
        /// The config file.
        path: PathBuf,
        /// The TOML parser's message (names the key and the line).
        message: String,
    },
    /// A key's value is refused.
    #[error("config {path}: key `{key}`: {message}")]
    Invalid {
        /// The config file.
        path: PathBuf,
        /// The key, e.g. `disk[0].name`.
        key: String,
        /// What is wrong with it.
        message: String,
    },
    /// The token file named by `token_file` is refused.
    #[error("config {config}: key `token_file`: {path}: {message}")]
    Token {
        /// The config file.
        config: PathBuf,
        /// The token file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
}

/// The file as written (private: [`Config`] is the validated form).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    item_name: String,
    item_id: Option<String>,
    appliance: Option<String>,
    token_file: Option<PathBuf>,
    state_dir: PathBuf,
    nbd_addr: Option<String>,
    control_socket: Option<PathBuf>,
    bookmark_interval_ms: Option<u64>,
    backlog_limit_mib: Option<u64>,
    change_map_limit_kib: Option<u64>,
    activity_log_extents: Option<u32>,
    activity_log_extent_mib: Option<u64>,
    compression: Option<String>,
    capture: Option<bool>,
    #[serde(default)]
    disk: Vec<RawDisk>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDisk {
    name: String,
    path: PathBuf,
    block_size_bytes: Option<u32>,
}

/// One protected disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// The NBD export name: `[A-Za-z0-9_.-]{1,64}`, unique in the file.
    pub name: String,
    /// The image file or block device (absolute; must exist when the daemon starts).
    pub path: PathBuf,
    /// 512 or 4096: the smallest I/O the NBD server accepts.
    pub block_size_bytes: u32,
}

/// What capture needs (absent with `capture = false`).
#[derive(Clone, PartialEq, Eq)]
pub struct CaptureSettings {
    /// The appliance's data port.
    pub appliance: SocketAddr,
    /// The protected item's id (from `appliance-cli enable`).
    pub item_id: [u8; 16],
    /// The file holding the item's stream token.
    pub token_file: PathBuf,
    /// Minimum interval between flush bookmarks.
    pub bookmark_interval: Duration,
    /// Most bytes of unacknowledged frames the sender keeps.
    pub backlog_limit_bytes: u64,
    /// Most bytes one disk's change map may take (memory and file).
    pub change_map_limit_bytes: u64,
    /// Most activity-log extents active at once, per disk.
    pub activity_log_extents: u32,
    /// Size of one activity-log extent.
    pub activity_log_extent_bytes: u64,
    /// zstd level of data payloads on the wire (`compression = "zstd"`, level 1), or `None`
    /// for raw payloads (`compression = "none"`: less CPU, more bytes on the link).
    pub zstd_level: Option<i32>,
}

impl fmt::Debug for CaptureSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaptureSettings")
            .field("appliance", &self.appliance)
            .field("item_id", &hex::encode(self.item_id))
            .field("token_file", &self.token_file)
            .field("bookmark_interval", &self.bookmark_interval)
            .field("backlog_limit_bytes", &self.backlog_limit_bytes)
            .field("change_map_limit_bytes", &self.change_map_limit_bytes)
            .field("activity_log_extents", &self.activity_log_extents)
            .field("activity_log_extent_bytes", &self.activity_log_extent_bytes)
            .finish()
    }
}

/// A validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The file it was read from (named in every later refusal).
    pub path: PathBuf,
    /// The item's name (in each stream header and in the stdout lines).
    pub item_name: String,
    /// Change maps, activity logs, the lock file and (by default) the control socket.
    pub state_dir: PathBuf,
    /// Where the NBD server listens (port 0: any free port, printed at start).
    pub nbd_addr: SocketAddr,
    /// The control socket's path.
    pub control_socket: PathBuf,
    /// The disks, OS disk first (the disk index is the position).
    pub disks: Vec<Disk>,
    /// Capture settings; `None` with `capture = false` (serve with write-through only).
    pub capture: Option<CaptureSettings>,
}

impl Config {
    /// Reads and validates `path` (touches nothing the file names).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let read = |source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(read)?;
        if meta.len() > MAX_CONFIG_BYTES {
            return Err(ConfigError::Parse {
                path: path.to_path_buf(),
                message: format!(
                    "{} bytes is larger than any config ({MAX_CONFIG_BYTES} bytes at most)",
                    meta.len()
                ),
            });
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        Config::parse(&text, path)
    }

    /// Validates `text` as the contents of `path` (pure: no file system access).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key: key.to_string(),
            message,
        };
        check_item_name(&raw.item_name).map_err(|m| invalid("item_name", m))?;
        check_absolute(&raw.state_dir).map_err(|m| invalid("state_dir", m))?;
        let nbd_addr = match &raw.nbd_addr {
            Some(text) => text
                .parse()
                .map_err(|e| invalid("nbd_addr", format!("{text:?} is not ip:port: {e}")))?,
            None => DEFAULT_NBD_ADDR
                .parse()
                .map_err(|e| invalid("nbd_addr", format!("default: {e}")))?,
        };
        let control_socket = raw
            .control_socket
            .clone()
            .unwrap_or_else(|| raw.state_dir.join("control.sock"));
        check_absolute(&control_socket).map_err(|m| invalid("control_socket", m))?;
        let socket_len = control_socket.as_os_str().len();
        if socket_len > MAX_SOCKET_PATH_BYTES {
            return Err(invalid(
                "control_socket",
                format!(
                    "{} is {socket_len} bytes long; a Unix socket path has at most \
                     {MAX_SOCKET_PATH_BYTES} (set control_socket to a shorter path)",
                    control_socket.display()
                ),
            ));
        }
        let disks = check_disks(&raw.disk, &invalid)?;
        let capture = if raw.capture.unwrap_or(true) {
            Some(capture_settings(&raw, &invalid)?)
        } else {
            None
        };
        Ok(Config {
            path: path.to_path_buf(),
            item_name: raw.item_name,
            state_dir: raw.state_dir,
            nbd_addr,
            control_socket,
            disks,
            capture,
        })
    }

    /// The daemon's checks of what the file names: each disk exists and is a regular file or
    /// a block device; the state directory, when it exists, is a directory.
    pub fn check_files(&self) -> Result<(), ConfigError> {
        for (i, disk) in self.disks.iter().enumerate() {
            let key = format!("disk[{i}].path");
            let meta = std::fs::metadata(&disk.path)
                .map_err(|e| self.invalid(&key, format!("{}: {e}", disk.path.display())))?;
            let kind = meta.file_type();
            if !kind.is_file() && !kind.is_block_device() {
                return Err(self.invalid(
                    &key,
                    format!(
                        "{} is neither an image file nor a block device",
                        disk.path.display()
                    ),
                ));
            }
        }
        if let Ok(meta) = std::fs::metadata(&self.state_dir)
            && !meta.is_dir()
        {
            return Err(self.invalid(
                "state_dir",
                format!("{} exists and is not a directory", self.state_dir.display()),
            ));
        }
        Ok(())
    }

    /// Reads the stream token: `token_file` must be a regular file, not readable or writable
    /// by group or others (like ssh's private keys: a token anyone on the host can read
    /// lets them write the item's replica), and hold exactly 64 hex characters (one trailing
    /// newline allowed). Returns the 64 ASCII characters.
    pub fn read_token(&self) -> Result<Vec<u8>, ConfigError> {
        let settings = self.capture.as_ref().ok_or_else(|| {
            self.invalid(
                "capture",
                "capture = false: there is no token to read".into(),
            )
        })?;
        read_token_file(&settings.token_file).map_err(|message| ConfigError::Token {
            config: self.path.clone(),
            path: settings.token_file.clone(),
            message,
        })
    }

    fn invalid(&self, key: &str, message: String) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.clone(),
            key: key.to_string(),
            message,
        }
    }
}

/// Longest token file read (64 characters and a newline; a little slack for CRLF).
const MAX_TOKEN_FILE_BYTES: u64 = 128;

fn read_token_file(path: &Path) -> Result<Vec<u8>, String> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| e.to_string())?;
    let meta = if meta.file_type().is_symlink() {
        std::fs::metadata(path).map_err(|e| e.to_string())?
    } else {
        meta
    };
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "permissions {mode:04o} let group or others read or write the token; \
             run `chmod 600 {}`",
            path.display()
        ));
    }
    if meta.len() > MAX_TOKEN_FILE_BYTES {
        return Err(format!(
            "{} bytes; a token file holds {TOKEN_HEX_CHARS} hex characters",
            meta.len()
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let text = bytes
        .strip_suffix(b"\r\n")
        .or_else(|| bytes.strip_suffix(b"\n"))
        .unwrap_or(&bytes);
    if text.is_empty() {
        return Err("empty; it must hold the item's stream token (64 hex characters)".into());
    }
    if text.len() != TOKEN_HEX_CHARS || !text.iter().all(u8::is_ascii_hexdigit) {
        return Err(format!(
            "holds {} bytes that are not {TOKEN_HEX_CHARS} hex characters (the stream token \
             printed by `appliance enable`)",
            text.len()
        ));
    }
    Ok(text.to_vec())
}

fn check_item_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty; name the protected item".into());
    }
    if name.len() > MAX_ITEM_NAME_BYTES {
        return Err(format!(
            "{} bytes; at most {MAX_ITEM_NAME_BYTES}",
            name.len()
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(format!("{name:?} holds control characters"));
    }
    Ok(())
}

fn check_absolute(path: &Path) -> Result<(), String> {
    if path.as_os_str().is_empty() {
        return Err("empty path".into());
    }
    if !path.is_absolute() {
        return Err(format!(
            "{} is relative; paths must be absolute (the daemon's working directory is /)",
            path.display()
        ));
    }
    Ok(())
}

/// The disk (export) name rule: `[A-Za-z0-9_.-]{1,64}`, and not `.` or `..` (names become
/// state file names).
pub fn check_disk_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_DISK_NAME_CHARS {
        return Err(format!(
            "{name:?}: a disk name has 1 to {MAX_DISK_NAME_CHARS} characters"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(format!(
            "{name:?}: {c:?} is not allowed (letters, digits, '_', '.', '-')"
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("{name:?} is not a disk name"));
    }
    Ok(())
}

fn check_disks(
    raw: &[RawDisk],
    invalid: &dyn Fn(&str, String) -> ConfigError,
) -> Result<Vec<Disk>, ConfigError> {
    if raw.is_empty() {
        return Err(invalid(
            "disk",
            "no [[disk]] table: name at least one disk to protect".into(),
        ));
    }
    if raw.len() > MAX_DISKS {
        return Err(invalid(
            "disk",
            format!("{} disks; an item has at most {MAX_DISKS}", raw.len()),
        ));
    }
    let mut disks: Vec<Disk> = Vec::with_capacity(raw.len());
    for (i, d) in raw.iter().enumerate() {
        check_disk_name(&d.name).map_err(|m| invalid(&format!("disk[{i}].name"), m))?;
        if let Some(j) = disks.iter().position(|o| o.name == d.name) {
            return Err(invalid(
                &format!("disk[{i}].name"),
                format!("{:?} is also the name of disk[{j}]", d.name),
            ));
        }
        check_absolute(&d.path).map_err(|m| invalid(&format!("disk[{i}].path"), m))?;
        if let Some(j) = disks.iter().position(|o| o.path == d.path) {
            return Err(invalid(
                &format!("disk[{i}].path"),
                format!("{} is also the path of disk[{j}]", d.path.display()),
            ));
        }
        let block_size_bytes = d.block_size_bytes.unwrap_or(4096);
        if block_size_bytes != 512 && block_size_bytes != 4096 {
            return Err(invalid(
                &format!("disk[{i}].block_size_bytes"),
                format!("{block_size_bytes}: must be 512 or 4096"),
            ));
        }
        disks.push(Disk {
            name: d.name.clone(),
            path: d.path.clone(),
            block_size_bytes,
        });
    }
    Ok(disks)
}

/// `value` (default `default`) within `lo..=hi`, or a refusal naming the range.
fn ranged(
    key: &str,
    value: Option<u64>,
    default: u64,
    (lo, hi): (u64, u64),
    invalid: &dyn Fn(&str, String) -> ConfigError,
) -> Result<u64, ConfigError> {
    let v = value.unwrap_or(default);
    if v < lo || v > hi {
        return Err(invalid(key, format!("{v} is outside {lo}..={hi}")));
    }
    Ok(v)
}

fn capture_settings(
    raw: &RawConfig,
    invalid: &dyn Fn(&str, String) -> ConfigError,
) -> Result<CaptureSettings, ConfigError> {
    let missing = |key: &str| {
        invalid(
            key,
            "missing (required unless `capture = false`)".to_string(),
        )
    };
    let item_id_text = raw.item_id.as_deref().ok_or_else(|| missing("item_id"))?;
    let mut item_id = [0u8; 16];
    hex::decode_to_slice(item_id_text, &mut item_id).map_err(|e| {
        invalid(
            "item_id",
            format!(
                "{item_id_text:?} is not 32 hex characters ({e}); copy it from `appliance enable`"
            ),
        )
    })?;
    let appliance_text = raw
        .appliance
        .as_deref()
        .ok_or_else(|| missing("appliance"))?;
    let appliance: SocketAddr = appliance_text.parse().map_err(|e| {
        invalid(
            "appliance",
            format!("{appliance_text:?} is not ip:port of the appliance's data port: {e}"),
        )
    })?;
    if appliance.port() == 0 {
        return Err(invalid("appliance", "port 0 is not a data port".into()));
    }
    let token_file = raw
        .token_file
        .clone()
        .ok_or_else(|| missing("token_file"))?;
    check_absolute(&token_file).map_err(|m| invalid("token_file", m))?;
    let interval_ms = ranged(
        "bookmark_interval_ms",
        raw.bookmark_interval_ms,
        DEFAULT_BOOKMARK_INTERVAL_MS,
        (0, 3_600_000),
        invalid,
    )?;
    let backlog_mib = ranged(
        "backlog_limit_mib",
        raw.backlog_limit_mib,
        DEFAULT_BACKLOG_LIMIT_MIB,
        (1, 16 * 1024),
        invalid,
    )?;
    let map_kib = ranged(
        "change_map_limit_kib",
        raw.change_map_limit_kib,
        DEFAULT_CHANGE_MAP_LIMIT_KIB,
        (4, changemap::MAX_MAP_BYTES_LIMIT >> 10),
        invalid,
    )?;
    let extents = ranged(
        "activity_log_extents",
        raw.activity_log_extents.map(u64::from),
        u64::from(DEFAULT_ACTIVITY_LOG_EXTENTS),
        (1, 1 << 16),
        invalid,
    )?;
    let extent_mib = ranged(
        "activity_log_extent_mib",
        raw.activity_log_extent_mib,
        DEFAULT_ACTIVITY_LOG_EXTENT_MIB,
        (1, 1024),
        invalid,
    )?;
    if !extent_mib.is_power_of_two() {
        return Err(invalid(
            "activity_log_extent_mib",
            format!("{extent_mib} is not a power of two"),
        ));
    }
    // One write of the largest NBD request must fit the log at once.
    let extent_bytes = extent_mib << 20;
    let span = (changemap::MAX_WRITE_BYTES - 1) / extent_bytes + 2;
    let least = span.max(u64::from(changemap::MIN_AL_EXTENTS));
    if extents < least {
        return Err(invalid(
            "activity_log_extents",
            format!(
                "{extents} is below {least}: a {} MiB request can span {span} extents of                  {extent_mib} MiB (activity_log_extent_mib), and at least {} are needed",
                changemap::MAX_WRITE_BYTES >> 20,
                changemap::MIN_AL_EXTENTS
            ),
        ));
    }
    let zstd_level = match raw.compression.as_deref() {
        None | Some("zstd") => Some(1),
        Some("none") => None,
        Some(other) => {
            return Err(invalid(
                "compression",
                format!("{other:?} is not \"zstd\" or \"none\""),
            ));
        }
    };
    Ok(CaptureSettings {
        appliance,
        item_id,
        token_file,
        bookmark_interval: Duration::from_millis(interval_ms),
        backlog_limit_bytes: backlog_mib << 20,
        change_map_limit_bytes: map_kib << 10,
        activity_log_extents: u32::try_from(extents)
            .map_err(|e| invalid("activity_log_extents", e.to_string()))?,
        activity_log_extent_bytes: extent_mib << 20,
        zstd_level,
    })
}
