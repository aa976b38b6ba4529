//! The routing table: one `ArcSwap` snapshot read by every new session, one writer.
//!
//! Each database entry carries a `moved` token. A swap that changes a database's primary (or
//! removes the database) cancels the old entry's token after the new table is in place, which
//! ends every session still attached to the old primary. Entries whose primary is unchanged keep
//! their token, so their sessions are not disturbed.
//!
//! A proxy that follows etcd and is cut off from it longer than its bound is *fenced*
//! (`fence`): every database is held and every token cancelled, since the proxy can no longer
//! know who the primaries are. The next table from etcd, even of the same epoch, lifts it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use pgwarden_api::{RoutingTable, Verifiers};
use tokio_util::sync::CancellationToken;

use tokio_rustls::TlsConnector;

use crate::scram::Keys;

/// Why a routing table was refused. The current table is unchanged in every case.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("invalid routing table: {0}")]
    Invalid(String),
    #[error("epoch {offered} is not greater than the current epoch {current}")]
    StaleEpoch { offered: u64, current: u64 },
}

/// Where new sessions of one database go.
pub struct Route {
    pub primary: String,
    pub force_tls: bool,
    /// New sessions wait for the next table (planned switchover in progress).
    pub hold: bool,
    /// Cancelled when this primary stops being the database's primary.
    pub moved: CancellationToken,
    /// Who may log in, when the proxy authenticates clients itself (else the node does).
    pub users: Option<HashMap<String, Credential>>,
    /// TLS to the node, verified against the nodes' CA (else plaintext).
    pub node_tls: Option<Arc<TlsConnector>>,
    /// Transaction pooling: server connections to the primary at most.
    pub pool_size: usize,
    /// Clients at once and new connections per second (`tenants.rs`).
    pub limits: crate::tenants::Limits,
}

/// Server connections per database when the table does not say.
pub const DEFAULT_POOL_SIZE: usize = 20;

/// What the proxy knows of one user's password.
pub enum Credential {
    Scram(Keys),
    /// Something the proxy cannot check a SCRAM exchange against (an MD5 hash).
    Unsupported,
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Route")
            .field("primary", &self.primary)
            .field("force_tls", &self.force_tls)
            .field("hold", &self.hold)
            .field("users", &self.users.as_ref().map(|u| u.len()))
            .field("node_tls", &self.node_tls.is_some())
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Scram(_) => "Scram(..)",
            Self::Unsupported => "Unsupported",
        })
    }
}

/// The credentials of a table entry's users.
fn credentials(users: &Verifiers) -> HashMap<String, Credential> {
    users
        .0
        .iter()
        .map(|(user, verifier)| {
            let credential =
                Keys::parse(verifier).map_or(Credential::Unsupported, Credential::Scram);
            (user.clone(), credential)
        })
        .collect()
}

/// An immutable routing table as sessions see it.
#[derive(Default)]
pub struct Snapshot {
    pub table: RoutingTable,
    routes: HashMap<String, Arc<Route>>,
    /// The nodes' CA (PEM) and the connector built from it.
    node_tls: Option<(String, Arc<TlsConnector>)>,
    /// Cut off from etcd: every database held until the next table.
    pub fenced: bool,
}

impl Snapshot {
    pub fn route(&self, database: &str) -> Option<Arc<Route>> {
        self.routes.get(database).cloned()
    }

    /// The name and route of the database whose id is `id`.
    pub fn route_by_id(&self, id: &str) -> Option<(String, Arc<Route>)> {
        let (name, _) = self.table.databases.iter().find(|(_, r)| r.id.as_deref() == Some(id))?;
        Some((name.clone(), self.routes.get(name)?.clone()))
    }
}

pub struct RouteStore {
    current: ArcSwap<Snapshot>,
    writer: Mutex<()>,
    /// The epoch in use, for sessions waiting on a held route.
    changed: tokio::sync::watch::Sender<u64>,
    /// Sessions between route lookup and the end of authentication, per database.
    starting: Mutex<HashMap<String, usize>>,
    started: tokio::sync::Notify,
    /// The newest epoch whose holds are in effect (`/health` reports it).
    settled: std::sync::atomic::AtomicU64,
}

/// Counts one session in its startup phase (see [`RouteStore::starting`]).
pub struct Starting<'a> {
    store: &'a RouteStore,
    database: String,
}

impl Drop for Starting<'_> {
    fn drop(&mut self) {
        let mut starting = self.store.starting.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = starting.get_mut(&self.database) {
            *n -= 1;
            if *n == 0 {
                starting.remove(&self.database);
                self.store.started.notify_waiters();
            }
        }
    }
}

