//! Continuous WAL archiving and point-in-time recovery (SPEC §8).
//!
//! For every database whose plan has PITR, `archive` keeps a `pg_receivewal --synchronous`
//! streaming WAL over TLS from the current primary (through a replication slot, so the primary
//! keeps what is not archived yet) into `<backups>/<id>/wal/`, and restarts it on the new
//! primary after a failover (it follows the new timeline). Every second it commits an empty
//! transaction with an xid on the primary, so the WAL carries a recent commit timestamp (a
//! recovery to a time needs a commit after that time) and the newest restorable second is known:
//! the last heartbeat the archiver has flushed. A base backup (`pg_basebackup -X stream`,
//! checked with `pg_verifybackup`) is taken when archiving starts and weekly. The archive is
//! checked for missing segments (event `wal_gap`).
//!
//! `restore` rebuilds the database at a target time on new nodes (base backup + archived WAL up
//! to `recovery_target_time`), checks it, swaps the routes, and only then removes the old
//! nodes. After a restore the archive starts a new generation (the old one is kept aside):
//! the old timeline's WAL past the target cannot feed the new one.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgwarden_api::control::{DatabaseStatus, Operation, OperationStatus};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::platform::{now_rfc3339, Platform};
use crate::provision::{self, blocking, node_config};
use crate::records::{DatabaseRecord, NodeRecord};
use crate::users::{self, REPLICATION_ROLE};
use crate::{local, plans};

const ARCHIVER: &str = "pgwarden_archiver";
const TICK: Duration = Duration::from_secs(1);
const BASE_BACKUP_EVERY: time::Duration = time::Duration::days(7);

/// A verified base backup.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BaseBackup {
    pub id: String,
    pub database_id: String,
    pub finished_at: String,
    /// First WAL segment the backup needs, from its `backup_label`.
    pub start_segment: String,
}

/// Heartbeats: `(time before the commit, WAL position after it)`, per database.
#[derive(Default)]
pub struct Heartbeats {
    seen: Mutex<HashMap<String, VecDeque<(OffsetDateTime, i64)>>>,
}

impl Heartbeats {
    fn record(&self, id: &str, at: OffsetDateTime, lsn: i64) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let beats = seen.entry(id.to_owned()).or_default();
        beats.push_back((at, lsn));
        while beats.len() > 7200 {
            beats.pop_front();
        }
    }

    /// The newest heartbeat time whose commit is at or before `flushed`.
    fn latest_before(&self, id: &str, flushed: i64) -> Option<OffsetDateTime> {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.get(id)?.iter().rev().find(|(_, lsn)| *lsn <= flushed).map(|(t, _)| *t)
    }

    fn forget(&self, id: &str) {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
    }
}

pub fn wal_dir(platform: &Platform, id: &str) -> PathBuf {
    platform.config.data_dir.join("backups").join(id).join("wal")
}

fn base_dir(platform: &Platform, id: &str) -> PathBuf {
    platform.config.data_dir.join("backups").join(id).join("base")
}

fn pitr_plan(db: &DatabaseRecord) -> bool {
    plans::find(&db.plan).is_some_and(|p| p.pitr)
}

