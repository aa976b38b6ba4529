//! Cancel keys: the client is told its backend's real process id (so NOTIFY's sender pid,
//! `pg_stat_activity` and `pg_terminate_backend` mean what they mean directly) with a secret of
//! the proxy's own; the proxy maps that pair to the node and the node's real secret.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::protocol;

/// The key a client holds: what it sends in a `CancelRequest`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CancelKey {
    pub pid: i32,
    pub secret: i32,
}

/// Where a cancel must go: the node, how to reach it, and its own key for the backend.
#[derive(Clone)]
pub struct CancelTarget {
    pub node: NodeAddress,
    pub key: CancelKey,
}

/// A node's address, and the TLS (verified for `host`) its sessions were opened with.
#[derive(Clone)]
pub struct NodeAddress {
    pub addr: SocketAddr,
    pub tls: Option<(Arc<TlsConnector>, Arc<str>)>,
}

impl std::fmt::Display for NodeAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}", self.addr, if self.tls.is_some() { " (TLS)" } else { "" })
    }
}

#[derive(Default)]
pub struct CancelMap {
    /// `None`: a pooled client between transactions (nothing to cancel).
    keys: Mutex<HashMap<CancelKey, Option<CancelTarget>>>,
}

/// Removes its key from the map when the session ends.
pub struct CancelGuard {
    map: Arc<CancelMap>,
    key: CancelKey,
}

impl CancelGuard {
    pub fn key(&self) -> CancelKey {
        self.key
    }
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        self.map.lock().remove(&self.key);
    }
}

impl CancelMap {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<CancelKey, Option<CancelTarget>>> {
        self.keys.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Issues the client key for `target` (its real pid, a fresh secret), valid while the
    /// guard lives.
    pub fn register(self: &Arc<Self>, target: CancelTarget) -> CancelGuard {
        let mut keys = self.lock();
        let key = loop {
            // Two nodes may have backends with the same pid: the secret tells them apart.
            let key = CancelKey { pid: target.key.pid, secret: rand::random() };
            if !keys.contains_key(&key) {
                break key;
            }
        };
        keys.insert(key, Some(target));
        CancelGuard { map: Arc::clone(self), key }
    }

    /// Issues a key for a pooled client: its pid is made up (the backend changes with each
    /// transaction), and it cancels whatever `retarget` last named.
    pub fn register_pooled(self: &Arc<Self>) -> CancelGuard {
        let mut keys = self.lock();
        let key = loop {
            let key = CancelKey { pid: rand::random::<i32>() & i32::MAX, secret: rand::random() };
            if !keys.contains_key(&key) {
                break key;
            }
        };
        keys.insert(key, None);
        CancelGuard { map: Arc::clone(self), key }
    }

    /// Points a pooled client's key at the backend running its transaction (`None` between
    /// transactions).
    pub fn retarget(&self, key: CancelKey, target: Option<CancelTarget>) {
        if let Some(slot) = self.lock().get_mut(&key) {
            *slot = target;
        }
    }

    pub fn target(&self, key: CancelKey) -> Option<CancelTarget> {
        self.lock().get(&key).cloned().flatten()
    }
}

/// Sends the real `CancelRequest` to the node, inside TLS when its sessions use TLS (the key
/// never crosses the network in the clear). PostgreSQL answers nothing; it closes.
pub async fn forward(target: CancelTarget, timeout: Duration) -> std::io::Result<()> {
    let request = protocol::cancel_request(target.key.pid, target.key.secret);
    let send = async {
        let mut tcp = TcpStream::connect(target.node.addr).await?;
        let Some((connector, host)) = &target.node.tls else {
            tcp.write_all(&request).await?;
            return tcp.shutdown().await;
        };
        let mut tls = crate::node::start_tls(tcp, connector, host).await.map_err(|e| match e {
            crate::node::NodeConnectError::Unreachable(e)
            | crate::node::NodeConnectError::Tls(e) => e,
            crate::node::NodeConnectError::NoTls => std::io::Error::other(e),
        })?;
        tls.write_all(&request).await?;
        tls.shutdown().await
    };
    tokio::time::timeout(timeout, send)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}
