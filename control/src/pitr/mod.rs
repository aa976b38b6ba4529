//! Continuous WAL archiving and point-in-time recovery (SPEC §8).
//!
//! - `archiver.rs`: for every database whose plan has PITR, a `pg_receivewal --synchronous`
//!   streams WAL over TLS from the current primary into `<backups>/<id>/wal/` (following
//!   failovers), a heartbeat commit every second tells how recent the archive is, and base
//!   backups are taken weekly.
//! - `base.rs`: base backups (`pg_basebackup`, checked with `pg_verifybackup`), the WAL gap
//!   check, and pruning to the window.
//! - `restore.rs`: the recoverable window, and the restore that rebuilds the database at a
//!   target time on new nodes, swaps the routes, and only then removes the old nodes.
//!
//! Every directory and file here is private (0700/0600).

pub mod archiver;
pub mod base;
pub mod restore;

use std::path::PathBuf;

use crate::plans;
use crate::platform::Platform;
use crate::state::DatabaseRecord;

pub use archiver::Heartbeats;

pub fn wal_dir(platform: &Platform, id: &str) -> PathBuf {
    platform.config.data_dir.join("backups").join(id).join("wal")
}

pub fn base_dir(platform: &Platform, id: &str) -> PathBuf {
    platform.config.data_dir.join("backups").join(id).join("base")
}

pub fn pitr_plan(db: &DatabaseRecord) -> bool {
    plans::find(&db.plan).is_some_and(|p| p.pitr)
}
