//! The control API of `appliance serve` (HTTP/JSON, axum): every lifecycle operation of
//! `crate::items`, the slot table, jobs, and Prometheus metrics. `docs/design/control-api.md`
//! lists the resources, bodies, states and error codes; `GET /openapi.json` is generated from
//! the handlers below (utoipa), so it cannot drift from them.
//!
//! Auth is `Authorization: Bearer <token>` on everything but `/health` and `/openapi.json`,
//! the token being the 64 hex digits of `DATA_DIR/api-token` (created with mode 0600 at first
//! start; never printed); it is compared in constant time. Every error has one
//! shape, `{"error": {"code": "...", "message": "...", ...}}`; a 500 only names a real I/O
//! failure.
//!
//! The server runs on its own thread with a 2-worker tokio runtime; every handler that touches
//! the manager runs on tokio's blocking pool, and long work runs as jobs (threads of the
//! manager), so no request waits on disk I/O of another. [`ApiServer::shutdown`] stops
//! accepting, lets requests in flight finish (at most [`GRACE`]), and joins the thread.
//! Connections are capped and timed out ([`ApiLimits`], `api/conn.rs`).

mod conn;
pub(crate) mod number;
pub(crate) mod schema;

pub use conn::ApiLimits;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path as FsPath;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, bail};
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use engine::delta::Consistency;
use engine::meta::{PointOrigin, PointRecord};
use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::items::{
    ChangePointRequest, EnableRequest, Enabled, FailoverRequest, ItemState, ItemView, Manager,
    MaterializeRequest, OpError, ReprotectRequest, SlotsView,
};
use crate::jobs::JobView;

/// Name of the API token file in the data directory.
pub const TOKEN_FILE: &str = "api-token";

/// How long a graceful shutdown waits for requests in flight.
pub const GRACE: Duration = Duration::from_secs(5);

/// Reads the API token of `data_dir`, creating it (32 random bytes, hex, mode 0600) on first
/// start. Returns the token and whether it was just created. The caller holds the data
/// directory's lock, so no other process races the creation.
pub fn load_or_create_token(data_dir: &FsPath) -> anyhow::Result<(String, bool)> {
    let path = data_dir.join(TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let token = text.trim();
            if token.len() != 64 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
                bail!(
                    "{}: not an API token (64 hex digits); delete it to make a new one",
                    path.display()
                );
            }
            let mode = std::fs::metadata(&path)?.permissions().mode();
            if mode & 0o077 != 0 {
                tracing::warn!(path = %path.display(), mode = format!("{mode:o}"),
                    "API token file is readable by others; chmod 600 it");
            }
            return Ok((token.to_owned(), false));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let token = crate::daemon::hex(&crate::daemon::random_bytes::<32>()?);
    // Written to a temporary name, synced, then renamed: never an empty or half token file.
    crate::store::write_secret(data_dir, TOKEN_FILE, token.as_bytes())?;
    Ok((token, true))
}

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
struct Shared {
    config: ApiConfig,
    api_addr: SocketAddr,
}

type AppState = Arc<Shared>;

/// The running API server.
#[derive(Debug)]
pub struct ApiServer {
    addr: SocketAddr,
    stop: tokio::sync::watch::Sender<bool>,
    thread: Option<JoinHandle<std::io::Result<()>>>,
}

impl ApiServer {
    /// Binds `addr` and serves the API on a thread of its own.
    pub fn start(addr: SocketAddr, config: ApiConfig) -> anyhow::Result<Self> {
        let listener = std::net::TcpListener::bind(addr)
            .with_context(|| format!("binding the control API to {addr}"))?;
        listener.set_nonblocking(true)?;
        let api_addr = listener.local_addr()?;
        let limits = config.limits;
        let app = router(Arc::new(Shared { config, api_addr }))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("api")
            .enable_all()
            .build()
            .context("starting the control API runtime")?;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                let result = runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)?;
                    conn::serve(listener, app, limits, stopped, GRACE).await
                });
                runtime.shutdown_timeout(GRACE);
                result
            })
            .context("starting the control API thread")?;
        Ok(Self {
            addr: api_addr,
            stop,
            thread: Some(thread),
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, finishes requests in flight (at most [`GRACE`]) and joins the thread.
    pub fn shutdown(mut self) -> anyhow::Result<()> {
        self.stop.send_replace(true);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(result)) => result.context("control API"),
            Some(Err(_)) => bail!("control API thread panicked"),
            None => Ok(()),
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "DR appliance control API",
        description = "Protected items and their lifecycle (enable, test failover, failover, \
                       change point, commit, re-protect, failback, resync, disable), slots, \
                       jobs, recovery points. Everything but /health and /openapi.json needs \
                       `Authorization: Bearer <token>` (DATA_DIR/api-token)."
    ),
    modifiers(&BearerScheme)
)]
struct ApiDoc;

