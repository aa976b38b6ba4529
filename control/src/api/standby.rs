//! The API of a control plane on standby (`serve --etcd` while another leads): every call is
//! answered 503 with the leader's address, so that a client or a load balancer (which
//! checks `/health`) goes to the leader instead.

use axum::extract::State;
use axum::http::StatusCode;
use axum::{middleware, Json, Router};
use serde_json::json;

use super::error::ApiError;
use crate::coord::Etcd;

pub fn router(etcd: Etcd) -> Router {
    Router::new()
        .route("/health", axum::routing::get(health))
        .fallback(refuse)
        .layer(middleware::from_fn(super::dashboard::secure_headers))
        .with_state(etcd)
}

async fn leader(etcd: &Etcd) -> String {
    match etcd.leader().await {
        Ok(Some(leader)) => format!("the leader is at {leader}"),
        Ok(None) => "no control plane leads yet (an election is under way)".into(),
        Err(e) => format!("etcd cannot say which leads ({e})"),
    }
}

async fn health(State(etcd): State<Etcd>) -> (StatusCode, Json<serde_json::Value>) {
    let leader = etcd.leader().await.ok().flatten();
    (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "standby", "leader": leader})))
}

async fn refuse(State(etcd): State<Etcd>) -> ApiError {
    ApiError::standby(format!(
        "this control plane is on standby; {}: send the request there",
        leader(&etcd).await
    ))
}
