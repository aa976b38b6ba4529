//! Point-in-time recovery: the recoverable window and restores (202).

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use pgwarden_api::control::{DatabaseOperation, PitrWindow};

use super::error::ApiError;
use super::view::view;
use super::{body, load, require_running, AppState};
use crate::failure::Failure;
use crate::nodes::NodeError;
use crate::pitr::{restore, PitrError};

/// Why PITR cannot serve now: a node that does not answer is a 503; the rest is `kind`.
fn refused(
    e: PitrError,
    kind: fn(&'static str, String) -> ApiError,
    code: &'static str,
) -> ApiError {
    match e {
        PitrError::Core(Failure::Node(NodeError::Sql(sql))) if sql.unreachable() => sql.into(),
        PitrError::Core(Failure::Store(store)) => store.into(),
        other => kind(code, other.to_string()),
    }
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

pub async fn window(
    State(state): AppState,
    Path(id): Path<String>,
) -> Result<Json<PitrWindow>, ApiError> {
    let db = load(&state.platform, &id).await?;
    let (earliest, latest) = restore::window(
        &state.platform.nodes,
        &state.platform.config.backup_dir,
        &state.heartbeats,
        &db,
    )
    .await
    .map_err(|e| refused(e, ApiError::conflict, "pitr_unavailable"))?;
    Ok(Json(PitrWindow { earliest: rfc3339(earliest), latest: rfc3339(latest) }))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RestoreRequest {
    target_time: String,
}

pub async fn restore(
    State(state): AppState,
    Path(id): Path<String>,
    bytes: Bytes,
) -> Result<(StatusCode, Json<DatabaseOperation>), ApiError> {
    let request: RestoreRequest = body(&bytes)?;
    let target = time::OffsetDateTime::parse(
        &request.target_time,
        &time::format_description::well_known::Rfc3339,
    )
    .map_err(|e| {
        ApiError::bad_request(
            "invalid_time",
            format!("target_time must be RFC 3339 (2026-01-31T12:00:00Z): {e}"),
        )
    })?;
    let platform = &state.platform;
    let db = load(platform, &id).await?;
    require_running(&db)?;
    restore::check_restorable(
        &platform.nodes,
        &platform.config.backup_dir,
        &state.heartbeats,
        &db,
        target,
    )
    .await
    .map_err(|e| refused(e, ApiError::unprocessable, "not_restorable"))?;
    let database = view(platform, &db).await;
    let (p, heartbeats) = (platform.clone(), state.heartbeats.clone());
    let database_id = id.clone();
    let operation = platform
        .operations
        .spawn("restore", &database_id, move |progress| async move {
            restore::restore(&p.pitr(), &heartbeats, &id, target, progress).await
        })
        .await?;
    Ok((StatusCode::ACCEPTED, Json(DatabaseOperation { database, operation })))
}
