//! Aligned, reusable I/O buffers: [`BufPool`] and the owned [`IoBuf`] it hands out.
//!
//! The pool owns a few anonymous memory maps ("arenas", each at most [`ARENA_MAX_BYTES`] so
//! one arena fits one io_uring buffer registration) and slices them into `buf_count` buffers
//! of `buf_size_bytes` each. A buffer is identified by its global index; arena `a`, slot `s`
//! lies at `a * bufs_per_arena + s`.
//!
//! ```text
//!  arena 0 (≤ 1 GiB, page-aligned)          arena 1
//! ┌────────┬────────┬─────┬────────┐       ┌────────┬────────┬──┐
//! │ buf 0  │ buf 1  │ ... │ buf k-1│       │ buf k  │ buf k+1│..│
//! └────────┴────────┴─────┴────────┘       └────────┴────────┴──┘
//!        ▲ free list: Vec<u32> of global indices, preallocated, never grows
//! ```
//!
//! Invariants:
//! - every buffer starts on a [`BUF_ALIGN_BYTES`] boundary (arenas are page-aligned and the
//!   buffer size is a multiple of 4096), so it is usable for `O_DIRECT` on any device with a
//!   logical block size of at most 4096;
//! - a buffer index is either on the free list or owned by exactly one [`IoBuf`], never both:
//!   an `IoBuf` is the only way to reach its bytes, so `&mut [u8]` views never alias;
//! - an `IoBuf` keeps its pool (and so the arenas) alive; the arenas are unmapped only when the
//!   pool handle and every `IoBuf` are gone. An I/O backend that lends a buffer to the kernel
//!   holds the `IoBuf` until the kernel is done with it;
//! - [`BufPool::take`] and dropping an `IoBuf` do not allocate; a dropped `IoBuf` goes back to
//!   the free list (dropping is how a buffer is given back; [`BufPool::give_back`] is the same
//!   thing spelled out);
//! - the pool never grows: when every buffer is out, `take` returns `None` (back-pressure).

use std::fmt;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, PoisonError};

use memmap2::{MmapOptions, MmapRaw};

/// Alignment of every buffer, in bytes.
pub const BUF_ALIGN_BYTES: usize = 4096;
/// Upper bound of one arena: a larger io_uring buffer registration fails with EFAULT.
pub const ARENA_MAX_BYTES: usize = 1 << 30;
/// Default size of one buffer.
pub const DEFAULT_BUF_SIZE_BYTES: usize = 1 << 20;
/// Default number of buffers of a pool.
pub const DEFAULT_BUF_COUNT: usize = 64;

/// Shape of a [`BufPool`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufPoolConfig {
    /// Size of each buffer: a non-zero multiple of [`BUF_ALIGN_BYTES`], at most
    /// `arena_max_bytes`.
    pub buf_size_bytes: usize,
    /// Number of buffers (the pool's fixed capacity).
    pub buf_count: usize,
    /// Upper bound of one arena: a multiple of [`BUF_ALIGN_BYTES`], at most [`ARENA_MAX_BYTES`].
    /// Smaller values only exist to exercise multi-arena pools in tests.
    pub arena_max_bytes: usize,
}

impl Default for BufPoolConfig {
    fn default() -> Self {
        Self {
            buf_size_bytes: DEFAULT_BUF_SIZE_BYTES,
            buf_count: DEFAULT_BUF_COUNT,
            arena_max_bytes: ARENA_MAX_BYTES,
        }
    }
}

