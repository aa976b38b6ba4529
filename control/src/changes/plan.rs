//! Plan changes (SPEC §3, §4 `PATCH /v1/databases/{id}`), as one operation per database while
//! it is `updating`:
//!
//! - one node before and after: the node restarts on the new parameters while the proxies hold
//!   new sessions (established ones end with `57P01`);
//! - two nodes before and after: rolling. PostgreSQL wants a hot standby's `max_connections` at
//!   least the primary's, so a raise goes standby first (restart it, then a switchover makes it
//!   the primary, and the old primary rejoins on the new parameters) and a lowering goes primary
//!   first (restart it under a hold, then the standby);
//! - one node to two: the primary changes first if its parameters do, then a standby is copied
//!   and made synchronous;
//! - two nodes to one: commits become asynchronous, the standby goes, then the primary changes
//!   if its parameters do.
//!
//! The change holds the database's planned-change claim: a failover preempts it if the primary
//! fails meanwhile, and the change then fails with the reason.

use std::future::Future;
use std::time::{Duration, Instant};

use pgwarden_api::control::{DatabaseStatus, NodeRole, Plan};

use super::{update_record, ChangeError};
use crate::failure::{Failure, Reportable};
use crate::ha::switchover::switchover;
use crate::ha::ChangeGuard;
use crate::lifecycle::standby::add_standby;
use crate::nodes::config::slot_name;
use crate::nodes::placement;
use crate::nodes::{NodeConfig, NodeSpec, Nodes};
use crate::operations::Progress;
use crate::routing::Routing;
use crate::state::{DatabaseRecord, NodeRecord, Records, StoreError};
use crate::{plans, wait};

/// How long the proxies may take to apply a table, and a restarted node to stream again.
const APPLY_TIMEOUT: Duration = Duration::from_secs(3);
const STREAMING_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the old primary may take to rejoin as a synchronous standby after the switchover.
const REJOIN_TIMEOUT: Duration = Duration::from_secs(120);

/// Why a plan change is refused before anything moves.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("unknown plan {0:?}; valid plans: {1}")]
    UnknownPlan(String, String),
    #[error("database {0} is already on plan {1}")]
    SamePlan(String, String),
}

/// The plan a change of `db` to `name` leads to, or why it cannot be done.
pub fn check(db: &DatabaseRecord, name: &str) -> Result<Plan, Refusal> {
    let plan = plans::find(name)
        .ok_or_else(|| Refusal::UnknownPlan(name.to_owned(), plans::names().join(", ")))?;
    if plan.name == db.plan {
        return Err(Refusal::SamePlan(db.id.clone(), db.plan.clone()));
    }
    Ok(plan)
}

/// Changes `id` to `plan`; `claim` is its planned-change claim, taken by the caller. On failure
/// the database is `running` again on what it had (the record names the plan its nodes run).
pub async fn change(
    records: &Records,
    nodes: &Nodes,
    routing: &Routing,
    claim: ChangeGuard,
    id: &str,
    plan: Plan,
    mut op: Progress,
) -> Result<(), ChangeError> {
    let old = set_status(records, id, DatabaseStatus::Updating).await?;
    records.event(id, "plan_change_started", format!("from {} to {}", old.plan, plan.name)).await;
    let result = run(records, nodes, routing, claim, &old, &plan, &mut op).await;
    let _ = set_status(records, id, DatabaseStatus::Running).await;
    match &result {
        Ok(()) => records.event(id, "plan_changed", format!("now on plan {}", plan.name)).await,
        Err(e) => records.event(id, "plan_change_failed", e.sentence()).await,
    }
    result
}

pub(super) async fn set_status(
    records: &Records,
    id: &str,
    status: DatabaseStatus,
) -> Result<DatabaseRecord, ChangeError> {
    update_record(records, id, |db| db.status = status).await
}

/// Records `plan` as the database's; returns the record.
async fn record_plan(
    records: &Records,
    id: &str,
    plan: &Plan,
) -> Result<DatabaseRecord, ChangeError> {
    update_record(records, id, |db| db.plan = plan.name.clone()).await
}

