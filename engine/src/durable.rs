//! Small synchronous durable files: the seam under the staging log.
//!
//! ```text
//!   StagingLog ──► dyn DurableDir ──┬─► StdDir  (real directory: pwrite, fdatasync, fsync(dir))
//!                                   └─► SimDir  (memory; live vs durable images; crash points)
//! ```
//!
//! Semantics every implementation keeps (and the sim models):
//! - `write_all_at` changes the *live* content only; `sync_data` makes a file's live content
//!   durable; creating, renaming or removing a file is durable only after `sync`.
//! - After a failed `sync_data`, the file is poisoned: every later call fails. Nobody may assume
//!   earlier writes are durable after a failed flush, so the caller must recover from what is
//!   on the media.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::delta::le_u64;

/// 64 KiB of zeros, for writing zeros where no hole can be punched.
pub(crate) static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// A file that can be read, written at offsets and made durable.
pub trait DurableFile: Send + Sync + std::fmt::Debug {
    /// Current length.
    fn len_bytes(&self) -> io::Result<u64>;
    /// Reads exactly `out.len()` bytes at `offset_bytes`.
    fn read_exact_at(&self, offset_bytes: u64, out: &mut [u8]) -> io::Result<()>;
    /// Writes all of `data` at `offset_bytes`.
    fn write_all_at(&self, offset_bytes: u64, data: &[u8]) -> io::Result<()>;
    /// Truncates or extends.
    fn set_len(&self, len_bytes: u64) -> io::Result<()>;
    /// Makes the content durable (fdatasync).
    fn sync_data(&self) -> io::Result<()>;
    /// Makes `[offset, offset+len)` read as zeros, freeing the space where the file system
    /// can (a real file punches a hole); durable like a write, after `sync_data`.
    fn punch_zeroes(&self, offset_bytes: u64, len_bytes: u64) -> io::Result<()> {
        let mut at = offset_bytes;
        let end = offset_bytes.saturating_add(len_bytes);
        while at < end {
            let n = (end - at).min(ZEROS.len() as u64);
            self.write_all_at(at, &ZEROS[..n as usize])?;
            at += n;
        }
        Ok(())
    }
}

/// A directory of durable files.
pub trait DurableDir: Send + Sync + std::fmt::Debug {
    /// Opens a file, creating it when `create` is set.
    fn open(&self, name: &str, create: bool) -> io::Result<Arc<dyn DurableFile>>;
    /// Removes a file.
    fn remove(&self, name: &str) -> io::Result<()>;
    /// Names of the files, sorted.
    fn list(&self) -> io::Result<Vec<String>>;
    /// Makes creations and removals durable (fsync of the directory).
    fn sync(&self) -> io::Result<()>;
}

/// A real directory.
#[derive(Debug, Clone)]
pub struct StdDir {
    path: PathBuf,
}

impl StdDir {
    /// Opens (and creates, mode 0700) the directory.
    pub fn open(path: &Path) -> io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)?;
        Ok(Self {
            path: path.to_path_buf(),
        })
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[derive(Debug)]
struct StdFile {
    file: File,
    poisoned: std::sync::atomic::AtomicBool,
}

impl StdFile {
    fn check(&self) -> io::Result<()> {
        if self.poisoned.load(std::sync::atomic::Ordering::Acquire) {
            return Err(io::Error::other("file poisoned by an earlier failed flush"));
        }
        Ok(())
    }
}

impl DurableFile for StdFile {
    fn len_bytes(&self) -> io::Result<u64> {
        self.check()?;
        Ok(self.file.metadata()?.len())
    }
    fn read_exact_at(&self, offset_bytes: u64, out: &mut [u8]) -> io::Result<()> {
        self.check()?;
        self.file.read_exact_at(out, offset_bytes)
    }
    fn write_all_at(&self, offset_bytes: u64, data: &[u8]) -> io::Result<()> {
        self.check()?;
        self.file.write_all_at(data, offset_bytes)
    }
    fn set_len(&self, len_bytes: u64) -> io::Result<()> {
        self.check()?;
        self.file.set_len(len_bytes)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.check()?;
        self.file.sync_data().inspect_err(|_| {
            self.poisoned
                .store(true, std::sync::atomic::Ordering::Release);
        })
    }
    fn punch_zeroes(&self, offset_bytes: u64, len_bytes: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        self.check()?;
        let (Ok(offset), Ok(len)) = (i64::try_from(offset_bytes), i64::try_from(len_bytes)) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        // SAFETY: fallocate on a descriptor we own for the call; no memory of ours is touched.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let error = io::Error::last_os_error();
        match error.raw_os_error() {
            // No hole punching here: write the zeros.
            Some(libc::EOPNOTSUPP) => {
                let mut at = offset_bytes;
                let end = offset_bytes.saturating_add(len_bytes);
                while at < end {
                    let n = (end - at).min(ZEROS.len() as u64);
                    self.file.write_all_at(&ZEROS[..n as usize], at)?;
                    at += n;
                }
                Ok(())
            }
            _ => Err(error),
        }
    }
}

