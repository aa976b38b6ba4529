//! Failover: the reachable standby with the most WAL received, refused if it could miss
//! acknowledged commits; the old primary fenced first; then promotion and a new routing epoch.

use std::time::{Duration, Instant};

use pgwarden_api::control::NodeRole;
use tracing::{info, warn};

use super::watcher::check_primary;
use super::{Ha, HaError, HealthConfig};
use crate::agent::fencing;
use crate::failure::{Failure, Reportable};
use crate::nodes::sql::Timeouts;
use crate::nodes::{NodeSpec, Nodes};
use crate::routing::Routing;
use crate::state::{DatabaseRecord, Records, StoreError};

/// How long a standby may take to say whether it can be promoted.
const PROBE: Duration = Duration::from_secs(1);
/// How long a failover waits for the lease of an unreachable agent to end (then it is tried
/// again at the next failed checks).
const AGENT_FENCE_WAIT: Duration = Duration::from_secs(15);

/// Replaces `old_primary` of `id` by its best standby now. Returns the new primary's name, or
/// why there was none (also recorded as an event).
pub async fn failover(
    ha: &Ha,
    id: &str,
    old_primary: &str,
    last_lag: &[(String, u64)],
    reason: &str,
) -> Result<String, HaError> {
    let Some(_claim) = ha.claims.for_failover(id).await else {
        return Err(HaError::PlannedChangeFinishing);
    };
    let db =
        ha.records.store.database(id).await?.ok_or_else(|| Failure::Vanished(id.to_owned()))?;
    if db.primary().map(|p| p.name.as_str()) != Some(old_primary) {
        return Err(HaError::Moved(old_primary.to_owned())); // Someone moved it.
    }
    let candidate = match choose_standby(&ha.nodes, &ha.health, &db, last_lag).await {
        Ok(candidate) => candidate,
        Err(why) => {
            ha.metrics.failover(false);
            ha.records.event(id, "failover_refused", why.to_string()).await;
            return Err(why);
        }
    };
    let started = Instant::now();
    match promote(&ha.records, &ha.nodes, &ha.routing, id, old_primary, &candidate).await {
        Ok(epoch) => {
            ha.metrics.failover(true);
            ha.records.event(
                id,
                "failover",
                format!("{reason}: promoted {candidate} in place of {old_primary} in {} ms, routing epoch {epoch}", started.elapsed().as_millis()),
            ).await;
            Ok(candidate)
        }
        Err(e) => {
            ha.metrics.failover(false);
            let e = HaError::PromoteFailed { candidate, source: Box::new(e) };
            ha.records.event(id, "failover_failed", e.sentence()).await;
            Err(e)
        }
    }
}

/// The standby to promote: reachable, in recovery, most WAL received, and not missing commits
/// the primary acknowledged. Standbys are asked all at once.
async fn choose_standby(
    nodes: &Nodes,
    health: &HealthConfig,
    db: &DatabaseRecord,
    last_lag: &[(String, u64)],
) -> Result<String, HaError> {
    let probes = db.replicas().map(|standby| async move {
        let spec = NodeSpec::of(standby);
        let probe = async {
            let session = nodes.session_within(&spec, "postgres", Timeouts::within(PROBE)).await?;
            let row = session
                .query_one("SELECT pg_is_in_recovery(), coalesce(pg_wal_lsn_diff(pg_last_wal_receive_lsn(), '0/0'), 0)::int8", &[])
                .await?;
            Ok::<_, crate::nodes::sql::SqlError>((row.get::<_, bool>(0), row.get::<_, i64>(1)))
        };
        (standby.name.clone(), standby.fenced, probe.await)
    });
    let mut best: Option<(String, i64)> = None;
    for (name, fenced, probe) in futures_join_all(probes).await {
        match probe {
            // Out of recovery while recorded as a standby (and not a fenced former primary): a
            // failover promoted it and was cut short before recording it (its store write
            // failed, or the leader died). It is the one to finish with.
            Ok((false, _)) if !fenced => {
                warn!(database = %db.id, standby = %name, "a standby already promoted: finishing the failover that promoted it");
                return Ok(name);
            }
            Ok((true, received)) if best.as_ref().is_none_or(|(_, b)| received > *b) => {
                best = Some((name, received));
            }
            other => {
                let other = other;
                warn!(database = %db.id, standby = %name, ?other, "standby not eligible")
            }
        }
    }
    let (name, _) = best.ok_or(HaError::NoStandby)?;
    let lag = last_lag.iter().find(|(n, _)| *n == name).map(|(_, l)| *l);
    may_promote(&name, db.synchronous, lag, health.max_failover_lag_bytes)?;
    Ok(name)
}

