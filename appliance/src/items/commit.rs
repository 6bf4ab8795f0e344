//! Commit: the failover made final.

use super::error::OpError;
use super::item::lock;
use super::manager::Manager;
use super::model::{ItemState, ItemView};
use super::state::Op;

impl Manager {
    /// Makes the failover final.
    pub fn commit(&self, hex: &str) -> Result<ItemView, OpError> {
        let _ops = lock(&self.ops);
        let item = self.find(hex)?;
        self.check_allowed(&item, Op::Commit)?;
        item.update(|r| r.state = ItemState::Committed)?;
        Ok(self.view(&item))
    }
}
