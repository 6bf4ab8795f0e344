//! The capture's shared state and its one order: every change is written to the disk and
//! put into the stream (or into the change map) under [`Core::ordered`], so the stream's
//! order is the disks' order, and a bookmark taken under it sees every completed write.
//!
//! Lock: `Core::ordered` (a `Mutex<Ordered>`). It is held across the local write of one NBD
//! request (at most 32 MiB) and across one catch-up piece's read (at most 1 MiB): this is the
//! one lock held across I/O, on purpose — two writes to the same block must reach the stream
//! in the order they reached the disk. The sender's own lock is taken inside it (never the
//! other way round: the sender never calls back into the capture).

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use engine::delta::{Consistency, MAX_PAYLOAD_BYTES};

use super::disk::{DiskFile, MAX_REQUEST_BYTES};
use super::{Bookmarked, CaptureError, consistency_name};
use crate::changemap::ChangeMap;
use crate::sender::Agent;

/// One change of a disk, as the VM made it.
#[derive(Debug, Clone, Copy)]
pub(super) enum Change<'a> {
    /// Data written.
    Data(&'a [u8]),
    /// This many bytes made zero (trim or write-zeroes).
    Zero(u64),
}

impl Change<'_> {
    /// Bytes the change covers.
    fn length_bytes(&self) -> u64 {
        match self {
            Change::Data(data) => data.len() as u64,
            Change::Zero(length) => *length,
        }
    }
}

/// Counters of one disk.
#[derive(Debug, Default)]
pub(super) struct DiskCounters {
    pub(super) written_bytes: AtomicU64,
    pub(super) sent_bytes: AtomicU64,
    pub(super) resent_bytes: AtomicU64,
}

/// What the order lock guards.
pub(super) struct Ordered {
    /// One change map per disk (by disk index).
    pub(super) maps: Vec<ChangeMap>,
    /// The connected sender, if any.
    pub(super) sender: Option<Arc<Agent>>,
    /// Bumped each time a sender is installed.
    pub(super) generation: u64,
    /// The link's state, for status.
    pub(super) link: String,
    /// The acknowledged seq last given to the change maps.
    pub(super) acked_seen: u64,
    /// The last bookmark and the sender generation that carried it.
    pub(super) last_bookmark: Option<(Bookmarked, u64)>,
    last_bookmark_at: Option<Instant>,
    /// A flush asked for a bookmark that has not been taken yet.
    bookmark_wanted: bool,
    /// Reused buffer: unaligned read-backs and catch-up pieces.
    pub(super) scratch: Vec<u8>,
}

impl Ordered {
    pub(super) fn new(maps: Vec<ChangeMap>) -> Self {
        Self {
            maps,
            sender: None,
            generation: 0,
            link: "connecting".to_owned(),
            acked_seen: 0,
            last_bookmark: None,
            last_bookmark_at: None,
            bookmark_wanted: false,
            scratch: Vec::new(),
        }
    }

    pub(super) fn unsent_bytes(&self) -> u64 {
        self.maps.iter().map(ChangeMap::unsent_bytes).sum()
    }
}

/// The state the exports, the link thread, the catch-up thread and the API share.
pub(super) struct Core {
    pub(super) disks: Vec<Arc<DiskFile>>,
    pub(super) counters: Vec<DiskCounters>,
    pub(super) bookmark_interval: Duration,
    pub(super) backlog_limit_bytes: u64,
    pub(super) ordered: Mutex<Ordered>,
    /// Signalled when there is work for the catch-up (data marked unsent, a new sender).
    pub(super) wake: Condvar,
    pub(super) quiesced: AtomicBool,
    pub(super) stopping: AtomicBool,
    pub(super) bookmarks: AtomicU64,
    pub(super) flushes_coalesced: AtomicU64,
    pub(super) bookmarks_deferred: AtomicU64,
}

