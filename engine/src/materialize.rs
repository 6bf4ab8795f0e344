//! Materialize: the disks of an item at a recovery point, as new independent files.
//!
//! ```text
//!  for each 1 MiB chunk of the disk:
//!      read it at the point               (export::PointReader, the one point reader:
//!                                          the replica, then preserved grains — see below)
//!      write the chunk to the output, or leave a hole when it is all zeros (sparse)
//! ```
//!
//! Runs while apply continues and changes neither the replicas nor the catalogue. It is
//! correct without stopping apply because apply commits a grain's index entry *before* it
//! overwrites the grain: if the replica read saw new data, the index read that follows sees
//! the entry and the preserved copy wins. Tags below the newest point are frozen (entries are
//! only ever added under the current tag), so they are looked up once; the newest tags are
//! re-read for every chunk. The point is pinned so pruning waits.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use crate::apply::Pins;
use crate::delta::{Consistency, DiskGeometry};
use crate::dirfd::{Dir, DirError, with_suffix};
use crate::durable::DurableDir;
pub use crate::export::DiskReader;
use crate::export::{PointReadError, PointReader};
use crate::meta::{ItemKey, MetaError, MetaStore, PointRecord};

/// Size of the chunks read, overlaid and written.
pub const CHUNK_BYTES: usize = 1 << 20;

/// Which recovery point to materialize (failover and test failover choices).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PointChoice {
    /// Apply everything staged, then the newest state (the caller applies and marks it).
    Latest,
    /// The newest processed point.
    LatestProcessed,
    /// The newest app-consistent point.
    LatestAppConsistent,
    /// A given point id.
    Custom(u64),
}

/// Why materialize failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MaterializeError {
    /// No point matches the choice.
    #[error("no recovery point for {choice}: {available}")]
    NoSuchPoint {
        /// The choice, rendered.
        choice: String,
        /// What exists.
        available: String,
    },
    /// A disk index the item does not have.
    #[error("disk {disk_index} does not exist (the item has {disk_count})")]
    UnknownDisk {
        /// The index.
        disk_index: u16,
        /// How many disks.
        disk_count: usize,
    },
    /// Reading the replica failed.
    #[error("reading replica disk {disk_index} at byte {offset_bytes}")]
    ReadReplica {
        /// Disk.
        disk_index: u16,
        /// Offset.
        offset_bytes: u64,
        /// Error.
        #[source]
        source: io::Error,
    },
    /// Reading a preserved block failed.
    #[error("reading preserved block of disk {disk_index}, grain {grain} (tag {tag})")]
    ReadPreserved {
        /// Disk.
        disk_index: u16,
        /// Grain index.
        grain: u64,
        /// Tag.
        tag: u64,
        /// Error.
        #[source]
        source: io::Error,
    },
    /// Writing the output failed.
    #[error("writing the output at byte {offset_bytes}")]
    Write {
        /// Offset.
        offset_bytes: u64,
        /// Error.
        #[source]
        source: io::Error,
    },
    /// The metadata store failed.
    #[error(transparent)]
    Meta(#[from] MetaError),
    /// Turning the image into a fixed VHD failed.
    #[error(transparent)]
    Vhd(#[from] crate::vhd::VhdError),
    /// The output path is taken.
    #[error("output {path} already exists; materialize never overwrites")]
    Exists {
        /// The path.
        path: std::path::PathBuf,
    },
    /// Creating, renaming or removing an output file through its directory was refused or
    /// failed (an existing name, a symbolic link, a file that is not the one created).
    #[error(transparent)]
    Dir(#[from] DirError),
}

impl From<MaterializeError> for crate::error::Error {
    fn from(e: MaterializeError) -> Self {
        use crate::error::ErrorKind;
        let kind = match &e {
            MaterializeError::ReadReplica { .. }
            | MaterializeError::ReadPreserved { .. }
            | MaterializeError::Write { .. } => ErrorKind::Io,
            MaterializeError::Meta(_) => ErrorKind::Meta,
            _ => ErrorKind::Invalid,
        };
        crate::error::Error::transparent(kind, e)
    }
}

/// The format of a materialized disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// A raw image of the disk's size, sparse where the disk is zero.
    Raw,
    /// A fixed VHD (Hyper-V / Azure): the raw data padded to a 1 MiB multiple, then the
    /// 512-byte footer.
    FixedVhd,
}

impl OutputFormat {
    /// File extension: `raw` or `vhd`.
    pub fn extension(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::FixedVhd => "vhd",
        }
    }
}

