//! One client connection from accept to close: handshake, routing, authentication through the
//! node, then the byte pump until either side ends or the proxy ends the session.

use std::net::{IpAddr, SocketAddr};
use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tracing::{debug, error, info, warn, Instrument, Span};

use crate::admission::Starting;
use crate::auth::{self, AuthError};
use crate::cancel;
use crate::cancel::NodeAddress;
use crate::handshake::{self, refuse, Handshake, HandshakeError, Startup};
use crate::metrics::{CancelResult, ConnectionGauge, Rejection, Termination};
use crate::passthrough::{self, RelayEnd};
use crate::protocol::SqlState;
use crate::routes::Route;
use crate::stream::NodeStream;
use crate::Shared;

/// How long the proxy waits for a node to finish its current message before ending a session.
const STOP_DRAIN: Duration = Duration::from_secs(2);
/// Routing attempts when the primary moves while a session is being set up.
const ROUTE_ATTEMPTS: usize = 3;

/// Serves one client connection, admitted (in arrival order, by the accept loop) as
/// `starting`. `span` (peer, database, user, node) covers the setup and the
/// end of the session but not the relay in between: entering a span at each of the relay's
/// wake-ups costs more than the copying does.
pub async fn serve(
    tcp: TcpStream,
    shared: Arc<Shared>,
    span: Span,
    starting: Starting,
    pooled: bool,
) {
    let _gauge = ConnectionGauge::new(&shared.metrics.client_connections);
    let peer = starting.ip();
    // A connection that has not authenticated yet gives its place to a newer one when the
    // proxy has too many of them (admission.rs).
    let opened = tokio::select! {
        opened = open(tcp, &shared, peer, pooled).instrument(span.clone()) => opened,
        () = starting.evicted.cancelled() => {
            shared.metrics.rejected(Rejection::Evicted);
            debug!(parent: &span, "starting connection ended to make room for a newer one");
            None
        }
    };
    drop(starting);
    match opened {
        Some(Opened::Session(session)) => run_session(session, &shared, span).await,
        Some(Opened::Pooled(client)) => {
            let started = crate::pooled::start(client, &shared).instrument(span.clone()).await;
            if let Some((client, pool, cancel)) = started {
                shared.metrics.accepted.inc();
                crate::pooled::run(client, &shared, pool, cancel).await;
            }
        }
        None => {}
    }
}

/// A client past its authentication: a session of its own, or a pooled client.
enum Opened {
    Session(Session),
    Pooled(crate::pooled::PooledClient),
}

/// Handshake, routing and authentication. The handshake timeout bounds what the client must
/// send (TLS handshake and startup packet here, each authentication message in `auth`); the
/// node's part has bounds of its own, and a node too slow ends in an ErrorResponse, not a close.
async fn open(tcp: TcpStream, shared: &Shared, peer: IpAddr, pooled: bool) -> Option<Opened> {
    let over_limit =
        shared.metrics.client_connections.get() as usize > shared.limits.max_client_connections;
    let deadline = tokio::time::Instant::now() + shared.limits.handshake_timeout();
    let mut handshake = pin!(handshake::accept(
        tcp,
        &shared.tls,
        shared.limits.max_startup_packet,
        &shared.metrics
    ));
    // Polled through a reference, so that the client's connection (owned by the future) is
    // closed only after the timeout is counted: a client that sees the close sees it in the
    // metrics.
    let hs = match tokio::time::timeout_at(deadline, handshake.as_mut()).await {
        Ok(hs) => hs,
        Err(_) => {
            shared.metrics.rejected(Rejection::HandshakeTimeout);
            debug!("client did not complete its handshake in time");
            return None;
        }
    };
    match hs {
        Ok(Handshake::Cancel(key, mut stream)) => {
            forward_cancel(shared, key).await;
            // PostgreSQL answers a cancel request by closing; over TLS, with a close_notify.
            let closing = tokio::io::AsyncWriteExt::shutdown(&mut stream);
            let _ = tokio::time::timeout(shared.limits.handshake_timeout(), closing).await;
            None
        }
        Ok(Handshake::Startup(startup)) => {
            start_session(startup, shared, peer, over_limit, pooled).await
        }
        Err(e) => {
            shared.metrics.rejected(match e {
                HandshakeError::Protocol(_) => Rejection::Malformed,
                HandshakeError::Tls(_) => Rejection::TlsFailed,
                HandshakeError::Io(_) => Rejection::ClientGone,
            });
            debug!(error = %e, "handshake failed");
            None
        }
    }
}

