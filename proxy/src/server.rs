//! The proxy's tasks: accept loop, admin API, SIGHUP certificate reload, graceful shutdown.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use pgwarden_api::{ProxyRole, RoutingTable};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, info_span, warn};

use crate::admission::Refused;
use crate::cancel::CancelMap;
use crate::metrics::{Metrics, Rejection};
use crate::protocol::{fatal, SqlState};
use crate::routes::RouteStore;
use crate::tls::TlsStore;
use crate::workers::Workers;
use crate::{admin, session, Config, Shared};

/// How long sessions get to send their final error once they are told to end.
const TERMINATE_WAIT: Duration = Duration::from_secs(5);

/// Already-bound sockets, so that callers (and tests) choose the addresses. In a pair, the
/// client address is bound only when the proxy becomes active (`clients: None`).
pub struct Listeners {
    pub clients: Option<TcpListener>,
    /// The transaction-pooling address, when configured (bound with `clients`).
    pub pool: Option<TcpListener>,
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds `admin_listen`, and `listen` unless the proxy is one of a pair.
    pub async fn bind(config: &Config) -> anyhow::Result<Self> {
        let clients = match config.ha {
            Some(_) => None,
            None => Some(
                bind_clients(config.listen)
                    .with_context(|| format!("cannot listen on {}", config.listen))?,
            ),
        };
        let pool = match (config.ha.as_ref(), config.pool_listen) {
            (None, Some(addr)) => {
                Some(bind_clients(addr).with_context(|| format!("cannot listen on {addr}"))?)
            }
            _ => None,
        };
        let admin = TcpListener::bind(config.admin_listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.admin_listen))?;
        Ok(Self { clients, pool, admin })
    }
}

fn bind_clients(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Runs the proxy until `shutdown` is cancelled, then stops accepting, lets sessions finish for
/// the configured grace period and ends the rest with `57P01`. Sessions run on the caller's
/// runtime.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    run_on(config, listeners, shutdown, Workers::inline()).await
}

