//! Provisioning and destruction of a database's nodes, as operations.
//!
//! Provisioning: certificates, ports, `initdb` of the primary (checksums, SCRAM, TLS), the
//! roles and database, then on business plans a standby copied with `pg_basebackup` over TLS
//! and made synchronous; then the routing table is published. A failure marks the database
//! `failed` with the cause (a node's own log line when a node would not start).

use std::sync::Arc;
use std::time::{Duration, Instant};

use pgwarden_api::control::{DatabaseStatus, NodeRole, Operation, OperationStatus};
use tracing::{error, warn};

use crate::driver::{DriverError, NodeConfig, NodeSpec, Upstream};
use crate::local::quote;
use crate::plans;
use crate::platform::Platform;
use crate::records::{DatabaseRecord, NodeRecord};
use crate::users::{self, REPLICATION_ROLE};

/// Runs `provision` as operation `op`, recording progress and the outcome.
pub async fn run_provision(platform: Arc<Platform>, id: String, mut op: Operation) {
    let lock = platform.lock(&id);
    let _guard = lock.lock().await;
    platform.update_operation(&mut op, OperationStatus::Running, 0.05);
    let result = provision(&platform, &id, &mut op).await;
    finish(&platform, &id, op, result, "provision");
}

pub async fn run_destroy(platform: Arc<Platform>, id: String, mut op: Operation) {
    let lock = platform.lock(&id);
    let _guard = lock.lock().await;
    platform.update_operation(&mut op, OperationStatus::Running, 0.1);
    let result = destroy(&platform, &id).await;
    finish(&platform, &id, op, result, "destroy");
}

fn finish(
    platform: &Platform,
    id: &str,
    mut op: Operation,
    result: Result<(), String>,
    kind: &str,
) {
    platform.metrics.operation(kind, result.is_ok());
    match result {
        Ok(()) => platform.update_operation(&mut op, OperationStatus::Succeeded, 1.0),
        Err(message) => {
            error!(database = id, operation = %op.id, error = %message, "operation failed");
            if let Ok(Some(mut db)) = platform.store.database(id) {
                db.status = DatabaseStatus::Failed;
                db.error = Some(message.clone());
                let _ = platform.store.put_database(&db);
                platform.event(id, &format!("{kind}_failed"), message.clone());
            }
            op.error = Some(message);
            let progress = op.progress;
            platform.update_operation(&mut op, OperationStatus::Failed, progress);
        }
    }
}

fn load(platform: &Platform, id: &str) -> Result<DatabaseRecord, String> {
    platform
        .store
        .database(id)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("database {id} vanished"))
}

pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, DriverError> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f).await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())
}

/// The node settings of `db`'s plan for a node of `role`.
pub fn node_config(
    platform: &Platform,
    db: &DatabaseRecord,
    node: &NodeRecord,
    sync_standby: Option<&str>,
) -> Result<NodeConfig, String> {
    let plan = plans::find(&db.plan).ok_or_else(|| format!("unknown plan {}", db.plan))?;
    let mut settings: Vec<(String, String)> =
        plans::parameters(&plan).into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    settings.extend([
        ("wal_level".into(), "replica".into()),
        ("max_wal_senders".into(), "10".into()),
        ("max_replication_slots".into(), "10".into()),
        ("hot_standby".into(), "on".into()),
        // Dumps taken on the standby are not cancelled by replay conflicts.
        ("hot_standby_feedback".into(), "on".into()),
        ("wal_keep_size".into(), "'256MB'".into()),
        (
            "synchronous_standby_names".into(),
            quote(&sync_standby.map(|n| format!("\"{n}\"")).unwrap_or_default()),
        ),
    ]);
    settings.extend(platform.config.extra_settings.iter().cloned());
    if node.role == NodeRole::Replica {
        if let Some(primary) = db.primary() {
            let conninfo = format!(
                "host={} port={} user={REPLICATION_ROLE} password={} sslmode=verify-full sslrootcert={} application_name={}",
                primary.host,
                primary.port,
                db.replication_password,
                node.dir.join("ca.crt").display(),
                node.name
            );
            settings.push(("primary_conninfo".into(), quote(&conninfo)));
            settings.push(("primary_slot_name".into(), quote(&slot_name(&node.name))));
        }
    }
    let names: Vec<&str> = vec![node.host.as_str(), "localhost"];
    let cert = platform.ca.issue_server(&names).map_err(|e| e.to_string())?;
    Ok(NodeConfig {
        settings,
        hba: hba(),
        tls: (cert.cert_pem, cert.key_pem, platform.ca.cert_pem().to_owned()),
    })
}

/// Clients (through the proxies) with SCRAM; replication only over TLS and only for the
/// replication role; the superuser only over the node's private Unix socket.
fn hba() -> String {
    format!(
        "# Managed by pgwarden.\n\
         local   all          postgres                 trust\n\
         local   replication  postgres                 trust\n\
         hostssl replication  {REPLICATION_ROLE}  all   scram-sha-256\n\
         host    replication  all                  all   reject\n\
         host    all          {REPLICATION_ROLE}  all   reject\n\
         host    all          postgres             all   reject\n\
         host    all          all                  all   scram-sha-256\n"
    )
}

