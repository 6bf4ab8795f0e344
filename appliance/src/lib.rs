//! The appliance: the daemon (`serve`), its control API, data port, item manager, slot
//! table and jobs, and the offline commands. `main.rs` is the command line over this library;
//! the integration tests use the library directly.

pub mod daemon;
pub mod dataport;
pub mod db;
pub mod exports;
pub mod fdbudget;
pub mod http;
pub mod inspect;
pub mod items;
pub mod jobs;
pub mod metrics;
pub mod offline;
pub mod options;
pub mod runtime;
pub mod secrets;
pub mod slots;
pub mod store;
pub mod target;
pub mod testhook;
