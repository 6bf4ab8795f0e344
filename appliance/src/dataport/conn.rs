//! The data port's table of served connections: each one's phase against the handshake and
//! session limits, per-item session ends ([`PortHandle`]) and the port's counters.

use std::collections::HashMap;
use std::net::{IpAddr, Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use engine::port::{Refusal, Status};

use super::config::{DataPortConfig, DataPortStats};
use super::registry::ItemRegistry;

pub(super) struct PortShared {
    pub(super) registry: Arc<dyn ItemRegistry>,
    pub(super) config: DataPortConfig,
    pub(super) shutting_down: AtomicBool,
    pub(super) active: AtomicUsize,
    pub(super) accepted: AtomicU64,
    pub(super) refused_over_limit: AtomicU64,
    pub(super) handshakes_dropped: AtomicU64,
    /// Bytes the mode-2 connections hold for hashing now (≤ `max_hash_memory_bytes`).
    pub(super) hash_memory_bytes: AtomicU64,
    pub(super) sessions_started: AtomicU64,
    pub(super) next_conn_id: AtomicU64,
    /// Each served connection, to end sessions at shutdown or per item.
    pub(super) sockets: Mutex<HashMap<u64, Conn>>,
    pub(super) threads: Mutex<Vec<JoinHandle<()>>>,
}

/// A served connection: a clone of its socket, the item its hello names (once read), whether
/// the session was told to end, and where it stands with the limits.
pub(super) struct Conn {
    pub(super) stream: TcpStream,
    pub(super) item: Option<[u8; 16]>,
    pub(super) ended: Arc<AtomicBool>,
    /// Set when the connection was dropped to make room (limits on unauthenticated ones).
    pub(super) dropped: Arc<AtomicBool>,
    pub(super) peer_ip: Option<IpAddr>,
    pub(super) phase: Phase,
}

/// Where a connection stands with the port's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// Reading the hello: unauthenticated, counted against the handshake limits, may be dropped.
    Handshake,
    /// The hello is read and the registry is checking it: counted nowhere (it is either
    /// refused at once or accepted).
    Checking,
    /// The registry accepted the hello: counted against `max_sessions`.
    Session,
    /// Being refused (reply sent, draining): counted against the handshake limits again, may be
    /// dropped.
    Refused,
    /// Dropped to make room; its thread is ending.
    Dropped,
}

impl Phase {
    pub(super) fn unauthenticated(self) -> bool {
        matches!(self, Self::Handshake | Self::Refused)
    }
}

impl Conn {
    pub(super) fn end(&self) {
        self.ended.store(true, Ordering::Release);
        let _ = self.stream.shutdown(Shutdown::Read);
    }

    /// Drops an unauthenticated connection: a thread reading the hello sees the end of input
    /// and refuses it by name; one that is draining after a refusal stops at once.
    pub(super) fn drop_for_room(&mut self) {
        self.dropped.store(true, Ordering::Release);
        let how = if self.phase == Phase::Handshake {
            Shutdown::Read
        } else {
            Shutdown::Both
        };
        // shutdown(2) does not block.
        let _ = self.stream.shutdown(how);
        self.phase = Phase::Dropped;
    }
}

/// A handle on a running port for the rest of the appliance: ends the streaming sessions of
/// one item (failover, failback, disable, resync) and reads the counters. Cheap to clone.
#[derive(Clone)]
pub struct PortHandle(pub(super) Arc<PortShared>);

impl std::fmt::Debug for PortHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PortHandle")
    }
}

impl PortHandle {
    /// The port's counters.
    pub fn stats(&self) -> DataPortStats {
        stats_of(&self.0)
    }

    /// Ends every session streaming `item_id` after its current commit, with a
    /// `shutting-down` close record (a reconnect then learns from the registry whether the
    /// item still replicates); returns how many there were.
    pub fn end_item(&self, item_id: &[u8; 16]) -> usize {
        let sockets = self.0.sockets();
        let mine: Vec<&Conn> = sockets
            .values()
            .filter(|conn| conn.item.as_ref() == Some(item_id))
            .collect();
        mine.iter().for_each(|conn| conn.end());
        mine.len()
    }
}

impl PortShared {
    pub(super) fn sockets(&self) -> MutexGuard<'_, HashMap<u64, Conn>> {
        self.sockets.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn threads(&self) -> MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.threads.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn stopping(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }
}