pub fn slot_name(node: &str) -> String {
    node.replace('-', "_")
}

async fn provision(platform: &Arc<Platform>, id: &str, op: &mut Operation) -> Result<(), String> {
    let mut db = load(platform, id)?;
    let plan = plans::find(&db.plan).ok_or_else(|| format!("unknown plan {}", db.plan))?;
    // Start from a clean slate: a provisioning interrupted earlier may have left nodes behind.
    for node in std::mem::take(&mut db.nodes) {
        let spec = platform.node_spec(&node);
        blocking({
            let driver = platform.driver.clone();
            move || driver.destroy(&spec)
        })
        .await?;
    }
    db.nodes = platform.new_nodes(id, 1, plan.nodes as usize).map_err(|e| e.to_string())?;
    platform.store.put_database(&db).map_err(|e| e.to_string())?;

    let primary = db.primary().cloned().ok_or("no primary")?;
    let primary_spec = platform.node_spec(&primary);
    let config = node_config(platform, &db, &primary, None)?;
    blocking({
        let (driver, spec) = (platform.driver.clone(), primary_spec.clone());
        move || {
            driver.init(&spec, &config)?;
            driver.start(&spec)
        }
    })
    .await?;
    platform.update_operation(op, OperationStatus::Running, 0.4);
    platform.event(
        id,
        "node_started",
        format!("primary {} started on port {}", primary.name, primary.port),
    );

    let admin = users::admin(&platform.driver.admin_conninfo(&primary_spec, "postgres"))
        .await
        .map_err(|e| e.to_string())?;
    users::create_role(&admin, REPLICATION_ROLE, &db.replication_password, "REPLICATION")
        .await
        .map_err(|e| e.to_string())?;
    users::create_role(&admin, &db.name, &db.password, "").await.map_err(|e| e.to_string())?;
    users::create_database(&admin, &db.name, &db.name).await.map_err(|e| e.to_string())?;
    let db_admin = users::admin(&platform.driver.admin_conninfo(&primary_spec, &db.name))
        .await
        .map_err(|e| e.to_string())?;
    users::grant(&db_admin, &db.name, &db.name, &db.name, false)
        .await
        .map_err(|e| e.to_string())?;
    platform.update_operation(op, OperationStatus::Running, 0.6);

    for standby in db.replicas().cloned().collect::<Vec<_>>() {
        add_standby(platform, &db, &standby).await?;
        db.synchronous = true;
        platform.update_operation(op, OperationStatus::Running, 0.9);
    }

    db.status = DatabaseStatus::Running;
    db.error = None;
    platform.store.put_database(&db).map_err(|e| e.to_string())?;
    let epoch = platform.publish_routes().map_err(|e| e.to_string())?;
    platform.event(
        id,
        "provisioned",
        format!(
            "database {} is running ({} node(s)), routing epoch {epoch}",
            db.name,
            db.nodes.len()
        ),
    );
    Ok(())
}

/// Copies the primary into `standby` over TLS, starts it streaming, then makes it the
/// synchronous standby.
pub async fn add_standby(
    platform: &Arc<Platform>,
    db: &DatabaseRecord,
    standby: &NodeRecord,
) -> Result<(), String> {
    add_standby_only(platform, db, standby).await?;
    let primary = db.primary().cloned().ok_or("no primary")?;
    let primary_spec = platform.node_spec(&primary);
    let config = node_config(platform, db, &primary, Some(&standby.name))?;
    blocking({
        let (driver, spec) = (platform.driver.clone(), primary_spec.clone());
        move || {
            driver.configure(&spec, &config)?;
            driver.reload(&spec)
        }
    })
    .await?;
    wait_synchronous(platform, &primary_spec, &standby.name).await?;
    platform.event(
        &db.id,
        "replication_synchronous",
        format!("standby {} is synchronous", standby.name),
    );
    Ok(())
}

/// Copies the primary into `standby` (pg_basebackup over TLS) and starts it streaming.
pub async fn add_standby_only(
    platform: &Arc<Platform>,
    db: &DatabaseRecord,
    standby: &NodeRecord,
) -> Result<(), String> {
    let primary = db.primary().cloned().ok_or("no primary")?;
    let upstream = Upstream {
        host: primary.host.clone(),
        port: primary.port,
        user: REPLICATION_ROLE.into(),
        password: db.replication_password.clone(),
        slot: slot_name(&standby.name),
    };
    let config = node_config(platform, db, standby, None)?;
    let spec = platform.node_spec(standby);
    blocking({
        let (driver, spec) = (platform.driver.clone(), spec.clone());
        move || {
            driver.init_standby(&spec, &config, &upstream)?;
            driver.start(&spec)
        }
    })
    .await?;
    platform.event(
        &db.id,
        "node_started",
        format!("standby {} streaming from {}", standby.name, primary.name),
    );
    Ok(())
}

