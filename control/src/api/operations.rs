//! `GET /v1/operations/{id}`.

use axum::extract::{Path, State};
use axum::Json;
use pgwarden_api::control::Operation;

use super::error::ApiError;
use super::AppState;

pub async fn show(
    State(state): AppState,
    Path(id): Path<String>,
) -> Result<Json<Operation>, ApiError> {
    Ok(Json(
        state
            .platform
            .records
            .store
            .operation(&id)
            .await?
            .ok_or_else(|| ApiError::not_found("operation", &id))?,
    ))
}
