//! The active/standby pair. Both proxies are configured with the same client address; only the
//! active one holds it. The standby sends a heartbeat (`GET /health`) to its peer every
//! `heartbeat_interval_ms`; once the peer has not answered as active for `takeover_after_ms`,
//! it binds the client address and becomes active. The address itself arbitrates: it can be
//! bound by one process only and is freed the moment the holder dies, so a proxy that comes
//! back finds it taken and stays standby (no flapping). `on_active` / `on_standby` commands run
//! on each change (to move a virtual IP on real hosts).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pgwarden_api::{ProxyHealth, ProxyRole};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics::Metrics;

/// `[ha]` in `proxy.toml`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaConfig {
    /// Admin address (`host:port`) of the other proxy of the pair.
    pub peer_admin: String,
    /// Milliseconds between heartbeats. Default 100.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_interval_ms: u64,
    /// Milliseconds without an answer from an active peer before taking over. Default 500.
    #[serde(default = "default_takeover")]
    pub takeover_after_ms: u64,
    /// Shell command run when this proxy becomes active (`PGWARDEN_PROXY_ROLE=active`).
    pub on_active: Option<String>,
    /// Shell command run when this proxy becomes standby.
    pub on_standby: Option<String>,
}

fn default_heartbeat() -> u64 {
    100
}

fn default_takeover() -> u64 {
    500
}

/// This proxy's role, as `/health`, `/active` and the metrics report it.
#[derive(Default)]
pub struct Role {
    active: AtomicBool,
}

impl Role {
    pub fn get(&self) -> ProxyRole {
        if self.active.load(Ordering::Acquire) {
            ProxyRole::Active
        } else {
            ProxyRole::Standby
        }
    }

    pub fn set(&self, role: ProxyRole, ha: Option<&HaConfig>, metrics: &Metrics) {
        self.active.store(role == ProxyRole::Active, Ordering::Release);
        metrics.set_role(role == ProxyRole::Active);
        info!(?role, "proxy role");
        let hook = match role {
            ProxyRole::Active => ha.and_then(|h| h.on_active.clone()),
            ProxyRole::Standby => ha.and_then(|h| h.on_standby.clone()),
        };
        if let Some(command) = hook {
            let label = if role == ProxyRole::Active { "active" } else { "standby" };
            tokio::spawn(async move {
                let status = tokio::process::Command::new("sh")
                    .args(["-c", &command])
                    .env("PGWARDEN_PROXY_ROLE", label)
                    .status()
                    .await;
                match status {
                    Ok(s) if s.success() => info!(%command, "role hook ran"),
                    Ok(s) => warn!(%command, %s, "role hook failed"),
                    Err(e) => warn!(%command, error = %e, "role hook could not run"),
                }
            });
        }
    }
}

/// Stays standby while the peer is active; returns the client listener once this proxy holds
/// the client address, or `None` on shutdown.
pub async fn wait_until_active<L>(
    ha: &HaConfig,
    bind: impl Fn() -> std::io::Result<L>,
    role: &Role,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> Option<L> {
    let interval = Duration::from_millis(ha.heartbeat_interval_ms.max(10));
    let takeover_after = Duration::from_millis(ha.takeover_after_ms);
    let mut last_seen_active: Option<Instant> = None;
    let mut announced_standby = false;
    loop {
        let peer_active = peer_role(&ha.peer_admin, interval).await == Some(ProxyRole::Active);
        if peer_active {
            last_seen_active = Some(Instant::now());
        }
        let peer_gone = last_seen_active.is_none_or(|t| t.elapsed() >= takeover_after);
        if !peer_active && peer_gone {
            match bind() {
                Ok(listener) => {
                    role.set(ProxyRole::Active, Some(ha), metrics);
                    return Some(listener);
                }
                Err(e) => tracing::debug!(error = %e, "client address still held"),
            }
        }
        if !announced_standby {
            role.set(ProxyRole::Standby, Some(ha), metrics);
            announced_standby = true;
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = shutdown.cancelled() => return None,
        }
    }
}

/// The peer's role from its `/health`, or `None` if it does not answer in `timeout`.
async fn peer_role(peer: &str, timeout: Duration) -> Option<ProxyRole> {
    let ask = async {
        let mut stream = TcpStream::connect(peer).await.ok()?;
        let request = format!("GET /health HTTP/1.1\r\nHost: {peer}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut answer = Vec::with_capacity(512);
        stream.take(16 * 1024).read_to_end(&mut answer).await.ok()?;
        let text = String::from_utf8_lossy(&answer);
        let (head, body) = text.split_once("\r\n\r\n")?;
        if !head.starts_with("HTTP/1.1 200") {
            return None;
        }
        serde_json::from_str::<ProxyHealth>(body.trim()).ok().map(|h| h.role)
    };
    tokio::time::timeout(timeout, ask).await.ok().flatten()
}
