//! A drill's writes: a sparse data file the disk's size plus a durable log of the grains it
//! covers; the replica and the preserve store are never written.
//!
//! Files `<stem>.ovl` (data at the disk's offsets) and `<stem>.map` (a 32-byte header, then
//! 32-byte records, each naming a run of newly covered grains; see
//! `docs/design/recovery-points.md`, "Exports and overlays"). A covered grain reads from the
//! data file (holes read zeros), an uncovered one from the base (the point). FLUSH: fdatasync
//! the data file, then append the records of the grains covered since the last flush and
//! fdatasync the map, so a record never names a grain whose data is not durable.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::durable::{DurableDir, DurableFile};

use super::ExportError;

/// The map file's magic (header).
pub const MAP_MAGIC: &[u8; 8] = b"DROVMAP1";
/// A record's magic.
pub const RECORD_MAGIC: &[u8; 4] = b"OVRC";
/// Header and record size.
pub const RECORD_BYTES: usize = 32;
/// Seed of the records' xxh3 checksums.
const CHECKSUM_SEED: u64 = 0x6f76_6572_6c61_7931;
/// Stripes of the per-grain read-modify-write locks.
const STRIPES: usize = 64;

/// Reads the base (the point under the overlay).
pub type BaseRead<'a> = &'a dyn Fn(u64, &mut [u8]) -> Result<(), ExportError>;

#[derive(Debug)]
struct OverlayState {
    stem: String,
    size_bytes: u64,
    grain_bytes: u64,
    grain_count: u64,
    data: Arc<dyn DurableFile>,
    map: Arc<dyn DurableFile>,
    /// One bit per grain: covered (reads from the data file).
    covered: Box<[AtomicU64]>,
    covered_count: AtomicU64,
    /// Read-modify-write of a partial grain, by grain % STRIPES; each owns a grain buffer.
    stripes: Vec<Mutex<Vec<u8>>>,
    /// Grains newly covered since the last flush (their data is written, not yet synced).
    pending: Mutex<Vec<u64>>,
    /// The map's length: held by one flush at a time, across its syncs (by design).
    log: Mutex<u64>,
    /// A grain of zeros.
    zeros: Vec<u8>,
}

/// A drill's writes (a cheap handle: clones share the files and the map).
#[derive(Debug, Clone)]
pub struct Overlay(Arc<OverlayState>);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn data_name(stem: &str) -> String {
    format!("{stem}.ovl")
}

fn map_name(stem: &str) -> String {
    format!("{stem}.map")
}

fn checksum(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(bytes, CHECKSUM_SEED)
}

fn header(size_bytes: u64, grain_bytes: u32) -> [u8; RECORD_BYTES] {
    let mut h = [0u8; RECORD_BYTES];
    h[0..8].copy_from_slice(MAP_MAGIC);
    h[8..12].copy_from_slice(&grain_bytes.to_le_bytes());
    h[16..24].copy_from_slice(&size_bytes.to_le_bytes());
    let sum = checksum(&h[0..24]);
    h[24..32].copy_from_slice(&sum.to_le_bytes());
    h
}

fn record(first_grain: u64, grain_count: u64) -> [u8; RECORD_BYTES] {
    let mut r = [0u8; RECORD_BYTES];
    r[0..4].copy_from_slice(RECORD_MAGIC);
    r[8..16].copy_from_slice(&first_grain.to_le_bytes());
    r[16..24].copy_from_slice(&grain_count.to_le_bytes());
    let sum = checksum(&r[0..24]);
    r[24..32].copy_from_slice(&sum.to_le_bytes());
    r
}

fn le_u64(bytes: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    if let Some(src) = bytes.get(..8) {
        b.copy_from_slice(src);
    }
    u64::from_le_bytes(b)
}

