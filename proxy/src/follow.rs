//! Following the routing table in etcd (`[etcd]` in `proxy.toml`), where the leading control
//! plane writes it sealed with the admin token (`pgwarden_api::sealed`); the revision that
//! wrote it is its epoch, so a control plane that lost the leadership cannot make one.
//!
//! The proxy reads the key, watches it from the next revision, and while nothing changes reads
//! it again every quarter of `fence_after_ms` (a linearizable read: only a member in touch with
//! a majority answers it). It talks to one member at a time, the next one after a failure. Every call is bounded. When no read or event got through for longer
//! than `fence_after_ms`, the proxy is fenced (`RouteStore::fence`): it cannot know that the
//! primaries are still the primaries, so it holds every database and ends every session on one.
//! The next table read from etcd lifts the fence.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, EventType, KeyValue, WatchOptions};
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::EtcdConfig;
use crate::routes::RouteError;
use crate::Shared;

#[derive(Debug, thiserror::Error)]
enum FollowError {
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("the watch ended")]
    WatchEnded,
}

/// `call`, bounded by `limit`.
async fn bounded<T>(
    limit: Duration,
    call: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, FollowError> {
    timeout(limit, call).await.map_err(|_| FollowError::Timeout(limit))?.map_err(Into::into)
}

struct Follower {
    config: EtcdConfig,
    key: String,
    shared: Arc<Shared>,
    /// When a read or an event last got through.
    contact: Instant,
    fence_after: Duration,
    check: Duration,
    /// Sessions so far: each goes to the next member (a dead one costs one session).
    sessions: usize,
}

/// Follows the table until `stop`.
pub async fn follow(config: EtcdConfig, shared: Arc<Shared>, stop: CancellationToken) {
    let fence_after = Duration::from_millis(config.fence_after_ms);
    let key = format!("/{}/routing", config.prefix.trim_matches('/'));
    let check = fence_after / 4;
    let mut follower =
        Follower { config, key, shared, contact: Instant::now(), fence_after, check, sessions: 0 };
    info!(key = %follower.key, ?fence_after, "following the routing table in etcd");
    loop {
        let failed = tokio::select! {
            () = stop.cancelled() => return,
            failed = follower.session() => failed,
        };
        debug!(error = %failed, "etcd session ended; connecting again");
        follower.fence_if_cut_off();
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(follower.check.min(Duration::from_millis(200))) => {}
        }
    }
}

impl Follower {
    /// Connects, reads, and watches until a call fails.
    async fn session(&mut self) -> FollowError {
        match self.watch().await {
            Ok(never) => match never {},
            Err(e) => e,
        }
    }

    async fn watch(&mut self) -> Result<std::convert::Infallible, FollowError> {
        let options = ConnectOptions::new()
            .with_connect_timeout(self.check)
            .with_timeout(self.check)
            .with_keep_alive(self.check, self.check);
        let endpoints = &self.config.endpoints;
        let member = &endpoints[(self.sessions + std::process::id() as usize) % endpoints.len()];
        self.sessions += 1;
        let connect = Client::connect([member.as_str()], Some(options));
        let mut client = bounded(self.check.max(Duration::from_secs(1)), connect).await?;
        let revision = self.read(&mut client).await?;
        let options = WatchOptions::new().with_start_revision(revision + 1);
        let mut stream = bounded(self.check, client.watch(self.key.clone(), Some(options))).await?;
        loop {
            match timeout(self.check, stream.message()).await {
                Ok(Ok(Some(answer))) => {
                    if answer.canceled() {
                        return Err(FollowError::WatchEnded);
                    }
                    self.contact = Instant::now();
                    for event in answer.events() {
                        if let (EventType::Put, Some(kv)) = (event.event_type(), event.kv()) {
                            self.apply(kv).await;
                        }
                    }
                }
                Ok(Ok(None)) => return Err(FollowError::WatchEnded),
                Ok(Err(e)) => return Err(e.into()),
                // Quiet: make sure etcd (a majority of it) still answers.
                Err(_) => {
                    if let Err(e) = self.read(&mut client).await {
                        self.fence_if_cut_off();
                        return Err(e);
                    }
                }
            }
        }
    }

    /// Reads the table (applying it if newer) and returns etcd's revision.
    async fn read(&mut self, client: &mut Client) -> Result<i64, FollowError> {
        let answer = bounded(self.check, client.get(self.key.clone(), None)).await?;
        self.contact = Instant::now();
        if let Some(kv) = answer.kvs().first() {
            self.apply(kv).await;
        }
        Ok(answer.header().map_or(0, |h| h.revision()))
    }

    async fn apply(&self, kv: &KeyValue) {
        let mut table = match pgwarden_api::sealed::open_table(&self.shared.admin_token, kv.value())
        {
            Ok(table) => table,
            Err(e) => {
                self.shared.metrics.route_update(crate::metrics::RouteUpdate::Invalid);
                return warn!(error = %e, "routing table in etcd refused");
            }
        };
        table.epoch = kv.mod_revision().max(0) as u64;
        match crate::admin::apply(&self.shared, crate::admin::Change::Table(table)).await {
            Ok(epoch) => debug!(epoch, "routing table from etcd applied"),
            Err(RouteError::StaleEpoch { .. }) => {}
            Err(e) => warn!(error = %e, "routing table in etcd refused"),
        }
    }

    fn fence_if_cut_off(&self) {
        let silent = self.contact.elapsed();
        if silent > self.fence_after && self.shared.routes.fence() {
            self.shared.metrics.fenced.set(1);
            error!(
                ?silent,
                "cut off from etcd: holding every database and ending sessions on primaries \
                 until etcd answers again"
            );
        }
    }
}
