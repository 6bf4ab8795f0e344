//! What every control API handler sees: the [`ApiConfig`] the server was started with and the
//! address it is bound to.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::items::Manager;

use super::conn::ApiLimits;

/// What the API serves.
#[derive(Debug)]
pub struct ApiConfig {
    /// The data port's address.
    pub data_addr: SocketAddr,
    /// The bearer token.
    pub token: String,
    /// The items, slots and jobs.
    pub manager: Arc<Manager>,
    /// Connection cap and timeouts.
    pub limits: ApiLimits,
}

#[derive(Debug)]
pub(super) struct Shared {
    pub(super) config: ApiConfig,
    pub(super) api_addr: SocketAddr,
}

pub(super) type AppState = Arc<Shared>;
