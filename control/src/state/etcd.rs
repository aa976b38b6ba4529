//! The store in etcd, for control planes on several hosts: `<prefix>/state/<table>/<key>` for
//! records, `<prefix>/counters/<name>` for counters, `<prefix>/routing` for the routing table
//! (sealed for the proxies, which watch it; its epoch is the revision that wrote it).
//! Every write is one transaction that first compares the leader's term (`coord::leader`): a
//! control plane that lost the leadership has every write refused (`StoreError::NotLeader`).
//! Reads are linearizable (etcd's default). Calls are bounded (`coord::CALL_TIMEOUT`).

use std::future::Future;
use std::sync::Arc;

use etcd_client::{Client, Compare, CompareOp, DeleteOptions, GetOptions, GetResponse, Txn, TxnOp};

use crate::coord::{CoordError, Etcd, Leadership};
use crate::state::kv::{Kv, Pending};
use crate::state::StoreError;

pub struct EtcdKv {
    etcd: Etcd,
    leadership: Arc<Leadership>,
}

impl From<CoordError> for StoreError {
    fn from(e: CoordError) -> Self {
        StoreError::Db(e.to_string())
    }
}

impl EtcdKv {
    /// The store of the leader holding `leadership`.
    pub fn new(etcd: Etcd, leadership: Arc<Leadership>) -> Self {
        Self { etcd, leadership }
    }

    fn key(&self, table: &str, key: &str) -> String {
        self.etcd.key(&format!("state/{table}/{key}"))
    }

    /// Runs `call` with each member in turn until one answers (`Etcd::call`: every call here
    /// may be made twice).
    async fn wait<T, F, Fut>(&self, call: F) -> Result<T, StoreError>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        Ok(self.etcd.call(call).await?)
    }

    async fn get_key(
        &self,
        key: String,
        options: Option<GetOptions>,
    ) -> Result<GetResponse, StoreError> {
        self.wait(|mut c| {
            let (key, options) = (key.clone(), options.clone());
            async move { c.get(key, options).await }
        })
        .await
    }

    /// Commits `ops` if this control plane still leads.
    async fn write(
        &self,
        compares: Vec<Compare>,
        ops: Vec<TxnOp>,
    ) -> Result<Option<i64>, StoreError> {
        if !self.leadership.is_valid() {
            return Err(StoreError::NotLeader("its lease has ended".into()));
        }
        let mut when = vec![self.leadership.guard()];
        let conditional = !compares.is_empty();
        when.extend(compares);
        let txn = Txn::new().when(when).and_then(ops);
        let answer = self
            .wait(|mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?;
        if answer.succeeded() {
            return Ok(answer.header().map(|h| h.revision()));
        }
        if conditional && self.still_leads().await? {
            // Another compare failed (a counter moved): the caller tries again.
            return Ok(None);
        }
        self.leadership.lose("a write found another control plane's leader key");
        Err(StoreError::NotLeader("another control plane leads now".into()))
    }

    async fn still_leads(&self) -> Result<bool, StoreError> {
        let answer = self.get_key(self.etcd.key("leader"), None).await?;
        Ok(answer.kvs().first().is_some_and(|kv| kv.create_revision() == self.leadership.term()))
    }

    async fn written(&self, compares: Vec<Compare>, ops: Vec<TxnOp>) -> Result<i64, StoreError> {
        self.write(compares, ops)
            .await?
            .ok_or_else(|| StoreError::Db("etcd answered a write without a revision".into()))
    }

    async fn counter_entry(&self, name: &str) -> Result<(String, u64, i64), StoreError> {
        let key = self.etcd.key(&format!("counters/{name}"));
        let answer = self.get_key(key.clone(), None).await?;
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
    fn put<'a>(&'a self, table: &'a str, key: &'a str, value: Vec<u8>) -> Pending<'a, ()> {
        Box::pin(async move {
            let put = TxnOp::put(self.key(table, key), value, None);
            self.written(vec![], vec![put]).await.map(drop)
        })
    }

    fn get<'a>(&'a self, table: &'a str, key: &'a str) -> Pending<'a, Option<Vec<u8>>> {
        Box::pin(async move {
            let answer = self.get_key(self.key(table, key), None).await?;
            Ok(answer.kvs().first().map(|kv| kv.value().to_vec()))
        })
    }

    fn list<'a>(&'a self, table: &'a str, prefix: &'a str) -> Pending<'a, Vec<Vec<u8>>> {
        Box::pin(async move {
            let options = GetOptions::new().with_prefix();
            let answer = self.get_key(self.key(table, prefix), Some(options)).await?;
            // etcd answers in key order.
            Ok(answer.kvs().iter().map(|kv| kv.value().to_vec()).collect())
        })
    }

    fn remove<'a>(
        &'a self,
        table: &'a str,
        key: &'a str,
        also: Option<(&'a str, &'a str)>,
    ) -> Pending<'a, ()> {
        Box::pin(async move {
            let mut ops = vec![TxnOp::delete(self.key(table, key), None)];
            if let Some((table, prefix)) = also {
                let options = DeleteOptions::new().with_prefix();
                ops.push(TxnOp::delete(self.key(table, prefix), Some(options)));
            }
            self.written(vec![], ops).await.map(drop)
        })
    }

    fn next_counter<'a>(&'a self, name: &'a str) -> Pending<'a, u64> {
        Box::pin(async move {
            loop {
                let (key, value, revision) = self.counter_entry(name).await?;
                let next = value + 1;
                let unchanged = Compare::mod_revision(key.clone(), CompareOp::Equal, revision);
                let put = TxnOp::put(key, next.to_string(), None);
                if self.write(vec![unchanged], vec![put]).await?.is_some() {
                    return Ok(next);
                }
            }
        })
    }

    fn counter<'a>(&'a self, name: &'a str) -> Pending<'a, u64> {
        Box::pin(async move { Ok(self.counter_entry(name).await?.1) })
    }

    fn next_epoch<'a>(&'a self, table: &'a [u8]) -> Pending<'a, u64> {
        Box::pin(async move {
            let put = TxnOp::put(self.etcd.key("routing"), table.to_vec(), None);
            let revision = self.written(vec![], vec![put]).await?;
            Ok(revision as u64)
        })
    }
}
