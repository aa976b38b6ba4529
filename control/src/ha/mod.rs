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
