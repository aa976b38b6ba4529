//! Logical backups (SPEC §8): taking and verifying them (`logical.rs`), the daily schedule
//! (`schedule.rs`) and the plan's retention (`retention.rs`, a pure function).

pub mod logical;
pub mod retention;
pub mod schedule;

use crate::nodes::NodeError;
use crate::state::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error("unknown plan {0}")]
    UnknownPlan(String),
    #[error("database {0} vanished")]
    Vanished(String),
    #[error("no node to back up from")]
    NoNode,
    #[error("plan {0} includes no manual backups; change to a plan with backups")]
    NoManualBackups(String),
    #[error("manual backup limit reached: plan {plan} keeps at most {max} manual backups; delete one first")]
    LimitReached { plan: String, max: u32 },
    #[error("cannot run {what}: {source}")]
    NotRunnable { what: &'static str, source: std::io::Error },
    /// A program failed; `sentence` is for clients, its output went to the log.
    #[error("{what}: {sentence}")]
    Program { what: &'static str, sentence: String },
    #[error("cannot write the dump: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot store the backup: {0}")]
    Storage(std::io::Error),
}
