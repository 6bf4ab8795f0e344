//! Commit: the failover made final.

use super::error::OpError;
use super::item::lock;
use super::manager::Manager;
use super::model::{CopyState, ItemState, ItemView};
use super::state::{Event, Op};

impl Manager {
    /// Makes the failover final.
    pub fn commit(&self, hex: &str) -> Result<ItemView, OpError> {
        let _ops = lock(&self.ops);
        let item = self.find(hex)?;
        let copy = item.record().failover.as_ref().and_then(|f| f.copy);
        if item.record().state == ItemState::FailedOver
            && let Some(copy) = copy.filter(|&c| c != CopyState::Done)
        {
            let job = item.record().last_job;
            return Err(OpError::Conflict {
                code: "copy_not_done",
                message: format!(
                    "item {hex} failed over in export mode and its copy into the target files \
                     is {}: commit is allowed once the copy is done{}",
                    match copy {
                        CopyState::Failed => "failed",
                        _ => "still running",
                    },
                    job.map(|j| format!(" (job {j})")).unwrap_or_default()
                ),
            });
        }
        self.check_allowed(&item, Op::Commit)?;
        item.transition(Event::Start(Op::Commit), |_| {})?;
        Ok(self.view(&item))
    }
}
