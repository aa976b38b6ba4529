//! Logical backups: `pg_dump` custom-format archives, taken from a standby when there is one,
//! verified when written (sha256 recorded, archive listed by `pg_restore --list`), kept in a
//! `BackupStorage` (private files: 0600 in 0700 directories).

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use pgwarden_api::control::{Backup, BackupKind, BackupStatus};
use time::OffsetDateTime;
use tracing::error;

use super::BackupError;
use crate::failure::{Failure, Reportable};
use crate::nodes::driver::client_sentence;
use crate::nodes::{DriverError, NodeError, NodeSpec, Nodes};
use crate::plans;
use crate::state::access::now_rfc3339;
use crate::state::{DatabaseRecord, Records};
use crate::storage::BackupStorage;

/// Storage key of a backup's file.
pub fn key(backup: &Backup) -> String {
    format!("{}/{}.dump", backup.database_id, backup.id)
}

pub fn started(backup: &Backup) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(&backup.started_at, &time::format_description::well_known::Rfc3339).ok()
}

/// Why a manual backup cannot be taken now.
pub async fn check_manual_allowed(
    records: &Records,
    db: &DatabaseRecord,
) -> Result<(), BackupError> {
    let plan = plans::find(&db.plan).ok_or_else(|| BackupError::UnknownPlan(db.plan.clone()))?;
    let manual = records
        .store
        .backups(&db.id)
        .await?
        .iter()
        .filter(|b| b.kind == BackupKind::Manual && b.status != BackupStatus::Failed)
        .count();
    if manual as u32 >= plan.manual_backups_max {
        return Err(if plan.manual_backups_max == 0 {
            BackupError::NoManualBackups(plan.name)
        } else {
            BackupError::LimitReached { plan: plan.name, max: plan.manual_backups_max }
        });
    }
    Ok(())
}

/// Records a new backup as running; `run` takes it.
pub async fn start(
    records: &Records,
    db: &DatabaseRecord,
    kind: BackupKind,
) -> Result<Backup, BackupError> {
    let seq = records.store.next_counter("backup_seq").await?;
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
    records.store.put_backup(&backup).await?;
    Ok(backup)
}

/// Takes the dump, verifies it, stores it; records success or the reason of failure.
pub async fn run(
    records: &Records,
    nodes: &Nodes,
    backups: &Arc<dyn BackupStorage>,
    mut backup: Backup,
) -> Backup {
    let result = take(records, nodes, backups, &mut backup).await;
    backup.finished_at = Some(now_rfc3339());
    match result {
        Ok(()) => {
            backup.status = BackupStatus::Succeeded;
            records
                .event(
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
                )
                .await;
        }
        Err(e) => {
            backup.status = BackupStatus::Failed;
            error!(backup = %backup.id, code = e.code(), error = %e, "backup failed");
            let sentence = e.sentence();
            records
                .event(
                    &backup.database_id,
                    "backup_failed",
                    format!("backup {} failed: {sentence}", backup.id),
                )
                .await;
            backup.error = Some(sentence);
        }
    }
    if let Err(e) = records.store.put_backup(&backup).await {
        error!(error = %e, "cannot record backup");
    }
    backup
}

async fn take(
    records: &Records,
    nodes: &Nodes,
    backups: &Arc<dyn BackupStorage>,
    backup: &mut Backup,
) -> Result<(), BackupError> {
    let db = records
        .store
        .database(&backup.database_id)
        .await?
        .ok_or_else(|| Failure::Vanished(backup.database_id.clone()))?;
    // From a standby when there is one, so that the primary's clients do not pay for it.
    let source = db.replicas().next().or(db.primary()).cloned().ok_or(BackupError::NoNode)?;
    backup.node = Some(source.name.clone());
    let scratch = backups.scratch().join(format!("{}-{}.dump", backup.database_id, backup.id));
    let bin = nodes.tools(&db);
    // The dump is private from its first byte: pg_dump would create it under the process's
    // umask, so it is created here, 0600, and pg_dump writes into it.
    crate::files::blocking_io(|| crate::files::create_private(&scratch))?;
    let dumped = nodes.driver.dump(&NodeSpec::of(&source), &db.name, &bin, &scratch).await;
    let checked = match dumped {
        Ok(()) => {
            let file = scratch.clone();
            tokio::task::spawn_blocking(move || verify(&bin, &file))
                .await
                .map_err(NodeError::from)?
        }
        Err(e) => Err(dump_failed(e)),
    };
    let (size, sha256) = checked.inspect_err(|_| {
        let _ = std::fs::remove_file(&scratch);
    })?;
    backup.size_bytes = size;
    backup.sha256 = Some(sha256);
    let key = key(backup);
    backups.store(&key, &scratch).map_err(|e| {
        let _ = std::fs::remove_file(&scratch);
        BackupError::Storage(e)
    })
}

/// Why the dump failed, in the driver's words.
fn dump_failed(e: DriverError) -> BackupError {
    let sentence = match e {
        DriverError::Command { detail, .. } => detail,
        other => Failure::from(other).sentence(),
    };
    BackupError::from(Failure::Program { what: "pg_dump", sentence })
}

/// Reads the dump in `file` back with `bin`'s `pg_restore --list`; its size and SHA-256.
fn verify(bin: &Path, file: &Path) -> Result<(u64, String), BackupError> {
    run_program(
        Command::new(bin.join("pg_restore")).arg("--list").arg(file),
        "pg_restore",
        "reading the archive back",
    )?;
    let size = std::fs::metadata(file)?.len();
    Ok((size, sha256_file(file)?))
}

/// Runs `cmd` (program `what`, for the `step` of the backup); on failure its output goes to
/// the log and the error names the step with a sentence from it.
fn run_program(
    cmd: &mut Command,
    what: &'static str,
    step: &'static str,
) -> Result<(), BackupError> {
    let out = cmd.output().map_err(|source| BackupError::NotRunnable { what, source })?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    error!(program = what, output = %stderr.trim(), "backup program failed");
    Err(Failure::Program { what: step, sentence: client_sentence(&stderr) }.into())
}

pub use crate::files::sha256_file;

/// Deletes a backup's file and record.
pub async fn delete(
    records: &Records,
    backups: &Arc<dyn BackupStorage>,
    backup: &Backup,
) -> Result<(), BackupError> {
    backups.delete(&key(backup)).map_err(BackupError::Storage)?;
    Ok(records.store.delete_backup(&backup.database_id, &backup.id).await?)
}
