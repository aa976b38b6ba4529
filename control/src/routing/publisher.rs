//! Keeps every proxy on the latest routing table: one task per proxy pushes each new table,
//! retries while the proxy is unreachable, and re-pushes when a proxy reports an older epoch
//! (it restarted). A proxy that holds the table this task last gave it gets only what changed
//! since (`PATCH`, a `RoutingDelta`); one that does not (it restarted, or a push failed) gets
//! the whole table. With etcd the proxies watch the table there instead: each task only asks
//! its proxy which epoch it applied, until it has the newest.

use std::sync::Arc;
use std::time::Duration;

use hyper::{Method, StatusCode};
use pgwarden_api::{ProxyHealth, RoutingDelta, RoutingTable};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::httpc::{self, Timeouts};
use crate::metrics::Metrics;

const RETRY: Duration = Duration::from_millis(500);
/// How often a proxy that watches etcd is asked whether it applied the newest table.
const WATCH_POLL: Duration = Duration::from_millis(20);
const CHECK_EVERY: Duration = Duration::from_secs(2);
/// A proxy that takes longer than this to answer is retried later; each proxy has its own task,
/// so a proxy that never answers delays no other.
const PUSH_TIMEOUTS: Timeouts =
    Timeouts { connect: Duration::from_secs(1), exchange: Duration::from_secs(2) };

/// How the proxies get each table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// `PUT /v1/routes` to each proxy (the embedded store).
    Push,
    /// The proxies watch etcd, where `Routing::publish` put the table.
    Watched,
}

pub struct Publisher {
    tx: watch::Sender<Arc<RoutingTable>>,
    /// The epoch each proxy has applied, as its task reports it.
    applied: Arc<watch::Sender<Vec<u64>>>,
}

impl Publisher {
    pub fn start(
        proxies: Vec<String>,
        token: String,
        delivery: Delivery,
        metrics: Metrics,
    ) -> Self {
        let (tx, _) = watch::channel(Arc::new(RoutingTable::default()));
        let applied = Arc::new(watch::Sender::new(vec![0; proxies.len()]));
        for (index, proxy) in proxies.into_iter().enumerate() {
            let rx = tx.subscribe();
            let reporter = Reporter { applied: applied.clone(), index };
            let sync = Sync { proxy, token: token.clone(), delivery, metrics: metrics.clone() };
            tokio::spawn(keep_in_sync(sync, rx, reporter));
        }
        Self { tx, applied }
    }

    /// Waits until every proxy applied `epoch` or a later one; false after `timeout`.
    pub async fn wait_applied(&self, epoch: u64, timeout: std::time::Duration) -> bool {
        let mut applied = self.applied.subscribe();
        let all = applied.wait_for(|applied| applied.iter().all(|a| *a >= epoch));
        // The sender lives as long as `self`: the wait ends only when they have it, or in time.
        let applied_in_time = matches!(tokio::time::timeout(timeout, all).await, Ok(Ok(_)));
        applied_in_time
    }

    pub fn publish(&self, table: RoutingTable) {
        self.tx.send_replace(Arc::new(table));
    }

    pub fn current(&self) -> Arc<RoutingTable> {
        self.tx.borrow().clone()
    }
}

/// Where a proxy's task reports the epoch it applied.
struct Reporter {
    applied: Arc<watch::Sender<Vec<u64>>>,
    index: usize,
}

impl Reporter {
    fn set(&self, epoch: u64) {
        self.applied.send_modify(|applied| applied[self.index] = epoch);
    }
}

/// One proxy, and how it gets its tables.
struct Sync {
    proxy: String,
    token: String,
    delivery: Delivery,
    metrics: Metrics,
}

