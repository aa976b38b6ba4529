//! Major engine upgrades, online (SPEC §4 `POST /v1/databases/{id}/engine-upgrade` with a
//! version of another major). A data directory cannot move across majors, so a new cluster
//! takes over:
//!
//! 1. the new cluster (a primary, and a synchronous standby on plans that have one) starts on
//!    the new build and gets the roles (same names, same SCRAM verifiers, same memberships;
//!    `pg_dumpall --roles-only`) and the schema with its GRANTs (`pg_dump --schema-only
//!    --create`), both with the new major's client tools;
//! 2. logical replication (a publication of every table on the current primary, a subscription
//!    on the new one) copies the data and then follows the application's writes;
//! 3. once the new cluster has caught up, the proxies hold new sessions; the old database takes
//!    no more sessions (connection limit 0, its sessions end with `57P01`); the last changes are
//!    applied (the slot confirms the old primary's last WAL position); sequences are set to the
//!    old values; the routes swap to the new cluster and the held sessions go to it;
//! 4. the old cluster is stopped and kept for the rollback window, then removed.
//!
//! The hold has a budget: past it the swap is abandoned, the old database takes sessions
//! again, the routes never moved, and the operation fails with the reason. Every failure before
//! the swap removes the new cluster and what the upgrade made on the old one; a control plane
//! restart in the middle does the same (`retired::rollback_interrupted`). PITR starts a new window on the
//! new cluster; the old archive is set aside.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgwarden_api::control::DatabaseStatus;
use time::OffsetDateTime;
use tracing::{error, warn};

use super::plan::set_status;
use super::{ChangeError, Changes};
use crate::agent::forward::Forward;
use crate::failure::{Failure, Reportable};
use crate::ha::ChangeGuard;
use crate::lifecycle::standby::add_standby;
use crate::nodes::config::conninfo;
use crate::nodes::driver::client_sentence;
use crate::nodes::engines::Engine;
use crate::nodes::placement;
use crate::nodes::roles::{ident, literal};
use crate::nodes::sql::{Session, Timeouts};
use crate::nodes::{roles, NodeSpec, Nodes};
use crate::operations::Progress;
use crate::pitr::{base_dir, pitr_plan, wal_dir, Heartbeats};
use crate::state::{DatabaseRecord, MajorUpgrade, NodeRecord, Records, RetiredCluster};
use crate::{plans, secrets, wait};

/// How long new sessions may be held for the swap unless the request says otherwise.
pub const DEFAULT_HOLD_BUDGET: Duration = Duration::from_secs(10);
/// Publication, subscription and slot of the upgrade.
const REPLICATION_NAME: &str = "pgwarden_upgrade";
/// The role the subscription reads the old primary with (dropped afterwards).
const UPGRADER: &str = "pgwarden_upgrader";
/// How long the initial copy and catch-up may take.
const SYNC_TIMEOUT: Duration = Duration::from_secs(6 * 3600);
/// The hold starts once the new cluster is this close to the old primary.
const NEAR_BYTES: i64 = 1 << 20;
const APPLY_TIMEOUT: Duration = Duration::from_secs(3);
/// Statements that wait on other transactions (creating the slot) or copy (the schema).
const LONG: Timeouts =
    Timeouts { connect: Duration::from_secs(3), statement: Duration::from_secs(300) };

/// Why a major upgrade cannot start.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("logical replication cannot carry {}: add a primary key (or a replica identity), make unlogged tables logged, move large objects into tables", .0.join("; "))]
    NotReplicable(Vec<String>),
    #[error(
        "the primary runs with wal_level {0} (it started before pgwarden set logical): a plan \
         change or minor upgrade restarts it with logical, then the major upgrade can run"
    )]
    NotLogical(String),
    #[error(transparent)]
    Change(#[from] ChangeError),
}

