//! The control API of `appliance serve` (HTTP/JSON, axum): this first slice is read-only.
//!
//! | Method and path              | Auth   | Answer                                                  |
//! |------------------------------|--------|---------------------------------------------------------|
//! | `GET /health`                | none   | `{"status":"ok"}`                                       |
//! | `GET /openapi.json`          | none   | the OpenAPI 3.1 document of this API (no data in it)    |
//! | `GET /v1/appliance`          | bearer | version, data directory, item count, listen addresses   |
//! | `GET /v1/items`              | bearer | every served item: disks, watermarks, points, health    |
//! | `GET /v1/items/{id}/points`  | bearer | the recovery points of one item, oldest first           |
//!
//! Auth is `Authorization: Bearer <token>`, the token being the 64 hex digits of
//! `DATA_DIR/api-token` (created with mode 0600 at first start and printed once on stderr);
//! it is compared in constant time. Every error has one shape,
//! `{"error": {"code": "...", "message": "..."}}`: 401 for a missing or wrong token, 400 for
//! a malformed item id, 404 for an unknown item or path; a 500 only names a real I/O failure.
//!
//! The server runs on its own thread with a 2-worker tokio runtime; blocking reads (the
//! metadata store, the staging log's lock) run on tokio's blocking pool. [`ApiServer::shutdown`]
//! stops accepting, lets requests in flight finish (at most [`GRACE`]), and joins the thread.

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, bail};
use axum::extract::rejection::PathRejection;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use engine::delta::{Consistency, DiskGeometry};
use engine::meta::{MetaStore, PointOrigin, PointRecord, item_key};
use engine::staging::StagingReader;
use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::runtime::WorkerStatus;
use crate::store::{item_hex, parse_item_hex};

/// Name of the API token file in the data directory.
pub const TOKEN_FILE: &str = "api-token";

/// How long a graceful shutdown waits for requests in flight.
pub const GRACE: Duration = Duration::from_secs(5);

/// Reads the API token of `data_dir`, creating it (32 random bytes, hex, mode 0600) on first
/// start. Returns the token and whether it was just created. The caller holds the data
/// directory's lock, so no other process races the creation.
pub fn load_or_create_token(data_dir: &Path) -> anyhow::Result<(String, bool)> {
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
    let tmp = data_dir.join(format!("{TOKEN_FILE}.tmp"));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(token.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, &path).with_context(|| format!("creating {}", path.display()))?;
    std::fs::File::open(data_dir)
        .and_then(|dir| dir.sync_all())
        .with_context(|| format!("syncing {}", data_dir.display()))?;
    Ok((token, true))
}

/// One item as the daemon serves it.
#[derive(Debug)]
pub struct ServedItem {
    /// Item id.
    pub id: [u8; 16],
    /// Its name.
    pub name: String,
    /// Its disks.
    pub disks: Vec<DiskGeometry>,
    /// A reader of its staging log, used only for the durable seq: the log itself is locked
    /// by a data-port session for the session's whole life, so the API never takes that lock.
    pub staging: StagingReader,
    /// Its apply worker's health.
    pub worker: WorkerStatus,
}

/// What the API reads.
#[derive(Debug)]
pub struct ApiConfig {
    /// The data directory.
    pub data_dir: PathBuf,
    /// The data port's address.
    pub data_addr: SocketAddr,
    /// The bearer token.
    pub token: String,
    /// The metadata store.
    pub meta: Arc<MetaStore>,
    /// The served items.
    pub items: Vec<ServedItem>,
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
                let result = runtime.block_on(run(listener, app, stopped));
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

async fn run(
    listener: std::net::TcpListener,
    app: Router,
    stopped: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let (mut graceful, mut deadline) = (stopped.clone(), stopped);
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        // An error means the sender is gone: stop too.
        let _ = graceful.wait_for(|stop| *stop).await;
    });
    tokio::select! {
        result = server => result,
        _ = async {
            let _ = deadline.wait_for(|stop| *stop).await;
            tokio::time::sleep(GRACE).await;
        } => {
            tracing::warn!("control API: requests still running after {GRACE:?}; dropped");
            Ok(())
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "DR appliance control API",
        description = "Read-only slice: appliance info, items, recovery points. Everything \
                       but /health and /openapi.json needs `Authorization: Bearer <token>` \
                       (DATA_DIR/api-token)."
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
        .routes(routes!(list_items))
        .routes(routes!(list_points))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token))
        .routes(routes!(health))
        .split_for_parts();
    let openapi = axum::body::Bytes::from(openapi.to_json().context("rendering /openapi.json")?);
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
        .with_state(state))
}

/// The one error shape.
#[derive(Debug, Serialize, ToSchema)]
struct ErrorBody {
    error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Serialize, ToSchema)]
