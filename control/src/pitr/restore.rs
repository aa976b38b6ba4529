//! The recoverable window and point-in-time restores.

use std::sync::Arc;
use std::time::Duration;

use pgwarden_api::control::DatabaseStatus;
use time::OffsetDateTime;

use super::archiver::{Heartbeats, ARCHIVER};
use super::base::{base_backups, parse_time, wal_gaps, BaseBackup};
use super::{base_dir, pitr_plan, wal_dir};
use crate::lifecycle::standby::add_standby;
use crate::nodes::blocking;
use crate::nodes::config::quote;
use crate::platform::operations::Progress;
use crate::platform::Platform;
use crate::state::{DatabaseRecord, NodeRecord, StoreError};

/// The recoverable window: from the oldest base backup to the newest archived heartbeat.
pub async fn window(
    platform: &Platform,
    heartbeats: &Heartbeats,
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
    let admin = platform
        .session(&platform.node_spec(primary), "postgres")
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
    let latest = heartbeats.latest_before(&db.id, flushed).ok_or("no archived commit yet")?;
    Ok((earliest, latest.max(earliest)))
}

/// Rebuilds `id` as it was at `target` on new nodes; swaps routes; removes the old nodes. On
/// failure the database is left as it was (running on its old nodes).
pub async fn restore(
    platform: &Arc<Platform>,
    heartbeats: &Heartbeats,
    id: &str,
    target: OffsetDateTime,
    mut op: Progress,
) -> Result<(), String> {
    let result = do_restore(platform, heartbeats, id, target, &mut op).await;
    if let Err(e) = &result {
        platform.event(id, "restore_failed", e.clone());
        let _ = platform.update(id, |db| {
            db.status = DatabaseStatus::Running;
            Ok::<_, crate::state::StoreError>(())
        });
    }
    result
}

/// Checks that `target` can be restored; returns the base backup to start from.
pub async fn check_restorable(
    platform: &Platform,
    heartbeats: &Heartbeats,
    db: &DatabaseRecord,
    target: OffsetDateTime,
) -> Result<BaseBackup, String> {
    let (earliest, latest) = window(platform, heartbeats, db).await?;
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
        tracing::error!(backup = %base.id, output = %detail.trim(), "pg_verifybackup failed");
        let first = crate::nodes::driver::client_sentence(detail.lines().next().unwrap_or(""));
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

async fn do_restore(
    platform: &Arc<Platform>,
    heartbeats: &Heartbeats,
    id: &str,
    target: OffsetDateTime,
    op: &mut Progress,
) -> Result<(), String> {
    let db = platform.store.database(id).map_err(|e| e.to_string())?.ok_or("database vanished")?;
    let base = check_restorable(platform, heartbeats, &db, target).await?;
    let Some(((), db)) = platform
        .update(id, |db| {
            db.status = DatabaseStatus::Restoring;
            Ok::<_, StoreError>(())
        })
        .map_err(|e| e.to_string())?
    else {
        return Err("database vanished".into());
    };
    let old_nodes = db.nodes.clone();
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
        let mut config =
            platform.node_config(&restored, &primary, None).map_err(|e| e.to_string())?;
        let target_text = target
            .format(&time::macros::format_description!(
                "[year]-[month]-[day] [hour]:[minute]:[second].[subsecond digits:6]+00"
            ))
            .map_err(|e| e.to_string())?;
        config.settings.extend([
            ("recovery_target_time".to_owned(), quote(&target_text)),
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
        op.set(0.4);
        wait_promoted(platform, &spec).await?;
        // Plain settings again (no recovery target), and a check that the database is there.
        let config = platform.node_config(&restored, &primary, None).map_err(|e| e.to_string())?;
        let (driver, spec2) = (platform.driver.clone(), spec.clone());
        blocking(move || {
            driver.configure(&spec2, &config)?;
            driver.reload(&spec2)
        })
        .await?;
        let check = platform.session(&spec, &restored.name).await.map_err(|e| e.to_string())?;
        check
            .query_one("SELECT current_database()", &[])
            .await
            .map_err(|e| format!("restored database does not answer: {e}"))?;
        op.set(0.6);
        for standby in restored.replicas().cloned().collect::<Vec<_>>() {
            add_standby(platform, &restored, &standby).await?;
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
    let aside = wal.with_file_name(format!("wal-before-{}", op.id()));
    let _ = std::fs::rename(&wal, &aside);
    let bases = base_dir(platform, id);
    let _ = std::fs::rename(&bases, bases.with_file_name(format!("base-before-{}", op.id())));
    heartbeats.forget(id);
    platform
        .update(id, |db| {
            db.nodes = restored.nodes.clone();
            db.synchronous = restored.synchronous;
            db.status = DatabaseStatus::Running;
            Ok::<_, StoreError>(())
        })
        .map_err(|e| e.to_string())?;
    let epoch = platform.publish_routes().map_err(|e| e.to_string())?;
    op.set(0.9);
    cleanup(platform.clone(), old_nodes).await;
    platform.event(
        id,
        "restored",
        format!("restored to {target}; routing epoch {epoch}; new base backup follows"),
    );
    Ok(())
}

async fn wait_promoted(platform: &Platform, node: &crate::nodes::NodeSpec) -> Result<(), String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(1800);
    loop {
        if let Ok(admin) = platform.session(node, "postgres").await {
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
