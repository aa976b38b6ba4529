//! The leadership: the control plane that creates the `leader` key, bound to a lease of its
//! own, leads until the lease ends. A standby reads the key every `POLL` and only then asks
//! for a lease and tries to create it (one transaction: created only if absent).
//!
//! The leader renews its lease every third of its TTL. It counts its leadership valid until
//! the instant it sent the last renewal that etcd answered, plus the TTL: etcd counts from
//! the moment it received it, later, so the leader stops believing it leads before etcd can
//! let another lead. A process frozen past that instant (SIGSTOP, a long pause) finds its
//! leadership lost when it resumes, and its writes are refused by etcd anyway (they compare
//! the key's create revision, the term).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{bounded, CoordError, Etcd, CALL_TIMEOUT};

/// How often a standby looks at the leader key.
const POLL: Duration = Duration::from_millis(250);

pub struct Leadership {
    etcd: Etcd,
    key: String,
    lease: i64,
    term: i64,
    ttl: Duration,
    valid_until: Mutex<Instant>,
    lost: CancellationToken,
}

impl std::fmt::Debug for Leadership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leadership").field("term", &self.term).field("lease", &self.lease).finish()
    }
}

impl Leadership {
    /// Waits until this control plane (`me`, its API address) leads, then keeps its lease
    /// alive in the background. `None`: `stop` came first.
    pub async fn campaign(
        etcd: &Etcd,
        me: &str,
        ttl: Duration,
        stop: &CancellationToken,
    ) -> Option<Arc<Self>> {
        let mut told: Option<String> = None;
        loop {
            match Self::try_once(etcd, me, ttl).await {
                Ok(Ok(leadership)) => {
                    info!(term = leadership.term, "this control plane leads");
                    return Some(leadership);
                }
                Ok(Err(holder)) => {
                    if told.as_deref() != Some(holder.as_str()) {
                        info!(leader = %holder, "standing by: another control plane leads");
                        told = Some(holder);
                    }
                }
                Err(e) => warn!(error = %e, "cannot campaign for the leadership; trying again"),
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
        me: &str,
        ttl: Duration,
    ) -> Result<Result<Arc<Self>, String>, CoordError> {
        let key = etcd.key("leader");
        let mut client = etcd.client();
        let current = bounded(CALL_TIMEOUT, client.get(key.clone(), None)).await?;
        if let Some(kv) = current.kvs().first() {
            return Ok(Err(String::from_utf8_lossy(kv.value()).into_owned()));
        }
        let asked = Instant::now();
        let secs = ttl.as_secs().max(1) as i64;
        let lease = bounded(CALL_TIMEOUT, client.lease_grant(secs, None)).await?.id();
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), me, Some(PutOptions::new().with_lease(lease)))])
            .or_else([TxnOp::get(key.clone(), None)]);
        let answer = bounded(CALL_TIMEOUT, client.txn(txn)).await?;
        if !answer.succeeded() {
            let _ = bounded(CALL_TIMEOUT, client.lease_revoke(lease)).await;
            let holder = answer.op_responses().into_iter().find_map(|op| match op {
                TxnOpResponse::Get(get) => {
                    get.kvs().first().map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
                }
                _ => None,
            });
            return Ok(Err(holder.unwrap_or_else(|| "another control plane".into())));
        }
        let term = answer.header().map_or(0, |h| h.revision());
        let leadership = Arc::new(Self {
            etcd: etcd.clone(),
            key,
            lease,
            term,
            ttl: Duration::from_secs(secs as u64),
            valid_until: Mutex::new(asked + Duration::from_secs(secs as u64)),
            lost: CancellationToken::new(),
        });
        tokio::spawn(Arc::clone(&leadership).keep());
        Ok(Ok(leadership))
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
        !self.lost.is_cancelled() && Instant::now() < self.until()
    }

    /// Cancelled when the leadership is lost.
    pub fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }

    /// Gives the leadership up at once (a standby takes over at its next look), on a
    /// clean shutdown.
    pub async fn resign(&self) {
        self.lost.cancel();
        let mut client = self.etcd.client();
        if let Err(e) = bounded(CALL_TIMEOUT, client.lease_revoke(self.lease)).await {
            warn!(error = %e, "could not give the leadership up; it ends with its lease");
        }
    }

    /// Marks the leadership lost (once) with `reason`.
    pub fn lose(&self, reason: &str) {
        if !self.lost.is_cancelled() {
            error!(
                term = self.term,
                reason, "lost the leadership: this control plane stops acting"
            );
            self.lost.cancel();
        }
    }

    fn until(&self) -> Instant {
        *self.valid_until.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Renews the lease every third of its TTL until it is lost or given up.
    async fn keep(self: Arc<Self>) {
        let every = self.ttl / 3;
        let mut channel = None;
        loop {
            if self.lost.is_cancelled() {
                return;
            }
            if Instant::now() >= self.until() {
                return self.lose("the lease ended before a renewal got through");
            }
            let sent = Instant::now();
            match tokio::time::timeout(every, self.renew(&mut channel)).await {
                Ok(Ok(0)) => return self.lose("etcd says the lease has ended"),
                Ok(Ok(secs)) => {
                    let until = sent + Duration::from_secs(secs as u64);
                    *self.valid_until.lock().unwrap_or_else(|e| e.into_inner()) = until;
                }
                Ok(Err(e)) => {
                    warn!(error = %e, "lease renewal failed; trying again");
                    channel = None;
                }
                Err(_) => {
                    warn!("lease renewal unanswered; trying again");
                    channel = None;
                }
            }
            let next = (sent + every).min(self.until());
            tokio::select! {
                _ = self.lost.cancelled() => return,
                _ = tokio::time::sleep_until(next) => {}
            }
        }
    }

    /// One renewal over the keep-alive stream (opened again after a failure); the TTL left.
    async fn renew(
        &self,
        channel: &mut Option<(etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream)>,
    ) -> Result<i64, CoordError> {
        let open = match channel.take() {
            Some(open) => open,
            None => self.etcd.client().lease_keep_alive(self.lease).await?,
        };
        let (keeper, stream) = channel.insert(open);
        keeper.keep_alive().await?;
        match stream.message().await? {
            Some(answer) => Ok(answer.ttl()),
            None => Err(CoordError::Closed("the lease's keep-alive stream ended")),
        }
    }
}
