//! The on-disk formats: the map file `<name>.cmap` and the activity log `<name>.al`.
//! All integers little-endian; every checksum is xxh3-64 of the bytes before it.
//!
//! `<name>.cmap` (saved whole and atomically: `<name>.cmap.tmp`, fdatasync, rename, fsync
//! of the directory):
//! ```text
//!  0  magic "SAGTCMAP"      8   40  grain bytes     u64
//!  8  version (1)         u32   48  run count n     u64
//! 12  reserved (0)        u32   56  runs: n × (start u64, end u64), sorted, disjoint
//! 16  item id        16 bytes   56+16n  checksum    u64
//! 32  disk size bytes     u64
//! ```
//! `<name>.al`: two slots of equal size (the file's length / 2, a multiple of 4096 so a torn
//! write of one slot cannot reach the other's sectors); each a whole snapshot:
//! ```text
//!  0  magic "SAGENTAL"      8   40  disk size bytes  u64
//!  8  version (1)         u32   48  extent bytes     u64
//! 12  reserved (0)        u32   56  count n          u64
//! 16  generation          u64   64  extent indices: n × u64
//! 24  item id        16 bytes   64+8n  checksum      u64   (then zeros to the slot's end)
//! ```

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::xxh3_64;

use super::ChangeMapError;

/// The map file's magic.
pub(crate) const MAP_MAGIC: &[u8; 8] = b"SAGTCMAP";
/// The activity log slot's magic.
pub(crate) const AL_MAGIC: &[u8; 8] = b"SAGENTAL";
/// The format version of both files.
pub(crate) const VERSION: u32 = 1;
/// Bytes before the runs in the map file.
pub(crate) const MAP_HEADER_BYTES: usize = 56;
/// Bytes before the extent indices in an activity-log slot.
pub(crate) const AL_HEADER_BYTES: usize = 64;
/// Most runs a map file may hold: the largest `max_map_bytes` allowed, at 16 bytes a run.
pub(crate) const MAX_FILE_RUNS: u64 = super::MAX_MAP_BYTES_LIMIT / 16;
/// Most bytes a map file may have.
pub(crate) const MAX_MAP_FILE_BYTES: u64 = MAP_HEADER_BYTES as u64 + MAX_FILE_RUNS * 16 + 8;

/// Bytes of one activity-log slot holding up to `capacity` extents.
pub(crate) fn al_slot_bytes(capacity: u64) -> u64 {
    (AL_HEADER_BYTES as u64 + capacity * 8 + 8).div_ceil(4096) * 4096
}

/// Most bytes an activity-log file may have.
pub(crate) fn max_al_file_bytes() -> u64 {
    2 * al_slot_bytes(u64::from(super::MAX_AL_EXTENTS))
}

fn le_u32(bytes: &[u8], at: usize) -> u32 {
    let mut raw = [0u8; 4];
    raw.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(raw)
}

fn le_u64(bytes: &[u8], at: usize) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(raw)
}

fn item_at(bytes: &[u8], at: usize) -> [u8; 16] {
    let mut item = [0u8; 16];
    item.copy_from_slice(&bytes[at..at + 16]);
    item
}

fn io_error<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> ChangeMapError + 'a {
    move |source| ChangeMapError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

fn corrupt(path: &Path, what: String) -> ChangeMapError {
    ChangeMapError::Corrupt {
        path: path.to_path_buf(),
        what,
    }
}

/// Reads a whole file of at most `cap_bytes` (checked before reading); `None` when absent.
pub(crate) fn read_capped(path: &Path, cap_bytes: u64) -> Result<Option<Vec<u8>>, ChangeMapError> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error(path, "open")(e)),
    };
    let len = file.metadata().map_err(io_error(path, "stat"))?.len();
    if len > cap_bytes {
        return Err(ChangeMapError::TooLarge {
            path: path.to_path_buf(),
            bytes: len,
            limit_bytes: cap_bytes,
        });
    }
    // `len` ≤ cap: the allocation is bounded; `take` guards against the file growing.
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(cap_bytes + 1)
        .read_to_end(&mut bytes)
        .map_err(io_error(path, "read"))?;
    if bytes.len() as u64 > cap_bytes {
        return Err(ChangeMapError::TooLarge {
            path: path.to_path_buf(),
            bytes: bytes.len() as u64,
            limit_bytes: cap_bytes,
        });
    }
    Ok(Some(bytes))
}

