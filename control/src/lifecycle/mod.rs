//! A database's life: provisioning (`provision.rs`), standbys (`standby.rs`, also used by HA
//! and PITR), destruction (`destroy.rs`), and what a restart of the control plane resumes
//! (`recover.rs`).

pub mod destroy;
pub mod provision;
pub mod recover;
pub mod standby;

use crate::nodes::NodeError;
use crate::state::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("database {0} vanished")]
    Vanished(String),
    #[error("unknown plan {0}")]
    UnknownPlan(String),
    #[error("database {0} has no primary")]
    NoPrimary(String),
    #[error("standby {0} did not become synchronous within 60 s")]
    NotSynchronous(String),
    #[error("cannot remove the database's backups: {0}")]
    Purge(std::io::Error),
}

crate::nodes::from_node_errors!(LifecycleError);
