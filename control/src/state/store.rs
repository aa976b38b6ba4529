//! The control plane's state: an embedded, transactional, crash-safe store (redb) in the data
//! dir. Values are JSON; every write is one committed transaction. The passwords a database
//! record keeps (the default user's, for `DATABASE_URL`; the replication role's) are sealed
//! with the data dir's key before they are written (`secrets::Sealer`): the file never holds
//! them in clear text.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::secrets::Sealer;
use crate::state::kv::{Kv, RedbKv};
use crate::state::records::DatabaseRecord;
use pgwarden_api::control::{Event, Operation};

const DATABASES: &str = "databases";
const OPERATIONS: &str = "operations";
const EVENTS: &str = "events";
const BACKUPS: &str = "backups";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store: {0}")]
    Db(String),
    #[error("state store holds an unreadable record: {0}")]
    Corrupt(#[from] serde_json::Error),
    #[error("state store: {0}")]
    Sealed(#[from] crate::secrets::SealError),
    /// A write of a control plane that is no longer the leader (etcd): refused, and the
    /// process stops acting.
    #[error("this control plane is no longer the leader: {0}")]
    NotLeader(String),
}

/// Fields of a database record kept sealed.
const SEALED_FIELDS: [&str; 2] = ["password", "replication_password"];

pub struct Store {
    kv: Box<dyn Kv>,
    sealer: Sealer,
}

impl Store {
    /// Opens the embedded store at `path`; values are sealed with `sealer`. Records written
    /// before sealing existed are sealed now.
    pub fn open(path: &Path, sealer: Sealer) -> Result<Self, StoreError> {
        Self::over(Box::new(RedbKv::open(path)?), sealer)
    }

    /// The store over `kv` (the embedded file, or etcd).
    pub fn over(kv: Box<dyn Kv>, sealer: Sealer) -> Result<Self, StoreError> {
        let store = Self { kv, sealer };
        let raw: Vec<serde_json::Value> = store.list(DATABASES, "")?;
        let plain = raw.iter().any(|r| {
            SEALED_FIELDS
                .iter()
                .any(|f| r[f].as_str().is_some_and(|v| !crate::secrets::is_sealed(v)))
        });
        if plain {
            for db in store.databases()? {
                store.put_database(&db)?;
            }
        }
        Ok(store)
    }

    fn seal(&self, db: &DatabaseRecord) -> Result<serde_json::Value, StoreError> {
        let mut value = serde_json::to_value(db)?;
        for field in SEALED_FIELDS {
            if let Some(plain) = value[field].as_str() {
                value[field] = self.sealer.seal(&format!("{}/{field}", db.id), plain).into();
            }
        }
        Ok(value)
    }

    fn unseal(&self, mut value: serde_json::Value) -> Result<DatabaseRecord, StoreError> {
        let id = value["id"].as_str().unwrap_or_default().to_owned();
        for field in SEALED_FIELDS {
            if let Some(stored) = value[field].as_str() {
                value[field] = self.sealer.open_value(&format!("{id}/{field}"), stored)?.into();
            }
        }
        Ok(serde_json::from_value(value)?)
    }

    fn put<T: Serialize>(&self, table: &str, key: &str, value: &T) -> Result<(), StoreError> {
        self.kv.put(table, key, serde_json::to_vec(value)?)
    }

    fn get<T: DeserializeOwned>(&self, table: &str, key: &str) -> Result<Option<T>, StoreError> {
        Ok(self.kv.get(table, key)?.map(|v| serde_json::from_slice(&v)).transpose()?)
    }

    fn list<T: DeserializeOwned>(&self, table: &str, prefix: &str) -> Result<Vec<T>, StoreError> {
        let values = self.kv.list(table, prefix)?;
        Ok(values.iter().map(|v| serde_json::from_slice(v)).collect::<Result<_, _>>()?)
    }

    pub fn put_database(&self, db: &DatabaseRecord) -> Result<(), StoreError> {
        self.put(DATABASES, &db.id, &self.seal(db)?)
    }

    pub fn database(&self, id: &str) -> Result<Option<DatabaseRecord>, StoreError> {
        self.get(DATABASES, id)?.map(|v| self.unseal(v)).transpose()
    }

    pub fn databases(&self) -> Result<Vec<DatabaseRecord>, StoreError> {
        self.list(DATABASES, "")?.into_iter().map(|v| self.unseal(v)).collect()
    }

    /// Removes the database and its events, in one transaction.
    pub fn delete_database(&self, id: &str) -> Result<(), StoreError> {
        self.kv.remove(DATABASES, id, Some((EVENTS, &format!("{id}/"))))
    }

    pub fn put_backup(&self, backup: &pgwarden_api::control::Backup) -> Result<(), StoreError> {
        self.put(BACKUPS, &format!("{}/{}", backup.database_id, backup.id), backup)
    }

    pub fn backup(
        &self,
        database_id: &str,
        id: &str,
    ) -> Result<Option<pgwarden_api::control::Backup>, StoreError> {
        self.get(BACKUPS, &format!("{database_id}/{id}"))
    }

    /// A database's backups, oldest first.
    pub fn backups(
        &self,
        database_id: &str,
    ) -> Result<Vec<pgwarden_api::control::Backup>, StoreError> {
        self.list(BACKUPS, &format!("{database_id}/"))
    }

    pub fn delete_backup(&self, database_id: &str, id: &str) -> Result<(), StoreError> {
        self.kv.remove(BACKUPS, &format!("{database_id}/{id}"), None)
    }

    pub fn put_operation(&self, op: &Operation) -> Result<(), StoreError> {
        self.put(OPERATIONS, &op.id, op)
    }

    pub fn operation(&self, id: &str) -> Result<Option<Operation>, StoreError> {
        self.get(OPERATIONS, id)
    }

    pub fn operations(&self) -> Result<Vec<Operation>, StoreError> {
        self.list(OPERATIONS, "")
    }

    /// Appends an event to a database's history (keys sort by time of insertion).
    pub fn add_event(&self, database_id: &str, event: &Event) -> Result<(), StoreError> {
        let seq = self.next_counter("event_seq")?;
        self.put(EVENTS, &format!("{database_id}/{seq:020}"), event)
    }

    pub fn events(&self, database_id: &str) -> Result<Vec<Event>, StoreError> {
        self.list(EVENTS, &format!("{database_id}/"))
    }

    /// Increments and returns a persistent counter (event and operation sequences).
    pub fn next_counter(&self, name: &str) -> Result<u64, StoreError> {
        self.kv.next_counter(name)
    }

    pub fn counter(&self, name: &str) -> Result<u64, StoreError> {
        self.kv.counter(name)
    }

    /// A new routing epoch, greater than every earlier one, for `table` (sealed for the
    /// proxies): a counter in the embedded store; with etcd, the revision of the write of
    /// `table`, which only the leader can make, so that a control plane that lost the
    /// leadership can neither make an epoch nor hand the proxies a table.
    pub fn next_epoch(&self, table: &[u8]) -> Result<u64, StoreError> {
        self.kv.next_epoch(table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::records::UserRecord;
    use pgwarden_api::control::{DatabaseStatus, OperationStatus};

    fn record(id: &str) -> DatabaseRecord {
        DatabaseRecord {
            id: id.into(),
            name: id.replace('-', "_"),
            plan: "postgresql-sandbox".into(),
            status: DatabaseStatus::Running,
            force_tls: false,
            password: "p".into(),
            replication_password: "r".into(),
            nodes: vec![],
            users: vec![UserRecord { name: "u".into(), read_only: false, default: true }],
            created_at: "2026-01-01T00:00:00Z".into(),
            error: None,
            synchronous: false,
            backup_hour_utc: 1,
            engine: None,
            upgrade: None,
            retired: vec![],
        }
    }

    #[test]
    fn records_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let key = dir.path().join("secret.key");
        {
            let store = Store::open(&path, Sealer::open(&key).unwrap()).unwrap();
            store.put_database(&record("a-1")).unwrap();
            let mut b = record("b-2");
            b.password = "secretPasswordOfB".into();
            store.put_database(&b).unwrap();
            store
                .add_event("a-1", &Event { at: "t".into(), kind: "k".into(), message: "m1".into() })
                .unwrap();
            store
                .add_event(
                    "a-10",
                    &Event { at: "t".into(), kind: "k".into(), message: "other".into() },
                )
                .unwrap();
            store
                .add_event("a-1", &Event { at: "t".into(), kind: "k".into(), message: "m2".into() })
                .unwrap();
            assert_eq!(store.next_counter("epoch").unwrap(), 1);
            assert_eq!(store.next_counter("epoch").unwrap(), 2);
            let op = Operation {
                id: "op-1".into(),
                kind: "provision".into(),
                database_id: "a-1".into(),
                status: OperationStatus::Running,
                progress: 0.5,
                error: None,
                error_code: None,
            };
            store.put_operation(&op).unwrap();
        }
        let store = Store::open(&path, Sealer::open(&key).unwrap()).unwrap();
        let ids: Vec<_> = store.databases().unwrap().into_iter().map(|d| d.id).collect();
        assert_eq!(ids, ["a-1", "b-2"]);
        let messages: Vec<_> =
            store.events("a-1").unwrap().into_iter().map(|e| e.message).collect();
        assert_eq!(messages, ["m1", "m2"]);
        assert_eq!(store.counter("epoch").unwrap(), 2);
        assert_eq!(store.operation("op-1").unwrap().unwrap().progress, 0.5);
        let a = store.database("a-1").unwrap().unwrap();
        assert_eq!((a.password.as_str(), a.replication_password.as_str()), ("p", "r"));
        drop(store);
        // The file never holds a password in clear text.
        let raw = std::fs::read(&path).unwrap();
        let needle = b"secretPasswordOfB";
        assert!(!raw.windows(needle.len()).any(|w| w == needle), "a password in clear text");
        let store = Store::open(&path, Sealer::open(&key).unwrap()).unwrap();
        assert_eq!(store.database("b-2").unwrap().unwrap().password, "secretPasswordOfB");
        store.delete_database("a-1").unwrap();
        assert!(store.database("a-1").unwrap().is_none());
        assert!(store.events("a-1").unwrap().is_empty());
        assert_eq!(store.events("a-10").unwrap().len(), 1);
    }
}
