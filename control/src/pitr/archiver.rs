//! The archiver of one PITR database: `pg_receivewal` from the current primary, heartbeats,
//! gap checks and the weekly base backup.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgwarden_api::control::DatabaseStatus;
use time::OffsetDateTime;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use super::base::{base_backup_due, prune, take_base_backup, wal_gaps};
use super::{pitr_plan, wal_dir, Pitr, PitrError};
use crate::failure::Reportable;
use crate::nodes::config::{conninfo, REPLICATION_ROLE};
use crate::nodes::sql::{Session, SqlError, Timeouts};
use crate::nodes::{NodeSpec, Nodes};
use crate::state::{DatabaseRecord, NodeRecord};

pub(crate) const ARCHIVER: &str = "pgwarden_archiver";
const TICK: Duration = Duration::from_secs(1);

/// Heartbeats: `(time before the commit, WAL position after it)`, per database.
#[derive(Default)]
pub struct Heartbeats {
    seen: Mutex<HashMap<String, VecDeque<(OffsetDateTime, i64)>>>,
}

impl Heartbeats {
    pub(crate) fn record(&self, id: &str, at: OffsetDateTime, lsn: i64) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let beats = seen.entry(id.to_owned()).or_default();
        beats.push_back((at, lsn));
        while beats.len() > 7200 {
            beats.pop_front();
        }
    }

    /// The newest heartbeat time whose commit is at or before `flushed`.
    pub(crate) fn latest_before(&self, id: &str, flushed: i64) -> Option<OffsetDateTime> {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.get(id)?.iter().rev().find(|(_, lsn)| *lsn <= flushed).map(|(t, _)| *t)
    }

    pub(crate) fn forget(&self, id: &str) {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
    }
}

