//! Changes of a running database that keep it serving: plan changes (`plan.rs`), minor
//! engine upgrades (`upgrade.rs`, which rolls the same way) and major ones (`major.rs`, onto a
//! new cluster through logical replication; what it leaves behind is `retired.rs`). They build on
//! `lifecycle/` (standbys) and `ha/` (switchover).

pub mod major;
pub mod plan;
pub mod resume;
pub mod retired;
pub mod upgrade;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::failure::{Failure, Reportable};
use crate::ha::{HaError, PrimaryChanges};
use crate::lifecycle::LifecycleError;
use crate::nodes::Nodes;
use crate::operations::Operations;
use crate::routing::Routing;
use crate::state::{Records, StoreError};
use crate::storage::BackupStorage;

/// What a change of a running database acts with, for the tasks that run or resume one.
#[derive(Clone)]
pub struct Changes {
    pub records: Arc<Records>,
    pub nodes: Arc<Nodes>,
    pub routing: Arc<Routing>,
    pub claims: Arc<PrimaryChanges>,
    pub operations: Operations,
    pub backups: Arc<dyn BackupStorage>,
    /// Where the WAL archive is (a major upgrade sets the old one aside).
    pub backup_dir: PathBuf,
    /// How long a cluster a major upgrade replaced is kept (stopped).
    pub rollback_window: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// What every workflow can meet.
    #[error(transparent)]
    Core(#[from] Failure),
    #[error(transparent)]
    Lifecycle(#[from] LifecycleError),
    #[error(transparent)]
    Ha(#[from] HaError),
    #[error("unknown plan {0}")]
    UnknownPlan(String),
    #[error("standby {0} did not stream again within 60 s")]
    NotStreaming(String),
    #[error("the old primary of {0} did not rejoin as a synchronous standby within 120 s")]
    NotRejoined(String),
    #[error("a failover took over the database: its primary failed during the change")]
    Preempted,
    #[error("the new cluster did not catch up within {0} s")]
    NotSynced(u64),
    #[error("{0} took the hold past its budget")]
    Budget(&'static str),
    #[error(
        "the swap to the new cluster was abandoned after {held_ms} ms (hold budget {budget_ms} \
         ms): {reason}; the database stays on its current cluster"
    )]
    HoldBudget { held_ms: u64, budget_ms: u64, reason: String },
}

crate::failure::wraps_failure!(ChangeError);

impl Reportable for ChangeError {
    fn code(&self) -> &'static str {
        match self {
            Self::Core(e) => e.code(),
            Self::Lifecycle(e) => e.code(),
            Self::Ha(e) => e.code(),
            Self::UnknownPlan(_) => "unknown_plan",
            Self::NotStreaming(_) => "not_streaming",
            Self::NotRejoined(_) => "not_rejoined",
            Self::Preempted => "preempted",
            Self::NotSynced(_) => "not_synced",
            Self::Budget(_) | Self::HoldBudget { .. } => "hold_budget",
        }
    }

    fn sentence(&self) -> String {
        match self {
            Self::Core(e) => e.sentence(),
            Self::Lifecycle(e) => e.sentence(),
            Self::Ha(e) => e.sentence(),
            other => other.to_string(),
        }
    }
}

/// Applies `change` to database `id`'s record (under its lock); returns the record.
pub(crate) async fn update_record(
    records: &Records,
    id: &str,
    change: impl FnOnce(&mut crate::state::DatabaseRecord),
) -> Result<crate::state::DatabaseRecord, ChangeError> {
    let (_, db) = records
        .update(id, |db| {
            change(db);
            Ok::<_, StoreError>(())
        })
        .await?
        .ok_or_else(|| Failure::Vanished(id.to_owned()))?;
    Ok(db)
}
