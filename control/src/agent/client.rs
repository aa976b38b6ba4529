//! The control plane's side of the agents: [`RemoteDriver`] runs driver operations on a node's
//! agent, [`Placed`] sends each node's operations to its agent or to this host's driver.

use std::sync::Arc;
use std::time::Duration;

use hyper::{Method, StatusCode};
use serde::Serialize;
use serde_json::Value;

use super::{Op, SQL_PROTOCOL};
use crate::httpc::{self, HttpError, Timeouts};
use crate::nodes::context::{ByteStream, Opening, Tunnels};
use crate::nodes::driver::{
    DriverError, NodeConfig, NodeDriver, NodeResources, NodeSpec, Upstream,
};

const CONNECT: Duration = Duration::from_secs(3);
/// How long the agent may take to dump before it answers, then between two parts of the file.
const DUMP_WAIT: Duration = Duration::from_secs(6 * 3600);

/// The header with the SHA-256 of a dump the agent streams.
pub const SHA256_HEADER: &str = "x-pgwarden-sha256";

/// The body of a dump request, borrowed.
#[derive(Serialize)]
struct DumpRef<'a> {
    node: &'a NodeSpec,
    database: &'a str,
    tools: &'a std::path::Path,
}

/// The body of a call, borrowed.
#[derive(Serialize)]
struct CallRef<'a> {
    node: &'a NodeSpec,
    config: Option<&'a NodeConfig>,
    upstream: Option<&'a Upstream>,
    term: Option<i64>,
}

/// Driver operations on nodes that agents own, over mutual TLS.
pub struct RemoteDriver {
    tls: tokio_rustls::TlsConnector,
    runtime: tokio::runtime::Handle,
    /// This control plane's leadership term, sent with every operation.
    term: Option<i64>,
}

impl RemoteDriver {
    /// A client certificate of `ca` for the control plane (made now, kept in memory only).
    /// Must be called inside the runtime its blocking calls will use.
    pub fn new(ca: &pgwarden_certs::Ca) -> Result<Self, super::tls::TlsSetupError> {
        let cert = ca.issue_client("pgwarden-control")?;
        let identity =
            super::tls::Identity { ca: ca.cert_pem(), cert: &cert.cert_pem, key: &cert.key_pem };
        let config = super::tls::client_config(&identity)?;
        Ok(Self {
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
            runtime: tokio::runtime::Handle::current(),
            term: None,
        })
    }

    /// Sends `term` (this control plane's leadership term) with every operation.
    pub fn with_term(self, term: Option<i64>) -> Self {
        Self { term, ..self }
    }

    fn agent(node: &NodeSpec) -> Result<&str, DriverError> {
        node.agent.as_deref().ok_or_else(|| DriverError::NoAgent(node.name.clone()))
    }

    /// Runs `work` to its end from a blocking context (driver methods block; they are called
    /// from blocking threads, or from a worker of a multi-threaded runtime).
    fn block_on<T>(&self, work: impl std::future::Future<Output = T>) -> T {
        match tokio::runtime::Handle::try_current() {
            Ok(_) => tokio::task::block_in_place(|| self.runtime.block_on(work)),
            Err(_) => self.runtime.block_on(work),
        }
    }

    fn call(
        &self,
        op: Op,
        node: &NodeSpec,
        config: Option<&NodeConfig>,
        upstream: Option<&Upstream>,
    ) -> Result<Value, DriverError> {
        let agent = Self::agent(node)?;
        let body = serde_json::to_vec(&CallRef { node, config, upstream, term: self.term })?;
        let path = format!("/v1/nodes/{}", op.name());
        let timeouts = Timeouts { connect: CONNECT, exchange: op.bound() };
        let (status, body) = self
            .block_on(httpc::request_over(
                agent,
                Some(&self.tls),
                Method::POST,
                &path,
                None,
                Some(body),
                timeouts,
            ))
            .map_err(|source| DriverError::AgentUnreachable { agent: agent.to_owned(), source })?;
        let answer: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if status != StatusCode::OK {
            let message = answer["error"]["message"].as_str().map_or_else(
                || format!("{status}: {}", String::from_utf8_lossy(&body)),
                str::to_owned,
            );
            return Err(DriverError::AgentRefused { agent: agent.to_owned(), message });
        }
        Ok(answer)
    }

