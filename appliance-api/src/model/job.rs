//! Jobs on the wire: what a job does, where it is, and the job view the API answers with
//! (also the form a job is stored in).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// Waiting for the first full copy of a new item (its first recovery point).
    InitialReplication,
    /// A re-protect's delta resync, until its first recovery point.
    Reprotect,
    /// Disks at a point written to a target directory while replication goes on.
    TestFailover,
    /// Stop replication, pick a point, write the disks.
    Failover,
    /// Rewrite the failed-over disks at another point.
    ChangePoint,
    /// Final sync, then the disks handed back and the temporary OS disk deleted.
    Failback,
    /// A delta resync asked for by the operator, until its first recovery point.
    Resync,
}

impl JobKind {
    /// Snake-case name, as in JSON and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Self::InitialReplication => "initial_replication",
            Self::Reprotect => "reprotect",
            Self::TestFailover => "test_failover",
            Self::Failover => "failover",
            Self::ChangePoint => "change_point",
            Self::Failback => "failback",
            Self::Resync => "resync",
        }
    }

    /// Whether the job waits on replication (continues after a restart) rather than
    /// changing files itself (failed by a restart).
    pub fn is_replication(self) -> bool {
        matches!(
            self,
            Self::InitialReplication | Self::Reprotect | Self::Resync
        )
    }
}

impl std::fmt::Display for JobKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Under way.
    Running,
    /// Done.
    Succeeded,
    /// Ended on an error (see `error`).
    Failed,
}

impl JobState {
    /// Snake-case name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
        }
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A job as stored and as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JobView {
    /// Job id.
    pub id: u64,
    /// What it does.
    pub kind: JobKind,
    /// The item, 32 hex digits.
    pub item: String,
    /// Where it is.
    pub state: JobState,
    /// 0..=100.
    pub percent: u8,
    /// What it is doing (or did).
    pub message: String,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Created, ns since the Unix epoch.
    pub created_ns: u64,
    /// Finished, ns since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ns: Option<u64>,
}

impl JobView {
    /// Whether it has ended (succeeded or failed).
    pub fn is_finished(&self) -> bool {
        self.state != JobState::Running
    }
}
