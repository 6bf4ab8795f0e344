//! The item lifecycle as one table: states, allowed operations, transitions, undo at restart.
//!
//! Everything the manager knows about an item's state machine is here, as free functions over
//! [`ItemState`] and the record (the state type is part of the API's wire model):
//!
//! - [`TRANSITIONS`]: every `(state, guard, event) -> state` the lifecycle has. An
//!   operation's request is the event [`Event::Start`]; the job it starts ends with
//!   [`Event::Done`] or, undone, [`Event::Failed`]; the supervisor ends a sync with
//!   [`Event::Synchronized`]; start-up undoes a job a restart interrupted with
//!   [`Event::Interrupted`].
//! - [`allowed`]: the operations a record allows now, read off the table's `Start` rows
//!   (in the order the API lists them); [`check_allowed`] refuses the others (409
//!   `wrong_state`, naming what is allowed).
//! - [`transition`]: the one place an item's state is changed (persisted by the caller
//!   through `Item::transition`; the quarantine at start changes it in memory only).
//! - [`at_start`] and [`job_at_start`]: what start-up does with each item and each job a
//!   restart found running (the undo of interrupted jobs).

use crate::jobs::JobKind;

use super::error::OpError;
use super::model::{DiskOrigin, ItemState};
use super::record::ItemRecord;

/// A lifecycle operation, as the API names it (a wire type: `allowed_operations`).
pub use appliance_api::model::Op;

/// What happens to an item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// An operation's request was accepted (its synchronous step, under `ops`).
    Start(Op),
    /// The job the operation started finished its work (its final step, under `ops`).
    Done(Op),
    /// The job the operation started failed: its undo (under `ops`).
    Failed(Op),
    /// The sync (initial replication, re-protect, resync) reached its first recovery point.
    Synchronized,
    /// Start-up found the job of this state interrupted by a restart: its undo.
    Interrupted,
    /// Start-up found the item damaged (memory only; from any state).
    Damaged,
}

/// A condition on the record, besides its state, for a row of [`TRANSITIONS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guard {
    /// No condition.
    Always,
    /// Every replica disk was attached (none created): failback hands them back.
    AllDisksAttached,
    /// The test failover's disks are written (its job ended).
    TestDisks,
    /// The test failover's job has not written its disks yet.
    NoTestDisks,
    /// A failover's disks are recorded (the job is a change point).
    FailoverDisks,
    /// Neither failover's nor test failover's disks are recorded (the job is the failover; a
    /// promote keeps its test failover's record until it is done).
    NoFailoverDisks,
    /// The test failover's disks are a drill served over NBD (export mode).
    TestExport,
    /// The failover's disks are all in its target files (always, but for a failover in
    /// export mode whose copy has not finished).
    FailoverCopied,
}

impl Guard {
    /// Whether `record` meets the condition.
    pub fn holds(self, record: &ItemRecord) -> bool {
        match self {
            Self::Always => true,
            Self::AllDisksAttached => record
                .disks
                .iter()
                .all(|d| d.origin == DiskOrigin::Attached),
            Self::TestDisks => record.test_failover.is_some(),
            Self::NoTestDisks => record.test_failover.is_none(),
            Self::FailoverDisks => record.failover.is_some(),
            Self::NoFailoverDisks => record.failover.is_none() && record.test_failover.is_none(),
            Self::TestExport => record
                .test_failover
                .as_ref()
                .is_some_and(|t| t.export_id.is_some()),
            Self::FailoverCopied => record.failover.as_ref().is_none_or(|f| {
                f.copy
                    .is_none_or(|c| c == appliance_api::model::CopyState::Done)
            }),
        }
    }
}

/// One row of the lifecycle table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    /// The state the item is in.
    pub from: ItemState,
    /// What else must hold of the record.
    pub guard: Guard,
    /// What happens.
    pub event: Event,
    /// The state the item is in then.
    pub to: ItemState,
}

const fn row(from: ItemState, guard: Guard, event: Event, to: ItemState) -> Transition {
    Transition {
        from,
        guard,
        event,
        to,
    }
}

use Event::{Done, Failed, Interrupted, Start, Synchronized};
use Guard::{
    AllDisksAttached, Always, FailoverCopied, FailoverDisks, NoFailoverDisks, NoTestDisks,
    TestDisks, TestExport,
};
use ItemState as S;