/// An authenticated session, ready to relay.
struct Session {
    client: crate::stream::ClientStream,
    node: NodeStream,
    route: Arc<Route>,
    database: String,
    auth: auth::Authenticated,
}

async fn forward_cancel(shared: &Shared, key: cancel::CancelKey) {
    let Some(target) = shared.cancels.target(key) else {
        shared.metrics.cancel_request(CancelResult::UnknownKey);
        debug!("cancel request with an unknown key");
        return;
    };
    let node = target.node.clone();
    match cancel::forward(target, shared.limits.backend_connect_timeout()).await {
        Ok(()) => shared.metrics.cancel_request(CancelResult::Forwarded),
        Err(e) => {
            shared.metrics.cancel_request(CancelResult::Failed);
            warn!(%node, error = %e, "could not forward cancel request");
        }
    }
}

async fn start_session(
    startup: Startup,
    shared: &Shared,
    peer: IpAddr,
    over_limit: bool,
    pooled: bool,
) -> Option<Opened> {
    let Startup { mut stream, mut params, packet, end_point, server_name } = startup;
    // A TLS server name `<database id>.<domain>` names the database: it replaces the startup
    // packet's for routing (the node still gets the packet as sent).
    let by_id = server_name.as_deref().zip(shared.domain.as_deref()).and_then(|(name, domain)| {
        name.strip_suffix(domain)?.strip_suffix('.').filter(|id| !id.is_empty()).map(str::to_owned)
    });
    if let Some(id) = &by_id {
        match shared.routes.load().route_by_id(id) {
            Some((name, _)) => params.database = name,
            None => {
                shared.metrics.rejected(Rejection::UnknownDatabase);
                let message = format!("database with id \"{id}\" (TLS server name) does not exist");
                refuse(&mut stream, SqlState::UnknownDatabase, &message).await;
                return None;
            }
        }
    }
    let span = Span::current();
    span.record("user", params.user.as_str());
    span.record("database", params.database.as_str());
    let metrics = &shared.metrics;
    if over_limit {
        metrics.rejected(Rejection::TooManyClients);
        refuse(&mut stream, SqlState::TooManyConnections, "sorry, too many clients already").await;
        return None;
    }
    if shared.draining.is_cancelled() {
        metrics.rejected(Rejection::ShuttingDown);
        refuse(&mut stream, SqlState::CannotConnectNow, "the proxy is shutting down").await;
        return None;
    }
    // The client proves who it is before anything is asked of a node (when the route lists
    // its users; else the node authenticates it, through the relay).
    let first = admit(shared, &mut stream, &params).await?;
    let login = match &first.users {
        Some(users) => {
            let authenticated = auth::authenticate_client(
                &mut stream,
                &params.user,
                users.get(&params.user),
                &shared.decoy_secret,
                end_point.as_deref(),
                shared.limits.handshake_timeout(),
            )
            .await;
            match authenticated {
                Ok(login) => Some(login),
                Err(e) => {
                    refuse_auth(&mut stream, e, shared, peer).await;
                    return None;
                }
            }
        }
        None => None,
    };
    drop(first);
    if pooled {
        let Some(login) = login else {
            metrics.rejected(Rejection::NotPoolable);
            let message = format!(
                "database \"{}\" cannot be pooled: the proxy does not have its users' verifiers",
                params.database
            );
            refuse(&mut stream, SqlState::InvalidAuthorization, &message).await;
            return None;
        };
        let settings = match crate::session_sql::settings(&crate::protocol::startup_pairs(&packet))
        {
            Ok(settings) => settings,
            Err(reason) => {
                metrics.rejected(Rejection::NotPoolable);
                let message = format!("this connection cannot be pooled: {reason}");
                refuse(&mut stream, SqlState::FeatureNotSupported, &message).await;
                return None;
            }
        };
        return Some(Opened::Pooled(crate::pooled::PooledClient {
            stream,
            database: params.database,
            user: params.user,
            login,
            startup: settings.clone(),
            settings,
        }));
    }
    let hold_deadline = tokio::time::Instant::now() + shared.limits.hold_timeout();
    let mut attempts = 0;
    while attempts < ROUTE_ATTEMPTS {
        let mut changes = shared.routes.subscribe();
        let starting = shared.routes.starting(&params.database);
        let route = admit(shared, &mut stream, &params).await?;
        if route.hold {
            // A planned switchover: wait for the table that releases this database.
            drop(starting);
            if tokio::time::timeout_at(hold_deadline, changes.changed()).await.is_err() {
                metrics.rejected(Rejection::HoldTimeout);
                let message = format!(
                    "database \"{}\" is switching to a new primary; retry shortly",
                    params.database
                );
                refuse(&mut stream, SqlState::CannotConnectNow, &message).await;
                return None;
            }
            continue;
        }
        attempts += 1;
        // A primary whose host died answers nothing: the connection would take the whole
        // connect timeout. A failover's new table ends that wait and starts again on it.
        let connected = tokio::select! {
            connected = connect(&route, shared) => connected,
            () = route.moved.cancelled() => continue,
        };
        let (mut node, node_addr) = match connected {
            Ok(node) => node,
            Err(NodeConnectError::Unreachable(_))
                if attempts < ROUTE_ATTEMPTS
                    && tokio::time::timeout_at(hold_deadline, route.moved.cancelled())
                        .await
                        .is_ok() =>
            {
                // The primary is down and a failover moved it meanwhile: the new one, at once
                // (the client waits at most the hold bound, as in a switchover).
                continue;
            }
            Err(e) => {
                let message = match e {
                    NodeConnectError::Unreachable(_) => {
                        metrics.rejected(Rejection::NoPrimary);
                        warn!(node = %route.primary, error = %e, "primary unreachable");
                        format!(
                            "no primary is reachable for database \"{}\" right now; retry shortly",
                            params.database
                        )
                    }
                    NodeConnectError::NoTls | NodeConnectError::Tls(_) => {
                        metrics.rejected(Rejection::NodeTls);
                        error!(node = %route.primary, error = %e, "no verified TLS connection to the node");
                        format!(
                            "the proxy could not open a verified TLS connection to the database node of \"{}\"",
                            params.database
                        )
                    }
                };
                refuse(&mut stream, SqlState::CannotConnectNow, &message).await;
                return None;
            }
        };
        if route.moved.is_cancelled() {
            continue;
        }
        span.record("node", route.primary.as_str());
        let deadlines = auth::Deadlines {
            client: shared.limits.handshake_timeout(),
            node: shared.limits.backend_auth_timeout(),
        };
        let tls = route.node_tls.clone().map(|c| (c, host_of(&route.primary).into()));
        let relayed = auth::relay(
            &mut stream,
            &mut node,
            NodeAddress { addr: node_addr, tls },
            &packet,
            login.as_ref(),
            &shared.cancels,
            deadlines,
        );
        return match relayed.await {
            Ok(auth) => {
                metrics.accepted.inc();
                let session =
                    Session { client: stream, node, route, database: params.database, auth };
                Some(Opened::Session(session))
            }
            Err(AuthError::Refused) => None,
            Err(e) => {
                debug!(error = %e, "authentication relay failed");
                match e {
                    AuthError::NodeProtocol | AuthError::Node(_) => {
                        let message = "lost connection to the database node during authentication";
                        refuse(&mut stream, SqlState::CannotConnectNow, message).await;
                    }
                    AuthError::NodeTimeout => {
                        metrics.rejected(Rejection::NodeTimeout);
                        warn!(node = %route.primary, "node did not answer the session's start in time");
                        let message = format!(
                            "the database node of \"{}\" did not answer in time; retry shortly",
                            params.database
                        );
                        refuse(&mut stream, SqlState::CannotConnectNow, &message).await;
                    }
                    AuthError::ClientTimeout => metrics.rejected(Rejection::HandshakeTimeout),
                    AuthError::ClientProtocol => {
                        metrics.rejected(Rejection::Malformed);
                        let message = "invalid authentication message from the client";
                        refuse(&mut stream, SqlState::ProtocolViolation, message).await;
                    }
                    AuthError::NodeScram(_)
                    | AuthError::NodeMethod(_)
                    | AuthError::NodeRefused { .. } => {
                        metrics.rejected(Rejection::NodeLogin);
                        warn!(node = %route.primary, error = %e, "could not log in to the node");
                        let message = format!(
                            "the proxy could not log in to the database node of \"{}\" as \"{}\": {e}",
                            params.database, params.user
                        );
                        refuse(&mut stream, SqlState::CannotConnectNow, &message).await;
                    }
                    // The client is gone; the node already answered (Refused is handled above);
                    // the client's own exchange ended before the node was contacted.
                    AuthError::Client(_)
                    | AuthError::Refused
                    | AuthError::BadPassword(_)
                    | AuthError::NotScram(_)
                    | AuthError::ClientScram(_) => {}
                }
                None
            }
        };
    }
    metrics.rejected(Rejection::NoPrimary);
    let message = format!("the primary of database \"{}\" is moving; retry", params.database);
    refuse(&mut stream, SqlState::CannotConnectNow, &message).await;
    None
}

