//! `proxy.toml`: what the proxy listens on, its limits, TLS files and admin token.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Why a configuration was refused; each names the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid configuration {path}: {source}")]
    Parse { path: PathBuf, source: toml::de::Error },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The proxy's configuration. Nothing here changes at runtime except the files the keys point to
/// (TLS certificate and key are re-read on SIGHUP).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Client address. Default `127.0.0.1:6432`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Transaction-pooling client address (`DATABASE_POOL_URL`): sessions there share the
    /// database's server connections between transactions. Default: unset (no pooling).
    pub pool_listen: Option<SocketAddr>,
    /// Admin HTTP address (health, metrics, routes). Default `127.0.0.1:9181`.
    #[serde(default = "default_admin_listen")]
    pub admin_listen: SocketAddr,
    /// Bearer token for the admin API's routes endpoints. This or `admin_token_file` is required.
    pub admin_token: Option<String>,
    /// File holding the admin token (surrounding whitespace ignored).
    pub admin_token_file: Option<PathBuf>,
    /// Optional routing table (JSON, as `PUT /v1/routes`) loaded at start.
    pub routes_file: Option<PathBuf>,
    /// Server certificate for client TLS; without it `SSLRequest` is answered `N`.
    pub tls: Option<TlsFiles>,
    /// With a domain, a TLS client whose server name (SNI) is `<database id>.<domain>` is routed
    /// to that database, whatever its startup packet's `database` says. Default: unset.
    pub domain: Option<String>,
    #[serde(default)]
    pub limits: Limits,
    /// Active/standby pair: without it, this proxy is active on its own.
    pub ha: Option<HaConfig>,
    /// Follow the routing table in etcd (control planes on etcd) instead of waiting for
    /// pushes; without it, only `PUT /v1/routes` changes the table.
    pub etcd: Option<EtcdConfig>,
    /// Session threads, each a single-threaded runtime whose sessions stay on it. Default: one
    /// per CPU. One thread costs the least CPU per transaction but caps throughput at what one
    /// core can relay (see benches/RESULTS.md).
    pub worker_threads: Option<usize>,
    /// Pin session thread i to the i-th CPU the proxy may use (its affinity mask), so that two
    /// of them never share a CPU while another one idles. Default false. Fixed at start.
    #[serde(default)]
    pub pin_workers: bool,
    /// Stop (as on SIGTERM) once the process with this pid is no longer the proxy's parent,
    /// checked every half second. `pgwarden up` sets it to its own pid, so that its proxies do
    /// not outlive it when it is killed. Default: unset.
    pub parent_pid: Option<u32>,
}

/// Everything but the admin token.
impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("pool_listen", &self.pool_listen)
            .field("admin_listen", &self.admin_listen)
            .field("admin_token", &self.admin_token.as_ref().map(|_| "<redacted>"))
            .field("admin_token_file", &self.admin_token_file)
            .field("routes_file", &self.routes_file)
            .field("tls", &self.tls)
            .field("domain", &self.domain)
            .field("limits", &self.limits)
            .field("ha", &self.ha)
            .field("etcd", &self.etcd)
            .field("worker_threads", &self.worker_threads)
            .field("pin_workers", &self.pin_workers)
            .field("parent_pid", &self.parent_pid)
            .finish()
    }
}

/// `[etcd]`: where the routing table is, and how long the proxy may be cut off from etcd
/// before it stops routing (it can no longer know that a primary is still the primary).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    /// Members' client URLs (`http://host:port`).
    pub endpoints: Vec<String>,
    /// Prefix of pgwarden's keys (the control planes' `--etcd-prefix`). Default `pgwarden`.
    #[serde(default = "default_etcd_prefix")]
    pub prefix: String,
    /// Cut off from a majority of etcd for longer than this, the proxy holds every database
    /// and ends every session on a primary, until etcd answers again. It must outlast an etcd
    /// leader election. Default 5000.
    #[serde(default = "default_fence_after_ms")]
    pub fence_after_ms: u64,
}

fn default_etcd_prefix() -> String {
    "pgwarden".into()
}

fn default_fence_after_ms() -> u64 {
    5000
}

