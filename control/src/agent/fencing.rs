//! Fencing across hosts, for agents on etcd (`pgwarden agent --etcd`).
//!
//! The agent holds `<prefix>/agents/<address>` bound to a lease of its own (`coord::Lease`).
//! When it cannot renew it (its host is cut off from a majority of etcd), it kills every
//! primary it runs `FENCE_LEAD` before the lease can end (as it counts: before etcd can), and
//! while its lease is not valid it starts no node that would come up as a primary and promotes
//! none. The control plane, for its part, promotes a standby in place of a primary whose agent
//! it cannot reach only once that key is gone, plus `PROMOTE_MARGIN` (`wait_fenced`): by then
//! the old primary has been killed. So no side of a partition has two writable primaries: the
//! side with etcd's majority wins, the other stops writing first.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::PutOptions;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::coord::{CoordError, Etcd, Lease};
use crate::nodes::driver::NodeSpec;
use crate::nodes::local::LocalDriver;
use crate::wait;

/// How long before its lease can end an agent kills its primaries.
pub const FENCE_LEAD: Duration = Duration::from_millis(500);
/// How long after an unreachable agent's key is gone the control plane waits before it
/// promotes a standby in place of that agent's primary.
pub const PROMOTE_MARGIN: Duration = Duration::from_secs(1);
const WHAT: &str = "the agent's lease: its primaries are fenced";

/// The key of the agent at `address`.
pub fn key(etcd: &Etcd, address: &str) -> String {
    etcd.key(&format!("agents/{address}"))
}

/// Whether the agent's lease is valid now (shared with the request handlers).
#[derive(Clone, Default)]
pub struct Standing(Arc<std::sync::Mutex<Option<Arc<Lease>>>>);

impl Standing {
    /// False while the agent holds no valid lease.
    pub fn in_touch(&self) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).as_ref().is_some_and(|l| l.is_valid())
    }

    fn set(&self, lease: Option<Arc<Lease>>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = lease;
    }
}

/// Holds the agent's key until `stop`, fencing its primaries whenever its lease is about to
/// end unrenewed. The key is not given up on `stop`: the nodes keep running, so it ends with
/// its lease.
pub async fn hold(
    etcd: Etcd,
    address: String,
    ttl: Duration,
    nodes_dir: PathBuf,
    driver: Arc<LocalDriver>,
    standing: Standing,
    stop: CancellationToken,
) {
    let key = key(&etcd, &address);
    loop {
        let lease = match register(&etcd, &key, &address, ttl).await {
            Ok(lease) => lease,
            Err(e) => {
                warn!(error = %e, "cannot register this agent in etcd; trying again");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(250)) => continue,
                }
            }
        };
        info!(%key, lease = lease.id(), "agent registered in etcd");
        standing.set(Some(Arc::clone(&lease)));
        tokio::spawn(Arc::clone(&lease).keep(WHAT));
        let lost = lease.lost();
        loop {
            let fence_at = lease.until().checked_sub(FENCE_LEAD).unwrap_or_else(Instant::now);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = lost.cancelled() => break,
                _ = tokio::time::sleep_until(fence_at) => {
                    if Instant::now() + FENCE_LEAD >= lease.until() {
                        break;
                    }
                }
            }
        }
        lease.lose(WHAT, "no renewal got through in time");
        standing.set(None);
        let (dir, driver) = (nodes_dir.clone(), Arc::clone(&driver));
        let fenced = tokio::task::spawn_blocking(move || fence_primaries(&dir, &driver)).await;
        error!(fenced = ?fenced.unwrap_or_default(), "cut off from etcd: killed this host's primaries");
    }
}

async fn register(
    etcd: &Etcd,
    key: &str,
    address: &str,
    ttl: Duration,
) -> Result<Arc<Lease>, CoordError> {
    let lease = Lease::grant(etcd, ttl).await?;
    let options = PutOptions::new().with_lease(lease.id());
    let put = etcd.call(|mut c| {
        let (key, address, options) = (key.to_owned(), address.to_owned(), options.clone());
        async move { c.put(key, address, Some(options)).await }
    });
    put.await?;
    Ok(lease)
}

/// Whether the node in `dir` would run (or runs) as a primary: no `standby.signal`.
pub fn is_primary_dir(dir: &Path) -> bool {
    !dir.join("data/standby.signal").exists()
}

/// Kills (kill -9, children first) every running node under `nodes_dir` that is a primary;
/// their names.
fn fence_primaries(nodes_dir: &Path, driver: &LocalDriver) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(nodes_dir) else { return Vec::new() };
    let mut fenced = Vec::new();
    for entry in entries.flatten() {
        let dir = entry.path();
        if !dir.join("data/postmaster.pid").exists() || !is_primary_dir(&dir) {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        let spec = NodeSpec {
            name: name.clone(),
            dir,
            host: String::new(),
            port: 0,
            bin: None,
            agent: None,
        };
        match driver.fence(&spec) {
            Ok(()) => fenced.push(name),
            Err(e) => error!(node = %name, error = %e, "could not fence a primary"),
        }
    }
    fenced
}

/// An agent still holds its lease in etcd: it is in touch with etcd, so its primary may
/// still be serving.
#[derive(Debug, thiserror::Error)]
#[error("agent {0} still holds its lease in etcd: it is in touch with etcd, so its primary may still be serving")]
pub struct StillLeased(pub String);

/// For the control plane: waits until the key of the agent at `address` is gone, then
/// `PROMOTE_MARGIN`; an error if it is still there after `limit` (the agent is in touch with
/// etcd, so its primary may still serve).
pub async fn wait_fenced(etcd: &Etcd, address: &str, limit: Duration) -> Result<(), StillLeased> {
    let key = &key(etcd, address);
    let gone = wait::until_true(limit, wait::STEADY, || async move {
        let get = etcd.call(|mut c| {
            let key = key.clone();
            async move { c.get(key, None).await }
        });
        match get.await {
            Ok(answer) => answer.kvs().is_empty(),
            Err(e) => {
                warn!(error = %e, "cannot read the agent's key");
                false
            }
        }
    });
    if !gone.await {
        return Err(StillLeased(address.to_owned()));
    }
    // Time itself must pass: the agent's own lease check fences its primary within it.
    tokio::time::sleep(PROMOTE_MARGIN).await;
    Ok(())
}
