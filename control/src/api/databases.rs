//! Plans and databases: create, list, show, destroy, env, TLS, events.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use pgwarden_api::control::{
    ChangeDatabase, CreateDatabase, Database, DatabaseOperation, DatabaseStatus, Engine,
    EngineUpgrade, Env, Event, Plan, SetLimits, SetTls,
};

use super::error::ApiError;
use super::view::{listed, view};
use super::{body, load, require_running, AppState};
use crate::changes::{major, plan, upgrade};
use crate::failure::Reportable;
use crate::platform::Platform;
use crate::state::access::now_rfc3339;
use crate::state::{DatabaseRecord, UserRecord};
use crate::{lifecycle, plans, secrets};

pub async fn list_plans() -> Json<Vec<Plan>> {
    Json(plans::catalogue())
}

fn valid_database_name(name: &str) -> bool {
    let ok_chars = name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    ok_chars
        && (2..=40).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && !name.contains("--")
}

/// The name part of an id (`my-app` of `my-app-3030`).
fn name_of(id: &str) -> Option<&str> {
    id.rsplit_once('-').map(|(n, _)| n)
}

pub async fn create(
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
    let engine = engine_for(platform, request.version.as_deref())?;
    let id = format!("{}-{}", request.name, rand::random_range(1000..10000));
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
        engine,
        upgrade: None,
        retired: Vec::new(),
        limits: Default::default(),
    };
    // The check and the insert are one step: of two creates with the same name, one wins.
    platform
        .records
        .insert_new(&db, |existing| {
            if existing.iter().any(|d| name_of(&d.id) == Some(request.name.as_str())) {
                return Err(ApiError::conflict(
                    "duplicate_name",
                    format!("a database named {:?} already exists", request.name),
                ));
            }
            if existing.iter().any(|d| d.id == id) {
                return Err(ApiError::conflict("duplicate_id", format!("{id} exists; try again")));
            }
            Ok(())
        })
        .await?;
    let op = platform.operations.new_operation("provision", &id).await?;
    platform
        .records
        .event(&id, "provisioning", format!("provisioning {} on plan {}", id, db.plan))
        .await;
    lifecycle::provision::run(&platform.lifecycle(), id, op.clone());
    let database = view(platform, &db).await;
    Ok((StatusCode::ACCEPTED, Json(DatabaseOperation { database, operation: op })))
}

/// The server build a new database runs: `version`, or the default; `None` when it is the
/// driver's own default build.
fn engine_for(
    platform: &Platform,
    version: Option<&str>,
) -> Result<Option<std::path::PathBuf>, ApiError> {
    let engines = &platform.nodes.engines;
    let default = engines.default_engine();
    let engine = match version {
        // The build `GET /v1/engines` says is the default (none found: the driver's own).
        None => match default {
            Some(engine) if engines.toolset(engine.major).is_some() => engine,
            _ => return Ok(None),
        },
        Some(v) => engines.find(v).ok_or_else(|| {
            ApiError::unprocessable(
                "unknown_version",
                format!("PostgreSQL {v} is not installed; installed: {}", engines.versions()),
            )
        })?,
    };
    // Dumps, base backups and rewinds need the client tools of the database's major.
    if engines.toolset(engine.major).is_none() {
        return Err(ApiError::unprocessable(
            "unsupported_version",
            format!(
                "PostgreSQL {} needs the client tools of major {}, and no full build of it is installed",
                engine.version, engine.major,
            ),
        ));
    }
    Ok((engine.bin != platform.nodes.pg_bin).then(|| engine.bin.clone()))
}

/// `GET /v1/engines`.
pub async fn engines(State(state): AppState) -> Json<Vec<Engine>> {
    let engines = &state.platform.nodes.engines;
    let default = engines.default_engine().map(|e| e.version.clone());
    Json(
        engines
            .all
            .iter()
            .map(|e| Engine {
                version: e.version.clone(),
                major: e.major,
                dir: e.bin.display().to_string(),
                default: Some(&e.version) == default.as_ref(),
            })
            .collect(),
    )
}

