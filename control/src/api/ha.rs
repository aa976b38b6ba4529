//! Forced failover and planned switchover, as operations.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use pgwarden_api::control::DatabaseOperation;

use super::error::ApiError;
use super::view::view;
use super::{body, load, require_running, AppState};
use crate::ha;

pub async fn failover(
    State(state): AppState,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<DatabaseOperation>), ApiError> {
    let platform = &state.platform;
    let db = load(platform, &id).await?;
    require_running(&db)?;
    if db.replicas().next().is_none() {
        return Err(ApiError::conflict(
            "no_standby",
            format!("database {id} has no standby to promote"),
        ));
    }
    let database = view(platform, &db).await;
    let p = platform.clone();
    let database_id = id.clone();
    let operation = platform
        .operations
        .spawn("failover", &database_id, move |_| async move {
            ha::failover::forced_failover(&p.ha(), &id).await.map(drop)
        })
        .await?;
    Ok((StatusCode::ACCEPTED, Json(DatabaseOperation { database, operation })))
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SwitchoverRequest {
    target: Option<String>,
}

pub async fn switchover(
    State(state): AppState,
    Path(id): Path<String>,
    bytes: Bytes,
) -> Result<(StatusCode, Json<DatabaseOperation>), ApiError> {
    let request: SwitchoverRequest =
        if bytes.is_empty() { SwitchoverRequest::default() } else { body(&bytes)? };
    let platform = &state.platform;
    let db = load(platform, &id).await?;
    require_running(&db)?;
    match &request.target {
        Some(t) if !db.replicas().any(|r| &r.name == t) => {
            return Err(ApiError::unprocessable(
                "unknown_target",
                format!(
                    "{t:?} is not a standby of {id}; standbys: {}",
                    db.replicas().map(|r| r.name.as_str()).collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        None if db.replicas().next().is_none() => {
            return Err(ApiError::conflict(
                "no_standby",
                format!("database {id} has no standby to switch to"),
            ));
        }
        _ => {}
    }
    let claim = platform.claims.try_planned(&id).ok_or_else(|| {
        ApiError::conflict(
            "primary_change_in_progress",
            format!("a primary change of {id} is already in progress; try again when it ends"),
        )
    })?;
    let database = view(platform, &db).await;
    let p = platform.clone();
    let database_id = id.clone();
    let operation = platform
        .operations
        .spawn("switchover", &database_id, move |_| async move {
            ha::switchover::switchover(
                &p.records,
                &p.nodes,
                &p.routing,
                &claim,
                &id,
                request.target.as_deref(),
            )
            .await
            .map(drop)
        })
        .await?;
    Ok((StatusCode::ACCEPTED, Json(DatabaseOperation { database, operation })))
}