impl DurableDir for StdDir {
    fn open(&self, name: &str, create: bool) -> io::Result<Arc<dyn DurableFile>> {
        use std::os::unix::fs::OpenOptionsExt;
        // Staging segments, preserved blocks and metadata are VM data: owner only.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .mode(0o600)
            .open(self.path.join(name))?;
        Ok(Arc::new(StdFile {
            file,
            poisoned: false.into(),
        }))
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        std::fs::remove_file(self.path.join(name))
    }
    fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.path)? {
            let entry = entry?;
            if entry.file_type()?.is_file()
                && let Some(name) = entry.file_name().to_str()
            {
                names.push(name.to_owned());
            }
        }
        names.sort();
        Ok(names)
    }
    fn sync(&self) -> io::Result<()> {
        File::open(&self.path)?.sync_all()
    }
}

/// One simulated file: what a reader sees now, and what survives a crash.
#[derive(Debug, Clone, Default)]
struct SimFileState {
    live: Vec<u8>,
    durable: Vec<u8>,
    /// Writes since the last sync, in order: (offset, bytes), for torn crashes.
    pending: Vec<(u64, Vec<u8>)>,
    poisoned: bool,
}

#[derive(Debug, Default)]
struct SimState {
    files: BTreeMap<String, SimFileState>,
    /// Names that exist after a crash (set by `sync` of the directory).
    durable_names: Vec<String>,
    /// Number of sync calls so far (file and directory).
    sync_count: u64,
    /// Crash when `sync_count` reaches this value: the sync does not happen, the image is
    /// taken and every later call fails.
    crash_at_sync: Option<u64>,
    /// Seed for tearing pending writes in the crash image (None: drop them all).
    tear_seed: Option<u64>,
    crash_image: Option<BTreeMap<String, Vec<u8>>>,
    /// Fail this sync call with EIO (a flush failure, not a crash).
    fail_sync_at: Option<u64>,
}

/// An in-memory directory with a crash model, for crash and fault tests.
#[derive(Debug, Clone, Default)]
pub struct SimDir {
    state: Arc<Mutex<SimState>>,
}

impl SimDir {
    /// An empty directory.
    pub fn new() -> Self {
        Self::default()
    }

    /// A directory holding exactly `files` (all durable), e.g. a crash image.
    pub fn from_image(files: BTreeMap<String, Vec<u8>>) -> Self {
        let dir = Self::new();
        {
            let mut state = dir.lock();
            state.durable_names = files.keys().cloned().collect();
            for (name, bytes) in files {
                state.files.insert(
                    name,
                    SimFileState {
                        live: bytes.clone(),
                        durable: bytes,
                        ..SimFileState::default()
                    },
                );
            }
        }
        dir
    }

    fn lock(&self) -> MutexGuard<'_, SimState> {
        // A panic while holding this lock can only come from a test assertion; keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Crash at the `n`th sync call (0-based): it does not happen, a crash image is kept, and
    /// every later call fails. With `tear_seed`, a seeded subset of the pending writes reaches
    /// the image, some of them cut at a 512-byte boundary (a torn write).
    pub fn crash_at_sync(&self, n: u64, tear_seed: Option<u64>) {
        let mut state = self.lock();
        state.crash_at_sync = Some(n);
        state.tear_seed = tear_seed;
    }

    /// Makes the `n`th sync call fail with EIO (and poison the file), without crashing.
    pub fn fail_sync_at(&self, n: u64) {
        self.lock().fail_sync_at = Some(n);
    }

    /// Number of sync calls so far.
    pub fn sync_count(&self) -> u64 {
        self.lock().sync_count
    }

