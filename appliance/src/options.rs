//! Settings of the running appliance (`ServeOptions`): what `serve` was given, shared by the
//! item manager, the control API and the offline commands that open the manager.

use std::net::SocketAddr;

/// Control API connections open at once unless configured (the API's own default too).
pub const DEFAULT_API_MAX_CONNECTIONS: usize = 256;

/// Settings of `serve` (command-line flags, or the TOML config file).
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Address of the data port.
    pub data_addr: SocketAddr,
    /// Address of the control API.
    pub api_addr: SocketAddr,
    /// Address of the NBD server that serves exports (loopback by default).
    pub nbd_addr: SocketAddr,
    /// Recovery points kept per item unless its policy says otherwise.
    pub keep_points: usize,
    /// Staging capacity per item.
    pub cache_bytes: u64,
    /// Replica queue depth.
    pub queue_depth: usize,
    /// Data-disk slots (LUNs) of the appliance VM, LUN 0 included (1..=256; default 32).
    pub slot_count: u32,
    /// Directories besides the data directory where the API may attach disks, write
    /// materialized disks and create temporary OS disks.
    pub disk_stores: Vec<std::path::PathBuf>,
    /// Jobs running at once (1..=64; default 8).
    pub max_jobs: usize,
    /// Control API connections open at once (16..=16384; default 256).
    pub api_max_connections: usize,
}

impl ServeOptions {
    /// The defaults of `serve`, for offline commands that open the item manager.
    pub fn offline_default() -> Self {
        Self {
            data_addr: SocketAddr::from(([127, 0, 0, 1], 7401)),
            api_addr: SocketAddr::from(([127, 0, 0, 1], 7400)),
            nbd_addr: SocketAddr::from(([127, 0, 0, 1], 10809)),
            keep_points: 64,
            cache_bytes: 2048 << 20,
            queue_depth: 32,
            slot_count: 32,
            disk_stores: Vec::new(),
            max_jobs: 8,
            api_max_connections: DEFAULT_API_MAX_CONNECTIONS,
        }
    }
}