async fn run(
    records: &Records,
    nodes: &Nodes,
    routing: &Routing,
    claim: ChangeGuard,
    old: &DatabaseRecord,
    plan: &Plan,
    op: &mut Progress,
) -> Result<(), ChangeError> {
    let id = old.id.as_str();
    let old_plan =
        plans::find(&old.plan).ok_or_else(|| ChangeError::UnknownPlan(old.plan.clone()))?;
    let parameters_change = plans::parameters(&old_plan) != plans::parameters(plan);
    let primary = old.primary().cloned().ok_or_else(|| Failure::NoPrimary(id.to_owned()))?;
    let standbys: Vec<NodeRecord> =
        old.nodes.iter().filter(|n| n.role == NodeRole::Replica).cloned().collect();
    match (standbys.is_empty(), plan.nodes) {
        (true, 1) => {
            let db = record_plan(records, id, plan).await?;
            op.set(0.3).await;
            restart_primary_held(records, nodes, routing, &claim, &db, &primary, &on_plan(&db))
                .await?;
        }
        (false, n) if n > 1 => {
            let raising = plan.max_connections >= old_plan.max_connections;
            if raising {
                // Standby first, then the switchover makes it the primary.
                let db = record_plan(records, id, plan).await?;
                for standby in &standbys {
                    restart_standby(records, nodes, &claim, &db, &primary, standby, &on_plan(&db))
                        .await?;
                }
                op.set(0.4).await;
                let target = standbys.iter().find(|s| !s.fenced).map(|s| s.name.clone());
                switchover(records, nodes, routing, &claim, id, target.as_deref()).await?;
                op.set(0.7).await;
                // The watcher rejoins the old primary (on the new parameters: the record names
                // the new plan) and makes commits synchronous again.
                drop(claim);
                wait_synchronous_again(records, id).await?;
            } else {
                // Primary first: a standby may have more connections than its primary. The
                // standby restarts on the lower values only once it has replayed the
                // primary's record of them (until then it refuses them at start).
                let db = record_plan(records, id, plan).await?;
                restart_primary_held(records, nodes, routing, &claim, &db, &primary, &on_plan(&db))
                    .await?;
                op.set(0.5).await;
                for standby in &standbys {
                    wait_replayed(nodes, &claim, &primary, standby).await?;
                    restart_standby(records, nodes, &claim, &db, &primary, standby, &on_plan(&db))
                        .await?;
                }
            }
        }
        (true, _) => {
            // One node to two: the primary first if its parameters change, then a standby.
            let db = record_plan(records, id, plan).await?;
            if parameters_change {
                restart_primary_held(records, nodes, routing, &claim, &db, &primary, &on_plan(&db))
                    .await?;
            }
            op.set(0.4).await;
            add_standbys(records, nodes, routing, id, plan).await?;
        }
        (false, _) => {
            // Two nodes to one: asynchronous commits, the standby goes, then the primary.
            remove_standbys(records, nodes, routing, id, &primary, &standbys).await?;
            op.set(0.5).await;
            let db = record_plan(records, id, plan).await?;
            if parameters_change {
                restart_primary_held(records, nodes, routing, &claim, &db, &primary, &on_plan(&db))
                    .await?;
            }
        }
    }
    Ok(())
}

/// How an event names the plan a node restarted on.
fn on_plan(db: &DatabaseRecord) -> String {
    format!("plan {}", db.plan)
}

/// Runs `work` unless a failover takes over first.
async fn step<T, E: Into<ChangeError>>(
    claim: &ChangeGuard,
    work: impl Future<Output = Result<T, E>>,
) -> Result<T, ChangeError> {
    tokio::select! {
        r = work => r.map_err(Into::into),
        () = claim.cancelled() => Err(ChangeError::Preempted),
    }
}

/// Rewrites `node`'s configuration for `db` and restarts it.
async fn restart(nodes: &Nodes, node: &NodeRecord, config: NodeConfig) -> Result<(), ChangeError> {
    let (driver, spec) = (&nodes.driver, NodeSpec::of(node));
    driver.configure(&spec, &config).await?;
    driver.stop(&spec).await?;
    driver.start(&spec).await?;
    Ok(())
}

