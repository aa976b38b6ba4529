//! `pgwarden agent`: the nodes of one host, served to the control plane over mutual TLS.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Value};
use tokio::net::{TcpListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::fencing::{self, Standing};
use super::{Call, Info, Op, SQL_PROTOCOL};
use crate::nodes::driver::{DriverError, NodeSpec};
use crate::nodes::local::LocalDriver;

/// How long a client may take to finish its TLS handshake, then to send a request's headers.
const HANDSHAKE: Duration = Duration::from_secs(10);

/// Where an agent keeps its nodes unless told otherwise (`--dir`, and `serve --agent-root`).
pub const DEFAULT_ROOT: &str = "/var/lib/pgwarden-agent";

/// How `pgwarden agent` is set up.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub listen: std::net::SocketAddr,
    /// Where the nodes' directories go (`<root>/nodes/<node>`).
    pub root: PathBuf,
    /// `ca.crt` (the platform CA), `agent.crt` and `agent.key` (`pgwarden agent-cert`).
    pub tls_dir: PathBuf,
    /// Directory of the default PostgreSQL build's programs.
    pub pg_bin: PathBuf,
    /// OS user nodes run as when the agent runs as root.
    pub user: String,
    /// Hold a lease in etcd and fence this host's primaries when cut off (`fencing.rs`);
    /// `advertise` is the address the control plane knows this agent by (`serve --agent`).
    pub etcd: Option<crate::coord::EtcdSettings>,
}

/// The file under the agent's root holding the newest control-plane term it served.
const TERM_FILE: &str = "term";

/// The newest term an earlier run of the agent served (0 if none).
fn newest_term(root: &Path) -> i64 {
    std::fs::read_to_string(root.join(TERM_FILE))
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0)
}

struct Agent {
    driver: Arc<LocalDriver>,
    nodes_dir: PathBuf,
    root: PathBuf,
    /// With etcd: whether the agent's lease is valid (else it starts and promotes no primary).
    standing: Option<Standing>,
    /// The newest control-plane term an operation came with: older ones change nothing. Kept
    /// in [`TERM_FILE`] under the root, so that a restarted agent still turns a former leader
    /// away.
    newest_term: std::sync::Mutex<i64>,
    /// One lock per node directory: operations that change a node run one at a time (two
    /// leaders' rejoins of one node must not rewind and start it at once).
    node_locks: std::sync::Mutex<std::collections::HashMap<PathBuf, Arc<std::sync::Mutex<()>>>>,
}

/// Why the agent turns a call away: a stable code, an HTTP status and a sentence.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("node {node} has directory {dir}: this agent keeps its nodes right under {nodes}")]
    OutsideNodes { node: String, dir: String, nodes: String },
    #[error("node {node} runs the build in {bin}, which is not installed on this host")]
    BuildMissing { node: String, bin: String },
    #[error(
        "a newer control plane leads (term {newest}; this call's is {term}): it changes nothing \
         here"
    )]
    StaleLeader { newest: i64, term: i64 },
    #[error("another operation on node {0} is still running")]
    NodeBusy(String),
}

impl Refusal {
    fn code(&self) -> &'static str {
        match self {
            Self::OutsideNodes { .. } | Self::BuildMissing { .. } => "invalid_node",
            Self::StaleLeader { .. } => "stale_leader",
            Self::NodeBusy(_) => "node_busy",
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            Self::OutsideNodes { .. } | Self::BuildMissing { .. } => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            Self::StaleLeader { .. } | Self::NodeBusy(_) => StatusCode::CONFLICT,
        }
    }

    fn answer(&self) -> Response {
        error(self.status(), self.code(), self)
    }
}

impl Agent {
    /// Refuses an operation of a control plane older than one already served (and records a
    /// newer one).
    fn admit(&self, term: Option<i64>) -> Result<(), Refusal> {
        let Some(term) = term else { return Ok(()) };
        let mut newest = self.newest_term.lock().unwrap_or_else(|e| e.into_inner());
        if term < *newest {
            return Err(Refusal::StaleLeader { newest: *newest, term });
        }
        if term > *newest {
            *newest = term;
            let path = self.root.join(TERM_FILE);
            if let Err(e) = crate::files::write_private(&path, term.to_string().as_bytes()) {
                warn!(path = %path.display(), error = %e, "cannot keep the newest control-plane term");
            }
        }
        Ok(())
    }