/// Fsyncs a directory (after a rename in it).
pub(crate) fn sync_dir(dir: &Path) -> Result<(), ChangeMapError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir, "fsync directory"))
}

/// Writes `bytes` to `path` atomically: `<path>.tmp`, fdatasync, rename, fsync of `dir`.
pub(crate) fn write_atomic(dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), ChangeMapError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(io_error(&tmp, "create"))?;
    file.write_all(bytes).map_err(io_error(&tmp, "write"))?;
    file.sync_data().map_err(io_error(&tmp, "fdatasync"))?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(io_error(path, "rename"))?;
    sync_dir(dir)
}

/// Encodes a map file.
pub(crate) fn encode_map(
    item_id: [u8; 16],
    disk_bytes: u64,
    grain_bytes: u64,
    runs: &[(u64, u64)],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAP_HEADER_BYTES + runs.len() * 16 + 8);
    out.extend_from_slice(MAP_MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&item_id);
    out.extend_from_slice(&disk_bytes.to_le_bytes());
    out.extend_from_slice(&grain_bytes.to_le_bytes());
    out.extend_from_slice(&(runs.len() as u64).to_le_bytes());
    for &(start, end) in runs {
        out.extend_from_slice(&start.to_le_bytes());
        out.extend_from_slice(&end.to_le_bytes());
    }
    let sum = xxh3_64(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    out
}

/// A decoded map file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SavedMap {
    pub(crate) grain_bytes: u64,
    pub(crate) runs: Vec<(u64, u64)>,
}

fn check_identity(
    path: &Path,
    item_id: [u8; 16],
    disk_bytes: u64,
    recorded_item: [u8; 16],
    recorded_bytes: u64,
) -> Result<(), ChangeMapError> {
    if recorded_item != item_id {
        return Err(ChangeMapError::OtherItem {
            path: path.to_path_buf(),
            recorded: hex::encode(recorded_item),
            expected: hex::encode(item_id),
        });
    }
    if recorded_bytes != disk_bytes {
        return Err(ChangeMapError::SizeChanged {
            path: path.to_path_buf(),
            recorded_bytes,
            disk_bytes,
        });
    }
    Ok(())
}

/// Decodes and checks a map file of `item_id`'s disk of `disk_bytes`.
pub(crate) fn decode_map(
    path: &Path,
    bytes: &[u8],
    item_id: [u8; 16],
    disk_bytes: u64,
) -> Result<SavedMap, ChangeMapError> {
    if bytes.len() < MAP_HEADER_BYTES + 8 {
        return Err(corrupt(
            path,
            format!(
                "truncated: {} bytes, a map file has at least {}",
                bytes.len(),
                MAP_HEADER_BYTES + 8
            ),
        ));
    }
    if &bytes[0..8] != MAP_MAGIC {
        return Err(corrupt(path, "not a change map file (magic)".into()));
    }
    let count = le_u64(bytes, 48);
    if count > MAX_FILE_RUNS {
        return Err(ChangeMapError::TooLarge {
            path: path.to_path_buf(),
            bytes: count.saturating_mul(16),
            limit_bytes: MAX_FILE_RUNS * 16,
        });
    }
    let expected = MAP_HEADER_BYTES as u64 + count * 16 + 8;
    if bytes.len() as u64 != expected {
        return Err(corrupt(
            path,
            format!("{} bytes, but {count} runs make {expected}", bytes.len()),
        ));
    }
    let body = bytes.len() - 8;
    if xxh3_64(&bytes[..body]) != le_u64(bytes, body) {
        return Err(corrupt(path, "checksum mismatch".into()));
    }
    let version = le_u32(bytes, 8);
    if version != VERSION {
        return Err(ChangeMapError::Version {
            path: path.to_path_buf(),
            found: version,
            supported: VERSION,
        });
    }
    check_identity(
        path,
        item_id,
        disk_bytes,
        item_at(bytes, 16),
        le_u64(bytes, 32),
    )?;
    let grain_bytes = le_u64(bytes, 40);
    if !grain_bytes.is_power_of_two() || grain_bytes < super::MIN_GRAIN_BYTES {
        return Err(corrupt(
            path,
            format!("grain {grain_bytes} bytes is not a power of two ≥ 4096"),
        ));
    }
    let mut runs = Vec::with_capacity(count as usize);
    let mut previous_end = 0u64;
    for i in 0..count as usize {
        let at = MAP_HEADER_BYTES + i * 16;
        let (start, end) = (le_u64(bytes, at), le_u64(bytes, at + 8));
        let aligned = |v: u64| v.is_multiple_of(super::MIN_GRAIN_BYTES) || v == disk_bytes;
        if start >= end || end > disk_bytes || (i > 0 && start < previous_end) {
            return Err(corrupt(
                path,
                format!("run {i} [{start}, {end}) is empty, past the disk's end or out of order"),
            ));
        }
        if !aligned(start) || !aligned(end) {
            return Err(corrupt(
                path,
                format!("run {i} [{start}, {end}) is not 4096-aligned"),
            ));
        }
        previous_end = end;
        runs.push((start, end));
    }
    Ok(SavedMap { grain_bytes, runs })
}