    fn unit(&self, op: Op, node: &NodeSpec) -> Result<(), DriverError> {
        self.call(op, node, None, None).map(drop)
    }

    /// A byte stream to `node`'s Unix socket on its agent's host, for a superuser session.
    pub async fn tunnel(
        &self,
        node: &NodeSpec,
        after: Duration,
    ) -> Result<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>, HttpError> {
        let agent = node.agent.as_deref().unwrap_or_default();
        let dir = node.dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let path = format!("/v1/sql/{dir}/{}", node.port);
        let timeouts = Timeouts { connect: after, exchange: after };
        httpc::upgrade(agent, Some(&self.tls), &path, SQL_PROTOCOL, timeouts).await
    }
}

impl Tunnels for RemoteDriver {
    fn open<'a>(&'a self, node: &'a NodeSpec, within: Duration) -> Opening<'a> {
        Box::pin(async move {
            let tunnel = self.tunnel(node, within).await?;
            Ok(Box::new(tunnel) as Box<dyn ByteStream>)
        })
    }
}

impl NodeDriver for RemoteDriver {
    fn init(&self, node: &NodeSpec, config: &NodeConfig) -> Result<(), DriverError> {
        self.call(Op::Init, node, Some(config), None).map(drop)
    }

    fn init_standby(
        &self,
        node: &NodeSpec,
        config: &NodeConfig,
        upstream: &Upstream,
    ) -> Result<(), DriverError> {
        self.call(Op::InitStandby, node, Some(config), Some(upstream)).map(drop)
    }

    fn configure(&self, node: &NodeSpec, config: &NodeConfig) -> Result<(), DriverError> {
        self.call(Op::Configure, node, Some(config), None).map(drop)
    }

    fn start(&self, node: &NodeSpec) -> Result<(), DriverError> {
        self.unit(Op::Start, node)
    }

    fn stop(&self, node: &NodeSpec) -> Result<(), DriverError> {
        self.unit(Op::Stop, node)
    }

    fn reload(&self, node: &NodeSpec) -> Result<(), DriverError> {
        self.unit(Op::Reload, node)
    }

    /// An agent that cannot answer counts as a node that is not running.
    fn is_running(&self, node: &NodeSpec) -> bool {
        self.call(Op::IsRunning, node, None, None).is_ok_and(|v| v == Value::Bool(true))
    }

    fn fence(&self, node: &NodeSpec) -> Result<(), DriverError> {
        self.unit(Op::Fence, node)
    }

    fn promote(&self, node: &NodeSpec) -> Result<(), DriverError> {
        self.unit(Op::Promote, node)
    }

    /// pg_rewind with a superuser session on the source, which the platform never opens over
    /// the network: nodes on agents are rewound with `rewind_from` instead.
    fn rewind(&self, node: &NodeSpec, _source: &NodeSpec) -> Result<(), DriverError> {
        Err(DriverError::RemoteRewind(node.name.clone()))
    }

    fn rewind_from(&self, node: &NodeSpec, source: &Upstream) -> Result<(), DriverError> {
        self.call(Op::RewindFrom, node, None, Some(source)).map(drop)
    }

    fn make_standby(&self, node: &NodeSpec) -> Result<(), DriverError> {
        self.unit(Op::MakeStandby, node)
    }

