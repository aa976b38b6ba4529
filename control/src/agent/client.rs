//! The control plane's side of the agents: [`RemoteDriver`] runs driver operations on a node's
//! agent, [`Placed`] sends each node's operations to its agent or to this host's driver.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper::{Method, StatusCode};
use serde::Serialize;
use serde_json::Value;

use super::{Op, SQL_PROTOCOL};
use crate::httpc::{self, HttpError, Timeouts};
use crate::nodes::context::{ByteStream, Opening, Tunnels};
use crate::nodes::driver::{
    Call, DiskUsage, Done, DriverError, NodeConfig, NodeDriver, NodeResources, NodeSpec, Upstream,
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
    /// This control plane's leadership term, sent with every operation.
    term: Option<i64>,
}

impl RemoteDriver {
    /// A client certificate of `ca` for the control plane (made now, kept in memory only).
    pub fn new(ca: &pgwarden_certs::Ca) -> Result<Self, super::tls::TlsSetupError> {
        let cert = ca.issue_client("pgwarden-control")?;
        let identity =
            super::tls::Identity { ca: ca.cert_pem(), cert: &cert.cert_pem, key: &cert.key_pem };
        let config = super::tls::client_config(&identity)?;
        Ok(Self { tls: tokio_rustls::TlsConnector::from(Arc::new(config)), term: None })
    }

    /// Sends `term` (this control plane's leadership term) with every operation.
    pub fn with_term(self, term: Option<i64>) -> Self {
        Self { term, ..self }
    }

    fn agent(node: &NodeSpec) -> Result<&str, DriverError> {
        node.agent.as_deref().ok_or_else(|| DriverError::NoAgent(node.name.clone()))
    }

    /// Figures `op` reads on `node`'s host; none (their default) when the agent cannot answer.
    async fn figures<T: serde::de::DeserializeOwned + Default>(
        &self,
        op: Op,
        node: &NodeSpec,
    ) -> T {
        let answer = self.call(op, node, None, None).await.ok();
        answer.and_then(|v| serde_json::from_value(v).ok()).unwrap_or_default()
    }

