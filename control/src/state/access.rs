//! The records as workflows change them: the store, each database's record lock, the
//! uniqueness check of new databases, and the events.
//!
//! The record lock (`update`) is held only while a record is read, changed and written back:
//! the change itself is a plain closure, so no call that waits on a node can happen under it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use pgwarden_api::control::Event;
use tracing::{error, info};

use super::{DatabaseRecord, Store, StoreError};

pub struct Records {
    pub store: Store,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Serializes the check-then-insert of a new database (unique names).
    creating: tokio::sync::Mutex<()>,
}

impl Records {
    pub fn new(store: Store) -> Self {
        Self { store, locks: Mutex::default(), creating: tokio::sync::Mutex::default() }
    }

    /// Reads database `id`, lets `change` modify it, and writes it back unless `change` fails,
    /// under the database's record lock. `Ok(None)`: the database does not exist.
    pub async fn update<T, E: From<StoreError>>(
        &self,
        id: &str,
        change: impl FnOnce(&mut DatabaseRecord) -> Result<T, E>,
    ) -> Result<Option<(T, DatabaseRecord)>, E> {
        let _held = self.lock(id).await;
        let Some(mut db) = self.store.database(id).await? else { return Ok(None) };
        let out = change(&mut db)?;
        self.store.put_database(&db).await?;
        Ok(Some((out, db)))
    }

    /// Holds database `id`'s record lock until the guard drops: for a check and a write of
    /// another record that must be one step (no `update` of `id` under it).
    pub async fn lock(&self, id: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
            if !locks.contains_key(id) {
                // Locks nobody holds or waits for are dropped as new ones come: the map follows
                // the databases being changed, not every database there ever was.
                locks.retain(|_, lock| Arc::strong_count(lock) > 1);
            }
            Arc::clone(locks.entry(id.to_owned()).or_default())
        };
        lock.lock_owned().await
    }

    /// Inserts a new database record unless `conflict` finds a reason in the existing ones.
    pub async fn insert_new<E: From<StoreError>>(
        &self,
        db: &DatabaseRecord,
        conflict: impl FnOnce(&[DatabaseRecord]) -> Result<(), E>,
    ) -> Result<(), E> {
        let _guard = self.creating.lock().await;
        conflict(&self.store.databases().await?)?;
        self.store.put_database(db).await?;
        Ok(())
    }

    /// Records an event of database `database_id` (and logs it).
    pub async fn event(&self, database_id: &str, kind: &str, message: impl Into<String>) {
        let event = Event { at: now_rfc3339(), kind: kind.into(), message: message.into() };
        info!(database = database_id, kind, message = %event.message, "event");
        if let Err(e) = self.store.add_event(database_id, &event).await {
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
