//! The node driver interface: how the control plane creates, starts and removes PostgreSQL
//! nodes. `local.rs` runs them as processes on this host (on a blocking thread, once per
//! call), `agent::client` on other hosts through their agents; other drivers (containers, VMs)
//! can implement the same trait.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;

/// Everything a driver needs to know about one node.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct NodeSpec {
    pub name: String,
    /// The node's directory on its host.
    pub dir: PathBuf,
    pub host: String,
    pub port: u16,
    /// Directory of the server build the node runs (`initdb`, `pg_ctl`, `postgres`); `None`:
    /// the driver's default.
    pub bin: Option<PathBuf>,
    /// Address (`host:port`) of the agent that owns the node on another host; `None`: this
    /// host.
    #[serde(default)]
    pub agent: Option<String>,
}

/// Files and settings the control plane decides for a node.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct NodeConfig {
    /// `postgresql.conf` settings (name, value already quoted as PostgreSQL expects).
    pub settings: Vec<(String, String)>,
    /// Whole `pg_hba.conf`.
    pub hba: String,
    /// Server certificate, key, and the CA certificate (PEM).
    pub tls: (String, String, String),
    /// Written to the node's passfile, which its `primary_conninfo` names.
    pub replication_password: String,
    /// Bytes of memory the node's container allows (the plan's), applied when it starts; a
    /// higher one at once.
    pub memory_limit: u64,
}

impl std::fmt::Debug for NodeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeConfig")
            .field("settings", &self.settings)
            .field("hba", &self.hba)
            .field("memory_limit", &self.memory_limit)
            .finish_non_exhaustive()
    }
}

/// Where a standby streams from.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct Upstream {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub slot: String,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("slot", &self.slot)
            .finish_non_exhaustive()
    }
}

/// What a node's container reads now, on the node's host.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct NodeResources {
    /// The container's figures; `None` when the node runs without one.
    pub usage: Option<crate::nodes::cgroup::Usage>,
    /// The container's kind (`v1`, `v2`: cgroup version), when the node has one.
    pub cgroup: Option<String>,
    /// Why the node runs without a container (or a limit), if it does.
    pub unlimited: Option<String>,
}

/// Bytes the node's files take on disk (allocated blocks).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskUsage {
    /// Tables and indexes (`base`, `global`).
    pub data: u64,
    /// `pg_wal`.
    pub wal: u64,
    /// Everything else of the node (logs, configuration, transaction status, WAL to restore).
    pub other: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// A program failed; `detail` is its output's last line as a sentence for clients (the
    /// whole output went to the log).
    #[error("{what} failed: {detail}")]
    Command { what: String, detail: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("PostgreSQL server programs not found in {} (install postgresql-15)", .0.display())]
    NotInstalled(std::path::PathBuf),
    #[error("OS user {name:?} for the nodes: {reason}")]
    OsUser { name: String, reason: &'static str },
    /// `log`: the node's own last log lines, or why it could not be started.
    #[error("node {node} did not start: {log}")]
    NotStarted { node: String, log: String },
    #[error(
        "node {0} was rewound (or a rewind began) and not started since: a second pg_rewind \
         would fork its history; it needs a fresh copy"
    )]
    RewoundNotStarted(String),
    #[error("node {0} is on another host: it is copied afresh rather than rewound")]
    RemoteRewind(String),
    #[error("node {0} has no agent")]
    NoAgent(String),
    #[error("{}", crate::coord::NOT_LEADING)]
    NotLeading,
    #[error("agent {agent}: {source}")]
    AgentUnreachable { agent: String, source: crate::httpc::HttpError },
    /// The agent answered with an error: its sentence.
    #[error("agent {agent}: {message}")]
    AgentRefused { agent: String, message: String },
    /// Moving files to or from an agent failed.
    #[error("agent {agent}: {what} failed: {detail}")]
    Transfer { agent: String, what: String, detail: String },
    #[error("cannot encode or read a driver call: {0}")]
    Encoding(#[from] serde_json::Error),
    #[error("{op} needs the node's {what}")]
    Incomplete { op: &'static str, what: &'static str },
    /// The blocking thread running the call ended without an answer (it panicked).
    #[error("a node operation was interrupted: {0}")]
    Interrupted(String),
}

