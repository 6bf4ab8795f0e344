//! Files created in directories that others may write to, without trusting any name in them.
//!
//! ```text
//!  open the directory once      each component from `/` with O_DIRECTORY | O_NOFOLLOW
//!  create a file                openat(dir, name, O_CREAT | O_EXCL | O_NOFOLLOW): never an
//!                               existing name, never through a link; its (dev, inode) recorded
//!  publish it                   renameat2(RENAME_NOREPLACE): never over an existing name
//!  replace a file we made       renameat2(RENAME_EXCHANGE), then the displaced file must be
//!                               the one recorded (else exchanged back), then unlinked
//!  remove                       only a name whose (dev, inode) is one recorded
//! ```
//!
//! Every name is resolved in the opened directory, so renaming or replacing the directory's
//! path (or a parent's) after it was opened changes nothing about where files go. A symbolic
//! link is never followed: planted at a file's name it makes creation fail ([`DirError::Exists`]),
//! planted at a directory's path it makes opening fail ([`DirError::Symlink`]).

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags, RenameFlags, StatxFlags};
use rustix::io::Errno;

/// Mode of the directories made here (owner only: they hold VM disks).
pub const DIR_MODE: u32 = 0o700;
/// Mode of the files made here (owner only).
pub const FILE_MODE: u32 = 0o600;

/// A file's identity: device, inode number and birth time, as `statx` reports them. The birth
/// time tells a file from a later one that reuses a freed inode number at the same name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileId {
    /// Device (`makedev(stx_dev_major, stx_dev_minor)`, as `st_dev`).
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
    /// Birth time, ns since the Unix epoch; 0 where the filesystem does not report one.
    pub birth_ns: u64,
}

impl std::fmt::Display for FileId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "dev {} inode {} born {} ns",
            self.dev, self.ino, self.birth_ns
        )
    }
}

impl FileId {
    /// The identity of `name` in `dirfd` (with `flags`; `""` and `AT_EMPTY_PATH` for `dirfd`
    /// itself).
    fn at(dirfd: impl AsFd, name: &OsStr, flags: AtFlags) -> Result<Self, Errno> {
        let btime = StatxFlags::BTIME;
        let stx = rustix::fs::statx(dirfd, name, flags, StatxFlags::BASIC_STATS | btime)?;
        let birth_ns = if stx.stx_mask & btime.bits() != 0 {
            (stx.stx_btime.tv_sec as u64)
                .wrapping_mul(1_000_000_000)
                .wrapping_add(u64::from(stx.stx_btime.tv_nsec))
        } else {
            0
        };
        Ok(Self {
            dev: rustix::fs::makedev(stx.stx_dev_major, stx.stx_dev_minor),
            ino: stx.stx_ino,
            birth_ns,
        })
    }

    fn of_fd(fd: impl AsFd) -> Result<Self, Errno> {
        Self::at(fd, OsStr::new(""), AtFlags::EMPTY_PATH)
    }
}

/// Why a directory operation was refused or failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DirError {
    /// A component of a directory path is a symbolic link.
    #[error("{path} is a symbolic link; links are never followed here")]
    Symlink {
        /// The path up to the link.
        path: PathBuf,
    },
    /// A component of a directory path is not a directory.
    #[error("{path} is not a directory")]
    NotADirectory {
        /// The path up to it.
        path: PathBuf,
    },
    /// The path is not absolute, contains `..`, or a name is not a single component.
    #[error("{path:?}: {why}")]
    BadName {
        /// The path or name.
        path: PathBuf,
        /// What is wrong with it.
        why: &'static str,
    },
    /// Something (a file, a directory, a symbolic link) already has the name.
    #[error("{path} already exists; an existing name is never replaced")]
    Exists {
        /// The taken name.
        path: PathBuf,
    },
    /// The name no longer refers to the file that was created or recorded.
    #[error("{path} is not the file that was recorded ({expected}); found {found}")]
    NotOurs {
        /// The name.
        path: PathBuf,
        /// The recorded identity.
        expected: FileId,
        /// What is there now.
        found: String,
    },
    /// A system call failed.
    #[error("{op} {path}")]
    Io {
        /// The operation.
        op: &'static str,
        /// Its path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

impl DirError {
    /// Whether the error says that the path does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }

    fn io(op: &'static str, path: PathBuf, errno: Errno) -> Self {
        Self::Io {
            op,
            path,
            source: errno.into(),
        }
    }
}

/// An opened directory; every operation names files relative to it.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
    id: FileId,
}

