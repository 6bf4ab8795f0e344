//! One handler per control API operation: each extracts and checks its path and body, runs the
//! item manager's call on tokio's blocking pool, and answers JSON (or the metrics text).

use appliance_api::model::{ApplianceInfo, Health, PointConsistency, PointOrigin, PointView};
use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use engine::delta::Consistency;
use engine::meta::{PointOrigin as EnginePointOrigin, PointRecord};

use crate::items::{
    ChangePointRequest, EnableRequest, Enabled, FailoverRequest, ItemView, MaterializeRequest,
    PromoteRequest, ReprotectRequest, SlotsView,
};
use crate::jobs::JobView;

use super::error::{ApiError, ErrorBody};
use super::state::AppState;

/// Runs manager calls off the async workers.
pub(super) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::io(format!("request task failed: {e}")))?
}

/// Extracts a path segment, as a 400 on failure.
pub(super) fn path_id(
    id: Result<Path<String>, PathRejection>,
    code: &'static str,
) -> Result<String, ApiError> {
    id.map(|Path(id)| id)
        .map_err(|e| ApiError::bad(code, e.body_text()))
}

/// Extracts a JSON body, as a 400 naming the field on failure.
pub(super) fn body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    body.map(|Json(body)| body)
        .map_err(|e| ApiError::bad("bad_request", e.body_text()))
}

/// Liveness probe; no token needed.
#[utoipa::path(get, path = "/health", responses((status = 200, body = Health)))]
pub(super) async fn health() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

/// Appliance information.
#[utoipa::path(get, path = "/v1/appliance", security(("bearer" = [])),
    responses((status = 200, body = ApplianceInfo), (status = 401, body = ErrorBody)))]
pub(super) async fn appliance_info(
    State(state): State<AppState>,
) -> Result<Json<ApplianceInfo>, ApiError> {
    blocking(move || {
        let manager = &state.config.manager;
        let slots = manager.slots();
        Ok(Json(ApplianceInfo {
            version: env!("CARGO_PKG_VERSION").into(),
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
pub(super) async fn list_slots(State(state): State<AppState>) -> Result<Json<SlotsView>, ApiError> {
    blocking(move || Ok(Json(state.config.manager.slots()))).await
}

/// Every item.
#[utoipa::path(get, path = "/v1/items", security(("bearer" = [])),
    responses((status = 200, body = Vec<ItemView>), (status = 401, body = ErrorBody)))]
pub(super) async fn list_items(
    State(state): State<AppState>,
) -> Result<Json<Vec<ItemView>>, ApiError> {
    blocking(move || Ok(Json(state.config.manager.items()))).await
}

/// Enable protection: creates or attaches the replica disks (one slot each), issues the
/// stream token, starts the initial-replication job.
#[utoipa::path(post, path = "/v1/items", security(("bearer" = [])), request_body = EnableRequest,
    responses((status = 201, body = Enabled), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 500, body = ErrorBody)))]
pub(super) async fn enable(
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
pub(super) async fn get_item(
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
pub(super) async fn disable(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<ItemView>, ApiError> {
    let id = path_id(id, "bad_item_id")?;
    blocking(move || Ok(Json(state.config.manager.disable(&id)?))).await
}

/// A recovery point as the API shows it.
fn point_view(point: PointRecord) -> PointView {
    PointView {
        id: point.point_id,
        consistency: match point.consistency {
            Consistency::Crash => PointConsistency::Crash,
            Consistency::App => PointConsistency::App,
        },
        origin: match point.origin {
            EnginePointOrigin::Bookmark => PointOrigin::Bookmark,
            EnginePointOrigin::Latest => PointOrigin::Latest,
        },
        bookmark_id: point.bookmark_id,
        source_timestamp_ns: point.source_timestamp_ns,
        processed_at_ns: point.processed_at_ns,
        label: point.label,
    }
}

/// The recovery points of an item, oldest first.
#[utoipa::path(get, path = "/v1/items/{id}/points", security(("bearer" = [])),
    params(("id" = String, Path, description = "item id, 32 hex digits", pattern = "^[0-9a-fA-F]{32}$")),
    responses((status = 200, body = Vec<PointView>), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 500, description = "metadata store I/O failure", body = ErrorBody)))]
pub(super) async fn list_points(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<Vec<PointView>>, ApiError> {
    let id = path_id(id, "bad_item_id")?;
    blocking(move || {
        let points = state.config.manager.points(&id)?;
        Ok(Json(points.into_iter().map(point_view).collect()))
    })
    .await
}

/// Test failover: the disks at a point written to a directory (raw or fixed VHD) by a job
/// (copy mode), or served over NBD at once as a writable drill (export mode: the job is done
/// in the answer, the item's `test_failover.export_id` names the export); replication keeps
/// running.
#[utoipa::path(post, path = "/v1/items/{id}/test-failover", security(("bearer" = [])),
    params(("id" = String, Path, description = "item id, 32 hex digits", pattern = "^[0-9a-fA-F]{32}$")),
    request_body = MaterializeRequest,
    responses((status = 202, body = JobView), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(super) async fn test_failover(
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
pub(super) async fn test_failover_cleanup(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<ItemView>, ApiError> {
    let id = path_id(id, "bad_item_id")?;
    blocking(move || Ok(Json(state.config.manager.test_failover_cleanup(&id)?))).await
}

/// Promote a test failover's drill (export mode) to the failover, keeping its writes:
/// replication stops, the drill's export goes on serving without a break, and a job copies its
/// point and writes into the target directory (then commit).
#[utoipa::path(post, path = "/v1/items/{id}/test-failover/promote", security(("bearer" = [])),
    params(("id" = String, Path, description = "item id, 32 hex digits", pattern = "^[0-9a-fA-F]{32}$")),
    request_body = PromoteRequest,
    responses((status = 202, body = JobView), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(super) async fn promote(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    request: Result<Json<PromoteRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<JobView>), ApiError> {
    let id = path_id(id, "bad_item_id")?;
    let request = body(request)?;
    blocking(move || {
        Ok((
            StatusCode::ACCEPTED,
            Json(state.config.manager.promote(&id, request)?),
        ))
    })
    .await
}

/// Failover to a point (latest, latest-processed, latest-app or a point id): replication
/// stops and a job writes the disks to the target directory (copy mode), or the disks are
/// served over NBD at once while the job copies them (export mode).
#[utoipa::path(post, path = "/v1/items/{id}/failover", security(("bearer" = [])),
    params(("id" = String, Path, description = "item id, 32 hex digits", pattern = "^[0-9a-fA-F]{32}$")),
    request_body = FailoverRequest,
    responses((status = 202, body = JobView), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(super) async fn failover(
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
pub(super) async fn change_point(
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
pub(super) async fn commit(
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
pub(super) async fn reprotect(
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
pub(super) async fn failback(
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
pub(super) async fn resync(
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
pub(super) async fn list_jobs(
    State(state): State<AppState>,
) -> Result<Json<Vec<JobView>>, ApiError> {
    blocking(move || Ok(Json(state.config.manager.jobs()))).await
}

/// One job.
#[utoipa::path(get, path = "/v1/jobs/{id}", security(("bearer" = [])),
    params(("id" = u64, Path, description = "job id")),
    responses((status = 200, body = JobView), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn get_job(
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
pub(super) async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let text = blocking(move || {
        crate::metrics::render(&state.config.manager.metrics()).map_err(|_| {
            ApiError::from(crate::items::OpError::Io(
                "encoding the metrics page failed".into(),
            ))
        })
    })
    .await?;
    Ok(([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response())
}
