//! How `pgwarden serve` is set up.

use std::path::PathBuf;

use crate::ha::HealthConfig;

#[derive(Clone)]
pub struct PlatformConfig {
    pub data_dir: PathBuf,
    /// Backups and the WAL archive (`serve --backup-dir`; by default `<data_dir>/backups`).
    pub backup_dir: PathBuf,
    /// Where clients reach the proxies: host and port of every `DATABASE_URL`.
    pub client_host: String,
    pub client_port: u16,
    /// The proxies' transaction-pooling port on the same host (`DATABASE_POOL_URL`), if any.
    pub client_pool_port: Option<u16>,
    /// Admin addresses (`host:port`) of the proxies to publish routes to.
    pub proxies: Vec<String>,
    /// Bearer token of the proxies' admin APIs.
    pub proxy_token: String,
    /// Address nodes of this host listen on.
    pub node_host: String,
    /// Agents (`host:port`) whose hosts run the nodes; none: nodes run on this host.
    pub agents: Vec<String>,
    /// The agents' root directory (`pgwarden agent --dir`): nodes go to `<root>/nodes`.
    pub agent_root: PathBuf,
    /// First port tried for new nodes; ports go up from there.
    pub first_node_port: u16,
    /// Health checks and failover.
    pub health: HealthConfig,
    /// How often the backup scheduler looks for due backups.
    pub backup_tick: std::time::Duration,
    /// Extra `postgresql.conf` settings for every new node (value as PostgreSQL expects it,
    /// quoted where needed), e.g. `shared_preload_libraries`.
    pub extra_settings: Vec<(String, String)>,
    /// More PostgreSQL builds, one per subdirectory (`<dir>/<name>/bin`), beside Debian's.
    pub engines_dir: Option<PathBuf>,
    /// How long a cluster a major upgrade replaced is kept (stopped) before it is removed.
    pub rollback_window: std::time::Duration,
    /// How often every node's stats are sampled.
    pub stats_interval: std::time::Duration,
    /// How long samples are kept in the stats history.
    pub stats_retention: std::time::Duration,
    /// State in etcd and a leader among several control planes; none: the embedded store.
    pub etcd: Option<crate::coord::EtcdSettings>,
}

/// Everything but the proxies' token.
impl std::fmt::Debug for PlatformConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlatformConfig")
            .field("data_dir", &self.data_dir)
            .field("backup_dir", &self.backup_dir)
            .field("client_host", &self.client_host)
            .field("client_port", &self.client_port)
            .field("client_pool_port", &self.client_pool_port)
            .field("proxies", &self.proxies)
            .field("node_host", &self.node_host)
            .field("agents", &self.agents)
            .field("first_node_port", &self.first_node_port)
            .field("health", &self.health)
            .field("backup_tick", &self.backup_tick)
            .field("extra_settings", &self.extra_settings)
            .field("engines_dir", &self.engines_dir)
            .field("rollback_window", &self.rollback_window)
            .field("stats_interval", &self.stats_interval)
            .field("stats_retention", &self.stats_retention)
            .field("etcd", &self.etcd)
            .finish_non_exhaustive()
    }
}