    /// The image a crash left, if one happened.
    pub fn crash_image(&self) -> Option<BTreeMap<String, Vec<u8>>> {
        self.lock().crash_image.clone()
    }

    /// The image a crash *now* would leave, without tearing.
    pub fn durable_image(&self) -> BTreeMap<String, Vec<u8>> {
        let state = self.lock();
        durable_files(&state, None)
    }

    /// The live content of a file.
    pub fn live(&self, name: &str) -> Option<Vec<u8>> {
        self.lock().files.get(name).map(|f| f.live.clone())
    }
}

fn durable_files(state: &SimState, tear_seed: Option<u64>) -> BTreeMap<String, Vec<u8>> {
    let mut rng = tear_seed.map(|seed| seed ^ 0x5bd1_e995);
    let mut next = move || {
        rng.as_mut().map(|s| {
            *s ^= *s << 13;
            *s ^= *s >> 7;
            *s ^= *s << 17;
            *s
        })
    };
    let mut image = BTreeMap::new();
    for name in &state.durable_names {
        let Some(file) = state.files.get(name) else {
            continue;
        };
        let mut bytes = file.durable.clone();
        for (offset, data) in &file.pending {
            let Some(roll) = next() else { break };
            if roll % 3 == 0 {
                continue; // this write never reached the media
            }
            let sectors = data.len().div_ceil(512);
            let kept = if roll % 3 == 1 {
                data.len()
            } else {
                ((roll >> 8) as usize % sectors.max(1)) * 512
            };
            let start = *offset as usize;
            let end = start + kept.min(data.len());
            if bytes.len() < end {
                bytes.resize(end, 0);
            }
            bytes[start..end].copy_from_slice(&data[..end - start]);
        }
        image.insert(name.clone(), bytes);
    }
    image
}

fn crashed() -> io::Error {
    io::Error::other("simulated crash: the process is gone")
}

#[derive(Debug)]
struct SimFile {
    dir: SimDir,
    name: String,
}

impl SimFile {
    fn with<T>(&self, f: impl FnOnce(&mut SimFileState) -> io::Result<T>) -> io::Result<T> {
        let mut state = self.dir.lock();
        if state.crash_image.is_some() {
            return Err(crashed());
        }
        let file = state
            .files
            .get_mut(&self.name)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "sim file removed"))?;
        if file.poisoned {
            return Err(io::Error::other("file poisoned by an earlier failed flush"));
        }
        f(file)
    }
}

/// Counts a sync call; returns Err if it is the crash point or a failing one.
fn sync_point(state: &mut SimState) -> io::Result<()> {
    if state.crash_image.is_some() {
        return Err(crashed());
    }
    let n = state.sync_count;
    state.sync_count += 1;
    if state.crash_at_sync == Some(n) {
        let image = durable_files(state, state.tear_seed);
        state.crash_image = Some(image);
        return Err(crashed());
    }
    if state.fail_sync_at == Some(n) {
        return Err(io::Error::from_raw_os_error(libc::EIO));
    }
    Ok(())
}

impl DurableFile for SimFile {
    fn len_bytes(&self) -> io::Result<u64> {
        self.with(|f| Ok(f.live.len() as u64))
    }
    fn read_exact_at(&self, offset_bytes: u64, out: &mut [u8]) -> io::Result<()> {
        self.with(|f| {
            let start = usize::try_from(offset_bytes).map_err(io::Error::other)?;
            let src = start
                .checked_add(out.len())
                .and_then(|end| f.live.get(start..end))
                .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
            out.copy_from_slice(src);
            Ok(())
        })
    }
    fn write_all_at(&self, offset_bytes: u64, data: &[u8]) -> io::Result<()> {
        self.with(|f| {
            let start = usize::try_from(offset_bytes).map_err(io::Error::other)?;
            let end = start + data.len();
            if f.live.len() < end {
                f.live.resize(end, 0);
            }
            f.live[start..end].copy_from_slice(data);
            f.pending.push((offset_bytes, data.to_vec()));
            Ok(())
        })
    }
    fn set_len(&self, len_bytes: u64) -> io::Result<()> {
        self.with(|f| {
            f.live
                .resize(usize::try_from(len_bytes).map_err(io::Error::other)?, 0);
            // A truncation is metadata: modelled as durable once the file is synced.
            Ok(())
        })
    }
    fn sync_data(&self) -> io::Result<()> {
        let mut state = self.dir.lock();
        let result = sync_point(&mut state);
        let file = state
            .files
            .get_mut(&self.name)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "sim file removed"))?;
        match result {
            Ok(()) if file.poisoned => Err(io::Error::other("file poisoned")),
            Ok(()) => {
                file.durable = file.live.clone();
                file.pending.clear();
                Ok(())
            }
            Err(e) => {
                if e.raw_os_error() == Some(libc::EIO) {
                    file.poisoned = true;
                }
                Err(e)
            }
        }
    }
}

