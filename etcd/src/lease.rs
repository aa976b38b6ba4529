//! A lease kept alive: renewed every quarter of its TTL; valid, as its holder counts it, until
//! the instant it sent the last renewal etcd answered plus the TTL. etcd counts from the
//! moment it received that renewal, later, so the holder stops counting on its lease before
//! etcd can let the lease's keys go. A process frozen past that instant finds the lease over
//! when it resumes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use super::{bounded, CoordError, Etcd, CALL_TIMEOUT};

/// A keep-alive stream, and the member it goes to (`None` until it is open).
type KeepAlive = (usize, Option<(etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream)>);

pub struct Lease {
    etcd: Etcd,
    id: i64,
    ttl: Duration,
    valid_until: Mutex<Instant>,
    lost: CancellationToken,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("id", &self.id).field("ttl", &self.ttl).finish()
    }
}

impl Lease {
    /// A new lease of `ttl` (whole seconds, at least 1), not yet kept alive (`keep`).
    pub async fn grant(etcd: &Etcd, ttl: Duration) -> Result<Arc<Self>, CoordError> {
        let asked = Instant::now();
        let secs = ttl.as_secs().max(1);
        let (member, mut client) = etcd.member();
        let granted = bounded(CALL_TIMEOUT, client.lease_grant(secs as i64, None)).await;
        if granted.is_err() {
            etcd.failed(member);
        }
        let id = granted?.id();
        let ttl = Duration::from_secs(secs);
        Ok(Arc::new(Self {
            etcd: etcd.clone(),
            id,
            ttl,
            valid_until: Mutex::new(asked + ttl),
            lost: CancellationToken::new(),
        }))
    }

    pub fn id(&self) -> i64 {
        self.id
    }

    /// Whether the lease is known to last yet (false once lost).
    pub fn is_valid(&self) -> bool {
        !self.lost.is_cancelled() && Instant::now() < self.until()
    }

    /// Until when the lease is known to last.
    pub fn until(&self) -> Instant {
        *self.valid_until.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Cancelled when the lease is lost (or given up).
    pub fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }

    /// Marks the lease lost (once) with `reason`.
    pub fn lose(&self, what: &str, reason: &str) {
        if !self.lost.is_cancelled() {
            error!(lease = self.id, reason, "lost {what}");
            self.lost.cancel();
        }
    }

    /// Gives the lease up at once (its keys go with it).
    pub async fn revoke(&self) -> Result<(), CoordError> {
        self.lost.cancel();
        let id = self.id;
        self.etcd.call(|mut c| async move { c.lease_revoke(id).await }).await.map(drop)
    }

    /// Renews the lease every quarter of its TTL until it is lost or given up; `what` names
    /// what it holds, for the log. A renewal waits at most a second: one sent to a member
    /// while the cluster elects a leader (its leader killed) is answered once the election
    /// ends, or tried again through the next member.
    pub async fn keep(self: Arc<Self>, what: &'static str) {
        let every = self.ttl / 4;
        let patience = every.min(Duration::from_secs(1));
        let mut channel = None;
        loop {
            if self.lost.is_cancelled() {
                return;
            }
            if Instant::now() >= self.until() {
                return self.lose(what, "the lease ended before a renewal got through");
            }
            let sent = Instant::now();
            let renewed = match tokio::time::timeout(patience, self.renew(&mut channel)).await {
                Ok(Ok(0)) => return self.lose(what, "etcd says the lease has ended"),
                Ok(Ok(secs)) => {
                    let until = sent + Duration::from_secs(secs as u64);
                    *self.valid_until.lock().unwrap_or_else(|e| e.into_inner()) = until;
                    true
                }
                Ok(Err(e)) => {
                    warn!(error = %e, what, "lease renewal failed; trying another member");
                    false
                }
                Err(_) => {
                    warn!(what, "lease renewal unanswered; trying another member");
                    false
                }
            };
            // A failed renewal is tried again at once through the next member.
            let next = if renewed {
                (sent + every).min(self.until())
            } else {
                if let Some((member, ..)) = channel.take() {
                    self.etcd.failed(member);
                }
                Instant::now() + Duration::from_millis(20)
            };
            tokio::select! {
                _ = self.lost.cancelled() => return,
                _ = tokio::time::sleep_until(next) => {}
            }
        }
    }

    /// One renewal over the keep-alive stream (opened again after a failure); the TTL left.
    async fn renew(&self, channel: &mut Option<KeepAlive>) -> Result<i64, CoordError> {
        if channel.is_none() {
            let (member, mut client) = self.etcd.member();
            // Kept (with its member) even if opening fails: the failure moves on from it.
            *channel = Some((member, None));
            let (keeper, stream) = client.lease_keep_alive(self.id).await?;
            *channel = Some((member, Some((keeper, stream))));
        }
        let Some((_, Some((keeper, stream)))) = channel.as_mut() else {
            return Err(CoordError::Closed("the lease's keep-alive stream is not open"));
        };
        keeper.keep_alive().await?;
        match stream.message().await? {
            Some(answer) => Ok(answer.ttl()),
            None => Err(CoordError::Closed("the lease's keep-alive stream ended")),
        }
    }
}