async fn wait_synchronous(
    platform: &Platform,
    primary: &NodeSpec,
    standby: &str,
) -> Result<(), String> {
    let admin = users::admin(&platform.driver.admin_conninfo(primary, "postgres"))
        .await
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let rows = admin
            .query(
                "SELECT sync_state FROM pg_stat_replication WHERE application_name = $1",
                &[&standby],
            )
            .await
            .map_err(|e| e.to_string())?;
        if rows.first().is_some_and(|r| r.get::<_, String>(0) == "sync") {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("standby {standby} did not become synchronous within 60 s"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn destroy(platform: &Arc<Platform>, id: &str) -> Result<(), String> {
    let db = load(platform, id)?;
    // Routes first, so that no new session reaches nodes about to go.
    let mut gone = db.clone();
    gone.status = DatabaseStatus::Deleting;
    platform.store.put_database(&gone).map_err(|e| e.to_string())?;
    platform.publish_routes().map_err(|e| e.to_string())?;
    // Standbys first: a synchronous primary must not wait for a vanished standby.
    let mut nodes = db.nodes.clone();
    nodes.sort_by_key(|n| n.role == NodeRole::Primary);
    for node in nodes {
        let spec = platform.node_spec(&node);
        blocking({
            let driver = platform.driver.clone();
            move || driver.destroy(&spec)
        })
        .await?;
    }
    for backup in platform.store.backups(id).map_err(|e| e.to_string())? {
        crate::backups::delete(platform, &backup)?;
    }
    platform.store.delete_database(id).map_err(|e| e.to_string())?;
    Ok(())
}

/// After a restart: adopt running nodes, start stopped ones, and finish or clean up operations
/// that were interrupted. Returns when every database is settled.
pub async fn recover(platform: &Arc<Platform>) {
    let databases = match platform.store.databases() {
        Ok(d) => d,
        Err(e) => return error!(error = %e, "cannot read databases"),
    };
    let interrupted: Vec<Operation> = platform
        .store
        .operations()
        .unwrap_or_default()
        .into_iter()
        .filter(|o| matches!(o.status, OperationStatus::Pending | OperationStatus::Running))
        .collect();
    for db in databases {
        let op = interrupted.iter().find(|o| o.database_id == db.id).cloned();
        match db.status {
            DatabaseStatus::Provisioning => {
                warn!(database = %db.id, "provisioning was interrupted; starting it again");
                platform.event(
                    &db.id,
                    "provision_resumed",
                    "provisioning interrupted by a control plane restart; starting again",
                );
                let op = match op {
                    Some(op) => op,
                    None => match platform.new_operation("provision", &db.id) {
                        Ok(op) => op,
                        Err(e) => return error!(error = %e, "cannot record operation"),
                    },
                };
                run_provision(platform.clone(), db.id.clone(), op).await;
            }
            DatabaseStatus::Deleting => {
                let op = match op {
                    Some(op) => op,
                    None => match platform.new_operation("destroy", &db.id) {
                        Ok(op) => op,
                        Err(e) => return error!(error = %e, "cannot record operation"),
                    },
                };
                run_destroy(platform.clone(), db.id.clone(), op).await;
            }
            _ => {
                for node in &db.nodes {
                    let spec = platform.node_spec(node);
                    let driver = platform.driver.clone();
                    let name = node.name.clone();
                    let started = blocking(move || {
                        if driver.is_running(&spec) {
                            Ok(false)
                        } else {
                            driver.start(&spec).map(|()| true)
                        }
                    })
                    .await;
                    match started {
                        Ok(true) => platform.event(
                            &db.id,
                            "node_started",
                            format!("node {name} started after a control plane restart"),
                        ),
                        Ok(false) => info_adopted(&db.id, &name),
                        Err(e) => platform.event(
                            &db.id,
                            "node_failed",
                            format!("node {name} did not start: {e}"),
                        ),
                    }
                }
                if let Some(mut op) = op {
                    op.error = Some("interrupted by a control plane restart".into());
                    let progress = op.progress;
                    platform.update_operation(&mut op, OperationStatus::Failed, progress);
                }
            }
        }
    }
    if let Err(e) = platform.publish_routes() {
        error!(error = %e, "cannot publish routes");
    }
}

fn info_adopted(id: &str, node: &str) {
    tracing::info!(database = id, node, "adopted running node");
}

/// Stops every node cleanly (fast shutdown: sessions end, everything committed is on disk).
pub async fn stop_all(platform: &Arc<Platform>) {
    let databases = platform.store.databases().unwrap_or_default();
    for db in databases {
        // Standbys last would make a synchronous primary wait; stop primaries first.
        let mut nodes = db.nodes.clone();
        nodes.sort_by_key(|n| n.role != NodeRole::Primary);
        for node in nodes {
            let spec = platform.node_spec(&node);
            let driver = platform.driver.clone();
            if let Err(e) = blocking(move || driver.stop(&spec)).await {
                error!(node = %node.name, error = %e, "cannot stop node");
            }
        }
    }
}