/// Restarts the primary on `db`'s parameters while the proxies hold new sessions.
pub(super) async fn restart_primary_held(
    records: &Records,
    nodes: &Nodes,
    routing: &Routing,
    claim: &ChangeGuard,
    db: &DatabaseRecord,
    primary: &NodeRecord,
    what: &str,
) -> Result<(), ChangeError> {
    let sync = if db.synchronous { db.replicas().next().map(|s| s.name.clone()) } else { None };
    let config = nodes.config(db, primary, sync.as_deref())?;
    let id = db.id.as_str();
    routing.holds.hold(id);
    let held_at = Instant::now();
    let result = async {
        let epoch = routing.publish(&records.store).await?;
        let applied = async {
            Ok::<_, ChangeError>(routing.publisher.wait_applied(epoch, APPLY_TIMEOUT).await)
        };
        if !step(claim, applied).await? {
            tracing::warn!(database = id, epoch, "not every proxy applied the hold in time");
        }
        claim.primary_stopped_on_purpose();
        let restarted = restart(nodes, primary, config).await;
        claim.primary_back();
        restarted
    }
    .await;
    routing.holds.release(id);
    let epoch = routing.publish(&records.store).await?;
    routing.publisher.wait_applied(epoch, APPLY_TIMEOUT).await;
    result?;
    records
        .event(
            id,
            "node_reconfigured",
            format!(
                "primary {} restarted on {what} (new sessions held {} ms)",
                primary.name,
                held_at.elapsed().as_millis()
            ),
        )
        .await;
    Ok(())
}

/// Restarts a standby on `db`'s parameters and waits until it streams from `primary` again.
pub(super) async fn restart_standby(
    records: &Records,
    nodes: &Nodes,
    claim: &ChangeGuard,
    db: &DatabaseRecord,
    primary: &NodeRecord,
    standby: &NodeRecord,
    what: &str,
) -> Result<(), ChangeError> {
    let config = nodes.config(db, standby, None)?;
    step(claim, restart(nodes, standby, config)).await?;
    let spec = NodeSpec::of(primary);
    let spec = &spec;
    let streaming = wait::until(STREAMING_TIMEOUT, wait::STEADY, || async move {
        let streaming = step(claim, async {
            let admin = nodes.session(spec, "postgres").await?;
            let rows = admin
                .query(
                    "SELECT 1 FROM pg_stat_replication WHERE application_name = $1 AND state = 'streaming'",
                    &[&standby.name],
                )
                .await?;
            Ok::<_, ChangeError>(!rows.is_empty())
        })
        .await?;
        Ok::<_, ChangeError>(streaming.then_some(()))
    });
    streaming.await?.ok_or_else(|| ChangeError::NotStreaming(standby.name.clone()))?;
    records
        .event(
            &db.id,
            "node_reconfigured",
            format!("standby {} restarted on {what} and streaming", standby.name),
        )
        .await;
    Ok(())
}

/// Waits until `standby` has replayed everything `primary` has written now.
pub(super) async fn wait_replayed(
    nodes: &Nodes,
    claim: &ChangeGuard,
    primary: &NodeRecord,
    standby: &NodeRecord,
) -> Result<(), ChangeError> {
    let source = step(claim, nodes.session(&NodeSpec::of(primary), "postgres")).await?;
    let lsn: String =
        step(claim, source.query_one("SELECT pg_current_wal_lsn()::text", &[])).await?.get(0);
    let lsn = &lsn;
    let replayed = wait::until(STREAMING_TIMEOUT, wait::STEADY, || async move {
        let replayed = step(claim, async {
            let session = nodes.session(&NodeSpec::of(standby), "postgres").await?;
            let row = session
                .query_one(
                    "SELECT coalesce(pg_last_wal_replay_lsn() >= $1::text::pg_lsn, false)",
                    &[lsn],
                )
                .await?;
            Ok::<_, ChangeError>(row.get::<_, bool>(0))
        })
        .await?;
        Ok::<_, ChangeError>(replayed.then_some(()))
    });
    replayed.await?.ok_or_else(|| ChangeError::NotStreaming(standby.name.clone()))
}

