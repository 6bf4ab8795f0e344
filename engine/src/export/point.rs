//! One disk at one recovery point, read in place: the replica, then each preserved grain of
//! the smallest tag ≥ the point (the one point reader materialize and exports share).
//!
//! Correct while apply runs for the reason given in `materialize.rs`: apply commits a grain's
//! index entry before it overwrites the grain, so the index is read *after* the replica. Tags
//! below the newest point are frozen (entries are only added under the newest tag), so they are
//! folded once into an in-memory map; as new points appear, the tags they freeze are folded
//! in, so a long-lived view queries only the newest tags per read. A grain found is final.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::apply::{PinGuard, Pins, preserve_file_name};
use crate::delta::DiskGeometry;
use crate::durable::{DurableDir, DurableFile};
use crate::meta::{ItemKey, MetaError, MetaStore};

use super::{ExportError, Extent};

/// Reads a replica disk at offsets (a file, a block device, or a sim image).
pub trait DiskReader: Sync {
    /// Reads exactly `out.len()` bytes at `offset_bytes`.
    fn read_exact_at(&self, offset_bytes: u64, out: &mut [u8]) -> io::Result<()>;
}

impl DiskReader for File {
    fn read_exact_at(&self, offset_bytes: u64, out: &mut [u8]) -> io::Result<()> {
        FileExt::read_exact_at(self, out, offset_bytes)
    }
}

impl DiskReader for Vec<u8> {
    fn read_exact_at(&self, offset_bytes: u64, out: &mut [u8]) -> io::Result<()> {
        let start = usize::try_from(offset_bytes).map_err(io::Error::other)?;
        let src = start
            .checked_add(out.len())
            .and_then(|end| self.get(start..end))
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        out.copy_from_slice(src);
        Ok(())
    }
}

/// Why a point read failed.
#[derive(Debug, thiserror::Error)]
pub enum PointReadError {
    /// Reading the replica failed.
    #[error("reading the replica at byte {offset_bytes}")]
    Replica {
        /// Offset.
        offset_bytes: u64,
        /// Error.
        #[source]
        source: io::Error,
    },
    /// Reading a preserved grain failed.
    #[error("reading preserved grain {grain} (tag {tag})")]
    Preserved {
        /// Grain index.
        grain: u64,
        /// Tag.
        tag: u64,
        /// Error.
        #[source]
        source: io::Error,
    },
    /// The metadata store failed.
    #[error(transparent)]
    Meta(#[from] MetaError),
}

/// The frozen-tag cache of a [`PointReader`].
#[derive(Debug, Default)]
struct Cache {
    /// Grain → (tag, offset in the tag's preserve file), for tags below `live_from`.
    frozen: BTreeMap<u64, (u64, u64)>,
    /// Tags ≥ this (and ≥ the point) are still growing: read per request.
    live_from: u64,
    /// Open preserve files by tag.
    files: HashMap<u64, Arc<dyn DurableFile>>,
}

/// Reads one disk as it was at one point. Shared by threads; its lock (`PointReader.cache`)
/// is never held across I/O.
#[derive(Debug)]
pub struct PointReader {
    item: ItemKey,
    disk_index: u16,
    point_id: u64,
    size_bytes: u64,
    grain_bytes: u64,
    preserve_dir: Arc<dyn DurableDir>,
    cache: Mutex<Cache>,
}

impl PointReader {
    /// A reader of `disk_index` at `point_id` (the caller pinned the point and checked it).
    pub fn new(
        meta: &MetaStore,
        item: ItemKey,
        disk_index: u16,
        size_bytes: u64,
        point_id: u64,
        grain_bytes: u32,
        preserve_dir: Arc<dyn DurableDir>,
    ) -> Result<Self, PointReadError> {
        let reader = Self {
            item,
            disk_index,
            point_id,
            size_bytes,
            grain_bytes: u64::from(grain_bytes.max(1)),
            preserve_dir,
            cache: Mutex::new(Cache {
                live_from: point_id,
                ..Cache::default()
            }),
        };
        reader.live_tags(meta)?;
        Ok(reader)
    }