/// Starts an archiver for every PITR database, now and as they appear.
pub async fn supervise(platform: Arc<Platform>, shutdown: CancellationToken) {
    let running: Arc<Mutex<HashSet<String>>> = Arc::default();
    loop {
        for db in platform.store.databases().unwrap_or_default() {
            if db.status == DatabaseStatus::Running
                && pitr_plan(&db)
                && running.lock().expect("lock").insert(db.id.clone())
            {
                let (platform, running, shutdown) =
                    (platform.clone(), running.clone(), shutdown.clone());
                tokio::spawn(async move {
                    archive(&platform, &db.id, &shutdown).await;
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

async fn archive(platform: &Arc<Platform>, id: &str, shutdown: &CancellationToken) {
    let mut receiver: Option<(String, Child)> = None;
    let mut admin: Option<(String, tokio_postgres::Client)> = None;
    let mut ticks = 0u64;
    let mut reported_gaps: Vec<String> = Vec::new();
    while let Ok(Some(db)) = platform.store.database(id) {
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
                match start_receiver(platform, &db, &primary).await {
                    Ok(child) => {
                        receiver = Some((primary.name.clone(), child));
                        platform.event(
                            id,
                            "wal_archiving",
                            format!("streaming WAL from {}", primary.name),
                        );
                    }
                    Err(e) => warn!(database = id, error = %e, "cannot start WAL archiving"),
                }
            }
            if admin.as_ref().is_none_or(|(n, c)| *n != primary.name || c.is_closed()) {
                let conninfo =
                    platform.driver.admin_conninfo(&platform.node_spec(&primary), "postgres");
                admin = users::admin(&conninfo).await.ok().map(|c| (primary.name.clone(), c));
            }
            if let Some((_, client)) = &admin {
                let before = OffsetDateTime::now_utc();
                let beat = async {
                    client.batch_execute("SELECT pg_current_xact_id()").await?;
                    client
                        .query_one(
                            "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::int8",
                            &[],
                        )
                        .await
                };
                if let Ok(Ok(row)) = tokio::time::timeout(TICK, beat).await {
                    platform.heartbeats.record(id, before, row.get(0));
                }
            }
            if ticks.is_multiple_of(10) {
                let gaps = wal_gaps(&wal_dir(platform, id), None);
                if !gaps.is_empty() && gaps != reported_gaps {
                    platform.metrics.wal_gap();
                    platform.event(
                        id,
                        "wal_gap",
                        format!("WAL archive is missing segment(s) {}", gaps.join(", ")),
                    );
                    reported_gaps = gaps;
                }
            }
            if receiver.is_some() && base_backup_due(platform, id) {
                match take_base_backup(platform, &db).await {
                    Ok(b) => {
                        let message = format!("base backup {} taken and verified", b.id);
                        platform.event(id, "base_backup", message);
                        prune(platform, id);
                    }
                    Err(e) => {
                        platform.event(id, "base_backup_failed", format!("base backup failed: {e}"))
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
    platform.heartbeats.forget(id);
}

fn replication_conninfo(platform: &Platform, node: &NodeRecord, app: &str) -> String {
    format!(
        "host={} port={} user={REPLICATION_ROLE} sslmode=verify-full sslrootcert={} application_name={app}",
        node.host,
        node.port,
        platform.config.data_dir.join("ca/ca.crt").display()
    )
}

async fn start_receiver(
    platform: &Platform,
    db: &DatabaseRecord,
    primary: &NodeRecord,
) -> Result<Child, String> {
    let admin =
        users::admin(&platform.driver.admin_conninfo(&platform.node_spec(primary), "postgres"))
            .await
            .map_err(|e| e.to_string())?;
    admin
        .execute(
            "SELECT pg_create_physical_replication_slot($1, true) WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
            &[&ARCHIVER],
        )
        .await
        .map_err(|e| e.to_string())?;
    let dir = wal_dir(platform, &db.id);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let log = std::fs::File::create(dir.parent().unwrap_or(&dir).join("pg_receivewal.log"))
        .map_err(|e| e.to_string())?;
    Command::new(platform.pg_bin.join("pg_receivewal"))
        .arg("-D")
        .arg(&dir)
        .args(["--slot", ARCHIVER, "--synchronous", "--no-loop", "--no-password", "-d"])
        .arg(replication_conninfo(platform, primary, ARCHIVER))
        .env("PGPASSWORD", &db.replication_password)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run pg_receivewal: {e}"))
}

pub fn base_backups(platform: &Platform, id: &str) -> Vec<BaseBackup> {
    let mut all: Vec<BaseBackup> = std::fs::read_dir(base_dir(platform, id))
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read(e.path().join("pgwarden-base.json")).ok())
                .filter_map(|b| serde_json::from_slice(&b).ok())
                .collect()
        })
        .unwrap_or_default();
    all.sort_by(|a: &BaseBackup, b| a.finished_at.cmp(&b.finished_at));
    all
}

fn parse_time(t: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
}

fn base_backup_due(platform: &Platform, id: &str) -> bool {
    base_backups(platform, id)
        .last()
        .and_then(|b| parse_time(&b.finished_at))
        .is_none_or(|t| OffsetDateTime::now_utc() - t > BASE_BACKUP_EVERY)
}

/// `pg_basebackup` (from the standby when there is one), verified with `pg_verifybackup`.
pub async fn take_base_backup(
    platform: &Platform,
    db: &DatabaseRecord,
) -> Result<BaseBackup, String> {
    let source = db.replicas().next().or(db.primary()).cloned().ok_or("no node")?;
    let seq = platform.store.next_counter("base_backup_seq").map_err(|e| e.to_string())?;
    let id = format!("base-{seq:06}");
    let dir = base_dir(platform, &db.id);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let (tmp, done) = (dir.join(format!(".{id}")), dir.join(&id));
    let bin = platform.pg_bin.clone();
    let conninfo = replication_conninfo(platform, &source, "pgwarden_base_backup");
    let password = db.replication_password.clone();
    let work = tmp.clone();
    let start_segment = tokio::task::spawn_blocking(move || -> Result<String, String> {
        let tmp = work;
        let run = |cmd: &mut std::process::Command, what: &str| -> Result<(), String> {
            let out = cmd.output().map_err(|e| format!("cannot run {what}: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!("{what} failed: {}", String::from_utf8_lossy(&out.stderr).trim()))
            }
        };
        let _ = std::fs::remove_dir_all(&tmp);
        run(
            std::process::Command::new(bin.join("pg_basebackup"))
                .arg("-D")
                .arg(&tmp)
                .args(["-Fp", "-X", "stream", "-c", "fast", "--no-password", "-d", &conninfo])
                .env("PGPASSWORD", &password),
            "pg_basebackup",
        )?;
        run(std::process::Command::new(bin.join("pg_verifybackup")).arg(&tmp), "pg_verifybackup")?;
        let label = std::fs::read_to_string(tmp.join("backup_label")).map_err(|e| e.to_string())?;
        label
            .lines()
            .find_map(|l| l.strip_prefix("START WAL LOCATION: "))
            .and_then(|l| l.split("(file ").nth(1))
            .map(|f| f.trim_end_matches(')').to_owned())
            .ok_or_else(|| "backup_label has no start segment".to_owned())
    })
    .await
    .map_err(|e| e.to_string())??;
    let backup =
        BaseBackup { id, database_id: db.id.clone(), finished_at: now_rfc3339(), start_segment };
    std::fs::write(
        tmp.join("pgwarden-base.json"),
        serde_json::to_vec(&backup).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    std::fs::rename(&tmp, &done).map_err(|e| e.to_string())?;
    info!(database = %db.id, backup = %backup.id, "base backup taken");
    Ok(backup)
}

/// Names of WAL segments missing between the first and the last one of each timeline (from
/// `from` on, when given).
pub fn wal_gaps(dir: &Path, from: Option<&str>) -> Vec<String> {
    let mut by_timeline: HashMap<u32, Vec<u64>> = HashMap::new();
    let names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| d.flatten().filter_map(|e| e.file_name().into_string().ok()).collect())
        .unwrap_or_default();
    for name in &names {
        let base = name.strip_suffix(".partial").unwrap_or(name);
        if let Some((tli, segno)) = parse_segment(base) {
            by_timeline.entry(tli).or_default().push(segno);
        }
    }
    let floor = from.and_then(parse_segment).map(|(_, s)| s).unwrap_or(0);
    let mut missing = Vec::new();
    for (tli, mut segs) in by_timeline {
        segs.sort_unstable();
        segs.dedup();
        let first = segs.iter().copied().find(|s| *s >= floor);
        let Some(first) = first else { continue };
        let mut expected = first;
        for s in segs.into_iter().filter(|s| *s >= first) {
            while expected < s {
                missing.push(segment_name(tli, expected));
                expected += 1;
            }
            expected = s + 1;
        }
    }
    missing.sort();
    missing
}

fn parse_segment(name: &str) -> Option<(u32, u64)> {
    if name.len() != 24 || !name.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let tli = u32::from_str_radix(&name[0..8], 16).ok()?;
    let log = u64::from_str_radix(&name[8..16], 16).ok()?;
    let seg = u64::from_str_radix(&name[16..24], 16).ok()?;
    Some((tli, log * 0x100 + seg))
}

fn segment_name(tli: u32, segno: u64) -> String {
    format!("{tli:08X}{:08X}{:08X}", segno / 0x100, segno % 0x100)
}

/// The recoverable window: from the oldest base backup to the newest archived heartbeat.
pub async fn window(
    platform: &Platform,
    db: &DatabaseRecord,
) -> Result<(OffsetDateTime, OffsetDateTime), String> {
    if !pitr_plan(db) {
        return Err(format!("plan {} has no point-in-time recovery", db.plan));
    }
    let earliest = base_backups(platform, &db.id)
        .first()
        .and_then(|b| parse_time(&b.finished_at))
        .ok_or("no base backup yet: point-in-time recovery starts after the first one")?;
    let primary = db.primary().ok_or("no primary")?;
    let admin =
        users::admin(&platform.driver.admin_conninfo(&platform.node_spec(primary), "postgres"))
            .await
            .map_err(|e| e.to_string())?;
    let row = admin
        .query_opt(
            "SELECT pg_wal_lsn_diff(flush_lsn, '0/0')::int8 FROM pg_stat_replication WHERE application_name = $1",
            &[&ARCHIVER],
        )
        .await
        .map_err(|e| e.to_string())?
        .ok_or("WAL archiving is not streaming right now")?;
    let flushed: i64 = row.get(0);
    let latest =
        platform.heartbeats.latest_before(&db.id, flushed).ok_or("no archived commit yet")?;
    Ok((earliest, latest.max(earliest)))
}

/// Rebuilds `id` as it was at `target` on new nodes; swaps routes; removes the old nodes.
pub async fn restore(
    platform: Arc<Platform>,
    id: String,
    target: OffsetDateTime,
    mut op: Operation,
) {
    let lock = platform.lock(&id);
    let guard = lock.lock().await;
    platform.update_operation(&mut op, OperationStatus::Running, 0.05);
    let result = do_restore(&platform, &id, target, &mut op).await;
    drop(guard);
    platform.metrics.operation("restore", result.is_ok());
    match result {
        Ok(()) => platform.update_operation(&mut op, OperationStatus::Succeeded, 1.0),
        Err(e) => {
            platform.event(&id, "restore_failed", e.clone());
            if let Ok(Some(mut db)) = platform.store.database(&id) {
                db.status = DatabaseStatus::Running;
                let _ = platform.store.put_database(&db);
            }
            op.error = Some(e);
            let progress = op.progress;
            platform.update_operation(&mut op, OperationStatus::Failed, progress);
        }
    }
}

/// Checks that `target` can be restored; returns the base backup to start from.
pub async fn check_restorable(
    platform: &Platform,
    db: &DatabaseRecord,
    target: OffsetDateTime,
) -> Result<BaseBackup, String> {
    let (earliest, latest) = window(platform, db).await?;
    let fmt = |t: OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
    };
    if target < earliest || target > latest {
        return Err(format!(
            "{} is outside the recoverable window {} .. {}",
            fmt(target),
            fmt(earliest),
            fmt(latest)
        ));
    }
    let base = base_backups(platform, &db.id)
        .into_iter()
        .rfind(|b| parse_time(&b.finished_at).is_some_and(|t| t <= target))
        .ok_or("no base backup before the target")?;
    // The base backup must still match its manifest (checksums of every file).
    let (bin, dir) = (platform.pg_bin.clone(), base_dir(platform, &db.id).join(&base.id));
    let verified = tokio::task::spawn_blocking(move || {
        std::process::Command::new(bin.join("pg_verifybackup"))
            .args(["--ignore", "pgwarden-base.json"])
            .arg(&dir)
            .output()
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("cannot run pg_verifybackup: {e}"))?;
    if !verified.status.success() {
        let detail = String::from_utf8_lossy(&verified.stderr);
        let first = detail.lines().next().unwrap_or("").to_owned();
        return Err(format!("base backup {} is damaged ({first}); restore refused", base.id));
    }
    let gaps = wal_gaps(&wal_dir(platform, &db.id), Some(&base.start_segment));
    if !gaps.is_empty() {
        return Err(format!(
            "the WAL archive is missing segment(s) {}: cannot replay to the target",
            gaps.join(", ")
        ));
    }
    Ok(base)
}

/// How long the archive keeps the past restorable.
pub const WINDOW: time::Duration = time::Duration::days(7);

/// Base backups no longer needed to restore any time in the window ending at `now`: every one
/// older than the newest that finished before the window's start.
pub fn bases_to_prune(bases: &[BaseBackup], now: OffsetDateTime) -> Vec<String> {
    let horizon = now - WINDOW;
    let covering =
        bases.iter().rposition(|b| parse_time(&b.finished_at).is_some_and(|t| t <= horizon));
    match covering {
        Some(i) => bases[..i].iter().map(|b| b.id.clone()).collect(),
        None => Vec::new(),
    }
}

/// WAL segment files older than the segment `oldest_needed` (any timeline); history files stay.
pub fn wal_to_prune(names: &[String], oldest_needed: &str) -> Vec<String> {
    let Some((_, floor)) = parse_segment(oldest_needed) else { return Vec::new() };
    names
        .iter()
        .filter(|n| {
            parse_segment(n.strip_suffix(".partial").unwrap_or(n)).is_some_and(|(_, s)| s < floor)
        })
        .cloned()
        .collect()
}

/// Drops base backups and WAL that no time in the window needs.
fn prune(platform: &Platform, id: &str) {
    let bases = base_backups(platform, id);
    let gone = bases_to_prune(&bases, OffsetDateTime::now_utc());
    for b in &gone {
        let _ = std::fs::remove_dir_all(base_dir(platform, id).join(b));
    }
    let Some(oldest) = bases.iter().find(|b| !gone.contains(&b.id)) else { return };
    let wal = wal_dir(platform, id);
    let names: Vec<String> = std::fs::read_dir(&wal)
        .map(|d| d.flatten().filter_map(|e| e.file_name().into_string().ok()).collect())
        .unwrap_or_default();
    let old = wal_to_prune(&names, &oldest.start_segment);
    for name in &old {
        let _ = std::fs::remove_file(wal.join(name));
    }
    if !gone.is_empty() || !old.is_empty() {
        let message = format!(
            "{} base backup(s) and {} WAL segment(s) older than the window removed",
            gone.len(),
            old.len()
        );
        platform.event(id, "pitr_pruned", message);
    }
}

async fn do_restore(
    platform: &Arc<Platform>,
    id: &str,
    target: OffsetDateTime,
    op: &mut Operation,
) -> Result<(), String> {
    let mut db =
        platform.store.database(id).map_err(|e| e.to_string())?.ok_or("database vanished")?;
    let base = check_restorable(platform, &db, target).await?;
    let old_nodes = db.nodes.clone();
    db.status = DatabaseStatus::Restoring;
    platform.store.put_database(&db).map_err(|e| e.to_string())?;
    platform.event(id, "restoring", format!("restoring to {target} from base backup {}", base.id));

    // New nodes next to the old ones.
    let next = old_nodes
        .iter()
        .filter_map(|n| n.name.rsplit('-').next()?.parse::<u32>().ok())
        .max()
        .unwrap_or(0)
        + 1;
    let new_nodes = platform.new_nodes(id, next, old_nodes.len()).map_err(|e| e.to_string())?;
    let mut restored = db.clone();
    restored.nodes = new_nodes.clone();
    let cleanup = |platform: Arc<Platform>, nodes: Vec<NodeRecord>| async move {
        for node in nodes {
            let (driver, spec) = (platform.driver.clone(), platform.node_spec(&node));
            let _ = blocking(move || driver.destroy(&spec)).await;
        }
    };
    let result = async {
        let primary = restored.primary().cloned().ok_or("no primary")?;
        let mut config = node_config(platform, &restored, &primary, None)?;
        let target_text = target
            .format(&time::macros::format_description!(
                "[year]-[month]-[day] [hour]:[minute]:[second].[subsecond digits:6]+00"
            ))
            .map_err(|e| e.to_string())?;
        config.settings.extend([
            ("recovery_target_time".to_owned(), local::quote(&target_text)),
            ("recovery_target_action".to_owned(), "'promote'".to_owned()),
            ("recovery_target_timeline".to_owned(), "'latest'".to_owned()),
        ]);
        let spec = platform.node_spec(&primary);
        let (driver, base_path, wal) =
            (platform.driver.clone(), base_dir(platform, id).join(&base.id), wal_dir(platform, id));
        let spec2 = spec.clone();
        blocking(move || {
            driver.init_from_backup(&spec2, &config, &base_path, &wal)?;
            driver.start(&spec2)
        })
        .await?;
        platform.update_operation(op, OperationStatus::Running, 0.4);
        wait_promoted(platform, &spec).await?;
        // Plain settings again (no recovery target), and a check that the database is there.
        let config = node_config(platform, &restored, &primary, None)?;
        let (driver, spec2) = (platform.driver.clone(), spec.clone());
        blocking(move || {
            driver.configure(&spec2, &config)?;
            driver.reload(&spec2)
        })
        .await?;
        let check = users::admin(&platform.driver.admin_conninfo(&spec, &restored.name))
            .await
            .map_err(|e| e.to_string())?;
        check
            .query_one("SELECT current_database()", &[])
            .await
            .map_err(|e| format!("restored database does not answer: {e}"))?;
        platform.update_operation(op, OperationStatus::Running, 0.6);
        for standby in restored.replicas().cloned().collect::<Vec<_>>() {
            provision::add_standby(platform, &restored, &standby).await?;
            restored.synchronous = true;
        }
        Ok::<(), String>(())
    }
    .await;
    if let Err(e) = result {
        cleanup(platform.clone(), new_nodes).await;
        return Err(e);
    }
    // Swap: the archive starts a new generation, routes go to the restored nodes, then the old
    // nodes go away.
    let wal = wal_dir(platform, id);
    let aside = wal.with_file_name(format!("wal-before-{}", op.id));
    let _ = std::fs::rename(&wal, &aside);
    let bases = base_dir(platform, id);
    let _ = std::fs::rename(&bases, bases.with_file_name(format!("base-before-{}", op.id)));
    platform.heartbeats.forget(id);
    restored.status = DatabaseStatus::Running;
    platform.store.put_database(&restored).map_err(|e| e.to_string())?;
    let epoch = platform.publish_routes().map_err(|e| e.to_string())?;
    platform.update_operation(op, OperationStatus::Running, 0.9);
    cleanup(platform.clone(), old_nodes).await;
    platform.event(
        id,
        "restored",
        format!("restored to {target}; routing epoch {epoch}; new base backup follows"),
    );
    Ok(())
}

async fn wait_promoted(platform: &Platform, node: &crate::driver::NodeSpec) -> Result<(), String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(1800);
    loop {
        let conninfo = platform.driver.admin_conninfo(node, "postgres");
        if let Ok(admin) = users::admin(&conninfo).await {
            if let Ok(row) = admin.query_one("SELECT pg_is_in_recovery()", &[]).await {
                if !row.get::<_, bool>(0) {
                    return Ok(());
                }
            }
        } else {
            let (driver, spec) = (platform.driver.clone(), node.clone());
            let running = blocking(move || Ok(driver.is_running(&spec))).await.unwrap_or(false);
            if !running {
                return Err(format!("recovery failed: {}", platform.driver.log_tail(node)));
            }
        }
        if std::time::Instant::now() > deadline {
            return Err("recovery did not finish within 30 minutes".into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pruning_keeps_what_the_window_needs() {
        let now = time::macros::datetime!(2026-06-30 12:00 UTC);
        let base = |id: &str, days_ago: i64, seg: &str| BaseBackup {
            id: id.into(),
            database_id: "d".into(),
            finished_at: (now - time::Duration::days(days_ago))
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap(),
            start_segment: seg.into(),
        };
        let bases = vec![
            base("b1", 21, "000000010000000000000002"),
            base("b2", 14, "000000010000000000000010"),
            base("b3", 8, "000000010000000000000020"),
            base("b4", 1, "000000020000000000000030"),
        ];
        // b3 finished before the window's start: it covers it; b1 and b2 are not needed.
        assert_eq!(bases_to_prune(&bases, now), ["b1", "b2"]);
        assert!(bases_to_prune(&bases[3..], now).is_empty(), "a lone recent backup stays");
        let names: Vec<String> = [
            "00000001000000000000001F",
            "000000010000000000000020",
            "000000010000000000000021.partial",
            "00000002.history",
            "00000002000000000000001E.partial",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            wal_to_prune(&names, "000000010000000000000020"),
            ["00000001000000000000001F", "00000002000000000000001E.partial"]
        );
    }

    #[test]
    fn gaps_are_found_per_timeline_from_the_base_backup_on() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "000000010000000000000001",
            "000000010000000000000002",
            "000000010000000000000004",
            "0000000100000000000000FF",
            "000000010000000100000000",
            "000000020000000100000001.partial",
            "000000020000000100000000",
            "00000002.history",
        ] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        let gaps = wal_gaps(dir.path(), None);
        assert_eq!(gaps[0], "000000010000000000000003");
        assert_eq!(gaps.len(), 1 + (0xFE - 0x05 + 1), "{gaps:?}");
        assert!(wal_gaps(dir.path(), Some("0000000100000000000000FF")).is_empty());
        assert_eq!(segment_name(1, 0x100), "000000010000000100000000");
    }
}
