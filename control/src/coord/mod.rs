//! Control planes on several hosts, coordinated through etcd (`pgwarden serve --etcd`): the
//! connection (every call bounded in time) and the leadership (`leader.rs`): one control plane
//! at a time holds a key bound to its lease and is the only one that acts; the others wait on
//! standby and take over when the lease ends.
//!
//! Keys, under a prefix (`/pgwarden` by default):
//! - `leader`: the leader's API address, bound to its lease. Its create revision is the
//!   leader's term: every write of the state is a transaction that compares it, so a control
//!   plane that lost the leadership can write nothing, not even a routing epoch.
//! - `state/<table>/<key>`, `counters/<name>`: the store (`state/etcd.rs`).
//! - `routing`: the routing table, sealed for the proxies (`pgwarden_api::sealed`), which
//!   watch it; the revision that wrote it is its epoch.

pub mod leader;
pub mod lease;

use std::future::Future;
use std::time::Duration;

pub use leader::Leadership;
pub use lease::Lease;

/// Bound of one etcd call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(3);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    #[error("etcd ({endpoints}): {reason}")]
    Unreachable { endpoints: String, reason: String },
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    #[error("etcd: {0}")]
    Closed(&'static str),
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
}

/// `pgwarden serve --etcd`: where etcd is and how this control plane campaigns.
#[derive(Clone, Debug)]
pub struct EtcdSettings {
    /// Members' client URLs (`http://host:port`).
    pub endpoints: Vec<String>,
    /// Prefix of pgwarden's keys (several platforms may share one etcd).
    pub prefix: String,
    /// TTL of the leader's lease: how long a leader that died keeps the others waiting.
    pub lease_ttl: Duration,
    /// This control plane's API address, as the standbys name the leader.
    pub advertise: String,
}

/// A connection to the etcd cluster and the prefix of pgwarden's keys.
#[derive(Clone)]
pub struct Etcd {
    client: etcd_client::Client,
    prefix: String,
}

impl Etcd {
    /// Connects to `endpoints` (`http://host:port`, or `host:port`); calls go to whichever
    /// member answers.
    pub async fn connect(endpoints: &[String], prefix: &str) -> Result<Self, CoordError> {
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(CALL_TIMEOUT)
            .with_keep_alive(Duration::from_secs(1), Duration::from_secs(2));
        let urls: Vec<String> = endpoints
            .iter()
            .map(|e| if e.contains("://") { e.clone() } else { format!("http://{e}") })
            .collect();
        let connect = etcd_client::Client::connect(&urls, Some(options));
        let client = bounded(CONNECT_TIMEOUT + CALL_TIMEOUT, connect).await.map_err(|e| {
            CoordError::Unreachable { endpoints: urls.join(","), reason: e.to_string() }
        })?;
        let prefix = format!("/{}", prefix.trim_matches('/'));
        Ok(Self { client, prefix })
    }

    /// The full key of `rest` (`leader`, `state/databases/...`).
    pub fn key(&self, rest: &str) -> String {
        format!("{}/{rest}", self.prefix)
    }

    /// A handle for calls (the client is cheap to clone; its calls take `&mut`).
    pub fn client(&self) -> etcd_client::Client {
        self.client.clone()
    }

    /// The current leader's address, if any.
    pub async fn leader(&self) -> Result<Option<String>, CoordError> {
        let key = self.key("leader");
        let mut client = self.client();
        let answer = bounded(CALL_TIMEOUT, client.get(key, None)).await?;
        Ok(answer.kvs().first().map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }
}

/// `call`, bounded by `limit`.
pub async fn bounded<T>(
    limit: Duration,
    call: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, CoordError> {
    match tokio::time::timeout(limit, call).await {
        Ok(answer) => Ok(answer?),
        Err(_) => Err(CoordError::Timeout(limit)),
    }
}
