//! The metadata store (redb): recovery-point catalogue, applied watermark, preserved-block
//! index and replica identities.
//!
//! ```text
//!  table        key                                   value
//!  ───────────  ────────────────────────────────────  ─────────────────────────────────────
//!  points       (item u128, point_id u64)             PointRecord (encoded, 48 + label)
//!  state        item u128                             (applied_seq u64, current_tag u64)
//!  preserved    (item, tag u64, disk u16, grain u64)  offset in the tag's preserve file u64
//!  replicas     (item u128, disk u16)                 ReplicaIdentity (encoded, 40 bytes)
//! ```
//!
//! Invariants:
//! - `state.applied_seq` is only advanced after every replica write up to it has been flushed;
//!   replay after a crash starts right after it.
//! - A `preserved` entry is committed only after its data is durable in the preserve file, and
//!   before the replica write that overwrites the grain is submitted.
//! - A point id is the sequence number of the frame that made it (a bookmark, or the last
//!   applied frame for a "latest" point), so ids are unique and increase with time.
//!
//! The database runs over any [`DurableFile`], so the crash-model sim covers metadata too.

use std::io;
use std::sync::Arc;

use redb::{Database, ReadableDatabase, TableDefinition};

use crate::delta::{Consistency, le_u16, le_u32, le_u64};
use crate::durable::DurableFile;

const POINTS: TableDefinition<'_, (u128, u64), &[u8]> = TableDefinition::new("points");
const STATE: TableDefinition<'_, u128, (u64, u64)> = TableDefinition::new("state");
const PRESERVED: TableDefinition<'_, (u128, u64, u16, u64), u64> =
    TableDefinition::new("preserved");
const REPLICAS: TableDefinition<'_, (u128, u16), &[u8]> = TableDefinition::new("replicas");

/// Identity of a protected item inside the engine (its 16-byte id, little-endian).
pub type ItemKey = u128;

/// The engine's key for a stream's 16-byte item id.
pub fn item_key(item_id: &[u8; 16]) -> ItemKey {
    u128::from_le_bytes(*item_id)
}

/// Why the metadata store failed.
#[derive(Debug, thiserror::Error)]
#[error("metadata store: {what}: {message}")]
pub struct MetaError {
    /// What was being done.
    pub what: &'static str,
    /// redb's or the decoder's message.
    pub message: String,
}

fn meta_err<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> MetaError {
    move |e| MetaError {
        what,
        message: e.to_string(),
    }
}

/// How a recovery point came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PointOrigin {
    /// A bookmark in the stream.
    Bookmark,
    /// Made by the appliance at the latest applied frame (failover "Latest").
    Latest,
}

/// A recovery point in the catalogue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointRecord {
    /// Point id: the sequence number of the frame that made it.
    pub point_id: u64,
    /// Crash- or app-consistent.
    pub consistency: Consistency,
    /// Where it came from.
    pub origin: PointOrigin,
    /// The source's bookmark id (0 for a latest point).
    pub bookmark_id: u64,
    /// The source's timestamp of the instant, ns since the Unix epoch.
    pub source_timestamp_ns: u64,
    /// When the appliance made it processed, ns since the Unix epoch.
    pub processed_at_ns: u64,
    /// The bookmark label.
    pub label: String,
}