struct BearerScheme;

impl Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "bearer",
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
    }
}

fn router(state: AppState) -> anyhow::Result<Router> {
    let (router, openapi) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(appliance_info))
        .routes(routes!(list_slots))
        .routes(routes!(list_items, enable))
        .routes(routes!(get_item, disable))
        .routes(routes!(list_points))
        .routes(routes!(test_failover))
        .routes(routes!(test_failover_cleanup))
        .routes(routes!(failover))
        .routes(routes!(change_point))
        .routes(routes!(commit))
        .routes(routes!(reprotect))
        .routes(routes!(failback))
        .routes(routes!(resync))
        .routes(routes!(list_jobs))
        .routes(routes!(get_job))
        .routes(routes!(metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token))
        .routes(routes!(health))
        .split_for_parts();
    let mut document = serde_json::to_value(&openapi).context("rendering /openapi.json")?;
    add_links(&mut document);
    let openapi =
        axum::body::Bytes::from(serde_json::to_vec(&document).context("rendering /openapi.json")?);
    Ok(router
        .route(
            "/openapi.json",
            get(move || {
                let openapi = openapi.clone();
                async move { ([(header::CONTENT_TYPE, "application/json")], openapi) }
            }),
        )
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such path") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this path does not take that method",
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            read_body_in_time,
        ))
        .with_state(state))
}

/// Reads the whole body (at most [`MAX_BODY_BYTES`]) within the body timeout before any
/// handler runs: a client that sends a head and then trickles or stops gets 408 and its
/// connection is closed, instead of holding it.
async fn read_body_in_time(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let timeout = state.config.limits.body_timeout;
    let (parts, body) = request.into_parts();
    match tokio::time::timeout(timeout, axum::body::to_bytes(body, MAX_BODY_BYTES)).await {
        Ok(Ok(bytes)) => {
            next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
                .await
        }
        Ok(Err(error)) => {
            let mut response = ApiError::bad(
                "bad_request",
                format!("reading the request body (at most {MAX_BODY_BYTES} bytes): {error}"),
            )
            .into_response();
            close_after(&mut response);
            response
        }
        Err(_) => {
            let mut response = ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!("the request body did not arrive within {timeout:?}"),
            )
            .into_response();
            close_after(&mut response);
            response
        }
    }
}

/// Asks hyper to close the connection after this response.
fn close_after(response: &mut Response) {
    response.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
}

