//! Destruction: routes first (no new session reaches the nodes), then the nodes, then every
//! file kept for the database (logical backups, base backups, WAL archive, and what earlier
//! restores set aside), then its records.

use std::sync::Arc;

use pgwarden_api::control::{DatabaseStatus, NodeRole, Operation};

use super::{Lifecycle, LifecycleError};
use crate::failure::{Failure, Reportable};
use crate::nodes::{NodeError, Nodes};
use crate::routing::Routing;
use crate::state::{Records, StoreError};
use crate::storage::BackupStorage;

/// Runs the destruction of `id` as operation `op`; a failure marks the database `failed`.
pub fn run(life: &Lifecycle, id: String, op: Operation) -> tokio::task::JoinHandle<()> {
    let life = life.clone();
    life.operations.clone().run(op, move |_| async move {
        let result = destroy(&life.records, &life.nodes, &life.routing, &life.backups, &id).await;
        if let Err(e) = &result {
            super::provision::mark_failed(&life.records, &id, "destroy", &e.sentence()).await;
        }
        result
    })
}

async fn destroy(
    records: &Records,
    nodes: &Nodes,
    routing: &Routing,
    backups: &Arc<dyn BackupStorage>,
    id: &str,
) -> Result<(), LifecycleError> {
    let Some(((), db)) = records
        .update(id, |db| {
            db.status = DatabaseStatus::Deleting;
            Ok::<_, StoreError>(())
        })
        .await?
    else {
        return Err(Failure::Vanished(id.to_owned()).into());
    };
    routing.publish(&records.store).await?;
    routing.verifiers.forget(id);
    // Standbys first: a synchronous primary must not wait for a vanished standby. Then the
    // nodes of a major upgrade in progress and of the clusters one replaced.
    let mut order = db.nodes.clone();
    order.sort_by_key(|n| n.role == NodeRole::Primary);
    order.extend(db.upgrade.iter().flat_map(|u| u.nodes.iter().cloned()));
    order.extend(db.retired.iter().flat_map(|r| r.nodes.iter().cloned()));
    for node in order {
        nodes.destroy(&node).await?;
    }
    let storage = backups.clone();
    let key = id.to_owned();
    tokio::task::spawn_blocking(move || storage.purge(&key))
        .await
        .map_err(NodeError::from)?
        .map_err(LifecycleError::Purge)?;
    for backup in records.store.backups(id).await? {
        records.store.delete_backup(id, &backup.id).await?;
    }
    records.store.delete_database(id).await?;
    Ok(())
}
