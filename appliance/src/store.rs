//! The appliance's data directory: where each item's staging log, preserve store and replicas
//! live, and the one metadata store.
//!
//! ```text
//!  DATA_DIR/
//!  ├── meta.redb                         points, watermarks, preserved index, replica identities
//!  └── items/<item id, 32 hex digits>/
//!      ├── header.drs                    the item's stream header: identity and disks
//!      ├── staging/seg-*.drs             the cache staging area (engine::staging)
//!      ├── preserve/pres-*.dat           old blocks kept for recovery points (engine::apply)
//!      └── replicas/disk-<i>.img         replica disks created by the appliance
//! ```
//!
//! An item directory is created once, from the first stream's header; a later stream for the
//! same item must declare the same disks.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use engine::delta::{DeltaDecoder, StreamHeader};
use engine::durable::{DurableDir, StdDir};
use engine::meta::MetaStore;

/// An error and its causes on one line, each said once: the engine's errors already include
/// their source in their message, so a cause the message above it ends with is skipped.
pub fn describe(error: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if out.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// Now, in ns since the Unix epoch (0 if the clock is before it).
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Replaces `dir/name` with `bytes` so that a crash leaves the old or the new content, never
/// a mix: write `name.tmp`, fsync, rename, fsync the directory.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> anyhow::Result<()> {
    write_atomic_mode(dir, name, bytes, 0o644)
}

/// [`write_atomic`] for a secret (a token): readable by the owner only (mode 0600).
pub fn write_secret(dir: &Path, name: &str, bytes: &[u8]) -> anyhow::Result<()> {
    write_atomic_mode(dir, name, bytes, 0o600)
}

fn write_atomic_mode(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = dir.join(format!("{name}.tmp"));
    let path = dir.join(name);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
}

/// Hex form of an item id, as used in paths and on the command line.
pub fn item_hex(item_id: &[u8; 16]) -> String {
    engine::port::hex(item_id)
}

/// Parses the hex form of an item id.
pub fn parse_item_hex(text: &str) -> anyhow::Result<[u8; 16]> {
    if text.len() != 32 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("item id {text:?} is not 32 hexadecimal digits");
    }
    let mut id = [0u8; 16];
    for (index, byte) in id.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[index * 2..index * 2 + 2], 16)
            .with_context(|| format!("item id {text:?}"))?;
    }
    Ok(id)
}

/// The data directory, locked for this process (one appliance process per data directory).
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
    /// Held while any clone lives; released on drop (flock on `DATA_DIR/lock`).
    _lock: Arc<nix::fcntl::Flock<std::fs::File>>,
}

/// One item's directories.
#[derive(Debug, Clone)]
pub struct ItemDirs {
    /// The item's root.
    pub root: PathBuf,
    /// Its stream header (identity and disks).
    pub header: StreamHeader,
}

impl ItemDirs {
    /// The staging directory.
    pub fn staging(&self) -> anyhow::Result<StdDir> {
        open_dir(&self.root.join("staging"))
    }

    /// The preserve directory.
    pub fn preserve(&self) -> anyhow::Result<StdDir> {
        open_dir(&self.root.join("preserve"))
    }

    /// Path of replica disk `index`.
    pub fn replica_path(&self, index: usize) -> PathBuf {
        self.root.join("replicas").join(format!("disk-{index}.img"))
    }
}

fn open_dir(path: &Path) -> anyhow::Result<StdDir> {
    StdDir::open(path).with_context(|| format!("opening {}", path.display()))
}

impl DataDir {
    /// Opens (creating) the data directory.
    pub fn open(root: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(root.join("items"))
            .with_context(|| format!("creating {}", root.display()))?;
        let lock_path = root.join("lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("opening {}", lock_path.display()))?;
        let lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, errno)| {
                anyhow::anyhow!(
                    "data directory {} is in use by another appliance process ({errno})",
                    root.display()
                )
            })?;
        Ok(Self {
            root: root.to_path_buf(),
            _lock: Arc::new(lock),
        })
    }

    /// Opens the metadata store.
    pub fn meta(&self) -> anyhow::Result<Arc<MetaStore>> {
        let dir = open_dir(&self.root)?;
        let file = dir
            .open("meta.redb", true)
            .with_context(|| format!("opening {}/meta.redb", self.root.display()))?;
        Ok(Arc::new(MetaStore::open(file)?))
    }

    /// The item of `header`, created on first use; refuses a different disk layout.
    pub fn item_for(&self, header: &StreamHeader) -> anyhow::Result<ItemDirs> {
        let hex = item_hex(&header.item_id);
        let root = self.root.join("items").join(&hex);
        let header_path = root.join("header.drs");
        if header_path.exists() {
            let item = self.item(&hex)?;
            if item.header.disks != header.disks {
                bail!(
                    "item {hex} has disks {:?}; this stream declares {:?}",
                    item.header.disks,
                    header.disks
                );
            }
            return Ok(item);
        }
        std::fs::create_dir_all(root.join("replicas"))
            .with_context(|| format!("creating {}", root.display()))?;
        let mut bytes = Vec::new();
        header.encode_into(&mut bytes);
        // Written to a temporary name, synced, then renamed: never a half header.
        let dir = open_dir(&root)?;
        let tmp = dir.open("header.drs.tmp", true)?;
        tmp.write_all_at(0, &bytes)?;
        tmp.sync_data()?;
        std::fs::rename(root.join("header.drs.tmp"), &header_path)
            .with_context(|| format!("creating {}", header_path.display()))?;
        dir.sync()?;
        Ok(ItemDirs {
            root,
            header: header.clone(),
        })
    }

    /// An existing item.
    pub fn item(&self, hex: &str) -> anyhow::Result<ItemDirs> {
        parse_item_hex(hex)?;
        let root = self.root.join("items").join(hex);
        let path = root.join("header.drs");
        let bytes = std::fs::read(&path).with_context(|| {
            format!(
                "item {hex}: no such item in {} ({})",
                self.root.display(),
                path.display()
            )
        })?;
        let decoder = DeltaDecoder::new(bytes.as_slice())
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(ItemDirs {
            root,
            header: decoder.header().clone(),
        })
    }

    /// Every item, by hex id.
    pub fn items(&self) -> anyhow::Result<Vec<ItemDirs>> {
        let mut out = Vec::new();
        let dir = self.root.join("items");
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?
        {
            let name = entry?.file_name();
            if let Some(hex) = name.to_str().filter(|n| parse_item_hex(n).is_ok()) {
                out.push(self.item(hex)?);
            }
        }
        out.sort_by(|a, b| a.root.cmp(&b.root));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_says_each_cause_once() {
        let io = std::io::Error::other("disk on fire");
        let error = anyhow::Error::new(io)
            .context("write at byte 7 failed: disk on fire")
            .context("item 1");
        assert_eq!(
            describe(&error),
            "item 1: write at byte 7 failed: disk on fire"
        );
    }

    #[test]
    fn item_hex_round_trips_and_rejects_garbage() {
        let id = [0xab; 16];
        assert_eq!(parse_item_hex(&item_hex(&id)).unwrap(), id);
        assert!(parse_item_hex("xyz").is_err());
        assert!(parse_item_hex(&"g".repeat(32)).is_err());
    }
}
