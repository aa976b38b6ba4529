//! The recoverable window and point-in-time restores.

use std::path::Path;
use std::time::Duration;

use pgwarden_api::control::DatabaseStatus;
use time::OffsetDateTime;

use super::archiver::{Heartbeats, ARCHIVER};
use super::base::{base_backups, parse_time, wal_gaps, BaseBackup};
use super::{base_dir, pitr_plan, wal_dir, Pitr, PitrError};
use crate::failure::{Failure, Reportable};
use crate::lifecycle::standby::add_standby;
use crate::nodes::config::quote;
use crate::nodes::kept::Purpose;
use crate::nodes::placement;
use crate::nodes::sql::{Session, Timeouts};
use crate::nodes::{NodeError, NodeSpec, Nodes};
use crate::operations::Progress;
use crate::state::{DatabaseRecord, NodeRecord, StoreError};
use crate::wait;

/// The recoverable window: from the oldest base backup to the newest archived heartbeat.
pub async fn window(
    nodes: &Nodes,
    backup_dir: &Path,
    heartbeats: &Heartbeats,
    db: &DatabaseRecord,
) -> Result<(OffsetDateTime, OffsetDateTime), PitrError> {
    if !pitr_plan(&db.plan) {
        return Err(PitrError::NoPitr(db.plan.clone()));
    }
    let earliest = base_backups(backup_dir, &db.id)
        .first()
        .and_then(|b| parse_time(&b.finished_at))
        .ok_or(PitrError::NoBaseBackup)?;
    let primary = db.primary().ok_or_else(|| Failure::NoPrimary(db.id.clone()))?;
    // Asked at every stats sample: on the session kept on the primary.
    let read = async |admin: &Session| {
        admin
            .query_opt(
                "SELECT pg_wal_lsn_diff(flush_lsn, '0/0')::int8 FROM pg_stat_replication WHERE application_name = $1",
                &[&ARCHIVER],
            )
            .await
    };
    let spec = NodeSpec::of(primary);
    let row = nodes
        .read_kept(&spec, Purpose::Reads, Timeouts::DEFAULT, read)
        .await?
        .ok_or(PitrError::NotStreaming)?;
    let flushed: i64 = row.get(0);
    let latest = heartbeats.latest_before(&db.id, flushed).ok_or(PitrError::NoArchivedCommit)?;
    Ok((earliest, latest.max(earliest)))
}

/// Rebuilds `id` as it was at `target` on new nodes; swaps routes; removes the old nodes. On
/// failure the database is left as it was (running on its old nodes).
pub async fn restore(
    pitr: &Pitr,
    heartbeats: &Heartbeats,
    id: &str,
    target: OffsetDateTime,
    mut op: Progress,
) -> Result<(), PitrError> {
    let result = do_restore(pitr, heartbeats, id, target, &mut op).await;
    if let Err(e) = &result {
        pitr.records.event(id, "restore_failed", e.sentence()).await;
        let _ = pitr
            .records
            .update(id, |db| {
                db.status = DatabaseStatus::Running;
                Ok::<_, crate::state::StoreError>(())
            })
            .await;
    }
    result
}

/// Checks that `target` can be restored; returns the base backup to start from.
pub async fn check_restorable(
    nodes: &Nodes,
    backup_dir: &Path,
    heartbeats: &Heartbeats,
    db: &DatabaseRecord,
    target: OffsetDateTime,
) -> Result<BaseBackup, PitrError> {
    let (earliest, latest) = window(nodes, backup_dir, heartbeats, db).await?;
    let fmt = |t: OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
    };
    if target < earliest || target > latest {
        return Err(PitrError::Outside {
            target: fmt(target),
            earliest: fmt(earliest),
            latest: fmt(latest),
        });
    }
    let base = base_backups(backup_dir, &db.id)
        .into_iter()
        .rfind(|b| parse_time(&b.finished_at).is_some_and(|t| t <= target))
        .ok_or(PitrError::NoBaseBefore)?;
    // The base backup must still match its manifest (checksums of every file).
    let (bin, dir) = (nodes.tools(db), base_dir(backup_dir, &db.id).join(&base.id));
    let verified = tokio::task::spawn_blocking(move || {
        std::process::Command::new(bin.join("pg_verifybackup"))
            .args(["--ignore", "pgwarden-base.json"])
            .arg(&dir)
            .output()
    })
    .await
    .map_err(NodeError::from)?
    .map_err(|source| PitrError::NotRunnable { what: "pg_verifybackup", source })?;
    if !verified.status.success() {
        let detail = String::from_utf8_lossy(&verified.stderr);
        tracing::error!(backup = %base.id, output = %detail.trim(), "pg_verifybackup failed");
        let first = crate::nodes::driver::client_sentence(detail.lines().next().unwrap_or(""));
        return Err(PitrError::Damaged { backup: base.id.clone(), reason: first });
    }
    let gaps = wal_gaps(&wal_dir(backup_dir, &db.id), Some(&base.start_segment));
    if !gaps.is_empty() {
        return Err(PitrError::Gap(gaps.join(", ")));
    }
    Ok(base)
}

