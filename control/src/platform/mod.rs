//! The handles every workflow shares: the store, the node driver, the platform CA, the route
//! publisher and its holds, the backup storage; and the two kinds of per-database exclusion.
//!
//! - The record lock (`update`) is a plain mutex held only while a record is read, changed and
//!   written back: it cannot be held across a call that waits on a node (it is not `Send`
//!   across an `.await`).
//! - Primary changes (`changes.rs`): one at a time per database; an automatic failover preempts
//!   a planned change that has not yet stopped the primary on purpose.
//!
//! Long operations run through `operations.rs`, the one runner that records their progress.

pub mod changes;
pub mod config;
pub mod operations;
pub mod verifiers;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use pgwarden_api::control::Event;
use pgwarden_certs::Ca;
use tracing::{error, info};

pub use changes::{ChangeGuard, PrimaryChanges};
pub use config::{HealthConfig, PlatformConfig};

use crate::agent::client::{Placed, RemoteDriver};
use crate::metrics::Metrics;
use crate::nodes::config::{node_config, ConfigError};
use crate::nodes::engines::Engines;
use crate::nodes::placement;
use crate::nodes::ports::Ports;
use crate::nodes::sql::{Session, SqlError, Timeouts};
use crate::nodes::{NodeConfig, NodeDriver, NodeSpec};
use crate::routing::{table, Delivery, Holds, Publisher, VerifierCache};
use crate::state::{DatabaseRecord, NodeRecord, Store, StoreError};
use crate::storage::BackupStorage;

pub struct Platform {
    pub config: PlatformConfig,
    pub store: Store,
    /// Every node's driver: this host's, or its agent's.
    pub driver: Arc<dyn NodeDriver>,
    /// The agents' client, for superuser sessions through them.
    pub remote: Arc<RemoteDriver>,
    pub ca: Ca,
    pub metrics: Metrics,
    pub publisher: Publisher,
    /// Databases whose new sessions the proxies hold.
    pub holds: Holds,
    /// The users' SCRAM verifiers the proxies authenticate clients with.
    pub verifiers: VerifierCache,
    pub changes: PrimaryChanges,
    pub ports: Ports,
    pub backups: Arc<dyn BackupStorage>,
    /// Directory of the PostgreSQL client programs (pg_dump, pg_restore).
    pub pg_bin: PathBuf,
    /// The PostgreSQL builds installed, found at start.
    pub engines: Engines,
    /// With control planes on etcd: the connection (agents' leases live there).
    pub etcd: Option<crate::coord::Etcd>,
    /// With control planes on etcd: this one's leadership. Once it is lost (or its lease ran
    /// out unrenewed: the process was frozen), the plane acts on no node and writes nothing.
    leadership: Option<Arc<crate::coord::Leadership>>,
    records: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Serializes the check-then-insert of a new database (unique names).
    creating: Mutex<()>,
}

/// What a platform is made of, opened by `server::open`.
pub struct Parts {
    pub store: Store,
    /// The connection to etcd, for control planes on it.
    pub etcd: Option<crate::coord::Etcd>,
    /// This control plane's leadership, for control planes on etcd.
    pub leadership: Option<Arc<crate::coord::Leadership>>,
    /// This host's driver.
    pub local: Arc<dyn NodeDriver>,
    /// The agents' client.
    pub remote: Arc<RemoteDriver>,
    pub ca: Ca,
    pub backups: Arc<dyn BackupStorage>,
    /// Directory of the PostgreSQL client programs.
    pub pg_bin: PathBuf,
}

impl Platform {
    pub fn new(config: PlatformConfig, parts: Parts) -> Arc<Self> {
        let Parts { store, etcd, leadership, local, remote, ca, backups, pg_bin } = parts;
        let engines = Engines::discover(config.engines_dir.as_deref());
        let metrics = Metrics::new();
        // With etcd, the proxies watch the table there: the publisher only sees them apply it.
        let delivery = if config.etcd.is_some() { Delivery::Watched } else { Delivery::Push };
        let token = config.proxy_token.clone();
        let publisher = Publisher::start(config.proxies.clone(), token, delivery, metrics.clone());
        let driver =
            Arc::new(Placed { local, remote: Arc::clone(&remote), leadership: leadership.clone() });
        Arc::new(Self {
            config,
            store,
            driver,
            remote,
            ca,
            metrics,
            publisher,
            holds: Holds::default(),
            verifiers: VerifierCache::default(),
            changes: PrimaryChanges::default(),
            ports: Ports::default(),
            backups,
            pg_bin,
            engines,
            etcd,
            leadership,
            records: Mutex::default(),
            creating: Mutex::default(),
        })
    }

    /// Reads database `id`, lets `change` modify it, and writes it back unless `change` fails,
    /// under the database's record lock. `Ok(None)`: the database does not exist.
    pub fn update<T, E: From<StoreError>>(
        &self,
        id: &str,
        change: impl FnOnce(&mut DatabaseRecord) -> Result<T, E>,
    ) -> Result<Option<(T, DatabaseRecord)>, E> {
        let lock = {
            let mut locks = self.records.lock().unwrap_or_else(|e| e.into_inner());
            Arc::clone(locks.entry(id.to_owned()).or_default())
        };
        // Waiting for the lock and writing the record both block: off the runtime's workers.
        crate::files::blocking_io(|| {
            let _guard = lock.lock().unwrap_or_else(|e| e.into_inner());
            let Some(mut db) = self.store.database(id)? else { return Ok(None) };
            let out = change(&mut db)?;
            self.store.put_database(&db)?;
            Ok(Some((out, db)))
        })
    }

