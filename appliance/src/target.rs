//! Target directories of the disk-writing jobs (test failover, failover, change point).
//!
//! The rules (`docs/design/control-api.md`, "Target directories"):
//! - the directory is opened once, at the request, component by component without following
//!   symbolic links ([`engine::dirfd::Dir`]); every file is made, renamed and removed through
//!   that handle, so nothing a job does can land outside it;
//! - a job owns its directory while it runs: a second job into the same directory (same device
//!   and inode, whatever path names it) is refused with 409 `target_dir_busy`
//!   ([`crate::jobs::Jobs::target_dir_holder`]);
//! - a job creates its temporary files (`disk-N.<ext>.partial`) at the request with
//!   `O_EXCL | O_NOFOLLOW` and records their identities (device, inode) in the item's record
//!   before it answers; it publishes them with `RENAME_NOREPLACE` (test failover, failover)
//!   or, for change point, in place of the files the failover recorded (`RENAME_EXCHANGE`,
//!   checked), so it never replaces a file it did not create;
//! - clean-up (a failed job, test-failover clean-up, a job interrupted by a restart) removes
//!   only names whose identity is one the job recorded, and the directory only if the job
//!   created it and it is empty.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use engine::dirfd::{Dir, DirError, FileId};
use engine::error::report;

use appliance_api::model::{FileIdentity, WrittenFile};

/// The identity of `id`, as records keep it.
pub fn file_identity(id: FileId) -> FileIdentity {
    FileIdentity {
        dev: id.dev,
        ino: id.ino,
        birth_ns: id.birth_ns,
    }
}

/// The engine's file id of a recorded identity.
pub fn file_id(id: FileIdentity) -> FileId {
    FileId {
        dev: id.dev,
        ino: id.ino,
        birth_ns: id.birth_ns,
    }
}

/// The identity of a file a job recorded it wrote.
pub fn written_id(written: &WrittenFile) -> FileId {
    FileId {
        dev: written.dev,
        ino: written.ino,
        birth_ns: written.birth_ns,
    }
}

/// The name of disk `index`'s file: `disk-<index>.<extension>`.
pub fn disk_file_name(index: u32, extension: &str) -> String {
    format!("disk-{index}.{extension}")
}

/// The temporary name a disk file is written under.
pub fn partial_name(name: &str) -> String {
    format!("{name}.partial")
}

/// Fails with [`DirError::Exists`] if any of `names` exists in `dir` (a link counts).
pub fn check_absent(dir: &Dir, names: &[String]) -> Result<(), DirError> {
    for name in names {
        if dir.entry_id(OsStr::new(name))?.is_some() {
            return Err(DirError::Exists {
                path: dir.path().join(name),
            });
        }
    }
    Ok(())
}

/// The file names of the disks with these indices and `extension` (`raw`, `vhd`), in order.
pub fn disk_names(disk_indices: impl IntoIterator<Item = u32>, extension: &str) -> Vec<String> {
    disk_indices
        .into_iter()
        .map(|index| disk_file_name(index, extension))
        .collect()
}

/// A temporary file a job created and fills.
#[derive(Debug)]
pub struct Temp {
    /// Open for reading and writing.
    pub file: File,
    /// Its name in the directory.
    pub name: String,
    /// Its identity.
    pub id: FileId,
}

impl Temp {
    /// As recorded.
    pub fn written(&self) -> WrittenFile {
        WrittenFile {
            name: self.name.clone(),
            dev: self.id.dev,
            ino: self.id.ino,
            birth_ns: self.id.birth_ns,
        }
    }
}

/// A target directory opened for one job, and the temporary files it made there.
#[derive(Debug)]
pub struct Target {
    /// The directory.
    pub dir: Arc<Dir>,
    /// Whether the request made it.
    pub created_dir: bool,
    /// One per disk, in disk order.
    pub temps: Vec<Temp>,
}

impl Target {
    /// Creates one temporary file per name (`<name>.partial`, which must not exist, a link
    /// included). On an error whatever was created is removed, and the directory too if
    /// `created_dir` (see [`Target::abandon`]).
    pub fn create_temps(
        dir: Arc<Dir>,
        created_dir: bool,
        names: &[String],
    ) -> Result<Self, DirError> {
        let mut target = Self {
            dir,
            created_dir,
            temps: Vec::with_capacity(names.len()),
        };
        let created = (|| {
            for name in names {
                let temp = partial_name(name);
                let (file, id) = target.dir.create_new(OsStr::new(&temp))?;
                target.temps.push(Temp {
                    file,
                    name: temp,
                    id,
                });
            }
            target.dir.sync()
        })();
        match created {
            Ok(()) => Ok(target),
            Err(error) => {
                target.abandon();
                Err(error)
            }
        }
    }

