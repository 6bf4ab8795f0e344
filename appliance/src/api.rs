//! Wire-format helpers of the control API's request types: integral numbers (`api/number.rs`)
//! and the OpenAPI schemas written by hand (`api/schema.rs`). The HTTP server is `crate::http`.
//!
//! They sit beside the model they serve (`crate::items::model`), which issue 12 moves to the
//! `appliance-api` crate together with them; until then this is their one place.

pub(crate) mod number;
pub(crate) mod schema;
