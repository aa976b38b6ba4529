//! A leadership: the process that creates a key (the control planes' `leader`, a proxy pair's
//! `proxies/<pair>/active`), bound to a lease of its own (`lease.rs`), leads until the lease
//! ends. A standby reads the key every `POLL` and only then asks for a lease and tries to
//! create it (one transaction: created only if absent). Writes of a leader can compare the
//! key's create revision (its term, `guard`), so a process that lost the leadership can write
//! nothing.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::lease::Lease;
use super::{bounded, CoordError, Etcd, CALL_TIMEOUT};

/// How often a standby looks at the key.
const POLL: Duration = Duration::from_millis(100);

#[derive(Debug)]
pub struct Leadership {
    key: String,
    term: i64,
    lease: Arc<Lease>,
    /// What is lost with it, for the log.
    what: &'static str,
}

impl Leadership {
    /// Waits until this process (`me`: the address others know it by) holds `key` (under the
    /// prefix), then keeps its lease alive in the background. `what` says what it loses with
    /// it, for the log. `None`: `stop` came first.
    pub async fn campaign(
        etcd: &Etcd,
        key: &str,
        me: &str,
        ttl: Duration,
        what: &'static str,
        stop: &CancellationToken,
    ) -> Option<Arc<Self>> {
        let mut told: Option<String> = None;
        loop {
            match Self::try_once(etcd, key, me, ttl, what).await {
                Ok(Ok(leadership)) => {
                    info!(key, term = leadership.term, "leading");
                    return Some(leadership);
                }
                Ok(Err(holder)) => {
                    if told.as_deref() != Some(holder.as_str()) {
                        info!(key, leader = %holder, "standing by: another process leads");
                        told = Some(holder);
                    }
                }
                Err(e) => warn!(key, error = %e, "cannot campaign; trying again"),
            }
            tokio::select! {
                _ = stop.cancelled() => return None,
                _ = tokio::time::sleep(POLL) => {}
            }
        }
    }

    /// `Ok(Err(holder))`: another leads.
    async fn try_once(
        etcd: &Etcd,
        key: &str,
        me: &str,
        ttl: Duration,
        what: &'static str,
    ) -> Result<Result<Arc<Self>, String>, CoordError> {
        let key = etcd.key(key);
        let current = etcd.call(|mut c| {
            let key = key.clone();
            async move { c.get(key, None).await }
        });
        let current = current.await?;
        if let Some(kv) = current.kvs().first() {
            return Ok(Err(String::from_utf8_lossy(kv.value()).into_owned()));
        }
        let lease = Lease::grant(etcd, ttl).await?;
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), me, Some(PutOptions::new().with_lease(lease.id())))])
            .or_else([TxnOp::get(key.clone(), None)]);
        let (member, mut client) = etcd.member();
        let answer = match bounded(CALL_TIMEOUT, client.txn(txn)).await {
            Ok(answer) => answer,
            Err(e) => {
                etcd.failed(member);
                let _ = lease.revoke().await;
                return Err(e);
            }
        };
        if !answer.succeeded() {
            let _ = lease.revoke().await;
            let holder = answer.op_responses().into_iter().find_map(|op| match op {
                TxnOpResponse::Get(get) => {
                    get.kvs().first().map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
                }
                _ => None,
            });
            return Ok(Err(holder.unwrap_or_else(|| "another process".into())));
        }
        let term = answer.header().map_or(0, |h| h.revision());
        tokio::spawn(Arc::clone(&lease).keep(what));
        Ok(Ok(Arc::new(Self { key, term, lease, what })))
    }

    /// The leader's term: the create revision of its key.
    pub fn term(&self) -> i64 {
        self.term
    }

    /// The comparison every write of the leader makes: its key is still the one it created.
    pub fn guard(&self) -> Compare {
        Compare::create_revision(self.key.clone(), CompareOp::Equal, self.term)
    }

    /// Whether the lease is known to last yet (false once lost).
    pub fn is_valid(&self) -> bool {
        self.lease.is_valid()
    }

    /// Cancelled when the leadership is lost.
    pub fn lost(&self) -> CancellationToken {
        self.lease.lost()
    }

    /// Marks the leadership lost with `reason`.
    pub fn lose(&self, reason: &str) {
        self.lease.lose(self.what, reason);
    }

    /// Gives the leadership up at once (a standby takes over at its next look), on a
    /// clean shutdown.
    pub async fn resign(&self) {
        if let Err(e) = self.lease.revoke().await {
            warn!(error = %e, "could not give the leadership up; it ends with its lease");
        }
    }
}