impl Dir {
    /// Opens the absolute `path` one component at a time from `/`, each with
    /// `O_DIRECTORY | O_NOFOLLOW`, so a symbolic link anywhere in it is refused. With `create`,
    /// missing components are made ([`DIR_MODE`]). Returns the directory and whether its last
    /// component was made here.
    pub fn open_nofollow(path: &Path, create: bool) -> Result<(Self, bool), DirError> {
        let bad = |why| DirError::BadName {
            path: path.to_path_buf(),
            why,
        };
        let mut components = path.components();
        if components.next() != Some(Component::RootDir) {
            return Err(bad("must be an absolute path"));
        }
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let mut walked = PathBuf::from("/");
        let mut fd = rustix::fs::open("/", flags, Mode::empty())
            .map_err(|e| DirError::io("open", walked.clone(), e))?;
        let mut created = false;
        for component in components {
            let name = match component {
                Component::Normal(name) => name,
                Component::CurDir => continue,
                _ => return Err(bad("must not contain \"..\"")),
            };
            walked.push(name);
            created = false;
            let next = match rustix::fs::openat(&fd, name, flags, Mode::empty()) {
                Err(Errno::NOENT) if create => {
                    match rustix::fs::mkdirat(&fd, name, Mode::from_raw_mode(DIR_MODE)) {
                        Ok(()) => created = true,
                        // Made by someone else meanwhile: opened below like any other.
                        Err(Errno::EXIST) => {}
                        Err(e) => return Err(DirError::io("mkdir", walked, e)),
                    }
                    rustix::fs::openat(&fd, name, flags, Mode::empty())
                }
                other => other,
            };
            fd = match next {
                Ok(next) => next,
                Err(Errno::LOOP | Errno::NOTDIR) => {
                    return Err(classify(&fd, name, walked));
                }
                Err(e) => return Err(DirError::io("open", walked, e)),
            };
        }
        let id = FileId::of_fd(&fd).map_err(|e| DirError::io("stat", walked.clone(), e))?;
        Ok((
            Self {
                fd,
                path: walked,
                id,
            },
            created,
        ))
    }

