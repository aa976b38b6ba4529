//! One watcher per replicated database: health checks, replication mode, and what follows
//! from them.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgwarden_api::control::DatabaseStatus;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error};

use super::failover::failover;
use super::rejoin::rejoin;
use crate::nodes::blocking;
use crate::nodes::sql::{SqlError, Timeouts};
use crate::platform::Platform;
use crate::state::{DatabaseRecord, NodeRecord, StoreError};

/// Starts a watcher for every replicated database, now and as they appear.
pub async fn supervise(platform: Arc<Platform>, shutdown: CancellationToken) {
    let watched: Arc<Mutex<HashSet<String>>> = Arc::default();
    loop {
        for db in platform.store.databases().unwrap_or_default() {
            let replicated = db.nodes.len() > 1;
            if replicated
                && db.status == DatabaseStatus::Running
                && watched.lock().unwrap_or_else(|e| e.into_inner()).insert(db.id.clone())
            {
                let (platform, watched, shutdown) =
                    (platform.clone(), watched.clone(), shutdown.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        () = watch(&platform, &db.id) => {}
                        () = shutdown.cancelled() => {}
                    }
                    watched.lock().unwrap_or_else(|e| e.into_inner()).remove(&db.id);
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
pub(crate) struct PrimaryState {
    /// `(application_name, sync_state, bytes not yet flushed by it)` for each streaming standby.
    pub standbys: Vec<(String, String, u64)>,
}

impl PrimaryState {
    pub fn lags(&self) -> Vec<(String, u64)> {
        self.standbys.iter().map(|(n, _, lag)| (n.clone(), *lag)).collect()
    }
}

/// Work the watcher started and that must not run twice at once.
#[derive(Default)]
struct Background {
    task: Option<JoinHandle<()>>,
}

impl Background {
    fn idle(&self) -> bool {
        self.task.as_ref().is_none_or(|t| t.is_finished())
    }

    fn start(&mut self, work: impl std::future::Future<Output = ()> + Send + 'static) {
        if self.idle() {
            self.task = Some(tokio::spawn(work));
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn watch(platform: &Arc<Platform>, id: &str) {
    let health = platform.config.health.clone();
    let mut failures = 0u32;
    let mut standby_missing = 0u32;
    // Lag of each standby at the last good check, for the failover decision.
    let mut last_lag: Vec<(String, u64)> = Vec::new();
    let mut repair = Background::default();
    // Checks at a fixed cadence: a check that times out does not delay the next one.
    let mut ticks = tokio::time::interval(health.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let Ok(Some(db)) = platform.store.database(id) else { return };
        if db.nodes.len() < 2 {
            return; // No standby any more (a plan change to a single-node plan).
        }
        // A database being updated (plan change) is watched too: its change claims the
        // primary, and a failover preempts the change if the primary fails meanwhile.
        if !matches!(db.status, DatabaseStatus::Running | DatabaseStatus::Updating) {
            if matches!(db.status, DatabaseStatus::Deleting | DatabaseStatus::Failed) {
                return;
            }
            continue;
        }
        let Some(primary) = db.primary().cloned() else { continue };
        match check_primary(platform, &primary).await {
            Ok(state) => {
                failures = 0;
                last_lag = state.lags();
                let streaming =
                    db.replicas().any(|r| state.standbys.iter().any(|(n, _, _)| *n == r.name));
                standby_missing = if streaming { 0 } else { standby_missing + 1 };
                if platform.changes.busy(id) {
                    continue; // A primary change is running: leave the nodes to it.
                }
                replication_mode(
                    platform,
                    &db,
                    &primary,
                    &state,
                    standby_missing >= health.failures,
                )
                .await;
                if let Some(fenced) = db.nodes.iter().find(|n| n.fenced).cloned() {
                    let (platform, id) = (platform.clone(), id.to_owned());
                    repair.start(async move { rejoin(&platform, &id, &fenced).await });
                } else if standby_missing >= health.failures {
                    let platform = platform.clone();
                    repair.start(async move { restart_stopped_standbys(&platform, &db).await });
                }
            }
            Err(e) => {
                failures += 1;
                debug!(database = id, node = %primary.name, failures, error = %e, "primary check failed");
                if failures < health.failures {
                    continue;
                }
                if platform.changes.primary_stopped_on_purpose(id) {
                    debug!(database = id, "primary stopped by a planned change");
                    continue;
                }
                platform.event(
                    id,
                    "primary_unreachable",
                    format!("primary {} failed {failures} checks: {e}", primary.name),
                );
                let _ =
                    failover(platform, id, &primary.name, &last_lag, "primary unreachable").await;
                failures = 0;
            }
        }
    }
}

pub(crate) async fn check_primary(
    platform: &Platform,
    primary: &NodeRecord,
) -> Result<PrimaryState, SqlError> {
    let timeouts = Timeouts::within(platform.config.health.timeout);
    let spec = platform.node_spec(primary);
    let session = platform.session_within(&spec, "postgres", timeouts).await?;
    let rows = session
        .query(
            "SELECT application_name, sync_state, \
             coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), flush_lsn), 0)::int8 \
             FROM pg_stat_replication WHERE state = 'streaming'",
            &[],
        )
        .await?;
    let standbys =
        rows.iter().map(|r| (r.get(0), r.get(1), r.get::<_, i64>(2).max(0) as u64)).collect();
    Ok(PrimaryState { standbys })
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
    // Streaming and nearly caught up: under a steady write load the lag is rarely exactly 0.
    let caught_up = db
        .replicas()
        .find(|r| state.standbys.iter().any(|(n, _, lag)| *n == r.name && *lag <= CATCH_UP_BYTES))
        .map(|r| r.name.clone());
    let wanted = match (db.synchronous, standby_lost, caught_up) {
        (true, true, _) => None,
        (false, false, Some(standby)) => Some(standby),
        _ => return,
    };
    let config = match platform.node_config(db, primary, wanted.as_deref()) {
        Ok(config) => config,
        Err(e) => return error!(database = %db.id, error = %e, "cannot change replication mode"),
    };
    let (driver, spec) = (platform.driver.clone(), platform.node_spec(primary));
    if let Err(e) = blocking(move || {
        driver.configure(&spec, &config)?;
        driver.reload(&spec)
    })
    .await
    {
        return error!(database = %db.id, error = %e, "cannot change replication mode");
    }
    if let Some(standby) = &wanted {
        // From now on commits wait for the standby; what was committed before counts as
        // synchronous only once the standby has it too.
        if let Err(e) = flushed_everything(platform, primary, standby).await {
            return debug!(database = %db.id, standby, error = %e, "standby not caught up yet");
        }
    }
    let synchronous = wanted.is_some();
    let recorded = platform.update(&db.id, |db| {
        // Only if the primary is still the one reconfigured.
        if db.primary().is_some_and(|p| p.name == primary.name) {
            db.synchronous = synchronous;
        }
        Ok::<_, StoreError>(())
    });
    if let Err(e) = recorded {
        return error!(database = %db.id, error = %e, "cannot record replication mode");
    }
    platform.metrics.replication_mode(synchronous);
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

/// A standby streaming at most this far behind is made synchronous (then awaited).
const CATCH_UP_BYTES: u64 = 1 << 20;
/// How long a standby being made synchronous may take to flush what the primary wrote.
const CATCH_UP_WAIT: Duration = Duration::from_secs(5);

/// Waits until `standby` flushed everything `primary` had written when this was called.
async fn flushed_everything(
    platform: &Platform,
    primary: &NodeRecord,
    standby: &str,
) -> Result<(), SqlError> {
    let session = platform.session(&platform.node_spec(primary), "postgres").await?;
    let lsn: String = session.query_one("SELECT pg_current_wal_lsn()::text", &[]).await?.get(0);
    let deadline = tokio::time::Instant::now() + CATCH_UP_WAIT;
    loop {
        let row = session
            .query_opt(
                "SELECT flush_lsn >= $2::text::pg_lsn FROM pg_stat_replication WHERE application_name = $1",
                &[&standby, &lsn],
            )
            .await?;
        if row.is_some_and(|r| r.get::<_, Option<bool>>(0) == Some(true)) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(SqlError::Timeout { node: standby.to_owned(), after: CATCH_UP_WAIT });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts standbys whose processes are gone (crashed or killed); they catch up by streaming.
async fn restart_stopped_standbys(platform: &Arc<Platform>, db: &DatabaseRecord) {
    for standby in db.replicas() {
        let (driver, spec) = (platform.driver.clone(), platform.node_spec(standby));
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
