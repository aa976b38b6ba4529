//! Daily backups at each database's hour, caught up after a restart, then the plan's retention.

use std::sync::Arc;
use std::time::Duration;

use pgwarden_api::control::{BackupKind, BackupStatus, DatabaseStatus};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use super::logical::{delete, run, start, started};
use super::retention::{self, Policy};
use crate::metrics::Metrics;
use crate::nodes::Nodes;
use crate::plans;
use crate::state::{DatabaseRecord, Records};
use crate::storage::BackupStorage;

/// Applies the plan's retention to a database's daily backups.
pub async fn prune(
    records: &Records,
    backups: &Arc<dyn BackupStorage>,
    db: &DatabaseRecord,
    now: OffsetDateTime,
) {
    let Some(plan) = plans::find(&db.plan) else { return };
    let policy = Policy {
        daily: plan.daily_backups,
        weekly: plan.weekly_backups,
        monthly: plan.monthly_backups,
    };
    let Ok(taken) = records.store.backups(&db.id).await else { return };
    let daily: Vec<(String, OffsetDateTime)> = taken
        .iter()
        .filter(|b| b.kind == BackupKind::Daily && b.status == BackupStatus::Succeeded)
        .filter_map(|b| Some((b.id.clone(), started(b)?)))
        .collect();
    for id in retention::to_delete(&daily, policy, now) {
        if let Some(backup) = taken.iter().find(|b| b.id == id) {
            match delete(records, backups, backup).await {
                Ok(()) => {
                    records
                        .event(
                            &db.id,
                            "backup_expired",
                            format!("backup {id} removed by the plan's retention"),
                        )
                        .await
                }
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
pub async fn schedule(
    records: Arc<Records>,
    nodes: Arc<Nodes>,
    storage: Arc<dyn BackupStorage>,
    metrics: Metrics,
    tick: Duration,
    shutdown: CancellationToken,
) {
    loop {
        for db in records.store.databases().await.unwrap_or_default() {
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
            let taken = records.store.backups(&db.id).await.unwrap_or_default().iter().any(|b| {
                b.kind == BackupKind::Daily
                    && b.status != BackupStatus::Failed
                    && started(b).is_some_and(|t| t >= slot)
            });
            if slot >= created_hour && !taken {
                info!(database = %db.id, "daily backup due");
                if let Ok(backup) = start(&records, &db, BackupKind::Daily).await {
                    let done = run(&records, &nodes, &storage, backup).await;
                    metrics.operation("backup", done.status == BackupStatus::Succeeded);
                }
                prune(&records, &storage, &db, OffsetDateTime::now_utc()).await;
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
