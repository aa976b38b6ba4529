//! The arguments of the server's own commands: `serve`, `up`, `agent`, `agent-cert` and
//! `init` (the client's commands are `cli::Command`).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Subcommand;

/// The commands that run a part of the platform.
#[derive(Subcommand)]
pub enum Command {
    /// Run the control API (nodes keep running when it stops).
    Serve(ServeArgs),
    /// Run the whole platform locally: control API, two proxies, one database.
    Up(UpArgs),
    /// Run the node agent of a database host (serves the control plane over mutual TLS).
    Agent(AgentArgs),
    /// Issue an agent's certificate from the platform CA in the data dir.
    AgentCert(AgentCertArgs),
    /// Create the data dir's secrets (API token, proxies' token, secret key, platform CA) if
    /// missing, without serving: control planes sharing one etcd copy them before they start.
    Init,
}

#[derive(clap::Args)]
pub struct ServeArgs {
    #[arg(long, default_value = "127.0.0.1:9180")]
    pub listen: SocketAddr,
    /// Admin address of a proxy to publish routes to (repeat for each proxy).
    #[arg(long = "proxy-admin")]
    pub proxy_admins: Vec<String>,
    /// File with the proxies' admin token.
    #[arg(long)]
    pub proxy_token_file: Option<PathBuf>,
    /// Where clients reach the proxies (host:port in every DATABASE_URL).
    #[arg(long, default_value = "127.0.0.1:6432")]
    pub client_addr: String,
    /// Where clients reach the proxies' transaction pooling (DATABASE_POOL_URL); none without.
    #[arg(long)]
    pub client_pool_addr: Option<String>,
    /// Address (host:port) of a node agent whose host runs nodes (repeat for each host);
    /// without any, nodes run on this host.
    #[arg(long = "agent")]
    pub agents: Vec<String>,
    /// The agents' `--dir` (default /var/lib/pgwarden-agent): their nodes' directories are
    /// under `<dir>/nodes`.
    #[arg(long)]
    pub agent_root: Option<PathBuf>,
    /// Where backups and the WAL archive are kept (default `<data-dir>/backups`). Control
    /// planes sharing one etcd must all point it at storage they all mount (NFS, a shared
    /// volume): a new leader then has its predecessor's backups and archive.
    #[arg(long)]
    pub backup_dir: Option<PathBuf>,
    /// With `--etcd`, the state lives in etcd and of several control planes only the leader
    /// acts; the others stand by (their API answers 503). The lease is the leader's: how long
    /// a dead leader keeps the standbys waiting.
    #[command(flatten)]
    pub etcd: EtcdArgs,
    #[command(flatten)]
    pub nodes: NodeArgs,
}

/// etcd, for control planes and agents on several hosts.
#[derive(clap::Args)]
pub struct EtcdArgs {
    /// etcd members' client URLs (comma-separated or repeated).
    #[arg(long = "etcd", value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// Prefix of pgwarden's keys in etcd.
    #[arg(long, default_value = "pgwarden")]
    pub etcd_prefix: String,
    /// TTL of this process's lease in etcd (seconds). It must outlast an etcd leader
    /// election: 5 s with etcd's default timing; 3 s with `--heartbeat-interval 50
    /// --election-timeout 500` on a LAN.
    #[arg(long, default_value_t = 5)]
    pub lease_ttl_secs: u64,
    /// The address others know this process by (default: --listen).
    #[arg(long)]
    pub advertise: Option<String>,
}

#[derive(clap::Args)]
pub struct AgentArgs {
    /// Address the control plane reaches this agent on (mutual TLS).
    #[arg(long, default_value = "0.0.0.0:9190")]
    pub listen: SocketAddr,
    /// Where the nodes' directories go (`<dir>/nodes`; default /var/lib/pgwarden-agent).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Directory with `ca.crt`, `agent.crt` and `agent.key` (made by `pgwarden agent-cert`).
    #[arg(long)]
    pub tls_dir: PathBuf,
    /// OS user nodes run as when the agent runs as root.
    #[arg(long, default_value = "postgres")]
    pub node_user: String,
    /// With `--etcd`, the agent holds a lease there and kills this host's primaries when cut
    /// off from etcd longer than the lease allows (before a standby elsewhere may be promoted);
    /// `--advertise` must be the address the control planes know it by (their `--agent`).
    #[command(flatten)]
    pub etcd: EtcdArgs,
}

#[derive(clap::Args)]
pub struct AgentCertArgs {
    /// Names and addresses the control plane reaches the agent by (repeat).
    #[arg(long = "address", required = true)]
    pub addresses: Vec<String>,
    /// Directory to write `ca.crt`, `agent.crt` and `agent.key` (0600) to.
    #[arg(long)]
    pub out: PathBuf,
}

/// Where nodes run and how they are watched: the options `serve` and `up` share.
#[derive(clap::Args, Clone)]
pub struct NodeArgs {
    /// First port tried for nodes.
    #[arg(long, default_value_t = 15432)]
    pub first_node_port: u16,
    /// OS user nodes run as when pgwarden runs as root.
    #[arg(long, default_value = "postgres")]
    pub node_user: String,
    /// More PostgreSQL builds, one per subdirectory (`<dir>/<name>/bin`), beside Debian's.
    #[arg(long)]
    pub engines_dir: Option<PathBuf>,
    /// Seconds a cluster replaced by a major upgrade is kept, stopped, before it is removed.
    #[arg(long, default_value_t = 86_400)]
    pub rollback_window_secs: u64,
    /// Seconds between two samples of every node's stats (CPU, memory, sessions, sizes).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub stats_interval_secs: u64,
    /// Hours of stats history kept (charts, `/stats/history`).
    #[arg(long, default_value_t = 168, value_parser = clap::value_parser!(u64).range(1..))]
    pub stats_retention_hours: u64,
    #[command(flatten)]
    pub health: HealthArgs,
}

/// Health checks and failover.
#[derive(clap::Args, Clone)]
pub struct HealthArgs {
    /// Milliseconds between two checks of a primary.
    #[arg(long, default_value_t = 500)]
    pub health_interval_ms: u64,
    /// Failed checks in a row before the primary is declared dead.
    #[arg(long, default_value_t = 3)]
    pub health_failures: u32,
    /// A standby that was not synchronous is promoted only if it lagged at most this much.
    #[arg(long, default_value_t = 0)]
    pub max_failover_lag_bytes: u64,
}

#[derive(clap::Args)]
pub struct UpArgs {
    #[arg(long, default_value = "postgresql-business-1024")]
    pub plan: String,
    #[arg(long, default_value = "my-app")]
    pub name: String,
    /// Control API address.
    #[arg(long, default_value = "127.0.0.1:9180")]
    pub listen: SocketAddr,
    /// Client address of the proxies.
    #[arg(long, default_value = "127.0.0.1:6432")]
    pub client_listen: SocketAddr,
    /// Transaction-pooling address of the proxies (DATABASE_POOL_URL).
    #[arg(long, default_value = "127.0.0.1:6433")]
    pub client_pool_listen: SocketAddr,
    /// Admin addresses of the two proxies.
    #[arg(long, num_args = 2, default_values = ["127.0.0.1:9181", "127.0.0.1:9182"])]
    pub proxy_admin: Vec<SocketAddr>,
    #[command(flatten)]
    pub nodes: NodeArgs,
}
