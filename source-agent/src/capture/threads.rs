//! The capture's two threads: the link (a sender connected to the appliance, replaced when
//! it stops) and the catch-up (what the change maps hold, read back from the disks and sent;
//! flush bookmarks that were deferred).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::core::Ordered;

use super::core::Core;
use crate::sender::{Agent, AgentConfig, AgentError, fetch_chunk_hashes};
use engine::resync::{ResyncOptions, diff, hash_chunks};

/// Largest piece the catch-up reads and sends at once.
pub(super) const RESEND_PIECE_BYTES: u64 = 1 << 20;
/// Delay between failed connection rounds.
const RECONNECT_DELAY: Duration = Duration::from_secs(2);
/// How often an idle catch-up looks again (acks, due bookmarks).
const IDLE_POLL: Duration = Duration::from_millis(20);
/// Chunk size of the hash comparison of a delta resync.
const RESYNC_CHUNK_BYTES: u32 = 64 << 10;
/// Bound of one hash-list fetch (the appliance applies what it holds, then hashes a disk).
const RESYNC_HASH_TIMEOUT: Duration = Duration::from_secs(600);

/// Longest time a busy catch-up goes without saving the maps it resent from.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(10);
/// How often the link thread looks at its sender.
const LINK_POLL: Duration = Duration::from_millis(50);

/// Keeps a sender connected: connects (the disks are served meanwhile, their writes going
/// into the change maps), installs it, and when it stops with an error marks what it had not
/// delivered as unsent and connects again.
///
/// When the appliance wants a delta resync (`resync-required`: its cache overflowed, or an
/// operator asked), the differing chunks are found by hash (`mark_differences`) and marked
/// unsent, and the next sessions carry the RESYNC flag until a bookmark of theirs is
/// acknowledged: the catch-up sends the differences, and that bookmark ends the resync.
pub(super) fn run_link(core: &Core, config: &AgentConfig, fresh: &[bool]) {
    let mut config = config.clone();
    initial_delta(core, &mut config, fresh);
    while !core.is_stopping() {
        core.lock().link = "connecting".to_owned();
        let sender = match Agent::connect(config.clone()) {
            Ok(sender) => Arc::new(sender),
            Err(error) if error.needs_resync() && !config.resync => {
                resync(core, &mut config, &error);
                continue;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot reach the appliance; retrying");
                core.lock().link = format!("down: {error}");
                sleep_unless_stopping(core, RECONNECT_DELAY);
                continue;
            }
        };
        {
            let mut o = core.lock();
            o.generation += 1;
            o.acked_seen = sender.acked_seq();
            o.sender = Some(sender.clone());
            o.link = "connected".to_owned();
            tracing::info!(next_seq = sender.next_seq(), "streaming to the appliance");
        }
        core.wake.notify_all();
        let generation = core.lock().generation;
        while !core.is_stopping() {
            if config.resync && resync_bookmark_acked(core, &sender, generation) {
                tracing::info!("delta resync: its bookmark is acknowledged; the resync is over");
                config.resync = false;
            }
            if let Some(error) = sender.error() {
                tracing::warn!(%error, "the link to the appliance stopped; reconnecting");
                let mut o = core.lock();
                Core::note_acks(&mut o);
                let acked = sender.acked_seq();
                for map in &mut o.maps {
                    map.requeue_unacked(acked);
                }
                o.sender = None;
                o.link = format!("down: {error}");
                drop(o);
                core.wake.notify_all();
                if error.needs_resync() && !config.resync {
                    resync(core, &mut config, &error);
                }
                break;
            }
            sleep_unless_stopping(core, LINK_POLL);
        }
        // The Arc in `Ordered` was taken out above (or is taken by shutdown): dropping this
        // last handle stops the sender's threads.
        drop(sender);
        if !core.is_stopping() {
            sleep_unless_stopping(core, RECONNECT_DELAY);
        }
    }
}

fn sleep_unless_stopping(core: &Core, total: Duration) {
    let step = Duration::from_millis(20);
    let mut slept = Duration::ZERO;
    while slept < total && !core.is_stopping() {
        std::thread::sleep(step);
        slept += step;
    }
}

