//! What workflows use to route clients: the publisher, the holds of planned operations, the
//! users' verifiers, and the addresses clients are given.

use pgwarden_api::sealed::seal_table;

use super::{table, Holds, Publisher, VerifierCache};
use crate::metrics::Metrics;
use crate::state::{Store, StoreError};

/// Where clients reach the proxies.
pub struct ClientAddress {
    pub host: String,
    pub port: u16,
    /// The transaction-pooling port on the same host, if any.
    pub pool_port: Option<u16>,
}

pub struct Routing {
    pub publisher: Publisher,
    /// Databases whose new sessions the proxies hold.
    pub holds: Holds,
    /// The users' SCRAM verifiers the proxies authenticate clients with.
    pub verifiers: VerifierCache,
    pub clients: ClientAddress,
    /// The platform CA's certificate, for the proxies to verify nodes.
    node_ca: String,
    /// The proxies' admin token, which seals the table kept in the store.
    proxy_token: String,
    metrics: Metrics,
}

impl Routing {
    pub fn new(
        publisher: Publisher,
        clients: ClientAddress,
        node_ca: String,
        proxy_token: String,
        metrics: Metrics,
    ) -> Self {
        Self {
            publisher,
            holds: Holds::default(),
            verifiers: VerifierCache::default(),
            clients,
            node_ca,
            proxy_token,
            metrics,
        }
    }

    /// Builds the routing table from the store with a new epoch and hands it to the publisher
    /// (which pushes it in the background: this never waits on a proxy). With etcd, the table
    /// goes to etcd with its epoch, sealed for the proxies that watch it.
    pub async fn publish(&self, store: &Store) -> Result<u64, StoreError> {
        let databases = store.databases().await?;
        let mut table = table::build(&databases, &self.holds, &self.verifiers, &self.node_ca, 0);
        let sealed = seal_table(&self.proxy_token, &table);
        let epoch = store.next_epoch(&sealed).await?;
        table.epoch = epoch;
        self.metrics.epoch.set(epoch as i64);
        self.publisher.publish(table);
        Ok(epoch)
    }

    /// `postgres://user:password@host:port/db` through the proxies.
    pub fn url(&self, user: &str, password: &str, database: &str) -> String {
        format!(
            "postgres://{user}:{password}@{}:{}/{database}",
            self.clients.host, self.clients.port
        )
    }

    /// The same on the proxies' transaction-pooling port, when they have one.
    pub fn pool_url(&self, user: &str, password: &str, database: &str) -> Option<String> {
        let port = self.clients.pool_port?;
        Some(format!("postgres://{user}:{password}@{}:{port}/{database}", self.clients.host))
    }
}