/// [`materialize_disk`] into a new file at `path` in `format`: [`materialize_in_dir`] in
/// `path`'s directory, opened as the system resolves it (a path an operator gave).
pub fn materialize_to_path(
    source: &Source<'_>,
    point_id: u64,
    disk_index: u16,
    replica: &dyn DiskReader,
    path: &std::path::Path,
    format: OutputFormat,
    progress: &mut dyn FnMut(u64),
) -> Result<MaterializeStats, MaterializeError> {
    let name = path.file_name().ok_or_else(|| DirError::BadName {
        path: path.to_path_buf(),
        why: "names no file",
    })?;
    let parent = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let dir = Dir::open(parent)?;
    materialize_in_dir(
        source, point_id, disk_index, replica, &dir, name, format, progress,
    )
}

/// [`materialize_disk`] into the new file `name` of `dir` in `format`. The image is built in
/// `<name>.partial`, created with `O_EXCL | O_NOFOLLOW` (never an existing name, never
/// through a link), then renamed to `name` without replacing anything that has it
/// (`RENAME_NOREPLACE`) and the directory synced, so `name` is either absent or whole. On an
/// error the temporary file is removed if it is still the one created.
#[allow(clippy::too_many_arguments)]
pub fn materialize_in_dir(
    source: &Source<'_>,
    point_id: u64,
    disk_index: u16,
    replica: &dyn DiskReader,
    dir: &Dir,
    name: &OsStr,
    format: OutputFormat,
    progress: &mut dyn FnMut(u64),
) -> Result<MaterializeStats, MaterializeError> {
    if dir.entry_id(name)?.is_some() {
        return Err(MaterializeError::Exists {
            path: dir.path().join(name),
        });
    }
    let tmp = with_suffix(name, ".partial");
    let (out, id) = dir.create_new(&tmp)?;
    let result = materialize_new_file(
        source,
        point_id,
        disk_index,
        replica,
        &out,
        &dir.path().join(&tmp),
        format,
        progress,
    )
    .and_then(|stats| {
        drop(out);
        dir.rename_new(&tmp, id, name)?;
        dir.sync()?;
        Ok(stats)
    });
    if result.is_err()
        && let Err(error) = dir.remove_ours(&tmp, &[id])
    {
        tracing::warn!(error = %crate::error::report(&error), "could not remove a partial image");
    }
    result
}

/// [`materialize_disk`] into `out`, a new file open for reading and writing, then (for a
/// fixed VHD) its footer: the whole image, durable. `path` only names it in errors.
#[allow(clippy::too_many_arguments)]
pub fn materialize_new_file(
    source: &Source<'_>,
    point_id: u64,
    disk_index: u16,
    replica: &dyn DiskReader,
    out: &File,
    path: &std::path::Path,
    format: OutputFormat,
    progress: &mut dyn FnMut(u64),
) -> Result<MaterializeStats, MaterializeError> {
    let stats = materialize_disk(source, point_id, disk_index, replica, out, progress)?;
    if format == OutputFormat::FixedVhd {
        crate::vhd::convert_open_raw_to_fixed_vhd(
            out,
            path,
            &crate::vhd::VhdCreateOptions::generate(),
        )?;
    }
    Ok(stats)
}

/// Starts the kernel's writeback of a materialized image window by window while the next
/// windows are read, so the closing fsync finds little left to write (and dirty memory stays
/// bounded to about two windows). Only a hint: errors are ignored here, the final fsync
/// reports any real one.
#[derive(Debug, Default)]
struct Writeback {
    /// Start of the window not yet handed to writeback.
    window_start: u64,
    /// The window handed to writeback last, not yet waited for.
    in_flight: Option<(u64, u64)>,
}

impl Writeback {
    const WINDOW_BYTES: u64 = 8 << 20;

    fn advance(&mut self, out: &File, written_to: u64) {
        if written_to - self.window_start < Self::WINDOW_BYTES {
            return;
        }
        let window = (self.window_start, written_to - self.window_start);
        sync_range(out, window, libc::SYNC_FILE_RANGE_WRITE);
        if let Some(previous) = self.in_flight.replace(window) {
            sync_range(
                out,
                previous,
                libc::SYNC_FILE_RANGE_WAIT_BEFORE
                    | libc::SYNC_FILE_RANGE_WRITE
                    | libc::SYNC_FILE_RANGE_WAIT_AFTER,
            );
        }
        self.window_start = written_to;
    }
}