    fn lock(&self) -> MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The disk's size.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// The tags still growing (≥ the point, ≥ the newest point seen); folds the tags that new
    /// points froze into the cache first.
    fn live_tags(&self, meta: &MetaStore) -> Result<Vec<u64>, PointReadError> {
        let tags: Vec<u64> = meta
            .points(self.item)?
            .iter()
            .map(|p| p.point_id)
            .filter(|&id| id >= self.point_id)
            .collect();
        let newest = tags.last().copied().unwrap_or(self.point_id);
        let live_from = self.lock().live_from;
        if newest > live_from {
            let mut fold = Vec::new();
            for &tag in tags.iter().filter(|&&t| t >= live_from && t < newest) {
                for (grain, offset) in meta.preserved(self.item, tag, self.disk_index)? {
                    fold.push((grain, tag, offset));
                }
            }
            let mut cache = self.lock();
            for (grain, tag, offset) in fold {
                // The smallest tag wins, whatever order folds land in.
                let entry = cache.frozen.entry(grain).or_insert((tag, offset));
                if tag < entry.0 {
                    *entry = (tag, offset);
                }
            }
            cache.live_from = cache.live_from.max(newest);
        }
        let live_from = self.lock().live_from;
        Ok(tags.into_iter().filter(|&t| t >= live_from).collect())
    }

    /// Preserved grains in `first..=last`: (grain, tag, file offset), sorted by grain.
    fn preserved_in(
        &self,
        meta: &MetaStore,
        first: u64,
        last: u64,
        out: &mut Vec<(u64, u64, u64)>,
    ) -> Result<(), PointReadError> {
        out.clear();
        let live = self.live_tags(meta)?;
        let mut from_live: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
        let mut live_entries = Vec::new();
        for tag in live {
            live_entries.push((
                tag,
                meta.preserved_range(self.item, tag, self.disk_index, first, last)?,
            ));
        }
        if live_entries.iter().all(|(_, entries)| entries.is_empty()) {
            // The common case: only frozen entries, already in grain order.
            let cache = self.lock();
            out.extend(
                cache
                    .frozen
                    .range(first..=last)
                    .map(|(&grain, &(tag, offset))| (grain, tag, offset)),
            );
            return Ok(());
        }
        for (tag, entries) in live_entries {
            for (grain, offset) in entries {
                from_live.entry(grain).or_insert((tag, offset));
            }
        }
        // Frozen tags are all below the live ones: their entries win.
        {
            let cache = self.lock();
            for (&grain, &entry) in cache.frozen.range(first..=last) {
                from_live.insert(grain, entry);
            }
        }
        out.extend(
            from_live
                .into_iter()
                .map(|(grain, (tag, offset))| (grain, tag, offset)),
        );
        Ok(())
    }

    fn file(&self, tag: u64, grain: u64) -> Result<Arc<dyn DurableFile>, PointReadError> {
        if let Some(file) = self.lock().files.get(&tag) {
            return Ok(file.clone());
        }
        let file = self
            .preserve_dir
            .open(&preserve_file_name(tag), false)
            .map_err(|source| PointReadError::Preserved { grain, tag, source })?;
        self.lock().files.insert(tag, file.clone());
        Ok(file)
    }

