//! Provisioning: certificates, ports, `initdb` of the primary (checksums, SCRAM, TLS), the
//! roles and database, then on business plans a standby copied with `pg_basebackup` over TLS
//! and made synchronous; then the routing table is published. A failure marks the database
//! `failed` with the cause (a node's own log line when a node would not start).

use std::sync::Arc;

use pgwarden_api::control::{DatabaseStatus, Operation};

use crate::lifecycle::standby::add_standby;
use crate::nodes::config::REPLICATION_ROLE;
use crate::nodes::{blocking, roles};
use crate::plans;
use crate::platform::operations::Progress;
use crate::platform::Platform;

/// Runs the provisioning of `id` as operation `op`; a failure marks the database `failed`.
pub fn run(platform: &Arc<Platform>, id: String, op: Operation) -> tokio::task::JoinHandle<()> {
    let p = platform.clone();
    platform.run_operation(op, move |progress| async move {
        let result = provision(&p, &id, progress).await;
        if let Err(message) = &result {
            mark_failed(&p, &id, "provision", message);
        }
        result
    })
}

/// Records why a lifecycle operation on `id` failed, and the database as `failed`.
pub fn mark_failed(platform: &Platform, id: &str, kind: &str, message: &str) {
    let _ = platform.update(id, |db| {
        db.status = DatabaseStatus::Failed;
        db.error = Some(message.to_owned());
        Ok::<_, crate::state::StoreError>(())
    });
    platform.event(id, &format!("{kind}_failed"), message.to_owned());
}

async fn provision(platform: &Arc<Platform>, id: &str, mut op: Progress) -> Result<(), String> {
    let mut db = platform
        .store
        .database(id)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("database {id} vanished"))?;
    let plan = plans::find(&db.plan).ok_or_else(|| format!("unknown plan {}", db.plan))?;
    // Start from a clean slate: a provisioning interrupted earlier may have left nodes behind.
    for node in std::mem::take(&mut db.nodes) {
        let (driver, spec) = (platform.driver.clone(), platform.node_spec(&node));
        blocking(move || driver.destroy(&spec)).await?;
    }
    db.nodes = platform.new_nodes(id, 1, plan.nodes as usize).map_err(|e| e.to_string())?;
    platform.store.put_database(&db).map_err(|e| e.to_string())?;

    let primary = db.primary().cloned().ok_or("no primary")?;
    let primary_spec = platform.node_spec(&primary);
    let config = platform.node_config(&db, &primary, None).map_err(|e| e.to_string())?;
    let (driver, spec) = (platform.driver.clone(), primary_spec.clone());
    blocking(move || {
        driver.init(&spec, &config)?;
        driver.start(&spec)
    })
    .await?;
    op.set(0.4);
    platform.event(
        id,
        "node_started",
        format!("primary {} started on port {}", primary.name, primary.port),
    );

    let admin = platform.session(&primary_spec, "postgres").await.map_err(|e| e.to_string())?;
    roles::create_role(&admin, REPLICATION_ROLE, &db.replication_password, "REPLICATION")
        .await
        .map_err(|e| e.to_string())?;
    roles::create_role(&admin, &db.name, &db.password, "").await.map_err(|e| e.to_string())?;
    roles::create_database(&admin, &db.name, &db.name).await.map_err(|e| e.to_string())?;
    let db_admin = platform.session(&primary_spec, &db.name).await.map_err(|e| e.to_string())?;
    roles::grant(&db_admin, &db.name, &db.name, &db.name, false)
        .await
        .map_err(|e| e.to_string())?;
    op.set(0.6);

    for standby in db.replicas().cloned().collect::<Vec<_>>() {
        add_standby(platform, &db, &standby).await?;
        db.synchronous = true;
        op.set(0.9);
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
