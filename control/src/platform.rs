//! The control plane's shared state and the operations it runs on databases.
//!
//! One `Platform` per `pgwarden serve`: the store, the node driver, the platform CA, the route
//! publisher. Long operations (`provision.rs`) run as tasks tracked in the store; changes to a
//! database are serialized by a per-database lock.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use pgwarden_api::control::{DatabaseStatus, Event, NodeRole, Operation, OperationStatus};
use pgwarden_api::{DatabaseRoute, RoutingTable};
use pgwarden_certs::Ca;
use tokio::sync::Mutex as AsyncMutex;
use tracing::{error, info};

use crate::driver::{NodeDriver, NodeSpec};
use crate::metrics::Metrics;
use crate::publisher::Publisher;
use crate::records::{DatabaseRecord, NodeRecord};
use crate::store::{Store, StoreError};

/// How `pgwarden serve` is set up.
#[derive(Clone, Debug)]
pub struct PlatformConfig {
    pub data_dir: PathBuf,
    /// Where clients reach the proxies: host and port of every `DATABASE_URL`.
    pub client_host: String,
    pub client_port: u16,
    /// Admin addresses (`host:port`) of the proxies to publish routes to.
    pub proxies: Vec<String>,
    /// Bearer token of the proxies' admin APIs.
    pub proxy_token: String,
    /// Address nodes listen on.
    pub node_host: String,
    /// First port tried for new nodes; ports go up from there.
    pub first_node_port: u16,
    /// Health checks and failover.
    pub health: HealthConfig,
    /// How often the backup scheduler looks for due backups.
    pub backup_tick: std::time::Duration,
    /// Extra `postgresql.conf` settings for every new node (value as PostgreSQL expects it,
    /// quoted where needed), e.g. `shared_preload_libraries`.
    pub extra_settings: Vec<(String, String)>,
}

/// How nodes are watched and when a primary is declared dead.
#[derive(Clone, Debug)]
pub struct HealthConfig {
    /// Time between two checks of a node.
    pub interval: std::time::Duration,
    /// Consecutive failed checks before the primary is declared dead (default 3 × 500 ms:
    /// about 1.5 s).
    pub failures: u32,
    /// How long one check may take.
    pub timeout: std::time::Duration,
    /// A standby that was not synchronous may be promoted only if it lagged at most this many
    /// bytes at the last check; beyond, failover is refused (acknowledged commits could be lost).
    pub max_failover_lag_bytes: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            interval: std::time::Duration::from_millis(500),
            failures: 3,
            timeout: std::time::Duration::from_millis(400),
            max_failover_lag_bytes: 0,
        }
    }
}

pub struct Platform {
    pub config: PlatformConfig,
    pub store: Store,
    pub driver: Arc<dyn NodeDriver>,
    pub ca: Ca,
    pub metrics: Metrics,
    pub publisher: Publisher,
    locks: Mutex<HashMap<String, Arc<AsyncMutex<()>>>>,
    /// Databases whose new sessions the proxies hold (switchover in progress).
    pub held: Mutex<std::collections::HashSet<String>>,
    pub backups: Arc<dyn crate::storage::BackupStorage>,
    pub heartbeats: crate::pitr::Heartbeats,
    /// Directory of the PostgreSQL client programs (pg_dump, pg_restore).
    pub pg_bin: PathBuf,
}

impl Platform {
    pub fn new(
        config: PlatformConfig,
        store: Store,
        driver: Arc<dyn NodeDriver>,
        ca: Ca,
        backups: Arc<dyn crate::storage::BackupStorage>,
        pg_bin: PathBuf,
    ) -> Arc<Self> {
        let metrics = Metrics::new();
        let publisher =
            Publisher::start(config.proxies.clone(), config.proxy_token.clone(), metrics.clone());
        Arc::new(Self {
            config,
            store,
            driver,
            ca,
            metrics,
            publisher,
            locks: Mutex::default(),
            held: Mutex::default(),
            backups,
            heartbeats: Default::default(),
            pg_bin,
        })
    }