/// A driver call under way.
pub type Call<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the platform does to nodes, wherever they run: each call is async (this host's driver
/// runs its programs on a blocking thread, an agent's is an HTTP call), bounded by the driver.
pub trait NodeDriver: Send + Sync + 'static {
    /// Creates an empty cluster (initdb) and writes its configuration.
    fn init<'a>(&'a self, node: &'a NodeSpec, config: &'a NodeConfig) -> Call<'a, Done>;
    /// Creates a standby by copying `upstream` (pg_basebackup over TLS), configured to stream.
    fn init_standby<'a>(
        &'a self,
        node: &'a NodeSpec,
        config: &'a NodeConfig,
        upstream: &'a Upstream,
    ) -> Call<'a, Done>;
    /// Rewrites settings and hba; call `reload` or restart to apply.
    fn configure<'a>(&'a self, node: &'a NodeSpec, config: &'a NodeConfig) -> Call<'a, Done>;
    /// Starts the node and waits until it accepts connections. The error carries the node's
    /// own log lines.
    fn start<'a>(&'a self, node: &'a NodeSpec) -> Call<'a, Done>;
    fn stop<'a>(&'a self, node: &'a NodeSpec) -> Call<'a, Done>;
    fn reload<'a>(&'a self, node: &'a NodeSpec) -> Call<'a, Done>;
    fn is_running<'a>(&'a self, node: &'a NodeSpec) -> Call<'a, bool>;
    /// Makes sure the node can serve nothing any more, whatever state it is in (even frozen):
    /// its processes are killed.
    fn fence<'a>(&'a self, node: &'a NodeSpec) -> Call<'a, Done>;
    /// Promotes a standby to primary and waits until it accepts writes.
    fn promote<'a>(&'a self, node: &'a NodeSpec) -> Call<'a, Done>;
    /// Rewinds a stopped former primary onto `source`'s timeline (pg_rewind), so it can follow
    /// it as a standby.
    fn rewind<'a>(&'a self, node: &'a NodeSpec, source: &'a NodeSpec) -> Call<'a, Done>;
    /// As `rewind`, from a source reached over the network (TLS verified against the node's
    /// CA, `source.user` holding only the rights pg_rewind needs): for nodes on other hosts,
    /// where the superuser never logs in. `source.slot` is unused.
    fn rewind_from<'a>(&'a self, node: &'a NodeSpec, source: &'a Upstream) -> Call<'a, Done>;
    /// Marks a stopped node's data directory as a standby's (`standby.signal`).
    fn make_standby<'a>(&'a self, node: &'a NodeSpec) -> Call<'a, Done>;
    /// Creates a node from a base backup directory and WAL files, set to recover (its
    /// `config.settings` carry the recovery target) and then promote. `wal` files are copied
    /// into the node, `.partial` ones under their full name.
    fn init_from_backup<'a>(
        &'a self,
        node: &'a NodeSpec,
        config: &'a NodeConfig,
        base: &'a Path,
        wal: &'a Path,
    ) -> Call<'a, Done>;
    /// The last lines of the node's log.
    fn log_tail<'a>(&'a self, node: &'a NodeSpec) -> Call<'a, String>;
    /// Stops the node if needed and deletes everything it had.
    fn destroy<'a>(&'a self, node: &'a NodeSpec) -> Call<'a, Done>;
    /// Writes a custom-format `pg_dump` of `database` into `file` (which exists, private),
    /// with the client programs of `tools` (a directory on the node's host).
    fn dump<'a>(
        &'a self,
        node: &'a NodeSpec,
        database: &'a str,
        tools: &'a Path,
        file: &'a Path,
    ) -> Call<'a, Done>;
    /// libpq connection string for the superuser, local to the node.
    fn admin_conninfo(&self, node: &NodeSpec, database: &str) -> String;
    /// The node's container figures.
    fn resources<'a>(&'a self, node: &'a NodeSpec) -> Call<'a, NodeResources>;
    /// What the node's files take on disk: a walk of its directory, so asked less often than
    /// its container's figures.
    fn disk<'a>(&'a self, node: &'a NodeSpec) -> Call<'a, DiskUsage>;
}

/// What a driver call that changes a node ends with.
pub type Done = Result<(), DriverError>;

/// What a client is told of a program's output: its last line, without the program's name
/// prefix and with file system paths left out (the whole output goes to the log).
pub fn client_sentence(output: &str) -> String {
    let line = output.lines().rev().map(str::trim).find(|l| !l.is_empty()).unwrap_or("no output");
    let line = line.split_once(": error: ").map_or(line, |(_, rest)| rest);
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(start) = rest.find(['/', '"']) {
        out.push_str(&rest[..start]);
        let tail = &rest[start..];
        if let Some(quoted) = tail.strip_prefix('"') {
            let end = quoted.find('"').map_or(quoted.len(), |e| e);
            let inner = &quoted[..end];
            out.push('"');
            out.push_str(if inner.starts_with('/') { "…" } else { inner });
            out.push('"');
            rest = quoted.get(end + 1..).unwrap_or("");
        } else {
            // A bare path runs to the next blank.
            let end = tail.find(char::is_whitespace).unwrap_or(tail.len());
            out.push('…');
            rest = &tail[end..];
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::client_sentence;

    #[test]
    fn clients_get_a_sentence_without_paths() {
        let stderr = "pg_dump: error: connection to server on socket \"/tmp/x y/.s.PGSQL.5\" failed: Connection refused\n\tIs the server running locally?\n";
        assert_eq!(client_sentence(stderr), "Is the server running locally?");
        assert_eq!(
            client_sentence("pg_dump: error: connection to server on socket \"/tmp/x/.s.PGSQL.5\" failed: refused"),
            "connection to server on socket \"…\" failed: refused"
        );
        assert_eq!(
            client_sentence("FATAL:  could not access file \"no_such_extension\": No such file"),
            "FATAL:  could not access file \"no_such_extension\": No such file"
        );
        assert_eq!(
            client_sentence("cannot open /var/lib/x/data/y for writing"),
            "cannot open … for writing"
        );
    }
}
