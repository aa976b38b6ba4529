//! The control HTTP API (SPEC §4): plans, databases, env, TLS, users, events, operations.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use pgwarden_api::control::{
    CreateDatabase, CreateUser, Database, DatabaseOperation, DatabaseStatus, Env, Event, Node,
    Operation, Plan, SetTls, TlsSettings, User, UserWithPassword,
};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::backups::{self, Backup, BackupKind, BackupStatus};
use crate::error::ApiError;
use crate::platform::{now_rfc3339, Platform};
use crate::provision;
use crate::records::{DatabaseRecord, UserRecord};
use crate::{plans, secrets, users};
use pgwarden_api::control::OperationStatus;

pub struct ApiState {
    pub platform: Arc<Platform>,
    pub token: String,
}

type AppState = State<Arc<ApiState>>;

pub fn router(state: Arc<ApiState>) -> Router {
    let authed = Router::new()
        .route("/metrics", get(metrics))
        .route("/v1/plans", get(list_plans))
        .route("/v1/databases", get(list_databases).post(create_database))
        .route("/v1/databases/{id}", get(show_database).delete(destroy_database))
        .route("/v1/databases/{id}/env", get(env))
        .route("/v1/databases/{id}/tls", put(set_tls))
        .route("/v1/databases/{id}/users", get(list_users).post(create_user))
        .route("/v1/databases/{id}/users/{name}", delete(delete_user))
        .route("/v1/databases/{id}/users/{name}/reset-password", post(reset_password))
        .route("/v1/databases/{id}/events", get(events))
        .route("/v1/databases/{id}/failover", post(failover))
        .route("/v1/databases/{id}/backups", get(list_backups).post(create_backup))
        .route("/v1/databases/{id}/backups/{backup}", delete(delete_backup))
        .route("/v1/databases/{id}/backups/{backup}/download", get(download_backup))
        .route("/v1/databases/{id}/backup-schedule", put(set_backup_schedule))
        .route("/v1/databases/{id}/pitr", get(pitr_window))
        .route("/v1/databases/{id}/restore", post(restore))
        .route("/v1/databases/{id}/switchover", post(switchover))
        .route("/v1/operations/{id}", get(operation))
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize));
    Router::new().route("/health", get(health)).merge(authed).fallback(not_found).with_state(state)
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
    ApiError::bad_request("unknown_endpoint", "no such endpoint; see GET /v1/plans, /v1/databases")
}

async fn health() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

async fn metrics(State(state): AppState) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.platform.metrics.render())
}