/// A valid record's (first grain, count), or None when torn or foreign.
fn parse_record(r: &[u8]) -> Option<(u64, u64)> {
    if r.len() != RECORD_BYTES || &r[0..4] != RECORD_MAGIC || r[4..8] != [0; 4] {
        return None;
    }
    (le_u64(&r[24..32]) == checksum(&r[0..24])).then(|| (le_u64(&r[8..16]), le_u64(&r[16..24])))
}

/// `words` atomic words, all zero, from a zeroed allocation: the kernel hands out zero pages
/// lazily, so a large disk's bitmap (32 MiB per TiB at 4 KiB grains) costs nothing until grains
/// in it are written, and making a 1 TiB drill does not first write 32 MiB of zeros.
fn zeroed_words(words: usize) -> Box<[AtomicU64]> {
    const _: () = assert!(
        std::mem::size_of::<AtomicU64>() == std::mem::size_of::<u64>()
            && std::mem::align_of::<AtomicU64>() == std::mem::align_of::<u64>()
    );
    // `vec![0; n]` of an integer allocates zeroed memory (no writes); capacity == len, so
    // into_boxed_slice does not reallocate.
    let zeroed: Box<[u64]> = vec![0u64; words].into_boxed_slice();
    // SAFETY: AtomicU64 has the same size and alignment as u64 (asserted above) and the same
    // bit validity, so the allocation holds `words` valid zero AtomicU64s, and the box frees
    // it with the layout it was allocated with.
    unsafe { Box::from_raw(Box::into_raw(zeroed) as *mut [AtomicU64]) }
}

impl Overlay {
    fn new(
        stem: &str,
        size_bytes: u64,
        grain_bytes: u32,
        data: Arc<dyn DurableFile>,
        map: Arc<dyn DurableFile>,
        map_len_bytes: u64,
    ) -> Result<Self, ExportError> {
        if grain_bytes == 0 || !grain_bytes.is_power_of_two() {
            return Err(ExportError::Overlay {
                stem: stem.into(),
                why: format!("grain of {grain_bytes} bytes is not a power of two"),
            });
        }
        let grain = u64::from(grain_bytes);
        let grain_count = size_bytes.div_ceil(grain);
        let words =
            usize::try_from(grain_count.div_ceil(64)).map_err(|_| ExportError::Overlay {
                stem: stem.into(),
                why: format!("{grain_count} grains do not fit this machine's address space"),
            })?;
        Ok(Self(Arc::new(OverlayState {
            stem: stem.into(),
            size_bytes,
            grain_bytes: grain,
            grain_count,
            data,
            map,
            covered: zeroed_words(words),
            covered_count: AtomicU64::new(0),
            stripes: (0..STRIPES)
                .map(|_| Mutex::new(vec![0u8; grain_bytes as usize]))
                .collect(),
            pending: Mutex::new(Vec::new()),
            log: Mutex::new(map_len_bytes),
            zeros: vec![0u8; grain_bytes as usize],
        })))
    }

    /// New overlay files `<stem>.ovl` and `<stem>.map` in `dir`; refuses if either exists.
    pub fn create(
        dir: &dyn DurableDir,
        stem: &str,
        size_bytes: u64,
        grain_bytes: u32,
    ) -> Result<Self, ExportError> {
        let names = dir.list().map_err(ExportError::io(format!(
            "listing the directory of overlay {stem}"
        )))?;
        for name in [data_name(stem), map_name(stem)] {
            if names.contains(&name) {
                return Err(ExportError::Overlay {
                    stem: stem.into(),
                    why: format!("{name} exists already"),
                });
            }
        }
        let io = |what: &str| ExportError::io(format!("creating overlay {stem}: {what}"));
        let map = dir.open(&map_name(stem), true).map_err(io("map"))?;
        map.write_all_at(0, &header(size_bytes, grain_bytes))
            .map_err(io("map header"))?;
        map.sync_data().map_err(io("syncing the map"))?;
        let data = dir.open(&data_name(stem), true).map_err(io("data"))?;
        data.set_len(size_bytes).map_err(io("sizing the data"))?;
        data.sync_data().map_err(io("syncing the data"))?;
        dir.sync().map_err(io("syncing the directory"))?;
        Self::new(
            stem,
            size_bytes,
            grain_bytes,
            data,
            map,
            RECORD_BYTES as u64,
        )
    }

