//! Bodies of the control HTTP API (SPEC §4).

use serde::{Deserialize, Serialize};

/// One plan of the catalogue (SPEC §3).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum NodeRole {
    Primary,
    Replica,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Node {
    pub name: String,
    pub role: NodeRole,
    /// `running`, `stopped`, `fenced` (a former primary kept from writing until it rejoins),
    /// or `not_streaming` (a running replica its primary does not see replicating: its lag is
    /// unknown).
    pub status: String,
    pub host: String,
    pub port: u16,
    /// Bytes of WAL the replica has yet to replay (0 on the primary).
    pub lag_bytes: u64,
    pub version: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TlsSettings {
    pub force: bool,
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
    /// What the proxies allow this database.
    #[serde(default)]
    pub limits: ClientLimits,
}

/// What the proxies allow one database: clients at once (beyond it a new one is refused with
/// `53300`) and new connections per second (a second's worth at once; beyond it `53300` too).
/// The plan's defaults unless set (`PUT /v1/databases/{id}/limits`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ClientLimits {
    pub client_connections: u32,
    pub connections_per_second: u32,
}

/// Body of `PUT /v1/databases/{id}/limits`: a number replaces the plan's default, `null` or
/// nothing goes back to it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SetLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_connections: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections_per_second: Option<u32>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateDatabase {
    pub name: String,
    pub plan: String,
    /// PostgreSQL build (`GET /v1/engines`); default: the newest of the default major.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// One PostgreSQL build installed on the host (`GET /v1/engines`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Engine {
    /// Full version, `15.18`.
    pub version: String,
    pub major: u32,
    /// Directory of its programs.
    pub dir: String,
    /// New databases get it unless they ask for another.
    pub default: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum OperationStatus {
    Pending,
    Running,
    Succeeded,
    Failed,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Operation {
    pub id: String,
    /// `provision`, `destroy`, ...
    pub kind: String,
    pub database_id: String,
    pub status: OperationStatus,
    pub progress: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// What the user reads when it failed.
    pub error: Option<String>,
    /// A stable code for the failure (`node_unreachable`, `could_lose_commits`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
}

/// Answer of `POST /v1/databases` and of other calls that start an operation on a database.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DatabaseOperation {
    pub database: Database,
    pub operation: Operation,
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Env {
    #[serde(rename = "DATABASE_URL")]
    pub database_url: String,
    #[serde(rename = "PGWARDEN_POSTGRESQL_URL")]
    pub pgwarden_postgresql_url: String,
    /// The same credentials on the proxies' transaction-pooling address.
    #[serde(rename = "DATABASE_POOL_URL", default, skip_serializing_if = "Option::is_none")]
    pub database_pool_url: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct User {
    pub name: String,
    pub read_only: bool,
    /// The database's default user: cannot be deleted.
    pub default: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateUser {
    pub name: String,
    #[serde(default)]
    pub read_only: bool,
}

/// A user with its password: answered once, at creation or reset.
#[derive(Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UserWithPassword {
    #[serde(flatten)]
    pub user: User,
    pub password: String,
    pub database_url: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SetTls {
    pub force: bool,
}

/// Body of `PATCH /v1/databases/{id}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ChangeDatabase {
    pub plan: String,
}

/// Body of `POST /v1/databases/{id}/engine-upgrade`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct EngineUpgrade {
    pub version: String,
    /// Major upgrades: how long new sessions may be held for the swap (default 10 000 ms); past
    /// it the swap is abandoned and the database stays on its current cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_budget_ms: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Event {
    pub at: String,
    pub kind: String,
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum BackupKind {
    Daily,
    Manual,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum BackupStatus {
    Running,
    Succeeded,
    Failed,
}

/// One logical backup, as stored and as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Backup {
    pub id: String,
    pub database_id: String,
    pub kind: BackupKind,
    pub status: BackupStatus,
    /// RFC 3339.
    pub started_at: String,
    pub finished_at: Option<String>,
    pub size_bytes: u64,
    pub sha256: Option<String>,
    /// Node the dump was taken from.
    pub node: Option<String>,
    pub error: Option<String>,
}

/// Answer of `POST /v1/databases/{id}/backups`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BackupOperation {
    pub backup: Backup,
    pub operation: Operation,
}

/// Answer of `GET /v1/databases/{id}/pitr`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PitrWindow {
    /// RFC 3339.
    pub earliest: String,
    pub latest: String,
}

/// The user only: neither the password nor the URL that carries it reach a log.
impl std::fmt::Debug for UserWithPassword {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserWithPassword").field("user", &self.user).finish_non_exhaustive()
    }
}

/// A connection URL with its password replaced, for `Debug`.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:<redacted>{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// The URL without its password.
impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Database")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("plan", &self.plan)
            .field("status", &self.status)
            .field("database_url", &redact_url(&self.database_url))
            .field("tls", &self.tls)
            .field("epoch", &self.epoch)
            .field("nodes", &self.nodes)
            .field("replication", &self.replication)
            .field("created_at", &self.created_at)
            .field("limits", &self.limits)
            .finish()
    }
}

