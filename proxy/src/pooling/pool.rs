//! Transaction pooling's server side: per database, at most `pool_size` server connections to
//! the primary (a semaphore whose permits the connections carry), the idle ones kept for reuse
//! by clients of the same user. A server connection is opened and logged in with the ClientKey
//! a client of that user proved (`auth::Login`), so the proxy never holds a password.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::auth::{self, AuthError, Login};
use crate::cancel::{CancelKey, CancelTarget, NodeAddress};
use crate::error::UserFacing;
use crate::node::{self, NodeConnectError};
use crate::protocol::SqlState;
use crate::routes::Route;
use crate::stream::NodeStream;
use crate::Shared;

/// `ParameterStatus` names and values.
pub type Params = Vec<(String, String)>;

/// Every database's pool.
#[derive(Default)]
pub struct Pools {
    by_database: Mutex<HashMap<String, Arc<DbPool>>>,
}

impl Pools {
    /// Closes, in every pool, the connections idle for longer than `timeout`.
    pub fn close_idle(&self, timeout: Duration) {
        let pools: Vec<Arc<DbPool>> =
            self.by_database.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        for pool in pools {
            pool.close_idle(timeout);
        }
    }

    /// The pool of `database`, sized to `size` server connections.
    pub fn get(&self, database: &str, size: usize) -> Arc<DbPool> {
        let pool = {
            let mut pools = self.by_database.lock().unwrap_or_else(|e| e.into_inner());
            Arc::clone(pools.entry(database.to_owned()).or_insert_with(|| {
                Arc::new(DbPool {
                    permits: Arc::new(Semaphore::new(size)),
                    size: Mutex::new(size),
                    idle: Mutex::default(),
                    waiting: AtomicUsize::new(0),
                    available: tokio::sync::Notify::new(),
                    waiters: Mutex::default(),
                    login_params: Mutex::default(),
                    open: AtomicUsize::new(0),
                    owed: AtomicUsize::new(0),
                })
            }))
        };
        pool.resize(size);
        pool
    }
}

/// A transaction waiting for a connection of `user`.
struct Waiter {
    user: String,
    /// The thread the waiting session runs on.
    home: usize,
    /// How often a later waiter on the releasing connection's thread went first.
    passed_over: u32,
    handoff: tokio::sync::oneshot::Sender<ServerConn>,
}

/// How often a waiter may be passed over for a later one on the thread of the connection that
/// came back, before it gets the next one whatever its thread.
const MAX_PASSED_OVER: u32 = 2;

/// How far behind the oldest waiter a release looks for one on the connection's thread.
const AFFINITY_WINDOW: usize = 8;

/// The calling thread, as a small number: sessions run on one single-threaded runtime per
/// thread ([`crate::Workers`]), and a socket's readiness is reported by the reactor of the
/// thread that registered it. A server connection used by a session on another thread wakes
/// that thread for every message (a futex wake and a context switch); the pool hands
/// connections to sessions of their own thread where it can.
fn home() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static HOME: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    HOME.with(|home| *home)
}

/// What a transaction asks a pool for: a connection to `route`'s primary for `user` of
/// `database`, opened (if need be) with `login`.
#[derive(Clone, Copy)]
pub struct Want<'a> {
    pub database: &'a str,
    pub route: &'a Route,
    pub user: &'a str,
    pub login: &'a Login,
    /// Whether to wait for a busy pool; if not, a busy pool answers `Busy` at once.
    pub queue: bool,
}

/// One database's server connections.
pub struct DbPool {
    permits: Arc<Semaphore>,
    size: Mutex<usize>,
    idle: Mutex<Vec<ServerConn>>,
    /// Transactions waiting for a server connection.
    pub waiting: AtomicUsize,
    /// Told when a connection closes (its permit is free).
    available: tokio::sync::Notify,
    /// Transactions waiting, oldest first: a connection coming back goes to the oldest one of
    /// its user, not to whoever asks next.
    waiters: Mutex<std::collections::VecDeque<Waiter>>,
    /// The parameters a fresh connection reported at login, by primary and user.
    login_params: Mutex<HashMap<(String, String), Params>>,
    /// Server connections open.
    pub open: AtomicUsize,
    /// Permits a shrink still has to take back from connections open beyond the new size.
    owed: AtomicUsize,
}