    fn node_lock(&self, dir: &std::path::Path) -> Arc<std::sync::Mutex<()>> {
        let mut locks = self.node_locks.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(locks.entry(dir.to_owned()).or_default())
    }

    /// A node's directory must be one directory right under the agent's `nodes/`, and its
    /// build (when one is named) a directory with a PostgreSQL server.
    fn check(&self, node: &NodeSpec) -> Result<(), Refusal> {
        let under = node.dir.parent() == Some(self.nodes_dir.as_path());
        let plain = node.dir.file_name().and_then(|n| n.to_str()).is_some_and(plain_name);
        if !under || !plain {
            return Err(Refusal::OutsideNodes {
                node: node.name.clone(),
                dir: node.dir.display().to_string(),
                nodes: self.nodes_dir.display().to_string(),
            });
        }
        if let Some(bin) = &node.bin {
            if !bin.join("postgres").is_file() {
                let bin = bin.display().to_string();
                return Err(Refusal::BuildMissing { node: node.name.clone(), bin });
            }
        }
        Ok(())
    }
}

/// A directory name of the agent's own making: no path, no hidden file.
fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

impl Agent {
    /// Where the base backup (`base`) and WAL (`wal`) of a node being restored are unpacked.
    fn staging(&self, node_dir: &str) -> PathBuf {
        self.root.join("staging").join(node_dir)
    }
}

/// Runs the agent until `shutdown`. Its nodes keep running when it stops.
pub async fn run(options: AgentOptions, shutdown: CancellationToken) -> anyhow::Result<()> {
    let driver = Arc::new(LocalDriver::new(options.pg_bin.clone(), &options.user)?);
    let nodes_dir = options.root.join("nodes");
    crate::nodes::local::prepare_nodes_dir(&options.root, &options.user)?;
    let read = |name: &str| -> anyhow::Result<String> {
        let path = options.tls_dir.join(name);
        std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))
    };
    let key_path = options.tls_dir.join("agent.key");
    if crate::files::readable_by_others(&key_path).unwrap_or(false) {
        bail!("{} is readable by other users: chmod 600 it", key_path.display());
    }
    let (ca, cert, key) = (read("ca.crt")?, read("agent.crt")?, read("agent.key")?);
    let identity = super::tls::Identity { ca: &ca, cert: &cert, key: &key };
    let config = super::tls::server_config(&identity)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind(options.listen)
        .await
        .with_context(|| format!("cannot listen on {}", options.listen))?;
    let standing = match &options.etcd {
        Some(settings) => {
            let etcd = crate::coord::Etcd::connect(&settings.endpoints, &settings.prefix).await?;
            let standing = Standing::default();
            tokio::spawn(fencing::hold(
                etcd,
                settings.advertise.clone(),
                settings.lease_ttl,
                nodes_dir.clone(),
                Arc::clone(&driver),
                standing.clone(),
                shutdown.child_token(),
            ));
            Some(standing)
        }
        None => None,
    };
    let agent = Arc::new(Agent {
        driver,
        nodes_dir,
        root: options.root.clone(),
        standing,
        newest_term: std::sync::Mutex::new(newest_term(&options.root)),
        node_locks: Default::default(),
    });
    let router = Router::new()
        .route("/v1/info", get(info_of))
        .route("/v1/nodes/{op}", post(call))
        .route("/v1/sql/{dir}/{port}", get(sql))
        .route("/v1/dump", post(dump))
        .route("/v1/staging/{dir}/{part}", post(stage))
        .with_state(agent);
    info!(listen = %listener.local_addr()?, root = %options.root.display(), "agent started");
    loop {
        let (tcp, peer) = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (acceptor, router) = (acceptor.clone(), router.clone());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return debug!(%peer, error = %e, "TLS handshake refused"),
                Err(_) => return debug!(%peer, "TLS handshake timed out"),
            };
            let service = hyper_util::service::TowerToHyperService::new(router);
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HANDSHAKE)
                .serve_connection(TokioIo::new(tls), service)
                .with_upgrades()
                .await;
            if let Err(e) = served {
                debug!(%peer, error = %e, "connection ended");
            }
        });
    }
}