    /// Inserts a new database record unless `conflict` finds a reason in the existing ones.
    pub fn insert_new<E: From<StoreError>>(
        &self,
        db: &DatabaseRecord,
        conflict: impl FnOnce(&[DatabaseRecord]) -> Result<(), E>,
    ) -> Result<(), E> {
        crate::files::blocking_io(|| {
            let _guard = self.creating.lock().unwrap_or_else(|e| e.into_inner());
            conflict(&self.store.databases()?)?;
            self.store.put_database(db)?;
            Ok(())
        })
    }

    pub fn node_spec(&self, node: &NodeRecord) -> NodeSpec {
        NodeSpec {
            name: node.name.clone(),
            dir: node.dir.clone(),
            host: node.host.clone(),
            port: node.port,
            bin: node.engine.clone(),
            agent: node.agent.clone(),
        }
    }

    /// The configuration of `node` of `db` (see `nodes::config`).
    pub fn node_config(
        &self,
        db: &DatabaseRecord,
        node: &NodeRecord,
        sync_standby: Option<&str>,
    ) -> Result<NodeConfig, ConfigError> {
        node_config(&self.ca, &self.config.extra_settings, db, node, sync_standby)
    }

    /// Whether this control plane may act: always alone; on etcd, while its lease is known
    /// to last.
    pub fn leads(&self) -> bool {
        self.leadership.as_ref().is_none_or(|l| l.is_valid())
    }

    /// A superuser session on `node`'s `database`, with the default bounds.
    pub async fn session(&self, node: &NodeSpec, database: &str) -> Result<Session, SqlError> {
        self.session_within(node, database, Timeouts::DEFAULT).await
    }

    pub async fn session_within(
        &self,
        node: &NodeSpec,
        database: &str,
        timeouts: Timeouts,
    ) -> Result<Session, SqlError> {
        if !self.leads() {
            return Err(SqlError::Unreachable {
                node: node.name.clone(),
                reason: crate::coord::NOT_LEADING.into(),
            });
        }
        if node.agent.is_none() {
            let conninfo = self.driver.admin_conninfo(node, database);
            return Session::open(&node.name, &conninfo, timeouts).await;
        }
        let tunnel = self.remote.tunnel(node, timeouts.connect).await.map_err(|e| {
            SqlError::Unreachable { node: node.name.clone(), reason: e.to_string() }
        })?;
        Session::open_over(&node.name, tunnel, database, timeouts).await
    }

    /// Directory of the client programs (pg_dump, pg_basebackup, pg_receivewal...) for `db`:
    /// the newest full toolset of the major it runs (a client of another major refuses it).
    pub fn tools(&self, db: &DatabaseRecord) -> PathBuf {
        let bin = db.engine.as_deref().unwrap_or(&self.pg_bin);
        self.engines
            .all
            .iter()
            .find(|e| e.bin == bin)
            .and_then(|e| self.engines.toolset(e.major))
            .map_or_else(|| self.pg_bin.clone(), |e| e.bin.clone())
    }

    pub fn nodes_dir(&self) -> PathBuf {
        self.config.data_dir.join("nodes")
    }

    /// Records for `count` new nodes of database `id` (`nodes::placement`).
    pub fn new_nodes(
        &self,
        id: &str,
        engine: Option<&std::path::Path>,
        first: u32,
        count: usize,
    ) -> Result<Vec<NodeRecord>, StoreError> {
        let hosts = placement::Hosts {
            agents: &self.config.agents,
            node_host: &self.config.node_host,
            first_port: self.config.first_node_port,
            nodes_dir: self.nodes_dir(),
            agent_nodes_dir: self.config.agent_root.join("nodes"),
            ports: &self.ports,
        };
        Ok(placement::new_nodes(&hosts, &self.store.databases()?, id, engine, first, count))
    }

    /// `postgres://user:password@host:port/db` through the proxies.
    pub fn url(&self, user: &str, password: &str, database: &str) -> String {
        format!(
            "postgres://{user}:{password}@{}:{}/{database}",
            self.config.client_host, self.config.client_port
        )
    }

    pub fn database_url(&self, db: &DatabaseRecord) -> String {
        self.url(&db.name, &db.password, &db.name)
    }

    /// `DATABASE_URL` on the proxies' transaction-pooling port, when they have one.
    pub fn database_pool_url(&self, db: &DatabaseRecord) -> Option<String> {
        let port = self.config.client_pool_port?;
        Some(format!(
            "postgres://{}:{}@{}:{port}/{}",
            db.name, db.password, self.config.client_host, db.name
        ))
    }

    pub fn event(&self, database_id: &str, kind: &str, message: impl Into<String>) {
        let event = Event { at: now_rfc3339(), kind: kind.into(), message: message.into() };
        info!(database = database_id, kind, message = %event.message, "event");
        if let Err(e) = self.store.add_event(database_id, &event) {
            error!(error = %e, "cannot record event");
        }
    }

    /// Builds the routing table from the store with a new epoch and hands it to the publisher
    /// (which pushes it in the background: this never waits on a proxy). With etcd, the table
    /// goes to etcd with its epoch, sealed for the proxies that watch it.
    pub fn publish_routes(&self) -> Result<u64, StoreError> {
        let databases = self.store.databases()?;
        let node_ca = self.ca.cert_pem();
        let mut table = table::build(&databases, &self.holds, &self.verifiers, node_ca, 0);
        let sealed = pgwarden_api::sealed::seal_table(&self.config.proxy_token, &table);
        let epoch = self.store.next_epoch(&sealed)?;
        table.epoch = epoch;
        self.metrics.epoch.set(epoch as i64);
        self.publisher.publish(table);
        Ok(epoch)
    }
}

pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or_else(|_| time::OffsetDateTime::now_utc())
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