impl DurableDir for SimDir {
    fn open(&self, name: &str, create: bool) -> io::Result<Arc<dyn DurableFile>> {
        let mut state = self.lock();
        if state.crash_image.is_some() {
            return Err(crashed());
        }
        if !state.files.contains_key(name) {
            if !create {
                return Err(io::Error::new(io::ErrorKind::NotFound, name.to_owned()));
            }
            state.files.insert(name.to_owned(), SimFileState::default());
        }
        Ok(Arc::new(SimFile {
            dir: self.clone(),
            name: name.to_owned(),
        }))
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        let mut state = self.lock();
        if state.crash_image.is_some() {
            return Err(crashed());
        }
        state
            .files
            .remove(name)
            .map(|_| ())
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, name.to_owned()))
    }
    fn list(&self) -> io::Result<Vec<String>> {
        let state = self.lock();
        if state.crash_image.is_some() {
            return Err(crashed());
        }
        Ok(state.files.keys().cloned().collect())
    }
    fn sync(&self) -> io::Result<()> {
        let mut state = self.lock();
        sync_point(&mut state)?;
        state.durable_names = state.files.keys().cloned().collect();
        Ok(())
    }
}

/// Reads a little-endian u64 from a durable file (helper for small headers).
pub fn read_u64_at(file: &dyn DurableFile, offset_bytes: u64) -> io::Result<u64> {
    let mut raw = [0u8; 8];
    file.read_exact_at(offset_bytes, &mut raw)?;
    Ok(le_u64(&raw, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sim_crash_keeps_synced_data_and_drops_unsynced() {
        let dir = SimDir::new();
        let file = dir.open("a", true).unwrap();
        file.write_all_at(0, b"durable").unwrap();
        file.sync_data().unwrap();
        dir.sync().unwrap();
        file.write_all_at(7, b"-lost").unwrap();
        dir.crash_at_sync(dir.sync_count(), None);
        assert!(file.sync_data().is_err());
        let image = dir.crash_image().unwrap();
        assert_eq!(image["a"], b"durable");
        assert!(
            file.write_all_at(0, b"x").is_err(),
            "a crashed dir accepts no more I/O"
        );
    }

    #[test]
    fn sim_file_created_but_dir_not_synced_is_gone_after_crash() {
        let dir = SimDir::new();
        let file = dir.open("new", true).unwrap();
        file.write_all_at(0, b"data").unwrap();
        file.sync_data().unwrap();
        assert!(dir.durable_image().is_empty());
        dir.sync().unwrap();
        assert_eq!(dir.durable_image()["new"], b"data");
    }

    #[test]
    fn sim_failed_sync_poisons_the_file() {
        let dir = SimDir::new();
        let file = dir.open("a", true).unwrap();
        file.write_all_at(0, b"x").unwrap();
        dir.fail_sync_at(dir.sync_count());
        assert_eq!(
            file.sync_data().unwrap_err().raw_os_error(),
            Some(libc::EIO)
        );
        assert!(file.sync_data().is_err());
        assert!(file.write_all_at(0, b"y").is_err());
    }

    #[test]
    fn std_dir_round_trips_and_lists() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StdDir::open(tmp.path()).unwrap();
        let file = dir.open("seg", true).unwrap();
        file.write_all_at(4, &7u64.to_le_bytes()).unwrap();
        file.sync_data().unwrap();
        dir.sync().unwrap();
        assert_eq!(read_u64_at(file.as_ref(), 4).unwrap(), 7);
        assert_eq!(dir.list().unwrap(), vec!["seg".to_owned()]);
        dir.remove("seg").unwrap();
        assert!(dir.list().unwrap().is_empty());
    }
}
