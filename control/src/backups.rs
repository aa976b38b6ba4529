//! Logical backups: `pg_dump` custom-format archives, taken from a standby when there is one,
//! verified when written (sha256 recorded, archive listed by `pg_restore --list`), kept in a
//! `BackupStorage`, pruned by the plan's retention, and taken daily at the database's hour by a
//! scheduler that catches up after a restart.

use std::io::Read;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use pgwarden_api::control::DatabaseStatus;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::plans;
use crate::platform::{now_rfc3339, Platform};
use crate::records::DatabaseRecord;
use crate::retention::{self, Policy};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackupKind {
    Daily,
    Manual,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackupStatus {
    Running,
    Succeeded,
    Failed,
}

/// One backup, as stored and as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Backup {
    pub id: String,
    pub database_id: String,
    pub kind: BackupKind,
    pub status: BackupStatus,
    /// RFC 3339.
    pub started_at: String,
    pub finished_at: Option<String>,
    pub size_bytes: u64,
    pub sha256: Option<String>,
    /// Node the dump was taken from.
    pub node: Option<String>,
    pub error: Option<String>,
}

impl Backup {
    pub fn key(&self) -> String {
        format!("{}/{}.dump", self.database_id, self.id)
    }

    fn started(&self) -> Option<OffsetDateTime> {
        OffsetDateTime::parse(&self.started_at, &time::format_description::well_known::Rfc3339).ok()
    }
}

/// Why a manual backup cannot be taken now.
pub fn check_manual_allowed(platform: &Platform, db: &DatabaseRecord) -> Result<(), String> {
    let plan = plans::find(&db.plan).ok_or("unknown plan")?;
    let manual = platform
        .store
        .backups(&db.id)
        .map_err(|e| e.to_string())?
        .iter()
        .filter(|b| b.kind == BackupKind::Manual && b.status != BackupStatus::Failed)
        .count();
    if manual as u32 >= plan.manual_backups_max {
        return Err(if plan.manual_backups_max == 0 {
            format!("plan {} includes no manual backups; change to a plan with backups", plan.name)
        } else {
            format!(
                "manual backup limit reached: plan {} keeps at most {} manual backups; delete one first",
                plan.name, plan.manual_backups_max
            )
        });
    }
    Ok(())
}

/// Records a new backup as running; `run` takes it.
pub fn start(platform: &Platform, db: &DatabaseRecord, kind: BackupKind) -> Result<Backup, String> {
    let seq = platform.store.next_counter("backup_seq").map_err(|e| e.to_string())?;
    let backup = Backup {
        id: format!("bk-{seq:06}"),
        database_id: db.id.clone(),
        kind,
        status: BackupStatus::Running,
        started_at: now_rfc3339(),
        finished_at: None,
        size_bytes: 0,
        sha256: None,
        node: None,
        error: None,
    };
    platform.store.put_backup(&backup).map_err(|e| e.to_string())?;
    Ok(backup)
}

/// Takes the dump, verifies it, stores it; records success or the reason of failure.
pub async fn run(platform: Arc<Platform>, mut backup: Backup) -> Backup {
    let result = take(&platform, &mut backup).await;
    backup.finished_at = Some(now_rfc3339());
    match result {
        Ok(()) => {
            backup.status = BackupStatus::Succeeded;
            platform.event(
                &backup.database_id,
                "backup",
                format!(
                    "{:?} backup {} taken: {} bytes from {}",
                    backup.kind,
                    backup.id,
                    backup.size_bytes,
                    backup.node.as_deref().unwrap_or("?")
                )
                .to_lowercase(),
            );
        }
        Err(e) => {
            backup.status = BackupStatus::Failed;
            backup.error = Some(e.clone());
            platform.event(
                &backup.database_id,
                "backup_failed",
                format!("backup {} failed: {e}", backup.id),
            );
        }
    }
    platform.metrics.operation("backup", backup.status == BackupStatus::Succeeded);
    if let Err(e) = platform.store.put_backup(&backup) {
        error!(error = %e, "cannot record backup");
    }
    backup
}

async fn take(platform: &Arc<Platform>, backup: &mut Backup) -> Result<(), String> {
    let db = platform
        .store
        .database(&backup.database_id)
        .map_err(|e| e.to_string())?
        .ok_or("database vanished")?;
    // From a standby when there is one, so that the primary's clients do not pay for it.
    let source = db.replicas().next().or(db.primary()).cloned().ok_or("no node to back up from")?;
    backup.node = Some(source.name.clone());
    let conninfo = platform.driver.admin_conninfo(&platform.node_spec(&source), &db.name);
    let scratch =
        platform.backups.scratch().join(format!("{}-{}.dump", backup.database_id, backup.id));
    let bin = platform.pg_bin.clone();
    let file = scratch.clone();
    let (size, sha256) =
        tokio::task::spawn_blocking(move || dump_and_verify(&bin, &conninfo, &file))
            .await
            .map_err(|e| e.to_string())??;
    backup.size_bytes = size;
    backup.sha256 = Some(sha256);
    let key = backup.key();
    platform.backups.store(&key, &scratch).map_err(|e| {
        let _ = std::fs::remove_file(&scratch);
        format!("cannot store the backup: {e}")
    })
}