/// The item lifecycle. Within a state, the `Start` rows are in the order the API lists the
/// allowed operations. A state with no `Start` row allows nothing (a job runs, or the item is
/// disabled).
pub const TRANSITIONS: &[Transition] = &[
    // A new item replicates until its first recovery point (enable makes it in
    // `initial_replication`, or `reprotecting` for a reverse item: see `initial`).
    row(
        S::InitialReplication,
        Always,
        Start(Op::Disable),
        S::Disabled,
    ),
    row(S::InitialReplication, Always, Synchronized, S::Protected),
    row(S::Reprotecting, Always, Start(Op::Disable), S::Disabled),
    row(S::Reprotecting, Always, Synchronized, S::Protected),
    row(S::Resyncing, Always, Start(Op::Disable), S::Disabled),
    row(S::Resyncing, Always, Synchronized, S::Protected),
    row(S::Resyncing, Always, Failed(Op::Resync), S::Protected),
    // Protected: the operations that start from a replicating item.
    row(
        S::Protected,
        Always,
        Start(Op::TestFailover),
        S::TestFailover,
    ),
    row(S::Protected, Always, Start(Op::Failover), S::FailingOver),
    row(S::Protected, Always, Start(Op::Resync), S::Resyncing),
    row(
        S::Protected,
        AllDisksAttached,
        Start(Op::Failback),
        S::FailingBack,
    ),
    row(S::Protected, Always, Start(Op::Disable), S::Disabled),
    // Test failover: its job writes the disks (no state change when it ends).
    row(
        S::TestFailover,
        TestDisks,
        Start(Op::TestFailoverCleanup),
        S::Protected,
    ),
    row(
        S::TestFailover,
        TestExport,
        Start(Op::TestFailoverPromote),
        S::FailingOver,
    ),
    row(S::TestFailover, TestDisks, Start(Op::Disable), S::Disabled),
    row(
        S::TestFailover,
        NoTestDisks,
        Failed(Op::TestFailover),
        S::Protected,
    ),
    row(S::TestFailover, NoTestDisks, Interrupted, S::Protected),
    // Failover, change point and promote share `failing_over` (a promote keeps its test
    // failover's record until it is done).
    row(
        S::FailingOver,
        TestDisks,
        Failed(Op::TestFailoverPromote),
        S::TestFailover,
    ),
    row(S::FailingOver, TestDisks, Interrupted, S::TestFailover),
    row(S::FailingOver, Always, Done(Op::Failover), S::FailedOver),
    row(S::FailingOver, Always, Failed(Op::Failover), S::Protected),
    row(S::FailingOver, Always, Done(Op::ChangePoint), S::FailedOver),
    row(
        S::FailingOver,
        Always,
        Failed(Op::ChangePoint),
        S::FailedOver,
    ),
    row(S::FailingOver, FailoverDisks, Interrupted, S::FailedOver),
    row(S::FailingOver, NoFailoverDisks, Interrupted, S::Protected),
    row(
        S::FailedOver,
        Always,
        Start(Op::ChangePoint),
        S::FailingOver,
    ),
    row(
        S::FailedOver,
        FailoverCopied,
        Start(Op::Commit),
        S::Committed,
    ),
    row(S::FailedOver, Always, Start(Op::Disable), S::Disabled),
    row(S::Committed, Always, Start(Op::Reprotect), S::Reprotected),
    row(S::Committed, Always, Start(Op::Disable), S::Disabled),
    row(S::Reprotected, Always, Start(Op::Disable), S::Disabled),
    // Failback.
    row(S::FailingBack, Always, Done(Op::Failback), S::FailedBack),
    row(S::FailingBack, Always, Failed(Op::Failback), S::Protected),
    row(S::FailingBack, Always, Interrupted, S::Protected),
    row(S::FailedBack, Always, Start(Op::Disable), S::Disabled),
    // Quarantined (memory only, see `Event::Damaged`): only disable.
    row(S::Quarantined, Always, Start(Op::Disable), S::Disabled),
];

/// The state `record` is in after `event`, or `None` if the lifecycle has no such step.
pub fn next(record: &ItemRecord, event: Event) -> Option<ItemState> {
    if event == Event::Damaged {
        return Some(S::Quarantined);
    }
    TRANSITIONS
        .iter()
        .find(|t| t.from == record.state && t.event == event && t.guard.holds(record))
        .map(|t| t.to)
}

/// An event the lifecycle does not have in the record's state (a bug, or a race the
/// caller lost: nothing was changed).
#[derive(Debug, thiserror::Error)]
#[error("item {item} is {state}: {event:?} is not a step of its lifecycle there")]
pub struct NoTransition {
    /// Item id.
    pub item: String,
    /// Its state.
    pub state: ItemState,
    /// What happened.
    pub event: Event,
}