impl Default for RouteStore {
    fn default() -> Self {
        Self {
            current: ArcSwap::from_pointee(Snapshot::default()),
            writer: Mutex::new(()),
            changed: tokio::sync::watch::channel(0).0,
            starting: Mutex::default(),
            started: tokio::sync::Notify::new(),
            settled: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl RouteStore {
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Marks a session of `database` as starting: take it before looking the route up, keep it
    /// until authentication ends, so that a table putting the database on hold can wait for
    /// sessions already on their way to the old primary.
    pub fn starting(&self, database: &str) -> Starting<'_> {
        *self
            .starting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(database.to_owned())
            .or_default() += 1;
        Starting { store: self, database: database.to_owned() }
    }

    /// Waits (at most `timeout`) until no session of `database` is starting.
    pub async fn wait_started(&self, database: &str, timeout: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.started.notified();
            if !self.starting.lock().unwrap_or_else(|e| e.into_inner()).contains_key(database) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }

    /// Notified whenever a new table is in place.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The newest epoch whose holds are in effect.
    pub fn settled(&self) -> u64 {
        self.settled.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Records that the holds of `epoch` are in effect.
    pub fn mark_settled(&self, epoch: u64) {
        self.settled.fetch_max(epoch, std::sync::atomic::Ordering::AcqRel);
    }

    /// Validates `table` and, if its epoch is newer (or the same while fenced), makes it
    /// current. Returns the new epoch.
    pub fn replace(&self, table: RoutingTable) -> Result<u64, RouteError> {
        validate(&table)?;
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.current.load_full();
        let lifts_fence = old.fenced && table.epoch == old.table.epoch;
        if table.epoch <= old.table.epoch && !lifts_fence {
            return Err(RouteError::StaleEpoch { offered: table.epoch, current: old.table.epoch });
        }
        self.install(&old, table, false)
    }

    /// Holds every database and ends every session on a primary (see the module's doc).
    /// False if already fenced.
    pub fn fence(&self) -> bool {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.current.load_full();
        if old.fenced {
            return false;
        }
        let mut table = old.table.clone();
        for route in table.databases.values_mut() {
            route.hold = true;
        }
        self.install(&old, table, true).is_ok()
    }

    /// Makes `table` current (validated, under the writer lock); cancels the tokens of the
    /// primaries it changes or removes, of every primary when fencing.
    fn install(
        &self,
        old: &Snapshot,
        table: RoutingTable,
        fenced: bool,
    ) -> Result<u64, RouteError> {
        // The connector is rebuilt only when the CA changes.
        let node_tls = match (&table.node_ca, &old.node_tls) {
            (None, _) => None,
            (Some(pem), Some((old_pem, connector))) if pem == old_pem => {
                Some((old_pem.clone(), connector.clone()))
            }
            (Some(pem), _) => {
                let connector = crate::tls::node_connector(pem).map_err(RouteError::Invalid)?;
                Some((pem.clone(), Arc::new(connector)))
            }
        };
        let mut routes = HashMap::with_capacity(table.databases.len());
        for (name, entry) in &table.databases {
            let moved = match old.routes.get(name) {
                Some(prev) if prev.primary == entry.primary && !fenced => prev.moved.clone(),
                _ => CancellationToken::new(),
            };
            let route = Route {
                primary: entry.primary.clone(),
                force_tls: entry.force_tls,
                hold: entry.hold,
                moved,
                users: entry.users.as_ref().map(credentials),
                node_tls: node_tls.as_ref().map(|(_, c)| c.clone()),
                pool_size: entry.pool_size.map_or(DEFAULT_POOL_SIZE, |n| n.max(1) as usize),
                limits: crate::tenants::Limits {
                    client_connections: entry.client_connections,
                    connections_per_second: entry.connections_per_second,
                },
            };
            routes.insert(name.clone(), Arc::new(route));
        }
        let epoch = table.epoch;
        self.current.store(Arc::new(Snapshot { table, routes, node_tls, fenced }));
        let new = self.current.load();
        for (name, prev) in &old.routes {
            let kept = !fenced && new.routes.get(name).is_some_and(|r| r.primary == prev.primary);
            if !kept {
                prev.moved.cancel();
            }
        }
        self.changed.send_replace(epoch);
        Ok(epoch)
    }
}

fn validate(table: &RoutingTable) -> Result<(), RouteError> {
    let invalid = |m: String| Err(RouteError::Invalid(m));
    for (name, route) in &table.databases {
        if name.is_empty() || name.len() > 63 || name.contains('\0') {
            return invalid(format!("database name {name:?} must be 1 to 63 bytes"));
        }
        for addr in std::iter::once(&route.primary).chain(&route.replicas) {
            if let Err(reason) = check_address(addr) {
                return invalid(format!("database {name:?}: address {addr:?} {reason}"));
            }
        }
    }
    Ok(())
}

/// Accepts `host:port` and `[v6]:port`.
fn check_address(addr: &str) -> Result<(), &'static str> {
    let (host, port) = addr.rsplit_once(':').ok_or("is not host:port")?;
    match port.parse::<u16>() {
        Ok(p) if p > 0 => {}
        _ => return Err("has no valid port"),
    }
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err("has no valid host");
    }
    if host.starts_with('[') != host.ends_with(']')
        || (!host.starts_with('[') && host.contains(':'))
    {
        return Err("has an IPv6 host not in brackets");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgwarden_api::DatabaseRoute;

    fn table(epoch: u64, dbs: &[(&str, &str)]) -> RoutingTable {
        let databases = dbs
            .iter()
            .map(|(n, p)| {
                let route = DatabaseRoute {
                    force_tls: false,
                    primary: p.to_string(),
                    replicas: vec![],
                    hold: false,
                    id: None,
                    users: None,
                    pool_size: None,
                    client_connections: None,
                    connections_per_second: None,
                };
                (n.to_string(), route)
            })
            .collect();
        RoutingTable { epoch, databases, node_ca: None }
    }

    #[test]
    fn stale_epoch_is_refused_and_changes_nothing() {
        let store = RouteStore::default();
        store.replace(table(5, &[("a", "127.0.0.1:1")])).unwrap();
        let err = store.replace(table(5, &[("b", "127.0.0.1:2")])).unwrap_err();
        assert!(matches!(err, RouteError::StaleEpoch { offered: 5, current: 5 }));
        assert!(store.load().route("a").is_some());
        assert!(store.load().route("b").is_none());
    }

    #[test]
    fn only_moved_primaries_cancel_their_sessions() {
        let store = RouteStore::default();
        store
            .replace(table(1, &[("a", "127.0.0.1:1"), ("b", "127.0.0.1:2"), ("c", "h:3")]))
            .unwrap();
        let snap = store.load();
        let (a, b, c) =
            (snap.route("a").unwrap(), snap.route("b").unwrap(), snap.route("c").unwrap());
        store.replace(table(2, &[("a", "127.0.0.1:1"), ("b", "127.0.0.1:9")])).unwrap();
        assert!(!a.moved.is_cancelled(), "unchanged primary keeps its sessions");
        assert!(b.moved.is_cancelled(), "moved primary ends its sessions");
        assert!(c.moved.is_cancelled(), "removed database ends its sessions");
        assert!(!store.load().route("b").unwrap().moved.is_cancelled());
    }

    #[test]
    fn a_fence_holds_every_database_ends_its_sessions_and_the_next_table_lifts_it() {
        let store = RouteStore::default();
        store.replace(table(4, &[("a", "127.0.0.1:1"), ("b", "127.0.0.1:2")])).unwrap();
        let before = store.load().route("a").unwrap();
        assert!(store.fence());
        assert!(!store.fence(), "already fenced");
        let fenced = store.load();
        assert!(fenced.fenced && fenced.table.epoch == 4);
        assert!(before.moved.is_cancelled(), "sessions on the primary end");
        assert!(["a", "b"].iter().all(|db| fenced.route(db).unwrap().hold), "all held");
        let stale = store.replace(table(3, &[("a", "127.0.0.1:1")])).unwrap_err();
        assert!(matches!(stale, RouteError::StaleEpoch { .. }), "{stale}");
        // The same epoch again (etcd is back, nothing changed) lifts the fence.
        store.replace(table(4, &[("a", "127.0.0.1:1"), ("b", "127.0.0.1:2")])).unwrap();
        let lifted = store.load();
        assert!(!lifted.fenced && !lifted.route("a").unwrap().hold);
        assert!(!lifted.route("a").unwrap().moved.is_cancelled());
        let again = store.replace(table(4, &[("a", "127.0.0.1:1")])).unwrap_err();
        assert!(matches!(again, RouteError::StaleEpoch { .. }), "only once");
    }

    #[test]
    fn invalid_tables_are_refused_with_the_reason() {
        let store = RouteStore::default();
        for (addr, why) in
            [("nohost", "host:port"), ("h:0", "port"), (":5", "host"), ("::1:5", "IPv6")]
        {
            let err = store.replace(table(1, &[("a", addr)])).unwrap_err().to_string();
            assert!(err.contains(why), "{addr}: {err}");
        }
        assert!(store.replace(table(1, &[("", "h:1")])).is_err());
        assert!(store.replace(table(1, &[("a", "[::1]:5432")])).is_ok());
        assert_eq!(store.load().table.epoch, 1);
    }
}
