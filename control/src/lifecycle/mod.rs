//! A database's life: provisioning (`provision.rs`), standbys (`standby.rs`, also used by HA
//! and PITR) and destruction (`destroy.rs`).

pub mod destroy;
pub mod provision;
pub mod standby;

use std::sync::Arc;

use crate::failure::{Failure, Reportable};
use crate::nodes::Nodes;
use crate::operations::Operations;
use crate::routing::Routing;
use crate::state::Records;
use crate::storage::BackupStorage;

/// What provisioning and destruction act with, as operations of their own.
#[derive(Clone)]
pub struct Lifecycle {
    pub records: Arc<Records>,
    pub nodes: Arc<Nodes>,
    pub routing: Arc<Routing>,
    pub operations: Operations,
    pub backups: Arc<dyn BackupStorage>,
    /// Turns to make a new database's nodes: [`PROVISIONS_AT_ONCE`] at a time, the others wait
    /// (a storm of creates that all ran at once starved the machine: provisions failed and
    /// healthy primaries missed their checks).
    pub provisions: Arc<tokio::sync::Semaphore>,
}

/// How many provisions run at once.
pub const PROVISIONS_AT_ONCE: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    /// What every workflow can meet.
    #[error(transparent)]
    Core(#[from] Failure),
    #[error("unknown plan {0}")]
    UnknownPlan(String),
    #[error("standby {0} did not become synchronous within 60 s")]
    NotSynchronous(String),
    #[error("cannot remove the database's backups: {0}")]
    Purge(std::io::Error),
}

crate::failure::wraps_failure!(LifecycleError);

impl Reportable for LifecycleError {
    fn code(&self) -> &'static str {
        match self {
            Self::Core(e) => e.code(),
            Self::UnknownPlan(_) => "unknown_plan",
            Self::NotSynchronous(_) => "not_synchronous",
            Self::Purge(_) => "purge_failed",
        }
    }

    fn sentence(&self) -> String {
        match self {
            Self::Core(e) => e.sentence(),
            Self::Purge(_) => {
                "cannot remove the database's backups; see the control plane's log".into()
            }
            other => other.to_string(),
        }
    }
}