fn error(status: StatusCode, code: &str, message: impl std::fmt::Display) -> Response {
    let body = json!({"error": {"code": code, "message": message.to_string()}});
    (status, Json(body)).into_response()
}

async fn info_of(State(agent): State<Arc<Agent>>) -> Json<Info> {
    Json(Info { root: agent.root.clone(), version: env!("CARGO_PKG_VERSION").into() })
}

async fn call(
    State(agent): State<Arc<Agent>>,
    UrlPath(op): UrlPath<String>,
    Json(call): Json<Call>,
) -> Response {
    let Some(op) = Op::parse(&op) else {
        return error(StatusCode::NOT_FOUND, "unknown_operation", format!("no operation {op:?}"));
    };
    if let Err(refused) = agent.check(&call.node) {
        return refused.answer();
    }
    let makes_primary = match op {
        Op::Promote => true,
        Op::Start => fencing::is_primary_dir(&call.node.dir),
        _ => false,
    };
    if makes_primary && agent.standing.as_ref().is_some_and(|s| !s.in_touch()) {
        let why = "this agent is cut off from etcd: it starts and promotes no primary until it is \
                   back in touch";
        return error(StatusCode::SERVICE_UNAVAILABLE, "cut_off", why);
    }
    let node = call.node.name.clone();
    // Admitted once the node's earlier operations ended: one of a leader that came meanwhile
    // turns the waiting ones of the former leader away.
    let work = move || {
        let lock = op.changes_node().then(|| agent.node_lock(&call.node.dir));
        let _serial = match &lock {
            Some(lock) => Some(
                wait_for(lock, op.bound() / 2)
                    .ok_or_else(|| Refusal::NodeBusy(call.node.name.clone()))?,
            ),
            None => None,
        };
        if op.changes_node() {
            agent.admit(call.term)?;
        }
        Ok::<_, Refusal>(apply(&agent, op, call))
    };
    match tokio::task::spawn_blocking(work).await {
        Ok(Err(refused)) => {
            warn!(node, op = op.name(), "{refused}");
            refused.answer()
        }
        Ok(Ok(Ok(answer))) => Json(answer).into_response(),
        Ok(Ok(Err(e))) => {
            warn!(node, op = op.name(), error = %e, "operation failed");
            error(StatusCode::INTERNAL_SERVER_ERROR, "driver_failed", e)
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "agent_failed", e),
    }
}

/// `lock`, once free, waiting at most `limit`: past half its caller's bound, an operation
/// would run after the caller gave up on it.
fn wait_for(
    lock: &std::sync::Mutex<()>,
    limit: std::time::Duration,
) -> Option<std::sync::MutexGuard<'_, ()>> {
    let mut guard = None;
    crate::wait::until_blocking(limit, crate::wait::QUICK, || {
        guard = match lock.try_lock() {
            Ok(guard) => Some(guard),
            Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        };
        guard.is_some()
    });
    guard
}