    /// Reads `out.len()` bytes at `offset_bytes` (within the disk) as they were at the point.
    /// Returns how many grains came from the preserve store. `scratch` is reused.
    pub fn read(
        &self,
        meta: &MetaStore,
        replica: &dyn DiskReader,
        offset_bytes: u64,
        out: &mut [u8],
        scratch: &mut Vec<(u64, u64, u64)>,
    ) -> Result<u64, PointReadError> {
        if out.is_empty() {
            return Ok(0);
        }
        replica
            .read_exact_at(offset_bytes, out)
            .map_err(|source| PointReadError::Replica {
                offset_bytes,
                source,
            })?;
        let end = offset_bytes + out.len() as u64;
        let first = offset_bytes / self.grain_bytes;
        let last = (end - 1) / self.grain_bytes;
        self.preserved_in(meta, first, last, scratch)?;
        for &(grain, tag, file_offset) in scratch.iter() {
            let file = self.file(tag, grain)?;
            let grain_start = grain * self.grain_bytes;
            let grain_end = (grain_start + self.grain_bytes).min(self.size_bytes);
            let from = grain_start.max(offset_bytes);
            let to = grain_end.min(end);
            if from >= to {
                continue;
            }
            let dst = out
                .get_mut((from - offset_bytes) as usize..(to - offset_bytes) as usize)
                .ok_or_else(|| PointReadError::Preserved {
                    grain,
                    tag,
                    source: io::Error::other("grain outside the read"),
                })?;
            file.read_exact_at(file_offset + (from - grain_start), dst)
                .map_err(|source| PointReadError::Preserved { grain, tag, source })?;
        }
        Ok(scratch.len() as u64)
    }
}

/// What a [`PointView`] reads from.
#[derive(Debug, Clone)]
pub struct ViewSource {
    /// The store.
    pub meta: Arc<MetaStore>,
    /// The item.
    pub item: ItemKey,
    /// Which disk.
    pub disk_index: u16,
    /// Its geometry.
    pub disk: DiskGeometry,
    /// The item's preserve directory.
    pub preserve_dir: Arc<dyn DurableDir>,
    /// Preservation granularity (as apply used).
    pub grain_bytes: u32,
    /// The item's pins (shared with its applier).
    pub pins: Pins,
}

/// One disk at one point; holds a pin for its life, so the point is never pruned under it.
#[derive(Debug)]
pub struct PointView {
    meta: Arc<MetaStore>,
    reader: PointReader,
    replica: Arc<File>,
    _pin: PinGuard,
}

/// Most extents one `extents` call returns (it may stop early).
pub const MAX_EXTENTS: usize = 4096;

impl PointView {
    /// Pins `point_id`, then checks it still exists.
    pub fn open(
        source: ViewSource,
        point_id: u64,
        replica: Arc<File>,
    ) -> Result<Self, ExportError> {
        let pin = source.pins.pin(point_id);
        if source.meta.point(source.item, point_id)?.is_none() {
            return Err(ExportError::NoSuchPoint { point_id });
        }
        let reader = PointReader::new(
            &source.meta,
            source.item,
            source.disk_index,
            source.disk.size_bytes,
            point_id,
            source.grain_bytes,
            source.preserve_dir,
        )?;
        Ok(Self {
            meta: source.meta,
            reader,
            replica,
            _pin: pin,
        })
    }

    /// The point.
    pub fn point_id(&self) -> u64 {
        self.reader.point_id
    }

    /// The disk's size.
    pub fn size_bytes(&self) -> u64 {
        self.reader.size_bytes
    }

    /// Reads `out.len()` bytes at `offset_bytes` as they were at the point.
    pub fn read_at(&self, offset_bytes: u64, out: &mut [u8]) -> Result<(), ExportError> {
        super::check_range(offset_bytes, out.len() as u64, self.size_bytes())?;
        let mut scratch = Vec::new();
        self.reader.read(
            &self.meta,
            self.replica.as_ref(),
            offset_bytes,
            out,
            &mut scratch,
        )?;
        Ok(())
    }

    /// Extents covering `[offset, offset+length)` in order (may stop early, never empty for a
    /// non-empty range): the replica's data and holes (`SEEK_DATA`/`SEEK_HOLE`), with every
    /// preserved grain as data.
    pub fn extents(
        &self,
        offset_bytes: u64,
        length_bytes: u64,
        out: &mut Vec<Extent>,
    ) -> Result<(), ExportError> {
        super::check_range(offset_bytes, length_bytes, self.size_bytes())?;
        out.clear();
        if length_bytes == 0 {
            return Ok(());
        }
        let end = offset_bytes + length_bytes;
        let grain = self.reader.grain_bytes;
        let mut preserved = Vec::new();
        self.reader.preserved_in(
            &self.meta,
            offset_bytes / grain,
            (end - 1) / grain,
            &mut preserved,
        )?;
        let mut file_extents = Vec::new();
        super::file_extents(&self.replica, offset_bytes, end, &mut file_extents)?;
        let mut runs: Vec<(u64, u64)> = Vec::with_capacity(preserved.len());
        for &(g, _, _) in &preserved {
            let (from, to) = ((g * grain).max(offset_bytes), ((g + 1) * grain).min(end));
            match runs.last_mut() {
                Some(last) if last.1 == from => last.1 = to,
                _ => runs.push((from, to)),
            }
        }
        file_extents.truncate(MAX_EXTENTS);
        super::mark_data(&file_extents, &runs, out);
        Ok(())
    }
}
