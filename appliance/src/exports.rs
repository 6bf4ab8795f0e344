//! Exports: recovery points served over NBD. The registry of live exports (by id, and by the
//! secret NBD name of each disk) that the NBD server looks names up in; the durable record of
//! each export (`record.rs`); the adapter from an engine export disk to an NBD export
//! (`nbd.rs`). What an export reads and writes is the engine's (`engine::export`); which
//! exports exist and when is the item manager's (`items/exports.rs`).

mod nbd;
mod record;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use appliance_api::model::{ExportDiskView, ExportView};

pub(crate) use nbd::{MAX_REQUEST_BYTES, NbdDisk};
pub(crate) use record::ExportRecord;

/// A live export: its record and its disks, in disk order.
#[derive(Debug)]
pub(crate) struct Live {
    /// What is stored of it (changed by a failover's copy).
    pub(crate) record: Mutex<ExportRecord>,
    /// One per disk of the item.
    pub(crate) disks: Vec<Arc<NbdDisk>>,
    /// A failover's copy job parks here while a change point rebases the disks.
    pub(crate) copy_gate: CopyGate,
}

/// Where a failover's copy job waits while a change point moves the export to another point.
#[derive(Debug, Default)]
pub(crate) struct CopyGate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct GateState {
    /// A change point holds the copy.
    held: bool,
    /// The copy job waits in [`CopyGate::park`].
    parked: bool,
}

impl CopyGate {
    fn state(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a change point holds the copy (the job parks before its next disk).
    pub(crate) fn is_held(&self) -> bool {
        self.state().held
    }

    /// The copy job: waits while the copy is held.
    pub(crate) fn park(&self) {
        let mut state = self.state();
        state.parked = true;
        self.changed.notify_all();
        while state.held {
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.parked = false;
    }

    /// A change point: holds the copy, cancels the disks' running copies, and waits until the
    /// job is parked or no disk is copying (at most `timeout`). Returns whether it is quiet.
    pub(crate) fn hold(&self, disks: &[Arc<NbdDisk>], timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.state();
        state.held = true;
        for disk in disks {
            disk.disk().cancel_copy();
        }
        drop(state);
        crate::testhook::pause_point("export-change-point:held");
        let mut state = self.state();
        loop {
            for disk in disks {
                disk.disk().cancel_copy();
            }
            if state.parked || disks.iter().all(|d| !d.disk().is_copying()) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            let wait = (deadline - now).min(Duration::from_millis(20));
            state = self
                .changed
                .wait_timeout(state, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Lets the copy go on.
    pub(crate) fn release(&self) {
        self.state().held = false;
        self.changed.notify_all();
    }
}

impl Live {
    /// Its record now.
    pub(crate) fn record(&self) -> MutexGuard<'_, ExportRecord> {
        self.record.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug, Default)]
struct Table {
    by_id: BTreeMap<[u8; 16], Arc<Live>>,
    by_name: HashMap<String, Arc<NbdDisk>>,
}

/// Every live export; the NBD server's catalog.
#[derive(Debug, Default)]
pub(crate) struct Exports {
    table: Mutex<Table>,
    /// The NBD server's address, for the URIs (set once it listens).
    addr: OnceLock<SocketAddr>,
    /// Counts an export's sessions, and ends a removed export's at once (idle ones too).
    disconnector: OnceLock<nbd_server::Disconnector>,
}

impl Exports {
    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records where the NBD server listens, and how to end an export's sessions.
    pub(crate) fn set_server(&self, addr: SocketAddr, disconnector: nbd_server::Disconnector) {
        let _ = self.addr.set(addr);
        let _ = self.disconnector.set(disconnector);
    }

    /// Serves `live` under its names from now on.
    pub(crate) fn insert(&self, id: [u8; 16], live: Arc<Live>) {
        let names = live.record().names.clone();
        let mut table = self.table();
        for (name, disk) in names.into_iter().zip(&live.disks) {
            table.by_name.insert(name, disk.clone());
        }
        table.by_id.insert(id, live);
    }

    /// Stops serving export `id`: its names are forgotten and its disks closed (clients get
    /// `ESHUTDOWN` and are disconnected). Returns it.
    pub(crate) fn remove(&self, id: &[u8; 16]) -> Option<Arc<Live>> {
        let live = {
            let mut table = self.table();
            let live = table.by_id.remove(id)?;
            for name in &live.record().names {
                table.by_name.remove(name);
            }
            live
        };
        for disk in &live.disks {
            disk.close();
        }
        if let Some(disconnector) = self.disconnector.get() {
            for name in &live.record().names {
                disconnector.disconnect(name);
            }
        }
        Some(live)
    }

    /// Export `id`.
    pub(crate) fn get(&self, id: &[u8; 16]) -> Option<Arc<Live>> {
        self.table().by_id.get(id).cloned()
    }

    /// Every export, by id.
    pub(crate) fn all(&self) -> Vec<([u8; 16], Arc<Live>)> {
        self.table()
            .by_id
            .iter()
            .map(|(id, live)| (*id, live.clone()))
            .collect()
    }

    /// The exports of item `item_hex`.
    pub(crate) fn of_item(&self, item_hex: &str) -> Vec<([u8; 16], Arc<Live>)> {
        self.all()
            .into_iter()
            .filter(|(_, live)| live.record().item == item_hex)
            .collect()
    }

    /// What the API shows of `live`.
    pub(crate) fn view(&self, live: &Live) -> ExportView {
        let record = live.record().clone();
        let host = self
            .addr
            .get()
            .map_or_else(|| "(NBD server not started)".to_owned(), |a| a.to_string());
        ExportView {
            id: record.id.clone(),
            item: record.item.clone(),
            purpose: record.purpose,
            mode: record.mode,
            point_id: record.point_id,
            created_ns: record.created_ns,
            disks: live
                .disks
                .iter()
                .zip(&record.names)
                .enumerate()
                .map(|(index, (disk, name))| ExportDiskView {
                    index: u32::try_from(index).unwrap_or(u32::MAX),
                    size_bytes: disk.size_bytes_now(),
                    uri: format!("nbd://{host}/{name}"),
                    written_bytes: disk.written_bytes(),
                })
                .collect(),
            connections: self.disconnector.get().map_or(0, |server| {
                let sessions: usize = record.names.iter().map(|n| server.sessions(n)).sum();
                u32::try_from(sessions).unwrap_or(u32::MAX)
            }),
            copy: record.copy,
        }
    }
}

impl nbd_server::Catalog for Exports {
    fn lookup(&self, name: &str) -> Option<Arc<dyn nbd_server::Export>> {
        let disk = self.table().by_name.get(name).cloned()?;
        Some(disk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_gate_parks_the_copy_until_released() {
        let gate = Arc::new(CopyGate::default());
        assert!(!gate.is_held());
        // No disk copies: quiet at once.
        assert!(gate.hold(&[], Duration::from_secs(1)));
        assert!(gate.is_held());
        let (tx, rx) = std::sync::mpsc::channel();
        let parked = {
            let gate = gate.clone();
            std::thread::spawn(move || {
                gate.park();
                tx.send(()).expect("the test waits");
            })
        };
        // The job parks and stays parked while held.
        while !gate.state().parked {
            std::thread::yield_now();
        }
        assert!(rx.try_recv().is_err(), "still held");
        gate.release();
        rx.recv().expect("released");
        parked.join().expect("no panic");
        assert!(!gate.is_held() && !gate.state().parked);
    }
}