    /// Opens existing overlay files (recovery): the grains of the map's records up to the
    /// first torn one are covered; the torn tail is cut off.
    pub fn open(
        dir: &dyn DurableDir,
        stem: &str,
        size_bytes: u64,
        grain_bytes: u32,
    ) -> Result<Self, ExportError> {
        let io = |what: &str| ExportError::io(format!("opening overlay {stem}: {what}"));
        let refuse = |why: String| ExportError::Overlay {
            stem: stem.into(),
            why,
        };
        let map = dir.open(&map_name(stem), false).map_err(io("map"))?;
        let data = dir.open(&data_name(stem), false).map_err(io("data"))?;
        let map_len = map.len_bytes().map_err(io("map length"))?;
        let mut head = [0u8; RECORD_BYTES];
        if map_len < RECORD_BYTES as u64 {
            return Err(refuse(format!("map of {map_len} bytes has no header")));
        }
        map.read_exact_at(0, &mut head).map_err(io("map header"))?;
        if head != header(size_bytes, grain_bytes) {
            return Err(refuse(format!(
                "map header does not match a disk of {size_bytes} bytes in grains of {grain_bytes} bytes"
            )));
        }
        let data_len = data.len_bytes().map_err(io("data length"))?;
        if data_len != size_bytes {
            data.set_len(size_bytes).map_err(io("sizing the data"))?;
        }
        let overlay = Self::new(stem, size_bytes, grain_bytes, data, map.clone(), 0)?;
        let mut valid_end = RECORD_BYTES as u64;
        let mut buf = vec![0u8; 64 * RECORD_BYTES];
        'scan: while valid_end < map_len {
            let n = (map_len - valid_end).min(buf.len() as u64) as usize;
            let n = n - n % RECORD_BYTES;
            if n == 0 {
                break;
            }
            let chunk = &mut buf[..n];
            map.read_exact_at(valid_end, chunk).map_err(io("map"))?;
            for r in chunk.chunks_exact(RECORD_BYTES) {
                let Some((first, count)) = parse_record(r) else {
                    break 'scan;
                };
                let Some(end) = first
                    .checked_add(count)
                    .filter(|&e| e <= overlay.0.grain_count && count > 0)
                else {
                    break 'scan;
                };
                for grain in first..end {
                    overlay.set_covered(grain);
                }
                valid_end += RECORD_BYTES as u64;
            }
        }
        if valid_end != map_len {
            map.set_len(valid_end)
                .map_err(io("cutting the torn tail"))?;
        }
        *lock(&overlay.0.log) = valid_end;
        Ok(overlay)
    }

    /// Removes the overlay's files (missing ones are fine) and syncs the directory.
    pub fn remove(dir: &dyn DurableDir, stem: &str) -> Result<(), ExportError> {
        for name in [data_name(stem), map_name(stem)] {
            match dir.remove(&name) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(ExportError::Io {
                        what: format!("removing {name}"),
                        source,
                    });
                }
            }
        }
        dir.sync().map_err(ExportError::io(format!(
            "syncing the directory of overlay {stem}"
        )))
    }

    /// The stem of the overlay's file names.
    pub fn stem(&self) -> &str {
        &self.0.stem
    }

    /// The disk's size.
    pub fn size_bytes(&self) -> u64 {
        self.0.size_bytes
    }

    /// Bytes of the disk the overlay covers (whole grains).
    pub fn written_bytes(&self) -> u64 {
        (self.0.covered_count.load(Ordering::Acquire) * self.0.grain_bytes).min(self.0.size_bytes)
    }

    /// Whether `grain` reads from the overlay.
    pub fn is_covered(&self, grain: u64) -> bool {
        self.0
            .covered
            .get((grain / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (grain % 64)) != 0)
    }

    /// Marks `grain` covered; true if it was not.
    fn set_covered(&self, grain: u64) -> bool {
        let Some(word) = self.0.covered.get((grain / 64) as usize) else {
            return false;
        };
        let bit = 1u64 << (grain % 64);
        let new = word.fetch_or(bit, Ordering::AcqRel) & bit == 0;
        if new {
            self.0.covered_count.fetch_add(1, Ordering::AcqRel);
        }
        new
    }

    /// Marks grains covered after their data was written; newly covered ones await a flush.
    fn cover(&self, first: u64, end: u64) {
        let mut newly = Vec::new();
        for grain in first..end {
            if self.set_covered(grain) {
                newly.push(grain);
            }
        }
        if !newly.is_empty() {
            lock(&self.0.pending).extend(newly);
        }
    }

    fn grain_span(&self, grain: u64) -> (u64, u64) {
        let start = grain * self.0.grain_bytes;
        (start, (start + self.0.grain_bytes).min(self.0.size_bytes))
    }

    /// Reads `out.len()` bytes at `offset_bytes` (checked by the caller): covered grains
    /// from the data file, the rest through `base`.
    pub fn read_at(
        &self,
        offset_bytes: u64,
        out: &mut [u8],
        base: BaseRead<'_>,
    ) -> Result<(), ExportError> {
        let end = offset_bytes + out.len() as u64;
        let mut at = offset_bytes;
        while at < end {
            let grain = at / self.0.grain_bytes;
            let covered = self.is_covered(grain);
            // The run of grains in the same state.
            let mut run_end = self.grain_span(grain).1.min(end);
            while run_end < end && self.is_covered(run_end / self.0.grain_bytes) == covered {
                run_end = self.grain_span(run_end / self.0.grain_bytes).1.min(end);
            }
            let dst = &mut out[(at - offset_bytes) as usize..(run_end - offset_bytes) as usize];
            if covered {
                self.0
                    .data
                    .read_exact_at(at, dst)
                    .map_err(ExportError::io_at("reading the overlay", at))?;
            } else {
                base(at, dst)?;
            }
            at = run_end;
        }
        Ok(())
    }

    fn write_data(&self, offset_bytes: u64, data: &[u8]) -> Result<(), ExportError> {
        self.0
            .data
            .write_all_at(offset_bytes, data)
            .map_err(ExportError::io_at("writing the overlay", offset_bytes))
    }

    /// Writes part of one grain: a read-modify-write of the base when the grain is not yet
    /// covered (serialised per grain).
    fn write_partial(
        &self,
        grain: u64,
        offset_bytes: u64,
        data: &[u8],
        base: BaseRead<'_>,
    ) -> Result<(), ExportError> {
        let mut buf = lock(&self.0.stripes[(grain % STRIPES as u64) as usize]);
        if self.is_covered(grain) {
            return self.write_data(offset_bytes, data);
        }
        let (start, stop) = self.grain_span(grain);
        let whole = &mut buf[..(stop - start) as usize];
        base(start, whole)?;
        let from = (offset_bytes - start) as usize;
        whole[from..from + data.len()].copy_from_slice(data);
        self.write_data(start, whole)?;
        self.cover(grain, grain + 1);
        Ok(())
    }

    /// Writes `data` at `offset_bytes` (checked by the caller); visible to reads at once,
    /// durable after [`Overlay::flush`].
    pub fn write_at(
        &self,
        offset_bytes: u64,
        data: &[u8],
        base: BaseRead<'_>,
    ) -> Result<(), ExportError> {
        self.apply(offset_bytes, data.len() as u64, Some(data), base)
    }

    /// Makes `[offset, offset+len)` read zeros (never the base again).
    pub fn write_zeroes(
        &self,
        offset_bytes: u64,
        length_bytes: u64,
        base: BaseRead<'_>,
    ) -> Result<(), ExportError> {
        self.apply(offset_bytes, length_bytes, None, base)
    }

    /// A write (`Some(data)`) or a zeroing (`None`) of a checked range.
    fn apply(
        &self,
        offset_bytes: u64,
        length_bytes: u64,
        data: Option<&[u8]>,
        base: BaseRead<'_>,
    ) -> Result<(), ExportError> {
        let end = offset_bytes + length_bytes;
        let mut at = offset_bytes;
        while at < end {
            let grain = at / self.0.grain_bytes;
            let (start, stop) = self.grain_span(grain);
            if at == start && stop <= end {
                // A run of whole grains.
                let mut last = grain + 1;
                while last < self.0.grain_count && self.grain_span(last).1 <= end {
                    last += 1;
                }
                let run_end = self.grain_span(last - 1).1;
                match data {
                    Some(d) => self.write_data(
                        at,
                        &d[(at - offset_bytes) as usize..(run_end - offset_bytes) as usize],
                    )?,
                    None => self
                        .0
                        .data
                        .punch_zeroes(at, run_end - at)
                        .map_err(ExportError::io_at("zeroing the overlay", at))?,
                }
                self.cover(grain, last);
                at = run_end;
            } else {
                let piece_end = stop.min(end);
                let len = (piece_end - at) as usize;
                let piece = match data {
                    Some(d) => {
                        &d[(at - offset_bytes) as usize..(piece_end - offset_bytes) as usize]
                    }
                    None => &self.0.zeros[..len],
                };
                self.write_partial(grain, at, piece, base)?;
                at = piece_end;
            }
        }
        Ok(())
    }

    /// Makes every write done so far durable: fdatasync the data, then append the records of
    /// the newly covered grains and fdatasync the map.
    pub fn flush(&self) -> Result<(), ExportError> {
        let mut tail = lock(&self.0.log);
        let mut grains = std::mem::take(&mut *lock(&self.0.pending));
        let stem = &self.0.stem;
        if let Err(source) = self.0.data.sync_data() {
            lock(&self.0.pending).extend(grains);
            return Err(ExportError::Io {
                what: format!("syncing overlay {stem}'s data"),
                source,
            });
        }
        if grains.is_empty() {
            return Ok(());
        }
        grains.sort_unstable();
        grains.dedup();
        let mut bytes = Vec::new();
        let mut run: Option<(u64, u64)> = None;
        for g in grains.iter().copied() {
            run = match run {
                Some((first, count)) if first + count == g => Some((first, count + 1)),
                Some((first, count)) => {
                    bytes.extend_from_slice(&record(first, count));
                    Some((g, 1))
                }
                None => Some((g, 1)),
            };
        }
        if let Some((first, count)) = run {
            bytes.extend_from_slice(&record(first, count));
        }
        let result = self
            .0
            .map
            .write_all_at(*tail, &bytes)
            .and_then(|()| self.0.map.sync_data());
        if let Err(source) = result {
            lock(&self.0.pending).extend(grains);
            return Err(ExportError::Io {
                what: format!("appending to overlay {stem}'s map"),
                source,
            });
        }
        *tail += bytes.len() as u64;
        Ok(())
    }

    /// Covered runs in `[start, end)`: appends (start, end) pairs, in order.
    pub(crate) fn covered_runs(&self, start: u64, end: u64, out: &mut Vec<(u64, u64)>) {
        out.clear();
        let mut at = start;
        while at < end {
            let grain = at / self.0.grain_bytes;
            let stop = self.grain_span(grain).1.min(end);
            if self.is_covered(grain) {
                match out.last_mut() {
                    Some(last) if last.1 == at => last.1 = stop,
                    _ => out.push((at, stop)),
                }
            }
            at = stop;
        }
    }
}
