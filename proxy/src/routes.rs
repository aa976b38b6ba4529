//! The routing table: one `ArcSwap` snapshot read by every new session, one writer.
//!
//! Each database entry carries a `moved` token. A swap that changes a database's primary (or
//! removes the database) cancels the old entry's token after the new table is in place, which
//! ends every session still attached to the old primary. Entries whose primary is unchanged keep
//! their token, so their sessions are not disturbed.
//!
//! A change (`patch`, `PATCH /v1/routes`) names the databases that changed since the epoch the
//! proxy holds: only those entries are rebuilt, the others are the same `Arc`s, so applying it
//! costs the same with ten routes or ten thousand (a copy of the map's pointers aside).
//!
//! A proxy that follows etcd and is cut off from it longer than its bound is *fenced*
//! (`fence`): every database is held and every token cancelled, since the proxy can no longer
//! know who the primaries are. The next table from etcd, even of the same epoch, lifts it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use pgwarden_api::{DatabaseRoute, RoutingDelta, RoutingTable, Verifiers};
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
    #[error(
        "a change from epoch {base}, but the current epoch is {current}: send the whole table"
    )]
    NotBase { base: u64, current: u64 },
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
    pub epoch: u64,
    /// Keys shared (`Arc<str>`): a change copies the maps without allocating a name.
    entries: HashMap<Arc<str>, Entry>,
    /// Database ids (SNI names) to database names.
    by_id: HashMap<Arc<str>, Arc<str>>,
    /// The nodes' CA (PEM) and the connector built from it.
    node_tls: Option<(String, Arc<TlsConnector>)>,
    /// Cut off from etcd: every database held until the next table.
    pub fenced: bool,
}

/// One database: its route as the table said it, and as sessions use it.
#[derive(Clone)]
struct Entry {
    wire: Arc<DatabaseRoute>,
    route: Arc<Route>,
}

impl Snapshot {
    pub fn route(&self, database: &str) -> Option<Arc<Route>> {
        self.entries.get(database).map(|e| e.route.clone())
    }

    /// The name and route of the database whose id is `id`.
    pub fn route_by_id(&self, id: &str) -> Option<(String, Arc<Route>)> {
        let name = self.by_id.get(id)?;
        Some((name.to_string(), self.entries.get(name)?.route.clone()))
    }

    /// The table it was made from.
    pub fn table(&self) -> RoutingTable {
        RoutingTable {
            epoch: self.epoch,
            databases: self
                .entries
                .iter()
                .map(|(name, e)| (name.to_string(), DatabaseRoute::clone(&e.wire)))
                .collect(),
            node_ca: self.node_tls.as_ref().map(|(pem, _)| pem.clone()),
        }
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
        validate(&table.databases)?;
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.current.load_full();
        let lifts_fence = old.fenced && table.epoch == old.epoch;
        if table.epoch <= old.epoch && !lifts_fence {
            return Err(RouteError::StaleEpoch { offered: table.epoch, current: old.epoch });
        }
        self.install(&old, table, false)
    }

    /// Applies `delta` to the current table, which must be its base (and not fenced): only the
    /// databases it names are touched, whatever the size of the table. Returns the new epoch.
    pub fn patch(&self, delta: RoutingDelta) -> Result<u64, RouteError> {
        validate(&delta.set)?;
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.current.load_full();
        if delta.base_epoch != old.epoch || old.fenced {
            return Err(RouteError::NotBase { base: delta.base_epoch, current: old.epoch });
        }
        if delta.epoch <= old.epoch {
            return Err(RouteError::StaleEpoch { offered: delta.epoch, current: old.epoch });
        }
        let node_tls = old.node_tls.as_ref().map(|(_, c)| c);
        let mut entries = old.entries.clone();
        let mut by_id = old.by_id.clone();
        // The tokens of primaries that stop being primaries, cancelled once the new table is in.
        let mut moved = Vec::new();
        for name in &delta.remove {
            if let Some(prev) = entries.remove(name.as_str()) {
                if let Some(id) = &prev.wire.id {
                    by_id.remove(id.as_str());
                }
                moved.push(prev.route.moved.clone());
            }
        }
        for (name, wire) in delta.set {
            let prev = entries.remove(name.as_str());
            if let Some(id) = prev.as_ref().and_then(|p| p.wire.id.as_ref()) {
                by_id.remove(id.as_str());
            }
            let entry = entry(wire, prev.as_ref(), node_tls, false);
            if let Some(prev) = prev.filter(|p| p.route.primary != entry.route.primary) {
                moved.push(prev.route.moved.clone());
            }
            let name: Arc<str> = name.into();
            if let Some(id) = &entry.wire.id {
                by_id.insert(id.as_str().into(), name.clone());
            }
            entries.insert(name, entry);
        }
        let (epoch, node_tls) = (delta.epoch, old.node_tls.clone());
        self.current.store(Arc::new(Snapshot { epoch, entries, by_id, node_tls, fenced: false }));
        for token in moved {
            token.cancel();
        }
        self.changed.send_replace(epoch);
        Ok(epoch)
    }

