//! What a start of the control plane does with what the previous run left: nodes of settled
//! databases are adopted (running) or started (`adopt_nodes`), supervision starts, and only then
//! are interrupted provisionings and destructions resumed (`resume_operations`), each as its own
//! task, so that no resumed operation delays a failover. Plan changes and engine upgrades cut
//! short are finished by `changes::resume` (the server starts it with
//! `Leftovers::interrupted_changes`).

use std::sync::Arc;

use pgwarden_api::control::{DatabaseStatus, NodeRole, Operation, OperationStatus};
use tracing::{error, info, warn};

use crate::changes::resume::Interrupted;
use crate::nodes::{NodeSpec, Nodes};
use crate::platform::Platform;
use crate::state::{DatabaseRecord, Records, StoreError};

/// What the previous run left, read before the API serves: anything the API starts afterwards
/// is this run's own, never taken for interrupted work.
pub struct Leftovers {
    databases: Vec<DatabaseRecord>,
    operations: Vec<Operation>,
}

/// Operations that leave a database `updating` and that a restart finishes (`changes::resume`).
pub const RESUMABLE_CHANGES: [&str; 2] = ["plan_change", "engine_upgrade"];

impl Leftovers {
    /// The databases a plan change or engine upgrade left `updating`, with that operation.
    pub fn interrupted_changes(&self) -> Vec<Interrupted> {
        self.databases
            .iter()
            .filter(|db| db.status == DatabaseStatus::Updating)
            .filter_map(|db| {
                let op = self.operations.iter().find(|o| {
                    o.database_id == db.id && RESUMABLE_CHANGES.contains(&o.kind.as_str())
                })?;
                Some(Interrupted {
                    database: db.id.clone(),
                    major: db.upgrade.is_some(),
                    op: op.clone(),
                })
            })
            .collect()
    }

    pub async fn read(records: &Records) -> Result<Self, StoreError> {
        let operations = records
            .store
            .operations()
            .await?
            .into_iter()
            .filter(|o| matches!(o.status, OperationStatus::Pending | OperationStatus::Running))
            .collect();
        Ok(Self { databases: records.store.databases().await?, operations })
    }
}

/// Marks database `id` running again and records why, as event `kind`.
async fn running_again(records: &Records, id: &str, kind: &str, why: String) {
    let _ = records
        .update(id, |db| {
            db.status = DatabaseStatus::Running;
            Ok::<_, StoreError>(())
        })
        .await;
    records.event(id, kind, why).await;
}

/// Starts the stopped nodes of every settled database and fails the operations a restart
/// interrupted on them; publishes the routes. Returns once every node was started or given up.
pub async fn adopt_nodes(platform: &Arc<Platform>, left: &Leftovers) {
    let interrupted = &left.operations;
    let resumable: Vec<String> =
        left.interrupted_changes().into_iter().map(|c| c.database).collect();
    for db in left.databases.iter().cloned() {
        if matches!(db.status, DatabaseStatus::Provisioning | DatabaseStatus::Deleting) {
            continue;
        }
        let resumed = resumable.contains(&db.id);
        // Primaries first: a standby starts streaming at once.
        let mut nodes = db.nodes.clone();
        nodes.sort_by_key(|n| n.role != NodeRole::Primary);
        // A fenced node (a former primary) stays down: started, it would serve writes as a
        // second primary. The watcher brings it back as a standby.
        for node in nodes.into_iter().filter(|n| !n.fenced) {
            let (driver, spec) = (&platform.nodes.driver, NodeSpec::of(&node));
            let started = async move {
                if driver.is_running(&spec).await {
                    Ok(false)
                } else {
                    driver.start(&spec).await.map(|()| true)
                }
            }
            .await;
            match started {
                Ok(true) => {
                    platform
                        .records
                        .event(
                            &db.id,
                            "node_started",
                            format!("node {} started after a control plane restart", node.name),
                        )
                        .await
                }
                Ok(false) => info!(database = %db.id, node = %node.name, "adopted running node"),
                Err(e) => {
                    platform
                        .records
                        .event(
                            &db.id,
                            "node_failed",
                            format!("node {} did not start: {e}", node.name),
                        )
                        .await
                }
            }
        }
        if db.status == DatabaseStatus::Updating && !resumed {
            // A change with no operation to finish: the database serves on what its nodes run.
            let why = format!(
                "plan change interrupted by a control plane restart; the record names plan {}",
                db.plan
            );
            running_again(&platform.records, &db.id, "plan_change_failed", why).await;
        }
        if db.status == DatabaseStatus::Restoring {
            // Nothing of the current nodes is touched before a restore succeeded.
            let why = "restore interrupted by a control plane restart; the database is as it was";
            running_again(&platform.records, &db.id, "restore_failed", why.to_owned()).await;
        }
        let left_op = interrupted.iter().find(|o| o.database_id == db.id).cloned();
        if let Some(mut op) = left_op.filter(|_| !resumed) {
            op.error = Some("interrupted by a control plane restart".into());
            let progress = op.progress;
            platform.operations.update(&mut op, OperationStatus::Failed, progress).await;
        }
    }
    // The first table carries the verifiers: proxies that restarted with this control plane
    // authenticate clients from the start.
    crate::routing::refresh::refresh_all(&platform.refresh()).await;
    if let Err(e) = platform.routing.publish(&platform.records.store).await {
        error!(error = %e, "cannot publish routes");
    }
}