/// A decoded activity log: its newest valid slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SavedLog {
    pub(crate) generation: u64,
    pub(crate) extent_bytes: u64,
    pub(crate) extents: Vec<u64>,
}

/// One slot: `Ok(None)` when it does not hold a whole snapshot (never written, or torn).
fn decode_slot(
    path: &Path,
    slot: &[u8],
    item_id: [u8; 16],
    disk_bytes: u64,
) -> Result<Option<SavedLog>, ChangeMapError> {
    if slot.len() < AL_HEADER_BYTES + 8 || &slot[0..8] != AL_MAGIC {
        return Ok(None);
    }
    let count = le_u64(slot, 56);
    let capacity = ((slot.len() - AL_HEADER_BYTES - 8) / 8) as u64;
    if count > capacity {
        return Ok(None);
    }
    let body = AL_HEADER_BYTES + count as usize * 8;
    if xxh3_64(&slot[..body]) != le_u64(slot, body) {
        return Ok(None);
    }
    let version = le_u32(slot, 8);
    if version != VERSION {
        return Err(ChangeMapError::Version {
            path: path.to_path_buf(),
            found: version,
            supported: VERSION,
        });
    }
    check_identity(
        path,
        item_id,
        disk_bytes,
        item_at(slot, 24),
        le_u64(slot, 40),
    )?;
    let extent_bytes = le_u64(slot, 48);
    if !extent_bytes.is_power_of_two()
        || !(super::MIN_GRAIN_BYTES..=super::MAX_AL_EXTENT_BYTES).contains(&extent_bytes)
    {
        return Err(corrupt(
            path,
            format!("extent size {extent_bytes} bytes is out of range"),
        ));
    }
    let mut extents = Vec::with_capacity(count as usize);
    for i in 0..count as usize {
        let index = le_u64(slot, AL_HEADER_BYTES + i * 8);
        if index
            .checked_mul(extent_bytes)
            .is_none_or(|offset| offset >= disk_bytes)
        {
            return Err(corrupt(
                path,
                format!("extent {index} lies past the disk's end"),
            ));
        }
        extents.push(index);
    }
    let mut sorted = extents.clone();
    sorted.sort_unstable();
    if let Some(pair) = sorted.windows(2).find(|pair| pair[0] == pair[1]) {
        return Err(corrupt(path, format!("extent {} is listed twice", pair[0])));
    }
    Ok(Some(SavedLog {
        generation: le_u64(slot, 16),
        extent_bytes,
        extents,
    }))
}

/// Decodes an activity log: the valid slot with the highest generation.
pub(crate) fn decode_al(
    path: &Path,
    bytes: &[u8],
    item_id: [u8; 16],
    disk_bytes: u64,
) -> Result<SavedLog, ChangeMapError> {
    let len = bytes.len();
    if len == 0 || !len.is_multiple_of(8192) {
        return Err(corrupt(
            path,
            format!("{len} bytes: an activity log is two slots of a multiple of 4096 bytes"),
        ));
    }
    let (a, b) = bytes.split_at(len / 2);
    let slot_a = decode_slot(path, a, item_id, disk_bytes)?;
    let slot_b = decode_slot(path, b, item_id, disk_bytes)?;
    match (slot_a, slot_b) {
        (Some(a), Some(b)) => Ok(if b.generation > a.generation { b } else { a }),
        (Some(one), None) | (None, Some(one)) => Ok(one),
        (None, None) => Err(corrupt(
            path,
            "neither activity-log slot holds a valid snapshot".into(),
        )),
    }
}