/// Runs futures concurrently and returns their outputs in order.
async fn futures_join_all<F: std::future::Future>(
    futures: impl Iterator<Item = F>,
) -> Vec<F::Output> {
    let mut pinned: Vec<std::pin::Pin<Box<F>>> = futures.map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (slot, future) in out.iter_mut().zip(pinned.iter_mut()) {
            if slot.is_none() {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

/// Whether promoting `standby` keeps every acknowledged commit: always when commits were
/// synchronous (the standby had each one before it was acknowledged); otherwise only if its lag
/// at the last check is known and within `bound`.
pub(crate) fn may_promote(
    standby: &str,
    synchronous: bool,
    lag: Option<u64>,
    bound: u64,
) -> Result<(), HaError> {
    match (synchronous, lag) {
        (true, _) => Ok(()),
        (false, Some(lag)) if lag <= bound => Ok(()),
        (false, lag) => Err(HaError::CouldLoseCommits {
            standby: standby.to_owned(),
            lag: lag.map_or("unknown".to_owned(), |l| format!("{l} bytes")),
            bound,
        }),
    }
}

/// Fences `old` (whatever state it is in), promotes `new`, records and publishes the change,
/// and gives the new primary its own settings. Returns the routing epoch. The caller holds the
/// database's primary-change claim.
pub(crate) async fn promote(
    records: &Records,
    nodes: &Nodes,
    routing: &Routing,
    id: &str,
    old: &str,
    new: &str,
) -> Result<u64, HaError> {
    let db = records.store.database(id).await?.ok_or_else(|| Failure::Vanished(id.to_owned()))?;
    let find = |name: &str| {
        let node = db.nodes.iter().find(|n| n.name == name).cloned();
        node.ok_or_else(|| HaError::NodeVanished(name.to_owned()))
    };
    let (old_node, new_node) = (find(old)?, find(new)?);
    // Fence first: whatever happens next, the old primary serves nothing more.
    let (old_spec, new_spec) = (NodeSpec::of(&old_node), NodeSpec::of(&new_node));
    let driver = nodes.driver.clone();
    let fence = async move { driver.fence(&old_spec).await };
    match (&nodes.etcd, &old_node.agent) {
        // An agent out of reach fences its host's primaries itself once it is cut off from
        // etcd: its key gone, plus a margin, the old primary is known to be stopped. Whichever
        // comes first.
        (Some(etcd), Some(agent)) => {
            let by_lease = fencing::wait_fenced(etcd, agent, AGENT_FENCE_WAIT);
            tokio::pin!(fence, by_lease);
            tokio::select! {
                fenced = &mut fence => if let Err(e) = fenced {
                    warn!(database = %id, old, error = %e, "cannot fence the old primary through its agent; waiting for the agent's lease to end");
                    by_lease.await.map_err(|why| HaError::Fence(format!("{e}; {why}")))?;
                },
                ended = &mut by_lease => ended.map_err(|e| HaError::Fence(e.to_string()))?,
            }
        }
        _ => fence.await?,
    }
    let driver = nodes.driver.clone();
    driver.promote(&new_spec).await?;
    let (_, db) = records
        .update(id, |db| {
            for node in &mut db.nodes {
                if node.name == old {
                    node.role = NodeRole::Replica;
                    node.fenced = true;
                } else if node.name == new {
                    node.role = NodeRole::Primary;
                    node.fenced = false;
                }
            }
            db.synchronous = false;
            Ok::<_, StoreError>(())
        })
        .await?
        .ok_or_else(|| Failure::Vanished(id.to_owned()))?;
    let epoch = routing.publish(&records.store).await?;
    // The new primary's own settings: no upstream, asynchronous until a standby is back.
    let promoted = db.primary().cloned().ok_or_else(|| Failure::NoPrimary(id.to_owned()))?;
    let config = nodes.config(&db, &promoted, None)?;
    let (driver, spec) = (&nodes.driver, NodeSpec::of(&promoted));
    driver.configure(&spec, &config).await?;
    driver.reload(&spec).await?;
    info!(database = %id, old, new, epoch, "primary changed");
    Ok(epoch)
}

/// `POST .../failover`: change the primary now, even if it looks healthy.
pub async fn forced_failover(ha: &Ha, id: &str) -> Result<String, HaError> {
    let db =
        ha.records.store.database(id).await?.ok_or_else(|| Failure::Vanished(id.to_owned()))?;
    let primary = db.primary().cloned().ok_or_else(|| Failure::NoPrimary(id.to_owned()))?;
    let last_lag = match check_primary(&ha.nodes, &ha.health, &primary).await {
        Ok(state) => state.lags(),
        Err(_) => Vec::new(),
    };
    failover(ha, id, &primary.name, &last_lag, "failover requested").await
}

#[cfg(test)]
mod tests {
    use super::may_promote;

    #[test]
    fn a_standby_that_could_miss_acknowledged_commits_is_refused() {
        assert!(
            may_promote("s", true, None, 0).is_ok(),
            "synchronous: every ack is on the standby"
        );
        assert!(may_promote("s", true, Some(1 << 20), 0).is_ok());
        assert!(may_promote("s", false, Some(0), 0).is_ok(), "asynchronous but caught up");
        assert!(may_promote("s", false, Some(4096), 8192).is_ok(), "within the configured bound");
        let err = may_promote("s", false, Some(4097), 4096).unwrap_err().to_string();
        assert!(err.contains("4097 bytes") && err.contains("could be lost"), "{err}");
        let err = may_promote("s", false, None, 1 << 30).unwrap_err().to_string();
        assert!(err.contains("unknown"), "no lag known: refused whatever the bound: {err}");
    }
}