    /// Removes what [`Target::create_temps`] made: the temporary files and the directory if
    /// it was made for the job (and is empty).
    pub fn abandon(&self) {
        self.discard(&[]);
        if self.created_dir {
            for left in remove_recorded(
                &self.dir.path().display().to_string(),
                Some(file_identity(self.dir.id())),
                &[],
                &[],
                true,
            ) {
                tracing::warn!(%left, "a target directory made for a refused job was left");
            }
        }
    }

    /// The temporary files as recorded.
    pub fn written(&self) -> Vec<WrittenFile> {
        self.temps.iter().map(Temp::written).collect()
    }

    /// Renames each temporary file to its final name (never over an existing name), syncs
    /// the directory and checks it is still the one at its path. Returns the files under
    /// their final names.
    pub fn publish_new(&self, names: &[String]) -> Result<Vec<WrittenFile>, DirError> {
        let mut published = Vec::with_capacity(names.len());
        for (temp, name) in self.temps.iter().zip(names) {
            self.dir
                .rename_new(OsStr::new(&temp.name), temp.id, OsStr::new(name))?;
            published.push(WrittenFile {
                name: name.clone(),
                ..temp.written()
            });
        }
        self.dir.sync()?;
        self.check_still_at_path()?;
        Ok(published)
    }

    /// Fails unless the directory's path still opens (without links) to this directory: the
    /// file list a job reports must be true by path.
    pub fn check_still_at_path(&self) -> Result<(), DirError> {
        let now = Dir::open_nofollow(self.dir.path(), false).map(|(dir, _)| dir.id());
        match now {
            Ok(id) if id == self.dir.id() => Ok(()),
            Ok(id) => Err(DirError::NotOurs {
                path: self.dir.path().to_path_buf(),
                expected: self.dir.id(),
                found: format!("another directory ({id}); it was moved or replaced"),
            }),
            Err(error) => Err(DirError::NotOurs {
                path: self.dir.path().to_path_buf(),
                expected: self.dir.id(),
                found: format!("no directory there now ({})", report(&error)),
            }),
        }
    }

    /// Removes, through the handle, every file of this job's at its temporary names and at
    /// `names` (the final names); anything else there is left alone.
    pub fn discard(&self, names: &[String]) {
        let ids: Vec<FileId> = self.temps.iter().map(|t| t.id).collect();
        let candidates = self
            .temps
            .iter()
            .map(|t| t.name.as_str())
            .chain(names.iter().map(String::as_str));
        for name in candidates {
            if let Err(error) = self.dir.remove_ours(OsStr::new(name), &ids) {
                tracing::warn!(error = %report(&error), "could not remove a job's file");
            }
        }
        if let Err(error) = self.dir.sync() {
            tracing::warn!(error = %report(&error), "could not sync a target directory");
        }
    }
}

/// Removes what a job recorded in `target_dir` (identity `dir_id`): every name in `written`
/// and `other_names` whose identity is one of `written`'s; then the directory itself if
/// `created_dir` and it is empty. The directory is reopened by path without following links
/// and must still be the recorded one; otherwise nothing is removed. Returns what was left
/// and why (for the log), empty when all went.
pub fn remove_recorded(
    target_dir: &str,
    dir_id: Option<FileIdentity>,
    written: &[WrittenFile],
    other_names: &[String],
    created_dir: bool,
) -> Vec<String> {
    let mut left = Vec::new();
    let Some(dir_id) = dir_id.map(file_id) else {
        if !written.is_empty() || !other_names.is_empty() {
            left.push(format!(
                "{target_dir}: recorded without file identities (an older version); its files \
                 are left for the operator"
            ));
        }
        return left;
    };
    let path = Path::new(target_dir);
    let dir = match Dir::open_nofollow(path, false) {
        Ok((dir, _)) if dir.id() == dir_id => dir,
        Ok(_) => {
            left.push(format!(
                "{target_dir} is no longer the directory the job wrote: nothing removed"
            ));
            return left;
        }
        Err(error) if error.is_not_found() => return left,
        Err(error) => {
            left.push(format!("{}: nothing removed", report(&error)));
            return left;
        }
    };
    let ids: Vec<FileId> = written.iter().map(written_id).collect();
    let mut names: Vec<OsString> = written
        .iter()
        .map(|w| OsString::from(&w.name))
        .chain(other_names.iter().map(OsString::from))
        .collect();
    names.sort();
    names.dedup();
    for name in &names {
        if let Err(error) = dir.remove_ours(name, &ids) {
            left.push(report(&error));
        }
    }
    if let Err(error) = dir.sync() {
        left.push(report(&error));
    }
    if created_dir && let (Some(parent), Some(name)) = (path.parent(), path.file_name()) {
        let removed = Dir::open_nofollow(parent, false).and_then(|(parent, _)| {
            let removed = parent.remove_dir_if_empty(name, dir_id)?;
            parent.sync()?;
            Ok(removed)
        });
        if let Err(error) = removed {
            left.push(report(&error));
        }
    }
    left
}
