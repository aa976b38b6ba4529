//! Cancel keys: the proxy hands clients its own `BackendKeyData` and maps it to the real one.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::protocol;

/// The key a client holds: what it sends in a `CancelRequest`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CancelKey {
    pub pid: i32,
    pub secret: i32,
}

/// Where a cancel must go: the node and its own key for the backend.
#[derive(Clone, Copy, Debug)]
pub struct CancelTarget {
    pub node: SocketAddr,
    pub key: CancelKey,
}

#[derive(Default)]
pub struct CancelMap {
    keys: Mutex<HashMap<CancelKey, CancelTarget>>,
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
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<CancelKey, CancelTarget>> {
        self.keys.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Issues a fresh client key for `target`, valid while the guard lives.
    pub fn register(self: &Arc<Self>, target: CancelTarget) -> CancelGuard {
        let mut keys = self.lock();
        let key = loop {
            let key = CancelKey { pid: rand::random::<i32>() & i32::MAX, secret: rand::random() };
            if key.pid != 0 && !keys.contains_key(&key) {
                break key;
            }
        };
        keys.insert(key, target);
        CancelGuard { map: Arc::clone(self), key }
    }

    pub fn target(&self, key: CancelKey) -> Option<CancelTarget> {
        self.lock().get(&key).copied()
    }
}

/// Sends the real `CancelRequest` to the node. PostgreSQL answers nothing; it closes.
pub async fn forward(target: CancelTarget, timeout: Duration) -> std::io::Result<()> {
    let send = async {
        let mut node = TcpStream::connect(target.node).await?;
        node.write_all(&protocol::cancel_request(target.key.pid, target.key.secret)).await?;
        node.shutdown().await
    };
    tokio::time::timeout(timeout, send)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}