/// `sync_file_range(2)` over `(start, len)`; the result is ignored (a hint, see [`Writeback`]).
fn sync_range(out: &File, (start, len): (u64, u64), flags: libc::c_uint) {
    use std::os::fd::AsRawFd;
    let (Ok(start), Ok(len)) = (i64::try_from(start), i64::try_from(len)) else {
        return;
    };
    // SAFETY: the descriptor stays open for the call (borrowed from `out`), and the kernel
    // reads or writes no memory of ours.
    let _ = unsafe { libc::sync_file_range(out.as_raw_fd(), start, len, flags) };
}

/// What materialize reads from.
#[derive(Debug, Clone)]
pub struct Source<'a> {
    /// The store.
    pub meta: &'a MetaStore,
    /// The item.
    pub item: ItemKey,
    /// Its disks.
    pub disks: &'a [DiskGeometry],
    /// The item's preserve directory.
    pub preserve_dir: Arc<dyn DurableDir>,
    /// Preservation granularity (as apply used).
    pub grain_bytes: u32,
    /// The item's pins (shared with its applier).
    pub pins: Pins,
}

/// What one disk's materialize did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MaterializeStats {
    /// Bytes of the disk.
    pub size_bytes: u64,
    /// Bytes written to the output (the rest are holes).
    pub bytes_written: u64,
    /// Grains taken from the preserve store.
    pub grains_preserved: u64,
}

/// Resolves a choice other than [`PointChoice::Latest`] to a point of the catalogue.
pub fn resolve_point(
    meta: &MetaStore,
    item: ItemKey,
    choice: PointChoice,
) -> Result<PointRecord, MaterializeError> {
    let points = meta.points(item)?;
    let found = match choice {
        PointChoice::Latest | PointChoice::LatestProcessed => points.last().cloned(),
        PointChoice::LatestAppConsistent => points
            .iter()
            .rev()
            .find(|p| p.consistency == Consistency::App)
            .cloned(),
        PointChoice::Custom(id) => points.iter().find(|p| p.point_id == id).cloned(),
    };
    found.ok_or_else(|| MaterializeError::NoSuchPoint {
        choice: format!("{choice:?}"),
        available: match (points.first(), points.last()) {
            (Some(first), Some(last)) => format!(
                "{} points, ids {}..={}, {} app-consistent",
                points.len(),
                first.point_id,
                last.point_id,
                points
                    .iter()
                    .filter(|p| p.consistency == Consistency::App)
                    .count()
            ),
            _ => "the item has no recovery points yet".into(),
        },
    })
}

