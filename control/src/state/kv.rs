//! Where the store's values live: named tables of string keys and JSON values, and counters.
//! `RedbKv` is the embedded file of `pgwarden up` and a single `serve`; `etcd.rs` holds them
//! in etcd for control planes on several hosts.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::files::blocking_io;
use crate::state::StoreError;

/// Every call is one transaction: it happens whole or not at all.
pub trait Kv: Send + Sync {
    fn put(&self, table: &str, key: &str, value: Vec<u8>) -> Result<(), StoreError>;
    fn get(&self, table: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// The values of the keys of `table` that start with `prefix`, in key order.
    fn list(&self, table: &str, prefix: &str) -> Result<Vec<Vec<u8>>, StoreError>;
    /// Removes `key` of `table` and, with `also = (table, prefix)`, every key of that table
    /// starting with `prefix`.
    fn remove(&self, table: &str, key: &str, also: Option<(&str, &str)>) -> Result<(), StoreError>;
    /// Increments the counter `name` and returns its new value (the first is 1).
    fn next_counter(&self, name: &str) -> Result<u64, StoreError>;
    /// The counter's value (0 before its first increment).
    fn counter(&self, name: &str) -> Result<u64, StoreError>;
    /// A routing epoch greater than every one returned before, for `table` (the routing table
    /// sealed for the proxies: etcd keeps it for the proxies that watch it; the file does not).
    fn next_epoch(&self, table: &[u8]) -> Result<u64, StoreError>;
}

const TABLES: [&str; 4] = ["databases", "operations", "events", "backups"];
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

fn table(name: &str) -> TableDefinition<'_, &'static str, &'static [u8]> {
    TableDefinition::new(name)
}

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(e.to_string())
            }
        }
    )*};
}
db_err!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// The embedded store: one redb file, each call a committed transaction (off the runtime's
/// workers: redb's calls block).
pub struct RedbKv {
    db: Database,
}

impl RedbKv {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = blocking_io(|| Database::create(path))?;
        let tx = db.begin_write()?;
        for name in TABLES {
            tx.open_table(table(name))?;
        }
        tx.open_table(META)?;
        tx.commit()?;
        Ok(Self { db })
    }
}

impl Kv for RedbKv {
    fn put(&self, name: &str, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        blocking_io(|| {
            let tx = self.db.begin_write()?;
            tx.open_table(table(name))?.insert(key, value.as_slice())?;
            tx.commit()?;
            Ok(())
        })
    }

    fn get(&self, name: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        blocking_io(|| {
            let tx = self.db.begin_read()?;
            let table = tx.open_table(table(name))?;
            let value = table.get(key)?;
            Ok(value.map(|v| v.value().to_vec()))
        })
    }

    fn list(&self, name: &str, prefix: &str) -> Result<Vec<Vec<u8>>, StoreError> {
        blocking_io(|| {
            let tx = self.db.begin_read()?;
            let table = tx.open_table(table(name))?;
            let mut out = Vec::new();
            for entry in table.range(prefix..)? {
                let (k, v) = entry?;
                if !k.value().starts_with(prefix) {
                    break;
                }
                out.push(v.value().to_vec());
            }
            Ok(out)
        })
    }

    fn remove(&self, name: &str, key: &str, also: Option<(&str, &str)>) -> Result<(), StoreError> {
        blocking_io(|| {
            let tx = self.db.begin_write()?;
            tx.open_table(table(name))?.remove(key)?;
            if let Some((name, prefix)) = also {
                let mut other = tx.open_table(table(name))?;
                let keys: Vec<String> = other
                    .range(prefix..)?
                    .map_while(|e| e.ok().map(|(k, _)| k.value().to_owned()))
                    .take_while(|k| k.starts_with(prefix))
                    .collect();
                for k in keys {
                    other.remove(k.as_str())?;
                }
            }
            tx.commit()?;
            Ok(())
        })
    }

    fn next_counter(&self, name: &str) -> Result<u64, StoreError> {
        blocking_io(|| {
            let tx = self.db.begin_write()?;
            let next = {
                let mut meta = tx.open_table(META)?;
                let next = meta.get(name)?.map(|v| v.value()).unwrap_or(0) + 1;
                meta.insert(name, next)?;
                next
            };
            tx.commit()?;
            Ok(next)
        })
    }

    fn counter(&self, name: &str) -> Result<u64, StoreError> {
        blocking_io(|| {
            let tx = self.db.begin_read()?;
            let meta = tx.open_table(META)?;
            Ok(meta.get(name)?.map(|v| v.value()).unwrap_or(0))
        })
    }

    fn next_epoch(&self, _table: &[u8]) -> Result<u64, StoreError> {
        self.next_counter("epoch")
    }
}
