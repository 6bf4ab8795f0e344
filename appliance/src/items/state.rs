//! The item lifecycle: states, allowed operations, transitions, the undo of interrupted jobs.

use crate::jobs::JobKind;

use super::model::{DiskOrigin, ItemState};
use super::record::ItemRecord;

/// A lifecycle operation, as the API names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Disks at a point for a test.
    TestFailover,
    /// Remove the test disks.
    TestFailoverCleanup,
    /// Fail over.
    Failover,
    /// Another point for the failed-over disks.
    ChangePoint,
    /// Make the failover final.
    Commit,
    /// Protect the failed-over VM back to the original disks.
    Reprotect,
    /// Planned failover back to the original VM.
    Failback,
    /// Delta resync.
    Resync,
    /// Disable protection.
    Disable,
}

impl Op {
    /// The API's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::TestFailover => "test-failover",
            Self::TestFailoverCleanup => "test-failover-cleanup",
            Self::Failover => "failover",
            Self::ChangePoint => "change-point",
            Self::Commit => "commit",
            Self::Reprotect => "reprotect",
            Self::Failback => "failback",
            Self::Resync => "resync",
            Self::Disable => "disable",
        }
    }
}

/// Whether the item takes frames from its agent.
pub fn replicating(state: ItemState) -> bool {
    matches!(
        state,
        ItemState::InitialReplication
            | ItemState::Reprotecting
            | ItemState::Protected
            | ItemState::TestFailover
            | ItemState::Resyncing
    )
}

/// Whether the item's disks occupy slots.
pub fn holds_slots(state: ItemState) -> bool {
    !matches!(state, ItemState::FailedBack | ItemState::Disabled)
}

/// The replication job that ends this state (initial sync, re-protect, resync), if any.
pub fn sync_job_kind(state: ItemState) -> Option<JobKind> {
    match state {
        ItemState::InitialReplication => Some(JobKind::InitialReplication),
        ItemState::Reprotecting => Some(JobKind::Reprotect),
        ItemState::Resyncing => Some(JobKind::Resync),
        _ => None,
    }
}

/// The operations `record` allows now.
pub fn allowed(record: &ItemRecord) -> Vec<Op> {
    use ItemState as S;
    match record.state {
        S::InitialReplication | S::Reprotecting | S::Resyncing => vec![Op::Disable],
        S::Protected => {
            let mut ops = vec![Op::TestFailover, Op::Failover, Op::Resync];
            if record
                .disks
                .iter()
                .all(|d| d.origin == DiskOrigin::Attached)
            {
                ops.push(Op::Failback);
            }
            ops.push(Op::Disable);
            ops
        }
        S::TestFailover if record.test_failover.is_some() => {
            vec![Op::TestFailoverCleanup, Op::Disable]
        }
        S::TestFailover | S::FailingOver | S::FailingBack | S::Disabled => vec![],
        S::FailedOver => vec![Op::ChangePoint, Op::Commit, Op::Disable],
        S::Committed => vec![Op::Reprotect, Op::Disable],
        S::Reprotected | S::FailedBack | S::Quarantined => vec![Op::Disable],
    }
}
