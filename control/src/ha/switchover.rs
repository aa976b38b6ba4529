//! The planned primary change, without data loss: the proxies hold new sessions, the primary
//! stops cleanly (its sessions end with 57P01) after its last WAL reached the standby, the
//! standby is promoted, and the proxies release the held sessions to it.
//!
//! Every step is bounded, and until the primary is stopped on purpose a failover may take the
//! database over: the switchover then gives up at once, releasing the hold.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::warn;

use super::failover::promote;
use crate::nodes::blocking;
use crate::platform::{ChangeGuard, Platform};
use crate::state::NodeRecord;

/// How long a switchover waits for the proxies to apply a table.
const APPLY_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the old primary may take to stop cleanly before it is fenced.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the standby may take to receive the old primary's last WAL.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a switchover did not happen.
#[derive(Debug, thiserror::Error)]
pub enum SwitchoverError {
    #[error("a failover took over the database: its primary failed during the switchover")]
    Preempted,
    #[error("{0}")]
    Failed(String),
}

/// The standby a switchover of `id` would promote, checked against the record.
pub fn target(db: &crate::state::DatabaseRecord, name: Option<&str>) -> Result<NodeRecord, String> {
    match name {
        Some(name) => db
            .replicas()
            .find(|r| r.name == name)
            .cloned()
            .ok_or_else(|| format!("{name} is not a standby of {}", db.id)),
        None => db.replicas().next().cloned().ok_or_else(|| "no standby to switch to".into()),
    }
}

/// Runs `work` unless a failover takes over first.
async fn step<T>(
    claim: &ChangeGuard,
    work: impl Future<Output = Result<T, String>>,
) -> Result<T, SwitchoverError> {
    tokio::select! {
        r = work => r.map_err(SwitchoverError::Failed),
        () = claim.cancelled() => Err(SwitchoverError::Preempted),
    }
}

/// Switches `id` over to `target` (default: its first standby). `claim` is the database's
/// planned-change claim. Returns the new primary and how long new sessions were held.
pub async fn switchover(
    platform: &Arc<Platform>,
    claim: ChangeGuard,
    id: &str,
    target_name: Option<&str>,
) -> Result<(String, Duration), SwitchoverError> {
    let failed = SwitchoverError::Failed;
    let db = platform
        .store
        .database(id)
        .map_err(|e| failed(e.to_string()))?
        .ok_or_else(|| failed("database vanished".into()))?;
    let old = db.primary().cloned().ok_or_else(|| failed("no primary".into()))?;
    let candidate = target(&db, target_name).map_err(failed)?;
    let (old_spec, new_spec) = (platform.node_spec(&old), platform.node_spec(&candidate));
    let standby = step(&claim, async {
        platform
            .session(&new_spec, "postgres")
            .await
            .map_err(|e| format!("standby unreachable: {e}"))
    })
    .await?;
    let in_recovery: bool = step(&claim, async {
        Ok(standby
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .map_err(|e| e.to_string())?
            .get(0))
    })
    .await?;
    if !in_recovery {
        return Err(failed(format!("{} is not a standby", candidate.name)));
    }

    // 1. Hold new sessions on every proxy.
    platform.holds.hold(id);
    let held_at = Instant::now();
    let result: Result<(), SwitchoverError> = async {
        let epoch = platform.publish_routes().map_err(|e| failed(e.to_string()))?;
        if !step(&claim, async { Ok(platform.publisher.wait_applied(epoch, APPLY_TIMEOUT).await) })
            .await?
        {
            warn!(database = id, epoch, "not every proxy applied the hold in time");
        }
        // 2. Stop the primary cleanly; with synchronous replication its WAL is on the standby.
        let lsn: String = step(&claim, async {
            let admin = platform.session(&old_spec, "postgres").await.map_err(|e| e.to_string())?;
            let row = admin
                .query_one("SELECT pg_current_wal_lsn()::text", &[])
                .await
                .map_err(|e| e.to_string())?;
            Ok(row.get(0))
        })
        .await?;
        if claim.is_cancelled() {
            return Err(SwitchoverError::Preempted);
        }
        claim.primary_stopped_on_purpose();
        let (driver, spec) = (platform.driver.clone(), old_spec.clone());
        let stopped =
            tokio::time::timeout(STOP_TIMEOUT, blocking(move || driver.stop(&spec))).await;
        if !matches!(stopped, Ok(Ok(()))) {
            // It would not stop in time: make sure it serves nothing, then check the standby.
            let (driver, spec) = (platform.driver.clone(), old_spec.clone());
            blocking(move || driver.fence(&spec)).await.map_err(failed)?;
        }
        // 3. The standby must have received everything the primary wrote.
        let deadline = Instant::now() + CATCH_UP_TIMEOUT;
        loop {
            let caught_up: bool = standby
                .query_one("SELECT pg_last_wal_receive_lsn() >= $1::text::pg_lsn", &[&lsn])
                .await
                .map_err(|e| failed(e.to_string()))?
                .get(0);
            if caught_up {
                break;
            }
            if Instant::now() > deadline {
                return Err(failed(format!(
                    "standby {} did not receive WAL up to {lsn}",
                    candidate.name
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        platform.holds.release(id);
        if !matches!(e, SwitchoverError::Preempted) {
            // Roll back: the old primary serves again, sessions are released to it.
            let (driver, spec) = (platform.driver.clone(), old_spec.clone());
            let _ = blocking(
                move || if driver.is_running(&spec) { Ok(()) } else { driver.start(&spec) },
            )
            .await;
        }
        let _ = platform.publish_routes();
        platform.event(
            id,
            "switchover_failed",
            format!("switchover to {} abandoned: {e}", candidate.name),
        );
        return Err(e);
    }
    // 4. Promote and release the held sessions to the new primary.
    platform.holds.release(id);
    let promoted = promote(platform, id, &old.name, &candidate.name).await;
    let held_for = held_at.elapsed();
    match promoted {
        Ok(epoch) => {
            platform.publisher.wait_applied(epoch, APPLY_TIMEOUT).await;
            platform.event(
                id,
                "switchover",
                format!("{} is the new primary in place of {} (new sessions held {} ms), routing epoch {epoch}", candidate.name, old.name, held_for.as_millis()),
            );
            Ok((candidate.name, held_for))
        }
        Err(e) => {
            let _ = platform.publish_routes();
            platform.event(
                id,
                "switchover_failed",
                format!("promoting {} failed: {e}", candidate.name),
            );
            Err(failed(e))
        }
    }
}