/// OpenAPI links between operations, so that a client (or a schema-driven fuzzer) can follow
/// enable → the item → its operations → their jobs with the ids the answers carry.
fn add_links(document: &mut serde_json::Value) {
    use serde_json::json;
    let link =
        |operation: &str, id: &str| json!({"operationId": operation, "parameters": {"id": id}});
    let item_operations = [
        ("GetItem", "get_item"),
        ("ListPoints", "list_points"),
        ("TestFailover", "test_failover"),
        ("Failover", "failover"),
        ("Resync", "resync"),
        ("Failback", "failback"),
        ("Disable", "disable"),
    ];
    let from_item = |id: &str| -> serde_json::Map<String, serde_json::Value> {
        item_operations
            .iter()
            .map(|(name, operation)| ((*name).to_owned(), link(operation, id)))
            .collect()
    };
    let mut links: Vec<(&str, &str, &str, serde_json::Map<String, serde_json::Value>)> = Vec::new();
    for path in ["/v1/items", "/v1/items/{id}/reprotect"] {
        let mut map = from_item("$response.body#/item/id");
        map.insert("GetJob".into(), link("get_job", "$response.body#/job/id"));
        links.push((path, "post", "201", map));
    }
    let mut item = from_item("$response.body#/id");
    item.remove("GetItem");
    for (name, operation) in [
        ("ChangePoint", "change_point"),
        ("Commit", "commit"),
        ("TestFailoverCleanup", "test_failover_cleanup"),
    ] {
        item.insert(name.into(), link(operation, "$response.body#/id"));
    }
    links.push(("/v1/items/{id}", "get", "200", item));
    for (path, extra) in [
        (
            "/v1/items/{id}/test-failover",
            &[("TestFailoverCleanup", "test_failover_cleanup")][..],
        ),
        (
            "/v1/items/{id}/failover",
            &[("ChangePoint", "change_point"), ("Commit", "commit")][..],
        ),
        ("/v1/items/{id}/change-point", &[("Commit", "commit")][..]),
        ("/v1/items/{id}/failback", &[][..]),
        ("/v1/items/{id}/resync", &[][..]),
    ] {
        let mut map = serde_json::Map::new();
        map.insert("GetJob".into(), link("get_job", "$response.body#/id"));
        map.insert("GetItem".into(), link("get_item", "$response.body#/item"));
        for (name, operation) in extra {
            map.insert((*name).into(), link(operation, "$response.body#/item"));
        }
        links.push((path, "post", "202", map));
    }
    let mut commit = serde_json::Map::new();
    commit.insert("Reprotect".into(), link("reprotect", "$response.body#/id"));
    commit.insert("Disable".into(), link("disable", "$response.body#/id"));
    links.push(("/v1/items/{id}/commit", "post", "200", commit));
    let mut job = serde_json::Map::new();
    job.insert("GetItem".into(), link("get_item", "$response.body#/item"));
    links.push(("/v1/jobs/{id}", "get", "200", job));
    for (path, method, status, map) in links {
        if let Some(response) = document
            .pointer_mut(&format!(
                "/paths/{}/{method}/responses/{status}",
                path.replace('/', "~1")
            ))
            .and_then(serde_json::Value::as_object_mut)
        {
            response.insert("links".into(), serde_json::Value::Object(map));
        }
    }
}

/// Largest request body accepted.
const MAX_BODY_BYTES: usize = 64 << 10;

/// The one error shape.
#[derive(Debug, Serialize, ToSchema)]
struct ErrorBody {
    error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Default, Serialize, ToSchema)]
struct ErrorDetail {
    /// Stable code (see docs/design/control-api.md): `unauthorized`, `bad_request`,
    /// `bad_item_id`, `bad_job_id`, `path_refused`, `item_not_found`, `job_not_found`,
    /// `point_not_found`, `not_found`, `method_not_allowed`, `wrong_state`,
    /// `not_enough_slots`, `path_in_use`, `job_running`, `too_many_jobs`, `disk_mismatch`,
    /// `io_error`.
    code: &'static str,
    /// For people.
    message: String,
    /// The request field at fault (`bad_request`, `path_refused`).
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<String>,
    /// The item's state (`wrong_state`).
    #[serde(skip_serializing_if = "Option::is_none")]
    state: Option<ItemState>,
    /// What the item allows now (`wrong_state`).
    #[serde(skip_serializing_if = "Option::is_none")]
    allowed_operations: Option<Vec<&'static str>>,
    /// Slots needed (`not_enough_slots`).
    #[serde(skip_serializing_if = "Option::is_none")]
    needed: Option<usize>,
    /// Slots free (`not_enough_slots`).
    #[serde(skip_serializing_if = "Option::is_none")]
    free: Option<usize>,
}

#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    body: Box<ErrorBody>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            body: Box::new(ErrorBody {
                error: ErrorDetail {
                    code,
                    message: message.into(),
                    ..ErrorDetail::default()
                },
            }),
        }
    }

    fn io(message: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "io_error",
            message.to_string(),
        )
    }

    fn bad(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
}