/// What logical replication cannot carry in `db`, or why the upgrade cannot start.
pub async fn precheck(nodes: &Nodes, db: &DatabaseRecord) -> Result<(), Refusal> {
    let primary =
        db.primary().ok_or_else(|| ChangeError::from(Failure::NoPrimary(db.id.clone())))?;
    let session =
        nodes.session(&NodeSpec::of(primary), &db.name).await.map_err(ChangeError::from)?;
    let level: String =
        session.query_one("SHOW wal_level", &[]).await.map_err(ChangeError::from)?.get(0);
    if level != "logical" {
        return Err(Refusal::NotLogical(level));
    }
    let rows = session
        .query(
            "SELECT format('%I.%I', n.nspname, c.relname) || CASE WHEN c.relpersistence = 'u' \
             THEN ' (unlogged table)' ELSE ' (no primary key or replica identity)' END \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind = 'r' AND c.relpersistence <> 't' \
             AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
             AND n.nspname NOT LIKE 'pg\\_toast%' \
             AND (c.relpersistence = 'u' OR c.relreplident = 'n' OR (c.relreplident = 'd' AND \
             NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary))) \
             ORDER BY 1",
            &[],
        )
        .await
        .map_err(ChangeError::from)?;
    let mut offenders: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    let large: i64 = session
        .query_one("SELECT count(*) FROM pg_largeobject_metadata", &[])
        .await
        .map_err(ChangeError::from)?
        .get(0);
    if large > 0 {
        offenders.push(format!("{large} large object(s)"));
    }
    if offenders.is_empty() {
        Ok(())
    } else {
        Err(Refusal::NotReplicable(offenders))
    }
}

/// Upgrades `id` to `engine` (another major) with new sessions held at most `budget`;
/// `claim` is its planned-change claim, taken by the caller.
pub async fn upgrade(
    changes: &Changes,
    heartbeats: &Heartbeats,
    claim: ChangeGuard,
    id: &str,
    engine: Engine,
    budget: Duration,
    mut op: Progress,
) -> Result<(), ChangeError> {
    let old = set_status(&changes.records, id, DatabaseStatus::Updating).await?;
    let from = super::upgrade::current(&changes.nodes.engines, &changes.nodes.pg_bin, &old)
        .map_or_else(|| "its build".to_owned(), |e| format!("PostgreSQL {}", e.version));
    changes.records.event(
        id,
        "engine_upgrade_started",
        format!(
            "major upgrade from {from} to PostgreSQL {} through logical replication (hold budget {} ms)",
            engine.version,
            budget.as_millis()
        ),
    ).await;
    let result = run(changes, heartbeats, &claim, &old, &engine, budget, &mut op).await;
    if let Err(e) = &result {
        changes.records.event(id, "engine_upgrade_failed", e.sentence()).await;
        clean_up(&changes.records, &changes.nodes, id).await;
    }
    drop(claim);
    let _ = set_status(&changes.records, id, DatabaseStatus::Running).await;
    if result.is_ok() {
        changes
            .records
            .event(id, "engine_upgraded", format!("now on PostgreSQL {}", engine.version))
            .await;
    }
    result
}