    /// The base backup and the WAL go to the agent as tar streams (into the node's staging
    /// area), then the agent restores from them.
    fn init_from_backup(
        &self,
        node: &NodeSpec,
        config: &NodeConfig,
        base: &std::path::Path,
        wal: &std::path::Path,
    ) -> Result<(), DriverError> {
        let agent = Self::agent(node)?;
        let failed = |detail: String| DriverError::Transfer {
            agent: agent.to_owned(),
            what: "sending the backup".into(),
            detail,
        };
        let dir = node.dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        for (part, from) in [("base", base), ("wal", wal)] {
            let path = format!("/v1/staging/{dir}/{part}");
            let sent = self.block_on(async {
                let mut tar = tokio::process::Command::new("tar")
                    .args(["--create", "--file", "-", "--directory"])
                    .arg(from)
                    .arg(".")
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .kill_on_drop(true)
                    .spawn()
                    .map_err(|e| format!("cannot run tar: {e}"))?;
                let stdout = tar.stdout.take().ok_or("tar has no output")?;
                let timeouts = Timeouts { connect: CONNECT, exchange: Op::InitFromBackup.bound() };
                let answer = httpc::upload(agent, Some(&self.tls), &path, stdout, timeouts).await;
                let packed = tar.wait_with_output().await.map_err(|e| e.to_string())?;
                if !packed.status.success() {
                    let stderr = String::from_utf8_lossy(&packed.stderr);
                    return Err(format!("tar of {} failed: {}", from.display(), stderr.trim()));
                }
                let (status, body) = answer.map_err(|e| e.to_string())?;
                if status != StatusCode::OK {
                    return Err(format!("{status}: {}", String::from_utf8_lossy(&body)));
                }
                Ok::<(), String>(())
            });
            sent.map_err(failed)?;
        }
        self.call(Op::InitFromBackup, node, Some(config), None).map(drop)
    }

    fn log_tail(&self, node: &NodeSpec) -> String {
        match self.call(Op::LogTail, node, None, None) {
            Ok(Value::String(tail)) => tail,
            Ok(other) => other.to_string(),
            Err(e) => e.to_string(),
        }
    }

    fn destroy(&self, node: &NodeSpec) -> Result<(), DriverError> {
        self.unit(Op::Destroy, node)
    }

    /// The agent dumps into a file of its host, then streams it here with its SHA-256, which
    /// is checked.
    fn dump(
        &self,
        node: &NodeSpec,
        database: &str,
        tools: &std::path::Path,
        file: &std::path::Path,
    ) -> Result<(), DriverError> {
        let agent = Self::agent(node)?;
        let failed = |detail: String| DriverError::Transfer {
            agent: agent.to_owned(),
            what: "the dump".into(),
            detail,
        };
        let body = serde_json::to_vec(&DumpRef { node, database, tools })?;
        let timeouts = Timeouts { connect: CONNECT, exchange: DUMP_WAIT };
        let download = self.block_on(httpc::download_over(
            agent,
            Some(&self.tls),
            (Method::POST, "/v1/dump", Some(body)),
            file,
            timeouts,
            |_, _| {},
        ));
        let headers = match download.map_err(|e| failed(e.to_string()))? {
            Ok(headers) => headers,
            Err((status, body)) => {
                let answer: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let message = answer["error"]["message"].as_str().unwrap_or_default();
                return Err(failed(format!("{status}: {message}")));
            }
        };
        let sent = headers.get(SHA256_HEADER).and_then(|v| v.to_str().ok()).unwrap_or_default();
        let received = crate::files::sha256_file(file)?;
        if sent != received {
            return Err(failed(format!(
                "the dump arrived damaged (SHA-256 {received}, the agent sent {sent:?})"
            )));
        }
        Ok(())
    }

    /// Remote nodes are reached through [`RemoteDriver::tunnel`], never with a connection
    /// string: programs that need one (pg_dump, pg_rewind) are not run for them here.
    fn admin_conninfo(&self, node: &NodeSpec, _database: &str) -> String {
        format!("host=/nonexistent/{} port={}", node.name, node.port)
    }

    fn resources(&self, node: &NodeSpec) -> NodeResources {
        self.call(Op::Resources, node, None, None)
            .ok()
            .and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or_default()
    }
}

