//! The records as workflows change them: the store, each database's record lock, the
//! uniqueness check of new databases, and the events.
//!
//! The record lock (`update`) is a plain mutex held only while a record is read, changed and
//! written back: it cannot be held across a call that waits on a node (it is not `Send` across
//! an `.await`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use pgwarden_api::control::Event;
use tracing::{error, info};

use super::{DatabaseRecord, Store, StoreError};

pub struct Records {
    pub store: Store,
    locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Serializes the check-then-insert of a new database (unique names).
    creating: Mutex<()>,
}

impl Records {
    pub fn new(store: Store) -> Self {
        Self { store, locks: Mutex::default(), creating: Mutex::default() }
    }

    /// Reads database `id`, lets `change` modify it, and writes it back unless `change` fails,
    /// under the database's record lock. `Ok(None)`: the database does not exist.
    pub fn update<T, E: From<StoreError>>(
        &self,
        id: &str,
        change: impl FnOnce(&mut DatabaseRecord) -> Result<T, E>,
    ) -> Result<Option<(T, DatabaseRecord)>, E> {
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
            Arc::clone(locks.entry(id.to_owned()).or_default())
        };
        // Waiting for the lock and writing the record both block: off the runtime's workers.
        crate::files::blocking_io(|| {
            let _guard = lock.lock().unwrap_or_else(|e| e.into_inner());
            let Some(mut db) = self.store.database(id)? else { return Ok(None) };
            let out = change(&mut db)?;
            self.store.put_database(&db)?;
            Ok(Some((out, db)))
        })
    }

    /// Inserts a new database record unless `conflict` finds a reason in the existing ones.
    pub fn insert_new<E: From<StoreError>>(
        &self,
        db: &DatabaseRecord,
        conflict: impl FnOnce(&[DatabaseRecord]) -> Result<(), E>,
    ) -> Result<(), E> {
        crate::files::blocking_io(|| {
            let _guard = self.creating.lock().unwrap_or_else(|e| e.into_inner());
            conflict(&self.store.databases()?)?;
            self.store.put_database(db)?;
            Ok(())
        })
    }

    /// Records an event of database `database_id` (and logs it).
    pub fn event(&self, database_id: &str, kind: &str, message: impl Into<String>) {
        let event = Event { at: now_rfc3339(), kind: kind.into(), message: message.into() };
        info!(database = database_id, kind, message = %event.message, "event");
        if let Err(e) = self.store.add_event(database_id, &event) {
            error!(error = %e, "cannot record event");
        }
    }
}

/// Now, to the second, in RFC 3339.
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or_else(|_| time::OffsetDateTime::now_utc())
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
