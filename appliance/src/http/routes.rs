//! The control API's route table: every operation's handler, the token layer, the layer that
//! reads each body in time, `/openapi.json`, and the JSON fallbacks for unknown paths and
//! methods.

use anyhow::Context;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth;
use super::error::ApiError;
use super::exports;
use super::handlers;
use super::openapi;
use super::state::AppState;

pub(super) fn router(state: AppState) -> anyhow::Result<Router> {
    let (router, openapi) = OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(handlers::appliance_info))
        .routes(routes!(handlers::list_slots))
        .routes(routes!(handlers::list_items, handlers::enable))
        .routes(routes!(handlers::get_item, handlers::disable))
        .routes(routes!(handlers::list_points))
        .routes(routes!(handlers::test_failover))
        .routes(routes!(handlers::test_failover_cleanup))
        .routes(routes!(handlers::promote))
        .routes(routes!(handlers::failover))
        .routes(routes!(handlers::change_point))
        .routes(routes!(handlers::commit))
        .routes(routes!(handlers::reprotect))
        .routes(routes!(handlers::failback))
        .routes(routes!(handlers::resync))
        .routes(routes!(exports::create_export))
        .routes(routes!(exports::list_exports))
        .routes(routes!(exports::get_export, exports::remove_export))
        .routes(routes!(handlers::list_jobs))
        .routes(routes!(handlers::get_job))
        .routes(routes!(handlers::metrics))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ))
        .routes(routes!(handlers::health))
        .split_for_parts();
    let mut document = serde_json::to_value(&openapi).context("rendering /openapi.json")?;
    openapi::add_links(&mut document);
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
pub(super) async fn read_body_in_time(
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
pub(super) fn close_after(response: &mut Response) {
    response.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
}

/// Largest request body accepted.
pub(super) const MAX_BODY_BYTES: usize = 64 << 10;
