//! The store in etcd, for control planes on several hosts: `<prefix>/state/<table>/<key>` for
//! records, `<prefix>/counters/<name>` for counters, `<prefix>/routing` for the routing table
//! (sealed for the proxies, which watch it; its epoch is the revision that wrote it).
//! Every write is one transaction that first compares the leader's term (`coord::leader`): a
//! control plane that lost the leadership has every write refused (`StoreError::NotLeader`).
//! Reads are linearizable (etcd's default). Calls are bounded (`coord::CALL_TIMEOUT`); the
//! store's API blocks, so each call runs off the runtime's workers, on the runtime that made
//! the connection.

use std::future::Future;
use std::sync::Arc;

use etcd_client::{Client, Compare, CompareOp, DeleteOptions, GetOptions, GetResponse, Txn, TxnOp};
use tokio::runtime::Handle;

use crate::coord::{CoordError, Etcd, Leadership};
use crate::files::blocking_io;
use crate::state::kv::Kv;
use crate::state::StoreError;

pub struct EtcdKv {
    etcd: Etcd,
    leadership: Arc<Leadership>,
    runtime: Handle,
}

impl From<CoordError> for StoreError {
    fn from(e: CoordError) -> Self {
        StoreError::Db(e.to_string())
    }
}

impl EtcdKv {
    /// The store of the leader holding `leadership`; must be made on a multi-threaded runtime.
    pub fn new(etcd: Etcd, leadership: Arc<Leadership>) -> Self {
        Self { etcd, leadership, runtime: Handle::current() }
    }

    fn key(&self, table: &str, key: &str) -> String {
        self.etcd.key(&format!("state/{table}/{key}"))
    }

    /// Runs `call` to its end from this blocking API, with each member in turn until one
    /// answers (`Etcd::call`: every call here may be made twice).
    fn wait<T, F, Fut>(&self, call: F) -> Result<T, StoreError>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        Ok(blocking_io(|| self.runtime.block_on(self.etcd.call(call)))?)
    }

    fn get_key(&self, key: String, options: Option<GetOptions>) -> Result<GetResponse, StoreError> {
        self.wait(|mut c| {
            let (key, options) = (key.clone(), options.clone());
            async move { c.get(key, options).await }
        })
    }

    /// Commits `ops` if this control plane still leads.
    fn write(&self, compares: Vec<Compare>, ops: Vec<TxnOp>) -> Result<Option<i64>, StoreError> {
        if !self.leadership.is_valid() {
            return Err(StoreError::NotLeader("its lease has ended".into()));
        }
        let mut when = vec![self.leadership.guard()];
        let conditional = !compares.is_empty();
        when.extend(compares);
        let txn = Txn::new().when(when).and_then(ops);
        let answer = self.wait(|mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })?;
        if answer.succeeded() {
            return Ok(answer.header().map(|h| h.revision()));
        }
        if conditional && self.still_leads()? {
            // Another compare failed (a counter moved): the caller tries again.
            return Ok(None);
        }
        self.leadership.lose("a write found another control plane's leader key");
        Err(StoreError::NotLeader("another control plane leads now".into()))
    }

    fn still_leads(&self) -> Result<bool, StoreError> {
        let answer = self.get_key(self.etcd.key("leader"), None)?;
        Ok(answer.kvs().first().is_some_and(|kv| kv.create_revision() == self.leadership.term()))
    }

    fn written(&self, compares: Vec<Compare>, ops: Vec<TxnOp>) -> Result<i64, StoreError> {
        self.write(compares, ops)?
            .ok_or_else(|| StoreError::Db("etcd answered a write without a revision".into()))
    }

    fn counter_entry(&self, name: &str) -> Result<(String, u64, i64), StoreError> {
        let key = self.etcd.key(&format!("counters/{name}"));
        let answer = self.get_key(key.clone(), None)?;
        let (value, revision) = match answer.kvs().first() {
            Some(kv) => {
                let text = String::from_utf8_lossy(kv.value()).into_owned();
                let value = text.parse::<u64>().map_err(|_| {
                    StoreError::Db(format!("counter {name} holds {text:?}, not a number"))
                })?;
                (value, kv.mod_revision())
            }
            None => (0, 0),
        };
        Ok((key, value, revision))
    }
}

impl Kv for EtcdKv {
    fn put(&self, table: &str, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        self.written(vec![], vec![TxnOp::put(self.key(table, key), value, None)]).map(drop)
    }

    fn get(&self, table: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let answer = self.get_key(self.key(table, key), None)?;
        Ok(answer.kvs().first().map(|kv| kv.value().to_vec()))
    }

    fn list(&self, table: &str, prefix: &str) -> Result<Vec<Vec<u8>>, StoreError> {
        let options = GetOptions::new().with_prefix();
        let answer = self.get_key(self.key(table, prefix), Some(options))?;
        // etcd answers in key order.
        Ok(answer.kvs().iter().map(|kv| kv.value().to_vec()).collect())
    }

    fn remove(&self, table: &str, key: &str, also: Option<(&str, &str)>) -> Result<(), StoreError> {
        let mut ops = vec![TxnOp::delete(self.key(table, key), None)];
        if let Some((table, prefix)) = also {
            let options = DeleteOptions::new().with_prefix();
            ops.push(TxnOp::delete(self.key(table, prefix), Some(options)));
        }
        self.written(vec![], ops).map(drop)
    }

    fn next_counter(&self, name: &str) -> Result<u64, StoreError> {
        loop {
            let (key, value, revision) = self.counter_entry(name)?;
            let next = value + 1;
            let unchanged = Compare::mod_revision(key.clone(), CompareOp::Equal, revision);
            let put = TxnOp::put(key, next.to_string(), None);
            if self.write(vec![unchanged], vec![put])?.is_some() {
                return Ok(next);
            }
        }
    }

    fn counter(&self, name: &str) -> Result<u64, StoreError> {
        Ok(self.counter_entry(name)?.1)
    }

    fn next_epoch(&self, table: &[u8]) -> Result<u64, StoreError> {
        let put = TxnOp::put(self.etcd.key("routing"), table.to_vec(), None);
        let revision = self.written(vec![], vec![put])?;
        Ok(revision as u64)
    }
}