    /// The lock that serializes changes to one database.
    pub fn lock(&self, id: &str) -> Arc<AsyncMutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(locks.entry(id.to_owned()).or_default())
    }

    pub fn node_spec(&self, node: &NodeRecord) -> NodeSpec {
        NodeSpec {
            name: node.name.clone(),
            dir: node.dir.clone(),
            host: node.host.clone(),
            port: node.port,
        }
    }

    pub fn nodes_dir(&self) -> PathBuf {
        self.config.data_dir.join("nodes")
    }

    /// Records for `count` new nodes of database `id`, named `<id>-<first>`, `<id>-<first+1>`...
    /// (the first is the primary), on free ports, each in a directory of its own for this attempt
    /// (a program orphaned by an interrupted attempt may still write into an earlier one).
    pub fn new_nodes(
        &self,
        id: &str,
        first: u32,
        count: usize,
    ) -> Result<Vec<NodeRecord>, StoreError> {
        let attempt: u16 = rand::random();
        let ports = self.allocate_ports(count)?;
        Ok(ports
            .into_iter()
            .enumerate()
            .map(|(i, port)| {
                let name = format!("{id}-{}", first + i as u32);
                NodeRecord {
                    role: if i == 0 { NodeRole::Primary } else { NodeRole::Replica },
                    host: self.config.node_host.clone(),
                    port,
                    dir: self.nodes_dir().join(format!("{name}.{attempt:04x}")),
                    name,
                    fenced: false,
                }
            })
            .collect())
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

    /// Ports that no node of this platform uses and nothing else holds now, from
    /// `first_node_port` up.
    pub fn allocate_ports(&self, count: usize) -> Result<Vec<u16>, StoreError> {
        let used: Vec<u16> =
            self.store.databases()?.iter().flat_map(|d| d.nodes.iter().map(|n| n.port)).collect();
        let host = self.config.node_host.as_str();
        Ok((self.config.first_node_port..=u16::MAX)
            .filter(|p| !used.contains(p) && std::net::TcpListener::bind((host, *p)).is_ok())
            .take(count)
            .collect())
    }

    pub fn event(&self, database_id: &str, kind: &str, message: impl Into<String>) {
        let event = Event { at: now_rfc3339(), kind: kind.into(), message: message.into() };
        info!(database = database_id, kind, message = %event.message, "event");
        if let Err(e) = self.store.add_event(database_id, &event) {
            error!(error = %e, "cannot record event");
        }
    }

    /// Builds the routing table from the store with a new epoch and hands it to the publisher.
    pub fn publish_routes(&self) -> Result<u64, StoreError> {
        let mut databases = std::collections::BTreeMap::new();
        for db in self.store.databases()? {
            if !matches!(db.status, DatabaseStatus::Running | DatabaseStatus::Updating) {
                continue;
            }
            let Some(primary) = db.primary() else { continue };
            let route = DatabaseRoute {
                force_tls: db.force_tls,
                primary: format!("{}:{}", primary.host, primary.port),
                replicas: db.replicas().map(|n| format!("{}:{}", n.host, n.port)).collect(),
                hold: self.held.lock().unwrap_or_else(|e| e.into_inner()).contains(&db.id),
            };
            databases.insert(db.name.clone(), route);
        }
        let epoch = self.store.next_counter("epoch")?;
        self.metrics.epoch.set(epoch as i64);
        self.publisher.publish(RoutingTable { epoch, databases });
        Ok(epoch)
    }

    /// Records a new operation on `database_id`, pending.
    pub fn new_operation(&self, kind: &str, database_id: &str) -> Result<Operation, StoreError> {
        let op = Operation {
            id: format!("op-{}", self.store.next_counter("operation_seq")?),
            kind: kind.into(),
            database_id: database_id.into(),
            status: OperationStatus::Pending,
            progress: 0.0,
            error: None,
        };
        self.store.put_operation(&op)?;
        Ok(op)
    }

    pub fn update_operation(&self, op: &mut Operation, status: OperationStatus, progress: f64) {
        op.status = status;
        op.progress = progress;
        if let Err(e) = self.store.put_operation(op) {
            error!(error = %e, operation = %op.id, "cannot record operation progress");
        }
    }
}

pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or_else(|_| time::OffsetDateTime::now_utc())
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
