//! Logical backups: list, take (202), delete, download (checked against its sha256), and the
//! daily schedule.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use pgwarden_api::control::{Backup, BackupKind, BackupOperation, BackupStatus};
use serde_json::json;

use super::error::ApiError;
use super::{body, load, require_running, AppState};
use crate::backups::{logical, BackupError};
use crate::failure::Reported;
use crate::platform::Platform;

pub async fn list(
    State(state): AppState,
    Path(id): Path<String>,
) -> Result<Json<Vec<Backup>>, ApiError> {
    load(&state.platform, &id).await?;
    let mut backups = state.platform.records.store.backups(&id).await?;
    backups.reverse();
    Ok(Json(backups))
}

pub async fn create(
    State(state): AppState,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<BackupOperation>), ApiError> {
    let platform = &state.platform;
    // Checking the plan's cap and recording the new backup are one step.
    let backup = {
        let _held = platform.records.lock(&id).await;
        let db = platform.records.store.database(&id).await?;
        let db = db.ok_or_else(|| ApiError::not_found("database", &id))?;
        require_running(&db)?;
        logical::check_manual_allowed(&platform.records, &db).await.map_err(|e| match e {
            BackupError::NoManualBackups(_) | BackupError::LimitReached { .. } => {
                ApiError::conflict("backup_limit", e.to_string())
            }
            other => ApiError::internal(other),
        })?;
        logical::start(&platform.records, &db, BackupKind::Manual)
            .await
            .map_err(ApiError::internal)?
    };
    let p = platform.clone();
    let taking = backup.clone();
    let operation = platform
        .operations
        .spawn("backup", &id, move |_| async move {
            let done = logical::run(&p.records, &p.nodes, &p.backups, taking).await;
            match done.status {
                BackupStatus::Succeeded => Ok(()),
                // The backup's record keeps what went wrong, as a sentence for the user.
                _ => Err(Reported {
                    code: "backup_failed",
                    sentence: done.error.unwrap_or_else(|| "the backup failed".into()),
                }),
            }
        })
        .await?;
    Ok((StatusCode::ACCEPTED, Json(BackupOperation { backup, operation })))
}

async fn load_backup(platform: &Platform, id: &str, backup: &str) -> Result<Backup, ApiError> {
    load(platform, id).await?;
    platform
        .records
        .store
        .backup(id, backup)
        .await?
        .ok_or_else(|| ApiError::not_found("backup", backup))
}

pub async fn delete(
    State(state): AppState,
    Path((id, backup)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let platform = &state.platform;
    let backup = load_backup(platform, &id, &backup).await?;
    if backup.status == BackupStatus::Running {
        return Err(ApiError::conflict(
            "backup_running",
            format!("backup {} is still being taken", backup.id),
        ));
    }
    logical::delete(&platform.records, &platform.backups, &backup)
        .await
        .map_err(ApiError::internal)?;
    platform.records.event(&id, "backup_deleted", format!("backup {} deleted", backup.id)).await;
    Ok(StatusCode::NO_CONTENT)
}

/// Streams a backup after checking it against the sha256 recorded when it was taken.
pub async fn download(
    State(state): AppState,
    Path((id, backup)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let platform = &state.platform;
    let backup = load_backup(platform, &id, &backup).await?;
    if backup.status != BackupStatus::Succeeded {
        return Err(ApiError::conflict(
            "backup_not_ready",
            format!("backup {} is {:?}", backup.id, backup.status).to_lowercase(),
        ));
    }
    let path = platform.backups.fetch(&logical::key(&backup)).map_err(|e| {
        ApiError::conflict(
            "backup_missing",
            format!("the file of backup {} is missing from storage: {e}", backup.id),
        )
    })?;
    let check = path.clone();
    let actual = tokio::task::spawn_blocking(move || logical::sha256_file(&check))
        .await
        .map_err(ApiError::internal)??;
    if Some(&actual) != backup.sha256.as_ref() {
        platform
            .records
            .event(
                &id,
                "backup_damaged",
                format!("backup {} does not match its checksum; refused", backup.id),
            )
            .await;
        return Err(ApiError::conflict(
            "backup_damaged",
            format!(
                "backup {} is damaged: its sha256 is {actual}, not the {} recorded when it was taken",
                backup.id,
                backup.sha256.as_deref().unwrap_or("?")
            ),
        ));
    }
    let file = tokio::fs::File::open(&path).await?;
    let length = file.metadata().await?.len();
    let body =
        axum::body::Body::from_stream(tokio_util::io::ReaderStream::with_capacity(file, 64 * 1024));
    let name = format!("attachment; filename=\"{}-{}.dump\"", id, backup.id);
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_LENGTH, length.to_string()),
            (header::CONTENT_DISPOSITION, name),
            (header::HeaderName::from_static("x-pgwarden-sha256"), actual),
        ],
        body,
    )
        .into_response())
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BackupSchedule {
    hour_utc: u8,
}

pub async fn set_schedule(
    State(state): AppState,
    Path(id): Path<String>,
    bytes: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let request: BackupSchedule = body(&bytes)?;
    if request.hour_utc > 23 {
        return Err(ApiError::bad_request(
            "invalid_hour",
            format!("hour_utc must be 0 to 23, not {}", request.hour_utc),
        ));
    }
    let platform = &state.platform;
    platform
        .records
        .update(&id, |db| {
            db.backup_hour_utc = request.hour_utc;
            Ok::<_, ApiError>(())
        })
        .await?
        .ok_or_else(|| ApiError::not_found("database", &id))?;
    platform
        .records
        .event(&id, "backup_schedule", format!("daily backup at {:02}:00 UTC", request.hour_utc))
        .await;
    Ok(Json(json!({"hour_utc": request.hour_utc})))
}