/// Why a transaction got no server connection.
#[derive(Debug, thiserror::Error)]
pub enum AcquireError {
    #[error("{waiting} transactions are already waiting for the {size} server connections of database \"{database}\"")]
    QueueFull { database: String, waiting: usize, size: usize },
    #[error("all {size} server connections of database \"{database}\" stayed busy for {} s; retry, or use fewer concurrent transactions", waited.as_secs_f64())]
    Timeout { database: String, size: usize, waited: Duration },
    #[error("every server connection of database \"{database}\" is busy")]
    Busy { database: String },
    #[error("cannot reach the primary of database \"{database}\": {source}")]
    Connect { database: String, source: NodeConnectError },
    #[error("cannot log in to the primary of database \"{database}\": {source}")]
    Login { database: String, source: AuthError },
}

impl UserFacing for AcquireError {
    fn sqlstate(&self) -> SqlState {
        match self {
            Self::QueueFull { .. } | Self::Timeout { .. } | Self::Busy { .. } => {
                SqlState::TooManyConnections
            }
            Self::Connect { .. } | Self::Login { .. } => SqlState::CannotConnectNow,
        }
    }

    /// The node's connection errors stay in the log; a node's own refusal is the client's to
    /// read.
    fn client_message(&self) -> String {
        match self {
            Self::Connect { database, .. } => {
                format!("cannot reach the primary of database \"{database}\"")
            }
            Self::Login { database, source: AuthError::NodeRefused { message, .. } } => {
                format!("cannot log in to the primary of database \"{database}\": {message}")
            }
            Self::Login { database, .. } => {
                format!("cannot log in to the primary of database \"{database}\"")
            }
            other => other.to_string(),
        }
    }
}

/// A server connection, logged in, with the permit it holds in its pool.
pub struct ServerConn {
    pub stream: NodeStream,
    pub user: String,
    /// The primary it is connected to, and that route's token (cancelled when it stops being
    /// the primary).
    pub primary: String,
    pub moved: CancellationToken,
    /// Where a cancel of its backend goes.
    pub cancel: Option<CancelTarget>,
    /// The node's `ParameterStatus` values at login, then as changed.
    pub params: Vec<(String, String)>,
    /// Session parameters set on it for clients (`SET`), by name.
    pub applied: HashMap<String, String>,
    /// The statements prepared on it for clients.
    pub statements: super::statements::ServerStatements,
    /// The thread whose reactor its socket is registered with ([`home`]).
    home: usize,
    /// When it last went idle.
    idle_since: std::time::Instant,
    _slot: Slot,
}

/// A server connection's place in its pool: counted open while it lives; its permit goes back
/// when it closes, unless the pool shrank and still owes permits (then it is dropped).
struct Slot {
    pool: Arc<DbPool>,
    gauge: prometheus::IntGauge,
    permit: Option<OwnedSemaphorePermit>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.pool.open.fetch_sub(1, Ordering::Relaxed);
        self.gauge.dec();
        let owed =
            self.pool.owed.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        match (owed, self.permit.take()) {
            (Ok(_), Some(permit)) => permit.forget(),
            // Back to the pool: a waiter finds it at its next wake-up.
            (_, permit) => {
                drop(permit);
                self.pool.available.notify_one();
            }
        }
    }
}

