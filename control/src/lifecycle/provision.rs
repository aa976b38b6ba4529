//! Provisioning: certificates, ports, `initdb` of the primary (checksums, SCRAM, TLS), the
//! roles and database, then on business plans a standby copied with `pg_basebackup` over TLS
//! and made synchronous; then the routing table is published. A failure marks the database
//! `failed` with the cause (a node's own log line when a node would not start).

use pgwarden_api::control::{DatabaseStatus, Operation};

use super::standby::add_standby;
use super::{Lifecycle, LifecycleError};
use crate::failure::{Failure, Reportable};
use crate::nodes::config::REPLICATION_ROLE;
use crate::nodes::placement;
use crate::nodes::{roles, NodeSpec, Nodes};
use crate::operations::Progress;
use crate::plans;
use crate::routing::Routing;
use crate::state::Records;

/// Runs the provisioning of `id` as operation `op`; a failure marks the database `failed`.
pub fn run(life: &Lifecycle, id: String, op: Operation) -> tokio::task::JoinHandle<()> {
    let life = life.clone();
    life.operations.clone().run(op, move |progress| async move {
        let turn = life.provisions.acquire().await;
        let result = provision(&life.records, &life.nodes, &life.routing, &id, progress).await;
        drop(turn);
        if let Err(e) = &result {
            mark_failed(&life.records, &id, "provision", &e.sentence()).await;
        }
        result
    })
}

/// Records why a lifecycle operation on `id` failed, and the database as `failed`.
pub async fn mark_failed(records: &Records, id: &str, kind: &str, message: &str) {
    let _ = records
        .update(id, |db| {
            db.status = DatabaseStatus::Failed;
            db.error = Some(message.to_owned());
            Ok::<_, crate::state::StoreError>(())
        })
        .await;
    records.event(id, &format!("{kind}_failed"), message.to_owned()).await;
}

async fn provision(
    records: &Records,
    nodes: &Nodes,
    routing: &Routing,
    id: &str,
    mut op: Progress,
) -> Result<(), LifecycleError> {
    let mut db =
        records.store.database(id).await?.ok_or_else(|| Failure::Vanished(id.to_owned()))?;
    let plan = plans::find(&db.plan).ok_or_else(|| LifecycleError::UnknownPlan(db.plan.clone()))?;
    // Start from a clean slate: a provisioning interrupted earlier may have left nodes behind.
    for node in std::mem::take(&mut db.nodes) {
        nodes.destroy(&node).await?;
    }
    db.nodes = placement::new_nodes(
        &nodes.hosts,
        &nodes.ports,
        &records.store.databases().await?,
        id,
        db.engine.as_deref(),
        1,
        plan.nodes as usize,
    );
    records.store.put_database(&db).await?;

    let primary = db.primary().cloned().ok_or_else(|| Failure::NoPrimary(id.to_owned()))?;
    let primary_spec = NodeSpec::of(&primary);
    let config = nodes.config(&db, &primary, None)?;
    let (driver, spec) = (&nodes.driver, &primary_spec);
    driver.init(spec, &config).await?;
    driver.start(spec).await?;
    op.set(0.4).await;
    records
        .event(
            id,
            "node_started",
            format!("primary {} started on port {}", primary.name, primary.port),
        )
        .await;

    let admin = nodes.session(&primary_spec, "postgres").await?;
    roles::create_role(&admin, REPLICATION_ROLE, &db.replication_password, "REPLICATION").await?;
    roles::create_role(&admin, &db.name, &db.password, "").await?;
    roles::create_database(&admin, &db.name, &db.name).await?;
    let db_admin = nodes.session(&primary_spec, &db.name).await?;
    roles::grant(&db_admin, &db.name, &db.name, &db.name, false).await?;
    op.set(0.6).await;

    for standby in db.replicas().cloned().collect::<Vec<_>>() {
        add_standby(records, nodes, &db, &standby).await?;
        db.synchronous = true;
        op.set(0.9).await;
    }

    // The proxies authenticate the first client already: the verifiers go with the first table.
    routing.verifiers.set(id, roles::verifiers(&admin).await?);
    db.status = DatabaseStatus::Running;
    db.error = None;
    records.store.put_database(&db).await?;
    let epoch = routing.publish(&records.store).await?;
    records
        .event(
            id,
            "provisioned",
            format!(
                "database {} is running ({} node(s)), routing epoch {epoch}",
                db.name,
                db.nodes.len()
            ),
        )
        .await;
    Ok(())
}