impl PointRecord {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(48 + self.label.len());
        out.extend_from_slice(&self.point_id.to_le_bytes());
        out.push(self.consistency as u8);
        out.push(match self.origin {
            PointOrigin::Bookmark => 1,
            PointOrigin::Latest => 2,
        });
        out.extend_from_slice(&(self.label.len() as u16).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&self.bookmark_id.to_le_bytes());
        out.extend_from_slice(&self.source_timestamp_ns.to_le_bytes());
        out.extend_from_slice(&self.processed_at_ns.to_le_bytes());
        out.extend_from_slice(&[0u8; 8]);
        out.extend_from_slice(self.label.as_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Result<Self, MetaError> {
        let bad = |why: &str| MetaError {
            what: "decoding a point record",
            message: why.to_owned(),
        };
        if bytes.len() < 48 {
            return Err(bad("shorter than 48 bytes"));
        }
        let label_len = usize::from(le_u16(bytes, 10));
        let label = bytes
            .get(48..48 + label_len)
            .ok_or_else(|| bad("label past the end"))?;
        Ok(Self {
            point_id: le_u64(bytes, 0),
            consistency: Consistency::from_u8(bytes[8]).ok_or_else(|| bad("consistency"))?,
            origin: match bytes[9] {
                1 => PointOrigin::Bookmark,
                2 => PointOrigin::Latest,
                _ => return Err(bad("origin")),
            },
            bookmark_id: le_u64(bytes, 16),
            source_timestamp_ns: le_u64(bytes, 24),
            processed_at_ns: le_u64(bytes, 32),
            label: String::from_utf8_lossy(label).into_owned(),
        })
    }
}

/// What the engine recorded about a replica disk when it was attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaIdentity {
    /// Declared size.
    pub size_bytes: u64,
    /// Logical block size.
    pub block_size_bytes: u32,
    /// Device of the file (`st_dev`), or of the block device node.
    pub dev: u64,
    /// Inode of the file (`st_ino`), or the block device number (`st_rdev`).
    pub ino: u64,
    /// Birth time of the file (statx `btime`), ns; 0 where the filesystem does not keep it.
    /// Tells a replacement apart when the filesystem reuses the inode number.
    pub birth_ns: u64,
}

impl ReplicaIdentity {
    fn encode(&self) -> [u8; 40] {
        let mut out = [0u8; 40];
        out[0..8].copy_from_slice(&self.size_bytes.to_le_bytes());
        out[8..12].copy_from_slice(&self.block_size_bytes.to_le_bytes());
        out[16..24].copy_from_slice(&self.dev.to_le_bytes());
        out[24..32].copy_from_slice(&self.ino.to_le_bytes());
        out[32..40].copy_from_slice(&self.birth_ns.to_le_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Result<Self, MetaError> {
        if bytes.len() != 40 {
            return Err(MetaError {
                what: "decoding a replica identity",
                message: format!("{} bytes, expected 40", bytes.len()),
            });
        }
        Ok(Self {
            size_bytes: le_u64(bytes, 0),
            block_size_bytes: le_u32(bytes, 8),
            dev: le_u64(bytes, 16),
            ino: le_u64(bytes, 24),
            birth_ns: le_u64(bytes, 32),
        })
    }
}

/// redb over a [`DurableFile`], so the crash-model sim covers every redb file of the
/// appliance (this store and the appliance's control store).
#[derive(Debug)]
pub struct RedbBackend(pub Arc<dyn DurableFile>);

impl redb::StorageBackend for RedbBackend {
    fn len(&self) -> Result<u64, io::Error> {
        self.0.len_bytes()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        self.0.read_exact_at(offset, out)
    }
    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        self.0.set_len(len)
    }
    fn sync_data(&self) -> Result<(), io::Error> {
        self.0.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        self.0.write_all_at(offset, data)
    }
}

/// One preserved-block index entry to commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreservedEntry {
    /// Disk index.
    pub disk_index: u16,
    /// Grain index (offset / grain size).
    pub grain: u64,
    /// Offset of the grain's old content in the tag's preserve file.
    pub file_offset_bytes: u64,
}

/// The metadata store. Cheap to share (`Arc`); redb serialises writers.
#[derive(Debug)]
pub struct MetaStore {
    db: Database,
}

impl MetaStore {
    /// Opens or creates the store in `file`.
    pub fn open(file: Arc<dyn DurableFile>) -> Result<Self, MetaError> {
        let db = Database::builder()
            .set_cache_size(16 << 20)
            .create_with_backend(RedbBackend(file))
            .map_err(meta_err("opening"))?;
        let txn = db.begin_write().map_err(meta_err("creating tables"))?;
        txn.open_table(POINTS)
            .map_err(meta_err("creating tables"))?;
        txn.open_table(STATE).map_err(meta_err("creating tables"))?;
        txn.open_table(PRESERVED)
            .map_err(meta_err("creating tables"))?;
        txn.open_table(REPLICAS)
            .map_err(meta_err("creating tables"))?;
        txn.commit().map_err(meta_err("creating tables"))?;
        Ok(Self { db })
    }

