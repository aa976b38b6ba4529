//! High availability: one watcher task per replicated database.
//!
//! Each tick the watcher connects afresh to the primary (a frozen postmaster accepts no new
//! session, so a kept connection would not notice) and reads `pg_stat_replication`:
//! - the primary misses `failures` checks in a row: failover (`failover`);
//! - the standby stops streaming: commits become asynchronous so that the primary keeps
//!   accepting writes, visibly (event, `synchronous = false`); when the standby is back and
//!   caught up, synchronous again;
//! - a fenced former primary: rewound (or re-copied) and restarted as a standby (`rejoin`).
//!
//! Failover picks the reachable standby with the most WAL received, refuses one that could miss
//! acknowledged commits, fences the old primary, promotes, and publishes a new routing epoch.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgwarden_api::control::{DatabaseStatus, NodeRole};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::driver::NodeSpec;
use crate::platform::Platform;
use crate::provision::{self, blocking, node_config, slot_name};
use crate::records::{DatabaseRecord, NodeRecord};
use crate::users;

/// Starts a watcher for every replicated database, now and as they appear.
pub async fn supervise(platform: Arc<Platform>, shutdown: CancellationToken) {
    let watched: Arc<Mutex<HashSet<String>>> = Arc::default();
    loop {
        for db in platform.store.databases().unwrap_or_default() {
            let replicated = db.nodes.len() > 1;
            if replicated
                && db.status == DatabaseStatus::Running
                && watched.lock().expect("lock").insert(db.id.clone())
            {
                let (platform, watched, shutdown) =
                    (platform.clone(), watched.clone(), shutdown.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        () = watch(&platform, &db.id) => {}
                        () = shutdown.cancelled() => {}
                    }
                    watched.lock().expect("lock").remove(&db.id);
                });
            }
        }
        tokio::select! {
            () = tokio::time::sleep(platform.config.health.interval) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// What a check of the primary saw.
struct PrimaryState {
    /// `(application_name, sync_state, bytes not yet flushed by it)` for each streaming standby.
    standbys: Vec<(String, String, u64)>,
}

async fn watch(platform: &Arc<Platform>, id: &str) {
    let health = platform.config.health.clone();
    let mut failures = 0u32;
    let mut standby_missing = 0u32;
    // Lag of each standby at the last good check, for the failover decision.
    let mut last_lag: Vec<(String, u64)> = Vec::new();
    loop {
        tokio::time::sleep(health.interval).await;
        let Ok(Some(db)) = platform.store.database(id) else { return };
        if db.status != DatabaseStatus::Running {
            if matches!(db.status, DatabaseStatus::Deleting | DatabaseStatus::Failed) {
                return;
            }
            continue;
        }
        let Some(primary) = db.primary().cloned() else { continue };
        match check_primary(platform, &primary).await {
            Ok(state) => {
                failures = 0;
                last_lag = state.standbys.iter().map(|(n, _, lag)| (n.clone(), *lag)).collect();
                let streaming =
                    db.replicas().any(|r| state.standbys.iter().any(|(n, _, _)| *n == r.name));
                standby_missing = if streaming { 0 } else { standby_missing + 1 };
                replication_mode(
                    platform,
                    &db,
                    &primary,
                    &state,
                    standby_missing >= health.failures,
                )
                .await;
                if let Some(fenced) = db.nodes.iter().find(|n| n.fenced).cloned() {
                    rejoin(platform, id, &fenced).await;
                } else if standby_missing >= health.failures {
                    restart_stopped_standbys(platform, &db).await;
                }
            }
            Err(e) => {
                failures += 1;
                debug!(database = id, node = %primary.name, failures, error = %e, "primary check failed");
                if failures >= health.failures {
                    platform.event(
                        id,
                        "primary_unreachable",
                        format!("primary {} failed {failures} checks: {e}", primary.name),
                    );
                    failover(platform, id, &primary.name, &last_lag, "primary unreachable").await;
                    failures = 0;
                }
            }
        }
    }
}

async fn check_primary(platform: &Platform, primary: &NodeRecord) -> Result<PrimaryState, String> {
    let conninfo = platform.driver.admin_conninfo(&platform.node_spec(primary), "postgres");
    let check = async {
        let admin = users::admin(&conninfo).await.map_err(|e| e.to_string())?;
        let rows = admin
            .query(
                "SELECT application_name, sync_state, \
                 coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), flush_lsn), 0)::int8 \
                 FROM pg_stat_replication WHERE state = 'streaming'",
                &[],
            )
            .await
            .map_err(|e| e.to_string())?;
        let standbys =
            rows.iter().map(|r| (r.get(0), r.get(1), r.get::<_, i64>(2).max(0) as u64)).collect();
        Ok(PrimaryState { standbys })
    };
    tokio::time::timeout(platform.config.health.timeout, check)
        .await
        .unwrap_or_else(|_| Err("no answer in time".into()))
}

/// Degrades to asynchronous commits when the standby is gone, back to synchronous when it has
/// caught up.
async fn replication_mode(
    platform: &Arc<Platform>,
    db: &DatabaseRecord,
    primary: &NodeRecord,
    state: &PrimaryState,
    standby_lost: bool,
) {
    let caught_up = db
        .replicas()
        .find(|r| state.standbys.iter().any(|(n, _, lag)| *n == r.name && *lag == 0))
        .map(|r| r.name.clone());
    let wanted = match (db.synchronous, standby_lost, caught_up) {
        (true, true, _) => None,
        (false, false, Some(standby)) => Some(standby),
        _ => return,
    };
    let lock = platform.lock(&db.id);
    let _guard = lock.lock().await;
    let Ok(Some(mut db)) = platform.store.database(&db.id) else { return };
    let Ok(config) = node_config(platform, &db, primary, wanted.as_deref()) else { return };
    let spec = platform.node_spec(primary);
    let driver = platform.driver.clone();
    if let Err(e) = blocking(move || {
        driver.configure(&spec, &config)?;
        driver.reload(&spec)
    })
    .await
    {
        return error!(database = %db.id, error = %e, "cannot change replication mode");
    }
    db.synchronous = wanted.is_some();
    let _ = platform.store.put_database(&db);
    platform.metrics.replication_mode(db.synchronous);
    match wanted {
        Some(standby) => platform.event(
            &db.id,
            "replication_synchronous",
            format!("standby {standby} caught up: commits are synchronous again"),
        ),
        None => platform.event(
            &db.id,
            "replication_degraded",
            "standby not streaming: commits are asynchronous until it is back",
        ),
    }
}

/// Starts standbys whose processes are gone (crashed or killed); they catch up by streaming.
async fn restart_stopped_standbys(platform: &Arc<Platform>, db: &DatabaseRecord) {
    for standby in db.replicas() {
        let spec = platform.node_spec(standby);
        let driver = platform.driver.clone();
        let restarted = blocking(move || {
            if driver.is_running(&spec) {
                return Ok(false);
            }
            driver.fence(&spec)?;
            driver.start(&spec).map(|()| true)
        })
        .await;
        match restarted {
            Ok(true) => platform.event(
                &db.id,
                "node_restarted",
                format!("standby {} was down; restarted", standby.name),
            ),
            Ok(false) => {}
            Err(e) => platform.event(
                &db.id,
                "node_failed",
                format!("standby {} could not restart: {e}", standby.name),
            ),
        }
    }
}

/// Forces a primary change now (also `POST .../failover`). Returns the new primary's name.
pub async fn failover(
    platform: &Arc<Platform>,
    id: &str,
    old_primary: &str,
    last_lag: &[(String, u64)],
    reason: &str,
) -> Option<String> {
    let lock = platform.lock(id);
    let _guard = lock.lock().await;
    let Ok(Some(mut db)) = platform.store.database(id) else { return None };
    if db.primary().map(|p| p.name.as_str()) != Some(old_primary) {
        return None; // Someone already moved it.
    }
    match choose_standby(platform, &db, last_lag).await {
        Ok(candidate) => {
            let started = std::time::Instant::now();
            match promote(platform, &mut db, old_primary, &candidate).await {
                Ok(epoch) => {
                    platform.metrics.failover(true);
                    platform.event(
                        id,
                        "failover",
                        format!("{reason}: promoted {candidate} in place of {old_primary} in {} ms, routing epoch {epoch}", started.elapsed().as_millis()),
                    );
                    Some(candidate)
                }
                Err(e) => {
                    platform.metrics.failover(false);
                    platform.event(
                        id,
                        "failover_failed",
                        format!("promoting {candidate} failed: {e}"),
                    );
                    None
                }
            }
        }
        Err(why) => {
            platform.metrics.failover(false);
            platform.event(id, "failover_refused", why);
            None
        }
    }
}

/// The standby to promote: reachable, in recovery, most WAL received, and not missing commits
/// the primary acknowledged.
async fn choose_standby(
    platform: &Platform,
    db: &DatabaseRecord,
    last_lag: &[(String, u64)],
) -> Result<String, String> {
    let mut best: Option<(String, i64)> = None;
    for standby in db.replicas() {
        let conninfo = platform.driver.admin_conninfo(&platform.node_spec(standby), "postgres");
        let probe = async {
            let admin = users::admin(&conninfo).await.ok()?;
            let row = admin
                .query_one("SELECT pg_is_in_recovery(), coalesce(pg_wal_lsn_diff(pg_last_wal_receive_lsn(), '0/0'), 0)::int8", &[])
                .await
                .ok()?;
            Some((row.get::<_, bool>(0), row.get::<_, i64>(1)))
        };
        match tokio::time::timeout(Duration::from_secs(2), probe).await {
            Ok(Some((true, received))) if best.as_ref().is_none_or(|(_, b)| received > *b) => {
                best = Some((standby.name.clone(), received));
            }
            other => {
                warn!(database = %db.id, standby = %standby.name, ?other, "standby not eligible")
            }
        }
    }
    let (name, _) = best.ok_or_else(|| "no reachable standby to promote".to_owned())?;
    let lag = last_lag.iter().find(|(n, _)| *n == name).map(|(_, l)| *l);
    may_promote(&name, db.synchronous, lag, platform.config.health.max_failover_lag_bytes)?;
    Ok(name)
}

/// Whether promoting `standby` keeps every acknowledged commit: always when commits were
/// synchronous (the standby had each one before it was acknowledged); otherwise only if its lag
/// at the last check is known and within `bound`.
fn may_promote(
    standby: &str,
    synchronous: bool,
    lag: Option<u64>,
    bound: u64,
) -> Result<(), String> {
    match (synchronous, lag) {
        (true, _) => Ok(()),
        (false, Some(lag)) if lag <= bound => Ok(()),
        (false, lag) => Err(format!(
            "refusing to promote {standby}: commits were asynchronous and its lag ({}) exceeds {bound} bytes; acknowledged commits could be lost",
            lag.map_or("unknown".to_owned(), |l| format!("{l} bytes"))
        )),
    }
}

async fn promote(
    platform: &Arc<Platform>,
    db: &mut DatabaseRecord,
    old: &str,
    new: &str,
) -> Result<u64, String> {
    let old_node =
        db.nodes.iter().find(|n| n.name == old).cloned().ok_or("old primary vanished")?;
    let new_node = db.nodes.iter().find(|n| n.name == new).cloned().ok_or("standby vanished")?;
    // Fence first: whatever happens next, the old primary serves nothing more.
    let (old_spec, new_spec) = (platform.node_spec(&old_node), platform.node_spec(&new_node));
    let driver = platform.driver.clone();
    blocking(move || {
        driver.fence(&old_spec)?;
        driver.promote(&new_spec)
    })
    .await?;
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
    platform.store.put_database(db).map_err(|e| e.to_string())?;
    let epoch = platform.publish_routes().map_err(|e| e.to_string())?;
    // The new primary's own settings: no upstream, asynchronous until a standby is back.
    let promoted = db.primary().cloned().ok_or("no primary after promotion")?;
    let config = node_config(platform, db, &promoted, None)?;
    let spec = platform.node_spec(&promoted);
    let driver = platform.driver.clone();
    blocking(move || {
        driver.configure(&spec, &config)?;
        driver.reload(&spec)
    })
    .await?;
    info!(database = %db.id, old, new, epoch, "failover done");
    Ok(epoch)
}

/// Brings a fenced former primary back as a standby of the current primary.
async fn rejoin(platform: &Arc<Platform>, id: &str, fenced: &NodeRecord) {
    let lock = platform.lock(id);
    let _guard = lock.lock().await;
    let Ok(Some(mut db)) = platform.store.database(id) else { return };
    let Some(primary) = db.primary().cloned() else { return };
    let Some(node) = db.nodes.iter().find(|n| n.name == fenced.name && n.fenced).cloned() else {
        return;
    };
    let (spec, source) = (platform.node_spec(&node), platform.node_spec(&primary));
    let result = async {
        ensure_slot(platform, &source, &slot_name(&node.name)).await?;
        // pg_rewind reads the source's timeline from its control file, which a recently
        // promoted primary updates only at its next checkpoint.
        checkpoint(platform, &source).await?;
        let config = node_config(platform, &db, &node, None)?;
        let driver = platform.driver.clone();
        let (spec2, source2, config2) = (spec.clone(), source.clone(), config.clone());
        let rewound = blocking(move || {
            driver.fence(&spec2)?;
            driver.rewind(&spec2, &source2)?;
            driver.configure(&spec2, &config2)?;
            driver.make_standby(&spec2)?;
            driver.start(&spec2)
        })
        .await;
        match rewound {
            Ok(()) => Ok("pg_rewind"),
            Err(e) => {
                warn!(database = id, node = %node.name, error = %e, "pg_rewind failed; copying the primary afresh");
                fresh_copy(platform, &db, &node, &spec).await.map(|()| "a fresh base backup")
            }
        }
    }
    .await;
    match result {
        Ok(how) => {
            if let Some(n) = db.nodes.iter_mut().find(|n| n.name == node.name) {
                n.fenced = false;
            }
            let _ = platform.store.put_database(&db);
            let _ = platform.publish_routes();
            platform.event(
                id,
                "rejoined",
                format!("{} rejoined as a standby of {} ({how})", node.name, primary.name),
            );
        }
        Err(e) => {
            platform.event(id, "rejoin_failed", format!("{} could not rejoin yet: {e}", node.name))
        }
    }
}

async fn fresh_copy(
    platform: &Arc<Platform>,
    db: &DatabaseRecord,
    node: &NodeRecord,
    spec: &NodeSpec,
) -> Result<(), String> {
    let driver = platform.driver.clone();
    let spec2 = spec.clone();
    blocking(move || driver.destroy(&spec2)).await?;
    // The slot was made for the rewind; pg_basebackup creates its own.
    if let Some(primary) = db.primary() {
        drop_slot(platform, &platform.node_spec(primary), &slot_name(&node.name)).await;
    }
    provision::add_standby_only(platform, db, node).await
}

async fn ensure_slot(platform: &Platform, primary: &NodeSpec, slot: &str) -> Result<(), String> {
    let admin = users::admin(&platform.driver.admin_conninfo(primary, "postgres"))
        .await
        .map_err(|e| e.to_string())?;
    admin
        .execute(
            "SELECT pg_create_physical_replication_slot($1) WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
            &[&slot],
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

async fn checkpoint(platform: &Platform, node: &NodeSpec) -> Result<(), String> {
    let admin = users::admin(&platform.driver.admin_conninfo(node, "postgres"))
        .await
        .map_err(|e| e.to_string())?;
    admin.batch_execute("CHECKPOINT").await.map_err(|e| e.to_string())
}

async fn drop_slot(platform: &Platform, primary: &NodeSpec, slot: &str) {
    if let Ok(admin) = users::admin(&platform.driver.admin_conninfo(primary, "postgres")).await {
        let _ = admin
            .execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
            .await;
    }
}

/// `POST .../failover`: change the primary now, even if it looks healthy.
pub async fn forced_failover(platform: &Arc<Platform>, id: &str) -> Result<String, String> {
    let db = platform.store.database(id).map_err(|e| e.to_string())?.ok_or("database vanished")?;
    let primary = db.primary().cloned().ok_or("no primary")?;
    let last_lag = match check_primary(platform, &primary).await {
        Ok(state) => state.standbys.iter().map(|(n, _, lag)| (n.clone(), *lag)).collect(),
        Err(_) => Vec::new(),
    };
    failover(platform, id, &primary.name, &last_lag, "failover requested").await.ok_or_else(|| {
        platform
            .store
            .events(id)
            .ok()
            .and_then(|e| e.last().map(|e| e.message.clone()))
            .unwrap_or_else(|| "failover did not happen".into())
    })
}

/// How long a switchover waits for the proxies to apply a table.
const APPLY_TIMEOUT: Duration = Duration::from_secs(3);

/// A planned primary change without data loss: the proxies hold new sessions, the primary
/// stops cleanly (its sessions end with 57P01) after its last WAL reached the standby, the
/// standby is promoted, and the proxies release the held sessions to it. Returns the new
/// primary and how long new sessions were held.
pub async fn switchover(
    platform: &Arc<Platform>,
    id: &str,
    target: Option<&str>,
) -> Result<(String, Duration), String> {
    let lock = platform.lock(id);
    let _guard = lock.lock().await;
    let mut db =
        platform.store.database(id).map_err(|e| e.to_string())?.ok_or("database vanished")?;
    let old = db.primary().cloned().ok_or("no primary")?;
    let candidate = match target {
        Some(name) => db
            .replicas()
            .find(|r| r.name == name)
            .cloned()
            .ok_or_else(|| format!("{name} is not a standby of {id}"))?,
        None => db.replicas().next().cloned().ok_or("no standby to switch to")?,
    };
    let (old_spec, new_spec) = (platform.node_spec(&old), platform.node_spec(&candidate));
    let standby_admin = users::admin(&platform.driver.admin_conninfo(&new_spec, "postgres"))
        .await
        .map_err(|e| format!("standby unreachable: {e}"))?;
    let in_recovery: bool = standby_admin
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .map_err(|e| e.to_string())?
        .get(0);
    if !in_recovery {
        return Err(format!("{} is not a standby", candidate.name));
    }

    // 1. Hold new sessions on every proxy.
    platform.held.lock().unwrap_or_else(|e| e.into_inner()).insert(id.to_owned());
    let held_at = std::time::Instant::now();
    let result = async {
        let epoch = platform.publish_routes().map_err(|e| e.to_string())?;
        if !platform.publisher.wait_applied(epoch, APPLY_TIMEOUT).await {
            warn!(database = id, epoch, "not every proxy applied the hold in time");
        }
        // 2. Stop the primary cleanly; with synchronous replication its WAL is on the standby.
        let admin = users::admin(&platform.driver.admin_conninfo(&old_spec, "postgres"))
            .await
            .map_err(|e| e.to_string())?;
        let lsn: String = admin
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .map_err(|e| e.to_string())?
            .get(0);
        drop(admin);
        let driver = platform.driver.clone();
        let spec = old_spec.clone();
        blocking(move || driver.stop(&spec)).await?;
        // 3. The standby must have received everything the primary wrote.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let caught_up: bool = standby_admin
                .query_one("SELECT pg_last_wal_receive_lsn() >= $1::text::pg_lsn", &[&lsn])
                .await
                .map_err(|e| e.to_string())?
                .get(0);
            if caught_up {
                break;
            }
            if std::time::Instant::now() > deadline {
                return Err(format!("standby {} did not receive WAL up to {lsn}", candidate.name));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        // Roll back: the old primary serves again, sessions are released to it.
        platform.held.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
        let driver = platform.driver.clone();
        let spec = old_spec.clone();
        let _ =
            blocking(move || if driver.is_running(&spec) { Ok(()) } else { driver.start(&spec) })
                .await;
        let _ = platform.publish_routes();
        platform.event(
            id,
            "switchover_failed",
            format!("switchover to {} abandoned: {e}", candidate.name),
        );
        return Err(e);
    }
    // 4. Promote and release the held sessions to the new primary.
    platform.held.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
    let promoted = promote(platform, &mut db, &old.name, &candidate.name).await;
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
            Err(e)
        }
    }
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
        let err = may_promote("s", false, Some(4097), 4096).unwrap_err();
        assert!(err.contains("4097 bytes") && err.contains("could be lost"), "{err}");
        let err = may_promote("s", false, None, 1 << 30).unwrap_err();
        assert!(err.contains("unknown"), "no lag known: refused whatever the bound: {err}");
    }
}