    /// Holds every database and ends every session on a primary (see the module's doc).
    /// False if already fenced.
    pub fn fence(&self) -> bool {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.current.load_full();
        if old.fenced {
            return false;
        }
        let mut table = old.table();
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
        let mut entries = HashMap::with_capacity(table.databases.len());
        let mut by_id = HashMap::new();
        for (name, wire) in table.databases {
            let connector = node_tls.as_ref().map(|(_, c)| c);
            let entry = entry(wire, old.entries.get(name.as_str()), connector, fenced);
            let name: Arc<str> = name.into();
            if let Some(id) = &entry.wire.id {
                by_id.insert(id.as_str().into(), name.clone());
            }
            entries.insert(name, entry);
        }
        let epoch = table.epoch;
        self.current.store(Arc::new(Snapshot { epoch, entries, by_id, node_tls, fenced }));
        let new = self.current.load();
        for (name, prev) in &old.entries {
            let kept = !fenced
                && new.entries.get(name).is_some_and(|e| e.route.primary == prev.route.primary);
            if !kept {
                prev.route.moved.cancel();
            }
        }
        self.changed.send_replace(epoch);
        Ok(epoch)
    }
}

/// The entry for `wire`: its sessions keep `prev`'s token when the primary is the same (and
/// the proxy is not fencing).
fn entry(
    wire: DatabaseRoute,
    prev: Option<&Entry>,
    node_tls: Option<&Arc<TlsConnector>>,
    fenced: bool,
) -> Entry {
    let moved = match prev {
        Some(prev) if prev.route.primary == wire.primary && !fenced => prev.route.moved.clone(),
        _ => CancellationToken::new(),
    };
    let route = Route {
        primary: wire.primary.clone(),
        force_tls: wire.force_tls,
        hold: wire.hold,
        moved,
        users: wire.users.as_ref().map(credentials),
        node_tls: node_tls.cloned(),
        pool_size: wire.pool_size.map_or(DEFAULT_POOL_SIZE, |n| n.max(1) as usize),
        limits: crate::tenants::Limits {
            client_connections: wire.client_connections,
            connections_per_second: wire.connections_per_second,
        },
    };
    Entry { wire: Arc::new(wire), route: Arc::new(route) }
}

fn validate(databases: &BTreeMap<String, DatabaseRoute>) -> Result<(), RouteError> {
    let invalid = |m: String| Err(RouteError::Invalid(m));
    for (name, route) in databases {
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
        assert!(fenced.fenced && fenced.epoch == 4);
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

    fn delta(base: u64, epoch: u64, set: &[(&str, &str)], remove: &[&str]) -> RoutingDelta {
        RoutingDelta {
            base_epoch: base,
            epoch,
            set: table(0, set).databases,
            remove: remove.iter().map(|r| r.to_string()).collect(),
        }
    }

    #[test]
    fn a_change_touches_only_the_databases_it_names() {
        let store = RouteStore::default();
        let many: Vec<(String, String)> =
            (0..1_000).map(|i| (format!("db{i}"), format!("127.0.0.1:{}", 1_000 + i))).collect();
        let many: Vec<(&str, &str)> = many.iter().map(|(n, p)| (n.as_str(), p.as_str())).collect();
        store.replace(table(1, &many)).unwrap();
        let before = store.load();
        let (moved, kept) = (before.route("db1").unwrap(), before.route("db2").unwrap());
        let removed = before.route("db3").unwrap();
        // db1 moves, db2's hold changes (same primary), db3 goes, new arrives.
        let mut change = delta(1, 2, &[("db1", "127.0.0.1:9"), ("new", "127.0.0.1:8")], &["db3"]);
        let mut held = change.set["db1"].clone();
        held.primary = "127.0.0.1:1002".into();
        held.hold = true;
        change.set.insert("db2".into(), held);
        store.patch(change).unwrap();
        let after = store.load();
        assert_eq!(after.epoch, 2);
        assert!(moved.moved.is_cancelled(), "a moved primary ends its sessions");
        assert!(removed.moved.is_cancelled(), "a removed database ends its sessions");
        assert!(after.route("db3").is_none() && after.route("new").is_some());
        let db2 = after.route("db2").unwrap();
        assert!(db2.hold && !kept.moved.is_cancelled(), "a held database keeps its sessions");
        // Every other route is the very same (its pool, its tokens, its parsed users).
        for i in (4..1_000).step_by(97) {
            let name = format!("db{i}");
            assert!(Arc::ptr_eq(&before.route(&name).unwrap(), &after.route(&name).unwrap()));
        }
        assert_eq!(after.table().databases.len(), 1_000);
    }

    #[test]
    fn a_change_from_another_epoch_or_while_fenced_is_refused() {
        let store = RouteStore::default();
        store.replace(table(5, &[("a", "127.0.0.1:1")])).unwrap();
        let err = store.patch(delta(4, 6, &[("b", "127.0.0.1:2")], &[])).unwrap_err();
        assert!(matches!(err, RouteError::NotBase { base: 4, current: 5 }), "{err}");
        let err = store.patch(delta(5, 5, &[("b", "127.0.0.1:2")], &[])).unwrap_err();
        assert!(matches!(err, RouteError::StaleEpoch { .. }), "{err}");
        let err = store.patch(delta(5, 6, &[("b", "nohost")], &[])).unwrap_err();
        assert!(matches!(err, RouteError::Invalid(_)), "{err}");
        assert!(store.load().route("b").is_none() && store.load().epoch == 5);
        assert!(store.fence());
        let err = store.patch(delta(5, 6, &[("b", "127.0.0.1:2")], &[])).unwrap_err();
        assert!(matches!(err, RouteError::NotBase { .. }), "fenced: only a whole table lifts it");
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
        assert_eq!(store.load().epoch, 1);
    }
}