pub async fn list(State(state): AppState) -> Result<Json<Vec<Database>>, ApiError> {
    let mut out = Vec::new();
    for db in state.platform.records.store.databases().await? {
        out.push(listed(&state.platform, &db).await);
    }
    Ok(Json(out))
}

pub async fn show(
    State(state): AppState,
    Path(id): Path<String>,
) -> Result<Json<Database>, ApiError> {
    let db = load(&state.platform, &id).await?;
    Ok(Json(view(&state.platform, &db).await))
}

pub async fn destroy(
    State(state): AppState,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<DatabaseOperation>), ApiError> {
    let platform = &state.platform;
    let db = load(platform, &id).await?;
    if matches!(db.status, DatabaseStatus::Provisioning | DatabaseStatus::Deleting) {
        return Err(ApiError::conflict(
            "database_busy",
            format!("database {id} is {:?}; try again when it settles", db.status).to_lowercase(),
        ));
    }
    let op = platform.operations.new_operation("destroy", &id).await?;
    platform.records.event(&id, "deleting", "destroying nodes, routes and backups").await;
    lifecycle::destroy::run(&platform.lifecycle(), id, op.clone());
    let database = view(platform, &db).await;
    Ok((StatusCode::ACCEPTED, Json(DatabaseOperation { database, operation: op })))
}

/// `PATCH /v1/databases/{id}` `{"plan"}`: a plan change, as an operation (202).
pub async fn change(
    State(state): AppState,
    Path(id): Path<String>,
    bytes: Bytes,
) -> Result<(StatusCode, Json<DatabaseOperation>), ApiError> {
    let request: ChangeDatabase = body(&bytes)?;
    let platform = &state.platform;
    let db = load(platform, &id).await?;
    let plan = plan::check(&db, &request.plan).map_err(|e| match e {
        plan::Refusal::UnknownPlan(..) => ApiError::unprocessable("unknown_plan", e.to_string()),
        plan::Refusal::SamePlan(..) => ApiError::conflict("same_plan", e.to_string()),
    })?;
    let claim = claim_running(platform, &db)?;
    let database = view(platform, &db).await;
    let (p, database_id) = (platform.clone(), id.clone());
    let operation = platform
        .operations
        .spawn("plan_change", &database_id, move |progress| async move {
            plan::change(&p.records, &p.nodes, &p.routing, claim, &id, plan, progress).await
        })
        .await?;
    Ok((StatusCode::ACCEPTED, Json(DatabaseOperation { database, operation })))
}

/// `POST /v1/databases/{id}/engine-upgrade` `{"version", "hold_budget_ms"}`: a minor or major
/// upgrade, as an operation.
pub async fn upgrade_engine(
    State(state): AppState,
    Path(id): Path<String>,
    bytes: Bytes,
) -> Result<(StatusCode, Json<DatabaseOperation>), ApiError> {
    let request: EngineUpgrade = body(&bytes)?;
    let platform = &state.platform;
    let db = load(platform, &id).await?;
    let target = upgrade::check(&platform.nodes, &db, &request.version).map_err(|e| match e {
        upgrade::Refusal::Same(..) => ApiError::conflict("same_version", e.to_string()),
        upgrade::Refusal::Unknown(..) => ApiError::unprocessable("unknown_version", e.to_string()),
        upgrade::Refusal::Downgrade { .. } => ApiError::unprocessable("downgrade", e.to_string()),
        upgrade::Refusal::NoToolset(..) => {
            ApiError::unprocessable("unsupported_version", e.to_string())
        }
    })?;
    if let upgrade::Target::Major(_) = &target {
        require_running(&db)?;
        major::precheck(&platform.nodes, &db).await.map_err(|e| match e {
            major::Refusal::NotReplicable(..) => {
                ApiError::unprocessable("not_replicable", e.to_string())
            }
            major::Refusal::NotLogical(..) => ApiError::conflict("restart_needed", e.to_string()),
            major::Refusal::Change(e) => ApiError::unavailable(e.sentence()),
        })?;
    }
    let claim = claim_running(platform, &db)?;
    let database = view(platform, &db).await;
    let (p, database_id) = (platform.clone(), id.clone());
    let heartbeats = state.heartbeats.clone();
    let budget = request.hold_budget_ms.map_or(major::DEFAULT_HOLD_BUDGET, Duration::from_millis);
    let operation = platform
        .operations
        .spawn("engine_upgrade", &database_id, move |progress| async move {
            match target {
                upgrade::Target::Minor(engine) => {
                    upgrade::upgrade(&p.records, &p.nodes, &p.routing, claim, &id, engine, progress)
                        .await
                }
                upgrade::Target::Major(engine) => {
                    major::upgrade(&p.changes(), &heartbeats, claim, &id, engine, budget, progress)
                        .await
                }
            }
        })
        .await?;
    Ok((StatusCode::ACCEPTED, Json(DatabaseOperation { database, operation })))
}