/// Runs `work` unless a failover takes the old cluster over first.
async fn step<T, E: Into<ChangeError>>(
    claim: &ChangeGuard,
    work: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, ChangeError> {
    tokio::select! {
        r = work => r.map_err(Into::into),
        () = claim.cancelled() => Err(ChangeError::Preempted),
    }
}

async fn run(
    changes: &Changes,
    heartbeats: &Heartbeats,
    claim: &ChangeGuard,
    old: &DatabaseRecord,
    engine: &Engine,
    budget: Duration,
    op: &mut Progress,
) -> Result<(), ChangeError> {
    let id = old.id.as_str();
    let plan = plans::find(&old.plan).ok_or_else(|| ChangeError::UnknownPlan(old.plan.clone()))?;
    let old_primary = old.primary().cloned().ok_or_else(|| Failure::NoPrimary(id.to_owned()))?;
    let bin = (engine.bin != changes.nodes.pg_bin).then(|| engine.bin.clone());
    // The new nodes, recorded before anything exists: a restart finds and removes them.
    let next = old
        .all_nodes()
        .filter_map(|n| n.name.rsplit('-').next()?.parse::<u32>().ok())
        .max()
        .unwrap_or(0)
        + 1;
    let nodes = placement::new_nodes(
        &changes.nodes.hosts,
        &changes.nodes.ports,
        &changes.records.store.databases().await?,
        id,
        bin.as_deref(),
        next,
        plan.nodes as usize,
    );
    let mut new = old.clone();
    new.nodes = nodes.clone();
    new.engine = bin.clone();
    new.synchronous = false;
    super::update_record(&changes.records, id, |db| {
        db.upgrade = Some(MajorUpgrade {
            version: engine.version.clone(),
            engine: bin.clone(),
            nodes: nodes.clone(),
            connection_limit: None,
        });
    })
    .await?;
    let tools = engine.bin.clone();
    let new_primary = new.primary().cloned().ok_or_else(|| Failure::NoPrimary(id.to_owned()))?;
    let (old_spec, new_spec) = (NodeSpec::of(&old_primary), NodeSpec::of(&new_primary));

    // 1. The new primary, with the roles and the schema.
    let config = changes.nodes.config(&new, &new_primary, None)?;
    let (driver, spec) = (&changes.nodes.driver, &new_spec);
    step(claim, async move {
        driver.init(spec, &config).await?;
        driver.start(spec).await
    })
    .await?;
    changes
        .records
        .event(
            id,
            "node_started",
            format!("new primary {} started on PostgreSQL {}", new_primary.name, engine.version),
        )
        .await;
    op.set(0.1).await;
    let scratch = changes.backups.scratch();
    // A node on another host is reached through its agent's tunnel, forwarded to a private
    // socket here for the client programs.
    let (old_forward, new_forward) = (
        forward(&changes.nodes, &old_spec, &scratch)?,
        forward(&changes.nodes, &new_spec, &scratch)?,
    );
    let admin = |spec: &NodeSpec, forward: &Option<Forward>, database: &str| match forward {
        Some(forward) => forward.conninfo(database),
        None => changes.nodes.driver.admin_conninfo(spec, database),
    };
    let old_admin = admin(&old_spec, &old_forward, "postgres");
    let new_admin = admin(&new_spec, &new_forward, "postgres");
    let old_db = admin(&old_spec, &old_forward, &old.name);
    let (t, s, a, b, d) = (tools.clone(), scratch.clone(), old_admin, new_admin, old_db);
    step(claim, async move {
        tokio::task::spawn_blocking(move || copy_definitions(&t, &s, &a, &d, &b))
            .await
            .map_err(crate::nodes::NodeError::from)?
    })
    .await?;
    drop((old_forward, new_forward));
    changes
        .records
        .event(id, "schema_copied", "roles, schema and GRANTs copied to the new cluster")
        .await;
    op.set(0.2).await;

    // 2. Its standby, synchronous, before the data arrives: it streams everything.
    for standby in new.replicas().cloned().collect::<Vec<_>>() {
        step(claim, add_standby(&changes.records, &changes.nodes, &new, &standby)).await?;
        new.synchronous = true;
    }
    op.set(0.3).await;

    // 3. The data, then the application's writes, through logical replication.
    let password = secrets::generate_password();
    let old_session = step(claim, changes.nodes.session(&old_spec, &old.name)).await?;
    let old_postgres = step(claim, changes.nodes.session(&old_spec, "postgres")).await?;
    roles::create_role(&old_postgres, UPGRADER, &password, "REPLICATION").await?;
    old_postgres.batch_execute(&format!("GRANT pg_read_all_data TO {UPGRADER}")).await?;
    old_session
        .batch_execute(&format!("CREATE PUBLICATION {REPLICATION_NAME} FOR ALL TABLES"))
        .await?;
    let (port, ca) = (old_primary.port.to_string(), new_primary.dir.join("ca.crt"));
    let source = conninfo(&[
        ("host", &old_primary.host),
        ("port", &port),
        ("dbname", &old.name),
        ("user", UPGRADER),
        ("password", &password),
        ("sslmode", "verify-full"),
        ("sslrootcert", &ca.display().to_string()),
        ("application_name", REPLICATION_NAME),
        ("connect_timeout", "5"),
    ]);
    let new_session = step(claim, changes.nodes.session_within(&new_spec, &old.name, LONG)).await?;
    step(
        claim,
        new_session.batch_execute(&format!(
            "CREATE SUBSCRIPTION {REPLICATION_NAME} CONNECTION {} PUBLICATION {REPLICATION_NAME} \
             WITH (copy_data = true)",
            literal(&source)
        )),
    )
    .await?;
    changes
        .records
        .event(id, "replication_started", "copying the data through logical replication")
        .await;
    step(claim, wait_near(&old_session, &new_session, op)).await?;
    changes
        .records
        .event(id, "replication_caught_up", "the new cluster follows the old one closely")
        .await;
    op.set(0.8).await;

    // 4. The swap, under a hold with a budget.
    let held_at = Instant::now();
    let swapped = swap(changes, claim, old, &old_session, &old_postgres, &new_session, budget)
        .await
        .map_err(|reason| match reason {
            ChangeError::Preempted => ChangeError::Preempted,
            reason => ChangeError::HoldBudget {
                held_ms: held_at.elapsed().as_millis() as u64,
                budget_ms: budget.as_millis() as u64,
                reason: reason.to_string(),
            },
        });
    let limit = match swapped {
        Ok(limit) => limit,
        Err(e) => {
            // The routes never moved: the held sessions go to the old primary again, which
            // `clean_up` opens to them again.
            changes.routing.holds.release(id);
            if let Ok(epoch) = changes.routing.publish(&changes.records.store).await {
                changes.routing.publisher.wait_applied(epoch, APPLY_TIMEOUT).await;
            }
            return Err(e);
        }
    };
    let old_version = super::upgrade::current(&changes.nodes.engines, &changes.nodes.pg_bin, old)
        .map_or_else(|| "?".to_owned(), |e| e.version.clone());
    if pitr_plan(&old.plan) {
        set_archive_aside(&changes.backup_dir, id, op.id());
        heartbeats.forget(id);
    }
    let window = time::Duration::try_from(changes.rollback_window).unwrap_or_default();
    let remove_after = (OffsetDateTime::now_utc() + window)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    super::update_record(&changes.records, id, |db| {
        db.retired.push(RetiredCluster {
            version: old_version.clone(),
            nodes: db.nodes.clone(),
            remove_after: remove_after.clone(),
        });
        db.nodes = new.nodes.clone();
        db.engine = new.engine.clone();
        db.synchronous = new.synchronous;
        db.upgrade = None;
    })
    .await?;
    changes.routing.holds.release(id);
    let epoch = changes.routing.publish(&changes.records.store).await?;
    changes.routing.publisher.wait_applied(epoch, APPLY_TIMEOUT).await;
    changes
        .records
        .event(
            id,
            "switched_cluster",
            format!(
            "routes on the PostgreSQL {} cluster (new sessions held {} ms), routing epoch {epoch}",
            engine.version,
            held_at.elapsed().as_millis()
        ),
        )
        .await;
    op.set(0.9).await;

    // 5. The old cluster: what the upgrade made there goes, then it stops (kept until
    // `remove_after`).
    drop((old_session, new_session));
    undo_on_old(&changes.records, &changes.nodes, old, &old_postgres, Some(limit)).await;
    drop(old_postgres);
    stop_nodes(&changes.nodes, &old.nodes).await;
    changes
        .records
        .event(
            id,
            "old_cluster_stopped",
            format!("the PostgreSQL {old_version} nodes are stopped and kept until {remove_after}"),
        )
        .await;
    Ok(())
}

/// Roles (with their verifiers and memberships) and the database's schema with its GRANTs,
/// from the old primary into the new one, with the new major's client tools.
fn copy_definitions(
    tools: &Path,
    scratch: &Path,
    old_admin: &str,
    old_db: &str,
    new_admin: &str,
) -> Result<(), ChangeError> {
    let file = scratch.join(format!("upgrade-{:016x}.sql", rand::random::<u64>()));
    let result = (|| {
        // Private from its first byte: it holds the roles' verifiers.
        crate::files::create_private(&file).map_err(|e| program_error("scratch file", &e))?;
        program(
            std::process::Command::new(tools.join("pg_dumpall"))
                .args(["--roles-only", "--no-password", "--dbname", old_admin, "--file"])
                .arg(&file),
            "pg_dumpall",
        )?;
        // The bootstrap superuser exists in every new cluster; every other role is created.
        let roles = std::fs::read_to_string(&file).map_err(|e| program_error("pg_dumpall", &e))?;
        let roles: String = roles
            .lines()
            .filter(|l| *l != "CREATE ROLE postgres;")
            .map(|l| format!("{l}\n"))
            .collect();
        crate::files::write_private(&file, roles.as_bytes())
            .map_err(|e| program_error("scratch file", &e))?;
        restore(tools, new_admin, &file)?;
        program(
            std::process::Command::new(tools.join("pg_dump"))
                .args([
                    "--schema-only",
                    "--create",
                    "--no-publications",
                    "--no-subscriptions",
                    "--no-password",
                    "--dbname",
                    old_db,
                    "--file",
                ])
                .arg(&file),
            "pg_dump",
        )?;
        restore(tools, new_admin, &file)
    })();
    let _ = std::fs::remove_file(&file);
    result
}

/// `node`'s socket forwarded here when the node is on another host.
fn forward(nodes: &Nodes, node: &NodeSpec, scratch: &Path) -> Result<Option<Forward>, ChangeError> {
    if node.agent.is_none() {
        return Ok(None);
    }
    let remote = Arc::clone(&nodes.tunnels);
    Forward::open(remote, node.clone(), scratch)
        .map(Some)
        .map_err(|e| program_error("forwarding a node's socket", &e))
}

/// Runs a SQL file with psql (it holds psql meta-commands), stopping at the first error.
fn restore(tools: &Path, conninfo: &str, file: &Path) -> Result<(), ChangeError> {
    program(
        std::process::Command::new(tools.join("psql"))
            .args(["--no-psqlrc", "--quiet", "--no-password", "-v", "ON_ERROR_STOP=1"])
            .args(["--dbname", conninfo, "--file"])
            .arg(file),
        "psql",
    )
}

fn program(cmd: &mut std::process::Command, what: &'static str) -> Result<(), ChangeError> {
    let out = cmd
        .stdin(std::process::Stdio::null())
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .map_err(|e| program_error(what, &e))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    error!(program = what, output = %stderr.trim(), "major upgrade program failed");
    Err(Failure::Program { what, sentence: client_sentence(&stderr) }.into())
}

fn program_error(what: &'static str, e: &std::io::Error) -> ChangeError {
    // The OS error is the log's; the user learns which step could not run.
    warn!(step = what, error = %e, "an upgrade step could not run");
    let sentence = "it could not run; see the control plane's log".to_owned();
    Failure::Program { what, sentence }.into()
}

/// Waits until every table is copied and the new cluster is within `NEAR_BYTES` of the old
/// primary.
async fn wait_near(old: &Session, new: &Session, op: &mut Progress) -> Result<(), ChangeError> {
    let op = tokio::sync::Mutex::new(op);
    let op = &op;
    let near = wait::until(SYNC_TIMEOUT, wait::STEADY, || async move {
        let row = new
            .query_one(
                "SELECT count(*) FILTER (WHERE srsubstate <> 'r'), count(*) FROM pg_subscription_rel",
                &[],
            )
            .await?;
        let (copying, tables): (i64, i64) = (row.get(0), row.get(1));
        if tables > 0 {
            let done = 0.3 + 0.4 * (tables - copying) as f64 / tables as f64;
            op.lock().await.set(done).await;
        }
        if copying == 0 {
            let lag: Option<i64> = old
                .query_opt(
                    "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::int8 \
                     FROM pg_replication_slots WHERE slot_name = $1",
                    &[&REPLICATION_NAME],
                )
                .await?
                .and_then(|r| r.get(0));
            if lag.is_some_and(|lag| lag <= NEAR_BYTES) {
                return Ok(Some(()));
            }
        }
        Ok::<_, ChangeError>(None)
    });
    near.await?.ok_or(ChangeError::NotSynced(SYNC_TIMEOUT.as_secs()))
}

/// The held part: the old database takes no more sessions, the last changes arrive, the
/// sequences follow, the subscription goes. Any error (or the budget running out) abandons it.
async fn swap(
    changes: &Changes,
    claim: &ChangeGuard,
    old: &DatabaseRecord,
    old_db: &Session,
    old_postgres: &Session,
    new_db: &Session,
    budget: Duration,
) -> Result<i32, ChangeError> {
    let (records, routing) = (&changes.records, &changes.routing);
    let id = old.id.as_str();
    let deadline = Instant::now() + budget;
    let within = |what: &'static str| {
        if Instant::now() > deadline {
            Err(ChangeError::Budget(what))
        } else {
            Ok(())
        }
    };
    routing.holds.hold(id);
    let epoch = routing.publish(&records.store).await?;
    let applied =
        async { Ok::<_, ChangeError>(routing.publisher.wait_applied(epoch, APPLY_TIMEOUT).await) };
    if !step(claim, applied).await? {
        warn!(database = id, epoch, "not every proxy applied the hold in time");
    }
    // No session of the application writes any more: the limit keeps new ones out (superusers,
    // the platform's own, pass), the running ones end.
    let limit: i32 = old_postgres
        .query_one("SELECT datconnlimit FROM pg_database WHERE datname = $1", &[&old.name])
        .await?
        .get(0);
    super::update_record(records, id, |db| {
        if let Some(u) = db.upgrade.as_mut() {
            u.connection_limit = Some(limit);
        }
    })
    .await?;
    old_postgres
        .batch_execute(&format!("ALTER DATABASE {} CONNECTION LIMIT 0", ident(&old.name)))
        .await?;
    let wait_ms = i64::try_from(deadline.saturating_duration_since(Instant::now()).as_millis())
        .unwrap_or(i64::MAX)
        .clamp(1, 5000);
    old_postgres
        .query(
            "SELECT pg_terminate_backend(a.pid, $2) FROM pg_stat_activity a \
             JOIN pg_roles r ON r.oid = a.usesysid \
             WHERE a.datname = $1 AND a.backend_type = 'client backend' AND NOT r.rolsuper \
             AND a.pid <> pg_backend_pid()",
            &[&old.name, &wait_ms],
        )
        .await?;
    within("ending the old database's sessions")?;
    // Everything written until now reaches the new cluster.
    let lsn: String = old_db.query_one("SELECT pg_current_wal_lsn()::text", &[]).await?.get(0);
    let lsn = &lsn;
    let left = deadline.saturating_duration_since(Instant::now());
    let applied = wait::until(left, wait::QUICK, || async move {
        let row = old_db
            .query_opt(
                "SELECT confirmed_flush_lsn >= $1::text::pg_lsn FROM pg_replication_slots \
                 WHERE slot_name = $2",
                &[lsn, &REPLICATION_NAME],
            )
            .await?;
        let caught_up = row.and_then(|r| r.get::<_, Option<bool>>(0)).unwrap_or(false);
        Ok::<_, ChangeError>(caught_up.then_some(()))
    });
    applied.await?.ok_or(ChangeError::Budget("applying the last changes"))?;
    // Sequences are not replicated: they take the old values.
    let sequences = old_db
        .query(
            "SELECT format('%I.%I', schemaname, sequencename), last_value FROM pg_sequences \
             WHERE last_value IS NOT NULL",
            &[],
        )
        .await?;
    for row in &sequences {
        let (name, value): (String, i64) = (row.get(0), row.get(1));
        new_db.execute("SELECT setval($1::text::regclass, $2, true)", &[&name, &value]).await?;
    }
    within("setting the sequences")?;
    drop_subscription(new_db).await?;
    within("ending the replication")?;
    if claim.is_cancelled() {
        return Err(ChangeError::Preempted);
    }
    Ok(limit)
}