/// The current route of `params.database` if this client may use it; else the client is told
/// why (and `None`).
async fn admit(
    shared: &Shared,
    stream: &mut crate::stream::ClientStream,
    params: &crate::protocol::StartupParams,
) -> Option<Arc<Route>> {
    let (reason, state, message) = match shared.routes.load().route(&params.database) {
        None => (
            Rejection::UnknownDatabase,
            SqlState::UnknownDatabase,
            format!("database \"{}\" does not exist", params.database),
        ),
        Some(route) if route.force_tls && !stream.is_tls() => (
            Rejection::TlsRequired,
            SqlState::InvalidAuthorization,
            format!(
                "TLS is required for database \"{}\": connect with sslmode=require",
                params.database
            ),
        ),
        Some(route) => return Some(route),
    };
    shared.metrics.rejected(reason);
    refuse(stream, state, &message).await;
    None
}

/// Tells a client why the proxy did not authenticate it.
async fn refuse_auth(
    stream: &mut crate::stream::ClientStream,
    e: AuthError,
    shared: &Shared,
    peer: IpAddr,
) {
    let metrics = &shared.metrics;
    debug!(error = %e, "client authentication failed");
    let (state, message) = match e {
        AuthError::BadPassword(user) => {
            metrics.rejected(Rejection::BadPassword);
            // Repeated failures from one address are answered ever later (admission.rs).
            tokio::time::sleep(shared.admission.login_failed(peer)).await;
            (
                SqlState::InvalidPassword,
                format!("password authentication failed for user \"{user}\""),
            )
        }
        AuthError::NotScram(user) => {
            metrics.rejected(Rejection::BadPassword);
            let message = format!(
                "user \"{user}\" has a password the proxy cannot check: set it again with \
                 password_encryption = 'scram-sha-256' (MD5 passwords are not supported)"
            );
            (SqlState::InvalidAuthorization, message)
        }
        AuthError::ClientScram(e) => {
            metrics.rejected(Rejection::Malformed);
            (SqlState::ProtocolViolation, format!("SCRAM authentication failed: {e}"))
        }
        AuthError::ClientProtocol => {
            metrics.rejected(Rejection::Malformed);
            (SqlState::ProtocolViolation, "invalid authentication message from the client".into())
        }
        AuthError::ClientTimeout => {
            metrics.rejected(Rejection::HandshakeTimeout);
            return;
        }
        _ => {
            metrics.rejected(Rejection::ClientGone);
            return;
        }
    };
    refuse(stream, state, &message).await;
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum NodeConnectError {
    #[error("{0}")]
    Unreachable(std::io::Error),
    #[error("the node does not accept TLS")]
    NoTls,
    #[error("TLS with the node failed: {0}")]
    Tls(std::io::Error),
}

/// Connects to the route's primary, over TLS verified against the nodes' CA when the route
/// says so (the node's certificate must name the address connected to). The whole of it is
/// bounded by the backend connect timeout. Also returns the node's address (for cancels).
pub(crate) async fn connect(
    route: &Route,
    shared: &Shared,
) -> Result<(NodeStream, SocketAddr), NodeConnectError> {
    let start = Instant::now();
    let limit = shared.limits.backend_connect_timeout();
    let timed_out = || std::io::Error::from(std::io::ErrorKind::TimedOut);
    let tcp = tokio::time::timeout(limit, TcpStream::connect(&route.primary))
        .await
        .map_err(|_| NodeConnectError::Unreachable(timed_out()))?
        .map_err(NodeConnectError::Unreachable)?;
    tcp.set_nodelay(true).map_err(NodeConnectError::Unreachable)?;
    let addr = tcp.peer_addr().map_err(NodeConnectError::Unreachable)?;
    let node = match &route.node_tls {
        None => NodeStream::Plain(tcp),
        Some(connector) => {
            let handshake = start_tls(tcp, connector, host_of(&route.primary));
            let tls = tokio::time::timeout(limit.saturating_sub(start.elapsed()), handshake)
                .await
                .map_err(|_| NodeConnectError::Tls(timed_out()))??;
            NodeStream::Tls(Box::new(tls))
        }
    };
    shared.metrics.backend_connect_seconds.observe(start.elapsed().as_secs_f64());
    Ok((node, addr))
}

/// SSLRequest, then a TLS handshake that verifies the node's certificate for `host`.
async fn start_tls(
    mut tcp: TcpStream,
    connector: &tokio_rustls::TlsConnector,
    host: &str,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, NodeConnectError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tcp.write_all(&crate::protocol::ssl_request()).await.map_err(NodeConnectError::Unreachable)?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.map_err(NodeConnectError::Unreachable)?;
    if answer[0] != b'S' {
        return Err(NodeConnectError::NoTls);
    }
    let name = rustls_pki_types::ServerName::try_from(host.to_owned()).map_err(|e| {
        NodeConnectError::Tls(std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
    })?;
    connector.connect(name, tcp).await.map_err(NodeConnectError::Tls)
}

/// The host of `host:port` (IPv6 without its brackets).
pub(crate) fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host)
}