/// The planned-change claim of a running database with every node in place.
fn claim_running(
    platform: &Platform,
    db: &DatabaseRecord,
) -> Result<crate::ha::ChangeGuard, ApiError> {
    require_running(db)?;
    if let Some(fenced) = db.nodes.iter().find(|n| n.fenced) {
        return Err(ApiError::conflict(
            "database_recovering",
            format!("node {} is rejoining after a failover; try again when it has", fenced.name),
        ));
    }
    platform.claims.try_planned(&db.id).ok_or_else(|| {
        ApiError::conflict(
            "primary_change_in_progress",
            format!("a primary change of {} is in progress; try again when it ends", db.id),
        )
    })
}

pub async fn env(State(state): AppState, Path(id): Path<String>) -> Result<Json<Env>, ApiError> {
    let db = load(&state.platform, &id).await?;
    let routing = &state.platform.routing;
    let url = routing.url(&db.name, &db.password, &db.name);
    let database_pool_url = routing.pool_url(&db.name, &db.password, &db.name);
    Ok(Json(Env { database_url: url.clone(), pgwarden_postgresql_url: url, database_pool_url }))
}

pub async fn set_tls(
    State(state): AppState,
    Path(id): Path<String>,
    bytes: Bytes,
) -> Result<Json<Database>, ApiError> {
    let request: SetTls = body(&bytes)?;
    let platform: &Arc<_> = &state.platform;
    let (changed, db) = platform
        .records
        .update(&id, |db| {
            require_running(db)?;
            let changed = db.force_tls != request.force;
            db.force_tls = request.force;
            Ok::<_, ApiError>(changed)
        })
        .await?
        .ok_or_else(|| ApiError::not_found("database", &id))?;
    if changed {
        let epoch = platform.routing.publish(&platform.records.store).await?;
        let state = if request.force { "on" } else { "off" };
        platform
            .records
            .event(&id, "tls_changed", format!("force TLS {state} (routing epoch {epoch})"))
            .await;
    }
    Ok(Json(view(platform, &db).await))
}

/// The most either limit may be set to.
const LIMIT_MAX: u32 = 1_000_000;

/// Sets (or gives back to the plan) what the proxies allow the database.
pub async fn set_limits(
    State(state): AppState,
    Path(id): Path<String>,
    bytes: Bytes,
) -> Result<Json<Database>, ApiError> {
    let request: SetLimits = body(&bytes)?;
    for (name, value) in [
        ("client_connections", request.client_connections),
        ("connections_per_second", request.connections_per_second),
    ] {
        if let Some(v) = value.filter(|v| !(1..=LIMIT_MAX).contains(v)) {
            return Err(ApiError::bad_request(
                "invalid_limit",
                format!("{name} {v} is out of range: 1 to {LIMIT_MAX}, or null for the plan's"),
            ));
        }
    }
    let platform: &Arc<_> = &state.platform;
    let (changed, db) = platform
        .records
        .update(&id, |db| {
            require_running(db)?;
            let changed = db.limits != request;
            db.limits = request;
            Ok::<_, ApiError>(changed)
        })
        .await?
        .ok_or_else(|| ApiError::not_found("database", &id))?;
    if changed {
        let epoch = platform.routing.publish(&platform.records.store).await?;
        let limits = crate::plans::limits(&db.plan, db.limits);
        let message = format!(
            "clients at once {}, new connections per second {} (routing epoch {epoch})",
            limits.client_connections, limits.connections_per_second
        );
        platform.records.event(&id, "limits_changed", message).await;
    }
    Ok(Json(view(platform, &db).await))
}