/// Waits until every node runs, none is fenced, and commits are synchronous.
pub(super) async fn wait_synchronous_again(records: &Records, id: &str) -> Result<(), ChangeError> {
    let rejoined = wait::until(REJOIN_TIMEOUT, wait::SLOW, || async move {
        let db =
            records.store.database(id).await?.ok_or_else(|| Failure::Vanished(id.to_owned()))?;
        Ok::<_, ChangeError>((db.synchronous && db.nodes.iter().all(|n| !n.fenced)).then_some(()))
    });
    rejoined.await?.ok_or_else(|| ChangeError::NotRejoined(id.to_owned()))
}

/// Adds the standbys `plan` has beyond the primary: copied, streaming, synchronous.
async fn add_standbys(
    records: &Records,
    nodes: &Nodes,
    routing: &Routing,
    id: &str,
    plan: &Plan,
) -> Result<(), ChangeError> {
    let db = records.store.database(id).await?.ok_or_else(|| Failure::Vanished(id.to_owned()))?;
    let next = db
        .nodes
        .iter()
        .filter_map(|n| n.name.rsplit('-').next()?.parse::<u32>().ok())
        .max()
        .unwrap_or(0)
        + 1;
    let missing = (plan.nodes as usize).saturating_sub(db.nodes.len());
    let mut added = placement::new_nodes(
        &nodes.hosts,
        &nodes.ports,
        &records.store.databases().await?,
        id,
        db.engine.as_deref(),
        next,
        missing,
    );
    for node in &mut added {
        node.role = NodeRole::Replica;
    }
    let (_, db) = records
        .update(id, |db| {
            db.nodes.extend(added.iter().cloned());
            Ok::<_, StoreError>(())
        })
        .await?
        .ok_or_else(|| Failure::Vanished(id.to_owned()))?;
    for standby in &added {
        if let Err(e) = add_standby(records, nodes, &db, standby).await {
            // Leave nothing half-built: the node goes, the record forgets it.
            let (driver, spec) = (&nodes.driver, NodeSpec::of(standby));
            let _ = driver.destroy(&spec).await;
            let _ = records
                .update(id, |db| {
                    db.nodes.retain(|n| n.name != standby.name);
                    Ok::<_, StoreError>(())
                })
                .await;
            return Err(e.into());
        }
    }
    records
        .update(id, |db| {
            db.synchronous = true;
            Ok::<_, StoreError>(())
        })
        .await?;
    routing.publish(&records.store).await?;
    Ok(())
}

/// Makes commits asynchronous, then removes `standbys` and their slots.
async fn remove_standbys(
    records: &Records,
    nodes: &Nodes,
    routing: &Routing,
    id: &str,
    primary: &NodeRecord,
    standbys: &[NodeRecord],
) -> Result<(), ChangeError> {
    let db = records
        .update(id, |db| {
            db.synchronous = false;
            Ok::<_, StoreError>(())
        })
        .await?;
    let (_, db) = db.ok_or_else(|| Failure::Vanished(id.to_owned()))?;
    let config = nodes.config(&db, primary, None)?;
    let (driver, spec) = (&nodes.driver, NodeSpec::of(primary));
    driver.configure(&spec, &config).await?;
    driver.reload(&spec).await?;
    records.event(id, "replication_asynchronous", "commits no longer wait for a standby").await;
    // Each standby leaves the record only once it and its slot are gone: a failure leaves it
    // recorded (and destroyed with the database), never running unknown to the control plane.
    let admin = nodes.session(&NodeSpec::of(primary), "postgres").await?;
    for standby in standbys {
        let (driver, spec) = (&nodes.driver, NodeSpec::of(standby));
        driver.destroy(&spec).await?;
        admin
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot_name(&standby.name)],
            )
            .await?;
        records
            .update(id, |db| {
                db.nodes.retain(|n| n.name != standby.name);
                Ok::<_, StoreError>(())
            })
            .await?;
        records.event(id, "node_removed", format!("standby {} removed", standby.name)).await;
    }
    routing.publish(&records.store).await?;
    Ok(())
}