/// Changes the record's state by `event` (the one place a state is changed). Returns the
/// state it left.
pub fn transition(record: &mut ItemRecord, event: Event) -> Result<ItemState, NoTransition> {
    let to = next(record, event).ok_or_else(|| NoTransition {
        item: record.id.clone(),
        state: record.state,
        event,
    })?;
    Ok(std::mem::replace(&mut record.state, to))
}

/// The state and the job of a new item: a reverse item (re-protect) resyncs into the
/// original VM's disks, a forward one waits for its first full copy.
pub fn initial(reverse: bool) -> (ItemState, JobKind) {
    if reverse {
        (S::Reprotecting, JobKind::Reprotect)
    } else {
        (S::InitialReplication, JobKind::InitialReplication)
    }
}

/// The operations `record` allows now, in the order the API lists them.
pub fn allowed(record: &ItemRecord) -> Vec<Op> {
    TRANSITIONS
        .iter()
        .filter(|t| t.from == record.state && t.guard.holds(record))
        .filter_map(|t| match t.event {
            Start(op) => Some(op),
            _ => None,
        })
        .collect()
}

/// Refuses `op` unless `record` (of item `hex`) allows it: 409 `wrong_state`, naming the
/// state and what is allowed ("none while its job runs" when nothing is).
pub fn check_allowed(hex: &str, record: &ItemRecord, op: Op) -> Result<(), OpError> {
    let allowed = allowed(record);
    if allowed.contains(&op) {
        Ok(())
    } else {
        Err(OpError::WrongState {
            item: hex.to_owned(),
            state: record.state,
            op: op.name(),
            allowed: allowed.into_iter().map(Op::name).collect(),
        })
    }
}

/// Whether the item takes frames from its agent.
pub fn replicating(state: ItemState) -> bool {
    matches!(
        state,
        S::InitialReplication | S::Reprotecting | S::Protected | S::TestFailover | S::Resyncing
    )
}

/// Whether the item's disks occupy slots.
pub fn holds_slots(state: ItemState) -> bool {
    !matches!(state, S::FailedBack | S::Disabled)
}

/// The replication job that ends this state (initial sync, re-protect, resync), if any.
pub fn sync_job_kind(state: ItemState) -> Option<JobKind> {
    match state {
        S::InitialReplication => Some(JobKind::InitialReplication),
        S::Reprotecting => Some(JobKind::Reprotect),
        S::Resyncing => Some(JobKind::Resync),
        _ => None,
    }
}

/// What start-up does with an item, by its record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AtStart {
    /// Nothing: serve it as recorded.
    Serve,
    /// Its job was interrupted by the restart: remove what the job was writing (`pending`),
    /// return it to `to` ([`Event::Interrupted`]) and record why.
    Undo {
        /// The state before the job.
        to: ItemState,
    },
    /// Disabled or failed back before the restart finished its clean-up: remove its data
    /// (slots, staging, points, created replicas, token) again, and for a disabled item its
    /// directory (`purge`).
    CleanUp {
        /// Remove the item's directory and forget the item.
        purge: bool,
    },
}

/// What start-up does with `record` (not for quarantined items: they are left alone).
pub fn at_start(record: &ItemRecord) -> AtStart {
    if let Some(to) = next(record, Event::Interrupted) {
        return AtStart::Undo { to };
    }
    match record.state {
        S::Disabled => AtStart::CleanUp { purge: true },
        S::FailedBack => AtStart::CleanUp { purge: false },
        _ => AtStart::Serve,
    }
}

/// What start-up does with a job it found running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobAtStart {
    /// A sync whose item was recorded protected (the supervisor records `protected`, then
    /// ends the job: a crash between the two writes): the sync is done.
    Succeeded,
    /// A sync whose item is still in that sync's state: the supervisor ends it.
    Continues,
    /// Anything else: the job failed, interrupted by the restart.
    Interrupted,
}

/// What start-up does with a running job of `kind`: `state` is its item's state (`None` if the
/// item is gone), `last_job` whether it is the item's newest job.
pub fn job_at_start(kind: JobKind, state: Option<ItemState>, last_job: bool) -> JobAtStart {
    if !kind.is_replication() {
        return JobAtStart::Interrupted;
    }
    match state {
        Some(S::Protected) if last_job => JobAtStart::Succeeded,
        Some(state) if sync_job_kind(state) == Some(kind) => JobAtStart::Continues,
        _ => JobAtStart::Interrupted,
    }
}

#[cfg(test)]
mod tests;