struct ErrorDetail {
    /// Stable code: `unauthorized`, `bad_item_id`, `item_not_found`, `not_found`,
    /// `method_not_allowed`, `io_error`.
    code: &'static str,
    /// For people.
    message: String,
}

#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    body: ErrorBody,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            body: ErrorBody {
                error: ErrorDetail {
                    code,
                    message: message.into(),
                },
            },
        }
    }

    fn io(message: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "io_error",
            message.to_string(),
        )
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

/// Runs blocking reads off the async workers.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::io(format!("read task failed: {e}")))?
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
    /// Items served.
    items: usize,
    /// Address of the data port (source agents).
    data_addr: String,
    /// Address of this API.
    api_addr: String,
}

/// Appliance information.
#[utoipa::path(get, path = "/v1/appliance", security(("bearer" = [])),
    responses((status = 200, body = ApplianceInfo), (status = 401, body = ErrorBody)))]
async fn appliance_info(State(state): State<AppState>) -> Json<ApplianceInfo> {
    let config = &state.config;
    Json(ApplianceInfo {
        version: env!("CARGO_PKG_VERSION"),
        data_dir: config.data_dir.display().to_string(),
        items: config.items.len(),
        data_addr: config.data_addr.to_string(),
        api_addr: state.api_addr.to_string(),
    })
}

/// A replica disk.
#[derive(Debug, Serialize, ToSchema)]
struct DiskView {
    size_bytes: u64,
    block_size_bytes: u32,
}

/// A served item.
#[derive(Debug, Serialize, ToSchema)]
struct ItemView {
    /// Item id, 32 hex digits.
    id: String,
    name: String,
    /// OS disk first.
    disks: Vec<DiskView>,
    /// Applied watermark (metadata store): frames up to it are in the replicas.
    applied_seq: u64,
    /// Frames up to it are durable in the staging log (acknowledged to the agent).
    staged_seq: u64,
    /// Recovery points kept.
    points: usize,
    /// Id of the newest point, if any.
    latest_point_id: Option<u64>,
    /// `healthy`, or why not.
    health: String,
}

/// Every served item (items without a stream token are not served and not listed).
#[utoipa::path(get, path = "/v1/items", security(("bearer" = [])),
    responses((status = 200, body = Vec<ItemView>), (status = 401, body = ErrorBody),
        (status = 500, description = "metadata store I/O failure", body = ErrorBody)))]
async fn list_items(State(state): State<AppState>) -> Result<Json<Vec<ItemView>>, ApiError> {
    blocking(move || {
        let meta = &state.config.meta;
        let mut out = Vec::with_capacity(state.config.items.len());
        for item in &state.config.items {
            let hex = item_hex(&item.id);
            let key = item_key(&item.id);
            let (applied_seq, _) = meta
                .state(key)
                .map_err(|e| ApiError::io(format!("item {hex}: {e}")))?;
            let points = meta
                .points(key)
                .map_err(|e| ApiError::io(format!("item {hex}: {e}")))?;
            let staged_seq = item.staging.durable_seq();
            out.push(ItemView {
                id: hex,
                name: item.name.clone(),
                disks: item
                    .disks
                    .iter()
                    .map(|d| DiskView {
                        size_bytes: d.size_bytes,
                        block_size_bytes: d.block_size_bytes,
                    })
                    .collect(),
                applied_seq,
                staged_seq,
                points: points.len(),
                latest_point_id: points.last().map(|p| p.point_id),
                health: if item.worker.failed() {
                    "apply stopped on an error (see the appliance log)".into()
                } else {
                    "healthy".into()
                },
            });
        }
        Ok(Json(out))
    })
    .await
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
    params(("id" = String, Path, description = "item id, 32 hex digits")),
    responses((status = 200, body = Vec<PointView>), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 500, description = "metadata store I/O failure", body = ErrorBody)))]
async fn list_points(
    State(state): State<AppState>,
    id: Result<axum::extract::Path<String>, PathRejection>,
) -> Result<Json<Vec<PointView>>, ApiError> {
    let axum::extract::Path(id) =
        id.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_item_id", e.body_text()))?;
    let item_id = parse_item_hex(&id)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_item_id", format!("{e:#}")))?;
    if !state.config.items.iter().any(|item| item.id == item_id) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "item_not_found",
            format!("no item {id:?} is served here"),
        ));
    }
    blocking(move || {
        let points = state
            .config
            .meta
            .points(item_key(&item_id))
            .map_err(|e| ApiError::io(format!("item {id}: {e}")))?;
        Ok(Json(points.into_iter().map(PointView::from).collect()))
    })
    .await
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
