//! High availability for replicated databases.
//!
//! - `watcher.rs`: one watcher task per replicated database checks the primary at a fixed
//!   cadence (a fresh session each time: a frozen postmaster accepts no new session), keeps
//!   commits synchronous while the standby streams (asynchronous, visibly, when it does not),
//!   and starts failovers, rejoins and standby restarts, the last two as tasks of their own so
//!   that the checks never stop.
//! - `failover.rs`: picks the standby, fences the old primary, promotes, publishes.
//! - `switchover.rs`: the planned primary change, preempted by a failover if the primary fails
//!   meanwhile.
//! - `rejoin.rs`: a fenced former primary comes back as a standby (pg_rewind or a fresh copy).
//!
//! Primary changes claim the database in `platform::changes`; record changes take the record
//! lock only while the record is written; every node call is bounded.

pub mod failover;
pub mod rejoin;
pub mod switchover;
pub mod watcher;

use crate::failure::{Failure, Reportable};
use crate::lifecycle::LifecycleError;

#[derive(Debug, thiserror::Error)]
pub enum HaError {
    /// What every workflow can meet.
    #[error(transparent)]
    Core(#[from] Failure),
    #[error(transparent)]
    Lifecycle(#[from] LifecycleError),
    #[error("node {0} is no longer part of the database")]
    NodeVanished(String),
    #[error("{0} is no longer the primary")]
    Moved(String),
    #[error("a planned primary change stopped the primary and is finishing")]
    PlannedChangeFinishing,
    #[error("no reachable standby to promote")]
    NoStandby,
    #[error("refusing to promote {standby}: commits were asynchronous and its lag ({lag}) exceeds {bound} bytes; acknowledged commits could be lost")]
    CouldLoseCommits { standby: String, lag: String, bound: u64 },
    #[error("promoting {candidate} failed: {source}")]
    PromoteFailed { candidate: String, source: Box<HaError> },
    #[error("{0} is not a standby of {1}")]
    NotAStandby(String, String),
    #[error("a failover took over the database: its primary failed during the switchover")]
    Preempted,
    #[error("standby {standby} did not receive WAL up to {lsn}")]
    NotCaughtUp { standby: String, lsn: String },
    #[error("the old primary could not be fenced: {0}")]
    Fence(String),
}

crate::failure::wraps_failure!(HaError);

impl Reportable for HaError {
    fn code(&self) -> &'static str {
        match self {
            Self::Core(e) => e.code(),
            Self::Lifecycle(e) => e.code(),
            Self::NodeVanished(_) => "node_vanished",
            Self::Moved(_) => "moved",
            Self::PlannedChangeFinishing => "planned_change_finishing",
            Self::NoStandby => "no_standby",
            Self::CouldLoseCommits { .. } => "could_lose_commits",
            Self::PromoteFailed { .. } => "promote_failed",
            Self::NotAStandby(..) => "not_a_standby",
            Self::Preempted => "preempted",
            Self::NotCaughtUp { .. } => "not_caught_up",
            Self::Fence(_) => "fence_failed",
        }
    }

    fn sentence(&self) -> String {
        match self {
            Self::Core(e) => e.sentence(),
            Self::Lifecycle(e) => e.sentence(),
            Self::PromoteFailed { candidate, source } => {
                format!("promoting {candidate} failed: {}", source.sentence())
            }
            other => other.to_string(),
        }
    }
}