/// Writes disk `disk_index` as it was at `point_id` to `out` as a raw, sparse image of the
/// disk's size, and makes it durable. `progress` is called with the bytes done so far.
pub fn materialize_disk(
    source: &Source<'_>,
    point_id: u64,
    disk_index: u16,
    replica: &dyn DiskReader,
    out: &File,
    progress: &mut dyn FnMut(u64),
) -> Result<MaterializeStats, MaterializeError> {
    let disk = *source
        .disks
        .get(usize::from(disk_index))
        .ok_or(MaterializeError::UnknownDisk {
            disk_index,
            disk_count: source.disks.len(),
        })?;
    let _pin = source.pins.pin(point_id);
    // The point must still exist once pinned (it may have been pruned just before).
    if source.meta.point(source.item, point_id)?.is_none() {
        return Err(MaterializeError::NoSuchPoint {
            choice: format!("Custom({point_id})"),
            available: "it was pruned or never existed".into(),
        });
    }
    let from_point = |error: PointReadError| match error {
        PointReadError::Replica {
            offset_bytes,
            source,
        } => MaterializeError::ReadReplica {
            disk_index,
            offset_bytes,
            source,
        },
        PointReadError::Preserved { grain, tag, source } => MaterializeError::ReadPreserved {
            disk_index,
            grain,
            tag,
            source,
        },
        PointReadError::Meta(e) => MaterializeError::Meta(e),
    };
    let reader = PointReader::new(
        source.meta,
        source.item,
        disk_index,
        disk.size_bytes,
        point_id,
        source.grain_bytes,
        source.preserve_dir.clone(),
    )
    .map_err(from_point)?;
    let write_err = |offset_bytes| {
        move |source| MaterializeError::Write {
            offset_bytes,
            source,
        }
    };
    out.set_len(0).map_err(write_err(0))?;
    out.set_len(disk.size_bytes).map_err(write_err(0))?;
    let mut stats = MaterializeStats {
        size_bytes: disk.size_bytes,
        ..MaterializeStats::default()
    };
    let mut writeback = Writeback::default();
    let mut chunk = vec![0u8; CHUNK_BYTES];
    let mut scratch = Vec::new();
    let mut offset_bytes = 0u64;
    while offset_bytes < disk.size_bytes {
        let len = (disk.size_bytes - offset_bytes).min(CHUNK_BYTES as u64) as usize;
        let buf = &mut chunk[..len];
        stats.grains_preserved += reader
            .read(source.meta, replica, offset_bytes, buf, &mut scratch)
            .map_err(from_point)?;
        if buf.iter().any(|&b| b != 0) {
            out.write_all_at(buf, offset_bytes)
                .map_err(write_err(offset_bytes))?;
            stats.bytes_written += len as u64;
        }
        offset_bytes += len as u64;
        writeback.advance(out, offset_bytes);
        progress(offset_bytes);
    }
    out.sync_all().map_err(write_err(disk.size_bytes))?;
    Ok(stats)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    //! The output file's creation: never through a link planted at the final or the temporary
    //! name, never over a file that appears at the final name while the image is written.
    use super::*;
    use crate::durable::StdDir;
    use crate::meta::{PointOrigin, item_key};
    use std::os::unix::fs::{PermissionsExt, symlink};
    use std::path::Path;

    const DISK_BYTES: u64 = 3 << 20;

    struct Rig {
        _tmp: tempfile::TempDir,
        root: std::path::PathBuf,
        meta: MetaStore,
        replica: Vec<u8>,
        disks: Vec<DiskGeometry>,
        preserve: Arc<dyn DurableDir>,
    }

    /// An item with one point (id 7) whose disk is `replica` (nothing preserved since).
    fn rig() -> Rig {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        let store = StdDir::open(&root.join("store")).unwrap();
        let meta = MetaStore::open(store.open("meta.redb", true).unwrap()).unwrap();
        let point = PointRecord {
            point_id: 7,
            consistency: Consistency::Crash,
            origin: PointOrigin::Bookmark,
            bookmark_id: 1,
            source_timestamp_ns: 1,
            processed_at_ns: 1,
            label: "p".into(),
        };
        meta.checkpoint(item_key(&[1; 16]), 7, 7, Some(&point))
            .unwrap();
        let replica: Vec<u8> = (0..DISK_BYTES).map(|i| (i % 251) as u8).collect();
        Rig {
            _tmp: tmp,
            preserve: Arc::new(StdDir::open(&root.join("preserve")).unwrap()),
            root,
            meta,
            replica,
            disks: vec![DiskGeometry {
                size_bytes: DISK_BYTES,
                block_size_bytes: 4096,
            }],
        }
    }

    impl Rig {
        fn source(&self) -> Source<'_> {
            Source {
                meta: &self.meta,
                item: item_key(&[1; 16]),
                disks: &self.disks,
                preserve_dir: self.preserve.clone(),
                grain_bytes: 4096,
                pins: crate::apply::Pins::default(),
            }
        }

        /// A directory `out` and a file outside it that must never change.
        fn dirs(&self) -> (std::path::PathBuf, std::path::PathBuf) {
            let out = self.root.join("out");
            std::fs::create_dir(&out).unwrap();
            let victim = self.root.join("victim");
            std::fs::write(&victim, b"outside").unwrap();
            (out, victim)
        }

        fn run(
            &self,
            path: &Path,
            progress: &mut dyn FnMut(u64),
        ) -> Result<MaterializeStats, MaterializeError> {
            materialize_to_path(
                &self.source(),
                7,
                0,
                &self.replica,
                path,
                OutputFormat::Raw,
                progress,
            )
        }
    }

    fn assert_exists_error(result: Result<MaterializeStats, MaterializeError>, name: &str) {
        match result {
            Err(MaterializeError::Exists { path })
            | Err(MaterializeError::Dir(DirError::Exists { path }))
                if path.ends_with(name) => {}
            other => panic!("expected `{name} already exists`, got {other:?}"),
        }
    }

    #[test]
    fn writes_the_image_owner_only_and_leaves_no_temporary_file() {
        let rig = rig();
        let (out, _) = rig.dirs();
        let stats = rig.run(&out.join("disk-0.raw"), &mut |_| {}).unwrap();
        assert_eq!(stats.size_bytes, DISK_BYTES);
        assert!(std::fs::read(out.join("disk-0.raw")).unwrap() == rig.replica);
        let mode = std::fs::metadata(out.join("disk-0.raw"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            std::fs::read_dir(&out).unwrap().count(),
            1,
            "no .partial left"
        );
    }

    #[test]
    fn a_link_at_the_temporary_name_is_not_followed() {
        let rig = rig();
        let (out, victim) = rig.dirs();
        symlink(&victim, out.join("disk-0.raw.partial")).unwrap();
        let dangling = rig.root.join("made-through-a-link");
        symlink(&dangling, out.join("disk-1.raw.partial")).unwrap();
        assert_exists_error(
            rig.run(&out.join("disk-0.raw"), &mut |_| {}),
            "disk-0.raw.partial",
        );
        assert_exists_error(
            rig.run(&out.join("disk-1.raw"), &mut |_| {}),
            "disk-1.raw.partial",
        );
        assert_eq!(std::fs::read(&victim).unwrap(), b"outside");
        assert!(
            !dangling.exists(),
            "nothing created through the dangling link"
        );
        for name in ["disk-0.raw.partial", "disk-1.raw.partial"] {
            assert!(
                out.join(name).is_symlink(),
                "{name} is still the planted link"
            );
        }
        assert!(!out.join("disk-0.raw").exists() && !out.join("disk-1.raw").exists());
    }

    #[test]
    fn a_link_at_the_final_name_is_not_followed_or_replaced() {
        let rig = rig();
        let (out, victim) = rig.dirs();
        symlink(&victim, out.join("disk-0.raw")).unwrap();
        let dangling = rig.root.join("made-through-a-link");
        symlink(&dangling, out.join("disk-1.raw")).unwrap();
        assert_exists_error(rig.run(&out.join("disk-0.raw"), &mut |_| {}), "disk-0.raw");
        assert_exists_error(rig.run(&out.join("disk-1.raw"), &mut |_| {}), "disk-1.raw");
        assert_eq!(std::fs::read(&victim).unwrap(), b"outside");
        assert!(!dangling.exists());
        assert!(out.join("disk-0.raw").is_symlink() && out.join("disk-1.raw").is_symlink());
        assert_eq!(
            std::fs::read_dir(&out).unwrap().count(),
            2,
            "no .partial left"
        );
    }

    #[test]
    fn a_file_that_appears_at_the_final_name_while_writing_is_not_replaced() {
        let rig = rig();
        let (out, victim) = rig.dirs();
        let target = out.join("disk-0.raw");
        let mut planted = false;
        let result = rig.run(&target, &mut |_| {
            if !planted {
                planted = true;
                std::fs::write(&target, b"appeared").unwrap();
            }
        });
        assert!(planted);
        assert_exists_error(result, "disk-0.raw");
        assert_eq!(std::fs::read(&target).unwrap(), b"appeared");
        assert_eq!(std::fs::read(&victim).unwrap(), b"outside");
        assert!(
            !out.join("disk-0.raw.partial").exists(),
            "the temporary file removed"
        );

        // The same with a link appearing at the final name.
        let second = out.join("disk-1.raw");
        let mut linked = false;
        let result = rig.run(&second, &mut |_| {
            if !linked {
                linked = true;
                symlink(&victim, &second).unwrap();
            }
        });
        assert_exists_error(result, "disk-1.raw");
        assert!(second.is_symlink());
        assert_eq!(std::fs::read(&victim).unwrap(), b"outside");
        assert!(!out.join("disk-1.raw.partial").exists());
    }

    #[test]
    fn a_temporary_file_swapped_for_a_link_while_writing_is_neither_renamed_nor_removed() {
        let rig = rig();
        let (out, victim) = rig.dirs();
        let partial = out.join("disk-0.raw.partial");
        let mut swapped = false;
        let result = rig.run(&out.join("disk-0.raw"), &mut |_| {
            if !swapped {
                swapped = true;
                // Made first, so it cannot reuse the temporary file's inode number.
                symlink(&victim, out.join("swap")).unwrap();
                std::fs::rename(out.join("swap"), &partial).unwrap();
            }
        });
        assert!(
            matches!(result, Err(MaterializeError::Dir(DirError::NotOurs { .. }))),
            "{result:?}"
        );
        assert_eq!(std::fs::read(&victim).unwrap(), b"outside");
        assert!(partial.is_symlink(), "the planted link is left alone");
        assert!(!out.join("disk-0.raw").exists());
    }
}
