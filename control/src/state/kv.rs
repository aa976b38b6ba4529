//! Where the store's values live: named tables of string keys and JSON values, and counters.
//! `RedbKv` is the embedded file of `pgwarden up` and a single `serve`; `etcd.rs` holds them
//! in etcd for control planes on several hosts.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::files::blocking_io;
use crate::state::StoreError;

/// A store call under way.
pub type Pending<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Every call is one transaction: it happens whole or not at all.
pub trait Kv: Send + Sync {
    fn put<'a>(&'a self, table: &'a str, key: &'a str, value: Vec<u8>) -> Pending<'a, ()>;
    fn get<'a>(&'a self, table: &'a str, key: &'a str) -> Pending<'a, Option<Vec<u8>>>;
    /// The values of the keys of `table` that start with `prefix`, in key order.
    fn list<'a>(&'a self, table: &'a str, prefix: &'a str) -> Pending<'a, Vec<Vec<u8>>>;
    /// Removes `key` of `table` and, with `also = (table, prefix)`, every key of that table
    /// starting with `prefix`.
    fn remove<'a>(
        &'a self,
        table: &'a str,
        key: &'a str,
        also: Option<(&'a str, &'a str)>,
    ) -> Pending<'a, ()>;
    /// Increments the counter `name` and returns its new value (the first is 1).
    fn next_counter<'a>(&'a self, name: &'a str) -> Pending<'a, u64>;
    /// The counter's value (0 before its first increment).
    fn counter<'a>(&'a self, name: &'a str) -> Pending<'a, u64>;
    /// A routing epoch greater than every one returned before, for `table` (the routing table
    /// sealed for the proxies: etcd keeps it for the proxies that watch it; the file does not).
    fn next_epoch<'a>(&'a self, table: &'a [u8]) -> Pending<'a, u64>;
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

/// The embedded store: one redb file, each call a committed transaction on a blocking thread
/// (redb's calls block).
pub struct RedbKv {
    db: Arc<Database>,
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
        Ok(Self { db: Arc::new(db) })
    }

    /// Runs `work` on the database on a blocking thread.
    fn off<'a, T: Send + 'static>(
        &self,
        work: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Pending<'a, T> {
        let db = Arc::clone(&self.db);
        let running = tokio::task::spawn_blocking(move || work(&db));
        Box::pin(async move {
            running
                .await
                .map_err(|e| StoreError::Db(format!("a store call was interrupted: {e}")))?
        })
    }
}

fn next_counter(db: &Database, name: &str) -> Result<u64, StoreError> {
    let tx = db.begin_write()?;
    let next = {
        let mut meta = tx.open_table(META)?;
        let next = meta.get(name)?.map(|v| v.value()).unwrap_or(0) + 1;
        meta.insert(name, next)?;
        next
    };
    tx.commit()?;
    Ok(next)
}

impl Kv for RedbKv {
    fn put<'a>(&'a self, name: &'a str, key: &'a str, value: Vec<u8>) -> Pending<'a, ()> {
        let (name, key) = (name.to_owned(), key.to_owned());
        self.off(move |db| {
            let tx = db.begin_write()?;
            tx.open_table(table(&name))?.insert(key.as_str(), value.as_slice())?;
            tx.commit()?;
            Ok(())
        })
    }

    fn get<'a>(&'a self, name: &'a str, key: &'a str) -> Pending<'a, Option<Vec<u8>>> {
        let (name, key) = (name.to_owned(), key.to_owned());
        self.off(move |db| {
            let tx = db.begin_read()?;
            let table = tx.open_table(table(&name))?;
            let value = table.get(key.as_str())?;
            Ok(value.map(|v| v.value().to_vec()))
        })
    }

    fn list<'a>(&'a self, name: &'a str, prefix: &'a str) -> Pending<'a, Vec<Vec<u8>>> {
        let (name, prefix) = (name.to_owned(), prefix.to_owned());
        self.off(move |db| {
            let tx = db.begin_read()?;
            let table = tx.open_table(table(&name))?;
            let mut out = Vec::new();
            for entry in table.range(prefix.as_str()..)? {
                let (k, v) = entry?;
                if !k.value().starts_with(prefix.as_str()) {
                    break;
                }
                out.push(v.value().to_vec());
            }
            Ok(out)
        })
    }

    fn remove<'a>(
        &'a self,
        name: &'a str,
        key: &'a str,
        also: Option<(&'a str, &'a str)>,
    ) -> Pending<'a, ()> {
        let (name, key) = (name.to_owned(), key.to_owned());
        let also = also.map(|(t, p)| (t.to_owned(), p.to_owned()));
        self.off(move |db| {
            let tx = db.begin_write()?;
            tx.open_table(table(&name))?.remove(key.as_str())?;
            if let Some((name, prefix)) = &also {
                let mut other = tx.open_table(table(name))?;
                let keys: Vec<String> = other
                    .range(prefix.as_str()..)?
                    .map_while(|e| e.ok().map(|(k, _)| k.value().to_owned()))
                    .take_while(|k| k.starts_with(prefix.as_str()))
                    .collect();
                for k in keys {
                    other.remove(k.as_str())?;
                }
            }
            tx.commit()?;
            Ok(())
        })
    }

    fn next_counter<'a>(&'a self, name: &'a str) -> Pending<'a, u64> {
        let name = name.to_owned();
        self.off(move |db| next_counter(db, &name))
    }

    fn counter<'a>(&'a self, name: &'a str) -> Pending<'a, u64> {
        let name = name.to_owned();
        self.off(move |db| {
            let tx = db.begin_read()?;
            let meta = tx.open_table(META)?;
            Ok(meta.get(name.as_str())?.map(|v| v.value()).unwrap_or(0))
        })
    }

    fn next_epoch<'a>(&'a self, _table: &'a [u8]) -> Pending<'a, u64> {
        self.off(|db| next_counter(db, "epoch"))
    }
}