    /// The applied watermark and current interval tag of an item ((0, 0) for a new item).
    pub fn state(&self, item: ItemKey) -> Result<(u64, u64), MetaError> {
        let txn = self.db.begin_read().map_err(meta_err("reading state"))?;
        let table = txn.open_table(STATE).map_err(meta_err("reading state"))?;
        Ok(table
            .get(item)
            .map_err(meta_err("reading state"))?
            .map_or((0, 0), |v| v.value()))
    }

    /// All points of an item, oldest first.
    pub fn points(&self, item: ItemKey) -> Result<Vec<PointRecord>, MetaError> {
        let txn = self.db.begin_read().map_err(meta_err("listing points"))?;
        let table = txn.open_table(POINTS).map_err(meta_err("listing points"))?;
        let mut out = Vec::new();
        for entry in table
            .range((item, 0)..=(item, u64::MAX))
            .map_err(meta_err("listing points"))?
        {
            let (_, value) = entry.map_err(meta_err("listing points"))?;
            out.push(PointRecord::decode(value.value())?);
        }
        Ok(out)
    }

    /// The newest point of an item (one record read, for pollers).
    pub fn latest_point(&self, item: ItemKey) -> Result<Option<PointRecord>, MetaError> {
        let txn = self
            .db
            .begin_read()
            .map_err(meta_err("reading the newest point"))?;
        let table = txn
            .open_table(POINTS)
            .map_err(meta_err("reading the newest point"))?;
        let newest = table
            .range((item, 0)..=(item, u64::MAX))
            .map_err(meta_err("reading the newest point"))?
            .next_back();
        match newest {
            Some(entry) => {
                let (_, value) = entry.map_err(meta_err("reading the newest point"))?;
                Ok(Some(PointRecord::decode(value.value())?))
            }
            None => Ok(None),
        }
    }

    /// One point.
    pub fn point(&self, item: ItemKey, point_id: u64) -> Result<Option<PointRecord>, MetaError> {
        let txn = self.db.begin_read().map_err(meta_err("reading a point"))?;
        let table = txn
            .open_table(POINTS)
            .map_err(meta_err("reading a point"))?;
        match table
            .get((item, point_id))
            .map_err(meta_err("reading a point"))?
        {
            Some(value) => Ok(Some(PointRecord::decode(value.value())?)),
            None => Ok(None),
        }
    }

    /// Commits the watermark, and a new point (which becomes the current tag) when given.
    pub fn checkpoint(
        &self,
        item: ItemKey,
        applied_seq: u64,
        current_tag: u64,
        point: Option<&PointRecord>,
    ) -> Result<(), MetaError> {
        let txn = self.db.begin_write().map_err(meta_err("checkpoint"))?;
        {
            let mut state = txn.open_table(STATE).map_err(meta_err("checkpoint"))?;
            state
                .insert(item, (applied_seq, current_tag))
                .map_err(meta_err("checkpoint"))?;
            if let Some(point) = point {
                let mut points = txn.open_table(POINTS).map_err(meta_err("checkpoint"))?;
                points
                    .insert((item, point.point_id), point.encode().as_slice())
                    .map_err(meta_err("checkpoint"))?;
            }
        }
        txn.commit().map_err(meta_err("checkpoint"))
    }

    /// Commits preserved-block index entries for `tag`.
    pub fn add_preserved(
        &self,
        item: ItemKey,
        tag: u64,
        entries: &[PreservedEntry],
    ) -> Result<(), MetaError> {
        let txn = self
            .db
            .begin_write()
            .map_err(meta_err("indexing preserved blocks"))?;
        {
            let mut table = txn
                .open_table(PRESERVED)
                .map_err(meta_err("indexing preserved blocks"))?;
            for entry in entries {
                table
                    .insert(
                        (item, tag, entry.disk_index, entry.grain),
                        entry.file_offset_bytes,
                    )
                    .map_err(meta_err("indexing preserved blocks"))?;
            }
        }
        txn.commit().map_err(meta_err("indexing preserved blocks"))
    }

