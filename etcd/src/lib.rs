//! etcd for pgwarden's processes on several hosts: the connection (every call bounded in
//! time), leases kept alive (`lease.rs`), and leaderships (`leader.rs`): one process at a time
//! holds a key bound to its lease; the others stand by and take over when the lease ends. The
//! control planes elect their leader with it, the proxies of a pair their active one.
#![forbid(unsafe_code)]

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
