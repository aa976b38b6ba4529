//! The planned primary change, without data loss: the proxies hold new sessions, the primary
//! stops cleanly (its sessions end with 57P01) after its last WAL reached the standby, the
//! standby is promoted, and the proxies release the held sessions to it.
//!
//! Every step is bounded, and until the primary is stopped on purpose a failover may take the
//! database over: the switchover then gives up at once, releasing the hold.

use std::future::Future;
use std::time::{Duration, Instant};

use tracing::warn;

use super::failover::promote;
use super::{ChangeGuard, HaError};
use crate::failure::Failure;
use crate::nodes::{NodeSpec, Nodes};
use crate::routing::Routing;
use crate::state::{NodeRecord, Records};
use crate::wait;

/// How long a switchover waits for the proxies to apply a table.
const APPLY_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the old primary may take to stop cleanly before it is fenced.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the standby may take to receive the old primary's last WAL.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(10);

/// The standby a switchover of `id` would promote, checked against the record.
pub fn target(
    db: &crate::state::DatabaseRecord,
    name: Option<&str>,
) -> Result<NodeRecord, HaError> {
    match name {
        Some(name) => db
            .replicas()
            .find(|r| r.name == name)
            .cloned()
            .ok_or_else(|| HaError::NotAStandby(name.to_owned(), db.id.clone())),
        None => db.replicas().next().cloned().ok_or(HaError::NoStandby),
    }
}

/// Runs `work` unless a failover takes over first.
async fn step<T, E: Into<HaError>>(
    claim: &ChangeGuard,
    work: impl Future<Output = Result<T, E>>,
) -> Result<T, HaError> {
    tokio::select! {
        r = work => r.map_err(Into::into),
        () = claim.cancelled() => Err(HaError::Preempted),
    }
}

/// Switches `id` over to `target` (default: its first standby). `claim` is the database's
/// planned-change claim. Returns the new primary and how long new sessions were held.
pub async fn switchover(
    records: &Records,
    nodes: &Nodes,
    routing: &Routing,
    claim: &ChangeGuard,
    id: &str,
    target_name: Option<&str>,
) -> Result<(String, Duration), HaError> {
    let db = records.store.database(id).await?.ok_or_else(|| Failure::Vanished(id.to_owned()))?;
    let old = db.primary().cloned().ok_or_else(|| Failure::NoPrimary(id.to_owned()))?;
    let candidate = target(&db, target_name)?;
    let (old_spec, new_spec) = (NodeSpec::of(&old), NodeSpec::of(&candidate));
    let standby = step(claim, nodes.session(&new_spec, "postgres")).await?;
    let in_recovery: bool =
        step(claim, standby.query_one("SELECT pg_is_in_recovery()", &[])).await?.get(0);
    if !in_recovery {
        return Err(HaError::NotAStandby(candidate.name.clone(), id.to_owned()));
    }

    // 1. Hold new sessions on every proxy.
    routing.holds.hold(id);
    let held_at = Instant::now();
    let result: Result<(), HaError> = async {
        let epoch = routing.publish(&records.store).await?;
        let applied =
            async { Ok::<_, HaError>(routing.publisher.wait_applied(epoch, APPLY_TIMEOUT).await) };
        if !step(claim, applied).await? {
            warn!(database = id, epoch, "not every proxy applied the hold in time");
        }
        // 2. Stop the primary cleanly; with synchronous replication its WAL is on the standby.
        let lsn: String = step(claim, async {
            let admin = nodes.session(&old_spec, "postgres").await?;
            let row = admin.query_one("SELECT pg_current_wal_lsn()::text", &[]).await?;
            Ok::<_, HaError>(row.get(0))
        })
        .await?;
        if claim.is_cancelled() {
            return Err(HaError::Preempted);
        }
        claim.primary_stopped_on_purpose();
        let stopped = tokio::time::timeout(STOP_TIMEOUT, nodes.driver.stop(&old_spec)).await;
        if !matches!(stopped, Ok(Ok(()))) {
            // It would not stop in time: make sure it serves nothing, then check the standby.
            nodes.driver.fence(&old_spec).await?;
        }
        // 3. The standby must have received everything the primary wrote.
        let caught_up = wait::until(CATCH_UP_TIMEOUT, wait::QUICK, || async {
            let sql = "SELECT pg_last_wal_receive_lsn() >= $1::text::pg_lsn";
            let row = standby.query_one(sql, &[&lsn]).await?;
            Ok::<_, HaError>(row.get::<_, bool>(0).then_some(()))
        });
        match caught_up.await? {
            Some(()) => Ok(()),
            None => Err(HaError::NotCaughtUp { standby: candidate.name.clone(), lsn }),
        }
    }
    .await;
    if let Err(e) = result {
        routing.holds.release(id);
        if !matches!(e, HaError::Preempted) {
            // Roll back: the old primary serves again, sessions are released to it.
            if !nodes.driver.is_running(&old_spec).await {
                let _ = nodes.driver.start(&old_spec).await;
            }
        }
        let _ = routing.publish(&records.store).await;
        records
            .event(
                id,
                "switchover_failed",
                format!("switchover to {} abandoned: {e}", candidate.name),
            )
            .await;
        return Err(e);
    }
    // 4. Promote and release the held sessions to the new primary.
    routing.holds.release(id);
    let promoted = promote(records, nodes, routing, id, &old.name, &candidate.name).await;
    let held_for = held_at.elapsed();
    match promoted {
        Ok(epoch) => {
            routing.publisher.wait_applied(epoch, APPLY_TIMEOUT).await;
            records.event(
                id,
                "switchover",
                format!("{} is the new primary in place of {} (new sessions held {} ms), routing epoch {epoch}", candidate.name, old.name, held_for.as_millis()),
            ).await;
            Ok((candidate.name, held_for))
        }
        Err(e) => {
            let _ = routing.publish(&records.store).await;
            records
                .event(id, "switchover_failed", format!("promoting {} failed: {e}", candidate.name))
                .await;
            Err(HaError::PromoteFailed { candidate: candidate.name, source: Box::new(e) })
        }
    }
}