/// Releases a connection's slot and socket registration, even if its thread panics.
pub(super) struct ConnSlot<'a> {
    pub(super) shared: &'a PortShared,
    pub(super) id: u64,
}

impl Drop for ConnSlot<'_> {
    fn drop(&mut self) {
        self.shared.sockets().remove(&self.id);
        self.shared.active.fetch_sub(1, Ordering::AcqRel);
    }
}

impl PortShared {
    /// Moves connection `id` to `phase` (not out of `Dropped`); returns its phase before.
    pub(super) fn set_phase(&self, id: u64, phase: Phase) -> Option<Phase> {
        let mut sockets = self.sockets();
        let conn = sockets.get_mut(&id)?;
        let before = conn.phase;
        if before != Phase::Dropped {
            conn.phase = phase;
        }
        Some(before)
    }

    /// Records the item a connection's hello names (so that `end_item` reaches it).
    pub(super) fn set_item(&self, id: u64, item: [u8; 16]) {
        if let Some(conn) = self.sockets().get_mut(&id) {
            conn.item = Some(item);
        }
    }

    /// Counts an accepted hello as a session, or says why it cannot be served.
    pub(super) fn admit_session(&self, id: u64) -> Result<(), Refusal> {
        let mut sockets = self.sockets();
        let sessions = sockets
            .values()
            .filter(|conn| conn.phase == Phase::Session)
            .count();
        let conn = sockets
            .get_mut(&id)
            .ok_or_else(|| Refusal::new(Status::ShuttingDown, "the connection is being closed"))?;
        if conn.phase == Phase::Dropped {
            return Err(Refusal::new(
                Status::TooManyConnections,
                "the connection was dropped to make room for newer ones",
            ));
        }
        if sessions >= self.config.max_sessions {
            self.refused_over_limit.fetch_add(1, Ordering::AcqRel);
            return Err(Refusal::new(
                Status::TooManyConnections,
                format!(
                    "the data port serves its maximum of {} sessions; retry later",
                    self.config.max_sessions
                ),
            ));
        }
        conn.phase = Phase::Session;
        Ok(())
    }

    /// Makes room for a new unauthenticated connection from `peer_ip`: drops that address's
    /// oldest one when it holds `max_handshakes_per_ip`, else, when all of them together hold
    /// `max_handshakes`, the oldest one of the address holding the most.
    pub(super) fn make_room_for_handshake(&self, peer_ip: Option<IpAddr>) {
        let mut sockets = self.sockets();
        let mut per_ip: HashMap<Option<IpAddr>, (usize, u64)> = HashMap::new();
        let mut total = 0usize;
        for (&id, conn) in sockets.iter() {
            if conn.phase.unauthenticated() {
                total += 1;
                let entry = per_ip.entry(conn.peer_ip).or_insert((0, id));
                entry.0 += 1;
                entry.1 = entry.1.min(id);
            }
        }
        let victim = match per_ip.get(&peer_ip) {
            Some(&(count, oldest)) if count >= self.config.max_handshakes_per_ip => Some(oldest),
            _ if total >= self.config.max_handshakes => per_ip
                .values()
                .max_by_key(|&&(count, oldest)| (count, std::cmp::Reverse(oldest)))
                .map(|&(_, oldest)| oldest),
            _ => None,
        };
        if let Some(conn) = victim.and_then(|id| sockets.get_mut(&id)) {
            conn.drop_for_room();
            self.handshakes_dropped.fetch_add(1, Ordering::AcqRel);
        }
    }
}

pub(super) fn stats_of(shared: &PortShared) -> DataPortStats {
    let (handshakes, sessions_active) = {
        let sockets = shared.sockets();
        let count =
            |wanted: fn(Phase) -> bool| sockets.values().filter(|conn| wanted(conn.phase)).count();
        (
            count(Phase::unauthenticated),
            count(|phase| phase == Phase::Session),
        )
    };
    DataPortStats {
        accepted: shared.accepted.load(Ordering::Acquire),
        active: shared.active.load(Ordering::Acquire),
        handshakes,
        sessions_active,
        refused_over_limit: shared.refused_over_limit.load(Ordering::Acquire),
        handshakes_dropped: shared.handshakes_dropped.load(Ordering::Acquire),
        hash_memory_bytes: shared.hash_memory_bytes.load(Ordering::Acquire),
        sessions: shared.sessions_started.load(Ordering::Acquire),
    }
}