impl DbPool {
    /// Sets the pool's size. A smaller one holds at once: the free surplus permits go now, and
    /// the connections beyond the new size give their permits up as they close (a transaction
    /// asking meanwhile waits, rather than opening a connection the node's new, lower limit
    /// may refuse).
    fn resize(&self, size: usize) {
        let mut current = self.size.lock().unwrap_or_else(|e| e.into_inner());
        if size > *current {
            let more = size - *current;
            let owed = self
                .owed
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| Some(n.saturating_sub(more)))
                .unwrap_or(0);
            self.permits.add_permits(more - owed.min(more));
        } else if size < *current {
            let surplus = *current - size;
            let owed = surplus - self.permits.forget_permits(surplus);
            self.owed.fetch_add(owed, Ordering::AcqRel);
            // Idle connections beyond the new size go now.
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            let keep = idle.len().min(size);
            idle.truncate(keep);
        }
        *current = size;
    }

    pub fn size(&self) -> usize {
        *self.size.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An idle connection of `user` to `primary`, one of the calling thread's if there is;
    /// connections to a former primary are dropped.
    fn take_idle(&self, user: &str, primary: &str) -> Option<ServerConn> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.retain(|c| !c.moved.is_cancelled());
        let fits = |c: &ServerConn| c.user == user && c.primary == primary;
        let here = home();
        let at = (idle.iter().rposition(|c| fits(c) && c.home == here))
            .or_else(|| idle.iter().rposition(fits))?;
        Some(idle.swap_remove(at))
    }

    /// Drops the idle connections to `primary` (one of them turned out dead: the node
    /// restarted, so the others are too).
    pub fn drop_idle_to(&self, primary: &str) {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).retain(|c| c.primary != primary);
    }

    /// Gives a clean connection (idle, no transaction, no session state) back.
    pub fn release(&self, mut conn: ServerConn) {
        if conn.moved.is_cancelled() {
            return;
        }
        // The oldest waiter of the same user gets it (one that gave up is skipped), or one
        // shortly behind it on the connection's thread.
        loop {
            let waiter = {
                let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
                let waiting = self.waiting.load(Ordering::Relaxed);
                next_waiter(&mut waiters, &conn.user, conn.home, waiting)
            };
            let Some(waiter) = waiter else { break };
            match waiter.handoff.send(conn) {
                Ok(()) => return,
                Err(back) => conn = back,
            }
        }
        conn.idle_since = std::time::Instant::now();
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).push(conn);
        // A waiter of another user may take this connection's place.
        self.available.notify_one();
    }

    /// Closes the connections idle for longer than `timeout` (PostgreSQL gets its backends back
    /// between bursts).
    pub fn close_idle(&self, timeout: Duration) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.retain(|c| c.idle_since.elapsed() < timeout && !c.moved.is_cancelled());
    }

    /// The parameters a fresh connection of `user` to `primary` reported at login, if one did.
    pub fn login_params(&self, primary: &str, user: &str) -> Option<Vec<(String, String)>> {
        let cached = self.login_params.lock().unwrap_or_else(|e| e.into_inner());
        cached.get(&(primary.to_owned(), user.to_owned())).cloned()
    }

    /// Frees a permit held by an idle connection of another user, if any.
    fn evict_other(&self, user: &str) -> bool {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        match idle.iter().position(|c| c.user != user) {
            Some(at) => {
                idle.swap_remove(at);
                true
            }
            None => false,
        }
    }

    /// A connection for a transaction of `user` on `route`'s primary: an idle one, else a new
    /// one while the pool has room, else the first to come back (waiting at most the pool wait
    /// timeout, behind at most `pool_max_waiting` others).
    pub async fn acquire(
        self: &Arc<Self>,
        shared: &Shared,
        want: Want<'_>,
    ) -> Result<ServerConn, AcquireError> {
        let Want { database, route, user, .. } = want;
        let limit = shared.limits.pool_wait_timeout();
        let deadline = tokio::time::Instant::now() + limit;
        let mut waiting: Option<(Waiting<'_>, std::time::Instant)> = None;
        loop {
            // Registered before looking, so that a release in between is not missed.
            let available = self.available.notified();
            let waited = |waiting: &Option<(Waiting<'_>, std::time::Instant)>| {
                if let Some((_, since)) = waiting {
                    shared.metrics.pool_wait_seconds.observe(since.elapsed().as_secs_f64());
                }
            };
            if let Some(conn) = self.take_idle(user, &route.primary) {
                waited(&waiting);
                return Ok(conn);
            }
            if let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() {
                waited(&waiting);
                drop(waiting);
                return self.open_conn(shared, want, permit).await;
            }
            // An idle connection of another user gives its place up.
            if self.evict_other(user) {
                continue;
            }
            if !want.queue {
                return Err(AcquireError::Busy { database: database.to_owned() });
            }
            if waiting.is_none() {
                let size = self.size();
                let already = self.waiting.fetch_add(1, Ordering::Relaxed);
                shared.metrics.pool_waiting.inc();
                let guard = Waiting(&self.waiting, shared.metrics.pool_waiting.clone());
                if already >= shared.limits.pool_max_waiting {
                    return Err(AcquireError::QueueFull {
                        database: database.to_owned(),
                        waiting: already,
                        size,
                    });
                }
                waiting = Some((guard, std::time::Instant::now()));
            }
            let (handoff, handed) = tokio::sync::oneshot::channel();
            self.waiters.lock().unwrap_or_else(|e| e.into_inner()).push_back(Waiter {
                user: user.to_owned(),
                home: home(),
                passed_over: 0,
                handoff,
            });
            tokio::select! {
                conn = handed => {
                    if let Ok(conn) = conn {
                        waited(&waiting);
                        return Ok(conn);
                    }
                }
                // A connection closed (its permit is free) or one of another user is idle.
                () = available => {}
                () = tokio::time::sleep_until(deadline) => {
                    waited(&waiting);
                    return Err(AcquireError::Timeout {
                        database: database.to_owned(),
                        size: self.size(),
                        waited: limit,
                    });
                }
            }
        }
    }

    async fn open_conn(
        self: &Arc<Self>,
        shared: &Shared,
        want: Want<'_>,
        permit: OwnedSemaphorePermit,
    ) -> Result<ServerConn, AcquireError> {
        let Want { database, route, user, login, .. } = want;
        let limit = shared.limits.backend_connect_timeout();
        let (mut stream, addr) = node::connect(route, limit, &shared.metrics)
            .await
            .map_err(|source| AcquireError::Connect { database: database.to_owned(), source })?;
        let startup = crate::protocol::startup_message(&[("user", user), ("database", database)]);
        let logged_in =
            auth::log_in_node(&mut stream, &startup, login, shared.limits.backend_auth_timeout())
                .await
                .map_err(|source| AcquireError::Login { database: database.to_owned(), source })?;
        let tls = route.node_tls.clone().map(|c| (c, node::host_of(&route.primary).into()));
        let cancel = logged_in
            .key
            .map(|key: CancelKey| CancelTarget { node: NodeAddress { addr, tls }, key });
        self.open.fetch_add(1, Ordering::Relaxed);
        shared.metrics.pool_server_connections.inc();
        self.login_params
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((route.primary.clone(), user.to_owned()), logged_in.params.clone());
        Ok(ServerConn {
            stream,
            user: user.to_owned(),
            primary: route.primary.clone(),
            moved: route.moved.clone(),
            cancel,
            params: logged_in.params,
            applied: HashMap::new(),
            statements: Default::default(),
            home: home(),
            idle_since: std::time::Instant::now(),
            _slot: Slot {
                pool: Arc::clone(self),
                gauge: shared.metrics.pool_server_connections.clone(),
                permit: Some(permit),
            },
        })
    }
}

