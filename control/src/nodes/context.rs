//! What workflows use to reach nodes: the driver (this host's, or its agent's), superuser
//! sessions, the platform CA, ports, the engines installed, and where new nodes go.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use pgwarden_certs::Ca;
use tokio::io::{AsyncRead, AsyncWrite};

use super::config::{node_config, ConfigError};
use super::engines::Engines;
use super::kept::{Kept, Purpose};
use super::placement::Hosts;
use super::ports::Ports;
use super::sql::{Session, SqlError, Timeouts};
use super::{NodeConfig, NodeDriver, NodeSpec};
use crate::coord::{Etcd, Leadership};
use crate::httpc::HttpError;
use crate::state::{DatabaseRecord, NodeRecord};

/// A byte stream to a node's socket.
pub trait ByteStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> ByteStream for T {}

/// A stream being opened to a node's socket.
pub type Opening<'a> =
    Pin<Box<dyn Future<Output = Result<Box<dyn ByteStream>, HttpError>> + Send + 'a>>;

/// Streams to the sockets of nodes on other hosts, through their agents (`agent::client`).
pub trait Tunnels: Send + Sync {
    /// A stream to `node`'s socket, opened within `within`.
    fn open<'a>(&'a self, node: &'a NodeSpec, within: Duration) -> Opening<'a>;
}

pub struct Nodes {
    /// Every node's driver: this host's, or its agent's.
    pub driver: Arc<dyn NodeDriver>,
    /// Sessions through the agents.
    pub tunnels: Arc<dyn Tunnels>,
    pub ca: Ca,
    pub ports: Ports,
    /// The PostgreSQL builds installed, found at start.
    pub engines: Engines,
    /// Directory of the PostgreSQL client programs of the default engine.
    pub pg_bin: PathBuf,
    pub hosts: Hosts,
    /// Extra `postgresql.conf` settings for every node.
    pub extra_settings: Vec<(String, String)>,
    /// With control planes on etcd: this one's leadership. Once it is lost (or its lease ran
    /// out unrenewed: the process was frozen), the plane acts on no node.
    pub leadership: Option<Arc<Leadership>>,
    /// With control planes on etcd: the connection, where the agents' leases live (an agent
    /// cut off from it fences its host's primaries).
    pub etcd: Option<Etcd>,
    /// Sessions kept open for the reads the platform repeats (`kept.rs`).
    pub kept: Kept,
}

/// How long the node lets a statement of a kept session for [`Purpose::Reads`] run (each
/// read has its own, shorter or not, bound on the client's side).
const READS_STATEMENT: Duration = Duration::from_secs(10);

impl Nodes {
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
        let tunnel = self.tunnels.open(node, timeouts.connect).await.map_err(|e| {
            SqlError::Unreachable { node: node.name.clone(), reason: e.to_string() }
        })?;
        Session::open_over(&node.name, tunnel, database, timeouts).await
    }

    /// Runs `read` on the session kept on `node` for `purpose`, opened first when there is none
    /// (within `timeouts.connect`); the whole read is bounded by `timeouts.statement`. A failure
    /// that leaves the session unusable (no answer in time, connection gone) drops it: the next
    /// read opens a new one.
    pub async fn read_kept<T>(
        &self,
        node: &NodeSpec,
        purpose: Purpose,
        timeouts: Timeouts,
        read: impl AsyncFnOnce(&Session) -> Result<T, SqlError>,
    ) -> Result<T, SqlError> {
        let session = match self.kept.get(node, purpose).filter(|_| self.leads()) {
            Some(session) => session,
            None => {
                // The node's own bound on each statement: the longest any read of this
                // purpose allows.
                let statement = match purpose {
                    Purpose::Health => timeouts.statement,
                    Purpose::Reads => READS_STATEMENT,
                };
                let bounds = Timeouts { statement, ..timeouts };
                let opened = self.session_within(node, "postgres", bounds).await?;
                self.kept.put(node, purpose, opened)
            }
        };
        let after = timeouts.statement;
        let result = tokio::time::timeout(after, read(&session))
            .await
            .unwrap_or_else(|_| Err(SqlError::Timeout { node: node.name.clone(), after }));
        // A node that did not answer in time (a statement may still run on it) or a connection
        // gone spoils the session; an error of PostgreSQL's leaves it usable.
        if result.as_ref().is_err_and(SqlError::unreachable) {
            self.kept.forget(&node.name, purpose, &session);
        }
        result
    }

    /// Stops `node` if needed and deletes everything it had.
    pub async fn destroy(&self, node: &NodeRecord) -> super::driver::Done {
        self.kept.retain(|name| name != node.name);
        let destroyed = self.driver.destroy(&NodeSpec::of(node)).await;
        if destroyed.is_ok() {
            self.ports.release(node.port);
        }
        destroyed
    }

    /// The configuration of `node` of `db` (see `nodes::config`).
    pub fn config(
        &self,
        db: &DatabaseRecord,
        node: &NodeRecord,
        sync_standby: Option<&str>,
    ) -> Result<NodeConfig, ConfigError> {
        node_config(&self.ca, &self.extra_settings, db, node, sync_standby)
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
}

impl NodeSpec {
    /// What the driver needs to know of `node`.
    pub fn of(node: &NodeRecord) -> Self {
        Self {
            name: node.name.clone(),
            dir: node.dir.clone(),
            host: node.host.clone(),
            port: node.port,
            bin: node.engine.clone(),
            agent: node.agent.clone(),
        }
    }
}
