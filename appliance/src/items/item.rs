//! One item in memory: its record (behind a lock), running replication, worker status, quarantine.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};

use engine::apply::Pins;
use engine::staging::{StagingLog, StagingReader};

use crate::runtime::{ApplyWorker, WorkerStatus};
use crate::store::{ItemDirs, item_hex};
use engine::clock::now_unix_ns;

use super::error::OpError;
use super::model::Quarantine;
use super::record::ItemRecord;
use super::record::write_record;
use super::state::{self, Event};
use crate::db::ControlStore;

pub(crate) struct Replication {
    pub(crate) log: Arc<Mutex<StagingLog>>,
    pub(crate) reader: StagingReader,
    pub(crate) worker: ApplyWorker,
}

pub(crate) struct Item {
    pub(crate) id: [u8; 16],
    pub(crate) hex: String,
    pub(crate) dirs: ItemDirs,
    pub(crate) token: Vec<u8>,
    pub(crate) record: Mutex<ItemRecord>,
    pub(crate) repl: Mutex<Option<Replication>>,
    /// The last worker's status (kept after it stops, for counters).
    pub(crate) status: Mutex<Option<WorkerStatus>>,
    /// A streaming session holds it.
    pub(crate) busy: Arc<AtomicBool>,
    /// New sessions are refused while set (a resync is pausing the item).
    pub(crate) pausing: AtomicBool,
    /// The supervisor's last failure on this item (logged once until it changes).
    pub(crate) tick_error: Mutex<Option<String>>,
    /// Set when the item was found damaged at start (its record's state is then
    /// `Quarantined` in memory).
    pub(crate) quarantine: Mutex<Option<Quarantine>>,
    /// Where its record is kept.
    pub(crate) store: Arc<ControlStore>,
    /// Its points held by readers (materialize, exports): never pruned. Outlives any one
    /// replication (each apply worker is given these).
    pub(crate) pins: Pins,
}

impl Item {
    pub(super) fn new(
        id: [u8; 16],
        dirs: ItemDirs,
        token: Vec<u8>,
        record: ItemRecord,
        store: Arc<ControlStore>,
    ) -> Self {
        Self {
            id,
            hex: item_hex(&id),
            dirs,
            token,
            record: Mutex::new(record),
            repl: Mutex::new(None),
            status: Mutex::new(None),
            busy: Arc::new(AtomicBool::new(false)),
            pausing: AtomicBool::new(false),
            tick_error: Mutex::new(None),
            quarantine: Mutex::new(None),
            store,
            pins: Pins::default(),
        }
    }

    pub(super) fn quarantine(&self) -> Option<Quarantine> {
        lock(&self.quarantine).clone()
    }

    /// Quarantines the item (memory only: the record keeps what it says).
    pub(super) fn quarantine_now(&self, reason: String, action: &str) {
        let mut record = self.record();
        let recorded_state = match lock(&self.quarantine).as_ref() {
            Some(earlier) => earlier.recorded_state,
            None => Some(record.state),
        };
        tracing::error!(item = %self.hex, %reason, "item quarantined: not served");
        if let Err(error) = state::transition(&mut record, Event::Damaged) {
            tracing::error!(item = %self.hex, %error, "quarantining");
        }
        *lock(&self.quarantine) = Some(Quarantine {
            reason,
            action: action.replace("{id}", &self.hex),
            recorded_state,
        });
    }

    pub(super) fn record(&self) -> MutexGuard<'_, ItemRecord> {
        self.record.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn repl(&self) -> MutexGuard<'_, Option<Replication>> {
        self.repl.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn status(&self) -> Option<WorkerStatus> {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Persists `record` and makes it current.
    pub(super) fn save(&self, mut record: ItemRecord) -> anyhow::Result<()> {
        record.updated_ns = now_unix_ns();
        write_record(&self.store, &self.id, &record)?;
        *self.record() = record;
        Ok(())
    }

    /// Changes the record's state by `event` (see `state::TRANSITIONS`; an event the
    /// lifecycle does not have there is an error and changes nothing), then the record with
    /// `change`, and persists it.
    pub(super) fn transition(
        &self,
        event: Event,
        change: impl FnOnce(&mut ItemRecord),
    ) -> anyhow::Result<()> {
        let mut record = self.record().clone();
        state::transition(&mut record, event)?;
        change(&mut record);
        self.save(record)
    }

    /// The record that `event` and then `change` make of the current one, stamped, for a
    /// transaction that changes more than the record (slots, a job): put it with
    /// `record::put_record`, then make it current with [`Item::set_record`] once that
    /// transaction committed. An event the lifecycle does not have is an error.
    pub(super) fn transitioned(
        &self,
        event: Event,
        change: impl FnOnce(&mut ItemRecord),
    ) -> anyhow::Result<ItemRecord> {
        let mut record = self.record().clone();
        state::transition(&mut record, event)?;
        change(&mut record);
        record.updated_ns = now_unix_ns();
        Ok(record)
    }

    /// Makes a committed record current.
    pub(super) fn set_record(&self, record: ItemRecord) {
        *self.record() = record;
    }

    /// Changes the record with `change` (never its state: see [`Item::transition`]) and
    /// persists it.
    pub(super) fn update(&self, change: impl FnOnce(&mut ItemRecord)) -> anyhow::Result<()> {
        let mut record = self.record().clone();
        change(&mut record);
        self.save(record)
    }
}

pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// 409 `apply_failed` when the item's apply waits before a staged frame that can never be
/// applied: `what` needs every staged frame applied.
pub(super) fn refuse_if_apply_failed(item: &Item, what: &str) -> Result<(), OpError> {
    match item.status().and_then(|s| s.apply_failure()) {
        Some((failure, frame)) => Err(OpError::Conflict {
            code: "apply_failed",
            message: format!(
                "item {}: {what} needs every staged frame applied, but {frame}; applied \
                 through seq {}. {}",
                item.hex, failure.applied_seq, failure.what_to_do
            ),
        }),
        None => Ok(()),
    }
}
