//! Migration of a data directory written by the first release (v1: `items/<id>/item.json`,
//! `jobs/<id>.json`, the slot pages `slots/slots-{a,b}.page`) into the control store, and the
//! reader of the old slot-page format it needs.
//!
//! [`migrate`] runs at every start before anything reads the store. It copies every old record
//! and job file, byte for byte, and the newest valid slot page into the store in ONE
//! transaction, and only after that commit removes the old files (each directory then
//! synced). A crash before the commit leaves the old files and a store without them; a crash
//! after it leaves some old files beside a store that already holds them: either way the next
//! start runs the migration again and ends in the same store (the copy is idempotent, and
//! nothing else writes the store before the migration finished). Damaged files migrate as they
//! are, so the item or job they belong to is quarantined or reported exactly as before; slot
//! pages that cannot be read mark the slot table for a rebuild from the records (what the
//! first release did with them). A job file whose name carries no job id stays where it is
//! (the first release skipped it too).
//!
//! # The v1 slot-page format (read only)
//!
//! Two page files, `slots-a.page` and `slots-b.page`, formed a double-buffered superblock:
//! each held one whole page, a new page always went to the file *not* holding the newest valid
//! page, and the valid page with the higher generation wins. A page, integers little-endian:
//!
//! ```text
//!   offset  bytes  field
//!   0       8      checksum: xxh3-64 of bytes [8, 40 + body_len_bytes)
//!   8       8      magic "DRSLOTS\0"
//!   16      4      format version (1)
//!   20      4      slot count (1..=256)
//!   24      8      generation (1 for the first page, +1 per page written)
//!   32      4      entry count (attached LUNs)
//!   36      4      body length in bytes
//!   40      ...    entries, one per attached LUN, in increasing LUN order:
//!                    0   4   LUN (1..slot count)
//!                    4   16  item id
//!                    20  4   disk index
//!                    24  2   path length in bytes (1..=4096)
//!                    26  n   path (the OS bytes of an absolute path, no NUL)
//! ```
//!
//! "No valid page and an empty `slots-b.page`" means the first open never completed (an empty
//! table); "no valid page" otherwise, or a page whose checksum verifies but whose content
//! breaks an invariant (a LUN, disk or path twice), is refused ([`PageError::Corrupt`]).

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use engine::durable::{DurableDir, DurableFile, StdDir};
use xxhash_rust::xxh3::xxh3_64;

use super::{ControlStore, SlotEntry};

/// The two page files, in `DATA_DIR/slots/`.
pub const PAGE_FILE_NAMES: [&str; 2] = ["slots-a.page", "slots-b.page"];
/// The magic at byte 8 of a page.
pub const PAGE_MAGIC: [u8; 8] = *b"DRSLOTS\0";
/// The page format v1 wrote.
pub const PAGE_FORMAT_VERSION: u32 = 1;
/// The v1 record file in each item directory.
pub const RECORD_FILE: &str = "item.json";

const SLOT_COUNT_MAX: u32 = 256;
const PATH_BYTES_MAX: usize = 4096;
const HEADER_BYTES: usize = 40;
const ENTRY_FIXED_BYTES: usize = 26;
const PAGE_BYTES_MAX: usize =
    HEADER_BYTES + (SLOT_COUNT_MAX as usize - 1) * (ENTRY_FIXED_BYTES + PATH_BYTES_MAX);

/// Why the v1 slot pages cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum PageError {
    /// No page can be trusted, or a verified page breaks an invariant.
    #[error("slot table is corrupt: {reason}")]
    Corrupt {
        /// What is wrong, naming the file.
        reason: String,
    },
    /// Reading failed.
    #[error("slot table I/O failed while {what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> PageError {
    move |source| PageError::Io { what, source }
}

/// The committed v1 slot table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V1Slots {
    /// Its slot count.
    pub slot_count: u32,
    /// Its generation.
    pub generation: u64,
    /// Its attached LUNs, in LUN order.
    pub entries: Vec<SlotEntry>,
}

/// The newest valid v1 slot table in `dir` (the old `slots/` directory); `None` when no
/// page file is there or the first open never completed.
pub fn read_slot_pages(dir: &dyn DurableDir) -> Result<Option<V1Slots>, PageError> {
    let names = dir
        .list()
        .map_err(io_err("listing the slot table's directory"))?;
    let mut files: [Option<Arc<dyn DurableFile>>; 2] = [None, None];
    for (slot, name) in files.iter_mut().zip(PAGE_FILE_NAMES) {
        if names.iter().any(|present| present == name) {
            *slot = Some(
                dir.open(name, false)
                    .map_err(io_err("opening the slot table"))?,
            );
        }
    }
    if files.iter().all(Option::is_none) {
        return Ok(None);
    }
    let newest = load_newest([files[0].as_ref(), files[1].as_ref()])?;
    Ok(newest.map(|(page, _)| V1Slots {
        slot_count: page.slot_count,
        generation: page.generation,
        entries: page.entries,
    }))
}