/// [`run`], with sessions spread over `workers`.
pub async fn run_on(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
    workers: Workers,
) -> anyhow::Result<()> {
    config.validate()?;
    // Also cancelled from within, when a proxy elected through etcd loses the active role.
    let shutdown = shutdown.child_token();
    let stood_down = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut limits = config.limits.clone();
    let capacity = crate::open_files::session_capacity();
    if capacity == 0 {
        anyhow::bail!(
            "the limit on open files leaves no room for sessions (at least {} needed; raise \
             `ulimit -n` or LimitNOFILE)",
            crate::open_files::RESERVED + 2
        );
    }
    if capacity < limits.max_client_connections {
        warn!(
            sessions = capacity,
            max_client_connections = limits.max_client_connections,
            "the limit on open files leaves room for fewer sessions than \
             limits.max_client_connections; clients beyond it get 53300 (raise `ulimit -n` or \
             LimitNOFILE)"
        );
        limits.max_client_connections = capacity;
    }
    // Each starting connection holds a descriptor too.
    limits.max_starting = limits.max_starting.min(capacity);
    let admission =
        crate::admission::Admission::new(limits.max_starting, limits.max_starting_per_source);
    let shared = Arc::new(Shared {
        admission,
        tenants: Arc::default(),
        admin_token: config.resolve_admin_token()?,
        decoy_secret: rand::random(),
        domain: config.domain.as_ref().map(|d| d.trim_start_matches('.').to_ascii_lowercase()),
        limits,
        routes: RouteStore::default(),
        pools: crate::pooling::Pools::default(),
        tls: TlsStore::load(config.tls.clone()).context("cannot load TLS certificate")?,
        cancels: Arc::new(CancelMap::default()),
        metrics: Metrics::new(),
        role: crate::ha::Role::default(),
        draining: CancellationToken::new(),
        terminate: CancellationToken::new(),
    });
    if let Some(path) = &config.routes_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read routes_file {}", path.display()))?;
        let table: RoutingTable = serde_json::from_str(&text)
            .with_context(|| format!("invalid routes_file {}", path.display()))?;
        let epoch = shared
            .routes
            .replace(table)
            .with_context(|| format!("routes_file {}", path.display()))?;
        shared.metrics.epoch.set(epoch as i64);
        shared.routes.mark_settled(epoch);
    }
    info!(
        listen = %config.listen,
        admin = %listeners.admin.local_addr()?,
        tls = config.tls.is_some(),
        pair = config.ha.is_some(),
        "proxy started"
    );

    let listeners_admin = listeners.admin.local_addr()?;
    let admin_server = axum::serve(listeners.admin, admin::router(Arc::clone(&shared)))
        .with_graceful_shutdown(shutdown.clone().cancelled_owned());
    let admin_task = tokio::spawn(async move {
        if let Err(e) = admin_server.await {
            error!(error = %e, "admin API failed");
        }
    });
    // Idle pooled server connections are closed after the idle timeout.
    let reaper = {
        let (shared, shutdown) = (Arc::clone(&shared), shutdown.clone());
        tokio::spawn(async move {
            let timeout = shared.limits.pool_idle_timeout();
            let every = timeout.min(Duration::from_secs(1)).max(Duration::from_millis(100));
            loop {
                tokio::select! {
                    () = tokio::time::sleep(every) => shared.pools.close_idle(timeout),
                    () = shutdown.cancelled() => return,
                }
            }
        })
    };
    if let Some(etcd) = config.etcd.clone() {
        tokio::spawn(crate::follow::follow(etcd, Arc::clone(&shared), shutdown.clone()));
    }
    // Installed before serving, so a SIGHUP never finds the default action (exit) in place.
    let hup = signal(SignalKind::hangup()).context("cannot install SIGHUP handler")?;
    let reload_task = tokio::spawn(reload_on_sighup(hup, Arc::clone(&shared), shutdown.clone()));

    let pool_listen = config.pool_listen;
    let bind_both = || -> std::io::Result<(TcpListener, Option<TcpListener>)> {
        Ok((bind_clients(config.listen)?, pool_listen.map(bind_clients).transpose()?))
    };
    let clients = match (listeners.clients, &config.ha) {
        (Some(listener), _) => {
            shared.role.set(ProxyRole::Active, None, &shared.metrics);
            Some((listener, listeners.pool))
        }
        (None, Some(ha)) if ha.etcd_pair.is_some() => {
            let etcd = config.etcd.as_ref().context("ha.etcd_pair needs [etcd]")?;
            let me = listeners_admin.to_string();
            let (role, metrics) = (&shared.role, &shared.metrics);
            let elected =
                crate::ha::wait_until_elected(ha, etcd, &me, bind_both, role, metrics, &shutdown);
            let Some((bound, leadership)) = elected.await else { return Ok(()) };
            let (shared, ha, stop) = (Arc::clone(&shared), ha.clone(), shutdown.clone());
            let stood = Arc::clone(&stood_down);
            tokio::spawn(async move {
                leadership.lost().cancelled().await;
                shared.role.change(ProxyRole::Standby, Some(&ha), &shared.metrics).await;
                stood.store(true, std::sync::atomic::Ordering::Release);
                stop.cancel();
            });
            Some(bound)
        }
        (None, Some(ha)) => {
            let (role, metrics) = (&shared.role, &shared.metrics);
            crate::ha::wait_until_active(ha, bind_both, role, metrics, &shutdown).await
        }
        (None, None) => Some(bind_both().with_context(|| {
            format!("cannot listen on {} (or the pool address)", config.listen)
        })?),
    };
    let tracker = TaskTracker::new();
    while let Some((listener, pool)) = &clients {
        let pooled_accept = async {
            match pool {
                Some(pool) => pool.accept().await,
                None => std::future::pending().await,
            }
        };
        let (accepted, pooled) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => (accepted, false),
            accepted = pooled_accept => (accepted, true),
        };
        match accepted {
            Ok((tcp, peer)) => {
                // Admitted here, in arrival order: the oldest starting connection is the one
                // that came first.
                let starting = match shared.admission.admit(peer.ip()) {
                    Ok(starting) => starting,
                    Err(Refused::TooManyFromSource) => {
                        shared.metrics.rejected(Rejection::TooManyStarting);
                        let message =
                            "too many connections are starting from your address; retry shortly";
                        // One small message fits the socket's buffer: never waits.
                        let _ = tcp.try_write(&fatal(SqlState::TooManyConnections, message));
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let span = info_span!(
                    "session",
                    %peer,
                    pooled,
                    database = tracing::field::Empty,
                    user = tracing::field::Empty,
                    node = tracing::field::Empty
                );
                let shared = Arc::clone(&shared);
                workers.spawn(&tracker, tcp, move |tcp| {
                    session::serve(tcp, shared, span, starting, pooled)
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    drop(clients);
    shared.draining.cancel();
    tracker.close();
    let grace = shared.limits.shutdown_grace();
    info!(sessions = tracker.len(), grace_secs = grace.as_secs_f64(), "draining sessions");
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        info!(sessions = tracker.len(), "grace period over, ending remaining sessions");
        shared.terminate.cancel();
        if tokio::time::timeout(TERMINATE_WAIT, tracker.wait()).await.is_err() {
            warn!(sessions = tracker.len(), "sessions still open at exit");
        }
    }
    reload_task.abort();
    reaper.abort();
    let _ = admin_task.await;
    info!("proxy stopped");
    if stood_down.load(std::sync::atomic::Ordering::Acquire) {
        anyhow::bail!("lost the active role (its lease in etcd ended); start again to stand by");
    }
    Ok(())
}

async fn reload_on_sighup(mut hup: Signal, shared: Arc<Shared>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = hup.recv() => match shared.tls.reload() {
                Ok(()) => info!("TLS certificate reloaded"),
                Err(e) => error!(error = %e, "TLS certificate reload failed; keeping the previous one"),
            },
        }
    }
}
