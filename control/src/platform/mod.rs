//! The platform as the API and the server hold it: the contexts workflows act through
//! (`state::Records`, `nodes::Nodes`, `routing::Routing`, `ha::PrimaryChanges`), the backup
//! storage, the metrics and the configuration, composed once at start.

pub mod config;

use std::path::PathBuf;
use std::sync::Arc;

use pgwarden_certs::Ca;

pub use config::PlatformConfig;

use crate::agent::client::{Placed, RemoteDriver};
use crate::changes::Changes;
use crate::ha::{Ha, PrimaryChanges};
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use crate::nodes::engines::Engines;
use crate::nodes::ports::Ports;
use crate::nodes::{Hosts, NodeDriver, Nodes};
use crate::operations::Operations;
use crate::pitr::Pitr;
use crate::routing::refresh::Refresh;
use crate::routing::{ClientAddress, Delivery, Publisher, Routing};
use crate::state::{Records, Store};
use crate::storage::BackupStorage;

pub struct Platform {
    pub config: PlatformConfig,
    pub records: Arc<Records>,
    pub nodes: Arc<Nodes>,
    pub routing: Arc<Routing>,
    pub claims: Arc<PrimaryChanges>,
    pub metrics: Metrics,
    pub operations: Operations,
    pub backups: Arc<dyn BackupStorage>,
    /// Turns of provisions (`lifecycle::PROVISIONS_AT_ONCE`).
    pub provisions: Arc<tokio::sync::Semaphore>,
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
        let metrics = Metrics::new();
        // With etcd, the proxies watch the table there: the publisher only sees them apply it.
        let delivery = if config.etcd.is_some() { Delivery::Watched } else { Delivery::Push };
        let token = config.proxy_token.clone();
        let publisher = Publisher::start(config.proxies.clone(), token, delivery, metrics.clone());
        let clients = ClientAddress {
            host: config.client_host.clone(),
            port: config.client_port,
            pool_port: config.client_pool_port,
        };
        let routing = Routing::new(
            publisher,
            clients,
            ca.cert_pem().to_owned(),
            config.proxy_token.clone(),
            metrics.clone(),
        );
        let driver =
            Arc::new(Placed { local, remote: Arc::clone(&remote), leadership: leadership.clone() });
        let nodes = Nodes {
            driver,
            tunnels: remote,
            ca,
            ports: Ports::default(),
            engines: Engines::discover(config.engines_dir.as_deref()),
            pg_bin,
            hosts: Hosts {
                agents: config.agents.clone(),
                node_host: config.node_host.clone(),
                first_port: config.first_node_port,
                nodes_dir: config.data_dir.join("nodes"),
                agent_nodes_dir: config.agent_root.join("nodes"),
            },
            extra_settings: config.extra_settings.clone(),
            leadership,
            etcd,
            kept: Default::default(),
        };
        let records = Arc::new(Records::new(store));
        Arc::new(Self {
            config,
            operations: Operations::new(Arc::clone(&records), metrics.clone()),
            records,
            nodes: Arc::new(nodes),
            routing: Arc::new(routing),
            claims: Arc::default(),
            metrics,
            backups,
            provisions: Arc::new(tokio::sync::Semaphore::new(crate::lifecycle::PROVISIONS_AT_ONCE)),
        })
    }

    /// What the watchers and failovers act with.
    pub fn ha(&self) -> Ha {
        Ha {
            records: Arc::clone(&self.records),
            nodes: Arc::clone(&self.nodes),
            routing: Arc::clone(&self.routing),
            claims: Arc::clone(&self.claims),
            metrics: self.metrics.clone(),
            health: self.config.health.clone(),
        }
    }

    /// What provisioning and destruction act with.
    pub fn lifecycle(&self) -> Lifecycle {
        Lifecycle {
            records: Arc::clone(&self.records),
            nodes: Arc::clone(&self.nodes),
            routing: Arc::clone(&self.routing),
            operations: self.operations.clone(),
            backups: Arc::clone(&self.backups),
            provisions: Arc::clone(&self.provisions),
        }
    }

    /// What changes of running databases act with.
    pub fn changes(&self) -> Changes {
        Changes {
            records: Arc::clone(&self.records),
            nodes: Arc::clone(&self.nodes),
            routing: Arc::clone(&self.routing),
            claims: Arc::clone(&self.claims),
            operations: self.operations.clone(),
            backups: Arc::clone(&self.backups),
            backup_dir: self.config.backup_dir.clone(),
            rollback_window: self.config.rollback_window,
        }
    }

    /// What archiving and restores act with.
    pub fn pitr(&self) -> Pitr {
        Pitr {
            records: Arc::clone(&self.records),
            nodes: Arc::clone(&self.nodes),
            routing: Arc::clone(&self.routing),
            metrics: self.metrics.clone(),
            backup_dir: self.config.backup_dir.clone(),
            data_dir: self.config.data_dir.clone(),
        }
    }

    /// What keeping the proxies' verifiers fresh needs.
    pub fn refresh(&self) -> Refresh {
        Refresh {
            records: Arc::clone(&self.records),
            nodes: Arc::clone(&self.nodes),
            routing: Arc::clone(&self.routing),
            within: self.config.health.timeout,
        }
    }
}
