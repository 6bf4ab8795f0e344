//! An in-memory export and a fixed catalog: for tests, the fuzz target and demos.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::{BlockSizes, Catalog, Export, Extent};

/// Allocation granularity of [`MemoryExport`]: `block_status` reports holes per such block.
pub const MEMORY_BLOCK_BYTES: u64 = 4096;

#[derive(Debug)]
struct Image {
    bytes: Vec<u8>,
    /// One flag per MEMORY_BLOCK_BYTES block: written (data) or never/trimmed (hole).
    allocated: Vec<bool>,
}

/// A RAM disk. Blocks never written (or trimmed, or zeroed without NO_HOLE semantics) are
/// holes that read as zeros. `set_failing` makes every I/O fail with a given error kind.
#[derive(Debug)]
pub struct MemoryExport {
    image: Mutex<Image>,
    size_bytes: u64,
    read_only: bool,
    block_sizes: BlockSizes,
    closed: AtomicBool,
    failing: Mutex<Option<io::ErrorKind>>,
    /// Calls to write_at, trim and write_zeroes (to prove refusals never reach the export).
    pub write_calls: AtomicU64,
    pub flush_calls: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl MemoryExport {
    /// A zeroed (all hole) export of `size_bytes` (at most 1 GiB: it lives in memory).
    pub fn new(size_bytes: u64, read_only: bool) -> io::Result<Self> {
        if size_bytes > 1 << 30 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("memory export of {size_bytes} bytes is over the 1 GiB limit"),
            ));
        }
        let blocks = size_bytes.div_ceil(MEMORY_BLOCK_BYTES) as usize;
        Ok(Self {
            image: Mutex::new(Image {
                bytes: vec![0; size_bytes as usize],
                allocated: vec![false; blocks],
            }),
            size_bytes,
            read_only,
            block_sizes: BlockSizes {
                minimum_bytes: 1,
                preferred_bytes: 4096,
                maximum_bytes: 32 << 20,
            },
            closed: AtomicBool::new(false),
            failing: Mutex::new(None),
            write_calls: AtomicU64::new(0),
            flush_calls: AtomicU64::new(0),
        })
    }

    pub fn with_block_sizes(mut self, sizes: BlockSizes) -> Self {
        self.block_sizes = sizes;
        self
    }

    /// Fills [offset, offset + data.len()) directly (even when read-only), marking it data.
    pub fn fill(&self, offset_bytes: u64, data: &[u8]) -> io::Result<()> {
        let mut img = lock(&self.image);
        put(&mut img, self.size_bytes, offset_bytes, data)
    }

    /// A copy of the whole image.
    pub fn snapshot(&self) -> Vec<u8> {
        lock(&self.image).bytes.clone()
    }

    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    pub fn set_failing(&self, kind: Option<io::ErrorKind>) {
        *lock(&self.failing) = kind;
    }

    fn check(&self, offset_bytes: u64, length_bytes: u64) -> io::Result<(usize, usize)> {
        if let Some(kind) = *lock(&self.failing) {
            return Err(io::Error::new(kind, "memory export set to fail"));
        }
        range(self.size_bytes, offset_bytes, length_bytes)
    }
}

fn range(size_bytes: u64, offset_bytes: u64, length_bytes: u64) -> io::Result<(usize, usize)> {
    match offset_bytes.checked_add(length_bytes) {
        Some(end) if end <= size_bytes => Ok((offset_bytes as usize, end as usize)),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("offset {offset_bytes} + length {length_bytes} is past the size {size_bytes}"),
        )),
    }
}

fn put(img: &mut Image, size_bytes: u64, offset_bytes: u64, data: &[u8]) -> io::Result<()> {
    let (start, end) = range(size_bytes, offset_bytes, data.len() as u64)?;
    if let Some(dst) = img.bytes.get_mut(start..end) {
        dst.copy_from_slice(data);
    }
    mark(img, start, end, true);
    Ok(())
}