/// Starts an archiver for every PITR database, now and as they appear, each a task of
/// `tasks` that ends with `shutdown`.
pub async fn supervise(
    pitr: Pitr,
    heartbeats: Arc<Heartbeats>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    let running: Arc<Mutex<HashSet<String>>> = Arc::default();
    loop {
        for db in pitr.records.store.databases().await.unwrap_or_default() {
            if db.status == DatabaseStatus::Running
                && pitr_plan(&db.plan)
                && running.lock().expect("lock").insert(db.id.clone())
            {
                let (pitr, running, shutdown) = (pitr.clone(), running.clone(), shutdown.clone());
                let heartbeats = heartbeats.clone();
                tasks.spawn(async move {
                    archive(&pitr, &heartbeats, &db.id, &shutdown).await;
                    running.lock().expect("lock").remove(&db.id);
                });
            }
        }
        tokio::select! {
            () = tokio::time::sleep(TICK) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

async fn archive(pitr: &Pitr, heartbeats: &Heartbeats, id: &str, shutdown: &CancellationToken) {
    let Pitr { records, nodes, metrics, backup_dir, data_dir, .. } = pitr;
    let mut receiver: Option<(String, Child)> = None;
    let mut admin: Option<Session> = None;
    let mut ticks = 0u64;
    // When the last heartbeat was committed, and the WAL position after it.
    let mut last_beat: Option<(Instant, i64)> = None;
    let mut reported_gaps: Vec<String> = Vec::new();
    while let Ok(Some(db)) = records.store.database(id).await {
        match db.status {
            DatabaseStatus::Deleting | DatabaseStatus::Failed => break,
            DatabaseStatus::Restoring => {
                // The restore moves the archive aside; streaming resumes on the new primary.
                if let Some((_, mut child)) = receiver.take() {
                    let _ = child.kill().await;
                }
                admin = None;
            }
            _ => {}
        }
        if let (DatabaseStatus::Running, Some(primary)) = (db.status, db.primary().cloned()) {
            let restart = match &mut receiver {
                Some((node, child)) => {
                    *node != primary.name || child.try_wait().ok().flatten().is_some()
                }
                None => true,
            };
            if restart {
                if let Some((_, mut child)) = receiver.take() {
                    let _ = child.kill().await;
                }
                match start_receiver(nodes, backup_dir, data_dir, &db, &primary).await {
                    Ok(child) => {
                        receiver = Some((primary.name.clone(), child));
                        records
                            .event(
                                id,
                                "wal_archiving",
                                format!("streaming WAL from {}", primary.name),
                            )
                            .await;
                    }
                    Err(e) => warn!(database = id, error = %e, "cannot start WAL archiving"),
                }
            }
            if admin.as_ref().is_none_or(|s| s.node() != primary.name || s.is_closed()) {
                let spec = NodeSpec::of(&primary);
                admin = nodes.session_within(&spec, "postgres", Timeouts::within(TICK)).await.ok();
            }
            if let Some(session) = &admin {
                match heartbeat(session, last_beat).await {
                    Ok(Some((before, lsn))) => {
                        heartbeats.record(id, before, lsn);
                        last_beat = Some((Instant::now(), lsn));
                    }
                    Ok(None) => {}
                    // A session that timed out may be stuck: open a new one next time.
                    Err(_) => admin = None,
                }
            }
            if ticks.is_multiple_of(10) {
                let gaps = wal_gaps(&wal_dir(backup_dir, id), None);
                if !gaps.is_empty() && gaps != reported_gaps {
                    metrics.wal_gap();
                    records
                        .event(
                            id,
                            "wal_gap",
                            format!("WAL archive is missing segment(s) {}", gaps.join(", ")),
                        )
                        .await;
                    reported_gaps = gaps;
                }
            }
            if receiver.is_some() && base_backup_due(backup_dir, id) {
                match take_base_backup(records, nodes, backup_dir, data_dir, &db).await {
                    Ok(b) => {
                        let message = format!("base backup {} taken and verified", b.id);
                        records.event(id, "base_backup", message).await;
                        prune(records, backup_dir, id).await;
                    }
                    Err(e) => {
                        records
                            .event(
                                id,
                                "base_backup_failed",
                                format!("base backup failed: {}", e.sentence()),
                            )
                            .await
                    }
                }
            }
        }
        ticks += 1;
        tokio::select! {
            () = tokio::time::sleep(TICK) => {}
            () = shutdown.cancelled() => break,
        }
    }
    if let Some((_, mut child)) = receiver.take() {
        let _ = child.kill().await;
    }
    heartbeats.forget(id);
}

/// While nothing was written since the last heartbeat, one every this often (a heartbeat is a
/// commit: WAL written, flushed, and sent to the standby and the archive).
const IDLE_BEAT: Duration = Duration::from_secs(5);

/// Commits a heartbeat (a transaction of its own, for a restore to stop after) and returns the
/// time before it and the WAL position after it, unless nothing was written since `last` and
/// that beat is less than [`IDLE_BEAT`] old: then the PITR window's end moves on at the next
/// beat, and an idle database costs its nodes one commit every few seconds, not every second.
async fn heartbeat(
    session: &Session,
    last: Option<(Instant, i64)>,
) -> Result<Option<(OffsetDateTime, i64)>, SqlError> {
    const POSITION: &str = "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::int8";
    if let Some((_, after)) = last.filter(|(at, _)| at.elapsed() < IDLE_BEAT) {
        let now: i64 = session.query_one(POSITION, &[]).await?.get(0);
        if now == after {
            return Ok(None);
        }
    }
    let before = OffsetDateTime::now_utc();
    session.batch_execute("SELECT pg_current_xact_id()").await?;
    let after: i64 = session.query_one(POSITION, &[]).await?.get(0);
    Ok(Some((before, after)))
}

/// A replication connection string to `node` (the password comes from the environment of the
/// program that uses it, never from its command line).
pub(crate) fn replication_conninfo(data_dir: &Path, node: &NodeRecord, app: &str) -> String {
    let port = node.port.to_string();
    let ca = data_dir.join("ca/ca.crt").display().to_string();
    conninfo(&[
        ("host", &node.host),
        ("port", &port),
        ("user", REPLICATION_ROLE),
        ("sslmode", "verify-full"),
        ("sslrootcert", &ca),
        ("application_name", app),
        ("connect_timeout", "3"),
    ])
}

async fn start_receiver(
    nodes: &Nodes,
    backup_dir: &Path,
    data_dir: &Path,
    db: &DatabaseRecord,
    primary: &NodeRecord,
) -> Result<Child, PitrError> {
    let admin = nodes.session(&NodeSpec::of(primary), "postgres").await?;
    admin
        .execute(
            "SELECT pg_create_physical_replication_slot($1, true) WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
            &[&ARCHIVER],
        )
        .await?;
    let dir = wal_dir(backup_dir, &db.id);
    let log = crate::files::blocking_io(|| {
        crate::files::private_dir(&dir)?;
        crate::files::create_private(&dir.parent().unwrap_or(&dir).join("pg_receivewal.log"))
    })?;
    // Killed with this process, even by kill -9: a receiver left behind would hold the slot
    // and write into the archive the next leader writes to.
    Command::new("setpriv")
        .args(["--pdeathsig", "KILL"])
        .arg(nodes.tools(db).join("pg_receivewal"))
        .arg("-D")
        .arg(&dir)
        .args(["--slot", ARCHIVER, "--synchronous", "--no-loop", "--no-password", "-d"])
        .arg(replication_conninfo(data_dir, primary, ARCHIVER))
        .env("PGPASSWORD", &db.replication_password)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| PitrError::NotRunnable { what: "pg_receivewal", source })
}
