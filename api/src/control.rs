//! Bodies of the control HTTP API (SPEC §4).

use serde::{Deserialize, Serialize};

/// One plan of the catalogue (SPEC §3).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub name: String,
    /// 1 (primary only) or 2 (primary + synchronous standby).
    pub nodes: u32,
    pub memory_mib: u64,
    pub max_connections: u32,
    pub daily_backups: u32,
    pub weekly_backups: u32,
    pub monthly_backups: u32,
    pub manual_backups_max: u32,
    pub pitr: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DatabaseStatus {
    Provisioning,
    Running,
    Updating,
    Restoring,
    Failed,
    Deleting,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeRole {
    Primary,
    Replica,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    pub role: NodeRole,
    /// `running`, `stopped`, `starting`, `failed`.
    pub status: String,
    pub host: String,
    pub port: u16,
    /// Bytes of WAL the replica has yet to replay (0 on the primary).
    pub lag_bytes: u64,
    pub version: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsSettings {
    pub force: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Database {
    pub id: String,
    pub name: String,
    pub plan: String,
    pub status: DatabaseStatus,
    pub database_url: String,
    pub tls: TlsSettings,
    pub epoch: u64,
    pub nodes: Vec<Node>,
    /// `synchronous` (commits wait for the standby), `asynchronous` (degraded: the standby is
    /// missing or catching up) or `none` (single node).
    pub replication: String,
    /// RFC 3339.
    pub created_at: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateDatabase {
    pub name: String,
    pub plan: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OperationStatus {
    Pending,
    Running,
    Succeeded,
    Failed,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Operation {
    pub id: String,
    /// `provision`, `destroy`, ...
    pub kind: String,
    pub database_id: String,
    pub status: OperationStatus,
    pub progress: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Answer of `POST /v1/databases` and of other calls that start an operation on a database.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DatabaseOperation {
    pub database: Database,
    pub operation: Operation,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Env {
    #[serde(rename = "DATABASE_URL")]
    pub database_url: String,
    #[serde(rename = "PGWARDEN_POSTGRESQL_URL")]
    pub pgwarden_postgresql_url: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub name: String,
    pub read_only: bool,
    /// The database's default user: cannot be deleted.
    pub default: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateUser {
    pub name: String,
    #[serde(default)]
    pub read_only: bool,
}

/// A user with its password: answered once, at creation or reset.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UserWithPassword {
    #[serde(flatten)]
    pub user: User,
    pub password: String,
    pub database_url: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetTls {
    pub force: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Event {
    pub at: String,
    pub kind: String,
    pub message: String,
}
