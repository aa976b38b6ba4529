//! One client connection from accept to close: handshake, routing, authentication through the
//! node, then the byte pump until either side ends or the proxy ends the session.

use std::net::IpAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::watch;
use tracing::{debug, error, info, warn, Instrument, Span};

use crate::admission::Starting;
use crate::auth::{self, Login};
use crate::cancel;
use crate::cancel::NodeAddress;
use crate::error::{refuse, Ended, Refusal};
use crate::handshake::{self, Handshake, HandshakeError, Startup};
use crate::metrics::{CancelResult, ConnectionGauge, Rejection, Termination};
use crate::node::{self, NodeConnectError};
use crate::passthrough::{self, RelayEnd};
use crate::pooling::PooledSession;
use crate::protocol::StartupParams;
use crate::routes::Route;
use crate::stream::{ClientStream, NodeStream};
use crate::tenants::Seat;
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
    // The client's seat in its database (`tenants.rs`), given back when it leaves.
    let Some((opened, _seat)) = opened else { return };
    match opened {
        Opened::Session(session) => run_session(session, &shared, span).await,
        Opened::Pooled(client) => {
            let started = PooledSession::start(client, &shared).instrument(span.clone()).await;
            if let Some(session) = started {
                shared.metrics.accepted.inc();
                session.run().await;
            }
        }
    }
}

/// A client past its authentication: a session of its own, or a pooled client.
enum Opened {
    Session(Session),
    Pooled(crate::pooling::PooledClient),
}

/// Handshake, routing and authentication. The handshake timeout bounds what the client must
/// send (TLS handshake and startup packet here, each authentication message in `auth`); the
/// node's part has bounds of its own, and a node too slow ends in an ErrorResponse, not a close.
async fn open(
    tcp: TcpStream,
    shared: &Shared,
    peer: IpAddr,
    pooled: bool,
) -> Option<(Opened, Seat)> {
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

/// The phases after the handshake: the route, the client's authentication, then a pooled
/// client or a session of its own (the node connected and logged in to). A refused client is
/// told why (`error.rs`).
async fn start_session(
    startup: Startup,
    shared: &Shared,
    peer: IpAddr,
    over_limit: bool,
    pooled: bool,
) -> Option<(Opened, Seat)> {
    let Startup { mut stream, mut params, packet, end_point, server_name } = startup;
    let started = async {
        params.database = database_named(&params.database, server_name.as_deref(), shared)?;
        let span = Span::current();
        span.record("user", params.user.as_str());
        span.record("database", params.database.as_str());
        if over_limit {
            return Err(Refusal::TooManyClients);
        }
        if shared.draining.is_cancelled() {
            return Err(Refusal::ShuttingDown);
        }
        // Subscribed before the route is read: a table that changes it shows there.
        let changes = shared.routes.subscribe();
        let route = admit(shared, &stream, &params.database)?;
        // Before any authentication work: a refused client costs the node nothing, and learns
        // it late enough not to come back at once (`tenants.rs`).
        let seat = match shared.tenants.enter(&params.database, route.limits) {
            Ok(seat) => seat,
            Err(full) => {
                tokio::time::sleep(crate::tenants::REFUSAL_DELAY).await;
                return Err(Refusal::DatabaseFull(params.database.clone(), full));
            }
        };
        tokio::time::sleep(seat.wait).await;
        let login =
            authenticate(&mut stream, &route, &params, end_point.as_deref(), shared).await?;
        if pooled {
            let settings = pooled_settings(&params.database, &packet, login)?;
            return Ok((Started::Pooled(settings), seat));
        }
        let node = NodeLogin { params: &params, packet: &packet, login: login.as_ref() };
        let session = node.open(&mut stream, (route, changes), shared).await?;
        Ok((Started::Session(session), seat))
    };
    match started.await {
        Ok((Started::Session((node, route, auth)), seat)) => {
            shared.metrics.accepted.inc();
            let database = params.database;
            Some((Opened::Session(Session { client: stream, node, route, database, auth }), seat))
        }
        Ok((Started::Pooled((login, settings)), seat)) => {
            let client = crate::pooling::PooledClient {
                stream,
                database: params.database,
                user: params.user,
                login,
                startup: settings.clone(),
                settings,
            };
            Some((Opened::Pooled(client), seat))
        }
        Err(refusal) => {
            if matches!(refusal, Refusal::BadPassword(_)) {
                // Repeated failures from one address are answered ever later (admission.rs).
                tokio::time::sleep(shared.admission.login_failed(peer)).await;
            }
            refuse(&mut stream, &shared.metrics, refusal).await;
            None
        }
    }
}

/// What a client past its authentication goes on to.
enum Started {
    /// A session of its own: the node it is logged in to, the route, the relay's state.
    Session((NodeStream, Arc<Route>, auth::Authenticated)),
    /// The pool: what the proxy logs in to nodes with, and the startup packet's settings.
    Pooled((Login, Vec<(String, String)>)),
}

/// The database a client asked for: a TLS server name `<database id>.<domain>` names it (it
/// replaces the startup packet's for routing; the node still gets the packet as sent), else the
/// startup packet does.
fn database_named(
    in_packet: &str,
    server_name: Option<&str>,
    shared: &Shared,
) -> Result<String, Refusal> {
    let by_id = server_name.zip(shared.domain.as_deref()).and_then(|(name, domain)| {
        name.strip_suffix(domain)?.strip_suffix('.').filter(|id| !id.is_empty())
    });
    let Some(id) = by_id else { return Ok(in_packet.to_owned()) };
    match shared.routes.load().route_by_id(id) {
        Some((name, _)) => Ok(name),
        None => Err(Refusal::UnknownId(id.to_owned())),
    }
}

/// The client proves who it is before anything is asked of a node, when the route lists its
/// users (`Some` login to the node). Else the node authenticates it, through the relay.
async fn authenticate(
    stream: &mut ClientStream,
    route: &Route,
    params: &StartupParams,
    end_point: Option<&[u8]>,
    shared: &Shared,
) -> Result<Option<Login>, Refusal> {
    let Some(users) = &route.users else { return Ok(None) };
    let authenticated = auth::authenticate_client(
        stream,
        &params.user,
        users.get(&params.user),
        &shared.decoy_secret,
        end_point,
        shared.limits.handshake_timeout(),
    )
    .await;
    match authenticated {
        Ok(login) => Ok(Some(login)),
        Err(e) => {
            debug!(error = %e, "client authentication failed");
            Err(Refusal::of_auth(e, &params.database, &params.user))
        }
    }
}

/// What a client of the pool address logs in to nodes with, and its startup packet's settings.
fn pooled_settings(
    database: &str,
    packet: &[u8],
    login: Option<Login>,
) -> Result<(Login, Vec<(String, String)>), Refusal> {
    let login = login.ok_or_else(|| Refusal::NoVerifiers(database.to_owned()))?;
    let settings = crate::pooling::session_sql::settings(&crate::protocol::startup_pairs(packet))
        .map_err(Refusal::NotPoolable)?;
    Ok((login, settings))
}

/// A session's login to its database's primary: the client's startup packet and, when the
/// proxy authenticated the client, what it logs in with.
struct NodeLogin<'a> {
    params: &'a StartupParams,
    packet: &'a [u8],
    login: Option<&'a Login>,
}

