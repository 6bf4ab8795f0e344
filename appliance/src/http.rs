//! The control API of `appliance serve` (HTTP/JSON, axum): every lifecycle operation of
//! `crate::items`, the slot table, jobs, and Prometheus metrics. `docs/design/control-api.md`
//! lists the resources, bodies, states and error codes; `GET /openapi.json` is generated from
//! the handlers (utoipa), so it cannot drift from them.
//!
//! Auth is `Authorization: Bearer <token>` on everything but `/health` and `/openapi.json`,
//! the token being the 64 hex digits of `DATA_DIR/api-token` (created with mode 0600 at first
//! start by `crate::secrets`; never printed); it is compared in constant time. Every error
//! has one shape, `{"error": {"code": "...", "message": "...", ...}}`; a 500 only names a
//! real I/O failure.
//!
//! The server runs on its own thread with a 2-worker tokio runtime; every handler that touches
//! the manager runs on tokio's blocking pool, and long work runs as jobs (threads of the
//! manager), so no request waits on disk I/O of another. [`ApiServer::shutdown`] stops
//! accepting, lets requests in flight finish (at most [`GRACE`]), and joins the thread.
//! Connections are capped and timed out ([`ApiLimits`], `http/conn.rs`).
//!
//! Rooms, in `http/` (siblings; none imports its parent, none closes a circle):
//!
//! | file | its one job |
//! |---|---|
//! | `server.rs` | [`ApiServer`]: the thread, its tokio runtime, graceful shutdown |
//! | `conn.rs` | connections: the cap, header/body/write timeouts |
//! | `state.rs` | what every handler sees ([`ApiConfig`] and the bound address) |
//! | `routes.rs` | the route table, the body-in-time layer, fallbacks |
//! | `auth.rs` | the bearer-token check |
//! | `error.rs` | the one error shape and the mapping of `OpError` to statuses |
//! | `handlers.rs` | one handler per operation |
//! | `openapi.rs` | the OpenAPI document's info, security scheme and links |

mod auth;
mod conn;
mod error;
mod exports;
mod handlers;
mod openapi;
mod routes;
mod server;
mod state;

pub use conn::ApiLimits;
pub use server::{ApiServer, GRACE};
pub use state::ApiConfig;
