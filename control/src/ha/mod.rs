//! High availability for replicated databases.
//!
//! - `watcher.rs`: one watcher task per replicated database checks the primary at a fixed
//!   cadence (on a session kept open, reading the postmaster's state too: a frozen postmaster
//!   accepts no new session; a check that timed out while the control plane ran late or the
//!   machine was starved, `pressure.rs`, defers the verdict), keeps
//!   commits synchronous while the standby streams (asynchronous, visibly, when it does not),
//!   and starts failovers, rejoins and standby restarts, the last two as tasks of their own so
//!   that the checks never stop.
//! - `claims.rs`: one primary change at a time per database; a failover preempts a planned
//!   change that has not yet stopped the primary on purpose.
//! - `failover.rs`: picks the standby, fences the old primary, promotes, publishes.
//! - `switchover.rs`: the planned primary change, preempted by a failover if the primary fails
//!   meanwhile.
//! - `rejoin.rs`: a fenced former primary comes back as a standby (pg_rewind or a fresh copy).
//!
//! Primary changes claim the database in `claims.rs`; record changes take the record
//! lock only while the record is written; every node call is bounded.

pub mod claims;
pub mod failover;
pub mod pressure;
pub mod rejoin;
pub mod switchover;
pub mod watcher;

pub use claims::{ChangeGuard, PrimaryChanges};

use std::sync::Arc;

use crate::failure::{Failure, Reportable};
use crate::lifecycle::LifecycleError;
use crate::metrics::Metrics;
use crate::nodes::Nodes;
use crate::routing::Routing;
use crate::state::Records;

/// What the watchers and failovers act with; each watcher's task holds a copy.
#[derive(Clone)]
pub struct Ha {
    pub records: Arc<Records>,
    pub nodes: Arc<Nodes>,
    pub routing: Arc<Routing>,
    pub claims: Arc<PrimaryChanges>,
    pub metrics: Metrics,
    pub health: HealthConfig,
}

/// How nodes are watched and when a primary is declared dead.
#[derive(Clone, Debug)]
pub struct HealthConfig {
    /// Time between two checks of a node.
    pub interval: std::time::Duration,
    /// Consecutive failed checks before the primary is declared dead (default 3 × 500 ms:
    /// about 1.5 s).
    pub failures: u32,
    /// How long one check may take.
    pub timeout: std::time::Duration,
    /// A standby that was not synchronous may be promoted only if it lagged at most this many
    /// bytes at the last check; beyond, failover is refused (acknowledged commits could be lost).
    pub max_failover_lag_bytes: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            interval: std::time::Duration::from_millis(500),
            failures: 3,
            timeout: std::time::Duration::from_millis(400),
            max_failover_lag_bytes: 0,
        }
    }
}

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
