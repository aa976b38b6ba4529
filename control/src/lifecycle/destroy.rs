//! Destruction: routes first (no new session reaches the nodes), then the nodes, then every
//! file kept for the database (logical backups, base backups, WAL archive, and what earlier
//! restores set aside), then its records.

use std::sync::Arc;

use pgwarden_api::control::{DatabaseStatus, NodeRole, Operation};

use super::LifecycleError;
use crate::failure::Failure;
use crate::failure::Reportable;
use crate::nodes::{blocking, NodeError};
use crate::platform::Platform;
use crate::state::StoreError;

/// Runs the destruction of `id` as operation `op`; a failure marks the database `failed`.
pub fn run(platform: &Arc<Platform>, id: String, op: Operation) -> tokio::task::JoinHandle<()> {
    let p = platform.clone();
    platform.run_operation(op, move |_| async move {
        let result = destroy(&p, &id).await;
        if let Err(e) = &result {
            super::provision::mark_failed(&p, &id, "destroy", &e.sentence());
        }
        result
    })
}

async fn destroy(platform: &Arc<Platform>, id: &str) -> Result<(), LifecycleError> {
    let Some(((), db)) = platform.update(id, |db| {
        db.status = DatabaseStatus::Deleting;
        Ok::<_, StoreError>(())
    })?
    else {
        return Err(Failure::Vanished(id.to_owned()).into());
    };
    platform.publish_routes()?;
    platform.verifiers.forget(id);
    // Standbys first: a synchronous primary must not wait for a vanished standby. Then the
    // nodes of a major upgrade in progress and of the clusters one replaced.
    let mut nodes = db.nodes.clone();
    nodes.sort_by_key(|n| n.role == NodeRole::Primary);
    nodes.extend(db.upgrade.iter().flat_map(|u| u.nodes.iter().cloned()));
    nodes.extend(db.retired.iter().flat_map(|r| r.nodes.iter().cloned()));
    for node in nodes {
        let (driver, spec) = (platform.driver.clone(), platform.node_spec(&node));
        blocking(move || driver.destroy(&spec)).await?;
    }
    let storage = platform.backups.clone();
    let key = id.to_owned();
    tokio::task::spawn_blocking(move || storage.purge(&key))
        .await
        .map_err(NodeError::from)?
        .map_err(LifecycleError::Purge)?;
    for backup in platform.store.backups(id)? {
        platform.store.delete_backup(id, &backup.id)?;
    }
    platform.store.delete_database(id)?;
    Ok(())
}
