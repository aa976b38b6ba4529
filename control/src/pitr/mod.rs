//! Continuous WAL archiving and point-in-time recovery (SPEC §8).
//!
//! - `archiver.rs`: for every database whose plan has PITR, a `pg_receivewal --synchronous`
//!   streams WAL over TLS from the current primary into `<backups>/<id>/wal/` (following
//!   failovers), a heartbeat commit every second tells how recent the archive is, and base
//!   backups are taken weekly.
//! - `base.rs`: base backups (`pg_basebackup`, checked with `pg_verifybackup`), the WAL gap
//!   check, and pruning to the window.
//! - `restore.rs`: the recoverable window, and the restore that rebuilds the database at a
//!   target time on new nodes, swaps the routes, and only then removes the old nodes.
//!
//! Every directory and file here is private (0700/0600).

pub mod archiver;
pub mod base;
pub mod restore;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::metrics::Metrics;
use crate::nodes::Nodes;
use crate::plans;
use crate::routing::Routing;
use crate::state::Records;

/// What archiving and restores act with.
#[derive(Clone)]
pub struct Pitr {
    pub records: Arc<Records>,
    pub nodes: Arc<Nodes>,
    pub routing: Arc<Routing>,
    pub metrics: Metrics,
    /// Where base backups and the WAL archive are.
    pub backup_dir: PathBuf,
    /// The control plane's data dir (the archiver's connection files).
    pub data_dir: PathBuf,
}

pub use archiver::Heartbeats;

pub fn wal_dir(backup_dir: &Path, id: &str) -> PathBuf {
    backup_dir.join(id).join("wal")
}

pub fn base_dir(backup_dir: &Path, id: &str) -> PathBuf {
    backup_dir.join(id).join("base")
}

/// Whether databases on `plan` have point-in-time recovery.
pub fn pitr_plan(plan: &str) -> bool {
    plans::find(plan).is_some_and(|p| p.pitr)
}

use crate::failure::{Failure, Reportable};
use crate::lifecycle::LifecycleError;
use crate::nodes::sql::SqlError;

#[derive(Debug, thiserror::Error)]
pub enum PitrError {
    /// What every workflow can meet.
    #[error(transparent)]
    Core(#[from] Failure),
    #[error(transparent)]
    Lifecycle(#[from] LifecycleError),
    #[error("cannot write the archive: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot record the base backup: {0}")]
    Json(#[from] serde_json::Error),
    #[error("cannot run {what}: {source}")]
    NotRunnable { what: &'static str, source: std::io::Error },
    #[error("plan {0} has no point-in-time recovery")]
    NoPitr(String),
    #[error("no base backup yet: point-in-time recovery starts after the first one")]
    NoBaseBackup,
    #[error("no base backup before the target")]
    NoBaseBefore,
    #[error("backup_label has no start segment")]
    NoStartSegment,
    #[error("no node to take a base backup from")]
    NoNode,
    #[error("WAL archiving is not streaming right now")]
    NotStreaming,
    #[error("no archived commit yet")]
    NoArchivedCommit,
    #[error("{target} is outside the recoverable window {earliest} .. {latest}")]
    Outside { target: String, earliest: String, latest: String },
    #[error("base backup {backup} is damaged ({reason}); restore refused")]
    Damaged { backup: String, reason: String },
    #[error("the WAL archive is missing segment(s) {0}: cannot replay to the target")]
    Gap(String),
    #[error("restored database does not answer: {0}")]
    NotAnswering(SqlError),
    #[error("recovery failed: {0}")]
    RecoveryFailed(String),
    #[error("recovery did not finish within 30 minutes")]
    RecoveryTimeout,
    #[error("cannot write the recovery target: {0}")]
    Time(#[from] time::error::Format),
}

crate::failure::wraps_failure!(PitrError);

impl Reportable for PitrError {
    fn code(&self) -> &'static str {
        match self {
            Self::Core(e) => e.code(),
            Self::Lifecycle(e) => e.code(),
            Self::Io(_) | Self::Json(_) | Self::Time(_) => "internal",
            Self::NotRunnable { .. } => "program_failed",
            Self::NoPitr(_) => "no_pitr",
            Self::NoBaseBackup | Self::NoBaseBefore => "no_base_backup",
            Self::NoStartSegment => "damaged",
            Self::NoNode => "no_node",
            Self::NotStreaming => "archiving_not_streaming",
            Self::NoArchivedCommit => "no_archived_commit",
            Self::Outside { .. } => "outside_window",
            Self::Damaged { .. } => "backup_damaged",
            Self::Gap(_) => "wal_gap",
            Self::NotAnswering(_) => "not_answering",
            Self::RecoveryFailed(_) => "recovery_failed",
            Self::RecoveryTimeout => "recovery_timeout",
        }
    }

    fn sentence(&self) -> String {
        match self {
            Self::Core(e) => e.sentence(),
            Self::Lifecycle(e) => e.sentence(),
            Self::Io(_) | Self::Json(_) | Self::Time(_) => {
                "the archive or its records could not be written; see the control plane's log"
                    .into()
            }
            Self::NotRunnable { what, .. } => {
                format!("cannot run {what}; see the control plane's log")
            }
            Self::NotAnswering(_) => {
                "the restored database does not answer; see the control plane's log".into()
            }
            other => other.to_string(),
        }
    }
}
