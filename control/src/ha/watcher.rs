//! One watcher per replicated database: health checks, replication mode, and what follows
//! from them.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgwarden_api::control::DatabaseStatus;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info};

use super::failover::failover;
use super::pressure;
use super::rejoin::rejoin;
use super::{Ha, HealthConfig};
use crate::metrics::Metrics;
use crate::nodes::kept::Purpose;
use crate::nodes::sql::{Session, SqlError, Timeouts};
use crate::nodes::{NodeSpec, Nodes};
use crate::state::{DatabaseRecord, NodeRecord, Records, StoreError};

/// Starts a watcher for every replicated database, now and as they appear.
/// Each watcher is a task of `tasks`, and ends with `shutdown`.
pub async fn supervise(ha: Ha, shutdown: CancellationToken, tasks: TaskTracker) {
    let watched: Arc<Mutex<HashSet<String>>> = Arc::default();
    loop {
        for db in ha.records.store.databases().await.unwrap_or_default() {
            // Also a database already `updating` again: a plan change started between two
            // passes relies on the watcher to rejoin the old primary after its switchover.
            let replicated = db.nodes.len() > 1;
            let alive = !matches!(db.status, DatabaseStatus::Deleting | DatabaseStatus::Failed);
            if replicated
                && alive
                && watched.lock().unwrap_or_else(|e| e.into_inner()).insert(db.id.clone())
            {
                let (ha, watched, shutdown) = (ha.clone(), watched.clone(), shutdown.clone());
                tasks.spawn(async move {
                    tokio::select! {
                        () = watch(&ha, &db.id) => {}
                        () = shutdown.cancelled() => {}
                    }
                    watched.lock().unwrap_or_else(|e| e.into_inner()).remove(&db.id);
                });
            }
        }
        tokio::select! {
            () = tokio::time::sleep(ha.health.interval) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// How punctual a check was: how late its tick woke the watcher, how long it took, and whether
/// the machine (when the primary is on this host) was starved meanwhile.
struct Punctuality {
    late: Duration,
    took: Duration,
    stalled: bool,
}

/// The share of the time tasks waited for a CPU or for I/O beyond which the machine is taken
/// to be starved (`pressure.rs`).
const STALLED: f64 = 0.5;

/// How long timed-out checks may stay inconclusive: a primary that froze while the machine was
/// starved is failed over after this much more, not never.
const DEFER_AT_MOST: Duration = Duration::from_secs(30);

/// Lateness beyond which the control plane, not the node, is taken to be slow.
const LATE: Duration = Duration::from_millis(100);

impl Punctuality {
    /// Whether a check that failed with `error` counts against the primary. A refusal or a
    /// closed connection always does. A timeout counts only when the control plane ran on
    /// time (its tick woke it within [`LATE`] and the check ended within [`LATE`] of its
    /// bounds: a connection, then a statement, each within the health timeout) and the machine
    /// was not starved. On an overloaded machine, a primary that did not answer within the
    /// timeout may only have waited for a CPU.
    fn counts(&self, error: &CheckError, health: &HealthConfig) -> bool {
        let on_time = self.late <= LATE && self.took <= health.timeout * 2 + LATE;
        !error.timed_out() || (on_time && !self.stalled)
    }
}

/// What a check of the primary saw.
pub(crate) struct PrimaryState {
    /// WAL position the primary has written up to (bytes from 0/0).
    pub written: i64,
    pub standbys: Vec<StandbyState>,
}

/// A streaming standby, as its primary sees it.
pub(crate) struct StandbyState {
    pub name: String,
    /// Bytes written by the primary not yet flushed by the standby.
    pub lag: u64,
    /// WAL position the standby has flushed up to.
    pub flushed: i64,
}

impl PrimaryState {
    pub fn lags(&self) -> Vec<(String, u64)> {
        self.standbys.iter().map(|s| (s.name.clone(), s.lag)).collect()
    }
}

/// Commits were just made to wait for `standby` on `primary`; they count as synchronous once
/// the standby has flushed what was written before (`after`, taken at the next check).
struct Switch {
    primary: String,
    standby: String,
    after: Option<i64>,
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

async fn watch(ha: &Ha, id: &str) {
    let health = ha.health.clone();
    let mut failures = 0u32;
    let mut standby_missing = 0u32;
    // Lag of each standby at the last good check, for the failover decision.
    let mut last_lag: Vec<(String, u64)> = Vec::new();
    let mut repair = Background::default();
    let mut switching: Option<Switch> = None;
    // Since when no standby could be made synchronous (logged now and then).
    let mut waiting_since: Option<Instant> = None;
    // Since when timed-out checks have been inconclusive (the verdict deferred); only an
    // answer of the primary (or a new primary) ends the deferral.
    let mut deferring_since: Option<Instant> = None;
    // Checks at a fixed cadence: a check that times out does not delay the next one.
    let mut ticks = tokio::time::interval(health.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        // The tick's lateness: how long after it was due (or after this pass began waiting,
        // when it was due already) the runtime woke this task.
        let waiting_from = tokio::time::Instant::now();
        let scheduled = ticks.tick().await;
        let late =
            tokio::time::Instant::now().saturating_duration_since(scheduled.max(waiting_from));
        let Ok(Some(db)) = ha.records.store.database(id).await else { return };
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
        let started = Instant::now();
        let checked = check_primary(&ha.nodes, &ha.health, &primary).await;
        // The machine's pressure matters only for a timeout, and only on this host.
        let timed_out = checked.as_ref().is_err_and(CheckError::timed_out);
        let stalled = timed_out
            && primary.agent.is_none()
            && pressure::MACHINE.stalled().is_some_and(|s| s >= STALLED);
        let punctual = Punctuality { late, took: started.elapsed(), stalled };
        match checked {
            Ok(state) => {
                failures = 0;
                deferring_since = None;
                last_lag = state.lags();
                let streaming =
                    db.replicas().any(|r| state.standbys.iter().any(|s| s.name == r.name));
                standby_missing = if streaming { 0 } else { standby_missing + 1 };
                if ha.claims.busy(id) {
                    // A primary change is running: leave the nodes to it.
                    if waiting_since.get_or_insert_with(Instant::now).elapsed() > WHY_EVERY {
                        waiting_since = Some(Instant::now());
                        info!(database = id, "a primary change is running: replication left to it");
                    }
                    continue;
                }
                if switching.as_ref().is_some_and(|s| s.primary != primary.name) {
                    switching = None; // The primary changed since: its settings are new.
                }
                let lost = standby_missing >= health.failures;
                let modes = (&mut switching, &mut waiting_since);
                replication_mode(ha, &db, &primary, &state, lost, modes).await;
                if let Some(fenced) = db.nodes.iter().find(|n| n.fenced).cloned() {
                    let (ha, id) = (ha.clone(), id.to_owned());
                    repair.start(async move {
                        rejoin(&ha.records, &ha.nodes, &ha.routing, &id, &fenced).await
                    });
                } else if standby_missing >= health.failures {
                    let ha = ha.clone();
                    repair.start(async move {
                        restart_stopped_standbys(&ha.records, &ha.nodes, &db).await
                    });
                }
            }
            Err(e)
                if !punctual.counts(&e, &health)
                    && deferring_since.get_or_insert_with(Instant::now).elapsed()
                        < DEFER_AT_MOST =>
            {
                // The control plane ran late, or the machine is starved: a check that timed
                // out says nothing of the primary. Neither a failure nor a success, for a while.
                info!(database = id, node = %primary.name, late_ms = punctual.late.as_millis(),
                    took_ms = punctual.took.as_millis(), stalled = punctual.stalled, error = %e,
                    "primary check inconclusive: the control plane ran late or the machine is starved");
            }
            Err(e) => {
                // Past the deferral, every failure counts until the primary answers again.
                failures += 1;
                debug!(database = id, node = %primary.name, failures, error = %e, "primary check failed");
                if failures < health.failures {
                    continue;
                }
                if ha.claims.primary_stopped_on_purpose(id) {
                    debug!(database = id, "primary stopped by a planned change");
                    continue;
                }
                ha.records
                    .event(
                        id,
                        "primary_unreachable",
                        format!("primary {} failed {failures} checks: {e}", primary.name),
                    )
                    .await;
                let _ = failover(ha, id, &primary.name, &last_lag, "primary unreachable").await;
                failures = 0;
                deferring_since = None;
            }
        }
    }
}

/// Why a check of the primary failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CheckError {
    #[error(transparent)]
    Sql(#[from] SqlError),
    /// Its postmaster is stopped (SIGSTOP) or a zombie: sessions open on it still answer, new
    /// ones cannot start.
    #[error("the postmaster of node {node} is not running (process state {state})")]
    PostmasterStopped { node: String, state: char },
}

impl CheckError {
    /// The check ran out of time (as opposed to being refused or answered).
    pub(crate) fn timed_out(&self) -> bool {
        matches!(self, CheckError::Sql(SqlError::Timeout { .. }))
    }
}

/// Checks `primary` on the session kept for health checks: one round trip that reads its WAL
/// position, each streaming standby's, and its postmaster's process state (a check on an open
/// session would not see a frozen postmaster, which starts no new session).
pub(crate) async fn check_primary(
    nodes: &Nodes,
    health: &HealthConfig,
    primary: &NodeRecord,
) -> Result<PrimaryState, CheckError> {
    let timeouts = Timeouts::within(health.timeout);
    let spec = NodeSpec::of(primary);
    // One row of NULLs for the standbys when none streams.
    let query = async |session: &Session| {
        session
            .query(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::int8, r.application_name, \
                 coalesce(pg_wal_lsn_diff(r.flush_lsn, '0/0'), 0)::int8, one.postmaster \
                 FROM (SELECT pg_read_file('/proc/' || \
                   split_part(pg_read_file('postmaster.pid'), E'\\n', 1) || '/stat') AS postmaster) \
                   AS one \
                 LEFT JOIN pg_stat_replication AS r ON r.state = 'streaming'",
                &[],
            )
            .await
    };
    let rows = nodes.read_kept(&spec, Purpose::Health, timeouts, query).await?;
    let postmaster: Option<String> = rows.first().and_then(|r| r.get(3));
    if let Some(state) = postmaster.as_deref().and_then(process_state) {
        if matches!(state, 'T' | 't' | 'Z' | 'X') {
            return Err(CheckError::PostmasterStopped { node: primary.name.clone(), state });
        }
    }
    let written: i64 = rows.first().map_or(0, |r| r.get(0));
    let standbys = rows
        .iter()
        .filter_map(|r| {
            let name: String = r.get::<_, Option<String>>(1)?;
            let flushed: i64 = r.get(2);
            Some(StandbyState { name, lag: (written - flushed).max(0) as u64, flushed })
        })
        .collect();
    Ok(PrimaryState { written, standbys })
}

/// The state letter of a `/proc/<pid>/stat` line (after the command name, which may hold
/// spaces and parentheses).
fn process_state(stat: &str) -> Option<char> {
    stat.rsplit_once(')')?.1.split_whitespace().next()?.chars().next()
}

/// Degrades to asynchronous commits when the standby is gone; makes them synchronous again
/// when it streams nearly caught up, and records it once the standby has everything written
/// before the switch. Never waits on a node beyond one reload: the watcher's checks go on.
async fn replication_mode(
    ha: &Ha,
    db: &DatabaseRecord,
    primary: &NodeRecord,
    state: &PrimaryState,
    standby_lost: bool,
    (switching, waiting_since): (&mut Option<Switch>, &mut Option<Instant>),
) {
    let Ha { records, nodes, metrics, .. } = ha;
    if standby_lost && (db.synchronous || switching.is_some()) {
        // Asynchronous again, also when a switch was under way: commits must not wait for a
        // standby that is gone.
        if set_synchronous_standby(nodes, db, primary, None).await {
            *switching = None;
            if db.synchronous {
                record(records, metrics, db, primary, false).await;
            }
        }
        return;
    }
    if db.synchronous {
        return;
    }
    if let Some(switch) = switching {
        let Some(standby) = state.standbys.iter().find(|s| s.name == switch.standby) else {
            return;
        };
        match switch.after {
            None => switch.after = Some(state.written),
            Some(after) if standby.flushed >= after => {
                let name = switch.standby.clone();
                *switching = None;
                if record(records, metrics, db, primary, true).await {
                    records
                        .event(
                            &db.id,
                            "replication_synchronous",
                            format!("standby {name} caught up: commits are synchronous again"),
                        )
                        .await;
                }
            }
            Some(_) => {}
        }
        return;
    }
    // Streaming and nearly caught up: under a steady write load the lag is rarely exactly 0.
    let caught_up = db
        .replicas()
        .find(|r| state.standbys.iter().any(|s| s.name == r.name && s.lag <= CATCH_UP_BYTES));
    if caught_up.is_none() && waiting_since.get_or_insert_with(Instant::now).elapsed() > WHY_EVERY {
        *waiting_since = Some(Instant::now());
        info!(database = %db.id, streaming = ?state.lags(), "commits stay asynchronous: no standby streams within 1 MiB");
    }
    if let Some(standby) = caught_up {
        *waiting_since = None;
        info!(database = %db.id, standby = %standby.name, "making commits wait for this standby");
        if set_synchronous_standby(nodes, db, primary, Some(&standby.name)).await {
            *switching = Some(Switch {
                primary: primary.name.clone(),
                standby: standby.name.clone(),
                after: None,
            });
        }
    }
}

/// How often the watcher says why commits stay asynchronous.
const WHY_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// A standby streaming at most this far behind is made synchronous.
const CATCH_UP_BYTES: u64 = 1 << 20;

/// Rewrites the primary's `synchronous_standby_names` and reloads it. False on failure (logged).
async fn set_synchronous_standby(
    nodes: &Nodes,
    db: &DatabaseRecord,
    primary: &NodeRecord,
    standby: Option<&str>,
) -> bool {
    let config = match nodes.config(db, primary, standby) {
        Ok(config) => config,
        Err(e) => {
            error!(database = %db.id, error = %e, "cannot change replication mode");
            return false;
        }
    };
    let (driver, spec) = (&nodes.driver, NodeSpec::of(primary));
    let reloaded = async move {
        driver.configure(&spec, &config).await?;
        driver.reload(&spec).await
    }
    .await;
    if let Err(e) = &reloaded {
        error!(database = %db.id, error = %e, "cannot change replication mode");
    }
    reloaded.is_ok()
}

/// Records whether commits are synchronous (if `primary` is still the primary). The event of a
/// degrade is recorded here; the caller records the way back, naming the standby.
async fn record(
    records: &Records,
    metrics: &Metrics,
    db: &DatabaseRecord,
    primary: &NodeRecord,
    synchronous: bool,
) -> bool {
    let recorded = records
        .update(&db.id, |db| {
            let same = db.primary().is_some_and(|p| p.name == primary.name);
            if same {
                db.synchronous = synchronous;
            }
            Ok::<_, StoreError>(same)
        })
        .await;
    match recorded {
        Ok(Some((true, _))) => {}
        Ok(_) => return false,
        Err(e) => {
            error!(database = %db.id, error = %e, "cannot record replication mode");
            return false;
        }
    }
    metrics.replication_mode(synchronous);
    if !synchronous {
        records
            .event(
                &db.id,
                "replication_degraded",
                "standby not streaming: commits are asynchronous until it is back",
            )
            .await;
    }
    true
}

/// Starts standbys whose processes are gone (crashed or killed); they catch up by streaming.
async fn restart_stopped_standbys(records: &Records, nodes: &Nodes, db: &DatabaseRecord) {
    for standby in db.replicas() {
        let (driver, spec) = (&nodes.driver, NodeSpec::of(standby));
        let restarted = async move {
            if driver.is_running(&spec).await {
                return Ok(false);
            }
            driver.fence(&spec).await?;
            driver.start(&spec).await.map(|()| true)
        }
        .await;
        match restarted {
            Ok(true) => {
                records
                    .event(
                        &db.id,
                        "node_restarted",
                        format!("standby {} was down; restarted", standby.name),
                    )
                    .await
            }
            Ok(false) => {}
            Err(e) => {
                records
                    .event(
                        &db.id,
                        "node_failed",
                        format!("standby {} could not restart: {e}", standby.name),
                    )
                    .await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeout() -> CheckError {
        CheckError::Sql(SqlError::Timeout { node: "n".into(), after: Duration::from_millis(400) })
    }

    #[test]
    fn a_timeout_counts_only_when_the_control_plane_ran_on_time() {
        let health = HealthConfig::default();
        let (late, took) = (Duration::from_millis(3), health.timeout);
        let on_time = Punctuality { late, took, stalled: false };
        assert!(on_time.counts(&timeout(), &health));
        let starved = Punctuality { late, took, stalled: true };
        assert!(!starved.counts(&timeout(), &health), "the machine starved");
        let late_tick = Punctuality { late: Duration::from_millis(700), took, stalled: false };
        assert!(!late_tick.counts(&timeout(), &health), "woken 700 ms late");
        let slow =
            Punctuality { late: Duration::ZERO, took: Duration::from_secs(3), stalled: false };
        assert!(!slow.counts(&timeout(), &health), "a 400 ms bound that fired after 3 s");
        let stopped = CheckError::PostmasterStopped { node: "n".into(), state: 'T' };
        assert!(slow.counts(&stopped, &health), "an answer is evidence however late");
    }

    #[test]
    fn the_process_state_follows_the_last_parenthesis() {
        assert_eq!(process_state("4242 (postgres) T 1 4242 4242 0 -1"), Some('T'));
        assert_eq!(process_state("7 (a (b) c) S 1 7"), Some('S'));
        assert_eq!(process_state("garbage"), None);
    }
}
