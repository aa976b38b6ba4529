//! One error type for the control API: a status, a stable code and a sentence. Internal errors
//! are logged and answered with a generic message; a node that does not answer is a 503 that
//! names it.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use pgwarden_api::ApiError as ErrorBody;
use tracing::{error, warn};

use crate::nodes::sql::SqlError;
use crate::state::StoreError;

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, code, message: message.into() }
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self { status: StatusCode::UNAUTHORIZED, code: "unauthorized", message: message.into() }
    }
    pub fn not_found(what: &str, id: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            code: "not_found",
            message: format!("no {what} {id:?}"),
        }
    }
    pub fn not_found_message(code: &'static str, message: impl Into<String>) -> Self {
        Self { status: StatusCode::NOT_FOUND, code, message: message.into() }
    }
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self { status: StatusCode::CONFLICT, code, message: message.into() }
    }
    pub fn unprocessable(code: &'static str, message: impl Into<String>) -> Self {
        Self { status: StatusCode::UNPROCESSABLE_ENTITY, code, message: message.into() }
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "node_unavailable",
            message: message.into(),
        }
    }
    /// A control plane on standby (etcd): another leads.
    pub fn standby(message: impl Into<String>) -> Self {
        Self { status: StatusCode::SERVICE_UNAVAILABLE, code: "standby", message: message.into() }
    }
    pub fn method_not_allowed() -> Self {
        Self {
            status: StatusCode::METHOD_NOT_ALLOWED,
            code: "method_not_allowed",
            message: "this endpoint does not take that method; see SPEC §4".into(),
        }
    }
    pub fn internal(e: impl std::fmt::Display) -> Self {
        error!(error = %e, "internal error");
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "internal",
            message: "internal error; see the control plane's log".into(),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        Self::internal(e)
    }
}

impl From<std::io::Error> for ApiError {
    fn from(e: std::io::Error) -> Self {
        Self::internal(e)
    }
}

/// A node that did not answer is 503 with its name; other SQL failures are logged.
impl From<SqlError> for ApiError {
    fn from(e: SqlError) -> Self {
        if e.unreachable() {
            warn!(error = %e, "node unavailable");
            Self::unavailable(format!(
                "{e}; try again once it is back (a failover may be under way)"
            ))
        } else {
            Self::internal(e)
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(ErrorBody::new(self.code, self.message))).into_response()
    }
}