/// Marks blocks touched by [start, end) allocated, or (`false`) deallocates blocks wholly
/// inside it.
fn mark(img: &mut Image, start: usize, end: usize, allocated: bool) {
    if start >= end {
        return;
    }
    let b = MEMORY_BLOCK_BYTES as usize;
    let (first, last) = if allocated {
        (start / b, (end - 1) / b + 1)
    } else {
        (
            start.div_ceil(b),
            if end == img.bytes.len() {
                end.div_ceil(b)
            } else {
                end / b
            },
        )
    };
    for a in img.allocated.iter_mut().take(last).skip(first) {
        *a = allocated;
    }
}

impl Export for MemoryExport {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn block_sizes(&self) -> BlockSizes {
        self.block_sizes
    }
    fn multi_conn(&self) -> bool {
        true
    }
    fn description(&self) -> Option<String> {
        Some(format!("memory export of {} bytes", self.size_bytes))
    }
    fn read_at(&self, offset_bytes: u64, out: &mut [u8]) -> io::Result<()> {
        let (start, end) = self.check(offset_bytes, out.len() as u64)?;
        let img = lock(&self.image);
        if let Some(src) = img.bytes.get(start..end) {
            out.copy_from_slice(src);
        }
        Ok(())
    }
    fn write_at(&self, offset_bytes: u64, data: &[u8], _fua: bool) -> io::Result<()> {
        self.write_calls.fetch_add(1, Ordering::Relaxed);
        self.check(offset_bytes, data.len() as u64)?;
        put(&mut lock(&self.image), self.size_bytes, offset_bytes, data)
    }
    fn flush(&self) -> io::Result<()> {
        self.flush_calls.fetch_add(1, Ordering::Relaxed);
        self.check(0, 0).map(|_| ())
    }
    fn trim(&self, offset_bytes: u64, length_bytes: u64, fua: bool) -> io::Result<()> {
        self.write_zeroes(offset_bytes, length_bytes, fua)
    }
    fn write_zeroes(&self, offset_bytes: u64, length_bytes: u64, _fua: bool) -> io::Result<()> {
        self.write_calls.fetch_add(1, Ordering::Relaxed);
        let (start, end) = self.check(offset_bytes, length_bytes)?;
        let mut img = lock(&self.image);
        if let Some(dst) = img.bytes.get_mut(start..end) {
            dst.fill(0);
        }
        mark(&mut img, start, end, false);
        Ok(())
    }
    fn block_status(
        &self,
        offset_bytes: u64,
        length_bytes: u64,
        out: &mut Vec<Extent>,
    ) -> io::Result<()> {
        let (start, end) = self.check(offset_bytes, length_bytes)?;
        let img = lock(&self.image);
        let b = MEMORY_BLOCK_BYTES as usize;
        let mut pos = start;
        while pos < end {
            let block = pos / b;
            let hole = !img.allocated.get(block).copied().unwrap_or(false);
            let mut next = (block + 1) * b;
            while next < end && img.allocated.get(next / b).copied().unwrap_or(false) != hole {
                next += b;
            }
            let stop = next.min(end);
            out.push(Extent {
                length_bytes: (stop - pos) as u64,
                hole,
                zero: hole,
            });
            pos = stop;
        }
        Ok(())
    }
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }
}

/// A fixed set of named exports; `listable` decides whether OPT_LIST may disclose the names.
#[derive(Default)]
pub struct MemoryCatalog {
    exports: HashMap<String, Arc<dyn Export>>,
    listable: bool,
}

impl std::fmt::Debug for MemoryCatalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryCatalog")
            .field("names", &self.exports.keys())
            .finish()
    }
}

impl MemoryCatalog {
    pub fn new(listable: bool) -> Self {
        Self {
            exports: HashMap::new(),
            listable,
        }
    }
    pub fn with(mut self, name: &str, export: Arc<dyn Export>) -> Self {
        self.exports.insert(name.to_owned(), export);
        self
    }
}

impl Catalog for MemoryCatalog {
    fn lookup(&self, name: &str) -> Option<Arc<dyn Export>> {
        self.exports.get(name).cloned()
    }
    fn list(&self) -> Option<Vec<String>> {
        if !self.listable {
            return None;
        }
        let mut names: Vec<String> = self.exports.keys().cloned().collect();
        names.sort();
        Some(names)
    }
}
