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

use crate::lifecycle::LifecycleError;
use crate::nodes::NodeError;
use crate::state::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum HaError {
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Lifecycle(#[from] LifecycleError),
    #[error("database {0} vanished")]
    Vanished(String),
    #[error("database {0} has no primary")]
    NoPrimary(String),
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

crate::nodes::from_node_errors!(HaError);
