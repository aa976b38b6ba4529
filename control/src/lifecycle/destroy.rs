//! Destruction: routes first (no new session reaches the nodes), then the nodes, then every
//! file kept for the database (logical backups, base backups, WAL archive, and what earlier
//! restores set aside), then its records.

use std::sync::Arc;

use pgwarden_api::control::{DatabaseStatus, NodeRole, Operation};

use crate::nodes::blocking;
use crate::platform::Platform;
use crate::state::StoreError;

/// Runs the destruction of `id` as operation `op`; a failure marks the database `failed`.
pub fn run(platform: &Arc<Platform>, id: String, op: Operation) -> tokio::task::JoinHandle<()> {
    let p = platform.clone();
    platform.run_operation(op, move |_| async move {
        let result = destroy(&p, &id).await;
        if let Err(message) = &result {
            super::provision::mark_failed(&p, &id, "destroy", message);
        }
        result
    })
}

async fn destroy(platform: &Arc<Platform>, id: &str) -> Result<(), String> {
    let Some(((), db)) = platform
        .update(id, |db| {
            db.status = DatabaseStatus::Deleting;
            Ok::<_, StoreError>(())
        })
        .map_err(|e| e.to_string())?
    else {
        return Err(format!("database {id} vanished"));
    };
    platform.publish_routes().map_err(|e| e.to_string())?;
    // Standbys first: a synchronous primary must not wait for a vanished standby.
    let mut nodes = db.nodes.clone();
    nodes.sort_by_key(|n| n.role == NodeRole::Primary);
    for node in nodes {
        let (driver, spec) = (platform.driver.clone(), platform.node_spec(&node));
        blocking(move || driver.destroy(&spec)).await?;
    }
    let storage = platform.backups.clone();
    let key = id.to_owned();
    tokio::task::spawn_blocking(move || storage.purge(&key))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot remove the database's backups: {e}"))?;
    for backup in platform.store.backups(id).map_err(|e| e.to_string())? {
        platform.store.delete_backup(id, &backup.id).map_err(|e| e.to_string())?;
    }
    platform.store.delete_database(id).map_err(|e| e.to_string())?;
    Ok(())
}
