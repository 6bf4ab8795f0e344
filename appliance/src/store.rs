//! The appliance's data directory: where each item's staging log, preserve store and replicas
//! live, the engine's metadata store and the appliance's control store.
//!
//! ```text
//!  DATA_DIR/
//!  ├── meta.redb                         points, watermarks, preserved index, replica identities
//!  │                                     (the engine's: engine::meta)
//!  ├── control.redb                      item records, jobs, the slot table: one transaction
//!  │                                     per lifecycle step (crate::db)
//!  ├── api-token                         the control API's token
//!  ├── lock                              one appliance process per data directory (flock)
//!  └── items/<item id, 32 hex digits>/
//!      ├── header.drs                    the item's stream header: identity and disks
//!      ├── staging/seg-*.drs             the cache staging area (engine::staging)
//!      ├── preserve/pres-*.dat           old blocks kept for recovery points (engine::apply)
//!      ├── replicas/disk-<i>.img         replica disks created by the appliance
//!      ├── token                         the stream token (mode 0600)
//!      └── enabling                      only while enable makes the item (see below)
//! ```
//!
//! The first release kept item records in `items/<id>/item.json`, jobs in `jobs/<id>.json` and
//! the slot table in `slots/slots-{a,b}.page`; `crate::db::migrate_v1` moves them into
//! `control.redb` at the first start.
//!
//! An item directory is created once, from the first stream's header; a later stream for the
//! same item must declare the same disks.
//!
//! VM data is the owner's only: directories are created mode 0700 and files mode 0600. Every
//! directory a record points to is made durable (its parent fsynced) before the record is
//! committed. Enable makes an item in steps (`DataDir::begin_item`: the directory and its
//! `enabling` marker; then the header, replicas, token; then one transaction of the control
//! store with its slots, record and job); a directory found at start with the marker and no
//! record, or with neither header nor record, is what a crash during enable left and is rolled
//! back. A purge renames the directory to `items/.purge-<id>` first,
//! so a crash mid-way never leaves half an item under its own name.

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

/// Now, in ns since the Unix epoch: the workspace's one wall clock, under the name the item
/// manager uses.
pub use engine::clock::now_unix_ns as now_ns;

/// Replaces `dir/name` with `bytes` so that a crash leaves the old or the new content, never
/// a mix: write `name.tmp`, fsync, rename, fsync the directory.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> anyhow::Result<()> {
    write_atomic_mode(dir, name, bytes, 0o600)
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
    sync_dir(dir)
}

/// Makes the entries of directory `dir` durable (fsync of the directory).
pub fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
}

/// Creates `dir` and any missing parents with mode 0700 (an existing directory keeps its
/// mode), and makes the new entry durable in its parent.
pub fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    match dir.parent() {
        Some(parent) => sync_dir(parent),
        None => Ok(()),
    }
}

/// Creates a new empty file `path` with mode 0600 (refusing an existing one).
pub fn create_private_file(path: &Path) -> anyhow::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))
}

/// Name of the marker enable keeps in an item directory until the item's record is written.
pub const ENABLING_MARKER: &str = "enabling";
/// Prefix of an item directory being purged.
const PURGE_PREFIX: &str = ".purge-";