/// Takes the waiter of `user` a connection of thread `home` goes to out of the queue: the
/// oldest live one, unless one of the next few of `user` runs on `home` and the oldest was
/// passed over fewer than [`MAX_PASSED_OVER`] times (so no waiter waits more than a few
/// releases longer than in strict order). Only the entries passed on the way are looked at (a
/// release must not cost a walk over a thousand waiters); those that gave up go with them, and
/// the whole queue is swept when dead entries outnumber the `waiting` live ones, so it stays
/// bounded.
fn next_waiter(
    waiters: &mut std::collections::VecDeque<Waiter>,
    user: &str,
    home: usize,
    waiting: usize,
) -> Option<Waiter> {
    if waiters.len() > 2 * waiting + 16 {
        waiters.retain(|w| !w.handoff.is_closed());
    }
    let mut at = 0;
    let mut oldest = None;
    let mut looked = 0;
    while at < waiters.len() {
        let (closed, theirs, here) = {
            let w = &waiters[at];
            (w.handoff.is_closed(), w.user == user, w.home == home)
        };
        if closed {
            waiters.remove(at);
            continue;
        }
        if theirs {
            let first = *oldest.get_or_insert(at);
            if waiters[first].passed_over >= MAX_PASSED_OVER {
                return waiters.remove(first);
            }
            if here {
                for passed in waiters.range_mut(first..at).filter(|w| w.user == user) {
                    passed.passed_over += 1;
                }
                return waiters.remove(at);
            }
            looked += 1;
            if looked > AFFINITY_WINDOW {
                break;
            }
        }
        at += 1;
    }
    oldest.and_then(|first| waiters.remove(first))
}