/// Runs `op` with the local driver; its answer as JSON.
fn apply(agent: &Agent, op: Op, call: Call) -> Result<Value, DriverError> {
    let (driver, node) = (&agent.driver, &call.node);
    let missing = |what| DriverError::Incomplete { op: op.name(), what };
    let config = || call.config.as_ref().ok_or_else(|| missing("configuration"));
    Ok(match op {
        Op::Init => json!(driver.init(node, config()?)?),
        Op::InitStandby => {
            let upstream = call.upstream.as_ref().ok_or_else(|| missing("upstream"))?;
            json!(driver.init_standby(node, config()?, upstream)?)
        }
        Op::Configure => json!(driver.configure(node, config()?)?),
        Op::Start => json!(driver.start(node)?),
        Op::Stop => json!(driver.stop(node)?),
        Op::Reload => json!(driver.reload(node)?),
        Op::IsRunning => json!(driver.is_running(node)),
        Op::Fence => json!(driver.fence(node)?),
        Op::Promote => json!(driver.promote(node)?),
        Op::MakeStandby => json!(driver.make_standby(node)?),
        Op::RewindFrom => {
            let source = call.upstream.as_ref().ok_or_else(|| missing("source"))?;
            json!(driver.rewind_from(node, source)?)
        }
        Op::InitFromBackup => {
            let name = node.dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            let staging = agent.staging(name);
            let restored = driver.init_from_backup(
                node,
                config()?,
                &staging.join("base"),
                &staging.join("wal"),
            );
            let _ = std::fs::remove_dir_all(&staging);
            json!(restored?)
        }
        Op::LogTail => json!(driver.log_tail(node)),
        Op::Destroy => json!(driver.destroy(node)?),
        Op::Resources => serde_json::to_value(driver.resources(node))?,
        Op::Disk => serde_json::to_value(driver.disk(node))?,
    })
}

