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
    pub async fn open(path: &Path, sealer: Sealer) -> Result<Self, StoreError> {
        Self::over(Box::new(RedbKv::open(path)?), sealer).await
    }

    /// The store over `kv` (the embedded file, or etcd).
    pub async fn over(kv: Box<dyn Kv>, sealer: Sealer) -> Result<Self, StoreError> {
        let store = Self { kv, sealer };
        let raw: Vec<serde_json::Value> = store.list(DATABASES, "").await?;
        let plain = raw.iter().any(|r| {
            SEALED_FIELDS
                .iter()
                .any(|f| r[f].as_str().is_some_and(|v| !crate::secrets::is_sealed(v)))
        });
        if plain {
            for db in store.databases().await? {
                store.put_database(&db).await?;
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

    async fn put<T: Serialize>(&self, table: &str, key: &str, value: &T) -> Result<(), StoreError> {
        self.kv.put(table, key, serde_json::to_vec(value)?).await
    }

    async fn get<T: DeserializeOwned>(
        &self,
        table: &str,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        Ok(self.kv.get(table, key).await?.map(|v| serde_json::from_slice(&v)).transpose()?)
    }

    async fn list<T: DeserializeOwned>(
        &self,
        table: &str,
        prefix: &str,
    ) -> Result<Vec<T>, StoreError> {
        let values = self.kv.list(table, prefix).await?;
        Ok(values.iter().map(|v| serde_json::from_slice(v)).collect::<Result<_, _>>()?)
    }

    pub async fn put_database(&self, db: &DatabaseRecord) -> Result<(), StoreError> {
        self.put(DATABASES, &db.id, &self.seal(db)?).await
    }

    pub async fn database(&self, id: &str) -> Result<Option<DatabaseRecord>, StoreError> {
        self.get(DATABASES, id).await?.map(|v| self.unseal(v)).transpose()
    }

    pub async fn databases(&self) -> Result<Vec<DatabaseRecord>, StoreError> {
        self.list(DATABASES, "").await?.into_iter().map(|v| self.unseal(v)).collect()
    }

    /// Removes the database and its events, in one transaction.
    pub async fn delete_database(&self, id: &str) -> Result<(), StoreError> {
        self.kv.remove(DATABASES, id, Some((EVENTS, &format!("{id}/")))).await
    }

    pub async fn put_backup(
        &self,
        backup: &pgwarden_api::control::Backup,
    ) -> Result<(), StoreError> {
        self.put(BACKUPS, &format!("{}/{}", backup.database_id, backup.id), backup).await
    }

    pub async fn backup(
        &self,
        database_id: &str,
        id: &str,
    ) -> Result<Option<pgwarden_api::control::Backup>, StoreError> {
        self.get(BACKUPS, &format!("{database_id}/{id}")).await
    }

    /// A database's backups, oldest first.
    pub async fn backups(
        &self,
        database_id: &str,
    ) -> Result<Vec<pgwarden_api::control::Backup>, StoreError> {
        self.list(BACKUPS, &format!("{database_id}/")).await
    }

    pub async fn delete_backup(&self, database_id: &str, id: &str) -> Result<(), StoreError> {
        self.kv.remove(BACKUPS, &format!("{database_id}/{id}"), None).await
    }

    pub async fn put_operation(&self, op: &Operation) -> Result<(), StoreError> {
        self.put(OPERATIONS, &op.id, op).await
    }

    pub async fn operation(&self, id: &str) -> Result<Option<Operation>, StoreError> {
        self.get(OPERATIONS, id).await
    }

    pub async fn operations(&self) -> Result<Vec<Operation>, StoreError> {
        self.list(OPERATIONS, "").await
    }

    /// Appends an event to a database's history (keys sort by time of insertion).
    pub async fn add_event(&self, database_id: &str, event: &Event) -> Result<(), StoreError> {
        let seq = self.next_counter("event_seq").await?;
        self.put(EVENTS, &format!("{database_id}/{seq:020}"), event).await
    }

    pub async fn events(&self, database_id: &str) -> Result<Vec<Event>, StoreError> {
        self.list(EVENTS, &format!("{database_id}/")).await
    }

    /// Increments and returns a persistent counter (event and operation sequences).
    pub async fn next_counter(&self, name: &str) -> Result<u64, StoreError> {
        self.kv.next_counter(name).await
    }

    pub async fn counter(&self, name: &str) -> Result<u64, StoreError> {
        self.kv.counter(name).await
    }

    /// A new routing epoch, greater than every earlier one, for `table` (sealed for the
    /// proxies): a counter in the embedded store; with etcd, the revision of the write of
    /// `table`, which only the leader can make, so that a control plane that lost the
    /// leadership can neither make an epoch nor hand the proxies a table.
    pub async fn next_epoch(&self, table: &[u8]) -> Result<u64, StoreError> {
        self.kv.next_epoch(table).await
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
            limits: Default::default(),
        }
    }

    #[tokio::test]
    async fn records_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let key = dir.path().join("secret.key");
        {
            let store = Store::open(&path, Sealer::open(&key).unwrap()).await.unwrap();
            store.put_database(&record("a-1")).await.unwrap();
            let mut b = record("b-2");
            b.password = "secretPasswordOfB".into();
            store.put_database(&b).await.unwrap();
            store
                .add_event("a-1", &Event { at: "t".into(), kind: "k".into(), message: "m1".into() })
                .await
                .unwrap();
            store
                .add_event(
                    "a-10",
                    &Event { at: "t".into(), kind: "k".into(), message: "other".into() },
                )
                .await
                .unwrap();
            store
                .add_event("a-1", &Event { at: "t".into(), kind: "k".into(), message: "m2".into() })
                .await
                .unwrap();
            assert_eq!(store.next_counter("epoch").await.unwrap(), 1);
            assert_eq!(store.next_counter("epoch").await.unwrap(), 2);
            let op = Operation {
                id: "op-1".into(),
                kind: "provision".into(),
                database_id: "a-1".into(),
                status: OperationStatus::Running,
                progress: 0.5,
                error: None,
                error_code: None,
            };
            store.put_operation(&op).await.unwrap();
        }
        let store = Store::open(&path, Sealer::open(&key).unwrap()).await.unwrap();
        let ids: Vec<_> = store.databases().await.unwrap().into_iter().map(|d| d.id).collect();
        assert_eq!(ids, ["a-1", "b-2"]);
        let messages: Vec<_> =
            store.events("a-1").await.unwrap().into_iter().map(|e| e.message).collect();
        assert_eq!(messages, ["m1", "m2"]);
        assert_eq!(store.counter("epoch").await.unwrap(), 2);
        assert_eq!(store.operation("op-1").await.unwrap().unwrap().progress, 0.5);
        let a = store.database("a-1").await.unwrap().unwrap();
        assert_eq!((a.password.as_str(), a.replication_password.as_str()), ("p", "r"));
        drop(store);
        // The file never holds a password in clear text.
        let raw = std::fs::read(&path).unwrap();
        let needle = b"secretPasswordOfB";
        assert!(!raw.windows(needle.len()).any(|w| w == needle), "a password in clear text");
        let store = Store::open(&path, Sealer::open(&key).unwrap()).await.unwrap();
        assert_eq!(store.database("b-2").await.unwrap().unwrap().password, "secretPasswordOfB");
        store.delete_database("a-1").await.unwrap();
        assert!(store.database("a-1").await.unwrap().is_none());
        assert!(store.events("a-1").await.unwrap().is_empty());
        assert_eq!(store.events("a-10").await.unwrap().len(), 1);
    }
}