/// Why a [`BufPool`] could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BufPoolError {
    /// The configuration breaks a limit of [`BufPoolConfig`].
    #[error("invalid buffer pool configuration {config:?}: {why}")]
    Config {
        /// The configuration given.
        config: BufPoolConfig,
        /// Which limit is broken.
        why: &'static str,
    },
    /// Mapping an arena failed (usually ENOMEM).
    #[error("mapping a buffer arena of {len_bytes} bytes failed")]
    Map {
        /// Size of the arena.
        len_bytes: usize,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// A fixed-capacity pool of aligned buffers; cheap to clone (a shared handle), `Send + Sync`.
#[derive(Clone)]
pub struct BufPool {
    inner: Arc<PoolInner>,
}

struct Arena {
    /// Owns the mapping. Its bytes are only reached through `base`, never through a reference
    /// to the whole map, so per-buffer `&mut [u8]` views never alias.
    map: MmapRaw,
}

struct PoolInner {
    arenas: Box<[Arena]>,
    buf_size_bytes: usize,
    bufs_per_arena: usize,
    buf_count: usize,
    /// Free buffer indices; capacity `buf_count`, so pushes never reallocate.
    free: Mutex<Vec<u32>>,
}

impl PoolInner {
    fn lock_free(&self) -> std::sync::MutexGuard<'_, Vec<u32>> {
        // A panic while holding the lock cannot leave a Vec<u32> of indices half-updated.
        self.free.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl BufPool {
    /// Maps the arenas and puts every buffer on the free list.
    pub fn new(config: BufPoolConfig) -> Result<Self, BufPoolError> {
        let bad = |why| BufPoolError::Config { config, why };
        if config.arena_max_bytes == 0
            || config.arena_max_bytes > ARENA_MAX_BYTES
            || !config.arena_max_bytes.is_multiple_of(BUF_ALIGN_BYTES)
        {
            return Err(bad(
                "arena_max_bytes must be a non-zero multiple of 4096, at most 1 GiB",
            ));
        }
        if config.buf_size_bytes == 0
            || !config.buf_size_bytes.is_multiple_of(BUF_ALIGN_BYTES)
            || config.buf_size_bytes > config.arena_max_bytes
        {
            return Err(bad(
                "buf_size_bytes must be a non-zero multiple of 4096, at most arena_max_bytes",
            ));
        }
        if config.buf_count == 0 || u32::try_from(config.buf_count).is_err() {
            return Err(bad("buf_count must be between 1 and u32::MAX"));
        }
        let bufs_per_arena = config.arena_max_bytes / config.buf_size_bytes;
        let arena_count = config.buf_count.div_ceil(bufs_per_arena);
        if arena_count > usize::from(u16::MAX) {
            return Err(bad("too many arenas (more than u16::MAX)"));
        }
        let mut arenas = Vec::with_capacity(arena_count);
        let mut left = config.buf_count;
        for _ in 0..arena_count {
            let bufs = left.min(bufs_per_arena);
            left -= bufs;
            let len_bytes = bufs * config.buf_size_bytes;
            let map = MmapOptions::new()
                .len(len_bytes)
                .map_anon()
                .map_err(|source| BufPoolError::Map { len_bytes, source })?;
            arenas.push(Arena {
                map: MmapRaw::from(map),
            });
        }
        // Hand out low indices first (pop takes from the end).
        let free: Vec<u32> = (0..config.buf_count as u32).rev().collect();
        Ok(Self {
            inner: Arc::new(PoolInner {
                arenas: arenas.into_boxed_slice(),
                buf_size_bytes: config.buf_size_bytes,
                bufs_per_arena,
                buf_count: config.buf_count,
                free: Mutex::new(free),
            }),
        })
    }

    /// Takes a free buffer, or `None` when all are out. Its `len_bytes` is its full capacity;
    /// its contents are whatever the previous user left (zeros on first use).
    pub fn take(&self) -> Option<IoBuf> {
        let index = self.inner.lock_free().pop()?;
        let index_usize = index as usize;
        let arena_index = index_usize / self.inner.bufs_per_arena;
        let offset_in_arena_bytes =
            (index_usize % self.inner.bufs_per_arena) * self.inner.buf_size_bytes;
        let arena = &self.inner.arenas[arena_index];
        debug_assert!(offset_in_arena_bytes + self.inner.buf_size_bytes <= arena.map.len());
        // SAFETY: `offset_in_arena_bytes + buf_size_bytes <= arena length` by construction
        // (arena `a` holds exactly the buffers `a * bufs_per_arena ..`), so the pointer stays
        // inside the mapping, which is non-null.
        let ptr = unsafe { arena.map.as_mut_ptr().add(offset_in_arena_bytes) };
        let ptr = NonNull::new(ptr)?;
        Some(IoBuf {
            pool: Arc::clone(&self.inner),
            index,
            ptr,
            len_bytes: self.inner.buf_size_bytes,
        })
    }

    /// Gives a buffer back. Same as dropping it; a buffer of another pool goes back to its own.
    pub fn give_back(&self, buf: IoBuf) {
        drop(buf);
    }

    /// Size of each buffer.
    pub fn buf_size_bytes(&self) -> usize {
        self.inner.buf_size_bytes
    }

    /// Number of buffers (the fixed capacity).
    pub fn capacity(&self) -> usize {
        self.inner.buf_count
    }

    /// Number of buffers on the free list now.
    pub fn available(&self) -> usize {
        self.inner.lock_free().len()
    }

    /// Number of arenas (one io_uring buffer registration each).
    pub fn arena_count(&self) -> usize {
        self.inner.arenas.len()
    }

    /// Base address and length of each arena, for buffer registration.
    pub(crate) fn arena_iovecs(&self) -> impl Iterator<Item = (*mut u8, usize)> + '_ {
        self.inner
            .arenas
            .iter()
            .map(|a| (a.map.as_mut_ptr(), a.map.len()))
    }

    /// Identity of this pool, compared with [`IoBuf::pool_ptr`].
    pub(crate) fn pool_ptr(&self) -> *const () {
        Arc::as_ptr(&self.inner).cast()
    }

    /// Whether `buf` was taken from this pool.
    pub fn owns(&self, buf: &IoBuf) -> bool {
        Arc::ptr_eq(&self.inner, &buf.pool)
    }
}

impl fmt::Debug for BufPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BufPool")
            .field("buf_size_bytes", &self.inner.buf_size_bytes)
            .field("capacity", &self.inner.buf_count)
            .field("available", &self.available())
            .field("arenas", &self.inner.arenas.len())
            .finish()
    }
}

