//! What a major upgrade leaves behind: a new cluster a control plane restart cut before its
//! swap (rolled back), and the old clusters kept stopped for the rollback window, then removed.

use std::time::Duration;

use pgwarden_api::control::{DatabaseStatus, Operation, OperationStatus};
use time::OffsetDateTime;
use tracing::warn;

use super::major::{clean_up, stop_nodes};
use super::plan::set_status;
use super::Changes;
use crate::state::StoreError;

/// A major upgrade a control plane restart cut before its swap: rolled back, its operation
/// failed with the reason.
pub fn rollback_interrupted(changes: &Changes, id: String, op: Option<Operation>) {
    let changes = changes.clone();
    tokio::spawn(async move {
        clean_up(&changes.records, &changes.nodes, &id).await;
        let _ = set_status(&changes.records, &id, DatabaseStatus::Running).await;
        if let Some(mut op) = op {
            op.error = Some(
                "interrupted by a control plane restart; rolled back: the database stays on its \
                 current cluster"
                    .into(),
            );
            let at = op.progress;
            changes.operations.update(&mut op, OperationStatus::Failed, at).await;
        }
    });
}

/// Keeps retired clusters stopped and removes them when their rollback window ends; rolls back
/// an upgrade its control plane left behind without an operation. Runs until `shutdown`.
pub async fn supervise_retired(changes: Changes, shutdown: tokio_util::sync::CancellationToken) {
    loop {
        for db in changes.records.store.databases().await.unwrap_or_default() {
            if db.upgrade.is_some()
                && db.status == DatabaseStatus::Running
                && !changes.claims.busy(&db.id)
            {
                clean_up(&changes.records, &changes.nodes, &db.id).await;
            }
            let now = OffsetDateTime::now_utc();
            for cluster in &db.retired {
                let due = OffsetDateTime::parse(
                    &cluster.remove_after,
                    &time::format_description::well_known::Rfc3339,
                )
                .is_ok_and(|t| t <= now);
                if !due {
                    stop_nodes(&changes.nodes, &cluster.nodes).await;
                    continue;
                }
                let mut removed = true;
                for node in &cluster.nodes {
                    if let Err(e) = changes.nodes.destroy(node).await {
                        warn!(node = %node.name, error = %e, "cannot remove a retired node");
                        removed = false;
                    }
                }
                if removed {
                    let names: Vec<String> = cluster.nodes.iter().map(|n| n.name.clone()).collect();
                    let _ = changes
                        .records
                        .update(&db.id, |db| {
                            db.retired.retain(|r| r.remove_after != cluster.remove_after);
                            Ok::<_, StoreError>(())
                        })
                        .await;
                    changes
                        .records
                        .event(
                            &db.id,
                            "old_cluster_removed",
                            format!(
                                "the PostgreSQL {} nodes {} were removed (rollback window over)",
                                cluster.version,
                                names.join(", ")
                            ),
                        )
                        .await;
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
            () = shutdown.cancelled() => return,
        }
    }
}
