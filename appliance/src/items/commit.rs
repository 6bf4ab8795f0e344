//! Commit: the failover made final.

use super::error::OpError;
use super::item::lock;
use super::manager::Manager;
use super::model::ItemView;
use super::state::{Event, Op};

impl Manager {
    /// Makes the failover final.
    pub fn commit(&self, hex: &str) -> Result<ItemView, OpError> {
        let _ops = lock(&self.ops);
        let item = self.find(hex)?;
        self.check_allowed(&item, Op::Commit)?;
        item.transition(Event::Start(Op::Commit), |_| {})?;
        Ok(self.view(&item))
    }
}
