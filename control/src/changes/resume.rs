//! A plan change or engine upgrade cut short by a control plane restart (kill -9 included) is
//! finished on the next start, never left half-done. The record already names the target (the
//! new plan, each node's build): every node is restarted on what its record says, in the order
//! that keeps the database serving and PostgreSQL's rules satisfied —
//!
//! - one node: a restart under a hold;
//! - with standbys, raising (or same) `max_connections`: standbys first, then a switchover, and
//!   the old primary rejoins on the new configuration;
//! - lowering: the primary first under a hold, then each standby once it replayed the primary's
//!   record of the lower value.
//!
//! A major upgrade cut before its swap is rolled back instead (`retired::rollback_interrupted`):
//! the old cluster never stopped serving.
//!
//! Nodes already on the target restart once more: simpler than finding out which are, and a
//! planned restart is invisible to new connections. A change that was adding or removing a
//! standby is not resumed: the watcher restarts or rejoins the standby the record names.

use pgwarden_api::control::{DatabaseStatus, NodeRole, Operation, OperationStatus};

use super::plan::{
    restart_primary_held, restart_standby, set_status, wait_replayed, wait_synchronous_again,
};
use super::{ChangeError, Changes};
use crate::failure::{Failure, Reportable};
use crate::ha::switchover::switchover;
use crate::ha::ChangeGuard;
use crate::nodes::{NodeSpec, Nodes};
use crate::operations::Progress;
use crate::routing::Routing;
use crate::state::Records;
use crate::{plans, wait};

/// A plan change or engine upgrade that a control plane restart cut short.
pub struct Interrupted {
    pub database: String,
    /// A major upgrade (rolled back, not finished: it was cut before its swap).
    pub major: bool,
    /// The operation it ran as.
    pub op: Operation,
}

/// Finishes every change `left` holds, each as its operation (the interrupted one, which then
/// succeeds or fails with the reason).
pub async fn resume_interrupted(with: &Changes, changes: Vec<Interrupted>) {
    for Interrupted { database: id, major, op } in changes {
        if major {
            // A major upgrade before its swap: the old cluster still serves; the new one goes.
            tracing::warn!(database = %id, operation = %op.id, "rolling back an interrupted major upgrade");
            super::retired::rollback_interrupted(with, id, Some(op));
            continue;
        }
        let Some(claim) = with.claims.try_planned(&id) else {
            // A failover claimed the primary first; it settles the database. The operation
            // ends too: a client polling it must not wait forever.
            let _ = set_status(&with.records, &id, DatabaseStatus::Running).await;
            let mut op = op;
            op.error = Some("interrupted by a control plane restart, then by a failover".into());
            let at = op.progress;
            with.operations.update(&mut op, OperationStatus::Failed, at).await;
            continue;
        };
        tracing::warn!(database = %id, operation = %op.id, "finishing an interrupted change");
        let w = with.clone();
        with.operations.run(op, move |progress| async move {
            resume(&w.records, &w.nodes, &w.routing, claim, &id, progress).await
        });
    }
}

/// Finishes the interrupted change of `id`; `claim` is its planned-change claim.
pub async fn resume(
    records: &Records,
    nodes: &Nodes,
    routing: &Routing,
    claim: ChangeGuard,
    id: &str,
    mut op: Progress,
) -> Result<(), ChangeError> {
    let db = set_status(records, id, DatabaseStatus::Updating).await?;
    records
        .event(
            id,
            "change_resumed",
            format!(
                "finishing the change to plan {} cut short by a control plane restart",
                db.plan
            ),
        )
        .await;
    let result = run(records, nodes, routing, claim, id, &mut op).await;
    let _ = set_status(records, id, DatabaseStatus::Running).await;
    match &result {
        Ok(()) => {
            records.event(id, "change_finished", "every node runs what its record says").await
        }
        Err(e) => records.event(id, "change_resume_failed", e.sentence()).await,
    }
    result
}

/// Waits until `node` accepts sessions, starting it if it is stopped: the killed control plane
/// may have left it stopping (a `pg_ctl stop` it started outlives it) or stopped.
async fn serving(nodes: &Nodes, node: &crate::state::NodeRecord) -> Result<(), ChangeError> {
    let spec = &NodeSpec::of(node);
    let limit = std::time::Duration::from_secs(60);
    let serves = wait::until_true(limit, wait::SLOW, || async move {
        if nodes.session(spec, "postgres").await.is_ok() {
            return true;
        }
        // Not running (any more): start it; running (starting or stopping): wait.
        if !nodes.driver.is_running(spec).await {
            let _ = nodes.driver.start(spec).await;
        }
        false
    });
    if serves.await {
        return Ok(());
    }
    // The last attempt's error says why.
    nodes.session(spec, "postgres").await.map(drop).map_err(Into::into)
}

async fn run(
    records: &Records,
    nodes: &Nodes,
    routing: &Routing,
    claim: ChangeGuard,
    id: &str,
    op: &mut Progress,
) -> Result<(), ChangeError> {
    let db = records.store.database(id).await?.ok_or_else(|| Failure::Vanished(id.to_owned()))?;
    let plan = plans::find(&db.plan).ok_or_else(|| ChangeError::UnknownPlan(db.plan.clone()))?;
    let what = format!("plan {} (resumed)", db.plan);
    let primary = db.primary().cloned().ok_or_else(|| Failure::NoPrimary(id.to_owned()))?;
    serving(nodes, &primary).await?;
    // A fenced standby (an old primary the cut switchover left) is rejoined by the watcher,
    // on the configuration its record names.
    let standbys: Vec<_> =
        db.nodes.iter().filter(|n| n.role == NodeRole::Replica && !n.fenced).collect();
    if standbys.is_empty() {
        op.set(0.3).await;
        restart_primary_held(records, nodes, routing, &claim, &db, &primary, &what).await?;
        drop(claim);
        return if db.nodes.len() > 1 { wait_synchronous_again(records, id).await } else { Ok(()) };
    }
    let admin = nodes.session(&NodeSpec::of(&primary), "postgres").await?;
    let live: String = admin.query_one("SHOW max_connections", &[]).await?.get(0);
    drop(admin);
    if live.parse::<u32>().is_ok_and(|live| plan.max_connections < live) {
        restart_primary_held(records, nodes, routing, &claim, &db, &primary, &what).await?;
        op.set(0.5).await;
        for standby in standbys {
            wait_replayed(nodes, &claim, &primary, standby).await?;
            restart_standby(records, nodes, &claim, &db, &primary, standby, &what).await?;
        }
        return Ok(());
    }
    for standby in &standbys {
        restart_standby(records, nodes, &claim, &db, &primary, standby, &what).await?;
    }
    op.set(0.4).await;
    let target = standbys.iter().find(|s| !s.fenced).map(|s| s.name.clone());
    switchover(records, nodes, routing, &claim, id, target.as_deref()).await?;
    op.set(0.7).await;
    drop(claim);
    wait_synchronous_again(records, id).await
}