/// PEM files of the certificate (chain) and its private key.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Resource limits. All fixed at start.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Client connections served at once; beyond it clients get `53300`. Default 10000.
    pub max_client_connections: usize,
    /// Seconds the client has to send what it must: the TLS handshake and startup packet, and
    /// then each of its authentication messages. Waiting on the node is not counted here.
    /// Default 15.
    pub handshake_timeout_secs: f64,
    /// Seconds the node has to answer each step of a session's start (its authentication
    /// requests, then `ReadyForQuery`) before the client gets `57P03`. Default 30.
    pub backend_auth_timeout_secs: f64,
    /// Seconds to connect to a node before answering `57P03`. Default 5.
    pub backend_connect_timeout_secs: f64,
    /// Largest startup packet accepted, in bytes. Default 10000.
    pub max_startup_packet: usize,
    /// Connections that have not authenticated yet, in all; a new one beyond it ends the
    /// oldest of them. Default 4096.
    pub max_starting: usize,
    /// Connections that have not authenticated yet from one client address; beyond it a new
    /// one gets `53300` at once. Default 256.
    pub max_starting_per_source: usize,
    /// On SIGTERM, seconds sessions may keep running before they are ended with `57P01`.
    /// Default 30.
    pub shutdown_grace_secs: f64,
    /// Seconds a new session may wait for a database whose route is on hold (switchover, major
    /// upgrade) before it gets `57P03`. Default 12: above a major upgrade's default hold
    /// budget (10 s), past which the control plane gives the hold up itself.
    pub hold_timeout_secs: f64,
    /// Transaction pooling: seconds a transaction may wait for one of its database's server
    /// connections before the client gets `53300` (its connection stays open). Default 10.
    pub pool_wait_timeout_secs: f64,
    /// Transaction pooling: clients of one database that may wait for a server connection at
    /// once; beyond it a new transaction gets `53300` at once. Default 10000.
    pub pool_max_waiting: usize,
    /// Transaction pooling: seconds a server connection may stay idle before it is closed.
    /// Default 60.
    pub pool_idle_timeout_secs: f64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_client_connections: 10_000,
            handshake_timeout_secs: 15.0,
            backend_auth_timeout_secs: 30.0,
            backend_connect_timeout_secs: 5.0,
            max_startup_packet: 10_000,
            max_starting: 4096,
            max_starting_per_source: 256,
            shutdown_grace_secs: 30.0,
            hold_timeout_secs: 12.0,
            pool_wait_timeout_secs: 10.0,
            pool_max_waiting: 10_000,
            pool_idle_timeout_secs: 60.0,
        }
    }
}

impl Limits {
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.handshake_timeout_secs)
    }
    pub fn backend_auth_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.backend_auth_timeout_secs)
    }
    pub fn backend_connect_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.backend_connect_timeout_secs)
    }
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs_f64(self.shutdown_grace_secs)
    }
    pub fn hold_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.hold_timeout_secs)
    }
    pub fn pool_idle_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.pool_idle_timeout_secs)
    }
    pub fn pool_wait_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.pool_wait_timeout_secs)
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 6432))
}

fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9181))
}