/// Hex form of an item id, as used in paths and on the command line.
pub fn item_hex(item_id: &[u8; 16]) -> String {
    hex::encode(item_id)
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

/// One directory under `items/`, as found at start.
#[derive(Debug)]
pub struct FoundItem {
    /// The item id (the directory's name).
    pub id: [u8; 16],
    /// The directory.
    pub root: PathBuf,
    /// Its header, or why it cannot be read (`Ok(None)`: there is no `header.drs`).
    pub header: Result<Option<StreamHeader>, String>,
    /// Enable's marker is present: enable had not written the record (yet).
    pub enabling: bool,
    /// A file outside the item directory the marker says enable was creating (a temporary
    /// OS disk), to be removed with the item on a rollback.
    pub enabling_creates: Option<PathBuf>,
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
        create_private_dir(&root.join("items"))?;
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

    /// Opens the control store (item records, jobs, slot table), creating it on first use.
    pub fn control(&self) -> anyhow::Result<crate::db::ControlStore> {
        let dir = open_dir(&self.root)?;
        crate::db::ControlStore::open_in(&dir).with_context(|| {
            format!(
                "opening {}/{}",
                self.root.display(),
                crate::db::CONTROL_FILE
            )
        })
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
        create_private_dir(&root)?;
        for sub in ["replicas", "staging", "preserve"] {
            create_private_dir(&root.join(sub))?;
        }
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

    /// Starts a new item for enable: creates its directory (mode 0700, refusing an existing
    /// one) and the `enabling` marker, both durable. [`DataDir::item_for`] then writes the
    /// header.
    pub fn begin_item(&self, item_id: &[u8; 16]) -> anyhow::Result<PathBuf> {
        use std::os::unix::fs::DirBuilderExt;
        let root = self.root.join("items").join(item_hex(item_id));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&root)
            .with_context(|| format!("creating {}", root.display()))?;
        sync_dir(&self.root.join("items"))?;
        create_private_file(&root.join(ENABLING_MARKER))?.sync_all()?;
        sync_dir(&root)?;
        Ok(root)
    }

    /// Records in enable's marker that enable is about to create `path` (outside the item
    /// directory, with `create_new`), so that a rollback after a crash removes it too.
    pub fn note_enabling(&self, root: &Path, path: &Path) -> anyhow::Result<()> {
        use std::os::unix::ffi::OsStrExt;
        write_atomic(root, ENABLING_MARKER, path.as_os_str().as_bytes())
    }

    /// Removes enable's marker once the item's record is written.
    pub fn end_enabling(&self, root: &Path) -> anyhow::Result<()> {
        match std::fs::remove_file(root.join(ENABLING_MARKER)) {
            Ok(()) => sync_dir(root),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing {}", root.display())),
        }
    }

    /// Removes an item directory and everything in it: renamed to `items/.purge-<id>` (durably)
    /// first, so that a crash never leaves part of it under the item's name; a leftover is
    /// removed by [`DataDir::found_items`].
    pub fn purge_item(&self, root: &Path) -> anyhow::Result<()> {
        let items = self.root.join("items");
        let Some(name) = root.file_name().and_then(|n| n.to_str()) else {
            bail!("{} is not an item directory", root.display());
        };
        let trash = items.join(format!("{PURGE_PREFIX}{name}"));
        match std::fs::rename(root, &trash) {
            Ok(()) => sync_dir(&items)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("purging {}", root.display())),
        }
        std::fs::remove_dir_all(&trash).with_context(|| format!("removing {}", trash.display()))?;
        sync_dir(&items)
    }

    /// Every directory under `items/` named by an item id, whatever its state (a damaged or
    /// missing header is reported, not an error); leftovers of an interrupted purge are
    /// removed.
    pub fn found_items(&self) -> anyhow::Result<Vec<FoundItem>> {
        let mut out = Vec::new();
        let dir = self.root.join("items");
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?
        {
            let name = entry?.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with(PURGE_PREFIX) {
                let trash = dir.join(name);
                if let Err(error) = std::fs::remove_dir_all(&trash) {
                    tracing::warn!(path = %trash.display(), %error,
                        "could not finish removing a purged item");
                }
                continue;
            }
            let Ok(id) = parse_item_hex(name) else {
                continue;
            };
            let root = dir.join(name);
            if !root.is_dir() {
                continue;
            }
            let header = match std::fs::read(root.join("header.drs")) {
                Ok(bytes) => DeltaDecoder::new(bytes.as_slice())
                    .map(|decoder| Some(decoder.header().clone()))
                    .map_err(|e| format!("{}/header.drs: {e}", root.display())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(format!("{}/header.drs: cannot read: {e}", root.display())),
            };
            let header = match header {
                Ok(Some(found)) if found.item_id != id => Err(format!(
                    "{}/header.drs names item {}",
                    root.display(),
                    item_hex(&found.item_id)
                )),
                other => other,
            };
            let marker = std::fs::read(root.join(ENABLING_MARKER));
            let enabling_creates = marker.as_ref().ok().filter(|m| !m.is_empty()).map(|m| {
                use std::os::unix::ffi::OsStrExt;
                PathBuf::from(std::ffi::OsStr::from_bytes(m))
            });
            out.push(FoundItem {
                id,
                enabling: marker.is_ok(),
                enabling_creates,
                root,
                header,
            });
        }
        out.sort_by(|a, b| a.root.cmp(&b.root));
        Ok(out)
    }

    /// Where item `id`'s directory is (whether or not it exists).
    pub fn item_root(&self, id: &[u8; 16]) -> PathBuf {
        self.root.join("items").join(item_hex(id))
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