/// What [`migrate`] moved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Migrated {
    /// Item records.
    pub records: usize,
    /// Job files.
    pub jobs: usize,
    /// Attached LUNs (`None`: no slot pages; `Some(None)`: unreadable, to be rebuilt).
    pub slots: Option<Option<usize>>,
}

/// Moves a v1 data directory's records, jobs and slot pages into `store` (see the module
/// comment); `None` when there was nothing to move.
pub fn migrate(root: &Path, store: &ControlStore) -> anyhow::Result<Option<Migrated>> {
    let mut records: Vec<([u8; 16], PathBuf, Vec<u8>)> = Vec::new();
    let items_dir = root.join("items");
    if items_dir.is_dir() {
        for entry in std::fs::read_dir(&items_dir)
            .with_context(|| format!("listing {}", items_dir.display()))?
        {
            let entry = entry?;
            let Some(id) = entry.file_name().to_str().and_then(parse_hex_id) else {
                continue;
            };
            let path = entry.path().join(RECORD_FILE);
            match std::fs::read(&path) {
                Ok(bytes) => records.push((id, path, bytes)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
            }
        }
    }
    let mut jobs: Vec<(u64, PathBuf, Vec<u8>)> = Vec::new();
    let jobs_dir = root.join("jobs");
    if jobs_dir.is_dir() {
        for entry in std::fs::read_dir(&jobs_dir)
            .with_context(|| format!("listing {}", jobs_dir.display()))?
        {
            let path = entry?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let id = path
                .file_stem()
                .and_then(|stem| stem.to_str())
                .and_then(|stem| stem.parse::<u64>().ok());
            let Some(id) = id else {
                tracing::warn!(path = %path.display(),
                    "a job file whose name is not <job id>.json: left in place, not migrated");
                continue;
            };
            let bytes =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            jobs.push((id, path, bytes));
        }
    }
    let slots_dir = root.join("slots");
    let slots = if slots_dir.is_dir() {
        let dir =
            StdDir::open(&slots_dir).with_context(|| format!("opening {}", slots_dir.display()))?;
        match read_slot_pages(&dir) {
            Ok(None) if !PAGE_FILE_NAMES.iter().any(|n| slots_dir.join(n).exists()) => None,
            Ok(found) => Some(Ok(found)),
            Err(PageError::Corrupt { reason }) => Some(Err(reason)),
            Err(error) => return Err(error).context("reading the v1 slot table"),
        }
    } else {
        None
    };
    if records.is_empty() && jobs.is_empty() && slots.is_none() {
        return Ok(None);
    }
    store.commit("migrating a v1 data directory", |commit| {
        for (id, _, bytes) in &records {
            commit.put_record_bytes(id, bytes)?;
        }
        for (id, _, bytes) in &jobs {
            commit.put_job_bytes(*id, bytes)?;
        }
        match &slots {
            Some(Ok(Some(table))) => commit.put_slots(table.slot_count, &table.entries)?,
            Some(Err(_)) => commit.mark_slots_for_rebuild()?,
            Some(Ok(None)) | None => {}
        }
        Ok(())
    })?;
    // Committed: the old files go (a crash from here on re-runs the same copy).
    for (_, path, _) in &records {
        remove_durably(path)?;
    }
    for (_, path, _) in &jobs {
        remove_durably(path)?;
    }
    if slots.is_some() {
        for name in PAGE_FILE_NAMES {
            remove_durably(&slots_dir.join(name))?;
        }
    }
    for dir in [&jobs_dir, &slots_dir] {
        remove_dir_if_empty(dir)?;
    }
    if let Some(Err(reason)) = &slots {
        tracing::error!(%reason,
            "the v1 slot table was damaged: it is rebuilt from the item records (LUNs may change)");
    }
    Ok(Some(Migrated {
        records: records.len(),
        jobs: jobs.len(),
        slots: slots.map(|s| s.ok().map(|t| t.map_or(0, |t| t.entries.len()))),
    }))
}

fn parse_hex_id(text: &str) -> Option<[u8; 16]> {
    if text.len() != 32 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut id = [0u8; 16];
    for (index, byte) in id.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(index * 2..index * 2 + 2)?, 16).ok()?;
    }
    Some(id)
}