    /// Grains of `disk_index` preserved under `tag`, as (grain, file offset), in grain order.
    pub fn preserved(
        &self,
        item: ItemKey,
        tag: u64,
        disk_index: u16,
    ) -> Result<Vec<(u64, u64)>, MetaError> {
        self.preserved_range(item, tag, disk_index, 0, u64::MAX)
    }

    /// Grains in `[grain_start, grain_end]` of `disk_index` preserved under `tag`.
    pub fn preserved_range(
        &self,
        item: ItemKey,
        tag: u64,
        disk_index: u16,
        grain_start: u64,
        grain_end: u64,
    ) -> Result<Vec<(u64, u64)>, MetaError> {
        let txn = self
            .db
            .begin_read()
            .map_err(meta_err("reading preserved blocks"))?;
        let table = txn
            .open_table(PRESERVED)
            .map_err(meta_err("reading preserved blocks"))?;
        let mut out = Vec::new();
        for entry in table
            .range((item, tag, disk_index, grain_start)..=(item, tag, disk_index, grain_end))
            .map_err(meta_err("reading preserved blocks"))?
        {
            let (key, value) = entry.map_err(meta_err("reading preserved blocks"))?;
            out.push((key.value().3, value.value()));
        }
        Ok(out)
    }

    /// Deletes a point and every block preserved under it.
    pub fn remove_point(&self, item: ItemKey, point_id: u64) -> Result<(), MetaError> {
        let txn = self.db.begin_write().map_err(meta_err("pruning a point"))?;
        {
            let mut points = txn
                .open_table(POINTS)
                .map_err(meta_err("pruning a point"))?;
            points
                .remove((item, point_id))
                .map_err(meta_err("pruning a point"))?;
            let mut preserved = txn
                .open_table(PRESERVED)
                .map_err(meta_err("pruning a point"))?;
            preserved
                .retain_in(
                    (item, point_id, 0, 0)..=(item, point_id, u16::MAX, u64::MAX),
                    |_, _| false,
                )
                .map_err(meta_err("pruning a point"))?;
        }
        txn.commit().map_err(meta_err("pruning a point"))
    }

    /// The identity recorded for a replica disk.
    pub fn replica(
        &self,
        item: ItemKey,
        disk_index: u16,
    ) -> Result<Option<ReplicaIdentity>, MetaError> {
        let txn = self
            .db
            .begin_read()
            .map_err(meta_err("reading a replica identity"))?;
        let table = txn
            .open_table(REPLICAS)
            .map_err(meta_err("reading a replica identity"))?;
        match table
            .get((item, disk_index))
            .map_err(meta_err("reading a replica identity"))?
        {
            Some(value) => Ok(Some(ReplicaIdentity::decode(value.value())?)),
            None => Ok(None),
        }
    }

    /// Records a replica disk's identity.
    pub fn set_replica(
        &self,
        item: ItemKey,
        disk_index: u16,
        identity: &ReplicaIdentity,
    ) -> Result<(), MetaError> {
        let txn = self
            .db
            .begin_write()
            .map_err(meta_err("recording a replica"))?;
        {
            let mut table = txn
                .open_table(REPLICAS)
                .map_err(meta_err("recording a replica"))?;
            table
                .insert((item, disk_index), identity.encode().as_slice())
                .map_err(meta_err("recording a replica"))?;
        }
        txn.commit().map_err(meta_err("recording a replica"))
    }

