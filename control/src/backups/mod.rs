//! Logical backups (SPEC §8): taking and verifying them (`logical.rs`), the daily schedule
//! (`schedule.rs`) and the plan's retention (`retention.rs`, a pure function).

pub mod logical;
pub mod retention;
pub mod schedule;