/// Removes `path` (absent: nothing to do) and syncs its directory.
fn remove_durably(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "removing {} after its migration into the control store (remove it and \
                     start again)",
                    path.display()
                )
            });
        }
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
}

/// Removes an empty old directory (one with files left, or absent: kept as it is).
fn remove_dir_if_empty(dir: &Path) -> anyhow::Result<()> {
    let empty = match std::fs::read_dir(dir) {
        Ok(mut entries) => entries.next().is_none(),
        Err(_) => return Ok(()),
    };
    if !empty {
        return Ok(());
    }
    std::fs::remove_dir(dir).with_context(|| format!("removing {}", dir.display()))?;
    if let Some(parent) = dir.parent() {
        std::fs::File::open(parent)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing {}", parent.display()))?;
    }
    Ok(())
}

/// Why a path cannot have been recorded by v1, if it cannot.
fn path_problem(path: &Path) -> Option<String> {
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() {
        Some("it is empty".to_owned())
    } else if bytes.len() > PATH_BYTES_MAX {
        Some(format!(
            "it is {} bytes, more than {PATH_BYTES_MAX}",
            bytes.len()
        ))
    } else if bytes.contains(&0) {
        Some("it contains a NUL byte".to_owned())
    } else if !path.is_absolute() {
        Some("it is not absolute".to_owned())
    } else {
        None
    }
}

/// A decoded page.
#[derive(Debug)]
struct Page {
    slot_count: u32,
    generation: u64,
    entries: Vec<SlotEntry>,
}

/// What one page file holds.
#[derive(Debug)]
enum PageRead {
    Valid(Page),
    /// Torn, short, empty or missing: why.
    Invalid(String),
}

/// The newest valid page and the index of its file; `None` if the first open never completed.
fn load_newest(
    files: [Option<&Arc<dyn DurableFile>>; 2],
) -> Result<Option<(Page, usize)>, PageError> {
    let mut reads = Vec::with_capacity(2);
    let mut second_len_bytes = 0;
    for (index, (file, name)) in files.into_iter().zip(PAGE_FILE_NAMES).enumerate() {
        let Some(file) = file else {
            reads.push(PageRead::Invalid("missing".to_owned()));
            continue;
        };
        let len_bytes = file.len_bytes().map_err(io_err("reading the slot table"))?;
        if index == 1 {
            second_len_bytes = len_bytes;
        }
        reads.push(read_page(name, file.as_ref(), len_bytes)?);
    }
    let mut reads = reads.into_iter();
    let (Some(first), Some(second)) = (reads.next(), reads.next()) else {
        return Err(PageError::Corrupt {
            reason: "internal: expected two page reads".to_owned(),
        });
    };
    match (first, second) {
        (PageRead::Valid(a), PageRead::Valid(b)) => {
            if a.generation == b.generation {
                Err(PageError::Corrupt {
                    reason: format!(
                        "{} and {} both hold generation {}",
                        PAGE_FILE_NAMES[0], PAGE_FILE_NAMES[1], a.generation
                    ),
                })
            } else if a.generation > b.generation {
                Ok(Some((a, 0)))
            } else {
                Ok(Some((b, 1)))
            }
        }
        (PageRead::Valid(a), PageRead::Invalid(_)) => Ok(Some((a, 0))),
        (PageRead::Invalid(_), PageRead::Valid(b)) => Ok(Some((b, 1))),
        (PageRead::Invalid(_), PageRead::Invalid(_)) if second_len_bytes == 0 => Ok(None),
        (PageRead::Invalid(why_a), PageRead::Invalid(why_b)) => Err(PageError::Corrupt {
            reason: format!(
                "no valid page: {}: {why_a}; {}: {why_b}",
                PAGE_FILE_NAMES[0], PAGE_FILE_NAMES[1]
            ),
        }),
    }
}