impl From<OpError> for ApiError {
    fn from(error: OpError) -> Self {
        let message = error.to_string();
        match error {
            OpError::BadRequest { code, field, .. } => {
                let mut e = Self::bad(code, message);
                e.body.error.field = field;
                e
            }
            OpError::PathRefused { field, .. } => {
                let mut e = Self::new(StatusCode::FORBIDDEN, "path_refused", message);
                e.body.error.field = Some(field);
                e
            }
            OpError::NotFound { code, .. } => Self::new(StatusCode::NOT_FOUND, code, message),
            OpError::WrongState { state, allowed, .. } => {
                let mut e = Self::new(StatusCode::CONFLICT, "wrong_state", message);
                e.body.error.state = Some(state);
                e.body.error.allowed_operations = Some(allowed);
                e
            }
            OpError::NotEnoughSlots { needed, free } => {
                let mut e = Self::new(StatusCode::CONFLICT, "not_enough_slots", message);
                e.body.error.needed = Some(needed);
                e.body.error.free = Some(free);
                e
            }
            OpError::Conflict { code, .. } => Self::new(StatusCode::CONFLICT, code, message),
            OpError::Io(_) => Self::io(message),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

/// Equal in time independent of where the first difference is.
fn same_token(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && std::hint::black_box(
            given
                .iter()
                .zip(expected)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b)),
        ) == 0
}

async fn require_token(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let refused = match request.headers().get(header::AUTHORIZATION) {
        None => Some("missing Authorization header (expected `Bearer <token>`)"),
        Some(value) => match value.to_str().ok().and_then(|v| v.trim().split_once(' ')) {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => {
                if same_token(token.trim().as_bytes(), state.config.token.as_bytes()) {
                    None
                } else {
                    Some("wrong API token")
                }
            }
            _ => Some("Authorization header is not `Bearer <token>`"),
        },
    };
    match refused {
        Some(why) => ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", why).into_response(),
        None => next.run(request).await,
    }
}

/// Runs manager calls off the async workers.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::io(format!("request task failed: {e}")))?
}

/// Extracts a path segment, as a 400 on failure.
fn path_id(
    id: Result<Path<String>, PathRejection>,
    code: &'static str,
) -> Result<String, ApiError> {
    id.map(|Path(id)| id)
        .map_err(|e| ApiError::bad(code, e.body_text()))
}

/// Extracts a JSON body, as a 400 naming the field on failure.
fn body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    body.map(|Json(body)| body)
        .map_err(|e| ApiError::bad("bad_request", e.body_text()))
}

/// Liveness.
#[derive(Debug, Serialize, ToSchema)]
struct Health {
    /// Always `ok`.
    status: &'static str,
}

/// Liveness probe; no token needed.
#[utoipa::path(get, path = "/health", responses((status = 200, body = Health)))]
async fn health() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// The appliance.
#[derive(Debug, Serialize, ToSchema)]
struct ApplianceInfo {
    /// Version of the appliance binary.
    version: &'static str,
    /// Its data directory.
    data_dir: String,
    /// Items (every state).
    items: usize,
    /// Address of the data port (source agents).
    data_addr: String,
    /// Address of this API.
    api_addr: String,
    /// Slots: total, usable, free.
    slot_count: u32,
    /// Usable slots (LUN 0 is the appliance's).
    slots_usable: u32,
    /// Free slots.
    slots_free: u32,
    /// Jobs running now.
    jobs_running: usize,
}

/// Appliance information.
#[utoipa::path(get, path = "/v1/appliance", security(("bearer" = [])),
    responses((status = 200, body = ApplianceInfo), (status = 401, body = ErrorBody)))]
async fn appliance_info(State(state): State<AppState>) -> Result<Json<ApplianceInfo>, ApiError> {
    blocking(move || {
        let manager = &state.config.manager;
        let slots = manager.slots();
        Ok(Json(ApplianceInfo {
            version: env!("CARGO_PKG_VERSION"),
            data_dir: manager.root().display().to_string(),
            items: manager.items().len(),
            data_addr: state.config.data_addr.to_string(),
            api_addr: state.api_addr.to_string(),
            slot_count: slots.slot_count,
            slots_usable: slots.usable,
            slots_free: slots.free,
            jobs_running: manager
                .jobs()
                .iter()
                .filter(|j| j.state == crate::jobs::JobState::Running)
                .count(),
        }))
    })
    .await
}

