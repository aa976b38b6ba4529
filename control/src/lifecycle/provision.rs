//! Provisioning: certificates, ports, `initdb` of the primary (checksums, SCRAM, TLS), the
//! roles and database, then on business plans a standby copied with `pg_basebackup` over TLS
//! and made synchronous; then the routing table is published. A failure marks the database
//! `failed` with the cause (a node's own log line when a node would not start).

use std::sync::Arc;

use pgwarden_api::control::{DatabaseStatus, Operation};

use super::standby::add_standby;
use super::LifecycleError;
use crate::failure::Failure;
use crate::failure::Reportable;
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
        if let Err(e) = &result {
            mark_failed(&p, &id, "provision", &e.sentence());
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

async fn provision(
    platform: &Arc<Platform>,
    id: &str,
    mut op: Progress,
) -> Result<(), LifecycleError> {
    let mut db = platform.store.database(id)?.ok_or_else(|| Failure::Vanished(id.to_owned()))?;
    let plan = plans::find(&db.plan).ok_or_else(|| LifecycleError::UnknownPlan(db.plan.clone()))?;
    // Start from a clean slate: a provisioning interrupted earlier may have left nodes behind.
    for node in std::mem::take(&mut db.nodes) {
        let (driver, spec) = (platform.driver.clone(), platform.node_spec(&node));
        blocking(move || driver.destroy(&spec)).await?;
    }
    db.nodes = platform.new_nodes(id, db.engine.as_deref(), 1, plan.nodes as usize)?;
    platform.store.put_database(&db)?;

    let primary = db.primary().cloned().ok_or_else(|| Failure::NoPrimary(id.to_owned()))?;
    let primary_spec = platform.node_spec(&primary);
    let config = platform.node_config(&db, &primary, None)?;
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

    let admin = platform.session(&primary_spec, "postgres").await?;
    roles::create_role(&admin, REPLICATION_ROLE, &db.replication_password, "REPLICATION").await?;
    roles::create_role(&admin, &db.name, &db.password, "").await?;
    roles::create_database(&admin, &db.name, &db.name).await?;
    let db_admin = platform.session(&primary_spec, &db.name).await?;
    roles::grant(&db_admin, &db.name, &db.name, &db.name, false).await?;
    op.set(0.6);

    for standby in db.replicas().cloned().collect::<Vec<_>>() {
        add_standby(platform, &db, &standby).await?;
        db.synchronous = true;
        op.set(0.9);
    }

    // The proxies authenticate the first client already: the verifiers go with the first table.
    platform.verifiers.set(id, roles::verifiers(&admin).await?);
    db.status = DatabaseStatus::Running;
    db.error = None;
    platform.store.put_database(&db)?;
    let epoch = platform.publish_routes()?;
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