/// Removes the subscription without reaching back to the old primary (its slot goes with
/// `undo_on_old`).
async fn drop_subscription(new_db: &Session) -> Result<(), ChangeError> {
    let exists = new_db
        .query_opt("SELECT 1 FROM pg_subscription WHERE subname = $1", &[&REPLICATION_NAME])
        .await?
        .is_some();
    if exists {
        new_db
            .batch_execute(&format!(
                "ALTER SUBSCRIPTION {REPLICATION_NAME} DISABLE; \
                 ALTER SUBSCRIPTION {REPLICATION_NAME} SET (slot_name = NONE); \
                 DROP SUBSCRIPTION {REPLICATION_NAME}"
            ))
            .await?;
    }
    Ok(())
}

/// Drops the slot, publication and role the upgrade made on the old primary and gives the old
/// database its connection limit back (`limit`; `None`: the one recorded, if any). Best effort:
/// what fails is logged.
async fn undo_on_old(
    records: &Records,
    nodes: &Nodes,
    old: &DatabaseRecord,
    postgres: &Session,
    limit: Option<i32>,
) {
    let limit = match limit {
        Some(limit) => Some(limit),
        None => {
            let db = records.store.database(&old.id).await.ok().flatten();
            db.and_then(|db| db.upgrade).and_then(|u| u.connection_limit)
        }
    };
    if let Some(limit) = limit {
        let sql = format!("ALTER DATABASE {} CONNECTION LIMIT {limit}", ident(&old.name));
        if let Err(e) = postgres.batch_execute(&sql).await {
            warn!(database = %old.id, error = %e, "cannot restore the connection limit");
        }
    }
    // The slot can be dropped once its walsender has gone (the subscription stopped).
    let gone = wait::until_true(Duration::from_secs(10), wait::STEADY, || async move {
        let dropped = postgres
            .query(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                 WHERE slot_name = $1 AND NOT active",
                &[&REPLICATION_NAME],
            )
            .await;
        let left = postgres
            .query_opt(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
                &[&REPLICATION_NAME],
            )
            .await;
        matches!((dropped, left), (Ok(_), Ok(None)))
    });
    if !gone.await {
        warn!(database = %old.id, "the upgrade's replication slot is still there");
    }
    if let Some(primary) = old.primary() {
        let drop = format!("DROP PUBLICATION IF EXISTS {REPLICATION_NAME}");
        match nodes.session(&NodeSpec::of(primary), &old.name).await {
            Ok(session) => {
                if let Err(e) = session.batch_execute(&drop).await {
                    warn!(database = %old.id, error = %e, "cannot drop the upgrade's publication");
                }
            }
            Err(e) => {
                warn!(database = %old.id, error = %e, "cannot drop the upgrade's publication")
            }
        }
    }
    if let Err(e) = postgres.batch_execute(&format!("DROP ROLE IF EXISTS {UPGRADER}")).await {
        warn!(database = %old.id, error = %e, "cannot drop the upgrade role");
    }
}

