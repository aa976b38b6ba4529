//! Keeps the proxies' copy of each database's verifiers in step with its primary's catalog:
//! at once after the API changes a user, and every few seconds for roles created or changed in
//! SQL. A primary that does not answer keeps the verifiers last read (bounded calls, no lock
//! held). The reads go through the session kept on each primary (`nodes::kept`).

use std::sync::Arc;
use std::time::Duration;

use pgwarden_api::control::DatabaseStatus;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::Routing;
use crate::nodes::kept::Purpose;
use crate::nodes::sql::{Session, SqlError, Timeouts};
use crate::nodes::{roles, NodeSpec, Nodes};
use crate::state::Records;

/// How often the catalogs are read.
const EVERY: Duration = Duration::from_secs(2);
/// How long the proxies may take to apply new verifiers after a user change.
const APPLY_TIMEOUT: Duration = Duration::from_secs(3);

/// Reads `id`'s verifiers from its primary; true when they changed.
pub async fn refresh(
    records: &Records,
    nodes: &Nodes,
    routing: &Routing,
    id: &str,
    timeouts: Timeouts,
) -> Result<bool, SqlError> {
    let Ok(Some(db)) = records.store.database(id).await else { return Ok(false) };
    if !matches!(db.status, DatabaseStatus::Running | DatabaseStatus::Updating) {
        return Ok(false);
    }
    let Some(primary) = db.primary() else { return Ok(false) };
    let read = async |admin: &Session| roles::verifiers(admin).await;
    let verifiers = nodes.read_kept(&NodeSpec::of(primary), Purpose::Reads, timeouts, read).await?;
    Ok(routing.verifiers.set(id, verifiers))
}

/// After a user change through the API: the proxies have the new verifiers when this returns
/// (or after a bounded wait, logged), so an old password stops working at once.
pub async fn publish_now(records: &Records, nodes: &Nodes, routing: &Routing, id: &str) {
    match refresh(records, nodes, routing, id, Timeouts::DEFAULT).await {
        Ok(true) => match routing.publish(&records.store).await {
            Ok(epoch) => {
                if !routing.publisher.wait_applied(epoch, APPLY_TIMEOUT).await {
                    warn!(
                        database = id,
                        epoch, "not every proxy applied the new verifiers in time"
                    );
                }
            }
            Err(e) => warn!(database = id, error = %e, "cannot publish the new verifiers"),
        },
        Ok(false) => {}
        Err(e) => warn!(database = id, error = %e, "cannot read the users' verifiers"),
    }
}

/// What keeping the verifiers fresh reads (records, nodes) and writes (routing).
#[derive(Clone)]
pub struct Refresh {
    pub records: Arc<Records>,
    pub nodes: Arc<Nodes>,
    pub routing: Arc<Routing>,
    /// How long one read may take.
    pub within: Duration,
}

/// Reads every database's verifiers, all at once, each read bounded; true when any changed.
pub async fn refresh_all(with: &Refresh) -> bool {
    let timeouts = Timeouts::within(with.within.max(Duration::from_secs(1)));
    let mut changed = false;
    let mut reads = tokio::task::JoinSet::new();
    for db in with.records.store.databases().await.unwrap_or_default() {
        let with = with.clone();
        reads.spawn(async move {
            let read = refresh(&with.records, &with.nodes, &with.routing, &db.id, timeouts).await;
            (db.id, read)
        });
    }
    while let Some(joined) = reads.join_next().await {
        match joined {
            Ok((_, Ok(true))) => changed = true,
            Ok((_, Ok(false))) => {}
            Ok((id, Err(e))) => debug!(database = %id, error = %e, "verifiers not read"),
            Err(e) => warn!(error = %e, "verifier read failed"),
        }
    }
    changed
}

/// Reads every database's verifiers every few seconds; publishes when any changed.
pub async fn keep_fresh(with: Refresh, shutdown: CancellationToken) {
    loop {
        if refresh_all(&with).await {
            if let Err(e) = with.routing.publish(&with.records.store).await {
                warn!(error = %e, "cannot publish the new verifiers");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(EVERY) => {}
            () = shutdown.cancelled() => return,
        }
    }
}