async fn list_plans() -> Json<Vec<Plan>> {
    Json(plans::catalogue())
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

/// The API view of a database, with the nodes' live state.
async fn view(platform: &Arc<Platform>, db: &DatabaseRecord) -> Database {
    let mut nodes = Vec::new();
    for node in &db.nodes {
        let spec = platform.node_spec(node);
        let driver = platform.driver.clone();
        let running =
            tokio::task::spawn_blocking(move || driver.is_running(&spec)).await.unwrap_or(false);
        nodes.push(Node {
            name: node.name.clone(),
            role: node.role,
            status: if node.fenced {
                "fenced"
            } else if running {
                "running"
            } else {
                "stopped"
            }
            .into(),
            host: node.host.clone(),
            port: node.port,
            lag_bytes: 0,
            version: String::new(),
        });
    }
    if let Some(primary) = db.primary() {
        let conninfo = platform.driver.admin_conninfo(&platform.node_spec(primary), "postgres");
        let sql = async {
            let admin = users::admin(&conninfo).await.ok()?;
            let version: String = admin.query_one("SHOW server_version", &[]).await.ok()?.get(0);
            let lags = admin
                .query(
                    "SELECT application_name, coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn), 0)::int8 FROM pg_stat_replication",
                    &[],
                )
                .await
                .ok()?;
            Some((version, lags))
        };
        if let Ok(Some((version, lags))) =
            tokio::time::timeout(std::time::Duration::from_secs(2), sql).await
        {
            for node in &mut nodes {
                node.version = version.clone();
                if let Some(row) = lags.iter().find(|r| r.get::<_, String>(0) == node.name) {
                    node.lag_bytes = row.get::<_, i64>(1).max(0) as u64;
                }
            }
        }
    }
    Database {
        id: db.id.clone(),
        name: db.name.clone(),
        plan: db.plan.clone(),
        status: db.status,
        database_url: platform.database_url(db),
        tls: TlsSettings { force: db.force_tls },
        epoch: platform.publisher.current().epoch,
        replication: match (db.nodes.len(), db.synchronous) {
            (1, _) => "none",
            (_, true) => "synchronous",
            (_, false) => "asynchronous",
        }
        .into(),
        nodes,
        created_at: db.created_at.clone(),
    }
}

fn valid_database_name(name: &str) -> bool {
    let ok_chars = name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    ok_chars
        && (2..=40).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && !name.contains("--")
}

async fn create_database(
    State(state): AppState,
    bytes: Bytes,
) -> Result<(StatusCode, Json<DatabaseOperation>), ApiError> {
    let request: CreateDatabase = body(&bytes)?;
    let platform = &state.platform;
    if !valid_database_name(&request.name) {
        return Err(ApiError::bad_request(
            "invalid_name",
            format!("invalid name {:?}: use 2 to 40 lower-case letters, digits and single hyphens, starting with a letter", request.name),
        ));
    }
    let plan = plans::find(&request.plan).ok_or_else(|| {
        ApiError::unprocessable(
            "unknown_plan",
            format!("unknown plan {:?}; valid plans: {}", request.plan, plans::names().join(", ")),
        )
    })?;
    let existing = platform.store.databases()?;
    if existing.iter().any(|d| d.id.rsplit_once('-').map(|(n, _)| n) == Some(request.name.as_str()))
    {
        return Err(ApiError::conflict(
            "duplicate_name",
            format!("a database named {:?} already exists", request.name),
        ));
    }
    let id = loop {
        let id = format!("{}-{}", request.name, rand::random_range(1000..10000));
        if !existing.iter().any(|d| d.id == id) {
            break id;
        }
    };
    let name = id.replace('-', "_");
    let db = DatabaseRecord {
        id: id.clone(),
        name: name.clone(),
        plan: plan.name,
        status: DatabaseStatus::Provisioning,
        force_tls: false,
        password: secrets::generate_password(),
        replication_password: secrets::generate_password(),
        nodes: Vec::new(),
        users: vec![UserRecord { name, read_only: false, default: true }],
        created_at: now_rfc3339(),
        error: None,
        synchronous: false,
        backup_hour_utc: 1,
    };
    platform.store.put_database(&db)?;
    let op = platform.new_operation("provision", &id)?;
    platform.event(&id, "provisioning", format!("provisioning {} on plan {}", id, db.plan));
    tokio::spawn(provision::run_provision(platform.clone(), id, op.clone()));
    let database = view(platform, &db).await;
    Ok((StatusCode::ACCEPTED, Json(DatabaseOperation { database, operation: op })))
}

async fn list_databases(State(state): AppState) -> Result<Json<Vec<Database>>, ApiError> {
    let mut out = Vec::new();
    for db in state.platform.store.databases()? {
        out.push(view(&state.platform, &db).await);
    }
    Ok(Json(out))
}

async fn show_database(
    State(state): AppState,
    Path(id): Path<String>,
) -> Result<Json<Database>, ApiError> {
    let db = load(&state.platform, &id)?;
    Ok(Json(view(&state.platform, &db).await))
}

async fn destroy_database(
    State(state): AppState,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<DatabaseOperation>), ApiError> {
    let platform = &state.platform;
    let db = load(platform, &id)?;
    if matches!(db.status, DatabaseStatus::Provisioning | DatabaseStatus::Deleting) {
        return Err(ApiError::conflict(
            "database_busy",
            format!("database {id} is {:?}; try again when it settles", db.status).to_lowercase(),
        ));
    }
    let op = platform.new_operation("destroy", &id)?;
    platform.event(&id, "deleting", "destroying nodes, routes and backups");
    tokio::spawn(provision::run_destroy(platform.clone(), id, op.clone()));
    let database = view(platform, &db).await;
    Ok((StatusCode::ACCEPTED, Json(DatabaseOperation { database, operation: op })))
}

async fn env(State(state): AppState, Path(id): Path<String>) -> Result<Json<Env>, ApiError> {
    let db = load(&state.platform, &id)?;
    let url = state.platform.database_url(&db);
    Ok(Json(Env { database_url: url.clone(), pgwarden_postgresql_url: url }))
}

async fn set_tls(
    State(state): AppState,
    Path(id): Path<String>,
    bytes: Bytes,
) -> Result<Json<Database>, ApiError> {
    let request: SetTls = body(&bytes)?;
    let platform = &state.platform;
    let lock = platform.lock(&id);
    let _guard = lock.lock().await;
    let mut db = load(platform, &id)?;
    require_running(&db)?;
    if db.force_tls != request.force {
        db.force_tls = request.force;
        platform.store.put_database(&db)?;
        let epoch = platform.publish_routes()?;
        let state = if request.force { "on" } else { "off" };
        platform.event(&id, "tls_changed", format!("force TLS {state} (routing epoch {epoch})"));
    }
    Ok(Json(view(platform, &db).await))
}

fn user_view(u: &UserRecord) -> User {
    User { name: u.name.clone(), read_only: u.read_only, default: u.default }
}

async fn list_users(
    State(state): AppState,
    Path(id): Path<String>,
) -> Result<Json<Vec<User>>, ApiError> {
    let db = load(&state.platform, &id)?;
    Ok(Json(db.users.iter().map(user_view).collect()))
}

async fn primary_admin(
    platform: &Platform,
    db: &DatabaseRecord,
) -> Result<tokio_postgres::Client, ApiError> {
    let primary = db
        .primary()
        .ok_or_else(|| ApiError::conflict("no_primary", "the database has no primary"))?;
    let conninfo = platform.driver.admin_conninfo(&platform.node_spec(primary), &db.name);
    Ok(users::admin(&conninfo).await?)
}

async fn create_user(
    State(state): AppState,
    Path(id): Path<String>,
    bytes: Bytes,
) -> Result<(StatusCode, Json<UserWithPassword>), ApiError> {
    let request: CreateUser = body(&bytes)?;
    let platform = &state.platform;
    if !users::valid_user_name(&request.name) {
        return Err(ApiError::bad_request(
            "invalid_name",
            format!("invalid user name {:?}: use lower-case letters, digits and _, starting with a letter", request.name),
        ));
    }
    let lock = platform.lock(&id);
    let _guard = lock.lock().await;
    let mut db = load(platform, &id)?;
    require_running(&db)?;
    if db.users.iter().any(|u| u.name == request.name) {
        return Err(ApiError::conflict(
            "duplicate_user",
            format!("user {:?} already exists", request.name),
        ));
    }
    let password = secrets::generate_password();
    let admin = primary_admin(platform, &db).await?;
    users::create_role(&admin, &request.name, &password, "").await?;
    users::grant(&admin, &request.name, &db.name, &db.name, request.read_only).await?;
    let user =
        UserRecord { name: request.name.clone(), read_only: request.read_only, default: false };
    db.users.push(user.clone());
    platform.store.put_database(&db)?;
    let access = if request.read_only { "read-only" } else { "read-write" };
    platform.event(&id, "user_created", format!("{access} user {} created", request.name));
    let database_url = platform.url(&request.name, &password, &db.name);
    Ok((
        StatusCode::CREATED,
        Json(UserWithPassword { user: user_view(&user), password, database_url }),
    ))
}

async fn delete_user(
    State(state): AppState,
    Path((id, name)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let platform = &state.platform;
    let lock = platform.lock(&id);
    let _guard = lock.lock().await;
    let mut db = load(platform, &id)?;
    let user = db
        .users
        .iter()
        .find(|u| u.name == name)
        .ok_or_else(|| ApiError::not_found("user", &name))?;
    if user.default {
        return Err(ApiError::conflict(
            "default_user",
            format!("{name} is the database's default user and cannot be deleted"),
        ));
    }
    require_running(&db)?;
    let admin = primary_admin(platform, &db).await?;
    users::drop_user(&admin, &name, &db.name).await?;
    db.users.retain(|u| u.name != name);
    platform.store.put_database(&db)?;
    platform.event(&id, "user_deleted", format!("user {name} deleted"));
    Ok(StatusCode::NO_CONTENT)
}

async fn reset_password(
    State(state): AppState,
    Path((id, name)): Path<(String, String)>,
) -> Result<Json<UserWithPassword>, ApiError> {
    let platform = &state.platform;
    let lock = platform.lock(&id);
    let _guard = lock.lock().await;
    let mut db = load(platform, &id)?;
    let user = db
        .users
        .iter()
        .find(|u| u.name == name)
        .cloned()
        .ok_or_else(|| ApiError::not_found("user", &name))?;
    require_running(&db)?;
    let password = secrets::generate_password();
    let admin = primary_admin(platform, &db).await?;
    users::set_password(&admin, &name, &password).await?;
    if user.default {
        db.password = password.clone();
        platform.store.put_database(&db)?;
    }
    platform.event(&id, "password_reset", format!("password of {name} reset"));
    let database_url = platform.url(&name, &password, &db.name);
    Ok(Json(UserWithPassword { user: user_view(&user), password, database_url }))
}

async fn failover(
    State(state): AppState,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<DatabaseOperation>), ApiError> {
    let platform = &state.platform;
    let db = load(platform, &id)?;
    require_running(&db)?;
    if db.replicas().next().is_none() {
        return Err(ApiError::conflict(
            "no_standby",
            format!("database {id} has no standby to promote"),
        ));
    }
    let database = view(platform, &db).await;
    let task = {
        let platform = platform.clone();
        async move { crate::ha::forced_failover(&platform, &id).await.map(drop) }
    };
    let operation = spawn_operation(platform, "failover", &database.id, task)?;
    Ok((StatusCode::ACCEPTED, Json(DatabaseOperation { database, operation })))
}

/// Records an operation, runs `task` as it, and returns it (pending) for a 202 answer.
fn spawn_operation(
    platform: &Arc<Platform>,
    kind: &'static str,
    database_id: &str,
    task: impl std::future::Future<Output = Result<(), String>> + Send + 'static,
) -> Result<Operation, ApiError> {
    let mut op = platform.new_operation(kind, database_id)?;
    let answer = op.clone();
    let platform = platform.clone();
    tokio::spawn(async move {
        platform.update_operation(&mut op, OperationStatus::Running, 0.2);
        let result = task.await;
        platform.metrics.operation(kind, result.is_ok());
        match result {
            Ok(()) => platform.update_operation(&mut op, OperationStatus::Succeeded, 1.0),
            Err(e) => {
                op.error = Some(e);
                platform.update_operation(&mut op, OperationStatus::Failed, 0.2);
            }
        }
    });
    Ok(answer)
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SwitchoverRequest {
    target: Option<String>,
}

async fn switchover(
    State(state): AppState,
    Path(id): Path<String>,
    bytes: Bytes,
) -> Result<(StatusCode, Json<DatabaseOperation>), ApiError> {
    let request: SwitchoverRequest =
        if bytes.is_empty() { SwitchoverRequest::default() } else { body(&bytes)? };
    let platform = &state.platform;
    let db = load(platform, &id)?;
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
    let database = view(platform, &db).await;
    let task = {
        let platform = platform.clone();
        async move { crate::ha::switchover(&platform, &id, request.target.as_deref()).await.map(drop) }
    };
    let operation = spawn_operation(platform, "switchover", &database.id, task)?;
    Ok((StatusCode::ACCEPTED, Json(DatabaseOperation { database, operation })))
}

async fn list_backups(
    State(state): AppState,
    Path(id): Path<String>,
) -> Result<Json<Vec<Backup>>, ApiError> {
    load(&state.platform, &id)?;
    let mut backups = state.platform.store.backups(&id)?;
    backups.reverse();
    Ok(Json(backups))
}

async fn create_backup(
    State(state): AppState,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let platform = &state.platform;
    let lock = platform.lock(&id);
    let _guard = lock.lock().await;
    let db = load(platform, &id)?;
    require_running(&db)?;
    backups::check_manual_allowed(platform, &db)
        .map_err(|m| ApiError::conflict("backup_limit", m))?;
    let backup = backups::start(platform, &db, BackupKind::Manual).map_err(ApiError::internal)?;
    let mut op = platform.new_operation("backup", &id)?;
    platform.update_operation(&mut op, OperationStatus::Running, 0.1);
    let answer = json!({"backup": backup, "operation": op});
    let platform = platform.clone();
    tokio::spawn(async move {
        let done = backups::run(platform.clone(), backup).await;
        match done.status {
            BackupStatus::Succeeded => {
                platform.update_operation(&mut op, OperationStatus::Succeeded, 1.0)
            }
            _ => {
                op.error = done.error;
                platform.update_operation(&mut op, OperationStatus::Failed, 0.1);
            }
        }
    });
    Ok((StatusCode::ACCEPTED, Json(answer)))
}

fn load_backup(platform: &Platform, id: &str, backup: &str) -> Result<Backup, ApiError> {
    load(platform, id)?;
    platform.store.backup(id, backup)?.ok_or_else(|| ApiError::not_found("backup", backup))
}

async fn delete_backup(
    State(state): AppState,
    Path((id, backup)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let platform = &state.platform;
    let backup = load_backup(platform, &id, &backup)?;
    if backup.status == BackupStatus::Running {
        return Err(ApiError::conflict(
            "backup_running",
            format!("backup {} is still being taken", backup.id),
        ));
    }
    backups::delete(platform, &backup).map_err(ApiError::internal)?;
    platform.event(&id, "backup_deleted", format!("backup {} deleted", backup.id));
    Ok(StatusCode::NO_CONTENT)
}

/// Streams a backup after checking it against the sha256 recorded when it was taken.
async fn download_backup(
    State(state): AppState,
    Path((id, backup)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let platform = &state.platform;
    let backup = load_backup(platform, &id, &backup)?;
    if backup.status != BackupStatus::Succeeded {
        return Err(ApiError::conflict(
            "backup_not_ready",
            format!("backup {} is {:?}", backup.id, backup.status).to_lowercase(),
        ));
    }
    let path = platform.backups.fetch(&backup.key()).map_err(|e| {
        ApiError::conflict(
            "backup_missing",
            format!("the file of backup {} is missing from storage: {e}", backup.id),
        )
    })?;
    let check = path.clone();
    let actual = tokio::task::spawn_blocking(move || backups::sha256_file(&check))
        .await
        .map_err(ApiError::internal)??;
    if Some(&actual) != backup.sha256.as_ref() {
        platform.event(
            &id,
            "backup_damaged",
            format!("backup {} does not match its checksum; refused", backup.id),
        );
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

async fn set_backup_schedule(
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
    let lock = platform.lock(&id);
    let _guard = lock.lock().await;
    let mut db = load(platform, &id)?;
    db.backup_hour_utc = request.hour_utc;
    platform.store.put_database(&db)?;
    platform.event(
        &id,
        "backup_schedule",
        format!("daily backup at {:02}:00 UTC", request.hour_utc),
    );
    Ok(Json(json!({"hour_utc": request.hour_utc})))
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

async fn pitr_window(
    State(state): AppState,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let db = load(&state.platform, &id)?;
    let (earliest, latest) = crate::pitr::window(&state.platform, &db)
        .await
        .map_err(|m| ApiError::conflict("pitr_unavailable", m))?;
    Ok(Json(json!({"earliest": rfc3339(earliest), "latest": rfc3339(latest)})))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RestoreRequest {
    target_time: String,
}

async fn restore(
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
    let db = load(platform, &id)?;
    require_running(&db)?;
    crate::pitr::check_restorable(platform, &db, target)
        .await
        .map_err(|m| ApiError::unprocessable("not_restorable", m))?;
    let op = platform.new_operation("restore", &id)?;
    let database = view(platform, &db).await;
    tokio::spawn(crate::pitr::restore(platform.clone(), id, target, op.clone()));
    Ok((StatusCode::ACCEPTED, Json(DatabaseOperation { database, operation: op })))
}

async fn events(
    State(state): AppState,
    Path(id): Path<String>,
) -> Result<Json<Vec<Event>>, ApiError> {
    load(&state.platform, &id)?;
    Ok(Json(state.platform.store.events(&id)?))
}

async fn operation(
    State(state): AppState,
    Path(id): Path<String>,
) -> Result<Json<Operation>, ApiError> {
    Ok(Json(
        state
            .platform
            .store
            .operation(&id)?
            .ok_or_else(|| ApiError::not_found("operation", &id))?,
    ))
}