    /// Removes everything about an item (disable protection).
    pub fn remove_item(&self, item: ItemKey) -> Result<(), MetaError> {
        let txn = self
            .db
            .begin_write()
            .map_err(meta_err("removing an item"))?;
        {
            let mut points = txn
                .open_table(POINTS)
                .map_err(meta_err("removing an item"))?;
            points
                .retain_in((item, 0)..=(item, u64::MAX), |_, _| false)
                .map_err(meta_err("removing an item"))?;
            let mut preserved = txn
                .open_table(PRESERVED)
                .map_err(meta_err("removing an item"))?;
            preserved
                .retain_in(
                    (item, 0, 0, 0)..=(item, u64::MAX, u16::MAX, u64::MAX),
                    |_, _| false,
                )
                .map_err(meta_err("removing an item"))?;
            let mut replicas = txn
                .open_table(REPLICAS)
                .map_err(meta_err("removing an item"))?;
            replicas
                .retain_in((item, 0)..=(item, u16::MAX), |_, _| false)
                .map_err(meta_err("removing an item"))?;
            let mut state = txn
                .open_table(STATE)
                .map_err(meta_err("removing an item"))?;
            state.remove(item).map_err(meta_err("removing an item"))?;
        }
        txn.commit().map_err(meta_err("removing an item"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::durable::{DurableDir, SimDir};

    fn point(id: u64) -> PointRecord {
        PointRecord {
            point_id: id,
            consistency: Consistency::App,
            origin: PointOrigin::Bookmark,
            bookmark_id: id * 10,
            source_timestamp_ns: 5,
            processed_at_ns: 6,
            label: format!("p{id}"),
        }
    }

    #[test]
    fn meta_checkpoint_points_and_preserved_round_trip_and_survive_reopen() {
        let dir = SimDir::new();
        let store = MetaStore::open(dir.open("meta.redb", true).unwrap()).unwrap();
        assert_eq!(store.state(1).unwrap(), (0, 0));
        store.checkpoint(1, 10, 10, Some(&point(10))).unwrap();
        store.checkpoint(1, 20, 20, Some(&point(20))).unwrap();
        store.checkpoint(2, 5, 0, None).unwrap();
        let entries = [
            PreservedEntry {
                disk_index: 0,
                grain: 3,
                file_offset_bytes: 0,
            },
            PreservedEntry {
                disk_index: 1,
                grain: 1,
                file_offset_bytes: 4096,
            },
        ];
        store.add_preserved(1, 10, &entries).unwrap();
        store.add_preserved(1, 20, &entries[..1]).unwrap();
        drop(store);
        dir.sync().unwrap();
        let store = MetaStore::open(dir.open("meta.redb", false).unwrap()).unwrap();
        assert_eq!(store.state(1).unwrap(), (20, 20));
        assert_eq!(store.points(1).unwrap(), vec![point(10), point(20)]);
        assert!(store.points(2).unwrap().is_empty());
        assert_eq!(store.latest_point(1).unwrap(), Some(point(20)));
        assert_eq!(
            store.latest_point(2).unwrap(),
            None,
            "item 2 has a watermark, no point"
        );
        assert_eq!(store.preserved(1, 10, 0).unwrap(), vec![(3, 0)]);
        assert_eq!(store.preserved(1, 10, 1).unwrap(), vec![(1, 4096)]);
        store.remove_point(1, 10).unwrap();
        assert!(store.preserved(1, 10, 0).unwrap().is_empty());
        assert_eq!(store.preserved(1, 20, 0).unwrap(), vec![(3, 0)]);
        assert_eq!(store.points(1).unwrap(), vec![point(20)]);
    }

    #[test]
    fn meta_replica_identity_round_trips() {
        let store = MetaStore::open(SimDir::new().open("m", true).unwrap()).unwrap();
        let id = ReplicaIdentity {
            size_bytes: 1 << 30,
            block_size_bytes: 512,
            dev: 7,
            ino: 99,
            birth_ns: 1234,
        };
        assert_eq!(store.replica(3, 1).unwrap(), None);
        store.set_replica(3, 1, &id).unwrap();
        assert_eq!(store.replica(3, 1).unwrap(), Some(id));
        store.remove_item(3).unwrap();
        assert_eq!(store.replica(3, 1).unwrap(), None);
    }
}