/// The slot table: each LUN, its state and the disk in it.
#[utoipa::path(get, path = "/v1/slots", security(("bearer" = [])),
    responses((status = 200, body = SlotsView), (status = 401, body = ErrorBody)))]
async fn list_slots(State(state): State<AppState>) -> Result<Json<SlotsView>, ApiError> {
    blocking(move || Ok(Json(state.config.manager.slots()))).await
}

/// Every item.
#[utoipa::path(get, path = "/v1/items", security(("bearer" = [])),
    responses((status = 200, body = Vec<ItemView>), (status = 401, body = ErrorBody)))]
async fn list_items(State(state): State<AppState>) -> Result<Json<Vec<ItemView>>, ApiError> {
    blocking(move || Ok(Json(state.config.manager.items()))).await
}

/// Enable protection: creates or attaches the replica disks (one slot each), issues the
/// stream token, starts the initial-replication job.
#[utoipa::path(post, path = "/v1/items", security(("bearer" = [])), request_body = EnableRequest,
    responses((status = 201, body = Enabled), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 500, body = ErrorBody)))]
async fn enable(
    State(state): State<AppState>,
    request: Result<Json<EnableRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Enabled>), ApiError> {
    let request = body(request)?;
    blocking(move || {
        Ok((
            StatusCode::CREATED,
            Json(state.config.manager.enable(request)?),
        ))
    })
    .await
}

/// One item.
#[utoipa::path(get, path = "/v1/items/{id}", security(("bearer" = [])),
    params(("id" = String, Path, description = "item id, 32 hex digits", pattern = "^[0-9a-fA-F]{32}$")),
    responses((status = 200, body = ItemView), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn get_item(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<ItemView>, ApiError> {
    let id = path_id(id, "bad_item_id")?;
    blocking(move || Ok(Json(state.config.manager.item_view(&id)?))).await
}

/// Disable protection: replication stopped, slots released, staging, recovery points and
/// created replica disks removed (attached and failed-over disks are left alone).
#[utoipa::path(delete, path = "/v1/items/{id}", security(("bearer" = [])),
    params(("id" = String, Path, description = "item id, 32 hex digits", pattern = "^[0-9a-fA-F]{32}$")),
    responses((status = 200, body = ItemView), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 500, body = ErrorBody)))]
async fn disable(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<ItemView>, ApiError> {
    let id = path_id(id, "bad_item_id")?;
    blocking(move || Ok(Json(state.config.manager.disable(&id)?))).await
}

/// A recovery point.
#[derive(Debug, Serialize, ToSchema)]
struct PointView {
    /// Point id: the sequence number of the frame that made it.
    id: u64,
    /// `crash` or `app`.
    consistency: &'static str,
    /// `bookmark` (from the source) or `latest` (made by the appliance).
    origin: &'static str,
    /// The source's bookmark id (0 for a latest point).
    bookmark_id: u64,
    /// The source's time of the instant, ns since the Unix epoch.
    source_timestamp_ns: u64,
    /// When the appliance made it processed, ns since the Unix epoch.
    processed_at_ns: u64,
    label: String,
}

impl From<PointRecord> for PointView {
    fn from(point: PointRecord) -> Self {
        Self {
            id: point.point_id,
            consistency: match point.consistency {
                Consistency::Crash => "crash",
                Consistency::App => "app",
            },
            origin: match point.origin {
                PointOrigin::Bookmark => "bookmark",
                PointOrigin::Latest => "latest",
            },
            bookmark_id: point.bookmark_id,
            source_timestamp_ns: point.source_timestamp_ns,
            processed_at_ns: point.processed_at_ns,
            label: point.label,
        }
    }
}

/// The recovery points of an item, oldest first.
#[utoipa::path(get, path = "/v1/items/{id}/points", security(("bearer" = [])),
    params(("id" = String, Path, description = "item id, 32 hex digits", pattern = "^[0-9a-fA-F]{32}$")),
    responses((status = 200, body = Vec<PointView>), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 500, description = "metadata store I/O failure", body = ErrorBody)))]
