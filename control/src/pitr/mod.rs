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

use std::path::PathBuf;

use crate::plans;
use crate::platform::Platform;
use crate::state::DatabaseRecord;

pub use archiver::Heartbeats;

pub fn wal_dir(platform: &Platform, id: &str) -> PathBuf {
    platform.config.backup_dir.join(id).join("wal")
}

pub fn base_dir(platform: &Platform, id: &str) -> PathBuf {
    platform.config.backup_dir.join(id).join("base")
}

pub fn pitr_plan(db: &DatabaseRecord) -> bool {
    plans::find(&db.plan).is_some_and(|p| p.pitr)
}

use crate::lifecycle::LifecycleError;
use crate::nodes::sql::SqlError;
use crate::nodes::NodeError;
use crate::state::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum PitrError {
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Lifecycle(#[from] LifecycleError),
    #[error("cannot write the archive: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot record the base backup: {0}")]
    Json(#[from] serde_json::Error),
    #[error("cannot run {what}: {source}")]
    NotRunnable { what: &'static str, source: std::io::Error },
    /// A program failed; `sentence` is for clients, its output went to the log.
    #[error("{what} failed: {sentence}")]
    Program { what: &'static str, sentence: String },
    #[error("plan {0} has no point-in-time recovery")]
    NoPitr(String),
    #[error("no base backup yet: point-in-time recovery starts after the first one")]
    NoBaseBackup,
    #[error("no base backup before the target")]
    NoBaseBefore,
    #[error("backup_label has no start segment")]
    NoStartSegment,
    #[error("database {0} has no primary")]
    NoPrimary(String),
    #[error("no node to take a base backup from")]
    NoNode,
    #[error("database {0} vanished")]
    Vanished(String),
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

crate::nodes::from_node_errors!(PitrError);
