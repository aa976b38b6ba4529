//! The active/standby pair. Both proxies are configured with the same client address; only the
//! active one holds it. The standby sends a heartbeat (`GET /health`) to its peer every
//! `heartbeat_interval_ms`; once the peer has not answered as active for `takeover_after_ms`,
//! it binds the client address and becomes active. The address itself arbitrates: it can be
//! bound by one process only and is freed the moment the holder dies, so a proxy that comes
//! back finds it taken and stays standby (no flapping). `on_active` / `on_standby` commands run
//! on each change (to move a virtual IP on real hosts).
//!
//! Proxies on two hosts (each binds its own host's address, so the address cannot arbitrate)
//! elect the active one through etcd instead (`etcd_pair`): the one that holds
//! `<prefix>/proxies/<pair>/active`, bound to its lease, is active; it runs `on_active` (which
//! adds the virtual IP clients use) and waits for it before it binds the client address. A
//! lease lost (cut off from etcd, frozen) makes it run `on_standby` and stop; the other takes
//! over once the lease has ended. Two hosts are never both active: the key has one holder.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pgwarden_api::{ProxyHealth, ProxyRole};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::HaConfig;
use crate::metrics::Metrics;

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

    /// Takes `role` and runs its hook in the background.
    pub fn set(&self, role: ProxyRole, ha: Option<&HaConfig>, metrics: &Metrics) {
        self.mark(role, metrics);
        if let Some(hook) = hook(role, ha) {
            tokio::spawn(hook);
        }
    }

    /// Takes `role` and runs its hook to its end (at most `HOOK_TIMEOUT`).
    pub async fn change(&self, role: ProxyRole, ha: Option<&HaConfig>, metrics: &Metrics) {
        self.mark(role, metrics);
        run_hook(role, ha).await;
    }

    /// Reports `role` (`/active`, metrics) from now on.
    fn mark(&self, role: ProxyRole, metrics: &Metrics) {
        self.active.store(role == ProxyRole::Active, Ordering::Release);
        metrics.set_role(role == ProxyRole::Active);
        info!(?role, "proxy role");
    }
}

/// Runs `role`'s hook to its end (at most `HOOK_TIMEOUT`).
async fn run_hook(role: ProxyRole, ha: Option<&HaConfig>) {
    if let Some(hook) = hook(role, ha) {
        if tokio::time::timeout(HOOK_TIMEOUT, hook).await.is_err() {
            warn!(?role, "role hook still running after {HOOK_TIMEOUT:?}; going on");
        }
    }
}

/// `role`'s hook command, if one is configured, as a future that runs it.
fn hook(
    role: ProxyRole,
    ha: Option<&HaConfig>,
) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
    let command = match role {
        ProxyRole::Active => ha.and_then(|h| h.on_active.clone()),
        ProxyRole::Standby => ha.and_then(|h| h.on_standby.clone()),
    }?;
    let label = if role == ProxyRole::Active { "active" } else { "standby" };
    Some(async move {
        let status = tokio::process::Command::new("sh")
            .args(["-c", &command])
            .env("PGWARDEN_PROXY_ROLE", label)
            .kill_on_drop(true)
            .status()
            .await;
        match status {
            Ok(s) if s.success() => info!(%command, "role hook ran"),
            Ok(s) => warn!(%command, %s, "role hook failed"),
            Err(e) => warn!(%command, error = %e, "role hook could not run"),
        }
    })
}

/// How long a role hook may run.
const HOOK_TIMEOUT: Duration = Duration::from_secs(10);

/// With `etcd_pair`: stands by until this proxy holds the pair's key, then runs `on_active`,
/// binds the client address and returns it with the leadership (whose loss must make the proxy
/// stand down). `None` on shutdown.
pub async fn wait_until_elected<L>(
    ha: &HaConfig,
    etcd: &crate::config::EtcdConfig,
    me: &str,
    bind: impl Fn() -> std::io::Result<L>,
    role: &Role,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> Option<(L, std::sync::Arc<pgwarden_etcd::Leadership>)> {
    let pair = ha.etcd_pair.as_deref().unwrap_or("default");
    let key = format!("proxies/{pair}/active");
    let ttl = Duration::from_millis(ha.takeover_after_ms).max(Duration::from_secs(2));
    let what = "the active role: this proxy stands down";
    role.set(ProxyRole::Standby, Some(ha), metrics);
    let etcd = loop {
        match pgwarden_etcd::Etcd::connect(&etcd.endpoints, &etcd.prefix).await {
            Ok(etcd) => break etcd,
            Err(e) => warn!(error = %e, "cannot reach etcd to elect the active proxy"),
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
            () = shutdown.cancelled() => return None,
        }
    };
    loop {
        let leadership =
            pgwarden_etcd::Leadership::campaign(&etcd, &key, me, ttl, what, shutdown).await?;
        // The hook brings the address up; the proxy reports itself active only once it listens
        // there (a client told so must not be refused).
        run_hook(ProxyRole::Active, Some(ha)).await;
        // The address may still be held for an instant by a process that stood down.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            match bind() {
                Ok(listener) => {
                    role.mark(ProxyRole::Active, metrics);
                    return Some((listener, leadership));
                }
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(error = %e, "client address not bindable yet");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => {
                    warn!(error = %e, "elected but cannot bind the client address; standing down");
                    leadership.resign().await;
                    role.change(ProxyRole::Standby, Some(ha), metrics).await;
                    break;
                }
            }
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
    let peer = ha.peer_admin.as_deref().unwrap_or_default();
    loop {
        let peer_active = peer_role(peer, interval).await == Some(ProxyRole::Active);
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
