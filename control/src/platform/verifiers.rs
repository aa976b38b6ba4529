//! Keeps the proxies' copy of each database's verifiers in step with its primary's catalog:
//! at once after the API changes a user, and every few seconds for roles created or changed in
//! SQL. A primary that does not answer keeps the verifiers last read (bounded calls, no lock
//! held).

use std::sync::Arc;
use std::time::Duration;

use pgwarden_api::control::DatabaseStatus;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::Platform;
use crate::nodes::roles;
use crate::nodes::sql::{SqlError, Timeouts};

/// How often the catalogs are read.
const EVERY: Duration = Duration::from_secs(2);
/// How long the proxies may take to apply new verifiers after a user change.
const APPLY_TIMEOUT: Duration = Duration::from_secs(3);

/// Reads `id`'s verifiers from its primary; true when they changed.
pub async fn refresh(platform: &Platform, id: &str, timeouts: Timeouts) -> Result<bool, SqlError> {
    let Ok(Some(db)) = platform.store.database(id) else { return Ok(false) };
    if !matches!(db.status, DatabaseStatus::Running | DatabaseStatus::Updating) {
        return Ok(false);
    }
    let Some(primary) = db.primary() else { return Ok(false) };
    let admin = platform.session_within(&platform.node_spec(primary), "postgres", timeouts).await?;
    let verifiers = roles::verifiers(&admin).await?;
    Ok(platform.verifiers.set(id, verifiers))
}

/// After a user change through the API: the proxies have the new verifiers when this returns
/// (or after a bounded wait, logged), so an old password stops working at once.
pub async fn publish_now(platform: &Platform, id: &str) {
    match refresh(platform, id, Timeouts::DEFAULT).await {
        Ok(true) => match platform.publish_routes() {
            Ok(epoch) => {
                if !platform.publisher.wait_applied(epoch, APPLY_TIMEOUT).await {
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

/// Reads every database's verifiers, all at once, each read bounded; true when any changed.
pub async fn refresh_all(platform: &Arc<Platform>) -> bool {
    let timeouts = Timeouts::within(platform.config.health.timeout.max(Duration::from_secs(1)));
    let mut changed = false;
    let mut reads = tokio::task::JoinSet::new();
    for db in platform.store.databases().unwrap_or_default() {
        let platform = platform.clone();
        reads.spawn(async move {
            let read = refresh(&platform, &db.id, timeouts).await;
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
pub async fn keep_fresh(platform: Arc<Platform>, shutdown: CancellationToken) {
    loop {
        if refresh_all(&platform).await {
            if let Err(e) = platform.publish_routes() {
                warn!(error = %e, "cannot publish the new verifiers");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(EVERY) => {}
            () = shutdown.cancelled() => return,
        }
    }
}
