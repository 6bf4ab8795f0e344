//! The control API's one error shape (`{"error": {"code", "message", ...}}`) and how each
//! `OpError` of the item manager maps to an HTTP status and code.

use crate::items::OpError;
use axum::Json;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

/// The one error shape (defined once, in `appliance-api`).
pub(super) use appliance_api::model::{ErrorBody, ErrorDetail};

#[derive(Debug)]
pub(super) struct ApiError {
    pub(super) status: StatusCode,
    pub(super) body: Box<ErrorBody>,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            body: Box::new(ErrorBody {
                error: ErrorDetail {
                    code: code.to_owned(),
                    message: message.into(),
                    ..ErrorDetail::default()
                },
            }),
        }
    }

    pub(super) fn io(message: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "io_error",
            message.to_string(),
        )
    }

    pub(super) fn bad(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
}

impl From<OpError> for ApiError {
    fn from(error: OpError) -> Self {
        // The whole chain, each cause once (today's `OpError`s carry their text themselves).
        let message = engine::error::report(&error);
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
                e.body.error.allowed_operations =
                    Some(allowed.into_iter().map(str::to_owned).collect());
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
