//! The item manager, in rooms: every protected item's record, lifecycle and replication.
//!
//! Every protected item's record and state machine, its replication (staging
//! log + apply worker), the slot table, and the jobs that move items between states. The
//! control API (`crate::http`) and the data port (`crate::dataport`, through
//! [`crate::dataport::ItemRegistry`]) both go through it; `docs/design/control-api.md` is the
//! user-facing description.
//!
//! ```text
//!  DATA_DIR/control.redb   items: the item's record (state, disks, policy, failover result)
//!                          slots: the slot table (crate::slots); jobs: jobs (crate::jobs)
//!                          (one transactional store: crate::db)
//! ```
//!
//! Invariants:
//! - **The record and the slots commit together.** A state change is committed before
//!   anything that depends on it happens; a step that changes slots commits them in the same
//!   control-store transaction as the record (and the job) it goes with: enable's attach,
//!   failback's release. So no crash can leave a record and the slot table disagreeing, and
//!   start-up reconciles nothing (a damaged slot table is rebuilt from the records).
//! - **One lifecycle operation at a time.** The synchronous part of every operation (checks,
//!   state change, job start) runs under one lock (`ops`); jobs do their long work outside it
//!   and take it again for their final state change.
//! - **Only replicating states accept streams.** The state is changed before sessions are
//!   ended, so an agent's reconnect is refused (`not-replicating`) instead of racing the
//!   drain.
//! - **Transient states never survive a restart.** An item found in `failing_over`,
//!   `failing_back` or a `test_failover` without a result is returned to the state before,
//!   its partial files removed, and its job failed with the reason.
//! - **Start-up never stops on one item.** An item directory a crash during enable left (the
//!   `enabling` marker, or no header, and no record) is rolled back; an item whose record or
//!   header is damaged, or whose recovery fails, is quarantined (state `quarantined` in
//!   memory only, never written; its slots kept; only disable allowed); see
//!   `docs/design/control-api.md`, "Restart and quarantine".
//!
//! Rooms (each file says its one job in its first line):
//!
//! ```text
//!  manager.rs     the Manager struct, opening the data directory, look-up and checks, job threads
//!  model.rs       the API's wire types (requests, answers, ItemState)
//!  error.rs       OpError (what the API maps to a status)
//!  state.rs       the lifecycle table: allowed operations, transitions, undo of interrupted jobs
//!  record.rs      the durable record (a control.redb row) and its persistence
//!  item.rs        one item in memory (record lock, replication, status, quarantine)
//!  recover.rs     start-up: load, undo interrupted jobs, quarantine, purge the disabled
//!  supervisor.rs  start, the supervisor's tick (ends syncs), shutdown
//!  replication.rs an item's replication: start, stop, end sessions, catch up
//!  materialize.rs what the disk-writing jobs share (target dirs, writing disks, undo)
//!  enable.rs, test_failover.rs, failover.rs, change_point.rs, commit.rs, reprotect.rs,
//!  failback.rs, resync.rs, disable.rs   one lifecycle operation each
//!  exports.rs     exports of points over NBD: make, list, remove, serve again at start
//!  export_failover.rs  failover in export mode and promote (the VM runs on the export)
//!  paths.rs       request paths and disk sizes
//!  sessions.rs    the data port's registry (ItemRegistry)
//!  views.rs       what the API shows (items, slots, jobs, points, metrics)
//! ```

mod change_point;
mod commit;
mod disable;
mod enable;
mod error;
mod export_failover;
mod exports;
mod failback;
mod failover;
mod item;
mod manager;
mod materialize;
pub mod model;
mod paths;
mod record;
mod recover;
mod replication;
mod reprotect;
mod resync;
mod sessions;
pub mod state;
mod supervisor;
mod test_failover;
mod views;

pub use error::OpError;
pub use manager::Manager;
pub use model::*;
pub use record::ItemRecord;
pub use state::Op;
