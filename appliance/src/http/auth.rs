//! The control API's bearer-token check (`Authorization: Bearer <token>`, compared in constant
//! time by `crate::secrets`); a refusal is 401 `unauthorized` naming what was wrong.

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::state::AppState;

pub(super) async fn require_token(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let refused = match request.headers().get(header::AUTHORIZATION) {
        None => Some("missing Authorization header (expected `Bearer <token>`)"),
        Some(value) => match value.to_str().ok().and_then(|v| v.trim().split_once(' ')) {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => {
                if crate::secrets::tokens_equal(
                    state.config.token.as_bytes(),
                    token.trim().as_bytes(),
                ) {
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
