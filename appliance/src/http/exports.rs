//! The control API's export handlers: a recovery point served over NBD, listed, shown and
//! removed (one handler per operation, as in `handlers.rs`).

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::StatusCode;

use crate::items::{ExportRequest, ExportView};

use super::error::{ApiError, ErrorBody};
use super::handlers::{blocking, body, path_id};
use super::state::AppState;

/// Export a retained recovery point over NBD, read-only or as a writable drill (its writes
/// kept in an overlay, never in a replica or a point). The point is pinned against retention
/// while the export exists; replication keeps running. The answer has one NBD URI per disk.
#[utoipa::path(post, path = "/v1/items/{id}/exports", security(("bearer" = [])),
    params(("id" = String, Path, description = "item id, 32 hex digits", pattern = "^[0-9a-fA-F]{32}$")),
    request_body = ExportRequest,
    responses((status = 201, body = ExportView), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 500, body = ErrorBody)))]
pub(super) async fn create_export(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    request: Result<Json<ExportRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<ExportView>), ApiError> {
    let id = path_id(id, "bad_item_id")?;
    let request = body(request)?;
    blocking(move || {
        Ok((
            StatusCode::CREATED,
            Json(state.config.manager.export(&id, request)?),
        ))
    })
    .await
}

/// Every live export (exports, test failovers and failovers in export mode).
#[utoipa::path(get, path = "/v1/exports", security(("bearer" = [])),
    responses((status = 200, body = Vec<ExportView>), (status = 401, body = ErrorBody)))]
pub(super) async fn list_exports(
    State(state): State<AppState>,
) -> Result<Json<Vec<ExportView>>, ApiError> {
    blocking(move || Ok(Json(state.config.manager.exports_view()))).await
}

/// One export.
#[utoipa::path(get, path = "/v1/exports/{export_id}", security(("bearer" = [])),
    params(("export_id" = String, Path, description = "export id, 32 hex digits", pattern = "^[0-9a-fA-F]{32}$")),
    responses((status = 200, body = ExportView), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn get_export(
    State(state): State<AppState>,
    export_id: Result<Path<String>, PathRejection>,
) -> Result<Json<ExportView>, ApiError> {
    let id = path_id(export_id, "bad_export_id")?;
    blocking(move || Ok(Json(state.config.manager.export_view(&id)?))).await
}

/// Remove an export: its NBD clients are disconnected, a drill's overlay is deleted, the
/// point is unpinned. A test failover's or failover's export goes with that operation (409).
#[utoipa::path(delete, path = "/v1/exports/{export_id}", security(("bearer" = [])),
    params(("export_id" = String, Path, description = "export id, 32 hex digits", pattern = "^[0-9a-fA-F]{32}$")),
    responses((status = 200, body = ExportView), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 500, body = ErrorBody)))]
pub(super) async fn remove_export(
    State(state): State<AppState>,
    export_id: Result<Path<String>, PathRejection>,
) -> Result<Json<ExportView>, ApiError> {
    let id = path_id(export_id, "bad_export_id")?;
    blocking(move || Ok(Json(state.config.manager.remove_export(&id)?))).await
}
