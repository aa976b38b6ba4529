//! A database's life: provisioning (`provision.rs`), standbys (`standby.rs`, also used by HA
//! and PITR), destruction (`destroy.rs`), and what a restart of the control plane resumes
//! (`recover.rs`).

pub mod destroy;
pub mod provision;
pub mod recover;
pub mod standby;
