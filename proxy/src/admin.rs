//! Admin HTTP API: health, load-balancer check, metrics, and the routing table.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use pgwarden_api::{ApiError, ProxyHealth, ProxyRole, RoutingDelta, RoutingTable};
use serde_json::json;
use tracing::info;

use crate::metrics::RouteUpdate;
use crate::routes::RouteError;
use crate::Shared;

/// How long `PUT /v1/routes` waits for sessions already starting on a database put on hold.
const HOLD_SETTLE: std::time::Duration = std::time::Duration::from_secs(2);

/// The largest routing table the admin API takes: a route the control plane publishes is
/// about 350 bytes, so 10 000 databases make 3.4 MiB (axum's default bound is 2 MiB).
const MAX_TABLE_BYTES: usize = 64 << 20;

pub fn router(shared: Arc<Shared>) -> Router {
    let routes = get(get_routes).put(put_routes).patch(patch_routes);
    Router::new()
        .route("/health", get(health))
        .route("/active", get(active))
        .route("/metrics", get(metrics))
        .route("/v1/routes", routes.layer(axum::extract::DefaultBodyLimit::max(MAX_TABLE_BYTES)))
        .with_state(shared)
}

/// An admin API failure: status plus `{"error": {"code", "message"}}`.
struct AdminError {
    status: StatusCode,
    body: ApiError,
}

impl AdminError {
    fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self { status, body: ApiError::new(code, message) }
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

/// `epoch`: the newest table whose holds are in effect.
async fn health(State(shared): State<Arc<Shared>>) -> Json<ProxyHealth> {
    Json(ProxyHealth { role: shared.role.get(), epoch: shared.routes.settled() })
}

/// 200 on the proxy that serves clients, 503 on the standby (a load balancer's health check).
async fn active(State(shared): State<Arc<Shared>>) -> (StatusCode, Json<serde_json::Value>) {
    let role = shared.role.get();
    let status =
        if role == ProxyRole::Active { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(json!({ "role": role })))
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], shared.metrics.render())
}

async fn get_routes(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
) -> Result<Json<RoutingTable>, AdminError> {
    authorize(&shared, &headers)?;
    // Verifiers never leave the proxy: the users are listed, their verifiers hidden.
    let mut table = shared.routes.load().table();
    for route in table.databases.values_mut() {
        route.users = route.users.as_ref().map(|users| users.hidden());
    }
    Ok(Json(table))
}

async fn put_routes(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, AdminError> {
    let table: RoutingTable = parse(&shared, &headers, &body)?;
    answer(apply(&shared, Change::Table(table)).await)
}

/// A change since an epoch the proxy holds (`RoutingDelta`); `409 base_epoch_mismatch` when it
/// holds another, and the control plane sends the whole table.
async fn patch_routes(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, AdminError> {
    let delta: RoutingDelta = parse(&shared, &headers, &body)?;
    answer(apply(&shared, Change::Delta(delta)).await)
}

/// The body of an authorized change of the table.
fn parse<T: serde::de::DeserializeOwned>(
    shared: &Shared,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<T, AdminError> {
    if let Err(e) = authorize(shared, headers) {
        shared.metrics.route_update(RouteUpdate::Unauthorized);
        return Err(e);
    }
    serde_json::from_slice(body).map_err(|e| {
        shared.metrics.route_update(RouteUpdate::Invalid);
        AdminError::new(
            StatusCode::BAD_REQUEST,
            "invalid_routing_table",
            format!("invalid routing table: {e}"),
        )
    })
}

fn answer(applied: Result<u64, RouteError>) -> Result<Json<serde_json::Value>, AdminError> {
    match applied {
        Ok(epoch) => Ok(Json(json!({"epoch": epoch}))),
        Err(e @ RouteError::Invalid(_)) => {
            Err(AdminError::new(StatusCode::BAD_REQUEST, "invalid_routing_table", e.to_string()))
        }
        Err(e @ RouteError::StaleEpoch { .. }) => {
            Err(AdminError::new(StatusCode::CONFLICT, "stale_epoch", e.to_string()))
        }
        Err(e @ RouteError::NotBase { .. }) => {
            Err(AdminError::new(StatusCode::CONFLICT, "base_epoch_mismatch", e.to_string()))
        }
    }
}

/// A whole table, or what changed since the current one.
pub(crate) enum Change {
    Table(RoutingTable),
    Delta(RoutingDelta),
}

/// Makes `change` current (pushed, or read from etcd) and returns once its holds are in effect:
/// no session is still on its way to a held database's old primary (at most `HOLD_SETTLE`).
pub(crate) async fn apply(shared: &Shared, change: Change) -> Result<u64, RouteError> {
    let databases = match &change {
        Change::Table(table) => &table.databases,
        Change::Delta(delta) => &delta.set,
    };
    let held: Vec<String> =
        databases.iter().filter(|(_, r)| r.hold).map(|(name, _)| name.clone()).collect();
    let applied = match change {
        Change::Table(table) => shared.routes.replace(table),
        Change::Delta(delta) => shared.routes.patch(delta),
    };
    match applied {
        Ok(epoch) => {
            shared.metrics.route_update(RouteUpdate::Applied);
            shared.metrics.epoch.set(epoch as i64);
            shared.metrics.fenced.set(0);
            info!(epoch, "routing table replaced");
            for database in held {
                if !shared.routes.wait_started(&database, HOLD_SETTLE).await {
                    tracing::warn!(%database, "sessions still starting when the hold was applied");
                }
            }
            shared.routes.mark_settled(epoch);
            Ok(epoch)
        }
        Err(e) => {
            let outcome = match e {
                RouteError::Invalid(_) => RouteUpdate::Invalid,
                RouteError::StaleEpoch { .. } | RouteError::NotBase { .. } => RouteUpdate::Stale,
            };
            shared.metrics.route_update(outcome);
            Err(e)
        }
    }
}

fn authorize(shared: &Shared, headers: &HeaderMap) -> Result<(), AdminError> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        Some(token) if constant_time_eq(token.as_bytes(), shared.admin_token.as_bytes()) => Ok(()),
        Some(_) => {
            Err(AdminError::new(StatusCode::UNAUTHORIZED, "unauthorized", "invalid bearer token"))
        }
        None => Err(AdminError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing bearer token: send Authorization: Bearer <admin token>",
        )),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