/// The SQL tunnel: once the node's socket answers, the connection switches to a byte stream
/// to it.
async fn sql(
    State(agent): State<Arc<Agent>>,
    UrlPath((dir, port)): UrlPath<(String, u16)>,
    mut request: Request,
) -> Response {
    let node = NodeSpec {
        name: dir.clone(),
        dir: agent.nodes_dir.join(&dir),
        host: String::new(),
        port,
        bin: None,
        agent: None,
    };
    if let Err(refused) = agent.check(&node) {
        return refused.answer();
    }
    let Some(upgrade) = request.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return error(StatusCode::BAD_REQUEST, "upgrade_required", "ask for Upgrade: pgwarden-sql");
    };
    let socket = socket_path(&node.dir, port);
    let mut unix = match tokio::time::timeout(HANDSHAKE, UnixStream::connect(&socket)).await {
        Ok(Ok(unix)) => unix,
        Ok(Err(e)) => return error(StatusCode::SERVICE_UNAVAILABLE, "node_unreachable", e),
        Err(_) => return error(StatusCode::SERVICE_UNAVAILABLE, "node_unreachable", "timed out"),
    };
    tokio::spawn(async move {
        if let Ok(upgraded) = upgrade.await {
            let mut upgraded = TokioIo::new(upgraded);
            let _ = tokio::io::copy_bidirectional(&mut upgraded, &mut unix).await;
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("connection", "upgrade")
        .header("upgrade", SQL_PROTOCOL)
        .body(axum::body::Body::empty())
        .unwrap_or_else(|e| error(StatusCode::INTERNAL_SERVER_ERROR, "agent_failed", e))
}

/// What `POST /v1/dump` asks for.
#[derive(serde::Deserialize)]
struct DumpRequest {
    node: NodeSpec,
    database: String,
    /// Directory of the client programs (`pg_dump`) on this host.
    tools: PathBuf,
}

/// A custom-format dump of a database of a node, streamed with its size and SHA-256 once it
/// is complete (a dump that fails is an error, never a short file).
async fn dump(State(agent): State<Arc<Agent>>, Json(request): Json<DumpRequest>) -> Response {
    if let Err(refused) = agent.check(&request.node) {
        return refused.answer();
    }
    if !request.tools.join("pg_dump").is_file() {
        let message = format!("no pg_dump in {} on this host", request.tools.display());
        return error(StatusCode::UNPROCESSABLE_ENTITY, "no_tools", message);
    }
    let worker = Arc::clone(&agent);
    let dumped = tokio::task::spawn_blocking(move || -> Result<_, DriverError> {
        let dir = worker.root.join("dumps");
        crate::files::private_dir(&dir)?;
        let name = format!("{}-{:016x}.dump", request.node.name, rand::random::<u64>());
        let path = dir.join(name);
        crate::files::create_private(&path)?;
        let outcome = worker.driver.dump(&request.node, &request.database, &request.tools, &path);
        // The open file is all that is left of it once streamed.
        let file = outcome.and_then(|()| Ok(std::fs::File::open(&path)?));
        let _ = std::fs::remove_file(&path);
        let file = file?;
        let sha256 = crate::files::sha256_read(&file)?;
        std::io::Seek::rewind(&mut &file)?;
        Ok((file, sha256))
    })
    .await;
    let (file, sha256) = match dumped {
        Ok(Ok(dumped)) => dumped,
        Ok(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, "dump_failed", e),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, "agent_failed", e),
    };
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let stream = tokio_util::io::ReaderStream::new(tokio::fs::File::from_std(file));
    Response::builder()
        .header("content-type", "application/octet-stream")
        .header("content-length", size)
        .header(super::client::SHA256_HEADER, sha256)
        .body(axum::body::Body::from_stream(stream))
        .unwrap_or_else(|e| error(StatusCode::INTERNAL_SERVER_ERROR, "agent_failed", e))
}

/// Unpacks a tar stream (the request's body) into the staging area's `base` or `wal` for the
/// node whose directory is `dir`, replacing what was there.
async fn stage(
    State(agent): State<Arc<Agent>>,
    UrlPath((dir, part)): UrlPath<(String, String)>,
    request: Request,
) -> Response {
    use http_body_util::BodyExt;
    use tokio::io::AsyncWriteExt;
    if !plain_name(&dir) || !["base", "wal"].contains(&part.as_str()) {
        let message = format!("no staging area {dir}/{part}: a node directory, then base or wal");
        return error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_staging", message);
    }
    let target = agent.staging(&dir).join(&part);
    let prepared = crate::files::blocking_io(|| {
        let _ = std::fs::remove_dir_all(&target);
        crate::files::private_dir(&agent.root.join("staging"))?;
        crate::files::private_dir(&agent.staging(&dir))?;
        crate::files::private_dir(&target)
    });
    if let Err(e) = prepared {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "staging_failed", e);
    }
    let spawned = tokio::process::Command::new("tar")
        .args(["--extract", "--file", "-", "--no-same-owner", "--directory"])
        .arg(&target)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let mut tar = match spawned {
        Ok(tar) => tar,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, "staging_failed", e),
    };
    let Some(mut stdin) = tar.stdin.take() else {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "staging_failed", "tar has no input");
    };
    let mut body = request.into_body();
    let mut received = 0u64;
    let fed: Result<(), String> = async {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("the upload broke off: {e}"))?;
            if let Ok(data) = frame.into_data() {
                received += data.len() as u64;
                stdin.write_all(&data).await.map_err(|e| format!("tar stopped reading: {e}"))?;
            }
        }
        Ok(())
    }
    .await;
    drop(stdin);
    let finished = tar.wait_with_output().await;
    let untarred = match finished {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!("tar failed: {}", String::from_utf8_lossy(&out.stderr).trim())),
        Err(e) => Err(e.to_string()),
    };
    match fed.and(untarred) {
        Ok(()) => Json(json!({"received_bytes": received})).into_response(),
        Err(e) => {
            let _ = std::fs::remove_dir_all(agent.staging(&dir));
            error(StatusCode::UNPROCESSABLE_ENTITY, "staging_failed", e)
        }
    }
}

fn socket_path(dir: &Path, port: u16) -> PathBuf {
    dir.join(format!(".s.PGSQL.{port}"))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::wait_for;

    #[test]
    fn a_node_s_lock_is_waited_for_within_the_limit_only() {
        let lock = std::sync::Mutex::new(());
        assert!(wait_for(&lock, Duration::ZERO).is_some(), "a free lock is taken at once");
        let held = lock.lock().unwrap();
        let asked = Instant::now();
        assert!(wait_for(&lock, Duration::from_millis(100)).is_none());
        assert!(asked.elapsed() >= Duration::from_millis(100));
        drop(held);
        let (taken, told) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            s.spawn(|| {
                let _held = lock.lock().unwrap();
                taken.send(()).unwrap();
                std::thread::sleep(Duration::from_millis(50));
            });
            told.recv().unwrap();
            assert!(wait_for(&lock, Duration::from_secs(10)).is_some(), "taken once released");
        });
    }
}