/// The open activity-log file: transactions alternate between its two slots.
#[derive(Debug)]
pub(crate) struct LogFile {
    path: PathBuf,
    file: File,
    slot_bytes: u64,
    /// The slot holding the newest durable snapshot.
    newest_slot: u64,
    generation: u64,
    /// Item id, disk size and extent size, recorded in every slot.
    identity: ([u8; 16], u64, u64),
    buf: Vec<u8>,
}

/// Encodes one slot's snapshot (without the zero padding) into `buf`.
fn encode_slot(
    buf: &mut Vec<u8>,
    generation: u64,
    (item_id, disk_bytes, extent_bytes): ([u8; 16], u64, u64),
    extents: impl Iterator<Item = u64>,
) {
    buf.clear();
    buf.extend_from_slice(AL_MAGIC);
    buf.extend_from_slice(&VERSION.to_le_bytes());
    buf.extend_from_slice(&0u32.to_le_bytes());
    buf.extend_from_slice(&generation.to_le_bytes());
    buf.extend_from_slice(&item_id);
    buf.extend_from_slice(&disk_bytes.to_le_bytes());
    buf.extend_from_slice(&extent_bytes.to_le_bytes());
    buf.extend_from_slice(&0u64.to_le_bytes());
    let mut count = 0u64;
    for index in extents {
        buf.extend_from_slice(&index.to_le_bytes());
        count += 1;
    }
    buf[56..64].copy_from_slice(&count.to_le_bytes());
    let sum = xxh3_64(buf);
    buf.extend_from_slice(&sum.to_le_bytes());
}

impl LogFile {
    /// Creates `path` atomically holding an empty snapshot (generation 1) in slot A and
    /// zeros in slot B, sized for `capacity` extents; opens it for transactions.
    pub(crate) fn create(
        dir: &Path,
        path: &Path,
        item_id: [u8; 16],
        disk_bytes: u64,
        extent_bytes: u64,
        capacity: u64,
    ) -> Result<Self, ChangeMapError> {
        let slot_bytes = al_slot_bytes(capacity);
        let mut whole = Vec::with_capacity(2 * slot_bytes as usize);
        let identity = (item_id, disk_bytes, extent_bytes);
        encode_slot(&mut whole, 1, identity, std::iter::empty());
        whole.resize(2 * slot_bytes as usize, 0);
        write_atomic(dir, path, &whole)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_error(path, "open"))?;
        Ok(LogFile {
            path: path.to_path_buf(),
            file,
            slot_bytes,
            newest_slot: 0,
            generation: 1,
            identity,
            buf: Vec::with_capacity(slot_bytes as usize),
        })
    }

    /// One transaction: writes the snapshot `extents` (at most the capacity) as the next
    /// generation into the slot not holding the newest one, and fdatasyncs. Only after that
    /// returned does the slot become the newest (a failed transaction is retried into the
    /// same slot, so the last good snapshot is never overwritten).
    pub(crate) fn write(
        &mut self,
        extents: impl Iterator<Item = u64>,
    ) -> Result<(), ChangeMapError> {
        encode_slot(&mut self.buf, self.generation + 1, self.identity, extents);
        let target = 1 - self.newest_slot;
        self.file
            .write_all_at(&self.buf, target * self.slot_bytes)
            .map_err(io_error(&self.path, "write activity log"))?;
        self.file
            .sync_data()
            .map_err(io_error(&self.path, "fdatasync activity log"))?;
        self.newest_slot = target;
        self.generation += 1;
        Ok(())
    }
}

#[cfg(test)]
impl LogFile {
    /// Byte offset and size of the slot holding the newest snapshot.
    pub(crate) fn newest_slot_span(&self) -> (u64, u64) {
        (self.newest_slot * self.slot_bytes, self.slot_bytes)
    }
}
