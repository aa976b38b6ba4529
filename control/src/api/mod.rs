//! The control HTTP API (SPEC §4): the router and its bearer-token check here, one file per
//! resource (`databases.rs`, `users.rs`, `ha.rs`, `backups.rs`, `pitr.rs`, `operations.rs`),
//! the database view with the nodes' live state (`view.rs`), and the error type (`error.rs`).
//!
//! Handlers validate, record, and either answer at once or start an operation (202); they
//! never hold a lock across a call to a node, and every node call is bounded.

mod backups;
mod dashboard;
mod databases;
mod doc;
pub mod error;
mod ha;
mod operations;
mod pitr;
pub mod standby;
mod users;
mod view;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::header;
use axum::http::Method;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, patch, post, put, MethodRouter};
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

/// One route: where, what, who may call it, and what it takes and answers (for the OpenAPI
/// document, `doc.rs`). The router and the document are both built from [`routes`].
pub struct Route {
    pub method: Method,
    pub path: &'static str,
    pub summary: &'static str,
    /// Served without the bearer token (the dashboard's files, health): they hold no data.
    pub public: bool,
    pub request: Body,
    pub response: (u16, Body),
    handler: MethodRouter<Arc<ApiState>>,
}

/// A request or response body, as the document describes it.
#[derive(Clone, Copy, Debug)]
pub enum Body {
    None,
    /// JSON of the named schema (a type of `pgwarden_api`).
    Schema(&'static str),
    ArrayOf(&'static str),
    /// JSON not described by a schema.
    Json,
    /// Bytes of this media type.
    Bytes(&'static str),
}

/// Every route of the control plane.
pub fn routes() -> Vec<Route> {
    use Body::{ArrayOf, Bytes as Raw, Json as AnyJson, Schema};
    let route =
        |method: Method, path, summary, request, response, handler: MethodRouter<Arc<ApiState>>| {
            Route { method, path, summary, public: false, request, response, handler }
        };
    let public = |path, summary, media, handler| Route {
        public: true,
        ..route(Method::GET, path, summary, Body::None, (200, Raw(media)), handler)
    };
    let (get_, post_, put_, patch_, delete_) =
        (Method::GET, Method::POST, Method::PUT, Method::PATCH, Method::DELETE);
    let op = Schema("DatabaseOperation");
    vec![
        Route {
            public: true,
            ..route(get_.clone(), "/health", "Liveness", Body::None, (200, AnyJson), get(health))
        },
        public("/", "Redirects to the dashboard", "text/html", get(dashboard::root)),
        public("/dashboard/", "The dashboard's page", "text/html", get(dashboard::index)),
        public(
            "/dashboard/app.js",
            "The dashboard's script",
            "text/javascript",
            get(dashboard::app_js),
        ),
        public("/dashboard/app.css", "The dashboard's styles", "text/css", get(dashboard::app_css)),
        public(
            "/dashboard/uplot.js",
            "uPlot (charts)",
            "text/javascript",
            get(dashboard::uplot_js),
        ),
        public("/dashboard/uplot.css", "uPlot's styles", "text/css", get(dashboard::uplot_css)),
        public("/v1/openapi.json", "This document", "application/json", get(doc::serve)),
        route(
            get_.clone(),
            "/metrics",
            "Prometheus metrics",
            Body::None,
            (200, Raw("text/plain")),
            get(metrics),
        ),
        route(
            get_.clone(),
            "/v1/plans",
            "The plans",
            Body::None,
            (200, ArrayOf("Plan")),
            get(databases::list_plans),
        ),
        route(
            get_.clone(),
            "/v1/engines",
            "The PostgreSQL builds installed",
            Body::None,
            (200, ArrayOf("Engine")),
            get(databases::engines),
        ),
        route(
            get_.clone(),
            "/v1/databases",
            "The databases",
            Body::None,
            (200, ArrayOf("Database")),
            get(databases::list),
        ),
        route(
            post_.clone(),
            "/v1/databases",
            "Provision a database",
            Schema("CreateDatabase"),
            (202, op),
            post(databases::create),
        ),
        route(
            get_.clone(),
            "/v1/databases/{id}",
            "One database",
            Body::None,
            (200, Schema("Database")),
            get(databases::show),
        ),
        route(
            delete_.clone(),
            "/v1/databases/{id}",
            "Destroy a database",
            Body::None,
            (202, op),
            delete(databases::destroy),
        ),
        route(
            patch_,
            "/v1/databases/{id}",
            "Change the plan",
            Schema("ChangeDatabase"),
            (202, op),
            patch(databases::change),
        ),
        route(
            get_.clone(),
            "/v1/databases/{id}/env",
            "The environment for the application",
            Body::None,
            (200, Schema("Env")),
            get(databases::env),
        ),
        route(
            post_.clone(),
            "/v1/databases/{id}/engine-upgrade",
            "Upgrade the engine",
            Schema("EngineUpgrade"),
            (202, op),
            post(databases::upgrade_engine),
        ),
        route(
            put_.clone(),
            "/v1/databases/{id}/tls",
            "Require TLS or not",
            Schema("SetTls"),
            (200, Schema("Database")),
            put(databases::set_tls),
        ),
        route(
            put_.clone(),
            "/v1/databases/{id}/limits",
            "Set the proxies' limits (clients at once, new connections per second)",
            Schema("SetLimits"),
            (200, Schema("Database")),
            put(databases::set_limits),
        ),
        route(
            get_.clone(),
            "/v1/databases/{id}/events",
            "The database's history",
            Body::None,
            (200, ArrayOf("Event")),
            get(databases::events),
        ),
        route(
            get_.clone(),
            "/v1/databases/{id}/stats",
            "The latest stats",
            Body::None,
            (200, Schema("Stats")),
            get(databases::stats),
        ),
        route(
            get_.clone(),
            "/v1/databases/{id}/stats/history",
            "Stats over time (query: since, until, step)",
            Body::None,
            (200, Schema("StatsHistory")),
            get(databases::stats_history),
        ),
        route(
            get_.clone(),
            "/v1/databases/{id}/users",
            "The users",
            Body::None,
            (200, ArrayOf("User")),
            get(users::list),
        ),
        route(
            post_.clone(),
            "/v1/databases/{id}/users",
            "Create a user",
            Schema("CreateUser"),
            (201, Schema("UserWithPassword")),
            post(users::create),
        ),
        route(
            delete_.clone(),
            "/v1/databases/{id}/users/{name}",
            "Delete a user",
            Body::None,
            (204, Body::None),
            delete(users::delete),
        ),
        route(
            post_.clone(),
            "/v1/databases/{id}/users/{name}/reset-password",
            "A new password",
            Body::None,
            (200, Schema("UserWithPassword")),
            post(users::reset_password),
        ),
        route(
            post_.clone(),
            "/v1/databases/{id}/failover",
            "Promote the standby now",
            Body::None,
            (202, op),
            post(ha::failover),
        ),
        route(
            post_.clone(),
            "/v1/databases/{id}/switchover",
            "Planned primary change (body: {\"target\"} optional)",
            AnyJson,
            (202, op),
            post(ha::switchover),
        ),
        route(
            get_.clone(),
            "/v1/databases/{id}/backups",
            "The backups",
            Body::None,
            (200, ArrayOf("Backup")),
            get(backups::list),
        ),
        route(
            post_.clone(),
            "/v1/databases/{id}/backups",
            "Back up now",
            Body::None,
            (202, Schema("BackupOperation")),
            post(backups::create),
        ),
        route(
            delete_,
            "/v1/databases/{id}/backups/{backup}",
            "Delete a backup",
            Body::None,
            (204, Body::None),
            delete(backups::delete),
        ),
        route(
            get_.clone(),
            "/v1/databases/{id}/backups/{backup}/download",
            "The backup's archive (pg_dump custom format)",
            Body::None,
            (200, Raw("application/octet-stream")),
            get(backups::download),
        ),
        route(
            put_,
            "/v1/databases/{id}/backup-schedule",
            "The daily backup hour (body: {\"hour_utc\"})",
            AnyJson,
            (200, AnyJson),
            put(backups::set_schedule),
        ),
        route(
            get_.clone(),
            "/v1/databases/{id}/pitr",
            "The point-in-time recovery window",
            Body::None,
            (200, Schema("PitrWindow")),
            get(pitr::window),
        ),
        route(
            post_,
            "/v1/databases/{id}/restore",
            "Restore to a time (body: {\"target_time\"})",
            AnyJson,
            (202, op),
            post(pitr::restore),
        ),
        route(
            get_,
            "/v1/operations/{id}",
            "An operation's progress",
            Body::None,
            (200, Schema("Operation")),
            get(operations::show),
        ),
    ]
}

pub fn router(state: Arc<ApiState>) -> Router {
    let (mut authed, mut public) = (Router::new(), Router::new());
    for route in routes() {
        if route.public {
            public = public.route(route.path, route.handler);
        } else {
            authed = authed.route(route.path, route.handler);
        }
    }
    let authed = authed.route_layer(middleware::from_fn_with_state(state.clone(), authorize));
    public
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

/// 200 while this control plane may act; 503 once its lease ran out unrenewed (it was frozen
/// or cut off from etcd), before it notices and stops: a load balancer in front of the planes
/// must not send it anything.
async fn health(State(state): AppState) -> Result<Json<serde_json::Value>, ApiError> {
    if !state.platform.nodes.leads() {
        return Err(ApiError::standby(crate::coord::NOT_LEADING));
    }
    Ok(Json(json!({"status": "ok"})))
}

async fn metrics(State(state): AppState) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.platform.metrics.render())
}

/// Parses a JSON body, answering 400 with the reason.
fn body<T: DeserializeOwned>(bytes: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request("invalid_body", format!("invalid JSON body: {e}")))
}

async fn load(platform: &Platform, id: &str) -> Result<DatabaseRecord, ApiError> {
    platform.records.store.database(id).await?.ok_or_else(|| ApiError::not_found("database", id))
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
