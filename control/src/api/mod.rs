//! The control HTTP API (SPEC §4): the router and its bearer-token check here, one file per
//! resource (`databases.rs`, `users.rs`, `ha.rs`, `backups.rs`, `pitr.rs`, `operations.rs`),
//! the database view with the nodes' live state (`view.rs`), and the error type (`error.rs`).
//!
//! Handlers validate, record, and either answer at once or start an operation (202); they
//! never hold a lock across a call to a node, and every node call is bounded.

mod backups;
mod dashboard;
mod databases;
pub mod error;
mod ha;
mod operations;
mod pitr;
mod users;
mod view;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use pgwarden_api::control::DatabaseStatus;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::pitr::Heartbeats;
use crate::platform::Platform;
use crate::state::DatabaseRecord;
use error::ApiError;

pub struct ApiState {
    pub platform: Arc<Platform>,
    pub heartbeats: Arc<Heartbeats>,
    pub sampler: Arc<crate::stats::Sampler>,
    pub token: String,
}

type AppState = State<Arc<ApiState>>;

pub fn router(state: Arc<ApiState>) -> Router {
    let authed = Router::new()
        .route("/metrics", get(metrics))
        .route("/v1/plans", get(databases::list_plans))
        .route("/v1/engines", get(databases::engines))
        .route("/v1/databases", get(databases::list).post(databases::create))
        .route(
            "/v1/databases/{id}",
            get(databases::show).delete(databases::destroy).patch(databases::change),
        )
        .route("/v1/databases/{id}/env", get(databases::env))
        .route("/v1/databases/{id}/engine-upgrade", post(databases::upgrade_engine))
        .route("/v1/databases/{id}/tls", put(databases::set_tls))
        .route("/v1/databases/{id}/events", get(databases::events))
        .route("/v1/databases/{id}/stats", get(databases::stats))
        .route("/v1/databases/{id}/stats/history", get(databases::stats_history))
        .route("/v1/databases/{id}/users", get(users::list).post(users::create))
        .route("/v1/databases/{id}/users/{name}", delete(users::delete))
        .route("/v1/databases/{id}/users/{name}/reset-password", post(users::reset_password))
        .route("/v1/databases/{id}/failover", post(ha::failover))
        .route("/v1/databases/{id}/switchover", post(ha::switchover))
        .route("/v1/databases/{id}/backups", get(backups::list).post(backups::create))
        .route("/v1/databases/{id}/backups/{backup}", delete(backups::delete))
        .route("/v1/databases/{id}/backups/{backup}/download", get(backups::download))
        .route("/v1/databases/{id}/backup-schedule", put(backups::set_schedule))
        .route("/v1/databases/{id}/pitr", get(pitr::window))
        .route("/v1/databases/{id}/restore", post(pitr::restore))
        .route("/v1/operations/{id}", get(operations::show))
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize));
    Router::new()
        .route("/health", get(health))
        .route("/", get(dashboard::root))
        .route("/dashboard/", get(dashboard::index))
        .route("/dashboard/app.js", get(dashboard::app_js))
        .route("/dashboard/app.css", get(dashboard::app_css))
        .route("/dashboard/uplot.js", get(dashboard::uplot_js))
        .route("/dashboard/uplot.css", get(dashboard::uplot_css))
        .merge(authed)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(dashboard::secure_headers))
        .with_state(state)
}

async fn authorize(
    State(state): AppState,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        Some(t) if constant_time_eq(t.as_bytes(), state.token.as_bytes()) => {
            Ok(next.run(request).await)
        }
        Some(_) => Err(ApiError::unauthorized("invalid bearer token")),
        None => {
            Err(ApiError::unauthorized("missing bearer token: send Authorization: Bearer <token>"))
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn not_found() -> ApiError {
    ApiError::not_found_message(
        "unknown_endpoint",
        "no such endpoint; see GET /v1/plans, /v1/databases",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::method_not_allowed()
}

async fn health() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

async fn metrics(State(state): AppState) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.platform.metrics.render())
}

/// Parses a JSON body, answering 400 with the reason.
fn body<T: DeserializeOwned>(bytes: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request("invalid_body", format!("invalid JSON body: {e}")))
}

fn load(platform: &Platform, id: &str) -> Result<DatabaseRecord, ApiError> {
    platform.store.database(id)?.ok_or_else(|| ApiError::not_found("database", id))
}

fn require_running(db: &DatabaseRecord) -> Result<(), ApiError> {
    if db.status == DatabaseStatus::Running {
        Ok(())
    } else {
        Err(ApiError::conflict(
            "database_not_running",
            format!("database {} is {:?}, not running", db.id, db.status).to_lowercase(),
        ))
    }
}
