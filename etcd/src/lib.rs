//! etcd for pgwarden's processes on several hosts: the connection (every call bounded in
//! time), leases kept alive (`lease.rs`), and leaderships (`leader.rs`): one process at a time
//! holds a key bound to its lease; the others stand by and take over when the lease ends. The
//! control planes elect their leader with it, the proxies of a pair their active one.
#![forbid(unsafe_code)]

pub mod leader;
pub mod lease;

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
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

/// A connection to the etcd cluster and the prefix of pgwarden's keys: one client per member,
/// calls going to the member in use until one fails, then to the next (a dead member costs a
/// refused connection or one call's bound, not a lease).
#[derive(Clone)]
pub struct Etcd {
    clients: Arc<Vec<etcd_client::Client>>,
    current: Arc<AtomicUsize>,
    prefix: String,
}

impl Etcd {
    /// Connects to `endpoints` (`http://host:port`, or `host:port`); connections are made on
    /// first use.
    pub async fn connect(endpoints: &[String], prefix: &str) -> Result<Self, CoordError> {
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(CALL_TIMEOUT)
            .with_keep_alive(Duration::from_secs(1), Duration::from_secs(2));
        let mut clients = Vec::with_capacity(endpoints.len());
        for endpoint in endpoints {
            let url = if endpoint.contains("://") {
                endpoint.clone()
            } else {
                format!("http://{endpoint}")
            };
            let connect = etcd_client::Client::connect([url.as_str()], Some(options.clone()));
            let client = bounded(CONNECT_TIMEOUT + CALL_TIMEOUT, connect).await.map_err(|e| {
                CoordError::Unreachable { endpoints: url.clone(), reason: e.to_string() }
            })?;
            clients.push(client);
        }
        if clients.is_empty() {
            let reason = "no endpoint given".to_owned();
            return Err(CoordError::Unreachable { endpoints: String::new(), reason });
        }
        let prefix = format!("/{}", prefix.trim_matches('/'));
        let start = rand_index(clients.len());
        Ok(Self { clients: Arc::new(clients), current: Arc::new(AtomicUsize::new(start)), prefix })
    }

    /// Member `i` failed a call: the next calls go to the next member. Only once per member
    /// in use: tasks that saw the same member fail at once move on by one member together (each
    /// moving on would bring some of them back to the member that failed).
    pub fn failed(&self, i: usize) {
        let n = self.clients.len();
        let _ = self.current.compare_exchange(i, (i + 1) % n, Ordering::AcqRel, Ordering::Acquire);
    }

    /// `call` with a client of each member in turn, from the one in use, until one answers
    /// (each bounded by `CALL_TIMEOUT`); the last error if none does. Only for calls that may
    /// be made twice (reads, and writes whose transaction compares what they change).
    pub async fn call<T, F, Fut>(&self, mut call: F) -> Result<T, CoordError>
    where
        F: FnMut(etcd_client::Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut last = None;
        for _ in 0..self.clients.len() {
            let (i, client) = self.member();
            match bounded(CALL_TIMEOUT, call(client)).await {
                Ok(answer) => return Ok(answer),
                Err(e) => {
                    self.failed(i);
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or(CoordError::Closed("no member to call")))
    }

    /// The full key of `rest` (`leader`, `state/databases/...`).
    pub fn key(&self, rest: &str) -> String {
        format!("{}/{rest}", self.prefix)
    }

    /// A client of the member in use (cheap to clone; its calls take `&mut`).
    pub fn client(&self) -> etcd_client::Client {
        self.member().1
    }

    /// The member in use, and a client of it (`failed` takes the member).
    pub fn member(&self) -> (usize, etcd_client::Client) {
        let i = self.current.load(Ordering::Acquire) % self.clients.len();
        (i, self.clients[i].clone())
    }

    /// The current leader's address, if any.
    pub async fn leader(&self) -> Result<Option<String>, CoordError> {
        let key = self.key("leader");
        let answer = self.call(|mut c| {
            let key = key.clone();
            async move { c.get(key, None).await }
        });
        let answer = answer.await?;
        Ok(answer.kvs().first().map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }
}

/// A start among `n` members, so that processes spread over them.
fn rand_index(n: usize) -> usize {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as usize);
    (nanos ^ std::process::id() as usize) % n.max(1)
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
