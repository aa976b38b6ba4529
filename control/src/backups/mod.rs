//! Logical backups (SPEC §8): taking and verifying them (`logical.rs`), the daily schedule
//! (`schedule.rs`) and the plan's retention (`retention.rs`, a pure function).

pub mod logical;
pub mod retention;
pub mod schedule;

use crate::failure::{Failure, Reportable};

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// What every workflow can meet.
    #[error(transparent)]
    Core(#[from] Failure),
    #[error("unknown plan {0}")]
    UnknownPlan(String),
    #[error("no node to back up from")]
    NoNode,
    #[error("plan {0} includes no manual backups; change to a plan with backups")]
    NoManualBackups(String),
    #[error("manual backup limit reached: plan {plan} keeps at most {max} manual backups; delete one first")]
    LimitReached { plan: String, max: u32 },
    #[error("cannot run {what}: {source}")]
    NotRunnable { what: &'static str, source: std::io::Error },
    #[error("cannot write the dump: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot store the backup: {0}")]
    Storage(std::io::Error),
}

crate::failure::wraps_failure!(BackupError);

impl Reportable for BackupError {
    fn code(&self) -> &'static str {
        match self {
            Self::Core(e) => e.code(),
            Self::UnknownPlan(_) => "unknown_plan",
            Self::NoNode => "no_node",
            Self::NoManualBackups(_) => "no_manual_backups",
            Self::LimitReached { .. } => "backup_limit",
            Self::NotRunnable { .. } => "program_failed",
            Self::Io(_) | Self::Storage(_) => "storage_failed",
        }
    }

    fn sentence(&self) -> String {
        match self {
            Self::Core(e) => e.sentence(),
            Self::NotRunnable { what, .. } => {
                format!("cannot run {what}; see the control plane's log")
            }
            Self::Io(_) => "cannot write the dump; see the control plane's log".into(),
            Self::Storage(_) => "cannot store the backup; see the control plane's log".into(),
            other => other.to_string(),
        }
    }
}
