//! Replica disks: opened only when they are the disk the engine recorded.
//!
//! ```text
//!  open_replica(path) ─► stat: (dev, ino, birth time) of a file, (0, rdev) of a device
//!                    ─► size (file length / BLKGETSIZE64 via seek) and logical block size
//!                    ─► first attach: size must equal the declared size; identity recorded
//!                    ─► later opens: identity, size and block size must equal the record
//! ```
//!
//! A replica that was replaced (another inode or device), resized or truncated behind the
//! engine's back is refused with an error naming the disk, the path and what differs; it is
//! never written. [`verify_replica`] repeats the check on an open replica (apply calls for it
//! before each checkpoint in the appliance).

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::delta::DiskGeometry;
use crate::io::{DirectIo, OpenError, ReplicaFile};
use crate::meta::{ItemKey, MetaError, MetaStore, ReplicaIdentity};

/// Why a replica disk was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplicaError {
    /// The file or device could not be opened.
    #[error("replica disk {disk_index}")]
    Open {
        /// Disk index.
        disk_index: u16,
        /// Why.
        #[source]
        source: OpenError,
    },
    /// Its size is not the declared (or recorded) size.
    #[error(
        "replica disk {disk_index} at {path}: size is {found_bytes} bytes, expected \
         {expected_bytes} (resized or truncated?)"
    )]
    SizeMismatch {
        /// Disk index.
        disk_index: u16,
        /// Path.
        path: PathBuf,
        /// Expected size.
        expected_bytes: u64,
        /// Size found.
        found_bytes: u64,
    },
    /// Its logical block size is not the declared one.
    #[error(
        "replica disk {disk_index} at {path}: logical block size {found_bytes}, expected \
         {expected_bytes}"
    )]
    BlockSizeMismatch {
        /// Disk index.
        disk_index: u16,
        /// Path.
        path: PathBuf,
        /// Expected.
        expected_bytes: u32,
        /// Found.
        found_bytes: u32,
    },
    /// Another file or device now sits at the path.
    #[error(
        "replica disk {disk_index} at {path} was replaced: recorded device {recorded_dev} inode \
         {recorded_ino} (or its birth time) differs from device {found_dev} inode {found_ino}"
    )]
    Replaced {
        /// Disk index.
        disk_index: u16,
        /// Path.
        path: PathBuf,
        /// Recorded `st_dev`.
        recorded_dev: u64,
        /// Recorded `st_ino` (or `st_rdev` of a block device).
        recorded_ino: u64,
        /// Found `st_dev`.
        found_dev: u64,
        /// Found `st_ino` (or `st_rdev`).
        found_ino: u64,
    },
    /// Stat failed (the file is gone, for example).
    #[error("replica disk {disk_index} at {path}")]
    Stat {
        /// Disk index.
        disk_index: u16,
        /// Path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The metadata store failed.
    #[error(transparent)]
    Meta(#[from] MetaError),
}

/// Identity of what is at `path` now.
fn identity_of(
    path: &Path,
    disk_index: u16,
    size_bytes: u64,
    block_size_bytes: u32,
) -> Result<ReplicaIdentity, ReplicaError> {
    let meta = std::fs::metadata(path).map_err(|source| ReplicaError::Stat {
        disk_index,
        path: path.to_path_buf(),
        source,
    })?;
    let (dev, ino) = if meta.file_type().is_block_device() {
        (0, meta.rdev())
    } else {
        (meta.dev(), meta.ino())
    };
    let birth_ns = rustix::fs::statx(
        rustix::fs::CWD,
        path,
        rustix::fs::AtFlags::empty(),
        rustix::fs::StatxFlags::BTIME,
    )
    .ok()
    .filter(|stx| stx.stx_mask & rustix::fs::StatxFlags::BTIME.bits() != 0)
    .map_or(0, |stx| {
        (stx.stx_btime.tv_sec as u64).wrapping_mul(1_000_000_000) + u64::from(stx.stx_btime.tv_nsec)
    });
    Ok(ReplicaIdentity {
        size_bytes,
        block_size_bytes,
        dev,
        ino,
        birth_ns,
    })
}

/// Opens replica disk `disk_index` of `item` at `path` for apply, checking it against the
/// declared geometry and, after the first attach, against the recorded identity.
pub fn open_replica(
    meta: &MetaStore,
    item: ItemKey,
    disk_index: u16,
    path: &Path,
    geometry: DiskGeometry,
    direct: DirectIo,
) -> Result<ReplicaFile, ReplicaError> {
    let mut file = ReplicaFile::open(path, direct)
        .map_err(|source| ReplicaError::Open { disk_index, source })?;
    if direct == DirectIo::Prefer
        && file.is_direct()
        && file.alignment_bytes() > geometry.block_size_bytes
    {
        // O_DIRECT here needs larger aligned writes than this disk's blocks (a 512-byte disk
        // on a 4 KiB-sector device or filesystem): buffered I/O writes any block correctly.
        tracing::warn!(
            disk_index,
            path = %path.display(),
            alignment_bytes = file.alignment_bytes(),
            block_size_bytes = geometry.block_size_bytes,
            "O_DIRECT alignment exceeds the disk's block size: buffered I/O for this replica"
        );
        file = ReplicaFile::open(path, DirectIo::Off)
            .map_err(|source| ReplicaError::Open { disk_index, source })?;
    }
    verify_replica(meta, item, disk_index, &file, geometry)?;
    Ok(file)
}

/// Checks an open replica against the declared geometry and the recorded identity; records
/// the identity on first use.
pub fn verify_replica(
    meta: &MetaStore,
    item: ItemKey,
    disk_index: u16,
    file: &ReplicaFile,
    geometry: DiskGeometry,
) -> Result<(), ReplicaError> {
    let path = file.path();
    let size_bytes = file.len_bytes().map_err(|source| ReplicaError::Stat {
        disk_index,
        path: path.to_path_buf(),
        source,
    })?;
    let found = identity_of(path, disk_index, size_bytes, geometry.block_size_bytes)?;
    if file.is_direct() && file.alignment_bytes() > geometry.block_size_bytes {
        return Err(ReplicaError::BlockSizeMismatch {
            disk_index,
            path: path.to_path_buf(),
            expected_bytes: geometry.block_size_bytes,
            found_bytes: file.alignment_bytes(),
        });
    }
    match meta.replica(item, disk_index)? {
        Some(recorded) => {
            if (recorded.dev, recorded.ino, recorded.birth_ns)
                != (found.dev, found.ino, found.birth_ns)
            {
                return Err(ReplicaError::Replaced {
                    disk_index,
                    path: path.to_path_buf(),
                    recorded_dev: recorded.dev,
                    recorded_ino: recorded.ino,
                    found_dev: found.dev,
                    found_ino: found.ino,
                });
            }
            if recorded.size_bytes != found.size_bytes {
                return Err(ReplicaError::SizeMismatch {
                    disk_index,
                    path: path.to_path_buf(),
                    expected_bytes: recorded.size_bytes,
                    found_bytes: found.size_bytes,
                });
            }
            Ok(())
        }
        None => {
            if found.size_bytes != geometry.size_bytes {
                return Err(ReplicaError::SizeMismatch {
                    disk_index,
                    path: path.to_path_buf(),
                    expected_bytes: geometry.size_bytes,
                    found_bytes: found.size_bytes,
                });
            }
            meta.set_replica(item, disk_index, &found)?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::durable::{DurableDir, SimDir};

    fn setup() -> (tempfile::TempDir, MetaStore, DiskGeometry) {
        let tmp = tempfile::tempdir().unwrap();
        let meta = MetaStore::open(SimDir::new().open("m", true).unwrap()).unwrap();
        let geometry = DiskGeometry {
            size_bytes: 1 << 20,
            block_size_bytes: 4096,
        };
        (tmp, meta, geometry)
    }

    #[test]
    fn replica_of_wrong_size_is_refused_and_nothing_recorded() {
        let (tmp, meta, geometry) = setup();
        let path = tmp.path().join("r0.img");
        std::fs::write(&path, vec![7u8; 512 << 10]).unwrap();
        let err = open_replica(&meta, 1, 0, &path, geometry, DirectIo::Prefer).unwrap_err();
        assert!(
            matches!(err, ReplicaError::SizeMismatch { found_bytes, expected_bytes, .. }
                if found_bytes == 512 << 10 && expected_bytes == 1 << 20),
            "{err}"
        );
        assert_eq!(meta.replica(1, 0).unwrap(), None);
        assert_eq!(
            std::fs::read(&path).unwrap(),
            vec![7u8; 512 << 10],
            "not touched"
        );
    }

    #[test]
    fn replica_truncated_or_replaced_after_attach_is_refused() {
        let (tmp, meta, geometry) = setup();
        let path = tmp.path().join("r0.img");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(geometry.size_bytes)
            .unwrap();
        open_replica(&meta, 1, 0, &path, geometry, DirectIo::Prefer).unwrap();
        // Truncated behind the engine's back.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(4096)
            .unwrap();
        let err = open_replica(&meta, 1, 0, &path, geometry, DirectIo::Prefer).unwrap_err();
        assert!(matches!(err, ReplicaError::SizeMismatch { .. }), "{err}");
        // Replaced by another file of the right size.
        std::fs::remove_file(&path).unwrap();
        let other = tmp.path().join("other.img");
        std::fs::File::create(&other)
            .unwrap()
            .set_len(geometry.size_bytes)
            .unwrap();
        std::fs::rename(&other, &path).unwrap();
        let err = open_replica(&meta, 1, 0, &path, geometry, DirectIo::Prefer).unwrap_err();
        assert!(matches!(err, ReplicaError::Replaced { .. }), "{err}");
        assert!(err.to_string().contains("was replaced"));
        // Deleted.
        std::fs::remove_file(&path).unwrap();
        let err = open_replica(&meta, 1, 0, &path, geometry, DirectIo::Prefer).unwrap_err();
        assert!(matches!(err, ReplicaError::Open { .. }), "{err}");
    }
}