fn dump_and_verify(bin: &Path, conninfo: &str, file: &Path) -> Result<(u64, String), String> {
    let out = Command::new(bin.join("pg_dump"))
        .args(["--format=custom", "--no-password", "--dbname", conninfo, "--file"])
        .arg(file)
        .output()
        .map_err(|e| format!("cannot run pg_dump: {e}"))?;
    if !out.status.success() {
        let _ = std::fs::remove_file(file);
        return Err(format!("pg_dump failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    let list = Command::new(bin.join("pg_restore"))
        .arg("--list")
        .arg(file)
        .output()
        .map_err(|e| e.to_string())?;
    if !list.status.success() {
        let _ = std::fs::remove_file(file);
        return Err(format!(
            "the archive does not read back: {}",
            String::from_utf8_lossy(&list.stderr).trim()
        ));
    }
    let size = std::fs::metadata(file).map_err(|e| e.to_string())?.len();
    Ok((size, sha256_file(file).map_err(|e| e.to_string())?))
}

/// Hex sha256 of a file, read in 64 KiB blocks.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(ctx.finish().as_ref().iter().map(|b| format!("{b:02x}")).collect())
}

/// Deletes a backup's file and record.
pub fn delete(platform: &Platform, backup: &Backup) -> Result<(), String> {
    platform.backups.delete(&backup.key()).map_err(|e| e.to_string())?;
    platform.store.delete_backup(&backup.database_id, &backup.id).map_err(|e| e.to_string())
}

/// Applies the plan's retention to a database's daily backups.
pub fn prune(platform: &Platform, db: &DatabaseRecord, now: OffsetDateTime) {
    let Some(plan) = plans::find(&db.plan) else { return };
    let policy = Policy {
        daily: plan.daily_backups,
        weekly: plan.weekly_backups,
        monthly: plan.monthly_backups,
    };
    let Ok(backups) = platform.store.backups(&db.id) else { return };
    let daily: Vec<(String, OffsetDateTime)> = backups
        .iter()
        .filter(|b| b.kind == BackupKind::Daily && b.status == BackupStatus::Succeeded)
        .filter_map(|b| Some((b.id.clone(), b.started()?)))
        .collect();
    for id in retention::to_delete(&daily, policy, now) {
        if let Some(backup) = backups.iter().find(|b| b.id == id) {
            match delete(platform, backup) {
                Ok(()) => platform.event(
                    &db.id,
                    "backup_expired",
                    format!("backup {id} removed by the plan's retention"),
                ),
                Err(e) => {
                    error!(database = %db.id, backup = %id, error = %e, "cannot remove expired backup")
                }
            }
        }
    }
}

/// The most recent scheduled instant at or before `now` for a daily hour (UTC).
pub fn last_slot(now: OffsetDateTime, hour: u8) -> OffsetDateTime {
    let today = now.replace_time(time::Time::from_hms(hour, 0, 0).expect("hour < 24"));
    if today <= now {
        today
    } else {
        today - time::Duration::days(1)
    }
}

/// Takes each database's daily backup when its hour has come and none was taken since (so a
/// backup missed while the control plane was down is taken when it comes back), then prunes.
pub async fn schedule(platform: Arc<Platform>, tick: Duration, shutdown: CancellationToken) {
    loop {
        for db in platform.store.databases().unwrap_or_default() {
            let daily_plan = plans::find(&db.plan).is_some_and(|p| p.daily_backups > 0);
            if db.status != DatabaseStatus::Running || !daily_plan {
                continue;
            }
            let now = OffsetDateTime::now_utc();
            let slot = last_slot(now, db.backup_hour_utc);
            let created = OffsetDateTime::parse(
                &db.created_at,
                &time::format_description::well_known::Rfc3339,
            )
            .unwrap_or(now);
            let created_hour =
                created.replace_time(time::Time::from_hms(created.hour(), 0, 0).expect("valid"));
            let taken = platform.store.backups(&db.id).unwrap_or_default().iter().any(|b| {
                b.kind == BackupKind::Daily
                    && b.status != BackupStatus::Failed
                    && b.started().is_some_and(|t| t >= slot)
            });
            if slot >= created_hour && !taken {
                info!(database = %db.id, "daily backup due");
                if let Ok(backup) = start(&platform, &db, BackupKind::Daily) {
                    run(platform.clone(), backup).await;
                }
                prune(&platform, &db, OffsetDateTime::now_utc());
            }
        }
        tokio::select! {
            () = tokio::time::sleep(tick) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_slot_is_today_or_yesterday() {
        let now = time::macros::datetime!(2026-03-10 14:30 UTC);
        assert_eq!(last_slot(now, 1), time::macros::datetime!(2026-03-10 01:00 UTC));
        assert_eq!(last_slot(now, 14), time::macros::datetime!(2026-03-10 14:00 UTC));
        assert_eq!(last_slot(now, 15), time::macros::datetime!(2026-03-09 15:00 UTC));
    }
}