async fn list_points(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<Vec<PointView>>, ApiError> {
    let id = path_id(id, "bad_item_id")?;
    blocking(move || {
        let points = state.config.manager.points(&id)?;
        Ok(Json(points.into_iter().map(PointView::from).collect()))
    })
    .await
}

/// Test failover: the disks at a point written to a directory (raw or fixed VHD) by a job;
/// replication keeps running.
#[utoipa::path(post, path = "/v1/items/{id}/test-failover", security(("bearer" = [])),
    params(("id" = String, Path, description = "item id, 32 hex digits", pattern = "^[0-9a-fA-F]{32}$")),
    request_body = MaterializeRequest,
    responses((status = 202, body = JobView), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn test_failover(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    request: Result<Json<MaterializeRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<JobView>), ApiError> {
    let id = path_id(id, "bad_item_id")?;
    let request = body(request)?;
    blocking(move || {
        Ok((
            StatusCode::ACCEPTED,
            Json(state.config.manager.test_failover(&id, request)?),
        ))
    })
    .await
}

/// Test failover cleanup: the test disks deleted; back to protected.
#[utoipa::path(post, path = "/v1/items/{id}/test-failover/cleanup", security(("bearer" = [])),
    params(("id" = String, Path, description = "item id, 32 hex digits", pattern = "^[0-9a-fA-F]{32}$")),
    responses((status = 200, body = ItemView), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
async fn test_failover_cleanup(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<ItemView>, ApiError> {
    let id = path_id(id, "bad_item_id")?;
    blocking(move || Ok(Json(state.config.manager.test_failover_cleanup(&id)?))).await
}

/// Failover to a point (latest, latest-processed, latest-app or a point id): replication
/// stops and a job writes the disks to the target directory.
#[utoipa::path(post, path = "/v1/items/{id}/failover", security(("bearer" = [])),
    params(("id" = String, Path, description = "item id, 32 hex digits", pattern = "^[0-9a-fA-F]{32}$")),
    request_body = FailoverRequest,
    responses((status = 202, body = JobView), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn failover(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    request: Result<Json<FailoverRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<JobView>), ApiError> {
    let id = path_id(id, "bad_item_id")?;
    let request = body(request)?;
    blocking(move || {
        Ok((
            StatusCode::ACCEPTED,
            Json(state.config.manager.failover(&id, request)?),
        ))
    })
    .await
}

/// Change the failed-over disks to another recovery point (before commit).
#[utoipa::path(post, path = "/v1/items/{id}/change-point", security(("bearer" = [])),
    params(("id" = String, Path, description = "item id, 32 hex digits", pattern = "^[0-9a-fA-F]{32}$")),
    request_body = ChangePointRequest,
    responses((status = 202, body = JobView), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
async fn change_point(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    request: Result<Json<ChangePointRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<JobView>), ApiError> {
    let id = path_id(id, "bad_item_id")?;
    let request = body(request)?;
    blocking(move || {
        Ok((
            StatusCode::ACCEPTED,
            Json(state.config.manager.change_point(&id, request)?),
        ))
    })
    .await
}

/// Commit the failover.
#[utoipa::path(post, path = "/v1/items/{id}/commit", security(("bearer" = [])),
    params(("id" = String, Path, description = "item id, 32 hex digits", pattern = "^[0-9a-fA-F]{32}$")),
    responses((status = 200, body = ItemView), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
async fn commit(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<ItemView>, ApiError> {
    let id = path_id(id, "bad_item_id")?;
    blocking(move || Ok(Json(state.config.manager.commit(&id)?))).await
}

/// Re-protect a committed item: the original VM's disks become the replicas of a new reverse
/// item (one slot each), a temporary 1 GiB OS disk is created for the original VM, and the
/// failed-over VM's agent runs a delta resync.
#[utoipa::path(post, path = "/v1/items/{id}/reprotect", security(("bearer" = [])),
    params(("id" = String, Path, description = "item id, 32 hex digits", pattern = "^[0-9a-fA-F]{32}$")),
    request_body = ReprotectRequest,
    responses((status = 201, body = Enabled), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn reprotect(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    request: Result<Json<ReprotectRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Enabled>), ApiError> {
    let id = path_id(id, "bad_item_id")?;
    let request = body(request)?;
    blocking(move || {
        Ok((
            StatusCode::CREATED,
            Json(state.config.manager.reprotect(&id, request)?),
        ))
    })
    .await
}

/// Failback (planned failover) of a protected item whose disks were attached: final sync,
/// the disks handed back, the temporary OS disk deleted.
#[utoipa::path(post, path = "/v1/items/{id}/failback", security(("bearer" = [])),
    params(("id" = String, Path, description = "item id, 32 hex digits", pattern = "^[0-9a-fA-F]{32}$")),
    responses((status = 202, body = JobView), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
async fn failback(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<(StatusCode, Json<JobView>), ApiError> {
    let id = path_id(id, "bad_item_id")?;
    blocking(move || {
        Ok((
            StatusCode::ACCEPTED,
            Json(state.config.manager.failback(&id)?),
        ))
    })
    .await
}

/// Delta resync on demand: the agent is told (at its next hello) to run the hash exchange.
#[utoipa::path(post, path = "/v1/items/{id}/resync", security(("bearer" = [])),
    params(("id" = String, Path, description = "item id, 32 hex digits", pattern = "^[0-9a-fA-F]{32}$")),
    responses((status = 202, body = JobView), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
async fn resync(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<(StatusCode, Json<JobView>), ApiError> {
    let id = path_id(id, "bad_item_id")?;
    blocking(move || {
        Ok((
            StatusCode::ACCEPTED,
            Json(state.config.manager.resync(&id)?),
        ))
    })
    .await
}

/// Every job, newest first.
#[utoipa::path(get, path = "/v1/jobs", security(("bearer" = [])),
    responses((status = 200, body = Vec<JobView>), (status = 401, body = ErrorBody)))]
async fn list_jobs(State(state): State<AppState>) -> Result<Json<Vec<JobView>>, ApiError> {
    blocking(move || Ok(Json(state.config.manager.jobs()))).await
}

/// One job.
#[utoipa::path(get, path = "/v1/jobs/{id}", security(("bearer" = [])),
    params(("id" = u64, Path, description = "job id")),
    responses((status = 200, body = JobView), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn get_job(
    State(state): State<AppState>,
    id: Result<Path<u64>, PathRejection>,
) -> Result<Json<JobView>, ApiError> {
    let Path(id) = id.map_err(|e| ApiError::bad("bad_job_id", e.body_text()))?;
    blocking(move || Ok(Json(state.config.manager.job(id)?))).await
}

/// Prometheus metrics (text format 0.0.4).
#[utoipa::path(get, path = "/metrics", security(("bearer" = [])),
    responses((status = 200, content_type = "text/plain", body = String),
        (status = 401, body = ErrorBody)))]
async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let text =
        blocking(move || Ok(crate::metrics::render(&state.config.manager.metrics()))).await?;
    Ok(([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_token_needs_equal_bytes_and_length() {
        assert!(same_token(b"abcd", b"abcd"));
        assert!(!same_token(b"abce", b"abcd"));
        assert!(!same_token(b"abc", b"abcd"));
        assert!(!same_token(b"", b"abcd"));
    }

    #[test]
    fn token_is_created_once_with_mode_0600_and_then_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (token, created) = load_or_create_token(dir.path()).expect("create");
        assert!(created);
        assert_eq!(token.len(), 64);
        let mode = std::fs::metadata(dir.path().join(TOKEN_FILE))
            .expect("metadata")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            load_or_create_token(dir.path()).expect("reuse"),
            (token, false)
        );
        std::fs::write(dir.path().join(TOKEN_FILE), "short").expect("write");
        assert!(load_or_create_token(dir.path()).is_err());
    }
}