impl Sync {
    /// Has the proxy apply `table` (push: what changed since `held`, the table it holds, when
    /// it holds one), or sees that it did (watched).
    async fn deliver(
        &self,
        table: &RoutingTable,
        held: Option<&RoutingTable>,
    ) -> Result<(), PushError> {
        match self.delivery {
            Delivery::Push => {
                let delta = held.and_then(|held| RoutingDelta::between(held, table));
                let pushed = match delta {
                    Some(delta) => match patch(&self.proxy, &self.token, &delta).await {
                        Ok(()) => {
                            self.metrics.route_delta();
                            Ok(())
                        }
                        // It holds another table after all: the whole one.
                        Err(PushError::Refused { status: StatusCode::CONFLICT, .. }) => {
                            push(&self.proxy, &self.token, table).await
                        }
                        Err(e) => Err(e),
                    },
                    None => push(&self.proxy, &self.token, table).await,
                };
                self.metrics.route_push(pushed.is_ok());
                pushed
            }
            Delivery::Watched => match proxy_epoch(&self.proxy).await? {
                epoch if epoch >= table.epoch => Ok(()),
                epoch => Err(PushError::Behind(epoch)),
            },
        }
    }

    fn retry_after(&self) -> Duration {
        match self.delivery {
            Delivery::Push => RETRY,
            Delivery::Watched => WATCH_POLL,
        }
    }
}

async fn keep_in_sync(sync: Sync, mut rx: watch::Receiver<Arc<RoutingTable>>, reporter: Reporter) {
    let proxy = &sync.proxy;
    let mut applied = 0u64;
    // The table the proxy holds, as far as this task knows (it gave it).
    let mut held: Option<Arc<RoutingTable>> = None;
    loop {
        let table = rx.borrow_and_update().clone();
        if table.epoch > applied {
            match sync.deliver(&table, held.as_deref()).await {
                Ok(()) => {
                    info!(%proxy, epoch = table.epoch, "routing table applied");
                    applied = table.epoch;
                    reporter.set(applied);
                    held = Some(table);
                }
                Err(e) => {
                    debug!(%proxy, error = %e, "routing table not applied yet");
                    // It may hold this table or not: the next try sends the whole one.
                    held = None;
                    tokio::select! {
                        _ = tokio::time::sleep(sync.retry_after()) => {}
                        r = rx.changed() => if r.is_err() { return },
                    }
                    continue;
                }
            }
        }
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(CHECK_EVERY) => {
                if let Ok(epoch) = proxy_epoch(proxy).await {
                    if epoch < applied {
                        warn!(%proxy, epoch, applied, "proxy lost its routing table (restarted?); pushing again");
                        applied = 0;
                        held = None;
                        reporter.set(0);
                    }
                }
            }
        }
    }
}

/// Why a proxy did not take a table, or did not say its epoch.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error(transparent)]
    Http(#[from] httpc::HttpError),
    #[error("the proxy answered {status}: {body}")]
    Refused { status: StatusCode, body: String },
    #[error("unreadable JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the proxy has applied epoch {0} only")]
    Behind(u64),
}

async fn push(proxy: &str, token: &str, table: &RoutingTable) -> Result<(), PushError> {
    let body = serde_json::to_vec(table)?;
    let (status, answer) =
        httpc::request(proxy, Method::PUT, "/v1/routes", Some(token), Some(body), PUSH_TIMEOUTS)
            .await?;
    match status {
        StatusCode::OK => Ok(()),
        // The proxy already holds this epoch or a newer one.
        StatusCode::CONFLICT => Ok(()),
        status => {
            Err(PushError::Refused { status, body: String::from_utf8_lossy(&answer).into_owned() })
        }
    }
}

/// `PATCH /v1/routes`: what changed since the table the proxy holds.
async fn patch(proxy: &str, token: &str, delta: &RoutingDelta) -> Result<(), PushError> {
    let body = serde_json::to_vec(delta)?;
    let (status, answer) =
        httpc::request(proxy, Method::PATCH, "/v1/routes", Some(token), Some(body), PUSH_TIMEOUTS)
            .await?;
    match status {
        StatusCode::OK => Ok(()),
        status => {
            Err(PushError::Refused { status, body: String::from_utf8_lossy(&answer).into_owned() })
        }
    }
}

async fn proxy_epoch(proxy: &str) -> Result<u64, PushError> {
    let (status, body) =
        httpc::request(proxy, Method::GET, "/health", None, None, PUSH_TIMEOUTS).await?;
    if status != StatusCode::OK {
        let body = String::from_utf8_lossy(&body).into_owned();
        return Err(PushError::Refused { status, body });
    }
    Ok(serde_json::from_slice::<ProxyHealth>(&body)?.epoch)
}