fn io_error(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Core {
    pub(super) fn lock(&self) -> MutexGuard<'_, Ordered> {
        self.ordered.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Gives the change maps the sender's newest acknowledgement.
    pub(super) fn note_acks(o: &mut Ordered) {
        if let Some(sender) = &o.sender {
            let acked = sender.acked_seq();
            if acked != o.acked_seen {
                o.acked_seen = acked;
                for map in &mut o.maps {
                    map.acked(acked);
                }
            }
        }
    }

    /// A change made by the VM: onto the disk, then into the stream or the change map.
    /// Zero ranges longer than one request are done in pieces (each within the activity
    /// log's reach).
    pub(super) fn write(
        &self,
        index: u16,
        offset_bytes: u64,
        change: Change<'_>,
    ) -> io::Result<()> {
        let shutdown = || io::Error::from_raw_os_error(libc::ESHUTDOWN);
        if self.quiesced.load(Ordering::Acquire) || self.is_stopping() {
            return Err(shutdown());
        }
        let i = usize::from(index);
        let disk = &self.disks[i];
        let length_bytes = change.length_bytes();
        let mut done = 0;
        while done < length_bytes {
            let piece = (length_bytes - done).min(u64::from(MAX_REQUEST_BYTES));
            let offset = offset_bytes + done;
            let mut o = self.lock();
            if self.quiesced.load(Ordering::Acquire) {
                return Err(shutdown());
            }
            Self::note_acks(&mut o);
            o.maps[i]
                .begin_write(offset, piece, &mut || disk.sync())
                .map_err(io_error)?;
            let (piece_change, written) = match change {
                Change::Data(data) => {
                    let data = &data[done as usize..(done + piece) as usize];
                    (Change::Data(data), disk.write_all_at(offset, data))
                }
                Change::Zero(_) => (Change::Zero(piece), disk.zero(offset, piece)),
            };
            if let Err(error) = written {
                // The range may be partly written: the catch-up sends what the disk holds.
                o.maps[i].mark_unsent(offset, piece);
                drop(o);
                self.wake.notify_all();
                return Err(error);
            }
            self.counters[i]
                .written_bytes
                .fetch_add(piece, Ordering::Relaxed);
            let block = u64::from(disk.block_size_bytes());
            let unsent = if offset.is_multiple_of(block) && piece.is_multiple_of(block) {
                self.stream(&mut o, index, offset, piece_change)
            } else {
                // Unaligned: the stream carries whole blocks, read back from the disk.
                let start = offset - offset % block;
                let end = (offset + piece).div_ceil(block) * block;
                let mut scratch = std::mem::take(&mut o.scratch);
                scratch.resize((end - start) as usize, 0);
                let read = disk.read_exact_at(start, &mut scratch);
                let unsent = match read {
                    Ok(()) => self.stream(&mut o, index, start, Change::Data(&scratch)),
                    Err(_) => {
                        o.maps[i].mark_unsent(start, end - start);
                        true
                    }
                };
                o.scratch = scratch;
                unsent
            };
            drop(o);
            if unsent {
                self.wake.notify_all();
            }
            done += piece;
        }
        Ok(())
    }

    /// Puts a block-aligned change into the stream, in frames of at most the payload limit;
    /// what the sender cannot take goes into the change map. Returns whether anything did.
    fn stream(&self, o: &mut Ordered, index: u16, offset_bytes: u64, change: Change<'_>) -> bool {
        let i = usize::from(index);
        let Some(sender) = o.sender.clone() else {
            o.maps[i].mark_unsent(offset_bytes, change.length_bytes());
            return true;
        };
        match change {
            Change::Zero(length) => match sender.zero_range(index, offset_bytes, length) {
                Ok(seq) => {
                    o.maps[i].sent(offset_bytes, length, seq);
                    false
                }
                Err(_) => {
                    o.maps[i].mark_unsent(offset_bytes, length);
                    true
                }
            },
            Change::Data(data) => {
                let mut done = 0usize;
                for piece in data.chunks(MAX_PAYLOAD_BYTES as usize) {
                    let offset = offset_bytes + done as u64;
                    match sender.write(index, offset, piece) {
                        Ok(seq) => {
                            o.maps[i].sent(offset, piece.len() as u64, seq);
                            self.counters[i]
                                .sent_bytes
                                .fetch_add(piece.len() as u64, Ordering::Relaxed);
                        }
                        Err(_) => {
                            o.maps[i].mark_unsent(offset, (data.len() - done) as u64);
                            return true;
                        }
                    }
                    done += piece.len();
                }
                false
            }
        }
    }

    /// A flush completed on some disk: a crash-consistent bookmark is wanted.
    pub(super) fn flushed(&self) {
        let mut o = self.lock();
        Self::note_acks(&mut o);
        o.bookmark_wanted = true;
        match self.flush_bookmark(&mut o) {
            FlushBookmark::Taken | FlushBookmark::NotWanted => {}
            FlushBookmark::TooSoon => {
                self.flushes_coalesced.fetch_add(1, Ordering::Relaxed);
            }
            FlushBookmark::CatchingUp | FlushBookmark::NoRoom => {
                self.bookmarks_deferred.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Takes the wanted flush bookmark if it is due and would be consistent.
    pub(super) fn flush_bookmark(&self, o: &mut Ordered) -> FlushBookmark {
        if !o.bookmark_wanted || self.quiesced.load(Ordering::Acquire) {
            return FlushBookmark::NotWanted;
        }
        if o.unsent_bytes() > 0 {
            return FlushBookmark::CatchingUp;
        }
        if o.last_bookmark_at
            .is_some_and(|at| at.elapsed() < self.bookmark_interval)
        {
            return FlushBookmark::TooSoon;
        }
        match self.take_bookmark(o, Consistency::Crash, "flush") {
            Ok(_) => FlushBookmark::Taken,
            Err(_) => FlushBookmark::NoRoom,
        }
    }

    /// Puts a bookmark into the stream now. The caller has checked that nothing is unsent.
    pub(super) fn take_bookmark(
        &self,
        o: &mut Ordered,
        consistency: Consistency,
        label: &str,
    ) -> Result<Bookmarked, CaptureError> {
        let Some(sender) = o.sender.clone() else {
            return Err(CaptureError::NotConnected {
                link: o.link.clone(),
            });
        };
        let last_id = o.last_bookmark.as_ref().map_or(0, |(b, _)| b.bookmark_id);
        let bookmark_id = now_ns().max(last_id + 1);
        let seq = sender.bookmark(consistency, bookmark_id, bookmark_id, label)?;
        let bookmarked = Bookmarked {
            bookmark_id,
            seq,
            consistency: consistency_name(consistency).to_owned(),
        };
        o.last_bookmark = Some((bookmarked.clone(), o.generation));
        o.last_bookmark_at = Some(Instant::now());
        o.bookmark_wanted = false;
        self.bookmarks.fetch_add(1, Ordering::Relaxed);
        Ok(bookmarked)
    }

    /// Waits (up to `timeout`) until the appliance acknowledged `seq`.
    pub(super) fn wait_acked(&self, seq: u64, timeout: Duration) -> Result<(), CaptureError> {
        let started = Instant::now();
        let mut o = self.lock();
        loop {
            if let Some((bookmark, generation)) = &o.last_bookmark
                && bookmark.seq == seq
                && *generation != o.generation
            {
                return Err(CaptureError::BookmarkLost { seq });
            }
            if let Some(sender) = &o.sender
                && sender.acked_seq() >= seq
            {
                return Ok(());
            }
            if self.is_stopping() {
                return Err(CaptureError::Stopping);
            }
            let left = timeout.saturating_sub(started.elapsed());
            if left.is_zero() {
                return Err(CaptureError::Timeout {
                    what: format!("the appliance to acknowledge seq {seq} (link {})", o.link),
                    waited_ms: started.elapsed().as_millis() as u64,
                });
            }
            o = self
                .wake
                .wait_timeout(o, left.min(Duration::from_millis(20)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// What a wanted flush bookmark came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FlushBookmark {
    Taken,
    NotWanted,
    TooSoon,
    CatchingUp,
    NoRoom,
}
