//! Keeps every proxy on the latest routing table: one task per proxy pushes each new table,
//! retries while the proxy is unreachable, and re-pushes when a proxy reports an older epoch
//! (it restarted).

use std::sync::Arc;
use std::time::Duration;

use hyper::{Method, StatusCode};
use pgwarden_api::{ProxyHealth, RoutingTable};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::httpc;
use crate::metrics::Metrics;

const RETRY: Duration = Duration::from_millis(500);
const CHECK_EVERY: Duration = Duration::from_secs(2);

pub struct Publisher {
    tx: watch::Sender<Arc<RoutingTable>>,
}

impl Publisher {
    pub fn start(proxies: Vec<String>, token: String, metrics: Metrics) -> Self {
        let (tx, _) = watch::channel(Arc::new(RoutingTable::default()));
        for proxy in proxies {
            tokio::spawn(keep_in_sync(proxy, token.clone(), tx.subscribe(), metrics.clone()));
        }
        Self { tx }
    }

    pub fn publish(&self, table: RoutingTable) {
        self.tx.send_replace(Arc::new(table));
    }

    pub fn current(&self) -> Arc<RoutingTable> {
        self.tx.borrow().clone()
    }
}

async fn keep_in_sync(
    proxy: String,
    token: String,
    mut rx: watch::Receiver<Arc<RoutingTable>>,
    metrics: Metrics,
) {
    let mut applied = 0u64;
    loop {
        let table = rx.borrow_and_update().clone();
        if table.epoch > applied {
            match push(&proxy, &token, &table).await {
                Ok(()) => {
                    metrics.route_push(true);
                    info!(%proxy, epoch = table.epoch, "routing table applied");
                    applied = table.epoch;
                }
                Err(e) => {
                    metrics.route_push(false);
                    debug!(%proxy, error = %e, "routing table not applied yet");
                    tokio::select! {
                        _ = tokio::time::sleep(RETRY) => {}
                        r = rx.changed() => if r.is_err() { return },
                    }
                    continue;
                }
            }
        }
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(CHECK_EVERY) => {
                if let Ok(epoch) = proxy_epoch(&proxy).await {
                    if epoch < applied {
                        warn!(%proxy, epoch, applied, "proxy lost its routing table (restarted?); pushing again");
                        applied = 0;
                    }
                }
            }
        }
    }
}

async fn push(proxy: &str, token: &str, table: &RoutingTable) -> Result<(), String> {
    let body = serde_json::to_vec(table).map_err(|e| e.to_string())?;
    let (status, answer) =
        httpc::request(proxy, Method::PUT, "/v1/routes", Some(token), Some(body))
            .await
            .map_err(|e| e.to_string())?;
    match status {
        StatusCode::OK => Ok(()),
        // The proxy already holds this epoch or a newer one.
        StatusCode::CONFLICT => Ok(()),
        other => Err(format!("{other}: {}", String::from_utf8_lossy(&answer))),
    }
}

async fn proxy_epoch(proxy: &str) -> Result<u64, String> {
    let (status, body) = httpc::request(proxy, Method::GET, "/health", None, None)
        .await
        .map_err(|e| e.to_string())?;
    if status != StatusCode::OK {
        return Err(status.to_string());
    }
    serde_json::from_slice::<ProxyHealth>(&body).map(|h| h.epoch).map_err(|e| e.to_string())
}
