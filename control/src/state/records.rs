//! What the control plane persists about each database.

use std::path::PathBuf;

use pgwarden_api::control::{DatabaseStatus, NodeRole};
use serde::{Deserialize, Serialize};

#[derive(Clone, Serialize, Deserialize)]
pub struct DatabaseRecord {
    pub id: String,
    /// PostgreSQL database name, and name of the default user (the id with `-` as `_`).
    pub name: String,
    pub plan: String,
    pub status: DatabaseStatus,
    pub force_tls: bool,
    /// Password of the default user, kept so that `DATABASE_URL` can be given again.
    pub password: String,
    /// Password of the replication role, used by standbys.
    pub replication_password: String,
    pub nodes: Vec<NodeRecord>,
    pub users: Vec<UserRecord>,
    pub created_at: String,
    /// Why the database is `failed`.
    #[serde(default)]
    pub error: Option<String>,
    /// Commits wait for the standby (false: none, or degraded to asynchronous).
    #[serde(default)]
    pub synchronous: bool,
    /// Hour (UTC) of the daily backup.
    #[serde(default = "default_backup_hour")]
    pub backup_hour_utc: u8,
    /// Directory of the server build new nodes run (`None`: the default build).
    #[serde(default)]
    pub engine: Option<PathBuf>,
    /// A major upgrade in progress: the new cluster being filled (a restart rolls it back).
    #[serde(default)]
    pub upgrade: Option<MajorUpgrade>,
    /// Clusters a major upgrade replaced: kept stopped for the rollback window, then removed.
    #[serde(default)]
    pub retired: Vec<RetiredCluster>,
    /// The proxies' limits set for this database (`None`: the plan's).
    #[serde(default)]
    pub limits: pgwarden_api::control::SetLimits,
}

/// A major upgrade between its first new node and the swap of the routes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MajorUpgrade {
    /// The version the new cluster runs.
    pub version: String,
    /// Directory of its server build.
    pub engine: Option<PathBuf>,
    /// The new cluster's nodes (the first is its primary).
    pub nodes: Vec<NodeRecord>,
    /// The old database's connection limit, set to 0 during the hold; restored on rollback.
    #[serde(default)]
    pub connection_limit: Option<i32>,
}

/// The nodes of a cluster a major upgrade replaced, stopped.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RetiredCluster {
    pub version: String,
    pub nodes: Vec<NodeRecord>,
    /// When they are removed (RFC 3339).
    pub remove_after: String,
}

fn default_backup_hour() -> u8 {
    1
}

/// Everything but the passwords.
impl std::fmt::Debug for DatabaseRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseRecord")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("plan", &self.plan)
            .field("status", &self.status)
            .field("force_tls", &self.force_tls)
            .field("nodes", &self.nodes)
            .field("users", &self.users)
            .field("created_at", &self.created_at)
            .field("error", &self.error)
            .field("synchronous", &self.synchronous)
            .field("backup_hour_utc", &self.backup_hour_utc)
            .field("engine", &self.engine)
            .field("upgrade", &self.upgrade)
            .field("retired", &self.retired)
            .finish_non_exhaustive()
    }
}

impl DatabaseRecord {
    pub fn primary(&self) -> Option<&NodeRecord> {
        self.nodes.iter().find(|n| n.role == NodeRole::Primary)
    }

    /// Replicas that serve (not fenced).
    pub fn replicas(&self) -> impl Iterator<Item = &NodeRecord> {
        self.nodes.iter().filter(|n| n.role == NodeRole::Replica && !n.fenced)
    }

    /// Every node the record holds: its own, a major upgrade's new ones, retired clusters'
    /// (they all keep their names, ports and directories).
    pub fn all_nodes(&self) -> impl Iterator<Item = &NodeRecord> {
        let upgrading = self.upgrade.iter().flat_map(|u| u.nodes.iter());
        let retired = self.retired.iter().flat_map(|r| r.nodes.iter());
        self.nodes.iter().chain(upgrading).chain(retired)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    pub role: NodeRole,
    pub host: String,
    pub port: u16,
    /// The node's own directory: `data/`, socket, log, certificates.
    pub dir: PathBuf,
    /// Fenced after a failover: never routed to; rejoins as a standby when it can.
    #[serde(default)]
    pub fenced: bool,
    /// Directory of the server build the node runs (`None`: the default build).
    #[serde(default)]
    pub engine: Option<PathBuf>,
    /// Address of the agent that owns the node on another host (`None`: this host).
    #[serde(default)]
    pub agent: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UserRecord {
    pub name: String,
    pub read_only: bool,
    pub default: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_prints_a_password() {
        let record = DatabaseRecord {
            id: "a-1".into(),
            name: "a_1".into(),
            plan: "postgresql-sandbox".into(),
            status: DatabaseStatus::Running,
            force_tls: false,
            password: "userSecret123".into(),
            replication_password: "replicationSecret456".into(),
            nodes: vec![],
            users: vec![],
            created_at: "2026-01-01T00:00:00Z".into(),
            error: None,
            synchronous: false,
            backup_hour_utc: 1,
            engine: None,
            upgrade: None,
            retired: vec![],
            limits: Default::default(),
        };
        let shown = format!("{record:?}");
        assert!(shown.contains("a_1"), "{shown}");
        assert!(!shown.contains("userSecret123") && !shown.contains("replicationSecret456"));
    }
}
