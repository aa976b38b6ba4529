//! Users of a database (SPEC §5). The SQL runs on the primary with bounded time and no lock
//! held: a primary that does not answer gives 503 naming it, and cannot delay a failover.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use pgwarden_api::control::{CreateUser, User, UserWithPassword};

use super::error::ApiError;
use super::{body, load, require_running, AppState};
use crate::nodes::sql::{Session, SqlError};
use crate::nodes::{roles, NodeSpec};
use crate::platform::Platform;
use crate::routing::refresh as verifiers;
use crate::secrets;
use crate::state::{DatabaseRecord, UserRecord};

/// SQLSTATE of `CREATE ROLE` for a role that exists.
const DUPLICATE_OBJECT: &str = "42710";

fn user_view(u: &UserRecord) -> User {
    User { name: u.name.clone(), read_only: u.read_only, default: u.default }
}

pub async fn list(
    State(state): AppState,
    Path(id): Path<String>,
) -> Result<Json<Vec<User>>, ApiError> {
    let db = load(&state.platform, &id).await?;
    Ok(Json(db.users.iter().map(user_view).collect()))
}

/// A session on the primary's `database` (bounded).
async fn primary_session(
    platform: &Platform,
    db: &DatabaseRecord,
    database: &str,
) -> Result<Session, ApiError> {
    let primary = db
        .primary()
        .ok_or_else(|| ApiError::unavailable(format!("database {} has no primary", db.id)))?;
    Ok(platform.nodes.session(&NodeSpec::of(primary), database).await?)
}

/// Database `id` and its user `name`.
async fn load_user(
    platform: &Platform,
    id: &str,
    name: &str,
) -> Result<(DatabaseRecord, UserRecord), ApiError> {
    let db = load(platform, id).await?;
    let user = db.users.iter().find(|u| u.name == name).cloned();
    let user = user.ok_or_else(|| ApiError::not_found("user", name))?;
    Ok((db, user))
}

fn duplicate(name: &str) -> ApiError {
    ApiError::conflict("duplicate_user", format!("user {name:?} already exists"))
}

pub async fn create(
    State(state): AppState,
    Path(id): Path<String>,
    bytes: Bytes,
) -> Result<(StatusCode, Json<UserWithPassword>), ApiError> {
    let request: CreateUser = body(&bytes)?;
    let platform = &state.platform;
    if !roles::valid_user_name(&request.name) {
        return Err(ApiError::bad_request(
            "invalid_name",
            format!("invalid user name {:?}: use lower-case letters, digits and _, starting with a letter", request.name),
        ));
    }
    let db = load(platform, &id).await?;
    require_running(&db)?;
    if db.users.iter().any(|u| u.name == request.name) {
        return Err(duplicate(&request.name));
    }
    let password = secrets::generate_password();
    let admin = primary_session(platform, &db, &db.name).await?;
    match roles::create_role(&admin, &request.name, &password, "").await {
        // The role is on the node but not in the record: an earlier create whose grants did not
        // finish (the node stopped answering). Only pgwarden creates roles, so it is taken over
        // with the new password, and the grants run again.
        Err(SqlError::Query { source, .. })
            if source.code().is_some_and(|c| c.code() == DUPLICATE_OBJECT) =>
        {
            roles::set_password(&admin, &request.name, &password).await?;
        }
        other => other?,
    }
    roles::grant(&admin, &request.name, &db.name, &db.name, request.read_only).await?;
    let user =
        UserRecord { name: request.name.clone(), read_only: request.read_only, default: false };
    platform
        .records
        .update(&id, |db| {
            if !db.users.iter().any(|u| u.name == user.name) {
                db.users.push(user.clone());
            }
            Ok::<_, ApiError>(())
        })
        .await?
        .ok_or_else(|| ApiError::not_found("database", &id))?;
    verifiers::publish_now(&platform.records, &platform.nodes, &platform.routing, &id).await;
    let access = if request.read_only { "read-only" } else { "read-write" };
    platform
        .records
        .event(&id, "user_created", format!("{access} user {} created", request.name))
        .await;
    let database_url = platform.routing.url(&request.name, &password, &db.name);
    Ok((
        StatusCode::CREATED,
        Json(UserWithPassword { user: user_view(&user), password, database_url }),
    ))
}

pub async fn delete(
    State(state): AppState,
    Path((id, name)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let platform = &state.platform;
    let (db, user) = load_user(platform, &id, &name).await?;
    if user.default {
        return Err(ApiError::conflict(
            "default_user",
            format!("{name} is the database's default user and cannot be deleted"),
        ));
    }
    require_running(&db)?;
    let admin = primary_session(platform, &db, &db.name).await?;
    roles::drop_user(&admin, &name, &db.name).await?;
    platform
        .records
        .update(&id, |db| {
            db.users.retain(|u| u.name != name);
            Ok::<_, ApiError>(())
        })
        .await?;
    verifiers::publish_now(&platform.records, &platform.nodes, &platform.routing, &id).await;
    platform.records.event(&id, "user_deleted", format!("user {name} deleted")).await;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn reset_password(
    State(state): AppState,
    Path((id, name)): Path<(String, String)>,
) -> Result<Json<UserWithPassword>, ApiError> {
    let platform = &state.platform;
    let (db, user) = load_user(platform, &id, &name).await?;
    require_running(&db)?;
    let password = secrets::generate_password();
    let admin = primary_session(platform, &db, &db.name).await?;
    roles::set_password(&admin, &name, &password).await?;
    if user.default {
        platform
            .records
            .update(&id, |db| {
                db.password = password.clone();
                Ok::<_, ApiError>(())
            })
            .await?;
    }
    verifiers::publish_now(&platform.records, &platform.nodes, &platform.routing, &id).await;
    platform.records.event(&id, "password_reset", format!("password of {name} reset")).await;
    let database_url = platform.routing.url(&name, &password, &db.name);
    Ok(Json(UserWithPassword { user: user_view(&user), password, database_url }))
}
