//! A database's life: provisioning (`provision.rs`), standbys (`standby.rs`, also used by HA
//! and PITR), destruction (`destroy.rs`), and what a restart of the control plane resumes
//! (`recover.rs`).

pub mod destroy;
pub mod provision;
pub mod recover;
pub mod standby;

use crate::failure::{Failure, Reportable};

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