pub(super) async fn stop_nodes(nodes: &Nodes, list: &[NodeRecord]) {
    for node in list {
        let (driver, spec) = (&nodes.driver, NodeSpec::of(node));
        if !driver.is_running(&spec).await {
            continue;
        }
        let stopped = match driver.stop(&spec).await {
            Ok(()) => Ok(()),
            Err(_) => driver.fence(&spec).await,
        };
        if let Err(e) = stopped {
            warn!(node = %node.name, error = %e, "cannot stop a retired node");
        }
    }
}

/// Moves the PITR archive aside: the new cluster's WAL starts a new recoverable window.
fn set_archive_aside(backup_dir: &Path, id: &str, op: &str) {
    let (wal, bases) = (wal_dir(backup_dir, id), base_dir(backup_dir, id));
    let wal_aside: PathBuf = wal.with_file_name(format!("wal-before-{op}"));
    let bases_aside: PathBuf = bases.with_file_name(format!("base-before-{op}"));
    crate::files::blocking_io(|| {
        let _ = std::fs::rename(&wal, &wal_aside);
        let _ = std::fs::rename(&bases, &bases_aside);
    });
}

/// Removes the new cluster of an upgrade that did not swap, and what it made on the old
/// primary; the record forgets the upgrade.
pub(super) async fn clean_up(records: &Records, nodes: &Nodes, id: &str) {
    let Ok(Some(db)) = records.store.database(id).await else { return };
    let Some(upgrade) = db.upgrade.clone() else { return };
    // The new nodes first: the subscription's walsender on the old primary goes with them.
    for node in &upgrade.nodes {
        let (driver, spec) = (&nodes.driver, NodeSpec::of(node));
        if let Err(e) = driver.destroy(&spec).await {
            warn!(node = %node.name, error = %e, "cannot remove a node of the abandoned upgrade");
        }
    }
    if let Some(primary) = db.primary() {
        match nodes.session(&NodeSpec::of(primary), "postgres").await {
            Ok(postgres) => {
                undo_on_old(records, nodes, &db, &postgres, upgrade.connection_limit).await
            }
            Err(e) => warn!(database = id, error = %e, "cannot undo the upgrade on the primary"),
        }
    }
    let _ = super::update_record(records, id, |db| db.upgrade = None).await;
    records
        .event(
            id,
            "upgrade_rolled_back",
            format!(
                "the PostgreSQL {} cluster was removed; the database stays where it was",
                upgrade.version
            ),
        )
        .await;
}