/// Every node's operations, on its agent when it has one, else on this host.
pub struct Placed {
    pub local: Arc<dyn NodeDriver>,
    pub remote: Arc<RemoteDriver>,
    /// With control planes on etcd: this one's leadership. A plane whose lease ran out (it was
    /// frozen, or cut off from etcd) changes no node, even before it notices: the next leader
    /// may be acting on them already.
    pub leadership: Option<Arc<crate::coord::Leadership>>,
}

impl Placed {
    fn of(&self, node: &NodeSpec) -> &dyn NodeDriver {
        if node.agent.is_some() {
            self.remote.as_ref()
        } else {
            self.local.as_ref()
        }
    }

    /// The driver of `node` for a change to it, while this plane leads.
    fn acting(&self, node: &NodeSpec) -> Result<&dyn NodeDriver, DriverError> {
        if self.leadership.as_ref().is_some_and(|l| !l.is_valid()) {
            return Err(DriverError::NotLeading);
        }
        Ok(self.of(node))
    }
}

impl NodeDriver for Placed {
    fn init(&self, node: &NodeSpec, config: &NodeConfig) -> Result<(), DriverError> {
        self.acting(node)?.init(node, config)
    }

    fn init_standby(
        &self,
        node: &NodeSpec,
        config: &NodeConfig,
        upstream: &Upstream,
    ) -> Result<(), DriverError> {
        self.acting(node)?.init_standby(node, config, upstream)
    }

    fn configure(&self, node: &NodeSpec, config: &NodeConfig) -> Result<(), DriverError> {
        self.acting(node)?.configure(node, config)
    }

    fn start(&self, node: &NodeSpec) -> Result<(), DriverError> {
        self.acting(node)?.start(node)
    }

    fn stop(&self, node: &NodeSpec) -> Result<(), DriverError> {
        self.acting(node)?.stop(node)
    }

    fn reload(&self, node: &NodeSpec) -> Result<(), DriverError> {
        self.acting(node)?.reload(node)
    }

    fn is_running(&self, node: &NodeSpec) -> bool {
        self.of(node).is_running(node)
    }

    fn fence(&self, node: &NodeSpec) -> Result<(), DriverError> {
        self.acting(node)?.fence(node)
    }

    fn promote(&self, node: &NodeSpec) -> Result<(), DriverError> {
        self.acting(node)?.promote(node)
    }

    fn rewind(&self, node: &NodeSpec, source: &NodeSpec) -> Result<(), DriverError> {
        let driver = self.acting(node)?;
        if source.agent.is_some() {
            return self.remote.rewind(node, source);
        }
        driver.rewind(node, source)
    }

    fn rewind_from(&self, node: &NodeSpec, source: &Upstream) -> Result<(), DriverError> {
        self.acting(node)?.rewind_from(node, source)
    }

    fn make_standby(&self, node: &NodeSpec) -> Result<(), DriverError> {
        self.acting(node)?.make_standby(node)
    }

    fn init_from_backup(
        &self,
        node: &NodeSpec,
        config: &NodeConfig,
        base: &std::path::Path,
        wal: &std::path::Path,
    ) -> Result<(), DriverError> {
        self.acting(node)?.init_from_backup(node, config, base, wal)
    }

    fn log_tail(&self, node: &NodeSpec) -> String {
        self.of(node).log_tail(node)
    }

    fn destroy(&self, node: &NodeSpec) -> Result<(), DriverError> {
        self.acting(node)?.destroy(node)
    }

    fn dump(
        &self,
        node: &NodeSpec,
        database: &str,
        tools: &std::path::Path,
        file: &std::path::Path,
    ) -> Result<(), DriverError> {
        self.acting(node)?.dump(node, database, tools, file)
    }

    fn admin_conninfo(&self, node: &NodeSpec, database: &str) -> String {
        self.of(node).admin_conninfo(node, database)
    }

    fn resources(&self, node: &NodeSpec) -> NodeResources {
        self.of(node).resources(node)
    }
}