impl NodeLogin<'_> {
    /// Connects to the primary and logs in, waiting out a switchover's hold and starting again
    /// on a new primary when the route moves meanwhile. `first` is the route already read (with
    /// the table changes since it was).
    async fn open(
        &self,
        stream: &mut ClientStream,
        first: (Arc<Route>, watch::Receiver<u64>),
        shared: &Shared,
    ) -> Result<(NodeStream, Arc<Route>, auth::Authenticated), Refusal> {
        let database = &self.params.database;
        let hold_deadline = tokio::time::Instant::now() + shared.limits.hold_timeout();
        let mut first = Some(first);
        let mut attempts = 0;
        while attempts < ROUTE_ATTEMPTS {
            // Counted as starting before the route is read: a hold applied from now on waits
            // for this session.
            let starting = shared.routes.starting(database);
            let (route, mut changes) = match first.take() {
                Some((route, changes)) if !changes.has_changed().unwrap_or(true) => {
                    (route, changes)
                }
                _ => {
                    let changes = shared.routes.subscribe();
                    (admit(shared, stream, database)?, changes)
                }
            };
            if route.hold {
                // A planned switchover: wait for the table that releases this database.
                drop(starting);
                if tokio::time::timeout_at(hold_deadline, changes.changed()).await.is_err() {
                    return Err(Refusal::HoldTimeout(database.clone()));
                }
                continue;
            }
            attempts += 1;
            // A primary whose host died answers nothing: the connection would take the whole
            // connect timeout. A failover's new table ends that wait and starts again on it.
            let limit = shared.limits.backend_connect_timeout();
            let connected = tokio::select! {
                connected = node::connect(&route, limit, &shared.metrics) => connected,
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
                    // The primary is down and a failover moved it meanwhile: the new one, at
                    // once (the client waits at most the hold bound, as in a switchover).
                    continue;
                }
                Err(e @ NodeConnectError::Unreachable(_)) => {
                    warn!(node = %route.primary, error = %e, "primary unreachable");
                    return Err(Refusal::NoPrimary(database.clone()));
                }
                Err(e) => {
                    error!(node = %route.primary, error = %e, "no verified TLS connection to the node");
                    return Err(Refusal::NodeTls(database.clone()));
                }
            };
            if route.moved.is_cancelled() {
                continue;
            }
            Span::current().record("node", route.primary.as_str());
            let deadlines = auth::Deadlines {
                client: shared.limits.handshake_timeout(),
                node: shared.limits.backend_auth_timeout(),
            };
            let tls = route.node_tls.clone().map(|c| (c, node::host_of(&route.primary).into()));
            let address = NodeAddress { addr: node_addr, tls };
            let relayed = auth::relay(
                stream,
                &mut node,
                address,
                self.packet,
                self.login,
                &shared.cancels,
                deadlines,
            );
            return match relayed.await {
                Ok(auth) => Ok((node, route, auth)),
                Err(e) => {
                    let refusal = Refusal::of_auth(e, database, &self.params.user);
                    if refusal.node_failed() {
                        warn!(node = %route.primary, error = %refusal, "the session's start on the node failed");
                    }
                    Err(refusal)
                }
            };
        }
        Err(Refusal::PrimaryMoving(database.clone()))
    }
}

/// The current route of `database` if this client may use it.
fn admit(shared: &Shared, stream: &ClientStream, database: &str) -> Result<Arc<Route>, Refusal> {
    match shared.routes.load().route(database) {
        None => Err(Refusal::UnknownDatabase(database.to_owned())),
        Some(route) if route.force_tls && !stream.is_tls() => {
            Err(Refusal::TlsRequired(database.to_owned()))
        }
        Some(route) => Ok(route),
    }
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
    mut client: ClientStream,
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
            info!(reason = ?why, at_boundary, "ending session");
            drop(node);
            if at_boundary {
                let ended = match why {
                    Termination::PrimaryMoved if shared.routes.load().fenced => {
                        Ended::Fenced(database)
                    }
                    Termination::PrimaryMoved => Ended::PrimaryMoved(database),
                    Termination::Shutdown => Ended::Shutdown,
                };
                crate::error::close_with(&mut client, &ended).await;
            }
        }
    }
}