async fn run_session(session: Session, shared: &Shared, span: Span) {
    let Session { mut client, mut node, route, database, mut auth } = session;
    let node_prefix = std::mem::take(&mut auth.leftover);
    let stop = async {
        tokio::select! {
            () = route.moved.cancelled() => Termination::PrimaryMoved,
            () = shared.terminate.cancelled() => Termination::Shutdown,
        }
    };
    let counters =
        (shared.metrics.bytes_from_clients.clone(), shared.metrics.bytes_to_clients.clone());
    let end =
        passthrough::relay(&mut client, &mut node, stop, STOP_DRAIN, node_prefix, counters).await;
    drop(auth);
    finish_session(end, client, node, database, shared).instrument(span).await;
}

/// Logs how the relay ended and, when the proxy ended it, tells the client why.
async fn finish_session(
    end: RelayEnd<Termination>,
    mut client: crate::stream::ClientStream,
    node: NodeStream,
    database: String,
    shared: &Shared,
) {
    match end {
        RelayEnd::ClientClosed | RelayEnd::NodeClosed => debug!(?end, "session ended"),
        RelayEnd::ClientError(e) => debug!(error = %e, "client connection failed"),
        RelayEnd::NodeError(e) => info!(error = %e, "node connection failed"),
        RelayEnd::Stopped { reason: why, at_boundary } => {
            shared.metrics.terminated(why);
            let message = match why {
                Termination::PrimaryMoved if shared.routes.load().fenced => format!(
                    "terminating connection because the proxy lost touch with etcd and cannot \
                     vouch for the primary of database \"{database}\"; reconnect"
                ),
                Termination::PrimaryMoved => format!(
                    "terminating connection because the primary of database \"{database}\" moved; \
                     reconnect to reach the new primary"
                ),
                Termination::Shutdown => {
                    "terminating connection because the proxy is shutting down".to_owned()
                }
            };
            info!(reason = ?why, at_boundary, "ending session");
            drop(node);
            if at_boundary {
                refuse(&mut client, SqlState::AdminShutdown, &message).await;
            }
        }
    }
}