    async fn call(
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
        let (status, body) = httpc::request_over(
            agent,
            Some(&self.tls),
            Method::POST,
            &path,
            None,
            Some(body),
            timeouts,
        )
        .await
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

    /// `op` on `node`, its answer ignored.
    fn unit<'a>(&'a self, op: Op, node: &'a NodeSpec) -> Call<'a, Done> {
        Box::pin(async move { self.call(op, node, None, None).await.map(drop) })
    }

    /// `op` on `node` with a configuration or an upstream, its answer ignored.
    fn with<'a>(
        &'a self,
        op: Op,
        node: &'a NodeSpec,
        config: Option<&'a NodeConfig>,
        upstream: Option<&'a Upstream>,
    ) -> Call<'a, Done> {
        Box::pin(async move { self.call(op, node, config, upstream).await.map(drop) })
    }

    /// Sends the base backup and the WAL to the agent as tar streams (into the node's staging
    /// area).
    async fn send_backup(&self, node: &NodeSpec, base: &Path, wal: &Path) -> Done {
        let agent = Self::agent(node)?;
        let failed = |detail: String| DriverError::Transfer {
            agent: agent.to_owned(),
            what: "sending the backup".into(),
            detail,
        };
        let dir = node.dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        for (part, from) in [("base", base), ("wal", wal)] {
            let path = format!("/v1/staging/{dir}/{part}");
            let mut tar = tokio::process::Command::new("tar")
                .args(["--create", "--file", "-", "--directory"])
                .arg(from)
                .arg(".")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| failed(format!("cannot run tar: {e}")))?;
            let stdout = tar.stdout.take().ok_or_else(|| failed("tar has no output".into()))?;
            let timeouts = Timeouts { connect: CONNECT, exchange: Op::InitFromBackup.bound() };
            let answer = httpc::upload(agent, Some(&self.tls), &path, stdout, timeouts).await;
            let packed = tar.wait_with_output().await.map_err(|e| failed(e.to_string()))?;
            if !packed.status.success() {
                let stderr = String::from_utf8_lossy(&packed.stderr);
                return Err(failed(format!("tar of {} failed: {}", from.display(), stderr.trim())));
            }
            let (status, body) = answer.map_err(|e| failed(e.to_string()))?;
            if status != StatusCode::OK {
                return Err(failed(format!("{status}: {}", String::from_utf8_lossy(&body))));
            }
        }
        Ok(())
    }

    /// The agent dumps into a file of its host, then streams it here with its SHA-256, which
    /// is checked.
    async fn fetch_dump(&self, node: &NodeSpec, database: &str, tools: &Path, file: &Path) -> Done {
        let agent = Self::agent(node)?;
        let failed = |detail: String| DriverError::Transfer {
            agent: agent.to_owned(),
            what: "the dump".into(),
            detail,
        };
        let body = serde_json::to_vec(&DumpRef { node, database, tools })?;
        let timeouts = Timeouts { connect: CONNECT, exchange: DUMP_WAIT };
        let download = httpc::download_over(
            agent,
            Some(&self.tls),
            (Method::POST, "/v1/dump", Some(body)),
            file,
            timeouts,
            |_, _| {},
        )
        .await;
        let headers = match download.map_err(|e| failed(e.to_string()))? {
            Ok(headers) => headers,
            Err((status, body)) => {
                let answer: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let message = answer["error"]["message"].as_str().unwrap_or_default();
                return Err(failed(format!("{status}: {message}")));
            }
        };
        let sent = headers.get(SHA256_HEADER).and_then(|v| v.to_str().ok()).unwrap_or_default();
        let path = file.to_owned();
        let received = tokio::task::spawn_blocking(move || crate::files::sha256_file(&path))
            .await
            .map_err(|e| DriverError::Interrupted(e.to_string()))??;
        if sent != received {
            return Err(failed(format!(
                "the dump arrived damaged (SHA-256 {received}, the agent sent {sent:?})"
            )));
        }
        Ok(())
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
    fn init<'a>(&'a self, node: &'a NodeSpec, config: &'a NodeConfig) -> Call<'a, Done> {
        self.with(Op::Init, node, Some(config), None)
    }

    fn init_standby<'a>(
        &'a self,
        node: &'a NodeSpec,
        config: &'a NodeConfig,
        upstream: &'a Upstream,
    ) -> Call<'a, Done> {
        self.with(Op::InitStandby, node, Some(config), Some(upstream))
    }

    fn configure<'a>(&'a self, node: &'a NodeSpec, config: &'a NodeConfig) -> Call<'a, Done> {
        self.with(Op::Configure, node, Some(config), None)
    }

    fn start<'a>(&'a self, node: &'a NodeSpec) -> Call<'a, Done> {
        self.unit(Op::Start, node)
    }

    fn stop<'a>(&'a self, node: &'a NodeSpec) -> Call<'a, Done> {
        self.unit(Op::Stop, node)
    }

    fn reload<'a>(&'a self, node: &'a NodeSpec) -> Call<'a, Done> {
        self.unit(Op::Reload, node)
    }

    /// An agent that cannot answer counts as a node that is not running.
    fn is_running<'a>(&'a self, node: &'a NodeSpec) -> Call<'a, bool> {
        Box::pin(async move {
            self.call(Op::IsRunning, node, None, None).await.is_ok_and(|v| v == Value::Bool(true))
        })
    }

    fn fence<'a>(&'a self, node: &'a NodeSpec) -> Call<'a, Done> {
        self.unit(Op::Fence, node)
    }

    fn promote<'a>(&'a self, node: &'a NodeSpec) -> Call<'a, Done> {
        self.unit(Op::Promote, node)
    }

    /// pg_rewind with a superuser session on the source, which the platform never opens over
    /// the network: nodes on agents are rewound with `rewind_from` instead.
    fn rewind<'a>(&'a self, node: &'a NodeSpec, _source: &'a NodeSpec) -> Call<'a, Done> {
        Box::pin(async move { Err(DriverError::RemoteRewind(node.name.clone())) })
    }

    fn rewind_from<'a>(&'a self, node: &'a NodeSpec, source: &'a Upstream) -> Call<'a, Done> {
        self.with(Op::RewindFrom, node, None, Some(source))
    }

    fn make_standby<'a>(&'a self, node: &'a NodeSpec) -> Call<'a, Done> {
        self.unit(Op::MakeStandby, node)
    }

    /// The base backup and the WAL go to the agent as tar streams (into the node's staging
    /// area), then the agent restores from them.
    fn init_from_backup<'a>(
        &'a self,
        node: &'a NodeSpec,
        config: &'a NodeConfig,
        base: &'a Path,
        wal: &'a Path,
    ) -> Call<'a, Done> {
        Box::pin(async move {
            self.send_backup(node, base, wal).await?;
            self.call(Op::InitFromBackup, node, Some(config), None).await.map(drop)
        })
    }

    fn log_tail<'a>(&'a self, node: &'a NodeSpec) -> Call<'a, String> {
        Box::pin(async move {
            match self.call(Op::LogTail, node, None, None).await {
                Ok(Value::String(tail)) => tail,
                Ok(other) => other.to_string(),
                Err(e) => e.to_string(),
            }
        })
    }

    fn destroy<'a>(&'a self, node: &'a NodeSpec) -> Call<'a, Done> {
        self.unit(Op::Destroy, node)
    }

    fn dump<'a>(
        &'a self,
        node: &'a NodeSpec,
        database: &'a str,
        tools: &'a Path,
        file: &'a Path,
    ) -> Call<'a, Done> {
        Box::pin(self.fetch_dump(node, database, tools, file))
    }

    /// Remote nodes are reached through [`RemoteDriver::tunnel`], never with a connection
    /// string: programs that need one (pg_dump, pg_rewind) are not run for them here.
    fn admin_conninfo(&self, node: &NodeSpec, _database: &str) -> String {
        format!("host=/nonexistent/{} port={}", node.name, node.port)
    }

    fn resources<'a>(&'a self, node: &'a NodeSpec) -> Call<'a, NodeResources> {
        Box::pin(self.figures(Op::Resources, node))
    }

    fn disk<'a>(&'a self, node: &'a NodeSpec) -> Call<'a, DiskUsage> {
        Box::pin(self.figures(Op::Disk, node))
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

/// A call refused before it starts.
fn refused<'a>(e: DriverError) -> Call<'a, Done> {
    Box::pin(async move { Err(e) })
}

impl NodeDriver for Placed {
    fn init<'a>(&'a self, node: &'a NodeSpec, config: &'a NodeConfig) -> Call<'a, Done> {
        self.acting(node).map_or_else(refused, |d| d.init(node, config))
    }

    fn init_standby<'a>(
        &'a self,
        node: &'a NodeSpec,
        config: &'a NodeConfig,
        upstream: &'a Upstream,
    ) -> Call<'a, Done> {
        self.acting(node).map_or_else(refused, |d| d.init_standby(node, config, upstream))
    }

    fn configure<'a>(&'a self, node: &'a NodeSpec, config: &'a NodeConfig) -> Call<'a, Done> {
        self.acting(node).map_or_else(refused, |d| d.configure(node, config))
    }

    fn start<'a>(&'a self, node: &'a NodeSpec) -> Call<'a, Done> {
        self.acting(node).map_or_else(refused, |d| d.start(node))
    }

    fn stop<'a>(&'a self, node: &'a NodeSpec) -> Call<'a, Done> {
        self.acting(node).map_or_else(refused, |d| d.stop(node))
    }

    fn reload<'a>(&'a self, node: &'a NodeSpec) -> Call<'a, Done> {
        self.acting(node).map_or_else(refused, |d| d.reload(node))
    }

    fn is_running<'a>(&'a self, node: &'a NodeSpec) -> Call<'a, bool> {
        self.of(node).is_running(node)
    }

    fn fence<'a>(&'a self, node: &'a NodeSpec) -> Call<'a, Done> {
        self.acting(node).map_or_else(refused, |d| d.fence(node))
    }

    fn promote<'a>(&'a self, node: &'a NodeSpec) -> Call<'a, Done> {
        self.acting(node).map_or_else(refused, |d| d.promote(node))
    }

    fn rewind<'a>(&'a self, node: &'a NodeSpec, source: &'a NodeSpec) -> Call<'a, Done> {
        match self.acting(node) {
            Err(e) => refused(e),
            Ok(_) if source.agent.is_some() => self.remote.rewind(node, source),
            Ok(driver) => driver.rewind(node, source),
        }
    }

    fn rewind_from<'a>(&'a self, node: &'a NodeSpec, source: &'a Upstream) -> Call<'a, Done> {
        self.acting(node).map_or_else(refused, |d| d.rewind_from(node, source))
    }

    fn make_standby<'a>(&'a self, node: &'a NodeSpec) -> Call<'a, Done> {
        self.acting(node).map_or_else(refused, |d| d.make_standby(node))
    }

    fn init_from_backup<'a>(
        &'a self,
        node: &'a NodeSpec,
        config: &'a NodeConfig,
        base: &'a Path,
        wal: &'a Path,
    ) -> Call<'a, Done> {
        self.acting(node).map_or_else(refused, |d| d.init_from_backup(node, config, base, wal))
    }

    fn log_tail<'a>(&'a self, node: &'a NodeSpec) -> Call<'a, String> {
        self.of(node).log_tail(node)
    }

    fn destroy<'a>(&'a self, node: &'a NodeSpec) -> Call<'a, Done> {
        self.acting(node).map_or_else(refused, |d| d.destroy(node))
    }

    fn dump<'a>(
        &'a self,
        node: &'a NodeSpec,
        database: &'a str,
        tools: &'a Path,
        file: &'a Path,
    ) -> Call<'a, Done> {
        self.acting(node).map_or_else(refused, |d| d.dump(node, database, tools, file))
    }

    fn admin_conninfo(&self, node: &NodeSpec, database: &str) -> String {
        self.of(node).admin_conninfo(node, database)
    }

    fn resources<'a>(&'a self, node: &'a NodeSpec) -> Call<'a, NodeResources> {
        self.of(node).resources(node)
    }

    fn disk<'a>(&'a self, node: &'a NodeSpec) -> Call<'a, DiskUsage> {
        self.of(node).disk(node)
    }
}