struct Waiting<'a>(&'a AtomicUsize, prometheus::IntGauge);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
        self.1.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiter(
        user: &str,
        live: bool,
    ) -> (Waiter, Option<tokio::sync::oneshot::Receiver<ServerConn>>) {
        let (handoff, handed) = tokio::sync::oneshot::channel();
        (Waiter { user: user.to_owned(), home: 0, passed_over: 0, handoff }, live.then_some(handed))
    }

    /// A slot of `pool` holding one of its permits, as an open connection does.
    fn slot(pool: &Arc<DbPool>) -> Slot {
        let permit = Arc::clone(&pool.permits).try_acquire_owned().expect("a free permit");
        pool.open.fetch_add(1, Ordering::Relaxed);
        let gauge = prometheus::IntGauge::new("g", "g").unwrap();
        Slot { pool: Arc::clone(pool), gauge, permit: Some(permit) }
    }

    #[test]
    fn a_smaller_size_holds_at_once_and_connections_beyond_it_give_their_places_up() {
        let pools = Pools::default();
        let pool = pools.get("db", 10);
        let open: Vec<Slot> = (0..7).map(|_| slot(&pool)).collect();
        pools.get("db", 4);
        assert_eq!(pool.permits.available_permits(), 0, "the 3 free ones went at once");
        let mut open = open.into_iter();
        for closed in 1..=3 {
            drop(open.next());
            assert_eq!(pool.permits.available_permits(), 0, "{closed} closed: still 4 open");
        }
        drop(open.next());
        assert_eq!(pool.permits.available_permits(), 1, "3 open of 4");
        // Growing again first cancels what is still owed.
        pools.get("db", 2);
        assert_eq!(pool.owed.load(Ordering::Relaxed), 1);
        pools.get("db", 6);
        assert_eq!(pool.owed.load(Ordering::Relaxed), 0);
        assert_eq!(pool.permits.available_permits(), 3, "3 open of 6");
        drop(open);
        assert_eq!(pool.permits.available_permits(), 6);
    }

    #[test]
    fn a_release_takes_the_oldest_live_waiter_of_its_user_and_the_queue_stays_bounded() {
        let mut queue = std::collections::VecDeque::new();
        let mut alive = Vec::new();
        for (user, live) in [("a", false), ("b", true), ("a", false), ("a", true), ("a", true)] {
            let (w, rx) = waiter(user, live);
            queue.push_back(w);
            alive.push(rx);
        }
        // The dead ones in front of the match go; the live waiter of another user stays.
        let got = next_waiter(&mut queue, "a", 0, 3).expect("a live waiter of a");
        assert!(!got.handoff.is_closed());
        let users: Vec<&str> = queue.iter().map(|w| w.user.as_str()).collect();
        assert_eq!(users, ["b", "a"]);
        assert!(next_waiter(&mut queue, "c", 0, 2).is_none());
        assert_eq!(queue.len(), 2, "live waiters are never dropped");

        // Waiters that gave up behind the live ones are swept once they outnumber them.
        for _ in 0..40 {
            queue.push_back(waiter("z", false).0);
        }
        let got = next_waiter(&mut queue, "b", 0, 2).expect("b");
        assert_eq!(got.user, "b");
        assert_eq!(queue.len(), 1);
        drop(alive);
    }

    #[test]
    fn a_waiter_on_the_connection_s_thread_goes_first_but_the_oldest_waits_only_a_few_turns() {
        let mut queue = std::collections::VecDeque::new();
        let mut alive = Vec::new();
        for (user, home) in [("a", 1), ("b", 0), ("a", 0), ("a", 0), ("a", 0), ("a", 0)] {
            let (mut w, rx) = waiter(user, true);
            w.home = home;
            queue.push_back(w);
            alive.push(rx);
        }
        let order = |queue: &std::collections::VecDeque<Waiter>| {
            queue.iter().map(|w| (w.user.clone(), w.home)).collect::<Vec<_>>()
        };
        // Connections of thread 0: its waiters go first, twice; then the oldest's turn.
        for _ in 0..2 {
            let got = next_waiter(&mut queue, "a", 0, 6).expect("a waiter");
            assert_eq!((got.user.as_str(), got.home), ("a", 0));
        }
        let got = next_waiter(&mut queue, "a", 0, 4).expect("the oldest");
        assert_eq!((got.user.as_str(), got.home), ("a", 1), "passed over twice: its turn");
        // A connection of thread 1 with none of its waiters left: the oldest of the user.
        let got = next_waiter(&mut queue, "a", 1, 3).expect("the oldest");
        assert_eq!((got.user.as_str(), got.home), ("a", 0));
        assert_eq!(order(&queue), [("b".to_owned(), 0), ("a".to_owned(), 0)]);
        drop(alive);
    }
}