async fn do_restore(
    pitr: &Pitr,
    heartbeats: &Heartbeats,
    id: &str,
    target: OffsetDateTime,
    op: &mut Progress,
) -> Result<(), PitrError> {
    let db =
        pitr.records.store.database(id).await?.ok_or_else(|| Failure::Vanished(id.to_owned()))?;
    let base = check_restorable(&pitr.nodes, &pitr.backup_dir, heartbeats, &db, target).await?;
    let Some(((), db)) = pitr
        .records
        .update(id, |db| {
            db.status = DatabaseStatus::Restoring;
            Ok::<_, StoreError>(())
        })
        .await?
    else {
        return Err(Failure::Vanished(id.to_owned()).into());
    };
    let old_nodes = db.nodes.clone();
    pitr.records
        .event(id, "restoring", format!("restoring to {target} from base backup {}", base.id))
        .await;

    // New nodes next to the old ones.
    let next = old_nodes
        .iter()
        .filter_map(|n| n.name.rsplit('-').next()?.parse::<u32>().ok())
        .max()
        .unwrap_or(0)
        + 1;
    let new_nodes = placement::new_nodes(
        &pitr.nodes.hosts,
        &pitr.nodes.ports,
        &pitr.records.store.databases().await?,
        id,
        db.engine.as_deref(),
        next,
        old_nodes.len(),
    );
    let mut restored = db.clone();
    restored.nodes = new_nodes.clone();
    let cleanup = |list: Vec<NodeRecord>| async move {
        for node in list {
            let (driver, spec) = (&pitr.nodes.driver, NodeSpec::of(&node));
            let _ = driver.destroy(&spec).await;
        }
    };
    let result = async {
        let primary =
            restored.primary().cloned().ok_or_else(|| Failure::NoPrimary(id.to_owned()))?;
        let mut config = pitr.nodes.config(&restored, &primary, None)?;
        let target_text = target.format(&time::macros::format_description!(
            "[year]-[month]-[day] [hour]:[minute]:[second].[subsecond digits:6]+00"
        ))?;
        config.settings.extend([
            ("recovery_target_time".to_owned(), quote(&target_text)),
            ("recovery_target_action".to_owned(), "'promote'".to_owned()),
            ("recovery_target_timeline".to_owned(), "'latest'".to_owned()),
        ]);
        let spec = NodeSpec::of(&primary);
        let (driver, base_path, wal) = (
            pitr.nodes.driver.clone(),
            base_dir(&pitr.backup_dir, id).join(&base.id),
            wal_dir(&pitr.backup_dir, id),
        );
        let spec2 = spec.clone();
        driver.init_from_backup(&spec2, &config, &base_path, &wal).await?;
        driver.start(&spec2).await?;
        op.set(0.4).await;
        wait_promoted(&pitr.nodes, &spec).await?;
        // Plain settings again (no recovery target), and a check that the database is there.
        let config = pitr.nodes.config(&restored, &primary, None)?;
        let (driver, spec2) = (&pitr.nodes.driver, &spec);
        driver.configure(spec2, &config).await?;
        driver.reload(spec2).await?;
        let check = pitr.nodes.session(&spec, &restored.name).await?;
        check.query_one("SELECT current_database()", &[]).await.map_err(PitrError::NotAnswering)?;
        op.set(0.6).await;
        for standby in restored.replicas().cloned().collect::<Vec<_>>() {
            add_standby(&pitr.records, &pitr.nodes, &restored, &standby).await?;
            restored.synchronous = true;
        }
        Ok::<(), PitrError>(())
    }
    .await;
    if let Err(e) = result {
        cleanup(new_nodes).await;
        return Err(e);
    }
    // Swap: the archive starts a new generation, routes go to the restored nodes, then the old
    // nodes go away.
    let wal = wal_dir(&pitr.backup_dir, id);
    let aside = wal.with_file_name(format!("wal-before-{}", op.id()));
    let bases = base_dir(&pitr.backup_dir, id);
    let bases_aside = bases.with_file_name(format!("base-before-{}", op.id()));
    crate::files::blocking_io(|| {
        let _ = std::fs::rename(&wal, &aside);
        let _ = std::fs::rename(&bases, &bases_aside);
    });
    heartbeats.forget(id);
    pitr.records
        .update(id, |db| {
            db.nodes = restored.nodes.clone();
            db.synchronous = restored.synchronous;
            db.status = DatabaseStatus::Running;
            Ok::<_, StoreError>(())
        })
        .await?;
    let epoch = pitr.routing.publish(&pitr.records.store).await?;
    op.set(0.9).await;
    cleanup(old_nodes).await;
    pitr.records
        .event(
            id,
            "restored",
            format!("restored to {target}; routing epoch {epoch}; new base backup follows"),
        )
        .await;
    Ok(())
}

async fn wait_promoted(nodes: &Nodes, node: &crate::nodes::NodeSpec) -> Result<(), PitrError> {
    let promoted = wait::until(Duration::from_secs(1800), wait::SLOW, || async move {
        if let Ok(admin) = nodes.session(node, "postgres").await {
            if let Ok(row) = admin.query_one("SELECT pg_is_in_recovery()", &[]).await {
                if !row.get::<_, bool>(0) {
                    return Ok(Some(()));
                }
            }
        } else {
            if !nodes.driver.is_running(node).await {
                return Err(PitrError::RecoveryFailed(nodes.driver.log_tail(node).await));
            }
        }
        Ok(None)
    });
    promoted.await?.ok_or(PitrError::RecoveryTimeout)
}
