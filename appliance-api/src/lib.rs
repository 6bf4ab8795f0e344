//! The control API of the appliance as Rust types: the wire model (one definition of every
//! request and answer, serde + OpenAPI schema), its ids, and one typed blocking client that
//! the CLI, disk-sim, perf and the tests use.
//!
//! The appliance depends on this crate (its HTTP routes serve these types and its OpenAPI
//! document is generated from them); this crate depends on nothing of the appliance.

pub mod client;
pub mod error;
pub mod ids;
pub mod model;
pub mod number;

pub use client::{Client, Method, poll_until};
pub use error::{ApiRefusal, Error};
pub use ids::{ItemId, JobId, PointId};