/// Sends what the change maps hold, a piece at a time (the order lock is let go between
/// pieces, so the VM's writes are not held up for long), and takes deferred flush bookmarks
/// when they become due.
pub(super) fn run_catch_up(core: &Core) {
    let mut next_disk = 0usize;
    let disks = core.disks.len();
    let mut o = core.lock();
    // Resent since its map was last saved: the saved map holds more than the map now.
    let mut resent_since_save = vec![false; disks];
    let mut last_save = Instant::now();
    while !core.is_stopping() {
        Core::note_acks(&mut o);
        let mut sent_one = false;
        if let Some(sender) = o.sender.clone()
            && sender.backlog().1 + RESEND_PIECE_BYTES <= core.backlog_limit_bytes
        {
            for k in 0..disks {
                let i = (next_disk + k) % disks;
                let Some((offset, length)) = o.maps[i].next_unsent(RESEND_PIECE_BYTES) else {
                    continue;
                };
                next_disk = (i + 1) % disks;
                let disk = &core.disks[i];
                // (No activity-log entry: a resent range stays covered by the change map's
                // in-flight sets, saved with the map, until its frame is acknowledged.)
                let mut scratch = std::mem::take(&mut o.scratch);
                scratch.resize(length as usize, 0);
                if let Err(error) = disk.read_exact_at(offset, &mut scratch) {
                    tracing::error!(%error, disk = i, offset, "cannot read back for resend");
                    o.scratch = scratch;
                    break;
                }
                let index = i as u16; // at most 64 disks
                // Zeros (most of a fresh sparse disk) travel as a zero range, not as data.
                let queued = if scratch.iter().all(|&b| b == 0) {
                    sender.zero_range(index, offset, length)
                } else {
                    sender.write(index, offset, &scratch)
                };
                o.scratch = scratch;
                if let Ok(seq) = queued {
                    o.maps[i].resent(offset, length, seq);
                    core.counters[i]
                        .resent_bytes
                        .fetch_add(length, Ordering::Relaxed);
                    sent_one = true;
                    resent_since_save[i] = true;
                }
                break;
            }
        }
        core.flush_bookmark(&mut o);
        if !sent_one && resent_since_save.contains(&true) {
            let delivered = o.sender.as_ref().is_some_and(|s| s.backlog().0 == 0);
            if delivered || last_save.elapsed() >= CHECKPOINT_INTERVAL {
                last_save = Instant::now();
                // Write the disks' dirty pages back without the order lock (that can take
                // long and would stall the VM's writes); the checkpoint's own sync under the
                // lock then has little left to do.
                drop(o);
                for (disk, resent) in core.disks.iter().zip(&resent_since_save) {
                    if *resent && let Err(error) = disk.sync() {
                        tracing::error!(%error, path = %disk.path().display(), "cannot sync");
                    }
                }
                o = core.lock();
                Core::note_acks(&mut o);
                save_maps(core, &mut o, &mut resent_since_save);
            }
        }
        if sent_one {
            // Let the VM's writes in between pieces.
            drop(o);
            std::thread::yield_now();
            o = core.lock();
        } else {
            o = core
                .wake
                .wait_timeout(o, IDLE_POLL)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Saves the change maps that were resent from since their last save (after everything is
/// delivered, or at most every [`CHECKPOINT_INTERVAL`] while the catch-up is busy), so that a
/// crash does not resend what was delivered since: the saved map only over-approximates.
fn save_maps(core: &Core, o: &mut Ordered, resent_since_save: &mut [bool]) {
    for (i, map) in o.maps.iter_mut().enumerate() {
        if !resent_since_save[i] {
            continue;
        }
        let disk = &core.disks[i];
        match map.checkpoint(&mut || disk.sync()) {
            Ok(()) => resent_since_save[i] = false,
            Err(error) => tracing::error!(%error, disk = i, "cannot save the change map"),
        }
    }
}

/// The appliance wants a delta resync: marks the chunks that differ unsent, and sets the
/// RESYNC flag for the next sessions. No sender is installed meanwhile, so every write the
/// VM makes during the hashing is marked unsent too. On failure the flag is set anyway and
/// the whole of each disk not compared is marked unsent (correct, only slower).
fn resync(core: &Core, config: &mut AgentConfig, why: &AgentError) {
    tracing::warn!(%why, "the appliance wants a delta resync: comparing chunk hashes");
    core.lock().link = format!("resyncing: {why}");
    for (i, disk) in core.disks.iter().enumerate() {
        let compared = differences(core, config, i);
        let mut o = core.lock();
        match compared {
            Ok(ranges) => {
                let bytes: u64 = ranges.iter().map(|r| r.1).sum();
                tracing::info!(
                    disk = i,
                    ranges = ranges.len(),
                    bytes,
                    "delta resync: compared"
                );
                for (offset, length) in ranges {
                    o.maps[i].mark_unsent(offset, length);
                }
            }
            Err(error) => {
                tracing::warn!(%error, disk = i, "delta resync: cannot compare; resending the disk");
                o.maps[i].mark_unsent(0, disk.size_bytes());
            }
        }
    }
    config.resync = true;
}

/// The first start on a fresh state directory: instead of copying every disk whole, compare
/// chunk hashes with the replica (a re-protect's replica holds the disk already; a new one
/// is zeros) and narrow each fresh change map to the differing chunks plus the activity-log
/// extents the VM wrote meanwhile. A disk that cannot be compared keeps its whole-disk copy
/// (correct, slower). The first session then carries the RESYNC flag: this is the item's
/// initial sync exchange.
pub(super) fn initial_delta(core: &Core, config: &mut AgentConfig, fresh: &[bool]) {
    if !fresh.contains(&true) {
        return;
    }
    core.lock().link = "comparing chunk hashes for the initial sync".to_owned();
    for (i, disk) in core.disks.iter().enumerate() {
        if !fresh[i] || core.is_stopping() {
            continue;
        }
        let compared = differences(core, config, i);
        let mut o = core.lock();
        let narrowed = match compared {
            Ok(ranges) => {
                let bytes: u64 = ranges.iter().map(|r| r.1).sum();
                match o.maps[i].narrow_fresh(&ranges) {
                    Ok(true) => Some(bytes),
                    Ok(false) => None,
                    Err(error) => {
                        tracing::warn!(%error, disk = i, "initial sync: cannot save the map");
                        None
                    }
                }
            }
            Err(error) => {
                tracing::warn!(%error, disk = i, "initial sync: cannot compare; copying the disk");
                None
            }
        };
        match narrowed {
            Some(bytes) => {
                tracing::info!(
                    disk = i,
                    bytes,
                    size = disk.size_bytes(),
                    "initial sync: delta"
                );
                config.resync = true;
            }
            None => tracing::info!(disk = i, "initial sync: the whole disk"),
        }
    }
}

/// The chunks of disk `i` whose hashes differ from the replica's: (offset, length) ranges.
fn differences(core: &Core, config: &AgentConfig, i: usize) -> Result<Vec<(u64, u64)>, String> {
    let disk = &core.disks[i];
    let index = i as u16; // at most 64 disks
    let replica = fetch_chunk_hashes(
        config.addr,
        &config.item_id,
        &config.token,
        index,
        RESYNC_CHUNK_BYTES,
        RESYNC_HASH_TIMEOUT,
        crate::resync::hash_list_bytes(disk.size_bytes(), RESYNC_CHUNK_BYTES),
    )
    .map_err(|e| e.to_string())?;
    let options = ResyncOptions {
        chunk_size_bytes: RESYNC_CHUNK_BYTES,
        ..ResyncOptions::default()
    };
    let source = hash_chunks(
        disk.file(),
        disk.size_bytes(),
        &options,
        &mut |_| {},
        &|| core.is_stopping(),
    )
    .map_err(|e| e.to_string())?;
    let ranges = diff(&source, &replica).map_err(|e| e.to_string())?;
    Ok(ranges
        .iter()
        .map(|r| (r.offset_bytes, r.length_bytes))
        .collect())
}

/// Whether a bookmark put into the stream by this sender (generation) is acknowledged.
fn resync_bookmark_acked(core: &Core, sender: &Agent, generation: u64) -> bool {
    let o = core.lock();
    o.last_bookmark
        .as_ref()
        .is_some_and(|(b, g)| *g == generation && sender.acked_seq() >= b.seq)
}