    /// Opens `path` as the system resolves it (symbolic links followed): for a path an
    /// operator gave on the command line. Files are then made in it like in any [`Dir`].
    pub fn open(path: &Path) -> Result<Self, DirError> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let fd = rustix::fs::open(path, flags, Mode::empty())
            .map_err(|e| DirError::io("open", path.to_path_buf(), e))?;
        let id = FileId::of_fd(&fd).map_err(|e| DirError::io("stat", path.into(), e))?;
        Ok(Self {
            fd,
            path: path.to_path_buf(),
            id,
        })
    }

    /// The directory's identity.
    pub fn id(&self) -> FileId {
        self.id
    }

    /// The path it was opened by (for messages; nothing is resolved through it again).
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn named(&self, name: &OsStr) -> Result<PathBuf, DirError> {
        let single = Path::new(name).components().count() == 1
            && matches!(
                Path::new(name).components().next(),
                Some(Component::Normal(_))
            );
        if !single || name.as_encoded_bytes().contains(&b'/') {
            return Err(DirError::BadName {
                path: name.into(),
                why: "must be one file name",
            });
        }
        Ok(self.path.join(name))
    }

    /// The identity of what has `name` here (a symbolic link is not followed), or `None`.
    pub fn entry_id(&self, name: &OsStr) -> Result<Option<FileId>, DirError> {
        let path = self.named(name)?;
        match FileId::at(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(id) => Ok(Some(id)),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(DirError::io("stat", path, e)),
        }
    }

    /// Creates a new empty file `name` ([`FILE_MODE`], open for reading and writing); fails
    /// with [`DirError::Exists`] if anything has the name (a symbolic link included).
    pub fn create_new(&self, name: &OsStr) -> Result<(File, FileId), DirError> {
        let path = self.named(name)?;
        let flags =
            OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = match rustix::fs::openat(&self.fd, name, flags, Mode::from_raw_mode(FILE_MODE)) {
            Ok(fd) => fd,
            Err(Errno::EXIST) => return Err(DirError::Exists { path }),
            Err(e) => return Err(DirError::io("create", path, e)),
        };
        let id = FileId::of_fd(&fd).map_err(|e| DirError::io("stat", path, e))?;
        Ok((File::from(fd), id))
    }

    /// Opens our file `name` (identity `id`) for reading and writing, never through a symbolic
    /// link; anything else with the name (or nothing) is [`DirError::NotOurs`].
    pub fn open_ours(&self, name: &OsStr, id: FileId) -> Result<File, DirError> {
        let path = self.named(name)?;
        let flags = OFlags::RDWR | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = match rustix::fs::openat(&self.fd, name, flags, Mode::empty()) {
            Ok(fd) => fd,
            // A symbolic link (ELOOP) or nothing: not the file recorded.
            Err(Errno::LOOP | Errno::NOENT) => {
                return Err(DirError::NotOurs {
                    path,
                    expected: id,
                    found: "not that file".into(),
                });
            }
            Err(e) => return Err(DirError::io("open", path, e)),
        };
        let found = FileId::of_fd(&fd).map_err(|e| DirError::io("stat", path.clone(), e))?;
        if found != id {
            return Err(DirError::NotOurs {
                path,
                expected: id,
                found: found.to_string(),
            });
        }
        Ok(File::from(fd))
    }

    /// Fails unless `name` is the file `id`.
    pub fn check_ours(&self, name: &OsStr, id: FileId) -> Result<(), DirError> {
        match self.entry_id(name)? {
            Some(found) if found == id => Ok(()),
            found => Err(DirError::NotOurs {
                path: self.named(name)?,
                expected: id,
                found: found.map_or("nothing".into(), |f| f.to_string()),
            }),
        }
    }

    /// Renames our file `from` (identity `id`) to the new name `to`; fails with
    /// [`DirError::Exists`] if anything has `to` (it is never replaced).
    pub fn rename_new(&self, from: &OsStr, id: FileId, to: &OsStr) -> Result<(), DirError> {
        let to_path = self.named(to)?;
        self.check_ours(from, id)?;
        match rustix::fs::renameat_with(&self.fd, from, &self.fd, to, RenameFlags::NOREPLACE) {
            Ok(()) => {}
            Err(Errno::EXIST) => return Err(DirError::Exists { path: to_path }),
            Err(e) => return Err(DirError::io("rename", to_path, e)),
        }
        // What now has the name must be what was renamed (nothing swapped it meanwhile).
        self.check_ours(to, id)
    }

    /// Puts our new file `from` (identity `from_id`) in the place of `to`, which must be the
    /// file `to_id` recorded earlier; the displaced file is then removed. If `to` is anything
    /// else, it is put back and left alone ([`DirError::NotOurs`]).
    pub fn replace_ours(
        &self,
        from: &OsStr,
        from_id: FileId,
        to: &OsStr,
        to_id: FileId,
    ) -> Result<(), DirError> {
        let to_path = self.named(to)?;
        self.check_ours(from, from_id)?;
        self.check_ours(to, to_id)?;
        rustix::fs::renameat_with(&self.fd, from, &self.fd, to, RenameFlags::EXCHANGE)
            .map_err(|e| DirError::io("exchange", to_path.clone(), e))?;
        // `from` now has what `to` had: it must be the recorded file.
        if let Err(error) = self.check_ours(from, to_id) {
            let undo =
                rustix::fs::renameat_with(&self.fd, from, &self.fd, to, RenameFlags::EXCHANGE);
            if let Err(e) = undo {
                tracing::error!(path = %to_path.display(), error = %e, "could not exchange back");
            }
            return Err(error);
        }
        self.remove_ours(from, &[to_id])?;
        Ok(())
    }

    /// Removes `name` if it is one of the files `ids`; returns whether it did. Anything else
    /// with the name (or nothing) is left alone.
    pub fn remove_ours(&self, name: &OsStr, ids: &[FileId]) -> Result<bool, DirError> {
        let path = self.named(name)?;
        match self.entry_id(name)? {
            Some(found) if ids.contains(&found) => {
                match rustix::fs::unlinkat(&self.fd, name, AtFlags::empty()) {
                    Ok(()) | Err(Errno::NOENT) => Ok(true),
                    Err(e) => Err(DirError::io("remove", path, e)),
                }
            }
            _ => Ok(false),
        }
    }

    /// Removes the subdirectory `name` if it is the directory `id` and empty; returns whether
    /// it did.
    pub fn remove_dir_if_empty(&self, name: &OsStr, id: FileId) -> Result<bool, DirError> {
        let path = self.named(name)?;
        if self.entry_id(name)? != Some(id) {
            return Ok(false);
        }
        match rustix::fs::unlinkat(&self.fd, name, AtFlags::REMOVEDIR) {
            Ok(()) => Ok(true),
            Err(Errno::NOTEMPTY | Errno::EXIST | Errno::NOENT) => Ok(false),
            Err(e) => Err(DirError::io("remove", path, e)),
        }
    }

    /// Makes the directory's entries durable (after creations, renames, removals).
    pub fn sync(&self) -> Result<(), DirError> {
        rustix::fs::fsync(&self.fd).map_err(|e| DirError::io("fsync", self.path.clone(), e))
    }
}