/// The URLs without their password.
impl std::fmt::Debug for Env {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Env")
            .field("DATABASE_URL", &redact_url(&self.database_url))
            .field("PGWARDEN_POSTGRESQL_URL", &redact_url(&self.pgwarden_postgresql_url))
            .field("DATABASE_POOL_URL", &self.database_pool_url.as_deref().map(redact_url))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_prints_a_password() {
        let url = "postgres://app_1:s3cretPassw0rd@127.0.0.1:6432/app_1";
        assert_eq!(redact_url(url), "postgres://app_1:<redacted>@127.0.0.1:6432/app_1");
        let env = Env {
            database_url: url.into(),
            pgwarden_postgresql_url: url.into(),
            database_pool_url: Some(url.replace("6432", "6433")),
        };
        let user = UserWithPassword {
            user: User { name: "u".into(), read_only: false, default: false },
            password: "s3cretPassw0rd".into(),
            database_url: url.into(),
        };
        for shown in [format!("{env:?}"), format!("{user:?}")] {
            assert!(!shown.contains("s3cretPassw0rd"), "{shown}");
        }
    }
}

/// Answer of `GET /v1/databases/{id}/stats` (SPEC §7): bytes, percent of one CPU, seconds;
/// `null` where a figure is not known. Every group of figures carries when it was read.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Stats {
    pub database: String,
    /// RFC 3339: when this sample was taken.
    pub sampled_at: String,
    pub nodes: Vec<NodeStats>,
    pub size: SizeStats,
    pub backups: BackupStats,
    /// `null` for plans without PITR or while no window exists yet.
    pub pitr: Option<PitrWindow>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NodeStats {
    pub name: String,
    pub role: NodeRole,
    pub sampled_at: String,
    pub container: Container,
    /// CPU used over the last sampling interval, in percent of one CPU.
    pub cpu_percent: Option<f64>,
    pub memory: Usage,
    pub swap: Usage,
    pub connections: Option<Connections>,
    /// A standby's distance to its primary (`null` on the primary).
    pub replication_lag: Option<Lag>,
    pub disk: DiskStats,
}

/// The node's resource container: its kind, or why the node runs without one (or without a
/// limit).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Container {
    /// `"v1"` or `"v2"` (cgroup version); `null` without a container.
    pub cgroup: Option<String>,
    /// Why `limit` is `null`, if it is.
    pub unlimited_reason: Option<String>,
}

/// Bytes in use now, the most since the node last started, and the container's limit (`null`:
/// none).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Usage {
    pub current: Option<u64>,
    pub highest: Option<u64>,
    pub limit: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Connections {
    /// Client sessions open on the node.
    pub open: u64,
    /// Its `max_connections`.
    pub max: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Lag {
    /// WAL the standby has yet to replay.
    pub bytes: u64,
    /// Time since the last transaction it replayed was committed, 0 when it has replayed all
    /// there is.
    pub seconds: f64,
}

/// Bytes on disk: tables and indexes, WAL, the rest.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DiskStats {
    pub data: u64,
    pub wal: u64,
    pub other: u64,
    pub total: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SizeStats {
    pub sampled_at: String,
    /// `pg_database_size` of the database, on its primary.
    pub logical: Option<u64>,
    /// The primary's files on disk.
    pub disk: Option<DiskStats>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BackupStats {
    pub sampled_at: String,
    /// RFC 3339: when the last successful backup finished.
    pub last_backup_at: Option<String>,
    pub last_backup_age_secs: Option<u64>,
}

/// Answer of `GET /v1/databases/{id}/stats/history`: for each step of `step_secs` that has
/// samples, the mean of its samples, as one array per figure (`null` where no sample of the
/// step had it), aligned with `at`: ready for charts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StatsHistory {
    pub database: String,
    /// RFC 3339.
    pub since: String,
    pub until: String,
    pub step_secs: u64,
    /// Unix seconds: where each step starts.
    pub at: Vec<i64>,
    pub nodes: Vec<NodeSeries>,
    /// `pg_database_size`.
    pub size_logical: Vec<Option<f64>>,
    /// The primary's files on disk.
    pub disk_data: Vec<Option<f64>>,
    pub disk_wal: Vec<Option<f64>>,
    pub disk_other: Vec<Option<f64>>,
}

/// One node's figures over time (bytes, percent of one CPU, seconds).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NodeSeries {
    pub name: String,
    pub cpu_percent: Vec<Option<f64>>,
    pub memory: Vec<Option<f64>>,
    pub memory_limit: Vec<Option<f64>>,
    pub swap: Vec<Option<f64>>,
    pub swap_limit: Vec<Option<f64>>,
    pub connections_open: Vec<Option<f64>>,
    pub connections_max: Vec<Option<f64>>,
    pub lag_bytes: Vec<Option<f64>>,
    pub lag_seconds: Vec<Option<f64>>,
}