/// One buffer of a [`BufPool`], owned: it moves into an I/O op and comes back in the
/// completion. Goes back to the pool when dropped.
///
/// `len_bytes` is the valid length (what a write writes, how much a read reads); the
/// capacity is the pool's buffer size.
pub struct IoBuf {
    pool: Arc<PoolInner>,
    index: u32,
    ptr: NonNull<u8>,
    len_bytes: usize,
}

// SAFETY: an IoBuf is the unique owner of its byte range (the free-list invariant), the
// arena it points into is kept mapped by `pool`, and it has no thread-affine state, so it may
// move to another thread (a network or zstd thread fills it, the ring thread writes it).
unsafe impl Send for IoBuf {}
// SAFETY: `&IoBuf` only gives `&[u8]` (shared reads); mutation needs `&mut IoBuf`.
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// The valid length.
    pub fn len_bytes(&self) -> usize {
        self.len_bytes
    }

    /// Sets the valid length.
    ///
    /// # Panics
    /// If `len_bytes` exceeds the capacity (a caller bug, never an I/O outcome).
    pub fn set_len_bytes(&mut self, len_bytes: usize) {
        assert!(
            len_bytes <= self.capacity_bytes(),
            "IoBuf length {len_bytes} over capacity {}",
            self.capacity_bytes()
        );
        self.len_bytes = len_bytes;
    }

    /// The buffer's size (the pool's `buf_size_bytes`).
    pub fn capacity_bytes(&self) -> usize {
        self.pool.buf_size_bytes
    }

    /// Index of the arena holding this buffer (its io_uring registered-buffer index).
    pub fn arena_index(&self) -> usize {
        self.index as usize / self.pool.bufs_per_arena
    }

    /// Offset of this buffer inside its arena.
    pub fn offset_in_arena_bytes(&self) -> usize {
        (self.index as usize % self.pool.bufs_per_arena) * self.pool.buf_size_bytes
    }

    /// Global index of this buffer in its pool.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The valid bytes, `[0, len_bytes)`.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points to `capacity_bytes` bytes of a live, initialised (anonymous
        // maps are zero-filled) mapping owned exclusively by this IoBuf; `len_bytes <= capacity`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len_bytes) }
    }

    /// The valid bytes, `[0, len_bytes)`, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`; `&mut self` guarantees no other view exists.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len_bytes) }
    }

    /// The whole capacity, writable, whatever `len_bytes` is (e.g. to decompress into it,
    /// then [`set_len_bytes`](Self::set_len_bytes)).
    pub fn capacity_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_mut_slice`, over the full capacity.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.capacity_bytes()) }
    }

    /// Copies `data` to the start of the buffer and sets `len_bytes` to its length.
    ///
    /// # Panics
    /// If `data` is longer than the capacity (a caller bug).
    pub fn copy_from(&mut self, data: &[u8]) {
        self.set_len_bytes(data.len());
        self.as_mut_slice().copy_from_slice(data);
    }

    /// Start of the buffer, for handing to the kernel.
    pub(crate) fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Identity of the owning pool, to tell registered buffers from foreign ones.
    pub(crate) fn pool_ptr(&self) -> *const () {
        Arc::as_ptr(&self.pool).cast()
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        // Capacity is buf_count and this index is not on the list, so this never reallocates.
        self.pool.lock_free().push(self.index);
    }
}

impl fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoBuf")
            .field("index", &self.index)
            .field("arena_index", &self.arena_index())
            .field("offset_in_arena_bytes", &self.offset_in_arena_bytes())
            .field("len_bytes", &self.len_bytes)
            .field("capacity_bytes", &self.capacity_bytes())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(buf_count: usize) -> BufPool {
        BufPool::new(BufPoolConfig {
            buf_size_bytes: 8192,
            buf_count,
            arena_max_bytes: 4 * 8192,
        })
        .unwrap()
    }

    #[test]
    fn buffers_are_aligned_and_distinct() {
        let pool = small(10);
        assert_eq!(pool.arena_count(), 3);
        let bufs: Vec<IoBuf> = (0..10).map(|_| pool.take().unwrap()).collect();
        let mut starts: Vec<usize> = bufs
            .iter()
            .map(|b| b.as_slice().as_ptr() as usize)
            .collect();
        for s in &starts {
            assert_eq!(s % BUF_ALIGN_BYTES, 0);
        }
        starts.sort_unstable();
        starts.dedup();
        assert_eq!(starts.len(), 10);
        assert_eq!(bufs[5].arena_index(), 1);
        assert_eq!(bufs[5].offset_in_arena_bytes(), 8192);
        assert_eq!(bufs[9].arena_index(), 2);
    }

    #[test]
    fn exhaustion_and_return() {
        let pool = small(2);
        let a = pool.take().unwrap();
        let b = pool.take().unwrap();
        assert!(pool.take().is_none());
        assert_eq!(pool.available(), 0);
        pool.give_back(a);
        assert_eq!(pool.available(), 1);
        drop(b);
        assert_eq!(pool.available(), 2);
    }

    #[test]
    fn contents_and_length() {
        let pool = small(1);
        let mut b = pool.take().unwrap();
        assert_eq!(b.len_bytes(), 8192);
        b.copy_from(&[7; 100]);
        assert_eq!(b.len_bytes(), 100);
        assert_eq!(b.as_slice(), &[7; 100][..]);
        b.capacity_mut()[8191] = 1;
        assert_eq!(b.capacity_mut().len(), 8192);
        assert!(pool.owns(&b));
        assert!(!small(1).owns(&b));
    }

    #[test]
    fn buffer_moves_across_threads_and_outlives_pool_handle() {
        let pool = small(1);
        let mut b = pool.take().unwrap();
        drop(pool.clone());
        let b2 = std::thread::spawn(move || {
            b.copy_from(b"hello");
            b
        })
        .join()
        .unwrap();
        drop(pool);
        assert_eq!(b2.as_slice(), b"hello");
    }

    #[test]
    fn bad_configs_are_refused() {
        for config in [
            BufPoolConfig {
                buf_size_bytes: 1000,
                ..Default::default()
            },
            BufPoolConfig {
                buf_count: 0,
                ..Default::default()
            },
            BufPoolConfig {
                arena_max_bytes: ARENA_MAX_BYTES + 4096,
                ..Default::default()
            },
            BufPoolConfig {
                buf_size_bytes: 8192,
                buf_count: 1,
                arena_max_bytes: 4096,
            },
        ] {
            assert!(matches!(
                BufPool::new(config),
                Err(BufPoolError::Config { .. })
            ));
        }
    }
}