impl Config {
    /// Reads, parses and validates a TOML file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let config: Self = toml::from_str(&text)
            .map_err(|source| ConfigError::Parse { path: path.to_owned(), source })?;
        config.validate()?;
        Ok(config)
    }

    /// A configuration for `listen`/`admin_listen` with defaults elsewhere (used by tests and
    /// embedders that bind their own listeners).
    pub fn with_token(admin_token: impl Into<String>) -> Self {
        Self {
            listen: default_listen(),
            pool_listen: None,
            admin_listen: default_admin_listen(),
            admin_token: Some(admin_token.into()),
            admin_token_file: None,
            routes_file: None,
            tls: None,
            domain: None,
            limits: Limits::default(),
            ha: None,
            etcd: None,
            worker_threads: None,
            pin_workers: false,
            parent_pid: None,
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        match (&self.admin_token, &self.admin_token_file) {
            (Some(_), Some(_)) => {
                return invalid("set only one of admin_token and admin_token_file")
            }
            (None, None) => return invalid("admin_token or admin_token_file is required"),
            (Some(t), None) if t.trim().is_empty() => return invalid("admin_token is empty"),
            _ => {}
        }
        if let Some(ha) = &self.ha {
            match (&ha.peer_admin, &ha.etcd_pair, &self.etcd) {
                (Some(_), None, _) | (None, Some(_), Some(_)) => {}
                (None, Some(_), None) => return invalid("ha.etcd_pair needs the [etcd] section"),
                _ => return invalid("[ha] needs one of peer_admin and etcd_pair"),
            }
        }
        if let Some(etcd) = &self.etcd {
            if etcd.endpoints.is_empty() {
                return invalid("etcd.endpoints must name at least one member");
            }
            if !(100..=600_000).contains(&etcd.fence_after_ms) {
                return invalid("etcd.fence_after_ms must be between 100 and 600000");
            }
        }
        if self.worker_threads == Some(0) {
            return invalid("worker_threads must be at least 1");
        }
        let l = &self.limits;
        if l.max_client_connections == 0 {
            return invalid("limits.max_client_connections must be at least 1");
        }
        if l.max_starting == 0 || l.max_starting_per_source == 0 {
            return invalid("limits.max_starting and max_starting_per_source must be at least 1");
        }
        if l.max_startup_packet < 64 {
            return invalid("limits.max_startup_packet must be at least 64");
        }
        for (key, v) in [
            ("limits.handshake_timeout_secs", l.handshake_timeout_secs),
            ("limits.backend_auth_timeout_secs", l.backend_auth_timeout_secs),
            ("limits.backend_connect_timeout_secs", l.backend_connect_timeout_secs),
            ("limits.shutdown_grace_secs", l.shutdown_grace_secs),
            ("limits.hold_timeout_secs", l.hold_timeout_secs),
            ("limits.pool_wait_timeout_secs", l.pool_wait_timeout_secs),
            ("limits.pool_idle_timeout_secs", l.pool_idle_timeout_secs),
        ] {
            if !(0.0..=86_400.0).contains(&v) || (v == 0.0 && key != "limits.shutdown_grace_secs") {
                return Err(ConfigError::Invalid(format!("{key} must be between 0 and 86400")));
            }
        }
        Ok(())
    }

    /// The admin token, read from `admin_token_file` when that is used.
    pub fn resolve_admin_token(&self) -> Result<String, ConfigError> {
        if let Some(token) = &self.admin_token {
            return Ok(token.trim().to_owned());
        }
        let path = self.admin_token_file.as_ref().expect("validated");
        let token = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.clone(), source })?;
        match token.trim() {
            "" => {
                Err(ConfigError::Invalid(format!("admin_token_file {} is empty", path.display())))
            }
            t => Ok(t.to_owned()),
        }
    }
}

/// `[ha]` in `proxy.toml`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaConfig {
    /// Admin address (`host:port`) of the other proxy of the pair (the pair without etcd).
    pub peer_admin: Option<String>,
    /// Name of the pair whose active proxy etcd elects (with `[etcd]`): proxies on two hosts.
    pub etcd_pair: Option<String>,
    /// Milliseconds between heartbeats. Default 100.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_interval_ms: u64,
    /// Milliseconds without an answer from an active peer before taking over. Default 500.
    /// With `etcd_pair`, the active proxy's lease (whole seconds, at least 2).
    #[serde(default = "default_takeover")]
    pub takeover_after_ms: u64,
    /// Shell command run when this proxy becomes active (`PGWARDEN_PROXY_ROLE=active`).
    pub on_active: Option<String>,
    /// Shell command run when this proxy becomes standby.
    pub on_standby: Option<String>,
}

fn default_heartbeat() -> u64 {
    100
}

fn default_takeover() -> u64 {
    500
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        let c: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }

    #[test]
    fn full_config_parses_with_defaults() {
        let c = parse(
            r#"
            listen = "127.0.0.1:7000"
            admin_token = "secret"
            [tls]
            cert = "a.crt"
            key = "a.key"
            [limits]
            max_client_connections = 5
            "#,
        )
        .unwrap();
        assert_eq!(c.listen.port(), 7000);
        assert_eq!(c.admin_listen.port(), 9181);
        assert_eq!(c.limits.max_client_connections, 5);
        assert_eq!(c.limits.max_startup_packet, 10_000);
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let e = parse("admin_token = \"x\"\nlisten_addr = \"1.2.3.4:5\"").unwrap_err();
        assert!(e.contains("listen_addr"), "{e}");
        let e = parse("admin_token = \"x\"\n[limits]\nhandshake_timeout_secs = -1").unwrap_err();
        assert!(e.contains("handshake_timeout_secs"), "{e}");
        let e = parse("listen = \"127.0.0.1:1\"").unwrap_err();
        assert!(e.contains("admin_token"), "{e}");
    }
}