pub async fn events(
    State(state): AppState,
    Path(id): Path<String>,
) -> Result<Json<Vec<Event>>, ApiError> {
    load(&state.platform, &id).await?;
    Ok(Json(state.platform.records.store.events(&id).await?))
}

/// The latest sample of the database's stats (one is taken now if the sampler has none yet).
pub async fn stats(
    State(state): AppState,
    Path(id): Path<String>,
) -> Result<Json<pgwarden_api::control::Stats>, ApiError> {
    let db = load(&state.platform, &id).await?;
    if let Some(stats) = state.sampler.latest(&id) {
        return Ok(Json(stats));
    }
    let stats = crate::stats::sample(
        &state.platform.records,
        &state.platform.nodes,
        &state.platform.config.backup_dir,
        &state.heartbeats,
        &state.sampler,
        &db,
    )
    .await;
    Ok(Json(stats))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryQuery {
    /// RFC 3339; default: an hour before `until`.
    since: Option<String>,
    /// RFC 3339; default: now.
    until: Option<String>,
    /// Seconds per point; default: the range in at most 360 points, at least 1 s, and no finer
    /// than what the history keeps that far back (1 min after 3 h, 5 min after 7 h, 30 min
    /// after 26 h).
    step: Option<u64>,
}

/// The database's stats over `[since, until)`, one mean per `step` (SPEC §7).
pub async fn stats_history(
    State(state): AppState,
    Path(id): Path<String>,
    query: Result<axum::extract::Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<pgwarden_api::control::StatsHistory>, ApiError> {
    let axum::extract::Query(query) =
        query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    load(&state.platform, &id).await?;
    let rfc3339 = &time::format_description::well_known::Rfc3339;
    let time = |name: &str, text: Option<&str>| {
        text.map(|t| {
            time::OffsetDateTime::parse(t, rfc3339).map_err(|e| {
                ApiError::bad_request(
                    "invalid_query",
                    format!("{name} {t:?} is not an RFC 3339 time: {e}"),
                )
            })
        })
        .transpose()
    };
    let until =
        time("until", query.until.as_deref())?.unwrap_or_else(time::OffsetDateTime::now_utc);
    let since = match time("since", query.since.as_deref())? {
        Some(since) => since,
        None => until.checked_sub(time::Duration::HOUR).ok_or_else(|| {
            ApiError::bad_request("invalid_query", "until is too early to go back an hour from")
        })?,
    };
    if since >= until {
        return Err(ApiError::bad_request("invalid_query", "since must be before until"));
    }
    let span = (until - since).whole_seconds().max(1) as u64;
    let ms = |t: time::OffsetDateTime| (t.unix_timestamp_nanos() / 1_000_000) as i64;
    let history = &state.sampler.history;
    let now = time::OffsetDateTime::now_utc();
    // A step longer than the range gives one point: it is capped there (a huge one would
    // overflow the arithmetic of the buckets).
    let step = query
        .step
        .unwrap_or_else(|| history.default_step(ms(since), ms(until), ms(now)))
        .clamp(1, span);
    let steps = span.div_ceil(step);
    if steps > crate::stats::history::MAX_STEPS {
        return Err(ApiError::bad_request(
            "too_many_points",
            format!(
                "{steps} points asked ({span} s in steps of {step} s); at most {}: use a larger step",
                crate::stats::history::MAX_STEPS
            ),
        ));
    }
    Ok(Json(history.series(&id, ms(since), ms(until), step)?))
}