/// Resumes interrupted provisionings and destructions, each as its own task.
pub async fn resume_operations(platform: &Arc<Platform>, left: Leftovers) {
    let interrupted = left.operations;
    for db in left.databases {
        let (kind, label) = match db.status {
            DatabaseStatus::Provisioning => ("provision", "provisioning"),
            DatabaseStatus::Deleting => ("destroy", "destruction"),
            _ => continue,
        };
        warn!(database = %db.id, "{label} was interrupted; starting it again");
        platform
            .records
            .event(
                &db.id,
                &format!("{kind}_resumed"),
                format!("{label} interrupted by a control plane restart; starting again"),
            )
            .await;
        let op = match interrupted.iter().find(|o| o.database_id == db.id).cloned() {
            Some(op) => op,
            None => match platform.operations.new_operation(kind, &db.id).await {
                Ok(op) => op,
                Err(e) => {
                    error!(error = %e, "cannot record operation");
                    continue;
                }
            },
        };
        if kind == "provision" {
            crate::lifecycle::provision::run(&platform.lifecycle(), db.id.clone(), op);
        } else {
            crate::lifecycle::destroy::run(&platform.lifecycle(), db.id.clone(), op);
        }
    }
}

/// How many databases are stopped at once: a node's fast shutdown is mostly its checkpoint's
/// writes, and one after the other a thousand of them took minutes.
const STOP_AT_ONCE: usize = 16;

/// Stops every node cleanly (fast shutdown: sessions end, everything committed is on disk),
/// [`STOP_AT_ONCE`] databases at a time.
pub async fn stop_all(records: &Records, nodes: &Arc<Nodes>) {
    let databases = records.store.databases().await.unwrap_or_default();
    let room = Arc::new(tokio::sync::Semaphore::new(STOP_AT_ONCE));
    let mut stopping = tokio::task::JoinSet::new();
    for db in databases {
        let (nodes, room) = (Arc::clone(nodes), Arc::clone(&room));
        stopping.spawn(async move {
            let Ok(_turn) = room.acquire_owned().await else { return };
            // Standbys last would make a synchronous primary wait; stop primaries first.
            let mut order = db.nodes.clone();
            order.sort_by_key(|n| n.role != NodeRole::Primary);
            for node in order {
                let (driver, spec) = (&nodes.driver, NodeSpec::of(&node));
                if let Err(e) = driver.stop(&spec).await {
                    error!(node = %node.name, error = %e, "cannot stop node");
                }
            }
        });
    }
    while stopping.join_next().await.is_some() {}
}