fn le_u32(bytes: &[u8; HEADER_BYTES], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn read_page(name: &str, file: &dyn DurableFile, len_bytes: u64) -> Result<PageRead, PageError> {
    if len_bytes < HEADER_BYTES as u64 {
        return Ok(PageRead::Invalid(format!(
            "{len_bytes} bytes, shorter than a page header"
        )));
    }
    let mut header = [0u8; HEADER_BYTES];
    file.read_exact_at(0, &mut header)
        .map_err(io_err("reading the slot table"))?;
    if header[8..16] != PAGE_MAGIC {
        return Ok(PageRead::Invalid("no page magic".to_owned()));
    }
    let body_len_bytes = le_u32(&header, 36) as usize;
    let page_len_bytes = HEADER_BYTES + body_len_bytes;
    if page_len_bytes > PAGE_BYTES_MAX {
        return Ok(PageRead::Invalid(format!(
            "page length {page_len_bytes} bytes is beyond the largest page"
        )));
    }
    if page_len_bytes as u64 > len_bytes {
        return Ok(PageRead::Invalid(format!(
            "page of {page_len_bytes} bytes in a file of {len_bytes}"
        )));
    }
    let mut page = vec![0u8; page_len_bytes];
    file.read_exact_at(0, &mut page)
        .map_err(io_err("reading the slot table"))?;
    let mut stored = [0u8; 8];
    stored.copy_from_slice(&page[0..8]);
    if u64::from_le_bytes(stored) != xxh3_64(&page[8..]) {
        return Ok(PageRead::Invalid("checksum mismatch".to_owned()));
    }
    // The checksum verifies: these are the bytes that were written. Anything wrong from here
    // on is a bug or tampering, not a torn write, and is refused rather than guessed around.
    decode_page(&page)
        .map(PageRead::Valid)
        .map_err(|reason| PageError::Corrupt {
            reason: format!("{name}: {reason}"),
        })
}

/// Reads little-endian fields from a byte slice, failing past its end.
struct Cursor<'a> {
    bytes: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, count: usize) -> Result<&'a [u8], String> {
        if count > self.bytes.len() {
            return Err(format!(
                "truncated: {count} bytes wanted, {} left",
                self.bytes.len()
            ));
        }
        let (head, tail) = self.bytes.split_at(count);
        self.bytes = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u16(&mut self) -> Result<u16, String> {
        self.array().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Result<u32, String> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, String> {
        self.array().map(u64::from_le_bytes)
    }
}

fn decode_page(page: &[u8]) -> Result<Page, String> {
    let mut cursor = Cursor { bytes: page };
    let _checksum = cursor.u64()?;
    let _magic = cursor.take(8)?;
    let version = cursor.u32()?;
    if version != PAGE_FORMAT_VERSION {
        return Err(format!(
            "format version {version}; this build reads version {PAGE_FORMAT_VERSION}"
        ));
    }
    let slot_count = cursor.u32()?;
    if !(1..=SLOT_COUNT_MAX).contains(&slot_count) {
        return Err(format!(
            "slot count {slot_count} is outside 1..={SLOT_COUNT_MAX}"
        ));
    }
    let generation = cursor.u64()?;
    if generation == 0 {
        return Err("generation 0".to_owned());
    }
    let entry_count = cursor.u32()?;
    let _body_len_bytes = cursor.u32()?;
    let mut entries = Vec::new();
    let mut disks = BTreeSet::new();
    let mut paths = BTreeSet::new();
    let mut previous_lun = 0;
    for _ in 0..entry_count {
        let lun = cursor.u32()?;
        let item: [u8; 16] = cursor.array()?;
        let disk_index = cursor.u32()?;
        let path_len_bytes = usize::from(cursor.u16()?);
        let path = PathBuf::from(OsString::from_vec(cursor.take(path_len_bytes)?.to_vec()));
        if lun <= previous_lun || lun >= slot_count {
            return Err(format!(
                "entry for LUN {lun} is out of order or outside 1..{slot_count}"
            ));
        }
        previous_lun = lun;
        if let Some(reason) = path_problem(&path) {
            return Err(format!("LUN {lun}: path {path:?}: {reason}"));
        }
        if !disks.insert((item, disk_index)) {
            return Err(format!(
                "item {} disk {disk_index} holds more than one LUN (again at LUN {lun})",
                hex_id(&item)
            ));
        }
        if !paths.insert(path.clone()) {
            return Err(format!(
                "path {path:?} is attached twice (again at LUN {lun})"
            ));
        }
        entries.push(SlotEntry {
            lun,
            item,
            disk_index,
            path,
        });
    }
    if !cursor.bytes.is_empty() {
        return Err(format!(
            "{} bytes after the last of {entry_count} entries",
            cursor.bytes.len()
        ));
    }
    Ok(Page {
        slot_count,
        generation,
        entries,
    })
}

fn hex_id(id: &[u8; 16]) -> String {
    hex::encode(id)
}