impl AsFd for Dir {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Names the reason `name` in `parent` could not be opened as a directory.
fn classify(parent: &OwnedFd, name: &OsStr, path: PathBuf) -> DirError {
    match rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(stat) if rustix::fs::FileType::from_raw_mode(stat.st_mode).is_symlink() => {
            DirError::Symlink { path }
        }
        _ => DirError::NotADirectory { path },
    }
}

/// `name` with `suffix` appended.
pub fn with_suffix(name: &OsStr, suffix: &str) -> OsString {
    let mut out = name.to_owned();
    out.push(suffix);
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::symlink;

    fn os(s: &str) -> &OsStr {
        OsStr::new(s)
    }

    #[test]
    fn open_nofollow_refuses_a_link_at_the_directory_and_at_a_parent() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        let root = tmp.path().canonicalize().unwrap();
        symlink(&outside, root.join("link")).unwrap();
        for path in [root.join("link"), root.join("link/sub")] {
            for create in [false, true] {
                let error = Dir::open_nofollow(&path, create).unwrap_err();
                assert!(
                    matches!(&error, DirError::Symlink { path } if path.ends_with("link")),
                    "{error}"
                );
            }
        }
        assert_eq!(
            std::fs::read_dir(&outside).unwrap().count(),
            0,
            "nothing made outside"
        );
        std::fs::write(root.join("file"), b"x").unwrap();
        let error = Dir::open_nofollow(&root.join("file/sub"), true).unwrap_err();
        assert!(matches!(error, DirError::NotADirectory { .. }), "{error}");
        let error = Dir::open_nofollow(Path::new("relative"), false).unwrap_err();
        assert!(matches!(error, DirError::BadName { .. }), "{error}");
        assert!(
            Dir::open_nofollow(&root.join("missing"), false)
                .unwrap_err()
                .is_not_found()
        );
        let (made, created) = Dir::open_nofollow(&root.join("a/b"), true).unwrap();
        assert!(created);
        let (again, created) = Dir::open_nofollow(&root.join("a/b"), true).unwrap();
        assert!(!created);
        assert_eq!(made.id(), again.id());
    }

    #[test]
    fn open_ours_opens_only_the_recorded_file_never_through_a_link() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        let dir = Dir::open(&root).unwrap();
        let (mut file, id) = dir.create_new(os("disk-0.raw")).unwrap();
        file.write_all(b"ours").unwrap();
        let mut opened = dir.open_ours(os("disk-0.raw"), id).unwrap();
        opened.write_all(b"OURS").unwrap();
        assert_eq!(std::fs::read(root.join("disk-0.raw")).unwrap(), b"OURS");
        // Another file at the name, a link to ours, a link elsewhere, nothing: refused.
        std::fs::rename(root.join("disk-0.raw"), root.join("moved")).unwrap();
        std::fs::write(root.join("disk-0.raw"), b"other").unwrap();
        let victim = root.join("victim");
        std::fs::write(&victim, b"outside").unwrap();
        symlink(root.join("moved"), root.join("link-ours")).unwrap();
        symlink(&victim, root.join("link-victim")).unwrap();
        for name in ["disk-0.raw", "link-ours", "link-victim", "missing"] {
            let error = dir.open_ours(os(name), id).unwrap_err();
            assert!(matches!(error, DirError::NotOurs { .. }), "{name}: {error}");
        }
        assert_eq!(std::fs::read(&victim).unwrap(), b"outside");
    }

    #[test]
    fn create_new_never_follows_or_reuses_a_name() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        let victim = root.join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        std::fs::create_dir(root.join("d")).unwrap();
        symlink(&victim, root.join("d/link")).unwrap();
        symlink(root.join("nowhere"), root.join("d/dangling")).unwrap();
        std::fs::write(root.join("d/file"), b"theirs").unwrap();
        let (dir, _) = Dir::open_nofollow(&root.join("d"), false).unwrap();
        for name in ["link", "dangling", "file"] {
            let error = dir.create_new(os(name)).unwrap_err();
            assert!(matches!(error, DirError::Exists { .. }), "{name}: {error}");
        }
        assert!(
            !root.join("nowhere").exists(),
            "the dangling link was not followed"
        );
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert!(matches!(
            dir.create_new(os("../escape")).unwrap_err(),
            DirError::BadName { .. }
        ));
        let (mut file, id) = dir.create_new(os("new")).unwrap();
        file.write_all(b"ours").unwrap();
        assert_eq!(dir.entry_id(os("new")).unwrap(), Some(id));
    }

    #[test]
    fn rename_new_never_replaces_and_checks_what_it_renames() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, _) = Dir::open_nofollow(&tmp.path().canonicalize().unwrap(), false).unwrap();
        let (_file, id) = dir.create_new(os("t.partial")).unwrap();
        std::fs::write(tmp.path().join("t"), b"appeared").unwrap();
        let error = dir.rename_new(os("t.partial"), id, os("t")).unwrap_err();
        assert!(matches!(error, DirError::Exists { .. }), "{error}");
        assert_eq!(std::fs::read(tmp.path().join("t")).unwrap(), b"appeared");
        // Our temporary replaced by someone else's link (made first: another inode): not
        // renamed.
        symlink("/etc/passwd", tmp.path().join("swap")).unwrap();
        std::fs::rename(tmp.path().join("swap"), tmp.path().join("t.partial")).unwrap();
        let error = dir.rename_new(os("t.partial"), id, os("u")).unwrap_err();
        assert!(matches!(error, DirError::NotOurs { .. }), "{error}");
        assert!(
            std::fs::symlink_metadata(tmp.path().join("t.partial"))
                .unwrap()
                .is_symlink()
        );
        assert!(!tmp.path().join("u").exists());
        let (_file, id) = dir.create_new(os("v.partial")).unwrap();
        dir.rename_new(os("v.partial"), id, os("v")).unwrap();
        assert_eq!(dir.entry_id(os("v")).unwrap(), Some(id));
        assert_eq!(dir.entry_id(os("v.partial")).unwrap(), None);
    }

    #[test]
    fn replace_ours_replaces_only_the_recorded_file() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, _) = Dir::open_nofollow(&tmp.path().canonicalize().unwrap(), false).unwrap();
        let (mut old, old_id) = dir.create_new(os("disk")).unwrap();
        old.write_all(b"old").unwrap();
        let (mut new, new_id) = dir.create_new(os("disk.partial")).unwrap();
        new.write_all(b"new").unwrap();
        dir.replace_ours(os("disk.partial"), new_id, os("disk"), old_id)
            .unwrap();
        assert_eq!(std::fs::read(tmp.path().join("disk")).unwrap(), b"new");
        assert!(
            !tmp.path().join("disk.partial").exists(),
            "the old file removed"
        );

        // The name now holds someone else's file (made first: another inode): left as it
        // is, ours not moved.
        std::fs::write(tmp.path().join("swap"), b"theirs").unwrap();
        std::fs::rename(tmp.path().join("swap"), tmp.path().join("disk")).unwrap();
        let (_next, next_id) = dir.create_new(os("disk.partial")).unwrap();
        let error = dir
            .replace_ours(os("disk.partial"), next_id, os("disk"), new_id)
            .unwrap_err();
        assert!(matches!(error, DirError::NotOurs { .. }), "{error}");
        assert_eq!(std::fs::read(tmp.path().join("disk")).unwrap(), b"theirs");
        assert_eq!(dir.entry_id(os("disk.partial")).unwrap(), Some(next_id));
    }

    #[test]
    fn a_later_file_that_reuses_the_inode_number_is_not_ours() {
        // Inode numbers are reused at once on ext4 (tmpfs never reuses them): try the system's
        // temporary directory and the workspace's target directory.
        let roots = [
            std::env::temp_dir(),
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
        ];
        let mut checked = 0;
        for root in roots.iter().filter(|r| r.is_dir()) {
            let tmp = tempfile::tempdir_in(root).unwrap();
            let (dir, _) = Dir::open_nofollow(&tmp.path().canonicalize().unwrap(), false).unwrap();
            let (file, ours) = dir.create_new(os("disk")).unwrap();
            drop(file); // closed, so that removing it frees the inode
            for _ in 0..100 {
                std::fs::remove_file(tmp.path().join("disk")).unwrap();
                let (_theirs, id) = dir.create_new(os("disk")).unwrap();
                if id.ino == ours.ino {
                    if ours.birth_ns != 0 {
                        assert_ne!(id, ours, "a reused inode number passed for our file");
                        assert!(!dir.remove_ours(os("disk"), &[ours]).unwrap());
                        checked += 1;
                    }
                    break;
                }
            }
        }
        eprintln!("{checked} filesystems reused an inode number and were checked");
    }

    #[test]
    fn remove_ours_removes_only_recorded_files_and_dirs() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        let (dir, _) = Dir::open_nofollow(&root, false).unwrap();
        let (_file, id) = dir.create_new(os("mine")).unwrap();
        std::fs::write(root.join("theirs"), b"x").unwrap();
        symlink(root.join("mine"), root.join("link")).unwrap();
        assert!(!dir.remove_ours(os("theirs"), &[id]).unwrap());
        assert!(
            !dir.remove_ours(os("link"), &[id]).unwrap(),
            "a link to ours is not ours"
        );
        assert!(!dir.remove_ours(os("absent"), &[id]).unwrap());
        assert!(dir.remove_ours(os("mine"), &[id]).unwrap());
        assert!(root.join("theirs").exists() && root.join("link").is_symlink());

        let (sub, created) = Dir::open_nofollow(&root.join("sub"), true).unwrap();
        assert!(created);
        let (_f, _) = sub.create_new(os("f")).unwrap();
        assert!(
            !dir.remove_dir_if_empty(os("sub"), sub.id()).unwrap(),
            "not empty"
        );
        std::fs::remove_file(root.join("sub/f")).unwrap();
        assert!(
            !dir.remove_dir_if_empty(os("sub"), id).unwrap(),
            "another identity"
        );
        assert!(dir.remove_dir_if_empty(os("sub"), sub.id()).unwrap());
        assert!(!root.join("sub").exists());
    }
}
